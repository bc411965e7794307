"""Quantized checkpoints as published: the scheme config.json declares, the tensors of one
quantized linear layer, and dequantizing one such tensor (for the non-expert weights).

Supported schemes (`quantization_config` in config.json):
- FP8, block-scaled (DeepSeek-V3 / R1, Qwen3-*-FP8): `quant_method` "fp8", `fmt` "e4m3",
  `activation_scheme` "dynamic", `weight_block_size` [br, bc] (128 x 128 as published),
  fp32 scales (`scale_fmt` "float" when given). A quantized linear `<m>` stores
  `<m>.weight` float8_e4m3fn [out, in] and `<m>.weight_scale_inv` float32
  [ceil(out / br), ceil(in / bc)]; w[i, j] = code[i, j] * weight_scale_inv[i // br, j // bc]
  (despite its name the stored value multiplies: DeepSeek-V3's weight_dequant). Codes
  0x7F / 0xFF are e4m3's NaN and are refused. Modules listed in `modules_to_not_convert`
  (router, norms, lm_head, embeddings) are stored unquantized as `<m>.weight`.
- INT4, compressed-tensors `pack-quantized` (Kimi K2 / K2.5): `quant_method`
  "compressed-tensors", `format` "pack-quantized", every config group's `weights` {num_bits
  4, type "int", symmetric true, strategy "group", group_size 32 | 64 | 128, no actorder}, no
  input / output activation quantization. `<m>.weight_packed` int32 [out, ceil(in / 8)]:
  column j of a row is the nibble at bits 4 * (j % 8) of word j // 8 and holds q + 8, q in
  [-8, 7]; `<m>.weight_scale` [out, in / group] (bf16, fp16 or fp32); `<m>.weight_shape`
  int [2] = [out, in]; w[i, j] = q[i, j] * weight_scale[i, j // group]. Modules in `ignore`
  are stored unquantized as `<m>.weight`. The kernel format of such a checkpoint as published
  (Scheme.own_format): "int4bs" when every `weight_scale` is bf16 (Kimi K2: the scales kept as
  bf16, the checkpoint's bytes), else "int4" (fp32 scales; fp16 ones widened exactly); W8A8
  (activations int8) takes "int4" either way (bf16 scales widened exactly).
- No `quantization_config`: plain bf16 / fp16 / fp32 weights.
Everything else (GPTQ / AWQ with zero points, bitsandbytes, mxfp4, compressed-tensors
float- or int-quantized, other bit widths, asymmetric, ...) raises, naming the method and
what is supported. Which tensors are quantized is read from the checkpoint itself (the
tensor names and dtypes above), not from the `ignore` / `modules_to_not_convert` lists.
"""
from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import dataclass

from ... import formats
from . import CheckpointError

GROUP_SIZES = formats.WEIGHT_FORMATS["int4"].group_sizes
E4M3_NAN_MASK = 0x7F   # (code & 0x7F) == 0x7F is NaN in float8_e4m3fn (there is no Inf)
INT4_XOR = 0x88        # a pack-quantized byte XOR 0x88 = two signed two's-complement nibbles
SUPPORTED = ("FP8 block-scaled (quant_method 'fp8', fmt 'e4m3', weight_block_size, dynamic activations) and "
             "INT4 compressed-tensors 'pack-quantized' (symmetric int, 4 bits, strategy 'group', group_size "
             "32/64/128, weight-only)")


@dataclass(frozen=True)
class Scheme:
    """How a checkpoint's linear weights are stored: "bf16" (not quantized), "fp8" or "int4"."""
    method: str = "bf16"
    block: tuple | None = None        # fp8: (rows, cols) per scale
    group_size: int | None = None     # int4: columns per scale
    scale_dtype: str | None = None    # int4: "bfloat16" when every weight_scale is bf16 (with_scale_dtype)

    @property
    def quantized(self) -> bool:
        return self.method != "bf16"

    @property
    def own_format(self) -> str:
        """The kernel format that holds this checkpoint's codes and scales as they are (weight-only)."""
        return "int4bs" if self.method == "int4" and self.scale_dtype == "bfloat16" else self.method

    def describe(self) -> str:
        if self.method == "fp8":
            return f"FP8 e4m3, one fp32 scale per {self.block[0]}x{self.block[1]} block"
        if self.method == "int4":
            bf16 = ", bf16 scales" if self.scale_dtype == "bfloat16" else ""
            return f"INT4 compressed-tensors pack-quantized, symmetric, group {self.group_size}{bf16}"
        return "not quantized"

    def suffixes(self) -> dict:
        """{role: tensor name after `<module>.`} of one linear layer: codes, scale, shape (int4)."""
        return {"fp8": {"codes": "weight", "scale": "weight_scale_inv"},
                "int4": {"codes": "weight_packed", "scale": "weight_scale", "shape": "weight_shape"},
                "bf16": {"codes": "weight"}}[self.method]


