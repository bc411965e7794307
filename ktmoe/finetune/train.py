"""The `ktmoe finetune` job: load, wrap with LoRA, train, checkpoint, report.

Order of work: every input is checked first (flags, --out, model directory and safetensors
headers, tokenizer, the whole data file), then the model is loaded (loading.py), wrapped
with PEFT LoRA, and trained with AdamW (linear warm-up, cosine decay to 10%, gradient
clipping). Loss is the mean cross-entropy over the batch's assistant tokens.

--out holds:
- adapter/: the PEFT adapter (adapter_config.json, whose base_model_name_or_path is the
  model directory's absolute path, + adapter_model.safetensors), the tokenizer and a model
  card README.md (base model, data file and its sha256, steps, losses, settings);
  `PeftModel.from_pretrained(base, OUT/adapter)` on plain transformers loads it.
- checkpoints/step-NNNNNN/: trainable.safetensors (every trainable tensor by name),
  optimizer.pt, scheduler.pt, rng.pt (torch CPU/CUDA and Python RNG) and state.json (step,
  settings). `--resume` restores all of it and continues exactly where the run stopped:
  the data order is a pure function of (--seed, epoch), so the same batches follow.
- log.jsonl (one JSON object per step), loss.png, summary.json; base-model/ for the
  built-in tiny model.
Everything is written under a temporary name and renamed into place (output.py).

Several ranks (WORLD_SIZE > 1: torchrun, --nproc): ranks.py says who does what; the model is
wrapped in DDP, each step's batch is split over the ranks, the loss is normalised by the whole
batch's token count, and rank 0 alone writes --out.

Ctrl-C, SIGTERM (a batch scheduler's preemption) and SIGHUP: a step's optimizer update, log
line and checkpoint are done together (the signal is held back until they are); the signal
anywhere else ends the run with a checkpoint of the last complete step, or, before the first
step, with no trace of the run in --out, and the message says what works next (--resume, or
the same command again). An error (FinetuneError, OSError) that leaves no checkpoint takes
away what the run added to --out (_Traces), so the command the message suggests runs.
Warnings: ktmoe's own print as "ktmoe finetune: warning: ..."; third-party deprecation
notices are dropped; other third-party warnings are shown as Python shows them.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import random
import re
import resource
import shutil
import signal
import sys
import threading
import time
import warnings
from pathlib import Path

from .. import formats
from ..torch.checkpoint import CheckpointError, loading, quantized
from ..torch.checkpoint.reader import Checkpoint
from . import FinetuneError, data, output, tiny
from .ranks import Ranks

RUN_FILES = ("adapter", "checkpoints", "log.jsonl", "loss.png", "summary.json")
# settings that must match for --resume to continue the same run
RESUME_KEYS = ("model", "data_sha256", "lr", "warmup_steps", "total_steps", "batch_tokens", "lora_r", "lora_alpha",
               "targets", "seed", "max_seq_len", "max_grad_norm", "weights", "group_size", "activations", "dtype",
               "grad_checkpointing")
SAMPLE_PROMPTS = ["What is the capital of France?", 'Reverse the word "apple".', "What is 7 + 5?"]


def main(args) -> int:
    t_start = time.perf_counter()
    traces = _Traces(Path(args.out).expanduser())
    try:
        with relayed_warnings(), terminate_as_interrupt():
            return _main(args, t_start, traces)
    except (FinetuneError, CheckpointError, OSError) as e:   # cli.py reports it; --out goes back to how it
        if os.environ.get("RANK", "0") == "0":                # was, unless --resume can use it
            traces.remove()
        if isinstance(e, CheckpointError):   # the checkpoint reader's input errors are this command's input errors
            raise FinetuneError(str(e)) from None
        raise
    finally:   # whatever ended the job: a rank that exits with gloo's threads still running aborts
        _close_process_group()


class _Traces:
    """What this run adds to --out, taken away again when the run ends with an error and leaves
    no checkpoint to --resume from (the error contract: nothing left behind, so the command the
    message suggests runs): --out itself and the directories above it that this run creates, or,
    in an --out that was there, base-model/ and the run files (RUN_FILES) that this run made."""

    def __init__(self, out: Path):
        self.out = out
        self.top = None   # the outermost directory of out (itself included) that does not exist yet
        for d in (out, *out.parents):
            if os.path.lexists(d):
                break
            self.top = d
        self.kept = {n for n in ("base-model", *RUN_FILES) if os.path.lexists(out / n)}

    def cleared(self) -> None:
        """--overwrite removed the earlier run's files: those present from now on are this run's."""
        self.kept -= set(RUN_FILES)

    def remove(self) -> None:
        if _latest_checkpoint(self.out) is not None:
            return
        if self.top is not None:
            shutil.rmtree(self.top, ignore_errors=True)
            return
        for n in ("base-model", *RUN_FILES):
            p = self.out / n
            if n not in self.kept and os.path.lexists(p):
                with contextlib.suppress(OSError):
                    shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()


def _close_process_group() -> None:
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


KTMOE_DIR = str(Path(__file__).resolve().parents[1]) + os.sep
DEPRECATIONS = (DeprecationWarning, PendingDeprecationWarning, FutureWarning)


@contextlib.contextmanager
def relayed_warnings():
    """ktmoe's own warnings (issued from a file of the ktmoe package) are printed as one
    "ktmoe finetune: warning: ..." line; third-party deprecation notices (transformers, PEFT,
    torch: nothing the user of this command can act on) are dropped; any other third-party
    warning is shown as Python shows it, naming its source, not passed off as ktmoe's."""
    with warnings.catch_warnings():
        original = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            if os.environ.get("RANK", "0") != "0":   # ranks meet the same warnings; rank 0 shows them
                return
            if str(Path(filename).resolve()).startswith(KTMOE_DIR):
                print(f"ktmoe finetune: warning: {message}", file=sys.stderr)
            elif not issubclass(category, DEPRECATIONS):
                original(message, category, filename, lineno, file, line)
        warnings.showwarning = show
        yield


