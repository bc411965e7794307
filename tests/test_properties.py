"""Property tests: random problems, kernel vs reference on every ISA path (design.md 2-6, 11).

Hypothesis draws E, H, I, r, T, k (odd sizes and tails, k = 1 and r = 1 included; H, I >= 16
and >= 16 live slots, see MIN_HI / MIN_LIVE),
the routing (distinct experts per token as a top-k router gives, -1 slots, a token routed
nowhere, one hot expert taking a slot of every token), the dtypes (fp32 / bf16 x, weights
and routing weights, int32 / int64 ids, fp32 / bf16 LoRA), the LoRA layout and projections,
the weight format (bf16, int8, int4 with a group size dividing H and I) and the activation
mode (bf16, int8 = W8A8). Each example goes through ktmoe.testing.assert_matches_reference (the
one harness: y, dx, dw, every LoRA gradient at relative error <= 1e-2 and cosine >= 0.9999,
design.md 6) on every path of ktmoe.available_isas().

Pre-quantized weights (MoEExperts.from_quantized: fp8 with a drawn block, int4 codes over all
of [-8, 7] in either packing, fp32 / bf16 scales) get their own test with 2/5 as many examples.

Deterministic (derandomize=True, no example database) and bounded for CI: KTMOE_PROPERTY_EXAMPLES
examples per test (default 25 for the bf16 and quantized tests, 10 for the pre-quantized one). Run more with e.g.
`KTMOE_PROPERTY_EXAMPLES=250 pytest tests/test_properties.py`.
A token listing the same expert twice is not refused by ktmoe.MoEExperts (it is summed like
two slots, as the reference does): test_duplicate_experts_in_a_token checks that it matches.
"""
import os

import numpy as np
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import ktmoe
from ktmoe.testing import BF16, assert_matches_reference, make_lora, make_prequantized, make_routing, make_weights

