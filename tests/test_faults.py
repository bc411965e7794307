"""Fault injection for `ktmoe finetune` on the built-in tiny model; each outcome is asserted.

a) kill -9 of a finetune subprocess, repeatedly: three times while a checkpoint is being
   written (the moment a `.tmp-step-*` directory appears in checkpoints/, plus a random
   delay of 0-30 ms) and once at a random moment of a step; after each kill the latest
   checkpoint is complete and `--resume` continues from it. The log.jsonl losses and the
   adapter of the run resumed to the end equal an uninterrupted run's, bit for bit.
b) a truncated or corrupt safetensors shard in --model DIR (header length, header bytes,
   a shard cut short, in a sharded and in a single-file checkpoint): one
   "ktmoe finetune: error:" line naming the file, exit status 2.
c) a full disk while a checkpoint is written (RLIMIT_FSIZE set in the subprocess, so the
   write fails with EFBIG): one clear error line naming the checkpoint, exit 2, the
   previous checkpoint byte-identical and no temporary left; --resume from it then ends
   with the uninterrupted run's losses.
d) a NaN / Inf loss, from a learning rate that diverges and from a NaN injected into the
   logits at a chosen step: the run stops with an error naming the step, before that
   step's optimizer update (counted with a global optimizer-step hook), and neither the
   log nor any checkpoint holds a non-finite value.
"""
import json
import os
import random
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook
from safetensors.torch import load_file, save_file

import ktmoe.cli
from ktmoe.finetune import tiny
from ktmoe.torch.checkpoint import reader as checkpoint

DATA = tiny.dataset_path()
FAST = ["--quiet", "--lr", "3e-3", "--batch-tokens", "1024", "--torch-threads", "1"]
RUNNER = "import sys, ktmoe.cli; sys.exit(ktmoe.cli.main(sys.argv[1:]))"
CKPT_FILES = ("trainable.safetensors", "optimizer.pt", "scheduler.pt", "rng.pt", "state.json")


def finetune(*argv):
    return ktmoe.cli.main(["finetune", *map(str, argv)])


def spawn(argv, cwd, **kw):
    """`ktmoe finetune ARGV` as a subprocess (cwd outside the source tree), output in files."""
    out = open(cwd / "stdout.txt", "ab"), open(cwd / "stderr.txt", "ab")
    try:
        return subprocess.Popen([sys.executable, "-c", RUNNER, "finetune", *map(str, argv)], cwd=cwd,
                                stdout=out[0], stderr=out[1], **kw)
    finally:
        for f in out:
            f.close()


def losses(out):
    return [json.loads(line)["loss"] for line in open(out / "log.jsonl")]


def step_dirs(out):
    d = out / "checkpoints"
    return sorted(p for p in d.glob("step-*")) if d.is_dir() else []


def latest_complete(out):
    """The checkpoint --resume would take (newest with state.json), checked to be whole and readable."""
    found = [p for p in step_dirs(out) if (p / "state.json").is_file()]
    if not found:
        return None, 0
    p = found[-1]
    assert sorted(f.name for f in p.iterdir()) == sorted(CKPT_FILES), f"{p} is incomplete"
    load_file(p / "trainable.safetensors")
    for f in ("optimizer.pt", "scheduler.pt", "rng.pt"):
        torch.load(p / f, weights_only=True)
    return p, json.loads((p / "state.json").read_text())["step"]


