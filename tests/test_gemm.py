"""The expert GEMMs, bf16 (gemm.h, kt_gemm_nt/nn_<isa>) and int8 (gemm_int8.h, kt_igemm_nt/nn_<isa>),
through ktmoe._kernels._gemm, on every target this CPU runs (ktmoe.testing.gemm_targets(): each
kernel target of the build, avx512f and avx2 included), in the GEMM
harness ktmoe.testing.check_gemm_guarded: A, W and C flush against a PROT_NONE page (after their
last byte or before their first, alternating), row strides longer than the rows, the gaps and a
pad before C holding a sentinel that must stay; bf16 against a float64 matmul of the same values,
int8 exactly against int64 sums (the checks of tests_c/test_igemm.c, which CI does not build).

bf16 shapes cover the tails of every path: M, N, K not multiples of 4/16/32/64, several AMX K
panels (512) and N chunks (128), both AMX nt variants (M <= 64 transposed output, M > 64 packed),
the small-M AVX-512 fallbacks of the AMX path, M, N or K = 0; accumulate on and off. int8 runs
test_igemm.c's M x N x K grid, with a +-127-only pass at K = 2048. The argument checks raise
ValueError naming the argument.
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


def _targets(dtype):
    import ktmoe.testing
    return [t for t in ktmoe.testing.gemm_targets() if t.dtype == dtype]


def pytest_generate_tests(metafunc):
    if "bf16_target" in metafunc.fixturenames:
        ts = _targets("bf16")
        metafunc.parametrize("bf16_target", ts, ids=[t.name for t in ts])
    if "int8_target" in metafunc.fixturenames:
        ts = _targets("int8")
        metafunc.parametrize("int8_target", ts, ids=[t.name for t in ts])


@pytest.mark.parametrize("accumulate", [False, True])
@pytest.mark.parametrize("M,N,K", SHAPES)
def test_bf16_gemm_vs_numpy(bf16_target, M, N, K, accumulate):
    from ktmoe.testing import check_gemm_guarded
    t = bf16_target
    rng = np.random.default_rng(M * 1000003 + N * 1009 + K + (t.kind == "nn"))
    side = ("after", "before")[(M + N + K + accumulate) % 2]
    err = check_gemm_guarded(t, rng, M, N, K, accumulate, side, tol=TOL)
    key = f"{t.isa} {t.kind}"
    WORST[key] = max(WORST.get(key, 0.0), err)


# test_igemm.c's grid
IGEMM_M = [0, 1, 2, 3, 5, 15, 16, 17, 31, 33, 64, 65, 200, 513]
IGEMM_N = [1, 15, 16, 17, 64, 100, 128, 256]
IGEMM_K = [0, 1, 3, 4, 63, 64, 65, 128, 768, 2048]


@pytest.mark.parametrize("M", IGEMM_M)
def test_int8_gemm_exact(int8_target, M):
    """Every N x K x accumulate of the grid for this M, exact int32; guard side alternating."""
    from ktmoe.testing import check_gemm_guarded
    rng = np.random.default_rng(M)
    im = IGEMM_M.index(M)
    for i_n, N in enumerate(IGEMM_N):
        for i_k, K in enumerate(IGEMM_K):
            for acc in (False, True):
                at_end = (im + i_n + i_k + acc) % 2
                check_gemm_guarded(int8_target, rng, M, N, K, acc, ("before", "after")[at_end])
                if K == 2048 and N in (17, 256) and M in (33, 3):   # +-127 only: the largest sums
                    check_gemm_guarded(int8_target, rng, M, N, K, acc, ("after", "before")[at_end], extreme=True)


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
