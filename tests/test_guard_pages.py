"""Out-of-bounds guards (design.md 7): no kernel reads or writes outside a caller's array.

Every array the public API touches (base weights at load, x, topk_ids, topk_weights, LoRA
factors, dy, out / dx_out / dw_out and the LoRA gradient buffers) is placed flush against
an inaccessible page: `after` puts the array's last byte right before a PROT_NONE page,
`before` puts its first byte right after one. A read or write one element past either end
faults (SIGSEGV kills the test run, faulthandler names the test). Each call runs
ktmoe.MoEExperts forward (keep_for_backward, LoRA) and backward on every ISA path this CPU
has, for every weight format and activation mode, over edge shapes (odd H, I, r; T = 1;
k = 1; -1 slots), pre-quantized fp8 / int4 / int4bs codes and scales included. The guarded call's results must also equal, bit for bit, the same call
on ordinary numpy arrays (a kernel that read bytes outside the array would differ).
test_guard_page_faults checks that the guard itself works (touching it kills a forked child).
"""
import ctypes
import faulthandler
import os
import signal

import numpy as np
import pytest

import ktmoe
from ktmoe.testing import BF16, guarded, ktmoe_grads, ktmoe_lora, make_lora, make_prequantized, make_routing, make_weights

def test_guard_page_faults():
    """The guard is real: touching the byte after an `after` array (or before a `before`
    one) kills a forked child with SIGSEGV, so the tests below would catch an overrun."""
    for side in ("after", "before"):
        a = guarded(np.arange(7, dtype=np.float32), side)
        assert a.sum() == 21                       # the array itself is readable
        addr = a.__array_interface__["data"][0] + (a.nbytes if side == "after" else -1)
        pid = os.fork()
        if pid == 0:                               # child: no pytest, no ktmoe calls
            faulthandler.disable()
            signal.signal(signal.SIGSEGV, signal.SIG_DFL)
            ctypes.string_at(addr, 1)
            os._exit(0)                            # reached only if the guard is missing
        _, status = os.waitpid(pid, 0)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGSEGV, (side, status)


# (name, E, H, I, r, T, k, minus_one, weight format, group size); int4 groups must divide H and I;
# fp8 / int4-ckpt / int4bs-ckpt: MoEExperts.from_quantized codes and scales (fp8: group size = the column block,
# row block 5), guarded too
CASES = [
    ("odd_17_9_r1_T1_k1", 3, 17, 9, 1, 1, 1, 0.0, "bf16", None),
    ("odd_41_23_r3_minus1", 4, 41, 23, 3, 9, 2, 0.3, "bf16", None),
    ("tails_72_56_r5_k3", 5, 72, 56, 5, 13, 3, 0.2, "bf16", None),
    ("int8_17_9_r1_T1_k1", 3, 17, 9, 1, 1, 1, 0.0, "int8", None),
    ("int8_41_23_r3_minus1", 4, 41, 23, 3, 9, 2, 0.3, "int8", None),
    ("int4g32_96_32_r3_minus1", 4, 96, 32, 3, 7, 2, 0.3, "int4", 32),
    ("int4g64_128_64_r1_T1_k1", 2, 128, 64, 1, 1, 1, 0.0, "int4", 64),
    ("int4g128_128_128_r5_k3", 4, 128, 128, 5, 5, 3, 0.2, "int4", 128),
    ("fp8b32_96_32_r3_minus1", 4, 96, 32, 3, 7, 2, 0.3, "fp8", 32),
    ("fp8b64_128_64_r1_T1_k1", 2, 128, 64, 1, 1, 1, 0.0, "fp8", 64),
    ("int4ckpt_g32_96_32_r3_minus1", 4, 96, 32, 3, 7, 2, 0.3, "int4-ckpt", 32),
    ("int4bsg32_96_32_r3_minus1", 4, 96, 32, 3, 7, 2, 0.3, "int4bs", 32),
    ("int4bsg64_128_64_r1_T1_k1", 2, 128, 64, 1, 1, 1, 0.0, "int4bs", 64),
    ("int4bsckpt_g32_96_32_r3_minus1", 4, 96, 32, 3, 7, 2, 0.3, "int4bs-ckpt", 32),
    ("int4bsckpt_g64_128_64_r1_T1_k1", 2, 128, 64, 1, 1, 1, 0.0, "int4bs-ckpt", 64),
]
WEIGHT_ONLY = ("bf16", "fp8", "int4bs", "int4bs-ckpt")   # no W8A8 mode (formats.py)
PARAMS = [(c, a) for c in CASES for a in (("bf16",) if c[8] in WEIGHT_ONLY else ("bf16", "int8"))]


