"""`ktmoe finetune`: flags, defaults and error reporting (the job itself is in train.py).

With no flags it fine-tunes the built-in tiny Qwen3-MoE (tiny.py) on the shipped data set
into ./ktmoe-finetune. Problems with the user's input (model directory, data file, flags,
--out, $KTMOE_ISA / $KTMOE_NUM_THREADS) end with one "ktmoe finetune: error: ..." line and
exit status 2, with --out as it was (train.py); torch and transformers are imported only when
the job runs. Ctrl-C, SIGTERM and SIGHUP stop the run with a checkpoint and a line saying how
to continue, exit status 128 + the signal's number (130, 143, 129).
"""
from __future__ import annotations

import argparse
import errno
import math
import signal
import sys

from .. import formats
from . import FinetuneError

TARGETS = ("attention", "experts", "router")
DEFAULT_OUT = "ktmoe-finetune"


def _targets(text: str) -> list:
    parts = [p.strip() for p in text.split(",") if p.strip()]
    bad = [p for p in parts if p not in TARGETS]
    if bad or not parts:
        raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {','.join(TARGETS)}, got {text!r}")
    return sorted(set(parts), key=TARGETS.index)


def _positive(kind, zero: str = ""):
    """A type: a number of `kind` > 0 (>= 0 when `zero` says what 0 means); floats must be finite."""
    def parse(text):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__}, got {text!r}") from None
        if not math.isfinite(v):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        if v < 0 or v == 0 and not zero:
            raise argparse.ArgumentTypeError(f"must be {'>= 0 (0: ' + zero + ')' if zero else '> 0'}, got {text}")
        return v
    return parse


