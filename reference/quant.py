"""Quantized weight formats of the reference (design.md 5), readable as the specification.

A C kernel implements the same rounding and is compared bit-exactly on q and scale, so every
step below is the float32 arithmetic the kernel does (numpy float32 ops are IEEE float32,
round-to-nearest-even), not float64:

    w32 = w.astype(float32)
    INT8, per output row (the last axis is the input axis; one group of `cols` columns):
        amax  = max |w32[row]|                              float32
        scale = amax / float32(127)                         float32 division
        q     = clip(rint(w32 / scale), -127, 127)          float32 division, round half to even
    INT4, per (output row, group of `group_size` consecutive input columns), group_size in
    {32, 64, 128}:
        amax  = max |w32[row, group]|
        scale = amax / float32(7)
        q     = clip(rint(w32 / scale), -7, 7)
        Symmetric: the code -8 is never produced (q is in [-7, 7]), so negating a weight
        negates its code and zero is exactly representable.
    INT4BS (int4 with bf16 scales), as INT4 with the scale rounded to bf16 first:
        scale = bf16(amax / float32(7))                     round to nearest even
        q     = clip(rint(w32 / float32(scale)), -7, 7)
        scale is stored as bf16 (QuantizedWeight.scale has dtype bfloat16).
    A row (group) whose scale is 0 (all zeros, or so tiny that amax / qmax underflows to 0)
    gets scale 0 and q 0; there is no division by zero.

q is stored unpacked, one int8 per weight (INT4 codes too); scale is float32
[..., rows, ngroups] (ngroups = 1 for INT8; bfloat16 for INT4BS).

Weight-only mode uses the weights the kernel expands into bf16 tiles:
    W_eff = bf16(float32(q) * scale)          float32 multiply, then round-to-nearest-even
W8A8 mode also quantizes activations per row (quantize_rows): sa = amax / 127,
aq = clip(rint(a / sa), -127, 127).

Pre-quantized weights (published checkpoints, taken as they are, never re-quantized):

    INT4 as published (compressed-tensors "pack-quantized", e.g. Kimi K2): symmetric, codes in
    [-8, 7] (-8 does occur), one scale per (row, group of 32 / 64 / 128 columns) in the
    checkpoint's dtype. `weight_packed` int32 [rows, cols / 8] holds code + 8 as unsigned
    nibbles, element i of a row at bits 4i of its int32 word (pack_quantized / unpack_pack_quantized);
    ktmoe's own packing (pack_int4) is two 4-bit two's-complement codes per byte, column 2j in the
    low nibble: the int32 words viewed as little-endian bytes, XORed with 0x88. int4_weight()
    makes the QuantizedWeight of such codes and scales; W_eff is the same bf16(float32(q) * scale).
    With bf16 scales kept as bf16 (format "int4bs", int4_weight(..., format="int4bs")) the
    values are the same: float32(scale) widens a bf16 scale exactly.
    FP8 (DeepSeek-V3 / R1, Qwen3-FP8): e4m3fn codes, one byte each, s.eeee.mmm:
        value = (-1)^s * (e ? 8 + m : m) * 2^(max(e, 1) - 10)       (decode_fp8; exact in float32)
    no infinities; s.1111.111 (0x7f, 0xff) is NaN and rejected. One float32 scale per block of
    br x bc weights (`weight_block_size`, 128 x 128 in those releases; `weight_scale_inv` is this
    scale: w = code * scale), scale [ceil(rows / br), cols / bc]. Weight-only:
        W_eff = bf16(decode_fp8(code) * scale[row // br, col // bc])   float32 multiply, RNE
    (FP8Weight). quantize_fp8 makes such codes from float weights (scale = amax(block) / 448,
    code = e4m3 round-to-nearest-even of w / scale), as the releases did: tests and benchmarks
    use it to synthesize checkpoints.
"""
from dataclasses import dataclass

import ml_dtypes
import numpy as np

from ..formats import WEIGHT_FORMATS   # the formats' constants (ktmoe/formats.py); the math is all here

BF16 = ml_dtypes.bfloat16
QMAX = {name: f.qmax for name, f in WEIGHT_FORMATS.items() if f.qmax}    # int8: 127, int4: 7
INT4_GROUP_SIZES = WEIGHT_FORMATS["int4"].group_sizes                    # (32, 64, 128)


