"""The expert bf16 GEMMs of gemm.h (kt_gemm_nt/nn_<isa>, through ktmoe._kernels._gemm) against a
float64 numpy matmul of the same bf16 values, on every ISA path this CPU has.

Shapes cover the tails of every path: M, N, K not multiples of 4/16/32/64, several AMX K panels
(512) and N chunks (128), both AMX nt variants (M <= 64 transposed output, M > 64 packed), the
small-M AVX-512 fallbacks of the AMX path, M, N or K = 0; accumulate on and off; row strides
larger than the row (row slices of bigger arrays). The argument checks raise ValueError naming
the argument.
"""
import ml_dtypes
import numpy as np
import pytest

BF16 = ml_dtypes.bfloat16

# (M, N, K): tails, edges and multi-panel cases
SHAPES = [(1, 1, 1), (1, 37, 300), (3, 5, 7), (5, 64, 64), (17, 33, 65), (33, 17, 31), (64, 128, 512),
          (65, 130, 257), (100, 260, 1100), (2, 300, 1030), (0, 5, 7), (4, 0, 7), (5, 6, 0)]

# fp32 accumulation of bf16 products (exact in fp32) against float64: the relative Frobenius
# error is rounding of the fp32 sums only, ~1e-7 * sqrt(K). Measured worst on this 2-core AVX2
# machine (portable path): 1.2e-7 nt, 2.9e-7 nn (printed by test_worst_error_summary); the limit leaves the kernels' summation orders room
# (AMX / AVX-512 block K differently) but stays far below a wrong element or a bf16 rounding
# of an input or output (~4e-3).
TOL = 1e-5
WORST = {}


def _gemm():
    from ktmoe._kernels import _gemm
    return _gemm


def _bf16(rng, shape):
    return rng.standard_normal(shape).astype(BF16)


@pytest.mark.parametrize("accumulate", [False, True])
@pytest.mark.parametrize("kind", ["nt", "nn"])
@pytest.mark.parametrize("M,N,K", SHAPES)
def test_gemm_vs_numpy(isa, kind, M, N, K, accumulate):
    g = _gemm()
    rng = np.random.default_rng(M * 1000003 + N * 1009 + K + (kind == "nn"))
    # row slices of bigger arrays: lda, ldw, ldc larger than the rows
    A_full = _bf16(rng, (M, K + 3))
    A = A_full[:, :K]
    W_full = _bf16(rng, (N, K + 5) if kind == "nt" else (K, N + 5))
    W = W_full[:, :K] if kind == "nt" else W_full[:, :N]
    C_full = rng.standard_normal((M, N + 2)).astype(np.float32)
    C = C_full[:, :N]
    C0 = C.copy()
    guard = C_full[:, N:].copy()
    Wm = W.astype(np.float64).T if kind == "nt" else W.astype(np.float64)
    ref = A.astype(np.float64) @ Wm + (C0.astype(np.float64) if accumulate else 0.0)
    # every inner-loop variant is its own target now (avx512f: the AVX-512F loops, avx512: the BF16 ones)
    out = g.gemm(kind, isa, A.view(np.uint16), W.view(np.uint16), C, accumulate)
    assert out is C
    np.testing.assert_array_equal(C_full[:, N:], guard, err_msg="wrote outside C")
    if K == 0:
        # nothing to sum: C is exactly C0 (accumulate) or zeros
        np.testing.assert_array_equal(C, C0 if accumulate else np.zeros_like(C))
        return
    if M == 0 or N == 0:
        return
    err = float(np.linalg.norm(C - ref) / np.linalg.norm(ref))
    key = f"{isa} {kind}"
    WORST[key] = max(WORST.get(key, 0.0), err)
    assert np.isfinite(C).all()
    assert err <= TOL, f"{key} M={M} N={N} K={K} acc={accumulate}: rel Frobenius error {err:.2e} > {TOL}"


def test_worst_error_summary(capsys):
    """Runs last in this file: prints the worst measured error per path and kind."""
    with capsys.disabled():
        for key, err in sorted(WORST.items()):
            print(f"\n    gemm {key:16s} worst rel Frobenius error {err:.2e} (limit {TOL:g})", end="")


def test_gemm_rejects_bad_arguments():
    g = _gemm()
    A = np.zeros((4, 8), np.uint16)
    W = np.zeros((6, 8), np.uint16)
    C = np.zeros((4, 6), np.float32)
    g.gemm("nt", "portable", A, W, C)
    with pytest.raises(ValueError, match="kind"):
        g.gemm("tn", "portable", A, W, C)
    with pytest.raises(ValueError, match="isa"):
        g.gemm("nt", "sse9", A, W, C)
    with pytest.raises(ValueError, match="^A: dtype"):
        g.gemm("nt", "portable", A.astype(np.float32), W, C)
    with pytest.raises(ValueError, match="^W: dtype"):
        g.gemm("nt", "portable", A, W.astype(np.int16), C)
    with pytest.raises(ValueError, match="^C: dtype"):
        g.gemm("nt", "portable", A, W, C.astype(np.float64))
    with pytest.raises(ValueError, match="^A: must be 2-D"):
        g.gemm("nt", "portable", A.reshape(-1), W, C)
    with pytest.raises(ValueError, match="^W: nt needs"):
        g.gemm("nt", "portable", A, np.zeros((6, 9), np.uint16), C)
    with pytest.raises(ValueError, match="^W: nn needs"):
        g.gemm("nn", "portable", A, W, C)               # nn wants W [K=8, N=6]
    with pytest.raises(ValueError, match="^C: must have"):
        g.gemm("nt", "portable", A, W, np.zeros((5, 6), np.float32))
    with pytest.raises(ValueError, match="^A: rows must be contiguous"):
        g.gemm("nt", "portable", np.zeros((4, 16), np.uint16)[:, ::2], W, C)
    with pytest.raises(ValueError, match="^C: rows must be contiguous"):
        g.gemm("nt", "portable", A, W, np.zeros((6, 4), np.float32).T)
    ro = C.copy()
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="^C: must be writeable"):
        g.gemm("nt", "portable", A, W, ro)
    buf = np.zeros(64, np.float32)
    with pytest.raises(ValueError, match="^C: must not overlap"):
        g.gemm("nt", "portable", buf.view(np.uint16)[:32].reshape(4, 8), W, buf[:24].reshape(4, 6))
    with pytest.raises(TypeError, match="^W: expected a numpy array"):
        g.gemm("nt", "portable", A, [[0] * 8] * 6, C)
    with pytest.raises(ValueError, match="calls"):
        g.time_gemm("nt", "portable", A, W, C, False, 0)


def test_unavailable_isa_raises():
    import ktmoe
    g = _gemm()
    missing = [i for i in ("amx", "avx512") if i not in ktmoe.available_isas()]
    if not missing:
        pytest.skip("every path runs here")
    with pytest.raises(ValueError, match="^isa: path"):
        g.gemm("nt", missing[0], np.zeros((1, 1), np.uint16), np.zeros((1, 1), np.uint16),
               np.zeros((1, 1), np.float32))
