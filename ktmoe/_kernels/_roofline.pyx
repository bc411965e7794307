# cython: language_level=3
"""_roofline: the machine ceilings of design.md 10, measured on this machine now.

amx_peak(threads, seconds, kind="bf16")  -> FLOP/s (bf16, TDPBF16PS) or OP/s (int8, TDPBSSD)
                                           of a register-only tile loop on `threads` threads.
avx512_bf16_peak(threads, seconds)       -> FLOP/s of a register-only VDPBF16PS zmm loop
                                           (16 chains, 64 FLOP per instruction).
fma_peak(threads, seconds, width=None)   -> FLOP/s of a register-only fp32 FMA loop, width 512
                                           (AVX-512F zmm) or 256 (AVX2 ymm); None: the widest
                                           this CPU has. 2 FLOP per lane.
has_avx2_fma()                           -> whether the CPU and OS can run AVX2 + FMA.
read_bandwidth(threads, nbytes, passes, simd=None) -> bytes/s: best of `passes` streaming reads
                                           of one nbytes buffer split across `threads` threads.

The C side is roofline.c; what the CPU has comes from ktmoe._cpu (cpu_features.c, detected
once). The AMX loop only runs when ktmoe.available_isas() has "amx" (which also means Linux
granted this process the tile state), the VDPBF16PS loop when the CPU features have
avx512_bf16, the zmm FMA loop when they have avx512 (F/BW/VL/DQ) and the ymm one when they
have avx2 and fma; otherwise these raise RuntimeError. The read loop uses AVX-512 loads
where the CPU has AVX-512 (simd=None) or when simd is true, plain 64-bit loads otherwise. The GIL is released while the
threads run.
"""
from libc.stdint cimport uint64_t

cdef extern from *:
    """
    double kt_rf_amx_peak(int threads, double seconds, int int8);
    double kt_rf_read_bandwidth(int threads, size_t nbytes, int passes, int simd, uint64_t *checksum);
    double kt_rf_avx512_bf16_peak(int threads, double seconds);
    double kt_rf_fma_peak(int threads, double seconds, int width);
    """
    double kt_rf_amx_peak(int threads, double seconds, int int8) nogil
    double kt_rf_read_bandwidth(int threads, size_t nbytes, int passes, int simd, uint64_t *checksum) nogil
    double kt_rf_avx512_bf16_peak(int threads, double seconds) nogil
    double kt_rf_fma_peak(int threads, double seconds, int width) nogil

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
    _check_seconds(seconds)
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


def has_avx2_fma():
    """True if this CPU and OS can run AVX2 + FMA (CPUID and XCR0)."""
    from .. import _cpu
    f = _cpu._probe()[2]
    return bool(f.get("avx2") and f.get("fma"))


def _check_seconds(seconds):
    if not isinstance(seconds, (int, float)) or not seconds > 0:
        raise ValueError(f"seconds: must be > 0, got {seconds!r}")


def avx512_bf16_peak(threads, seconds=0.5):
    """FLOP/s of a VDPBF16PS zmm register loop on `threads` threads for `seconds`."""
    from .. import _cpu
    _check_threads(threads)
    _check_seconds(seconds)
    if not _cpu._probe()[2].get("avx512_bf16"):
        raise RuntimeError("avx512_bf16_peak: the CPU (or OS) has no AVX512_BF16")
    cdef int n = threads
    cdef double secs = seconds, rate
    with nogil:
        rate = kt_rf_avx512_bf16_peak(n, secs)
    if rate < 0:
        _raise_errno("avx512_bf16_peak", rate)
    return rate


def fma_peak(threads, seconds=0.5, width=None):
    """FLOP/s of an fp32 FMA register loop: width 512 (AVX-512F zmm) or 256 (AVX2 + FMA ymm);
    None picks 512 where "avx512" is available, else 256."""
    from .. import _cpu
    _check_threads(threads)
    _check_seconds(seconds)
    zmm = bool(_cpu._probe()[2].get("avx512"))
    if width is None:
        width = 512 if zmm else 256
    if width not in (256, 512):
        raise ValueError(f"width: must be 256, 512 or None, got {width!r}")
    if width == 512 and not zmm:
        raise RuntimeError("fma_peak: width 512 needs AVX-512F, which this CPU (or OS) lacks")
    if width == 256 and not has_avx2_fma():
        raise RuntimeError("fma_peak: width 256 needs AVX2 + FMA, which this CPU (or OS) lacks")
    cdef int n = threads, w = width
    cdef double secs = seconds, rate
    with nogil:
        rate = kt_rf_fma_peak(n, secs, w)
    if rate < 0:
        _raise_errno("fma_peak", rate)
    return rate


def read_bandwidth(threads, nbytes=1 << 30, passes=3, simd=None):
    """Best bytes/s over `passes` streaming reads of an `nbytes` buffer (allocated, touched by
    its reader threads, and freed here) split evenly across `threads` threads."""
    from .. import _cpu
    _check_threads(threads)
    if not isinstance(nbytes, int) or nbytes < 256 * threads:
        raise ValueError(f"nbytes: must be an integer >= 256 * threads, got {nbytes!r}")
    if not isinstance(passes, int) or passes < 1:
        raise ValueError(f"passes: must be a positive integer, got {passes!r}")
    has512 = bool(_cpu._probe()[2].get("avx512"))
    if simd and not has512:
        raise RuntimeError("read_bandwidth: simd=True needs AVX-512, which this CPU (or OS) lacks")
    cdef int n = threads, p = passes, use_simd = has512 if simd is None else bool(simd)
    cdef size_t size = nbytes
    cdef uint64_t checksum = 0
    cdef double rate
    with nogil:
        rate = kt_rf_read_bandwidth(n, size, p, use_simd, &checksum)
    if rate < 0:
        _raise_errno("read_bandwidth", rate)
    return rate
