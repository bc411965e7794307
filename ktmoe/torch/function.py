"""The autograd bridge: torch tensors on any device <-> one layer's CPU experts kernel.

`experts_apply(kernel, x, ids, w, lora)` returns y in x's device and dtype. It calls the
registered custom operator `torch.ops.ktmoe.experts` (its backward is
`torch.ops.ktmoe.experts_backward`, wired with `torch.library.register_autograd`; both have
fake implementations giving output shapes and dtypes), so `torch.compile` sees the experts as
one opaque op. The op finds its kernel through an integer handle (KernelExperts.handle).
The kernel runs on host copies (x, topk weights and LoRA factors are copied only when they
are not already CPU tensors of a kernel dtype), with the GIL released; the result goes back
to x's device with a non-blocking copy from pinned memory.

What is kept for backward:
- grad off (eval, `generate`), or no input needing a gradient: nothing at all.
- grad on and no saved-tensor hooks active (or under torch.compile): the kernel keeps its own
  activations (`MoEExperts.saved_bytes_per_token`); the op's second output, a one-element
  int64 "state" tensor, names that kept forward (0: nothing kept).
- saved-tensor hooks active (activation checkpointing, `save_on_cpu`...): the kernel keeps
  nothing; backward runs the forward again with keep_for_backward, then the backward.
The node saves x, topk ids and weights, the LoRA factors and the state tensor through
`save_for_backward`, so a node whose kernel state was replaced by a later forward of the same
layer (two forwards before one backward, checkpoint recomputation, a deep copy or another
thread using the same kernel) recomputes instead of using stale state. A per-kernel lock
makes check-state / recompute / backward one step, so threads sharing a layer are
serialised.

LoRA gradients are returned through autograd (fresh tensors in each factor's device and
dtype; autograd accumulates them into `.grad`).

Deep copies (`copy.deepcopy` of a patched model): a KernelExperts copy shares the read-only
packed weights (the MoEExperts) and that kernel's one saved-activation slot with the
original, with its own handle; copies used interleaved give correct results (a copy whose
kept state was taken by the other recomputes its forward). Pickling is refused (see
PICKLE_MESSAGE).
"""
from __future__ import annotations

import itertools
import pickle
import threading
import weakref
from typing import Optional

import torch

KERNEL_DTYPES = (torch.float32, torch.bfloat16)
PICKLE_MESSAGE = (
    "ktmoe.torch: a model whose experts run in the ktmoe kernel cannot be pickled (torch.save(model), "
    "pickle.dumps): the expert weights live only in the kernel's packed CPU memory. Save what you trained "
    "instead: the LoRA adapter with model.save_pretrained(dir) (PEFT), then rebuild with "
    "ktmoe.torch.from_pretrained(base) + PeftModel.from_pretrained(model, dir). copy.deepcopy(model) works.")


_HANDLES = itertools.count(1)
_KERNELS: dict = {}                # handle -> weakref to its KernelExperts
_GENERATIONS = itertools.count(1)  # names of kept forwards, unique across kernels


class _Slot:
    """What deep copies share: the MoEExperts (packed weights, one saved-activation slot), the
    lock that serialises its use, and the generation of the forward whose activations it holds."""

    def __init__(self, layer):
        self.layer = layer
        self.lock = threading.RLock()
        self.owner = None


class KernelExperts:
    """A `ktmoe.MoEExperts` plus which forward its kept state belongs to, reachable from the
    custom op by `handle`."""

    def __init__(self, layer, auto_threads: bool = False, *, _slot: _Slot | None = None):
        self._slot = _Slot(layer) if _slot is None else _slot
        self.auto_threads = auto_threads   # no thread count given: follow _cpu.default_num_threads
        self.handle = next(_HANDLES)
        _KERNELS[self.handle] = weakref.ref(self)
        weakref.finalize(self, _KERNELS.pop, self.handle, None)

    @property
    def layer(self):
        return self._slot.layer

    @property
    def lock(self):
        return self._slot.lock

    @property
    def owner(self):
        """Generation of the forward whose activations the kernel holds, or None."""
        return self._slot.owner

    def __deepcopy__(self, memo):
        """Shares the read-only packed weights (and the kernel's one saved-activation slot)."""
        return KernelExperts(None, self.auto_threads, _slot=self._slot)

    def __reduce_ex__(self, protocol):
        raise pickle.PicklingError(PICKLE_MESSAGE)

    def pick_threads(self, device: torch.device) -> None:
        """With automatic threads: every core when torch computes on the CPU, all but one when
        the rest of the model is on a GPU (ktmoe._cpu.default_num_threads)."""
        if self.auto_threads:
            from .._cpu import default_num_threads
            n = default_num_threads(reserve=0 if device.type == "cpu" else 1)
            if n != self.layer.num_threads:
                self.layer.num_threads = n

    def forward(self, x, ids, w, lora, keep: bool, during=None) -> tuple:
        """(y on the host, generation of the kept state or 0). during: called while the kernel
        runs (after its submit, before its wait), e.g. to compute other experts in torch."""
        with self.lock:
            out = torch.empty(x.shape, dtype=x.dtype, pin_memory=_pin())
            self._slot.owner = None
            self.layer.submit_forward(x, ids, w, lora, keep_for_backward=keep, out=out)
            _overlap(self.layer, during)
            gen = next(_GENERATIONS) if keep else 0
            self._slot.owner = gen or None
            return out, gen

    def backward(self, dy, lora_grads, k: int, w_dtype, during=None):
        with self.lock:
            T = dy.shape[0]
            dx = torch.empty(dy.shape, dtype=dy.dtype, pin_memory=_pin())
            dw = torch.empty((T, k), dtype=w_dtype, pin_memory=_pin())
            self._slot.owner = None
            self.layer.submit_backward(dy, lora_grads, dx_out=dx, dw_out=dw)
            _overlap(self.layer, during)
            return dx, dw


