"""bench/test_gemm_micro.py: the pytest-benchmark front of the GEMM micro-benchmark
(bench/gemm_micro.py), the expert bf16 GEMMs alone, single-threaded, for every ISA path this
CPU has. (Not named test_gemm.py: pytest's default import mode needs test basenames distinct
from tests/test_gemm.py.)

`pytest bench/test_gemm_micro.py` (timing disabled by pyproject's addopts) runs each case once as a
smoke test and checks the result against numpy; `--benchmark-enable` times them. The full
table (all M, both models, % of the path's single-thread peak) is the script's:
`python bench/gemm_micro.py`.
"""
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

_spec = importlib.util.spec_from_file_location("gemm_micro", Path(__file__).with_name("gemm_micro.py"))
gemm_micro = sys.modules.setdefault("gemm_micro", importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(gemm_micro)

# small cases: M = 16 rows, one nt and one nn GEMM of the Qwen3-30B-A3B expert
SMALL = [c for c in gemm_micro.cases(("qwen3",)) if (c.name, c.N) in (("down", 256), ("dX", 256))]


def _isas():
    import ktmoe
    return ktmoe.available_isas()


@pytest.mark.parametrize("case", SMALL, ids=lambda c: f"{c.model}-{c.name}-{c.kind}")
@pytest.mark.parametrize("isa", _isas())
def test_gemm(benchmark, isa, case):
    import ml_dtypes
    from ktmoe._kernels import _gemm
    M = 16
    A, W, C = gemm_micro.operands(M, case, np.random.default_rng(0))
    benchmark.extra_info.update({"M": M, "N": case.N, "K": case.K, "flops": 2.0 * M * case.N * case.K})
    benchmark(_gemm.gemm, case.kind, isa, A, W, C, False)
    a = A.view(ml_dtypes.bfloat16).astype(np.float64)
    w = W.view(ml_dtypes.bfloat16).astype(np.float64)
    ref = a @ (w.T if case.kind == "nt" else w)
    err = np.linalg.norm(C - ref) / np.linalg.norm(ref)
    assert err <= 1e-5, f"rel Frobenius error {err:.2e}"   # fp32 accumulation (tests/test_gemm.py)


def test_gemm_micro_script_runs():
    """The script's whole pipeline (peaks, cases, table, JSON rows) on a tiny M."""
    lines = []
    res = gemm_micro.run(_isas(), ["qwen3"], [4], repeat=1, budget=0.0, peak_seconds=0.05, out=lines.append)
    assert len(res["rows"]) == len(_isas()) * len(gemm_micro.cases(("qwen3",)))
    assert all(r["ms"] > 0 and r["tflops"] > 0 for r in res["rows"])
    assert any(line.startswith("single-thread peak") for line in lines)
