"""Reading caller arrays as raw buffers: numpy arrays (bf16 through ml_dtypes), anything
with DLPack (torch, jax, cupy-on-host...), or the Python buffer protocol.

A Buffer records the address, dtype name, shape, element strides and writability, and
holds a reference that keeps the memory alive while a kernel uses it. Nothing here
copies or converts: checks and their messages live in experts.py.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import ml_dtypes
import numpy as np

from ._kernels import _core

_NUMPY_NAMES = {np.dtype(np.float32): "float32", np.dtype(ml_dtypes.bfloat16): "bfloat16",
                np.dtype(np.int32): "int32", np.dtype(np.int64): "int64"}
NUMPY_DTYPES = {name: dt for dt, name in _NUMPY_NAMES.items()}
ITEMSIZE = {"float32": 4, "bfloat16": 2, "int32": 4, "int64": 8, "int8": 1, "uint8": 1, "float8_e4m3fn": 1}
_DLPACK_HOST = {1: "CPU", 3: "CUDA pinned host", 11: "ROCm pinned host"}  # DLPack device types in host memory


@dataclass(frozen=True)
class Buffer:
    addr: int
    dtype: str
    shape: tuple
    strides: tuple  # in elements
    writable: bool
    owner: Any

    @property
    def contiguous(self) -> bool:
        expected = 1
        for size, stride in zip(reversed(self.shape), reversed(self.strides)):
            if size != 1 and stride != expected:
                return False
            expected *= size
        return True

    def offset(self, elements: int) -> int:
        """Address `elements` elements past the start."""
        return self.addr + elements * ITEMSIZE[self.dtype]


def _from_numpy(arr: np.ndarray, owner: Any) -> Buffer:
    name = _NUMPY_NAMES.get(arr.dtype, str(arr.dtype))
    item = arr.dtype.itemsize
    strides = tuple(s // item if s % item == 0 else None for s in arr.strides)
    return Buffer(arr.__array_interface__["data"][0], name, tuple(arr.shape), strides,
                  bool(arr.flags.writeable), owner)


def as_buffer(obj: Any, name: str) -> Buffer:
    """The raw buffer behind `obj`; TypeError naming `name` if it has none on the CPU."""
    if isinstance(obj, np.ndarray):
        return _from_numpy(obj, obj)
    if hasattr(obj, "__dlpack__"):
        if getattr(obj, "requires_grad", False) and hasattr(obj, "detach"):
            obj = obj.detach()  # torch refuses to export tensors that require grad
        device = obj.__dlpack_device__() if hasattr(obj, "__dlpack_device__") else (1, 0)
        if int(device[0]) not in _DLPACK_HOST:
            raise TypeError(f"{name}: must be in CPU memory (DLPack device type {int(device[0])})")
        capsule = obj.__dlpack__()
        addr, dtype, shape, strides, _ = _core.dlpack_view(capsule)
        if strides is None:
            strides, step = [], 1
            for size in reversed(shape):
                strides.insert(0, step)
                step *= size
        return Buffer(addr, dtype, tuple(shape), tuple(strides), True, (obj, capsule))
    try:
        view = memoryview(obj)
    except TypeError:
        raise TypeError(f"{name}: expected an array (numpy, torch, or any DLPack / buffer-protocol "
                        f"object), got {type(obj).__name__}") from None
    return _from_numpy(np.asarray(view), (obj, view))


def checked(b: Buffer, name: str, ndim: int, dtypes, *, writable: bool = False) -> Buffer:
    """`b` after the checks every array argument gets (dtype in `dtypes`, `ndim` dimensions,
    C-contiguous, writable when asked); TypeError / ValueError naming `name` otherwise."""
    if b.dtype not in dtypes:
        raise TypeError(f"{name}: dtype must be one of {list(dtypes)}, got {b.dtype}")
    if len(b.shape) != ndim:
        raise ValueError(f"{name}: expected {ndim} dimensions, got shape {list(b.shape)}")
    if not b.contiguous:
        raise ValueError(f"{name}: must be C-contiguous")
    if writable and not b.writable:
        raise ValueError(f"{name}: is read-only")
    return b


def new_array(shape: tuple, dtype: str) -> np.ndarray:
    return np.empty(shape, dtype=NUMPY_DTYPES[dtype])