def scheme_of(config: dict, where: str) -> Scheme:
    """The checkpoint's Scheme from its config.json dict; CheckpointError for anything unsupported."""
    q = config.get("quantization_config")
    if q is None:
        if "compression_config" in config:
            raise CheckpointError(f"{where}: config.json has a 'compression_config' (an older compressed-tensors "
                                f"layout), which ktmoe does not read; supported: {SUPPORTED}")
        return Scheme()
    if not isinstance(q, dict):
        raise CheckpointError(f"{where}: config.json 'quantization_config' is not an object")
    method = q.get("quant_method")
    if method == "fp8":
        return _fp8(q, where)
    if method == "compressed-tensors":
        return _compressed_tensors(q, where)
    why = {"gptq": "GPTQ layout (qweight / qzeros / g_idx, zero points)",
           "awq": "AWQ layout (qweight / qzeros, zero points)",
           "bitsandbytes": "bitsandbytes 4/8-bit", "mxfp4": "MXFP4 (gpt-oss)"}.get(str(method).lower())
    what = f" ({why})" if why else ""
    raise CheckpointError(f"{where}: quantization method {method!r}{what} is not supported; supported: {SUPPORTED}")


def _fp8(q: dict, where: str) -> Scheme:
    def bad(what):
        return CheckpointError(f"{where}: quantization method 'fp8' with {what} is not supported; supported: {SUPPORTED}")
    if q.get("fmt", "e4m3") != "e4m3":
        raise bad(f"fmt {q.get('fmt')!r} (only e4m3)")
    if str(q.get("activation_scheme", "dynamic")).lower() != "dynamic":
        raise bad(f"activation_scheme {q.get('activation_scheme')!r} (static activation scales; only 'dynamic')")
    if q.get("scale_fmt", "float") != "float":
        raise bad(f"scale_fmt {q.get('scale_fmt')!r} (only fp32 scales, 'float')")
    if q.get("expert_dtype", "fp8") != "fp8":
        raise bad(f"expert_dtype {q.get('expert_dtype')!r} (only 'fp8' experts)")
    block = q.get("weight_block_size")
    if block is None:
        raise bad("no weight_block_size (per-tensor scales; only block-scaled checkpoints)")
    if (not isinstance(block, (list, tuple)) or len(block) != 2
            or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)):
        raise bad(f"weight_block_size {block!r} (expected two positive integers)")
    return Scheme("fp8", block=(block[0], block[1]))


