"""The C sources of ktmoe/_kernels as a tree: the lists kept in several places agree, and the
files depend on each other without circles (docs/design.md 5 and 8).

- Formats: ktmoe/formats.py is the one list of weight formats and activation modes. Its
  WEIGHT_FORMATS must match the C enum kt_wformat (ktmoe.h), its MODES the format rows listed in
  meson.build (`fmt_rows`, from which meson writes the C table's X-macro KT_FORMATS and the
  per-target source list), and each row's file formats/fmt_<row>.c must define the row of
  exactly that (weight format, activation mode) pair.
- Dependencies: no #include circle, and no circle between .c files, where file a depends on
  file b when a names a function or table that b defines (the per-target names kt_x_<isa>,
  KT_FN(kt_x) and kt_x_##name are one name kt_x). This is the circle a header hides: two files
  each calling into the other through a header both include.
- Names: no identifier is both a type and a function, and no two headers have the same words in
  another order (amx_gemm.h next to gemm_amx.h).

The checks read the source tree relative to this file and are skipped where it is absent (an
installed wheel without its sources). They are plain text parsers of this tree's own style, not C
parsers: each one is tested below on a copy of a list edited out of agreement.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from ktmoe.formats import MODES, WEIGHT_FORMATS

KERNELS = Path(__file__).resolve().parent.parent / "ktmoe" / "_kernels"
pytestmark = pytest.mark.skipif(not (KERNELS / "meson.build").is_file() or not (KERNELS / "ktmoe.h").is_file(),
                                reason="the kernel sources are not in this tree")

ROOMS = ("gemm", "formats", "layer", "runtime")


# ---- reading the tree ----------------------------------------------------------------------------

def _strip_comments(text: str) -> str:
    """C text without comments and string literals (both replaced by a space)."""
    return re.sub(r'/\*.*?\*/|//[^\n]*|"(?:\\.|[^"\\\n])*"', " ", text, flags=re.S)


def _sources(root: Path) -> dict[str, str]:
    """path relative to root -> text, for every .c / .h / .h.in file of the tree."""
    files = [p for p in root.rglob("*") if p.is_file() and (p.suffix in (".c", ".h") or p.name.endswith(".h.in"))]
    return {p.relative_to(root).as_posix(): p.read_text() for p in sorted(files)}


def _meson_list(meson: str, name: str) -> list[str]:
    m = re.search(rf"^{name}\s*=\s*\[(.*?)\]", meson, flags=re.S | re.M)
    assert m, f"meson.build: no list `{name} = [...]`"
    return re.findall(r"'([^']*)'", m.group(1))


def _isa_names(meson: str) -> list[str]:
    block = re.search(r"^isa_targets\s*=\s*\[(.*?)^\]", meson, flags=re.S | re.M)
    assert block, "meson.build: no isa_targets list"
    return re.findall(r"^\s*\['(\w+)'", block.group(1), flags=re.M)


# ---- formats: formats.py, the C enum, meson's row list and the row files --------------------------

def _c_wformats(ktmoe_h: str) -> dict[str, int]:
    m = re.search(r"enum\s+kt_wformat\s*\{(.*?)\}", ktmoe_h, flags=re.S)
    assert m, "ktmoe.h: no enum kt_wformat"
    return {name.lower(): int(v) for name, v in re.findall(r"KT_W_(\w+)\s*=\s*(\d+)", m.group(1))}


def _row_pair(fmt_c: str, row: str) -> tuple[str, str]:
    """(weights, activations) of the row `const kt_fmt_ops KT_FN(kt_fmt_<row>) = {...}`."""
    m = re.search(rf"kt_fmt_ops\s+KT_FN\(kt_fmt_{row}\)\s*=\s*\{{(.*?)\}};", fmt_c, flags=re.S)
    assert m, f"fmt_{row}.c: no row kt_fmt_{row}"
    w = re.search(r"\.wformat\s*=\s*KT_W_(\w+)", m.group(1))
    a = re.search(r"\.act_int8\s*=\s*(\d)", m.group(1))
    assert w and a, f"fmt_{row}.c: the row names no .wformat / .act_int8"
    return w.group(1).lower(), "int8" if a.group(1) == "1" else "bf16"


def format_disagreements(root: Path, weight_formats=None, modes=None) -> list[str]:
    """Every way the C side's format lists differ from formats.py (empty: they agree)."""
    weight_formats = WEIGHT_FORMATS if weight_formats is None else weight_formats
    modes = MODES if modes is None else modes
    bad = []
    enum = _c_wformats((root / "ktmoe.h").read_text())
    py = {f.name: f.c_code for f in weight_formats.values()}
    if enum != py:
        bad.append(f"ktmoe.h enum kt_wformat {enum} != formats.py WEIGHT_FORMATS {py}")
    meson = (root / "meson.build").read_text()
    rows = _meson_list(meson, "fmt_rows")
    labels = [m.label for m in modes]
    if sorted(rows) != sorted(labels) or len(set(rows)) != len(rows):
        bad.append(f"meson.build fmt_rows {rows} != formats.py MODES labels {labels}")
    for m in modes:
        path = root / "formats" / f"fmt_{m.label}.c"
        if not path.is_file():
            bad.append(f"formats/fmt_{m.label}.c missing (MODES row {m.label})")
            continue
        pair = _row_pair(path.read_text(), m.label)
        if pair != (m.weights, m.activations):
            bad.append(f"formats/fmt_{m.label}.c defines the row of {pair}, formats.py MODES says "
                       f"{(m.weights, m.activations)}")
    on_disk = sorted(p.stem[4:] for p in (root / "formats").glob("fmt_*.c")) if (root / "formats").is_dir() else []
    shared = {"table", "weight_only"}   # the table itself and the weight-only loops, not rows
    extra = [r for r in on_disk if r not in labels and r not in shared]
    if extra:
        bad.append(f"formats/fmt_*.c without a formats.py MODES row: {extra}")
    table = (root / "formats" / "fmt_table.c").read_text() if (root / "formats" / "fmt_table.c").is_file() else ""
    if re.search(r"#define\s+KT_FORMATS\b", table):
        bad.append("formats/fmt_table.c spells out KT_FORMATS itself (meson writes it from fmt_rows)")
    return bad


