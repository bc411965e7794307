# cython: language_level=3
"""_gemm: the expert bf16 GEMMs of gemm.h (kt_gemm_nt_<isa>, kt_gemm_nn_<isa>) on numpy arrays,
for the GEMM micro-benchmark (bench/gemm_micro.py) and its correctness test (tests/test_gemm.py).

gemm(kind, isa, A, W, C, accumulate=False)          C [M, N] (+)= A W^T (kind "nt", W [N, K])
                                                     or A W (kind "nn", W [K, N])
time_gemm(kind, isa, A, W, C, accumulate, calls)    the same call `calls` times back to back,
                                                     returns the wall seconds of all of them
igemm(kind, isa, A, W, C, accumulate=False)         the int8 GEMMs of gemm_int8.h: A, W int8 in
                                                     [-127, 127], C int32, K <= 65536

isa is any kernel target of the build (isa_table.c, one list with meson.build). For gemm, A and W
are numpy uint16 arrays holding bf16 bit patterns, C is float32; all three 2-D with
unit-stride rows (row strides >= the row length are passed as lda / ldw / ldc, so row slices
of bigger arrays work). C must be writeable and must not overlap A or W. Single-threaded on
the calling thread, GIL released. Every argument is checked first and a bad one raises
ValueError naming it (TypeError for a non-array); `isa` must be in ktmoe.available_isas()
(amx: this extension also asks Linux for the tile state, kt_amx_request_permission()).
"""
from libc.stdint cimport uint16_t

from libc.stdint cimport int8_t, int32_t

cdef extern from "runtime/isa_table.h":
    ctypedef uint16_t kt_bf16
    ctypedef void (*kt_gemm_fn)(int M, int N, int K, const kt_bf16 *A, long lda,
                                const kt_bf16 *W, long ldw, float *C, long ldc, int accumulate) nogil
    ctypedef void (*kt_igemm_fn)(int M, int N, int K, const int8_t *A, long lda,
                                 const int8_t *W, long ldw, int32_t *C, long ldc, int accumulate) nogil
    ctypedef struct kt_isa_gemms:
        kt_gemm_fn nt
        kt_gemm_fn nn
        kt_igemm_fn int_nt
        kt_igemm_fn int_nn
    const kt_isa_gemms *kt_isa_gemm_table(int isa)
    int kt_amx_request_permission()
    int KT_NISA
    const char *kt_isa_name(int isa)

import os
import time

import numpy as np

ISA_CODES = {kt_isa_name(i).decode(): i for i in range(KT_NISA)}
ISAS = tuple(reversed(ISA_CODES))   # best first, as ktmoe._cpu.ISAS
KINDS = ("nt", "nn")
_INT_MAX = 2**31 - 1


cdef kt_gemm_fn _pick(str kind, str isa):
    cdef const kt_isa_gemms *g = kt_isa_gemm_table(ISA_CODES[isa])
    return g.nt if kind == "nt" else g.nn


cdef kt_igemm_fn _pick_int8(str kind, str isa):
    cdef const kt_isa_gemms *g = kt_isa_gemm_table(ISA_CODES[isa])
    return g.int_nt if kind == "nt" else g.int_nn


def _matrix(name, a, dtype, writeable=False):
    """(address, rows, cols, row stride in elements) of a 2-D array of `dtype` with unit-stride rows."""
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{name}: expected a numpy array, got {type(a).__name__}")
    if a.dtype != dtype:
        raise ValueError(f"{name}: dtype must be {np.dtype(dtype).name}"
                         f"{' (bf16 bit patterns)' if dtype == np.uint16 else ''}, got {a.dtype}")
    if a.ndim != 2:
        raise ValueError(f"{name}: must be 2-D, got shape {a.shape}")
    rows, cols = a.shape
    if rows > _INT_MAX or cols > _INT_MAX:
        raise ValueError(f"{name}: dimensions must be < 2**31, got shape {a.shape}")
    item = a.itemsize
    if a.size == 0:  # nothing is read or written; numpy may report any strides
        if writeable and not a.flags.writeable:
            raise ValueError(f"{name}: must be writeable")
        return a.__array_interface__["data"][0], rows, cols, cols
    if cols > 1 and a.strides[1] != item:
        raise ValueError(f"{name}: rows must be contiguous (unit stride along the last axis), "
                         f"got strides {a.strides}")
    ld = cols
    if rows > 1:
        if a.strides[0] % item or a.strides[0] < cols * item:
            raise ValueError(f"{name}: row stride must be a positive multiple of {item} bytes and "
                             f">= the row length, got strides {a.strides} for shape {a.shape}")
        ld = a.strides[0] // item
    if writeable and not a.flags.writeable:
        raise ValueError(f"{name}: must be writeable")
    return a.__array_interface__["data"][0], rows, cols, ld