def _check_environment(args) -> None:
    """$KTMOE_ISA, and $KTMOE_NUM_THREADS where --threads does not override it, before --out is touched."""
    from .. import _cpu
    try:
        _cpu.select_isa()
        if args.threads is None:
            _cpu.default_num_threads()
    except ValueError as e:
        raise FinetuneError(str(e).removeprefix("isa: ")) from None


def _as_flag(error: ValueError, args) -> str:
    """A format error naming a keyword argument ("group_size: ...") as the flag it came from."""
    text = str(error)
    for name in ("weights", "group_size", "activations"):
        if text.startswith(name + ": "):
            return f"--{name.replace('_', '-')} {getattr(args, name)}: {text.removeprefix(name + ': ')}"
    return text


def _check_format_flags(weights: str, args) -> None:
    """--group-size / --activations against the expert format in effect (given, or the checkpoint's)."""
    if not formats.grouped(weights) and args.group_size is not None:
        raise FinetuneError(f"--group-size: applies to --weights int4 / int4bs only (got --weights {weights}"
                            f"{'' if args.weights else ', the checkpoint' + chr(39) + 's format'})")
    if weights == "bf16" and args.activations != "bf16":
        raise FinetuneError("--activations int8 (W8A8): needs quantized expert weights, --weights int8 or int4")


