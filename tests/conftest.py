"""pytest setup: the `isa` parameter (every path this CPU has) and the error summary.

Kernel tests take an `isa` argument and run once per entry of ktmoe.available_isas().
ktmoe is imported lazily so that test_reference.py runs without the compiled package.
Run the suite with `pytest tests/` (not `python -m pytest` from the repo root, which would
put the source tree's ktmoe/ ahead of the installed one).
"""
import sys
from pathlib import Path

# `reference/` lives at the repo root; append (not prepend) so an installed ktmoe wins.
_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.append(_ROOT)


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
    helpers = sys.modules.get("helpers")
    worst = getattr(helpers, "WORST", None)
    if not worst:
        return
    tr.section("largest relative error vs reference (SPEC 6 limit 1e-2), per ISA")
    for isa in sorted({isa for isa, _ in worst}):
        row = {t: e for (i, t), e in worst.items() if i == isa}
        tr.write_line(f"{isa}:")
        for tensor in sorted(row):
            err, cos, where = row[tensor]
            tr.write_line(f"    {tensor:28s} rel {err:.2e}   min cosine {cos:.6f}   worst in {where}")
