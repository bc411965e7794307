# cython: language_level=3
"""_gemm: the expert GEMMs of gemm.h (bf16: kt_gemm_nt_<isa>, kt_gemm_nn_<isa>) and gemm_int8.h
(int8, W8A8: kt_igemm_nt_<isa>, kt_igemm_nn_<isa>) on numpy arrays, for the GEMM micro-benchmark
(bench/gemm_micro.py) and the GEMM harness (ktmoe/testing.py, tests/test_gemm.py).

gemm(kind, isa, A, W, C, accumulate=False)          C [M, N] (+)= A W^T (kind "nt", W [N, K])
                                                     or A W (kind "nn", W [K, N])
time_gemm(kind, isa, A, W, C, accumulate, calls)    the same call `calls` times back to back,
                                                     returns the wall seconds of all of them
igemm(kind, isa, A, W, C, accumulate=False)         the same on int8 A, W and int32 C (exact sums)
avx512_force_nobf16(flag)                           test hook of gemm_avx512.c: nonzero makes the
                                                     avx512 path use its AVX-512F inner loops even
                                                     where the CPU has AVX512_BF16; returns the old value
avx512_force_novnni(flag)                           the same for gemm_int8_avx512.c's AVX512_VNNI loops

A and W are numpy uint16 arrays holding bf16 bit patterns, C is float32 (igemm: int8 and int32); all three 2-D with
unit-stride rows (row strides >= the row length are passed as lda / ldw / ldc, so row slices
of bigger arrays work). C must be writeable and must not overlap A or W. Single-threaded on
the calling thread, GIL released. Every argument is checked first and a bad one raises
ValueError naming it (TypeError for a non-array); `isa` must be in ktmoe.available_isas()
(amx: this extension also asks Linux for the tile state, kt_amx_request_permission()).
"""
from libc.stdint cimport int8_t, int32_t, uint16_t

cdef extern from "gemm.h":
    ctypedef uint16_t kt_bf16
    ctypedef void (*kt_gemm_fn)(int M, int N, int K, const kt_bf16 *A, long lda,
                                const kt_bf16 *W, long ldw, float *C, long ldc, int accumulate) nogil
    void kt_gemm_nt_portable(int, int, int, const kt_bf16 *, long, const kt_bf16 *, long, float *, long, int) nogil
    void kt_gemm_nn_portable(int, int, int, const kt_bf16 *, long, const kt_bf16 *, long, float *, long, int) nogil
    void kt_gemm_nt_avx512(int, int, int, const kt_bf16 *, long, const kt_bf16 *, long, float *, long, int) nogil
    void kt_gemm_nn_avx512(int, int, int, const kt_bf16 *, long, const kt_bf16 *, long, float *, long, int) nogil
    void kt_gemm_nt_amx(int, int, int, const kt_bf16 *, long, const kt_bf16 *, long, float *, long, int) nogil
    void kt_gemm_nn_amx(int, int, int, const kt_bf16 *, long, const kt_bf16 *, long, float *, long, int) nogil

cdef extern from "gemm_int8.h":
    ctypedef void (*kt_igemm_fn)(int M, int N, int K, const int8_t *A, long lda,
                                 const int8_t *W, long ldw, int32_t *C, long ldc, int accumulate) nogil
    void kt_igemm_nt_portable(int, int, int, const int8_t *, long, const int8_t *, long, int32_t *, long, int) nogil
    void kt_igemm_nn_portable(int, int, int, const int8_t *, long, const int8_t *, long, int32_t *, long, int) nogil
    void kt_igemm_nt_avx512(int, int, int, const int8_t *, long, const int8_t *, long, int32_t *, long, int) nogil
    void kt_igemm_nn_avx512(int, int, int, const int8_t *, long, const int8_t *, long, int32_t *, long, int) nogil
    void kt_igemm_nt_amx(int, int, int, const int8_t *, long, const int8_t *, long, int32_t *, long, int) nogil
    void kt_igemm_nn_amx(int, int, int, const int8_t *, long, const int8_t *, long, int32_t *, long, int) nogil

cdef extern from "ktmoe.h":
    int kt_amx_request_permission()

cdef extern from *:
    """
    extern int kt_avx512_force_nobf16;
    extern int kt_igemm_avx512_force_novnni;
    """
    int kt_avx512_force_nobf16
    int kt_igemm_avx512_force_novnni

import os
import time

import numpy as np

ISAS = ("amx", "avx512", "portable")
KINDS = ("nt", "nn")
_INT_MAX = 2**31 - 1


