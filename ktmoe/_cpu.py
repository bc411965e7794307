"""CPU path selection: which kernel paths this CPU and OS can run, and which one to use.

Paths, best first: "amx" (AMX-BF16 tiles; needs the CPU flags, the tile state enabled by
the OS and Linux's per-process permission), "avx512" (AVX-512 F/BW/VL/DQ, using the BF16
dot-product instructions where present), "portable" (plain C, any x86-64). The
environment variable KTMOE_ISA may force a lower path; asking for a path this machine
cannot run raises rather than falling back.
"""
from __future__ import annotations

import functools
import os

from ._kernels import _core

ISAS = ("amx", "avx512", "portable")
ENV_VAR = "KTMOE_ISA"


@functools.lru_cache(maxsize=None)
def _probe() -> tuple[tuple[str, ...], dict[str, str], dict[str, bool]]:
    """(available paths, why each missing one is missing, raw feature flags)."""
    f = _core.cpu_features()
    missing: dict[str, str] = {}
    available = []
    if not (f["amx_tile"] and f["amx_bf16"]):
        missing["amx"] = "the CPU has no AMX-BF16 tiles"
    elif not f["avx512"]:
        missing["amx"] = "the AMX path also needs AVX-512, which is absent or disabled by the OS"
    elif not f["amx_os"]:
        missing["amx"] = "the OS has not enabled the AMX tile state (XCR0)"
    else:
        err = _core.amx_request_permission()
        if err:
            missing["amx"] = (f"Linux refused the AMX tile state (arch_prctl ARCH_REQ_XCOMP_PERM, "
                              f"errno {err}: {os.strerror(err)}); a kernel >= 5.16 is needed")
        else:
            available.append("amx")
    if f["avx512"]:
        available.append("avx512")
    else:
        missing["avx512"] = "the CPU or OS lacks AVX-512 F/BW/VL/DQ"
    available.append("portable")
    return tuple(available), missing, f


def available_isas() -> list[str]:
    """Kernel paths this CPU can run, best first ("portable" is always there)."""
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
        skipped = [f"{isa}: {missing[isa]}" for isa in ISAS[: ISAS.index(best)]]
        return best, "best path this CPU supports" + (f" ({'; '.join(skipped)})" if skipped else "")
    if requested not in ISAS:
        raise ValueError(f"isa: unknown kernel path {requested!r} (from {source}); choose one of {list(ISAS)}")
    if requested not in available:
        raise ValueError(f"isa: path {requested!r} (from {source}) cannot run here: {missing[requested]}")
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
    """What `ktmoe info` prints: CPU features, the path chosen and why, thread count."""
    available, missing, flags = _probe()
    isa, reason = select_isa()
    return {
        "features": [name for name, on in flags.items() if on],
        "available_isas": list(available),
        "unavailable": dict(missing),
        "isa": isa,
        "reason": reason,
        "num_threads": default_num_threads(),
    }
