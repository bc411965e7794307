"""`ktmoe finetune --data` formats (ktmoe/finetune/readers.py, data.py): the layouts (messages,
ShareGPT, prompt-completion, conversational prompt-completion, Alpaca, text) and what each trains,
the files (JSON lines, JSON array, Parquet, Arrow, save_to_disk) giving the same examples, and
every problem named FILE:LINE (FILE: row N in the binary ones), invalid UTF-8 included.

The readers are tested in-process with the tiny tokenizer; two real `ktmoe finetune` runs in a
subprocess (a Parquet file, a pretty-printed JSON array) and one that fails (invalid UTF-8) check
the whole command: what it trains on, one error line and exit status 2, no cache left behind.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import datasets
import pytest

from ktmoe.finetune import FinetuneError, data, tiny

datasets.disable_progress_bars()
HERE = Path(__file__).resolve().parent

SYSTEM, Q, A = "Answer briefly.", "What is 2 + 3?", "2 + 3 = 5."
LAYOUTS = {   # layout: (rows, the same examples as "messages", or None for text)
    "messages": ([{"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": Q},
                                {"role": "assistant", "content": A}]}], None),
    "ShareGPT": ([{"conversations": [{"from": "system", "value": SYSTEM}, {"from": "human", "value": Q},
                                     {"from": "gpt", "value": A}, {"from": "human", "value": "And 3 + 4?"},
                                     {"from": "gpt", "value": "7."}]}],
                 [[("system", SYSTEM), ("user", Q), ("assistant", A), ("user", "And 3 + 4?"), ("assistant", "7.")]]),
    "Alpaca": ([{"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
                {"instruction": Q, "input": "", "output": A, "system": SYSTEM}],
               [[("user", "Add the numbers.\n\n2 and 3"), ("assistant", "5")],
                [("system", SYSTEM), ("user", Q), ("assistant", A)]]),
    "prompt-completion": ([{"prompt": Q, "completion": A}, {"prompt": Q, "response": A, "system": SYSTEM}],
                          [[("user", Q), ("assistant", A)], [("system", SYSTEM), ("user", Q), ("assistant", A)]]),
    "text": ([{"text": "The sky is blue."}, {"text": "Grass is green."}], None),
}


@pytest.fixture(scope="module")
def tok():
    return tiny.build_tokenizer()


def _examples(path, tok, max_len=512):
    return [(e.ids, e.labels) for e in data.load(Path(path), tok, max_len)[0]]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _error(path, tok):
    with pytest.raises(FinetuneError) as e:
        data.load(Path(path), tok, 512)
    return str(e.value)


def _as_messages(conversation):
    return {"messages": [{"role": r, "content": c} for r, c in conversation]}


@pytest.mark.parametrize("layout", [k for k, (_, same) in LAYOUTS.items() if same])
def test_chat_like_layouts_train_what_the_messages_form_trains(layout, tok, tmp_path):
    """Alpaca, ShareGPT and prompt-completion give the ids and loss mask of the same conversation
    written as "messages": the prompt is masked, the answers are trained."""
    rows, same = LAYOUTS[layout]
    got = _examples(_jsonl(tmp_path / "d.jsonl", rows), tok)
    assert got == _examples(_jsonl(tmp_path / "m.jsonl", [_as_messages(c) for c in same]), tok)
    for (ids, labels), conv in zip(got, same):
        trained = tok.decode([t for t in labels if t != -100])
        assert trained == "".join(c + "<|im_end|>\n" for r, c in conv if r == "assistant")
        assert tok.decode(ids).startswith("<|im_start|>" + conv[0][0])


def test_text_trains_every_token_and_ends_with_eos(tok, tmp_path):
    rows = LAYOUTS["text"][0] + [{"text": "Already ended.<|im_end|>"}]
    got = _examples(_jsonl(tmp_path / "d.jsonl", rows), tok)
    for (ids, labels), row in zip(got, rows):
        assert labels == ids and ids[-1] == tok.eos_token_id and ids[-2] != tok.eos_token_id
        assert tok.decode(ids) == row["text"].removesuffix("<|im_end|>") + "<|im_end|>"


def test_conversational_prompt_completion_trains_the_completion_only(tok, tmp_path):
    """TRL's conversational prompt-completion: an assistant turn inside the prompt is context."""
    prompt = [{"role": "user", "content": "1 + 1?"}, {"role": "assistant", "content": "2."},
              {"role": "user", "content": Q}]
    (ids, labels), = _examples(_jsonl(tmp_path / "d.jsonl", [{"prompt": prompt,
                                                                "completion": [{"role": "assistant",
                                                                                "content": A}]}]), tok)
    assert tok.decode([t for t in labels if t != -100]) == A + "<|im_end|>\n"
    (ids_m, labels_m), = _examples(_jsonl(tmp_path / "m.jsonl", [{"messages": prompt + [
        {"role": "assistant", "content": A}]}]), tok)
    assert ids == ids_m and labels != labels_m   # "messages" trains both assistant turns


