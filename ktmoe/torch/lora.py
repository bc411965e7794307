"""One kernel LoRA from the PEFT factors on an experts module: the active adapters' lora_A /
lora_B weights (peft.py) and the factors PEFT merged into the module (experts.py), as one
ktmoe.LoRA in the PEFT target_parameters layout (design.md 4).

Used by both peft.py and experts.py (which therefore do not import each other both ways:
peft.py -> experts.py -> lora.py).
"""
from __future__ import annotations

import torch

import ktmoe
from ktmoe import lora_layout


def combine(sources: dict, E: int) -> ktmoe.LoRA | None:
    """One kernel LoRA from {param name: [(A, B, scale, trainable), ...]}.

    A single source per projection is passed as is. Frozen sources (merged adapters) are
    concatenated along the rank with their scale folded into B; a trainable source cannot
    be concatenated (its gradient would land in a copy) and sets the kernel's scale.
    """
    trainable = {s for srcs in sources.values() for (_, _, s, t) in srcs if t}
    if len(trainable) > 1:
        raise NotImplementedError(f"ktmoe experts: trainable LoRA factors with different scales {sorted(trainable)} "
                                  f"on one experts module (the kernel takes one scale per layer)")
    singles = {s for srcs in sources.values() if len(srcs) == 1 for (_, _, s, _) in srcs}
    scale = trainable.pop() if trainable else (singles.pop() if len(singles) == 1 else 1.0)
    pairs = {}
    for name, srcs in sources.items():
        if not srcs:
            pairs[name] = None
        elif len(srcs) == 1 and srcs[0][2] == scale:
            pairs[name] = (srcs[0][0], srcs[0][1])
        elif any(t for (_, _, _, t) in srcs):
            raise NotImplementedError(f"ktmoe experts: a trainable LoRA on {name} together with another adapter "
                                      f"(merged or active) is not supported")
        else:
            pairs[name] = _concat([(a.detach(), b.detach() * (s / scale)) for a, b, s, _ in srcs], E)
    if all(p is None for p in pairs.values()):
        return None
    return ktmoe.LoRA.peft(gate_up=pairs["gate_up_proj"], down=pairs["down_proj"], scale=scale)


def _concat(pairs, E: int):
    """Stacks PEFT-layout factors (ktmoe/lora_layout.py) along the rank, expert by expert."""
    A = torch.cat([lora_layout.per_expert_A(a.float(), E) for a, _ in pairs], dim=1)   # [E, r1 + r2 ..., in]
    B = torch.cat([lora_layout.per_expert_B(b.float(), E) for _, b in pairs], dim=2)   # [E, out, r1 + r2 ...]
    return lora_layout.from_per_expert_A(A).contiguous(), lora_layout.from_per_expert_B(B).contiguous()