EXAMPLES = int(os.environ.get("KTMOE_PROPERTY_EXAMPLES", "25"))
PREQUANTIZED_EXAMPLES = max(1, EXAMPLES * 2 // 5)   # fp8 / published int4: 10 by default
SETTINGS = settings(max_examples=EXAMPLES, derandomize=True, database=None, deadline=None,
                    suppress_health_check=list(HealthCheck), print_blob=True)
DT = {"bf16": BF16, "fp32": np.float32}
# H, I below this give tensors with a handful of independent terms, where the kernel's bf16
# intermediates (kept G / U, bf16 GEMM inputs) are not averaged out and the per-tensor 1e-2 of
# design.md 6 does not hold (e.g. I = 2 or 3: y, dB errors of 1.8-2.5 %; see docs/testing.md)
MIN_HI = 16
# Likewise at least this many live (token, slot) pairs: dw of T = 1 is one dot product
# <dy, D> whose cancellation can blow its relative error up (8.9 % measured at T = 1,
# H = 146), and T = 1, r = 1 LoRA gradients are rank one with a single shared factor
# (dA_gate 2.7 % at H = I = 32). T = 1 / k = 1 / r = 1 stay in the fixed-seed grid of
# test_kernel_vs_reference.py and in test_guard_pages.py; here k = 1 and r = 1 are drawn.
MIN_LIVE = 16


def sizes(draw, group):
    """(H, I): free sizes biased to odd values and tails, or multiples of the int4 group."""
    if group:
        return group * draw(st.integers(1, 256 // group)), group * draw(st.integers(1, 192 // group))
    odd_or_any = st.one_of(st.integers(MIN_HI, 160).map(lambda n: n | 1), st.integers(MIN_HI, 160),
                           st.sampled_from([MIN_HI, 32, 64, 96, 128]))
    return draw(odd_or_any), draw(odd_or_any)


@st.composite
def problems(draw, quantized):
    block = None
    if quantized == "prequantized":   # MoEExperts.from_quantized: fp8 blocks, or int4 codes over [-8, 7]
        fmt = draw(st.sampled_from(["fp8", "int4", "int4bs"]))
        group = draw(st.sampled_from([32, 64, 128]))
        activations = draw(st.sampled_from(["bf16", "int8"])) if fmt == "int4" else "bf16"
        block = (draw(st.sampled_from([1, 7, 32, 128])), group) if fmt == "fp8" else None
    elif quantized:
        fmt = draw(st.sampled_from(["int8", "int4", "int4bs"]))
        group = draw(st.sampled_from([32, 64, 128])) if fmt in ("int4", "int4bs") else None
        activations = draw(st.sampled_from(["bf16", "int8"])) if fmt != "int4bs" else "bf16"
    else:
        fmt, group, activations = "bf16", None, "bf16"
    H, I = sizes(draw, group)
    E = draw(st.integers(1, 8))
    k = draw(st.integers(1, min(E, 4)))
    T = draw(st.one_of(st.integers(MIN_LIVE, 48), st.integers(100, 300)))
    r = draw(st.one_of(st.just(1), st.integers(1, 9)))
    return dict(
        fmt=fmt, group=group, activations=activations, block=block, E=E, H=H, I=I, k=k, T=T, r=r,
        prequantized=quantized == "prequantized",
        packing=draw(st.sampled_from(["nibbles", "pack-quantized"])) if quantized == "prequantized" else None,
        minus_one=draw(st.sampled_from([0.0, 0.0, 0.1, 0.25])),
        dead_token=draw(st.booleans()),
        hot=draw(st.booleans()) and E > k,
        layout=draw(st.sampled_from(["per_projection", "peft", None])),
        projections=draw(st.sampled_from(["all", "some"])),
        fused=draw(st.booleans()),
        wdt=draw(st.sampled_from(["bf16", "fp32"])), xdt=draw(st.sampled_from(["bf16", "fp32"])),
        ldt=draw(st.sampled_from(["bf16", "fp32"])), rwdt=draw(st.sampled_from(["bf16", "fp32"])),
        idt=draw(st.sampled_from([np.int32, np.int64])),
        zero_B=draw(st.integers(0, 9)) == 0,
        seed=draw(st.integers(0, 2**32 - 1)),
    )


def build(p):
    """(layer keyword arguments, x, ids, weights, reference.LoRA or None) of a drawn problem."""
    rng = np.random.default_rng(p["seed"])
    E, H, I, T, k, r = p["E"], p["H"], p["I"], p["T"], p["k"], p["r"]
    fused = p["fused"] or p["layout"] == "peft"
    weights = make_weights(rng, E, H, I, dtype=DT[p["wdt"]], fused=fused)
    if p["hot"]:
        # expert 0 takes slot 0 of every token; the other slots stay distinct experts from 1..E-1
        ids, w = make_routing(rng, T, k - 1, E - 1, id_dtype=p["idt"], w_dtype=DT[p["rwdt"]])
        ids = np.concatenate([np.zeros((T, 1), p["idt"]), ids + 1], axis=1)
        w = np.concatenate([(0.1 + rng.random((T, 1))).astype(w.dtype), w], axis=1)
        if p["minus_one"]:
            ids[rng.random((T, k)) < p["minus_one"]] = -1
    else:
        ids, w = make_routing(rng, T, k, E, minus_one=p["minus_one"], id_dtype=p["idt"],
                              w_dtype=DT[p["rwdt"]])
    if p["dead_token"]:
        ids[rng.integers(T)] = -1
    assume(np.count_nonzero(ids >= 0) >= MIN_LIVE)
    x = rng.standard_normal((T, H)).astype(DT[p["xdt"]])
    lora = None
    if p["layout"] is not None:
        names = ["gate_up", "down"] if p["layout"] == "peft" else ["gate", "up", "down"]
        if p["projections"] == "some":
            keep = rng.random(len(names)) < 0.5
            keep[rng.integers(len(names))] = True
            names = [n for n, kk in zip(names, keep) if kk]
        ranks = {n: (r if p["projections"] == "all" else int(rng.integers(1, r + 1))) for n in names}
        lora = make_lora(rng, p["layout"], E, H, I, ranks, dtype=DT[p["ldt"]], zero_B=p["zero_B"])
    kwargs = dict(weights, weights=p["fmt"], group_size=p["group"], activations=p["activations"])
    if p["prequantized"]:   # the codes and scales of a published checkpoint (ktmoe.testing.make_prequantized)
        kwargs = make_prequantized(rng, p["fmt"], E, H, I, group_size=p["group"], block=p["block"], fused=fused,
                                   scale_dtype=DT[p["wdt"]], packing=p["packing"])
        kwargs["activations"] = p["activations"]
    return kwargs, x, ids, w, lora


def check_all_isas(p):
    kwargs, x, ids, w, lora = build(p)
    for isa in ktmoe.available_isas():
        assert_matches_reference(kwargs, x, ids, w, lora, isa=isa, seed=p["seed"] % 1000)


@SETTINGS
@given(problems(quantized=False))
def test_bf16_weights_match_reference(p):
    check_all_isas(p)


@SETTINGS
@given(problems(quantized=True))
def test_quantized_weights_match_reference(p):
    check_all_isas(p)


@settings(SETTINGS, max_examples=PREQUANTIZED_EXAMPLES)
@given(problems(quantized="prequantized"))
def test_prequantized_weights_match_reference(p):
    check_all_isas(p)


def test_duplicate_experts_in_a_token(isa):
    """Duplicates are accepted (not refused): a token with the same expert in two slots gets
    both contributions, and each slot its own dw, exactly as the reference computes them."""
    rng = np.random.default_rng(5)
    E, H, I, T, k = 4, 40, 24, 11, 3
    weights = make_weights(rng, E, H, I)
    ids, w = make_routing(rng, T, k, E, minus_one=0.1)
    ids[:, 1] = ids[:, 0]              # every token repeats its first expert
    ids[3] = [2, 2, 2]
    x = rng.standard_normal((T, H)).astype(BF16)
    lora = make_lora(rng, "peft", E, H, I, {"gate_up": 3, "down": 3})
    for fmt, group, act in (("bf16", None, "bf16"), ("int8", None, "int8")):
        assert_matches_reference(dict(weights, weights=fmt, group_size=group, activations=act),
                                 x, ids, w, lora, isa=isa)
