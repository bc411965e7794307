"""LoRA factors of a layer's experts and their gradient buffers, in the two layouts ktmoe reads
(design.md 4).

- `LoRA(gate=(A, B), up=(A, B), down=(A, B), scale=s)`: one factor pair per projection,
  A [E, r, in], B [E, out, r] (per-expert nn.Linear LoRA, kt-kernel's layout).
- `LoRA.peft(gate_up=(A, B), down=(A, B), scale=s)`: PEFT `target_parameters` on
  transformers v5 fused experts: gate_up A [E*r, H], B [2I, E*r]; down A [E*r, I], B
  [H, E*r], laid out as ktmoe/lora_layout.py describes (the one description of it).
  ktmoe.torch hands PEFT's lora_A / lora_B weights over in this form.
- `LoRAGrads(...)` / `LoRAGrads.peft(...)`: the buffers backward ADDS the LoRA gradients into,
  in the same layouts and shapes as the forward's LoRA (no scale: the forward's is used).

Any projection may be left out. resolve() checks a LoRA or LoRAGrads against a layer once and
gives the kernel's views (ResolvedLoRA: each projection as A [E, r, in], B [E, out, r]
strides), which _core.fill_lora copies field by field into the C struct kt_lora (the one
form between the caller's factors and C); the kernel reads both layouts in place through
those strides: nothing is reshaped or copied here, and no delta weight W + BA is ever formed.
"""
from __future__ import annotations

from dataclasses import dataclass

from . import lora_layout
from ._buffers import Buffer, as_buffer, checked

PROJECTIONS = ("gate", "up", "down")
LORA_DTYPES = ("float32", "bfloat16")


class _Factors:
    """Factor pairs (or gradient buffers) for the gate, up and down projections in one layout."""

    def __init__(self, gate=None, up=None, down=None):
        self.layout = "per_projection"
        self.factors = {"gate": gate, "up": up, "down": down}

    @classmethod
    def _peft(cls, gate_up, down, **kw):
        obj = cls(**kw)
        obj.layout = "peft"
        obj.factors = {"gate_up": gate_up, "down": down}
        return obj

    def resolve(self, E: int, H: int, I: int, name: str, writable: bool = False) -> "ResolvedLoRA":
        """Checks shapes/dtypes against a layer and returns kernel views; raises naming `name`."""
        scale = getattr(self, "scale", 0.0)
        if self.layout == "peft":
            return _resolve_peft(self, scale, E, H, I, name, writable)
        return _resolve_per_projection(self, scale, E, H, I, name, writable)


class LoRA(_Factors):
    """LoRA factor pairs for the gate, up and down projections, and their scale s."""

    def __init__(self, gate=None, up=None, down=None, *, scale: float = 1.0):
        super().__init__(gate, up, down)
        self.scale = float(scale)

    @classmethod
    def peft(cls, gate_up=None, down=None, *, scale: float = 1.0) -> "LoRA":
        return cls._peft(gate_up, down, scale=scale)

    def __repr__(self) -> str:
        parts = [k for k, v in self.factors.items() if v is not None]
        return f"LoRA(layout={self.layout!r}, projections={parts}, scale={self.scale})"


class LoRAGrads(_Factors):
    """Gradient buffers of a LoRA (same layout and shapes), accumulated into by backward."""

    @classmethod
    def peft(cls, gate_up=None, down=None) -> "LoRAGrads":
        return cls._peft(gate_up, down)

    def __repr__(self) -> str:
        parts = [k for k, v in self.factors.items() if v is not None]
        return f"LoRAGrads(layout={self.layout!r}, projections={parts})"


@dataclass(frozen=True)
class ProjView:
    """One projection's factors as the kernel reads them: A [E, r, in], B [E, out, r]."""
    r: int
    a_addr: int
    a_dtype: str
    a_strides: tuple
    b_addr: int
    b_dtype: str
    b_strides: tuple
    signature: tuple  # shapes and dtypes of the caller's tensors


