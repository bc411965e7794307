"""Resident experts (issue 24, design.md 13): some experts computed in torch on a "device"
(here the CPU, as CI has no GPU) while the kernel runs the others, on the tiny models.

The split model, the all-kernel model and eager HF + PEFT hold the same weights and LoRA
values; logits, loss and every gradient of the split agree with both within design.md 6
(rel <= 1e-2, cos >= 0.9999, the harness's compare / TOLERANCE). Each comparison also checks
that both sides ran: the device experts got tokens and so did the kernel (unless every expert
is resident). Also: gradient accumulation, an optimizer step reaching the device experts'
LoRA slices and the kernel's, checkpointing, the adapter saved as before, a quantized kernel
(its device copies are its own stored values), the per-call cost model, and bad options
refused before any module is converted.
"""
import copy

import pytest
import torch
from peft import PeftModel

import ktmoe.torch
import torch_models as tm
from ktmoe.testing import TOLERANCE, compare
from ktmoe.torch import resident

RTOL, MIN_COS = TOLERANCE["rel"], TOLERANCE["cos"]   # design.md 6: 1e-2, 0.9999
CPU = dict(gpu_device="cpu")


def assert_close(name, got, want):
    rel, cos = compare(got, want)
    assert rel <= RTOL, f"{name}: relative error {rel:.3e} > {RTOL} (design.md 6)"
    assert cos >= MIN_COS, f"{name}: cosine {cos:.6f} < {MIN_COS} (design.md 6)"


def grads(model):
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def compare_grads(got_model, want_model, what):
    got, want = grads(got_model), grads(want_model)
    assert got.keys() == want.keys()
    assert any("experts" in n and "lora_" in n for n in got)
    for name in want:
        assert got[name] is not None, f"{name}: no gradient ({what})"
        assert_close(f"{what}: grad {name}", got[name], want[name])   # rel <= 1e-2, cos >= 0.9999


def triple(arch, seed=0, lora=True, **options):
    """(eager, all-kernel, split) models with identical weights (and LoRA values when lora)."""
    base = tm.make_model(arch, seed)
    kt = ktmoe.torch.patch(copy.deepcopy(base))
    sp = ktmoe.torch.patch(copy.deepcopy(base), **{**CPU, **options})
    ref = tm.bf16_expert_inputs(base)
    if not lora:
        return ref, kt, sp
    ref, kt = tm.wrap_pair(ref, kt, arch, seed)
    _, sp = tm.wrap_pair(tm.make_model(arch, seed), sp, arch, seed)
    return ref, kt, sp


def sides(model, run):
    """(rows computed on the device experts, rows the kernel got) over run(); asserts >= 1 each
    side where the model has experts on it."""
    counts = {}
    with resident.count_routing(model) as c:
        run()
    on_dev = on_cpu = 0
    for name, m in model.named_modules():
        dev = getattr(m, "_ktmoe_device", None)
        name = name.replace(".base_layer", "")   # count_routing names a PEFT-wrapped module by its outermost wrapper
        if dev is None or name not in c:
            continue
        on_dev += sum(c[name][e] for e in dev.ids)
        on_cpu += sum(n for e, n in enumerate(c[name]) if e not in dev.ids)
        counts[name] = c[name]
    assert counts, "no experts module of the split model has device experts"
    return on_dev, on_cpu


PLACEMENTS = {"some": dict(gpu_experts=[0, 2, 5]), "all": dict(gpu_experts=8), "one": dict(gpu_experts=[3])}


