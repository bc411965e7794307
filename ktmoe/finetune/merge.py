"""`ktmoe merge`: a PEFT LoRA adapter merged into a local checkpoint, written as a plain bf16
checkpoint that stock transformers loads (no ktmoe, no quantization config).

    ktmoe merge --model DIR --adapter DIR --out DIR

What it writes: every weight of the checkpoint in the same names and shards, with
- the quantized linears dequantized (FP8 blocks: code x block scale; INT4 pack-quantized:
  q x group scale; quantized.py), their scale / shape tensors dropped, and the fused FP8
  experts (`experts.gate_up_proj` + `_scale_inv`) dequantized expert by expert;
- each adapted weight replaced by bf16(W + s B A) computed in fp32: the attention / dense
  linears of `target_modules` (A [r, in], B [out, r]) and the experts of
  `target_parameters` (PEFT's ParamWrapper layout: A [E*r, in] expert-major, B [out, E*r]
  with column j*E + e for rank j of expert e; gate_up's rows are gate's then up's), also
  when the checkpoint stores the experts one by one (`experts.{e}.gate_proj / up_proj /
  down_proj`, Mixtral's w1 / w3 / w2);
- config.json without `quantization_config`, dtype bfloat16; the index, the tokenizer and
  the other small files copied.
s = lora_alpha / r (lora_alpha / sqrt(r) with use_rslora; rank_pattern / alpha_pattern
matched as PEFT matches them). The output directory appears
complete or not at all (written under a temporary name, then renamed). Host memory: one
output shard's tensors at a time, plus the adapter.

Refused, naming what: DoRA, LoRA biases, modules_to_save, trainable
tokens, adapter tensors other than lora_A / lora_B, an adapted module the checkpoint does
not have, and factor shapes that do not fit the weight.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import sys
from pathlib import Path

from .. import lora_layout
from . import FinetuneError

EXPERT = re.compile(r"^(?P<x>.*\.experts)\.(?P<e>\d+)\.(?P<p>gate_proj|w1|up_proj|w3|down_proj|w2)\.weight$")
FUSED = re.compile(r"^(?P<x>.*\.experts)\.(?P<p>gate_up_proj|down_proj)$")
ROLE = {"gate_proj": "gate", "w1": "gate", "up_proj": "up", "w3": "up", "down_proj": "down", "w2": "down"}
ADAPTER_KEY = re.compile(r"^base_model\.model\.(?P<m>.+)\.(?P<f>lora_A|lora_B)\.weight$")
SKIP_FILES = ("config.json", "model.safetensors.index.json")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=Path, required=True, help="the local checkpoint the adapter was trained on "
                   "(bf16, or quantized as published: FP8 block-scaled, INT4 pack-quantized)")
    p.add_argument("--adapter", type=Path, required=True, help="the PEFT adapter directory (adapter_config.json, "
                   "adapter_model.safetensors), e.g. OUT/adapter of `ktmoe finetune`")
    p.add_argument("--out", type=Path, required=True, help="where the merged bf16 checkpoint is written")
    p.add_argument("--quiet", action="store_true", help="no progress lines")


def run(args) -> int:
    from ..torch.checkpoint import CheckpointError
    try:
        merge(args.model, args.adapter, args.out, log=None if args.quiet else print)
    except (FinetuneError, CheckpointError) as e:
        print(f"ktmoe merge: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"ktmoe merge: error: {e.filename + ': ' if e.filename else ''}{e.strerror or e}", file=sys.stderr)
        return 2
    return 0


# ---------------------------------------------------------------- the adapter

def read_adapter(adapter: Path) -> tuple:
    """({module path: [(A, B), ...]}, scale(name) -> s) from a PEFT LoRA adapter directory; nested
    ParamWrappers' `.base_layer` steps are removed from the paths (they name the same experts
    module); s follows rank_pattern / alpha_pattern as PEFT does."""
    import torch
    from safetensors.torch import load_file
    cfg_path, weights = adapter / "adapter_config.json", adapter / "adapter_model.safetensors"
    for f in (cfg_path, weights):
        if not f.is_file():
            raise FinetuneError(f"--adapter {adapter}: no {f.name} (a PEFT adapter directory has adapter_config.json "
                                "and adapter_model.safetensors)")
    try:
        cfg = json.loads(cfg_path.read_text())
    except ValueError as e:
        raise FinetuneError(f"--adapter {cfg_path}: not JSON ({e})") from None
    if cfg.get("peft_type") != "LORA":
        raise FinetuneError(f"--adapter {adapter}: peft_type {cfg.get('peft_type')!r}; only LORA adapters merge")
    for key, what in (("use_dora", "DoRA"), ("lora_bias", "LoRA biases"), ("modules_to_save", "modules_to_save"),
                      ("trainable_token_indices", "trainable tokens")):
        if cfg.get(key):
            raise FinetuneError(f"--adapter {adapter}: {what} ({key} in adapter_config.json) is not supported by "
                                "ktmoe merge")
    r, alpha = int(cfg["r"]), float(cfg["lora_alpha"])
    ranks, alphas = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}

    def scale(name):
        """s of the module or parameter `name` (PEFT's pattern match: a key matches a suffix of the name)."""
        def pick(patterns, default):
            for key, v in patterns.items():
                if re.match(rf"(.*\.)?({key})$", name):
                    return v
            return default
        rr, aa = pick(ranks, r), pick(alphas, alpha)
        return float(aa) / (math.sqrt(rr) if cfg.get("use_rslora") else rr)
    factors: dict = {}
    for key, t in load_file(str(weights)).items():
        m = ADAPTER_KEY.match(key)
        if not m:
            raise FinetuneError(f"--adapter {weights}: tensor {key!r} is not a LoRA factor "
                                "(base_model.model.<module>.lora_A / lora_B.weight)")
        path = m["m"].replace(".base_layer", "")
        factors.setdefault(path, []).append((m["f"], t.to(torch.float32)))
    out = {}
    for path, fs in factors.items():
        As = [t for f, t in fs if f == "lora_A"]
        Bs = [t for f, t in fs if f == "lora_B"]
        if len(As) != len(Bs) or not As:
            raise FinetuneError(f"--adapter {weights}: {path} has {len(As)} lora_A and {len(Bs)} lora_B tensors")
        out[path] = list(zip(As, Bs))
    return out, scale


# ---------------------------------------------------------------- the checkpoint's weights

def _plan(ckpt, scheme, canonical) -> dict:
    """{output name: (kind, source keys)} over the checkpoint; kind "copy", "linear" (quantized
    2-D linear: codes, scale[, shape]) or "fused" (v5-fused FP8 experts: codes, scale)."""
    keys = set(ckpt.tensors)
    suffixes = scheme.suffixes()
    dropped = set()
    plan = {}
    if scheme.quantized:
        for key in sorted(keys):
            info = ckpt.tensors[key]
            if scheme.method == "fp8" and info.dtype == "F8_E4M3":
                scale = key + "_scale_inv"   # <m>.weight_scale_inv, or <x>.gate_up_proj_scale_inv (fused)
                if scale not in keys:
                    raise FinetuneError(f"--model {ckpt.path}: {key!r} is FP8 but its scale {scale!r} is missing")
                plan[key] = ("fused" if FUSED.match(canonical(key)) else "linear", (key, scale))
                dropped.add(scale)
            elif scheme.method == "int4" and key.endswith("." + suffixes["codes"]):
                base = key.removesuffix(suffixes["codes"])
                src = (key, base + suffixes["scale"], base + suffixes["shape"])
                for k in src[1:]:
                    if k not in keys:
                        raise FinetuneError(f"--model {ckpt.path}: {key!r} is INT4 but {k!r} is missing")
                plan[base + "weight"] = ("linear", src)
                dropped.update(src[1:])
    taken = dropped | {k for _, src in plan.values() for k in src}
    for key in keys - taken:
        plan[key] = ("copy", (key,))
    return plan


def _materialise(ckpt, scheme, kind, src, name):
    import torch

    from ..torch.checkpoint import quantized
    if kind == "copy":
        return ckpt.read(src[0])
    tensors = dict(zip(("codes", "scale", "shape"), (ckpt.read(k) for k in src)))
    if kind == "linear":
        out = torch.empty(tuple(int(n) for n in (tensors["shape"].tolist() if "shape" in tensors
                                                  else tensors["codes"].shape)), dtype=torch.float32)
        return quantized.dequantize(scheme, tensors, out, name)
    codes, scale = tensors["codes"], tensors["scale"]
    out = torch.empty(codes.shape, dtype=torch.float32)
    for e in range(codes.shape[0]):
        quantized.dequantize_fp8(codes[e], scale[e], scheme.block, out[e], f"{name}[{e}]")
    return out


# ---------------------------------------------------------------- merging

def merge(model: Path, adapter: Path, out: Path, log=print) -> dict:
    """Writes the merged bf16 checkpoint into `out`; returns {"deltas": n, "files": n, "bytes": n}."""
    import torch
    from safetensors.torch import save_file

    from ..torch.checkpoint import loading, quantized, reader as checkpoint
    from . import output
    ckpt = checkpoint.Checkpoint(model, require_tokenizer=False)
    config = json.loads((Path(model) / "config.json").read_text())
    scheme = quantized.scheme_of(config, f"--model {model}")
    factors, scale = read_adapter(Path(adapter))
    out = Path(out)
    if out.resolve() in (Path(model).resolve(), Path(adapter).resolve()):
        raise FinetuneError(f"--out {out}: must differ from --model and --adapter")

    def canonical(key):
        return loading._canonical(key, ())
    plan = _plan(ckpt, scheme, canonical)

    # which output weight each adapted module changes
    targets: dict = {}          # output name -> [(A, B, s, expert)]: expert, the index into fused experts, or None
    by_canonical = {canonical(n): n for n in plan}
    experts_of: dict = {}       # experts module path -> {role: {e: output name}} or {"fused": {proj: name}}
    for n in plan:
        c = canonical(n)
        if m := EXPERT.match(c):
            experts_of.setdefault(m["x"], {}).setdefault(ROLE[m["p"]], {})[int(m["e"])] = n
        elif m := FUSED.match(c):
            experts_of.setdefault(m["x"], {}).setdefault("fused", {})[m["p"]] = n
    for path, pairs in factors.items():
        if path + ".weight" in by_canonical:
            for A, B in pairs:
                targets.setdefault(by_canonical[path + ".weight"], []).append((A, B, scale(path), None))
        elif path in experts_of:
            _expert_targets(path, pairs, experts_of[path], ckpt, plan, targets, scale)
        else:
            raise FinetuneError(f"--adapter {adapter}: adapts {path!r}, which {model} does not have (was the "
                                "adapter trained on this checkpoint?)")

    files: dict = {}
    for n, (kind, src) in plan.items():
        files.setdefault(ckpt.tensors[src[0]].file.name, []).append(n)
    total, deltas = 0, 0
    with output.atomic_dir(out) as tmp:
        weight_map = {}
        for i, (fname, names) in enumerate(sorted(files.items())):
            tensors = {}
            for n in sorted(names):
                kind, src = plan[n]
                t = _materialise(ckpt, scheme, kind, src, n)
                adapted = n in targets
                if adapted:
                    t = t.to(torch.float32)
                    for A, B, sc, expert in targets.pop(n):
                        _add_delta(t, A, B, sc, expert, n)
                        deltas += 1
                if kind != "copy" or adapted:   # dequantized or merged: bf16; the rest as stored
                    t = t.to(torch.bfloat16)
                tensors[n] = t.contiguous()
            save_file(tensors, str(tmp / fname), metadata={"format": "pt"})
            total += sum(t.numel() * t.element_size() for t in tensors.values())
            weight_map.update({n: fname for n in tensors})
            if log:
                log(f"ktmoe merge: {fname} ({i + 1}/{len(files)}): {len(tensors)} tensors")
            del tensors
        assert not targets, targets
        if len(files) > 1 or (Path(model) / SKIP_FILES[1]).exists():
            (tmp / SKIP_FILES[1]).write_text(json.dumps({"metadata": {"total_size": total},
                                                         "weight_map": dict(sorted(weight_map.items()))}, indent=2))
        config.pop("quantization_config", None)
        config["dtype"] = "bfloat16"
        if "torch_dtype" in config:
            config["torch_dtype"] = "bfloat16"
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        for f in Path(model).iterdir():
            if f.is_file() and f.name not in SKIP_FILES and not f.name.endswith(".safetensors"):
                shutil.copy2(f, tmp / f.name)
    if log:
        log(f"ktmoe merge: {deltas} LoRA deltas merged; {out} ({total / 2**20:.1f} MiB of bf16 weights, "
            f"{len(files)} file{'s' if len(files) > 1 else ''})")
    return {"deltas": deltas, "files": len(files), "bytes": total}


def _expert_targets(path, pairs, names, ckpt, plan, targets, scale) -> None:
    """Adds to `targets` the per-expert deltas of the ParamWrapper factors `pairs` of experts
    module `path`, whose checkpoint weights are `names` (per role and expert, or "fused")."""
    if "fused" in names:
        gu, dn = names["fused"].get("gate_up_proj"), names["fused"].get("down_proj")
        E = _shape(ckpt, plan, gu or dn)[0]
    else:
        E = len(names.get("down", {}))
        for role in ("gate", "up", "down"):
            if sorted(names.get(role, {})) != list(range(E)):
                raise FinetuneError(f"--model: experts module {path!r} does not hold experts 0..{E - 1} for {role}")
        gu = dn = None
    for A, B in pairs:
        if A.shape[0] % E:
            raise FinetuneError(f"--adapter: {path} lora_A has {A.shape[0]} rows, not a multiple of {E} experts")
        r = A.shape[0] // E
        A_e, B_e = lora_layout.per_expert_A(A, E), lora_layout.per_expert_B(B, E)   # [E, r, in], [E, out, r]
        # which parameter the wrapper adapts: gate_up ([E*r, H] x [2I, E*r]) or down ([E*r, I] x [H, E*r])
        if "fused" in names:
            proj = "gate_up_proj" if gu and _fits(_shape(ckpt, plan, gu)[1:], A, B) else "down_proj"
            name = names["fused"].get(proj)
            if name is None or not _fits(_shape(ckpt, plan, name)[1:], A, B):
                raise FinetuneError(f"--adapter: {path} factors A {list(A.shape)}, B {list(B.shape)} fit neither "
                                    f"gate_up_proj nor down_proj of {E} experts")
            s = scale(f"{path}.{proj}")
            for e in range(E):
                targets.setdefault(name, []).append((A_e[e], B_e[e], s, e))
            continue
        g0, d0 = _shape(ckpt, plan, names["gate"][0]), _shape(ckpt, plan, names["down"][0])
        I, H = g0
        if _fits((2 * I, H), A, B):
            s = scale(f"{path}.gate_up_proj")
            for e in range(E):
                a, b = A_e[e], B_e[e]
                targets.setdefault(names["gate"][e], []).append((a, b[:I], s, None))
                targets.setdefault(names["up"][e], []).append((a, b[I:], s, None))
        elif _fits(tuple(d0), A, B):
            s = scale(f"{path}.down_proj")
            for e in range(E):
                targets.setdefault(names["down"][e], []).append((A_e[e], B_e[e], s, None))
        else:
            raise FinetuneError(f"--adapter: {path} factors A {list(A.shape)}, B {list(B.shape)} fit neither "
                                f"gate_up ({2 * I}x{H}) nor down ({d0[0]}x{d0[1]}) of {E} experts")


def _fits(shape, A, B) -> bool:
    """Whether factors A [E*r, in], B [out, E*r] adapt a weight [out, in]."""
    return tuple(shape) == (B.shape[0], A.shape[1]) and B.shape[1] == A.shape[0]


def _shape(ckpt, plan, name) -> tuple:
    kind, src = plan[name]
    if kind == "linear" and len(src) == 3:   # int4: the published weight_shape
        return tuple(int(n) for n in ckpt.read(src[2]).tolist())
    return tuple(ckpt.tensors[src[0]].shape)


def _add_delta(W, A, B, s, expert, name) -> None:
    """W (fp32, [out, in], or [E, out, in] with `expert` set) += s B A."""
    w = W if expert is None else W[expert]
    if tuple(w.shape) != (B.shape[0], A.shape[1]) or B.shape[1] != A.shape[0]:
        raise FinetuneError(f"--adapter: factors A {list(A.shape)}, B {list(B.shape)} do not fit {name} "
                            f"{list(w.shape)}")
    w.add_(B @ A, alpha=s)
