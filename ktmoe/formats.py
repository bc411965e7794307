"""The weight formats and activation modes ktmoe runs (design.md 5), as one table.

Every other module reads the grid from here instead of spelling it out: the layer's checks
(experts.py, _ingest.py), the C enum codes (_kernels/_core.pyx), `ktmoe bench`'s rows,
`ktmoe verify`'s rows, the reference quantizer's constants and the test harness
(ktmoe/testing.py). Adding a format is one WeightFormat entry here plus the rows of MODES it
allows (docs/design.md 5 lists the other files to touch).

- WEIGHT_FORMATS: name -> WeightFormat (C code, bits per code, how it is scaled, whether the
  constructor quantizes to it or only from_quantized takes it, the group sizes / block it
  takes, the activation modes it allows).
- ACTIVATIONS: the activation modes ("bf16": weight-only, "int8": W8A8).
- MODES: the allowed (weights, activations) pairs, each with its short label (int8, w8a8,
  w4a8, ...), its `ktmoe bench` row and its tolerance class (design.md 6).
- check_layer_format(...): the one check of a constructor's format options.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class WeightFormat:
    """One weight format: what the kernel stores per weight and how it is scaled."""
    name: str
    c_code: int                 # kt_wformat in _kernels/ktmoe.h
    bits: int                   # bits per stored code
    scaling: str                # "none", "row" (one fp32 scale per output row), "group", "block"
    quantized_here: bool        # MoEExperts(...) quantizes bf16 / fp32 weights into it
    from_checkpoint: bool       # MoEExperts.from_quantized takes its codes as published
    activations: tuple          # activation modes it multiplies with
    qmax: int | None = None     # ktmoe's own quantizer: codes in [-qmax, qmax]
    group_sizes: tuple = ()     # int4: the input-column group sizes of its scales
    default_group: int | None = None
    default_block: tuple | None = None   # fp8: (rows, cols) of one scale block
    transposed_copy: bool = False        # transposed_weights=True exists for it
    scale_dtype: str = "float32"         # how the kernel stores the scales ("float32" or "bfloat16")
    code_dtype: str = "int8"             # numpy dtype of its exported codes (fp8: the e4m3 bytes as uint8)

    @property
    def quantized(self) -> bool:
        """Codes plus scales (every format but bf16)."""
        return self.scaling != "none"

    @property
    def scale_bytes(self) -> int:
        return 2 if self.scale_dtype == "bfloat16" else 4

    def raw_bytes(self, rows: int, cols: int, group: int | None = None, block: tuple | None = None) -> float:
        """Bytes of one [rows, cols] matrix in this format: codes plus scales (scale_dtype)."""
        codes, sb = rows * cols * self.bits / 8, self.scale_bytes
        if self.scaling == "row":
            return codes + sb * rows
        if self.scaling == "group":
            return codes + sb * rows * cols / (group or self.default_group)
        if self.scaling == "block":
            br, bc = block or self.default_block
            return codes + sb * -(-rows // br) * (cols // bc)
        return codes


WEIGHT_FORMATS = {f.name: f for f in (
    WeightFormat("bf16", 0, 16, "none", True, False, ("bf16",), transposed_copy=True),
    WeightFormat("int8", 1, 8, "row", True, True, ("bf16", "int8"), qmax=127),
    WeightFormat("int4", 2, 4, "group", True, True, ("bf16", "int8"), qmax=7, group_sizes=(32, 64, 128),
                 default_group=128),
    WeightFormat("fp8", 3, 8, "block", False, True, ("bf16",), default_block=(128, 128), code_dtype="uint8"),
    # int4 with bf16 scales kept as bf16: a published INT4 checkpoint with bf16 scales in its own bytes
    WeightFormat("int4bs", 4, 4, "group", True, True, ("bf16",), qmax=7, group_sizes=(32, 64, 128),
                 default_group=128, scale_dtype="bfloat16"),
)}
ACTIVATIONS = ("bf16", "int8")   # "bf16": weight-only; "int8": W8A8, activations quantized per row


@dataclass(frozen=True)
class Mode:
    """One allowed (weights, activations) pair."""
    label: str          # short name: bf16, int8, int4, w8a8, w4a8, fp8
    weights: str
    activations: str
    bench_row: str      # its `ktmoe bench` row
    tolerance: str      # key of TOLERANCES

    @property
    def format(self) -> WeightFormat:
        return WEIGHT_FORMATS[self.weights]

    @property
    def act_int8(self) -> bool:
        return self.activations == "int8"


MODES = (
    Mode("bf16", "bf16", "bf16", "ktmoe", "bf16"),
    Mode("int8", "int8", "bf16", "ktmoe-int8", "quantized"),
    Mode("int4", "int4", "bf16", "ktmoe-int4", "quantized"),
    Mode("w8a8", "int8", "int8", "ktmoe-w8a8", "quantized"),
    Mode("w4a8", "int4", "int8", "ktmoe-w4a8", "quantized"),
    Mode("fp8", "fp8", "bf16", "ktmoe-fp8", "quantized"),
    Mode("int4bs", "int4bs", "bf16", "ktmoe-int4bs", "quantized"),
)
# design.md 6: relative Frobenius error limit and smallest cosine, per tolerance class. A
# quantized kernel is held to the quantized reference (same codes, same rounding), so both
# classes have the same limits.
TOLERANCES = {"bf16": {"rel": 1e-2, "cos": 0.9999}, "quantized": {"rel": 1e-2, "cos": 0.9999}}

# compatibility names read by the rest of the package
GROUPED_NAMES = " or ".join(repr(n) for n, f in WEIGHT_FORMATS.items() if f.scaling == "group")   # 'int4' or 'int4bs'
WEIGHT_FORMAT_NAMES = tuple(WEIGHT_FORMATS)
GROUP_SIZES = WEIGHT_FORMATS["int4"].group_sizes
FP8_BLOCK = WEIGHT_FORMATS["fp8"].default_block
C_CODES = {f.name: f.c_code for f in WEIGHT_FORMATS.values()}


def mode(weights: str, activations: str = "bf16") -> Mode:
    """The MODES row of a (weights, activations) pair; KeyError when the pair is not allowed."""
    for m in MODES:
        if m.weights == weights and m.activations == activations:
            return m
    raise KeyError((weights, activations))


def mode_by_row(bench_row: str) -> Mode:
    return next(m for m in MODES if m.bench_row == bench_row)


def path_label(weights: str, activations: str, group_size: int | None = None, block: tuple | None = None,
               checkpoint: bool = False) -> str:
    """A format's name in reports: "int4/g32 w8a8", "fp8/b128x128", "int8 ckpt" ("" for bf16)."""
    row = WEIGHT_FORMATS[weights]
    if not row.quantized:
        return ""
    fmt = weights + (f"/g{group_size}" if row.scaling == "group" else "")
    fmt += f"/b{block[0]}x{block[1]}" if row.scaling == "block" else ""
    fmt += " ckpt" if checkpoint and row.quantized_here else ""   # codes from a checkpoint, not ktmoe's quantizer
    return fmt + (" w8a8" if activations == "int8" else "")


