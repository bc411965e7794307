"""Bad input: a clear exception naming the argument, raised before any kernel runs (design.md 7).

Each case checks the exception type, that the argument's name is in the message, that every
caller array (weights, x, ids, weights, LoRA, gradient and out buffers) is bit-for-bit
unchanged, and that a valid call on the same layer afterwards still matches the reference.
Also: NaN/Inf propagate and never crash.
"""
import re
from types import SimpleNamespace

import numpy as np
import pytest

import ktmoe
from ktmoe.testing import BF16, assert_matches_reference, check, ktmoe_grads, ktmoe_lora, make_lora, make_routing, make_weights
from ktmoe import reference

E, H, I, T, k, R, MAX_T = 4, 40, 24, 6, 2, 3, 8
BAD = (TypeError, ValueError)


def names_argument(msg, names):
    return any(re.search(rf"(?<![A-Za-z0-9_]){re.escape(n)}(?![A-Za-z0-9_])", msg) for n in names)


@pytest.fixture
def s(isa):
    """A valid problem; s.fwd(**overrides) / s.bwd(**overrides) call the layer with one thing changed."""
    rng = np.random.default_rng(0)
    ns = SimpleNamespace(rng=rng, isa=isa)
    ns.weights = make_weights(rng, E, H, I)
    ns.layer = ktmoe.MoEExperts(**ns.weights, max_tokens=MAX_T, isa=isa)
    ns.x = rng.standard_normal((T, H)).astype(BF16)
    ns.ids, ns.w = make_routing(rng, T, k, E)
    ns.dy = rng.standard_normal((T, H)).astype(BF16)
    ns.lora = make_lora(rng, "per_projection", E, H, I, {"gate": R, "up": R, "down": R})
    ns.grads = {n: (np.full(A.shape, 0.5, A.dtype), np.full(B.shape, 0.5, B.dtype))
                for n, (A, B) in ns.lora.params.items()}
    ns.out = np.full((T, H), 3.0, BF16)
    ns.dx_out = np.full((T, H), 3.0, BF16)
    ns.dw_out = np.full((T, k), 3.0, np.float32)

    def fwd(**o):
        lora = o.pop("lora", ktmoe_lora(ns.lora))
        args = dict(x=ns.x, topk_ids=ns.ids, topk_weights=ns.w, out=ns.out)
        args.update(o)
        return ns.layer.forward(args.pop("x"), args.pop("topk_ids"), args.pop("topk_weights"),
                                lora=lora() if callable(lora) else lora, keep_for_backward=True, **args)

    def bwd(**o):
        grads = o.pop("lora_grads", ktmoe_grads(ns.lora, ns.grads))
        args = dict(dy=ns.dy, dx_out=ns.dx_out, dw_out=ns.dw_out)
        args.update(o)
        return ns.layer.backward(args.pop("dy"), lora_grads=grads() if callable(grads) else grads, **args)

    ns.fwd, ns.bwd = fwd, bwd
    return ns


def caller_arrays(s):
    arrays = [s.x, s.ids, s.w, s.dy, s.out, s.dx_out, s.dw_out, *s.weights.values()]
    for n in s.lora.params:
        arrays += [*s.lora.params[n], *s.grads[n]]
    return arrays


def still_matches_reference(s):
    rng = np.random.default_rng(1)
    lora = make_lora(rng, "per_projection", E, H, I, {"gate": R, "up": R, "down": R})
    assert_matches_reference(s.weights, s.x, s.ids, s.w, lora, layer=s.layer)


def expect_rejected(s, call, names, exc=BAD):
    before = [a.copy() for a in caller_arrays(s)]
    with pytest.raises(exc) as info:
        call()
    if names:
        assert names_argument(str(info.value), names), f"message {str(info.value)!r} does not name {names}"
    for a, b in zip(caller_arrays(s), before):
        assert a.shape == b.shape and a.tobytes() == b.tobytes(), "a caller buffer was modified"
    still_matches_reference(s)


def noncontig(a):
    """Same values, not C-contiguous (every column strided by 2)."""
    wide = np.zeros(a.shape[:-1] + (2 * a.shape[-1],), a.dtype)
    wide[..., ::2] = a
    v = wide[..., ::2]
    assert not v.flags.c_contiguous
    return v


def lora_with(s, **params):
    """ktmoe.LoRA factory with some projections replaced (built inside pytest.raises)."""
    merged = {**s.lora.params, **params}
    return lambda: ktmoe.LoRA(**merged, scale=s.lora.scale)


