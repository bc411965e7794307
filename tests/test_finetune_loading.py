"""The streaming loader of `ktmoe finetune` (ktmoe/torch/checkpoint/loading.py) on tiny checkpoints.

Each checkpoint is written to a tmp dir from a tiny random model (tests/torch_models.py) in
one of the layouts found in the field, loaded with `loading.load`, and must give the same
logits as the model that was saved (design.md 6 tolerance: the kernel rounds activations to
bf16, so rel <= 1e-2, cosine >= 0.9999):
- fused v5 tensors (`experts.gate_up_proj` / `down_proj`), single file, tied embeddings;
- per-expert tensors (`experts.{e}.gate_proj.weight` ...) written by hand, sharded over
  three files with a `model.safetensors.index.json`, in bf16 and in fp16 (widened on load);
- Mixtral as transformers itself saves it (`block_sparse_moe.experts.{e}.w1/w2/w3`);
- Qwen3.5-MoE as published: saved from the vision-language class
  (`Qwen3_5MoeForConditionalGeneration`, keys `model.language_model.layers.*`, a vision
  tower `model.visual.*`, an `mtp.*` head), experts per expert (transformers' own
  save_pretrained) or fused; built as the text-only causal LM that AutoModelForCausalLM gives
  and compared with the vision-language model's own logits.
The order of reads shows the streaming: each layer's expert tensors are read and packed
before the next layer's are touched. Missing or mis-shaped expert tensors are reported.
"""
import json

import pytest
import torch
from safetensors.torch import save_file

import ktmoe.torch
import torch_models as tm
from ktmoe.torch.checkpoint import CheckpointError, loading, reader as checkpoint

RTOL, MIN_COS = 1e-2, 0.9999   # design.md 6


def per_expert_state(model, dtype):
    """The model's state dict with fused expert tensors split per expert (qwen naming)."""
    out = {}
    for k, v in model.state_dict().items():
        v = v.to(dtype)
        if k.endswith("experts.gate_up_proj"):
            I = v.shape[1] // 2
            for e in range(v.shape[0]):
                out[k.replace("gate_up_proj", f"{e}.gate_proj.weight")] = v[e, :I].clone()
                out[k.replace("gate_up_proj", f"{e}.up_proj.weight")] = v[e, I:].clone()
        elif k.endswith("experts.down_proj"):
            for e in range(v.shape[0]):
                out[k.replace("down_proj", f"{e}.down_proj.weight")] = v[e].clone()
        else:
            out[k] = v.clone()
    return out


def write_sharded(state, d, shards=3):
    names = sorted(state)
    weight_map = {}
    for s in range(shards):
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: state[k].contiguous() for i, k in enumerate(names) if i % shards == s}
        save_file(part, d / fname)
        weight_map.update({k: fname for k in part})
    (d / checkpoint.INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def save(model, d, layout):
    d.mkdir()
    model.config.save_pretrained(d)
    if layout == "fused":
        state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight" or
                 not model.config.tie_word_embeddings}
        save_file({k: v.to(torch.bfloat16).contiguous() for k, v in state.items()}, d / "model.safetensors")
    elif layout in ("per-expert-bf16", "per-expert-fp16"):
        write_sharded(per_expert_state(model, torch.bfloat16 if layout.endswith("bf16") else torch.float16), d)
    else:   # transformers' own save_pretrained
        model.save_pretrained(d)


def reference_logits(model, ids):
    """The saved model's logits, its non-expert weights rounded like the checkpoint's."""
    with torch.no_grad():
        return model(ids).logits


CASES = [("qwen3_moe", "fused", dict(tie_word_embeddings=True)),
         ("qwen3_moe", "per-expert-bf16", {}),
         ("qwen3_moe", "per-expert-fp16", {}),
         ("mixtral", "save_pretrained", {})]


def assert_same_logits(loaded, model):
    """The loaded model's logits against the reference model's on one batch (design.md 6 limits)."""
    ids = tm.batch(seed=4)["input_ids"]
    want = reference_logits(model, ids)
    with torch.no_grad():
        got = loaded(ids).logits
    a, b = got.double().flatten(), want.double().flatten()
    rel = ((a - b).norm() / b.norm()).item()
    cos = torch.nn.functional.cosine_similarity(a, b, dim=0).item()
    assert rel <= RTOL, f"logits: relative error {rel:.3e} > {RTOL} (design.md 6)"
    assert cos >= MIN_COS, f"logits: cosine {cos:.6f} < {MIN_COS} (design.md 6)"


