"""ktmoe/lora_layout.py, the one description of PEFT's target_parameters LoRA layout on fused
experts (design.md 4), against PEFT itself: ParamWrapper.get_delta_weight of a tiny Qwen3-MoE
experts module equals s * B_e @ A_e from lora_layout's per-expert factors; the kernel's strides,
the in-place expert parts and the inverses agree with the views, for numpy and torch."""
import numpy as np
import pytest
import torch

from ktmoe import lora_layout

E, R, OUT, IN = 5, 3, 7, 4


def test_views_strides_parts_and_inverses_agree():
    A = np.arange(E * R * IN, dtype=np.float64).reshape(E * R, IN)
    B = np.arange(OUT * E * R, dtype=np.float64).reshape(OUT, E * R) + 1000
    A_e, B_e = lora_layout.per_expert_A(A, E), lora_layout.per_expert_B(B, E)
    assert A_e.shape == (E, R, IN) and B_e.shape == (E, OUT, R)
    sa, sb = lora_layout.strides(E, R, IN)
    assert tuple(s // 8 for s in A_e.strides) == sa and tuple(s // 8 for s in B_e.strides) == sb
    for e in range(E):
        ia, ib = lora_layout.expert_parts(E, R, e)
        assert np.array_equal(A[ia], A_e[e]) and np.array_equal(B[ib], B_e[e])
        for j in range(R):
            assert np.array_equal(B_e[e][:, j], B[:, j * E + e])   # column j*E + e is rank j of expert e
            assert np.array_equal(A_e[e][j], A[e * R + j])          # row e*r + j
    assert np.array_equal(lora_layout.from_per_expert_A(A_e), A)
    assert np.array_equal(lora_layout.from_per_expert_B(B_e), B)
    tA, tB = torch.from_numpy(A), torch.from_numpy(B)   # the same functions on torch tensors
    assert torch.equal(lora_layout.per_expert_B(tB, E), torch.from_numpy(np.ascontiguousarray(B_e)))
    assert torch.equal(lora_layout.from_per_expert_B(lora_layout.per_expert_B(tB, E)), tB)
    assert torch.equal(lora_layout.per_expert_A(tA, E), torch.from_numpy(A_e))


@pytest.mark.parametrize("param", ["gate_up_proj", "down_proj"])
def test_matches_peft_delta_weight(param):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    cfg = transformers.Qwen3MoeConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                      num_key_value_heads=1, head_dim=8, intermediate_size=32,
                                      moe_intermediate_size=8, num_experts=E, num_experts_per_tok=2)
    torch.manual_seed(0)
    model = transformers.Qwen3MoeForCausalLM(cfg)
    model = peft.get_peft_model(model, peft.LoraConfig(r=R, lora_alpha=6, target_modules=[],
                                                       target_parameters=[f"mlp.experts.{param}"],
                                                       init_lora_weights=False))
    wrapper = next(m for m in model.modules() if type(m).__name__ == "ParamWrapper")
    A, B = wrapper.lora_A["default"].weight, wrapper.lora_B["default"].weight
    s = wrapper.scaling["default"]
    with torch.no_grad():
        delta = wrapper.get_delta_weight("default")          # PEFT's own [E, out, in]
        A_e, B_e = lora_layout.per_expert_A(A, E), lora_layout.per_expert_B(B, E)
        ours = s * torch.stack([B_e[e] @ A_e[e] for e in range(E)])
    assert delta.shape == ours.shape
    torch.testing.assert_close(ours, delta, rtol=1e-6, atol=1e-7)   # the same layout, fp32 rounding only
