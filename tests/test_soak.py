"""Soak test of `ktmoe finetune`: the built-in tiny job for 200 optimizer steps, in-process.

Host memory (RSS: psutil when installed, else /proc/self/statm) and the number of open file
descriptors (/proc/self/fd) are sampled at the start of every step (the job's call to
data.collate is wrapped), so every sample is taken at the same point of the loop. Between
two windows of equal length after warm-up (steps 51-100, after the first checkpoint save
and a whole save period, and the last 50 steps), the largest RSS must grow by less than
2 % and the largest descriptor count must not grow at all; the descriptor count at the
last step must equal the one at step 51. A leak of a few tens of KiB per step, or one
descriptor per checkpoint, fails.

KTMOE_SOAK_STEPS=1000 (a multiple of 50, at least 200) runs a longer soak by hand; `-s`
shows the RSS / fd curve every 50 steps.
"""
import os

import pytest

import ktmoe.cli
from ktmoe.finetune import data

STEPS = int(os.environ.get("KTMOE_SOAK_STEPS", "200"))
WINDOW = 50             # = the tiny job's --save-every: each window holds one checkpoint save
MAX_RSS_GROWTH = 0.02


def _rss() -> int:
    try:
        import psutil
        return psutil.Process().memory_info().rss
    except ImportError:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc (Linux)")
def test_soak_tiny_job_memory_and_fds_stay_flat(tmp_path, monkeypatch):
    assert STEPS >= 4 * WINDOW and STEPS % WINDOW == 0, "KTMOE_SOAK_STEPS: a multiple of 50, at least 200"
    samples = []                      # (step about to run, 1-based; rss bytes; open fds)
    collate = data.collate

    def sampling_collate(*a, **k):
        samples.append((len(samples) + 1, _rss(), _fds()))
        step, rss, fds = samples[-1]
        if step == 1 or step % WINDOW == 1 or step == STEPS:
            print(f"soak step {step:5d}: rss {rss / 2**20:8.1f} MiB, {fds} fds", flush=True)
        return collate(*a, **k)

    monkeypatch.setattr(data, "collate", sampling_collate)
    out = tmp_path / "out"
    assert ktmoe.cli.main(["finetune", "--out", str(out), "--steps", str(STEPS), "--quiet"]) == 0
    assert [s for s, _, _ in samples] == list(range(1, STEPS + 1))

    warm = samples[WINDOW:2 * WINDOW]          # steps 51..100
    end = samples[-WINDOW:]                    # the last 50 steps
    rss_warm, rss_end = max(r for _, r, _ in warm), max(r for _, r, _ in end)
    growth = rss_end / rss_warm - 1
    print(f"soak: rss start {samples[0][1] / 2**20:.1f} MiB, after warm-up {rss_warm / 2**20:.1f} MiB, "
          f"end {rss_end / 2**20:.1f} MiB ({growth:+.2%}); fds {warm[0][2]} -> {samples[-1][2]}")
    assert growth < MAX_RSS_GROWTH, (f"host RSS grew {growth:.2%} between steps {warm[0][0]}-{warm[-1][0]} "
                                     f"({rss_warm / 2**20:.1f} MiB) and {end[0][0]}-{end[-1][0]} "
                                     f"({rss_end / 2**20:.1f} MiB)")
    fd_warm, fd_end = max(f for _, _, f in warm), max(f for _, _, f in end)
    assert fd_end <= fd_warm, f"open file descriptors grew from {fd_warm} to {fd_end}"
    assert samples[-1][2] == warm[0][2], f"open file descriptors: {warm[0][2]} at step 51, {samples[-1][2]} at the end"