@pytest.mark.parametrize("arch,layout,overrides", CASES, ids=[f"{a}-{b}" for a, b, _ in CASES])
def test_loaded_model_matches_saved(arch, layout, overrides, tmp_path, monkeypatch):
    model = tm.make_model(arch, **overrides)
    if layout == "fused" or layout.endswith("bf16"):   # the checkpoint holds bf16: compare with that model
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(p.to(torch.bfloat16).float())
    elif layout.endswith("fp16"):
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(p.to(torch.float16).float())
    d = tmp_path / "ckpt"
    save(model, d, layout)
    ckpt = checkpoint.Checkpoint(d, require_tokenizer=False)

    events = []
    read_into, convert = checkpoint.Checkpoint.read_into, ktmoe.torch.experts.convert
    monkeypatch.setattr(checkpoint.Checkpoint, "read_into", lambda self, key, out: (events.append(("read", key)),
                                                                                    read_into(self, key, out))[1])
    monkeypatch.setattr(ktmoe.torch.experts, "convert", lambda m, name, **kw: (events.append(("pack", name)),
                                                                               convert(m, name, **kw))[1])
    loaded, stats = loading.load(ckpt, device=torch.device("cpu"), dtype=torch.float32, max_tokens=256)

    experts = loading.experts_modules(loaded)
    assert len(experts) == 2 and all(ktmoe.torch.experts.is_converted(m) for _, m in experts)
    assert stats.expert_format == ("fused" if layout == "fused" else "per-expert")
    assert stats.packed_bytes == sum(m._ktmoe.layer.weight_bytes for _, m in experts)
    assert not stats.ignored
    # streaming: every expert read of layer l comes after layer l-1 was packed and before layer l is
    expert_events = [e for e in events if e[0] == "pack" or ".experts." in e[1]]
    assert events[:len(events) - len(expert_events)] == [e for e in events if e not in expert_events]  # rest first
    for name, _ in experts:
        i = expert_events.index(("pack", name))
        reads = [k for _, k in expert_events[:i]]
        assert reads and all(k.startswith((name + ".", name.replace(".mlp.", ".block_sparse_moe.") + "."))
                             for k in reads), f"{name} packed after reading {reads}"
        expert_events = expert_events[i + 1:]
    assert not expert_events
    assert_same_logits(loaded, model)


def test_missing_and_misshaped_expert_tensors(tmp_path):
    model = tm.make_model("qwen3_moe")
    state = per_expert_state(model, torch.bfloat16)
    d = tmp_path / "missing"
    d.mkdir()
    model.config.save_pretrained(d)
    save_file({k: v for k, v in state.items() if k != "model.layers.1.mlp.experts.5.up_proj.weight"},
              d / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"no expert weights for model.layers.1.mlp.experts .*expert 5 is missing"):
        loading.load(checkpoint.Checkpoint(d, require_tokenizer=False), device=torch.device("cpu"),
                     dtype=torch.float32, max_tokens=64)
    d = tmp_path / "shape"
    d.mkdir()
    model.config.save_pretrained(d)
    state["model.layers.0.mlp.experts.0.down_proj.weight"] = torch.zeros(32, 8, dtype=torch.bfloat16)
    save_file(state, d / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"experts.0.down_proj.weight' has shape \[32, 8\], expected \[32, 16\]"):
        loading.load(checkpoint.Checkpoint(d, require_tokenizer=False), device=torch.device("cpu"),
                     dtype=torch.float32, max_tokens=64)


MEASURE = """
import resource, sys, torch
from ktmoe.torch.checkpoint import loading, reader as checkpoint
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize()
ckpt = checkpoint.Checkpoint(sys.argv[1], require_tokenizer=False)
loading.skeleton(loading.load_config(ckpt))   # imports (transformers, the model's module) are not the load's
import ktmoe.torch
with open("/proc/self/clear_refs", "w") as f:   # reset VmHWM: the peak of the imports is not the load's
    f.write("5")
before = rss()
_, st = loading.load(ckpt, device=torch.device("cpu"), dtype=torch.bfloat16, max_tokens=64)
peak = [int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:")][0]
print(peak - before, st.packed_bytes, st.largest_layer_bytes, st.other_bytes)
"""