def same_adapter(a, b):
    wa, wb = (load_file(d / "adapter" / "adapter_model.safetensors") for d in (a, b))
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def error_lines(text):
    return [line for line in text.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """The built-in tiny checkpoint, built once."""
    return tiny.ensure(tmp_path_factory.mktemp("tiny") / "base-model")


# ---- a) kill -9 during checkpoint writes, then --resume ----
def test_kill9_during_checkpoint_writes_then_resume_is_exact(base, tmp_path):
    steps = 16
    common = ["--model", base, "--data", DATA, *FAST, "--steps", steps, "--save-every", 1]
    ref = tmp_path / "ref"
    assert finetune(*common, "--out", ref) == 0
    want = losses(ref)

    out, work = tmp_path / "victim", tmp_path / "work"
    work.mkdir()
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    kills = []                               # (moment, last complete step before the kill)
    done_before = 0
    for attempt, moment in enumerate(["save", "save", "save", "step"]):
        p = spawn([*common, "--out", out, *(["--resume"] if attempt else [])], work)
        try:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and p.poll() is None:
                _, done = latest_complete(out) if (out / "checkpoints").is_dir() else (None, 0)
                if done > done_before:       # this run has made progress past the last kill's checkpoint
                    if moment == "save":
                        if any(d.name.startswith(".tmp-step-") for d in (out / "checkpoints").iterdir()):
                            time.sleep(rng.uniform(0, 0.03))
                            break
                    else:
                        time.sleep(rng.uniform(0, 0.3))
                        break
                time.sleep(0.001)
            assert p.poll() is None, (f"attempt {attempt}: the run ended (status {p.returncode}) before it could be "
                                      f"killed (seed {seed}): {(work / 'stderr.txt').read_text()[-2000:]}")
            p.send_signal(signal.SIGKILL)
            p.wait(30)
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
        assert p.returncode == -signal.SIGKILL
        ckpt, done_before = latest_complete(out)
        assert ckpt is not None and 1 <= done_before < steps, f"attempt {attempt}: no usable checkpoint ({seed=})"
        kills.append((moment, done_before))

    print(f"kill -9 at (moment, last complete checkpoint): {kills} (seed {seed})")
    p = spawn([*common, "--out", out, "--resume"], work)
    assert p.wait(300) == 0, (work / "stderr.txt").read_text()[-3000:]
    assert f"resumed from {ckpt} (step {done_before} of {steps})" in (work / "stdout.txt").read_text()
    got = losses(out)
    assert got == want, f"kills {kills} (seed {seed}): resumed losses {got} vs uninterrupted {want} (exact)"
    assert same_adapter(ref, out)
    assert not list(out.glob(".tmp-*")) and not list((out / "checkpoints").glob(".tmp-*"))


# ---- b) truncated / corrupt safetensors shards ----
def sharded_copy(base, d, shards=2):
    """The tiny checkpoint re-written as `shards` safetensors files with an index."""
    d.mkdir()
    for f in base.iterdir():
        if f.is_file() and f.suffix != ".safetensors":
            (d / f.name).write_bytes(f.read_bytes())
    state = load_file(base / "model.safetensors")
    names, weight_map = sorted(state), {}
    for s in range(shards):
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        save_file({k: state[k] for i, k in enumerate(names) if i % shards == s}, d / fname, metadata={"format": "pt"})
        weight_map.update({k: fname for i, k in enumerate(names) if i % shards == s})
    (d / checkpoint.INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return d


def _truncate_half(p):
    os.truncate(p, p.stat().st_size // 2)


def _truncate_in_header(p):
    os.truncate(p, 100)


def _truncate_to_4_bytes(p):
    os.truncate(p, 4)


def _flip_header_length(p):
    with open(p, "r+b") as f:
        f.seek(6)
        f.write(b"\xff\xff")        # the top bytes of the little-endian u64 header length


def _flip_header_bytes(p):
    with open(p, "r+b") as f:
        n = int.from_bytes(f.read(8), "little")
        for off in (8 + n // 3, 8 + n // 2, 8 + 2 * n // 3):
            f.seek(off)
            b = f.read(1)
            f.seek(off)
            f.write(bytes([b[0] ^ 0xFF]))


def _cut_last_tensor(p):
    os.truncate(p, p.stat().st_size - 2)


CORRUPT = {"truncated-half": (_truncate_half, "not a valid safetensors file"),
           "truncated-inside-header": (_truncate_in_header, "does not fit the file"),
           "truncated-to-4-bytes": (_truncate_to_4_bytes, "shorter than the 8-byte header length"),
           "header-length-flipped": (_flip_header_length, "does not fit the file"),
           "header-bytes-flipped": (_flip_header_bytes, "header is not JSON"),
           "last-tensor-cut-short": (_cut_last_tensor, "truncated download?")}


@pytest.mark.parametrize("layout", ["sharded", "single-file"])
@pytest.mark.parametrize("case", sorted(CORRUPT))
def test_corrupt_safetensors_shard_is_one_clear_error(case, layout, base, tmp_path, capsys):
    if layout == "sharded":
        model = sharded_copy(base, tmp_path / "model")
        victim = model / "model-00002-of-00002.safetensors"
    else:
        model = tmp_path / "model"
        model.mkdir()
        for f in base.iterdir():
            (model / f.name).write_bytes(f.read_bytes())
        victim = model / "model.safetensors"
    if case == "truncated-half":   # the intact copy trains: the corruption, not the copy, causes the error
        assert finetune("--model", model, "--data", DATA, *FAST, "--steps", 1, "--out", tmp_path / "ok") == 0
        capsys.readouterr()
    corrupt, why = CORRUPT[case]
    corrupt(victim)
    assert finetune("--model", model, "--data", DATA, *FAST, "--steps", 1, "--out", tmp_path / "out") == 2
    err = error_lines(capsys.readouterr().err)
    assert len(err) == 1, err
    assert err[0].startswith("ktmoe finetune: error: ") and str(victim) in err[0] and why in err[0], err[0]


# ---- c) full disk during a checkpoint save ----
def test_full_disk_during_save_keeps_previous_checkpoint(base, tmp_path):
    common = ["--model", base, "--data", DATA, *FAST, "--steps", 8, "--save-every", 2]
    ref = tmp_path / "ref"
    assert finetune(*common, "--out", ref) == 0
    out = tmp_path / "out"
    assert finetune(*common, "--out", out, "--stop-after", 4) == 0
    prev = out / "checkpoints" / "step-000004"
    before = {f.name: f.read_bytes() for f in prev.iterdir()}
    limit = min(len(before["trainable.safetensors"]), len(before["optimizer.pt"])) // 2
    assert limit > 64 * 1024 > (out / "log.jsonl").stat().st_size   # the log still fits: only the save fails

    def small_disk():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    work = tmp_path / "work"
    work.mkdir()
    p = spawn([*common, "--out", out, "--resume"], work, preexec_fn=small_disk)
    assert p.wait(300) == 2, (work / "stderr.txt").read_text()[-3000:]
    err = error_lines((work / "stderr.txt").read_text())
    assert len(err) == 1 and err[0].startswith("ktmoe finetune: error: "), err
    assert "step-000006" in err[0] and "File too large" in err[0] and str(prev) in err[0], err[0]
    assert [d.name for d in step_dirs(out)] == ["step-000002", "step-000004"]
    assert not list((out / "checkpoints").glob(".tmp-*"))
    assert {f.name: f.read_bytes() for f in prev.iterdir()} == before

    assert finetune(*common, "--out", out, "--resume") == 0
    assert losses(out) == losses(ref)
    assert same_adapter(ref, out)


# ---- d) NaN / Inf loss ----
@pytest.fixture
def optimizer_steps():
    calls = []
    handle = register_optimizer_step_pre_hook(lambda opt, args, kwargs: calls.append(1))
    yield calls
    handle.remove()


def check_stopped_at(out, step, err, optimizer_steps):
    err = error_lines(err)
    assert len(err) == 1 and err[0].startswith(f"ktmoe finetune: error: step {step}: the loss is "), err
    assert len(optimizer_steps) == step - 1, "the step with the non-finite loss was applied"
    log = losses(out)
    assert len(log) == step - 1 and all(torch.isfinite(torch.tensor(log)))
    assert not (out / "adapter").exists()
    ckpt, done = latest_complete(out)
    if step > 1:
        assert done == step - 1
        assert all(torch.isfinite(t).all() for t in load_file(ckpt / "trainable.safetensors").values())


def test_diverging_lr_stops_at_the_nan_step(base, tmp_path, capsys, optimizer_steps):
    out = tmp_path / "out"
    assert finetune("--model", base, "--data", DATA, *FAST, "--lr", "1e30", "--steps", 10, "--save-every", 1,
                    "--out", out) == 2
    err = capsys.readouterr().err
    first = error_lines(err)[0]
    step = int(first.split("step ")[1].split(":")[0])
    assert 1 < step <= 10, first
    check_stopped_at(out, step, err, optimizer_steps)


def test_nan_logits_at_a_chosen_step_stop_the_run(base, tmp_path, capsys, optimizer_steps, monkeypatch):
    """A NaN in the logits at step 4 only (a global forward hook on the output head)."""
    from ktmoe.finetune import data
    batches = []
    collate = data.collate
    monkeypatch.setattr(data, "collate", lambda *a, **k: (batches.append(1), collate(*a, **k))[1])

    def poison(module, args, output):
        if len(batches) == 4 and isinstance(module, torch.nn.Linear) and output.shape[-1] == tiny.VOCAB_SIZE:
            return output * float("nan")
    handle = torch.nn.modules.module.register_module_forward_hook(poison)
    try:
        out = tmp_path / "out"
        assert finetune("--model", base, "--data", DATA, *FAST, "--steps", 10, "--save-every", 1, "--out", out) == 2
    finally:
        handle.remove()
    check_stopped_at(out, 4, capsys.readouterr().err, optimizer_steps)
