"""ktmoe: LoRA fine-tuning and inference of MoE routed experts on the CPU (AMX / AVX-512).

    import ktmoe
    layer = ktmoe.MoEExperts(gate_up=w_gate_up, down=w_down)      # [E, 2I, H], [E, H, I]
    y = layer.forward(x, topk_ids, topk_weights, lora=ktmoe.LoRA(...), keep_for_backward=True)
    dx, dw = layer.backward(dy, lora_grads=ktmoe.LoRAGrads(...))
"""
from ._cpu import available_isas, cpu_info
from .experts import MoEExperts
from .lora import LoRA, LoRAGrads

__version__ = "0.1.0"
__all__ = ["MoEExperts", "LoRA", "LoRAGrads", "available_isas", "cpu_info", "__version__"]
