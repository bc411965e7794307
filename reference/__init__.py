"""Plain-numpy oracle for ktmoe (design.md 6): routed MoE experts with LoRA.

    y, cache = reference.moe_forward(x, topk_ids, topk_weights, w_gate, w_up, w_down, lora=None)
    dx, dw, lora_grads = reference.moe_backward(dy, cache)

lora is a reference.LoRA(gate=(A, B), up=..., down=..., scale=s) (per projection) or
reference.LoRA.peft(gate_up=(A, B), down=(A, B), scale=s) (PEFT target_parameters);
lora_grads come back as {name: (dA, dB)} in the same layout. All results are float64.
Validated against torch autograd in tests/test_reference.py.

Quantized weights (design.md 5, reference/quant.py):

    Qg = reference.quantize(w_gate, "int8")            # or "int4", group_size=32/64/128
    y, cache = reference.moe_forward(x, ids, w, Qg, Qu, Qd, lora)                      # weight-only
    y, cache = reference.moe_forward(x, ids, w, Qg, Qu, Qd, lora, activations="int8")  # W8A8

Pre-quantized weights as published (reference/quant.py): reference.int4_weight(q, scale)
for INT4 codes in [-8, 7] (pack_int4 / pack_quantized give ktmoe's and compressed-tensors'
packings), reference.fp8_weight(codes, block_scales, block) and reference.quantize_fp8(w) for
FP8 e4m3 codes with block scales (decode_fp8 decodes exactly); weight-only.

Checked in tests/test_reference_quant.py.
"""
from .lora import LoRA
from .moe import moe_backward, moe_forward, sigmoid
from .quant import (FP8Weight, QuantizedWeight, decode_fp8, fp8_weight, int4_weight, pack_int4, pack_quantized,
                    qlinear, qlinear_t, quantize, quantize_fp8, quantize_int4_full_range, quantize_rows, unpack_int4, unpack_pack_quantized)

__all__ = ["LoRA", "moe_forward", "moe_backward", "sigmoid",
           "QuantizedWeight", "quantize", "quantize_rows", "qlinear", "qlinear_t",
           "FP8Weight", "decode_fp8", "fp8_weight", "quantize_fp8", "int4_weight", "pack_int4", "unpack_int4",
           "pack_quantized", "unpack_pack_quantized", "quantize_int4_full_range"]
