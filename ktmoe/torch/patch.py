"""Putting ktmoe into a transformers model: the experts registry entry and `patch(model)`.

- `register()` adds "ktmoe" to transformers' `ExpertsInterface`, so
  `from_pretrained(path, experts_implementation="ktmoe")` (or `config._experts_implementation
  = "ktmoe"`) routes every experts module's forward to ktmoe; each module moves its weights
  into the kernel on its first call. Call `patch(model)` right after loading to move them all
  at once (and to learn about unsupported layers before the first batch). PEFT wrapping an
  unconverted module converts it first (peft.py); a model class without experts modules is
  refused when built (guards.py).
- `patch(model)` converts every experts module of an already built model (PEFT-wrapped or
  not) in place, whatever its config says. It checks every module first and raises, naming
  the model, the module and the reason, if any cannot be run, or if there is none: never a
  partial patch.
- `from_pretrained(path, weights=..., ...)`: transformers' `AutoModelForCausalLM.from_pretrained`
  with `experts_implementation="ktmoe"`, then `patch` with the kernel options (an int4 / int4bs
  group size is checked first against the layers of the config's model built on the meta device).

Several ranks (torch.distributed, e.g. torchrun + DDP / FSDP2 / HF Trainer): with
`share=None` (the default) and torch.distributed initialized, the ranks of each host pack the
experts once, into shared memory that every rank maps read-only (distributed.py); `share=False`
packs a private copy per rank. Call `torch.distributed.init_process_group()` before `patch`
(a process launched with WORLD_SIZE > 1 that has not raises, naming both choices). Every rank
must patch the same model.

Kernel options (both): `weights` "bf16" | "int8" | "int4" | "int4bs" (int4 with bf16 scales;
a quantized checkpoint's own format by default, ktmoe.torch.checkpoint.quantized), `group_size` (int4 /
int4bs: 32, 64 or 128, default 128), `activations` "bf16" (weight-only, default) | "int8" (W8A8), `max_tokens`,
`num_threads`, `isa`; see ktmoe.MoEExperts. They are checked before any module is converted.
"""
from __future__ import annotations

import os

from torch import nn

from . import experts as _experts

NAME = _experts.IMPLEMENTATION


def register() -> None:
    """Registers ktmoe in transformers' experts registry and PEFT's ParamWrapper, and installs
    the refusals of guards.py (idempotent)."""
    from transformers.integrations.moe import ExpertsInterface
    ExpertsInterface.register(NAME, _experts.experts_forward)
    from .guards import install as install_guards
    install_guards()
    try:
        import peft  # noqa: F401
    except ImportError:
        return
    from .peft import install
    install()


def patch(model: nn.Module, *, max_tokens: int = 65536, num_threads: int | None = None,
          isa: str | None = None, weights: str = "bf16", group_size: int | None = None,
          activations: str = "bf16", share: bool | None = None, gpu_experts=0, expert_counts=None,
          gpu_device=None, gpu_memory: int | None = None, cost_model=None) -> nn.Module:
    """Runs every routed-experts module of `model` in the ktmoe kernel; returns `model`.
    share: one packed copy per host for the ranks of torch.distributed (see the module
    docstring); None = when torch.distributed is initialized with several ranks on this host.

    Resident experts (design.md 13): gpu_experts=0 (off, default) | N (the N hottest experts of
    each layer) | "auto" (the hottest over all layers while their bf16 bytes fit gpu_memory, by
    default what the GPU has free minus 20 % of its memory, at least 2 GiB) | a list of expert ids
    (the same in every layer) also keep those experts' weights as bf16 on gpu_device (default
    "cuda"; a missing GPU raises) and compute their tokens there in torch while the kernel runs
    the rest. expert_counts {module name: tokens per expert} (ktmoe.torch.count_routing) picks
    the hottest; needed unless every expert is kept. cost_model: a ktmoe.torch.placement.CostModel
    choosing per call which resident experts' tokens run on the GPU (None: all of them)."""
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
    from ..formats import check_layer_format
    for name, m in found:   # format options, against every layer's sizes, before anything is converted
        if not _experts.is_converted(m):
            E, H, I = m.down_proj.shape
            check_layer_format(weights, group_size, activations, False, H, I)
    from . import resident
    device, chosen = resident.plan(found, gpu_experts, expert_counts=expert_counts, gpu_device=gpu_device,
                                   gpu_memory=gpu_memory, weights=weights)
    from .placement import CostModel
    if cost_model is not None and not isinstance(cost_model, CostModel):
        raise ValueError(f"cost_model: expected a ktmoe.torch.placement.CostModel or None, got {cost_model!r}")
    if cost_model is not None and not chosen:
        raise ValueError("cost_model: only used with resident experts (gpu_experts), which are off")
    host = host_sharing(share, "ktmoe.torch.patch")
    options = dict(max_tokens=max_tokens, num_threads=num_threads, isa=isa, weights=weights, group_size=group_size,
                   activations=activations)
    todo = [(name, m) for name, m in found if not _experts.is_converted(m)]
    taken = {name: resident.take_weights(m, chosen[name], device, weights) for name, m in found if name in chosen}
    if host is None:
        for name, m in todo:
            _experts.convert(m, name, **options)
    else:
        from .distributed import convert_shared
        convert_shared([(name, m, lambda m=m: (m.gate_up_proj, m.down_proj)) for name, m in todo], host, **options)
    for name, m in found:
        if name in chosen:
            resident.attach(m, chosen[name], device, taken.pop(name))
            m._ktmoe_cost = cost_model
    return model


