"""Building a transformers MoE model from a local checkpoint with its experts in ktmoe.

1. `skeleton(config)`: the model built with every parameter on the `meta` device (no
   memory) while buffers (rotary tables ...) are computed normally on the CPU.
2. `check_supported(model)`: every routed-experts module must be one the kernel runs
   (ktmoe.torch.experts.unsupported_reason); found before a byte of weights is read.
3. `load(...)`: the checkpoint's quantization scheme is read from config.json
   (quantized.py: none, FP8 block-scaled, INT4 compressed-tensors pack-quantized; anything
   else raises); non-expert tensors are read from safetensors and placed on `device` (the GPU
   when present) in `dtype`, the quantized ones (FP8 attention projections and dense MLPs,
   INT4 linears outside `ignore`) dequantized one tensor at a time; then, one layer at a time,
   that layer's expert tensors are read into one CPU buffer and packed into the kernel's
   memory (expert_layers.py: as published through MoEExperts.from_quantized, or as weights
   through `ktmoe.torch.experts.convert`, which leaves placeholders) and freed. Checkpoint
   names are mapped to the model's: Mixtral's `block_sparse_moe` is `mlp`, and a
   vision-language checkpoint's `model.language_model.*` is the text-only causal LM's
   `model.*` (its vision tower and other tensors the class lists in
   `_keys_to_ignore_on_load_unexpected` are left out). Peak host memory: the packed experts,
   plus one layer's raw expert tensors (codes and scales as published, or bf16 weights when
   converting), plus the non-expert weights when they stay on the CPU. Nothing of the experts
   ever reaches the GPU.

The entry point this composes, "build a ktmoe experts module from given tensors", is:
assign the tensors as the module's `gate_up_proj` / `down_proj` parameters, then call
`convert(module)`; or build a `ktmoe.MoEExperts` and call `convert(module, layer=...)`;
see expert_layers.py.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

from . import CheckpointError, expert_layers
from . import quantized as quant
from .reader import Checkpoint

# checkpoint-name spellings of the same module (Mixtral's original layout)
RENAMES = [(".block_sparse_moe.", ".mlp.")]
# checkpoints saved from a vision-language class (e.g. Qwen3_5MoeForConditionalGeneration) nest the
# language model one level deeper than the text-only causal-LM class that is built for them
# (AutoModelForCausalLM, like plain transformers): checkpoint prefix -> model prefix
PREFIXES = [("model.language_model.", "model.")]
META_REASON = "expert weights are on the meta device"


@dataclass
class LoadStats:
    seconds: float = 0.0
    expert_layers: int = 0
    packed_bytes: int = 0          # kernel memory of all packed experts
    largest_layer_bytes: int = 0   # the one-layer read buffer
    other_bytes: int = 0           # non-expert weights (on `device`)
    expert_format: str = ""        # "fused" or "per-expert"
    scheme: quant.Scheme = field(default_factory=quant.Scheme)   # how the checkpoint stores its linears
    as_published: bool = False     # experts packed from the checkpoint's own codes and scales
    dequantized: int = 0           # non-expert tensors dequantized to `dtype`
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


# model types whose published config.json asks for custom code (auto_map) while its architecture
# is one transformers has: model_type -> (transformers config class, architecture it must name).
# Kimi K2 / K2.5 ("kimi_k2") are DeepSeek-V3 models; ktmoe never runs the checkpoint's own code.
ALIASES = {"kimi_k2": ("DeepseekV3Config", "DeepseekV3ForCausalLM")}


def load_config(ckpt: Checkpoint):
    import transformers
    from transformers import AutoConfig
    mt = ckpt.config.get("model_type")
    if mt in ALIASES:
        cls_name, arch = ALIASES[mt]
        if arch not in (ckpt.config.get("architectures") or []):
            raise CheckpointError(f"{ckpt.label}: model_type {mt!r} is read as transformers' {cls_name}, which needs "
                                f"architectures [{arch!r}], got {ckpt.config.get('architectures')!r}")
        fields = {k: v for k, v in ckpt.config.items() if k not in ("model_type", "auto_map")}
        return getattr(transformers, cls_name)(**fields)
    try:
        return AutoConfig.from_pretrained(ckpt.path, local_files_only=True)
    except (ValueError, KeyError, OSError, TypeError) as e:
        mt = ckpt.config.get("model_type")
        raise CheckpointError(f"{ckpt.label}: unsupported architecture (model_type {mt!r}: "
                            f"transformers {_tf_version()} cannot build its config: {str(e).splitlines()[0]})") from None


def skeleton(config):
    """The causal-LM model of `config` with parameters on the meta device."""
    from transformers import AutoModelForCausalLM
    try:
        with _parameters_on_meta():
            model = AutoModelForCausalLM.from_config(config)
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"unsupported architecture {config.model_type!r}: transformers {_tf_version()} has no "
                            f"causal-LM model for it ({str(e).splitlines()[0]})") from None
    return model


def experts_modules(model) -> list:
    from ktmoe.torch.experts import is_experts_module
    return [(name, m) for name, m in model.named_modules() if is_experts_module(m)]


def check_supported(model, where: str) -> list:
    """The (name, module) experts list; CheckpointError if there is none or any is unsupported."""
    from ktmoe.torch.experts import unsupported_reason
    found = experts_modules(model)
    arch = f"{type(model).__name__} (model_type {model.config.model_type!r})"
    if not found:
        raise CheckpointError(f"{where}: unsupported architecture {arch}: it has no routed-experts module "
                            f"(transformers @use_experts_implementation) for ktmoe to run")
    bad = []
    for name, m in found:
        why = unsupported_reason(m)
        if why is not None and not why.startswith(META_REASON):
            bad.append(f"{name}: {why}")
    if bad:
        raise CheckpointError(f"{where}: unsupported architecture {arch}: ktmoe cannot run its experts: "
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
    kernel_format: the experts' quantized.ExpertFormat, resolved for this checkpoint by
    quantized.target_format (carried down as it is); default None: the checkpoint's own format (bf16,
    or fp8 / int4 / int4bs as published: quantized.Scheme.own_format).
    shared: one of several torch.distributed ranks (collective): the first rank of each host reads
    and packs the experts into memory the host's ranks share; the others read no expert tensor.
    Codes kept as published (fp8 / int4 checkpoints in their own format) cannot be shared yet:
    that raises CheckpointError, naming the --weights that can."""
    from torch import nn

    t0 = time.perf_counter()
    where = ckpt.label
    scheme = quant.checkpoint_scheme(ckpt)
    if kernel_format is None:
        kernel_format = quant.target_format(scheme)   # the checkpoint's own format
    elif kernel_format.scheme != scheme:
        raise ValueError(f"kernel_format: resolved for a {kernel_format.scheme.describe()} checkpoint, "
                         f"{where} is {scheme.describe()}")
    config = load_config(ckpt)
    config.use_cache = False
    if scheme.quantized:   # the model built here holds dequantized non-expert weights: not a transformers-quantized model
        for c in {id(config): config, id(config.get_text_config()): config.get_text_config()}.values():
            if hasattr(c, "quantization_config"):
                del c.quantization_config
    model = skeleton(config)
    found = check_supported(model, where)
    stats = LoadStats(expert_layers=len(found), scheme=scheme)

    state = model.state_dict(keep_vars=True)   # persistent entries: name -> Parameter / buffer
    by_model_key = {}
    for key in ckpt.tensors:
        by_model_key.setdefault(_canonical(key, state), key)
    expert_plans = [(name, m, expert_layers.plan(name, m, by_model_key, ckpt, scheme)) for name, m in found]
    stats.as_published = kernel_format.as_published
    if not stats.as_published:   # the layers' sizes must fit the format before a byte of weights is read
        from ktmoe.formats import check_layer_format
        for name, _, plan in expert_plans:
            try:
                check_layer_format(kernel_format.weights, kernel_format.group_size, kernel_format.activations, False,
                                   plan["H"], plan["I"])
            except ValueError as e:
                raise CheckpointError(f"{where}: {name}: {e} (--weights / --group-size / --activations)") from None
    if shared and stats.as_published:
        raise CheckpointError(f"{where}: several ranks share one packed copy of the experts per host, which ktmoe "
                            f"builds only from weights; the {scheme.describe()} codes kept as published cannot be "
                            f"shared yet: pass --weights int4 / int8 / bf16 to convert them at load, or run one "
                            f"process")
    expert_keys = {k for _, _, plan in expert_plans for k in plan["keys"]}
    expert_params = {f"{name}.{p}" for name, _ in found for p in ("gate_up_proj", "down_proj")}

    # non-expert weights
    modules = dict(model.named_modules())
    missing, used = [], set(expert_keys)
    for name, current in state.items():
        if name in expert_params:
            continue
        t = _read_tensor(ckpt, scheme, name, tuple(current.shape), by_model_key, used, stats, dtype)
        if t is None:
            missing.append(name)
            continue
        parent, _, leaf = name.rpartition(".")
        owner = modules[parent]
        if isinstance(current, nn.Parameter):
            t = t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
            owner._parameters[leaf] = nn.Parameter(t, requires_grad=current.requires_grad)
        else:
            t = t.to(device=device, dtype=current.dtype)
            owner._buffers[leaf] = t
        stats.other_bytes += t.numel() * t.element_size()
    if getattr(config, "tie_word_embeddings", False) or getattr(config.get_text_config(), "tie_word_embeddings", False):
        model.tie_weights()
    missing = [n for n in missing if _lookup(model, n).device.type == "meta"]   # tied ones are filled now
    if missing:
        raise CheckpointError(f"{where}: the checkpoint lacks {len(missing)} tensor(s) the model needs, "
                            f"e.g. {', '.join(missing[:4])}")
    unused = sorted(k for k in ckpt.tensors if k not in used)
    stats.skipped = [k for k in unused if _expected_unused(model, k) or _expected_unused(model, _canonical(k, state))]
    skipped = set(stats.skipped)
    stats.ignored = [k for k in unused if k not in skipped]

    # experts, one layer at a time
    if shared:
        from ktmoe.torch.distributed import convert_shared, host_group

        def reader(plan):
            def read():
                gate_up, down, arena = expert_layers.read_weights(ckpt, plan)
                stats.largest_layer_bytes = max(stats.largest_layer_bytes, arena.nbytes)
                return gate_up, down
            return read
        opts = kernel_format.packing_options()
        convert_shared([(name, m, reader(plan)) for name, m, plan in expert_plans], host_group(), progress,
                       max_tokens=max_tokens, num_threads=num_threads, **opts)
        stats.packed_bytes = sum(m._ktmoe.layer.weight_bytes for _, m, _ in expert_plans)
    for i, (name, m, plan) in enumerate(expert_plans if not shared else []):
        layer_bytes = expert_layers.load(ckpt, name, m, plan, max_tokens=max_tokens, num_threads=num_threads,
                                         kernel_format=kernel_format)
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


