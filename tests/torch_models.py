"""Tiny random-weight transformers v5 MoE models for the ktmoe.torch tests (no downloads).

`make_pair(arch)` builds the eager reference and a ktmoe-patched copy of the same fp32 model:
the expert weights are rounded through bf16 first (ktmoe packs them as bf16), so both models
hold identical weights. `peft_pair(...)` wraps both with the same LoRA (same initial values,
B non-zero so every LoRA gradient is non-trivial) and makes the routers trainable.

Like with like (design.md 6: the kernel is held to fp32 math on the same bf16 inputs): the
reference's experts see the inputs the kernel works on, the hidden states rounded to bf16 on
the way in and the incoming gradient rounded to bf16 on the way back (`bf16_expert_inputs`);
everything else in the reference stays fp32. Without this, the reference's own fp32 inputs
differ from the kernel's by a bf16 rounding, and the router gradient (a difference of two
experts' dw through the top-k normalisation) magnified that to 1.03e-2 on DeepSeek-V3's
first step at 16 tokens. `batch()` has 64 tokens by default, so that a gradient's relative
error is an average over many tokens' rounding, not one token's. `routing(model)` records
the experts each layer chose, so the comparisons can check both models routed alike.
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


class _RoundBF16(torch.autograd.Function):
    """bf16-rounds the values going forward (forward=True) or the gradient coming back."""

    @staticmethod
    def forward(ctx, t, forward):
        ctx.forward = forward
        return t.to(torch.bfloat16).to(t.dtype) if forward else t.view_as(t)

    @staticmethod
    def backward(ctx, grad):
        return (grad if ctx.forward else grad.to(torch.bfloat16).to(grad.dtype)), None


def _round_input(module, args, kwargs):
    return (_RoundBF16.apply(args[0], True),) + tuple(args[1:]), kwargs


def _round_output_grad(module, args, output):
    return _RoundBF16.apply(output, False)


def bf16_expert_inputs(model):
    """The eager experts of `model` get bf16-rounded hidden states and output gradients (the
    kernel's inputs; their math stays fp32). Returns the model."""
    for name, m in model.named_modules():
        if name.endswith("mlp.experts"):
            m.register_forward_pre_hook(_round_input, with_kwargs=True)
            m.register_forward_hook(_round_output_grad)
    return model


def make_pair(arch, seed=0):
    ref = make_model(arch, seed)
    kt = ktmoe.torch.patch(copy.deepcopy(ref))
    return bf16_expert_inputs(ref), kt


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


def routing(model):
    """A list that each forward of `model` extends with one (layer name, topk ids) per experts
    layer, in call order."""
    seen = []
    for name, m in model.named_modules():
        if name.endswith("mlp.experts"):
            m.register_forward_pre_hook(lambda mod, args, name=name: seen.append((name, args[1].clone())))
    return seen


def same_routing(a, b):
    """Asserts two routing() records chose the same experts; returns the number of layers."""
    assert len(a) == len(b), f"{len(a)} experts calls against {len(b)}"
    for (na, ia), (nb, ib) in zip(a, b):
        flips = int((ia != ib).any(dim=-1).sum())
        assert flips == 0, (f"{na}: {flips} of {ia.shape[0]} tokens routed differently (a near-tie in "
                            "the router scores: the gradients would not be comparable)")
    return len(a)


def adamw_trajectory(model, steps=3, lr=1e-2):
    """The losses of `steps` AdamW steps of `model`'s trainable parameters on batches 0, 1, ..."""
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    traj = []
    for step in range(steps):
        loss = model(**batch(seed=step)).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        traj.append(loss.item())
    return traj


def batch(seed=0, batch_size=4, seq=16):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, COMMON["vocab_size"], (batch_size, seq), generator=g)
    return dict(input_ids=ids, labels=ids.clone())


def experts_modules(model):
    return [m for m in model.modules() if ktmoe.torch.experts.is_converted(m)]
