"""Layer benchmarks: every shape of design.md 10, forward and forward+backward, LoRA r=16,
for ktmoe and both torch baselines (eager: transformers experts + PEFT; grouped: torch loop).

Each case builds its runner on the shared Problem, makes one timed warm-up call (which also
sizes the rounds: about 10 s per case, 1 to 10 rounds, so the slow eager cases get 1),
then pytest-benchmark's pedantic mode times the rounds. The median goes into a Result whose
numbers (tokens/s, TFLOP/s, GB/s, roofline fraction, speedups) are stored in extra_info.
With --benchmark-disable (the default addopts) each case just runs once.
"""
import time

import pytest

from ktmoe import bench

CASES = [(s, p, i) for s in bench.DEFAULT_SHAPES for p in bench.PASSES for i in bench.IMPLS]
ROUND_BUDGET_S = 10.0


@pytest.mark.parametrize("shape,passes,impl", CASES, ids=["-".join(c) for c in CASES])
def test_layer(benchmark, record, roofline, threads, problem, shape, passes, impl):
    runner = bench.make_runner(impl, problem, threads)
    try:
        fn = getattr(runner, passes)
        benchmark.group = f"{shape} {passes}"
        if benchmark.disabled:
            benchmark(fn)
            return
        t0 = time.perf_counter()
        fn()
        warm = time.perf_counter() - t0
        rounds = max(1, min(10, int(ROUND_BUDGET_S / warm)))
        benchmark.pedantic(fn, rounds=rounds, warmup_rounds=0, iterations=1)
        ratio = runner.weight_bytes / problem.raw_weight_bytes if impl in bench.OURS else None
        r = bench.make_result(roofline, problem, passes, impl, benchmark.stats.stats.median, rounds, ratio)
        record(r)
        benchmark.extra_info.update(r.extra_info())
    finally:
        runner.close()