def _compressed_tensors(q: dict, where: str) -> Scheme:
    def bad(what):
        return CheckpointError(f"{where}: quantization method 'compressed-tensors' with {what} is not supported; "
                             f"supported: {SUPPORTED}")
    top = q.get("format")
    groups = q.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise bad("no config_groups")
    if q.get("quantization_status", "compressed") != "compressed":
        raise bad(f"quantization_status {q.get('quantization_status')!r} (only 'compressed' checkpoints)")
    if q.get("sparsity_config"):
        raise bad("a sparsity_config (sparse weights)")
    sizes = set()
    for gname, g in groups.items():
        if not isinstance(g, dict) or not isinstance(g.get("weights"), dict):
            raise bad(f"config group {gname!r} without weights")
        fmt = g.get("format") or top
        if fmt != "pack-quantized":
            raise bad(f"format {fmt!r} (config group {gname!r}; only 'pack-quantized')")
        w = g["weights"]
        for key, want in (("type", "int"), ("num_bits", 4), ("strategy", "group")):
            if w.get(key) != want:
                raise bad(f"weights {key} {w.get(key)!r} (config group {gname!r}; only {want!r})")
        if w.get("symmetric") is not True:
            raise bad(f"asymmetric weights (symmetric {w.get('symmetric')!r}, zero points; config group {gname!r}: "
                      f"the kernel has no zero points)")
        if w.get("actorder") not in (None, False):
            raise bad(f"actorder {w.get('actorder')!r} (activation-ordered groups, g_idx; config group {gname!r})")
        if w.get("group_size") not in GROUP_SIZES:
            raise bad(f"group_size {w.get('group_size')!r} (config group {gname!r}; only {list(GROUP_SIZES)})")
        if w.get("dynamic") not in (None, False):
            raise bad(f"dynamic weight quantization (config group {gname!r})")
        for act in ("input_activations", "output_activations"):
            if g.get(act):
                raise bad(f"{act} quantization (config group {gname!r}; only weight-only checkpoints)")
        sizes.add(w["group_size"])
    if len(sizes) != 1:
        raise bad(f"config groups of different group sizes {sorted(sizes)}")
    return Scheme("int4", group_size=sizes.pop())


def with_scale_dtype(scheme: Scheme, tensors: dict) -> Scheme:
    """An INT4 scheme with the dtype of its scales: "bfloat16" when every `<m>.weight_scale` of the
    checkpoint (tensors: {key: info with .dtype}) is BF16, else "float32" (fp32, fp16 or mixed:
    the kernel's int4 holds them exactly as fp32). Other schemes unchanged."""
    if scheme.method != "int4":
        return scheme
    dtypes = {t.dtype for k, t in tensors.items() if k.endswith(".weight_scale")}
    return dataclasses.replace(scheme, scale_dtype="bfloat16" if dtypes == {"BF16"} else "float32")


def checkpoint_scheme(ckpt) -> Scheme:
    """The Scheme of a Checkpoint: its config.json's (scheme_of), with the INT4 scale dtype of its tensors."""
    return with_scale_dtype(scheme_of(ckpt.config, ckpt.label), ckpt.tensors)


@dataclass(frozen=True)
class ExpertFormat:
    """The experts' kernel format for one checkpoint, resolved once by target_format() from the
    user's request and the checkpoint's Scheme, then carried down to every layer as it is:
    nothing below re-reads the request or re-decides the format."""
    scheme: Scheme                    # the checkpoint's scheme this was resolved against
    weights: str                      # a ktmoe/formats.py WEIGHT_FORMATS name
    activations: str = "bf16"         # formats.ACTIVATIONS
    group_size: int | None = None     # grouped formats (int4 / int4bs)
    as_published: bool = False        # the checkpoint's codes and scales kept as they are (no conversion)
    conversion: str | None = None     # what loading does to a quantized checkpoint's experts, else None
    isa: str | None = None            # kernel path; None: ktmoe's choice

    @property
    def row(self) -> formats.WeightFormat:
        return formats.WEIGHT_FORMATS[self.weights]

    def packing_options(self) -> dict:
        """Keyword arguments of MoEExperts(...) / ktmoe.torch.experts.convert packing weights into it."""
        opts = {"weights": self.weights, "activations": self.activations}
        if self.group_size is not None:
            opts["group_size"] = self.group_size
        if self.isa is not None:
            opts["isa"] = self.isa
        return opts

    def published_options(self) -> dict:
        """Keyword arguments of MoEExperts.from_quantized(self.weights, ...) taking the checkpoint's codes."""
        opts = {"activations": self.activations, **({"isa": self.isa} if self.isa is not None else {})}
        if self.scheme.method == "int4":
            opts["group_size"] = self.scheme.group_size
        else:
            opts["block"] = self.scheme.block
        return opts


