"""The `ktmoe` command: `finetune` (the main job: LoRA SFT of a MoE model), `bench`
(layer benchmarks against the roofline and torch), `merge` (an adapter merged into its
checkpoint: ktmoe/finetune/merge.py), `info` (CPU features and the kernel
path chosen) and `verify` (each kernel path on this CPU against the numpy reference).

`finetune`, `bench` and `merge` live in their own modules, each exposing add_arguments(parser)
and run(args) -> exit code; they import torch only inside run(). Bad input of any
subcommand ends with one "ktmoe CMD: error: ..." line and exit status 2: flag values are
checked by the argparse types below (argparse's usage errors exit 2 too), what can only be
checked when the command runs ($KTMOE_ISA, $KTMOE_NUM_THREADS) raises UsageError. `verify`
without --isa checks $KTMOE_ISA's path alone when it is set. When stdout's reader goes away
(`ktmoe verify | head -1`) the command stops without a word, exit status 141 (BROKEN_PIPE).
The text `ktmoe --help` shows is DESCRIPTION, not this note.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

import numpy as np

from . import _cpu, formats

# (E, H, I, T, k, r): a tail-heavy shape and a larger one
VERIFY_SHAPES = [(8, 72, 56, 33, 2, 5), (16, 512, 256, 128, 4, 16)]
TOLERANCE = formats.TOLERANCES["bf16"]["rel"]  # design.md 6: relative Frobenius error (every mode's class)

DESCRIPTION = """\
ktmoe: LoRA fine-tuning of Mixture-of-Experts LLMs whose routed experts run in CPU kernels
(Intel AMX / AVX-512 / portable C), with the rest of the model in torch."""
EPILOG = "Run `ktmoe COMMAND --help` for a command's options."


BROKEN_PIPE = 141   # exit status when stdout's reader went away: 128 + SIGPIPE, as a shell reports `yes | head -1`


class UsageError(Exception):
    """Bad input found when a command runs: main() prints it as one error line, exit status 2."""


# ---------------------------------------------------------------- argparse types (shared with bench.py)

def positive_int(text: str) -> int:
    """An integer >= 1."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def thread_count(text: str) -> int:
    """A kernel thread count: an integer in [1, _cpu.MAX_THREADS]."""
    v = positive_int(text)
    if v > _cpu.MAX_THREADS:
        raise argparse.ArgumentTypeError(f"must be at most {_cpu.MAX_THREADS}, got {v}")
    return v


def comma_list(allowed, alone=()):
    """A type: a non-empty comma-separated list of names from `allowed` (no repeats); a name
    in `alone` (e.g. 'none') is accepted only on its own and gives []."""
    def parse(text: str) -> list:
        items = [v.strip() for v in text.split(",")]
        if len(items) == 1 and items[0] in alone:
            return []
        expected = f"expected a comma-separated list of {', '.join([*allowed, *alone])}"
        if not all(items):
            raise argparse.ArgumentTypeError(f"empty name in {text!r}; {expected}")
        if any(v in alone for v in items):
            raise argparse.ArgumentTypeError(f"{' / '.join(alone)} cannot be combined with other names; {expected}")
        bad = [v for v in items if v not in allowed]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {', '.join(map(repr, bad))}; {expected}")
        dups = sorted({v for v in items if items.count(v) > 1})
        if dups:
            raise argparse.ArgumentTypeError(f"{', '.join(map(repr, dups))} given more than once in {text!r}")
        return items
    return parse


def isa_here(text: str) -> str:
    """A kernel path this CPU can run."""
    if text not in _cpu.ISAS:
        raise argparse.ArgumentTypeError(f"unknown kernel path {text!r}; choose one of {', '.join(_cpu.ISAS)}")
    if text not in _cpu.available_isas():
        why = _cpu.unavailable_reasons()[text]
        raise argparse.ArgumentTypeError(f"path {text!r} cannot run on this CPU: {why} "
                                         f"(paths here: {', '.join(_cpu.available_isas())})")
    return text


def _env_threads() -> int:
    try:
        return _cpu.default_num_threads()
    except ValueError as e:
        raise UsageError(str(e)) from None