def _symmetric_codes(v32, amax, qmax, bf16_scale=False):
    """scale = amax / qmax and q = clip(rint(v32 / scale), -qmax, qmax), all in float32.

    v32 [..., n]; amax [..., 1] float32. Where scale == 0 the codes are 0 (no division).
    bf16_scale: the scale is rounded to bf16 (nearest even) before the codes are made.
    """
    scale = amax / np.float32(qmax)
    if bf16_scale:
        scale = scale.astype(BF16).astype(np.float32)
    nonzero = scale > 0
    divisor = np.where(nonzero, scale, np.float32(1))          # only to avoid 0 / 0 below
    q = np.where(nonzero, np.rint(v32 / divisor), np.float32(0))
    q = np.clip(q, -qmax, qmax).astype(np.int8)
    return q, scale.astype(np.float32)


@dataclass
class QuantizedWeight:
    """Weights [..., rows, cols] in INT8 or INT4: q (int8, same shape), scale float32
    [..., rows, ngroups], one scale per (row, group of group_size columns)."""
    q: np.ndarray
    scale: np.ndarray
    format: str
    group_size: int
    shape: tuple

    @property
    def ngroups(self):
        return self.shape[-1] // self.group_size

    def scale_per_column(self):
        """scale (as float32: exact for bf16 scales) broadcast to q's shape: column c of a row uses
        scale[..., row, c // group_size]."""
        return np.repeat(self.scale.astype(np.float32), self.group_size, axis=-1)

    def dequantize(self):
        """Weight-only mode's effective weights: bf16(float32(q) * scale), float32 multiply."""
        w32 = self.q.astype(np.float32) * self.scale_per_column()
        return w32.astype(BF16)

    def nbytes_packed(self):
        """Bytes a packed kernel holds: codes (1 byte INT8, half a byte INT4) + 4 per scale (2 for
        INT4BS's bf16 scales)."""
        *lead, rows, cols = self.shape
        per_matrix = {"int8": rows * cols + 4 * rows,
                      "int4": rows * cols // 2 + 4 * rows * self.ngroups,
                      "int4bs": rows * cols // 2 + 2 * rows * self.ngroups}[self.format]
        return int(np.prod(lead, dtype=np.int64)) * per_matrix

    def __getitem__(self, e):
        """The weights of expert e (the leading index), as a QuantizedWeight."""
        q, scale = self.q[e], self.scale[e]
        return QuantizedWeight(q, scale, self.format, self.group_size, q.shape)


def stack_rows(a, b):
    """The rows of two QuantizedWeights of one format, stacked: [a; b] (e.g. [Wg; Wu])."""
    if (a.format, a.group_size, a.shape[-1]) != (b.format, b.group_size, b.shape[-1]):
        raise ValueError("stack_rows: both weights need the same format, group size and columns")
    q = np.concatenate([a.q, b.q], axis=-2)
    return QuantizedWeight(q, np.concatenate([a.scale, b.scale], axis=-2), a.format, a.group_size, q.shape)


def quantize(w, format, group_size=128):
    """Quantize w [..., rows, cols] (float32 or bf16) per output row; returns a QuantizedWeight.

    format "int8" (one scale per row; group_size is ignored and recorded as cols), "int4"
    (one scale per row and group of group_size columns, group_size in {32, 64, 128}) or
    "int4bs" (int4 with the scales rounded to bf16 before the codes are made, kept as bf16).
    """
    if format not in QMAX:
        raise ValueError(f"format must be one of {list(QMAX)}, got {format!r}")
    w32 = np.asarray(w).astype(np.float32)
    if w32.ndim < 2:
        raise ValueError(f"w must have shape [..., rows, cols], got {w32.shape}")
    if not np.isfinite(w32).all():
        raise ValueError("w contains NaN or Inf; it cannot be quantized")
    cols = w32.shape[-1]
    if format == "int8":
        group_size = cols
    elif group_size not in INT4_GROUP_SIZES or cols % group_size != 0:
        raise ValueError(f"group_size must be one of {INT4_GROUP_SIZES} and divide the "
                         f"{cols} columns of w, got {group_size!r}")

    groups = w32.reshape(*w32.shape[:-1], cols // group_size, group_size)
    amax = np.max(np.abs(groups), axis=-1, keepdims=True)       # float32 [..., rows, ngroups, 1]
    bf16 = WEIGHT_FORMATS[format].scale_dtype == "bfloat16"
    q, scale = _symmetric_codes(groups, amax, QMAX[format], bf16_scale=bf16)
    scale = scale.astype(BF16) if bf16 else scale                # exact: the values are bf16's
    return QuantizedWeight(q=q.reshape(w32.shape), scale=scale[..., 0], format=format,
                           group_size=group_size, shape=tuple(w32.shape))


def quantize_rows(a):
    """Activation quantization per row of a 2-d array: (aq int8 [rows, cols], sa float32 [rows]).

    a32 = a.astype(float32); sa = amax(row) / 127; aq = clip(rint(a32 / sa), -127, 127);
    rows of zeros get sa = 0, aq = 0.
    """
    a32 = np.asarray(a).astype(np.float32)
    if a32.ndim != 2:
        raise ValueError(f"a must be 2-d [rows, cols], got shape {a32.shape}")
    if not np.isfinite(a32).all():
        raise ValueError("a contains NaN or Inf; it cannot be quantized")
    amax = np.max(np.abs(a32), axis=1, keepdims=True)
    aq, sa = _symmetric_codes(a32, amax, 127)
    return aq, sa[:, 0]


def round_bf16(a):
    """a rounded to bf16 (nearest even), as float32: what a kernel holds in a bf16 buffer.

    Goes through float32 first, as a kernel does with an fp32 intermediate (ml_dtypes 0.6
    converts float64 to bf16 through float32 as well).
    """
    return np.asarray(a).astype(np.float32).astype(BF16).astype(np.float32)


def qlinear(X, Qw):
    """W8A8 forward base product X W^T [M, N] for X [M, K] and a QuantizedWeight Qw [N, K].

    X is rounded to bf16, then quantized per row (xq, sx); with integer sums (int64, exact):
        out[m, n] = sx[m] * sum_g scale[n, g] * sum_{k in group g} xq[m, k] q[n, k]
    (INT8 is the case of one group: out = sx[m] * scale[n] * sum_k xq[m, k] q[n, k]).
    Scales are applied in float64.
    """
    xq, sx = quantize_rows(round_bf16(X))
    xq, q = xq.astype(np.int64), Qw.q.astype(np.int64)
    gs = Qw.group_size
    out = np.zeros((X.shape[0], q.shape[0]))
    for g in range(Qw.ngroups):
        cols = slice(g * gs, (g + 1) * gs)
        isum = xq[:, cols] @ q[:, cols].T                        # exact integer sums
        out += Qw.scale[None, :, g].astype(np.float64) * isum
    return sx[:, None].astype(np.float64) * out


def qlinear_t(dY, Qw):
    """W8A8 backward base product dY W [M, K] for dY [M, N] and a QuantizedWeight Qw [N, K].

    Multiplies by the SAME codes q as the forward (no transposed re-quantization): dY is
    rounded to bf16, the row scales of group g are folded into it in float32, and the
    result is quantized per row; for each group g of output columns k:
        d_g        = dY32 * scale[None, :, g]                       float32
        dq_g, sd_g = quantize_rows(d_g)
        out[m, k]  = sd_g[m] * sum_n dq_g[m, n] q[n, k]             k in group g
    (INT8: one group, d = dY32 * scale[None, :, 0].)
    """
    dY32 = round_bf16(dY)
    q = Qw.q.astype(np.int64)
    gs = Qw.group_size
    out = np.zeros((dY.shape[0], q.shape[1]))
    for g in range(Qw.ngroups):
        cols = slice(g * gs, (g + 1) * gs)
        d = dY32 * Qw.scale[None, :, g]                              # float32 * float32
        dq, sd = quantize_rows(d)
        isum = dq.astype(np.int64) @ q[:, cols]                      # exact integer sums
        out[:, cols] = sd[:, None].astype(np.float64) * isum
    return out


# ---------------------------------------------------------------- pre-quantized INT4 (as published)

def pack_int4(q):
    """int4 codes q [..., cols] (int8 in [-8, 7], cols even) -> uint8 [..., cols / 2]: column 2j in
    the low nibble of byte j, column 2j + 1 in the high nibble, 4-bit two's complement."""
    q = np.asarray(q, dtype=np.int8)
    if q.min(initial=0) < -8 or q.max(initial=0) > 7 or q.shape[-1] % 2:
        raise ValueError("pack_int4: codes must be in [-8, 7] with an even number of columns")
    u = q.astype(np.uint8) & 0xF
    return u[..., 0::2] | (u[..., 1::2] << 4)


def unpack_int4(b):
    """Inverse of pack_int4: uint8 / int8 [..., cols / 2] -> int8 codes [..., cols] in [-8, 7]."""
    b = np.asarray(b).view(np.uint8)
    lo = (b & 0xF).astype(np.int8)
    hi = (b >> 4).astype(np.int8)
    q = np.stack([lo, hi], axis=-1).reshape(*b.shape[:-1], 2 * b.shape[-1])
    return np.where(q > 7, q - 16, q).astype(np.int8)


def pack_quantized(q):
    """int4 codes q [..., cols] (cols a multiple of 8) -> compressed-tensors `weight_packed`
    int32 [..., cols / 8]: element i of a row at bits 4i of its word, as the unsigned q + 8."""
    q = np.asarray(q, dtype=np.int64)
    if q.min(initial=0) < -8 or q.max(initial=0) > 7 or q.shape[-1] % 8:
        raise ValueError("pack_quantized: codes must be in [-8, 7] with a multiple of 8 columns")
    u = (q + 8).reshape(*q.shape[:-1], q.shape[-1] // 8, 8)
    words = np.zeros(u.shape[:-1], dtype=np.uint32)
    for i in range(8):
        words |= u[..., i].astype(np.uint32) << np.uint32(4 * i)
    return words.view(np.int32)


def unpack_pack_quantized(words):
    """Inverse of pack_quantized: int32 [..., cols / 8] -> int8 codes [..., cols] in [-8, 7]."""
    w = np.asarray(words).view(np.uint32)
    nib = [((w >> np.uint32(4 * i)) & np.uint32(0xF)).astype(np.int8) - 8 for i in range(8)]
    return np.stack(nib, axis=-1).reshape(*w.shape[:-1], 8 * w.shape[-1]).astype(np.int8)


def int4_weight(q, scale, group_size=None, format="int4"):
    """QuantizedWeight of given codes q [..., rows, cols] in [-8, 7] and scales
    [..., rows, cols / group_size]: format "int4" (any float scale dtype; used as float32,
    exactly for bf16) or "int4bs" (bfloat16 scales, kept as they are)."""
    q = np.asarray(q, dtype=np.int8)
    if format == "int4bs":
        if np.asarray(scale).dtype != BF16:
            raise ValueError("int4_weight: format 'int4bs' takes bfloat16 scales")
        scale = np.asarray(scale)
    elif format == "int4":
        scale = np.asarray(scale).astype(np.float32)
    else:
        raise ValueError(f"int4_weight: format must be 'int4' or 'int4bs', got {format!r}")
    if group_size is None:
        group_size = q.shape[-1] // scale.shape[-1]
    if q.min(initial=0) < -8 or q.max(initial=0) > 7:
        raise ValueError("int4_weight: codes must be in [-8, 7]")
    if group_size not in INT4_GROUP_SIZES or scale.shape != q.shape[:-1] + (q.shape[-1] // group_size,):
        raise ValueError(f"int4_weight: scale shape {scale.shape} does not fit codes {q.shape} in groups of "
                         f"{group_size} ({INT4_GROUP_SIZES})")
    return QuantizedWeight(q, scale, format, group_size, tuple(q.shape))


def quantize_int4_full_range(w, group_size=32):
    """INT4 codes over all of [-8, 7], to synthesize a published-style checkpoint (tests,
    `ktmoe verify`): per (row, group) scale = amax / 8 (float32), q = clip(rint(w / scale), -8, 7),
    so a group's most negative weight can get -8 and its largest positive one is clipped to 7."""
    w32 = np.asarray(w).astype(np.float32)
    *lead, cols = w32.shape
    if group_size not in INT4_GROUP_SIZES or cols % group_size:
        raise ValueError(f"group_size must be one of {INT4_GROUP_SIZES} and divide {cols} columns")
    g = w32.reshape(*lead, cols // group_size, group_size)
    scale = np.max(np.abs(g), axis=-1, keepdims=True) / np.float32(8)
    q = np.where(scale > 0, np.rint(g / np.where(scale > 0, scale, np.float32(1))), np.float32(0))
    q = np.clip(q, -8, 7).astype(np.int8).reshape(w32.shape)
    return int4_weight(q, scale[..., 0], group_size)


# ---------------------------------------------------------------- FP8 e4m3fn with block scales

FP8_MAX = 448.0   # largest finite e4m3fn value (code 0x7e)


def decode_fp8(codes):
    """Exact float32 values of e4m3fn codes (uint8, or ml_dtypes.float8_e4m3fn); raises for NaN.

    value = (-1)^s * (e ? 8 + m : m) * 2^(max(e, 1) - 10) for the code s.eeee.mmm.
    """
    c = np.asarray(codes)
    if c.dtype == ml_dtypes.float8_e4m3fn:
        c = c.view(np.uint8)
    if c.dtype != np.uint8:
        raise TypeError(f"decode_fp8: codes must be uint8 or float8_e4m3fn, got {c.dtype}")
    nan = (c & 0x7F) == 0x7F
    if nan.any():
        pos = tuple(int(i) for i in np.argwhere(nan)[0])
        raise ValueError(f"decode_fp8: NaN e4m3 code 0x{int(c[pos]):02x} at position {list(pos)}")
    s = (c >> 7).astype(np.int32)
    e = ((c >> 3) & 0xF).astype(np.int32)
    m = (c & 0x7).astype(np.int32)
    mant = np.where(e > 0, 8 + m, m).astype(np.float32)
    value = np.ldexp(mant, np.maximum(e, 1) - 10).astype(np.float32)
    return np.where(s == 1, -value, value).astype(np.float32)


@dataclass
class FP8Weight(QuantizedWeight):
    """FP8 weights [..., rows, cols]: q the uint8 e4m3fn codes, scale float32 block scales
    [..., ceil(rows / br), cols / bc], block = (br, bc); group_size = bc. Weight-only."""
    block: tuple = (128, 128)

    def scale_per_element(self):
        """scale broadcast to q's shape: weight (row, col) uses scale[row // br, col // bc]."""
        br, bc = self.block
        rows = self.shape[-2]
        return np.repeat(np.repeat(self.scale, br, axis=-2)[..., :rows, :], bc, axis=-1)

    def scale_per_column(self):
        return self.scale_per_element()

    def dequantize(self):
        """W_eff = bf16(decode_fp8(q) * scale), float32 multiply."""
        return (decode_fp8(self.q) * self.scale_per_element()).astype(BF16)

    def nbytes_packed(self):
        """Bytes ktmoe holds: one per code + 4 per row and column block (each block's scale is
        kept once per row of the block)."""
        *lead, rows, cols = self.shape
        return int(np.prod(lead, dtype=np.int64)) * (rows * cols + 4 * rows * (cols // self.block[1]))

    def nbytes_raw(self):
        """Bytes of the format itself: the codes plus one float32 per block."""
        *lead, rows, cols = self.shape
        return int(np.prod(lead, dtype=np.int64)) * (rows * cols + 4 * self.scale.shape[-2] * self.scale.shape[-1])

    def __getitem__(self, e):
        q, scale = self.q[e], self.scale[e]
        return FP8Weight(q, scale, "fp8", self.group_size, q.shape, self.block)


def fp8_weight(codes, scale, block=(128, 128)):
    """FP8Weight of given codes [..., rows, cols] (uint8 / float8_e4m3fn; NaN raises) and block
    scales [..., ceil(rows / br), cols / bc] (used as float32)."""
    q = np.asarray(codes)
    q = q.view(np.uint8) if q.dtype == ml_dtypes.float8_e4m3fn else q
    decode_fp8(q)   # NaN check
    scale = np.asarray(scale).astype(np.float32)
    br, bc = block
    rows, cols = q.shape[-2:]
    if cols % bc or scale.shape != q.shape[:-2] + (-(-rows // br), cols // bc):
        raise ValueError(f"fp8_weight: scale shape {scale.shape} does not fit codes {q.shape} in {br}x{bc} blocks")
    return FP8Weight(q, scale, "fp8", bc, tuple(q.shape), (br, bc))


def quantize_fp8(w, block=(128, 128)):
    """FP8Weight of float weights w [..., rows, cols] (cols a multiple of bc), as the FP8 releases
    were made: per br x bc block scale = amax / 448 (float32), code = e4m3 (round to nearest even)
    of clip(w / scale, -448, 448); an all-zero block gets scale 0 and codes 0."""
    w32 = np.asarray(w).astype(np.float32)
    if not np.isfinite(w32).all():
        raise ValueError("w contains NaN or Inf; it cannot be quantized")
    br, bc = block
    *lead, rows, cols = w32.shape
    if cols % bc:
        raise ValueError(f"quantize_fp8: the column block {bc} does not divide {cols} columns")
    nrb = -(-rows // br)
    pad = np.zeros((*lead, nrb * br, cols), np.float32)
    pad[..., :rows, :] = w32
    blocks = pad.reshape(*lead, nrb, br, cols // bc, bc)
    amax = np.max(np.abs(blocks), axis=(-3, -1))                      # [..., nrb, ncb]
    scale = (amax / np.float32(FP8_MAX)).astype(np.float32)
    per = np.repeat(np.repeat(scale, br, axis=-2)[..., :rows, :], bc, axis=-1)
    v = np.where(per > 0, w32 / np.where(per > 0, per, np.float32(1)), np.float32(0))
    codes = np.clip(v, -FP8_MAX, FP8_MAX).astype(ml_dtypes.float8_e4m3fn).view(np.uint8)
    return FP8Weight(codes, scale, "fp8", bc, tuple(w32.shape), (br, bc))
