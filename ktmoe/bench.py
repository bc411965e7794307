"""`ktmoe bench`: the expert layer against this machine's roofline and two torch baselines.

What is measured (design.md 10), all in one process, one run:
- the roofline: the bf16 peak of the kernel path in use, from a register-only loop (AMX tiles
  on the amx path; else VDPBF16PS where the CPU has AVX512_BF16; else fp32 FMA, AVX-512F zmm
  or AVX2 ymm; Roofline.bf16_probe says which), the AMX int8 peak (amx path only) and the
  streaming read bandwidth (ktmoe._kernels._roofline), on the same number of threads as the
  layer;
- the layer shapes below, forward and forward+backward, LoRA r = 16 (PEFT layout, fp32
  factors, B != 0), for ktmoe and the two torch baselines:
    eager:   transformers v5's experts module (loop over experts, default eager
             implementation) wrapped by PEFT `LoraConfig(target_parameters=[gate_up_proj,
             down_proj])`, which materialises W + BA for every expert on every call;
    grouped: a hand-written torch loop over experts (tokens sorted by expert, bf16 F.linear,
             LoRA factors cast to bf16 in the graph, SiLU gate, fp32 scatter-add).
The table ends with a legend (its columns, what each row is) and a line per row saying how far
its output is from the bf16 ktmoe row's and what is expected (quantization error for the
quantized formats). Routing: uniform random top-k without replacement per token, softmax-normalised weights, a
fixed seed. Forward-only runs are inference (ktmoe keep_for_backward=False, torch no_grad);
forward+backward differentiates x, topk_weights and the LoRA factors.

The bench/ pytest-benchmark suite (`pytest bench/ --benchmark-enable`) imports this module
for the shapes, problems, runners, roofline formulas and table, so both fronts measure the
same thing. torch, transformers and PEFT are imported only when a problem is built.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os
import statistics
import sys
import time

from . import formats, lora_layout

LORA_R = 16
LORA_ALPHA = 32          # scale s = alpha / r = 2
SEED = 0
PASSES = ("fwd", "fwdbwd")
# ktmoe-wT: the opt-in transposed weight copy (2x weight memory). The quantized rows
# (design.md 5) are ktmoe/formats.py's MODES: (weights, activations); int4 / int4bs with their
# default group size (128; int4bs: bf16 scales, made by ktmoe's quantizer as int4's); fp8: e4m3 codes
# with 128 x 128 block scales made from the bf16 weights by
# reference.quantize_fp8 (as the FP8 releases are made) and taken by MoEExperts.from_quantized,
# weight-only.
QUANTIZED = {m.bench_row: (m.weights, m.activations) for m in formats.MODES if m.weights != "bf16"}
OURS = ("ktmoe", "ktmoe-wT", *QUANTIZED)
IMPLS = (*OURS, "grouped", "eager")
IMPL_WIDTH = max(map(len, IMPLS))   # the impl column of the printed tables
INT4_GROUP = formats.WEIGHT_FORMATS["int4"].default_group
FP8_BLOCK = formats.FP8_BLOCK
# `--weights`: the weight formats whose ktmoe rows run (the bf16 "ktmoe" row always runs: the
# speed-up targets and the baselines' accuracy check compare against it)
WEIGHT_ROWS = {w: tuple(m.bench_row for m in formats.MODES if m.weights == w) + (("ktmoe-wT",) if w == "bf16" else ())
               for w in formats.WEIGHT_FORMATS}
BASELINES = ("eager", "grouped")
BUDGET_S = 10.0   # seconds one case (impl, shape, pass) may take before its calls stop: time_calls

@dataclasses.dataclass(frozen=True)
class Shape:
    name: str
    family: str   # transformers model type whose experts module is the eager baseline
    E: int
    H: int
    I: int
    k: int
    T: int


SHAPES = {s.name: s for s in (
    Shape("qwen3-16", "qwen3_moe", 128, 2048, 768, 8, 16),
    Shape("qwen3-256", "qwen3_moe", 128, 2048, 768, 8, 256),
    Shape("qwen3-512", "qwen3_moe", 128, 2048, 768, 8, 512),
    Shape("qwen3-4096", "qwen3_moe", 128, 2048, 768, 8, 4096),
    Shape("dsv2-2048", "deepseek_v2", 64, 2048, 1408, 6, 2048),
    Shape("qwen3-8192", "qwen3_moe", 128, 2048, 768, 8, 8192),
    Shape("qwen3-16384", "qwen3_moe", 128, 2048, 768, 8, 16384),
)}
# run unless --shapes names others (the two largest take minutes on a 2-core machine)
DEFAULT_SHAPES = ("qwen3-16", "qwen3-256", "qwen3-4096", "dsv2-2048")


# ---------------------------------------------------------------- roofline

@dataclasses.dataclass(frozen=True)
class Roofline:
    threads: int
    bf16_flops: float | None   # FLOP/s of the bf16 probe below (None: no probe could run here)
    int8_ops: float | None     # OP/s of the AMX int8 tile loop (None: not the amx path)
    read_bw: float             # bytes/s of a streaming read
    read_bytes: int            # size of the buffer read
    bf16_probe: str | None = None   # which loop measured bf16_flops: one of BF16_PROBES

    def as_dict(self) -> dict:
        tf = None if self.bf16_flops is None else self.bf16_flops / 1e12
        return {"threads": self.threads,
                "amx_bf16_tflops": tf if self.bf16_probe == "amx" else None,
                "amx_int8_tops": None if self.int8_ops is None else self.int8_ops / 1e12,
                "bf16_tflops": tf, "bf16_probe": self.bf16_probe,
                "read_gbs": self.read_bw / 1e9, "read_buffer_mib": self.read_bytes / 2**20}


# register-only loops that can measure the bf16 compute ceiling, best first
BF16_PROBES = ("amx", "avx512-bf16", "avx512-fma", "avx2-fma")


def bf16_probe_for(isa: str | None = None) -> str | None:
    """The probe whose peak bounds kernel target `isa` (default: the one in use, ktmoe._cpu.
    select_isa()): amx -> AMX tiles; avx512 -> VDPBF16PS (its inner loops use it); avx512f -> the
    zmm FMA loop (its loops are fp32 FMAs); avx2 -> the ymm FMA loop; portable -> the widest FMA
    loop the CPU has (a ceiling the compiler's vectorisation of the plain C could reach at best).
    None: no probe can run (no AVX2 + FMA)."""
    from . import _cpu
    from ._kernels import _roofline
    if isa is None:
        isa = _cpu.select_isa()[0]
    available, _, flags = _cpu._probe()
    if isa == "amx" and "amx" in available:
        return "amx"
    if isa in ("amx", "avx512") and flags.get("avx512_bf16"):
        return "avx512-bf16"
    if isa == "avx2":
        return "avx2-fma" if _roofline.has_avx2_fma() else None
    if flags.get("avx512"):
        return "avx512-fma"
    return "avx2-fma" if _roofline.has_avx2_fma() else None


def probe_peak(probe: str, threads: int, seconds: float = 0.5) -> float:
    """FLOP/s of bf16 probe `probe` (one of BF16_PROBES) on `threads` threads."""
    from ._kernels import _roofline
    if probe == "amx":
        return _roofline.amx_peak(threads, seconds, "bf16")
    if probe == "avx512-bf16":
        return _roofline.avx512_bf16_peak(threads, seconds)
    if probe == "avx512-fma":
        return _roofline.fma_peak(threads, seconds, 512)
    if probe == "avx2-fma":
        return _roofline.fma_peak(threads, seconds, 256)
    raise ValueError(f"probe: must be one of {BF16_PROBES}, got {probe!r}")


def _llc_bytes() -> int:
    try:
        return int(os.sysconf("SC_LEVEL3_CACHE_SIZE")) or 0
    except (ValueError, OSError):
        return 0


def measure_roofline(threads: int, seconds: float = 0.5, nbytes: int | None = None,
                     isa: str | None = None) -> Roofline:
    """The bf16 peak bounding kernel path `isa` (default: the path in use; see bf16_probe_for; best of 3 runs),
    the AMX int8 peak (amx path only) and the read bandwidth, on `threads` threads. The buffer
    is max(1 GiB, 4x the last-level cache), at most 4 GiB, unless `nbytes` is given."""
    from ._kernels import _roofline
    if nbytes is None:
        nbytes = min(max(1 << 30, 4 * _llc_bytes()), 4 << 30)
    probe = bf16_probe_for(isa)
    # a peak is a maximum: the best of 3 runs (one run lands low when something else shares the cores)
    bf16 = max(probe_peak(probe, threads, seconds) for _ in range(3)) if probe else None
    int8 = _roofline.amx_peak(threads, seconds, "int8") if probe == "amx" else None
    bw = _roofline.read_bandwidth(threads, int(nbytes), 3)
    return Roofline(threads, bf16, int8, bw, int(nbytes), probe)


def layer_flops(shape: Shape, pairs: int, passes: str, r: int = LORA_R) -> float:
    """FLOPs of one call, counted per routed (token, expert) pair (`pairs`, ids != -1):

        forward   6*H*I              gate+up (2*H*2I) and down (2*I*H)
                + 2*r*(2H + 3I)      LoRA: x A_gu^T (H*r), (.) B_gu^T (r*2I), Hh A_d^T (I*r),
                                     (.) B_d^T (r*H), 2 FLOP per multiply-add
        backward  6*H*I              dHh = g Wd (H*I), dX = dG Wg + dU Wu (2*I*H)
                + 2*r*(4H + 6I)      LoRA: g B_d, (.) A_d, dB_d, dA_d (2H + 2I) and
                                     [dG dU] B_gu, (.) A_gu, dB_gu, dA_gu (2*2I + 2H), reusing
                                     the forward's x A^T and Hh A_d^T
                + 2*H                dw = <dy, D>
    Elementwise work (SiLU, weighting) is not counted."""
    H, I = shape.H, shape.I
    fwd = 6 * H * I + 2 * r * (2 * H + 3 * I)
    bwd = 6 * H * I + 2 * r * (4 * H + 6 * I) + 2 * H
    return float(pairs) * (fwd + (bwd if passes == "fwdbwd" else 0))


def layer_bytes(shape: Shape, hit: int, passes: str, r: int = LORA_R, lora_itemsize: int = 4,
                weight_itemsize: float = 2.0) -> float:
    """Bytes one call must move at least, for `hit` distinct experts with tokens:

        forward   hit * 6*H*I            bf16 gate_up + down of each hit expert, read once
                                         (quantized: weight_itemsize bytes per weight, codes
                                         and scales, instead of 2)
                + hit * r*(3H + 3I) * s  LoRA factors of the hit experts (s = 4: fp32)
                + T*H*2 * 2              x read, y written (bf16)
                + T*k*(8 + 4)            ids (int64) and weights (fp32) read
        backward  the same weights and LoRA factors read again, LoRA gradients read and
                  written (2x the factor bytes), dy read, x read again, dx written
                  (3 * T*H*2), ids/weights read and dw written (T*k*(8 + 4 + 4)),
                + 2 * T*k*2I*2           gate/up pre-activations (bf16) written by the
                                         forward and read back by the backward
    """
    H, I, T, k = shape.H, shape.I, shape.T, shape.k
    weights = hit * 3 * H * I * weight_itemsize
    lora = hit * r * (3 * H + 3 * I) * lora_itemsize
    fwd = weights + lora + 2 * T * H * 2 + T * k * 12
    if passes != "fwdbwd":
        return float(fwd)
    bwd = weights + 3 * lora + 3 * T * H * 2 + T * k * 16
    return float(fwd + bwd + 2 * T * k * 2 * I * 2)


def bound_seconds(roof: Roofline, flops: float, nbytes: float, int8: bool = False) -> tuple[float, float, float]:
    """(bound, compute time at peak, memory time at bandwidth); bound = the larger. The compute
    time uses the bf16 peak of the roofline's probe (AMX, VDPBF16PS or FMA: every machine with
    AVX2 has one); int8: the AMX int8 peak (W8A8 rows; their LoRA products still run in bf16,
    so this bound is optimistic), falling back to the bf16 peak where no int8 peak was
    measured (an approximation: VNNI int8 may exceed it). A missing peak
    gives compute time 0 (memory bound only)."""
    peak = (roof.int8_ops or roof.bf16_flops) if int8 else roof.bf16_flops
    t_c = flops / peak if peak else 0.0
    t_m = nbytes / roof.read_bw
    return max(t_c, t_m), t_c, t_m


# ---------------------------------------------------------------- problems and runners

def _torch():
    import torch
    return torch


class Problem:
    """Weights, inputs, routing and LoRA factors of one shape, as torch tensors shared (not
    copied) by every runner. Weights ~N(0, 1/fan_in) in bf16; LoRA A uniform(+-1/sqrt(in)),
    B ~N(0, 0.02) (nonzero), fp32 in PEFT's target_parameters layout."""

    def __init__(self, shape: Shape, r: int = LORA_R, seed: int = SEED):
        torch = _torch()
        g = torch.Generator().manual_seed(seed)
        E, H, I, k, T = shape.E, shape.H, shape.I, shape.k, shape.T
        self.shape, self.r, self.scale = shape, r, LORA_ALPHA / r
        bf16 = torch.bfloat16
        self.gate_up = torch.empty(E, 2 * I, H, dtype=bf16)
        self.down = torch.empty(E, H, I, dtype=bf16)
        for e in range(E):   # one expert at a time: no full-size fp32 temporary
            self.gate_up[e] = torch.randn(2 * I, H, generator=g) * H ** -0.5
            self.down[e] = torch.randn(H, I, generator=g) * I ** -0.5
        self.x = torch.randn(T, H, generator=g).to(bf16)
        self.dy = (torch.randn(T, H, generator=g) * 0.1).to(bf16)
        self.ids = torch.rand(T, E, generator=g).argsort(dim=1)[:, :k].contiguous()   # int64
        self.weights = torch.randn(T, k, generator=g).softmax(dim=-1).contiguous()    # fp32
        self.lora = {   # name -> (A [E*r, in], B [out, E*r])
            "gate_up": ((torch.rand(E * r, H, generator=g) * 2 - 1) * H ** -0.5,
                        torch.randn(2 * I, E * r, generator=g) * 0.02),
            "down": ((torch.rand(E * r, I, generator=g) * 2 - 1) * I ** -0.5,
                     torch.randn(H, E * r, generator=g) * 0.02),
        }
        self.hit = int(torch.unique(self.ids[self.ids >= 0]).numel())
        self.pairs = int((self.ids >= 0).sum())

    @property
    def raw_weight_bytes(self) -> int:
        s = self.shape
        return 3 * s.E * s.H * s.I * 2

    def flops(self, passes: str) -> float:
        return layer_flops(self.shape, self.pairs, passes, self.r)

    def nbytes(self, passes: str, weight_itemsize: float = 2.0) -> float:
        return layer_bytes(self.shape, self.hit, passes, self.r, weight_itemsize=weight_itemsize)


