"""PEFT's `target_parameters` LoRA layout on transformers v5 fused experts (design.md 4),
described once: every other place (ktmoe.lora's kernel strides, ktmoe.torch, the numpy
reference, the test harness) reads it from here.

One fused-experts parameter (`gate_up_proj` [E, 2I, H] or `down_proj` [E, H, I]) gets
    lora_A.weight [E*r, in]    expert-major rows:    A_e[j, i] = A[e*r + j, i]
    lora_B.weight [out, E*r]   expert-minor columns: B_e[o, j] = B[o, j*E + e]
and expert e's weight delta is s * B_e @ A_e. For gate_up, one A_e serves gate and up; rows
[:I] of B_e are the gate's, rows [I:] the up's.

The functions work on numpy arrays and torch tensors alike (reshape / swapaxes views; no copy
for contiguous inputs except from_per_expert_B's reshape).
"""


def per_expert_A(A, num_experts: int):
    """lora_A [E*r, in] -> [E, r, in], A_e = result[e]."""
    return A.reshape(num_experts, -1, A.shape[-1])


def per_expert_B(B, num_experts: int):
    """lora_B [out, E*r] -> [E, out, r], B_e = result[e] (B_e[o, j] = B[o, j*E + e])."""
    return B.reshape(B.shape[0], -1, num_experts).swapaxes(0, 2).swapaxes(1, 2)


def from_per_expert_A(A_e):
    """Inverse of per_expert_A: [E, r, in] -> [E*r, in]."""
    return A_e.reshape(-1, A_e.shape[-1])


def from_per_expert_B(B_e):
    """Inverse of per_expert_B: [E, out, r] -> [out, E*r]."""
    return B_e.swapaxes(1, 2).swapaxes(0, 2).reshape(B_e.shape[1], -1)


def strides(num_experts: int, rank: int, n_in: int) -> tuple:
    """(A strides, B strides), in elements, of per_expert_A / per_expert_B views of contiguous
    lora_A [E*r, n_in] / lora_B [out, E*r]: what the kernel reads the factors through."""
    return (rank * n_in, n_in, 1), (1, num_experts * rank, num_experts)


def expert_parts(num_experts: int, rank: int, e: int) -> tuple:
    """(index into lora_A, index into lora_B) selecting expert e's factors in place: rows
    e*r .. e*r + r - 1 of A, columns e, e + E, ... of B."""
    return (slice(e * rank, (e + 1) * rank),), (slice(None), slice(e, None, num_experts))
