"""torch CPU tensors in place of numpy arrays (bf16 and fp32): same results as numpy input.

LoRA parameters are nn.Parameters (requires_grad, as PEFT hands them over); the gradient
buffers are torch tensors that must be updated IN PLACE, and in-place optimizer steps on the
parameters must be seen by the next forward.
"""
import numpy as np
import pytest
import torch

import ktmoe
from ktmoe.testing import BF16, assert_matches_reference, check, make_lora, make_routing, make_weights, to64
from ktmoe import reference


def tt(a):
    """torch tensor with the values and dtype of a numpy array (ml_dtypes bf16 -> torch.bfloat16)."""
    if a.dtype == BF16:
        return torch.from_numpy(a.astype(np.float32)).to(torch.bfloat16)
    return torch.from_numpy(a.copy())


def torch_lora(lora, requires_grad):
    out = reference.LoRA(scale=lora.scale)
    out.layout = lora.layout
    out.params = {n: tuple(torch.nn.Parameter(tt(p), requires_grad=requires_grad) for p in ab)
                  for n, ab in lora.params.items()}
    return out


DTYPES = [  # (base weights and x and dy, LoRA params, topk_weights)
    (BF16, np.float32, np.float32),
    (BF16, BF16, BF16),
    (np.float32, np.float32, np.float32),
]


@pytest.mark.parametrize("layout", ["per_projection", "peft"])
@pytest.mark.parametrize("dtypes", DTYPES, ids=lambda d: "-".join(np.dtype(t).name for t in d))
def test_torch_matches_numpy(dtypes, layout, isa):
    wdt, ldt, rwdt = dtypes
    rng = np.random.default_rng(0)
    E, H, I, T, k, r = 6, 72, 40, 17, 2, 5
    weights = make_weights(rng, E, H, I, dtype=wdt, fused=layout == "peft")
    ids, w = make_routing(rng, T, k, E, minus_one=0.1, id_dtype=np.int64, w_dtype=rwdt)
    x = rng.standard_normal((T, H)).astype(wdt)
    dy = rng.standard_normal((T, H)).astype(wdt)
    ranks = {"gate_up": r, "down": r} if layout == "peft" else {"gate": r, "up": r, "down": r}
    lora = make_lora(rng, layout, E, H, I, ranks, dtype=ldt)

    numpy_run = assert_matches_reference(weights, x, ids, w, lora, isa=isa, dy=dy)
    t_weights = {n: tt(a) for n, a in weights.items()}
    torch_run = assert_matches_reference(t_weights, tt(x), tt(ids), tt(w), torch_lora(lora, False),
                                         isa=isa, dy=tt(dy))
    for name in ("y", "dx", "dw"):
        check(f"{name} torch vs numpy", getattr(torch_run, name), getattr(numpy_run, name), isa)


@pytest.mark.parametrize("layout", ["per_projection", "peft"])
def test_torch_parameters_and_optimizer_step(layout, isa):
    """nn.Parameter LoRA factors (requires_grad); an in-place torch optimizer step is seen."""
    rng = np.random.default_rng(1)
    E, H, I, T, k, r = 4, 40, 24, 11, 2, 3
    weights = {n: tt(a) for n, a in make_weights(rng, E, H, I).items()}
    ids, w = make_routing(rng, T, k, E, id_dtype=np.int64)
    x = tt(rng.standard_normal((T, H)).astype(BF16))
    ranks = {"gate_up": r, "down": r} if layout == "peft" else {"gate": r, "up": r, "down": r}
    lora = torch_lora(make_lora(rng, layout, E, H, I, ranks, zero_B=True), requires_grad=True)
    layer = ktmoe.MoEExperts(**weights, isa=isa)
    first = assert_matches_reference(weights, x, tt(ids), tt(w), lora, layer=layer, seed=2)
    opt = torch.optim.SGD([p for ab in lora.params.values() for p in ab], lr=0.5)
    for (A, B), (gA, gB) in zip(lora.params.values(), first.grads.values()):
        A.grad, B.grad = gA.clone(), gB.clone()     # the kernel's gradients, as .grad
    opt.step()
    second = assert_matches_reference(weights, x, tt(ids), tt(w), lora, layer=layer, seed=2)
    assert not np.array_equal(to64(first.y), to64(second.y))
