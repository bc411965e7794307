"""Quantization error itself (design.md 6): the quantized reference vs the bf16 reference.

Builds a Qwen3-30B-A3B-shaped layer (E=128, H=2048, I=768, k=8; base weights normal * 0.02 as
bf16; x and dy normal bf16; random top-8 routing with softmax weights over the 8 chosen
logits; per-projection LoRA r=16 on gate, up and down, A kaiming-uniform (bound 1/sqrt(in)),
B normal * 0.02 (nonzero, so every LoRA gradient is meaningful), scale 2), runs
reference.moe_forward / moe_backward once with the bf16 weights and once per quantized
format / activation mode, and prints a markdown table of the relative Frobenius error
||a - b|| / ||b|| (b: the bf16 reference) for y, dx, dw (router) and every LoRA gradient.
fp8: reference.quantize_fp8 (scale = amax / 448 per 128 x 128 block, e4m3 round to nearest
even), as the FP8 releases are made; "int4-full": reference.quantize_int4_full_range (codes
over all of [-8, 7], scale = amax / 8), a published-style INT4 checkpoint.

    python bench/quant_error.py [--tokens 256] [--seed 0] [--only "fp8 e4m3 block 128x128 weight-only"]

Plain numpy (float64 math), so it takes minutes and ~10 GB of memory at the default size.
"""
import argparse
import gc
import sys
import time

import ml_dtypes
import numpy as np

from ktmoe import reference
from ktmoe.testing import rel_error as rel_err   # the harness metric: relative Frobenius error, float64

BF16 = ml_dtypes.bfloat16
E, H, I, K, R, SCALE = 128, 2048, 768, 8, 16, 2.0

CONFIGS = [   # (row label, format, group_size, activations)
    ("int8 weight-only", "int8", None, "bf16"),
    ("int4 g128 weight-only", "int4", 128, "bf16"),
    ("int4 g64 weight-only", "int4", 64, "bf16"),
    ("int4 g32 weight-only", "int4", 32, "bf16"),
    ("int8 W8A8", "int8", None, "int8"),
    ("int4 g128 W8A8", "int4", 128, "int8"),
    ("fp8 e4m3 block 128x128 weight-only", "fp8", (128, 128), "bf16"),
    ("int4 g32 codes [-8, 7] weight-only", "int4-full", 32, "bf16"),
]
COLUMNS = ["y", "dx", "dw", "dA gate", "dB gate", "dA up", "dB up", "dA down", "dB down"]


def build_layer(tokens, seed):
    rng = np.random.default_rng(seed)
    normal_bf16 = lambda *shape, std=1.0: (rng.standard_normal(shape, dtype=np.float32) * std).astype(BF16)
    w_gate = normal_bf16(E, I, H, std=0.02)
    w_up = normal_bf16(E, I, H, std=0.02)
    w_down = normal_bf16(E, H, I, std=0.02)
    x = normal_bf16(tokens, H)
    dy = normal_bf16(tokens, H)
    logits = rng.standard_normal((tokens, E))
    ids = np.argsort(-logits, axis=1)[:, :K]                     # top-8 experts
    top = np.take_along_axis(logits, ids, axis=1)
    weights = (np.exp(top) / np.exp(top).sum(axis=1, keepdims=True)).astype(np.float32)

    def lora_ab(n_in, n_out):
        A = rng.uniform(-1, 1, (E, R, n_in)).astype(np.float32) / np.float32(np.sqrt(n_in))
        B = (rng.standard_normal((E, n_out, R)) * 0.02).astype(np.float32)
        return A, B
    lora = reference.LoRA(gate=lora_ab(H, I), up=lora_ab(H, I), down=lora_ab(I, H), scale=SCALE)
    return x, ids, weights, dy, (w_gate, w_up, w_down), lora


def run(x, ids, weights, dy, base, lora, activations="bf16"):
    y, cache = reference.moe_forward(x, ids, weights, *base, lora, activations=activations)
    dx, dw, grads = reference.moe_backward(dy, cache)
    del cache
    out = {"y": y, "dx": dx, "dw": dw}
    for name in ("gate", "up", "down"):
        out[f"dA {name}"], out[f"dB {name}"] = grads[name]
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", action="append", choices=[c[0] for c in CONFIGS],
                    help="run only this row (repeatable; default: every row)")
    args = ap.parse_args()

    x, ids, weights, dy, base, lora = build_layer(args.tokens, args.seed)
    t0 = time.time()
    ref = run(x, ids, weights, dy, base, lora)
    print(f"bf16 reference: {time.time() - t0:.0f} s", file=sys.stderr)
    gc.collect()

    rows = []
    for label, fmt, gs, activations in CONFIGS:
        if args.only and label not in args.only:
            continue
        t0 = time.time()
        if fmt == "fp8":
            quantized = tuple(reference.quantize_fp8(w, gs) for w in base)
        elif fmt == "int4-full":
            quantized = tuple(reference.quantize_int4_full_range(w, gs) for w in base)
        else:
            quantized = tuple(reference.quantize(w, fmt, gs or 128) for w in base)
        res = run(x, ids, weights, dy, quantized, lora, activations)
        rows.append((label, [rel_err(res[c], ref[c]) for c in COLUMNS]))
        del quantized, res
        gc.collect()
        print(f"{label}: {time.time() - t0:.0f} s", file=sys.stderr)

    print(f"Relative Frobenius error ||quantized - bf16|| / ||bf16|| of the reference, Qwen3-30B-A3B "
          f"layer (E={E}, H={H}, I={I}, k={K}), T={args.tokens}, LoRA r={R} on gate/up/down, "
          f"scale {SCALE:g}, seed {args.seed}.\n")
    print("| format | " + " | ".join(COLUMNS) + " |")
    print("|---|" + "---:|" * len(COLUMNS))
    for label, errs in rows:
        print(f"| {label} | " + " | ".join(f"{100 * e:.2f} %" for e in errs) + " |")


if __name__ == "__main__":
    main()
