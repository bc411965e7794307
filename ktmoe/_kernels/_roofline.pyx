# cython: language_level=3
"""_roofline: the machine ceilings of SPEC.md section 10, measured on this machine now.

amx_peak(threads, seconds, kind="bf16")  -> FLOP/s (bf16, TDPBF16PS) or OP/s (int8, TDPBSSD)
                                           of a register-only tile loop on `threads` threads.
read_bandwidth(threads, nbytes, passes)  -> bytes/s: best of `passes` streaming reads of one
                                           nbytes buffer split across `threads` threads.

The C side is roofline.c. The AMX loop only runs when ktmoe.available_isas() has "amx"
(which also means Linux granted this process the tile state); the read loop uses AVX-512
loads when "avx512" is available, plain 64-bit loads otherwise. The GIL is released while
the threads run.
"""
from libc.stdint cimport uint64_t

cdef extern from *:
    """
    double kt_rf_amx_peak(int threads, double seconds, int int8);
    double kt_rf_read_bandwidth(int threads, size_t nbytes, int passes, int simd, uint64_t *checksum);
    """
    double kt_rf_amx_peak(int threads, double seconds, int int8) nogil
    double kt_rf_read_bandwidth(int threads, size_t nbytes, int passes, int simd, uint64_t *checksum) nogil

import os


def _check_threads(threads):
    if not isinstance(threads, int) or not 1 <= threads <= 1024:
        raise ValueError(f"threads: must be an integer in [1, 1024], got {threads!r}")


def _raise_errno(what, double rc):
    err = int(-rc)
    raise OSError(err, f"{what}: {os.strerror(err)}")


def amx_peak(threads, seconds=0.5, kind="bf16"):
    """FLOP/s (kind="bf16") or OP/s (kind="int8") of AMX on `threads` threads for `seconds`."""
    from .. import _cpu
    _check_threads(threads)
    if kind not in ("bf16", "int8"):
        raise ValueError(f"kind: must be 'bf16' or 'int8', got {kind!r}")
    if not seconds > 0:
        raise ValueError(f"seconds: must be > 0, got {seconds!r}")
    if "amx" not in _cpu.available_isas():
        why = _cpu._probe()[1].get("amx", "forced off")
        raise RuntimeError(f"amx_peak: AMX cannot run here: {why}")
    cdef int n = threads, int8 = kind == "int8"
    cdef double secs = seconds, rate
    with nogil:
        rate = kt_rf_amx_peak(n, secs, int8)
    if rate < 0:
        _raise_errno("amx_peak", rate)
    return rate


def read_bandwidth(threads, nbytes=1 << 30, passes=3):
    """Best bytes/s over `passes` streaming reads of an `nbytes` buffer (allocated, touched by
    its reader threads, and freed here) split evenly across `threads` threads."""
    from .. import _cpu
    _check_threads(threads)
    if not isinstance(nbytes, int) or nbytes < 256 * threads:
        raise ValueError(f"nbytes: must be an integer >= 256 * threads, got {nbytes!r}")
    if not isinstance(passes, int) or passes < 1:
        raise ValueError(f"passes: must be a positive integer, got {passes!r}")
    cdef int n = threads, p = passes, simd = "avx512" in _cpu.available_isas()
    cdef size_t size = nbytes
    cdef uint64_t checksum = 0
    cdef double rate
    with nogil:
        rate = kt_rf_read_bandwidth(n, size, p, simd, &checksum)
    if rate < 0:
        _raise_errno("read_bandwidth", rate)
    return rate
