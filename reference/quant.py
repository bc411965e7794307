"""Quantized weight formats of the reference (SPEC.md section 5), readable as the specification.

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
    A row (group) whose scale is 0 (all zeros, or so tiny that amax / qmax underflows to 0)
    gets scale 0 and q 0; there is no division by zero.

q is stored unpacked, one int8 per weight (INT4 codes too); scale is float32
[..., rows, ngroups] (ngroups = 1 for INT8).

Weight-only mode uses the weights the kernel expands into bf16 tiles:
    W_eff = bf16(float32(q) * scale)          float32 multiply, then round-to-nearest-even
W8A8 mode also quantizes activations per row (quantize_rows): sa = amax / 127,
aq = clip(rint(a / sa), -127, 127).
"""
from dataclasses import dataclass

import ml_dtypes
import numpy as np

BF16 = ml_dtypes.bfloat16
QMAX = {"int8": 127, "int4": 7}
INT4_GROUP_SIZES = (32, 64, 128)


def _symmetric_codes(v32, amax, qmax):
    """scale = amax / qmax and q = clip(rint(v32 / scale), -qmax, qmax), all in float32.

    v32 [..., n]; amax [..., 1] float32. Where scale == 0 the codes are 0 (no division).
    """
    scale = amax / np.float32(qmax)
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
        """scale broadcast to q's shape: column c of a row uses scale[..., row, c // group_size]."""
        return np.repeat(self.scale, self.group_size, axis=-1)

    def dequantize(self):
        """Weight-only mode's effective weights: bf16(float32(q) * scale), float32 multiply."""
        w32 = self.q.astype(np.float32) * self.scale_per_column()
        return w32.astype(BF16)

    def nbytes_packed(self):
        """Bytes a packed kernel holds: codes (1 byte INT8, half a byte INT4) + 4 per scale."""
        *lead, rows, cols = self.shape
        per_matrix = {"int8": rows * cols + 4 * rows,
                      "int4": rows * cols // 2 + 4 * rows * self.ngroups}[self.format]
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

    format "int8" (one scale per row; group_size is ignored and recorded as cols) or "int4"
    (one scale per row and group of group_size columns, group_size in {32, 64, 128}).
    """
    if format not in QMAX:
        raise ValueError(f"format must be 'int8' or 'int4', got {format!r}")
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
    q, scale = _symmetric_codes(groups, amax, QMAX[format])
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
