"""One MoE layer's routed experts, from checkpoint tensors into the kernel's packed memory.

`plan(...)` finds which checkpoint tensors hold one experts module and checks their shapes
and dtypes (before any weight is read): fused (`experts.gate_up_proj` [E, 2I, H] /
`experts.down_proj` [E, H, I], and their `_scale_inv` in an FP8 checkpoint saved by
transformers v5) or per expert (`experts.{e}.gate_proj|w1 / up_proj|w3 / down_proj|w2`, each a
linear layer stored as the checkpoint's Scheme says: `.weight`, or fp8 `.weight` +
`.weight_scale_inv`, or int4 `.weight_packed` + `.weight_scale` + `.weight_shape`).

`load(...)` reads one layer into one anonymous mapping (returned to the OS as soon as the
layer is packed) and packs it:
- as published (the kernel format is the checkpoint's own, ExpertFormat.as_published: fp8, int4bs for
  bf16 scales, int4): the codes and scales go to
  `ktmoe.MoEExperts.from_quantized` as they are (int4: the int32 words' bytes XOR 0x88 in
  place, which is exactly the kernel's signed-nibble layout); the buffer holds one layer's
  codes + scales;
- bf16 / fp32 / fp16 weights, or a quantized checkpoint converted to another format: one
  [E, 2I, H] + [E, H, I] buffer of weights (quantized tensors dequantized into it one at a
  time), packed by `ktmoe.torch.experts.convert` like any weights.
"""
from __future__ import annotations

import math
import mmap

from . import CheckpointError
from . import quantized as q

GATE, UP, DOWN = ("gate_proj", "w1"), ("up_proj", "w3"), ("down_proj", "w2")
SCALE_DTYPES = {"fp8": ("F32", "BF16", "F16"), "int4": ("BF16", "F32", "F16")}
SHAPE_DTYPES = ("I32", "I64")


def plan(name: str, module, keys: dict, ckpt, scheme: q.Scheme) -> dict:
    """Which checkpoint tensors hold this experts module: {"fused", "gate_up" / "down" or "per":
    [(gate, up, down)], each a {role: checkpoint key}, "keys", "E", "H", "I", "scheme"}."""
    E, H, I = module.down_proj.shape
    where = ckpt.label
    gu, dn = keys.get(f"{name}.gate_up_proj"), keys.get(f"{name}.down_proj")
    if gu is not None and dn is not None:
        if scheme.method == "int4":
            raise CheckpointError(f"{where}: {gu!r}: fused experts in an INT4 pack-quantized checkpoint are not "
                                f"supported (compressed-tensors stores one weight_packed per expert linear)")
        slots = {"gate_up": {"codes": gu}, "down": {"codes": dn}}
        if scheme.method == "fp8":
            for s in slots.values():
                s["scale"] = keys.get(s["codes"] + "_scale_inv")
                if s["scale"] is None:
                    raise CheckpointError(f"{where}: {s['codes']!r} has no {s['codes'] + '_scale_inv'!r} (FP8 "
                                        f"block scales) next to it")
        _check_slot(ckpt, scheme, slots["gate_up"], (E, 2 * I, H), name)
        _check_slot(ckpt, scheme, slots["down"], (E, H, I), name)
        return {"fused": True, **slots, "keys": _keys(slots.values()), "E": E, "H": H, "I": I, "scheme": scheme}

    roles = scheme.suffixes()

    def find(e, names):
        for n in names:
            base = f"{name}.{e}.{n}"
            if keys.get(f"{base}.{roles['codes']}") is not None or keys.get(f"{base}.weight") is not None:
                return {r: keys.get(f"{base}.{s}") for r, s in roles.items()}, base
        return None, None

    per = []
    for e in range(E):
        found = [find(e, names) for names in (GATE, UP, DOWN)]
        if any(s is None for s, _ in found):
            raise CheckpointError(
                f"{where}: no expert weights for {name} (looked for fused {name}.gate_up_proj + "
                f"{name}.down_proj, or per expert {name}.{e}.gate_proj/up_proj/down_proj.weight "
                f"(or w1/w3/w2){_quantized_names(scheme)}; expert {e} is missing)")
        for (slot, base), shape in zip(found, ((I, H), (I, H), (H, I))):
            if slot["codes"] is None:   # a plain .weight where the scheme wants codes
                raise CheckpointError(f"{where}: {base}.weight is not quantized, but config.json declares "
                                    f"{scheme.describe()} (expected {base}.{roles['codes']}); checkpoints mixing "
                                    f"quantized and plain experts are not supported")
            missing = [r for r, k in slot.items() if k is None]
            if missing:
                raise CheckpointError(f"{where}: {base}.{roles[missing[0]]} is missing (the {missing[0]} of "
                                    f"{base}.{roles['codes']}, {scheme.describe()})")
            _check_slot(ckpt, scheme, slot, shape, name)
        per.append(tuple(s for s, _ in found))
    return {"fused": False, "per": per, "keys": _keys(s for t in per for s in t), "E": E, "H": H, "I": I,
            "scheme": scheme}