def cmd_info(args) -> int:
    try:
        info = _cpu.cpu_info()
    except ValueError as e:   # $KTMOE_ISA or $KTMOE_NUM_THREADS
        raise UsageError(str(e)) from None
    print(f"ktmoe {__import__('ktmoe').__version__}")
    print(f"CPU features : {', '.join(info['features']) or 'none of interest'}")
    print(f"paths here   : {', '.join(info['available_isas'])}")
    print("targets      : (best first; KTMOE_ISA / --isa / isa= force any usable one)")
    for t in info["targets"]:
        state = "usable" if t["usable"] else f"not usable: {t['why']}"
        print(f"  {t['name']:<9} {state}  [{t['flags'] or 'no extra flags'}]")
    print(f"path in use  : {info['isa']} ({info['reason']})")
    print(f"threads      : {info['num_threads']} (cores this process may use)")
    return 0


VERIFY_GROUP = 32   # int4 rows: the smallest group size, so the small shapes hold several groups
# (label, weights, group_size, activations, checkpoint): every MODES row of ktmoe/formats.py,
# quantized by the layer (checkpoint=False) or, for a format only checkpoints hold (fp8) and for
# int4 (whose published codes use -8, which ktmoe's own quantizer does not), codes made as a
# published checkpoint holds them and taken by from_quantized
VERIFY_FORMATS = [(m.label + (f"/g{VERIFY_GROUP}" if m.format.group_sizes else ""), m.weights,
                   VERIFY_GROUP if m.format.group_sizes else None, m.activations, not m.format.quantized_here)
                  for m in formats.MODES]
VERIFY_FORMATS += [(f"{m.label}-ckpt/g{VERIFY_GROUP}", m.weights, VERIFY_GROUP, m.activations, True)
                   for m in formats.MODES if m.format.group_sizes and m.format.from_checkpoint]
FP8_BLOCK = formats.FP8_BLOCK


VERIFY_COLUMNS = ("y", "dx", "dw", "dA gu", "dB gu", "dA dn", "dB dn")   # the errors each row prints


VERIFY_TENSORS = ("y", "dx", "dw", "dA_gate_up", "dB_gate_up", "dA_down", "dB_down")   # ktmoe.testing.errors' names


def _verify_layer(testing, rng, weights, fmt, group, acts, checkpoint, E, H, I) -> dict:
    """The harness layer arguments of one VERIFY_FORMATS row: the bf16 weights quantized by the
    layer (the reference quantizer gives the same codes), or codes as a published checkpoint
    holds them (ktmoe.testing.make_prequantized: fp8 with 128 x 128 blocks, int4 over all of
    [-8, 7]) taken by from_quantized."""
    if checkpoint:
        return dict(testing.make_prequantized(rng, fmt, E, H, I, group_size=group or 32, block=FP8_BLOCK),
                    activations=acts)
    return dict(weights, weights=fmt, group_size=group, activations=acts)


def _verify_paths() -> list:
    """The paths verify checks without --isa: $KTMOE_ISA's alone when it is set (a value that is
    not a path this CPU runs is a UsageError), else every path this CPU runs."""
    if not os.environ.get(_cpu.ENV_VAR):
        return _cpu.available_isas()
    try:
        return [_cpu.select_isa()[0]]
    except ValueError as e:
        raise UsageError(str(e).removeprefix("isa: ")) from None


def cmd_verify(args) -> int:
    isas = [args.isa] if args.isa else _verify_paths()
    threads = args.threads if args.threads is not None else _env_threads()
    from . import testing   # imported here: it loads torch where installed
    rng = np.random.default_rng(0)
    rows = [f for f in VERIFY_FORMATS if args.weights in ("all", f[0])]
    worst = 0.0
    print(f"relative Frobenius error against the numpy reference (tolerance {TOLERANCE:g}) of: y = output, "
          f"dx, dw = d topk_weights, dA/dB gu/dn = LoRA gradients of gate_up / down")
    print(f"{'path':<9} {'weights':<13} {'E,H,I,T,k,r':<22} {'fwd ms':>8} {'bwd ms':>8}  "
          + " ".join(f"{c:>7}" for c in VERIFY_COLUMNS))
    for E, H, I, T, k, r in VERIFY_SHAPES:
        # random bf16 weights and inputs, routing with an id = -1 slot, PEFT-layout fp32 LoRA with B != 0
        weights = testing.make_weights(rng, E, H, I)
        x = rng.standard_normal((T, H)).astype(testing.BF16)
        ids, w = testing.make_routing(rng, T, k, E)
        ids[0, -1] = -1
        lora = testing.make_lora(rng, "peft", E, H, I, {"gate_up": r, "down": r}, scale=2.0)
        for label, fmt, group, acts, checkpoint in rows:
            block_scaled = formats.WEIGHT_FORMATS[fmt].scaling == "block"
            if group and (H % group or I % group) or block_scaled and (H % FP8_BLOCK[1] or I % FP8_BLOCK[1]):
                continue
            layer_kwargs = _verify_layer(testing, rng, weights, fmt, group, acts, checkpoint, E, H, I)
            for isa in isas:
                shape = f"{E},{H},{I},{T},{k},{r}"
                try:   # the quantized reference: same codes, same rounding (design.md 5-6)
                    run = testing.run_against_reference(layer_kwargs, x, ids, w, lora, isa=isa, num_threads=threads)
                except AssertionError as e:   # the stored codes differ from the reference's
                    print(f"{isa:<9} {label:<13} {shape:<22} FAIL: {e}")
                    worst = float("inf")
                    continue
                errs = [testing.errors(run)[t] for t in VERIFY_TENSORS]
                worst = max(worst, *errs)
                print(f"{isa:<9} {label:<13} {shape:<22} {1e3 * run.fwd_s:8.2f} {1e3 * run.bwd_s:8.2f}  "
                      + " ".join(f"{e:7.1e}" for e in errs))
    ok = worst <= TOLERANCE
    print(f"{'PASS' if ok else 'FAIL'}: largest relative error {worst:.2e} (tolerance {TOLERANCE:g})")
    return 0 if ok else 1


