"""SIGTERM and SIGHUP stop `ktmoe finetune` as Ctrl-C does (issue 22 item 2): batch schedulers
(Slurm, Kubernetes) preempt with SIGTERM, a closed terminal sends SIGHUP.

- a real `ktmoe finetune` subprocess with the default --save-every gets SIGTERM after its
  second step: it finishes the step it is in, writes a checkpoint of it, prints one line
  saying how to continue and exits with status 143 (128 + 15, as a shell reports a command
  SIGTERM ended); `--resume` then continues from that checkpoint to the end;
- SIGHUP in the middle of an optimizer update (in-process, as the Ctrl-C test of
  test_finetune.py does it): the step completes, a checkpoint of it is written, exit 129;
- SIGTERM before the first step leaves nothing that stops the same command from running.
"""
import json
import signal
import time

import pytest
import torch

import ktmoe.cli
from ktmoe.finetune import tiny

import cli_subprocess

FAST = ["--quiet", "--lr", "3e-3", "--batch-tokens", "1024", "--torch-threads", "1"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """The built-in tiny checkpoint, built once."""
    return tiny.ensure(tmp_path_factory.mktemp("tiny") / "base-model")


def raise_handled(sig):
    """Sends `sig` to this process, unless its default action (ending pytest) is still in place."""
    assert signal.getsignal(sig) is not signal.SIG_DFL, f"{sig.name} during the run would end the process"
    signal.raise_signal(sig)


def logged(out):
    path = out / "log.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def test_sigterm_checkpoints_and_resume_finishes(base, tmp_path):
    steps = 12
    argv = ["finetune", "--model", base, "--data", tiny.dataset_path(), *FAST, "--steps", steps, "--out", tmp_path / "out"]
    out = tmp_path / "out"
    with open(tmp_path / "stderr.txt", "wb") as err:
        p = cli_subprocess.popen(argv, tmp_path, stdout=err, stderr=err)
    try:
        deadline = time.time() + 240
        while len(logged(out)) < 2:   # the default --save-every (50): no checkpoint yet
            assert p.poll() is None and time.time() < deadline, (tmp_path / "stderr.txt").read_text()[-3000:]
            time.sleep(0.02)
        p.send_signal(signal.SIGTERM)
        rc = p.wait(120)
    finally:
        if p.poll() is None:
            p.kill()
    err = (tmp_path / "stderr.txt").read_text()
    done = len(logged(out))
    assert rc == 128 + signal.SIGTERM, (rc, err[-3000:])
    assert 2 <= done < steps, f"SIGTERM after step 2 stopped after step {done} of {steps}"
    ckpt = out / "checkpoints" / f"step-{done:06d}"
    assert err.strip().splitlines()[-1] == (f"ktmoe finetune: terminated (SIGTERM): stopped after step {done} of "
                                            f"{steps}; {ckpt} holds it: continue with the same flags plus --resume")
    assert "Traceback" not in err
    assert [p.name for p in (out / "checkpoints").iterdir()] == [ckpt.name] and (ckpt / "state.json").is_file()
    first = logged(out)

    res = cli_subprocess.run([*argv, "--resume"], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    log = logged(out)
    assert [e["step"] for e in log] == list(range(1, steps + 1)) and log[:done] == first
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


def test_sighup_during_an_optimizer_update_checkpoints_that_step(base, tmp_path, capsys, monkeypatch):
    previous = signal.signal(signal.SIGHUP, signal.SIG_DFL)   # as in a terminal (not under nohup)
    real_step, calls = torch.optim.AdamW.step, []

    def step(self, *a, **kw):
        result = real_step(self, *a, **kw)
        calls.append(1)
        if len(calls) == 2:                        # right after the parameters changed
            raise_handled(signal.SIGHUP)
        return result
    out = tmp_path / "out"
    try:
        with monkeypatch.context() as m:
            m.setattr(torch.optim.AdamW, "step", step)
            rc = ktmoe.cli.main(["finetune", "--model", str(base), "--data", str(tiny.dataset_path()), *FAST,
                                 "--steps", "6", "--out", str(out)])
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_DFL   # the run's handler is gone with the run
    finally:
        signal.signal(signal.SIGHUP, previous)
    assert rc == 128 + signal.SIGHUP
    err = capsys.readouterr().err
    assert (f"ktmoe finetune: terminated (SIGHUP): stopped after step 2 of 6; {out / 'checkpoints' / 'step-000002'} "
            "holds it: continue with the same flags plus --resume") in err, err
    assert len(logged(out)) == 2 and [p.name for p in (out / "checkpoints").iterdir()] == ["step-000002"]


def test_sigterm_before_the_first_step_leaves_out_rerunnable(base, tmp_path, capsys, monkeypatch):
    from ktmoe.finetune import data
    real = data.collate

    def collate(*a, **kw):   # SIGTERM arrives while the first batch is made
        raise_handled(signal.SIGTERM)
        return real(*a, **kw)
    argv = ["finetune", "--model", str(base), "--data", str(tiny.dataset_path()), *FAST, "--steps", "1",
            "--out", str(tmp_path / "out")]
    with monkeypatch.context() as m:
        m.setattr(data, "collate", collate)
        assert ktmoe.cli.main(argv) == 128 + signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    err = capsys.readouterr().err
    assert "ktmoe finetune: terminated (SIGTERM): nothing was trained yet" in err and "run the same command again" \
        in err, err
    assert ktmoe.cli.main(argv) == 0               # as advised
    assert len(logged(tmp_path / "out")) == 1
