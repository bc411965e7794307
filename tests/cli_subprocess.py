"""The real `ktmoe` command in a subprocess, for the tests of what only a process shows: exit
statuses, signals, stderr as the user sees it, file modes under a umask, a closed stdout.

It runs `python -c RUNNER ARGS` (what the `ktmoe` script runs) from a directory outside the
source tree, so the installed package is imported, with $KTMOE_ISA / $KTMOE_NUM_THREADS taken
out of the environment unless `env` sets them.
"""
import os
import subprocess
import sys

RUNNER = "import sys, ktmoe.cli; sys.exit(ktmoe.cli.main(sys.argv[1:]))"


def environment(**env) -> dict:
    base = {k: v for k, v in os.environ.items() if k not in ("KTMOE_ISA", "KTMOE_NUM_THREADS")}
    return {**base, **env}


def popen(argv, cwd, env=None, **kw) -> subprocess.Popen:
    """`ktmoe ARGV` started in `cwd`; `env`: extra environment variables; `kw`: Popen's."""
    return subprocess.Popen([sys.executable, "-c", RUNNER, *map(str, argv)], cwd=cwd,
                            env=environment(**(env or {})), **kw)


def run(argv, cwd, env=None, timeout=300, **kw) -> subprocess.CompletedProcess:
    """`ktmoe ARGV` to its end; stdout and stderr captured as text."""
    return subprocess.run([sys.executable, "-c", RUNNER, *map(str, argv)], cwd=cwd, env=environment(**(env or {})),
                          capture_output=True, text=True, timeout=timeout, **kw)


def error_line(res, cmd: str) -> str:
    """The one `ktmoe CMD: error: ...` line of a failed run (exit status 2, no traceback, the
    last line on stderr, nothing on stdout), checked and returned."""
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2, (res.returncode, res.stdout[-2000:], res.stderr[-3000:])
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    errors = [ln for ln in lines if "error" in ln]
    assert len(errors) == 1 and lines[-1] == errors[0], res.stderr[-3000:]
    assert errors[0].startswith(f"ktmoe {cmd}: error: "), errors[0]
    return errors[0]
