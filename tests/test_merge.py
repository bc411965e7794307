"""`ktmoe merge` (ktmoe/finetune/merge.py): a LoRA adapter merged into its checkpoint, written
as a plain bf16 checkpoint.

The oracle is PEFT's own merge on plain torch: the tests' tiny quantized checkpoints
(tests/quantized_checkpoints.py: DeepSeek-V3 FP8 with per-expert tensors, Qwen3-MoE FP8 with
experts fused as transformers v5 saves FP8Experts, Kimi-K2-like INT4 pack-quantized with
quantized dense MLPs) come with the eager model holding their dequantized weights; PEFT adds a
LoRA with random factors on every linear and on the experts' gate_up / down parameters,
saves the adapter and merges it (`merge_and_unload`). `ktmoe merge` of the checkpoint and that
adapter, loaded by stock transformers without ktmoe, must hold the same weights (to bf16
rounding: relative error <= 2^-8 per tensor) and give the same logits (design.md 6: rel <=
1e-2, cosine >= 0.9999). Bad inputs end with one `ktmoe merge: error:` line, exit 2.
"""
import copy
import json

import pytest
import torch

import ktmoe.cli
import ktmoe.torch  # noqa: F401  (ktmoe's PEFT hooks are installed: they must leave eager experts alone)
import quantized_checkpoints as qc

CASES = {
    "deepseek_v3-fp8": ("deepseek_v3", "fp8", qc.DSV3_FP8, {}),
    "qwen3_moe-fp8-fused": ("qwen3_moe", "fp8", qc.QWEN3_FP8, {"fused_fp8": True}),
    "kimi_k2-int4": ("deepseek_v3", "int4", qc.KIMI_INT4, {"quantize_dense": True}),
}


# the attention projections of both architectures and the dense / shared-expert MLPs
LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj",
           "gate_proj", "up_proj", "down_proj"]


def _adapter(eager, d, seed=0):
    """PEFT LoRA on the linears of LINEARS and the experts' parameters, random factors; saved to d; returns
    PEFT's merged model."""
    from peft import LoraConfig, get_peft_model
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=LINEARS,
                     target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    pm = get_peft_model(copy.deepcopy(eager), cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    pm.save_pretrained(d)
    return pm.merge_and_unload().eval()


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("case", list(CASES))
def test_merge_matches_peft_merge_of_the_dequantized_model(case, tmp_path):
    from transformers import AutoModelForCausalLM
    arch, scheme, overrides, opts = CASES[case]
    eager, _ = qc.make(tmp_path / "ckpt", arch, scheme, **opts, **{**overrides, "num_hidden_layers": 2})
    ref = _adapter(eager, tmp_path / "adapter")
    assert ktmoe.cli.main(["merge", "--model", str(tmp_path / "ckpt"), "--adapter", str(tmp_path / "adapter"),
                           "--out", str(tmp_path / "merged"), "--quiet"]) == 0
    cfg = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["dtype"] == "bfloat16"
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    want, got = ref.state_dict(), merged.state_dict()
    assert set(got) == set(want), set(got) ^ set(want)
    changed = 0
    for n, w in want.items():
        err = _rel(got[n], w)
        assert err <= 2 ** -8, (n, err)
        changed += _rel(w, eager.state_dict()[n]) > 1e-3
    assert changed >= 4 * cfg["num_hidden_layers"], changed   # the deltas are there, not just the base
    ids = torch.randint(0, cfg["vocab_size"], (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = merged(ids).logits, ref(ids).logits
    cos = torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0).item()
    assert _rel(a, b) <= 1e-2 and cos >= 0.9999, (_rel(a, b), cos)


def _merge_err(capsys, *argv):
    rc = ktmoe.cli.main(["merge", *map(str, argv)])
    err = capsys.readouterr().err.strip().splitlines()
    return rc, err


def test_bad_inputs_are_one_error_line(tmp_path, capsys):
    arch, scheme, overrides, opts = CASES["deepseek_v3-fp8"]
    eager, _ = qc.make(tmp_path / "ckpt", arch, scheme, **opts, **{**overrides, "num_hidden_layers": 2})
    _adapter(eager, tmp_path / "adapter")
    ok = ["--model", tmp_path / "ckpt", "--adapter", tmp_path / "adapter"]

    rc, err = _merge_err(capsys, "--model", tmp_path / "ckpt", "--adapter", tmp_path / "nowhere", "--out", tmp_path / "o")
    assert rc == 2 and len(err) == 1 and err[0].startswith("ktmoe merge: error: --adapter ") \
        and "adapter_config.json" in err[0], err

    cfg_path = tmp_path / "adapter" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "use_dora": True}))
    rc, err = _merge_err(capsys, *ok, "--out", tmp_path / "o")
    assert rc == 2 and len(err) == 1 and "DoRA" in err[0], err
    cfg_path.write_text(json.dumps(cfg))

    # an adapter trained on another model: a module this checkpoint does not have
    from safetensors.torch import load_file, save_file
    wpath = tmp_path / "adapter" / "adapter_model.safetensors"
    w = load_file(wpath)
    key = next(k for k in w if k.endswith("lora_A.weight"))
    w[key.replace("model.layers.0.", "model.layers.7.")] = w[key].clone()
    w[key.replace("model.layers.0.", "model.layers.7.").replace("lora_A", "lora_B")] = \
        w[key.replace("lora_A", "lora_B")].clone()
    save_file(w, wpath)
    rc, err = _merge_err(capsys, *ok, "--out", tmp_path / "o")
    assert rc == 2 and len(err) == 1 and "model.layers.7." in err[0] and "does not have" in err[0], err
    assert not (tmp_path / "o").exists()   # nothing half-written

    rc, err = _merge_err(capsys, "--model", tmp_path / "ckpt", "--adapter", tmp_path / "adapter",
                         "--out", tmp_path / "ckpt")
    assert rc == 2 and len(err) == 1 and "must differ" in err[0], err