def test_layouts_trained_on_answers_mix(tok, tmp_path):
    rows = [r for layout in ("Alpaca", "messages", "prompt-completion") for r in LAYOUTS[layout][0]]
    p = _jsonl(tmp_path / "d.jsonl", rows)
    examples, kind = data.load(p, tok, 512)
    assert kind == "Alpaca + messages + prompt-completion, JSON lines" and len(examples) == len(rows)


def _write_all_formats(rows, d):
    """The same rows as every accepted file format: {name: path}. A key missing from a row is a
    null in the columnar formats (from_list alone would keep only the first row's keys)."""
    d.mkdir()
    keys = sorted({k for r in rows for k in r})
    ds = datasets.Dataset.from_list([{k: r.get(k) for k in keys} for r in rows])
    paths = {"jsonl": _jsonl(d / "d.jsonl", rows), "json array": d / "d.json", "parquet": d / "d.parquet",
             "save_to_disk": d / "saved", "DatasetDict": d / "dict", "arrow stream": d / "d.arrow",
             "arrow IPC file": d / "ipc.arrow", "parquet named oddly": d / "we[1]rd*"}
    paths["json array"].write_text(json.dumps(rows, indent=2))
    ds.to_parquet(str(paths["parquet"]))
    paths["parquet named oddly"].write_bytes(paths["parquet"].read_bytes())
    ds.save_to_disk(str(paths["save_to_disk"]))
    datasets.DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(str(paths["DatasetDict"]))
    paths["arrow stream"].write_bytes(next(paths["save_to_disk"].glob("*.arrow")).read_bytes())
    import pyarrow as pa
    with pa.OSFile(str(paths["arrow IPC file"]), "wb") as f, pa.ipc.new_file(f, ds.data.table.schema) as w:
        w.write_table(ds.data.table)
    return paths


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_file_format_gives_the_same_examples(layout, tok, tmp_path):
    rows = LAYOUTS[layout][0]
    paths = _write_all_formats(rows, tmp_path / "f")
    expected = _examples(paths.pop("jsonl"), tok)
    assert len(expected) == len(rows)
    for name, path in paths.items():
        assert _examples(path, tok) == expected, name
        assert data.read(path).layout == layout


def test_json_array_problems_are_named_by_line(tok, tmp_path):
    rows = [{"prompt": "a", "completion": "b"}, {"messages": [{"role": "user", "content": "hi"}]}]
    p = tmp_path / "d.json"
    p.write_text(json.dumps(rows[:1], indent=2)[:-2] + ",\n" + json.dumps(rows[1], indent=2) + "\n]\n")
    start = p.read_text().splitlines().index("{") + 1   # the line the second object starts on
    assert _error(p, tok) == f"{p}:{start}: the last message must be the assistant's (the text to learn)"
    p.write_text('[\n  {"text": "a"},\n  {"text": "b",}\n]\n')
    assert _error(p, tok).startswith(f"{p}:3: invalid JSON (Expecting property name")
    p.write_text('[\n  {"text": "a"}\n  {"text": "b"}\n]\n')
    assert _error(p, tok).startswith(f"{p}:3: invalid JSON (expected ',' or ']'")
    p.write_text('[{"text": "a"}]\n\nx\n')
    assert _error(p, tok).startswith(f"{p}:3: invalid JSON (extra data after the array")
    p.write_text(" [ ]\n")
    assert "the data set is empty" in _error(p, tok)


