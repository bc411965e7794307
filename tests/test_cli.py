"""The `ktmoe` command line: every bad flag value or environment variable of bench, verify
and info ends with exactly one "ktmoe CMD: error: ..." line naming the culprit and exit
status 2, before any work starts; --help is user-facing text; verify's header names each
printed column; `python -m pytest` from the repository root tests the installed package.

Most cases call ktmoe.cli.main(argv) in-process (argparse's own errors arrive as SystemExit).
"""
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import ktmoe
from ktmoe import _cpu, cli

ROOT = Path(__file__).resolve().parents[1]
MISSING_ISAS = [isa for isa in _cpu.ISAS if isa not in _cpu.available_isas()]


def run_cli(capsys, *argv):
    try:
        rc = cli.main([str(a) for a in argv])
    except SystemExit as e:   # argparse: usage errors, --help, --version
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def assert_usage_error(capsys, argv, *words):
    """argv fails with exit status 2 and exactly one error line, 'ktmoe CMD: error: ...',
    the last line on stderr, holding every one of `words`; nothing on stdout."""
    rc, out, err = run_cli(capsys, *argv)
    lines = err.strip().splitlines()
    assert rc == 2, (rc, out, err)
    errors = [ln for ln in lines if "error" in ln]
    assert len(errors) == 1 and lines[-1] == errors[0], err
    assert errors[0].startswith(f"ktmoe {argv[0]}: error: "), err
    for w in words:
        assert w in errors[0], (w, err)
    assert "Traceback" not in err and out == "", (out, err)
    return errors[0]


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    monkeypatch.delenv(_cpu.ENV_VAR, raising=False)
    monkeypatch.delenv(_cpu.THREADS_ENV_VAR, raising=False)


# ---------------------------------------------------------------- bench

BAD_COUNTS = [("0", "must be >= 1"), ("-3", "must be >= 1"), ("two", "expected an integer"), ("1.5", "expected an integer")]


@pytest.mark.parametrize("value, why", BAD_COUNTS + [("257", "at most 256")])
def test_bench_threads(capsys, value, why):
    assert_usage_error(capsys, ["bench", "--threads", value], "--threads", why)


@pytest.mark.parametrize("value, why", BAD_COUNTS)
def test_bench_repeat(capsys, value, why):
    assert_usage_error(capsys, ["bench", "--repeat", value], "--repeat", why)


@pytest.mark.parametrize("flag, value, words", [
    ("--shapes", "nosuch", ["'nosuch'", "qwen3-16"]),
    ("--shapes", "qwen3-16,nosuch", ["unknown 'nosuch'"]),
    ("--shapes", "", ["empty name"]),
    ("--shapes", "qwen3-16,", ["empty name"]),
    ("--shapes", "qwen3-16,qwen3-16", ["'qwen3-16' given more than once"]),
    ("--passes", "bwd", ["unknown 'bwd'", "fwdbwd"]),
    ("--baselines", "nosuch", ["unknown 'nosuch'", "grouped"]),
    ("--baselines", "none,eager", ["none cannot be combined"]),
    ("--baselines", "eager,eager", ["given more than once"]),
    ("--weights", "fp4", ["unknown 'fp4'", "fp8"]),
    ("--weights", "all,fp8", ["all cannot be combined"]),
])
def test_bench_names(capsys, flag, value, words):
    assert_usage_error(capsys, ["bench", flag, value], flag, *words)


def test_bench_json_unwritable(capsys, tmp_path):
    assert_usage_error(capsys, ["bench", "--json", tmp_path / "no" / "such" / "r.json"], "--json",
                       "not a writable directory")
    assert_usage_error(capsys, ["bench", "--json", tmp_path], "--json", "is a directory")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("value, words", [("0", ["$KTMOE_NUM_THREADS", "'0'"]), ("lots", ["'lots'"]),
                                          ("300", ["[1, 256]"])])
def test_bench_threads_env(capsys, monkeypatch, value, words):
    monkeypatch.setenv(_cpu.THREADS_ENV_VAR, value)
    assert_usage_error(capsys, ["bench"], "$KTMOE_NUM_THREADS", *words)


def test_bench_isa_env(capsys, monkeypatch):
    monkeypatch.setenv(_cpu.ENV_VAR, "nosuch")
    assert_usage_error(capsys, ["bench"], "$KTMOE_ISA", "'nosuch'")
    for isa in MISSING_ISAS:
        monkeypatch.setenv(_cpu.ENV_VAR, isa)
        assert_usage_error(capsys, ["bench"], "$KTMOE_ISA", f"'{isa}'", "cannot run here")


def test_bench_eager_needs_transformers(capsys, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "peft" else real(name, *a))
    assert_usage_error(capsys, ["bench", "--baselines", "eager"], "peft not installed", "--baselines grouped")


# ---------------------------------------------------------------- verify