@pytest.mark.parametrize("arch", list(tm.ARCHS))
@pytest.mark.parametrize("where", list(PLACEMENTS))
def test_split_matches_all_cpu_and_eager(arch, where):
    ref, kt, sp = triple(arch, **PLACEMENTS[where])
    for m in (ref, kt, sp):
        m.train()
    b = tm.batch()
    out = {}
    on_dev, on_cpu = sides(sp, lambda: out.setdefault("sp", sp(**b)))
    assert on_dev > 0 and (on_cpu > 0) == (where != "all")
    out_r, out_k, out_s = ref(**b), kt(**b), out["sp"]
    for name, want in (("all-kernel", out_k), ("eager", out_r)):
        assert_close(f"logits vs {name}", out_s.logits, want.logits)                  # rel <= 1e-2
        assert abs(out_s.loss.item() - want.loss.item()) <= RTOL * abs(want.loss.item())   # rel <= 1e-2
    for o in (out_r, out_k, out_s):
        o.loss.backward()
    compare_grads(sp, kt, "split vs all-kernel")
    compare_grads(sp, ref, "split vs eager")


def expert_lora(model):
    return {n: p for n, p in model.named_parameters() if "experts" in n and "lora_" in n}


def test_gradient_accumulation_and_zero_grad():
    ref, kt, sp = triple("qwen3_moe", gpu_experts=[0, 2, 5])
    for model in (ref, kt, sp):   # two micro-batches accumulate into .grad
        model.train()
        model.zero_grad(set_to_none=True)
        for s in (0, 1):
            (model(**tm.batch(seed=s)).loss / 2).backward()
    compare_grads(sp, kt, "accumulated split vs all-kernel")
    compare_grads(sp, ref, "accumulated split vs eager")
    sp.zero_grad(set_to_none=True)
    assert all(p.grad is None for p in expert_lora(sp).values())


def _slices(name, p, ids, E=8):
    """The parts of an expert LoRA factor belonging to experts `ids` (design.md 4 layout)."""
    if "lora_A" in name:
        return p.reshape(E, -1, p.shape[-1])[ids]
    return p.reshape(p.shape[0], -1, E)[:, :, ids]


def test_optimizer_step_reaches_both_sides():
    ids = [0, 2, 5]
    ref, kt, sp = triple("mixtral", gpu_experts=ids)
    cpu_ids = [e for e in range(8) if e not in ids]
    trajectories = []
    for model in (ref, kt, sp):
        before = {n: p.detach().clone() for n, p in expert_lora(model).items()}
        trajectories.append(tm.adamw_trajectory(model))
        if model is sp:   # the step moved the LoRA slices of device experts and of kernel experts
            for n, p in expert_lora(sp).items():
                for which in (ids, cpu_ids):
                    assert not torch.equal(_slices(n, p.detach(), which), _slices(n, before[n], which)), (n, which)
    for name, want in (("all-kernel", trajectories[1]), ("eager", trajectories[0])):
        for got, w in zip(trajectories[2], want):
            assert abs(got - w) <= RTOL * abs(w), f"split losses {trajectories[2]} vs {name} {want} (rel <= 1e-2)"
    assert trajectories[2][0] != trajectories[2][2]


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non_reentrant"])
def test_gradient_checkpointing(reentrant):
    _, kt, sp = triple("qwen2_moe", gpu_experts=[1, 4, 6])
    b = tm.batch()
    kt.train(); sp.train()
    kt(**b).loss.backward()
    sp.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    sp.train()
    sp(**b).loss.backward()
    compare_grads(sp, kt, "checkpointed split vs all-kernel")