def _overlap(layer, during) -> None:
    """Runs during() (if any) while the submitted kernel call runs, then waits for the kernel;
    the kernel is waited for even when during() raises."""
    try:
        if during is not None:
            during()
    finally:
        layer.wait()


def _kernel(handle: int) -> KernelExperts:
    ref = _KERNELS.get(handle)
    kernel = ref() if ref is not None else None
    if kernel is None:
        raise RuntimeError(f"ktmoe experts: kernel handle {handle} no longer exists (its experts module was freed)")
    return kernel


def _pin() -> bool:
    return torch.cuda.is_available()


def _host(t: torch.Tensor, float_dtype: bool = True) -> torch.Tensor:
    """A contiguous CPU tensor of a kernel dtype with t's values (t itself when it already is)."""
    t = t.detach()
    if float_dtype and t.dtype not in KERNEL_DTYPES:
        t = t.to(torch.float32)
    return t.to("cpu").contiguous()


def _kernel_lora(factors: list, scale: float | None):
    """ktmoe.LoRA (scale given) or ktmoe.LoRAGrads (scale None) over host tensors [gate_up A, B,
    down A, B] (None where absent), or None."""
    import ktmoe
    gu = (factors[0], factors[1]) if factors[0] is not None else None
    dn = (factors[2], factors[3]) if factors[2] is not None else None
    if gu is None and dn is None:
        return None
    if scale is None:
        return ktmoe.LoRAGrads.peft(gate_up=gu, down=dn)
    return ktmoe.LoRA.peft(gate_up=gu, down=dn, scale=scale)


def _hooks_active() -> bool:
    """Whether saved-tensor hooks (activation checkpointing, save_on_cpu) are active. torch has no
    public query: this reads the private torch._C._autograd._top_saved_tensors_default_hooks
    (the innermost default hooks, None without any; torch's own AOT autograd uses it), tested
    with torch 2.13. Under torch.compile it is not called (experts_apply)."""
    return torch._C._autograd._top_saved_tensors_default_hooks(False) is not None


def lora_parts(lora) -> tuple:
    """((A, B) of gate_up, (A, B) of down, scale, the factors given) of a ktmoe.LoRA.peft or None;
    a missing projection is (None, None). TypeError for any other LoRA."""
    if lora is not None and getattr(lora, "layout", None) != "peft":
        raise TypeError(f"lora: expected a ktmoe.LoRA.peft(...) (PEFT target_parameters layout) or None, "
                        f"got {lora!r}")
    gu = lora.factors["gate_up"] if lora is not None and lora.factors["gate_up"] is not None else (None, None)
    dn = lora.factors["down"] if lora is not None and lora.factors["down"] is not None else (None, None)
    scale = float(lora.scale) if lora is not None else 1.0
    return gu, dn, scale, [t for t in (*gu, *dn) if t is not None]


def experts_apply(kernel: KernelExperts, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor,
                  lora=None) -> torch.Tensor:
    """y [T, H] = sum_j w_tj * expert_{ids_tj}(x_t) (+ LoRA), differentiable in x, w and the
    LoRA factors; the base expert weights are frozen. lora: a ktmoe.LoRA in the PEFT layout
    (LoRA.peft: PEFT's lora_A / lora_B weights as they are, any device), or None."""
    gu, dn, scale, factors = lora_parts(lora)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in [x, w, *factors])
    if torch.compiler.is_compiling():
        keep = needs_grad   # saved-tensor hooks cannot be inspected while tracing; the state check covers it
    else:
        keep = needs_grad and not _hooks_active()
    y, _ = torch.ops.ktmoe.experts(kernel.handle, x, ids, w, *gu, *dn, scale, keep)
    return y


