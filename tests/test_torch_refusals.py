"""ktmoe.torch refuses early and loudly what it cannot do (issue 22 items 7, 8, 9).

- save_pretrained of a patched model, or of its merge_and_unload(), raises before writing
  anything and names `ktmoe merge` (the expert weights live only in the kernel); the adapter
  still saves.
- experts_implementation="ktmoe" on a model whose experts are not transformers experts
  modules (Llama-4) raises when the model is built, never runs them on torch silently.
- a rank_pattern giving gate_up_proj and down_proj different LoRA scales is refused by
  get_peft_model, before anything is wrapped (the same scale reached with an alpha_pattern
  trains like eager); an int4 group size that does not divide H is refused by
  ktmoe.torch.from_pretrained before a weight is read.
"""
import pytest
import torch
import transformers
from peft import get_peft_model

import torch_models as tm
import ktmoe.torch
from ktmoe.testing import TOLERANCE, compare

RTOL, MIN_COS = TOLERANCE["rel"], TOLERANCE["cos"]   # design.md 6: 1e-2, 0.9999


def assert_close(name, got, want):
    rel, cos = compare(got, want)   # the harness's metric (relative Frobenius error, cosine)
    assert rel <= RTOL, f"{name}: relative error {rel:.3e} > {RTOL} (design.md 6)"
    assert cos >= MIN_COS, f"{name}: cosine {cos:.6f} < {MIN_COS} (design.md 6)"


# ---------------------------------------------------------------- item 7: save_pretrained

def test_save_pretrained_of_patched_or_merged_model_refuses_before_writing(tmp_path):
    _, kt = tm.peft_pair("qwen3_moe")
    kt.save_pretrained(tmp_path / "adapter")   # the adapter saves as before
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    merged = kt.merge_and_unload()
    for model, out in ((merged, tmp_path / "merged"), (tm.make_pair("mixtral")[1], tmp_path / "patched")):
        with pytest.raises(ValueError, match=r"save_pretrained: .*ktmoe merge --model"):
            model.save_pretrained(out)
        assert not out.exists()   # not even config.json: no folder that looks like a checkpoint


def test_save_pretrained_with_real_state_dict_passes_through(tmp_path):
    ref, kt = tm.make_pair("qwen3_moe")
    kt.save_pretrained(tmp_path, state_dict=ref.state_dict())   # real expert tensors given: written as given
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    b = tm.batch()
    with torch.no_grad():
        assert_close("saved logits", loaded(**b).logits, ref(**b).logits)   # rel <= 1e-2, cos >= 0.9999


# ---------------------------------------------------------------- item 8: no silent torch fallback

def llama4_config():
    return transformers.Llama4TextConfig(
        vocab_size=64, hidden_size=32, intermediate_size=16, intermediate_size_mlp=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_local_experts=4, num_experts_per_tok=1,
        interleave_moe_layer_step=1, max_position_embeddings=64)


def test_ktmoe_on_llama4_refuses_instead_of_running_torch(tmp_path):
    transformers.Llama4ForCausalLM(llama4_config()).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r'experts_implementation="ktmoe": Llama4ForCausalLM has no transformers '
                                         r"experts module"):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path, experts_implementation="ktmoe")
    eager = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)   # other implementations are unaffected
    with pytest.raises(ValueError, match="Llama4ForCausalLM has no transformers experts module"):
        eager.set_experts_implementation("ktmoe")
    with pytest.raises(ValueError, match="Llama4ForCausalLM has no transformers experts module"):
        ktmoe.torch.patch(eager)   # patch() says the same


# ---------------------------------------------------------------- item 9: early refusals

@pytest.mark.parametrize("lazy", [False, True], ids=["patched", "lazy"])
def test_rank_pattern_with_two_scales_refused_when_peft_wraps(lazy, tmp_path):
    if lazy:   # experts_implementation="ktmoe", nothing converted before get_peft_model
        tm.make_model("qwen3_moe").save_pretrained(tmp_path)
        kt = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, experts_implementation="ktmoe")
    else:
        _, kt = tm.make_pair("qwen3_moe")
    with pytest.raises(ValueError, match=r"rank_pattern / alpha_pattern: ktmoe experts model\.layers\.0\.mlp\.experts "
                                         r"would train LoRA with gate_up_proj r=4, lora_alpha=8 \(scale 2\) and "
                                         r"down_proj r=8, lora_alpha=8 \(scale 1\)"):
        get_peft_model(kt, tm.lora_config("qwen3_moe", rank_pattern={"down_proj": 8}))
    assert not any("lora_" in n for n, _ in kt.named_parameters())   # nothing was wrapped, attention included


def test_rank_pattern_with_one_scale_trains_like_eager():
    ref, kt = tm.peft_pair("qwen3_moe", rank_pattern={"down_proj": 8}, alpha_pattern={"down_proj": 16})
    rows = {p.shape[0] for n, p in kt.named_parameters() if "experts" in n and "lora_A" in n}
    assert rows == {8 * 4, 8 * 8}   # E * r: gate_up r = 4, down r = 8
    ref.train(); kt.train()
    b = tm.batch()
    out_r, out_k = ref(**b), kt(**b)
    assert_close("logits", out_k.logits, out_r.logits)   # rel <= 1e-2, cos >= 0.9999
    out_r.loss.backward(); out_k.loss.backward()
    want = {n: p.grad for n, p in ref.named_parameters() if p.requires_grad}
    for n, p in kt.named_parameters():
        if "experts" in n and "lora_" in n:
            assert_close(f"grad {n}", p.grad, want[n])   # rel <= 1e-2, cos >= 0.9999


def test_int4_group_size_refused_before_any_weight_is_read(tmp_path):
    tm.make_model("qwen3_moe", hidden_size=48).save_pretrained(tmp_path)   # H = 48, I = 16
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")   # any read of a weight would fail
    with pytest.raises(ValueError, match=r"group_size: 32 does not divide H \(hidden size\) = 48 \(experts "
                                         r"model\.layers\.0\.mlp\.experts of .*; nothing was loaded\)"):
        ktmoe.torch.from_pretrained(tmp_path, weights="int4", group_size=32)
