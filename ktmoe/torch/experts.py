"""A transformers v5 experts module whose routed experts run in the ktmoe CPU kernel.

`convert(module)` checks that an experts module (a class decorated with transformers'
`@use_experts_implementation`) has the form the kernel computes (fused `gate_up_proj`
[E, 2I, H] gate rows first, `down_proj` [E, H, I], SiLU gate, no bias, not transposed, no
post-expert norm, no expert parallelism), copies the weights into the kernel's packed bf16
CPU memory, releases the torch storage and turns the module into a `KtMoE<Class>`:

- `gate_up_proj` / `down_proj` stay attributes holding an `nn.Parameter` of the original
  shape and dtype (CPU, requires_grad False), but their data is a one-element placeholder
  broadcast to the full shape, and they are NOT registered in the module's `_parameters`:
  `model.parameters()` / `named_parameters()` (so DDP, FSDP2, optimizers and parameter
  counts) never see them; there is nothing of theirs to broadcast, shard or train. Reading
  their values is meaningless; the real weights live only in the kernel. PEFT
  `target_parameters` finds them anyway (peft.py registers them for the length of its
  injection only).
- `state_dict()` returns those two entries as `meta` tensors (right shape and dtype, no
  data): anything that reads or saves their values (`save_pretrained` of the base model,
  `.cpu()`, `.numpy()`) fails loudly instead of writing placeholders. LoRA adapters save
  normally. `load_state_dict` with real tensors for both entries repacks the kernel.
- `.to()`, `.cuda()`, `.half()` ... leave the module as it is: experts stay on the CPU.
- Under `experts_implementation="ktmoe"` without `patch`, a module converts on its first call,
  or earlier when PEFT wraps it (convert_selected, called by peft.py before injecting).
- forward runs the kernel, with LoRA factors when PEFT wraps the module (see peft.py) and
  with factors merged by PEFT's `merge` (kept as frozen factors, never as W + BA).
- `copy.deepcopy` (reference or EMA models) gives a module that SHARES the read-only packed
  expert weights with the original (no second copy of them, new placeholders) and has its
  own everything else (LoRA factors, merged factors, kernel handle); interleaved
  forward/backward of the copies is correct (function.py: a copy whose kept activations
  were taken by the other recomputes its forward). `load_state_dict` with real expert
  weights on one of them repacks that one only.
- pickling (`torch.save(model)`, `pickle.dumps`) raises pickle.PicklingError saying to save
  the adapter with `save_pretrained` instead (function.PICKLE_MESSAGE).
"""
from __future__ import annotations

import contextlib
import copy
import pickle

import torch
from torch import nn

from .. import formats
from .device import DeviceExperts, split_apply
from .function import PICKLE_MESSAGE, KernelExperts, experts_apply
from .lora import combine

PARAMS = ("gate_up_proj", "down_proj")
IMPLEMENTATION = "ktmoe"   # the name registered in transformers' ExpertsInterface (patch.py)


def is_experts_module(module: nn.Module) -> bool:
    """True for modules built by a `@use_experts_implementation` class (or already converted)."""
    return is_converted(module) or all(hasattr(module, a) for a in ("has_gate", "is_transposed", "_is_expert_parallel"))


def is_converted(module: nn.Module) -> bool:
    return isinstance(getattr(module, "_ktmoe", None), KernelExperts)


def selects_ktmoe(module: nn.Module) -> bool:
    """True for an experts module not converted yet whose config routes its forward to ktmoe
    (`from_pretrained(..., experts_implementation="ktmoe")`): it converts on its first call."""
    config = getattr(module, "config", None)
    return (not is_converted(module) and is_experts_module(module)
            and getattr(config, "_experts_implementation", None) == IMPLEMENTATION)


def convert_selected(model: nn.Module) -> None:
    """Converts now every experts module of `model` that selects ktmoe (selects_ktmoe) but has
    not run yet, e.g. before PEFT wraps them (peft.py). All are checked first: raises ValueError
    naming each module that cannot run, and then converts none."""
    todo = [(name, m) for name, m in model.named_modules() if selects_ktmoe(m)]
    bad = [(name, type(m).__name__, unsupported_reason(m)) for name, m in todo]
    bad = [b for b in bad if b[2] is not None]
    if bad:
        lines = "; ".join(f"{name} ({cls}): {why}" for name, cls, why in bad)
        raise ValueError(f'experts_implementation="{IMPLEMENTATION}": ktmoe cannot run the experts of '
                         f"{type(model).__name__}: {lines}")
    for name, m in todo:
        convert(m, name)


