"""Plain-numpy oracle for ktmoe (SPEC.md section 6): routed MoE experts with LoRA.

    y, cache = reference.moe_forward(x, topk_ids, topk_weights, w_gate, w_up, w_down, lora=None)
    dx, dw, lora_grads = reference.moe_backward(dy, cache)

lora is a reference.LoRA(gate=(A, B), up=..., down=..., scale=s) (per projection) or
reference.LoRA.peft(gate_up=(A, B), down=(A, B), scale=s) (PEFT target_parameters);
lora_grads come back as {name: (dA, dB)} in the same layout. All results are float64.
Validated against torch autograd in tests/test_reference.py.

Quantized weights (SPEC.md section 5, reference/quant.py):

    Qg = reference.quantize(w_gate, "int8")            # or "int4", group_size=32/64/128
    y, cache = reference.moe_forward(x, ids, w, Qg, Qu, Qd, lora)                      # weight-only
    y, cache = reference.moe_forward(x, ids, w, Qg, Qu, Qd, lora, activations="int8")  # W8A8

Checked in tests/test_reference_quant.py.
"""
from .lora import LoRA
from .moe import moe_backward, moe_forward, sigmoid
from .quant import QuantizedWeight, qlinear, qlinear_t, quantize, quantize_rows

__all__ = ["LoRA", "moe_forward", "moe_backward", "sigmoid",
           "QuantizedWeight", "quantize", "quantize_rows", "qlinear", "qlinear_t"]
