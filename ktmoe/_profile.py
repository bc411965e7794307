"""The per-phase profile of a layer's calls, as a table (`ktmoe bench --profile`).

MoEExperts.profile() returns raw sums (ktmoe/_kernels/ktmoe.h). Each phase's thread time
(threads x wall) splits into four parts, printed as wall-clock equivalents (thread seconds
divided by the thread count, so the four add up to the phase's wall time):
  base:  the GEMMs with the expert weights (their achieved TFLOP/s: the FLOPs over that
         time, as if every thread ran them; %peak against the measured bf16 peak),
  LoRA:  the LoRA products and gradient GEMMs (machine FLOPs of the split-bf16 form),
  other: everything else inside the tasks (gathers, SiLU, conversions, copies, scatter),
  idle:  threads waiting at the phase's end barrier (load imbalance, too few tasks).
"""
from __future__ import annotations


def _rate(flops: float, thread_s: float, threads: int) -> float:
    """TFLOP/s of `flops` done in `thread_s` thread seconds by `threads` threads."""
    return flops / (thread_s / threads) / 1e12 if thread_s > 0 else 0.0


def format_profile(prof: dict, peak_flops: float | None = None, title: str = "") -> list[str]:
    """Lines of the per-call profile table; peak_flops (all threads) gives %peak."""
    n = prof["threads"]
    head = (f"{'pass':<8} {'phase':<18} {'wall ms':>8} {'%pass':>6} {'base ms':>8} {'TFLOP/s':>7} "
            f"{'%peak':>6} {'LoRA ms':>8} {'TFLOP/s':>7} {'other ms':>8} {'idle ms':>8} {'tasks':>6}")
    lines = [title] if title else []
    lines += [head, "-" * len(head)]
    for kind in ("forward", "backward"):
        calls = prof["passes"][kind]["calls"]
        if not calls:
            continue
        pass_ms = 1e3 * prof["passes"][kind]["wall_s"] / calls
        tot = dict(wall=0.0, base=0.0, lora=0.0, other=0.0, idle=0.0, bf=0.0, lf=0.0)
        for ph in prof["phases"]:
            if ph["pass"] != kind or not ph["calls"]:
                continue
            per = 1e3 / calls / n   # thread seconds summed over calls -> wall ms per call
            wall = 1e3 * ph["wall_s"] / calls
            base, lora = per * ph["base_gemm_s"], per * ph["lora_gemm_s"]
            other = per * (ph["busy_s"] - ph["base_gemm_s"] - ph["lora_gemm_s"])
            idle = per * (ph["thread_s"] - ph["busy_s"])
            brate = _rate(ph["base_gemm_flops"], ph["base_gemm_s"], n)
            lrate = _rate(ph["lora_gemm_flops"], ph["lora_gemm_s"], n)
            lines.append(_row(kind, ph["name"], wall, pass_ms, base, brate, peak_flops, lora, lrate, other, idle,
                              ph["tasks"] // ph["calls"]))
            for key, v in (("wall", wall), ("base", base), ("lora", lora), ("other", other), ("idle", idle)):
                tot[key] += v
            tot["bf"] += ph["base_gemm_flops"] / calls
            tot["lf"] += ph["lora_gemm_flops"] / calls
        brate = tot["bf"] / (tot["base"] * 1e-3) / 1e12 if tot["base"] else 0.0
        lrate = tot["lf"] / (tot["lora"] * 1e-3) / 1e12 if tot["lora"] else 0.0
        lines.append(_row(kind, "all phases", tot["wall"], pass_ms, tot["base"], brate, peak_flops, tot["lora"],
                          lrate, tot["other"], tot["idle"], None))
        lines.append(f"{kind:<8} {'pass (wall)':<18} {pass_ms:8.2f}  ({calls} calls)")
    return lines


def _row(kind, name, wall, pass_ms, base, brate, peak, lora, lrate, other, idle, tasks) -> str:
    pct = f"{100 * wall / pass_ms:5.1f}%" if pass_ms else "     -"
    ppk = f"{100 * brate * 1e12 / peak:5.1f}%" if peak and brate else "     -"
    return (f"{kind:<8} {name:<18} {wall:8.2f} {pct:>6} {base:8.2f} {brate:7.2f} {ppk:>6} {lora:8.2f} "
            f"{lrate:7.2f} {other:8.2f} {idle:8.2f} {tasks if tasks is not None else '':>6}")
