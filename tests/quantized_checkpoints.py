"""Tiny checkpoints in the layouts of published quantized releases, written by the tests.

Quantization here is the tests' own (plain torch, independent of ktmoe's loader):
- FP8 (DeepSeek-V3 / Qwen3-*-FP8): every linear `<m>` except the router and lm_head becomes
  `<m>.weight` float8_e4m3fn + `<m>.weight_scale_inv` float32 [ceil(out / 128), ceil(in / 128)],
  scale = amax(block) / 448, code = e4m3(w / scale); config.json gets the releases'
  `quantization_config` (quant_method fp8, fmt e4m3, dynamic activations, weight_block_size).
- INT4 (Kimi K2 / K2.5, compressed-tensors pack-quantized, symmetric, group 32): each routed
  expert linear becomes `<m>.weight_packed` int32 [out, in / 8] (element i of a row at bits 4i
  of its word, stored as q + 8), `<m>.weight_scale` bf16 [out, in / 32] (scale = bf16(amax /
  7), q = clamp(round(w / scale), -8, 7)), `<m>.weight_shape` int64 [2]; the rest stays bf16
  as Kimi's `ignore` list says (attention, shared experts, lm_head).
`make(...)` returns the eager model holding exactly the dequantized weights (code * scale,
in fp32; unquantized tensors rounded through bf16 as stored), the checkpoint directory, and
{checkpoint key: tensor} of what was written.
"""
import json
import math

import torch
from safetensors.torch import save_file

import torch_models as tm

FP8_MAX = 448.0
FP8_CONFIG = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]}
KIMI_IGNORE = ["lm_head", "re:.*self_attn.*", "re:.*shared_experts.*"]


def int4_config(group=32, ignore=KIMI_IGNORE):
    return {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
            "kv_cache_scheme": None, "ignore": list(ignore),
            "config_groups": {"group_0": {"targets": ["Linear"], "input_activations": None, "output_activations": None,
                                          "weights": {"num_bits": 4, "type": "int", "symmetric": True,
                                                      "strategy": "group", "group_size": group, "dynamic": False,
                                                      "observer": "minmax", "observer_kwargs": {}, "actorder": None,
                                                      "block_structure": None}}}}


# ---- the tests' own quantizers ----
def fp8_quantize(w, block=(128, 128)):
    """(codes float8_e4m3fn [r, c], scale_inv float32 [ceil(r/br), ceil(c/bc)], dequantized fp32)."""
    r, c = w.shape
    br, bc = block
    w = w.float()
    s = torch.zeros(math.ceil(r / br), math.ceil(c / bc))
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            s[i, j] = w[i * br:(i + 1) * br, j * bc:(j + 1) * bc].abs().amax().clamp_min(1e-12) / FP8_MAX
    full = s.repeat_interleave(br, 0)[:r].repeat_interleave(bc, 1)[:, :c]
    codes = (w / full).to(torch.float8_e4m3fn)
    return codes, s, codes.float() * full