def peft_with(s, gate_up, down):
    return lambda: ktmoe.LoRA.peft(gate_up=gate_up, down=down, scale=2.0)


def f32(*shape):
    return np.zeros(shape, np.float32)


# -------------------------------------------------------------- forward arguments
# (case id, call(s), accepted argument names)
FORWARD = [
    ("x_float64", lambda s: s.fwd(x=s.x.astype(np.float64)), ["x"]),
    ("x_float16", lambda s: s.fwd(x=s.x.astype(np.float16)), ["x"]),
    ("x_int32", lambda s: s.fwd(x=s.x.astype(np.int32)), ["x"]),
    ("x_1d", lambda s: s.fwd(x=s.x[0].copy()), ["x"]),
    ("x_3d", lambda s: s.fwd(x=s.x[None].copy()), ["x"]),
    ("x_hidden_mismatch", lambda s: s.fwd(x=np.zeros((T, H + 1), BF16)), ["x"]),
    ("x_noncontiguous", lambda s: s.fwd(x=noncontig(s.x)), ["x"]),
    ("x_fortran_order", lambda s: s.fwd(x=np.asfortranarray(s.x)), ["x"]),
    ("T_above_max_tokens", lambda s: s.fwd(x=np.zeros((MAX_T + 1, H), BF16),
                                           topk_ids=np.zeros((MAX_T + 1, k), np.int32),
                                           topk_weights=np.zeros((MAX_T + 1, k), np.float32),
                                           out=None), ["x", "max_tokens"]),
    ("ids_float32", lambda s: s.fwd(topk_ids=s.ids.astype(np.float32)), ["topk_ids"]),
    ("ids_int16", lambda s: s.fwd(topk_ids=s.ids.astype(np.int16)), ["topk_ids"]),
    ("ids_uint32", lambda s: s.fwd(topk_ids=s.ids.astype(np.uint32)), ["topk_ids"]),
    ("ids_1d", lambda s: s.fwd(topk_ids=s.ids[:, 0].copy()), ["topk_ids"]),
    ("ids_T_mismatch", lambda s: s.fwd(topk_ids=s.ids[:-1].copy()), ["topk_ids", "x"]),
    ("ids_noncontiguous", lambda s: s.fwd(topk_ids=noncontig(s.ids)), ["topk_ids"]),
    ("ids_equal_E", lambda s: s.fwd(topk_ids=np.where(np.arange(k) == 1, E, s.ids).astype(np.int32)), ["topk_ids"]),
    ("ids_minus_2", lambda s: s.fwd(topk_ids=np.where(np.arange(k) == 0, -2, s.ids).astype(np.int32)), ["topk_ids"]),
    # int64 ids that a silent cast to int32 would turn into valid ones (2**33 -> 0, -2**33 -> 0)
    ("ids_int64_2pow33", lambda s: s.fwd(topk_ids=s.ids.astype(np.int64) + 2**33), ["topk_ids"]),
    ("ids_int64_minus_2pow33", lambda s: s.fwd(topk_ids=s.ids.astype(np.int64) - 2**33), ["topk_ids"]),
    ("weights_float64", lambda s: s.fwd(topk_weights=s.w.astype(np.float64)), ["topk_weights"]),
    ("weights_int32", lambda s: s.fwd(topk_weights=s.w.astype(np.int32)), ["topk_weights"]),
    ("weights_k_mismatch", lambda s: s.fwd(topk_weights=f32(T, k + 1)), ["topk_weights", "topk_ids"]),
    ("weights_T_mismatch", lambda s: s.fwd(topk_weights=f32(T - 1, k)), ["topk_weights", "topk_ids", "x"]),
    ("weights_1d", lambda s: s.fwd(topk_weights=f32(T)), ["topk_weights"]),
    ("weights_noncontiguous", lambda s: s.fwd(topk_weights=noncontig(s.w)), ["topk_weights"]),
    ("out_shape", lambda s: s.fwd(out=np.zeros((T, H + 1), BF16)), ["out"]),
    ("out_T", lambda s: s.fwd(out=np.zeros((T + 1, H), BF16)), ["out"]),
    ("out_dtype", lambda s: s.fwd(out=np.zeros((T, H), np.float32)), ["out"]),
    ("out_noncontiguous", lambda s: s.fwd(out=noncontig(np.zeros((T, H), BF16))), ["out"]),
    ("lora_not_a_LoRA", lambda s: s.fwd(lora={"gate": s.lora.params["gate"]}), ["lora"]),
    # per-projection LoRA shapes
    ("lora_E_mismatch", lambda s: s.fwd(lora=lora_with(s, gate=(f32(E + 1, R, H), f32(E + 1, I, R)))),
     ["lora", "gate"]),
    ("lora_r_mismatch", lambda s: s.fwd(lora=lora_with(s, up=(f32(E, R, H), f32(E, I, R + 1)))), ["lora", "up"]),
    ("lora_A_in_mismatch", lambda s: s.fwd(lora=lora_with(s, gate=(f32(E, R, H + 1), f32(E, I, R)))),
     ["lora", "gate"]),
    ("lora_B_out_mismatch", lambda s: s.fwd(lora=lora_with(s, up=(f32(E, R, H), f32(E, I + 1, R)))), ["lora", "up"]),
    ("lora_down_in_is_I", lambda s: s.fwd(lora=lora_with(s, down=(f32(E, R, H), f32(E, H, R)))), ["lora", "down"]),
    ("lora_down_out_is_H", lambda s: s.fwd(lora=lora_with(s, down=(f32(E, R, I), f32(E, I, R)))),
     ["lora", "down"]),
    ("lora_A_2d", lambda s: s.fwd(lora=lora_with(s, gate=(f32(E * R, H), f32(E, I, R)))), ["lora", "gate"]),
    ("lora_float64", lambda s: s.fwd(lora=lora_with(s, gate=(np.zeros((E, R, H)), np.zeros((E, I, R))))),
     ["lora", "gate"]),
    ("lora_A_noncontiguous", lambda s: s.fwd(lora=lora_with(s, gate=(noncontig(s.lora.params["gate"][0]),
                                                                     s.lora.params["gate"][1]))), ["lora", "gate"]),
    # PEFT layout shapes
    ("peft_rows_not_multiple_of_E", lambda s: s.fwd(lora=peft_with(s, (f32(E * R + 1, H), f32(2 * I, E * R + 1)),
                                                                   None)), ["lora", "gate_up"]),
    ("peft_rank_mismatch", lambda s: s.fwd(lora=peft_with(s, (f32(E * R, H), f32(2 * I, E * (R + 1))), None)),
     ["lora", "gate_up"]),
    ("peft_B_rows_not_2I", lambda s: s.fwd(lora=peft_with(s, (f32(E * R, H), f32(2 * I + 2, E * R)), None)),
     ["lora", "gate_up"]),
    ("peft_A_in_mismatch", lambda s: s.fwd(lora=peft_with(s, (f32(E * R, H + 1), f32(2 * I, E * R)), None)),
     ["lora", "gate_up"]),
    ("peft_down_in_is_I", lambda s: s.fwd(lora=peft_with(s, None, (f32(E * R, H), f32(H, E * R)))),
     ["lora", "down"]),
    ("peft_E_mismatch", lambda s: s.fwd(lora=peft_with(s, (f32((E + 1) * R, H), f32(2 * I, (E + 1) * R)), None)),
     ["lora", "gate_up"]),
]


