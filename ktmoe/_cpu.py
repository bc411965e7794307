"""CPU path selection: which kernel targets this CPU and OS can run, and which one to use.

The targets are the build's (ktmoe/_kernels/meson.build declares each with its compiler flags and
the CPU features it needs; the C extension reports that list). Best first: "amx" (AMX-BF16 / INT8
tiles; needs the CPU flags, the tile state enabled by the OS and Linux's per-process permission),
"avx512" (AVX-512 F/BW/VL/DQ + BF16 + VNNI), "avx512f" (AVX-512 F/BW/VL/DQ only: built without the
BF16 / VNNI flags, for Skylake-SP / Cascade Lake / Ice Lake), "avx2" (AVX2 + FMA, ymm only: AMD
Rome / Milan, Haswell / Broadwell), "portable" (plain C, any x86-64). The CPU features are detected
once (cpu_features.c). The environment variable KTMOE_ISA (or an `isa=` argument) may force any
target the CPU can run; asking for one it cannot run raises rather than falling back.
"""
from __future__ import annotations

import functools
import os

from ._kernels import _core

ENV_VAR = "KTMOE_ISA"
_TARGETS = _core.isa_targets()                     # [(name, flags, needs)], worst first
ISAS = tuple(name for name, _, _ in reversed(_TARGETS))   # best first
ISA_FLAGS = {name: flags for name, flags, _ in _TARGETS}
ISA_NEEDS = {name: tuple(needs) for name, _, needs in _TARGETS}

# what each feature bit means, for the reasons `ktmoe info` gives
FEATURE_TEXT = {
    "avx2": "AVX2", "fma": "FMA", "f16c": "F16C", "avx_vnni": "AVX-VNNI", "avx512": "AVX-512 F/BW/VL/DQ",
    "avx512_bf16": "AVX512_BF16", "avx512_vnni": "AVX512_VNNI", "amx_tile": "AMX-TILE", "amx_bf16": "AMX-BF16",
    "amx_int8": "AMX-INT8", "amx_os": "the OS's AMX tile state (XCR0)",
    "amx_perm": "Linux's grant of the AMX tile state (arch_prctl; kernel >= 5.16)",
}


def _why_not(name: str, flags: dict[str, bool]) -> str:
    missing = [f for f in ISA_NEEDS[name] if not flags.get(f)]
    text = ", ".join(FEATURE_TEXT.get(f, f) for f in missing)
    if missing == ["amx_perm"]:
        err = _core.amx_request_permission()
        text += f" (errno {err}: {os.strerror(err)})" if err else ""
    return f"this CPU or OS lacks {text}"


@functools.lru_cache(maxsize=None)
def _probe() -> tuple[tuple[str, ...], dict[str, str], dict[str, bool]]:
    """(available targets best first, why each missing one is missing, raw feature flags)."""
    f = _core.cpu_features()
    available = tuple(name for name in ISAS if all(f.get(x) for x in ISA_NEEDS[name]))
    missing = {name: _why_not(name, f) for name in ISAS if name not in available}
    return available, missing, f


def available_isas() -> list[str]:
    """Kernel targets this CPU can run, best first ("portable" is always there); every one of them
    can be forced with isa= / $KTMOE_ISA, and the tests run each."""
    return list(_probe()[0])


def unavailable_reasons() -> dict[str, str]:
    """Why each path this CPU cannot run is missing, {path: reason}."""
    return dict(_probe()[1])


def select_isa(requested: str | None = None) -> tuple[str, str]:
    """(path, reason). `requested` (or $KTMOE_ISA when None) forces a path."""
    available, missing, _ = _probe()
    source = "isa argument"
    if requested is None and os.environ.get(ENV_VAR):
        requested, source = os.environ[ENV_VAR].strip().lower(), f"${ENV_VAR}"
    if requested is None:
        best = available[0]
        skipped = [f"{isa}: {missing.get(isa, 'not available')}" for isa in ISAS[: ISAS.index(best)]]
        return best, "best path this CPU supports" + (f" ({'; '.join(skipped)})" if skipped else "")
    if requested not in ISAS:
        raise ValueError(f"isa: unknown kernel path {requested!r} (from {source}); choose one of {list(ISAS)}")
    if requested not in available:
        raise ValueError(f"isa: path {requested!r} (from {source}) cannot run here: {missing.get(requested, 'not available')}")
    return requested, f"forced by {source}"


THREADS_ENV_VAR = "KTMOE_NUM_THREADS"
MAX_THREADS = 256   # the kernel's thread pool limit (MoEExperts num_threads)


LOCAL_RANKS_ENV_VAR = "LOCAL_WORLD_SIZE"   # set by torchrun and `ktmoe finetune --nproc`
_core_sharers: int | None = None


def set_core_sharers(n: int | None) -> None:
    """How many processes of this host (this one included) run on cores of this process's
    affinity mask; set by ktmoe.torch.distributed.host_group() from the ranks' masks."""
    global _core_sharers
    _core_sharers = None if n is None else max(1, int(n))


def core_sharers() -> int:
    """Processes this one shares its cores with (itself included): what host_group() found, else
    $LOCAL_WORLD_SIZE (the local ranks of torchrun / `ktmoe finetune --nproc`, assumed to share
    one affinity mask), else 1."""
    if _core_sharers is not None:
        return _core_sharers
    env = os.environ.get(LOCAL_RANKS_ENV_VAR, "")
    return int(env) if env.isdigit() and int(env) >= 1 else 1


def default_num_threads(reserve: int = 0) -> int:
    """The experts kernel's default thread count: $KTMOE_NUM_THREADS when set, else this
    process's share of the cores it may run on: its affinity mask divided by core_sharers()
    (several ranks of one host split the cores evenly), minus `reserve` cores left to torch,
    at least 1.

    ktmoe.torch reserves 1 core when the model's other layers run on a GPU (the torch thread
    that launches them keeps its core) and none when they run on the CPU: there torch and the
    kernel take turns within a layer (each waits for the other), so both use every core."""
    env = os.environ.get(THREADS_ENV_VAR)
    if env:
        try:
            n = int(env)
        except ValueError:
            n = 0
        if not 1 <= n <= MAX_THREADS:
            raise ValueError(f"${THREADS_ENV_VAR}: must be an integer in [1, {MAX_THREADS}], got {env!r}")
        return n
    return max(1, len(os.sched_getaffinity(0)) // core_sharers() - reserve)


def cpu_info() -> dict:
    """What `ktmoe info` prints: CPU features, every target (flags, usable or why not), the path
    chosen and why, thread count."""
    available, missing, flags = _probe()
    isa, reason = select_isa()
    return {
        "features": [name for name, on in flags.items() if on],
        "available_isas": list(available),
        "unavailable": dict(missing),
        "targets": [{"name": name, "flags": ISA_FLAGS[name], "needs": list(ISA_NEEDS[name]),
                     "usable": name in available, "why": missing.get(name, "")} for name in ISAS],
        "isa": isa,
        "reason": reason,
        "num_threads": default_num_threads(),
    }