def _problem(case, seed):
    name, E, H, I, r, T, k, minus_one, fmt, group = case
    rng = np.random.default_rng(seed)
    # alternate layouts and dtypes over the cases so both LoRA layouts and fp32 / bf16 inputs,
    # LoRA factors and routing weights all go through the guards
    odd = seed % 2
    layout = "peft" if odd else "per_projection"
    weights = make_weights(rng, E, H, I, dtype=np.float32 if odd else BF16, fused=bool(odd))
    ids, w = make_routing(rng, T, k, E, minus_one=minus_one, id_dtype=np.int64 if odd else np.int32,
                          w_dtype=BF16 if odd else np.float32)
    xdt = np.float32 if odd else BF16
    x = rng.standard_normal((T, H)).astype(xdt)
    dy = rng.standard_normal((T, H)).astype(xdt)
    ranks = {"gate_up": r, "down": r} if odd else {"gate": r, "up": r, "down": r}
    lora = make_lora(rng, layout, E, H, I, ranks, dtype=BF16 if seed % 4 < 2 else np.float32)
    grads = {n: (np.full(A.shape, 0.25, A.dtype), np.full(B.shape, -0.5, B.dtype))
             for n, (A, B) in lora.params.items()}
    pre = None
    if fmt in ("fp8", "int4-ckpt", "int4bs-ckpt"):
        pre = make_prequantized(rng, fmt.removesuffix("-ckpt"), E, H, I, group_size=group,
                                block=(5, group), fused=bool(odd), scale_dtype=BF16 if odd else np.float32,
                                packing="pack-quantized" if odd else "nibbles")["from_quantized"]
    return dict(weights=weights, ids=ids, w=w, x=x, dy=dy, lora=lora, grads=grads, fmt=fmt, group=group, pre=pre)


def _run(p, isa, activations, place):
    """Load, forward, backward with every array passed through `place` (identity or guarded)."""
    if p["pre"] is not None:
        layer = ktmoe.MoEExperts.from_quantized(
            **{n: tuple(place(a) for a in v) if n in ("gate_up", "gate", "up", "down") else v
               for n, v in p["pre"].items()},
            isa=isa, activations=activations)
    else:
        layer = ktmoe.MoEExperts(**{n: place(a) for n, a in p["weights"].items()}, isa=isa,
                                 weights=p["fmt"], group_size=p["group"], activations=activations)
    lora = ktmoe_lora(p["lora"], {n: (place(A), place(B)) for n, (A, B) in p["lora"].params.items()})
    grads = {n: (place(A), place(B)) for n, (A, B) in p["grads"].items()}
    T, H = p["x"].shape
    out = place(np.full((T, H), np.nan, p["x"].dtype))
    dx_out = place(np.full((T, H), np.nan, p["x"].dtype))
    dw_out = place(np.full(p["ids"].shape, np.nan, p["w"].dtype))
    y = layer.forward(place(p["x"]), place(p["ids"]), place(p["w"]), lora=lora,
                      keep_for_backward=True, out=out)
    dx, dw = layer.backward(place(p["dy"]), lora_grads=ktmoe_grads(p["lora"], grads),
                            dx_out=dx_out, dw_out=dw_out)
    assert y is out and dx is dx_out and dw is dw_out
    return [np.array(a) for a in (y, dx, dw)] + [np.array(g) for pair in grads.values() for g in pair]


@pytest.mark.parametrize("side", ["after", "before"])
@pytest.mark.parametrize("case,activations", PARAMS,
                         ids=[f"{c[0]}-{'w8a8' if a == 'int8' else 'a16'}" for c, a in PARAMS])
def test_guard_pages(case, activations, side, isa, monkeypatch):
    monkeypatch.setenv("KTMOE_NUM_THREADS", "2")
    p = _problem(case, CASES.index(case))
    got = _run(p, isa, activations, lambda a: guarded(a, side))
    want = _run(p, isa, activations, lambda a: np.array(a))
    names = ["y", "dx", "dw"] + [f"{t}_{n}" for n in p["grads"] for t in ("dA", "dB")]
    for name, g, w in zip(names, got, want):
        # bit for bit (NaN-aware: NaN out buffers must have been overwritten in both)
        assert np.array_equal(g.view(np.uint8), w.view(np.uint8)), f"{name}: guarded call differs"
        assert not np.isnan(g.astype(np.float32)).any(), f"{name}: NaN left in an output buffer"