def unsupported_reason(module: nn.Module, weights_needed: bool = True) -> str | None:
    """Why the kernel cannot run this experts module, or None when it can. weights_needed=False:
    the weights may be on the meta device (a layer attached to packed weights reads none)."""
    if is_converted(module):
        return None
    checks = [
        (not getattr(module, "has_gate", False), "experts without a gate projection (has_gate=False)"),
        (getattr(module, "has_bias", False), "expert projections with bias (has_bias=True)"),
        (getattr(module, "is_transposed", False), "transposed expert weight layout (is_transposed=True)"),
        (not getattr(module, "is_concatenated", True), "interleaved gate/up layout (is_concatenated=False)"),
        (getattr(module, "has_post_expert_norm", False), "a post-expert norm (has_post_expert_norm=True)"),
        (getattr(module, "_is_expert_parallel", False), "expert parallelism"),
    ]
    for bad, why in checks:
        if bad:
            return why
    act = getattr(module, "act_fn", None)
    if type(act).__name__ not in ("SiLUActivation", "SiLU"):
        return f"activation {type(act).__name__} (the kernel computes silu(gate) * up)"
    from transformers.integrations.moe import _default_apply_gate
    if getattr(type(module), "_apply_gate", _default_apply_gate) is not _default_apply_gate:
        return "a custom _apply_gate (the kernel computes silu(gate) * up)"
    gu, dn = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    if not isinstance(gu, torch.Tensor) or not isinstance(dn, torch.Tensor) or gu.dim() != 3 or dn.dim() != 3:
        return "expected 3-D gate_up_proj [E, 2I, H] and down_proj [E, H, I] parameters"
    E, H, I = dn.shape
    if tuple(gu.shape) != (E, 2 * I, H):
        return f"gate_up_proj shape {list(gu.shape)} does not match down_proj {list(dn.shape)} as [E, 2I, H]"
    if weights_needed and (gu.device.type == "meta" or dn.device.type == "meta"):
        return "expert weights are on the meta device (not loaded)"
    return None


def convert(module: nn.Module, where: str = "", *, max_tokens: int = 65536, num_threads: int | None = None,
            isa: str | None = None, weights: str = "bf16", group_size: int | None = None,
            activations: str = "bf16", region=None, layer=None, dtype: torch.dtype | None = None) -> nn.Module:
    """Packs the module's expert weights into the kernel and releases them (in place).
    weights / group_size / activations: the kernel's weight format (ktmoe.MoEExperts).

    region: memory already holding this layer's packed weights (MoEExperts.attach, e.g. the
    host's shared copy, distributed.py): the module's own weights are not read (may be meta).
    layer: a prebuilt ktmoe.MoEExperts to run instead (e.g. MoEExperts.from_quantized of a
    checkpoint's codes and scales); the module's weights are then not read (they may be on
    the meta device), its E, H, I must match the layer's, and the kernel options other than
    num_threads must be left at their defaults (the layer has its own; num_threads None lets
    ktmoe.torch pick per call, as for any converted module). dtype: the placeholders' dtype
    (default: the module's parameters' dtype). The converted module is the same either way."""
    if is_converted(module):
        return module
    if region is not None and layer is not None:
        raise ValueError("layer: give a prebuilt layer or a packed region, not both")
    at = f"{type(module).__name__}{' at ' + where if where else ''}"
    reason = unsupported_reason(module, weights_needed=region is None and layer is None)
    if reason is not None:
        raise ValueError(f"ktmoe cannot run {at}: {reason}")
    import ktmoe
    if layer is None:
        gu, dn = module.gate_up_proj, module.down_proj
        kernel_options = dict(max_tokens=max_tokens, num_threads=num_threads, isa=isa, weights=weights,
                              group_size=group_size, activations=activations)
        if region is None:
            layer = ktmoe.MoEExperts(gate_up=_kernel_copy(gu), down=_kernel_copy(dn), **kernel_options)
        else:
            layer = ktmoe.MoEExperts.attach(region, *dn.shape, **kernel_options)
        auto_threads = num_threads is None
    else:
        if not isinstance(layer, ktmoe.MoEExperts):
            raise TypeError(f"layer: expected a ktmoe.MoEExperts, got {type(layer).__name__}")
        given = {k: v for k, v in dict(max_tokens=max_tokens, isa=isa, weights=weights,
                                       group_size=group_size, activations=activations).items()
                 if v != {"max_tokens": 65536, "weights": "bf16", "activations": "bf16"}.get(k)}
        if given:
            raise ValueError(f"layer: a prebuilt layer has its own kernel options; got {sorted(given)} too")
        E, H, I = module.down_proj.shape
        got = (layer.num_experts, layer.hidden_size, layer.intermediate_size)
        if got != (E, H, I):
            raise ValueError(f"layer: E, H, I = {got} do not match {at}'s (E, H, I) = {(E, H, I)}")
        if num_threads is not None:
            layer.num_threads = num_threads
        auto_threads = num_threads is None
    module._ktmoe = KernelExperts(layer, auto_threads=auto_threads)
    module._ktmoe_merged = {p: [] for p in PARAMS}   # parameter name -> [(adapter, A, B, scale)]
    for name in PARAMS:
        old = getattr(module, name)
        delattr(module, name)
        module.__dict__[name] = nn.Parameter(_placeholder(old.shape, dtype or old.dtype), requires_grad=False)
    module.__class__ = _ktmoe_class(type(module))
    return module