def test_format_lists_agree_with_formats_py():
    assert format_disagreements(KERNELS) == []


def test_format_check_fails_when_a_list_is_edited(tmp_path):
    """The check above on copies of the tree, each with one list edited out of agreement."""
    import dataclasses
    import shutil
    tree = tmp_path / "k"
    shutil.copytree(KERNELS, tree, ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    assert format_disagreements(tree) == []
    h = (tree / "ktmoe.h").read_text()
    (tree / "ktmoe.h").write_text(h.replace("KT_W_FP8 = 3", "KT_W_FP8 = 5"))
    assert any("enum kt_wformat" in b for b in format_disagreements(tree))
    (tree / "ktmoe.h").write_text(h)
    meson = (tree / "meson.build").read_text()
    (tree / "meson.build").write_text(meson.replace("'w4a8', ", "", 1))
    assert any("fmt_rows" in b for b in format_disagreements(tree))
    (tree / "meson.build").write_text(meson)
    row = (tree / "formats" / "fmt_w8a8.c").read_text()
    (tree / "formats" / "fmt_w8a8.c").write_text(row.replace(".act_int8 = 1", ".act_int8 = 0"))
    assert any("fmt_w8a8.c defines" in b for b in format_disagreements(tree))
    (tree / "formats" / "fmt_w8a8.c").write_text(row)
    fewer = {k: v for k, v in WEIGHT_FORMATS.items() if k != "int4bs"}
    assert any("WEIGHT_FORMATS" in b for b in format_disagreements(tree, weight_formats=fewer))
    renamed = tuple(dataclasses.replace(m, label="w8a8x") if m.label == "w8a8" else m for m in MODES)
    assert format_disagreements(tree, modes=renamed)
    assert format_disagreements(tree) == []


# ---- dependencies: #include graph and the graph of who calls whom --------------------------------

def include_graph(root: Path, texts: dict[str, str]) -> tuple[dict[str, set[str]], list[str]]:
    """file -> the files it #includes (quoted includes, resolved as the compiler does: the
    including file's folder, then the top of _kernels; a generated header X.h is its X.h.in);
    and the includes that resolve to no file."""
    graph, unresolved = {}, []
    for path, text in texts.items():
        here = Path(path).parent
        graph[path] = set()
        for inc in re.findall(r'^\s*#\s*include\s+"([^"]+)"', text, flags=re.M):
            found = None
            for cand in ((here / inc).as_posix(), inc):
                cand = re.sub(r"(^|/)\./", r"\1", cand)
                if cand in texts:
                    found = cand
                    break
            if found is None:  # a header meson generates from a template of the same name
                gen = [p for p in texts if p.endswith("/" + inc + ".in") or p == inc + ".in"]
                found = gen[0] if len(gen) == 1 else None
            if found is None:
                unresolved.append(f"{path}: #include \"{inc}\"")
            else:
                graph[path].add(found)
    return graph, unresolved


_IDENT = re.compile(r"\b[A-Za-z_]\w*\b")


def _without_directives(code: str) -> str:
    """code without its preprocessor lines (continuation lines included)."""
    return re.sub(r"^[ \t]*#(?:[^\n]*\\\n)*[^\n]*", " ", code, flags=re.M)


def _per_target(code: str, isas: list[str]) -> str:
    """The per-target spellings of a name written out for every target: KT_FN(x) and
    CAT(x_, KT_ISA) become x_<isa> for each isa of meson.build's list."""
    def every(m):
        return " ".join(f"{m.group(1)}_{isa}" for isa in isas)
    code = re.sub(r"\bKT_FN\(\s*(\w+)\s*\)", every, code)
    return re.sub(r"\bCAT\(\s*(\w+?)_?\s*,\s*KT_ISA\s*\)", every, code)


def _top_level(code: str, static_words: set[str]) -> tuple[set[str], set[str]]:
    """(names of the functions and tables defined at the top level with external linkage,
    names of every function defined at the top level, static ones included)."""
    code = _without_directives(code)
    external, every, depth, start = set(), set(), 0, 0
    for i, ch in enumerate(code):
        if ch == "{":
            if depth == 0:
                head = code[start:i].strip()
                first = head.split(None, 1)[0] if head else ""
                is_static = first in static_words
                fn = re.search(r"(\w+)\s*\([^()]*(?:\([^()]*\)[^()]*)*\)\s*(?:__attribute__\S*)?$", head, flags=re.S)
                table = re.search(r"(\w+)\s*(?:\[[^\]]*\])?\s*=\s*$", head)
                if first in ("typedef", "enum", "struct", "union") and not table:
                    pass
                elif fn and "=" not in head:
                    every.add(fn.group(1))
                    if not is_static:
                        external.add(fn.group(1))
                elif table and not is_static and first != "typedef":
                    external.add(table.group(1))
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                start = i + 1
        elif ch == ";" and depth == 0:
            start = i + 1
    return external, every


def _static_words(texts: dict[str, str]) -> set[str]:
    """static, and the macros that stand for it (#define KT_AI static inline ...)."""
    words = {"static"}
    for text in texts.values():
        words |= set(re.findall(r"^\s*#\s*define\s+(\w+)\s+static\b", text, flags=re.M))
    return words


def _aliases(text: str) -> dict[str, str]:
    """Object-like macros of a file that stand for a per-target name (#define GEMM_NT KT_FN(kt_gemm_nt))."""
    return dict(re.findall(r"^\s*#\s*define\s+(\w+)\s+KT_FN\((\w+)\)\s*$", text, flags=re.M))


def _target_files(meson: str) -> dict[str, list[str]]:
    """A GEMM file of meson.build's target list -> the targets it is compiled for."""
    out: dict[str, list[str]] = {}
    block = re.search(r"^isa_targets\s*=\s*\[(.*?)^\]", meson, flags=re.S | re.M)
    for name, files in re.findall(r"\['(\w+)',.*?\[([^\[\]]*)\]\]", block.group(1), flags=re.S):
        for f in re.findall(r"'([^']+)'", files):
            out.setdefault(f, []).append(name)
    return out


def _reach(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = {start}, [start]
    while todo:
        for w in graph.get(todo.pop(), ()):
            if w not in seen:
                seen.add(w)
                todo.append(w)
    return seen


def call_graph(root: Path, texts: dict[str, str]) -> dict[str, dict[str, set[str]]]:
    """.c file -> {.c file it depends on: the names it uses from there}."""
    meson = (root / "meson.build").read_text()
    all_isas = _isa_names(meson)
    targets = _target_files(meson)
    isa_tail = "(?:" + "|".join(all_isas) + ")"
    static_words = _static_words(texts)
    includes, _ = include_graph(root, texts)
    code = {p: _strip_comments(t) for p, t in texts.items() if p.endswith(".c")}
    isas_of = {p: targets.get(p, all_isas) for p in code}
    aliases = {}
    for p in code:   # the aliases of the headers a file includes, directly or not
        aliases[p] = {}
        for h in _reach(includes, p):
            aliases[p].update(_aliases(texts[h]))

    def expand(p: str, c: str, isas: list[str]) -> str:
        for alias, name in aliases[p].items():
            c = re.sub(rf"\b{alias}\b", f"KT_FN({name})", c)
        return _per_target(c, isas)

    defined_in: dict[str, set[str]] = {}
    own: dict[str, set[str]] = {}
    for path, c in code.items():
        external, every = _top_level(expand(path, c, isas_of[path]), static_words)
        own[path] = external | every
        for name in external:
            defined_in.setdefault(name, set()).add(path)
    graph = {}
    for path, c in code.items():
        # names pasted by an X-macro: KT_FN(p##name) is p<row>_<isa>, p##name is p<anything>
        patterns = [re.compile(re.escape(p) + r"\w+_" + isa_tail + "$")
                    for p in re.findall(r"\bKT_FN\(\s*(\w+)\s*##\s*\w+\s*\)", c)]
        rest = re.sub(r"\bKT_FN\(\s*\w+\s*##\s*\w+\s*\)", " ", c)
        patterns += [re.compile(re.escape(p) + r"\w+$") for p in re.findall(r"\b(\w+)\s*##\s*\w+", rest)]
        words = set(_IDENT.findall(expand(path, rest, isas_of[path])))
        words |= {n for n in defined_in for pat in patterns if pat.match(n)}
        deps: dict[str, set[str]] = {}
        for name in words - own[path]:
            for other in defined_in.get(name, ()):
                if other != path:
                    deps.setdefault(other, set()).add(name)
        graph[path] = deps
    return graph


def circles(graph: dict[str, object]) -> list[list[str]]:
    """The strongly connected components of more than one node (Tarjan), each sorted."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in graph.get(v, ()):
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def dependency_problems(root: Path) -> list[str]:
    texts = _sources(root)
    inc, unresolved = include_graph(root, texts)
    bad = list(unresolved)
    bad += [f"#include circle: {' <-> '.join(c)}" for c in circles(inc)]
    calls = call_graph(root, texts)
    for comp in circles(calls):
        links = [f"{a} -> {b} ({', '.join(sorted(calls[a][b])[:3])})" for a in comp for b in comp if b in calls[a]]
        bad.append("call circle: " + "; ".join(links))
    return bad


def test_kernels_have_rooms():
    stray = [p.name for p in KERNELS.iterdir() if p.is_file() and p.suffix == ".c"]
    assert stray == [], f"C files outside the rooms {ROOMS}: {stray}"
    for room in ROOMS:
        assert (KERNELS / room).is_dir(), room


def test_no_include_or_call_circles():
    assert dependency_problems(KERNELS) == []


def test_circle_check_finds_a_circle(tmp_path):
    """The check on a copy of the tree with one circle put back: a format row's storage (qmat.c)
    calling into the layer's life cycle (moe_layer.c), which reaches the rows through the table."""
    import shutil
    tree = tmp_path / "k"
    shutil.copytree(KERNELS, tree, ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    assert dependency_problems(tree) == []
    qmat = tree / "formats" / "qmat.c"
    qmat.write_text(qmat.read_text() + "\nvoid kt_qmat_probe(kt_layer *L) { kt_layer_destroy(L); }\n")
    found = dependency_problems(tree)
    assert any("call circle" in b and "formats/qmat.c" in b and "layer/moe_layer.c" in b for b in found), found
    hdr = tree / "gemm" / "gemm.h"
    hdr.write_text(hdr.read_text().replace('#include "kt_isas.h"', '#include "kt_isas.h"\n#include "gemm_int8.h"'))
    i8 = tree / "gemm" / "gemm_int8.h"
    i8.write_text(i8.read_text().replace('#include "kt_isas.h"', '#include "kt_isas.h"\n#include "gemm.h"'))
    assert any("#include circle" in b for b in dependency_problems(tree))


# ---- names -----------------------------------------------------------------------------------------

def test_no_name_clashes():
    texts = {p: _strip_comments(t) for p, t in _sources(KERNELS).items()}
    types, funcs = set(), set()
    for t in texts.values():
        types |= set(re.findall(r"\btypedef\b[^;{]*?(?:\{[^{}]*(?:\{[^{}]*\}[^{}]*)*\})?\s*\**\s*(\w+)\s*;", t, flags=re.S))
        types |= set(re.findall(r"\btypedef\b[^;]*\(\s*\*\s*(\w+)\s*\)", t))
        funcs |= set(re.findall(r"^[\w \t\*]*?\b(kt_\w+)\s*\(", t, flags=re.M))
    assert types & funcs == set(), f"names that are both a type and a function: {sorted(types & funcs)}"
    headers = {}
    for p in texts:
        if p.endswith(".h"):
            key = tuple(sorted(Path(p).stem.split("_")))
            headers.setdefault(key, []).append(p)
    assert [v for v in headers.values() if len(v) > 1] == []
    stems = {}
    for p in texts:
        if p.endswith(".c"):
            stems.setdefault(Path(p).name, []).append(p)
    assert [v for v in stems.values() if len(v) > 1] == []