@pytest.mark.parametrize("case,call,names", FORWARD, ids=[c[0] for c in FORWARD])
def test_forward_rejects(case, call, names, s):
    expect_rejected(s, lambda: call(s), names)


# -------------------------------------------------------------- backward arguments

def _bf16(a):
    return a.astype(BF16)


BACKWARD = [
    ("dy_dtype", lambda s: s.bwd(dy=s.dy.astype(np.float32)), ["dy"]),
    ("dy_T", lambda s: s.bwd(dy=np.zeros((T - 1, H), BF16)), ["dy"]),
    ("dy_hidden", lambda s: s.bwd(dy=np.zeros((T, H + 1), BF16)), ["dy"]),
    ("dy_noncontiguous", lambda s: s.bwd(dy=noncontig(s.dy)), ["dy"]),
    ("dx_out_shape", lambda s: s.bwd(dx_out=np.zeros((T, H + 1), BF16)), ["dx_out"]),
    ("dx_out_dtype", lambda s: s.bwd(dx_out=np.zeros((T, H), np.float32)), ["dx_out"]),
    ("dw_out_shape", lambda s: s.bwd(dw_out=f32(T, k + 1)), ["dw_out"]),
    ("dw_out_dtype", lambda s: s.bwd(dw_out=np.zeros((T, k), BF16)), ["dw_out"]),
    ("grads_peft_for_per_projection", lambda s: s.bwd(lora_grads=lambda: ktmoe.LoRAGrads.peft(
        gate_up=(f32(E * R, H), f32(2 * I, E * R)), down=(f32(E * R, I), f32(H, E * R)))), ["lora_grads"]),
    ("grads_rank_mismatch", lambda s: s.bwd(lora_grads=lambda: ktmoe.LoRAGrads(
        **{**s.grads, "gate": (f32(E, R + 1, H), f32(E, I, R + 1))})), ["lora_grads"]),
    ("grads_dtype", lambda s: s.bwd(lora_grads=lambda: ktmoe.LoRAGrads(
        **{n: (_bf16(a), _bf16(b)) for n, (a, b) in s.grads.items()})), ["lora_grads"]),
    ("grads_missing_projection", lambda s: s.bwd(lora_grads=lambda: ktmoe.LoRAGrads(
        gate=s.grads["gate"], up=s.grads["up"])), ["lora_grads"]),
    ("grads_noncontiguous", lambda s: s.bwd(lora_grads=lambda: ktmoe.LoRAGrads(
        **{**s.grads, "up": (noncontig(s.grads["up"][0]), s.grads["up"][1])})), ["lora_grads", "up"]),
    ("grads_not_a_LoRA", lambda s: s.bwd(lora_grads=s.grads), ["lora_grads"]),
    ("grads_given_as_LoRA", lambda s: s.bwd(lora_grads=lambda: ktmoe.LoRA(**s.grads, scale=2.0)), ["lora_grads", "LoRAGrads"]),
]