def _main(args, t_start, traces) -> int:
    _check_environment(args)
    if args.weights or not args.model:   # else the checkpoint's format decides, checked once it is read
        _check_format_flags(args.weights or "bf16", args)
    if args.model and not args.data:
        raise FinetuneError("--data FILE is required with --model (the shipped data set is for the built-in model)")
    if args.targets == ["router"]:
        raise FinetuneError("--targets router: add attention and/or experts (the router is trained next to LoRA)")
    out = Path(args.out).expanduser()
    import torch
    ranks = Ranks.from_env(torch, _wants_cuda(args.device, torch))
    if not ranks.main:   # rank 0 reports for all
        args.quiet = True
        sys.stdout = open(os.devnull, "w")
    ranks.on_main(output.check_writable, out)
    ranks.on_main(_prepare_out, out, args)

    # ---- inputs, checked before anything heavy ----
    import transformers

    import ktmoe.torch  # noqa: F401  (registers the experts implementation and the PEFT hooks)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    builtin = not args.model
    if builtin and not (out / "base-model" / tiny.MARKER).is_file():
        print(f"ktmoe finetune: building the built-in tiny model into {out / 'base-model'}")
    if builtin:
        ranks.on_main(tiny.ensure, out / "base-model")
    model_dir = out / "base-model" if builtin else Path(args.model).expanduser()
    ckpt = Checkpoint(model_dir)
    scheme = quantized.checkpoint_scheme(ckpt)
    if not args.weights:   # the checkpoint's own format: the flags are checked against it now
        _check_format_flags(scheme.own_format, args)
    try:   # the experts' format, resolved once and carried down as it is (quantized.ExpertFormat)
        kernel_format = quantized.target_format(scheme, args.weights, args.group_size, args.activations)
    except ValueError as e:
        raise FinetuneError(_as_flag(e, args)) from None
    data_path = Path(args.data).expanduser() if args.data else tiny.dataset_path()
    defaults = dict(tiny.DEFAULTS) if builtin else dict(lr=2e-4, batch_tokens=4096, epochs=1, lora_r=16,
                                                        lora_alpha=32, save_every=100)
    opt = {k: getattr(args, k) if getattr(args, k) is not None else v for k, v in defaults.items()}
    tokenizer = _tokenizer(ckpt)
    max_pos = _max_positions(ckpt)
    if args.max_seq_len is not None and max_pos is not None and args.max_seq_len > max_pos:
        raise FinetuneError(f"--max-seq-len {args.max_seq_len}: longer than the model's maximum of {max_pos} "
                            f"positions (max_position_embeddings)")
    max_len = args.max_seq_len or min(max_pos or 4096, 4096)
    examples, data_kind = data.load(data_path, tokenizer, max_len)
    schedule = data.Schedule(examples, opt["batch_tokens"], args.seed)
    total = args.steps if args.steps else schedule.steps_for_epochs(opt["epochs"])
    warmup = args.warmup_steps if args.warmup_steps is not None else max(1, round(0.05 * total))
    if not 0 <= warmup <= total:
        raise FinetuneError(f"--warmup-steps {warmup}: must be between 0 and the {total} training steps")
    device = _device(args.device, torch, ranks)
    _check_gpu_experts(getattr(args, "gpu_experts", 0), device, torch)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}.get(args.dtype) or (
        torch.bfloat16 if device.type == "cuda" else torch.float32)
    torch_threads = args.torch_threads or (1 if builtin else args.threads)
    if not torch_threads and ranks.world > 1 and device.type == "cpu":   # this rank's share of the cores
        from ktmoe._cpu import default_num_threads
        torch_threads = default_num_threads()
    if torch_threads:
        torch.set_num_threads(torch_threads)
    settings = {"model": str(model_dir.resolve()), "data": str(data_path.resolve()),
                "data_sha256": _sha256(data_path), "lr": opt["lr"], "warmup_steps": warmup, "total_steps": total,
                "batch_tokens": opt["batch_tokens"], "lora_r": opt["lora_r"], "lora_alpha": opt["lora_alpha"],
                "targets": args.targets, "seed": args.seed, "max_seq_len": max_len,
                "max_grad_norm": args.max_grad_norm, "weights": kernel_format.weights,
                "group_size": kernel_format.group_size,
                "activations": args.activations, "dtype": str(dtype).split(".")[-1],
                "grad_checkpointing": args.grad_checkpointing,
                "quantization": scheme.describe() if scheme.quantized else None}
    resume_from = _latest_checkpoint(out) if args.resume else None
    if resume_from is not None:
        _check_resume(resume_from, settings)
    elif args.overwrite:
        ranks.on_main(_clear_earlier_run, out)
        traces.cleared()
    n_tokens = sum(len(e.ids) for e in examples)
    n_trained = sum(e.trained_tokens for e in examples)
    what = "built-in tiny Qwen3-MoE (random weights)" if builtin else ckpt.config.get("model_type")
    print(f"ktmoe finetune: model {model_dir} ({what})")
    print(f"  data {data_path} ({data_kind}): {len(examples)} examples, {n_tokens:,} tokens "
          f"({n_trained:,} trained)")
    if ranks.world > 1:
        print(f"  {ranks.world} data-parallel ranks ({'one GPU each' if device.type == 'cuda' else 'CPU, gloo'}): "
              f"each batch split over them, one packed copy of the experts per host, rank 0 writes {out}")

    # ---- model ----
    def load_progress(i, n):
        if not args.quiet:
            print(f"\r  loading experts: layer {i}/{n}", end="" if i < n else "\n", file=sys.stderr, flush=True)
    max_tokens = max(opt["batch_tokens"], max_len)
    if scheme.quantized:
        print(f"  checkpoint quantized: {scheme.describe()}")
    if kernel_format.conversion:
        print(f"ktmoe finetune: {kernel_format.conversion}", file=sys.stderr)
    model, ls = loading.load(ckpt, device=device, dtype=dtype, max_tokens=max_tokens, num_threads=args.threads,
                             progress=load_progress, kernel_format=kernel_format, shared=ranks.world > 1)
    rss_loaded = _rss_now()
    kernel = loading.experts_modules(model)[0][1]._ktmoe.layer
    print(f"  loaded in {ls.seconds:.2f} s: {_count(ls.expert_layers, 'MoE layer')}, experts ({ls.expert_format} in the "
          f"checkpoint) {_mib(ls.packed_bytes)} packed in the kernel ({_format(kernel, ls)}, {kernel.isa}, "
          f"{_count(kernel.num_threads, 'thread')}), "
          f"other weights {_mib(ls.other_bytes)} on {device.type} ({settings['dtype']}"
          f"{_dequantized(ls)}); "
          f"one layer's read buffer {_mib(ls.largest_layer_bytes)}; host memory now {_mib(rss_loaded)}")
    if ls.skipped:
        print(f"  built as {type(model).__name__} (text only): {len(ls.skipped)} checkpoint tensor(s) it leaves out "
              f"are not loaded ({_prefixes(ls.skipped)})")
    if ls.ignored:
        warnings.warn(f"{len(ls.ignored)} checkpoint tensor(s) are not used by the model, e.g. {ls.ignored[0]}")
    if args.grad_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = _wrap_lora(model, args.targets, opt["lora_r"], opt["lora_alpha"], args.seed)
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    n_train = sum(p.numel() for _, p in params)
    epochs_txt = _count(total, "step") + ("" if args.steps else f" ({_count(opt['epochs'], 'epoch')})")
    print(f"  LoRA r={opt['lora_r']} alpha={opt['lora_alpha']:g} on {', '.join(args.targets)}: {n_train:,} "
          f"trainable parameters; {epochs_txt}, batches of <= {opt['batch_tokens']} tokens, lr {opt['lr']:g}")

    if ranks.world > 1 and device.type == "cuda":
        # DDP takes the parameters of one device type: the expert LoRA factors (made on the CPU next to the
        # kernel) go to the GPU too; the kernel copies them to the host each call (not run on GPUs yet)
        model.to(device)
    engine = ranks.wrap(model, device)   # DDP over the ranks (their LoRA gradients averaged), else the model
    optimizer = torch.optim.AdamW([p for _, p in params], lr=opt["lr"], weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, warmup, total))
    start = 0
    log_path = out / "log.jsonl"
    if resume_from is not None:
        start = _restore(resume_from, model, params, optimizer, scheduler, torch)
        ranks.on_main(_truncate_log, log_path, start)
        print(f"  resumed from {resume_from} (step {start} of {total})")
    log = _read_log(log_path)

    # ---- training ----
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    save_every = opt["save_every"]
    stop_at = min(total, args.stop_after) if args.stop_after else total
    bar = _progress(total, start, args.quiet)
    model.train()
    t_train = time.perf_counter()
    tokens_done, recent = 0, []
    completed = start   # steps whose optimizer update, log line (and checkpoint when due) are all done
    rng = _rng_state(torch)
    try:
        with open(log_path if ranks.main else os.devnull, "a", encoding="utf-8") as logf, \
                _signals_held_back() as whole:
            for step in range(start, stop_at):
                epoch, epoch_f, indices = schedule.at(step)
                mine, counts = ranks.shard(indices)
                batch, _ = data.collate(examples, mine, pad_id, max_tokens)
                batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
                n_real = sum(len(examples[i].ids) for i in indices)   # the whole batch's, over all ranks
                n_items = sum(e.trained_tokens - (e.labels[0] != -100) for e in (examples[i] for i in indices))
                t0 = time.perf_counter()
                lr = optimizer.param_groups[0]["lr"]
                # summed token loss / the whole batch's predicted tokens (x ranks: DDP averages the gradients)
                loss = engine(**batch, num_items_in_batch=n_items).loss * (ranks.world if counts else 0.0)
                value = ranks.sum(loss.item(), device) / ranks.world
                if not math.isfinite(value):   # checked before backward: a non-finite step is never applied
                    again = "" if _latest_checkpoint(out) is None else \
                        f" and --overwrite: --resume from the checkpoints in {out} would repeat this"
                    raise FinetuneError(f"step {step + 1}: the loss is {value} (try a lower --lr{again})")
                loss.backward()
                if args.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_([p for _, p in params], args.max_grad_norm)
                with whole:   # a Ctrl-C / SIGTERM from here on waits until the step is complete
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                    dt = time.perf_counter() - t0
                    tokens_done += n_real
                    recent = (recent + [(n_real, dt)])[-20:]
                    tps = sum(n for n, _ in recent) / max(sum(t for _, t in recent), 1e-9)
                    entry = {"step": step + 1, "epoch": round(epoch_f, 4), "loss": value, "lr": lr, "tokens": n_real,
                             "trained_tokens": sum(examples[i].trained_tokens for i in indices),
                             "seconds": round(dt, 4),
                             "tokens_per_s": round(n_real / dt, 1)}
                    log.append(entry)
                    logf.write(json.dumps(entry) + "\n")
                    logf.flush()
                    rng = _rng_state(torch)
                    if ranks.main and ((step + 1) % save_every == 0 or step + 1 == stop_at):
                        _save_checkpoint(out, step + 1, model, params, optimizer, scheduler, settings,
                                         args.keep_checkpoints, torch, rng)
                    completed = step + 1
                if bar is not None:
                    bar.set_postfix_str(f"loss {value:.3f}, {tps:,.0f} tok/s, epoch {epoch_f:.2f}", refresh=False)
                    bar.update(1)
    except KeyboardInterrupt as e:   # Ctrl-C, or Terminated (SIGTERM / SIGHUP)
        if bar is not None:
            bar.close()
        if not ranks.main:
            raise
        raise Interrupted(_after_interrupt(out, completed, total, log_path, model, params, optimizer, scheduler,
                                           settings, args.keep_checkpoints, torch, rng),
                          getattr(e, "signum", signal.SIGINT)) from None
    if bar is not None:
        bar.close()
    train_s = time.perf_counter() - t_train
    done = stop_at == total

    # ---- results ----
    first = log[0]["loss"] if log else float("nan")
    last = sum(e["loss"] for e in log[-10:]) / max(1, len(log[-10:])) if log else float("nan")
    peaks = ranks.gather(_peak_rss())   # every rank's peak host memory
    if not ranks.main:   # rank 0 writes the results
        ranks.close()
        return 0
    if done:
        with output.atomic_dir(out / "adapter") as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            _fix_adapter_config(tmp / "adapter_config.json", settings["model"])
            (tmp / "README.md").write_text(_model_card(settings, what, type(model.get_base_model()).__name__, log,
                                                       first, last, n_train, len(examples)), encoding="utf-8")
    if log:
        output.plot_loss(out / "loss.png", [e["step"] for e in log], [e["loss"] for e in log],
                         f"ktmoe finetune: {what}, LoRA r={opt['lora_r']} on {', '.join(args.targets)}")
    peak_host = peaks[0]
    peak_gpu = torch.cuda.max_memory_allocated() if device.type == "cuda" else 0
    wall = time.perf_counter() - t_start
    summary = {"finished": done, "steps": len(log), "total_steps": total, "wall_seconds": round(wall, 2),
               "train_seconds": round(train_s, 2), "load_seconds": round(ls.seconds, 2),
               "tokens_per_s": round(tokens_done / train_s, 1) if train_s > 0 else None,
               "first_loss": first, "final_loss_mean_last_10": last, "peak_host_bytes": peak_host,
               "peak_gpu_bytes": peak_gpu, "experts_packed_bytes": ls.packed_bytes,
               "experts_largest_layer_bytes": ls.largest_layer_bytes, "other_weights_bytes": ls.other_bytes,
               "checkpoint_quantization": ls.scheme.describe(), "experts_as_published": ls.as_published,
               "kernel_isa": kernel.isa, "threads": kernel.num_threads, "torch_threads": torch.get_num_threads(), "device": device.type,
               "trainable_parameters": n_train, "ranks": ranks.world, "peak_host_bytes_per_rank": peaks,
               "settings": settings}
    output.write_json_atomic(out / "summary.json", summary)
    if done and builtin:
        _show_samples(model, tokenizer, device)
    gpu = f"GPU {_mib(peak_gpu)}" if device.type == "cuda" else "no GPU used"
    tps_txt = f"{summary['tokens_per_s']:,.0f}" if summary["tokens_per_s"] else "-"
    print(f"{'done' if done else 'stopped'}: {_count(len(log) - start, 'step')} in {train_s:.1f} s ({tps_txt} tokens/s), "
          f"wall time {wall:.1f} s (loading {ls.seconds:.1f} s)")
    print(f"  loss {first:.3f} (step 1) -> {last:.3f} ({_last_txt(len(log))})")
    per_rank = f" on rank 0 ({', '.join(_mib(p) for p in peaks)} per rank; the packed experts are shared)" \
        if ranks.world > 1 else ""
    print(f"  peak memory: host {_mib(peak_host)}{per_rank} (experts packed {_mib(ls.packed_bytes)}), {gpu}")
    if done:
        print(f"  adapter: {out / 'adapter'}   log: {log_path}   plot: {out / 'loss.png'}")
    else:
        print(f"  checkpoint: {_latest_checkpoint(out)}; continue with the same flags plus --resume")
    ranks.close()
    return 0


