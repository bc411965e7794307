"""`ktmoe finetune --nproc 2` on the built-in tiny model (2 CPU ranks, gloo): the same losses as
one process on the same batches, --stop-after / --resume across ranks, and a rank killed mid-run
ends the job with one error line and leaves no shared memory behind."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import ktmoe.cli

HERE = Path(__file__).resolve().parent

RTOL = 1e-2   # per-step loss vs one process; measured about 1e-4 (bf16 kernel, other batch split)
FAST = ["--steps", "4", "--quiet", "--torch-threads", "1", "--device", "cpu"]   # CPU ranks also where a GPU is


def cli(*argv, **kw):
    env = dict(os.environ)
    env.pop("KTMOE_NUM_THREADS", None)
    # from the tests' folder, not the repository root: `python -m` puts the current directory
    # first on sys.path, where the source tree's uncompiled ktmoe/ would shadow the installed one
    return subprocess.run([sys.executable, "-m", "ktmoe.cli", "finetune", *map(str, argv)], env=env,
                          capture_output=True, text=True, timeout=300, cwd=HERE, **kw)


def log(out):
    return [json.loads(line) for line in open(out / "log.jsonl")]


def test_two_ranks_match_one_process_and_resume(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    assert ktmoe.cli.main(["finetune", "--out", str(one), *FAST]) == 0
    r = cli("--out", two, *FAST, "--nproc", 2, "--stop-after", 2)
    assert r.returncode == 0, r.stderr[-3000:]
    assert [e["step"] for e in log(two)] == [1, 2] and (two / "checkpoints" / "step-000002").is_dir()
    r = cli("--out", two, *FAST, "--nproc", 2, "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = log(one), log(two)
    assert [e["step"] for e in b] == [1, 2, 3, 4]
    for x, y in zip(a, b):
        assert x["tokens"] == y["tokens"] and x["trained_tokens"] == y["trained_tokens"]   # the whole batch
        assert abs(x["loss"] - y["loss"]) <= RTOL * abs(x["loss"]), (x, y)                # rel <= 1e-2
    assert b[-1]["loss"] < b[0]["loss"] - 1.0, "the loss falls"
    summary = json.loads((two / "summary.json").read_text())
    assert summary["ranks"] == 2 and len(summary["peak_host_bytes_per_rank"]) == 2
    assert (two / "adapter" / "adapter_model.safetensors").is_file()
    assert not [p for p in two.rglob(".tmp-*")], "rank 0 wrote everything atomically, nothing half-written"
    r = cli("--out", two, *FAST, "--nproc", 2)   # an input error: one line from rank 0, exit 2
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "holds an earlier run" in lines[0], r.stderr[-3000:]


def _children(pid):
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(d))
            except (OSError, ValueError, IndexError):
                pass
    return out


def _region_inodes(pid):
    """Inodes of the shared experts memfd this process maps."""
    with open(f"/proc/{pid}/maps") as f:
        return {line.split()[4] for line in f if "memfd:ktmoe-experts" in line}


def _mapped_anywhere(inode):
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/maps") as f:
                    if any("memfd:ktmoe-experts" in line and line.split()[4] == inode for line in f):
                        return int(d)
            except OSError:
                pass
    return None


def test_killed_rank_ends_job_and_leaves_no_shared_memory(tmp_path):
    out = tmp_path / "out"
    shm_before = set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()
    env = dict(os.environ)
    env.pop("KTMOE_NUM_THREADS", None)
    p = subprocess.Popen([sys.executable, "-m", "ktmoe.cli", "finetune", "--out", str(out), "--steps", "2000",
                          "--quiet", "--torch-threads", "1", "--device", "cpu", "--nproc", "2"], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, cwd=HERE)
    try:
        deadline = time.time() + 180
        while not ((out / "log.jsonl").is_file() and len(log(out)) >= 2):
            assert p.poll() is None and time.time() < deadline, p.communicate()[1][-3000:] if p.poll() else "slow"
            time.sleep(0.2)
        ranks = {}
        for c in _children(p.pid):
            with open(f"/proc/{c}/environ", "rb") as f:
                env_c = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
            ranks[int(env_c[b"LOCAL_RANK"])] = c
        assert sorted(ranks) == [0, 1]
        inodes = [_region_inodes(ranks[r]) for r in (0, 1)]
        assert len(inodes[0]) == 1 and inodes[0] == inodes[1], "both ranks map the one shared region"
        os.kill(ranks[1], signal.SIGKILL)
        _, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 1
    assert err.strip().splitlines()[-1].startswith("ktmoe finetune: error: rank 1 of 2 ended with signal SIGKILL")
    for c in ranks.values():
        assert not os.path.exists(f"/proc/{c}") or open(f"/proc/{c}/stat").read().split()[2] == "Z"
    assert _mapped_anywhere(inodes[0].pop()) is None, "the shared region is gone with the ranks"
    if os.path.isdir("/dev/shm"):
        assert set(os.listdir("/dev/shm")) <= shm_before, "nothing named in /dev/shm"


def test_more_ranks_than_gpus_is_one_clear_error(monkeypatch):
    """Rank i of a host runs on GPU i: more local ranks than GPUs is refused before any GPU is
    touched, with the same error on every rank (rank 0 prints it)."""
    from ktmoe.finetune import FinetuneError
    from ktmoe.finetune.ranks import Ranks

    class Cuda:
        @staticmethod
        def device_count():
            return 1

        @staticmethod
        def set_device(i):
            raise AssertionError("set_device must not be reached")

    class Torch:
        cuda = Cuda

    for rank in ("0", "1"):
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
        monkeypatch.setenv("LOCAL_RANK", rank)
        with pytest.raises(FinetuneError, match="--nproc 2 with the non-expert part on the GPU needs one GPU per rank, "
                                                "and this host has 1: pass --device cpu, or --nproc 1"):
            Ranks.from_env(Torch, use_cuda=True)
