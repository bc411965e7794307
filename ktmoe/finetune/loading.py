"""Building a transformers MoE model from a local checkpoint with its experts in ktmoe.

1. `skeleton(config)`: the model built with every parameter on the `meta` device (no
   memory) while buffers (rotary tables ...) are computed normally on the CPU.
2. `check_supported(model)`: every routed-experts module must be one the kernel runs
   (ktmoe.torch.experts.unsupported_reason); found before a byte of weights is read.
3. `load(...)`: non-expert tensors are read from safetensors and placed on `device` (the GPU
   when present) in `dtype`; then, one layer at a time, that layer's expert tensors are read
   straight into one [E, 2I, H] / [E, H, I] CPU buffer (fused `experts.gate_up_proj` /
   `experts.down_proj`, or per expert `experts.{e}.gate_proj|w1 / up_proj|w3 / down_proj|w2
   .weight`), handed to `ktmoe.torch.experts.convert` (which packs them into the kernel's
   memory and leaves placeholders) and freed. Checkpoint names are mapped to the model's:
   Mixtral's `block_sparse_moe` is `mlp`, and a vision-language checkpoint's
   `model.language_model.*` is the text-only causal LM's `model.*` (its vision tower and
   other tensors the class lists in `_keys_to_ignore_on_load_unexpected` are left out). Peak host memory: the packed experts, plus one
   layer's raw expert tensors, plus the non-expert weights when they stay on the CPU.
   Nothing of the experts ever reaches the GPU.

The entry point this composes, "build a ktmoe experts module from given tensors", is:
assign the tensors as the module's `gate_up_proj` / `down_proj` parameters, then call
`convert(module)`; see `_load_experts`.
"""
from __future__ import annotations

import contextlib
import mmap
import time
from dataclasses import dataclass, field

from . import FinetuneError
from .checkpoint import Checkpoint

# checkpoint-name spellings of the same module (Mixtral's original layout)
RENAMES = [(".block_sparse_moe.", ".mlp.")]
# checkpoints saved from a vision-language class (e.g. Qwen3_5MoeForConditionalGeneration) nest the
# language model one level deeper than the text-only causal-LM class that is built for them
# (AutoModelForCausalLM, like plain transformers): checkpoint prefix -> model prefix
PREFIXES = [("model.language_model.", "model.")]
GATE, UP, DOWN = ("gate_proj", "w1"), ("up_proj", "w3"), ("down_proj", "w2")
META_REASON = "expert weights are on the meta device"


@dataclass
class LoadStats:
    seconds: float = 0.0
    expert_layers: int = 0
    packed_bytes: int = 0          # kernel memory of all packed experts
    largest_layer_bytes: int = 0   # the one-layer read buffer
    other_bytes: int = 0           # non-expert weights (on `device`)
    expert_format: str = ""        # "fused" or "per-expert"
    ignored: list = field(default_factory=list)   # checkpoint tensors the model does not use
    skipped: list = field(default_factory=list)   # ... and that its class says to leave out (vision tower ...)


@contextlib.contextmanager
def _parameters_on_meta():
    """Registers every new nn.Parameter on the meta device; buffers are created normally."""
    import torch
    from torch import nn
    original = nn.Module.register_parameter

    def register(module, name, param):
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        original(module, name, param)

    nn.Module.register_parameter = register
    try:
        with torch.no_grad():
            yield
    finally:
        nn.Module.register_parameter = original


def load_config(ckpt: Checkpoint):
    from transformers import AutoConfig
    try:
        return AutoConfig.from_pretrained(ckpt.path, local_files_only=True)
    except (ValueError, KeyError, OSError, TypeError) as e:
        mt = ckpt.config.get("model_type")
        raise FinetuneError(f"--model {ckpt.path}: unsupported architecture (model_type {mt!r}: "
                            f"transformers {_tf_version()} cannot build its config: {str(e).splitlines()[0]})") from None