@pytest.mark.parametrize("form", ["jsonl", "json array"])
def test_invalid_utf8_is_named_by_file_and_line(form, tok, tmp_path):
    lines = [b'{"text": "one"}', b'{"text": "two"}', b'{"text": "caf\xe9 three"}']
    raw = b"\n".join(lines) + b"\n" if form == "jsonl" else b"[\n" + b",\n".join(lines) + b"\n]\n"
    p = tmp_path / "d.jsonl"
    p.write_bytes(raw)
    line = raw.split(b"\n").index(lines[2]) + 1
    assert _error(p, tok) == f"{p}:{line}: not UTF-8 text (byte 0xe9 at column 14, counted in bytes)"


def test_unknown_layout_names_the_accepted_ones(tok, tmp_path):
    p = _jsonl(tmp_path / "d.jsonl", [{"question": "q", "answer": "a"}])
    err = _error(p, tok)
    assert err.startswith(f"{p}:1: no known example layout in keys ['answer', 'question']")
    for key in ('"messages"', '"conversations"', '"prompt" + "completion"', '"instruction" + "output"', '"text"'):
        assert key in err, key
    assert "expected a JSON object with one of" in _error(_jsonl(tmp_path / "l.jsonl", [[1, 2]]), tok)


@pytest.mark.parametrize("rows, message", [
    ([{"conversations": [{"from": "human", "value": "q"}, {"from": "bot", "value": "a"}]}],
     "conversations[1] is from 'bot' (expected one of ('human', 'user', 'gpt', 'assistant', 'system'))"),
    ([{"conversations": [{"role": "user", "content": "q"}]}], 'conversations[0] must be {"from": str, "value": str}'),
    ([{"conversations": [{"from": "gpt", "value": "a"}, {"from": "human", "value": "q"}]}],
     "the last message must be the assistant's (the text to learn)"),
    ([{"instruction": "q", "input": 3, "output": "a"}], '"input" must be a string (got int)'),
    ([{"prompt": [{"role": "user", "content": "q"}], "completion": [{"role": "user", "content": "a"}]}],
     "the last message must be the assistant's (the text to learn)"),
    ([{"text": ""}], '"text" is empty'),
    ([{"text": "a"}, {"prompt": "q", "completion": "a"}],
     'a prompt-completion example in a data set of text examples (the first at line 1); "text" (every token '
     'trained) does not mix with the layouts trained on answers'),
    ([{"prompt": "q", "completion": "a"}, {"instruction": "q", "output": "a"}, {"text": "a"}],
     'a text example in a data set of prompt-completion examples (the first at line 1); "text" (every token '
     'trained) does not mix with the layouts trained on answers'),
])
def test_bad_examples_are_named(rows, message, tok, tmp_path):
    p = _jsonl(tmp_path / "d.jsonl", rows)
    assert _error(p, tok) == f"{p}:{len(rows)}: {message}"


def test_binary_problems_are_named_by_row(tok, tmp_path, caplog):
    p = tmp_path / "d.parquet"
    datasets.Dataset.from_list([{"text": "ok"}, {"text": ""}]).to_parquet(str(p))
    assert _error(p, tok) == f'{p}: row 1: "text" is empty'
    datasets.Dataset.from_list([{"text": "a"}]).select([]).to_parquet(str(p))
    assert _error(p, tok) == f"--data {p}: the data set is empty (0 rows)"
    p.write_text('{"text": "a"}\n')
    assert _error(p, tok) == f"--data {p}: not a Parquet file (it does not start with Parquet's magic bytes)"
    datasets.Dataset.from_list([{"text": "a"}] * 50).to_parquet(str(p))
    p.write_bytes(p.read_bytes()[:-40])
    assert _error(p, tok).startswith(f"--data {p}: cannot read it as Parquet (ArrowInvalid: ")
    assert [r.getMessage() for r in caplog.records] == []   # datasets would log it on stderr too
    d = tmp_path / "dir"
    d.mkdir()
    assert "not one written by datasets' save_to_disk" in _error(d, tok)
    ds = datasets.Dataset.from_list([{"text": "a"}])
    datasets.DatasetDict({"a": ds, "b": ds}).save_to_disk(str(tmp_path / "dd"))
    assert 'a DatasetDict without a "train" split (splits: a, b)' in _error(tmp_path / "dd", tok)
    assert "no such file or directory" in _error(tmp_path / "none.parquet", tok)


