"""The pass/fail targets of the kernel-throughput work that the benchmark suite checks
(bench/conftest.py prints them under the table and writes them into the JSON as "targets").

They are the goals of the throughput issues on the 16-core AMX machine, not properties of the
package: they live here, beside the benchmarks, and `ktmoe bench` (ktmoe/bench.py, installed)
prints the measurements only. Each check reads ktmoe.bench.Result rows of one run.
"""
from ktmoe import bench

# Targets of the kernel-throughput work this benchmark checks (on the 16-core AMX machine)
TARGET_ROOFLINE_T4096 = 0.50      # qwen3-4096 fwdbwd: >= 50 % of the roofline bound
TARGET_GROUPED_T4096 = 20.0       # qwen3-4096 fwdbwd: >= 20x the grouped torch loop
TARGET_BW_T16 = 1.4               # qwen3-16: time <= 1.4x the bandwidth bound
TARGET_PACKED = 1.05              # packed weights <= 1.05x raw bytes of their format
# Quantized formats: fwd+bwd speedups over ktmoe bf16 measured in the same run
TARGET_INT8_T16 = 1.7             # qwen3-16: int8 weight-only >= 1.7x bf16
TARGET_INT4_T16 = 2.5             # qwen3-16: int4 weight-only >= 2.5x bf16
TARGET_W8A8_T4096 = 1.7           # qwen3-4096: W8A8 >= 1.7x bf16 (the int8 peak is ~1.85x the bf16 one)
TARGET_FP8_T16 = 1.7              # qwen3-16: fp8 >= 1.7x bf16 (half the weight bytes)
TARGET_FP8_T4096 = 1 / 1.15       # qwen3-4096: fp8 within 1.15x of bf16


def check_targets(results: list, impl: str = "ktmoe") -> list[tuple[str, str, str]]:
    """(target, measured, PASS/FAIL/n.a.) for the kernel targets of the issue, for `impl`
    (ktmoe-wT, the opt-in transposed copy, holds twice the weights by design)."""
    results = [r for r in results if r.impl == impl]

    def get(shape, passes):
        return next((r for r in results if r.shape == shape and r.passes == passes), None)
    out = []
    r = get("qwen3-4096", "fwdbwd")
    out.append((f"qwen3-4096 fwdbwd >= {TARGET_ROOFLINE_T4096:.0%} of roofline",
                f"{r.roofline_fraction:.1%}" if r else "not run",
                "n.a." if r is None else "PASS" if r.roofline_fraction >= TARGET_ROOFLINE_T4096 else "FAIL"))
    sp = r.speedup.get("grouped") if r else None
    out.append((f"qwen3-4096 fwdbwd >= {TARGET_GROUPED_T4096:g}x grouped",
                f"{sp:.2f}x" if sp else "not run",
                "n.a." if sp is None else "PASS" if sp >= TARGET_GROUPED_T4096 else "FAIL"))
    for passes in bench.PASSES:
        r = get("qwen3-16", passes)
        ratio = r.seconds / r.t_memory if r else None
        out.append((f"qwen3-16 {passes} <= {TARGET_BW_T16:g}x bandwidth bound",
                    f"{ratio:.2f}x" if r else "not run",
                    "n.a." if r is None else "PASS" if ratio <= TARGET_BW_T16 else "FAIL"))
    ratios = [r.weight_ratio for r in results if r.weight_ratio is not None and impl != "ktmoe-wT"]
    worst = max(ratios) if ratios else None
    out.append((f"packed weights <= {TARGET_PACKED:g}x raw bf16", f"{worst:.3f}x" if worst else "not run",
                "n.a." if worst is None else "PASS" if worst <= TARGET_PACKED else "FAIL"))
    return out


def check_quant_targets(results: list) -> list[tuple[str, str, str, str]]:
    """(impl, target, measured, PASS/FAIL/n.a.) for the INT8/INT4 targets: fwd+bwd speed-ups
    over ktmoe bf16 measured in the same run, and packed memory against bf16."""
    by = {(r.shape, r.passes, r.impl): r for r in results}
    out = []
    for impl, shape, want in (("ktmoe-int8", "qwen3-16", TARGET_INT8_T16), ("ktmoe-int4", "qwen3-16", TARGET_INT4_T16),
                              ("ktmoe-w8a8", "qwen3-4096", TARGET_W8A8_T4096), ("ktmoe-fp8", "qwen3-16", TARGET_FP8_T16),
                              ("ktmoe-fp8", "qwen3-4096", TARGET_FP8_T4096)):
        q, b = by.get((shape, "fwdbwd", impl)), by.get((shape, "fwdbwd", "ktmoe"))
        sp = b.seconds / q.seconds if q and b else None
        what = f">= {want:g}x ktmoe bf16" if want >= 1 else f"within {1 / want:.2f}x of ktmoe bf16"
        out.append((impl, f"{shape} fwdbwd {what}", f"{sp:.2f}x" if sp else "not run",
                    "n.a." if sp is None else "PASS" if sp >= want else "FAIL"))
    for impl in ("ktmoe-int8", "ktmoe-int4", "ktmoe-fp8", "ktmoe-int4bs"):
        # packed bytes against the format's own raw bytes (codes + scales) and against bf16
        rows = [(r.weight_ratio, bench.format_bytes_ratio(bench.SHAPES[r.shape], bench.QUANTIZED[impl][0]))
                for r in results if r.impl == impl and r.weight_ratio is not None]
        worst = max(rows, key=lambda t: t[0] / t[1]) if rows else None
        got = f"{worst[0] / worst[1]:.3f}x (= {worst[0]:.4f} of bf16)" if worst else "not run"
        out.append((impl, f"packed weights <= {TARGET_PACKED:g}x codes + scales", got,
                    "n.a." if worst is None else "PASS" if worst[0] / worst[1] <= TARGET_PACKED else "FAIL"))
    return out


def format_targets(results: list) -> list[str]:
    lines = [f"  {status:<5} {impl:<{bench.IMPL_WIDTH}} {what:<50} measured {got}"
             for impl in ("ktmoe", "ktmoe-wT") for what, got, status in check_targets(results, impl)
             if got != "not run" or impl == "ktmoe"]
    return lines + [f"  {status:<5} {impl:<{bench.IMPL_WIDTH}} {what:<50} measured {got}"
                    for impl, what, got, status in check_quant_targets(results) if got != "not run"]
