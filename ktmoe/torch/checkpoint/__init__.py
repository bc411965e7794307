"""Reading a local Hugging Face checkpoint into a model whose experts run in ktmoe.

A library capability of ktmoe.torch, used by `ktmoe.torch.from_pretrained` (quantized
checkpoints) and by `ktmoe finetune` / `ktmoe merge`; it imports nothing of ktmoe.finetune.

- reader.py: the checkpoint directory and its safetensors headers, read without loading.
- quantized.py: the quantization scheme config.json declares (FP8 block-scaled, INT4
  pack-quantized), its tensors, and dequantizing one of them.
- expert_layers.py: one layer's routed experts, from checkpoint tensors into packed memory.
- loading.py: the model built without weights, then streamed in layer by layer.

Every problem with the user's checkpoint or arguments raises CheckpointError, a ValueError
whose message is printed as it is (the command line shows it as one error line).
"""


class CheckpointError(ValueError):
    """A problem with a checkpoint directory or the arguments that load it."""
