"""ktmoe.torch: run the routed experts of transformers v5 MoE models in the ktmoe CPU kernel.

    import ktmoe.torch                          # registers experts_implementation="ktmoe"
    model = AutoModelForCausalLM.from_pretrained(path, experts_implementation="ktmoe")
    ktmoe.torch.patch(model)                    # or patch any built model in place
    model = get_peft_model(model, LoraConfig(target_parameters=["mlp.experts.gate_up_proj",
                                                                "mlp.experts.down_proj"], ...))

Modules: function.py (autograd bridge), experts.py (the converted experts module),
peft.py (LoRA factors from PEFT's ParamWrapper), patch.py (registry and patch()),
distributed.py (torch.distributed ranks of a host: one shared packed copy, cores split).
"""
from .function import LoraFactors, experts_apply
from .patch import from_pretrained, patch, register

register()

__all__ = ["patch", "from_pretrained", "register", "experts_apply", "LoraFactors"]
