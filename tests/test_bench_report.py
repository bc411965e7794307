"""`ktmoe bench` for a first-time user (issue 22 item 12):

- a call slower than the per-case budget is made once, not a warm-up and then a timed call
  (the eager baseline's forward + backward takes about a minute at qwen3-16 on 2 cores), and
  --help says so;
- the table ends with a legend: what ms, tok/s, TFLOP/s, GB/s, bound ms, by, %roof, x eager and
  x grouped are, and what each row (ktmoe-wT, the quantized rows, the baselines) is;
- a quantized row's "y differs from ktmoe's" line says that this is the format's quantization
  error, as expected; a baseline's says that only rounding is expected.
The last two are also checked on the output of a real `ktmoe bench` run (one small case).
"""
import time

from ktmoe import bench

import cli_subprocess


def test_a_call_slower_than_the_budget_is_made_once():
    calls = []

    def slow():
        calls.append(1)
        time.sleep(0.05)
        return len(calls)
    sec, n, out, warm_only = bench.time_calls(slow, repeat=5, budget_s=0.01)
    assert calls == [1] and (n, out, warm_only) == (1, 1, True) and sec >= 0.05


def test_fast_calls_are_warmed_up_and_repeated():
    calls = []
    sec, n, out, warm_only = bench.time_calls(lambda: calls.append(1) or len(calls), repeat=3, budget_s=60)
    assert len(calls) == 4 and (n, out, warm_only) == (3, 4, False)


def test_help_says_how_slow_cases_are_timed(tmp_path):
    res = cli_subprocess.run(["bench", "--help"], tmp_path)
    text = " ".join(res.stdout.split())
    assert res.returncode == 0 and "its warm-up included; a call slower than that is made once" in text, text
    assert "--baselines grouped leaves eager out" in text, text


def _result(impl):
    return bench.Result("qwen3-16", "fwd", impl, 0.05, 5, 16, 1e9, 1e9, 0.03, 0.01, 0.03)


def test_table_has_a_legend_of_columns_and_rows():
    roof = bench.Roofline(2, 6.5e12, 13e12, 32e9, 1 << 30, "amx")
    results = [_result(i) for i in bench.IMPLS]
    bench.add_speedups(results)
    text = "\n".join(bench.format_table(roof, results))
    legend = text.split("\ncolumns: ", 1)[1]
    for column in ("ms =", "tok/s =", "TFLOP/s, GB/s =", "bound ms =", "by =", "cmp: compute", "mem: memory",
                   "%roof =", "x eager, x grouped ="):
        assert column in legend, (column, legend)
    rows = {ln.split()[0]: ln for ln in legend.split("\nrows:\n", 1)[1].splitlines()}
    assert set(bench.IMPLS) <= set(rows), rows
    assert "transposed weight copy" in rows["ktmoe-wT"] and "W8A8" in rows["ktmoe-w8a8"], rows


def test_accuracy_notes_say_what_is_expected():
    for impl, (weights, acts) in bench.QUANTIZED.items():
        note = bench.accuracy_note("qwen3-16", impl, 0.2)
        assert note.startswith(f"qwen3-16 {impl}: y differs from ktmoe's (bf16 weights) by 2.0e-01"), note
        assert f"{weights}'s quantization error" in note and "as expected" in note, note
        assert ("activation rounding" in note) == (acts == "int8"), note
    for impl in ("eager", "grouped"):
        note = bench.accuracy_note("qwen3-16", impl, 3e-3)
        assert "quantization" not in note and "expected below 1e-2" in note, note


def test_real_bench_prints_legend_and_quantization_note(tmp_path):
    res = cli_subprocess.run(["bench", "--shapes", "qwen3-16", "--passes", "fwd", "--baselines", "none",
                              "--weights", "int8", "--repeat", 1, "--threads", 1], tmp_path, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = res.stdout.splitlines()
    assert any(ln.startswith("columns: ms = median time of one call") for ln in lines), res.stdout
    assert any(ln.split()[:1] == ["ktmoe-int8"] and "int8 weights, weight-only" in ln for ln in lines), res.stdout
    note = [ln for ln in lines if ln.startswith("qwen3-16 ktmoe-int8: y differs")]
    assert len(note) == 1 and "int8's quantization error, as expected" in note[0], res.stdout