def host_sharing(share: bool | None, what: str):
    """The HostGroup whose ranks share one packed copy of the experts, or None (one per process).
    share=None: shared when torch.distributed is initialized and this host runs several ranks;
    a process started by a launcher (WORLD_SIZE > 1) before init_process_group raises rather
    than silently packing a copy per rank."""
    if share not in (None, True, False):
        raise ValueError(f"share: must be None, True or False, got {share!r}")
    if share is False:
        return None
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()):
        world = os.environ.get("WORLD_SIZE", "1")
        if share is True or (world.isdigit() and int(world) > 1):
            raise RuntimeError(f"{what}: this process is one of WORLD_SIZE={world} ranks but torch.distributed is "
                               f"not initialized: call torch.distributed.init_process_group() first, so that the "
                               f"ranks of a host share one packed copy of the experts (or pass share=False for "
                               f"one copy per rank)")
        return None
    from .distributed import host_group
    host = host_group()
    return host if host.size > 1 or share is True else None


def from_pretrained(path, *, weights: str | None = None, group_size: int | None = None, activations: str = "bf16",
                    max_tokens: int = 65536, num_threads: int | None = None, isa: str | None = None,
                    auto_class=None, share: bool | None = None, gpu_experts=0, expert_counts=None,
                    gpu_device=None, gpu_memory: int | None = None, cost_model=None, **kwargs) -> nn.Module:
    """`auto_class.from_pretrained(path, experts_implementation="ktmoe", **kwargs)` (default
    AutoModelForCausalLM), then every experts module converted with the kernel options
    (share, gpu_experts, expert_counts, gpu_device, gpu_memory, cost_model: see patch; with a
    quantized checkpoint the resident experts are its stored values dequantized to bf16).

    weights None (default): the checkpoint's own format, bf16 for an unquantized checkpoint.
    A local checkpoint whose config.json declares a quantization (FP8 block-scaled, INT4
    compressed-tensors pack-quantized) is loaded by ktmoe's streaming loader instead of
    transformers (whose FP8 / compressed-tensors loaders need a GPU or extra packages): the
    experts' codes and scales go into the kernel as published (or converted layer by layer to
    `weights`, said once on the "ktmoe" logger), the quantized non-expert weights are
    dequantized to `dtype` (default bf16) on `device_map` (one device, default CPU); no other
    keyword arguments are accepted there. Other quantization methods raise ValueError. Under
    torch.distributed the ranks of a host share one packed copy there too (share as in patch),
    except for codes kept as published, which raise (convert them with `weights`)."""
    from ..formats import check_layer_format
    from .placement import check_gpu_experts
    resident_options = dict(gpu_experts=gpu_experts, expert_counts=expert_counts, gpu_device=gpu_device,
                            gpu_memory=gpu_memory, cost_model=cost_model)
    check_gpu_experts(gpu_experts)   # the value itself, before anything is read
    local = _local_config(path)
    if local is not None and "quantization_config" in local:
        model = _from_quantized_checkpoint(path, weights=weights, group_size=group_size, activations=activations,
                                           max_tokens=max_tokens, num_threads=num_threads, isa=isa,
                                           auto_class=auto_class, share=share, **kwargs)
        return patch(model, **resident_options) if check_gpu_experts(gpu_experts) != "off" else model
    weights = weights or "bf16"
    check_layer_format(weights, group_size, activations, False, 0, 0)   # names and values; sizes in patch()
    if auto_class is None:
        from transformers import AutoModelForCausalLM as auto_class
    from ..formats import grouped
    if grouped(weights):   # the group size must divide every layer's H and I: checked before a weight is read
        _check_sizes_before_loading(path, auto_class, weights, group_size, activations, kwargs)
    model = auto_class.from_pretrained(path, experts_implementation=NAME, **kwargs)
    return patch(model, max_tokens=max_tokens, num_threads=num_threads, isa=isa, weights=weights,
                 group_size=group_size, activations=activations, share=share, **resident_options)