def test_merge_of_a_finetune_adapter_matches_the_quantized_model_with_it(tmp_path):
    """The user's path: `ktmoe finetune` on an FP8 checkpoint as published, then `ktmoe merge`:
    the merged bf16 model in stock transformers gives the logits of ktmoe.torch.from_pretrained
    (the FP8 codes in the kernel) with the adapter loaded by PeftModel.from_pretrained."""
    import shutil

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from ktmoe.finetune import tiny
    arch, scheme, overrides, opts = CASES["deepseek_v3-fp8"]
    qc.make(tmp_path / "ckpt", arch, scheme, **opts, **{**overrides, "num_hidden_layers": 2, "vocab_size": 512})
    base = tiny.ensure(tmp_path / "tok")
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(base / f, tmp_path / "ckpt" / f)
    assert ktmoe.cli.main(["finetune", "--model", str(tmp_path / "ckpt"), "--quiet", "--lr", "3e-2", "--batch-tokens",
                           "256", "--max-seq-len", "64", "--torch-threads", "1", "--data", str(tiny.dataset_path()),
                           "--steps", "2", "--out", str(tmp_path / "run")]) == 0
    assert ktmoe.cli.main(["merge", "--model", str(tmp_path / "ckpt"), "--adapter", str(tmp_path / "run" / "adapter"),
                           "--out", str(tmp_path / "merged"), "--quiet"]) == 0
    assert (tmp_path / "merged" / "tokenizer.json").is_file()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    quant = ktmoe.torch.from_pretrained(str(tmp_path / "ckpt"), dtype=torch.float32)
    plain = ktmoe.torch.from_pretrained(str(tmp_path / "ckpt"), dtype=torch.float32).eval()
    tuned = PeftModel.from_pretrained(quant, str(tmp_path / "run" / "adapter")).eval()
    ids = torch.randint(0, 512, (2, 13), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a, b, c = merged(ids).logits, tuned(ids).logits, plain(ids).logits
    cos = torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0).item()
    assert _rel(a, b) <= 1e-2 and cos >= 0.9999, (_rel(a, b), cos)
    assert _rel(b, c) > 10 * _rel(a, b), (_rel(b, c), _rel(a, b))   # the adapter changed the model: it was merged
