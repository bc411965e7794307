"""Kernel vs reference on every ISA path this CPU has (design.md 2-4, 6, 11).

Every test goes through ktmoe.testing.assert_matches_reference, which checks y, dx, dw and all
LoRA gradients at relative error <= 1e-2 and cosine >= 0.9999 (design.md 6).
Shapes stay small (CI has 2 cores); one medium case.
"""

import numpy as np
import pytest

import ktmoe
from ktmoe.testing import (BF16, CASES, assert_matches_reference, check, check_outputs, ktmoe_grads, ktmoe_lora, make_lora, make_routing, to64,
                     make_weights)
from ktmoe import reference

PER = {"gate": 4, "up": 4, "down": 4}
PEFT = {"gate_up": 4, "down": 4}


def layout_ranks(layout, r):
    if layout == "peft":
        return {"gate_up": r, "down": r}
    if layout == "per_projection":
        return {"gate": r, "up": r, "down": r}
    return None


# ---------------------------------------------------------------- API surface

def test_available_isas_and_cpu_info():
    isas = ktmoe.available_isas()
    order = ["amx", "avx512", "avx512f", "avx2", "portable"]
    assert "portable" in isas and set(isas) <= set(order)
    assert isas == sorted(isas, key=order.index), "best first"
    info = ktmoe.cpu_info()
    assert {"features", "isa", "reason", "num_threads"} <= set(info)
    assert isinstance(info["features"], list) and all(isinstance(f, str) for f in info["features"])
    assert info["isa"] in isas and isinstance(info["reason"], str) and info["reason"]
    assert isinstance(info["num_threads"], int) and info["num_threads"] >= 1


def test_default_isa_is_best(monkeypatch):
    monkeypatch.delenv("KTMOE_ISA", raising=False)   # without a forced path, the best one is used
    rng = np.random.default_rng(0)
    layer = ktmoe.MoEExperts(**make_weights(rng, 2, 32, 16))
    assert layer.isa == ktmoe.available_isas()[0]


def test_layer_attributes(isa):
    rng = np.random.default_rng(0)
    layer = ktmoe.MoEExperts(**make_weights(rng, 3, 40, 24), max_tokens=17, num_threads=1, isa=isa)
    assert (layer.num_experts, layer.hidden_size, layer.intermediate_size) == (3, 40, 24)
    assert (layer.isa, layer.num_threads, layer.max_tokens) == (isa, 1, 17)


# ---------------------------------------------------------------- routing / shape grid

def _grid_case(name, rng):
    """(E, H, I, r, ids, weights) for one named case of design.md 11 (ktmoe.testing.CASES)."""
    c = CASES[name]
    ids, w = c.route(rng)
    return c.E, c.H, c.I, c.r, ids, w


GRID = list(CASES)


@pytest.mark.parametrize("layout", ["per_projection", "peft", None])
@pytest.mark.parametrize("case", GRID)
def test_grid(case, layout, isa):
    rng = np.random.default_rng(GRID.index(case))
    E, H, I, r, ids, w = _grid_case(case, rng)
    T = ids.shape[0]
    weights = make_weights(rng, E, H, I, fused=layout != "per_projection")
    x = rng.standard_normal((T, H)).astype(BF16)
    lora = make_lora(rng, layout, E, H, I, layout_ranks(layout, r)) if layout else None
    assert_matches_reference(weights, x, ids, w, lora, isa=isa)


