"""Ranks vs threads on one host: one layer's experts forward + backward on T tokens.

    python bench/dist_scaling.py --tokens 2048 [--experts 64 --hidden 1024 --inter 512]
    python -m torch.distributed.run --standalone --nproc-per-node 2 bench/dist_scaling.py --tokens 2048

Alone: one process with every core of its affinity mask runs all T tokens (what "gathering the
tokens of every rank into one process" costs in kernel time). Under torchrun: each of the N
ranks runs T / N tokens at once with its share of the cores (ktmoe's default), the layer's
packed weights shared by the host's ranks (ktmoe.torch.distributed); the time is the slowest
rank's. Prints the median over --rounds of the fwd + bwd wall time, tokens/s, threads per
process and the host memory of the packed weights (PSS of the shared region summed over the
ranks, or the layer's own bytes when alone). Random bf16 weights, LoRA r = 16 on all projections.
"""
import argparse
import json
import os
import statistics
import time

import ml_dtypes
import numpy as np


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--inter", type=int, default=512)
    p.add_argument("--k", type=int, default=6)
    p.add_argument("--rounds", type=int, default=5)
    a = p.parse_args()
    import torch  # noqa: F401  (torch.distributed under torchrun)
    import ktmoe
    E, H, I = a.experts, a.hidden, a.inter
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), 0
    rng = np.random.default_rng(0)
    gu = (rng.standard_normal((E, 2 * I, H)) * 0.02).astype(ml_dtypes.bfloat16)
    dn = (rng.standard_normal((E, H, I)) * 0.02).astype(ml_dtypes.bfloat16)
    if world > 1:
        import torch.distributed as dist
        from ktmoe.torch.distributed import HostRegion, host_group
        dist.init_process_group("gloo")
        rank = dist.get_rank()
        host = host_group()
        n = ktmoe.MoEExperts.region_bytes(E, H, I)
        region = HostRegion(host, n)
        if host.leader:
            ktmoe.MoEExperts.pack_region(region.writable(0, n), gate_up=gu, down=dn)
            region.done_writing()
        dist.barrier()
        layer = ktmoe.MoEExperts.attach(region.readable(0, n), E, H, I)
        sync = dist.barrier
    else:
        layer = ktmoe.MoEExperts(gate_up=gu, down=dn)
        def sync():
            pass
    del gu, dn
    T = a.tokens // world
    r = 16
    shapes = {"gate": ((E, r, H), (E, I, r)), "up": ((E, r, H), (E, I, r)), "down": ((E, r, I), (E, H, r))}
    lora = ktmoe.LoRA(**{n: ((rng.standard_normal(a_) * 0.01).astype(np.float32),
                             (rng.standard_normal(b_) * 0.01).astype(np.float32)) for n, (a_, b_) in shapes.items()},
                      scale=2.0)
    grads = ktmoe.LoRAGrads(**{n: (np.zeros(a_, np.float32), np.zeros(b_, np.float32)) for n, (a_, b_) in shapes.items()})
    x = rng.standard_normal((T, H)).astype(ml_dtypes.bfloat16)
    ids = np.stack([rng.permutation(E)[:a.k] for _ in range(T)]).astype(np.int32)
    w = rng.random((T, a.k)).astype(np.float32)
    dy = rng.standard_normal((T, H)).astype(ml_dtypes.bfloat16)
    times = []
    for i in range(a.rounds + 1):
        sync()
        t0 = time.perf_counter()
        layer.forward(x, ids, w, lora=lora, keep_for_backward=True)
        layer.backward(dy, lora_grads=grads)
        dt = time.perf_counter() - t0
        if world > 1:
            t = torch.tensor([dt])
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            dt = float(t)
        if i:
            times.append(dt)
    mem = layer.weight_bytes
    if world > 1:
        pss = 0
        with open("/proc/self/smaps") as f:
            inside = False
            for line in f:
                parts = line.split()
                if "-" in parts[0] and not parts[0].endswith(":"):
                    inside = len(parts) >= 6 and parts[5].startswith("/memfd:ktmoe")
                elif inside and parts[0] == "Pss:":
                    pss += int(parts[1]) * 1024
        t = torch.tensor([float(pss)])
        dist.all_reduce(t)
        mem = int(t)
    if rank == 0:
        ms = statistics.median(times) * 1e3
        print(json.dumps({"processes": world, "threads_each": layer.num_threads, "tokens": a.tokens,
                          "fwd_bwd_ms": round(ms, 1), "tokens_per_s": round(a.tokens / ms * 1e3),
                          "packed_weight_bytes": layer.weight_bytes, "host_bytes_for_weights": mem}))
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
