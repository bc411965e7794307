"""Quantized checkpoints as published (ktmoe/torch/checkpoint/quantized.py, expert_layers.py, loading.py).

Tiny checkpoints in the published layouts (tests/quantized_checkpoints.py: real tensor names,
dtypes and `quantization_config`, sharded, partial 128 x 128 blocks in the non-expert linears):
a DeepSeek-V3 FP8 release (experts, shared experts, dense MLP and attention in fp8), a
Qwen3-MoE FP8 one, the same DeepSeek-V3 with experts fused as transformers v5 saves FP8Experts,
and a Kimi-K2-like INT4 compressed-tensors pack-quantized one (deepseek_v3 architecture,
group 32, bf16 scales). Checks:
- the scheme is read from config.json; every unsupported method or setting raises naming it;
- loaded as published: the kernel's stored codes and scales equal the checkpoint's bit for
  bit; logits equal an eager HF model holding the dequantized weights (design.md 6: rel <= 1e-2,
  cosine >= 0.9999); ktmoe.torch.from_pretrained gives the same model;
- converting (fp8 -> bf16, fp8 -> int4, int4 g32 -> bf16): the stored codes are ktmoe's own
  quantizer's of the dequantized bf16 weights; logits as above for bf16;
- `ktmoe finetune --model DIR` runs 2 steps with LoRA on top (finite loss, lower at step 2 on
  the same batch); a conversion says so on stderr; bad inputs (unknown method, NaN e4m3 code,
  missing or mis-shaped scale) end with one error line naming the method / the tensor, exit 2;
- peak host memory of an as-published load stays within packed + one layer + the rest.
"""
import json
import shutil

import ml_dtypes
import numpy as np
import pytest
import torch

import ktmoe.cli
import ktmoe.torch
import quantized_checkpoints as qc
import torch_models as tm
from ktmoe.finetune import tiny
from ktmoe.torch.checkpoint import CheckpointError, loading, quantized, reader as checkpoint

RTOL, MIN_COS = 1e-2, 0.9999   # design.md 6
CPU = torch.device("cpu")

CASES = {   # name: (arch, scheme, config overrides, make() options)
    "deepseek_v3-fp8": ("deepseek_v3", "fp8", qc.DSV3_FP8, {}),
    "qwen3_moe-fp8": ("qwen3_moe", "fp8", qc.QWEN3_FP8, {}),
    "deepseek_v3-fp8-fused": ("deepseek_v3", "fp8", qc.DSV3_FP8, {"fused_fp8": True}),
    "kimi_k2-int4": ("deepseek_v3", "int4", qc.KIMI_INT4, {"quantize_dense": True}),
}


# the kernel format each case's checkpoint loads into as published: the tests' INT4 checkpoints
# have bf16 scales, as Kimi K2's, so int4bs (the scales kept as bf16)
OWN_FORMAT = {"fp8": "fp8", "int4": "int4bs"}


def write(case, d, **more):
    arch, scheme, overrides, opts = CASES[case]
    return qc.make(d, arch, scheme, **opts, **{**overrides, **more})


def load(d, **request):
    """loading.load of checkpoint d, its experts in the format `request` resolves to (as finetune
    and from_pretrained resolve it once: quantized.target_format); none: the checkpoint's own."""
    ckpt = checkpoint.Checkpoint(d, require_tokenizer=False)
    fmt = None
    if request:
        try:
            fmt = quantized.target_format(quantized.checkpoint_scheme(ckpt), **request)
        except ValueError as e:
            raise CheckpointError(f"{ckpt.label}: {e}") from None
    return loading.load(ckpt, device=CPU, dtype=torch.float32, max_tokens=256, kernel_format=fmt)


def assert_same_logits(loaded, model, seed=4):
    ids = tm.batch(seed=seed)["input_ids"]
    with torch.no_grad():
        want, got = model(ids).logits, loaded(ids).logits
    a, b = got.double().flatten(), want.double().flatten()
    rel = ((a - b).norm() / b.norm()).item()
    cos = torch.nn.functional.cosine_similarity(a, b, dim=0).item()
    assert rel <= RTOL, f"logits: relative error {rel:.3e} > {RTOL} (design.md 6)"
    assert cos >= MIN_COS, f"logits: cosine {cos:.6f} < {MIN_COS} (design.md 6)"


# ---- the scheme in config.json ----
def test_scheme_of_supported_configs():
    assert quantized.scheme_of({}, "x") == quantized.Scheme()
    fp8 = quantized.scheme_of({"quantization_config": dict(qc.FP8_CONFIG, weight_block_size=[128, 64])}, "x")
    assert (fp8.method, fp8.block) == ("fp8", (128, 64))
    qwen = dict(qc.FP8_CONFIG, modules_to_not_convert=["lm_head", "model.layers.0.mlp.gate"])
    assert quantized.scheme_of({"quantization_config": qwen}, "x").method == "fp8"
    for g in (32, 64, 128):
        s = quantized.scheme_of({"quantization_config": qc.int4_config(group=g)}, "x")
        assert (s.method, s.group_size) == ("int4", g)