# ---- set-up helpers ----
def _prepare_out(out: Path, args) -> None:
    """Refuses an --out holding an earlier run unless --resume / --overwrite says what to do."""
    previous = [n for n in RUN_FILES if (out / n).exists()]
    if args.resume:
        if _latest_checkpoint(out) is None:
            earlier = [n for n in RUN_FILES if (out / n).exists()]
            raise FinetuneError(f"--resume: no checkpoint in {out / 'checkpoints'}" + (
                f" (--out holds {', '.join(earlier)}: start over with --overwrite)" if earlier else ""))
    elif previous and not args.overwrite:
        raise FinetuneError(f"--out {out} holds an earlier run ({', '.join(previous)}): pass --resume to "
                            f"continue it, --overwrite to start over, or another --out")
    output.remove_stale_temporaries(out)


def _clear_earlier_run(out: Path) -> None:
    """--overwrite: the earlier run's results go only once every input has been checked."""
    for n in RUN_FILES:
        p = out / n
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


def _tokenizer(ckpt: Checkpoint):
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(ckpt.path, local_files_only=True)
    except Exception as e:   # transformers raises many kinds here; all mean "this tokenizer cannot be loaded"
        raise FinetuneError(f"--model {ckpt.path}: cannot load the tokenizer ({type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''})") from None