def _gpu_experts(text):
    """--gpu-experts: 'auto' or an int >= 0 (0 = off)."""
    if text == "auto":
        return text
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected auto, 0 or a number of experts per layer, got {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be auto or >= 0, got {text}")
    return v


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default only where it has a plain one (None / False / lists say it in the text)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or isinstance(action.default, list):
            return action.help
        return super()._get_help_string(action)


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..cli import thread_count
    p.formatter_class = _Help
    p.description = ("LoRA fine-tuning (SFT) of a Mixture-of-Experts model whose routed experts run in ktmoe's "
                     "CPU kernels; attention, router and the rest run in torch (on the GPU when one is present). "
                     "With no flags: the built-in tiny Qwen3-MoE on the shipped instruction data set.")
    g = p.add_argument_group("model and data")
    g.add_argument("--model", metavar="DIR", help="local Hugging Face checkpoint directory (config.json, tokenizer, "
                   "safetensors single-file or sharded with an index; experts fused or per expert). "
                   "Default: the built-in tiny Qwen3-MoE, written to OUT/base-model")
    g.add_argument("--data", metavar="FILE", help="JSON lines, a JSON array, Parquet, Arrow or a datasets "
                   "save_to_disk directory of examples: \"messages\", ShareGPT \"conversations\", \"prompt\" + "
                   "\"completion\", Alpaca \"instruction\" + \"output\" (trained on the answers) or \"text\" "
                   "(every token trained); see the README's Data formats. Default: the shipped tiny instruction "
                   "set (with --model, --data is required)")
    g.add_argument("--max-seq-len", type=_positive(int), metavar="N", help="longer examples are truncated to N tokens "
                   "(with a warning). Default: the model's max_position_embeddings, at most 4096")
    g.add_argument("--out", metavar="DIR", default=DEFAULT_OUT, help="adapter, checkpoints, log.jsonl, loss.png, "
                   "summary.json")
    g.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out (same flags)")
    g.add_argument("--overwrite", action="store_true", help="start over in an --out that holds an earlier run")
    t = p.add_argument_group("training (defaults in brackets are the built-in tiny job's)")
    t.add_argument("--steps", type=_positive(int), help="optimizer steps (overrides --epochs)")
    t.add_argument("--epochs", type=_positive(int), help="passes over the data [1; tiny 16]")
    t.add_argument("--lr", type=_positive(float), help="peak learning rate of AdamW [2e-4; tiny 3e-3]")
    t.add_argument("--warmup-steps", type=int, help="linear warm-up, then cosine decay to 10%% [5%% of the steps]")
    t.add_argument("--batch-tokens", type=_positive(int), help="padded tokens per optimizer step [4096; tiny 1024]")
    t.add_argument("--lora-r", type=_positive(int), help="LoRA rank [16]")
    t.add_argument("--lora-alpha", type=_positive(float), help="LoRA alpha (scale alpha/r) [32]")
    t.add_argument("--targets", type=_targets, default=["attention", "experts"],
                   help="what to train, comma-separated: attention (LoRA on the attention projections), "
                   "experts (LoRA on the routed experts, in the kernel), router (the router weights, saved in "
                   "the adapter as modules_to_save). Default: attention,experts")
    t.add_argument("--max-grad-norm", type=_positive(float, zero="off"), default=1.0,
                   help="gradient clipping (0: off)")
    t.add_argument("--seed", type=int, default=0, help="LoRA initialisation and data order")
    t.add_argument("--grad-checkpointing", action="store_true", help="recompute activations in backward "
                   "(less memory; the experts kernel then keeps nothing between passes)")
    t.add_argument("--save-every", type=_positive(int), help="checkpoint every N steps, and at the end [100; tiny 50]")
    t.add_argument("--stop-after", type=_positive(int), metavar="N", help="stop after step N with a checkpoint "
                   "(the schedule still spans every step); continue later with --resume")
    t.add_argument("--keep-checkpoints", type=_positive(int), default=2, help="how many checkpoints to keep")
    h = p.add_argument_group("hardware")
    h.add_argument("--weights", choices=tuple(formats.WEIGHT_FORMATS), default=None,
                   help="expert weight format in the kernel. Default: the checkpoint's own: bf16 for unquantized "
                   "checkpoints, fp8 / int4 codes as published for FP8 block-scaled and INT4 pack-quantized ones "
                   "(int4bs: INT4 with bf16 scales, kept as bf16; int4 for those with --activations int8). "
                   "Another format converts layer by layer at load: bf16, or quantized to int8 (one scale per row) "
                   "or int4 / int4bs (one fp32 / bf16 scale per row and group of --group-size columns); fp8 only "
                   "for FP8 checkpoints; int4 on an INT4 checkpoint with bf16 scales takes its codes as they are")
    h.add_argument("--group-size", type=int, choices=(32, 64, 128), default=None,
                   help="int4 / int4bs columns per scale (default 128, or an INT4 checkpoint's own)")
    h.add_argument("--activations", choices=("bf16", "int8"), default="bf16",
                   help="with int8/int4 weights: bf16 = weight-only (default), int8 = W8A8 (activations quantized "
                   "per row on the fly; faster when compute-bound, less accurate)")
    h.add_argument("--threads", type=thread_count, help="CPU threads for the experts kernel and torch "
                   "(default: every core this process may use)")
    h.add_argument("--torch-threads", type=_positive(int), help="intra-op threads of torch's CPU work (attention "
                   "etc. when there is no GPU). Default: --threads; 1 for the built-in tiny model, whose small "
                   "matrices only lose from threading (and two thread pools contend on a busy machine)")
    h.add_argument("--nproc", type=_positive(int), default=1, help="data-parallel ranks on this host (torch."
                   "distributed, gloo on the CPU / nccl on GPUs; one GPU each when there are GPUs): each batch is "
                   "split over them, the experts are packed once into memory they share, each rank's kernel gets "
                   "its share of the cores, and rank 0 writes --out. Same as torchrun --standalone "
                   "--nproc-per-node N -m ktmoe.finetune ...")
    h.add_argument("--dtype", choices=("auto", "bf16", "fp32"), default="auto", help="dtype of the non-expert "
                   "weights: auto = bf16 on a GPU, fp32 on the CPU")
    h.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="where the non-expert part runs (auto: the GPU when there is one)")
    h.add_argument("--gpu-experts", type=_gpu_experts, default=0, metavar="auto|N|0",
                   help="keep experts on the GPU too, computed there while the kernel runs the rest (issue 24; "
                        "0: off). Without a GPU, auto / N are refused. In ktmoe finetune itself not yet "
                        "available on a GPU either (its loader packs the experts straight into the kernel): "
                        "use ktmoe.torch.patch(model, gpu_experts=...) meanwhile")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args) -> int:
    import os
    if args.nproc > 1 and "LOCAL_RANK" not in os.environ:   # the launcher; its ranks run the job
        from .launch import launch
        return launch(args.argv, args.nproc)
    main_rank = os.environ.get("RANK", "0") == "0"   # only rank 0 reports (every rank meets the same input error)
    try:
        from . import train
        return train.main(args)
    except FinetuneError as e:
        if main_rank:
            print(f"ktmoe finetune: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:   # e.g. the disk filled while writing the log, the adapter or the summary
        where = f"{e.filename}: " if e.filename else ""
        why = e.strerror or str(e)
        hint = "; is the disk full?" if e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT) else ""
        if main_rank:
            print(f"ktmoe finetune: error: {where}{why}{hint}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:   # Ctrl-C, SIGTERM or SIGHUP (train.Terminated): the advice is true of --out
        advice = getattr(e, "advice", None)   # as the stopped run left it
        if advice is None:
            from pathlib import Path

            from .train import interrupt_advice
            advice = interrupt_advice(Path(args.out).expanduser())
        signum = getattr(e, "signum", signal.SIGINT)
        what = "interrupted" if signum == signal.SIGINT else f"terminated ({signal.Signals(signum).name})"
        if main_rank:
            print(f"ktmoe finetune: {what}: {advice}", file=sys.stderr)
        return 128 + signum   # as a shell reports a command the signal ended: 130 Ctrl-C, 143 SIGTERM, 129 SIGHUP
