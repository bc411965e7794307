"""`--data` as rows: a file or directory -> [(line or row number, dict)], every problem named FILE:LINE.

Text files (told apart by their first non-blank character, whatever the name):
- JSON lines: one object per line, blank lines skipped; a row's number is its line;
- a JSON array of objects (pretty-printed or not): a row's number is the line its object starts on.
Binary ones, read through the `datasets` library (imported only then):
- Parquet (starts with PAR1), Arrow (IPC stream as `datasets` writes it, or IPC file), a row's
  number is its index counting from 0 (as `dataset[i]`);
- a `datasets.save_to_disk` directory: a Dataset, or a DatasetDict's "train" split (or its only one).
Invalid UTF-8 in a text file is reported as FILE:LINE with the byte's column. Keys whose value is
null are dropped (columnar formats fill a missing field with null).
"""
from __future__ import annotations

import json
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from . import FinetuneError

PARQUET_MAGIC = b"PAR1"
ARROW_FILE_MAGIC = b"ARROW1"
ARROW_STREAM_MAGIC = b"\xff\xff\xff\xff"   # an IPC stream's first message starts with the continuation marker
_WS = re.compile(r"[ \t\r\n]*")


@dataclass
class Rows:
    path: Path
    kind: str           # "JSON lines", "JSON array", "Parquet", "Arrow", "save_to_disk directory"
    rows: list          # [(number, dict)]

    @property
    def unit(self) -> str:
        return "line" if self.kind.startswith("JSON") else "row"

    def where(self, n: int) -> str:
        return f"{self.path}:{n}" if self.unit == "line" else f"{self.path}: row {n}"


def read(path: Path) -> Rows:
    if path.is_dir():
        return _saved(path)
    if not path.exists():
        raise FinetuneError(f"--data {path}: no such file or directory")
    if not path.is_file():
        raise FinetuneError(f"--data {path}: not a file or a directory")
    try:
        with open(path, "rb") as f:
            head = f.read(8)
        kind = ("Parquet" if head.startswith(PARQUET_MAGIC) else
                "Arrow" if head.startswith((ARROW_FILE_MAGIC, ARROW_STREAM_MAGIC)) else None)
        expected = {".parquet": "Parquet", ".arrow": "Arrow"}.get(path.suffix.lower())
        if expected and kind != expected:
            raise FinetuneError(f"--data {path}: not a{'n' if expected == 'Arrow' else ''} {expected} file "
                                f"(it does not start with {expected}'s magic bytes)")
        if kind:
            return Rows(path, kind, _binary(path, kind))
        raw = path.read_bytes()
    except OSError as e:
        raise FinetuneError(f"--data {path}: cannot read ({e.strerror or e})") from None
    text = _utf8(raw, path)
    start = _WS.match(text).end()
    if text.startswith("[", start):
        return Rows(path, "JSON array", _json_array(text, start, path))
    return Rows(path, "JSON lines", _json_lines(text, path))


def _utf8(raw: bytes, path: Path) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        column = e.start - raw.rfind(b"\n", 0, e.start)
        raise FinetuneError(f"{path}:{line}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column {column}, "
                            f"counted in bytes)") from None


def _json_lines(text: str, path: Path) -> list:
    rows = []
    for n, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise FinetuneError(f"{path}:{n}: invalid JSON ({e.msg} at column {e.colno})") from None
        rows.append((n, _present(obj)))
    if not rows:
        raise FinetuneError(f"--data {path}: the data set is empty (no JSON lines)")
    return rows