def _quantized_names(scheme) -> str:
    if not scheme.quantized:
        return ""
    return " with " + " / ".join("." + s for s in scheme.suffixes().values())


def _keys(slots) -> list:
    return [k for s in slots for k in s.values()]


def _check_slot(ckpt, scheme, slot: dict, shape: tuple, name: str) -> None:
    """Shapes and dtypes of one projection's tensors ([E,] rows, cols) against the model's."""
    where = ckpt.label
    info = {r: ckpt.tensors[k] for r, k in slot.items()}
    codes = info["codes"]
    lead, (rows, cols) = tuple(shape[:-2]), shape[-2:]

    def expect(role, want, what):
        got = tuple(info[role].shape)
        if got != tuple(want):
            raise CheckpointError(f"{where}: {slot[role]!r} has shape {list(got)}, expected {list(want)} for "
                                f"{name} ({what}, from config.json)")

    def dtype(role, allowed):
        if info[role].dtype not in allowed:
            raise CheckpointError(f"{where}: {slot[role]!r} has dtype {info[role].dtype}, expected "
                                f"{' or '.join(allowed)} ({scheme.describe()})")

    if scheme.method == "bf16" or (scheme.method == "fp8" and codes.dtype != "F8_E4M3"):
        if scheme.method == "fp8":
            raise CheckpointError(f"{where}: {slot['codes']!r} has dtype {codes.dtype}, but config.json declares "
                                f"{scheme.describe()}; checkpoints mixing quantized and plain experts are not "
                                f"supported")
        expect("codes", shape, "weights")
        if codes.dtype == "F8_E4M3":
            raise CheckpointError(f"{where}: {slot['codes']!r} has dtype F8_E4M3, but config.json declares no "
                                f"quantization (FP8 codes are read with quant_method 'fp8' and their scales)")
        if codes.dtype not in ("BF16", "F32", "F16"):
            raise CheckpointError(f"{where}: {slot['codes']!r} has dtype {codes.dtype}, expected BF16, F32 or F16 "
                                f"for expert weights")
        return
    if scheme.method == "fp8":
        br, bc = scheme.block
        expect("codes", shape, "e4m3 codes")
        expect("scale", (*lead, math.ceil(rows / br), math.ceil(cols / bc)), f"{br}x{bc} block scales")
        dtype("scale", SCALE_DTYPES["fp8"])
        return
    g = scheme.group_size
    dtype("codes", ("I32",))
    expect("codes", (*lead, rows, math.ceil(cols / 8)), "int32 words of 8 codes")
    if cols % g:
        raise CheckpointError(f"{where}: {slot['codes']!r}: group size {g} (config.json) does not divide its "
                            f"{cols} columns")
    expect("scale", (*lead, rows, cols // g), f"one scale per {g} columns")
    dtype("scale", SCALE_DTYPES["int4"])
    dtype("shape", SHAPE_DTYPES)
    expect("shape", (2,), "[out, in]")


# ---- reading one layer ----
def load(ckpt, name: str, module, p: dict, *, max_tokens, num_threads, kernel_format) -> int:
    """Reads one layer's experts, packs them into `module` (ktmoe.torch.experts.convert) in
    `kernel_format` (a quantized.ExpertFormat), frees the read buffer; returns its size in bytes."""
    if kernel_format.as_published:
        return _load_as_published(ckpt, name, module, p, max_tokens=max_tokens, num_threads=num_threads,
                                  kernel_format=kernel_format)
    return _load_weights(ckpt, name, module, p, max_tokens=max_tokens, num_threads=num_threads,
                         kernel_format=kernel_format)


class _Arena:
    """Tensors carved out of one anonymous mapping (64-byte aligned), closed as a whole."""

    def __init__(self, specs: list):   # [(shape, torch dtype)]
        import torch
        sizes = [math.prod(s) * torch.empty((), dtype=d).element_size() for s, d in specs]
        offsets, at = [], 0
        for n in sizes:
            offsets.append(at)
            at += -(-n // 64) * 64
        self.nbytes = sum(sizes)
        self.mem = mmap.mmap(-1, max(at, 64))
        raw = torch.frombuffer(self.mem, dtype=torch.uint8)
        self.tensors = [raw[o:o + n].view(d).view(s) for (s, d), o, n in zip(specs, offsets, sizes)]
        del raw

    def close(self) -> None:
        self.tensors = []
        try:
            self.mem.close()
        except BufferError:   # a tensor view is still alive somewhere: the mapping goes when it does
            pass


def _read(ckpt, key: str, dst) -> None:
    """Tensor `key` into `dst` (same bytes read directly when the dtypes match, else converted)."""
    import torch
    if ckpt.tensors[key].torch_dtype == str(dst.dtype).removeprefix("torch."):
        ckpt.read_into(key, dst)
    elif ckpt.tensors[key].torch_dtype == "float8_e4m3fn" and dst.dtype == torch.uint8:
        ckpt.read_into(key, dst.view(torch.float8_e4m3fn))
    elif ckpt.tensors[key].torch_dtype == "int32" and dst.dtype == torch.uint8:
        ckpt.read_into(key, dst.view(torch.int32))
    else:
        dst.copy_(ckpt.read(key))


def _load_as_published(ckpt, name, module, p, *, max_tokens, num_threads, kernel_format) -> int:
    import torch

    import ktmoe
    from ktmoe.torch.experts import convert
    scheme, E, H, I = p["scheme"], p["E"], p["H"], p["I"]
    if scheme.method == "int4":
        q.check_byte_order()

    def codes_shape(rows, cols):
        return (rows, cols // 2) if scheme.method == "int4" else (rows, cols)

    def scale_shape(rows, cols):
        if scheme.method == "int4":
            return (rows, cols // scheme.group_size)
        return (math.ceil(rows / scheme.block[0]), math.ceil(cols / scheme.block[1]))

    def scale_dtype(key):
        # the kernel takes fp32 scales, or bf16 ones for int4 / int4bs (int4bs: all of them are bf16,
        # Scheme.own_format); fp16 ones are widened to fp32 (exactly)
        ok = scheme.method == "int4" and ckpt.tensors[key].dtype == "BF16"
        return torch.bfloat16 if ok else torch.float32

    projs = [("gate_up", (2 * I, H)), ("down", (H, I))] if p["fused"] else \
        [("gate", (I, H)), ("up", (I, H)), ("down", (H, I))]
    first = p["per"][0] if not p["fused"] else None
    slot0 = {pr: (p[pr] if p["fused"] else first[i]) for i, (pr, _) in enumerate(projs)}
    specs = []
    for pr, (rows, cols) in projs:
        specs.append(((E, *codes_shape(rows, cols)), torch.uint8))
        specs.append(((E, *scale_shape(rows, cols)), scale_dtype(slot0[pr]["scale"])))
    arena = _Arena(specs)
    bufs = {pr: (arena.tensors[2 * i], arena.tensors[2 * i + 1]) for i, (pr, _) in enumerate(projs)}
    if p["fused"]:
        for pr, _ in projs:
            _read(ckpt, p[pr]["codes"], bufs[pr][0])
            _read(ckpt, p[pr]["scale"], bufs[pr][1])
    else:
        for e, slots in enumerate(p["per"]):
            for (pr, (rows, cols)), slot in zip(projs, slots):
                _read(ckpt, slot["codes"], bufs[pr][0][e])
                _read(ckpt, slot["scale"], bufs[pr][1][e])
                if scheme.method == "int4":
                    got = [int(v) for v in ckpt.read(slot["shape"])]
                    if got != [rows, cols]:
                        raise CheckpointError(f"{ckpt.label}: {slot['shape']!r} is {got}, expected {[rows, cols]} "
                                            f"for {name} (from config.json)")
    if scheme.method == "int4":
        for pr, _ in projs:
            bufs[pr][0].bitwise_xor_(q.INT4_XOR)
    try:
        layer = ktmoe.MoEExperts.from_quantized(kernel_format.weights, **bufs, max_tokens=max_tokens,
                                                **kernel_format.published_options())
    except ValueError as e:
        raise CheckpointError(f"{ckpt.label}: {name}: {_culprit(p, bufs, e)}") from None
    convert(module, name, layer=layer, num_threads=num_threads, dtype=torch.bfloat16)
    nbytes = arena.nbytes
    del bufs
    arena.close()
    return nbytes


def _culprit(p: dict, bufs: dict, error: ValueError) -> str:
    """The kernel's complaint about a layer's codes, with the checkpoint tensor it comes from
    when it is a NaN code (fp8) or a bad scale."""
    import torch
    msg = str(error)
    names = list(bufs)
    for pr in names:
        codes, scales = bufs[pr]
        for e in range(p["E"]):
            slot = p[pr] if p["fused"] else p["per"][e][names.index(pr)]
            if p["scheme"].method == "fp8" and ((codes[e] & q.E4M3_NAN_MASK) == q.E4M3_NAN_MASK).any():
                return f"{slot['codes']}{f' [expert {e}]' if p['fused'] else ''}: NaN e4m3 code(s) ({msg})"
            s = scales[e].to(torch.float32)
            if (~torch.isfinite(s) | (s < 0)).any():
                return f"{slot['scale']}{f' [expert {e}]' if p['fused'] else ''}: non-finite or negative scale ({msg})"
    return msg


def read_weights(ckpt, p) -> tuple:
    """(gate_up [E, 2I, H], down [E, H, I], their _Arena): one layer's weights in one buffer (read
    directly, widened, or dequantized); arena.close() returns it to the OS."""
    import torch
    scheme, E, H, I = p["scheme"], p["E"], p["H"], p["I"]
    if scheme.quantized:
        dtype = torch.bfloat16
    else:
        names = {ckpt.tensors[k].torch_dtype for k in p["keys"]}
        # one buffer per layer in the checkpoint's dtype when the kernel reads it directly
        dtype = getattr(torch, names.pop()) if len(names) == 1 and names <= {"bfloat16", "float32"} else torch.float32
    arena = _Arena([((E, 2 * I, H), dtype), ((E, H, I), dtype)])
    gate_up, down = arena.tensors

    def put(slot, dst, label):
        if not scheme.quantized:
            _read(ckpt, slot["codes"], dst)
            return
        t = {r: ckpt.read(k) for r, k in slot.items()}
        if dst.dim() == 3:   # fused fp8: one expert at a time
            for e in range(dst.shape[0]):
                q.dequantize(scheme, {r: v[e] for r, v in t.items()}, dst[e], f"{slot['codes']} [expert {e}]")
        else:
            q.dequantize(scheme, t, dst, label)

    try:
        if p["fused"]:
            put(p["gate_up"], gate_up, p["gate_up"]["codes"])
            put(p["down"], down, p["down"]["codes"])
        else:
            for e, (g, u, d) in enumerate(p["per"]):
                for slot, dst in ((g, gate_up[e, :I]), (u, gate_up[e, I:]), (d, down[e])):
                    put(slot, dst, q.weight_name(slot["codes"]))
    except CheckpointError as e:
        raise CheckpointError(f"{ckpt.label}: {e}") from None
    return gate_up, down, arena


def _load_weights(ckpt, name, module, p, *, max_tokens, num_threads, kernel_format) -> int:
    """Weights in one [E, 2I, H] + [E, H, I] buffer (read_weights), then packed in the kernel
    format by convert()."""
    from torch import nn

    from ktmoe.torch.experts import convert
    gate_up, down, arena = read_weights(ckpt, p)
    nbytes = arena.nbytes
    module.gate_up_proj = nn.Parameter(gate_up, requires_grad=False)
    module.down_proj = nn.Parameter(down, requires_grad=False)
    del gate_up, down
    convert(module, name, max_tokens=max_tokens, num_threads=num_threads, **kernel_format.packing_options())
    arena.close()
    return nbytes
