"""The autograd bridge: torch tensors on any device <-> one layer's CPU experts kernel.

`experts_apply(kernel, x, ids, w, lora)` returns y in x's device and dtype. The kernel runs
on host copies (x, topk weights and LoRA factors are copied only when they are not already
CPU tensors of a kernel dtype). Work is submitted with the GIL released; the result goes back
to x's device with a non-blocking copy from pinned memory.

What is kept for backward:
- grad off (eval, `generate`), or no input needing a gradient: nothing at all.
- grad on and no saved-tensor hooks active: the kernel keeps its own activations
  (`MoEExperts.saved_bytes_per_token`), tagged with a token owned by this autograd node.
- saved-tensor hooks active (activation checkpointing, `save_on_cpu`...): the kernel keeps
  nothing; backward runs the forward again with keep_for_backward, then the backward.
In every case the node saves x, topk ids and weights through `save_for_backward` (references
to tensors the graph holds anyway, or whatever the active hooks make of them), so a node
whose kernel state was replaced by a later forward of the same layer (two forwards before
one backward, checkpoint recomputation) recomputes instead of using stale state.

LoRA gradients: a factor that is a CPU leaf tensor gets its gradient accumulated by the
kernel straight into `.grad` (allocated as zeros when None, so `zero_grad(set_to_none=True)`
and gradient accumulation both work, with no extra copy); any other factor (e.g. a GPU
parameter seen through a host copy) gets a fresh gradient returned through autograd.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

KERNEL_DTYPES = (torch.float32, torch.bfloat16)


@dataclass
class LoraFactors:
    """PEFT `target_parameters` factors for one layer: gate_up (A [E*r, H], B [2I, E*r]) and
    down (A [E*r, I], B [H, E*r]); either may be None. One scale for both (kernel contract)."""
    gate_up: tuple | None
    down: tuple | None
    scale: float

    def tensors(self) -> list:
        return [t for pair in (self.gate_up, self.down) if pair is not None for t in pair]


class KernelExperts:
    """A `ktmoe.MoEExperts` plus which autograd node its kept forward state belongs to."""

    def __init__(self, layer, auto_threads: bool = False):
        self.layer = layer
        self.owner = None   # token of the forward whose activations the kernel holds
        self.auto_threads = auto_threads   # no thread count given: follow _cpu.default_num_threads

    def pick_threads(self, device: torch.device) -> None:
        """With automatic threads: every core when torch computes on the CPU, all but one when
        the rest of the model is on a GPU (ktmoe._cpu.default_num_threads)."""
        if self.auto_threads:
            from .._cpu import default_num_threads
            n = default_num_threads(reserve=0 if device.type == "cpu" else 1)
            if n != self.layer.num_threads:
                self.layer.num_threads = n

    def forward(self, x, ids, w, lora, keep: bool, token=None):
        out = torch.empty(x.shape, dtype=x.dtype, pin_memory=_pin())
        self.owner = None
        self.layer.submit_forward(x, ids, w, lora, keep_for_backward=keep, out=out)
        self.layer.wait()
        if keep:
            self.owner = token
        return out

    def backward(self, dy, lora_grads, k: int, w_dtype):
        T = dy.shape[0]
        dx = torch.empty(dy.shape, dtype=dy.dtype, pin_memory=_pin())
        dw = torch.empty((T, k), dtype=w_dtype, pin_memory=_pin())
        self.owner = None
        self.layer.submit_backward(dy, lora_grads, dx_out=dx, dw_out=dw)
        self.layer.wait()
        return dx, dw


def _pin() -> bool:
    return torch.cuda.is_available()


def _host(t: torch.Tensor, float_dtype: bool = True) -> torch.Tensor:
    """A contiguous CPU tensor of a kernel dtype with t's values (t itself when it already is)."""
    t = t.detach()
    if float_dtype and t.dtype not in KERNEL_DTYPES:
        t = t.to(torch.float32)
    return t.to("cpu").contiguous()


def _kernel_lora(lora: LoraFactors | None, factors: list):
    """ktmoe.LoRA over host copies of the factors, in the order of LoraFactors.tensors()."""
    import ktmoe
    if lora is None:
        return None
    it = iter(factors)
    gu = (next(it), next(it)) if lora.gate_up is not None else None
    dn = (next(it), next(it)) if lora.down is not None else None
    return ktmoe.LoRA.peft(gate_up=gu, down=dn, scale=lora.scale)


def _hooks_active() -> bool:
    return torch._C._autograd._top_saved_tensors_default_hooks(False) is not None


def experts_apply(kernel: KernelExperts, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor,
                  lora: LoraFactors | None) -> torch.Tensor:
    """y [T, H] = sum_j w_tj * expert_{ids_tj}(x_t) (+ LoRA), differentiable in x, w and the
    LoRA factors; the base expert weights are frozen."""
    factors = lora.tensors() if lora is not None else []
    kernel.pick_threads(x.device)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in [x, w, *factors])
    if not needs_grad:
        with torch.no_grad():
            xh = _host(x)
            y = kernel.forward(xh, _host(ids, False), _host(w), _kernel_lora(lora, [_host(f) for f in factors]),
                               keep=False)
        return y.to(x.device, x.dtype, non_blocking=True)
    return _ExpertsFunction.apply(kernel, lora, not _hooks_active(), x, ids, w, *factors)


class _ExpertsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, kernel, lora, keep, x, ids, w, *factors):
        ctx.kernel, ctx.lora, ctx.factors = kernel, lora, factors
        ctx.token = object()
        ctx.x_meta = (x.device, x.dtype)
        ctx.w_meta = (w.device, w.dtype)
        ctx.save_for_backward(x, ids, w)
        y = kernel.forward(_host(x), _host(ids, False), _host(w), _kernel_lora(lora, [_host(f) for f in factors]),
                           keep=keep, token=ctx.token)
        return y.to(x.device, x.dtype, non_blocking=True)

    @staticmethod
    def backward(ctx, dy):
        kernel, lora, factors = ctx.kernel, ctx.lora, ctx.factors
        x, ids, w = ctx.saved_tensors
        hosts = [_host(f) for f in factors]
        xh = _host(x)
        if kernel.owner is not ctx.token:   # state replaced or never kept: run the forward again
            kernel.forward(xh, _host(ids, False), _host(w), _kernel_lora(lora, hosts), keep=True, token=ctx.token)
        need = ctx.needs_input_grad[6:]
        lora_grads, returned = None, [None] * len(factors)
        if any(need):
            bufs = []
            for i, (f, h) in enumerate(zip(factors, hosts)):
                if need[i] and f.is_leaf and f.device.type == "cpu" and f.dtype in KERNEL_DTYPES:
                    if f.grad is None:
                        f.grad = torch.zeros_like(f, memory_format=torch.contiguous_format)
                    if f.grad.is_contiguous() and f.grad.dtype == f.dtype:
                        bufs.append(f.grad)
                        continue
                buf = torch.zeros_like(h)   # returned through autograd (or scratch if not needed)
                returned[i] = buf if need[i] else None
                bufs.append(buf)
            lora_grads = _kernel_lora(lora, bufs)
        dx, dw = kernel.backward(_host(dy).to(xh.dtype), lora_grads, ids.shape[1], _host(w).dtype)
        returned = [None if g is None else g.to(f.device, f.dtype) for g, f in zip(returned, factors)]
        dx = dx.to(*ctx.x_meta, non_blocking=True) if ctx.needs_input_grad[3] else None
        dw = dw.to(*ctx.w_meta, non_blocking=True) if ctx.needs_input_grad[5] else None
        return (None, None, None, dx, None, dw, *returned)
