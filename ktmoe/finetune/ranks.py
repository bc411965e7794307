"""Data-parallel ranks of `ktmoe finetune` (torchrun or `--nproc N`): who does what.

`Ranks.from_env(torch)`: one process (WORLD_SIZE unset or 1: nothing distributed, nothing
initialized), or rank RANK of WORLD_SIZE, with the default process group initialized here
(gloo on the CPU, nccl for GPU tensors plus gloo for CPU ones when the ranks use GPUs, one GPU
per local rank). What each rank does (train.py):
- every rank checks every input itself (they meet the same error, so none waits for another);
- rank 0 alone writes --out (`on_main`: its FinetuneError is raised on every rank);
- the experts are packed once per host into shared memory (ktmoe.torch.distributed);
- each step's batch is split over the ranks (`shard`), the loss is each rank's summed token
  loss over the whole batch's token count times WORLD_SIZE, so DDP's gradient average is the
  gradient of the whole batch's mean loss; the loss is summed over the ranks for the log.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from . import FinetuneError


@dataclass
class Ranks:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    dist: object = None   # torch.distributed when world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @staticmethod
    def from_env(torch, use_cuda: bool) -> "Ranks":
        world = int(os.environ.get("WORLD_SIZE", "1") or 1)
        if world <= 1:
            return Ranks()
        import torch.distributed as dist
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if use_cuda:   # rank i of a host on GPU i: every rank meets the same error (rank 0 prints it)
            local_world, gpus = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1), torch.cuda.device_count()
            if local_world > gpus:
                raise FinetuneError(f"--nproc {local_world} with the non-expert part on the GPU needs one GPU per "
                                    f"rank, and this host has {gpus}: pass --device cpu, or --nproc {gpus}")
            torch.cuda.set_device(local)
        if not dist.is_initialized():
            dist.init_process_group("cpu:gloo,cuda:nccl" if use_cuda else "gloo")
        return Ranks(dist.get_rank(), dist.get_world_size(), local, dist)

    def on_main(self, fn, *args):
        """fn(*args) on rank 0 only; its FinetuneError (message) is raised on every rank."""
        if self.world == 1:
            return fn(*args)
        err = None
        if self.main:
            try:
                fn(*args)
            except FinetuneError as e:
                err = str(e)
        box = [err]
        self.dist.broadcast_object_list(box, src=0)
        if box[0] is not None:
            raise FinetuneError(box[0])
        return None

    def barrier(self) -> None:
        if self.world > 1:
            self.dist.barrier()

    def shard(self, indices: list) -> tuple:
        """(this rank's examples of a batch, whether they count): a rank left without one runs the
        first example of the batch with weight 0 (every rank must take part in each step)."""
        mine = indices[self.rank::self.world]
        return (mine, True) if mine else (indices[:1], False)

    def sum(self, value: float, device) -> float:
        if self.world == 1:
            return value
        import torch
        t = torch.tensor([value], dtype=torch.float64, device=device)
        self.dist.all_reduce(t)
        return float(t[0])

    def gather(self, obj) -> list:
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        self.dist.all_gather_object(out, obj)
        return out

    def wrap(self, model, device):
        """The model as the engine trains it: DDP over the ranks (one GPU each), else itself."""
        if self.world == 1:
            return model
        from torch.nn.parallel import DistributedDataParallel
        ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)

    def close(self) -> None:
        if self.world > 1 and self.dist.is_initialized():
            self.dist.destroy_process_group()