@pytest.mark.parametrize("case,call,names", BACKWARD, ids=[c[0] for c in BACKWARD])
def test_backward_rejects(case, call, names, s):
    s.fwd()
    expect_rejected(s, lambda: call(s), names)


def test_grads_given_after_forward_without_lora(s):
    s.fwd(lora=None)
    expect_rejected(s, lambda: s.bwd(), ["lora_grads"])


def test_backward_without_keep_for_backward(s):
    s.layer.forward(s.x, s.ids, s.w, lora=ktmoe_lora(s.lora), keep_for_backward=False)
    expect_rejected(s, lambda: s.bwd(), None, RuntimeError)


def test_backward_before_any_forward(s):
    expect_rejected(s, lambda: s.bwd(), None, RuntimeError)


def test_backward_twice_after_one_forward(s):
    """Saved state is released after backward."""
    s.fwd()
    s.bwd()
    expect_rejected(s, lambda: s.bwd(), None, RuntimeError)


# -------------------------------------------------------------- constructor arguments

CONSTRUCTOR = [
    ("gate_up_float64", lambda w: dict(gate_up=w["gate_up"].astype(np.float64), down=w["down"]), ["gate_up"]),
    ("down_float16", lambda w: dict(gate_up=w["gate_up"], down=w["down"].astype(np.float16)), ["down"]),
    ("gate_up_odd_rows", lambda w: dict(gate_up=w["gate_up"][:, :-1].copy(), down=w["down"]), ["gate_up"]),
    ("down_I_mismatch", lambda w: dict(gate_up=w["gate_up"], down=np.zeros((E, H, I + 1), BF16)),
     ["down", "gate_up"]),
    ("down_H_mismatch", lambda w: dict(gate_up=w["gate_up"], down=np.zeros((E, H + 1, I), BF16)),
     ["down", "gate_up"]),
    ("down_E_mismatch", lambda w: dict(gate_up=w["gate_up"], down=np.zeros((E + 1, H, I), BF16)),
     ["down", "gate_up"]),
    ("gate_up_2d", lambda w: dict(gate_up=w["gate_up"][0].copy(), down=w["down"]), ["gate_up"]),
    ("gate_up_noncontiguous", lambda w: dict(gate_up=noncontig(w["gate_up"]), down=w["down"]), ["gate_up"]),
    ("gate_up_and_gate", lambda w: dict(gate_up=w["gate_up"], gate=w["gate_up"][:, :I].copy(), down=w["down"]),
     ["gate_up", "gate"]),
    ("gate_without_up", lambda w: dict(gate=w["gate_up"][:, :I].copy(), down=w["down"]), ["up"]),
    ("gate_up_shape_differs", lambda w: dict(gate=w["gate_up"][:, :I].copy(), up=w["gate_up"][:, :I - 1].copy(),
                                             down=w["down"]), ["up", "gate"]),
    ("no_down", lambda w: dict(gate_up=w["gate_up"]), ["down"]),
    ("isa_unknown", lambda w: dict(**w, isa="sse2"), ["isa"]),
    ("max_tokens_zero", lambda w: dict(**w, max_tokens=0), ["max_tokens"]),
    ("num_threads_zero", lambda w: dict(**w, num_threads=0), ["num_threads"]),
]