def skeleton(config):
    """The causal-LM model of `config` with parameters on the meta device."""
    from transformers import AutoModelForCausalLM
    try:
        with _parameters_on_meta():
            model = AutoModelForCausalLM.from_config(config)
    except (ValueError, KeyError, TypeError) as e:
        raise FinetuneError(f"unsupported architecture {config.model_type!r}: transformers {_tf_version()} has no "
                            f"causal-LM model for it ({str(e).splitlines()[0]})") from None
    return model


def experts_modules(model) -> list:
    from ktmoe.torch.experts import is_experts_module
    return [(name, m) for name, m in model.named_modules() if is_experts_module(m)]


def check_supported(model, where: str) -> list:
    """The (name, module) experts list; FinetuneError if there is none or any is unsupported."""
    from ktmoe.torch.experts import unsupported_reason
    found = experts_modules(model)
    arch = f"{type(model).__name__} (model_type {model.config.model_type!r})"
    if not found:
        raise FinetuneError(f"{where}: unsupported architecture {arch}: it has no routed-experts module "
                            f"(transformers @use_experts_implementation) for ktmoe to run")
    bad = []
    for name, m in found:
        why = unsupported_reason(m)
        if why is not None and not why.startswith(META_REASON):
            bad.append(f"{name}: {why}")
    if bad:
        raise FinetuneError(f"{where}: unsupported architecture {arch}: ktmoe cannot run its experts: "
                            + "; ".join(bad[:3]) + (f" (and {len(bad) - 3} more)" if len(bad) > 3 else ""))
    return found


def _canonical(key: str, model_keys) -> str:
    """The model's name for checkpoint tensor `key` (RENAMES and PREFIXES applied where needed)."""
    if key in model_keys:
        return key
    for a, b in PREFIXES:
        if key.startswith(a):
            key = b + key[len(a):]
            break
    for a, b in RENAMES:
        key = key.replace(a, b)
    return key


def _expected_unused(model, key: str) -> bool:
    """Tensors the model's class itself says to leave out (e.g. the vision tower and the
    multi-token-prediction head of a vision-language checkpoint built as a text-only LM)."""
    import re
    patterns = getattr(type(model), "_keys_to_ignore_on_load_unexpected", None) or []
    return any(re.search(p, key) for p in patterns)


