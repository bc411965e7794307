"""bench/test_hybrid_step.py: smoke test of the hybrid training-step benchmark
(bench/hybrid_step.py) on the CPU with a tiny Qwen3-MoE (1 layer, 32 tokens, 1 timed step):
the summary has a positive step time and 0 < experts share <= 1, every layer's expert
Function and kernel were timed once forward and once backward, and the torch-experts mode
(`--gpu-only`, here on the CPU) runs on the same weights (same first loss).
"""
import importlib.util
import json
import sys
from pathlib import Path

_spec = importlib.util.spec_from_file_location("hybrid_step", Path(__file__).with_name("hybrid_step.py"))
hybrid_step = sys.modules.setdefault("hybrid_step", importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(hybrid_step)

TINY = ["--device", "cpu", "--layers", "1", "--tokens", "32", "--warmup", "0", "--steps", "1",
        "--hidden", "256", "--experts", "8", "--top-k", "2", "--moe-intermediate", "128", "--vocab", "512",
        "--heads", "4", "--kv-heads", "2", "--head-dim", "64", "--threads", "1"]


def test_hybrid_step_tiny(tmp_path, capsys):
    out = tmp_path / "r.json"
    results = hybrid_step.main(TINY + ["--gpu-only", "--json", str(out)])
    hy, go = results
    assert hy["mode"] == "hybrid" and go["mode"] == "gpu-only"
    for r in results:
        assert r["step_s"] > 0 and r["tokens_per_s"] > 0 and r["peak_host_bytes"] > 0
        assert r["fwd_s"] > 0 and r["bwd_s"] > 0 and r["opt_s"] >= 0
    assert 0 < hy["experts_share"] <= 1 and 0 < hy["kernel_share"] <= hy["experts_share"] + 1e-9
    assert 0 < hy["kernel_s"] <= hy["experts_s"] <= hy["step_s"]
    assert hy["expert_calls_per_step"] == {"fn_fwd": 1, "fn_bwd": 1, "kernel_fwd": 1, "kernel_bwd": 1}
    assert abs(hy["loss"] - go["loss"]) < 0.05 * abs(go["loss"])   # same weights, same batch
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith(("hybrid ", "gpu-only "))]
    assert len(lines) == 2 and "% of step" in lines[0]
    saved = json.loads(out.read_text())
    assert [r["mode"] for r in saved["results"]] == ["hybrid", "gpu-only"]
    # the timers are removed again
    from ktmoe.torch import function as F
    assert not hasattr(F._host, "__wrapped__")
    assert not hasattr(F.KernelExperts.forward, "__wrapped__")


def test_hybrid_step_two_ranks_match_one(tmp_path):
    """Under torchrun (2 CPU ranks, gloo, shared experts): the same global batch gives one
    process's losses (every step, warm-up included), and each rank reports its memory."""
    import os
    import subprocess
    args = TINY + ["--batch", "2", "--warmup", "1", "--steps", "2", "--threads", "1"]
    runs = {}
    for n in (1, 2):
        out = tmp_path / f"g{n}.json"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}",
               str(Path(__file__).with_name("hybrid_step.py")), *args, "--json", str(out)]
        done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        runs[n] = json.loads(out.read_text())["results"][0]
    one, two = runs[1], runs[2]
    assert two["ranks"] == 2 and len(two["per_rank"]) == 2 and one["ranks"] == 1
    assert len(one["losses"]) == len(two["losses"]) == 3
    for a, b in zip(one["losses"], two["losses"]):
        assert abs(a - b) <= 1e-3 * abs(a), (one["losses"], two["losses"])
    assert all(r["pss_bytes"] and r["peak_host_bytes"] > 0 for r in two["per_rank"])
