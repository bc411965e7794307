"""Routed MoE experts, forward and backward, in plain numpy (design.md 2-3 and 5).

This is the test oracle: each line is one line of the math of docs/design.md, looping over experts
with no performance tricks. Inputs may be float32 or ml_dtypes.bfloat16 (or anything
numpy can read); they are upcast to float64 and all math is float64, so the oracle's own
rounding is negligible next to a kernel's fp32 accumulation. Results are float64.

    per expert e, X_e = rows of x routed to e (slot j of token t with topk_ids[t, j] == e):
    G  = X_e Wg_e^T + s (X_e Ag_e^T) Bg_e^T          U likewise with Wu, Au, Bu
    Hh = silu(G) * U
    D  = Hh Wd_e^T + s (Hh Ad_e^T) Bd_e^T
    y_t = sum_j w_tj D_{e_tj}[t]                      id -1: the slot contributes nothing

Quantized base weights (reference.quantize: INT8 / INT4 QuantizedWeight for all three
projections; reference.int4_weight / fp8_weight / quantize_fp8 for pre-quantized INT4 and
FP8 weights, FP8 weight-only) run in one of two modes, chosen by `activations`:

- "bf16" (weight-only, the default): the math above, unchanged, with W = Qw.dequantize()
  (the bf16 weights a kernel expands its codes to), in forward and backward.
- "int8" (W8A8): every product of an activation matrix with a BASE weight is done on
  activations quantized per row to int8 (quant.qlinear for X W^T, quant.qlinear_t for
  dY W, both multiplying by the same codes q); LoRA products stay float64 on the
  unquantized activations. Backward uses the raw dy rows in the down projection and applies
  the router weight afterwards (as the kernel does):
      dHh_raw = qlinear_t(dy_e, Wd_e) + s (dy_e Bd_e) Ad_e,   dHh = w * dHh_raw,
      dw      = sum(dHh_raw * Hh, axis=1)          (= <dy, D> in exact math)
      dX_e    = qlinear_t([dG | dU], [Wg_e; Wu_e]) + LoRA terms as in bf16 mode,
  where [dG | dU] (one row per slot, 2I long) is quantized as ONE row against the stacked
  gate and up weights, as the kernel does (it keeps gate and up packed together), and dG, dU
  are computed from G and U rounded to bf16 (the pre-activations the kernel keeps).
"""
import numpy as np

from ..formats import WEIGHT_FORMATS   # which formats have a W8A8 mode (ktmoe/formats.py)
from .quant import QuantizedWeight, qlinear, qlinear_t, round_bf16, stack_rows

ACTIVATIONS = ("bf16", "int8")


def _f64(a):
    return np.asarray(a, dtype=np.float64)


def sigmoid(g):
    """1 / (1 + exp(-g)), written so that exp never overflows (g may be any float)."""
    z = np.exp(-np.abs(g))
    return np.where(g >= 0, 1.0 / (1.0 + z), z / (1.0 + z))


def _base(X, W, activations):
    """X W^T with the base weight W of one expert (float64 array, or QuantizedWeight in W8A8)."""
    return qlinear(X, W) if activations == "int8" else X @ W.T


def _base_t(dY, W, activations):
    """dY W with the base weight W of one expert (float64 array, or QuantizedWeight in W8A8)."""
    return qlinear_t(dY, W) if activations == "int8" else dY @ W


def _linear(X, W, ab, e, s, activations):
    """X W^T (+ s (X A_e^T) B_e^T when the projection has LoRA factors ab = (A, B))."""
    out = _base(X, W, activations)
    if ab is not None:
        A, B = ab
        out = out + s * ((X @ A[e].T) @ B[e].T)
    return out


def _base_weights(w_gate, w_up, w_down, activations):
    """The three base weights as the math uses them: float64 arrays, or QuantizedWeights in W8A8."""
    weights = {"w_gate": w_gate, "w_up": w_up, "w_down": w_down}
    quantized = [isinstance(W, QuantizedWeight) for W in weights.values()]
    if any(quantized) and not all(quantized):
        plain = [name for name, q in zip(weights, quantized) if not q]
        raise ValueError(f"w_gate, w_up and w_down must all be arrays or all QuantizedWeights; "
                         f"{', '.join(plain)} not quantized")
    if activations not in ACTIVATIONS:
        raise ValueError(f"activations must be one of {ACTIVATIONS}, got {activations!r}")
    if activations == "int8":
        if not all(quantized):
            raise ValueError("activations='int8' (W8A8) needs QuantizedWeights for w_gate, w_up, w_down")
        weight_only = sorted({W.format for W in weights.values() if "int8" not in WEIGHT_FORMATS[W.format].activations})
        if weight_only:
            raise ValueError(f"activations='int8' (W8A8) is not defined for {' / '.join(weight_only).upper()} weights "
                             f"(weight-only)")
        return tuple(weights.values())
    if all(quantized):
        return tuple(_f64(W.dequantize()) for W in weights.values())   # weight-only mode
    return tuple(_f64(W) for W in weights.values())