def int4_quantize(w, group=32):
    """(q int8 [r, c] in [-8, 7], scale bf16 [r, c/group], dequantized fp32)."""
    r, c = w.shape
    g = w.float().view(r, c // group, group)
    scale = (g.abs().amax(-1) / 7).clamp_min(1e-8).to(torch.bfloat16)
    q = torch.clamp(torch.round(g / scale.float()[..., None]), -8, 7).to(torch.int8)
    return q.view(r, c), scale, (q.float() * scale.float()[..., None]).view(r, c)


def pack_int4(q):
    """compressed-tensors pack-quantized words: int32 [r, c/8], column 8j+i at bits 4i of word j."""
    u = (q.to(torch.int64) + 8).view(q.shape[0], -1, 8)
    words = sum(u[:, :, i] << (4 * i) for i in range(8))
    return (words - ((words >> 31) & 1) * (1 << 32)).to(torch.int32)   # as signed int32


# ---- checkpoints ----
def make(d, arch, scheme, *, seed=0, fused_fp8=False, shards=2, quantize_dense=False, **overrides):
    """Writes a tiny `arch` checkpoint quantized by `scheme` ("fp8" | "int4") into `d`.
    fused_fp8: the experts as transformers v5 saves FP8Experts (experts.gate_up_proj + _scale_inv);
    quantize_dense: int4 also for the dense MLPs of deepseek_v3 (not in Kimi's release: covers
    dequantizing int4 non-expert weights). Returns (eager model with the dequantized weights,
    {key: tensor} written)."""
    model = tm.make_model(arch, seed=seed, **overrides)
    state = {}
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, p in params.items():
            module = name.rpartition(".")[0]
            if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
                continue
            if scheme == "fp8" and _fp8_linear(name):
                codes, s, w = fp8_quantize(p)
                state[name], state[module + ".weight_scale_inv"] = codes, s
                p.copy_(w)
            elif scheme == "int4" and quantize_dense and _dense_mlp(name):
                _put_int4(state, module, p, torch.int32)
            else:
                p.copy_(p.to(torch.bfloat16).float())
                state[name] = p.detach().to(torch.bfloat16).clone()
        for name, p in params.items():
            if name.endswith("experts.gate_up_proj"):
                base = name.removesuffix(".gate_up_proj")
                _experts(state, base, p, params[base + ".down_proj"], scheme, fused_fp8)
    d.mkdir(parents=True, exist_ok=True)
    cfg = model.config.to_dict()
    cfg.pop("_experts_implementation", None)
    cfg["quantization_config"] = FP8_CONFIG if scheme == "fp8" else int4_config(
        ignore=KIMI_IGNORE + ([] if quantize_dense else [r"re:.*mlp\.(gate|up|gate_up|down)_proj.*"]))
    (d / "config.json").write_text(json.dumps(cfg, indent=1))
    write_shards(state, d, shards)
    return model.eval(), state


def _fp8_linear(name: str) -> bool:
    """The linears DeepSeek-V3 / Qwen3-FP8 store in fp8: all but the router, lm_head, norms and embeddings."""
    return (name.endswith(".weight") and "norm" not in name and "embed" not in name and name != "lm_head.weight"
            and not name.endswith("mlp.gate.weight"))


def _dense_mlp(name: str) -> bool:
    return name.endswith(("mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight")) and \
        "shared_experts" not in name


def _put_int4(state, module, p, shape_dtype):
    q, s, w = int4_quantize(p)
    state[module + ".weight_packed"] = pack_int4(q)
    state[module + ".weight_scale"] = s
    state[module + ".weight_shape"] = torch.tensor(list(p.shape), dtype=shape_dtype)
    p.copy_(w)


def _experts(state, base, gate_up, down, scheme, fused_fp8):
    """Per-expert published tensors (or v5-fused fp8) of one experts module; the model's fused
    parameters are overwritten with the dequantized values."""
    E, I2, H = gate_up.shape
    I = I2 // 2
    if fused_fp8:
        for pname, p in (("gate_up_proj", gate_up), ("down_proj", down)):
            codes, scales = [], []
            for e in range(E):
                if pname == "gate_up_proj":   # gate and up quantized as the two linears they are
                    cg, sg, wg = fp8_quantize(p[e, :I])
                    cu, su, wu = fp8_quantize(p[e, I:])
                    c, s, w = torch.cat([cg, cu]), torch.cat([sg, su]), torch.cat([wg, wu])
                else:
                    c, s, w = fp8_quantize(p[e])
                codes.append(c)
                scales.append(s)
                p[e].copy_(w)
            state[f"{base}.{pname}"] = torch.stack(codes)
            state[f"{base}.{pname}_scale_inv"] = torch.stack(scales)
        return
    for e in range(E):
        for proj, view in (("gate_proj", gate_up[e, :I]), ("up_proj", gate_up[e, I:]), ("down_proj", down[e])):
            module = f"{base}.{e}.{proj}"
            if scheme == "fp8":
                codes, s, w = fp8_quantize(view)
                state[module + ".weight"], state[module + ".weight_scale_inv"] = codes, s
                view.copy_(w)
            else:
                _put_int4(state, module, view, torch.int64)


def write_shards(state, d, shards):
    names = sorted(state)
    weight_map = {}
    for s in range(shards):
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: state[k].contiguous() for i, k in enumerate(names) if i % shards == s}
        save_file(part, d / fname, metadata={"format": "pt"})
        weight_map.update({k: fname for k in part})
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


# tiny configs with the dimensions the formats need (fp8 kernel blocks: 128 divides H and I) and
# partial 128 x 128 blocks in the non-expert linears (q_a 48 rows, kv_a 40 rows, dense MLP 160)
DSV3_FP8 = dict(hidden_size=128, moe_intermediate_size=128, intermediate_size=160, q_lora_rank=48, kv_lora_rank=32,
                num_hidden_layers=3)
QWEN3_FP8 = dict(hidden_size=128, moe_intermediate_size=128, head_dim=32, num_key_value_heads=2)
KIMI_INT4 = dict(hidden_size=64, moe_intermediate_size=32, intermediate_size=96, num_hidden_layers=3)