@contextlib.contextmanager
def placeholders_registered(model: nn.Module):
    """Registers the placeholders of every converted experts module of `model` as parameters
    for the block's length (PEFT's target_parameters search reads named_parameters), then
    takes them out of `_parameters` again."""
    mods = [m for m in model.modules() if is_converted(m)]
    for m in mods:
        for name in PARAMS:
            m._parameters[name] = m.__dict__.pop(name)
    try:
        yield
    finally:
        for m in mods:
            for name in PARAMS:
                if name in m._parameters:
                    m.__dict__[name] = m._parameters.pop(name)


def _kernel_copy(p: torch.Tensor) -> torch.Tensor:
    """The weights as a contiguous CPU tensor the kernel reads (fp16 etc. widened to fp32)."""
    p = p.detach()
    if p.dtype not in (torch.float32, torch.bfloat16):
        p = p.to(torch.float32)
    return p.to("cpu").contiguous()


def _placeholder(shape, dtype) -> torch.Tensor:
    return torch.zeros((), dtype=dtype).expand(shape)


def experts_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                    lora=None) -> torch.Tensor:
    """The `experts_implementation="ktmoe"` forward (registered in transformers' ExpertsInterface).
    A module not converted yet (from_pretrained path) is converted on its first call."""
    if not is_converted(self):
        convert(self, type(self).__name__)
    if self.gate_up_proj.requires_grad or self.down_proj.requires_grad:
        raise NotImplementedError(f"ktmoe experts ({type(self).__name__}): the base expert weights are frozen in the "
                                  f"kernel; training them (requires_grad=True) is not supported, use LoRA")
    if lora is None:
        lora = merged_lora(self)
    dev = self.__dict__.get("_ktmoe_device")
    if dev is not None:   # resident experts computed in torch beside the kernel (device.py)
        return split_apply(self._ktmoe, dev, hidden_states, top_k_index, top_k_weights, lora,
                           cost=self.__dict__.get("_ktmoe_cost"))
    return experts_apply(self._ktmoe, hidden_states, top_k_index, top_k_weights, lora)


def merged_lora(module):
    """Factors PEFT merged into this module (frozen), as one kernel ktmoe.LoRA, or None."""
    return combine({p: [(a, b, s, False) for _, a, b, s in module._ktmoe_merged[p]] for p in PARAMS},
                   module._ktmoe.layer.num_experts)


def _apply_keep_cpu(self, fn, recurse=True):
    return self   # expert weights live in the kernel's CPU memory; placeholders stay as they are


def _save_to_state_dict(self, destination, prefix, keep_vars):
    nn.Module._save_to_state_dict(self, destination, prefix, keep_vars)
    for name in PARAMS:
        p = getattr(self, name)
        destination[prefix + name] = torch.empty(p.shape, dtype=p.dtype, device="meta")