def fp8_checkpoint(p: Problem):
    """((codes, scales), (codes, scales)) of the problem's gate_up and down as an FP8 release holds
    them: e4m3 codes and 128 x 128 block scales (gate's blocks, then up's), one expert at a time
    through reference.quantize_fp8 (no full-size float32 temporary)."""
    import numpy as np

    from . import reference
    torch = _torch()
    E, H, I = p.shape.E, p.shape.H, p.shape.I
    br, bc = FP8_BLOCK
    nb = -(-I // br)
    gu_codes = np.empty((E, 2 * I, H), np.uint8)
    gu_scales = np.empty((E, 2 * nb, H // bc), np.float32)
    d_codes = np.empty((E, H, I), np.uint8)
    d_scales = np.empty((E, -(-H // br), I // bc), np.float32)
    for e in range(E):
        gu = p.gate_up[e].to(torch.float32).numpy()
        for half in (0, 1):
            q = reference.quantize_fp8(gu[half * I:(half + 1) * I], FP8_BLOCK)
            gu_codes[e, half * I:(half + 1) * I] = q.q
            gu_scales[e, half * nb:(half + 1) * nb] = q.scale
        q = reference.quantize_fp8(p.down[e].to(torch.float32).numpy(), FP8_BLOCK)
        d_codes[e], d_scales[e] = q.q, q.scale
    return (gu_codes, gu_scales), (d_codes, d_scales)


class KtmoeRunner:
    """ktmoe.MoEExperts with LoRA.peft on the problem's tensors (threads: `threads`);
    `transposed` turns on the opt-in transposed weight copy."""
    name = "ktmoe"

    def __init__(self, p: Problem, threads: int | None = None, transposed: bool = False,
                 weights: str = "bf16", activations: str = "bf16"):
        import ktmoe
        torch = _torch()
        self.p = p
        if weights == "fp8":
            gate_up, down = fp8_checkpoint(p)
            self.layer = ktmoe.MoEExperts.from_quantized("fp8", gate_up, down, block=FP8_BLOCK, num_threads=threads,
                                                         max_tokens=max(p.shape.T, 1))
            del gate_up, down
        else:
            self.layer = ktmoe.MoEExperts(gate_up=p.gate_up, down=p.down, num_threads=threads,
                                          max_tokens=max(p.shape.T, 1), transposed_weights=transposed,
                                          weights=weights, activations=activations,
                                          group_size=formats.WEIGHT_FORMATS[weights].default_group
                                          if formats.grouped(weights) else None)
        self.lora = ktmoe.LoRA.peft(gate_up=p.lora["gate_up"], down=p.lora["down"], scale=p.scale)
        self.grads = {n: tuple(torch.zeros_like(t) for t in ab) for n, ab in p.lora.items()}
        self.lora_grads = ktmoe.LoRAGrads.peft(gate_up=self.grads["gate_up"], down=self.grads["down"])
        self.y = torch.empty_like(p.x)
        self.dx = torch.empty_like(p.x)
        self.dw = torch.empty_like(p.weights)

    @property
    def weight_bytes(self) -> int:
        return self.layer.weight_bytes

    def fwd(self):
        p = self.p
        return self.layer.forward(p.x, p.ids, p.weights, lora=self.lora, keep_for_backward=False, out=self.y)

    def fwdbwd(self):
        p = self.p
        self.layer.forward(p.x, p.ids, p.weights, lora=self.lora, keep_for_backward=True, out=self.y)
        self.layer.backward(p.dy, lora_grads=self.lora_grads, dx_out=self.dx, dw_out=self.dw)
        return self.y

    def close(self):
        self.layer = None


class _TorchRunner:
    """Shared by both torch baselines: leaves that require grad, and the two passes."""

    def __init__(self, p: Problem):
        self.p = p
        self.x = p.x.detach().clone().requires_grad_(True)
        self.w = p.weights.detach().clone().requires_grad_(True)

    def _call(self, x, w):
        raise NotImplementedError

    def fwd(self):
        torch = _torch()
        with torch.no_grad():
            return self._call(self.p.x, self.p.weights)

    def fwdbwd(self):
        self.x.grad = None
        self.w.grad = None
        y = self._call(self.x, self.w)
        y.backward(self.p.dy)
        return y.detach()

    def close(self):
        pass


class GroupedRunner(_TorchRunner):
    """Hand-written torch loop: tokens sorted by expert, bf16 F.linear per expert (oneDNN
    uses AMX), LoRA in bf16 (factors cast inside the graph, so fp32 .grad), fp32 scatter-add."""
    name = "grouped"

    def __init__(self, p: Problem):
        super().__init__(p)
        self.params = {n: tuple(t.detach().clone().requires_grad_(True) for t in ab)
                       for n, ab in p.lora.items()}

    def _call(self, x, w):
        torch = _torch()
        F = torch.nn.functional
        p, s = self.p, self.p.shape
        E, I, k, r, scale = s.E, s.I, s.k, p.r, p.scale
        bf16 = torch.bfloat16
        (a_gu, b_gu), (a_d, b_d) = self.params["gate_up"], self.params["down"]
        # PEFT layout -> per expert: A [E, r, in], B [E, out, r] (ktmoe/lora_layout.py), split
        # with unbind so backward stacks the per-expert gradients once (indexing [e] would
        # scatter each one into a full-size zero tensor)
        A_gu = lora_layout.per_expert_A(a_gu.to(bf16), E).unbind(0)
        B_gu = lora_layout.per_expert_B(b_gu.to(bf16), E).unbind(0)
        A_d = lora_layout.per_expert_A(a_d.to(bf16), E).unbind(0)
        B_d = lora_layout.per_expert_B(b_d.to(bf16), E).unbind(0)
        flat = p.ids.reshape(-1)
        valid = (flat >= 0).nonzero().squeeze(1)
        order = valid[torch.argsort(flat[valid], stable=True)]
        counts = torch.bincount(flat[order], minlength=E).tolist()
        tok = order // k
        # split (not slicing in a loop): its backward concatenates the pieces once, where
        # each slice's backward would zero-fill a full-size gradient
        outs = []
        for e, xe in enumerate(x[tok].split(counts)):
            if xe.shape[0] == 0:
                continue
            gu = F.linear(xe, p.gate_up[e]) + scale * F.linear(F.linear(xe, A_gu[e]), B_gu[e])
            hh = F.silu(gu[:, :I]) * gu[:, I:]
            outs.append(F.linear(hh, p.down[e]) + scale * F.linear(F.linear(hh, A_d[e]), B_d[e]))
        d = torch.cat(outs).float() * w.reshape(-1)[order].unsqueeze(1)
        y = torch.zeros(x.shape, dtype=torch.float32).index_add(0, tok, d)
        return y.to(x.dtype)


class EagerRunner(_TorchRunner):
    """transformers v5 experts module (eager) + PEFT target_parameters LoRA, same weights."""
    name = "eager"

    def __init__(self, p: Problem):
        super().__init__(p)
        torch = _torch()
        from peft import LoraConfig, get_peft_model
        s = p.shape
        experts_cls, config = _hf_experts(s)
        config._experts_implementation = "eager"

        class Holder(torch.nn.Module):   # PEFT wants a model with named submodules
            def __init__(self):
                super().__init__()
                with torch.device("meta"):
                    self.experts = experts_cls(config)
                self.experts.gate_up_proj = torch.nn.Parameter(p.gate_up, requires_grad=False)
                self.experts.down_proj = torch.nn.Parameter(p.down, requires_grad=False)

            def forward(self, x, ids, w):
                return self.experts(x, ids, w)

        cfg = LoraConfig(r=p.r, lora_alpha=LORA_ALPHA, target_modules=[],
                         target_parameters=["experts.gate_up_proj", "experts.down_proj"])
        self.model = get_peft_model(Holder(), cfg)
        loaded = 0
        for name, param in self.model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                # the outer wrapper holds down_proj's LoRA, the inner one gate_up_proj's
                which = "gate_up" if ".base_layer.lora_" in name else "down"
                src = p.lora[which][0 if "lora_A" in name else 1]
                if param.shape != src.shape:
                    raise RuntimeError(f"PEFT parameter {name} has shape {list(param.shape)}, "
                                       f"expected {list(src.shape)}")
                with torch.no_grad():
                    param.copy_(src)
                loaded += 1
        if loaded != 4:
            raise RuntimeError(f"expected 4 PEFT LoRA factors, found {loaded}")

    def _call(self, x, w):
        return self.model(x, self.p.ids, w)


def _hf_experts(s: Shape):
    if s.family == "qwen3_moe":
        from transformers.models.qwen3_moe.configuration_qwen3_moe import Qwen3MoeConfig
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts
        return Qwen3MoeExperts, Qwen3MoeConfig(num_experts=s.E, hidden_size=s.H, moe_intermediate_size=s.I,
                                               num_experts_per_tok=s.k, hidden_act="silu")
    if s.family == "deepseek_v2":
        from transformers.models.deepseek_v2.configuration_deepseek_v2 import DeepseekV2Config
        from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2Experts
        return DeepseekV2Experts, DeepseekV2Config(n_routed_experts=s.E, hidden_size=s.H, moe_intermediate_size=s.I,
                                                   num_experts_per_tok=s.k, hidden_act="silu")
    raise ValueError(f"unknown model family {s.family!r}")


RUNNERS = {"grouped": GroupedRunner, "eager": EagerRunner}


def make_runner(impl: str, p: Problem, threads: int | None = None):
    if impl in QUANTIZED:
        weights, activations = QUANTIZED[impl]
        return KtmoeRunner(p, threads, weights=weights, activations=activations)
    if impl in OURS:
        return KtmoeRunner(p, threads, transposed=impl == "ktmoe-wT")
    return RUNNERS[impl](p)


# ---------------------------------------------------------------- results and table

@dataclasses.dataclass
class Result:
    shape: str
    passes: str
    impl: str
    seconds: float              # median of the timed rounds
    rounds: int
    T: int
    flops: float
    nbytes: float
    bound: float
    t_compute: float
    t_memory: float
    weight_ratio: float | None = None  # ktmoe: packed weight bytes / raw bf16 bytes
    speedup: dict = dataclasses.field(default_factory=dict)  # baseline -> its time / ours

    @property
    def tokens_per_s(self) -> float:
        return self.T / self.seconds

    @property
    def tflops(self) -> float:
        return self.flops / self.seconds / 1e12

    @property
    def gbs(self) -> float:
        return self.nbytes / self.seconds / 1e9

    @property
    def roofline_fraction(self) -> float:
        return self.bound / self.seconds

    def extra_info(self) -> dict:
        d = {"T": self.T, "tokens_per_s": self.tokens_per_s, "tflops": self.tflops, "gbs": self.gbs,
             "roofline_fraction": self.roofline_fraction, "bound_ms": 1e3 * self.bound,
             "compute_bound_ms": 1e3 * self.t_compute, "memory_bound_ms": 1e3 * self.t_memory,
             "flops": self.flops, "bytes": self.nbytes}
        if self.weight_ratio is not None:
            d["packed_weight_ratio"] = self.weight_ratio
        for b, x in self.speedup.items():
            d[f"speedup_vs_{b}"] = x
        return d


def make_result(roof: Roofline, p: Problem, passes: str, impl: str, seconds: float, rounds: int,
                weight_ratio: float | None = None) -> Result:
    """Quantized rows count their own weight bytes (2 * weight_ratio per weight) and, for W8A8,
    the int8 peak."""
    itemsize = 2.0 * weight_ratio if impl in QUANTIZED and weight_ratio else 2.0
    flops, nbytes = p.flops(passes), p.nbytes(passes, itemsize)
    bound, t_c, t_m = bound_seconds(roof, flops, nbytes, int8=QUANTIZED.get(impl, ("", ""))[1] == "int8")
    return Result(p.shape.name, passes, impl, seconds, rounds, p.shape.T, flops, nbytes, bound, t_c, t_m,
                  weight_ratio)


def add_speedups(results: list) -> None:
    """Fills each ktmoe result's speedup over every baseline measured for the same case."""
    by_case = {(r.shape, r.passes, r.impl): r for r in results}
    for r in results:
        if r.impl not in OURS:
            continue
        for b in BASELINES:
            base = by_case.get((r.shape, r.passes, b))
            if base is not None:
                r.speedup[b] = base.seconds / r.seconds


def format_table(roof: Roofline, results: list) -> list[str]:
    """The result table as lines of aligned plain text."""
    lines = [roofline_line(roof)]
    head = (f"{'shape':<11} {'pass':<6} {'impl':<{IMPL_WIDTH}} {'ms':>9} {'tok/s':>9} {'TFLOP/s':>8} {'GB/s':>7} "
            f"{'bound ms':>9} {'by':>3} {'%roof':>6} {'x eager':>8} {'x grouped':>9}")
    lines += [head, "-" * len(head)]
    for r in results:
        by = "mem" if r.t_memory >= r.t_compute else "cmp"
        sp = [f"{r.speedup[b]:.2f}" if b in r.speedup else "" for b in BASELINES]
        lines.append(f"{r.shape:<11} {r.passes:<6} {r.impl:<{IMPL_WIDTH}} {1e3 * r.seconds:9.1f} {r.tokens_per_s:9.0f} "
                     f"{r.tflops:8.3f} {r.gbs:7.1f} {1e3 * r.bound:9.1f} {by:>3} "
                     f"{100 * r.roofline_fraction:5.1f}% {sp[0]:>8} {sp[1]:>9}")
    lines += legend(list(dict.fromkeys(r.impl for r in results)))
    for impl in OURS:
        ratios = {r.shape: r.weight_ratio for r in results if r.impl == impl and r.weight_ratio is not None}
        if ratios:
            lines.append(f"{impl} packed weights / raw bf16 bytes: "
                         + ", ".join(f"{s} {x:.3f}" for s, x in ratios.items()))
    return lines


def impl_text(impl: str) -> str:
    """What one impl row is, for the legend under the table."""
    if impl == "ktmoe":
        return "ktmoe's kernel, bf16 weights"
    if impl == "ktmoe-wT":
        return "the same with the opt-in transposed weight copy (2x weight memory, for the backward)"
    if impl in QUANTIZED:
        weights, acts = QUANTIZED[impl]
        return f"{weights} weights, " + ("W8A8 (activations rounded to int8)" if acts == "int8" else "weight-only")
    if impl == "eager":
        return "transformers' experts module with PEFT target_parameters LoRA (W + BA made every call)"
    return "a torch loop over experts, bf16 matmuls"


def legend(impls) -> list[str]:
    """The lines under the table that say what its columns and rows are."""
    lines = ["columns: ms = median time of one call; tok/s = T / time; TFLOP/s, GB/s = the call's FLOPs and "
             "least bytes moved (layer_flops / layer_bytes) per second;",
             "  bound ms = the roofline's time for the call, max(FLOPs / peak, bytes / read bandwidth); by = "
             "which of the two sets it (cmp: compute, mem: memory); %roof = bound / time, the share of the "
             "roofline reached;",
             "  x eager, x grouped = that torch baseline's time / this row's (speed-up; ktmoe rows)",
             "rows:"]
    return lines + [f"  {i:<{IMPL_WIDTH}} {impl_text(i)}" for i in impls]


def accuracy_note(shape: str, impl: str, err: float) -> str:
    """One line comparing a row's output y with the bf16 ktmoe row's, saying what error is expected."""
    if impl in QUANTIZED:
        weights, acts = QUANTIZED[impl]
        why = (f"{weights}'s quantization error" + (" plus int8 activation rounding" if acts == "int8" else "")
               + ", as expected (docs/benchmarks.md: Quantization error of the formats; `ktmoe verify` checks the kernel against the quantized reference)")
    else:
        why = "bf16 rounding in another order only: expected below 1e-2"
    return f"{shape} {impl}: y differs from ktmoe's (bf16 weights) by {err:.1e} (relative Frobenius): {why}"


def roofline_line(roof: Roofline) -> str:
    if roof.bf16_flops and roof.int8_ops:
        peak = "AMX bf16 {:.2f} TFLOP/s, int8 {:.2f} TOP/s (probe amx)".format(roof.bf16_flops / 1e12,
                                                                             roof.int8_ops / 1e12)
    elif roof.bf16_flops:
        peak = "bf16 {:.3f} TFLOP/s (probe {}; int8: no AMX peak, W8A8 bound by the bf16 peak)".format(
            roof.bf16_flops / 1e12, roof.bf16_probe)
    else:
        peak = "no bf16 probe can run here: compute bound not measured"
    return (f"roofline ({roof.threads} threads): {peak}; streaming read {roof.read_bw / 1e9:.1f} GB/s "
            f"({roof.read_bytes >> 20} MiB buffer)")


def format_bytes_ratio(shape: Shape, weights: str) -> float:
    """Raw bytes of a quantized format (codes + one scale per row, per group of INT4_GROUP
    columns, or per FP8_BLOCK block) over raw bf16 bytes, for one expert's gate, up and down."""
    return formats.bytes_ratio(shape.H, shape.I, weights, INT4_GROUP, FP8_BLOCK)


# ---------------------------------------------------------------- timing (the CLI's own)

def time_calls(fn, repeat: int, budget_s: float) -> tuple[float, int, object, bool]:
    """One warm-up call, then up to `repeat` timed calls, fewer once `budget_s` is spent counting
    the warm-up (at least 1). A warm-up that alone takes longer than `budget_s` is the measurement
    (a call that slow gains nothing from warming up, and a second one would double the wait).
    Returns (median seconds, calls timed, last output, whether the warm-up was the measurement)."""
    start = time.perf_counter()
    out = fn()
    first = time.perf_counter() - start
    if first > budget_s:
        return first, 1, out, True
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
        if time.perf_counter() - start > budget_s:
            break
    return statistics.median(times), len(times), out, False


def profile_case(runner, passes: str, repeat: int, roof: Roofline, title: str) -> dict:
    """Runs one ktmoe case `repeat` more times with the layer's profile reset first, prints
    the per-phase table (ktmoe/_profile.py) and returns the raw profile."""
    from ._profile import format_profile
    runner.layer.reset_profile()
    for _ in range(repeat):
        getattr(runner, passes)()
    prof = runner.layer.profile()
    print()
    for line in format_profile(prof, roof.bf16_flops, f"profile {title} ({prof['threads']} threads, per call):"):
        print(line)
    print(flush=True)
    return {"case": title, **prof}


# ---------------------------------------------------------------- command line

def add_arguments(parser) -> None:
    from .cli import comma_list, positive_int, thread_count
    parser.add_argument("--shapes", type=comma_list(SHAPES), default=",".join(DEFAULT_SHAPES),
                        help=f"comma-separated layer shapes of {','.join(SHAPES)} "
                             f"(default: {','.join(DEFAULT_SHAPES)})")
    parser.add_argument("--passes", type=comma_list(PASSES), default=",".join(PASSES),
                        help="fwd, fwdbwd or both (default: both)")
    parser.add_argument("--baselines", type=comma_list(BASELINES, alone=("none",)), default=",".join(BASELINES),
                        help="comma-separated torch baselines run in the same process: eager,grouped (default), "
                             "one of them, or 'none'")
    parser.add_argument("--weights", type=comma_list(tuple(WEIGHT_ROWS), alone=("all",)), default=None,
                        help="comma-separated weight formats whose ktmoe rows run: bf16 (ktmoe, ktmoe-wT), int8 "
                             "(ktmoe-int8, ktmoe-w8a8), int4 (ktmoe-int4, ktmoe-w4a8), fp8 (ktmoe-fp8), int4bs "
                             "(ktmoe-int4bs: int4 with bf16 scales), or 'all' "
                             "(default); the bf16 ktmoe row always runs (the speed-ups are against it)")
    parser.add_argument("--threads", type=thread_count, default=None,
                        help="threads for ktmoe, torch and the roofline (default: $KTMOE_NUM_THREADS, else all "
                             "usable cores)")
    parser.add_argument("--repeat", type=positive_int, default=5,
                        help=f"timed calls per case after one warm-up (default 5). A case stops once ~{BUDGET_S:g} s "
                             "are spent, its warm-up included; a call slower than that is made once, and timed. "
                             "The eager baseline's forward + backward at the qwen3 shapes is such a call: about a "
                             "minute on 2 cores (PEFT materialises W + BA of every expert, and its gradient); "
                             "--baselines grouped leaves eager out")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    parser.add_argument("--profile", action="store_true",
                        help="after timing each ktmoe case, run it again --repeat times and print where the "
                             "time goes: per phase wall time, base / LoRA GEMM time and TFLOP/s, other work and "
                             "idle threads (MoEExperts.profile())")


def _check_run(args) -> tuple[int, str]:
    """(threads, kernel path), checked before anything is measured; ValueError names the problem."""
    from . import _cpu
    threads = args.threads if args.threads is not None else _cpu.default_num_threads()
    isa = _cpu.select_isa()[0]                 # $KTMOE_ISA
    if args.json:
        parent = os.path.dirname(os.path.abspath(args.json))
        if os.path.isdir(args.json):
            raise ValueError(f"--json: {args.json!r} is a directory")
        if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
            raise ValueError(f"--json: cannot write {args.json!r}: {parent!r} is not a writable directory")
    missing = [m for m in ("torch", *(("transformers", "peft") if "eager" in args.baselines else ()))
               if importlib.util.find_spec(m) is None]
    if missing:
        raise ValueError(f"{' and '.join(missing)} not installed: pip install torch==2.13.0 'ktmoe[test]'"
                         + (" (or leave out the eager baseline: --baselines grouped)" if "torch" not in missing else ""))
    return threads, isa


def selected_rows(weights) -> tuple:
    """The ktmoe rows of `--weights` (a list of formats; None or [] = 'all'), bf16's "ktmoe" always."""
    if not weights:
        return OURS
    return ("ktmoe", *(i for w in weights for i in WEIGHT_ROWS[w] if i != "ktmoe"))


def run(args) -> int:
    import json
    shapes, passes, baselines = args.shapes, args.passes, args.baselines   # lists (cli.comma_list)
    try:
        threads, isa = _check_run(args)
    except ValueError as e:
        print(f"ktmoe bench: error: {e}", file=sys.stderr)
        return 2
    ours = selected_rows(args.weights)
    torch = _torch()
    from .testing import rel_error
    torch.set_num_threads(threads)
    print(f"ktmoe bench: path {isa}, {threads} threads, torch {torch.__version__}, "
          f"LoRA r={LORA_R} (PEFT layout, fp32)")
    roof = measure_roofline(threads)
    print(roofline_line(roof), flush=True)
    results, notes, profiles = [], [], []
    for name in shapes:
        p = Problem(SHAPES[name])
        print(f"{name}: E={p.shape.E} H={p.shape.H} I={p.shape.I} k={p.shape.k} T={p.shape.T}, "
              f"{p.hit} experts hit", flush=True)
        for impl in [i for i in IMPLS if i in ours or i in baselines]:
            runner = make_runner(impl, p, threads)
            ratio = runner.weight_bytes / p.raw_weight_bytes if impl in OURS else None
            for ps in passes:
                print(f"  {impl:<{IMPL_WIDTH}} {ps:<6} ", end="", flush=True)   # the wait shows what it is for
                sec, n, y, warm_only = time_calls(getattr(runner, ps), args.repeat, budget_s=BUDGET_S)
                r = make_result(roof, p, ps, impl, sec, n, ratio)
                results.append(r)
                if ps == passes[0] and impl == "ktmoe":
                    ktmoe_y = y.float().clone()   # ktmoe runs first: the baselines are compared to it
                elif ps == passes[0]:
                    notes.append(accuracy_note(name, impl, rel_error(y.float(), ktmoe_y)))
                how = f"one call, over the {BUDGET_S:g} s budget: timed once" if warm_only else f"{n} timed"
                print(f"{1e3 * sec:9.1f} ms  ({how})", flush=True)
                if args.profile and impl in OURS:
                    profiles.append(profile_case(runner, ps, args.repeat, roof, f"{name} {ps} {impl}"))
            runner.close()
            del runner
        del p
    add_speedups(results)
    print()
    for line in format_table(roof, results):
        print(line)
    for line in notes:
        print(line)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"roofline": roof.as_dict(), "profiles": profiles, "results": [
                {"shape": r.shape, "pass": r.passes, "impl": r.impl, "ms": 1e3 * r.seconds, "rounds": r.rounds,
                 **r.extra_info()} for r in results]}, f, indent=2)
    return 0
