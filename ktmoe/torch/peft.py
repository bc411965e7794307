"""PEFT interop: LoRA on ktmoe experts through `LoraConfig(target_parameters=[...gate_up_proj,
...down_proj])`.

PEFT wraps a targeted experts module in one `ParamWrapper` per parameter (nested). Its own
forward registers a parametrization that materialises W + B A for every expert on every
call; for a ktmoe experts module that must never run. `install()` therefore overrides three
`ParamWrapper` methods, and only for wrappers whose base layer is a ktmoe experts module
(every other ParamWrapper keeps PEFT's behaviour), and wraps two PEFT methods:

- forward: walks the wrapper chain, reads each wrapper's active adapters' `lora_A` /
  `lora_B` weights and `scaling` (honouring `disable_adapters` and `merged` as PEFT does) and
  hands the factors to the kernel. Gradients reach the factors through autograd.
- merge / unmerge: instead of `W += B A`, the factors are cloned (frozen) into the experts
  module, which applies them as part of its base computation; `merge_and_unload()` keeps
  them there. The merged model computes the same function; no delta weight is formed.
- BaseTuner.inject_adapter (get_peft_model, add_adapter, PeftModel.from_pretrained): before
  PEFT wraps anything, experts modules that `experts_implementation="ktmoe"` selected but that
  have not run yet are converted (else PEFT's parametrization would take the torch module,
  and the conversion at the first forward would fail under it), and a trainable adapter whose
  rank_pattern / alpha_pattern gives gate_up_proj and down_proj of one ktmoe experts module
  different scales is refused (check_scales).
- BaseTuner._inject_parameters (the target_parameters search): runs with the ktmoe
  experts' placeholder weights registered as parameters (experts.py keeps them out of
  `_parameters` otherwise, so DDP / FSDP2 / optimizers never see them).
- PeftModel.get_nb_trainable_parameters (print_trainable_parameters): "all params" counts
  the kernel's frozen expert weights too, as it does for the model before patching.

These replacements are PEFT internals (tested with peft 0.21.2): target_parameters always
dispatch to ParamWrapper, and PEFT's custom-module registration is per LoraConfig (a user's
own config would not carry it); ktmoe/torch/__init__.py lists every internal ktmoe relies on.

Unsupported configurations raise: LoRA dropout, DoRA / other variants, lora_bias,
mixed-adapter batches, and two trainable adapters (or rank/alpha patterns giving gate_up
and down different scales) on one experts module, which the kernel's single LoRA cannot
hold.
"""
from __future__ import annotations

import torch

import ktmoe

from .experts import (PARAMS, convert, convert_selected, experts_forward, is_converted, placeholders_registered,
                      selects_ktmoe)
from .lora import combine

_ORIGINAL: dict = {}


def _chain(wrapper):
    """The ParamWrappers from `wrapper` inward, and the base layer under them."""
    from peft.tuners.lora.layer import ParamWrapper
    chain, m = [], wrapper
    while isinstance(m, ParamWrapper):
        chain.append(m)
        m = m.base_layer
    return chain, m


def _is_ktmoe(wrapper) -> bool:
    base = wrapper.get_base_layer()
    if selects_ktmoe(base):   # wrapped before its first call, outside inject_adapter (e.g. a later "ktmoe" switch)
        convert(base, type(base).__name__)
    return is_converted(base)


def _check_options(w, adapter: str) -> None:
    where = f"ktmoe experts LoRA on {w.parameter_name!r} (adapter {adapter!r})"
    drop = w.lora_dropout[adapter] if adapter in w.lora_dropout else None
    if drop is not None and not isinstance(drop, torch.nn.Identity):
        raise ValueError(f"{where}: lora_dropout > 0 is not supported")
    if w.use_dora.get(adapter, False) or adapter in getattr(w, "lora_variant", {}):
        raise ValueError(f"{where}: DoRA / LoRA variants are not supported")
    if w.lora_bias.get(adapter, False) or w.lora_B[adapter].bias is not None:
        raise ValueError(f"{where}: lora_bias is not supported")
    if not getattr(w, "_did_swap_in_out_features", False):
        raise ValueError(f"{where}: expected [E, out, in] expert weights (PEFT saw a transposed layout)")


def lora_of(wrapper, E: int) -> ktmoe.LoRA | None:
    """Kernel factors of a ParamWrapper chain over a ktmoe experts module (PEFT semantics for
    disable_adapters / merged), plus factors merged earlier."""
    chain, base = _chain(wrapper)
    sources = {n: [(a, b, s, False) for _, a, b, s in base._ktmoe_merged[n]] for n in base._ktmoe_merged}
    for w in chain:
        if w.disable_adapters:
            if w.merged:
                w.unmerge()
            continue
        if w.merged:
            continue
        for adapter in w.active_adapters:
            if adapter not in w.lora_A:
                continue
            _check_options(w, adapter)
            if w.parameter_name not in sources:
                raise ValueError(f"ktmoe experts: LoRA on parameter {w.parameter_name!r} is not supported "
                                 f"(only {sorted(sources)})")
            a, b = w.lora_A[adapter].weight, w.lora_B[adapter].weight
            sources[w.parameter_name].append((a, b, w.scaling[adapter], a.requires_grad or b.requires_grad))
    return combine(sources, E)


def _forward(self, x, *args, **kwargs):
    if not _is_ktmoe(self):
        return _ORIGINAL["forward"](self, x, *args, **kwargs)
    if kwargs.pop("adapter_names", None) is not None:
        raise ValueError("ktmoe experts: mixed-adapter batches (adapter_names=...) are not supported")
    _, base = _chain(self)
    return experts_forward(base, x, *args, lora=lora_of(self, base._ktmoe.layer.num_experts), **kwargs)