def target_format(scheme: Scheme, weights: str | None = None, group_size: int | None = None,
                  activations: str = "bf16", isa: str | None = None) -> ExpertFormat:
    """The ExpertFormat for the requested `weights` (None: the checkpoint's own format,
    Scheme.own_format; int4 for W8A8 on bf16 scales), `group_size`, `activations` and kernel path
    `isa`; ValueError naming the argument if the request cannot be met. The format is checked
    here once (formats.check_layer_format); what remains per layer is whether its sizes fit."""
    if weights is None:
        weights = scheme.own_format
        if activations != "bf16" and "int8" not in formats.WEIGHT_FORMATS[weights].activations \
                and scheme.method == "int4":
            weights = "int4"   # W8A8 takes the same codes with the bf16 scales widened exactly
    row = formats.WEIGHT_FORMATS.get(weights)
    if row is not None and activations not in row.activations and row.bits < 16 and row.quantized_here:
        raise ValueError(f"activations: {activations!r} (W8A8) is not available for {weights} weights (weight-only); "
                         f"use weights 'int4' (the same codes, the bf16 scales widened exactly) or activations 'bf16'")
    if row is not None and not row.quantized_here and scheme.own_format != weights:
        raise ValueError(f"weights: {weights!r} is the format of {weights.upper()} checkpoints as published; this "
                         f"checkpoint is {scheme.describe()} and ktmoe does not quantize to {weights} (use 'int8' or "
                         f"'int4')")
    if row is not None and not row.quantized_here and activations not in row.activations:
        raise ValueError(f"activations: {activations!r} (W8A8) is not available for {weights} weights (weight-only); "
                         f"use activations 'bf16', or convert the experts to int8 / int4")
    if row is not None and row.group_sizes and group_size is None:
        group_size = scheme.group_size if scheme.method == "int4" else row.default_group
    published = _published(scheme, weights, group_size)
    if not published:
        formats.check_layer_format(weights, group_size, activations, False, 0, 0)   # sizes: per layer, at load
    grouped = row is not None and bool(row.group_sizes)
    conversion = None
    if scheme.quantized and not published:
        to = "bf16" if weights == "bf16" else f"{weights}" + (f" group {group_size}" if grouped else "")
        then = "" if weights == "bf16" else ", then quantized"
        conversion = (f"converting the checkpoint's experts ({scheme.describe()}) to {to} layer by layer as they "
                      f"are loaded: dequantized to bf16{then} (not the checkpoint's codes)")
    return ExpertFormat(scheme, weights, activations, group_size if grouped else None, published, conversion, isa)


def _published(scheme: Scheme, weights: str, group_size: int | None) -> bool:
    """True when the kernel format holds the quantized checkpoint's codes and scales as they are:
    its own format (Scheme.own_format), or int4 for an INT4 checkpoint with bf16 scales (widened
    exactly), at the checkpoint's group size."""
    if not scheme.quantized or weights not in (scheme.method, scheme.own_format):
        return False
    return scheme.method != "int4" or group_size == scheme.group_size


# ---- one tensor (non-expert weights: dequantized for torch) ----
ROWS_PER_STEP = 128   # dequantized a band of rows at a time: transient memory ~ 128 rows x cols x 4 bytes


def dequantize(scheme: Scheme, tensors: dict, out, name: str):
    """Fills `out` [out, in] (a float tensor of any float dtype) with the weight of linear `name`
    (its `.weight`) from its checkpoint tensors {role: torch tensor} (Scheme.suffixes), computed
    in fp32 one band of rows at a time, and returns it; CheckpointError naming the tensor if
    malformed."""
    if scheme.method == "fp8":
        return dequantize_fp8(tensors["codes"], tensors["scale"], scheme.block, out, name)
    return dequantize_int4(tensors["codes"], tensors["scale"], tensors["shape"], out, name)


