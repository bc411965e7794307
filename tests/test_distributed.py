"""Two ranks of torch.distributed (gloo, CPU) on one host: tests/dist_job.py under torchrun.

One launch checks: the ranks share one packed copy of the experts (a memfd region mapped
read-only by both: no private page in either mapping, the summed PSS is the region once, and
the region is the packed weight bytes plus one header page per layer); each rank's kernel gets
its share of the cores; DDP and FSDP2 (fully_shard) training of a PEFT LoRA on half of each
global batch gives the losses and LoRA / attention gradients of one process on the whole
batch, including a step that accumulates two micro-batches (no_sync / set_requires_gradient_sync);
HF Trainer, unmodified, wraps the patched PEFT model in DDP and trains it, the ranks in step.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

HERE = Path(__file__).resolve().parent
RTOL = 1e-2   # docs/design.md relative Frobenius limit; measured about 1.4e-7 (same kernel both sides)
PAGE = 4096


def launch(out: Path, *args, nproc: int = 2) -> None:
    # CPU ranks (gloo) even where a GPU is visible: several ranks on one GPU is not a supported
    # set-up (FSDP2's default mesh and DDP would pick cuda:LOCAL_RANK); GPUs are issue 16's run
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    env.pop("KTMOE_NUM_THREADS", None)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                        str(HERE / "dist_job.py"), str(out), *args], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    launch(out, "ddp,fsdp,trainer")
    return [json.loads((out / f"rank-{r}.json").read_text()) for r in range(2)]


def test_one_packed_copy_per_host(job):
    r0, r1 = job
    R, W = r0["region_bytes"], r0["weight_bytes"]
    assert r1["region_bytes"] == R and r1["weight_bytes"] == W
    assert W <= R <= W + 2 * PAGE * 2   # 2 layers: a header page each, plus page rounding of each array
    for r in job:
        m = r["smaps"]
        assert r["attached"], "every layer must be built over the shared region"
        assert m["mappings"] == 1
        assert m["Rss"] * 1024 == R, "every page of the region was read by this rank"
        assert m["Private_Clean"] == m["Private_Dirty"] == m["Anonymous"] == 0, "no private copy of any page"
        assert m["Shared_Clean"] + m["Shared_Dirty"] == m["Rss"]
    pss = sum(r["smaps"]["Pss"] for r in job) * 1024
    assert abs(pss - R) <= 2 * PAGE, f"host memory for the experts: {pss} bytes, the region is {R}"


def test_threads_split_over_local_ranks(job):
    n = len(os.sched_getaffinity(0))
    for r in job:
        assert r["threads"] == [max(1, n // 2)] * 2


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_losses_and_gradients_match_one_process(job, mode):
    ref = job[0][mode]
    for r in job:
        got = r[mode]
        for step, (a, b) in enumerate(zip(got["losses"], ref["ref_losses"])):
            assert abs(a - b) <= RTOL * abs(b), f"{mode} step {step}: loss {a} vs one process {b}"   # rel <= 1e-2
        for step, (g, gr) in enumerate(zip(got["grads"], ref["ref_grads"])):
            assert sorted(g) == sorted(gr) and any("experts" in n for n in g)
            for name, want in gr.items():
                a, b = np.asarray(g[name]), np.asarray(want)
                err = np.linalg.norm(a - b) / np.linalg.norm(b)
                assert err <= RTOL, f"{mode} step {step} {name}: rel error {err:.2e}"   # rel <= 1e-2


def test_hf_trainer_unmodified(job):
    t0, t1 = job[0]["trainer"], job[1]["trainer"]
    assert t0["engine"] == "DistributedDataParallel" and len(t0["losses"]) == 2
    assert all(np.isfinite(t0["losses"])) and t0["losses"] == t1["losses"]   # the logged loss is the ranks' mean
    assert any("experts" in n for n in t0["change"]) and min(t0["change"].values()) > 0, "every LoRA factor trained"
    assert t0["after"] == t1["after"], "the ranks hold the same parameters"