def _merge(self, safe_merge: bool = False, adapter_names=None):
    if not _is_ktmoe(self):
        return _ORIGINAL["merge"](self, safe_merge=safe_merge, adapter_names=adapter_names)
    from peft.tuners.tuners_utils import check_adapters_to_merge
    base = self.get_base_layer()
    for adapter in check_adapters_to_merge(self, adapter_names):
        if adapter not in self.lora_A:
            continue
        _check_options(self, adapter)
        a = self.lora_A[adapter].weight.detach().clone()
        b = self.lora_B[adapter].weight.detach().clone()
        if safe_merge and not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise ValueError(f"NaNs detected in the merged weights. The adapter {adapter} seems to be broken")
        base._ktmoe_merged[self.parameter_name].append((adapter, a, b, self.scaling[adapter]))
        self.merged_adapters.append(adapter)


def _unmerge(self):
    if not _is_ktmoe(self):
        return _ORIGINAL["unmerge"](self)
    if not self.merged:
        import warnings
        warnings.warn("Already unmerged. Nothing to do.")
        return
    merged = self.get_base_layer()._ktmoe_merged[self.parameter_name]
    while self.merged_adapters:
        adapter = self.merged_adapters.pop()
        for i in range(len(merged) - 1, -1, -1):
            if merged[i][0] == adapter:
                del merged[i]
                break


def _inject_adapter(self, model, adapter_name, *args, **kwargs):
    """PEFT's adapter injection, after what must come before anything is wrapped: the experts
    modules that select ktmoe are converted (convert_selected) and the adapter's scales checked."""
    convert_selected(model)
    check_scales(self.peft_config[adapter_name], model)
    return _ORIGINAL["inject_adapter"](self, model, adapter_name, *args, **kwargs)


def check_scales(config, model) -> None:
    """Raises ValueError when the trainable LoRA `config` would give gate_up_proj and down_proj
    of one ktmoe experts module different scales (rank_pattern / alpha_pattern): the kernel
    trains one LoRA per module with one scale. r and lora_alpha are matched as PEFT matches them
    (get_pattern_key on the parameter's name); frozen adapters (inference_mode) may differ."""
    if getattr(config, "inference_mode", False) or not getattr(config, "target_parameters", None) \
            or getattr(config, "rank_pattern", None) is None:
        return
    import math

    from peft.utils.other import get_pattern_key
    targets = set(config.target_parameters)
    for name, m in model.named_modules():
        if not is_converted(m):
            continue
        path = name.replace(".base_layer", "")   # wrapped by an earlier adapter: PEFT matches the unwrapped name
        got = {}
        for p in PARAMS:
            key = f"{path}.{p}"
            if key in targets or any(key.endswith(f".{t}") for t in targets):
                r = config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), key), config.r)
                alpha = config.alpha_pattern.get(get_pattern_key(config.alpha_pattern.keys(), key), config.lora_alpha)
                got[p] = (alpha / (math.sqrt(r) if config.use_rslora else r), r, alpha)
        if len({s for s, _, _ in got.values()}) > 1:
            what = " and ".join(f"{p} r={r}, lora_alpha={a} (scale {s:g})" for p, (s, r, a) in got.items())
            raise ValueError(f"rank_pattern / alpha_pattern: ktmoe experts {path} would train LoRA with {what}; the "
                             f"kernel trains one LoRA scale per experts module: give both the same lora_alpha / r "
                             f"(e.g. an alpha_pattern entry), or target one of them")


def _inject_parameters(self, peft_config, model, *args, **kwargs):
    """PEFT's target_parameters injection, with the ktmoe placeholders registered meanwhile."""
    with placeholders_registered(model):
        return _ORIGINAL["_inject_parameters"](self, peft_config, model, *args, **kwargs)


def _nb_trainable_parameters(self) -> tuple[int, int]:
    """PEFT's (trainable, all) parameter counts, the kernel's frozen expert weights included in
    "all" (they are not torch parameters of the model, see experts.py)."""
    trainable, total = _ORIGINAL["get_nb_trainable_parameters"](self)
    seen = set()
    for m in self.modules():
        if is_converted(m) and id(m._ktmoe.layer) not in seen:
            seen.add(id(m._ktmoe.layer))
            total += sum(getattr(m, n).numel() for n in PARAMS)
    return trainable, total


def install() -> None:
    """Routes PEFT ParamWrappers over ktmoe experts to the kernel (idempotent)."""
    from peft.tuners.lora.layer import ParamWrapper
    from peft.tuners.tuners_utils import BaseTuner
    if _ORIGINAL:
        return
    for name, fn in (("forward", _forward), ("merge", _merge), ("unmerge", _unmerge)):
        _ORIGINAL[name] = getattr(ParamWrapper, name)
        setattr(ParamWrapper, name, fn)
    _ORIGINAL["_inject_parameters"] = BaseTuner._inject_parameters
    BaseTuner._inject_parameters = _inject_parameters
    _ORIGINAL["inject_adapter"] = BaseTuner.inject_adapter
    BaseTuner.inject_adapter = _inject_adapter
    from peft import PeftModel
    _ORIGINAL["get_nb_trainable_parameters"] = PeftModel.get_nb_trainable_parameters
    PeftModel.get_nb_trainable_parameters = _nb_trainable_parameters