def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                          error_msgs):
    given = {n: state_dict.get(prefix + n) for n in PARAMS}
    real = {n: t for n, t in given.items() if t is not None and t.device.type != "meta"}
    if real:
        if len(real) != len(PARAMS):
            error_msgs.append(f"{prefix}: ktmoe experts reload both {PARAMS} together, got only {sorted(real)}")
            return
        import ktmoe
        old = self._ktmoe.layer
        if not formats.WEIGHT_FORMATS[old.weights].quantized_here:
            error_msgs.append(f"{prefix}: ktmoe experts holding a checkpoint's {old.weights} codes cannot be repacked "
                              f"from weights (ktmoe does not quantize to {old.weights}); load the checkpoint again "
                              f"(ktmoe.torch.from_pretrained)")
            return
        layer = ktmoe.MoEExperts(gate_up=_kernel_copy(real["gate_up_proj"]), down=_kernel_copy(real["down_proj"]),
                                 max_tokens=old.max_tokens, num_threads=old.num_threads, isa=old.isa,
                                 weights=old.weights, group_size=old.group_size or None, activations=old.activations)
        self._ktmoe = KernelExperts(layer, auto_threads=self._ktmoe.auto_threads)
        dev = self.__dict__.get("_ktmoe_device")
        if dev is not None:   # the resident experts follow the new weights (as the kernel would compute them)
            idx = torch.tensor(dev.ids, dtype=torch.int64)
            if not formats.WEIGHT_FORMATS[layer.weights].quantized:
                gu, dn = (_kernel_copy(real[n]).index_select(0, idx).to(torch.bfloat16) for n in PARAMS)
            else:
                from .resident import kernel_weights
                gu, dn = kernel_weights(layer, list(dev.ids), dev.device)
            self._ktmoe_device = DeviceExperts(dev.ids, gu.to(dev.device), dn.to(dev.device), layer.num_experts)
    # the placeholders themselves are never overwritten
    rest = {k: v for k, v in state_dict.items() if k not in {prefix + n for n in PARAMS}}
    nn.Module._load_from_state_dict(self, rest, prefix, local_metadata, False, missing_keys, unexpected_keys,
                                    error_msgs)
    for n in PARAMS:
        if strict and given[n] is None:
            missing_keys.append(prefix + n)


def _extra_repr(self) -> str:
    k = self._ktmoe.layer
    block = getattr(k, "block", None)
    fmt = k.weights + (f"/g{k.group_size}" if formats.grouped(k.weights) else "") + \
        (f"/{block[0]}x{block[1]}" if formats.WEIGHT_FORMATS[k.weights].scaling == "block" and block else "") + \
        (f", activations={k.activations}" if formats.WEIGHT_FORMATS[k.weights].quantized else "")
    dev = self.__dict__.get("_ktmoe_device")
    return f"ktmoe: E={k.num_experts}, H={k.hidden_size}, I={k.intermediate_size}, weights={fmt}, isa={k.isa}, " \
           f"threads={k.num_threads}, packed {k.weight_bytes / 2**20:.1f} MiB on CPU" + \
           (f", {len(dev.ids)} experts also on {dev.device} ({dev.nbytes / 2**20:.1f} MiB bf16)" if dev else "")


def _deepcopy(self, memo):
    """Everything copied except the packed weights (shared, see KernelExperts.__deepcopy__) and
    the placeholders (made anew: deep-copying a broadcast tensor would allocate it in full)."""
    new = type(self).__new__(type(self))
    memo[id(self)] = new
    for name in PARAMS:
        old = self.__dict__[name]
        memo[id(old)] = nn.Parameter(_placeholder(old.shape, old.dtype), requires_grad=False)
    for key, value in self.__dict__.items():
        new.__dict__[key] = copy.deepcopy(value, memo)
    return new


def _reduce_ex(self, protocol):
    raise pickle.PicklingError(PICKLE_MESSAGE)


_CLASSES: dict = {}


def _ktmoe_class(cls: type) -> type:
    if cls not in _CLASSES:
        _CLASSES[cls] = type(f"KtMoE{cls.__name__}", (cls,), {
            "forward": experts_forward, "_apply": _apply_keep_cpu, "_save_to_state_dict": _save_to_state_dict,
            "_load_from_state_dict": _load_from_state_dict, "extra_repr": _extra_repr,
            "__deepcopy__": _deepcopy, "__reduce_ex__": _reduce_ex, "__module__": __name__})
    return _CLASSES[cls]