cdef kt_gemm_fn _pick(str kind, str isa):
    if isa == "portable":
        return kt_gemm_nt_portable if kind == "nt" else kt_gemm_nn_portable
    if isa == "avx512":
        return kt_gemm_nt_avx512 if kind == "nt" else kt_gemm_nn_avx512
    return kt_gemm_nt_amx if kind == "nt" else kt_gemm_nn_amx


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


cdef kt_igemm_fn _ipick(str kind, str isa):
    if isa == "portable":
        return kt_igemm_nt_portable if kind == "nt" else kt_igemm_nn_portable
    if isa == "avx512":
        return kt_igemm_nt_avx512 if kind == "nt" else kt_igemm_nn_avx512
    return kt_igemm_nt_amx if kind == "nt" else kt_igemm_nn_amx


def _check(kind, isa, A, W, C, in_dtype=np.uint16, out_dtype=np.float32):
    from .. import _cpu
    if kind not in KINDS:
        raise ValueError(f"kind: must be 'nt' or 'nn', got {kind!r}")
    if isa not in ISAS:
        raise ValueError(f"isa: unknown kernel path {isa!r}; choose one of {list(ISAS)}")
    if isa not in _cpu.available_isas():
        why = _cpu._probe()[1].get(isa, "not available")
        raise ValueError(f"isa: path {isa!r} cannot run here: {why}")
    a, M, K, lda = _matrix("A", A, in_dtype)
    w, wr, wc, ldw = _matrix("W", W, in_dtype)
    c, cm, N, ldc = _matrix("C", C, out_dtype, writeable=True)
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


def _run(kind, isa, A, W, C, accumulate, calls, bint int8):
    """`calls` back-to-back calls of one GEMM (arguments checked once); returns their wall seconds."""
    if int8:
        a, w, c, M, N, K, lda, ldw, ldc = _check(kind, isa, A, W, C, np.int8, np.int32)
    else:
        a, w, c, M, N, K, lda, ldw, ldc = _check(kind, isa, A, W, C)
    cdef kt_gemm_fn f16 = NULL
    cdef kt_igemm_fn f8 = NULL
    if int8:
        f8 = _ipick(kind, isa)
    else:
        f16 = _pick(kind, isa)
    cdef int m = M, n = N, k = K, acc = bool(accumulate), i, reps = calls
    cdef long la = lda, lw = ldw, lc = ldc
    cdef const void *pa = <const void *><size_t>a
    cdef const void *pw = <const void *><size_t>w
    cdef void *pc = <void *><size_t>c
    t0 = time.perf_counter()
    with nogil:
        for i in range(reps):
            if f8 != NULL:
                f8(m, n, k, <const int8_t *>pa, la, <const int8_t *>pw, lw, <int32_t *>pc, lc, acc)
            else:
                f16(m, n, k, <const kt_bf16 *>pa, la, <const kt_bf16 *>pw, lw, <float *>pc, lc, acc)
    return time.perf_counter() - t0


def gemm(kind, isa, A, W, C, accumulate=False):
    """C (+)= A W^T (nt) or A W (nn) with path `isa`; returns C."""
    _run(kind, isa, A, W, C, accumulate, 1, False)
    return C


def igemm(kind, isa, A, W, C, accumulate=False):
    """C (+)= A W^T (nt) or A W (nn) on int8 A, W (in [-127, 127]) and int32 C with path `isa`; returns C."""
    _run(kind, isa, A, W, C, accumulate, 1, True)
    return C


def time_gemm(kind, isa, A, W, C, accumulate=False, calls=1):
    """Wall seconds of `calls` back-to-back gemm() calls (arguments checked once)."""
    if not isinstance(calls, int) or calls < 1:
        raise ValueError(f"calls: must be a positive integer, got {calls!r}")
    return _run(kind, isa, A, W, C, accumulate, calls, False)


def avx512_force_nobf16(flag):
    """Sets gemm_avx512.c's test hook (nonzero: AVX-512F loops only); returns the previous value."""
    global kt_avx512_force_nobf16
    old = kt_avx512_force_nobf16
    kt_avx512_force_nobf16 = 1 if flag else 0
    return old


def avx512_force_novnni(flag):
    """Sets gemm_int8_avx512.c's test hook (nonzero: AVX-512BW loops, no VNNI); returns the previous value."""
    global kt_igemm_avx512_force_novnni
    old = kt_igemm_avx512_force_novnni
    kt_igemm_avx512_force_novnni = 1 if flag else 0
    return old
