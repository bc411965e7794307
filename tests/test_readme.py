"""The README's set-up against .ci/run (issue 22 item 11): the commands CI runs are the ones
the README gives, every pip line that installs torch pins it (an unpinned `torch` would let
pip pick any build, a multi-GB CUDA one on the public index), and the README says which build
the pinned one is and how to get the CPU wheel instead."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def read(name):
    path = ROOT / name
    if not path.is_file():
        pytest.fail(f"{path} missing: run the tests from a checkout of the repository")
    return path.read_text(encoding="utf-8")


def pip_lines(text):
    return [line.strip() for line in text.splitlines() if re.search(r"\bpip install\b", line)]


def installs_torch(line):
    return re.search(r"(?<![\w.-])torch(?![\w-])", line.split("pip install", 1)[1]) is not None


def test_ci_runs_the_readme_commands():
    ci = [line for line in pip_lines(read(".ci/run")) if not line.startswith("#")]
    readme = read("README.md")
    assert [line for line in ci if "torch" in line] == ["pip install -q torch==2.13.0"], ci
    assert "pip install torch==2.13.0 && pip install '.[test]' && pytest" in readme
    assert any("'.[test]'" in line for line in ci) and re.search(r"^pytest$", read(".ci/run"), re.M)


@pytest.mark.parametrize("name", ["README.md", ".ci/run", "docs/api.md", "docs/testing.md", "docs/benchmarks.md"])
def test_every_torch_install_is_pinned(name):
    for line in pip_lines(read(name)):
        for part in line.split("&&"):
            if "pip install" in part and installs_torch(part):
                assert re.search(r"(?<![\w.-])torch==\d", part), f"{name}: unpinned torch in {line!r}"


def test_readme_says_which_torch_build_is_installed():
    readme = read("README.md")
    assert "never pulls a CUDA" not in readme
    assert "CUDA build" in readme
    assert "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu" in readme


def slug(heading):
    """A heading's anchor as GitHub makes it: lower case, punctuation dropped, spaces to '-'."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("name", ["README.md", "docs/api.md", "docs/testing.md", "docs/benchmarks.md",
                                  "docs/design.md", "docs/performance-history.md"])
def test_relative_links_resolve(name):
    """Every relative link of the README and docs/ names a file that exists, and a heading in it."""
    here = (ROOT / name).parent
    for target, anchor in re.findall(r"\]\((?!https?:|mailto:)([^)#\s]*)(?:#([^)\s]+))?\)", read(name)):
        path = (here / target).resolve() if target else ROOT / name
        assert path.exists(), f"{name}: link to {target} (missing)"
        if anchor:
            headings = re.findall(r"^#+ (.+)$", path.read_text(encoding="utf-8"), re.M)
            assert anchor in {slug(h) for h in headings}, f"{name}: no heading #{anchor} in {target or name}"
