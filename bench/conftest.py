"""pytest-benchmark setup for the layer benchmarks (design.md 10).

Run:  pytest bench/ --benchmark-enable --benchmark-json=bench/baseline-<machine-kind>.json
(pyproject's addopts disable timing, so without --benchmark-enable every case runs once as a
smoke test). `pytest` alone collects tests/ only (testpaths).

- `roofline` (session): AMX peaks and read bandwidth, measured once at the start of the run
  on the same thread count as the layers; also written into the JSON ("roofline").
- `problem` (per shape): one ktmoe.bench.Problem alive at a time (the Qwen3 layer is ~1.2 GB).
- `record(result)`: a test hands in its ktmoe.bench.Result; the terminal summary prints the
  table and the kernel targets, and the JSON gets them as "table" / "targets" (and each
  benchmark's extra_info gets its speedups over the baselines, known only at the end).
The shapes, runners, FLOP / byte formulas and table live in ktmoe/bench.py, shared with
`ktmoe bench`; the pass/fail targets in bench/perf_targets.py (this suite only).
"""
import gc

import pytest

import perf_targets

RESULTS = []          # ktmoe.bench.Result, in run order
BY_NODE = {}          # test nodeid -> Result, to add the speedups (known at the end) to the JSON
_STATE = {"roofline": None, "problem": None}


def pytest_addoption(parser):
    group = parser.getgroup("ktmoe bench")
    group.addoption("--ktmoe-threads", type=int, default=None,
                    help="threads for ktmoe, torch and the roofline (default: all usable cores)")


@pytest.fixture(scope="session")
def threads(pytestconfig):
    import torch
    from ktmoe import _cpu
    n = pytestconfig.getoption("--ktmoe-threads") or _cpu.default_num_threads()
    torch.set_num_threads(n)
    return n


@pytest.fixture(scope="session")
def roofline(threads):
    from ktmoe import bench
    if _STATE["roofline"] is None:
        _STATE["roofline"] = bench.measure_roofline(threads)
    return _STATE["roofline"]


@pytest.fixture
def record(request):
    def add(result):
        RESULTS.append(result)
        BY_NODE[request.node.nodeid] = result
    return add


@pytest.fixture
def problem(request):
    """The Problem of the test's `shape` parameter; the previous shape's is dropped first."""
    from ktmoe import bench
    name = request.node.callspec.params["shape"]
    cur = _STATE["problem"]
    if cur is None or cur.shape.name != name:
        _STATE["problem"] = None
        del cur
        gc.collect()
        _STATE["problem"] = bench.Problem(bench.SHAPES[name])
    return _STATE["problem"]


def pytest_benchmark_update_json(config, benchmarks, output_json):
    from ktmoe import bench
    if _STATE["roofline"] is not None:
        output_json["roofline"] = _STATE["roofline"].as_dict()
    bench.add_speedups(RESULTS)
    for b in output_json.get("benchmarks", []):
        r = BY_NODE.get(b.get("fullname"))
        if r is not None:
            b["extra_info"].update(r.extra_info())
    output_json["table"] = [{"shape": r.shape, "pass": r.passes, "impl": r.impl, "ms": 1e3 * r.seconds,
                             **r.extra_info()} for r in RESULTS]
    output_json["targets"] = ([{"impl": i, "target": t, "measured": m, "status": s}
                               for i in ("ktmoe", "ktmoe-wT") for t, m, s in perf_targets.check_targets(RESULTS, i)]
                              + [{"impl": i, "target": t, "measured": m, "status": s}
                                 for i, t, m, s in perf_targets.check_quant_targets(RESULTS)])


def pytest_terminal_summary(terminalreporter):
    if not RESULTS or _STATE["roofline"] is None:
        return
    from ktmoe import bench
    bench.add_speedups(RESULTS)
    tr = terminalreporter
    tr.section("ktmoe layer benchmarks: median time vs roofline and torch baselines")
    for line in bench.format_table(_STATE["roofline"], RESULTS):
        tr.write_line(line)
    tr.write_line("targets:")
    for line in perf_targets.format_targets(RESULTS):
        tr.write_line(line)
