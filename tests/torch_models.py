"""Tiny random-weight transformers v5 MoE models for the ktmoe.torch tests (no downloads).

`make_pair(arch)` builds the eager reference and a ktmoe-patched copy of the same fp32 model:
the expert weights are rounded through bf16 first (ktmoe packs them as bf16), so both models
hold identical weights. `peft_pair(...)` wraps both with the same LoRA (same initial values,
B non-zero so every LoRA gradient is non-trivial) and makes the routers trainable.
"""
import copy

import torch
import transformers
from peft import LoraConfig, get_peft_model

import ktmoe.torch

COMMON = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=64, initializer_range=0.1, tie_word_embeddings=False)

ARCHS = {
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  dict(num_key_value_heads=2, head_dim=8, intermediate_size=64, moe_intermediate_size=16,
                       num_experts=8, num_experts_per_tok=2, norm_topk_prob=True)),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                  dict(num_key_value_heads=2, intermediate_size=64, moe_intermediate_size=16,
                       shared_expert_intermediate_size=32, num_experts=8, num_experts_per_tok=2,
                       norm_topk_prob=False)),
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM",
                    dict(num_key_value_heads=4, intermediate_size=64, moe_intermediate_size=16,
                         n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=1,
                         routed_scaling_factor=2.5, first_k_dense_replace=1, q_lora_rank=16, kv_lora_rank=16,
                         qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, norm_topk_prob=True)),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM",
                dict(num_key_value_heads=2, head_dim=8, intermediate_size=16, num_local_experts=8,
                     num_experts_per_tok=2)),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM",
              dict(num_key_value_heads=4, intermediate_size=16, num_experts=8, num_experts_per_tok=2)),
}
ATTENTION = {"deepseek_v3": ["q_b_proj", "kv_b_proj", "o_proj"]}
EXPERT_PARAMS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def make_config(arch, **overrides):
    cfg_cls, _, extra = ARCHS[arch]
    cfg = getattr(transformers, cfg_cls)(**{**COMMON, **extra, **overrides})
    cfg._experts_implementation = "eager"
    return cfg


def make_model(arch, seed=0, **overrides):
    """The eager model, expert weights rounded through bf16."""
    torch.manual_seed(seed)
    model = getattr(transformers, ARCHS[arch][1])(make_config(arch, **overrides))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
                p.copy_(p.to(torch.bfloat16).to(p.dtype))
    return model.eval()


def make_pair(arch, seed=0):
    ref = make_model(arch, seed)
    kt = ktmoe.torch.patch(copy.deepcopy(ref))
    return ref, kt


def lora_config(arch, **kw):
    args = dict(r=4, lora_alpha=8, target_modules=ATTENTION.get(arch, ["q_proj", "v_proj", "o_proj"]),
                target_parameters=EXPERT_PARAMS, init_lora_weights=False)
    args.update(kw)
    return LoraConfig(**args)


def peft_pair(arch, seed=0, **lora_kw):
    """(eager HF + PEFT, ktmoe + PEFT) with the same weights, LoRA values and trainable routers."""
    ref, kt = make_pair(arch, seed)
    return wrap_pair(ref, kt, arch, seed, **lora_kw)


def copy_lora(src_model, dst_model):
    """Copies every LoRA factor of src_model into the same-named one of dst_model."""
    with torch.no_grad():
        src = dict(src_model.named_parameters())
        for name, p in dst_model.named_parameters():
            if "lora_" in name:
                p.copy_(src[name])


def wrap_pair(ref, kt, arch, seed=0, **lora_kw):
    """Both models wrapped with the same PEFT LoRA (same initial values) and trainable routers."""
    torch.manual_seed(seed + 1)
    ref = get_peft_model(ref, lora_config(arch, **lora_kw))
    kt = get_peft_model(kt, lora_config(arch, **lora_kw))
    copy_lora(ref, kt)
    for model in (ref, kt):
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.requires_grad_(True)
    return ref, kt


def batch(seed=0, batch_size=2, seq=8):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, COMMON["vocab_size"], (batch_size, seq), generator=g)
    return dict(input_ids=ids, labels=ids.clone())


def experts_modules(model):
    return [m for m in model.modules() if ktmoe.torch.experts.is_converted(m)]
