"""Putting ktmoe into a transformers model: the experts registry entry and `patch(model)`.

- `register()` adds "ktmoe" to transformers' `ExpertsInterface`, so
  `from_pretrained(path, experts_implementation="ktmoe")` (or `config._experts_implementation
  = "ktmoe"`) routes every experts module's forward to ktmoe; each module moves its weights
  into the kernel on its first call. Call `patch(model)` right after loading to move them all
  at once (and to learn about unsupported layers before the first batch).
- `patch(model)` converts every experts module of an already built model (PEFT-wrapped or
  not) in place, whatever its config says. It checks every module first and raises, naming
  the model, the module and the reason, if any cannot be run, or if there is none: never a
  partial patch.
- `from_pretrained(path, weights=..., ...)`: transformers' `AutoModelForCausalLM.from_pretrained`
  with `experts_implementation="ktmoe"`, then `patch` with the kernel options.

Kernel options (both): `weights` "bf16" | "int8" | "int4", `group_size` (int4: 32, 64 or 128,
default 128), `activations` "bf16" (weight-only, default) | "int8" (W8A8), `max_tokens`,
`num_threads`, `isa`; see ktmoe.MoEExperts. They are checked before any module is converted.
"""
from __future__ import annotations

from torch import nn

from . import experts as _experts

NAME = "ktmoe"


def register() -> None:
    """Registers ktmoe in transformers' experts registry and PEFT's ParamWrapper (idempotent)."""
    from transformers.integrations.moe import ExpertsInterface
    ExpertsInterface.register(NAME, _experts.experts_forward)
    try:
        import peft  # noqa: F401
    except ImportError:
        return
    from .peft import install
    install()


def patch(model: nn.Module, *, max_tokens: int = 65536, num_threads: int | None = None,
          isa: str | None = None, weights: str = "bf16", group_size: int | None = None,
          activations: str = "bf16") -> nn.Module:
    """Runs every routed-experts module of `model` in the ktmoe kernel; returns `model`."""
    register()
    found = [(name, m) for name, m in model.named_modules() if _experts.is_experts_module(m)]
    what = type(model).__name__
    if not found:
        raise ValueError(f"ktmoe.torch.patch: {what} has no transformers experts module "
                         f"(@use_experts_implementation) to run on ktmoe")
    bad = [(name, type(m).__name__, _experts.unsupported_reason(m)) for name, m in found]
    bad = [b for b in bad if b[2] is not None]
    if bad:
        lines = "; ".join(f"{name} ({cls}): {why}" for name, cls, why in bad)
        raise ValueError(f"ktmoe.torch.patch: cannot run the experts of {what}: {lines}")
    from ..experts import _check_format
    for name, m in found:   # format options, against every layer's sizes, before anything is converted
        if not _experts.is_converted(m):
            E, H, I = m.down_proj.shape
            _check_format(weights, group_size, activations, False, H, I)
    for name, m in found:
        _experts.convert(m, name, max_tokens=max_tokens, num_threads=num_threads, isa=isa, weights=weights,
                         group_size=group_size, activations=activations)
    return model


def from_pretrained(path, *, weights: str = "bf16", group_size: int | None = None, activations: str = "bf16",
                    max_tokens: int = 65536, num_threads: int | None = None, isa: str | None = None,
                    auto_class=None, **kwargs) -> nn.Module:
    """`auto_class.from_pretrained(path, experts_implementation="ktmoe", **kwargs)` (default
    AutoModelForCausalLM), then every experts module converted with the kernel options."""
    from ..experts import _check_format
    _check_format(weights, group_size, activations, False, 0, 0)   # names and values; sizes in patch()
    if auto_class is None:
        from transformers import AutoModelForCausalLM as auto_class
    model = auto_class.from_pretrained(path, experts_implementation=NAME, **kwargs)
    return patch(model, max_tokens=max_tokens, num_threads=num_threads, isa=isa, weights=weights,
                 group_size=group_size, activations=activations)