def test_datasets_is_needed_only_for_binary_formats(tok, tmp_path, monkeypatch):
    p = tmp_path / "d.parquet"
    datasets.Dataset.from_list([{"text": "a"}]).to_parquet(str(p))
    monkeypatch.setitem(sys.modules, "datasets", None)   # `import datasets` raises ImportError
    assert _error(p, tok) == f"--data {p}: reading Parquet data needs the datasets library: pip install datasets"
    assert len(_examples(_jsonl(tmp_path / "d.jsonl", [{"text": "a"}]), tok)) == 1


def test_text_formats_do_not_import_datasets(tmp_path):
    p = _jsonl(tmp_path / "d.jsonl", LAYOUTS["Alpaca"][0])
    code = ("import sys; from pathlib import Path; from ktmoe.finetune import data; "
            f"assert len(data.read(Path({str(p)!r})).records) == 2; print(sorted(m for m in sys.modules "
            "if m.split('.')[0] in ('datasets', 'pyarrow')))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=HERE)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr


# ---- the real command, in a subprocess ----
@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tiny.ensure(tmp_path_factory.mktemp("tiny") / "base-model")


def _finetune(tmp_path, *argv):
    """`ktmoe finetune` in a subprocess whose temporary and Hugging Face cache directories are
    tmp_path/tmp and tmp_path/hf (to show that reading leaves nothing there)."""
    env = dict(os.environ, TMPDIR=str(tmp_path / "tmp"), HF_HOME=str(tmp_path / "hf"),
               HF_DATASETS_CACHE=str(tmp_path / "hf" / "datasets"), HF_HUB_OFFLINE="1")
    env.pop("KTMOE_NUM_THREADS", None)
    (tmp_path / "tmp").mkdir()
    return subprocess.run([sys.executable, "-m", "ktmoe.cli", "finetune", *map(str, argv), "--steps", "2",
                           "--quiet", "--torch-threads", "1", "--device", "cpu"], env=env, capture_output=True,
                          text=True, timeout=300, cwd=HERE)


def _leftovers(tmp_path):
    return [str(p) for d in (tmp_path / "tmp", tmp_path / "hf") if d.exists() for p in d.rglob("*")]


@pytest.mark.parametrize("layout, form", [("Alpaca", "parquet"), ("ShareGPT", "json array")])
def test_finetune_runs_on(layout, form, base, tok, tmp_path):
    rows = LAYOUTS[layout][0] * 4
    path = _write_all_formats(rows, tmp_path / "data")[form]
    r = _finetune(tmp_path, "--model", base, "--data", path, "--out", tmp_path / "out")
    assert r.returncode == 0, r.stderr[-3000:]
    kind = {"parquet": "Parquet", "json array": "JSON array"}[form]
    examples = data.load(path, tok, 512)[0]
    tokens, trained = sum(len(e.ids) for e in examples), sum(e.trained_tokens for e in examples)
    assert f"data {path} ({layout}, {kind}): {len(rows)} examples, {tokens:,} tokens ({trained:,} trained)" \
        in r.stdout, r.stdout
    assert 0 < trained < tokens
    assert len((tmp_path / "out" / "log.jsonl").read_text().splitlines()) == 2
    assert _leftovers(tmp_path) == []


def test_finetune_invalid_utf8_is_one_error_line(base, tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_bytes(b'{"text": "one"}\n\n{"text": "\xff"}\n')
    out = tmp_path / "out"
    r = _finetune(tmp_path, "--model", base, "--data", p, "--out", out)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        f"ktmoe finetune: error: {p}:3: not UTF-8 text (byte 0xff at column 11, counted in bytes)"], r.stderr
    assert not out.exists() or list(out.iterdir()) == []
    assert _leftovers(tmp_path) == []