def _max_positions(ckpt: Checkpoint):
    cfg = ckpt.config
    for c in (cfg, cfg.get("text_config") or {}):
        if isinstance(c.get("max_position_embeddings"), int):
            return c["max_position_embeddings"]
    return None


def _wants_cuda(choice: str, torch) -> bool:
    return choice == "cuda" or (choice == "auto" and torch.cuda.is_available())


def _check_gpu_experts(value, device, torch) -> None:
    """--gpu-experts (design.md 13): 0 is off; auto / N need a GPU, and are refused here with the
    reason rather than silently ignored."""
    if value == 0:
        return
    if not torch.cuda.is_available():
        raise FinetuneError(f"--gpu-experts {value}: there is no GPU (torch sees no CUDA device), so no expert can "
                            f"be kept on one; leave it at 0")
    if device.type != "cuda":
        raise FinetuneError(f"--gpu-experts {value}: the rest of the model runs on the CPU (--device cpu); resident "
                            f"experts need it on the GPU")
    raise FinetuneError(f"--gpu-experts {value}: not available in ktmoe finetune yet: its loader packs the "
                        f"checkpoint's experts straight into the kernel, and the GPU copies are taken before that "
                        f"only by ktmoe.torch.patch / from_pretrained(..., gpu_experts=...) (docs/api.md)")


