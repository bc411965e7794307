"""Routed MoE experts, forward and backward, in plain numpy (SPEC.md sections 2-3).

This is the test oracle: each line is one line of the SPEC's math, looping over experts
with no performance tricks. Inputs may be float32 or ml_dtypes.bfloat16 (or anything
numpy can read); they are upcast to float64 and all math is float64, so the oracle's own
rounding is negligible next to a kernel's fp32 accumulation. Results are float64.

    per expert e, X_e = rows of x routed to e (slot j of token t with topk_ids[t, j] == e):
    G  = X_e Wg_e^T + s (X_e Ag_e^T) Bg_e^T          U likewise with Wu, Au, Bu
    Hh = silu(G) * U
    D  = Hh Wd_e^T + s (Hh Ad_e^T) Bd_e^T
    y_t = sum_j w_tj D_{e_tj}[t]                      id -1: the slot contributes nothing
"""
import numpy as np


def _f64(a):
    return np.asarray(a, dtype=np.float64)


def sigmoid(g):
    """1 / (1 + exp(-g)), written so that exp never overflows (g may be any float)."""
    z = np.exp(-np.abs(g))
    return np.where(g >= 0, 1.0 / (1.0 + z), z / (1.0 + z))


def _linear(X, W, ab, e, s):
    """X W^T (+ s (X A_e^T) B_e^T when the projection has LoRA factors ab = (A, B))."""
    out = X @ W.T
    if ab is not None:
        A, B = ab
        out = out + s * ((X @ A[e].T) @ B[e].T)
    return out


def moe_forward(x, topk_ids, topk_weights, w_gate, w_up, w_down, lora=None):
    """y [T, H] and a cache for moe_backward.

    x [T, H]; topk_ids [T, k] ints in [-1, E); topk_weights [T, k];
    w_gate, w_up [E, I, H]; w_down [E, H, I]; lora: a reference.LoRA or None.
    """
    x, w = _f64(x), _f64(topk_weights)
    Wg, Wu, Wd = _f64(w_gate), _f64(w_up), _f64(w_down)
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
        G = _linear(X, Wg[e], factors.get("gate"), e, s)
        U = _linear(X, Wu[e], factors.get("up"), e, s)
        Hh = G * sigmoid(G) * U
        D = _linear(Hh, Wd[e], factors.get("down"), e, s)
        np.add.at(y, tok, w[tok, slot, None] * D)     # a token may appear in several experts
        experts[e] = dict(tok=tok, slot=slot, X=X, G=G, U=U, Hh=Hh, D=D)

    cache = dict(experts=experts, w=w, Wg=Wg, Wu=Wu, Wd=Wd, factors=factors, s=s,
                 lora=lora, shape=(x.shape, ids.shape))
    return y, cache


def moe_backward(dy, cache):
    """(dx [T, H], dw [T, k], lora_grads) for the forward that made `cache`.

    lora_grads is {name: (dA, dB)} in the layout and shapes of the forward's LoRA
    parameters (None without LoRA); experts with no token get zero gradient here
    (a kernel leaves its buffers untouched for them, which is the same under accumulation).
    """
    dy = _f64(dy)
    w, Wg, Wu, Wd = cache["w"], cache["Wg"], cache["Wu"], cache["Wd"]
    factors, s = cache["factors"], cache["s"]
    x_shape, ids_shape = cache["shape"]
    dx = np.zeros(x_shape)
    dw = np.zeros(ids_shape)
    grads = {name: (np.zeros_like(A), np.zeros_like(B)) for name, (A, B) in factors.items()}

    for e, c in cache["experts"].items():
        tok, slot, X, G, U, Hh, D = (c[n] for n in ("tok", "slot", "X", "G", "U", "Hh", "D"))
        dw[tok, slot] = np.sum(dy[tok] * D, axis=1)   # <dy_t, D_e[t]>
        g = w[tok, slot, None] * dy[tok]              # gradient reaching D_e

        dHh = g @ Wd[e]
        if "down" in factors:
            A, B = factors["down"]
            gB = g @ B[e]
            dHh += s * gB @ A[e]
            grads["down"][0][e] += s * gB.T @ Hh
            grads["down"][1][e] += s * g.T @ (Hh @ A[e].T)

        sig = sigmoid(G)
        dG = dHh * U * sig * (1.0 + G * (1.0 - sig))
        dU = dHh * G * sig

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