def test_adapter_saved_as_before(tmp_path):
    _, kt, sp = triple("qwen3_moe", gpu_experts=[0, 1, 2, 3])
    for model in (kt, sp):   # one identical step on both
        opt = torch.optim.SGD([p for n, p in model.named_parameters() if "lora_" in n], lr=1e-1)
        model.train()
        model(**tm.batch()).loss.backward()
        opt.step()
        model.eval()
    kt.save_pretrained(tmp_path / "kt")
    sp.save_pretrained(tmp_path / "sp")
    from safetensors.torch import load_file
    saved_kt = load_file(tmp_path / "kt" / "adapter_model.safetensors")
    saved_sp = load_file(tmp_path / "sp" / "adapter_model.safetensors")
    assert saved_sp.keys() == saved_kt.keys() and any("experts" in k for k in saved_sp)
    for k in saved_kt:
        assert saved_sp[k].shape == saved_kt[k].shape and saved_sp[k].dtype == saved_kt[k].dtype
        assert_close(f"saved {k}", saved_sp[k], saved_kt[k])   # rel <= 1e-2, cos >= 0.9999
    plain = PeftModel.from_pretrained(tm.make_model("qwen3_moe"), tmp_path / "sp").eval()
    reloaded = PeftModel.from_pretrained(ktmoe.torch.patch(tm.make_model("qwen3_moe"), gpu_experts=[0, 1, 2, 3],
                                                           **CPU), tmp_path / "sp").eval()
    b = tm.batch(seed=5)
    with torch.no_grad():
        want = plain(**b).logits
        assert_close("saved split adapter in plain PEFT", sp(**b).logits, want)        # rel <= 1e-2
        assert_close("reloaded into a split model", reloaded(**b).logits, want)       # rel <= 1e-2


def test_quantized_kernel_device_copies_are_its_values():
    base = tm.make_model("olmoe")
    kt = ktmoe.torch.patch(copy.deepcopy(base), weights="int8")
    sp = ktmoe.torch.patch(copy.deepcopy(base), gpu_experts=[1, 3, 7], weights="int8", **CPU)
    for mk, ms in zip(tm.experts_modules(kt), tm.experts_modules(sp)):
        q, s = mk._ktmoe.layer.quantized_weights("down")
        want = torch.from_numpy(q.astype("float32")) * torch.from_numpy(s)   # int8: one scale per row
        assert torch.equal(ms._ktmoe_device.down, want[[1, 3, 7]].to(torch.bfloat16))   # the kernel's values
    kt, sp = tm.wrap_pair(kt, sp, "olmoe")
    b = tm.batch()
    kt.train(); sp.train()
    out_k, out_s = kt(**b), sp(**b)
    assert_close("int8 split logits", out_s.logits, out_k.logits)   # rel <= 1e-2 against the same int8 kernel
    out_k.loss.backward(); out_s.loss.backward()
    compare_grads(sp, kt, "int8 split vs all-kernel")


def _fp8_codes(rng, shape):
    codes = rng.integers(0, 256, size=shape, dtype="uint8")
    codes[(codes & 0x7F) == 0x7F] = 0x38   # no NaN codes (design.md 5); 0x38 is 1.0
    codes[(codes & 0x78) >= 0x48] &= 0xC7   # exponents kept small: values of a few units at most
    return codes


