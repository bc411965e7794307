"""The `ktmoe` command: `finetune` (the main job: LoRA SFT of a MoE model), `bench`
(layer benchmarks against the roofline and torch), `info` (CPU features and the kernel
path chosen) and `verify` (each kernel path on this CPU against the numpy reference).

`finetune` and `bench` live in their own modules, each exposing add_arguments(parser)
and run(args) -> exit code; they import torch only inside run().
"""
from __future__ import annotations

import argparse
import importlib
import sys
import time

import ml_dtypes
import numpy as np

from . import _cpu
from .experts import MoEExperts
from .lora import LoRA

BF16 = ml_dtypes.bfloat16
# (E, H, I, T, k, r): a tail-heavy shape and a larger one
VERIFY_SHAPES = [(8, 72, 56, 33, 2, 5), (16, 512, 256, 128, 4, 16)]
TOLERANCE = 1e-2  # SPEC.md section 6: relative Frobenius error of bf16 kernels


def cmd_info(args) -> int:
    info = _cpu.cpu_info()
    print(f"ktmoe {__import__('ktmoe').__version__}")
    print(f"CPU features : {', '.join(info['features']) or 'none of interest'}")
    print(f"paths here   : {', '.join(info['available_isas'])}")
    for isa, why in info["unavailable"].items():
        print(f"  no {isa:<9}: {why}")
    print(f"path in use  : {info['isa']} ({info['reason']})")
    print(f"threads      : {info['num_threads']} (cores this process may use)")
    return 0


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    nb = np.linalg.norm(b)
    return float(np.linalg.norm(a - b) / nb) if nb else float(np.linalg.norm(a))


def _problem(rng, E, H, I, T, k, r):
    """Random bf16 weights and inputs, routing with an id = -1 slot, PEFT-layout LoRA with B != 0."""
    def rnd(*shape, scale=1.0):
        return (rng.standard_normal(shape) * scale).astype(BF16)
    w = dict(gate_up=rnd(E, 2 * I, H, scale=H ** -0.5), down=rnd(E, H, I, scale=I ** -0.5))
    x, dy = rnd(T, H), rnd(T, H)
    ids = np.stack([rng.permutation(E)[:k] for _ in range(T)]).astype(np.int32)
    ids[0, -1] = -1
    weights = rng.random((T, k)).astype(np.float32)
    lora = [rnd(E * r, H, scale=0.1), rnd(2 * I, E * r, scale=0.1),   # fp32, as PEFT keeps them
            rnd(E * r, I, scale=0.1), rnd(H, E * r, scale=0.1)]
    lora = [a.astype(np.float32) for a in lora]
    return w, x, dy, ids, weights, lora


VERIFY_FORMATS = [   # (label, weights, group_size, activations)
    ("bf16", "bf16", None, "bf16"), ("int8", "int8", None, "bf16"), ("int4/g32", "int4", 32, "bf16"),
    ("w8a8", "int8", None, "int8"), ("w4a8/g32", "int4", 32, "int8")]


def cmd_verify(args) -> int:
    from . import reference
    rng = np.random.default_rng(0)
    isas = [args.isa] if args.isa else _cpu.available_isas()
    formats = [f for f in VERIFY_FORMATS if args.weights in ("all", f[0])]
    worst = 0.0
    print(f"{'path':<9} {'weights':<9} {'E,H,I,T,k,r':<22} {'fwd ms':>8} {'bwd ms':>8}  "
          f"max rel. error (y, dx, dw, LoRA grads)")
    for E, H, I, T, k, r in VERIFY_SHAPES:
        w, x, dy, ids, weights, (ga, gb, da, db) = _problem(rng, E, H, I, T, k, r)
        scale = 2.0
        gu = np.asarray(w["gate_up"], np.float32)
        ref_lora = reference.LoRA.peft(gate_up=(ga, gb), down=(da, db), scale=scale)
        for label, fmt, group, acts in formats:
            if group and (H % group or I % group):
                continue
            base = (gu[:, :I], gu[:, I:], w["down"])
            if fmt != "bf16":   # the quantized reference: same codes, same rounding (SPEC.md 5-6)
                base = tuple(reference.quantize(b, fmt, **({"group_size": group} if group else {})) for b in base)
            y_ref, cache = reference.moe_forward(x, ids, weights, *base, lora=ref_lora, activations=acts)
            dx_ref, dw_ref, g_ref = reference.moe_backward(dy, cache)
            for isa in isas:
                layer = MoEExperts(gate_up=w["gate_up"], down=w["down"], isa=isa, num_threads=args.threads,
                                   weights=fmt, group_size=group, activations=acts)
                grads = [np.zeros(a.shape, np.float32) for a in (ga, gb, da, db)]
                t0 = time.perf_counter()
                y = layer.forward(x, ids, weights, LoRA.peft(gate_up=(ga, gb), down=(da, db), scale=scale),
                                  keep_for_backward=True)
                t1 = time.perf_counter()
                dx, dw = layer.backward(dy, LoRA.peft(gate_up=tuple(grads[:2]), down=tuple(grads[2:])))
                t2 = time.perf_counter()
                errs = [_rel(y, y_ref), _rel(dx, dx_ref), _rel(dw, dw_ref),
                        _rel(grads[0], g_ref["gate_up"][0]), _rel(grads[1], g_ref["gate_up"][1]),
                        _rel(grads[2], g_ref["down"][0]), _rel(grads[3], g_ref["down"][1])]
                worst = max(worst, *errs)
                shape = f"{E},{H},{I},{T},{k},{r}"
                print(f"{isa:<9} {label:<9} {shape:<22} {1e3 * (t1 - t0):8.2f} {1e3 * (t2 - t1):8.2f}  "
                      + " ".join(f"{e:.1e}" for e in errs))
    ok = worst <= TOLERANCE
    print(f"{'PASS' if ok else 'FAIL'}: largest relative error {worst:.2e} (tolerance {TOLERANCE:g})")
    return 0 if ok else 1


# subcommand -> (module, help)
EXTERNAL_COMMANDS = {
    "finetune": ("ktmoe.finetune.cli", "LoRA fine-tuning of a MoE model (built-in tiny model by default)"),
    "bench": ("ktmoe.bench", "benchmark the expert layer against the roofline and torch baselines"),
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="ktmoe", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module_name, help_text) in EXTERNAL_COMMANDS.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(p)
        p.set_defaults(fn=module.run)
    sub.add_parser("info", help="CPU features and the kernel path in use").set_defaults(fn=cmd_info)
    v = sub.add_parser("verify", help="check every kernel path on this CPU against the numpy reference")
    v.add_argument("--isa", choices=_cpu.ISAS, help="check one path only")
    v.add_argument("--threads", type=int, default=None, help="worker threads (default: all usable cores)")
    v.add_argument("--weights", choices=["all"] + [f[0] for f in VERIFY_FORMATS], default="all",
                   help="weight formats to check (default: all; quantized ones against the quantized reference)")
    v.set_defaults(fn=cmd_verify)
    args = parser.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