def load(ckpt: Checkpoint, *, device, dtype, max_tokens: int, num_threads: int | None = None,
         progress=None, kernel_format: dict | None = None, shared: bool = False):
    """(model, LoadStats): the model of `ckpt` with experts packed in ktmoe, the rest on `device`.
    kernel_format: the experts' weights / group_size / activations (ktmoe.MoEExperts), default bf16.
    shared: one of several torch.distributed ranks (collective): the first rank of each host reads
    and packs the experts into memory the host's ranks share; the others read no expert tensor."""
    from torch import nn

    t0 = time.perf_counter()
    config = load_config(ckpt)
    config.use_cache = False
    model = skeleton(config)
    found = check_supported(model, f"--model {ckpt.path}")
    stats = LoadStats(expert_layers=len(found))

    state = model.state_dict(keep_vars=True)   # persistent entries: name -> Parameter / buffer
    by_model_key = {}
    for key in ckpt.tensors:
        by_model_key.setdefault(_canonical(key, state), key)
    expert_plans = [(name, m, _expert_plan(name, m, by_model_key, ckpt)) for name, m in found]
    if kernel_format:   # the weight format must fit every layer before a byte of weights is read
        from ktmoe.experts import _check_format
        for name, _, plan in expert_plans:
            try:
                _check_format(kernel_format.get("weights", "bf16"), kernel_format.get("group_size"),
                              kernel_format.get("activations", "bf16"), False, plan["H"], plan["I"])
            except ValueError as e:
                raise FinetuneError(f"--model {ckpt.path}: {name}: {e} (--weights / --group-size / "
                                    f"--activations)") from None
    expert_keys = {k for _, _, plan in expert_plans for k in plan["keys"]}
    expert_params = {f"{name}.{p}" for name, _ in found for p in ("gate_up_proj", "down_proj")}

    # non-expert weights
    modules = dict(model.named_modules())
    missing = []
    for name, current in state.items():
        if name in expert_params:
            continue
        ckey = by_model_key.get(name)
        if ckey is None:
            missing.append(name)
            continue
        info = ckpt.tensors[ckey]
        if tuple(info.shape) != tuple(current.shape):
            raise FinetuneError(f"--model {ckpt.path}: tensor {ckey!r} has shape {list(info.shape)}, "
                                f"the model built from config.json expects {list(current.shape)}")
        t = ckpt.read(ckey)
        parent, _, leaf = name.rpartition(".")
        owner = modules[parent]
        if isinstance(current, nn.Parameter):
            t = t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
            owner._parameters[leaf] = nn.Parameter(t, requires_grad=current.requires_grad)
        else:
            owner._buffers[leaf] = t.to(device=device, dtype=current.dtype)
        stats.other_bytes += t.numel() * t.element_size()
    if getattr(config, "tie_word_embeddings", False) or getattr(config.get_text_config(), "tie_word_embeddings", False):
        model.tie_weights()
    missing = [n for n in missing if _lookup(model, n).device.type == "meta"]   # tied ones are filled now
    if missing:
        raise FinetuneError(f"--model {ckpt.path}: the checkpoint lacks {len(missing)} tensor(s) the model needs, "
                            f"e.g. {', '.join(missing[:4])}")
    used = {by_model_key[n] for n in state if n in by_model_key} | expert_keys
    unused = sorted(k for k in ckpt.tensors if k not in used)
    stats.skipped = [k for k in unused if _expected_unused(model, k) or _expected_unused(model, _canonical(k, state))]
    skipped = set(stats.skipped)
    stats.ignored = [k for k in unused if k not in skipped]

    # experts, one layer at a time
    if shared:
        from ktmoe.torch.distributed import convert_shared, host_group

        def reader(plan):
            def read():
                gate_up, down, _ = _read_experts(ckpt, plan)
                stats.largest_layer_bytes = max(stats.largest_layer_bytes, _nbytes(gate_up, down))
                return gate_up, down
            return read
        convert_shared([(name, m, reader(plan)) for name, m, plan in expert_plans], host_group(), progress,
                       max_tokens=max_tokens, num_threads=num_threads, **(kernel_format or {}))
        stats.packed_bytes = sum(m._ktmoe.layer.weight_bytes for _, m, _ in expert_plans)
    for i, (name, m, plan) in enumerate(expert_plans if not shared else []):
        layer_bytes = _load_experts(ckpt, name, m, plan, max_tokens=max_tokens, num_threads=num_threads,
                                    kernel_format=kernel_format or {})
        stats.largest_layer_bytes = max(stats.largest_layer_bytes, layer_bytes)
        stats.packed_bytes += m._ktmoe.layer.weight_bytes
        if progress is not None:
            progress(i + 1, len(expert_plans))
    stats.expert_format = "fused" if all(p["fused"] for _, _, p in expert_plans) else "per-expert"

    # the absolute checkpoint path, which PEFT writes into adapter_config.json as base_model_name_or_path
    # (a relative one would be resolved against whatever directory the adapter is loaded from, or the Hub)
    model.name_or_path = config._name_or_path = str(ckpt.path.resolve())
    model.to(device)   # remaining CPU buffers; ktmoe experts stay on the CPU
    model.eval()
    stats.seconds = time.perf_counter() - t0
    return model, stats


