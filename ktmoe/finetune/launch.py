"""`ktmoe finetune --nproc N`: N local ranks of the same job, started by torch.distributed's
elastic launcher (what `torchrun --standalone --nproc-per-node N -m ktmoe.finetune ...` runs).

Each rank is `python -c RANK_ENTRY ARGS` (the job of `python -m ktmoe.finetune ARGS`, without
--nproc) with the launcher's environment (RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE,
MASTER_ADDR / MASTER_PORT): train.py sees WORLD_SIZE > 1 and runs data-parallel. If one rank fails, the launcher stops the others and
this returns: 2 when a rank reported an input error (rank 0 printed it), 130 / 143 / 129 after
Ctrl-C / SIGTERM / SIGHUP (the launcher passes SIGTERM and SIGHUP on to the ranks), else 1
with one line naming the rank and how it ended.
"""
from __future__ import annotations

import signal
import sys
import uuid


def without_nproc(argv: list) -> list:
    """argv with --nproc N / --nproc=N taken out."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            out.append(a)
    return out


# Each rank's command: `python -c` with the current directory taken off sys.path first (where
# `python -m ktmoe.finetune` would put it), so that a source checkout's uncompiled ktmoe/ in the
# directory the job was started from never shadows the installed package in the ranks.
RANK_ENTRY = ("import sys\n"
              "if sys.path and sys.path[0] == '':   # absent under PYTHONSAFEPATH / -P\n"
              "    del sys.path[0]\n"
              "from ktmoe.cli import main\n"
              "sys.exit(main(['finetune', *sys.argv[1:]]))\n")


def launch(argv: list, nproc: int) -> int:
    import logging

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)   # the failure report is ours
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=f"ktmoe-{uuid.uuid4().hex[:12]}",
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.2)
    try:
        elastic_launch(config, sys.executable)("-c", RANK_ENTRY, *without_nproc(argv))
    except ChildFailedError as e:
        codes = {f.local_rank: f.exitcode for f in e.failures.values()}
        if 2 in codes.values():
            return 2
        rank, first = e.get_first_failure()   # the rank that ended first: the others were stopped after it
        code = first.exitcode
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):   # stopped as Ctrl-C stops (rank 0 said how)
            if code in (-sig, 128 + sig):   # (a rank the launcher stopped with SIGTERM says 143 too: not first)
                return 128 + sig
        how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit status {code}"
        print(f"ktmoe finetune: error: rank {rank} of {nproc} ended with {how}; the other ranks were stopped "
              f"(--out keeps the last checkpoint: continue with --resume)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except SignalException as e:   # SIGTERM / SIGHUP to the launcher: it passed the signal on to the ranks
        return 128 + int(e.sigval)
    return 0
