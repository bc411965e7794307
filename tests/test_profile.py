"""The per-phase profile (MoEExperts.profile, ktmoe bench --profile): counts, exact GEMM
FLOPs, the time decomposition (busy <= threads x wall, GEMM time inside busy time), reset,
and the printed table."""
import numpy as np
import pytest

import ktmoe
from ktmoe.testing import ktmoe_grads, ktmoe_lora, make_lora, make_routing, make_weights
from ktmoe._profile import format_profile


def _run(isa, T=48, E=6, H=64, I=48, k=2, r=4, calls=2, threads=2):
    rng = np.random.default_rng(0)
    layer = ktmoe.MoEExperts(**make_weights(rng, E, H, I), isa=isa, num_threads=threads)
    lora = make_lora(rng, "peft", E, H, I, {"gate_up": r, "down": r})
    ids, w = make_routing(rng, T, k, E, minus_one=0.1)
    x = rng.standard_normal((T, H)).astype(np.float32)
    grads = {n: tuple(np.zeros_like(a) for a in ab) for n, ab in lora.params.items()}
    layer.forward(x, ids, w, lora=ktmoe_lora(lora), keep_for_backward=True)   # not counted: reset below
    layer.reset_profile()
    for _ in range(calls):
        layer.forward(x, ids, w, lora=ktmoe_lora(lora), keep_for_backward=True)
        layer.backward(x, lora_grads=ktmoe_grads(lora, grads))
    return layer, int((ids >= 0).sum()), (E, H, I, r, calls, threads)


def test_profile_counts_and_flops(isa):
    layer, npos, (E, H, I, r, calls, threads) = _run(isa)
    prof = layer.profile()
    assert prof["threads"] == threads
    assert prof["passes"]["forward"]["calls"] == calls and prof["passes"]["backward"]["calls"] == calls
    ph = {(p["pass"], p["name"]): p for p in prof["phases"]}
    # the base-weight GEMMs do exactly 2 * rows * out * in FLOPs per projection
    assert ph["forward", "gate/up + SiLU"]["base_gemm_flops"] == calls * 2 * npos * 2 * I * H
    assert ph["forward", "down"]["base_gemm_flops"] == calls * 2 * npos * H * I
    assert ph["backward", "dHh + SiLU'"]["base_gemm_flops"] == calls * 2 * npos * H * I
    assert ph["backward", "dx"]["base_gemm_flops"] == calls * 2 * npos * 2 * I * H
    # LoRA products: X A^T against the [hi; lo] rows (2r columns) in the gather, once: PEFT's
    # gate_up A serves gate and up
    assert ph["forward", "gather x + X A^T"]["lora_gemm_flops"] == calls * 2 * npos * 2 * r * H
    for p in prof["phases"]:
        if not p["calls"]:
            assert p["wall_s"] == 0 and p["base_gemm_flops"] == 0
            continue
        assert p["calls"] == calls, p["name"]
        assert p["thread_s"] == pytest.approx(threads * p["wall_s"], rel=1e-9), p["name"]
        # busy time is measured inside the phase's wall time, on at most `threads` threads
        assert 0 <= p["busy_s"] <= p["thread_s"] * (1 + 1e-6) + 1e-6, p["name"]
        assert p["base_gemm_s"] + p["lora_gemm_s"] <= p["busy_s"] * (1 + 1e-6) + 1e-6, p["name"]
    for kind in ("forward", "backward"):
        phases = sum(p["wall_s"] for p in prof["phases"] if p["pass"] == kind)
        assert phases <= prof["passes"][kind]["wall_s"] * (1 + 1e-6)


def test_reset_and_table(isa):
    layer, _, (_, _, _, _, calls, _) = _run(isa, calls=1)
    lines = format_profile(layer.profile(), peak_flops=1e12, title="t")
    assert lines[0] == "t" and "base ms" in lines[1]
    names = [ln.split()[1] for ln in lines[3:]]
    assert "gate/up" in names and "dx" in names and "all" in names
    layer.reset_profile()
    prof = layer.profile()
    assert prof["passes"]["forward"]["calls"] == 0
    assert all(p["calls"] == 0 and p["wall_s"] == 0 for p in prof["phases"])
    assert format_profile(prof)[2:] == []   # nothing ran: header only


def test_profile_while_busy():
    rng = np.random.default_rng(1)
    layer = ktmoe.MoEExperts(**make_weights(rng, 4, 32, 16))
    ids, w = make_routing(rng, 8, 2, 4)
    layer.submit_forward(rng.standard_normal((8, 32)).astype(np.float32), ids, w)
    with pytest.raises(RuntimeError, match="in flight"):
        layer.profile()
    layer.wait()
    assert layer.profile()["passes"]["forward"]["calls"] == 1
