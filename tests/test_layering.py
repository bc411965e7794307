"""The package's import layers (design.md 12): nothing imports upward.

    0 the kernel library: ktmoe, ktmoe._*, experts, formats, lora, testing, reference
    1 the torch adapter:  ktmoe.torch (with ktmoe.torch.checkpoint, the checkpoint reader)
    2 the fine-tune job:  ktmoe.finetune
    3 the commands:       ktmoe.cli, ktmoe.bench, ktmoe.finetune.cli (the finetune command's
                          flags), and `python -m` entries (__main__.py)

Every `import` / `from ... import` in the installed package's sources, lazy ones inside
functions included, is read with ast; a module may import its own layer or those below.
A second check imports ktmoe.torch and loads a checkpoint through it in a process where
ktmoe.finetune cannot be imported at all.
"""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

import ktmoe

PKG = Path(ktmoe.__file__).resolve().parent
LAYERS = [("ktmoe.cli", 3), ("ktmoe.bench", 3), ("ktmoe.finetune.cli", 3), ("ktmoe.finetune", 2), ("ktmoe.torch", 1), ("ktmoe", 0)]


def layer(module: str) -> int:
    if module.endswith(".__main__"):
        return 3
    for prefix, n in LAYERS:
        if module == prefix or module.startswith(prefix + "."):
            return n
    raise AssertionError(module)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(name: str) -> bool:
    rel = Path(*name.split(".")[1:])
    return (PKG / rel).with_suffix(".py").is_file() or (PKG / rel / "__init__.py").is_file()


def ktmoe_imports(source: str, mod: str, is_package: bool = False):
    """(line, imported ktmoe module) for every import in the source of module `mod`."""
    pkg = mod if is_package else mod.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                base = ".".join(up + ([node.module] if node.module else []))
            # `from X import Y` imports X, and X.Y when Y is a module
            names = [base] + [f"{base}.{a.name}" for a in node.names if is_module(f"{base}.{a.name}")]
        else:
            continue
        for name in names:
            if name == "ktmoe" or name.startswith("ktmoe."):
                yield node.lineno, name


def file_imports(path: Path):
    return ktmoe_imports(path.read_text(encoding="utf-8"), module_name(path), path.name == "__init__.py")


def test_no_import_runs_upward():
    files = sorted(p for p in PKG.rglob("*.py") if "_kernels" not in p.parts or p.name == "__init__.py")
    assert any(module_name(p) == "ktmoe.torch.checkpoint.loading" for p in files)
    upward = [f"{module_name(p)}:{line} imports {name} (layer {layer(name)} above {layer(module_name(p))})"
              for p in files for line, name in file_imports(p) if layer(name) > layer(module_name(p))]
    assert not upward, "\n".join(upward)


def test_layering_check_sees_an_upward_import():
    """The check above catches an upward import, a lazy relative one inside a function too."""
    src = "import ktmoe\n\ndef f():\n    from ..finetune import train\n"
    found = list(ktmoe_imports(src, "ktmoe.torch.probe"))
    assert found == [(1, "ktmoe"), (4, "ktmoe.finetune"), (4, "ktmoe.finetune.train")], found
    assert [name for _, name in found if layer(name) > layer("ktmoe.torch.probe")] == \
        ["ktmoe.finetune", "ktmoe.finetune.train"]


BLOCKED = """
import sys, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "ktmoe.finetune" or name.startswith("ktmoe.finetune."):
            raise ImportError("blocked: " + name)
sys.meta_path.insert(0, Block())
import ktmoe.torch
from ktmoe.torch.checkpoint import loading, reader
ckpt = reader.Checkpoint(sys.argv[1], require_tokenizer=False)
import torch
model, _ = loading.load(ckpt, device=torch.device("cpu"), dtype=torch.float32, max_tokens=64, num_threads=1)
assert loading.experts_modules(model)
assert not any(m.startswith("ktmoe.finetune") for m in sys.modules), sorted(sys.modules)
print("ok")
"""


def test_torch_adapter_loads_a_checkpoint_without_finetune(tmp_path):
    pytest.importorskip("torch")
    from ktmoe.finetune import tiny
    path = tiny.ensure(tmp_path / "tiny")   # the built-in tiny checkpoint, written by the job's module
    # run from tmp_path: `python -c` puts the current directory first on sys.path, and the repository
    # root's uncompiled ktmoe/ must not shadow the installed package
    r = subprocess.run([sys.executable, "-c", BLOCKED, str(path)], capture_output=True, text=True, timeout=600,
                       cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-3000:]