@torch.library.custom_op("ktmoe::experts", mutates_args=())
def _experts_op(handle: int, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor,
                gu_a: Optional[torch.Tensor], gu_b: Optional[torch.Tensor], dn_a: Optional[torch.Tensor],
                dn_b: Optional[torch.Tensor], scale: float, keep: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(y [T, H] in x's device and dtype, state [1] int64 CPU: the kept forward's generation or 0)."""
    y, gen = kernel_forward(_kernel(handle), x, ids, w, (gu_a, gu_b, dn_a, dn_b), scale, keep)
    return y, torch.tensor([gen], dtype=torch.int64)


def kernel_forward(kernel: KernelExperts, x, ids, w, factors, scale: float, keep: bool, during=None) -> tuple:
    """(y in x's device and dtype, generation of the kept state or 0): the kernel's forward on
    host copies; during() runs while the kernel computes (KernelExperts.forward)."""
    hosts = [None if f is None else _host(f) for f in factors]
    with kernel.lock:
        kernel.pick_threads(x.device)
        y, gen = kernel.forward(_host(x), _host(ids, False), _host(w), _kernel_lora(hosts, scale), keep=keep,
                                during=during)
    return y.to(x.device, x.dtype, non_blocking=True), gen


@_experts_op.register_fake
def _experts_fake(handle, x, ids, w, gu_a, gu_b, dn_a, dn_b, scale, keep):
    return x.new_empty(x.shape), torch.empty((1,), dtype=torch.int64, device="cpu")


@torch.library.custom_op("ktmoe::experts_backward", mutates_args=())
def _experts_backward_op(handle: int, state: torch.Tensor, dy: torch.Tensor, x: torch.Tensor, ids: torch.Tensor,
                         w: torch.Tensor, gu_a: Optional[torch.Tensor], gu_b: Optional[torch.Tensor],
                         dn_a: Optional[torch.Tensor], dn_b: Optional[torch.Tensor], scale: float,
                         lora_grads: bool) -> list[torch.Tensor]:
    """[dx, dw] then, when lora_grads, the gradient of every given factor (gate_up A, B, down A, B
    order), each in its input's device and dtype."""
    return kernel_backward(_kernel(handle), int(state.reshape(-1)[0]), dy, x, ids, w, (gu_a, gu_b, dn_a, dn_b),
                           scale, lora_grads)


def kernel_backward(kernel: KernelExperts, gen: int, dy, x, ids, w, factors, scale: float, lora_grads: bool,
                    during=None) -> list:
    """The kernel's backward of the forward kept as generation `gen` (run again when that state
    is gone): [dx, dw] and, when lora_grads, fresh gradients of the given factors; during() runs
    while the kernel's backward computes."""
    given = [f for f in factors if f is not None]
    hosts = [None if f is None else _host(f) for f in factors]
    xh, idh, wh = _host(x), _host(ids, False), _host(w)
    with kernel.lock:
        if gen == 0 or kernel.owner != gen:   # state replaced or never kept: run the forward again
            kernel.pick_threads(x.device)
            kernel.forward(xh, idh, wh, _kernel_lora(hosts, scale), keep=True)
        bufs = [None if h is None else torch.zeros_like(h) for h in hosts] if lora_grads else None
        dx, dw = kernel.backward(_host(dy).to(xh.dtype), _kernel_lora(bufs, None) if bufs else None,
                                 ids.shape[1], wh.dtype, during=during)
    out = [dx.to(x.device, x.dtype, non_blocking=True), dw.to(w.device, w.dtype, non_blocking=True)]
    if lora_grads:
        out += [g.to(f.device, f.dtype) for g, f in zip([b for b in bufs if b is not None], given)]
    return out


@_experts_backward_op.register_fake
def _experts_backward_fake(handle, state, dy, x, ids, w, gu_a, gu_b, dn_a, dn_b, scale, lora_grads):
    given = [f for f in (gu_a, gu_b, dn_a, dn_b) if f is not None]
    return [torch.empty_like(x), torch.empty_like(w)] + ([torch.empty_like(f) for f in given] if lora_grads else [])


def _setup_context(ctx, inputs, output):
    handle, x, ids, w, gu_a, gu_b, dn_a, dn_b, scale, keep = inputs
    ctx.handle, ctx.scale = handle, scale
    ctx.present = [f is not None for f in (gu_a, gu_b, dn_a, dn_b)]
    ctx.save_for_backward(output[1], x, ids, w, *[f for f in (gu_a, gu_b, dn_a, dn_b) if f is not None])
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, dy, _dstate):
    state, x, ids, w, *given = ctx.saved_tensors
    it = iter(given)
    factors = [next(it) if p else None for p in ctx.present]
    need = ctx.needs_input_grad
    need_factors = [n for n, p in zip(need[4:8], ctx.present) if p]
    lora_grads = any(need_factors)
    grads = torch.ops.ktmoe.experts_backward(ctx.handle, state, dy, x, ids, w, *factors, ctx.scale, lora_grads)
    dx, dw, fgrads = grads[0], grads[1], iter(grads[2:])
    out = [None, dx if need[1] else None, None, dw if need[3] else None]
    for p, n in zip(ctx.present, need[4:8]):
        g = next(fgrads) if p and lora_grads else None
        out.append(g if n else None)
    return (*out, None, None)


_experts_op.register_autograd(_backward, setup_context=_setup_context)
