"""Hybrid GPU + CPU LoRA SFT training step of a Qwen3-30B-A3B-shaped model.

What it measures: one full training step (forward on one batch of --tokens tokens, causal LM
loss on random token ids, backward, AdamW step, zero_grad) of a transformers
Qwen3MoeForCausalLM with the real Qwen3-30B-A3B layer shape (H = 2048, 128 experts, 8 per
token, I = 768, 32 query / 4 KV heads of 128, vocab 151936) but only --layers decoder layers
(default 8), random weights (fixed seed), bf16, PEFT LoRA r = 16, alpha = 32 on q/k/v/o_proj
and on the experts (target_parameters gate_up_proj, down_proj).

Modes (one summary line each):
- hybrid (always): `ktmoe.torch.patch(model)` puts the routed experts into the ktmoe CPU
  kernel; `model.to(--device)` then moves everything else (attention, router, norms,
  embeddings, lm_head) to the device (default cuda when available, else cpu). The expert
  LoRA factors are created by PEFT next to the experts' (CPU) placeholders, so the kernel
  accumulates their gradients in place and AdamW updates them on the CPU.
- gpu-only (--gpu-only): the same model (same weights) with transformers' own experts
  implementation (--gpu-experts, default grouped_mm) on the device, PEFT's ParamWrapper LoRA
  on the experts, no ktmoe. Meant for a GPU: the step time for scale. It needs the expert
  weights in device memory (1.2 GB bf16 per layer, plus PEFT's W + BA per layer per step).

Reported per mode: median step time over --steps timed steps (after --warmup untimed ones),
tokens/s, the median forward / backward / optimizer parts, and for hybrid the experts' share
of the step: wall time of the kernel calls plus the host copies ktmoe.torch makes for them
(the asynchronous copy of the results back to the device is not counted), and of the kernel calls alone
(`KernelExperts.forward` / `.backward`: submit + wait), summed over layers per step. They
are measured by wrapping those methods from this script (the package is not changed); on a
GPU each wrapped call first synchronizes the device (the call's own device-to-host copy
would wait for the queued GPU work anyway), so queued GPU work is not counted as expert
time. Also: peak host memory (getrusage maxrss of the process, cumulative over modes) and
peak device memory (torch.cuda.max_memory_allocated, reset per mode), the loss of the last
step, trainable parameters.

Run it from outside the source tree (so `import ktmoe` is the installed package):

    python bench/hybrid_step.py                                  # L = 8, T = 4096, cuda if available
    python bench/hybrid_step.py --layers 8 --tokens 4096 --gpu-only --json hybrid.json
    python bench/hybrid_step.py --device cpu --layers 2 --tokens 256 --vocab 32000   # CPU-only, small

Data parallel (torchrun): under `python -m torch.distributed.run --standalone --nproc-per-node G
bench/hybrid_step.py ...` each of the G ranks takes one GPU (LOCAL_RANK), the hybrid model's
non-expert part is wrapped in DistributedDataParallel (LoRA gradients averaged over the ranks),
the experts' packed weights are shared by the host's ranks (one copy, ktmoe.torch.distributed)
and each rank's kernel gets its share of the cores. DDP takes parameters of one device type,
so there the expert LoRA factors move to the rank's GPU too (the kernel copies them to the
host on every call, as with `ktmoe finetune --nproc`). The global batch stays --batch sequences of
--tokens / --batch tokens (the same token ids for every G), rank r taking sequences r, r + G, ...
(--batch a multiple of G), so the losses of G ranks should match one process's; rank 0 prints
the losses of every step (warm-up included), the slowest rank's step time, each rank's peak GPU
memory and the host memory as the sum over the ranks of their proportional set size (PSS:
pages shared by the ranks, the experts among them, counted once). Only the hybrid mode runs.

--hidden / --experts / --moe-intermediate / --vocab / --heads / --kv-heads / --head-dim / --top-k
shrink the model (defaults: Qwen3-30B-A3B). Weights: by default a fast deterministic fill
(each tensor is a cyclic copy of one seeded N(0, 0.02) block of 1,000,003 values, norms 1),
since transformers' own init (normal_ over ~5 G values for L = 8) takes minutes on few
cores; --init hf uses transformers' init instead.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import platform
import resource
import statistics
import sys
import time

import torch

BLOCK = 1_000_003   # length of the random block the fast init tiles (prime: experts get different values)


# ----------------------------------------------------------------------------- model

def make_config(args):
    from transformers import Qwen3MoeConfig
    cfg = Qwen3MoeConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=6144,
        moe_intermediate_size=args.moe_intermediate, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, head_dim=args.head_dim,
        num_experts=args.experts, num_experts_per_tok=args.top_k, norm_topk_prob=True,
        decoder_sparse_step=1, mlp_only_layers=[], max_position_embeddings=max(40960, args.tokens),
        tie_word_embeddings=False, use_cache=False, output_router_logits=False, attention_bias=False,
        rms_norm_eps=1e-6, initializer_range=0.02)
    cfg._attn_implementation = args.attn
    return cfg


@contextlib.contextmanager
def _default_dtype(dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


@torch.no_grad()
def fast_init(model, seed: int, std: float) -> None:
    """Deterministic cheap weights: norms 1, every other parameter a cyclic copy of one seeded
    N(0, std) block (offset by the parameter's index so tensors differ)."""
    g = torch.Generator().manual_seed(seed)
    block = torch.empty(2 * BLOCK, dtype=torch.float32).normal_(0.0, std, generator=g)
    blocks = {}
    for i, (name, p) in enumerate(model.named_parameters()):
        if name.endswith("norm.weight"):
            p.fill_(1.0)
            continue
        key = (p.device, p.dtype)
        if key not in blocks:
            blocks[key] = block.to(p.device, p.dtype)
        src = blocks[key]
        flat = p.view(-1)
        off = (i * 7919) % BLOCK
        for start in range(0, flat.numel(), BLOCK):
            n = min(BLOCK, flat.numel() - start)
            flat[start:start + n].copy_(src[off:off + n])


def build_model(args, build_device: str):
    """Qwen3MoeForCausalLM in bf16 on build_device, weights by --init."""
    from transformers import Qwen3MoeForCausalLM
    cfg = make_config(args)
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    if args.init == "hf":
        with _default_dtype(torch.bfloat16), torch.device(build_device):
            model = Qwen3MoeForCausalLM(cfg)
    else:
        from transformers.initialization import no_init_weights
        with _default_dtype(torch.bfloat16), torch.device(build_device), no_init_weights():
            model = Qwen3MoeForCausalLM(cfg)
        fast_init(model, args.seed, cfg.initializer_range)
    model.config.use_cache = False
    return model, time.perf_counter() - t0


def add_lora(model, args):
    from peft import LoraConfig, get_peft_model
    lcfg = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=0.0,
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                      target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    return get_peft_model(model, lcfg)


# ----------------------------------------------------------------------------- expert timers

class ExpertTimers:
    """Wraps ktmoe.torch's experts ops and kernel calls with wall-clock timers."""

    KEYS = ("fn_fwd", "fn_bwd", "kernel_fwd", "kernel_bwd")

    def __init__(self, device: torch.device):
        self.sync = device.type == "cuda"
        self.acc = dict.fromkeys(self.KEYS, 0.0)
        self.calls = dict.fromkeys(self.KEYS, 0)
        self._saved = []

    def reset(self):
        self.acc = dict.fromkeys(self.KEYS, 0.0)
        self.calls = dict.fromkeys(self.KEYS, 0)

    def _timed(self, fn, key):
        def wrapper(*a, **kw):
            if self.sync:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                self.acc[key] += time.perf_counter() - t0
                self.calls[key] += 1
        wrapper.__wrapped__ = fn
        return wrapper

    def install(self):
        """Times the kernel calls (KernelExperts.forward / .backward: submit + wait) and the host
        copies ktmoe.torch's experts ops make for them (function._host): the experts' time is the
        kernel time plus the copies made before each call (the copy of y / dx back to the device
        is asynchronous and not counted)."""
        from ktmoe.torch import function as F
        kern = F.KernelExperts
        pending = [0.0]

        def host(fn):
            def wrapper(*a, **kw):
                t0 = time.perf_counter()
                try:
                    return fn(*a, **kw)
                finally:
                    pending[0] += time.perf_counter() - t0
            wrapper.__wrapped__ = fn
            return wrapper

        def call(fn, key):
            timed = self._timed(fn, "kernel_" + key)

            def wrapper(*a, **kw):
                t0 = time.perf_counter()
                try:
                    return timed(*a, **kw)
                finally:
                    self.acc["fn_" + key] += time.perf_counter() - t0 + pending[0]
                    self.calls["fn_" + key] += 1
                    pending[0] = 0.0
            wrapper.__wrapped__ = fn
            return wrapper

        for owner, attr, new in ((F, "_host", host(F._host)), (kern, "forward", call(kern.forward, "fwd")),
                                 (kern, "backward", call(kern.backward, "bwd"))):
            self._saved.append((owner, attr, owner.__dict__[attr]))
            setattr(owner, attr, new)
        return self

    def uninstall(self):
        for owner, attr, orig in reversed(self._saved):
            setattr(owner, attr, orig)
        self._saved.clear()


# ----------------------------------------------------------------------------- step loop

def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def maxrss_bytes() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024


def pss_bytes() -> int | None:
    """This process's proportional set size now (Linux), or None."""
    try:
        with open("/proc/self/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def run_mode(mode: str, args, ranks=None) -> dict:
    from ktmoe.finetune.ranks import Ranks
    ranks = ranks or Ranks()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    timers = None
    if mode == "hybrid":
        import ktmoe.torch
        model, t_build = build_model(args, "cpu")
        t0 = time.perf_counter()
        ktmoe.torch.patch(model, num_threads=args.threads)
        t_patch = time.perf_counter() - t0
        gc.collect()
        model.to(device)   # the experts stay on the CPU (in the kernel)
        kern = next(m._ktmoe.layer for m in model.modules() if hasattr(m, "_ktmoe"))
        impl = f"ktmoe isa={kern.isa} threads={'auto' if args.threads is None else args.threads}"
    else:
        build_dev = args.device if device.type != "cpu" else "cpu"
        model, t_build = build_model(args, build_dev)
        t_patch = 0.0
        if args.gpu_experts != "eager":
            model.set_experts_implementation(args.gpu_experts)
        model.to(device)
        impl = f"torch experts_implementation={args.gpu_experts}"
    model = add_lora(model, args)
    model.train()
    engine = model
    if ranks.world > 1:   # the ranks' LoRA gradients averaged
        # DDP refuses parameters on two device types: the expert LoRA factors, created by PEFT
        # beside the experts' CPU placeholders, move to the rank's device like every other
        # parameter (the kernel copies them to the host per call), as `ktmoe finetune` does
        model.to(device)
        from torch.nn.parallel import DistributedDataParallel
        engine = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_train = {}
    for p in trainable:
        n_train[str(p.device)] = n_train.get(str(p.device), 0) + p.numel()
    opt = torch.optim.AdamW(trainable, lr=args.lr)

    g = torch.Generator().manual_seed(args.seed + 1)
    B = args.batch
    if args.tokens % B:
        raise SystemExit(f"--tokens {args.tokens} is not a multiple of --batch {B}")
    ids = torch.randint(0, args.vocab, (B, args.tokens // B), generator=g)
    if B % ranks.world:
        raise SystemExit(f"--batch {B} is not a multiple of the {ranks.world} ranks")
    ids = ids[ranks.rank::ranks.world].contiguous().to(device)   # this rank's sequences of the global batch

    if mode == "hybrid":
        timers = ExpertTimers(device).install()
    steps, losses = [], []
    try:
        for i in range(args.warmup + args.steps):
            if timers:
                timers.reset()
            _sync(device)
            ranks.barrier()
            t0 = time.perf_counter()
            out = engine(input_ids=ids, labels=ids)
            loss = out.loss
            _sync(device)
            t1 = time.perf_counter()
            loss.backward()
            _sync(device)
            t2 = time.perf_counter()
            opt.step()
            opt.zero_grad(set_to_none=True)
            _sync(device)
            t3 = time.perf_counter()
            # equal sequences per rank: the mean of the ranks' mean losses is the global batch's
            rec = {"step": t3 - t0, "fwd": t1 - t0, "bwd": t2 - t1, "opt": t3 - t2,
                   "loss": ranks.sum(float(loss.detach()), device) / ranks.world}
            losses.append(rec["loss"])
            del out, loss
            if timers:
                rec.update({k: timers.acc[k] for k in timers.KEYS})
                rec["calls"] = dict(timers.calls)
            if i >= args.warmup:
                steps.append(rec)
            if args.verbose:
                print(f"  {mode} step {i}{' (warm-up)' if i < args.warmup else ''}: "
                      f"{rec['step'] * 1e3:.1f} ms, loss {rec['loss']:.4f}", flush=True)
    finally:
        if timers:
            timers.uninstall()

    if ranks.world > 1:   # the slowest rank's times
        every = ranks.gather([{k: r[k] for k in ("step", "fwd", "bwd", "opt")} for r in steps])
        for i, r in enumerate(steps):
            for k in ("step", "fwd", "bwd", "opt"):
                r[k] = max(e[i][k] for e in every)
    med = lambda k: statistics.median(r[k] for r in steps)   # noqa: E731
    gpu_peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    per_rank = ranks.gather({"peak_host_bytes": maxrss_bytes(), "pss_bytes": pss_bytes(), "peak_gpu_bytes": gpu_peak})
    res = {
        "ranks": ranks.world, "losses": losses, "per_rank": per_rank,
        "host_pss_bytes": (sum(r["pss_bytes"] for r in per_rank)
                           if all(r["pss_bytes"] is not None for r in per_rank) else None),
        "mode": mode, "impl": impl, "device": str(device), "layers": args.layers, "tokens": args.tokens,
        "batch": B, "steps": args.steps, "warmup": args.warmup,
        "step_s": med("step"), "fwd_s": med("fwd"), "bwd_s": med("bwd"), "opt_s": med("opt"),
        "step_s_all": [r["step"] for r in steps],
        "tokens_per_s": args.tokens / med("step"), "loss": steps[-1]["loss"],
        "trainable_params": n_train, "build_s": t_build, "patch_s": t_patch,
        "peak_host_bytes": maxrss_bytes(),
        "peak_gpu_bytes": gpu_peak,
    }
    if mode == "hybrid":
        fn = [r["fn_fwd"] + r["fn_bwd"] for r in steps]
        kn = [r["kernel_fwd"] + r["kernel_bwd"] for r in steps]
        res.update({
            "experts_s": statistics.median(fn), "experts_fwd_s": med("fn_fwd"), "experts_bwd_s": med("fn_bwd"),
            "kernel_s": statistics.median(kn), "kernel_fwd_s": med("kernel_fwd"), "kernel_bwd_s": med("kernel_bwd"),
            "experts_share": statistics.median(f / r["step"] for f, r in zip(fn, steps)),
            "kernel_share": statistics.median(k / r["step"] for k, r in zip(kn, steps)),
            "expert_calls_per_step": steps[-1]["calls"],
        })
    del model, engine, opt, trainable
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return res


def summary_line(r: dict) -> str:
    gib = 2 ** 30
    s = (f"{r['mode']:8s} L={r['layers']} T={r['tokens']} ({r['batch']}x{r['tokens'] // r['batch']}) "
         f"{r['device']}: step {r['step_s'] * 1e3:.1f} ms (fwd {r['fwd_s'] * 1e3:.1f}, bwd {r['bwd_s'] * 1e3:.1f}, "
         f"opt {r['opt_s'] * 1e3:.1f}), {r['tokens_per_s']:.0f} tokens/s")
    if r["mode"] == "hybrid":
        s += (f", experts {r['experts_s'] * 1e3:.1f} ms = {100 * r['experts_share']:.1f}% of step "
              f"(fwd {r['experts_fwd_s'] * 1e3:.1f}, bwd {r['experts_bwd_s'] * 1e3:.1f}; kernel alone "
              f"{r['kernel_s'] * 1e3:.1f} ms = {100 * r['kernel_share']:.1f}%)")
    s += f", loss {r['loss']:.4f}, peak host {r['peak_host_bytes'] / gib:.2f} GiB"
    if r.get("host_pss_bytes") is not None:
        s += f" (PSS now, all ranks: {r['host_pss_bytes'] / gib:.2f} GiB)"
    if r["peak_gpu_bytes"] is not None:
        gpus = [p["peak_gpu_bytes"] / gib for p in r.get("per_rank", [])] or [r["peak_gpu_bytes"] / gib]
        s += ", peak GPU " + " / ".join(f"{g:.2f}" for g in gpus) + " GiB"
    s += f" [{r['impl']}]"
    if r.get("ranks", 1) > 1:
        s = f"{r['ranks']} ranks: " + s
    return s + "\n  losses: " + " ".join(f"{v:.6f}" for v in r.get("losses", []))


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=4096, help="tokens per step (batch x sequence)")
    ap.add_argument("--batch", type=int, default=1, help="sequences per step (tokens / batch each)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--gpu-only", action="store_true",
                    help="also run the model with transformers' experts on --device (no ktmoe)")
    ap.add_argument("--no-hybrid", action="store_true", help="skip the hybrid (ktmoe) mode")
    ap.add_argument("--gpu-experts", default="grouped_mm", choices=["grouped_mm", "batched_mm", "eager"],
                    help="transformers experts implementation for --gpu-only")
    ap.add_argument("--threads", type=int, default=None, help="ktmoe kernel threads (default: ktmoe's automatic)")
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--moe-intermediate", type=int, default=768)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--lora-alpha", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--init", default="fast", choices=["fast", "hf"], help="weight init (see above)")
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--verbose", "-v", action="store_true", help="print every step")
    return ap.parse_args(argv)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    from ktmoe.finetune.ranks import Ranks   # one process, or torchrun's rank (default process group)
    ranks = Ranks.from_env(torch, use_cuda=args.device.startswith("cuda"))
    if ranks.world > 1 and args.device.startswith("cuda"):
        args.device = f"cuda:{ranks.local_rank}"
    if ranks.world > 1 and args.gpu_only:
        raise SystemExit("hybrid_step: under torchrun only the hybrid mode runs (drop --gpu-only)")
    modes = ([] if args.no_hybrid else ["hybrid"]) + (["gpu-only"] if args.gpu_only else [])
    if not modes:
        raise SystemExit("nothing to run (--no-hybrid without --gpu-only)")
    if args.gpu_only and not args.device.startswith("cuda"):
        print(f"note: --gpu-only on {args.device}: transformers' experts on the same device, for reference only",
              flush=True)
    say = print if ranks.main else (lambda *a, **k: None)
    say(f"hybrid_step: Qwen3-MoE L={args.layers} H={args.hidden} E={args.experts} k={args.top_k} "
          f"I={args.moe_intermediate} heads={args.heads}/{args.kv_heads}x{args.head_dim} vocab={args.vocab}, "
          f"T={args.tokens}, LoRA r={args.lora_r} alpha={args.lora_alpha}, device={args.device}, "
          f"torch {torch.__version__}, {platform.node()}, ranks {ranks.world}", flush=True)
    results = []
    for mode in modes:
        r = run_mode(mode, args, ranks)
        results.append(r)
        say(summary_line(r), flush=True)
    ranks.close()
    if args.json and ranks.main:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=1)
    return results


if __name__ == "__main__":
    main()
