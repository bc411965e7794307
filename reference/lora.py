"""LoRA layouts of the reference (design.md 4), readable as the specification.

A `LoRA` holds the caller's arrays as given, in one of two layouts, and translates between
that layout and the per-expert factors the math of moe.py uses:

    per projection (PEFT target_modules, kt-kernel):  A [E, r, in], B [E, out, r]
        LoRA(gate=(A, B), up=(A, B), down=(A, B), scale=s)
    PEFT target_parameters on v5 fused experts (ParamWrapper):
        LoRA.peft(gate_up=(lora_A.weight [E*r, H], lora_B.weight [2I, E*r]),
                  down=(lora_A.weight [E*r, I], lora_B.weight [H, E*r]), scale=s)
        A_e[j, i] = A[e*r + j, i]                           expert-major rows
        B_e[o, j] = B[o, j*E + e]                           expert-minor columns
        (ktmoe/lora_layout.py: per_expert_A, per_expert_B, the one description of it)
        gate_up: ONE A_e shared by gate and up; rows [:I] of B_e are gate, rows [I:] are up.

In both layouts the weight delta of expert e is s * B_e @ A_e (never materialised here
either: moe.py applies the factors to activations). Any projection may be left out.
Gradients come back in the layout (and shapes) of the parameters, as float64.
"""
import numpy as np

from .. import lora_layout   # the PEFT layout, described once (ktmoe/lora_layout.py)


def _f64(a):
    return np.asarray(a, dtype=np.float64)


def peft_A(A, num_experts):
    """PEFT lora_A.weight [E*r, in] -> per-expert A [E, r, in]."""
    return lora_layout.per_expert_A(_f64(A), num_experts)


def peft_B(B, num_experts):
    """PEFT lora_B.weight [out, E*r] -> per-expert B [E, out, r] (B_e[o, j] = B[o, j*E + e])."""
    return lora_layout.per_expert_B(_f64(B), num_experts)


def peft_B_grad(dB, num_experts):
    """Inverse of peft_B: per-expert [E, out, r] -> [out, E*r]."""
    return lora_layout.from_per_expert_B(dB)


class LoRA:
    """LoRA parameters of the three expert projections, in one of the two layouts."""

    def __init__(self, gate=None, up=None, down=None, scale=1.0):
        self.layout = "per_projection"
        self.params = {name: ab for name, ab in (("gate", gate), ("up", up), ("down", down))
                       if ab is not None}
        self.scale = float(scale)

    @classmethod
    def peft(cls, gate_up=None, down=None, scale=1.0):
        lora = cls(scale=scale)
        lora.layout = "peft"
        lora.params = {name: ab for name, ab in (("gate_up", gate_up), ("down", down))
                       if ab is not None}
        return lora

    def factors(self, num_experts):
        """{"gate"|"up"|"down": (A [E, r, in], B [E, out, r])} in float64, projections with LoRA only."""
        if self.layout == "per_projection":
            return {name: (_f64(A), _f64(B)) for name, (A, B) in self.params.items()}
        factors = {}
        for name, (A, B) in self.params.items():
            A_e, B_e = peft_A(A, num_experts), peft_B(B, num_experts)
            if name == "gate_up":
                I = B_e.shape[1] // 2
                factors["gate"] = (A_e, B_e[:, :I])   # the same A for gate and up
                factors["up"] = (A_e, B_e[:, I:])
            else:
                factors["down"] = (A_e, B_e)
        return factors

    def grads_in_layout(self, grads, num_experts):
        """Per-expert gradients {proj: (dA [E, r, in], dB [E, out, r])} -> this LoRA's layout.

        Returns {name: (dA, dB)} with the keys of self.params and the shapes of its arrays.
        """
        if self.layout == "per_projection":
            return dict(grads)
        out = {}
        if "gate_up" in self.params:
            dAg, dBg = grads["gate"]
            dAu, dBu = grads["up"]
            dA = dAg + dAu                                   # the shared A collects both
            dB = np.concatenate([dBg, dBu], axis=1)          # [E, 2I, r], gate rows first
            out["gate_up"] = (lora_layout.from_per_expert_A(dA), peft_B_grad(dB, num_experts))
        if "down" in self.params:
            dA, dB = grads["down"]
            out["down"] = (lora_layout.from_per_expert_A(dA), peft_B_grad(dB, num_experts))
        return out
