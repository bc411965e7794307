"""ktmoe.torch: run the routed experts of transformers v5 MoE models in the ktmoe CPU kernel.

    import ktmoe.torch                          # registers experts_implementation="ktmoe"
    model = AutoModelForCausalLM.from_pretrained(path, experts_implementation="ktmoe")
    ktmoe.torch.patch(model)                    # or patch any built model in place
    model = get_peft_model(model, LoraConfig(target_parameters=["mlp.experts.gate_up_proj",
                                                                "mlp.experts.down_proj"], ...))

Modules: function.py (autograd bridge, the torch.library custom ops), experts.py (the
converted experts module), lora.py (PEFT factors -> one kernel ktmoe.LoRA), peft.py (LoRA
factors from PEFT's ParamWrapper), patch.py (registry and patch()), distributed.py
(torch.distributed ranks of a host: one shared packed copy, cores split), device.py (resident
experts: some experts computed in torch on a GPU beside the kernel), placement.py (which experts
go there: counts, budget, cost model; pure Python), resident.py (placing them at patch time,
count_routing), guards.py (refusals
at the transformers boundary: "ktmoe" on a model without experts modules, save_pretrained of a
patched model). Imports run one way: patch -> peft / guards -> experts -> lora / function.

Internals of other libraries this package relies on (no supported extension point exists
for them; tested with torch 2.13, transformers 5.24, peft 0.21.2):
- peft.py replaces ParamWrapper.forward / merge / unmerge, BaseTuner.inject_adapter /
  _inject_parameters and PeftModel.get_nb_trainable_parameters process-wide (each falls through
  to PEFT's own for anything that is not a ktmoe experts module), and matches rank_pattern /
  alpha_pattern with peft.utils.other.get_pattern_key, as PEFT does. PEFT's custom-module registration
  (LoraConfig._register_custom_module) is per config and experimental, so it would not reach
  the LoraConfig a user builds; target_parameters always dispatch to ParamWrapper.
- experts.py swaps a converted module's __class__ for a subclass (KtMoE<Class>) overriding
  forward, _apply (.to() / .cuda() keep the experts on the CPU), state-dict save / load,
  deepcopy and pickling: nn.Module has no hooks for _apply, deepcopy or pickling.
- guards.py replaces PreTrainedModel.get_correct_experts_implementation and save_pretrained
  process-wide (each falls through to transformers' own unless it must refuse), and reads
  PreTrainedModel._can_set_experts_implementation (transformers' own test of whether a model
  class routes its experts through the experts interface).
- function.py reads torch._C._autograd._top_saved_tensors_default_hooks to learn whether
  saved-tensor hooks (activation checkpointing) are active; torch has no public query.
Supported points used: transformers' ExpertsInterface registry, torch.library.custom_op with
register_fake / register_autograd.
"""
from .function import experts_apply
from .patch import from_pretrained, patch, register
from .resident import count_routing

register()

__all__ = ["patch", "from_pretrained", "register", "experts_apply", "count_routing"]