@pytest.mark.parametrize("weights", ["int8", "int4", "fp8"])
def test_dequantized_device_copies_compute_like_the_kernel(weights):
    """A layer with every expert resident (its copies read back from the quantized kernel)
    against the same layer all in the kernel: y, dx, dw and the LoRA gradients."""
    import numpy as np

    import ktmoe
    from ktmoe.torch.device import split_apply
    from ktmoe.torch.function import KernelExperts
    E, H, I, T, k, r = 4, 64, 32, 24, 2, 4
    g = torch.Generator().manual_seed(0)
    if weights == "fp8":
        rng = np.random.default_rng(0)
        layer = ktmoe.MoEExperts.from_quantized(
            "fp8", gate_up=(_fp8_codes(rng, (E, 2 * I, H)), rng.uniform(0.01, 0.02, (E, 2 * I // 32, H // 32))
                            .astype("float32")),
            down=(_fp8_codes(rng, (E, H, I)), rng.uniform(0.01, 0.02, (E, H // 32, I // 32)).astype("float32")),
            block=(32, 32))
    else:
        gu = torch.randn(E, 2 * I, H, generator=g) * 0.1
        dn = torch.randn(E, H, I, generator=g) * 0.1
        layer = ktmoe.MoEExperts(gate_up=gu, down=dn, weights=weights,
                                 **({"group_size": 32} if weights == "int4" else {}))
    dev = resident.DeviceExperts(range(E), *resident.kernel_weights(layer, list(range(E)), torch.device("cpu")), E)
    x = torch.randn(T, H, generator=g)
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    ids[0, 1] = -1   # a "no expert" slot
    w = torch.rand(T, k, generator=g)
    lora = [torch.randn(E * r, H, generator=g) * 0.1, torch.randn(2 * I, E * r, generator=g) * 0.1,
            torch.randn(E * r, I, generator=g) * 0.1, torch.randn(H, E * r, generator=g) * 0.1]
    results = []
    for device_side in (False, True):
        leaves = [t.clone().requires_grad_(True) for t in (x, w, *lora)]
        lo = ktmoe.LoRA.peft(gate_up=(leaves[2], leaves[3]), down=(leaves[4], leaves[5]), scale=2.0)
        kernel = KernelExperts(layer)
        y = split_apply(kernel, dev, leaves[0], ids, leaves[1], lo) if device_side else \
            ktmoe.torch.experts_apply(kernel, leaves[0], ids, leaves[1], lo)
        y.backward(torch.randn(T, H, generator=torch.Generator().manual_seed(1)))
        results.append([y.detach()] + [t.grad for t in leaves])
    for name, got, want in zip(["y", "dx", "dw", "dA_gu", "dB_gu", "dA_dn", "dB_dn"], *reversed(results)):
        assert_close(f"{weights} {name}", got, want)   # rel <= 1e-2, cos >= 0.9999 (design.md 6)


def test_cost_model_sends_some_resident_tokens_to_the_kernel(monkeypatch):
    from ktmoe.torch import device
    from ktmoe.torch.placement import CostModel
    # a "GPU" 4x the CPU's throughput: with every expert resident, the best split keeps about a fifth
    # of the work on the CPU, so the kernel and the device both get tokens in each call
    cost = CostModel(hidden_size=32, intermediate_size=16, cpu_flops=1e9, gpu_flops=4e9, h2d_bytes_per_s=1e9)
    _, kt, sp = triple("qwen3_moe", gpu_experts=8, cost_model=cost)
    seen = []
    real_split = device.split
    monkeypatch.setattr(device, "split", lambda *a, **kw: seen.append(real_split(*a, **kw)) or seen[-1])
    b = tm.batch()
    kt.train(); sp.train()
    out_k, out_s = kt(**b), sp(**b)
    assert seen and all(0 < len(s.gpu) < 8 for s in seen)
    assert_close("cost-model split logits", out_s.logits, out_k.logits)   # rel <= 1e-2
    out_k.loss.backward(); out_s.loss.backward()
    compare_grads(sp, kt, "cost-model split vs all-kernel")


def test_hottest_by_counts_and_auto_budget():
    base = tm.make_model("qwen3_moe")
    with ktmoe.torch.count_routing(base) as counts:
        with torch.no_grad():
            base(**tm.batch())
    assert set(counts) == {f"model.layers.{i}.mlp.experts" for i in range(2)}
    assert all(sum(c) == 64 * 2 for c in counts.values())   # 64 tokens, k = 2
    sp = ktmoe.torch.patch(copy.deepcopy(base), gpu_experts=3, expert_counts=counts, **CPU)
    for name, m in sp.named_modules():
        if name in counts:
            c = counts[name]
            assert list(m._ktmoe_device.ids) == sorted(sorted(range(8), key=lambda e: (-c[e], e))[:3])
    per_expert = 3 * 32 * 16 * 2
    auto = ktmoe.torch.patch(copy.deepcopy(base), gpu_experts="auto", gpu_memory=5 * per_expert,
                             expert_counts=counts, **CPU)
    assert resident.device_bytes(auto) == 5 * per_expert
    every = ktmoe.torch.patch(copy.deepcopy(base), gpu_experts="auto", gpu_memory=10**9, **CPU)   # all fit: no counts
    assert all(m._ktmoe_device.ids == tuple(range(8)) for m in tm.experts_modules(every))


def test_deepcopy_shares_device_weights():
    _, _, sp = triple("qwen3_moe", lora=False, gpu_experts=[0, 1])
    copied = copy.deepcopy(sp)
    for a, b in zip(tm.experts_modules(sp), tm.experts_modules(copied)):
        assert a._ktmoe_device.gate_up.data_ptr() == b._ktmoe_device.gate_up.data_ptr()
    with torch.no_grad():
        assert_close("deep copy logits", copied(**tm.batch()).logits, sp(**tm.batch()).logits)   # rel <= 1e-2


BAD = [
    (dict(gpu_experts=-1), "gpu_experts"),
    (dict(gpu_experts="most"), "gpu_experts"),
    (dict(gpu_experts=1.5), "gpu_experts"),
    (dict(gpu_experts=True), "gpu_experts"),
    (dict(gpu_experts=[0, 0]), "gpu_experts"),
    (dict(gpu_experts=[]), "gpu_experts"),
    (dict(gpu_experts=[8]), "gpu_experts"),
    (dict(gpu_experts=3), "expert_counts"),
    (dict(gpu_experts=3, expert_counts={"model.layers.0.mlp.experts": [1] * 8}), "expert_counts"),
    (dict(gpu_experts=3, expert_counts=[1] * 8), "expert_counts"),
    (dict(gpu_experts="auto"), "gpu_memory"),
    (dict(gpu_experts="auto", gpu_memory=-5), "gpu_memory"),
    (dict(gpu_experts=2, gpu_memory=10**6), "gpu_memory"),
    (dict(gpu_experts=[0], gpu_device="nonsense"), "gpu_device"),
    (dict(gpu_experts=[0], gpu_device="meta"), "gpu_device"),
    (dict(gpu_experts=0, gpu_memory=10**6), "gpu_memory"),
    (dict(gpu_experts=[0], cost_model="fast"), "cost_model"),
]


@pytest.mark.parametrize("options,argument", BAD, ids=[f"{a}-{i}" for i, (_, a) in enumerate(BAD)])
def test_bad_options_refused_before_any_work(options, argument):
    model = tm.make_model("qwen3_moe")
    options = {"gpu_device": "cpu", **options} if options["gpu_experts"] else options
    with pytest.raises(ValueError, match=argument):
        ktmoe.torch.patch(model, **options)
    assert not tm.experts_modules(model)   # nothing was converted


def test_no_gpu_is_said(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    model = tm.make_model("qwen3_moe")
    for value in ("auto", 2, [0]):
        with pytest.raises(ValueError, match="gpu_experts: there is no GPU"):
            ktmoe.torch.patch(model, gpu_experts=value, expert_counts={})
    assert not tm.experts_modules(model)


def test_already_converted_bf16_refused():
    model = ktmoe.torch.patch(tm.make_model("qwen3_moe"))
    with pytest.raises(ValueError, match="gpu_experts: .* already in the kernel as bf16"):
        ktmoe.torch.patch(model, gpu_experts=[0], **CPU)
    assert not any(hasattr(m, "_ktmoe_device") for m in tm.experts_modules(model))


def test_load_state_dict_refreshes_the_device_copies():
    old, new = tm.make_model("olmoe", seed=0), tm.make_model("olmoe", seed=3)
    sp = ktmoe.torch.patch(copy.deepcopy(old), gpu_experts=[0, 4], **CPU)
    want = ktmoe.torch.patch(copy.deepcopy(new), gpu_experts=[0, 4], **CPU)
    sp.load_state_dict(new.state_dict())   # real expert weights: kernel repacked, device copies follow
    for a, b in zip(tm.experts_modules(sp), tm.experts_modules(want)):
        assert torch.equal(a._ktmoe_device.gate_up, b._ktmoe_device.gate_up)
        assert torch.equal(a._ktmoe_device.down, b._ktmoe_device.down)
    with torch.no_grad():
        assert_close("reloaded split logits", sp(**tm.batch()).logits, want(**tm.batch()).logits)   # rel <= 1e-2