def _check(kind, isa, A, W, C, int8=False):
    from .. import _cpu
    if kind not in KINDS:
        raise ValueError(f"kind: must be 'nt' or 'nn', got {kind!r}")
    if isa not in ISAS:
        raise ValueError(f"isa: unknown kernel path {isa!r}; choose one of {list(ISAS)}")
    if isa not in _cpu.available_isas():
        why = _cpu._probe()[1].get(isa, "not available")
        raise ValueError(f"isa: path {isa!r} cannot run here: {why}")
    ab, cb = (np.int8, np.int32) if int8 else (np.uint16, np.float32)
    a, M, K, lda = _matrix("A", A, ab)
    w, wr, wc, ldw = _matrix("W", W, ab)
    c, cm, N, ldc = _matrix("C", C, cb, writeable=True)
    if int8 and K > 65536:
        raise ValueError(f"A: int8 GEMMs take K <= 65536, got {K}")
    wk, wn = (wc, wr) if kind == "nt" else (wr, wc)
    want = "[N, K]" if kind == "nt" else "[K, N]"
    if wk != K or wn != N:
        raise ValueError(f"W: {kind} needs W {want} = {[N, K] if kind == 'nt' else [K, N]} for A "
                         f"{list(A.shape)} and C {list(C.shape)}, got {list(W.shape)}")
    if cm != M:
        raise ValueError(f"C: must have A's {M} rows, got shape {list(C.shape)}")
    if np.may_share_memory(C, A) or np.may_share_memory(C, W):
        raise ValueError("C: must not overlap A or W")
    if isa == "amx":
        err = kt_amx_request_permission()
        if err:
            raise ValueError(f"isa: Linux refused the AMX tile state (errno {err}: {os.strerror(err)})")
    return a, w, c, M, N, K, lda, ldw, ldc


def _run(kind, isa, A, W, C, accumulate, int reps, bint int8):
    """Checks the arguments once, then runs the bf16 (or int8) GEMM `reps` times back to back;
    returns the wall seconds of the calls."""
    a, w, c, M, N, K, lda, ldw, ldc = _check(kind, isa, A, W, C, int8=int8)
    cdef kt_gemm_fn fn
    cdef kt_igemm_fn ifn
    cdef int m = M, n = N, k = K, acc = bool(accumulate), i
    cdef long la = lda, lw = ldw, lc = ldc
    cdef size_t pa = a, pw = w, pc = c
    if int8:
        ifn = _pick_int8(kind, isa)
    else:
        fn = _pick(kind, isa)
    t0 = time.perf_counter()
    with nogil:
        for i in range(reps):
            if int8:
                ifn(m, n, k, <const int8_t *>pa, la, <const int8_t *>pw, lw, <int32_t *>pc, lc, acc)
            else:
                fn(m, n, k, <const kt_bf16 *>pa, la, <const kt_bf16 *>pw, lw, <float *>pc, lc, acc)
    return time.perf_counter() - t0


def gemm(kind, isa, A, W, C, accumulate=False):
    """C (+)= A W^T (nt) or A W (nn) with path `isa`; returns C."""
    _run(kind, isa, A, W, C, accumulate, 1, False)
    return C


def time_gemm(kind, isa, A, W, C, accumulate=False, calls=1):
    """Wall seconds of `calls` back-to-back gemm() calls (arguments checked once)."""
    if not isinstance(calls, int) or calls < 1:
        raise ValueError(f"calls: must be a positive integer, got {calls!r}")
    return _run(kind, isa, A, W, C, accumulate, calls, False)


def igemm(kind, isa, A, W, C, accumulate=False):
    """C (+)= A W^T (nt) or A W (nn) on int8 A, W (values in [-127, 127]) into int32 C, with `isa`."""
    _run(kind, isa, A, W, C, accumulate, 1, True)
    return C
