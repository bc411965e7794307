"""The error contract of the real `ktmoe` command (README, Command line; issue 22 item 10): bad
input ends with one `ktmoe CMD: error: ...` line, exit status 2, no traceback and nothing left
behind, and the rerun the message suggests works.

- finetune: --threads 1000, $KTMOE_NUM_THREADS=abc, $KTMOE_ISA=bogus, --lr nan / inf,
  --lora-alpha nan, --max-grad-norm -1 (0 is "off"; a negative value is no setting): an error
  line, and --out is not created (nor left empty); an --out that was there stays as it was;
- an error found once --out exists (--warmup-steps above --steps) removes the --out it created;
- a diverging --lr: "try a lower --lr", and the same command with a lower one runs (no
  log.jsonl left to refuse it);
- verify honours $KTMOE_ISA: a path this CPU runs is the only one checked, a bogus one is an
  error line;
- `ktmoe verify | head -1` and `ktmoe bench ... | head -1` (stdout's reader gone): no
  traceback, nothing on stderr, exit status 141 (128 + SIGPIPE).
"""
import subprocess

import pytest

from ktmoe import _cpu
from ktmoe.finetune import tiny

import cli_subprocess

FAST = ["--quiet", "--batch-tokens", "1024", "--torch-threads", "1"]
BAD_FINETUNE = {
    "threads 1000": (["--threads", "1000"], {}, ["--threads", "at most 256", "1000"]),
    "KTMOE_NUM_THREADS=abc": ([], {"KTMOE_NUM_THREADS": "abc"}, ["$KTMOE_NUM_THREADS", "'abc'"]),
    "KTMOE_ISA=bogus": ([], {"KTMOE_ISA": "bogus"}, ["$KTMOE_ISA", "'bogus'"]),
    "lr nan": (["--lr", "nan"], {}, ["--lr", "finite", "nan"]),
    "lr inf": (["--lr", "inf"], {}, ["--lr", "finite", "inf"]),
    "lora-alpha nan": (["--lora-alpha", "nan"], {}, ["--lora-alpha", "finite", "nan"]),
    "max-grad-norm -1": (["--max-grad-norm", "-1"], {}, ["--max-grad-norm", ">= 0 (0: off)", "-1"]),
}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """The built-in tiny checkpoint, built once."""
    return tiny.ensure(tmp_path_factory.mktemp("tiny") / "base-model")


@pytest.mark.parametrize("case", list(BAD_FINETUNE))
def test_finetune_bad_input_is_one_error_line_and_no_out(case, tmp_path):
    flags, env, words = BAD_FINETUNE[case]
    out = tmp_path / "new" / "out"
    res = cli_subprocess.run(["finetune", "--out", out, "--steps", 1, *FAST, *flags], tmp_path, env=env)
    line = cli_subprocess.error_line(res, "finetune")
    assert all(w in line for w in words), (words, line)
    assert not (tmp_path / "new").exists(), "the failed run left --out behind"


def test_error_keeps_an_existing_out_as_it_was(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine\n")
    res = cli_subprocess.run(["finetune", "--out", out, "--steps", 1, *FAST], tmp_path, env={"KTMOE_ISA": "bogus"})
    cli_subprocess.error_line(res, "finetune")
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_error_after_out_was_made_removes_it(base, tmp_path):
    out = tmp_path / "a" / "b"
    res = cli_subprocess.run(["finetune", "--model", base, "--data", tiny.dataset_path(), "--out", out, *FAST,
                              "--steps", 2, "--warmup-steps", 5], tmp_path)
    assert "--warmup-steps 5: must be between 0 and the 2 training steps" in cli_subprocess.error_line(res, "finetune")
    assert not (tmp_path / "a").exists(), "the failed run left --out behind"


def test_diverging_lr_suggests_a_rerun_that_works(base, tmp_path):
    argv = ["finetune", "--model", base, "--data", tiny.dataset_path(), "--out", tmp_path / "out", *FAST, "--steps", 3]
    res = cli_subprocess.run([*argv, "--lr", "1e30"], tmp_path)
    line = cli_subprocess.error_line(res, "finetune")
    assert "the loss is nan (try a lower --lr)" in line, line
    assert not (tmp_path / "out").exists()
    res = cli_subprocess.run([*argv, "--lr", "3e-3"], tmp_path)     # what the message suggests
    assert res.returncode == 0, res.stderr[-3000:]


def _verify_paths(stdout):
    """The path column of verify's result rows."""
    return {ln.split()[0] for ln in stdout.splitlines() if ln.split() and ln.split()[0] in _cpu.ISAS}


def test_verify_checks_only_the_ktmoe_isa_path(tmp_path):
    res = cli_subprocess.run(["verify", "--weights", "bf16", "--threads", 1], tmp_path, env={"KTMOE_ISA": "portable"})
    assert res.returncode == 0, res.stderr[-3000:]
    assert _verify_paths(res.stdout) == {"portable"}, res.stdout


@pytest.mark.parametrize("value", ["bogus", *[isa for isa in _cpu.ISAS if isa not in _cpu.available_isas()]])
def test_verify_rejects_a_ktmoe_isa_it_cannot_run(tmp_path, value):
    res = cli_subprocess.run(["verify", "--weights", "bf16"], tmp_path, env={"KTMOE_ISA": value})
    line = cli_subprocess.error_line(res, "verify")
    assert "$KTMOE_ISA" in line and repr(value) in line, line
    assert res.stdout == ""


def test_verify_into_head_1(tmp_path):
    p = cli_subprocess.popen(["verify", "--weights", "bf16", "--threads", 1], tmp_path, env={"KTMOE_ISA": "portable"},
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = p.stdout.readline()            # `| head -1`: one line read, then the reader goes away
    p.stdout.close()
    err = p.stderr.read().decode()
    assert p.wait(300) == 141, err[-3000:]
    assert first.startswith(b"relative Frobenius error") and err == ""


def test_bench_into_a_closed_pipe(tmp_path):
    p = cli_subprocess.popen(["bench", "--shapes", "qwen3-16", "--passes", "fwd", "--baselines", "none",
                              "--weights", "bf16", "--repeat", 1, "--threads", 1], tmp_path,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.close()                       # the reader is gone before the first line is written
    err = p.stderr.read().decode()
    assert p.wait(300) == 141, err[-3000:]
    assert err == ""
