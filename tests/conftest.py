"""pytest setup: which ktmoe is tested, the `isa` parameter (every path this CPU has) and
the error summary.

Kernel tests take an `isa` argument and run once per entry of ktmoe.available_isas().
The tests import the installed ktmoe (a wheel, or an editable install), never the source
tree's uncompiled ktmoe/: the repository root is taken off sys.path, also under
`python -m pytest`, which puts the current directory first. The numpy reference has one
import name, `ktmoe.reference` (reference/ installed into the package). Without an installed
ktmoe, the run stops with one line saying what to install.
"""
import importlib.metadata
import os
import sys
from pathlib import Path

import pytest

_ROOT = str(Path(__file__).resolve().parents[1])
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _ROOT]
NOT_INSTALLED = ("ktmoe is not installed in this Python ({}); the tests need the installed, compiled package "
                 "(the source tree's ktmoe/ is not): run `pip install torch==2.13.0 && pip install '.[test]'` "
                 "(or, to develop, `pip install "
                 "torch==2.13.0 meson-python meson ninja cython && pip install --no-build-isolation -e '.[test]'`)")


def _installed() -> bool:
    try:
        importlib.metadata.distribution("ktmoe")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def pytest_configure(config):
    if not _installed():
        pytest.exit(NOT_INSTALLED.format(sys.executable), returncode=pytest.ExitCode.USAGE_ERROR)


def pytest_generate_tests(metafunc):
    if "isa" in metafunc.fixturenames:
        import ktmoe
        metafunc.parametrize("isa", ktmoe.available_isas())


def pytest_terminal_summary(terminalreporter):
    tr = terminalreporter
    models = getattr(sys.modules.get("test_torch_models"), "WORST", None)
    if models:
        tr.section("largest gradient relative error vs eager HF+PEFT, per architecture (limit 1e-2)")
        for arch, (err, name) in sorted(models.items()):
            tr.write_line(f"    {arch:12s} {err:.3e}  ({name})")
    testing = sys.modules.get("ktmoe.testing")
    worst = getattr(testing, "WORST", None)
    if not worst:
        return
    tr.section("largest relative error vs reference (design.md 6 limit 1e-2), per ISA")
    for isa in sorted({isa for isa, _ in worst}):
        row = {t: e for (i, t), e in worst.items() if i == isa}
        tr.write_line(f"{isa}:")
        for tensor in sorted(row):
            err, cos, where = row[tensor]
            tr.write_line(f"    {tensor:28s} rel {err:.2e}   min cosine {cos:.6f}   worst in {where}")
