"""Resident experts: the torch side of placement.py (issue 24; design.md 13).

- `count_routing(model)`: a context manager recording how many tokens each experts module
  routes to each expert (for `expert_counts=`), on a patched model or a plain one.
- `plan(model, found, ...)`: checks the gpu_experts options of patch() and works out, before
  any module is converted, which experts of which module go to which device.
- `take_weights(module, ids, device)`: the chosen experts' weights from a module not converted
  yet, as the kernel packs them (bf16), copied to the device before conversion releases them.
- `attach(module, ids, device, weights)`: gives a converted module its DeviceExperts; for a
  quantized kernel the weights are the kernel's own stored values dequantized to bf16
  (bf16(code * scale), exactly what its weight-only products multiply by).
"""
from __future__ import annotations

import contextlib

import numpy as np
import torch

from .. import formats
from . import experts as _experts
from .device import DeviceExperts
from .placement import RoutingCounts, check_gpu_experts, expert_bytes, resident

HEADROOM = 0.2   # "auto" on a GPU without gpu_memory: leave this fraction of its memory (at least 2 GiB) free


@contextlib.contextmanager
def count_routing(model: torch.nn.Module):
    """Yields a RoutingCounts ({experts module name: tokens per expert}) that every forward of
    `model` inside the block adds to. Under PEFT the name is the outermost wrapper's (the
    experts module's path without PEFT's `.base_layer`s)."""
    counts = RoutingCounts()
    handles = []
    for name, m in model.named_modules():
        inner = m   # a PEFT ParamWrapper calls its experts module's forward directly: hook the outermost wrapper
        while not _experts.is_experts_module(inner) and isinstance(getattr(inner, "base_layer", None),
                                                                    torch.nn.Module):
            inner = inner.base_layer
        if _experts.is_experts_module(inner) and not name.endswith(".base_layer"):
            E = inner._ktmoe.layer.num_experts if _experts.is_converted(inner) else inner.down_proj.shape[0]

            def hook(mod, args, name=name, E=E):
                ids = args[1].detach().reshape(-1)
                counts.add(name, torch.bincount(ids[ids >= 0].to("cpu", torch.int64), minlength=E).tolist())
            handles.append(m.register_forward_pre_hook(hook))
    if not handles:
        raise ValueError(f"model: {type(model).__name__} has no transformers experts module to count")
    try:
        yield counts
    finally:
        for h in handles:
            h.remove()


def resolve_device(gpu_device) -> torch.device:
    """The device resident experts go to: gpu_device, default "cuda"; a CUDA device that torch
    cannot use raises (no silent fallback to the CPU)."""
    try:
        device = torch.device("cuda" if gpu_device is None else gpu_device)
    except (RuntimeError, TypeError):
        raise ValueError(f"gpu_device: expected a torch device, got {gpu_device!r}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("gpu_experts: there is no GPU (torch.cuda.is_available() is False), so no expert can be "
                             "kept on one; leave gpu_experts at 0 (gpu_device='cpu' runs the split on the CPU, "
                             "for tests)")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    elif device.type == "meta":
        raise ValueError("gpu_device: the meta device holds no data")
    return device


def budget_of(device: torch.device, gpu_memory) -> int:
    """Bytes "auto" may fill: gpu_memory, else (CUDA) what is free now minus HEADROOM of the
    GPU's memory (at least 2 GiB) for activations and optimizer state."""
    if gpu_memory is not None:
        if not isinstance(gpu_memory, int) or isinstance(gpu_memory, bool) or gpu_memory < 0:
            raise ValueError(f"gpu_memory: expected a byte count (an int >= 0), got {gpu_memory!r}")
        return gpu_memory
    if device.type != "cuda":
        raise ValueError(f"gpu_memory: gpu_experts='auto' on {device} needs gpu_memory= (bytes); only a CUDA device "
                         f"reports its free memory")
    free, total = torch.cuda.mem_get_info(device)
    return max(0, free - max(int(HEADROOM * total), 2 << 30))


