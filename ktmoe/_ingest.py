"""Pre-quantized expert weights for MoEExperts.from_quantized: checks of the codes and scales as
published, and their addresses for the kernel (kt_layer_create_quantized), which copies them as
they are into its packed memory (no re-quantization, no intermediate copy).

Formats (design.md 5; reference/quant.py implements each exactly):

- "int8": codes int8 [E, rows, cols] in [-127, 127]; scales [E, rows, 1].
- "int4": two codes per byte, codes uint8 or int8 [E, rows, cols / 2]: column 2j in the low
  nibble, 2j + 1 in the high nibble of byte j, each a 4-bit two's-complement value in [-8, 7]
  (int4_packing="nibbles", the default). int4_packing="pack-quantized" takes
  compressed-tensors' layout instead: `weight_packed` int32 [E, rows, cols / 8] (or its bytes,
  uint8 [E, rows, cols / 2]), code + 8 as unsigned nibbles, element i of a row at bits 4i of
  its little-endian int32 word. Those words viewed as bytes and XORed with 0x88 are exactly the
  "nibbles" layout; the kernel does that XOR while copying. Scales [E, rows, cols / group_size],
  group_size in {32, 64, 128} (derived from the scales' shape when None).
- "int4bs": int4's codes (both packings) with bfloat16 scales, which the kernel keeps as
  bf16 (bit-equal to the checkpoint's; fp32 scales are refused: take "int4" for those).
- "fp8": e4m3fn codes uint8 (or float8_e4m3fn: numpy ml_dtypes or torch) [E, rows, cols];
  block scales [E, ceil(rows / br), cols / bc] for block = (br, bc) (default (128, 128):
  DeepSeek-V3 / Qwen3-FP8's `weight_block_size`; `weight_scale_inv` is such a scale: the weight
  is code * scale). bc must be a multiple of 32 dividing 512, H and I; br any >= 1. NaN codes
  (0x7f, 0xff) are rejected with their position.

Scales are float32 or bfloat16 (one dtype for all), finite and >= 0. The fused gate_up holds
gate rows 0 .. I-1, then up rows: its scales are gate's [E, ceil(I / br), .] followed by up's
(the row block index restarts at row I; for int8 / int4, br = 1). Every check runs before the
kernel copies anything; errors name the argument ("gate_up codes", "down scales", ...).
"""
from __future__ import annotations

import ctypes
import sys

import numpy as np

from . import formats
from ._buffers import ITEMSIZE, Buffer, as_buffer, checked
from ._kernels import _core

INGEST_FORMATS = tuple(n for n, f in formats.WEIGHT_FORMATS.items() if f.from_checkpoint)
INT4_PACKINGS = ("nibbles", "pack-quantized")
INT4_GROUP_SIZES = formats.WEIGHT_FORMATS["int4"].group_sizes
FP8_DEFAULT_BLOCK = formats.WEIGHT_FORMATS["fp8"].default_block
SCALE_DTYPES = ("float32", "bfloat16")
CODE_BYTES = {"int8": 1, "uint8": 1, "float8_e4m3fn": 1, "int32": 4}
CODE_DTYPES = {"int8": ("int8",), "fp8": ("uint8", "float8_e4m3fn"),
               "int4": {"nibbles": ("uint8", "int8"), "pack-quantized": ("int32", "uint8")}}
CODE_DTYPES["int4bs"] = CODE_DTYPES["int4"]