def _device(choice: str, torch, ranks):
    """The non-expert part's device: a GPU (rank i of a host takes GPU i) or the CPU."""
    if _wants_cuda(choice, torch):
        if not torch.cuda.is_available():
            raise FinetuneError("--device cuda: torch sees no CUDA GPU")
        if ranks.local_rank >= torch.cuda.device_count():
            raise FinetuneError(f"--nproc: local rank {ranks.local_rank} has no GPU of its own (torch sees "
                                f"{torch.cuda.device_count()}); use at most one rank per GPU, or --device cpu")
        return torch.device("cuda", ranks.local_rank) if ranks.world > 1 else torch.device("cuda")
    return torch.device("cpu")


def _sha256(path: Path) -> str:
    """Of the data file; of a directory (datasets' save_to_disk): of its files' relative paths and contents."""
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for p in files:
        if path.is_dir():
            h.update(f"{p.relative_to(path).as_posix()}\0{p.stat().st_size}\0".encode())
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def _lr_factor(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.1 + 0.45 * (1 + math.cos(math.pi * progress))


def _wrap_lora(model, targets, r, alpha, seed):
    import torch
    from peft import LoraConfig, get_peft_model

    def rel(name):   # "model.layers.3.mlp.experts" -> "mlp.experts"
        return re.sub(r"^(.*\.)?\d+\.", "", name)

    experts = loading.experts_modules(model)
    modules, parameters, save = set(), set(), set()
    if "attention" in targets:
        for name, m in model.named_modules():
            if isinstance(m, torch.nn.Linear) and name.rpartition(".")[0].rpartition(".")[2] in ("self_attn", "attn",
                                                                                                "attention"):
                modules.add(rel(name))
        if not modules:
            raise FinetuneError("--targets attention: found no nn.Linear projections under the attention modules")
    if "experts" in targets:
        for name, _ in experts:
            parameters |= {f"{rel(name)}.gate_up_proj", f"{rel(name)}.down_proj"}
    if "router" in targets:
        for name, m in experts:
            parent_name = name.rpartition(".")[0]
            parent = model.get_submodule(parent_name)
            router = next((a for a in ("gate", "router") if isinstance(getattr(parent, a, None), torch.nn.Module)), None)
            if router is None:
                raise FinetuneError(f"--targets router: no router module (.gate / .router) next to {name}")
            save.add(rel(f"{parent_name}.{router}"))
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
                        target_modules=sorted(modules) or None, target_parameters=sorted(parameters) or None,
                        modules_to_save=sorted(save) or None)
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        return get_peft_model(model, config)
    finally:
        torch.random.set_rng_state(state)


# ---- checkpoints ----
def _checkpoints(out: Path) -> list:
    d = out / "checkpoints"
    return sorted(d.glob("step-[0-9]*")) if d.is_dir() else []


def _latest_checkpoint(out: Path):
    found = [p for p in _checkpoints(out) if (p / "state.json").is_file()]
    return found[-1] if found else None


def _format(kernel, ls) -> str:
    """The kernel's weight format as the command line spells it."""
    row = formats.WEIGHT_FORMATS[kernel.weights]
    if not row.quantized:
        return f"{kernel.weights} weights"
    group = {"group": f" group {kernel.group_size}", "row": "",
             "block": f" {kernel.block[0]}x{kernel.block[1]} blocks" if row.scaling == "block" else ""}[row.scaling]
    mode = "W8A8" if kernel.activations == "int8" else "weight-only"
    published = ", the checkpoint's codes" if ls.as_published else ""
    return f"{kernel.weights}{group} weights{published}, {mode}"


def _dequantized(ls) -> str:
    return f", {_count(ls.dequantized, 'quantized tensor')} dequantized" if ls.dequantized else ""