def _json_array(text: str, i: int, path: Path) -> list:
    """The elements of a JSON array with the line each starts on (json.loads gives no positions)."""
    decoder, rows = json.JSONDecoder(), []
    line, at = 1, 0

    def line_of(pos):
        nonlocal line, at
        line, at = line + text.count("\n", at, pos), pos
        return line

    def fail(pos, msg):
        raise FinetuneError(f"{path}:{line_of(pos)}: invalid JSON ({msg} at column "
                            f"{pos - text.rfind(chr(10), 0, pos)})")

    i = _WS.match(text, i + 1).end()
    if text.startswith("]", i):
        raise FinetuneError(f"--data {path}: the data set is empty (an empty JSON array)")
    while True:
        try:
            obj, end = decoder.raw_decode(text, i)
        except json.JSONDecodeError as e:
            fail(e.pos, e.msg)
        rows.append((line_of(i), _present(obj)))
        i = _WS.match(text, end).end()
        if text.startswith(",", i):
            i = _WS.match(text, i + 1).end()
        elif text.startswith("]", i):
            break
        else:
            fail(i, "expected ',' or ']' after an element of the array")
    end = _WS.match(text, i + 1).end()
    if end < len(text):
        fail(end, "extra data after the array")
    return rows


def _present(obj):
    """An object without its null-valued keys (other values are checked by the caller)."""
    return {k: v for k, v in obj.items() if v is not None} if isinstance(obj, dict) else obj


def _datasets(path: Path, kind: str):
    try:
        import datasets
    except ImportError:
        raise FinetuneError(f"--data {path}: reading {kind} data needs the datasets library: "
                            f"pip install datasets") from None
    datasets.disable_progress_bars()
    return datasets


class _Quiet:
    """datasets logs a failed read on stderr before raising: silenced, the error says it once."""

    def __init__(self, datasets):
        self.logging = datasets.logging

    def __enter__(self):
        self.level = self.logging.get_verbosity()
        self.logging.set_verbosity(self.logging.CRITICAL + 10)

    def __exit__(self, *exc):
        self.logging.set_verbosity(self.level)


def _rows_of(dataset) -> list:
    return [(i, _present(row)) for i, row in enumerate(dataset)]


def _cannot(path: Path, kind: str, e: Exception) -> FinetuneError:
    cause = e.__cause__ or e
    return FinetuneError(f"--data {path}: cannot read it as {kind} ({type(cause).__name__}: {cause})")


def _binary(path: Path, kind: str) -> list:
    """A Parquet or Arrow file, through datasets' own builders (its cache goes to a temporary directory)."""
    import glob
    datasets = _datasets(path, kind)
    try:
        with _Quiet(datasets), tempfile.TemporaryDirectory(prefix="ktmoe-data-") as cache:
            builder = datasets.load_dataset_builder(kind.lower(), data_files=glob.escape(str(path.resolve())),
                                                    cache_dir=cache)
            builder.download_and_prepare()
            split = builder.info.splits.get("train")
            # load_dataset itself fails on a file of 0 rows ("corresponds to no data")
            rows = _rows_of(builder.as_dataset(split="train", in_memory=True)) if split and split.num_examples else []
    except FinetuneError:
        raise
    except Exception as e:   # pyarrow's and datasets' errors have no common base below Exception
        raise _cannot(path, kind, e) from None
    if not rows:
        raise FinetuneError(f"--data {path}: the data set is empty (0 rows)")
    return rows


def _saved(path: Path) -> Rows:
    kind = "save_to_disk directory"
    if not ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file()):
        raise FinetuneError(f"--data {path}: a directory, but not one written by datasets' save_to_disk "
                            f"(no state.json or dataset_dict.json)")
    datasets = _datasets(path, "a save_to_disk directory of")
    try:
        with _Quiet(datasets):
            ds = datasets.load_from_disk(str(path))
            split = ""
            if isinstance(ds, datasets.DatasetDict):
                if "train" not in ds and len(ds) != 1:
                    raise FinetuneError(f"--data {path}: a DatasetDict without a \"train\" split (splits: "
                                        f"{', '.join(ds)}); pass the directory of one split")
                split = "train" if "train" in ds else next(iter(ds))
                ds = ds[split]
            rows = _rows_of(ds)
    except FinetuneError:
        raise
    except Exception as e:
        raise _cannot(path, kind, e) from None
    if not rows:
        raise FinetuneError(f"--data {path}: the data set is empty (0 rows)")
    return Rows(path, f"{kind}, split {split!r}" if split else kind, rows)