def _expert_plan(name: str, module, keys: dict, ckpt: Checkpoint) -> dict:
    """Which checkpoint tensors hold this experts module, fused or per expert."""
    E, H, I = module.down_proj.shape
    gu, dn = keys.get(f"{name}.gate_up_proj"), keys.get(f"{name}.down_proj")
    if gu is not None and dn is not None:
        _check_shape(ckpt, gu, (E, 2 * I, H), name)
        _check_shape(ckpt, dn, (E, H, I), name)
        return {"fused": True, "gate_up": gu, "down": dn, "keys": [gu, dn], "E": E, "H": H, "I": I}

    def find(e, names):
        for n in names:
            k = keys.get(f"{name}.{e}.{n}.weight")
            if k is not None:
                return k
        return None

    per = []
    for e in range(E):
        g, u, d = find(e, GATE), find(e, UP), find(e, DOWN)
        if g is None or u is None or d is None:
            raise FinetuneError(
                f"--model {ckpt.path}: no expert weights for {name} (looked for fused {name}.gate_up_proj + "
                f"{name}.down_proj, or per expert {name}.{e}.gate_proj/up_proj/down_proj.weight "
                f"(or w1/w3/w2); expert {e} is missing)")
        _check_shape(ckpt, g, (I, H), name)
        _check_shape(ckpt, u, (I, H), name)
        _check_shape(ckpt, d, (H, I), name)
        per.append((g, u, d))
    return {"fused": False, "per": per, "keys": [k for t in per for k in t], "E": E, "H": H, "I": I}


def _check_shape(ckpt, key, want, name):
    got = tuple(ckpt.tensors[key].shape)
    if got != tuple(want):
        raise FinetuneError(f"--model {ckpt.path}: {key!r} has shape {list(got)}, expected {list(want)} for {name} "
                            f"(from config.json)")


def _buffer_dtype(ckpt, keys):
    import torch
    names = {ckpt.tensors[k].torch_dtype for k in keys}
    # one buffer per layer in the checkpoint's dtype when the kernel reads it directly
    if len(names) == 1 and names <= {"bfloat16", "float32"}:
        return getattr(torch, names.pop()), False
    return torch.float32, True


def _nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _load_experts(ckpt: Checkpoint, name: str, module, plan: dict, *, max_tokens, num_threads, kernel_format) -> int:
    """Reads one layer's experts into one buffer pair, packs them into ktmoe, frees the buffers."""
    from torch import nn

    from ktmoe.torch.experts import convert

    gate_up, down, mem = _read_experts(ckpt, plan)
    nbytes = _nbytes(gate_up, down)
    module.gate_up_proj = nn.Parameter(gate_up, requires_grad=False)
    module.down_proj = nn.Parameter(down, requires_grad=False)
    del gate_up, down
    convert(module, name, max_tokens=max_tokens, num_threads=num_threads, **kernel_format)
    try:
        mem.close()
    except BufferError:   # a tensor view is still alive somewhere: the mapping goes when it does
        pass
    return nbytes


def _read_experts(ckpt: Checkpoint, plan: dict):
    """(gate_up [E, 2I, H], down [E, H, I], their buffer): one layer's experts read into one buffer."""
    import torch

    E, H, I = plan["E"], plan["H"], plan["I"]
    dtype, widen = _buffer_dtype(ckpt, plan["keys"])
    # the layer's read buffer is its own anonymous mapping, so that it goes back to the OS the moment
    # the layer is packed (a malloc'ed buffer below glibc's mmap threshold would stay in the heap)
    itemsize = torch.empty((), dtype=dtype).element_size()
    n_gu, n_dn = E * 2 * I * H, E * H * I
    mem = mmap.mmap(-1, (n_gu + n_dn) * itemsize)
    flat = torch.frombuffer(mem, dtype=dtype)
    gate_up, down = flat[:n_gu].view(E, 2 * I, H), flat[n_gu:].view(E, H, I)
    del flat

    def put(key, dst):
        if widen:
            dst.copy_(ckpt.read(key))
        else:
            ckpt.read_into(key, dst)

    if plan["fused"]:
        put(plan["gate_up"], gate_up)
        put(plan["down"], down)
    else:
        for e, (g, u, d) in enumerate(plan["per"]):
            put(g, gate_up[e, :I])
            put(u, gate_up[e, I:])
            put(d, down[e])
    return gate_up, down, mem


def _tf_version() -> str:
    import transformers
    return transformers.__version__


def _lookup(model, name: str):
    module_name, _, leaf = name.rpartition(".")
    return getattr(model.get_submodule(module_name), leaf)