# subcommand -> (module, help)
EXTERNAL_COMMANDS = {
    "finetune": ("ktmoe.finetune.cli", "LoRA fine-tune a MoE model (no flags: a built-in tiny model)"),
    "bench": ("ktmoe.bench", "time the expert layer against the roofline and torch baselines"),
    "merge": ("ktmoe.finetune.merge", "merge a LoRA adapter into its checkpoint (quantized ones dequantized): "
              "a plain bf16 checkpoint"),
}


class _TopHelp(argparse.RawDescriptionHelpFormatter):
    """`ktmoe --help`: the commands, one line each, without argparse's "COMMAND" line above them."""

    def _format_action(self, action):
        text = super()._format_action(action)
        return text.split("\n", 1)[1] if isinstance(action, argparse._SubParsersAction) else text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ktmoe", description=DESCRIPTION, epilog=EPILOG, formatter_class=_TopHelp)
    parser.add_argument("--version", action="version", version=f"ktmoe {__import__('ktmoe').__version__}")
    sub = parser.add_subparsers(dest="command", required=True, title="commands", metavar="COMMAND")
    for name, (module_name, help_text) in EXTERNAL_COMMANDS.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(p)
        p.set_defaults(fn=module.run, cmd_parser=p)
    help_text = "check each kernel path against the numpy reference"
    v = sub.add_parser("verify", help=help_text, description=help_text + " (errors and timings; exit status 1 "
                       f"when an error exceeds {TOLERANCE:g})")
    v.add_argument("--isa", type=isa_here, metavar="{" + ",".join(_cpu.ISAS) + "}",
                   help="check this path only (it must run on this CPU; default: every path it can run)")
    v.add_argument("--threads", type=thread_count, default=None,
                   help=f"worker threads, 1 to {_cpu.MAX_THREADS} (default: $KTMOE_NUM_THREADS, else all usable cores)")
    v.add_argument("--weights", choices=["all"] + [f[0] for f in VERIFY_FORMATS], default="all",
                   help="weight formats to check (default: all; quantized ones against the quantized reference)")
    v.set_defaults(fn=cmd_verify, cmd_parser=v)
    help_text = "CPU features, the kernel path in use and why, thread count"
    i = sub.add_parser("info", help=help_text, description=help_text)
    i.set_defaults(fn=cmd_info, cmd_parser=i)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:   # reported by the subcommand's parser: "ktmoe CMD: error: ..." like its other usage errors
        args.cmd_parser.error(f"unrecognized arguments: {' '.join(extra)}")
    del args.cmd_parser
    args.argv = list(sys.argv[1:] if argv is None else argv)[1:]   # the subcommand's own arguments, as given
    try:
        rc = args.fn(args)
        sys.stdout.flush()   # here, not at exit: a reader gone by then is handled below
        return rc
    except UsageError as e:
        print(f"ktmoe {args.command}: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:   # stdout's reader went away (`ktmoe verify | head -1`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())   # the exit's flush goes nowhere
        return BROKEN_PIPE


if __name__ == "__main__":
    sys.exit(main())