def dequantize_fp8(codes, scale_inv, block: tuple, out, name: str):
    import torch
    rows, cols = codes.shape
    br, bc = block
    check_fp8(codes, scale_inv, block, name)
    codes = codes.view(torch.float8_e4m3fn)
    step = max(br, ROWS_PER_STEP // br * br)
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        s = scale_inv[r0 // br:-(-r1 // br)].to(torch.float32).repeat_interleave(br, 0)[:r1 - r0]
        out[r0:r1] = codes[r0:r1].to(torch.float32).mul_(s.repeat_interleave(bc, 1)[:, :cols])
    return out


def check_fp8(codes, scale_inv, block: tuple, name: str) -> None:
    """Scale shape, NaN codes and finite non-negative scales of one fp8 tensor [.., rows, cols]."""
    import torch
    rows, cols = codes.shape[-2:]
    br, bc = block
    want = (*codes.shape[:-2], math.ceil(rows / br), math.ceil(cols / bc))
    if tuple(scale_inv.shape) != want:
        raise CheckpointError(f"{name}_scale_inv has shape {list(scale_inv.shape)}, expected {list(want)} for "
                            f"{name} {list(codes.shape)} in {br}x{bc} blocks (weight_block_size)")
    nan = (codes.view(torch.uint8) & E4M3_NAN_MASK) == E4M3_NAN_MASK
    if nan.any():
        at = [int(i) for i in nan.nonzero()[0]]
        raise CheckpointError(f"{name}: NaN e4m3 code(s) (0x7F / 0xFF), {int(nan.sum())} of them, first at {at}")
    _check_scales(scale_inv, f"{name}_scale_inv")


def dequantize_int4(packed, scale, shape_t, out, name: str):
    import torch
    base = name.removesuffix(".weight")
    rows, cols = out.shape
    got = [int(v) for v in shape_t.reshape(-1)]
    if got != [rows, cols]:
        raise CheckpointError(f"{base}.weight_shape is {got}, the model built from config.json expects "
                            f"{[rows, cols]}")
    check_int4(packed, scale, rows, cols, base)
    group = cols // scale.shape[-1]
    for r0 in range(0, rows, ROWS_PER_STEP):
        r1 = min(rows, r0 + ROWS_PER_STEP)
        w = unpack_int4(packed[r0:r1], cols).to(torch.float32).view(r1 - r0, cols // group, group)
        out[r0:r1] = w.mul_(scale[r0:r1].to(torch.float32)[:, :, None]).view(r1 - r0, cols)
    return out


def check_int4(packed, scale, rows: int, cols: int, base: str) -> None:
    """Packed and scale shapes of one pack-quantized tensor [.., rows, cols], finite scales."""
    lead = tuple(packed.shape[:-2])
    want = (*lead, rows, math.ceil(cols / 8))
    if tuple(packed.shape) != want:
        raise CheckpointError(f"{base}.weight_packed has shape {list(packed.shape)}, expected {list(want)} "
                            f"(8 codes per int32 word) for [{rows}, {cols}]")
    groups = [g for g in GROUP_SIZES if cols % g == 0 and tuple(scale.shape) == (*lead, rows, cols // g)]
    if not groups:
        raise CheckpointError(f"{base}.weight_scale has shape {list(scale.shape)}, expected "
                            f"[{', '.join(map(str, lead + (rows,)))}, {cols} / group] with a group of "
                            f"{'/'.join(map(str, GROUP_SIZES))} dividing {cols}")
    _check_scales(scale, f"{base}.weight_scale")


def unpack_int4(packed, cols: int):
    """int8 [rows, cols] codes in [-8, 7] from pack-quantized int32 words [rows, ceil(cols / 8)]."""
    import torch
    shifts = torch.arange(0, 32, 4, dtype=torch.int32)
    nibbles = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & 0xF       # [rows, words, 8]
    return (nibbles.reshape(packed.shape[0], -1)[:, :cols] - 8).to(torch.int8)


def weight_name(codes_key: str) -> str:
    """`<m>.weight` for the codes tensor of a linear (`<m>.weight` or `<m>.weight_packed`)."""
    return codes_key.removesuffix("_packed")


def _check_scales(scale, name: str) -> None:
    import torch
    s = scale.to(torch.float32)
    bad = ~torch.isfinite(s) | (s < 0)
    if bad.any():
        at = [int(i) for i in bad.nonzero()[0]]
        raise CheckpointError(f"{name}: scale {s[tuple(at)].item()} at {at} (scales must be finite and >= 0)")


def check_byte_order() -> None:
    """The int32 words of pack-quantized checkpoints are handed to the kernel as their bytes."""
    if sys.byteorder != "little":
        raise CheckpointError("INT4 pack-quantized checkpoints are read on little-endian CPUs only")