def bf16_weight_bytes(isa, E, H, I):
    """Packed bf16 bytes: raw on the avx512 / portable paths; on the amx path each expert's
    gate/up [2I, H] and down [H, I] in the tile layout, rows and columns rounded up to 32."""
    if isa != "amx":
        return 3 * E * H * I * 2
    up32 = lambda n: -(-n // 32) * 32   # noqa: E731
    return E * (up32(2 * I) * up32(H) + up32(H) * up32(I)) * 2


@pytest.mark.parametrize("shape", [(4, 256, 128), (3, 72, 56), (2, 17, 9)])
def test_bf16_weight_bytes(shape, isa):
    E, H, I = shape
    layer = ktmoe.MoEExperts(**make_weights(np.random.default_rng(0), E, H, I), isa=isa)
    assert layer.weight_bytes == bf16_weight_bytes(isa, E, H, I)


@pytest.mark.parametrize("case", ["T1", "minus_one_slots", "tails_72_56_r5", "several_chunks_300_200"])
def test_transposed_weights_mode(case, isa):
    """The opt-in transposed weight copy (backward streams W^T) gives the same results."""
    rng = np.random.default_rng(GRID.index(case))
    E, H, I, r, ids, w = _grid_case(case, rng)
    weights = make_weights(rng, E, H, I)
    x = rng.standard_normal((ids.shape[0], H)).astype(BF16)
    lora = make_lora(rng, "peft", E, H, I, layout_ranks("peft", r))
    layer = ktmoe.MoEExperts(**weights, isa=isa, transposed_weights=True)
    assert layer.weight_bytes == bf16_weight_bytes(isa, E, H, I) + 3 * E * H * I * 2
    assert_matches_reference(weights, x, ids, w, lora, layer=layer)


# ---------------------------------------------------------------- dtypes and layouts

DTYPES = [  # (base weights, x, LoRA params, topk_weights, topk_ids)
    (BF16, BF16, np.float32, np.float32, np.int32),     # bf16 model, PEFT's fp32 LoRA upcast
    (BF16, BF16, BF16, BF16, np.int64),
    (np.float32, np.float32, np.float32, np.float32, np.int64),
    (BF16, np.float32, BF16, np.float32, np.int32),     # mixed
    (np.float32, BF16, np.float32, BF16, np.int32),
]


@pytest.mark.parametrize("layout", ["per_projection", "peft"])
@pytest.mark.parametrize("dtypes", DTYPES, ids=lambda d: "-".join(np.dtype(t).name for t in d))
def test_dtypes(dtypes, layout, isa):
    wdt, xdt, ldt, rwdt, idt = dtypes
    rng = np.random.default_rng(1)
    E, H, I, T, k = 6, 72, 40, 21, 2
    weights = make_weights(rng, E, H, I, dtype=wdt, fused=layout == "peft")
    ids, w = make_routing(rng, T, k, E, minus_one=0.1, id_dtype=idt, w_dtype=rwdt)
    x = rng.standard_normal((T, H)).astype(xdt)
    lora = make_lora(rng, layout, E, H, I, layout_ranks(layout, 5), dtype=ldt)
    assert_matches_reference(weights, x, ids, w, lora, isa=isa)


@pytest.mark.parametrize("layout,ranks", [
    ("per_projection", {"gate": 3}),
    ("per_projection", {"up": 3}),
    ("per_projection", {"down": 3}),
    ("per_projection", {"gate": 2, "down": 6}),
    ("per_projection", {"gate": 2, "up": 5, "down": 3}),    # r differs per projection
    ("peft", {"gate_up": 3}),
    ("peft", {"down": 3}),
    ("peft", {"gate_up": 2, "down": 7}),
])
def test_some_projections(layout, ranks, isa):
    rng = np.random.default_rng(2)
    E, H, I, T, k = 4, 48, 40, 15, 2
    weights = make_weights(rng, E, H, I, fused=False)
    ids, w = make_routing(rng, T, k, E, minus_one=0.1)
    x = rng.standard_normal((T, H)).astype(BF16)
    lora = make_lora(rng, layout, E, H, I, ranks)
    assert_matches_reference(weights, x, ids, w, lora, isa=isa)


def test_fused_and_split_weights_agree(isa):
    rng = np.random.default_rng(3)
    E, H, I, T, k = 4, 40, 24, 9, 2
    fused = make_weights(rng, E, H, I, fused=True)
    I_ = fused["gate_up"].shape[1] // 2
    split = dict(gate=fused["gate_up"][:, :I_].copy(), up=fused["gate_up"][:, I_:].copy(), down=fused["down"])
    ids, w = make_routing(rng, T, k, E)
    x = rng.standard_normal((T, H)).astype(BF16)
    a = assert_matches_reference(fused, x, ids, w, isa=isa)
    b = assert_matches_reference(split, x, ids, w, isa=isa)
    check("y fused vs split", b.y, a.y, isa)   # same packed weights either way


# ---------------------------------------------------------------- LoRA semantics

@pytest.mark.parametrize("ldtype", [np.float32, BF16])
@pytest.mark.parametrize("layout", ["per_projection", "peft"])
def test_lora_B_zero_is_exactly_no_lora(layout, ldtype, isa):
    """PEFT init (B = 0): y, dx, dw bit-identical to no LoRA, no NaN, dA exactly 0 (design.md 4, 11)."""
    rng = np.random.default_rng(4)
    E, H, I, T, k = 5, 72, 56, 19, 2
    weights = make_weights(rng, E, H, I)
    ids, w = make_routing(rng, T, k, E, minus_one=0.1)
    x = rng.standard_normal((T, H)).astype(BF16)
    dy = rng.standard_normal((T, H)).astype(BF16)
    layer = ktmoe.MoEExperts(**weights, isa=isa)
    lora = make_lora(rng, layout, E, H, I, layout_ranks(layout, 5), dtype=ldtype, zero_B=True)
    base = assert_matches_reference(weights, x, ids, w, None, layer=layer, dy=dy)
    with_lora = assert_matches_reference(weights, x, ids, w, lora, layer=layer, dy=dy)
    for t in ("y", "dx", "dw"):
        got, want = getattr(with_lora, t), getattr(base, t)
        assert np.array_equal(got, want), f"{t}: B = 0 must contribute exactly nothing"
        assert not np.isnan(np.asarray(got, np.float32)).any()
    for name, (gA, gB) in with_lora.ref.grads.items():   # the helper checked the kernel's dA == 0 exactly
        assert not np.any(gA) and np.any(gB)


@pytest.mark.parametrize("ldtype", [np.float32, BF16])
@pytest.mark.parametrize("layout", ["per_projection", "peft"])
def test_lora_grads_accumulate_over_two_backwards(layout, ldtype, isa):
    """Two forward+backward calls into the same buffers add twice the gradient (torch .grad)."""
    rng = np.random.default_rng(5)
    E, H, I, T, k = 4, 40, 24, 13, 2
    weights = make_weights(rng, E, H, I)
    ids, w = make_routing(rng, T, k, E)
    x = rng.standard_normal((T, H)).astype(BF16)
    lora = make_lora(rng, layout, E, H, I, layout_ranks(layout, 3), dtype=ldtype)
    assert_matches_reference(weights, x, ids, w, lora, isa=isa, backward_calls=2)


@pytest.mark.parametrize("start_B_zero", [False, True])
@pytest.mark.parametrize("layout", ["per_projection", "peft"])
def test_optimizer_step_between_forwards(layout, start_B_zero, isa):
    """In-place updates of the LoRA arrays are seen by the next forward (no stale packed copy)."""
    rng = np.random.default_rng(6)
    E, H, I, T, k = 4, 40, 24, 11, 2
    weights = make_weights(rng, E, H, I)
    ids, w = make_routing(rng, T, k, E)
    x = rng.standard_normal((T, H)).astype(BF16)
    lora = make_lora(rng, layout, E, H, I, layout_ranks(layout, 3), zero_B=start_B_zero)
    layer = ktmoe.MoEExperts(**weights, isa=isa)
    first = assert_matches_reference(weights, x, ids, w, lora, layer=layer, seed=1)
    for A, B in lora.params.values():          # "optimizer.step()": in place, same arrays
        A -= 0.3 * rng.standard_normal(A.shape).astype(A.dtype) / np.sqrt(A.shape[-1])
        B += 0.5 * rng.standard_normal(B.shape).astype(B.dtype)
    second = assert_matches_reference(weights, x, ids, w, lora, layer=layer, seed=1)
    assert not np.array_equal(first.y, second.y)


# ---------------------------------------------------------------- one instance, many calls

@pytest.mark.parametrize("layout", ["per_projection", None])
def test_varying_T_on_one_instance(layout, isa):
    """After warm-up: T = max_tokens, then 1, then in between, then max again (design.md 11)."""
    rng = np.random.default_rng(7)
    E, H, I, k, max_tokens = 6, 72, 56, 2, 48
    weights = make_weights(rng, E, H, I)
    layer = ktmoe.MoEExperts(**weights, max_tokens=max_tokens, isa=isa)
    lora = make_lora(rng, layout, E, H, I, layout_ranks(layout, 5)) if layout else None
    for i, T in enumerate([8, max_tokens, 1, 23, max_tokens, 2]):
        ids, w = make_routing(rng, T, k, E, minus_one=0.1)
        x = rng.standard_normal((T, H)).astype(BF16)
        assert_matches_reference(weights, x, ids, w, lora, layer=layer, seed=i)


def test_submit_wait_matches_blocking(isa):
    rng = np.random.default_rng(8)
    E, H, I, T, k = 6, 72, 56, 19, 3
    weights = make_weights(rng, E, H, I)
    ids, w = make_routing(rng, T, k, E, minus_one=0.1)
    x = rng.standard_normal((T, H)).astype(BF16)
    lora = make_lora(rng, "peft", E, H, I, PEFT)
    layer = ktmoe.MoEExperts(**weights, isa=isa)
    blocking = assert_matches_reference(weights, x, ids, w, lora, layer=layer, seed=3)
    submitted = assert_matches_reference(weights, x, ids, w, lora, layer=layer, seed=3, submit=True)
    submitted_out = assert_matches_reference(weights, x, ids, w, lora, layer=layer, seed=3, submit=True,
                                             use_out=True)
    for t in ("y", "dx", "dw"):
        check(f"{t} submit vs blocking", getattr(submitted, t), getattr(blocking, t), isa)
        check(f"{t} submit(out) vs blocking", getattr(submitted_out, t), getattr(blocking, t), isa)


@pytest.mark.parametrize("dtype", [BF16, np.float32])
def test_out_buffers(dtype, isa):
    """out / dx_out / dw_out are filled and returned (they start as NaN: every element written)."""
    rng = np.random.default_rng(9)
    E, H, I, T, k = 4, 40, 24, 10, 2
    weights = make_weights(rng, E, H, I)
    ids, w = make_routing(rng, T, k, E, minus_one=0.2, w_dtype=dtype)
    ids[3] = -1
    x = rng.standard_normal((T, H)).astype(dtype)
    lora = make_lora(rng, "per_projection", E, H, I, PER)
    assert_matches_reference(weights, x, ids, w, lora, isa=isa, use_out=True)


def test_two_layers_keep_their_own_saved_state(isa):
    """forward A, forward B, backward A, backward B: no shared live scratch (design.md 11)."""
    rng = np.random.default_rng(10)
    H, T, k = 40, 12, 2
    problems = []
    for E, I, layout in ((4, 24, "per_projection"), (6, 56, "peft")):
        weights = make_weights(rng, E, H, I)
        ids, w = make_routing(rng, T, k, E, minus_one=0.1)
        x = rng.standard_normal((T, H)).astype(BF16)
        dy = rng.standard_normal((T, H)).astype(BF16)
        lora = make_lora(rng, layout, E, H, I, layout_ranks(layout, 3))
        grads = {n: (np.zeros_like(A), np.zeros_like(B)) for n, (A, B) in lora.params.items()}
        layer = ktmoe.MoEExperts(**weights, isa=isa)
        Wg, Wu, Wd = (weights["gate_up"][:, :I], weights["gate_up"][:, I:], weights["down"])
        y_ref, cache = reference.moe_forward(x, ids, w, Wg, Wu, Wd, lora)
        problems.append(dict(layer=layer, x=x, ids=ids, w=w, dy=dy, lora=lora, grads=grads,
                             ref=(y_ref,) + reference.moe_backward(dy, cache)))
    ys = [p["layer"].forward(p["x"], p["ids"], p["w"], lora=ktmoe_lora(p["lora"]), keep_for_backward=True)
          for p in problems]
    for p, y in zip(problems, ys):
        dx, dw = p["layer"].backward(p["dy"], lora_grads=ktmoe_grads(p["lora"], p["grads"]))
        check_outputs(isa, p["ref"], y, dx, dw, p["grads"])


def test_caller_buffers_reused_between_forward_and_backward(isa):
    """Zeroing the grads and overwriting y's buffer after forward must not change backward (design.md 11)."""
    rng = np.random.default_rng(11)
    E, H, I, T, k = 4, 40, 24, 14, 2
    weights = make_weights(rng, E, H, I)
    ids, w = make_routing(rng, T, k, E)
    x = rng.standard_normal((T, H)).astype(BF16)
    dy = rng.standard_normal((T, H)).astype(BF16)
    lora = make_lora(rng, "peft", E, H, I, PEFT)
    grads = {n: (np.full(A.shape, 7.0, A.dtype), np.full(B.shape, 7.0, B.dtype)) for n, (A, B) in lora.params.items()}
    Wg, Wu, Wd = weights["gate_up"][:, :I], weights["gate_up"][:, I:], weights["down"]
    y_ref, cache = reference.moe_forward(x, ids, w, Wg, Wu, Wd, lora)
    ref = (y_ref, *reference.moe_backward(dy, cache))

    layer = ktmoe.MoEExperts(**weights, isa=isa)
    out = np.empty((T, H), BF16)
    y = layer.forward(x, ids, w, lora=ktmoe_lora(lora), keep_for_backward=True, out=out)
    check_outputs(isa, ref, y)
    out[...] = np.nan                          # the caller reuses y's memory
    for gA, gB in grads.values():              # optimizer.zero_grad()
        gA[...] = 0
        gB[...] = 0
    dx, dw = layer.backward(dy, lora_grads=ktmoe_grads(lora, grads))
    check_outputs(isa, ref, dx=dx, dw=dw, grads=grads)


# ---------------------------------------------------------------- numerics

@pytest.mark.parametrize("dtype", [BF16, np.float32])
def test_silu_over_minus_100_to_100(dtype, isa):
    """G spans [-100, 100] (exp(100) overflows fp32): no NaN/Inf, matches the reference (design.md 11)."""
    rng = np.random.default_rng(12)
    E, H, I, T, k = 3, 32, 48, 24, 2
    weights = make_weights(rng, E, H, I, dtype=np.float64, fused=True)
    gu = weights["gate_up"]
    gu[:, :I, 0] = np.linspace(-100, 100, I)   # G[t, i] ~ x[t, 0] * linspace(-100, 100)
    gu[:, :I, 1:] *= 0.01
    weights = {n: a.astype(dtype) for n, a in weights.items()}
    x = (0.01 * rng.standard_normal((T, H))).astype(dtype)
    x[:, 0] = np.linspace(-1, 1, T).astype(dtype)
    ids, w = make_routing(rng, T, k, E)
    lora = make_lora(rng, "per_projection", E, H, I, PER, dtype=np.float32)
    # the case itself: the reference's G really reaches both ends of [-100, 100]
    _, cache = reference.moe_forward(x, ids, w, weights["gate_up"][:, :I], weights["gate_up"][:, I:],
                                     weights["down"], lora)
    G = np.concatenate([c["G"] for c in cache["experts"].values()])
    assert G.min() < -90 and G.max() > 90
    r = assert_matches_reference(weights, x, ids, w, lora, isa=isa)
    for t in (r.y, r.dx, r.dw, *[g for pair in r.grads.values() for g in pair]):
        assert np.isfinite(np.asarray(t, np.float32)).all()


@pytest.mark.parametrize("num_threads", [1, 2])
def test_num_threads(num_threads, isa):
    rng = np.random.default_rng(13)
    E, H, I, T, k = 8, 128, 96, 48, 2
    weights = make_weights(rng, E, H, I)
    ids, w = make_routing(rng, T, k, E, minus_one=0.05)
    x = rng.standard_normal((T, H)).astype(BF16)
    lora = make_lora(rng, "peft", E, H, I, PEFT)
    layer = ktmoe.MoEExperts(**weights, num_threads=num_threads, isa=isa)
    assert layer.num_threads == num_threads
    assert_matches_reference(weights, x, ids, w, lora, layer=layer)


@pytest.mark.parametrize("T", [3, 40])
def test_one_A_array_for_gate_and_up(T, isa):
    """Per-projection LoRA whose gate and up A are the same array (as PEFT's gate_up A is) but
    whose gradients go to separate buffers: the kernel computes X A^T once and the dx product
    once (design.md 4), yet each buffer still gets its own projection's dA."""
    rng = np.random.default_rng(7)
    E, H, I, r = 5, 72, 56, 4
    weights = make_weights(rng, E, H, I)
    ids, w = make_routing(rng, T, 2, E, minus_one=0.1)
    x = rng.standard_normal((T, H)).astype(BF16)
    lora = make_lora(rng, "per_projection", E, H, I, {"gate": r, "up": r, "down": r})
    A = lora.params["gate"][0]
    lora.params["up"] = (A, lora.params["up"][1])      # one array: the kernel sees the same view
    assert lora.params["gate"][0] is lora.params["up"][0]
    shared = assert_matches_reference(weights, x, ids, w, lora, isa=isa)
    # the same values in two arrays take the general path: every result agrees closely
    lora.params["up"] = (A.copy(), lora.params["up"][1])
    apart = assert_matches_reference(weights, x, ids, w, lora, isa=isa)
    for name in ("y", "dx", "dw"):
        a, b = to64(getattr(shared, name)), to64(getattr(apart, name))
        assert np.linalg.norm(a - b) <= 1e-3 * np.linalg.norm(b), name   # rounding order only
