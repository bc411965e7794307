"""Plain-numpy oracle for ktmoe (SPEC.md section 6): routed MoE experts with LoRA.

    y, cache = reference.moe_forward(x, topk_ids, topk_weights, w_gate, w_up, w_down, lora=None)
    dx, dw, lora_grads = reference.moe_backward(dy, cache)

lora is a reference.LoRA(gate=(A, B), up=..., down=..., scale=s) (per projection) or
reference.LoRA.peft(gate_up=(A, B), down=(A, B), scale=s) (PEFT target_parameters);
lora_grads come back as {name: (dA, dB)} in the same layout. All results are float64.
Validated against torch autograd in tests/test_reference.py.
"""
from .lora import LoRA
from .moe import moe_backward, moe_forward, sigmoid

__all__ = ["LoRA", "moe_forward", "moe_backward", "sigmoid"]