def _rng_state(torch) -> dict:
    rng = {"torch": torch.random.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return rng


def _checkpoint_at(out: Path, step: int) -> Path:
    return out / "checkpoints" / f"step-{step:06d}"


def _save_checkpoint(out, step, model, params, optimizer, scheduler, settings, keep, torch, rng):
    """Checkpoint of `step`; `rng`: the RNG states right after that step. A checkpoint that
    cannot be written (disk full, file too large, I/O error) is one clear error naming it and
    the intact previous checkpoint."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file
    final = _checkpoint_at(out, step)
    try:
        with output.atomic_dir(final) as tmp:
            save_file({n: p.detach().to("cpu").contiguous() for n, p in params}, tmp / "trainable.safetensors")
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
            torch.save(rng, tmp / "rng.pt")
            (tmp / "state.json").write_text(json.dumps({"step": step, "settings": settings}, indent=2) + "\n")
    except (OSError, RuntimeError, SafetensorError) as e:   # disk full, file too large, I/O error (torch: RuntimeError)
        prev = _latest_checkpoint(out)
        why = e.strerror if isinstance(e, OSError) and e.strerror else str(e).strip().splitlines()[-1]
        raise FinetuneError(f"step {step}: cannot write the checkpoint {final} ({why}; is the disk full?); "
                            + (f"the previous checkpoint {prev} is intact: continue with --resume"
                               if prev else "there is no earlier checkpoint")) from None
    for old in _checkpoints(out)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def _check_resume(path: Path, settings: dict) -> None:
    try:
        saved = json.loads((path / "state.json").read_text())["settings"]
    except (OSError, json.JSONDecodeError, KeyError) as e:
        raise FinetuneError(f"--resume: {path} is not a readable checkpoint ({e})") from None
    diff = [f"{k}: {saved.get(k)!r} then, {settings[k]!r} now" for k in RESUME_KEYS if saved.get(k) != settings[k]]
    if diff:
        raise FinetuneError(f"--resume: {path} was made with other settings ({'; '.join(diff)}); "
                            f"give the same flags, or start over with --overwrite")


def _restore(path: Path, model, params, optimizer, scheduler, torch) -> int:
    from safetensors.torch import load_file
    saved = load_file(path / "trainable.safetensors")
    names = [n for n, _ in params]
    if sorted(saved) != sorted(names):
        raise FinetuneError(f"--resume: {path} holds other trainable tensors than this model")
    with torch.no_grad():
        for n, p in params:
            p.copy_(saved[n])
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    rng = torch.load(path / "rng.pt", weights_only=True)
    torch.random.set_rng_state(rng["torch"])
    random.setstate(_as_tuple(rng["python"]))
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return json.loads((path / "state.json").read_text())["step"]


# ---- Ctrl-C, SIGTERM, SIGHUP ----
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Terminated(KeyboardInterrupt):
    """SIGTERM (a batch scheduler's preemption: Slurm, Kubernetes) or SIGHUP (the terminal went
    away), raised where Ctrl-C's KeyboardInterrupt would be, so the run stops the same way."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _stop(signum: int) -> KeyboardInterrupt:
    return KeyboardInterrupt() if signum == signal.SIGINT else Terminated(signum)


def _raise_terminated(signum, frame):
    raise Terminated(signum)


class Interrupted(KeyboardInterrupt):
    """Ctrl-C / SIGTERM / SIGHUP during training, after --out was left continuable; `advice`
    says how (cli.py prints it), `signum` which signal it was."""

    def __init__(self, advice: str, signum: int = signal.SIGINT):
        super().__init__(advice)
        self.advice = advice
        self.signum = signum


@contextlib.contextmanager
def terminate_as_interrupt():
    """SIGTERM and SIGHUP raise Terminated while the block runs (where their handler is the
    default one: an ignored SIGHUP, as under nohup, stays ignored). Main thread only."""
    mine = []
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGHUP):
            if signal.getsignal(sig) is signal.SIG_DFL:
                signal.signal(sig, _raise_terminated)
                mine.append(sig)
    try:
        yield
    finally:
        for sig in mine:
            signal.signal(sig, signal.SIG_DFL)


class _HeldBack:
    """`with held:` a stop signal (STOP_SIGNALS) inside the block is raised (KeyboardInterrupt,
    or Terminated) only when it ends, so a step's optimizer update, log line and checkpoint are
    done all together or not at all."""

    def __init__(self):
        self.inside = False
        self.pending = None   # the first stop signal that arrived inside the block

    def __enter__(self):
        self.inside = True
        return self

    def __exit__(self, kind, value, tb):
        self.inside = False
        if self.pending is not None and kind is None:
            signum, self.pending = self.pending, None
            raise _stop(signum)
        return False

    def handler(self, signum, frame):
        if self.inside:
            self.pending = self.pending or signum
        else:
            raise _stop(signum)


# the handlers _signals_held_back replaces: Python's own for SIGINT, terminate_as_interrupt's for the others
_DEFAULT_HANDLERS = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: _raise_terminated,
                     signal.SIGHUP: _raise_terminated}


@contextlib.contextmanager
def _signals_held_back():
    """A _HeldBack whose handler takes the stop signals while the block runs (main thread, and
    only signals with the handler _DEFAULT_HANDLERS names: elsewhere the block is not held
    back, and the signal acts as it would anywhere)."""
    held = _HeldBack()
    mine = []
    if threading.current_thread() is threading.main_thread():
        for sig in STOP_SIGNALS:
            previous = signal.getsignal(sig)
            if previous is _DEFAULT_HANDLERS[sig]:
                signal.signal(sig, held.handler)
                mine.append((sig, previous))
    try:
        yield held
    finally:
        for sig, previous in mine:
            signal.signal(sig, previous)


def _after_interrupt(out, completed, total, log_path, model, params, optimizer, scheduler, settings, keep, torch,
                     rng) -> str:
    """Leaves --out continuable after Ctrl-C in the training loop: a checkpoint of the last complete
    step (its parameters, optimizer and RNG states are untouched by the step that was cut short),
    or, when no step was completed and no checkpoint exists, no trace of this run."""
    if completed > 0 and not (_checkpoint_at(out, completed) / "state.json").is_file():
        _save_checkpoint(out, completed, model, params, optimizer, scheduler, settings, keep, torch, rng)
    if completed == 0 and _latest_checkpoint(out) is None and log_path.is_file() and not _read_log(log_path):
        log_path.unlink()
    return interrupt_advice(out, completed, total)


