"""The oracle checked against torch autograd (float64), so the kernel tests can trust it.

torch here computes the same math (docs/design.md) a different way: per (token, slot) with gathered,
materialised expert weights W + s*B@A (the PEFT layout through PEFT's own einsum), and
autograd supplies every gradient. The reference must agree to float64 rounding.
"""
import ml_dtypes
import numpy as np
import pytest
import torch

from ktmoe import reference
from ktmoe.testing import rel_error as rel_err   # the harness metric: relative Frobenius error, float64

TOL = 1e-10   # float64 vs float64, different operation order


def routing(rng, T, k, E, minus_one=True, unused=None):
    """Distinct experts per token; some -1 slots, one token with all slots -1, expert `unused` never hit."""
    choices = [e for e in range(E) if e != unused]
    ids = np.stack([rng.choice(choices, size=k, replace=False) for _ in range(T)])
    if minus_one:
        ids[rng.random((T, k)) < 0.25] = -1
        ids[T // 2] = -1
    w = rng.random((T, k))
    return ids.astype(np.int64), w


def make_lora(rng, layout, E, H, I, ranks, s):
    """ranks: {projection: r}. Non-zero B so every gradient is non-trivial."""
    def ab(r, n_in, n_out, peft):
        A = rng.uniform(-1, 1, (E * r, n_in) if peft else (E, r, n_in)) / np.sqrt(n_in)
        B = rng.standard_normal((n_out, E * r) if peft else (E, n_out, r)) / np.sqrt(r)
        return A, B
    if layout == "peft":
        kw = {}
        if "gate_up" in ranks:
            kw["gate_up"] = ab(ranks["gate_up"], H, 2 * I, True)
        if "down" in ranks:
            kw["down"] = ab(ranks["down"], I, H, True)
        return reference.LoRA.peft(**kw, scale=s)
    dims = {"gate": (H, I), "up": (H, I), "down": (I, H)}
    return reference.LoRA(**{p: ab(r, *dims[p], False) for p, r in ranks.items()}, scale=s)


def torch_moe(x, ids, w, Wg, Wu, Wd, lora):
    """Same math via autograd. Returns (y, leaves) where leaves name every tensor to differentiate."""
    t = lambda a: torch.tensor(np.asarray(a, np.float64), requires_grad=True)
    x, w = t(x), t(w)
    Wg, Wu, Wd = (torch.tensor(np.asarray(a, np.float64)) for a in (Wg, Wu, Wd))
    E, I = Wg.shape[0], Wg.shape[1]
    leaves = {"x": x, "w": w}
    deltas = {}
    if lora is not None:
        s = lora.scale
        for name, (A, B) in lora.params.items():
            A, B = t(A), t(B)
            leaves[name] = (A, B)
            if lora.layout == "peft":   # PEFT ParamWrapper.get_delta_weight, verbatim math
                delta = torch.einsum("o r e, e r i -> e o i",
                                     B.reshape(B.shape[0], -1, E), A.reshape(E, -1, A.shape[-1])) * s
                if name == "gate_up":
                    deltas["gate"], deltas["up"] = delta[:, :I], delta[:, I:]
                else:
                    deltas["down"] = delta
            else:
                deltas[name] = s * (B @ A)
    Wg = Wg + deltas.get("gate", 0)
    Wu = Wu + deltas.get("up", 0)
    Wd = Wd + deltas.get("down", 0)
    ids_t = torch.tensor(ids)
    valid = (ids_t >= 0).double()
    idc = ids_t.clamp(min=0)
    G = torch.einsum("th,tkih->tki", x, Wg[idc])
    U = torch.einsum("th,tkih->tki", x, Wu[idc])
    D = torch.einsum("tki,tkhi->tkh", torch.nn.functional.silu(G) * U, Wd[idc])
    y = ((w * valid)[..., None] * D).sum(1)
    return y, leaves


CASES = [
    ("per_projection", {"gate": 3, "up": 3, "down": 3}),
    ("per_projection", {"gate": 2, "up": 5, "down": 4}),   # ranks differ per projection
    ("per_projection", {"up": 3}),                          # some projections frozen
    ("per_projection", {"down": 2}),
    ("peft", {"gate_up": 4, "down": 3}),
    ("peft", {"gate_up": 3}),
    ("peft", {"down": 5}),
    (None, None),
]


@pytest.mark.parametrize("in_dtype", [np.float32, ml_dtypes.bfloat16])
@pytest.mark.parametrize("layout,ranks", CASES)
def test_reference_matches_torch_autograd(layout, ranks, in_dtype):
    rng = np.random.default_rng(0)
    E, H, I, T, k, s = 6, 20, 12, 17, 3, 1.7
    cast = lambda a: np.asarray(a).astype(in_dtype)   # the oracle must accept (and upcast) either
    x = cast(rng.standard_normal((T, H)))
    Wg, Wu = (cast(rng.standard_normal((E, I, H)) / np.sqrt(H)) for _ in range(2))
    Wd = cast(rng.standard_normal((E, H, I)) / np.sqrt(I))
    ids, w = routing(rng, T, k, E, unused=4)
    w = cast(w)
    dy = cast(rng.standard_normal((T, H)))
    lora = make_lora(rng, layout, E, H, I, ranks, s) if layout else None
    if lora is not None:
        lora.params = {n: (cast(A), cast(B)) for n, (A, B) in lora.params.items()}

    y, cache = reference.moe_forward(x, ids, w, Wg, Wu, Wd, lora)
    dx, dw, grads = reference.moe_backward(dy, cache)

    y_t, leaves = torch_moe(x, ids, w, Wg, Wu, Wd, lora)
    y_t.backward(torch.tensor(np.asarray(dy, np.float64)))

    assert y.dtype == np.float64 and np.isfinite(y).all()
    assert rel_err(y, y_t.detach().numpy()) <= TOL
    assert rel_err(dx, leaves["x"].grad.numpy()) <= TOL
    assert rel_err(dw, leaves["w"].grad.numpy()) <= TOL
    assert np.all(dw[ids == -1] == 0)                         # -1 slots: exactly zero dw
    assert np.all(y[T // 2] == 0) and np.all(dx[T // 2] == 0)  # the all -1 token
    if lora is None:
        assert grads is None
        return
    assert set(grads) == set(lora.params)
    for name, (A, B) in lora.params.items():
        dA, dB = grads[name]
        tA, tB = leaves[name]
        assert dA.shape == A.shape and dB.shape == B.shape
        assert rel_err(dA, tA.grad.numpy()) <= TOL, name
        assert rel_err(dB, tB.grad.numpy()) <= TOL, name
    # expert 4 got no token: its LoRA gradients are zero (PEFT: rows 4r..5r of A, columns j*E+4 of B)
    for name, (dA, dB) in grads.items():
        if layout == "per_projection":
            assert np.all(dA[4] == 0) and np.all(dB[4] == 0)
        else:
            r = dA.shape[0] // E
            assert np.all(dA[4 * r:5 * r] == 0) and np.all(dB[:, 4::E] == 0)
            assert np.any(dA[:4 * r] != 0) and np.any(dB[:, 0::E] != 0)


def test_reference_lora_B_zero_is_exact():
    """B = 0 (PEFT init): y, dx, dw identical to no LoRA, dA exactly 0."""
    rng = np.random.default_rng(1)
    E, H, I, T, k = 4, 16, 8, 9, 2
    x = rng.standard_normal((T, H))
    Wg, Wu, Wd = rng.standard_normal((E, I, H)), rng.standard_normal((E, I, H)), rng.standard_normal((E, H, I))
    ids, w = routing(rng, T, k, E)
    dy = rng.standard_normal((T, H))
    lora = make_lora(rng, "peft", E, H, I, {"gate_up": 3, "down": 3}, 2.0)
    for A, B in lora.params.values():
        B[...] = 0
    y0, c0 = reference.moe_forward(x, ids, w, Wg, Wu, Wd)
    y1, c1 = reference.moe_forward(x, ids, w, Wg, Wu, Wd, lora)
    dx0, dw0, _ = reference.moe_backward(dy, c0)
    dx1, dw1, grads = reference.moe_backward(dy, c1)
    assert np.array_equal(y0, y1) and np.array_equal(dx0, dx1) and np.array_equal(dw0, dw1)
    for dA, dB in grads.values():
        assert np.all(dA == 0) and np.any(dB != 0)


def test_reference_silu_extremes():
    """G over [-1000, 1000]: no overflow, no NaN; silu and its derivative match torch."""
    g = np.linspace(-1000, 1000, 20001)
    with np.errstate(over="raise", invalid="raise", divide="raise"):  # underflow to 0 is fine
        sig = reference.sigmoid(g)
    tg = torch.tensor(g, requires_grad=True)
    torch.nn.functional.silu(tg).sum().backward()
    assert np.isfinite(sig).all()
    assert np.allclose(g * sig, torch.nn.functional.silu(torch.tensor(g)).numpy(), rtol=1e-14, atol=1e-300)  # atol: denormals
    assert np.allclose(sig * (1 + g * (1 - sig)), tg.grad.numpy(), rtol=1e-12, atol=1e-300)


def test_reference_matches_real_peft_experts():
    """The PEFT layout is PEFT's: wrap transformers' Qwen3MoeExperts with PEFT target_parameters."""
    peft = pytest.importorskip("peft")
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    E, H, I, T, k, r, alpha = 4, 16, 8, 7, 2, 3, 5
    cfg = Qwen3MoeConfig(hidden_size=H, moe_intermediate_size=I, num_experts=E, num_experts_per_tok=k)

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.experts = Qwen3MoeExperts(cfg)

        def forward(self, x, ids, w):
            return self.experts(x, ids, w)

    torch.manual_seed(0)
    block = Block().double()
    torch.nn.init.normal_(block.experts.gate_up_proj, std=H ** -0.5)
    torch.nn.init.normal_(block.experts.down_proj, std=I ** -0.5)
    Wgu = block.experts.gate_up_proj.detach().numpy().copy()
    Wd = block.experts.down_proj.detach().numpy().copy()
    model = peft.get_peft_model(block, peft.LoraConfig(
        r=r, lora_alpha=alpha, target_modules=[],
        target_parameters=["experts.gate_up_proj", "experts.down_proj"]))
    wrappers = {m.parameter_name: m for m in model.modules() if hasattr(m, "parameter_name")}
    params = {}
    for pname, name in (("gate_up_proj", "gate_up"), ("down_proj", "down")):
        A, B = wrappers[pname].lora_A["default"].weight, wrappers[pname].lora_B["default"].weight
        with torch.no_grad():
            B.normal_()   # PEFT initialises B = 0; make the gradients of A non-trivial
        params[name] = (A, B)

    rng = np.random.default_rng(2)
    x = torch.tensor(rng.standard_normal((T, H)), requires_grad=True)
    ids, w = routing(rng, T, k, E, minus_one=False)   # transformers' eager loop has no -1 slot
    w = torch.tensor(w, requires_grad=True)
    dy = rng.standard_normal((T, H))
    y_t = model(x, torch.tensor(ids), w)
    y_t.backward(torch.tensor(dy))

    lora = reference.LoRA.peft(**{n: (A.detach().numpy(), B.detach().numpy()) for n, (A, B) in params.items()},
                               scale=alpha / r)
    y, cache = reference.moe_forward(x.detach().numpy(), ids, w.detach().numpy(),
                                     Wgu[:, :I], Wgu[:, I:], Wd, lora)
    dx, dw, grads = reference.moe_backward(dy, cache)
    assert rel_err(y, y_t.detach().numpy()) <= TOL
    assert rel_err(dx, x.grad.numpy()) <= TOL
    assert rel_err(dw, w.grad.numpy()) <= TOL
    for name, (A, B) in params.items():
        assert rel_err(grads[name][0], A.grad.numpy()) <= TOL, name
        assert rel_err(grads[name][1], B.grad.numpy()) <= TOL, name