def _ct(**weights):
    cfg = qc.int4_config()
    cfg["config_groups"]["group_0"]["weights"].update(weights)
    return cfg


REFUSED = {
    "gptq": ({"quant_method": "gptq", "bits": 4, "group_size": 128, "sym": False}, r"'gptq' \(GPTQ layout.*zero points"),
    "awq": ({"quant_method": "awq", "bits": 4, "zero_point": True}, r"'awq' \(AWQ"),
    "bitsandbytes": ({"quant_method": "bitsandbytes", "load_in_4bit": True}, r"'bitsandbytes'"),
    "mxfp4": ({"quant_method": "mxfp4"}, r"'mxfp4'"),
    "fp8 e5m2": (dict(qc.FP8_CONFIG, fmt="e5m2"), r"'fp8' with fmt 'e5m2'"),
    "fp8 static": (dict(qc.FP8_CONFIG, activation_scheme="static"), r"activation_scheme 'static'"),
    "fp8 per-tensor": ({k: v for k, v in qc.FP8_CONFIG.items() if k != "weight_block_size"}, r"no weight_block_size"),
    "fp8 ue8m0": (dict(qc.FP8_CONFIG, scale_fmt="ue8m0"), r"scale_fmt 'ue8m0'"),
    "ct float-quantized": (dict(qc.int4_config(), format="float-quantized"), r"format 'float-quantized'"),
    "ct int8 naive": (dict(qc.int4_config(), format="naive-quantized"), r"format 'naive-quantized'"),
    "ct 8 bits": (_ct(num_bits=8), r"num_bits 8"),
    "ct asymmetric": (_ct(symmetric=False), r"asymmetric weights .*zero points"),
    "ct actorder": (_ct(actorder="group"), r"actorder 'group'"),
    "ct group 16": (_ct(group_size=16), r"group_size 16"),
    "ct channel": (_ct(strategy="channel"), r"strategy 'channel'"),
    "ct W4A8": ({**qc.int4_config(), "config_groups": {"g": {**qc.int4_config()["config_groups"]["group_0"],
                                                             "input_activations": {"num_bits": 8}}}},
                r"input_activations quantization"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_scheme_of_refuses(case):
    cfg, match = REFUSED[case]
    with pytest.raises(CheckpointError, match=match) as e:
        quantized.scheme_of({"quantization_config": cfg}, "--model M")
    assert str(e.value).startswith("--model M: quantization method ") and "supported: FP8 block-scaled" in str(e.value)


def test_target_format():
    fp8, int4 = quantized.Scheme("fp8", block=(128, 128)), quantized.Scheme("int4", group_size=32)
    own = quantized.target_format(fp8)
    assert own == quantized.ExpertFormat(fp8, "fp8", "bf16", None, as_published=True, conversion=None)
    assert own.published_options() == {"activations": "bf16", "block": (128, 128)}
    assert quantized.target_format(int4).as_published and quantized.target_format(int4).conversion is None
    assert quantized.target_format(int4, "int4", 32, "bf16").conversion is None
    fmt = quantized.target_format(int4, "int4", 128, "bf16")
    assert fmt.group_size == 128 and not fmt.as_published and "to int4 group 128" in fmt.conversion
    fmt = quantized.target_format(fp8, "int4", None, "bf16", isa="portable")
    assert fmt.group_size == 128 and fmt.conversion.startswith("converting the checkpoint's experts (FP8 e4m3")
    assert fmt.packing_options() == {"weights": "int4", "activations": "bf16", "group_size": 128, "isa": "portable"}
    assert quantized.target_format(quantized.Scheme(), "int8", None, "bf16").conversion is None
    with pytest.raises(ValueError, match=r"group_size: must be one of \[32, 64, 128\], got 100"):
        quantized.target_format(fp8, "int4", 100)   # checked once, here, not per layer
    with pytest.raises(ValueError, match="ktmoe does not quantize to fp8"):
        quantized.target_format(int4, "fp8", None, "bf16")
    with pytest.raises(ValueError, match="W8A8.*fp8"):
        quantized.target_format(fp8, None, None, "int8")


def test_int4_unpacking_matches_the_published_packing():
    q = torch.randint(-8, 8, (5, 64), dtype=torch.int8)
    words = qc.pack_int4(q)
    assert words.dtype == torch.int32 and tuple(words.shape) == (5, 8)
    assert torch.equal(quantized.unpack_int4(words, 64), q)
    # the bytes of the words XOR 0x88 are two's-complement nibbles, even column low
    b = words.view(torch.uint8) ^ quantized.INT4_XOR
    lo, hi = (b & 0xF).to(torch.int8), (b >> 4).to(torch.int8)
    nib = torch.stack([lo, hi], -1).view(5, 64)
    assert torch.equal(torch.where(nib > 7, nib - 16, nib), q)


def test_dequantize_matches_the_tests_own_quantizers():
    """Bands of rows, partial blocks and groups: fp8 block (48, 32) on 300 x 200, int4 group 32 on
    300 x 96, into fp32 exactly code x scale (computed in fp32 like the tests' quantizers)."""
    w = torch.randn(300, 200)
    codes, s, want = qc.fp8_quantize(w, block=(48, 32))
    got = quantized.dequantize(quantized.Scheme("fp8", block=(48, 32)), {"codes": codes.view(torch.uint8), "scale": s},
                               torch.empty(300, 200), "t.weight")
    assert torch.equal(got, want)
    q, s, want = qc.int4_quantize(torch.randn(300, 96))
    got = quantized.dequantize(quantized.Scheme("int4", group_size=32), {"codes": qc.pack_int4(q), "scale": s,
                               "shape": torch.tensor([300, 96])}, torch.empty(300, 96), "t.weight")
    assert torch.equal(got, want)


# ---- conversion (dequantized to bf16 in the loader, then the usual formats) ----
def test_fp8_converted_to_bf16_matches_dequantized_model(tmp_path):
    model, _ = write("deepseek_v3-fp8", tmp_path / "c")
    loaded, stats = load(tmp_path / "c", weights="bf16")
    assert stats.scheme.method == "fp8" and not stats.as_published
    # q_a, q_b, kv_a, kv_b, o per layer; dense gate/up/down; shared experts gate/up/down in the MoE layers
    assert stats.dequantized == 3 * 5 + 3 + 2 * 3
    assert stats.largest_layer_bytes == 3 * 8 * 128 * 128 * 2   # the bf16 buffer of one layer
    assert all(m._ktmoe.layer.weights == "bf16" for _, m in loading.experts_modules(loaded))
    assert not stats.ignored, stats.ignored
    assert_same_logits(loaded, model)


def test_int4_converted_to_bf16_matches_dequantized_model(tmp_path):
    model, _ = write("kimi_k2-int4", tmp_path / "c")
    loaded, stats = load(tmp_path / "c", weights="bf16")
    assert stats.scheme.group_size == 32 and stats.dequantized == 3 and not stats.ignored
    assert_same_logits(loaded, model)


def test_fp8_converted_to_int4_is_the_usual_quantizer_of_the_dequantized_weights(tmp_path):
    from ktmoe.reference import quant as ref
    model, _ = write("qwen3_moe-fp8", tmp_path / "c")
    loaded, stats = load(tmp_path / "c", weights="int4", group_size=64)
    assert not stats.as_published
    (name, m), *_ = loading.experts_modules(loaded)
    layer = m._ktmoe.layer
    assert (layer.weights, layer.group_size) == ("int4", 64)
    ref_experts = model.get_submodule(name)
    I = ref_experts.down_proj.shape[2]
    for proj, w in (("gate", ref_experts.gate_up_proj[:, :I]), ("up", ref_experts.gate_up_proj[:, I:]),
                    ("down", ref_experts.down_proj)):
        want = ref.quantize(w.detach().to(torch.bfloat16).float().numpy(), "int4", group_size=64)
        q, s = layer.quantized_weights(proj)
        assert np.array_equal(q, want.q) and np.array_equal(s, want.scale), proj   # bit for bit


def test_bad_quantized_tensors(tmp_path):
    """A missing or mis-shaped scale, a NaN e4m3 code and a wrong weight_shape are reported
    naming the tensor, before the model is used."""
    def variant(tag, case, edit):
        d = tmp_path / tag
        _, state = write(case, d, num_hidden_layers=2)
        edit(state)
        for f in d.glob("*.safetensors"):
            f.unlink()
        qc.write_shards(state, d, 2)
        return d

    L = "model.layers.1."
    cases = [
        ("no-scale", "deepseek_v3-fp8", lambda s: s.pop(L + "mlp.experts.3.up_proj.weight_scale_inv"),
         r"model.layers.1.mlp.experts.3.up_proj.weight_scale_inv is missing"),
        ("attn-no-scale", "deepseek_v3-fp8", lambda s: s.pop(L + "self_attn.o_proj.weight_scale_inv"),
         r"'model.layers.1.self_attn.o_proj.weight' has no 'weight_scale_inv'"),
        ("scale-shape", "deepseek_v3-fp8",
         lambda s: s.__setitem__(L + "mlp.experts.2.down_proj.weight_scale_inv", torch.ones(2, 1)),
         r"'model.layers.1.mlp.experts.2.down_proj.weight_scale_inv' has shape \[2, 1\], expected \[1, 1\]"),
        ("attn-scale-shape", "deepseek_v3-fp8",
         lambda s: s.__setitem__(L + "self_attn.q_a_proj.weight_scale_inv", torch.ones(2, 2)),
         r"q_a_proj.weight_scale_inv has shape \[2, 2\], expected \[1, 1\]"),
        ("attn-nan", "deepseek_v3-fp8",
         lambda s: s[L + "self_attn.kv_b_proj.weight"].view(torch.uint8).__setitem__((3, 5), 0x7F),
         r"model.layers.1.self_attn.kv_b_proj.weight: NaN e4m3 code\(s\).*first at \[3, 5\]"),
        ("int4-scale-shape", "kimi_k2-int4",
         lambda s: s.__setitem__(L + "mlp.experts.0.gate_proj.weight_scale", torch.ones(32, 1, dtype=torch.bfloat16)),
         r"'model.layers.1.mlp.experts.0.gate_proj.weight_scale' has shape \[32, 1\], expected \[32, 2\]"),
        ("int4-no-shape", "kimi_k2-int4", lambda s: s.pop(L + "mlp.experts.5.down_proj.weight_shape"),
         r"model.layers.1.mlp.experts.5.down_proj.weight_shape is missing"),
        ("int4-dense-shape", "kimi_k2-int4",
         lambda s: s.__setitem__("model.layers.0.mlp.up_proj.weight_shape", torch.tensor([96, 32])),
         r"model.layers.0.mlp.up_proj.weight_shape is \[96, 32\], the model built from config.json expects \[96, 64\]"),
    ]
    for tag, case, edit, match in cases:
        d = variant(tag, case, edit)
        with pytest.raises(CheckpointError, match=match):
            load(d, weights="bf16")


def test_expert_nan_code_named_when_converting(tmp_path):
    _, state = write("deepseek_v3-fp8", tmp_path / "c", num_hidden_layers=2)
    state["model.layers.1.mlp.experts.6.gate_proj.weight"].view(torch.uint8)[0, 7] = 0xFF
    for f in (tmp_path / "c").glob("*.safetensors"):
        f.unlink()
    qc.write_shards(state, tmp_path / "c", 2)
    with pytest.raises(CheckpointError, match=r"--model .*: model.layers.1.mlp.experts.6.gate_proj.weight: NaN "
                                            r"e4m3 code\(s\) \(0x7F / 0xFF\), 1 of them, first at \[0, 7\]"):
        load(tmp_path / "c", weights="int8")


def test_fp8_tensor_without_fp8_config_is_refused(tmp_path):
    _, state = write("qwen3_moe-fp8", tmp_path / "c")
    cfg = json.loads((tmp_path / "c" / "config.json").read_text())
    del cfg["quantization_config"]
    (tmp_path / "c" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"experts.0.gate_proj.weight' has dtype F8_E4M3, but config.json declares "
                                            r"no quantization"):
        load(tmp_path / "c")


# ---- the command line ----
@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return tiny.ensure(tmp_path_factory.mktemp("tiny") / "base-model")


def with_tokenizer(d, base):
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(base / f, d / f)
    return d


FAST = ["--quiet", "--lr", "3e-3", "--batch-tokens", "256", "--max-seq-len", "64", "--torch-threads", "1",
        "--data", str(tiny.dataset_path())]


def finetune(*argv):
    return ktmoe.cli.main(["finetune", *map(str, argv)])


def test_finetune_converting_says_so(tokenizer_dir, tmp_path, capsys):
    write("deepseek_v3-fp8", tmp_path / "c", vocab_size=512, num_hidden_layers=2)
    d = with_tokenizer(tmp_path / "c", tokenizer_dir)
    assert finetune("--model", d, *FAST, "--steps", 2, "--weights", "int4", "--out", tmp_path / "out") == 0
    cap = capsys.readouterr()
    lines = [ln for ln in cap.err.splitlines() if "converting" in ln]
    assert lines == ["ktmoe finetune: converting the checkpoint's experts (FP8 e4m3, one fp32 scale per 128x128 "
                     "block) to int4 group 128 layer by layer as they are loaded: dequantized to bf16, then quantized "
                     "(not the checkpoint's codes)"], cap.err
    assert "checkpoint quantized: FP8 e4m3" in cap.out and "int4 group 128 weights, weight-only" in cap.out, cap.out
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["settings"]["weights"] == "int4" and not summary["experts_as_published"]
    losses = [json.loads(line)["loss"] for line in open(tmp_path / "out" / "log.jsonl")]
    assert len(losses) == 2 and all(np.isfinite(losses))


@pytest.mark.parametrize("case,config,match", [
    ("gptq", {"quant_method": "gptq", "bits": 4, "sym": False}, "quantization method 'gptq' (GPTQ layout"),
    ("asymmetric", _ct(symmetric=False), "'compressed-tensors' with asymmetric weights"),
])
def test_finetune_unsupported_method_is_one_error_line(case, config, match, tokenizer_dir, tmp_path, capsys):
    d = tmp_path / "c"
    shutil.copytree(tokenizer_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"] = config
    (d / "config.json").write_text(json.dumps(cfg))
    assert finetune("--model", d, *FAST, "--steps", 1, "--out", tmp_path / "out") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ktmoe finetune: error: --model ") and match in err[0], err


def test_finetune_fp8_weights_on_an_unquantized_checkpoint_is_refused(tokenizer_dir, tmp_path, capsys):
    assert finetune("--model", tokenizer_dir, *FAST, "--steps", 1, "--weights", "fp8", "--out", tmp_path / "o") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--weights fp8: 'fp8' is the format of FP8 checkpoints as published" in err[0], err




def test_convert_with_a_prebuilt_layer():
    """convert(module, layer=...) on an experts module whose weights are on the meta device gives
    the same module as converting the weights (placeholders, PEFT target_parameters, outputs);
    a layer of other sizes or kernel options next to it are refused."""
    import copy

    import ktmoe
    model = tm.make_model("qwen3_moe")
    plain = ktmoe.torch.patch(copy.deepcopy(model))
    built = copy.deepcopy(model)
    for name, m in [(n, m) for n, m in built.named_modules() if ktmoe.torch.experts.is_experts_module(m)]:
        layer = ktmoe.MoEExperts(gate_up=m.gate_up_proj.detach().to(torch.bfloat16).contiguous(),
                                 down=m.down_proj.detach().to(torch.bfloat16).contiguous())
        m.gate_up_proj = torch.nn.Parameter(m.gate_up_proj.to("meta"), requires_grad=False)
        m.down_proj = torch.nn.Parameter(m.down_proj.to("meta"), requires_grad=False)
        with pytest.raises(ValueError, match=r"layer: a prebuilt layer has its own kernel options; got \['weights'\]"):
            ktmoe.torch.experts.convert(m, name, layer=layer, weights="int8")
        other = ktmoe.MoEExperts(gate_up=torch.zeros(4, 32, 32), down=torch.zeros(4, 32, 16))
        with pytest.raises(ValueError, match=r"layer: E, H, I = \(4, 32, 16\) do not match"):
            ktmoe.torch.experts.convert(m, name, layer=other)
        ktmoe.torch.experts.convert(m, name, layer=layer, dtype=torch.bfloat16)
        assert m.gate_up_proj.dtype == torch.bfloat16 and m.gate_up_proj.device.type == "cpu"
    ids = tm.batch(seed=2)["input_ids"]
    with torch.no_grad():
        assert torch.equal(plain(ids).logits, built(ids).logits)   # same kernel, same bf16 weights
    a, b = tm.wrap_pair(plain, built, "qwen3_moe")
    assert sorted(n for n, _ in a.named_parameters()) == sorted(n for n, _ in b.named_parameters())


# ---- as published: the checkpoint's codes in the kernel ----
def stacked(state, name, proj, role, E):
    return torch.stack([state[f"{name}.{e}.{proj}.{role}"] for e in range(E)])


def assert_codes_as_published(case, loaded, state, weights=None):
    """Every layer's stored codes and scales equal the checkpoint's, bit for bit (int4bs: the
    bf16 scales' bits; int4: their fp32 widening). weights: the kernel format (default the
    checkpoint's own, OWN_FORMAT)."""
    _, scheme, _, opts = CASES[case]
    weights = weights or OWN_FORMAT[scheme]
    for name, m in loading.experts_modules(loaded):
        layer = m._ktmoe.layer
        E, I = layer.num_experts, layer.intermediate_size
        assert layer.weights == weights
        for proj, src in (("gate", "gate_proj"), ("up", "up_proj"), ("down", "down_proj")):
            got_q, got_s = layer.quantized_weights(proj)
            if scheme == "fp8":
                if opts.get("fused_fp8"):
                    fused = state[f"{name}.{'down_proj' if proj == 'down' else 'gate_up_proj'}"].view(torch.uint8)
                    scales = state[f"{name}.{'down_proj' if proj == 'down' else 'gate_up_proj'}_scale_inv"]
                    rb = scales.shape[1] // 2
                    cut = {"gate": (slice(None, I), slice(None, rb)), "up": (slice(I, None), slice(rb, None)),
                           "down": (slice(None), slice(None))}[proj]
                    want_q, want_s = fused[:, cut[0]], scales[:, cut[1]]
                else:
                    want_q = stacked(state, name, src, "weight", E).view(torch.uint8)
                    want_s = stacked(state, name, src, "weight_scale_inv", E)
            else:
                words = stacked(state, name, src, "weight_packed", E)
                want_q = torch.stack([quantized.unpack_int4(w, w.shape[1] * 8) for w in words])
                want_s = stacked(state, name, src, "weight_scale", E)
                if weights == "int4bs":   # the stored bf16 bits
                    assert want_s.dtype == torch.bfloat16 and got_s.dtype == ml_dtypes.bfloat16
                    got_s, want_s = got_s.view(np.int16), want_s.view(torch.int16)
                else:
                    want_s = want_s.float()
            assert np.array_equal(got_q, want_q.numpy()), f"{name} {proj}: codes differ from the checkpoint's"
            assert np.array_equal(got_s, want_s.numpy()), f"{name} {proj}: scales differ from the checkpoint's"


def packed_bytes(case, E, H, I, layers, weights=None):
    """What the kernel holds for the published format (ktmoe.MoEExperts.from_quantized's docstring)."""
    _, scheme, _, _ = CASES[case]
    weights = weights or OWN_FORMAT[scheme]
    per = 3 * E * H * I
    if scheme == "fp8":
        return layers * (per + 4 * per // 128)          # codes + a copy of each block's scales per row
    if weights == "int4bs":
        return layers * (per // 2 + 2 * per // 32)      # nibbles + bf16 scales per group of 32: the checkpoint's bytes
    return layers * (per // 2 + 4 * per // 32)          # nibbles + fp32 scales per group of 32


@pytest.mark.parametrize("case", list(CASES))
def test_loaded_as_published(case, tmp_path):
    model, state = write(case, tmp_path / "c")
    loaded, stats = load(tmp_path / "c")
    assert stats.as_published and stats.scheme.method == CASES[case][1]
    assert not stats.ignored, stats.ignored
    assert_codes_as_published(case, loaded, state)
    experts = loading.experts_modules(loaded)
    k = experts[0][1]._ktmoe.layer
    assert stats.packed_bytes == packed_bytes(case, k.num_experts, k.hidden_size, k.intermediate_size, len(experts))
    assert_same_logits(loaded, model)


def _expert_checkpoint_bytes(state):
    return sum(t.numel() * t.element_size() for k, t in state.items()
               if ".experts." in k and k.endswith((".weight_packed", ".weight_scale")))


def test_int4_bf16_scales_formats(tmp_path):
    """An INT4 checkpoint with bf16 scales (Kimi K2's layout): by default int4bs, whose packed
    bytes are exactly the checkpoint's expert codes + scales (1.0x); --weights int4 takes the same
    codes as published with the scales widened exactly (1.11x at group 32); W8A8 by default takes
    int4 (int4bs is weight-only) and says nothing about converting; --weights int4bs W8A8 is refused;
    fp32 scales load as int4 by default, and --weights int4bs on them converts (and says so)."""
    model, state = write("kimi_k2-int4", tmp_path / "c", num_hidden_layers=2)
    ckpt_bytes = _expert_checkpoint_bytes(state)
    loaded, stats = load(tmp_path / "c")
    assert stats.as_published and stats.scheme.scale_dtype == "bfloat16" and "bf16 scales" in stats.scheme.describe()
    assert stats.packed_bytes == ckpt_bytes                       # 1.0x the checkpoint's bytes
    four, st4 = load(tmp_path / "c", weights="int4")
    assert st4.as_published
    assert_codes_as_published("kimi_k2-int4", four, state, weights="int4")
    assert st4.packed_bytes * 100 // ckpt_bytes == 111            # fp32 scales: 1.11x at group 32
    assert_same_logits(four, model)
    a8, st8 = load(tmp_path / "c", activations="int8")
    assert st8.as_published and all(m._ktmoe.layer.weights == "int4" and m._ktmoe.layer.activations == "int8"
                                     for _, m in loading.experts_modules(a8))
    scheme = stats.scheme
    w8a8 = quantized.target_format(scheme, None, None, "int8")
    assert (w8a8.weights, w8a8.group_size, w8a8.activations, w8a8.as_published, w8a8.conversion) == \
        ("int4", 32, "int8", True, None)
    with pytest.raises(ValueError, match=r"activations: 'int8' \(W8A8\) is not available for int4bs weights"):
        quantized.target_format(scheme, "int4bs", None, "int8")
    # the same checkpoint with fp32 scales
    for f in (tmp_path / "c").glob("*.safetensors"):
        f.unlink()
    state32 = {k: (t.float() if k.endswith(".weight_scale") else t) for k, t in state.items()}
    qc.write_shards(state32, tmp_path / "c", 2)
    loaded32, s32 = load(tmp_path / "c")
    assert s32.as_published and s32.scheme.scale_dtype == "float32"
    assert all(m._ktmoe.layer.weights == "int4" for _, m in loading.experts_modules(loaded32))
    fmt = quantized.target_format(s32.scheme, "int4bs", None, "bf16")
    assert fmt.group_size == 32 and "to int4bs group 32" in fmt.conversion and "not the checkpoint's codes" in fmt.conversion
    conv, sc = load(tmp_path / "c", weights="int4bs")
    assert not sc.as_published and all(m._ktmoe.layer.weights == "int4bs" for _, m in loading.experts_modules(conv))


def test_from_pretrained_on_quantized_checkpoints(tmp_path):
    """ktmoe.torch.from_pretrained routes a quantized local checkpoint through ktmoe's loader:
    as published by default, converted when asked (said on the "ktmoe" logger)."""
    model, state = write("deepseek_v3-fp8", tmp_path / "c", num_hidden_layers=2)
    loaded = ktmoe.torch.from_pretrained(tmp_path / "c", dtype=torch.float32)
    assert_codes_as_published("deepseek_v3-fp8", loaded, state)
    assert_same_logits(loaded, model)
    with pytest.raises(TypeError, match=r"unsupported keyword argument\(s\) \['trust_remote_code'\]"):
        ktmoe.torch.from_pretrained(tmp_path / "c", trust_remote_code=True)
    with pytest.raises(ValueError, match=r"from_pretrained .*: quantization method 'gptq'"):
        cfg = json.loads((tmp_path / "c" / "config.json").read_text())
        (tmp_path / "g").mkdir()
        shutil.copy(tmp_path / "c" / "model.safetensors.index.json", tmp_path / "g")
        for f in (tmp_path / "c").glob("*.safetensors"):
            shutil.copy(f, tmp_path / "g")
        (tmp_path / "g" / "config.json").write_text(json.dumps({**cfg, "quantization_config": {"quant_method": "gptq"}}))
        ktmoe.torch.from_pretrained(tmp_path / "g")


def test_lora_on_top_of_published_codes_matches_eager_peft(tmp_path):
    """PEFT target_parameters LoRA on experts built from the checkpoint's codes: the same
    loss and LoRA gradients as eager HF + PEFT on the dequantized weights (design.md 6)."""
    model, _ = write("kimi_k2-int4", tmp_path / "c", num_hidden_layers=2)
    loaded, _ = load(tmp_path / "c")
    ref, kt = tm.wrap_pair(model, loaded, "deepseek_v3")
    b = tm.batch(seed=1)
    losses = [m(**b).loss for m in (ref, kt)]
    for loss in losses:
        loss.backward()
    assert abs(losses[1].item() - losses[0].item()) <= RTOL * abs(losses[0].item())
    grads = {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}
    checked = 0
    for n, p in kt.named_parameters():
        if "experts" in n and "lora_" in n:
            a, want = p.grad.double().flatten(), grads[n].double().flatten()
            rel = ((a - want).norm() / want.norm()).item()
            assert rel <= RTOL, f"{n}: relative error {rel:.3e} > {RTOL} (design.md 6)"
            checked += 1
    assert checked == 4   # gate_up and down, A and B, of the one MoE layer


def test_finetune_as_published(tokenizer_dir, tmp_path, capsys):
    """FP8 DeepSeek-V3 and INT4 Kimi-like checkpoints fine-tune with LoRA on the experts and the
    attention: finite losses, no conversion, the experts from the checkpoint's codes."""
    for case in ("deepseek_v3-fp8", "kimi_k2-int4"):
        d = tmp_path / case
        write(case, d, vocab_size=512, num_hidden_layers=2)
        with_tokenizer(d, tokenizer_dir)
        out = tmp_path / f"out-{case}"
        assert finetune("--model", d, *FAST, "--steps", 2, "--out", out) == 0
        cap = capsys.readouterr()
        assert "converting" not in cap.err, cap.err
        assert "the checkpoint's codes" in cap.out, cap.out
        summary = json.loads((out / "summary.json").read_text())
        assert summary["experts_as_published"] and summary["settings"]["weights"] == OWN_FORMAT[CASES[case][1]]
        losses = [json.loads(line)["loss"] for line in open(out / "log.jsonl")]
        assert len(losses) == 2 and all(np.isfinite(losses)), losses
        card = (out / "adapter" / "README.md").read_text()
        assert "ktmoe.torch.from_pretrained" in card


def test_finetune_nan_code_in_experts_is_one_error_line(tokenizer_dir, tmp_path, capsys):
    d = tmp_path / "c"
    _, state = write("deepseek_v3-fp8", d, vocab_size=512, num_hidden_layers=2)
    state["model.layers.1.mlp.experts.4.down_proj.weight"].view(torch.uint8)[9, 3] = 0x7F
    for f in d.glob("*.safetensors"):
        f.unlink()
    qc.write_shards(state, d, 2)
    with_tokenizer(d, tokenizer_dir)
    assert finetune("--model", d, *FAST, "--steps", 1, "--out", tmp_path / "out") == 2
    err = [ln for ln in capsys.readouterr().err.strip().splitlines() if "warning:" not in ln]
    assert len(err) == 1 and err[0].startswith("ktmoe finetune: error: --model "), err
    assert "model.layers.1.mlp.experts.4.down_proj.weight: NaN e4m3 code" in err[0], err


MEASURE = """
import sys, torch
from ktmoe.torch.checkpoint import loading, reader as checkpoint
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096
ckpt = checkpoint.Checkpoint(sys.argv[1], require_tokenizer=False)
loading.skeleton(loading.load_config(ckpt))   # imports (transformers, the model's module) are not the load's
import ktmoe.torch
from ktmoe.torch.checkpoint import quantized
# torch's first float ops start its intra-op thread pool (stacks, per-thread heaps): not the load's
quantized.dequantize(quantized.Scheme("fp8", block=(128, 128)), {"codes": torch.zeros(256, 256, dtype=torch.uint8),
                     "scale": torch.ones(2, 2)}, torch.empty(256, 256, dtype=torch.bfloat16), "warm-up")
with open("/proc/self/clear_refs", "w") as f:   # reset VmHWM: the peak of the imports is not the load's
    f.write("5")
before = rss()
_, st = loading.load(ckpt, device=torch.device("cpu"), dtype=torch.bfloat16, max_tokens=64)
peak = [int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:")][0]
print(peak - before, st.packed_bytes, st.largest_layer_bytes, st.other_bytes, int(st.as_published))
"""


def test_peak_host_memory_as_published(tmp_path):
    """An FP8 checkpoint of 8 MoE layers (6 MiB of codes each) loaded as published in a fresh
    process: the peak resident memory added by the load (VmHWM, reset after the imports) stays
    within packed + one layer's codes and scales + the other weights + 8 MiB of allocator slack,
    well below holding every layer's codes (a further 42 MiB)."""
    import resource
    import subprocess
    import sys
    assert resource.getpagesize() == 4096
    qc.make(tmp_path / "c", "qwen3_moe", "fp8", shards=3, hidden_size=512, moe_intermediate_size=256, num_experts=16,
            vocab_size=256, num_hidden_layers=8, head_dim=64, num_attention_heads=4, num_key_value_heads=1,
            intermediate_size=64)
    res = subprocess.run([sys.executable, "-c", MEASURE, str(tmp_path / "c")], capture_output=True, text=True,
                         timeout=300, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    added, packed, layer, other, published = map(int, res.stdout.split()[-5:])
    codes = 3 * 16 * 256 * 512
    assert published and layer == codes + 4 * (16 * (2 * 2 * 4 + 4 * 2))   # codes + fp32 block scales
    assert packed == 8 * (codes + 4 * codes // 128)
    slack = 8 * 2**20
    assert added <= packed + layer + other + slack, (
        f"load added {added / 2**20:.1f} MiB > packed {packed / 2**20:.1f} + one layer {layer / 2**20:.1f} + "
        f"other {other / 2**20:.1f} + 8 MiB")


def test_shared_between_ranks_converted_or_refused(tmp_path):
    """loading.load(shared=True) (a torch.distributed rank; one gloo rank here): a quantized
    checkpoint converted at load (fp8 -> int4) goes through the host's shared packed copy and
    stores the same codes as a one-process load; codes kept as published cannot be shared yet
    and raise before any tensor is read, naming the --weights that can."""
    import torch.distributed as dist
    write("qwen3_moe-fp8", tmp_path / "c")
    ckpt = checkpoint.Checkpoint(tmp_path / "c", require_tokenizer=False)
    with pytest.raises(CheckpointError, match="cannot be shared yet: pass --weights int4"):
        loading.load(ckpt, device=CPU, dtype=torch.float32, max_tokens=256, shared=True)
    alone, _ = load(tmp_path / "c", weights="int4", group_size=64)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        shared, stats = loading.load(ckpt, device=CPU, dtype=torch.float32, max_tokens=256,
                                     kernel_format=quantized.target_format(quantized.checkpoint_scheme(ckpt), "int4", 64), shared=True)
        mods = loading.experts_modules(shared)
        assert stats.packed_bytes == sum(m._ktmoe.layer.weight_bytes for _, m in mods) > 0
        for (_, a), (_, b) in zip(loading.experts_modules(alone), mods):
            for proj in ("gate", "up", "down"):
                qa, sa = a._ktmoe.layer.quantized_weights(proj)
                qb, sb = b._ktmoe.layer.quantized_weights(proj)
                assert np.array_equal(qa, qb) and np.array_equal(sa, sb), proj   # bit for bit
        ids = tm.batch(seed=4)["input_ids"]
        with torch.no_grad():
            assert torch.equal(shared(ids).logits, alone(ids).logits)
    finally:
        dist.destroy_process_group()


def test_kimi_k2_model_type_loads_as_deepseek_v3(tmp_path):
    """Kimi K2's config.json says model_type "kimi_k2" with auto_map custom code (transformers has
    no such model type): ktmoe reads it as DeepseekV3Config (its architecture) and loads the INT4
    experts as published, without running the checkpoint's code."""
    model, state = write("kimi_k2-int4", tmp_path / "c")
    cfg_path = tmp_path / "c" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    assert cfg["model_type"] == "deepseek_v3"
    cfg.update(model_type="kimi_k2", architectures=["DeepseekV3ForCausalLM"],
               auto_map={"AutoConfig": "configuration_deepseek.DeepseekV3Config",
                         "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM"})
    cfg_path.write_text(json.dumps(cfg))
    loaded, stats = load(tmp_path / "c")
    assert stats.as_published and stats.scheme.method == "int4" and stats.scheme.own_format == "int4bs"
    assert type(loaded).__name__ == "DeepseekV3ForCausalLM"
    assert_codes_as_published("kimi_k2-int4", loaded, state)
    assert_same_logits(loaded, model)
    cfg["architectures"] = ["KimiK25ForConditionalGeneration"]
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="needs architectures"):
        load(tmp_path / "c")
