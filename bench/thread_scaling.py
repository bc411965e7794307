"""Thread scaling of one Qwen3-30B-A3B expert layer (E=128, H=2048, I=768, k=8, PEFT LoRA r=16):
best-of-N forward, backward and forward+backward time per thread count, for the lent many-core
machine (the 2-core CI machine has nothing to scale). Run from outside the source tree:

    python bench/thread_scaling.py --tokens 4096 --threads 16,8,4,1 [--transposed] [--hot]

--hot sends every token's first slot to expert 0 (skewed routing: one expert with T rows).
"""
import argparse
import time

import ml_dtypes
import numpy as np

import ktmoe

E, H, I, K, R = 128, 2048, 768, 8, 16
BF16 = ml_dtypes.bfloat16


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--threads", default="16,8,4,1", help="comma-separated thread counts")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--transposed", action="store_true", help="the opt-in transposed weight copy")
    ap.add_argument("--hot", action="store_true", help="skewed routing: every token's first slot on expert 0")
    args = ap.parse_args()
    T = args.tokens
    rng = np.random.default_rng(0)
    gate_up = (rng.random((E, 2 * I, H), dtype=np.float32) - 0.5).astype(BF16)
    down = (rng.random((E, H, I), dtype=np.float32) - 0.5).astype(BF16)
    x = (rng.random((T, H), dtype=np.float32) - 0.5).astype(BF16)
    ids = np.argsort(rng.random((T, E)), axis=1)[:, :K].astype(np.int32)
    if args.hot:   # expert 0 first for every token (the other slots keep distinct experts)
        ids = np.argsort(rng.random((T, E - 1)), axis=1)[:, :K].astype(np.int32) + 1
        ids[:, 0] = 0
    w = rng.random((T, K)).astype(np.float32)
    factors = [(rng.random(s, dtype=np.float32) - 0.5) * 0.02 for s in [(E * R, H), (2 * I, E * R), (E * R, I), (H, E * R)]]
    grads = [np.zeros_like(f) for f in factors]
    lora = ktmoe.LoRA.peft(gate_up=tuple(factors[:2]), down=tuple(factors[2:]), scale=2.0)
    lora_grads = ktmoe.LoRAGrads.peft(gate_up=tuple(grads[:2]), down=tuple(grads[2:]))
    y, dx, dw = np.empty((T, H), BF16), np.empty((T, H), BF16), np.empty((T, K), np.float32)
    layer = ktmoe.MoEExperts(gate_up=gate_up, down=down, transposed_weights=args.transposed, max_tokens=T)
    print(f"T={T} path={layer.isa} transposed_weights={args.transposed} hot_expert={args.hot}")
    for n in [int(t) for t in args.threads.split(",")]:
        layer.num_threads = n
        best = [float("inf")] * 2
        for _ in range(args.rounds + 1):          # the first round warms up
            t0 = time.perf_counter()
            layer.forward(x, ids, w, lora=lora, keep_for_backward=True, out=y)
            t1 = time.perf_counter()
            layer.backward(x, lora_grads=lora_grads, dx_out=dx, dw_out=dw)
            t2 = time.perf_counter()
            best = [min(best[0], t1 - t0), min(best[1], t2 - t1)]
        total = best[0] + best[1]
        print(f"threads {n:3d}: fwd {1e3 * best[0]:8.1f} ms  bwd {1e3 * best[1]:8.1f} ms  "
              f"fwd+bwd {1e3 * total:8.1f} ms  {T / total:9.0f} tokens/s")


if __name__ == "__main__":
    main()