class ResolvedLoRA:
    """Checked views of a LoRA, per projection, plus the caller buffers behind them."""

    def __init__(self, layout: str, scale: float):
        self.layout, self.scale = layout, scale
        self.proj: dict = {}
        self.buffers: list[Buffer] = []  # every caller buffer, for keep-alive and checks

    def signature(self) -> tuple:
        """What a gradient container must match: layout, and shape/dtype of each factor."""
        return (self.layout, tuple(sorted((k, v.signature) for k, v in self.proj.items())))


def _pair(value, name: str):
    if not (isinstance(value, (tuple, list)) and len(value) == 2):
        raise TypeError(f"{name}: expected a pair (A, B) of arrays, got {type(value).__name__}")
    return value


def _buf(obj, name: str, ndim: int, writable: bool) -> Buffer:
    return checked(as_buffer(obj, name), name, ndim, LORA_DTYPES, writable=writable)


def _resolve_per_projection(lora: _Factors, scale, E, H, I, name, writable) -> ResolvedLoRA:
    res = ResolvedLoRA("per_projection", scale)
    dims = {"gate": (H, I), "up": (H, I), "down": (I, H)}
    for p in PROJECTIONS:
        if lora.factors[p] is None:
            continue
        fin, fout = dims[p]
        A, B = _pair(lora.factors[p], f"{name}.{p}")
        a = _buf(A, f"{name}.{p} A", 3, writable)
        b = _buf(B, f"{name}.{p} B", 3, writable)
        r = a.shape[1]
        if a.shape[0] != E or a.shape[2] != fin or r < 1:
            raise ValueError(f"{name}.{p} A: expected shape [E={E}, r, {fin}], got {a.shape}")
        if b.shape != (E, fout, r):
            raise ValueError(f"{name}.{p} B: expected shape [E={E}, {fout}, r={r}] to match A, got {b.shape}")
        sig = (a.shape, a.dtype, b.shape, b.dtype)
        res.proj[p] = ProjView(r, a.addr, a.dtype, (r * fin, fin, 1), b.addr, b.dtype, (fout * r, r, 1), sig)
        res.buffers += [a, b]
    return res


def _resolve_peft(lora: _Factors, scale, E, H, I, name, writable) -> ResolvedLoRA:
    res = ResolvedLoRA("peft", scale)
    specs = {"gate_up": (H, 2 * I), "down": (I, H)}
    for key, (fin, fout) in specs.items():
        if lora.factors[key] is None:
            continue
        A, B = _pair(lora.factors[key], f"{name}.{key}")
        a = _buf(A, f"{name}.{key} A", 2, writable)
        b = _buf(B, f"{name}.{key} B", 2, writable)
        if a.shape[1] != fin or a.shape[0] % E or a.shape[0] == 0:
            raise ValueError(f"{name}.{key} A: expected shape [E*r, {fin}] with E={E}, got {a.shape}")
        r = a.shape[0] // E
        if b.shape != (fout, E * r):
            raise ValueError(f"{name}.{key} B: expected shape [{fout}, E*r={E * r}] to match A, got {b.shape}")
        sig = (a.shape, a.dtype, b.shape, b.dtype)
        a_strides, b_strides = lora_layout.strides(E, r, fin)   # the views of lora_layout.per_expert_A / _B
        if key == "down":
            res.proj["down"] = ProjView(r, a.addr, a.dtype, a_strides, b.addr, b.dtype, b_strides, sig)
        else:  # gate and up share A; up's B starts at row I
            res.proj["gate"] = ProjView(r, a.addr, a.dtype, a_strides, b.addr, b.dtype, b_strides, sig)
            res.proj["up"] = ProjView(r, a.addr, a.dtype, a_strides, b.offset(I * E * r), b.dtype,
                                      b_strides, sig)
        res.buffers += [a, b]
    return res