def _check_sizes_before_loading(path, auto_class, weights, group_size, activations, kwargs) -> None:
    """The kernel format against every experts module's H and I, on the model of `path`'s config
    built on the meta device (no weight read or allocated); ValueError naming the module."""
    import copy

    import torch
    from transformers import AutoConfig, PretrainedConfig

    from ..formats import check_layer_format
    config = kwargs.get("config")
    if not isinstance(config, PretrainedConfig):
        keep = ("trust_remote_code", "revision", "token", "cache_dir", "local_files_only", "subfolder")
        config = AutoConfig.from_pretrained(path, **{k: kwargs[k] for k in keep if k in kwargs})
    config = copy.deepcopy(config)
    build = getattr(auto_class, "from_config", None) or auto_class._from_config
    extra = {"trust_remote_code": kwargs["trust_remote_code"]} if "trust_remote_code" in kwargs and \
        hasattr(auto_class, "from_config") else {}
    with torch.device("meta"):
        skeleton = build(config, experts_implementation=NAME, **extra)
    found = [(name, m) for name, m in skeleton.named_modules() if _experts.is_experts_module(m)]
    for name, m in found:
        if _experts.unsupported_reason(m, weights_needed=False) is not None:
            continue   # not the kernel's form (its shapes mean something else): patch() refuses it, naming why
        E, H, I = m.down_proj.shape
        try:
            check_layer_format(weights, group_size, activations, False, H, I)
        except ValueError as e:
            raise ValueError(f"{e} (experts {name} of {os.fspath(path)}; nothing was loaded)") from None


def _local_config(path) -> dict | None:
    import json
    import os
    cfg = os.path.join(os.fspath(path), "config.json")
    if not os.path.isfile(cfg):
        return None
    try:
        with open(cfg, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None   # transformers reports it
    return data if isinstance(data, dict) else None


def _from_quantized_checkpoint(path, *, weights, group_size, activations, max_tokens, num_threads, isa, auto_class,
                               share, **kwargs) -> nn.Module:
    import logging

    import torch

    from .checkpoint import CheckpointError, loading, quantized
    from .checkpoint.reader import Checkpoint
    from transformers import AutoModelForCausalLM
    if auto_class not in (None, AutoModelForCausalLM):
        raise ValueError(f"auto_class: a quantized checkpoint is built as AutoModelForCausalLM by ktmoe's loader, "
                         f"got {getattr(auto_class, '__name__', auto_class)!r}")
    dtype = kwargs.pop("dtype", kwargs.pop("torch_dtype", torch.bfloat16))
    if dtype == "auto":
        dtype = torch.bfloat16
    device = kwargs.pop("device_map", None) or "cpu"
    if kwargs:
        raise TypeError(f"from_pretrained of a quantized checkpoint (ktmoe's loader): unsupported keyword "
                        f"argument(s) {sorted(kwargs)} (supported: dtype, device_map as one device)")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device_map: one device for a quantized checkpoint (ktmoe's loader), got {device!r}") \
            from None
    try:
        ckpt = Checkpoint(path, what="from_pretrained", require_tokenizer=False)
        scheme = quantized.checkpoint_scheme(ckpt)
        try:
            fmt = quantized.target_format(scheme, weights, group_size, activations, isa)   # resolved once, here
        except ValueError as e:
            raise CheckpointError(str(e)) from None
        if fmt.conversion:
            logging.getLogger("ktmoe").warning("ktmoe.torch.from_pretrained: %s", fmt.conversion)
        register()
        host = host_sharing(share, "from_pretrained")
        model, _ = loading.load(ckpt, device=device, dtype=dtype, max_tokens=max_tokens, num_threads=num_threads,
                                kernel_format=fmt, shared=host is not None)
    except CheckpointError as e:
        raise ValueError(str(e)) from None   # the message alone, without the loader's frames
    return model