def interrupt_advice(out: Path, completed: int | None = None, total: int | None = None) -> str:
    """What to do after Ctrl-C, true of --out as it is now."""
    latest = _latest_checkpoint(out)
    at = f" after step {completed} of {total}" if completed else ""
    if latest is not None:
        return f"stopped{at}; {latest} holds it: continue with the same flags plus --resume"
    earlier = [n for n in RUN_FILES if (out / n).exists()]
    if earlier:   # Ctrl-C before --overwrite cleared an earlier run (or --out holds results with no checkpoint)
        return f"--out {out} holds {', '.join(earlier)} of an earlier run, unchanged: run the same command again"
    return f"nothing was trained yet (no checkpoint in {out}): run the same command again"


def _as_tuple(x):
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def _read_log(path: Path) -> list:
    if not path.is_file():
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _truncate_log(path: Path, step: int) -> None:
    kept = [e for e in _read_log(path) if e["step"] <= step]
    output.write_bytes_atomic(path, "".join(json.dumps(e) + "\n" for e in kept).encode())


# ---- the adapter's files ----
def _fix_adapter_config(path: Path, model_dir: str) -> None:
    """base_model_name_or_path = the model directory's absolute path (PEFT writes what it was given)."""
    cfg = json.loads(path.read_text())
    cfg["base_model_name_or_path"] = model_dir
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def _model_card(settings, what, model_class, log, first, last, n_train, n_examples) -> str:
    """README.md of the adapter: what it was trained from, on what, and how far."""
    targets = ", ".join(settings["targets"])
    steps = len(log)
    fmt = settings["weights"] + (f" (group {settings['group_size']})" if settings["group_size"] else "")
    if settings["activations"] != "bf16":
        fmt += f", {settings['activations']} activations (W8A8)"
    return f"""---
library_name: peft
tags: [lora, ktmoe]
---
# LoRA adapter trained with `ktmoe finetune`

- Base model: `{settings["model"]}` ({what}; class {model_class})
- Data: `{settings["data"]}`, {_count(n_examples, "example")}, sha256 `{settings["data_sha256"]}`
- Training: {_count(steps, "step")} of {settings["total_steps"]}, lr {settings["lr"]:g} (warm-up \
{_count(settings["warmup_steps"], "step")}, cosine decay to 10 %), batches of <= {settings["batch_tokens"]} tokens, \
seed {settings["seed"]}, max sequence length {settings["max_seq_len"]}
- LoRA: r = {settings["lora_r"]}, alpha = {settings["lora_alpha"]:g}, on {targets}; \
{n_train:,} trainable parameters
- Expert weights in the kernel during training: {fmt}; other weights {settings["dtype"]}
- Loss: {first:.4f} at step 1, {last:.4f} at the end ({_last_txt(steps)})

Load it with plain transformers + PEFT (`base_model_name_or_path` in adapter_config.json is the
base model's absolute path):

```python
from peft import AutoPeftModelForCausalLM
model = AutoPeftModelForCausalLM.from_pretrained("path/to/this/adapter")
```
{_quantized_note(settings)}"""


def _quantized_note(settings) -> str:
    if not settings.get("quantization"):
        return ""
    return f"""
The base model is stored quantized ({settings["quantization"]}). Without a GPU, transformers cannot
load it this way (its FP8 / compressed-tensors loaders need a GPU or extra packages); ktmoe's
streaming loader can, on the CPU:

```python
import ktmoe.torch
from peft import PeftModel
model = PeftModel.from_pretrained(ktmoe.torch.from_pretrained("{settings["model"]}"), "path/to/this/adapter")
```
"""


# ---- reporting ----
def _progress(total, start, quiet):
    if quiet:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, initial=start, desc="finetune", unit="step", file=sys.stderr, dynamic_ncols=True,
                smoothing=0.1)


def _rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss() -> int:
    """Peak resident memory of this process: VmHWM (reset at exec, unlike ru_maxrss, which keeps
    the high-water mark of whatever process forked us)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _count(n: int, word: str) -> str:
    """'1 step', '2 steps'."""
    return f"{n:,} {word}" + ("" if n == 1 else "s")


def _last_txt(n: int) -> str:
    return f"step {n}" if n <= 1 else f"mean of the last {min(10, n)} steps"


def _prefixes(keys: list) -> str:
    """'model.visual.*, mtp.*' for the keys' first two name parts (first one for short names)."""
    seen = {}
    for k in keys:
        parts = k.split(".")
        seen.setdefault(".".join(parts[:2] if parts[0] == "model" and len(parts) > 2 else parts[:1]) + ".*", None)
    return ", ".join(seen)


def _mib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _show_samples(model, tokenizer, device) -> None:
    import torch
    model.eval()
    print("  what the tiny model answers now (greedy):")
    for prompt in SAMPLE_PROMPTS:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]], device=device)
        with torch.no_grad():
            gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=16,
                                 do_sample=False, eos_token_id=tokenizer.eos_token_id,
                                 pad_token_id=tokenizer.pad_token_id)
        answer = tokenizer.decode(gen[0, ids.shape[1]:], skip_special_tokens=True).strip()
        print(f"    {prompt}  ->  {answer}")