@pytest.mark.parametrize("missing", MISSING_ISAS)
def test_verify_unavailable_isa(capsys, missing):
    line = assert_usage_error(capsys, ["verify", "--isa", missing], "--isa", f"'{missing}' cannot run on this CPU")
    assert _cpu.unavailable_reasons()[missing] in line


def test_verify_unknown_isa(capsys):
    assert_usage_error(capsys, ["verify", "--isa", "sse2"], "--isa", "unknown kernel path 'sse2'", "portable")


@pytest.mark.parametrize("value, why", BAD_COUNTS + [("1000", "at most 256")])
def test_verify_threads(capsys, value, why):
    assert_usage_error(capsys, ["verify", "--threads", value], "--threads", why)


def test_verify_weights(capsys):
    assert_usage_error(capsys, ["verify", "--weights", "fp4"], "--weights", "'fp4'")


def test_verify_threads_env(capsys, monkeypatch):
    monkeypatch.setenv(_cpu.THREADS_ENV_VAR, "-1")
    assert_usage_error(capsys, ["verify", "--isa", "portable"], "$KTMOE_NUM_THREADS", "'-1'")


def test_verify_header_names_every_column(capsys):
    rc, out, err = run_cli(capsys, "verify", "--isa", "portable", "--weights", "bf16", "--threads", "1")
    assert rc == 0, err
    lines = out.strip().splitlines()
    header = next(ln for ln in lines if ln.startswith("path"))
    rows = [ln for ln in lines if ln.startswith("portable")]
    assert len(rows) == len(cli.VERIFY_SHAPES) and lines[-1].startswith("PASS")
    for name in ("path", "weights", "E,H,I,T,k,r", "fwd ms", "bwd ms"):
        assert name in header
    for row in rows:
        # path, weights, shape, fwd ms, bwd ms, then one error per VERIFY_COLUMNS name, each
        # printed right under its name
        values = list(re.finditer(r"\S+", row))
        assert len(values) == 5 + len(cli.VERIFY_COLUMNS), row
        for name, v in zip(cli.VERIFY_COLUMNS, values[5:]):
            assert header[v.start():v.end()].strip() == name, (header, row)
            assert float(v.group()) <= cli.TOLERANCE


# ---------------------------------------------------------------- info, top level

@pytest.mark.parametrize("var, value, words", [
    (_cpu.ENV_VAR, "nosuch", ["$KTMOE_ISA", "unknown kernel path 'nosuch'"]),
    (_cpu.THREADS_ENV_VAR, "0", ["$KTMOE_NUM_THREADS", "[1, 256]"]),
    *[(_cpu.ENV_VAR, isa, ["$KTMOE_ISA", f"'{isa}'", "cannot run here"]) for isa in MISSING_ISAS],
])
def test_info_env(capsys, monkeypatch, var, value, words):
    monkeypatch.setenv(var, value)
    assert_usage_error(capsys, ["info"], *words)


def test_info(capsys):
    rc, out, err = run_cli(capsys, "info")
    assert rc == 0 and err == ""
    assert f"path in use  : {_cpu.select_isa()[0]}" in out


@pytest.mark.parametrize("argv", [["info", "--threads", "2"], ["verify", "extra"], ["bench", "--nosuch", "1"]])
def test_unknown_arguments(capsys, argv):
    assert_usage_error(capsys, argv, "unrecognized arguments", argv[1])


@pytest.mark.parametrize("argv", [[], ["nosuch"], ["--nosuch"]])
def test_top_level_usage_errors(capsys, argv):
    rc, out, err = run_cli(capsys, *argv)
    assert rc == 2 and out == "" and err.strip().splitlines()[-1].startswith("ktmoe: error: ")


def test_help_is_for_users(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    rc, out, err = run_cli(capsys, "--help")
    assert rc == 0
    assert "add_arguments" not in out and "run(args)" not in out and "import" not in out
    lines = out.splitlines()
    for name in ("finetune", "bench", "verify", "info"):
        i = next(i for i, ln in enumerate(lines) if ln.split()[:1] == [name])
        assert len(lines[i].split()) > 3, lines[i]          # a description follows the name,
        assert not (lines[i + 1].startswith(" " * 8) and lines[i + 1].strip()), out    # on one line
    assert "ktmoe COMMAND --help" in out
    rc, out, _ = run_cli(capsys, "--version")
    assert rc == 0 and out.strip() == f"ktmoe {ktmoe.__version__}"


@pytest.mark.parametrize("cmd", ["bench", "verify", "info", "finetune"])
def test_subcommand_help(capsys, cmd):
    rc, out, err = run_cli(capsys, cmd, "--help")
    assert rc == 0 and out.startswith(f"usage: ktmoe {cmd}")


# ---------------------------------------------------------------- the test command itself

def test_python_m_pytest_from_repo_root():
    """`python -m pytest` from the repository root (source tree first on sys.path) still
    imports the installed, compiled ktmoe."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        "tests/test_cli.py::test_info"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "1 passed" in r.stdout
