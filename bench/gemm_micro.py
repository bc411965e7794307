"""GEMM micro-benchmark: the expert bf16 GEMMs of gemm.h alone, single-threaded, per ISA path.

    python bench/gemm_micro.py [--isas amx,avx512,portable] [--models qwen3,dsv2] [--m 16,64,256,1024,4096]
                               [--repeat 5] [--budget 2.0] [--peak-seconds 0.5] [--json out.json]

For every ISA path this CPU has (ktmoe.available_isas(), or --isas), kt_gemm_nt_<isa> /
kt_gemm_nn_<isa> (through ktmoe._kernels._gemm, one thread, GIL released) on the GEMMs of one
expert of the layer, at M rows (tokens routed to the expert):

    gate_up  nt  N = 256 (one 128-column chunk of gate + the same of up)  K = H
    down     nt  N = 256 (a 256-column chunk of the output)                K = I
    dHh      nn  N = 128 and N = I (dHh = dD Wd, a chunk and the whole)    K = H
    dX       nn  N = 256 (a chunk of dX = [dG dU] [Wg; Wu])                 K = 2I

for Qwen3-30B-A3B (H = 2048, I = 768) and DeepSeek-V2-Lite (H = 2048, I = 1408). Each case: one
warm-up call, then timed batches of back-to-back calls (each batch >= ~20 ms or one call) until
--repeat batches or --budget seconds; the median per-call time is reported as ms, TFLOP/s
(2*M*N*K FLOP) and % of the single-thread peak of that path, measured first in the same run:
amx -> the AMX bf16 tile loop, avx512 -> VDPBF16PS (or zmm FMA without AVX512_BF16),
portable -> the widest fp32 FMA loop of this CPU (ktmoe.bench.bf16_probe_for).
bench/test_gemm_micro.py runs a small case of this as a smoke test (pytest-benchmark).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time

import numpy as np

MODELS = {"qwen3": (2048, 768), "dsv2": (2048, 1408)}   # name -> (H, I)
MS = (16, 64, 256, 1024, 4096)


@dataclasses.dataclass(frozen=True)
class Case:
    model: str
    name: str     # gate_up, down, dHh, dX
    kind: str     # nt or nn
    N: int
    K: int


def cases(models=tuple(MODELS)) -> list[Case]:
    out = []
    for m in models:
        H, I = MODELS[m]
        out += [Case(m, "gate_up", "nt", 256, H), Case(m, "down", "nt", 256, I),
                Case(m, "dHh", "nn", 128, H), Case(m, "dHh", "nn", I, H), Case(m, "dX", "nn", 256, 2 * I)]
    return out


def single_thread_peaks(isas, seconds: float = 0.5) -> dict:
    """isa -> (probe, FLOP/s on one thread) or (None, None) where no probe runs."""
    from ktmoe import bench
    out = {}
    for isa in isas:
        probe = bench.bf16_probe_for(isa)
        out[isa] = (probe, bench.probe_peak(probe, 1, seconds) if probe else None)
    return out


def operands(M: int, c: Case, rng):
    """bf16 bits of A [M, K] and W ([N, K] nt, [K, N] nn), C [M, N] fp32. A's rows are padded
    by one cache line, as the layer's gathered rows are (a power-of-two row stride would put
    every row of a tile in the same L1 set)."""
    import ml_dtypes
    A = rng.standard_normal((M, c.K + 32), dtype=np.float32).astype(ml_dtypes.bfloat16).view(np.uint16)[:, :c.K]
    wshape = (c.N, c.K) if c.kind == "nt" else (c.K, c.N)
    W = (rng.standard_normal(wshape, dtype=np.float32) * c.K ** -0.5).astype(ml_dtypes.bfloat16).view(np.uint16)
    return A, W, np.empty((M, c.N), np.float32)


def time_case(isa: str, M: int, c: Case, repeat: int = 5, budget: float = 2.0, seed: int = 0) -> tuple[float, int]:
    """(median seconds per call, calls timed) of one case."""
    from ktmoe._kernels import _gemm
    A, W, C = operands(M, c, np.random.default_rng(seed))
    first = _gemm.time_gemm(c.kind, isa, A, W, C, False, 1)   # warm-up (and packing scratch)
    calls = max(1, int(0.02 / max(first, 1e-9)))
    times, n, start = [], 0, time.perf_counter()
    for _ in range(repeat):
        times.append(_gemm.time_gemm(c.kind, isa, A, W, C, False, calls) / calls)
        n += calls
        if time.perf_counter() - start > budget:
            break
    return statistics.median(times), n


def run(isas, models, ms, repeat=5, budget=2.0, peak_seconds=0.5, out=print) -> dict:
    peaks = single_thread_peaks(isas, peak_seconds)
    for isa, (probe, p) in peaks.items():
        out(f"single-thread peak, {isa} path: " + (f"{p / 1e12:.4f} TFLOP/s ({probe} probe)" if p
                                                   else "none (no probe runs here)"))
    head = (f"{'isa':<9} {'model':<6} {'gemm':<8} {'kind':<4} {'M':>5} {'N':>5} {'K':>5} {'ms':>10} "
            f"{'TFLOP/s':>8} {'%peak':>6}")
    out(head)
    out("-" * len(head))
    rows = []
    for isa in isas:
        probe, peak = peaks[isa]
        for c in cases(models):
            for M in ms:
                sec, n = time_case(isa, M, c, repeat, budget)
                flops = 2.0 * M * c.N * c.K
                tf = flops / sec / 1e12
                frac = flops / sec / peak if peak else None
                rows.append({"isa": isa, "model": c.model, "gemm": c.name, "kind": c.kind, "M": M, "N": c.N,
                             "K": c.K, "ms": 1e3 * sec, "calls": n, "tflops": tf, "peak_fraction": frac,
                             "probe": probe})
                pct = f"{100 * frac:5.1f}%" if frac is not None else "   n.a"
                out(f"{isa:<9} {c.model:<6} {c.name:<8} {c.kind:<4} {M:5d} {c.N:5d} {c.K:5d} {1e3 * sec:10.3f} "
                    f"{tf:8.4f} {pct:>6}")
    return {"peaks": {i: {"probe": pr, "tflops": None if p is None else p / 1e12} for i, (pr, p) in peaks.items()},
            "rows": rows}


def _list(value, allowed, what, conv=str):
    items = [conv(v.strip()) for v in value.split(",") if v.strip()]
    bad = [v for v in items if allowed is not None and v not in allowed]
    if bad or not items:
        raise SystemExit(f"--{what}: unknown {bad or value!r}; choose from {', '.join(map(str, allowed))}")
    return items


def main(argv=None) -> int:
    import ktmoe
    avail = ktmoe.available_isas()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--isas", default=",".join(avail), help=f"paths to run (default: all here, {','.join(avail)})")
    ap.add_argument("--models", default=",".join(MODELS), help="qwen3 (H=2048, I=768), dsv2 (H=2048, I=1408)")
    ap.add_argument("--m", default=",".join(map(str, MS)), help="rows M (default 16,64,256,1024,4096)")
    ap.add_argument("--repeat", type=int, default=5, help="timed batches per case (default 5)")
    ap.add_argument("--budget", type=float, default=2.0, help="seconds per case after which no new batch starts")
    ap.add_argument("--peak-seconds", type=float, default=0.5, help="seconds of each peak probe")
    ap.add_argument("--json", default=None, help="also write peaks and rows to this JSON file")
    a = ap.parse_args(argv)
    isas = _list(a.isas, avail, "isas")
    models = _list(a.models, MODELS, "models")
    ms = _list(a.m, None, "m", int)
    if any(m < 1 for m in ms) or a.repeat < 1:
        raise SystemExit("--m and --repeat: must be >= 1")
    res = run(isas, models, ms, a.repeat, a.budget, a.peak_seconds, out=lambda s: print(s, flush=True))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