def _read_tensor(ckpt, scheme, name: str, shape: tuple, keys: dict, used: set, stats, dtype):
    """Model tensor `name` from the checkpoint (dequantized into a new CPU tensor of `dtype` when
    stored quantized; the keys read are added to `used`), or None when the checkpoint lacks it."""
    where = ckpt.label
    ckey = keys.get(name)
    info = ckpt.tensors.get(ckey) if ckey is not None else None
    base = name[:-len("weight")] if name.endswith(".weight") else None
    stored = None   # {role: checkpoint key} of a quantized linear
    if scheme.method == "fp8" and info is not None and info.dtype == "F8_E4M3" and base is not None:
        stored = {"codes": ckey, "scale": keys.get(base + "weight_scale_inv")}
    elif scheme.method == "int4" and info is None and base is not None and keys.get(base + "weight_packed"):
        stored = {r: keys.get(base + s) for r, s in scheme.suffixes().items()}
    if stored is None:
        if info is None:
            return None
        if info.dtype == "F8_E4M3":
            raise CheckpointError(f"{where}: tensor {ckey!r} is float8_e4m3fn, which ktmoe reads only as the codes of an "
                                f"FP8 linear weight (quant_method 'fp8' with its weight_scale_inv)"
                                f"{'' if scheme.method == 'fp8' else '; config.json declares ' + _declared(scheme)}")
        if tuple(info.shape) != shape:
            raise CheckpointError(f"{where}: tensor {ckey!r} has shape {list(info.shape)}, "
                                f"the model built from config.json expects {list(shape)}")
        used.add(ckey)
        return ckpt.read(ckey)
    lacking = [r for r, k in stored.items() if k is None]
    if lacking:
        codes = stored["codes"]
        raise CheckpointError(f"{where}: {codes!r} has no {scheme.suffixes()[lacking[0]]!r} next to it (its "
                            f"{lacking[0]}; {scheme.describe()})")
    if scheme.method == "fp8" and tuple(info.shape) != shape:
        raise CheckpointError(f"{where}: tensor {ckey!r} has shape {list(info.shape)}, "
                            f"the model built from config.json expects {list(shape)}")
    used.update(stored.values())
    stats.dequantized += 1
    import torch
    out = torch.empty(shape, dtype=dtype if dtype.is_floating_point else torch.float32)
    try:
        return quant.dequantize(scheme, {r: ckpt.read(k) for r, k in stored.items()}, out,
                                quant.weight_name(stored["codes"]))
    except CheckpointError as e:
        raise CheckpointError(f"{where}: {e}") from None


def _declared(scheme) -> str:
    return scheme.describe() if scheme.quantized else "no quantization"


def _tf_version() -> str:
    import transformers
    return transformers.__version__


def _lookup(model, name: str):
    module_name, _, leaf = name.rpartition(".")
    return getattr(model.get_submodule(module_name), leaf)
