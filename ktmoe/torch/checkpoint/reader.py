"""A local Hugging Face checkpoint directory, read without loading it.

`Checkpoint(path)` checks the directory (config.json, tokenizer files, safetensors weights:
one `model.safetensors`, shards listed in `model.safetensors.index.json`, or several
`*.safetensors` files) and parses every safetensors header, so a malformed directory is
reported before anything big is read. `read_into(key, tensor)` then reads one tensor's bytes
straight from the file into caller memory (plain reads, no mmap, so the page cache is not
charged to this process); `read(key)` allocates the tensor itself.

safetensors layout: 8-byte little-endian header length N, N bytes of JSON
{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}, then the data;
offsets are relative to the first byte after the header.
"""
from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from . import CheckpointError

# safetensors dtype -> (torch dtype name, bytes per element)
DTYPES = {"BF16": ("bfloat16", 2), "F16": ("float16", 2), "F32": ("float32", 4), "F64": ("float64", 8),
          "I64": ("int64", 8), "I32": ("int32", 4), "I16": ("int16", 2), "I8": ("int8", 1),
          "U8": ("uint8", 1), "BOOL": ("bool", 1), "F8_E4M3": ("float8_e4m3fn", 1)}
INDEX = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
MAX_HEADER = 100 * 2**20


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    dtype: str          # safetensors name, e.g. "BF16"
    shape: tuple
    start: int          # absolute byte offset in the file
    nbytes: int

    @property
    def torch_dtype(self) -> str:
        return DTYPES[self.dtype][0]


def read_header(path: Path) -> dict:
    """{name: TensorInfo} of one safetensors file; CheckpointError naming the file if malformed."""
    def bad(why):
        return CheckpointError(f"{path}: not a valid safetensors file ({why})")
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise bad("shorter than the 8-byte header length")
            (n,) = struct.unpack("<Q", raw)
            if n > min(MAX_HEADER, size - 8):
                raise bad(f"header length {n} does not fit the file of {size} bytes")
            header = json.loads(f.read(n))
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise bad(f"header is not JSON: {e}") from None
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")
    data_size = size - 8 - n
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = meta["dtype"], tuple(meta["shape"]), meta["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise bad(f"entry {name!r} lacks dtype / shape / data_offsets") from None
        if dtype not in DTYPES:
            raise CheckpointError(f"{path}: tensor {name!r} has dtype {dtype}, which ktmoe finetune does not read "
                                f"(supported: {', '.join(DTYPES)})")
        nbytes = math.prod(shape) * DTYPES[dtype][1]
        if not (0 <= begin <= end <= data_size) or end - begin != nbytes:
            raise bad(f"tensor {name!r}: data_offsets {[begin, end]} do not match shape {list(shape)} {dtype} "
                      f"or the file size (truncated download?)")
        out[name] = TensorInfo(path, dtype, shape, 8 + n + begin, nbytes)
    return out


class Checkpoint:
    """Config, tokenizer presence and tensor index of a local checkpoint directory."""

    def __init__(self, path, what: str = "--model", require_tokenizer: bool = True):
        self.path = Path(path).expanduser()
        self.label = f"{what} {self.path}"   # how error messages name this checkpoint
        p = self.path
        if not p.exists():
            raise CheckpointError(f"{what} {p}: no such directory")
        if not p.is_dir():
            raise CheckpointError(f"{what} {p}: not a directory (expected a Hugging Face checkpoint directory)")
        cfg = p / "config.json"
        if not cfg.is_file():
            raise CheckpointError(f"{what} {p}: no config.json (not a Hugging Face checkpoint directory)")
        try:
            self.config = json.loads(cfg.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{cfg}: malformed JSON ({e})") from None
        if not isinstance(self.config, dict) or "model_type" not in self.config:
            raise CheckpointError(f"{cfg}: no \"model_type\" (not a transformers model config)")
        if require_tokenizer and not self.has_tokenizer():
            raise CheckpointError(f"{what} {p}: no tokenizer files (looked for {', '.join(TOKENIZER_FILES)})")
        self.tensors: dict[str, TensorInfo] = {}
        for f in self._weight_files():
            for name, info in read_header(f).items():
                if name in self.tensors:
                    raise CheckpointError(f"{what} {p}: tensor {name!r} is stored twice "
                                        f"({self.tensors[name].file.name} and {f.name})")
                self.tensors[name] = info
        if not self.tensors:
            raise CheckpointError(f"{what} {p}: the safetensors files hold no tensors")
        self._files: dict = {}

    def _weight_files(self) -> list:
        p = self.path
        index = p / INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
                files = sorted(set(weight_map.values()))
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
                raise CheckpointError(f"{index}: malformed index (expected {{\"weight_map\": {{name: file}}}}: "
                                    f"{type(e).__name__} {e})") from None
            missing = [f for f in files if not (p / f).is_file()]
            if missing:
                raise CheckpointError(f"{index}: lists shard(s) that are missing: {', '.join(missing[:5])}")
            return [p / f for f in files]
        files = sorted(p.glob("*.safetensors"))
        if files:
            return files
        if any(p.glob("*.bin")) or any(p.glob("*.pt")):
            raise CheckpointError(f"{self.label}: only safetensors weights are read; this directory has "
                                f"PyTorch .bin/.pt files (convert them with save_pretrained(safe_serialization=True))")
        raise CheckpointError(f"{self.label}: no *.safetensors weight files")

    def has_tokenizer(self) -> bool:
        return any((self.path / f).is_file() for f in TOKENIZER_FILES)

    # ---- reading ----
    def read_into(self, key: str, out) -> None:
        """Reads tensor `key` into `out` (a contiguous CPU torch tensor of the same dtype and numel)."""
        info = self.tensors[key]
        if str(out.dtype).removeprefix("torch.") != info.torch_dtype or out.numel() * out.element_size() != info.nbytes:
            raise ValueError(f"read_into {key}: destination {out.dtype} x {out.numel()} does not match "
                             f"{info.dtype} {list(info.shape)}")
        if not out.is_contiguous() or out.device.type != "cpu":
            raise ValueError(f"read_into {key}: destination must be a contiguous CPU tensor")
        if info.nbytes == 0:
            return
        import torch
        view = memoryview(out.reshape(-1).view(torch.uint8).numpy())
        f = self._file(info.file)
        done = 0
        while done < info.nbytes:
            n = os.preadv(f, [view[done:]], info.start + done)
            if n <= 0:
                raise CheckpointError(f"{info.file}: unexpected end of file reading {key!r}")
            done += n

    def read(self, key: str):
        """Tensor `key` as a new CPU tensor in the file's dtype."""
        import torch
        info = self.tensors[key]
        t = torch.empty(info.shape, dtype=getattr(torch, info.torch_dtype))
        self.read_into(key, t)
        return t

    def _file(self, path: Path) -> int:
        if path not in self._files:
            self._files[path] = os.open(path, os.O_RDONLY)
        return self._files[path]

    def close(self) -> None:
        for fd in self._files.values():
            os.close(fd)
        self._files = {}

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