def _codes_buffer(obj, name: str) -> Buffer:
    """The codes' buffer; torch float8_e4m3fn tensors are read through their uint8 view."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(obj, torch.Tensor) and obj.dtype == torch.float8_e4m3fn:
        obj = obj.view(torch.uint8)
    if isinstance(obj, np.ndarray) and str(obj.dtype) == "float8_e4m3fn":
        obj = obj.view(np.uint8)
    return as_buffer(obj, name)


def _pair(obj, name: str):
    if not isinstance(obj, (tuple, list)) or len(obj) != 2:
        raise TypeError(f"{name}: expected a (codes, scales) pair, got {type(obj).__name__}")
    return obj


def _cols_per_unit(fmt: str, dtype: str) -> int:
    """Weight columns held by one element of the codes array."""
    return {"int8": 1, "fp8": 1}.get(fmt) or (8 if dtype == "int32" else 2)


def _check_block(block, H: int, I: int) -> tuple[int, int]:
    if not isinstance(block, (tuple, list)) or len(block) != 2 or not all(
            isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in block):
        raise ValueError(f"block: expected (rows, cols) of one fp8 scale block, two integers, got {block!r}")
    br, bc = int(block[0]), int(block[1])
    if br < 1:
        raise ValueError(f"block: the row block must be >= 1, got {br}")
    if bc < 32 or bc % 32 or 512 % bc:
        raise ValueError(f"block: the column block must be a multiple of 32 that divides 512 "
                         f"(32, 64, 128, 256, 512), got {bc}")
    for what, n in (("H (hidden size)", H), ("I (intermediate size)", I)):
        if n % bc:
            raise ValueError(f"block: the column block {bc} does not divide {what} = {n}")
    return br, bc


def _find_bad_codes(fmt: str, b: Buffer, name: str) -> None:
    """fp8 NaN codes / int8 -128 (the int8 GEMMs need [-127, 127]), with their position."""
    if fmt not in ("fp8", "int8"):
        return
    mask, value = (0x7F, 0x7F) if fmt == "fp8" else (0xFF, 0x80)
    n = int(np.prod(b.shape))
    bad = _core.find_byte(b.addr, n, mask, value)
    if bad < 0:
        return
    pos = tuple(int(i) for i in np.unravel_index(bad, b.shape))
    if fmt == "fp8":
        code = ctypes.c_uint8.from_address(b.addr + bad).value
        raise ValueError(f"{name}: NaN e4m3 code 0x{code:02x} at position {list(pos)} (e4m3fn codes 0x7f and "
                         f"0xff are NaN; the weights must be finite)")
    raise ValueError(f"{name}: code -128 at position {list(pos)} is outside [-127, 127] (int8 codes are "
                     f"symmetric)")


def _find_bad_scales(b: Buffer, name: str) -> None:
    n = int(np.prod(b.shape))
    bad = _core.find_bad_scale(b.addr, b.dtype, n)
    if bad >= 0:
        pos = tuple(int(i) for i in np.unravel_index(bad, b.shape))
        raise ValueError(f"{name}: scale at position {list(pos)} is NaN, Inf or negative (scales must be "
                         f"finite and >= 0)")


def prepare(weights, gate_up, down, gate, up, group_size, block, int4_packing, activations) -> dict:
    """Validates everything; returns the kernel arguments: E, H, I, group, block_rows, block
    (fp8) or None, scale dtype, code_xor, the three sources, and the buffers to keep alive."""
    if not isinstance(weights, str) or weights not in INGEST_FORMATS:
        raise ValueError(f"weights: must be one of {list(INGEST_FORMATS)}, got {weights!r}")
    if not isinstance(int4_packing, str) or int4_packing not in INT4_PACKINGS:
        raise ValueError(f"int4_packing: must be one of {list(INT4_PACKINGS)}, got {int4_packing!r}")
    if int4_packing != "nibbles" and not formats.grouped(weights):
        raise ValueError(f"int4_packing: applies to weights={formats.GROUPED_NAMES} only (weights={weights!r})")
    if not isinstance(activations, str) or activations not in formats.ACTIVATIONS:
        raise ValueError(f"activations: must be one of {list(formats.ACTIVATIONS)}, got {activations!r}")
    fmt = formats.WEIGHT_FORMATS[weights]
    if activations not in fmt.activations:
        raise ValueError(f"activations: '{activations}' (W8A8) is not available for weights='{weights}', which is "
                         "weight-only (activations='bf16')" + formats._w8a8_hint(weights))
    if not fmt.group_sizes and group_size is not None:
        raise ValueError(f"group_size: applies to weights={formats.GROUPED_NAMES} only (weights={weights!r})")
    if fmt.default_block is None and block is not None:
        raise ValueError(f"block: applies to weights='fp8' only (weights={weights!r})")
    if down is None:
        raise ValueError("down: the down projection's (codes, scales) are required")
    if gate_up is not None and (gate is not None or up is not None):
        raise ValueError("gate_up: give either gate_up or gate + up, not both")
    if gate_up is None and (gate is None or up is None):
        raise ValueError("gate_up: give gate_up, or both gate and up")
    code_dtypes = CODE_DTYPES[weights]
    if formats.grouped(weights):
        code_dtypes = code_dtypes[int4_packing]

    # codes: shapes give E, H, I
    dc, ds = _pair(down, "down")
    dcb = checked(_codes_buffer(dc, "down codes"), "down codes", 3, code_dtypes)
    cpu = _cols_per_unit(weights, dcb.dtype)
    E, H, I = dcb.shape[0], dcb.shape[1], dcb.shape[2] * cpu
    if min(E, H, I) < 1:
        raise ValueError(f"down codes: every dimension must be >= 1, got shape {list(dcb.shape)}")
    if gate_up is not None:
        names = ("gate_up",)
        pairs = [_pair(gate_up, "gate_up")]
        rows_of = {"gate_up": 2 * I}
    else:
        names = ("gate", "up")
        pairs = [_pair(gate, "gate"), _pair(up, "up")]
        rows_of = {"gate": I, "up": I}
    code_bufs = {}
    for name, (c, _) in zip(names, pairs):
        b = checked(_codes_buffer(c, f"{name} codes"), f"{name} codes", 3, code_dtypes)
        if b.dtype != dcb.dtype:
            raise TypeError(f"{name} codes: dtype {b.dtype} differs from down codes' {dcb.dtype}")
        want = (E, rows_of[name], H // cpu)
        if H % cpu or b.shape != want:
            raise ValueError(f"{name} codes: expected shape {list(want)} ([E, {rows_of[name]}, H"
                             f"{'' if cpu == 1 else ' / %d' % cpu}] from down codes' {list(dcb.shape)}), "
                             f"got {list(b.shape)}")
        code_bufs[name] = b
    code_bufs["down"] = dcb

    # scales: dtype, then the group / block they imply
    scale_bufs = {}
    for name, s in list(zip(names, (p[1] for p in pairs))) + [("down", ds)]:
        b = checked(as_buffer(s, f"{name} scales"), f"{name} scales", 3, SCALE_DTYPES)
        scale_bufs[name] = b
    sdt = scale_bufs["down"].dtype
    for name, b in scale_bufs.items():
        if b.dtype != sdt:
            raise TypeError(f"{name} scales: dtype {b.dtype} differs from down scales' {sdt} (one scale dtype "
                            f"for all projections)")
    if fmt.scale_dtype == "bfloat16" and sdt != "bfloat16":
        raise TypeError(f"down scales: weights={weights!r} keeps the checkpoint's bf16 scales as they are, got "
                        f"{sdt} scales (use weights='int4' for fp32 scales)")
    cols_of = {"gate_up": H, "gate": H, "up": H, "down": I}
    rows_of["down"] = H
    if weights == "fp8":
        if block is None:
            try:
                br, bc = _check_block(FP8_DEFAULT_BLOCK, H, I)
            except ValueError as e:
                raise ValueError(f"block: the default {FP8_DEFAULT_BLOCK} does not fit these weights ({e}); pass "
                                 f"block=(rows, cols), the checkpoint's weight_block_size") from None
        else:
            br, bc = _check_block(block, H, I)
        group = bc
    else:
        br = 1
        if weights == "int8":
            group = 0
        elif group_size is None:
            n = scale_bufs["down"].shape[2]
            group = I // n if n and I % n == 0 else 0
            if group not in INT4_GROUP_SIZES:
                raise ValueError(f"down scales: shape {list(scale_bufs['down'].shape)} implies no group size in "
                                 f"{list(INT4_GROUP_SIZES)} for I = {I} columns")
        else:
            if isinstance(group_size, bool) or not isinstance(group_size, (int, np.integer)) \
                    or group_size not in INT4_GROUP_SIZES:
                raise ValueError(f"group_size: must be one of {list(INT4_GROUP_SIZES)}, got {group_size!r}")
            group = int(group_size)
        for what, n in (("H (hidden size)", H), ("I (intermediate size)", I)):
            if group and n % group:
                raise ValueError(f"group_size: {group} does not divide {what} = {n}")

    def row_blocks(rows):
        return -(-rows // br)
    for name, b in scale_bufs.items():
        rb = 2 * row_blocks(I) if name == "gate_up" else row_blocks(rows_of[name])
        want = (E, rb, cols_of[name] // group if group else 1)
        if b.shape != want:
            what = {"int8": "[E, rows, 1]: one scale per row",
                    "int4": f"[E, rows, cols / {group}]: one scale per row and group of {group} columns",
                    "int4bs": f"[E, rows, cols / {group}]: one scale per row and group of {group} columns",
                    "fp8": f"[E, ceil(rows / {br}), cols / {group}]: one scale per {br}x{group} block"
                           + ("; gate's blocks, then up's" if name == "gate_up" else "")}[weights]
            hint = " (pass block=(rows, cols) if the checkpoint's weight_block_size is not 128x128)" \
                if weights == "fp8" and block is None else ""
            raise ValueError(f"{name} scales: expected shape {list(want)} ({what}), got {list(b.shape)}{hint}")

    # values: fp8 NaN / int8 -128 codes, non-finite or negative scales
    for name, b in code_bufs.items():
        _find_bad_codes(weights, b, f"{name} codes")
    for name, b in scale_bufs.items():
        _find_bad_scales(b, f"{name} scales")

    # the kernel's sources: (codes address, codes expert stride in bytes, scales address, scales stride)
    row_bytes = H * fmt.bits // 8
    if gate_up is not None:
        c, s = code_bufs["gate_up"], scale_bufs["gate_up"]
        cs, ss = 2 * I * row_bytes, s.shape[1] * s.shape[2]
        gate_src = (c.addr, cs, s.addr, ss)
        up_src = (c.addr + I * row_bytes, cs, s.addr + row_blocks(I) * s.shape[2] * ITEMSIZE[sdt], ss)
    else:
        gate_src, up_src = ((code_bufs[n].addr, I * row_bytes, scale_bufs[n].addr,
                             scale_bufs[n].shape[1] * scale_bufs[n].shape[2]) for n in ("gate", "up"))
    d, s = code_bufs["down"], scale_bufs["down"]
    down_src = (d.addr, H * (I * fmt.bits // 8), s.addr, s.shape[1] * s.shape[2])
    code_xor = 0x88 if formats.grouped(weights) and int4_packing == "pack-quantized" else 0
    return {"E": E, "H": H, "I": I, "group": group, "block": (br, group) if weights == "fp8" else None,
            "sources": (gate_src, up_src, down_src, sdt, br, code_xor),
            "keep": (code_bufs, scale_bufs)}