@pytest.mark.parametrize("case,kwargs,names", CONSTRUCTOR, ids=[c[0] for c in CONSTRUCTOR])
def test_constructor_rejects(case, kwargs, names, s):
    w = s.weights
    expect_rejected(s, lambda: ktmoe.MoEExperts(**kwargs(w)), names)


@pytest.mark.parametrize("missing", ["amx", "avx512"])
def test_isa_this_cpu_lacks(missing, s, monkeypatch):
    """A path the CPU cannot run is refused, never replaced by another. The CPU probe is
    replaced by one of a CPU with neither AMX nor AVX-512, so this runs on every machine."""
    import ktmoe._cpu as cpu
    why = {"amx": "the CPU has no AMX-BF16 tiles", "avx512": "the CPU or OS lacks AVX-512 F/BW/VL/DQ"}
    monkeypatch.setattr(cpu, "_probe", lambda: (("portable",), why, {}))
    expect_rejected(s, lambda: ktmoe.MoEExperts(**s.weights, isa=missing), ["isa"], ValueError)
    monkeypatch.setenv("KTMOE_ISA", missing)
    expect_rejected(s, lambda: ktmoe.MoEExperts(**s.weights), ["isa"], ValueError)
    monkeypatch.delenv("KTMOE_ISA")
    assert ktmoe.MoEExperts(**s.weights).isa == "portable"


# -------------------------------------------------------------- NaN / Inf: propagate, never crash

@pytest.mark.parametrize("bad_value", [np.nan, np.inf])
def test_nan_inf_in_x_propagate(bad_value, isa):
    rng = np.random.default_rng(3)
    T_ = 12
    weights = make_weights(rng, E, H, I)
    ids, w = make_routing(rng, T_, k, E)
    x = rng.standard_normal((T_, H)).astype(BF16)
    x[4, 7] = bad_value
    dy = rng.standard_normal((T_, H)).astype(BF16)
    layer = ktmoe.MoEExperts(**weights, isa=isa)
    y = layer.forward(x, ids, w, keep_for_backward=True)
    dx, dw = layer.backward(dy)
    Wg, Wu, Wd = weights["gate_up"][:, :I], weights["gate_up"][:, I:], weights["down"]
    with np.errstate(invalid="ignore", over="ignore"):
        y_ref, cache = reference.moe_forward(x, ids, w, Wg, Wu, Wd)
        dx_ref, dw_ref, _ = reference.moe_backward(dy, cache)
    y, dx, dw = (np.asarray(a, np.float64) for a in (y, dx, dw))
    assert not np.isfinite(y[4]).any(), "token 4's output must be non-finite"
    assert not np.isfinite(dw[4]).all()
    good = np.arange(T_) != 4                  # other tokens are unaffected
    check("y", y[good], y_ref[good], isa)
    check("dx", dx[good], dx_ref[good], isa)
    check("dw", dw[good], dw_ref[good], isa)


def test_nan_in_lora_and_dy_does_not_crash(isa):
    rng = np.random.default_rng(4)
    weights = make_weights(rng, E, H, I)
    ids, w = make_routing(rng, T, k, E)
    ids[:, 0] = 0                                  # every token through expert 0
    ids[:, 1] = rng.integers(1, E, T)
    x = rng.standard_normal((T, H)).astype(BF16)
    lora = make_lora(rng, "peft", E, H, I, {"gate_up": R, "down": R})
    lora.params["gate_up"][1][0, 0] = np.nan       # expert 0's B (column 0 is expert 0, rank 0)
    dy = rng.standard_normal((T, H)).astype(BF16)
    dy[1, 2] = np.inf
    grads = {n: (np.zeros_like(A), np.zeros_like(B)) for n, (A, B) in lora.params.items()}
    layer = ktmoe.MoEExperts(**weights, isa=isa)
    y = layer.forward(x, ids, w, lora=ktmoe_lora(lora), keep_for_backward=True)
    dx, dw = layer.backward(dy, lora_grads=ktmoe_grads(lora, grads))
    assert np.isnan(np.asarray(y, np.float32)).any()
    assert not np.isfinite(np.asarray(dx, np.float32)).all()