def plan(found: list, gpu_experts, *, expert_counts=None, gpu_device=None, gpu_memory=None, weights="bf16"):
    """(device, {module name: expert ids}) for patch's experts modules `found` [(name, module)],
    or (None, {}) when gpu_experts is off. Every check runs here, before anything is converted."""
    choice = check_gpu_experts(gpu_experts)
    if choice == "off":
        for what, v in (("expert_counts", expert_counts), ("gpu_device", gpu_device), ("gpu_memory", gpu_memory)):
            if v is not None:
                raise ValueError(f"{what}: only used with gpu_experts (which is off), got {v!r}")
        return None, {}
    device = resolve_device(gpu_device)
    layers = {}
    for name, m in found:
        E, H, I = (m._ktmoe.layer.num_experts, m._ktmoe.layer.hidden_size, m._ktmoe.layer.intermediate_size) \
            if _experts.is_converted(m) else tuple(m.down_proj.shape)
        layers[name] = (E, expert_bytes(H, I))
    budget = budget_of(device, gpu_memory) if choice == "auto" else None
    if gpu_memory is not None and choice != "auto":
        raise ValueError(f"gpu_memory: only used with gpu_experts='auto', got gpu_experts={gpu_experts!r}")
    if expert_counts is not None and not isinstance(expert_counts, dict):
        raise ValueError(f"expert_counts: expected {{experts module name: [count per expert]}} (e.g. from "
                         f"ktmoe.torch.count_routing), got {type(expert_counts).__name__}")
    chosen = resident(layers, choice, budget=budget, counts=expert_counts)
    for name, m in found:
        if name in chosen and _experts.is_converted(m) \
                and not formats.WEIGHT_FORMATS[m._ktmoe.layer.weights].quantized:
            raise ValueError(f"gpu_experts: {name} is already in the kernel as bf16 and its torch weights were "
                             f"released; choose the resident experts when converting (patch / from_pretrained "
                             f"with gpu_experts=) or with a quantized kernel format (its values can be read back)")
    return device, chosen


def take_weights(module, ids, device: torch.device, weights: str):
    """(gate_up [n, 2I, H], down [n, H, I]) bf16 on `device` from a module not converted yet,
    for a bf16 kernel (None for a quantized one: its stored values are read after packing)."""
    if formats.WEIGHT_FORMATS[weights].quantized or _experts.is_converted(module):
        return None
    idx = torch.tensor(ids, dtype=torch.int64)
    out = []
    for p in (module.gate_up_proj, module.down_proj):
        t = p.detach()
        t = t.index_select(0, idx.to(t.device))
        if t.dtype not in (torch.float32, torch.bfloat16):
            t = t.to(torch.float32)   # as the kernel widens fp16 etc. before rounding to bf16
        out.append(t.to(torch.bfloat16).to(device))
    return tuple(out)


def kernel_weights(layer, ids, device: torch.device):
    """(gate_up, down) bf16 on `device` of a quantized ktmoe.MoEExperts' experts `ids`: the stored
    codes times their scales, rounded to bf16 (design.md 5: what the weight-only kernels multiply by)."""
    mats = [_dequantized(layer, proj, ids) for proj in ("gate", "up", "down")]
    return torch.cat(mats[:2], dim=1).to(device), mats[2].to(device)


def _dequantized(layer, proj: str, ids) -> torch.Tensor:
    q, scale = layer.quantized_weights(proj)
    q, scale = q[ids], np.asarray(scale[ids], dtype=np.float32)
    rows, cols = q.shape[1:]
    s = torch.from_numpy(scale)
    if formats.WEIGHT_FORMATS[layer.weights].scaling == "block":   # fp8: the checkpoint reader's dequantizer
        from .checkpoint.quantized import dequantize_fp8
        out = torch.empty((len(ids), rows, cols), dtype=torch.float32)
        for i, e in enumerate(ids):
            dequantize_fp8(torch.from_numpy(q[i]), s[i], layer.block, out[i], f"{proj}[{e}]")
        return out.to(torch.bfloat16)
    codes = torch.from_numpy(q.astype(np.float32))   # row / group scales: each repeated over its columns
    return (codes * s.repeat_interleave(cols // s.shape[2], dim=2)).to(torch.bfloat16)


def attach(module, ids, device: torch.device, taken=None) -> None:
    """module (converted) gets DeviceExperts for `ids` on `device`: the weights `taken` before
    conversion (take_weights), else read back from its quantized kernel."""
    layer = module._ktmoe.layer
    if taken is None:
        taken = kernel_weights(layer, ids, device)
    module._ktmoe_device = DeviceExperts(ids, taken[0], taken[1], layer.num_experts)


def device_bytes(model) -> int:
    """GPU bytes held by the resident experts of `model` (design.md 13: reported, bounded by the budget)."""
    seen, n = set(), 0
    for m in model.modules():
        dev = getattr(m, "_ktmoe_device", None)
        if dev is not None and id(dev) not in seen:
            seen.add(id(dev))
            n += dev.nbytes
    return n