def bytes_ratio(H: int, I: int, weights: str, group: int | None = None, block: tuple | None = None) -> float:
    """Raw bytes of one expert's gate, up and down in `weights` (codes + scales) over bf16's."""
    f = WEIGHT_FORMATS[weights]
    raw = 2 * f.raw_bytes(I, H, group, block) + f.raw_bytes(H, I, group, block)
    return raw / (6 * H * I)


def grouped(weights: str) -> bool:
    """True for the formats with one scale per row and group of columns (int4, int4bs)."""
    return WEIGHT_FORMATS[weights].scaling == "group"


def _w8a8_hint(weights: str) -> str:
    f = WEIGHT_FORMATS[weights]
    if f.scale_dtype == "bfloat16":
        return (f"; for W8A8 use weights='int4' (the same codes with fp32 scales; from a checkpoint its bf16 "
                f"scales are widened exactly)")
    return ""


def check_layer_format(weights, group_size, activations, transposed_weights: bool, H: int, I: int) -> int:
    """Validates a constructor's format options (MoEExperts(...), region_bytes, pack_region,
    attach); returns the kernel's group size (0 unless int4 / int4bs). Errors name the argument."""
    if not isinstance(weights, str) or weights not in WEIGHT_FORMATS:
        raise ValueError(f"weights: must be one of {list(WEIGHT_FORMATS)}, got {weights!r}")
    if not isinstance(activations, str) or activations not in ACTIVATIONS:
        raise ValueError(f"activations: must be one of {list(ACTIVATIONS)}, got {activations!r}")
    f = WEIGHT_FORMATS[weights]
    if not f.quantized_here:
        raise ValueError(f"weights: {weights!r} codes come from pre-quantized checkpoints: use "
                         f"MoEExperts.from_quantized({weights!r}, (codes, scales), (codes, scales)); this constructor "
                         "quantizes bf16 / fp32 weights to "
                         + " or ".join(repr(n) for n, g in WEIGHT_FORMATS.items() if g.quantized_here and g.bits < 16))
    if activations not in f.activations and f.bits < 16:
        raise ValueError(f"activations: '{activations}' (W8A8) is not available for weights={weights!r}, which is "
                         f"weight-only (activations='bf16')" + _w8a8_hint(weights))
    if activations not in f.activations:
        quantized = " or ".join(f"'{n}'" for n, g in WEIGHT_FORMATS.items() if g.quantized_here and activations in g.activations
                                and n != "bf16")
        raise ValueError(f"activations: '{activations}' (W8A8) needs quantized weights (weights={quantized})")
    if transposed_weights and not f.transposed_copy:
        raise ValueError(f"transposed_weights: the transposed copy exists for bf16 weights only, not {weights!r}")
    if not f.group_sizes:
        if group_size is not None:
            raise ValueError(f"group_size: applies to weights={GROUPED_NAMES} only (weights={weights!r})")
        return 0
    if group_size is None:
        group_size = f.default_group
    if isinstance(group_size, bool) or not isinstance(group_size, (int, np.integer)) or group_size not in f.group_sizes:
        raise ValueError(f"group_size: must be one of {list(f.group_sizes)}, got {group_size!r}")
    for name, n in (("H (hidden size)", H), ("I (intermediate size)", I)):
        if n % group_size:
            raise ValueError(f"group_size: {group_size} does not divide {name} = {n}")
    return int(group_size)
