"""Refusals where transformers would otherwise go wrong silently or half way (installed by
patch.register(), idempotent; each falls through to transformers for everything else):

- `experts_implementation="ktmoe"` on a model class without transformers experts modules
  (no `@use_experts_implementation`, e.g. Llama-4, or a dense model): transformers accepts
  the name (it is registered) but nothing consults it, so the experts would run on plain torch
  with no word. PreTrainedModel.get_correct_experts_implementation, which transformers calls
  when a model is built (before any weight is read) and in set_experts_implementation, raises
  ValueError instead, as transformers does for an explicit "grouped_mm" on such a class.
- `save_pretrained` of a model whose experts run in ktmoe (patched, or a PEFT model's
  `merge_and_unload()`): the expert weights live only in the kernel's packed memory, so
  transformers would write config.json and then fail on the experts' meta tensors, leaving a
  folder that looks like a checkpoint. PreTrainedModel.save_pretrained raises ValueError before
  anything is written, naming `ktmoe merge` (which writes the merged bf16 checkpoint from the
  base checkpoint and the adapter, one shard at a time). Saving only an adapter (a PEFT model,
  transformers' own adapter integration) or an explicit state_dict holding real tensors
  passes through.
"""
from __future__ import annotations

import os

from .experts import IMPLEMENTATION, is_converted

_ORIGINAL: dict = {}

SAVE_MESSAGE = (
    "save_pretrained: the routed experts of {cls} run in ktmoe and their weights live only in the kernel's packed "
    "CPU memory (state_dict() gives them as meta tensors), so no checkpoint can be written from this model; nothing "
    "was written to {where}. Save the LoRA adapter instead (the PEFT model's save_pretrained, before "
    "merge_and_unload()), then write a merged bf16 checkpoint with `ktmoe merge --model BASE_DIR --adapter "
    "ADAPTER_DIR --out DIR`, or rebuild with ktmoe.torch.from_pretrained(BASE_DIR) + "
    "PeftModel.from_pretrained(model, ADAPTER_DIR)")


def _get_correct_experts_implementation(self, requested_experts):
    if requested_experts == IMPLEMENTATION and not type(self)._can_set_experts_implementation():
        raise ValueError(f'experts_implementation="{IMPLEMENTATION}": {type(self).__name__} has no transformers '
                         f"experts module (@use_experts_implementation) for ktmoe to run, so its experts (if any) "
                         f"would run on plain torch; ktmoe runs the MoE models whose experts transformers routes "
                         f"through its experts interface (ktmoe.torch.patch refuses this model too)")
    return _ORIGINAL["get_correct_experts_implementation"](self, requested_experts)


def _save_pretrained(self, save_directory, *args, **kwargs):
    if any(is_converted(m) for m in self.modules()) and not getattr(self, "_hf_peft_config_loaded", False):
        state_dict = kwargs.get("state_dict", args[1] if len(args) > 1 else None)   # (is_main_process, state_dict)
        if state_dict is None or any(getattr(t, "device", None) is not None and t.device.type == "meta"
                                     for t in state_dict.values()):
            raise ValueError(SAVE_MESSAGE.format(cls=type(self).__name__, where=os.fspath(save_directory)))
    return _ORIGINAL["save_pretrained"](self, save_directory, *args, **kwargs)


def install() -> None:
    """Puts the two refusals into transformers' PreTrainedModel (idempotent)."""
    if _ORIGINAL:
        return
    from transformers import PreTrainedModel
    for name, fn in (("get_correct_experts_implementation", _get_correct_experts_implementation),
                     ("save_pretrained", _save_pretrained)):
        _ORIGINAL[name] = getattr(PreTrainedModel, name)
        setattr(PreTrainedModel, name, fn)