def test_peak_host_memory_is_packed_plus_one_layer(tmp_path):
    """Loading 8 MoE layers of 12 MiB each (bf16, per expert) in a fresh process: the peak
    resident memory (VmHWM, reset after the imports; ru_maxrss would carry the forking pytest
    process's) added by the load stays within packed + one layer + the other weights + 8 MiB
    (allocator slack), well below what holding every layer's raw tensors would take."""
    import subprocess
    import sys
    model = tm.make_model("qwen3_moe", hidden_size=512, moe_intermediate_size=256, num_experts=16, vocab_size=256,
                          num_hidden_layers=8, head_dim=64, num_attention_heads=4, num_key_value_heads=1,
                          intermediate_size=64)
    d = tmp_path / "ckpt"
    save(model, d, "per-expert-bf16")
    del model
    # run outside the repository, so the installed ktmoe is imported, not the source tree
    res = subprocess.run([sys.executable, "-c", MEASURE, str(d)], capture_output=True, text=True, timeout=300,
                         cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    added, packed, layer, other = map(int, res.stdout.split()[-4:])
    assert packed == 8 * layer == 8 * 3 * 16 * 256 * 512 * 2
    slack = 8 * 2**20
    assert added <= packed + layer + other + slack, (
        f"load added {added / 2**20:.1f} MiB > packed {packed / 2**20:.1f} + one layer {layer / 2**20:.1f} + "
        f"other {other / 2**20:.1f} + 8 MiB")


# ---- Qwen3.5-MoE saved from the vision-language class ----
VLM_TEXT = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                head_dim=16, moe_intermediate_size=16, shared_expert_intermediate_size=16, num_experts=8,
                num_experts_per_tok=2, linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=2,
                linear_num_value_heads=2, max_position_embeddings=64, initializer_range=0.1,
                layer_types=["linear_attention", "full_attention"])
VLM_VISION = dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=32,
                  num_position_embeddings=16, patch_size=4)


def make_vlm(seed=0, **text):
    """A tiny random Qwen3_5MoeForConditionalGeneration, every weight rounded through bf16."""
    import transformers
    cfg = transformers.Qwen3_5MoeConfig(text_config={**VLM_TEXT, **text}, vision_config=VLM_VISION)
    torch.manual_seed(seed)
    model = transformers.Qwen3_5MoeForConditionalGeneration(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    return model.eval()


def save_vlm(model, d, layout):
    """As published: transformers' save_pretrained (per-expert tensors) plus an mtp.* head; or the
    in-memory state dict as is (fused `experts.gate_up_proj` / `down_proj`), one bf16 file."""
    if layout == "per-expert":
        model.save_pretrained(d)
        extra = {"mtp.fc.weight": torch.zeros(32, 64, dtype=torch.bfloat16)}
        save_file(extra, d / "mtp.safetensors")   # (one model.safetensors, no index: read next to it)
    else:
        d.mkdir()
        model.config.save_pretrained(d)
        save_file({k: v.to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()},
                  d / "model.safetensors")
    return d


@pytest.mark.parametrize("layout", ["per-expert", "fused"])
def test_qwen3_5_moe_vision_language_checkpoint(layout, tmp_path):
    model = make_vlm()
    d = save_vlm(model, tmp_path / "ckpt", layout)
    keys = checkpoint.Checkpoint(d, require_tokenizer=False).tensors
    assert any(k.startswith("model.language_model.layers.0.mlp.experts.") for k in keys)
    assert any(k.startswith("model.visual.") for k in keys)
    assert any(k.endswith("experts.gate_up_proj") for k in keys) == (layout == "fused")

    loaded, stats = loading.load(checkpoint.Checkpoint(d, require_tokenizer=False), device=torch.device("cpu"),
                                 dtype=torch.float32, max_tokens=256)
    assert type(loaded).__name__ == "Qwen3_5MoeForCausalLM"     # what AutoModelForCausalLM builds for it
    experts = loading.experts_modules(loaded)
    assert [n for n, _ in experts] == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
    assert all(ktmoe.torch.experts.is_converted(m) for _, m in experts)
    assert stats.expert_format == ("fused" if layout == "fused" else "per-expert")
    assert not stats.ignored, stats.ignored
    assert stats.skipped and all(k.startswith(("model.visual.", "mtp.")) for k in stats.skipped)
    assert ("mtp.fc.weight" in stats.skipped) == (layout == "per-expert")
    assert_same_logits(loaded, model)
    assert loaded.name_or_path == str(d.resolve())      # what PEFT writes as base_model_name_or_path