def moe_forward(x, topk_ids, topk_weights, w_gate, w_up, w_down, lora=None, activations="bf16"):
    """y [T, H] and a cache for moe_backward.

    x [T, H]; topk_ids [T, k] ints in [-1, E); topk_weights [T, k];
    w_gate, w_up [E, I, H]; w_down [E, H, I]: arrays, or all three reference.QuantizedWeight;
    lora: a reference.LoRA or None.
    activations: "bf16" (quantized weights: weight-only mode, W = dequantize()) or "int8"
    (W8A8, QuantizedWeights only: base products on per-row int8 activations); see the
    module docstring. The cache remembers the mode for moe_backward.
    """
    x, w = _f64(x), _f64(topk_weights)
    Wg, Wu, Wd = _base_weights(w_gate, w_up, w_down, activations)
    ids = np.asarray(topk_ids).astype(np.int64)
    E = Wg.shape[0]
    if ids.shape != w.shape or ids.shape[0] != x.shape[0]:
        raise ValueError("topk_ids, topk_weights and x disagree on T or k")
    if ids.size and (ids.min() < -1 or ids.max() >= E):
        raise ValueError("topk_ids out of [-1, E)")
    factors = lora.factors(E) if lora is not None else {}
    s = lora.scale if lora is not None else 0.0

    y = np.zeros_like(x)
    experts = {}
    for e in range(E):
        tok, slot = np.nonzero(ids == e)
        if tok.size == 0:
            continue
        X = x[tok]
        G = _linear(X, Wg[e], factors.get("gate"), e, s, activations)
        U = _linear(X, Wu[e], factors.get("up"), e, s, activations)
        Hh = G * sigmoid(G) * U
        D = _linear(Hh, Wd[e], factors.get("down"), e, s, activations)
        np.add.at(y, tok, w[tok, slot, None] * D)     # a token may appear in several experts
        experts[e] = dict(tok=tok, slot=slot, X=X, G=G, U=U, Hh=Hh, D=D)

    cache = dict(experts=experts, w=w, Wg=Wg, Wu=Wu, Wd=Wd, factors=factors, s=s,
                 lora=lora, shape=(x.shape, ids.shape), activations=activations)
    return y, cache


def moe_backward(dy, cache):
    """(dx [T, H], dw [T, k], lora_grads) for the forward that made `cache` (same mode).

    lora_grads is {name: (dA, dB)} in the layout and shapes of the forward's LoRA
    parameters (None without LoRA); experts with no token get zero gradient here
    (a kernel leaves its buffers untouched for them, which is the same under accumulation).
    """
    dy = _f64(dy)
    w, Wg, Wu, Wd = cache["w"], cache["Wg"], cache["Wu"], cache["Wd"]
    factors, s, activations = cache["factors"], cache["s"], cache["activations"]
    x_shape, ids_shape = cache["shape"]
    dx = np.zeros(x_shape)
    dw = np.zeros(ids_shape)
    grads = {name: (np.zeros_like(A), np.zeros_like(B)) for name, (A, B) in factors.items()}

    for e, c in cache["experts"].items():
        tok, slot, X, G, U, Hh, D = (c[n] for n in ("tok", "slot", "X", "G", "U", "Hh", "D"))
        dyr, wr = dy[tok], w[tok, slot, None]         # raw dy rows, router weights
        g = wr * dyr                                  # gradient reaching D_e

        if activations == "int8":                     # W8A8: quantize raw dy, weight afterwards
            dHh_raw = qlinear_t(dyr, Wd[e])
            if "down" in factors:
                A, B = factors["down"]
                dHh_raw += s * (dyr @ B[e]) @ A[e]
            dHh = wr * dHh_raw
            dw[tok, slot] = np.sum(dHh_raw * Hh, axis=1)   # = <dy_t, D_e[t]> in exact math
        else:
            dw[tok, slot] = np.sum(dyr * D, axis=1)        # <dy_t, D_e[t]>
            dHh = g @ Wd[e]
            if "down" in factors:
                A, B = factors["down"]
                dHh += s * (g @ B[e]) @ A[e]
        if "down" in factors:
            A, B = factors["down"]
            grads["down"][0][e] += s * (g @ B[e]).T @ Hh
            grads["down"][1][e] += s * g.T @ (Hh @ A[e].T)

        if activations == "int8":
            # W8A8 quantizes [dG | dU] per row, so a code can flip with any small change of its
            # input: compute them, as the kernel does, from the pre-activations it keeps (bf16)
            G, U = round_bf16(G).astype(np.float64), round_bf16(U).astype(np.float64)
        sig = sigmoid(G)
        dG = dHh * U * sig * (1.0 + G * (1.0 - sig))
        dU = dHh * G * sig

        if activations == "int8":                     # [dG | dU] quantized as one row
            dX = qlinear_t(np.concatenate([dG, dU], axis=1), stack_rows(Wg[e], Wu[e]))
        else:
            dX = dG @ Wg[e] + dU @ Wu[e]
        for name, d in (("gate", dG), ("up", dU)):
            if name in factors:
                A, B = factors[name]
                dB_ = d @ B[e]
                dX += s * dB_ @ A[e]
                grads[name][0][e] += s * dB_.T @ X
                grads[name][1][e] += s * d.T @ (X @ A[e].T)
        np.add.at(dx, tok, dX)

    lora = cache["lora"]
    lora_grads = lora.grads_in_layout(grads, Wg.shape[0]) if lora is not None else None
    return dx, dw, lora_grads
