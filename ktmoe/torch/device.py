"""Experts that run in torch on a device next to the CPU kernel (issue 24, "resident experts").

A converted experts module may hold a `DeviceExperts`: some of its experts' base weights as
bf16 torch tensors on a target device (`cuda` in real use, the CPU in the tests). A call then
splits its routing (design.md 13):

- the kernel gets the routing with every slot of a device expert replaced by -1 (design.md 1:
  such a slot adds nothing and gets a zero dw and no LoRA gradient), submitted first;
- while it runs, the device experts' rows are computed in torch (design.md 2: silu(G) * U,
  bf16 products of the base weights, LoRA in fp32 from the same PEFT factors, sliced per
  expert in the target_parameters layout of design.md 4);
- the two outputs are added. Backward the same way round: the kernel's backward is submitted,
  the torch part's gradients are computed meanwhile (autograd over the torch part's graph,
  kept from the forward, or the torch part run again where the forward kept nothing:
  activation checkpointing, saved-tensor hooks), then both are added.

Both parts give gradients for the same PEFT factors: the kernel's are zero on the device
experts' slices (they got no tokens there) and the torch part's are zero outside them; they
are added into one fresh tensor per factor that autograd accumulates into `.grad` once. The
PEFT parameters stay the one set of LoRA values (saved, resumed and all-reduced as before).

`SplitExperts` is a Python autograd.Function: torch.compile traces around it with a graph
break (only the all-CPU path is the registered custom op of function.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ktmoe import lora_layout

from .function import KernelExperts, _hooks_active, kernel_backward, kernel_forward, lora_parts
from .placement import split


class DeviceExperts:
    """The base weights of some experts of one layer, bf16 on `device`: gate_up [n, 2I, H]
    (gate rows first) and down [n, H, I] for the sorted global expert ids `ids`. Read-only:
    deep copies share them."""

    def __init__(self, ids, gate_up: torch.Tensor, down: torch.Tensor, num_experts: int):
        ids = [int(e) for e in ids]
        if ids != sorted(set(ids)) or not ids or ids[0] < 0 or ids[-1] >= num_experts:
            raise ValueError(f"gpu_experts: expert ids must be distinct, sorted and in [0, {num_experts}), got {ids}")
        n = len(ids)
        if gate_up.dim() != 3 or down.dim() != 3 or gate_up.shape[0] != n or down.shape[0] != n \
                or gate_up.shape[1] != 2 * down.shape[2] or gate_up.shape[2] != down.shape[1]:
            raise ValueError(f"gpu_experts: expected gate_up [{n}, 2I, H] and down [{n}, H, I], got "
                             f"{list(gate_up.shape)} and {list(down.shape)}")
        self.ids = tuple(ids)
        self.num_experts = num_experts
        self.gate_up = gate_up.detach().to(torch.bfloat16).contiguous()
        self.down = down.detach().to(self.gate_up.device, torch.bfloat16).contiguous()
        self.slot = torch.full((num_experts,), -1, dtype=torch.int64)
        self.slot[list(ids)] = torch.arange(n)
        self.index = torch.tensor(ids, dtype=torch.int64, device=self.gate_up.device)

    @property
    def device(self) -> torch.device:
        return self.gate_up.device

    @property
    def nbytes(self) -> int:
        return self.gate_up.numel() * 2 + self.down.numel() * 2

    def __deepcopy__(self, memo):
        return self   # read-only weights, shared like the kernel's packed ones

    def __repr__(self) -> str:
        return f"DeviceExperts({len(self.ids)} of {self.num_experts} on {self.device}, {self.nbytes / 2**20:.1f} MiB)"


class _Routes:
    """The device experts' share of one call's routing, worked out on the host: `pos` the flat
    slots (t * k + j) of device experts grouped by expert (on the device), `counts` rows per
    device expert (host ints), and `kernel_ids` the routing the kernel gets (device slots -1)."""

    def __init__(self, dev: DeviceExperts, ids: torch.Tensor, use_device=None):
        ids_h = ids.detach().to("cpu")
        local = dev.slot[ids_h.clamp(min=0).long()].masked_fill(ids_h < 0, -1)
        if use_device is not None:   # resident experts whose tokens go to the kernel this call
            keep = torch.zeros(len(dev.ids) + 1, dtype=torch.bool)
            keep[[dev.ids.index(e) for e in use_device]] = True
            local = local.masked_fill(~keep[local], -1)
        on_dev = local >= 0
        self.kernel_ids = ids_h.masked_fill(on_dev, -1).contiguous()
        self.kernel_slots = int((self.kernel_ids >= 0).sum())
        flat = local.reshape(-1)
        pos = on_dev.reshape(-1).nonzero().squeeze(1)
        order = torch.argsort(flat[pos], stable=True)
        pos = pos[order]
        self.counts = torch.bincount(flat[pos], minlength=len(dev.ids)).tolist()
        pin = dev.device.type == "cuda"
        self.pos = (pos.pin_memory() if pin else pos).to(dev.device, non_blocking=True)
        self.k = ids.shape[1]


def device_part(dev: DeviceExperts, routes: _Routes, x, w, factors, scale: float) -> torch.Tensor:
    """y [T, H] fp32 on dev.device: the device experts' rows (design.md 2), differentiable in x, w
    and the factors. Base products in bf16 (fp32 accumulation), LoRA and silu in fp32."""
    T, H = x.shape
    E, I = dev.num_experts, dev.down.shape[2]
    y = torch.zeros((T, H), dtype=torch.float32, device=dev.device)
    if not routes.pos.numel():
        return y
    tok = torch.div(routes.pos, routes.k, rounding_mode="floor")
    xs = x.to(dev.device)[tok]
    xb, xf = xs.to(torch.bfloat16), xs.to(torch.float32)
    ws = w.to(dev.device).reshape(-1)[routes.pos].to(torch.float32)
    gu_a, gu_b, dn_a, dn_b = (None if f is None else f.to(dev.device) for f in factors)
    if gu_a is not None:   # the PEFT layout, per expert (ktmoe/lora_layout.py)
        A_gu = lora_layout.per_expert_A(gu_a, E)[dev.index].to(torch.float32)   # [n, r, H]
        B_gu = lora_layout.per_expert_B(gu_b, E)[dev.index].to(torch.float32)   # [n, 2I, r]
    if dn_a is not None:
        A_dn = lora_layout.per_expert_A(dn_a, E)[dev.index].to(torch.float32)   # [n, r, I]
        B_dn = lora_layout.per_expert_B(dn_b, E)[dev.index].to(torch.float32)   # [n, H, r]
    outs, start = [], 0
    for i, c in enumerate(routes.counts):
        if c == 0:
            continue
        rows = slice(start, start + c)
        start += c
        gu = (xb[rows] @ dev.gate_up[i].t()).to(torch.float32)
        if gu_a is not None:
            gu = gu + scale * ((xf[rows] @ A_gu[i].t()) @ B_gu[i].t())
        hh = F.silu(gu[:, :I]) * gu[:, I:]
        d = (hh.to(torch.bfloat16) @ dev.down[i].t()).to(torch.float32)
        if dn_a is not None:
            d = d + scale * ((hh @ A_dn[i].t()) @ B_dn[i].t())
        outs.append(d)
    D = torch.cat(outs) * ws[:, None]
    return y.index_add(0, tok, D)


class SplitExperts(torch.autograd.Function):
    """y = kernel(x, routing minus the device experts) + device_part(x, their rows), the torch
    part computed while the kernel runs, forward and backward."""

    @staticmethod
    def forward(ctx, kernel: KernelExperts, dev: DeviceExperts, routes: _Routes, scale: float, keep: bool,
                x, ids, w, gu_a, gu_b, dn_a, dn_b):
        factors = (gu_a, gu_b, dn_a, dn_b)
        part = {}

        def torch_part():
            if keep:   # the graph of the torch part, for the backward (leaves detached from the outer graph)
                leaves = [None if t is None else t.detach().requires_grad_(t.requires_grad or t is x or t is w)
                          for t in (x, w, *factors)]
                with torch.enable_grad():
                    part["y"] = device_part(dev, routes, leaves[0], leaves[1], leaves[2:], scale)
                part["leaves"] = leaves
            else:
                part["y"] = device_part(dev, routes, x, w, factors, scale)

        if routes.kernel_slots:
            y, gen = kernel_forward(kernel, x, routes.kernel_ids, w, factors, scale, keep, during=torch_part)
        else:
            torch_part()
            y, gen = torch.zeros_like(x), 0
        ctx.kernel, ctx.dev, ctx.routes, ctx.scale, ctx.gen = kernel, dev, routes, scale, gen
        ctx.graph = (part["y"], part["leaves"]) if keep else None
        ctx.present = [f is not None for f in factors]
        ctx.save_for_backward(x, w, *[f for f in factors if f is not None])
        out = (y.to(torch.float32) + part["y"].detach().to(y.device)).to(x.dtype)
        return out

    @staticmethod
    def backward(ctx, dy):
        x, w, *given = ctx.saved_tensors
        it = iter(given)
        factors = [next(it) if p else None for p in ctx.present]
        need = ctx.needs_input_grad[5:]   # x, ids, w, gu_a, gu_b, dn_a, dn_b
        need_factors = [n and p for n, p in zip(need[3:], ctx.present)]
        lora_grads = any(need_factors)
        got = {}

        def torch_part():
            if ctx.graph is not None:
                y, leaves = ctx.graph
            else:   # the forward kept nothing (checkpointing, saved-tensor hooks): run the torch part again
                leaves = [None if t is None else t.detach().requires_grad_(True) for t in (x, w, *factors)]
                with torch.enable_grad():
                    y = device_part(ctx.dev, ctx.routes, leaves[0], leaves[1], leaves[2:], ctx.scale)
            wanted = [i for i, n in enumerate([need[0], need[2], *need_factors]) if n and leaves[i] is not None]
            if y.requires_grad and wanted:
                grads = torch.autograd.grad(y, [leaves[i] for i in wanted], dy.to(y.device, torch.float32),
                                            allow_unused=True)
                got.update({i: g for i, g in zip(wanted, grads) if g is not None})
            ctx.graph = None

        if ctx.routes.kernel_slots:
            k_out = kernel_backward(ctx.kernel, ctx.gen, dy, x, ctx.routes.kernel_ids, w, factors, ctx.scale,
                                    lora_grads, during=torch_part)
        else:
            torch_part()
            k_out = [torch.zeros_like(x), torch.zeros_like(w)] + \
                ([torch.zeros_like(f) for f in factors if f is not None] if lora_grads else [])
        kernel_factor = iter(k_out[2:])
        kernel_grads = [next(kernel_factor) if p and lora_grads else None for p in ctx.present]
        def total(i, kernel_grad):
            if i in got:
                return kernel_grad + got[i].to(kernel_grad.device, kernel_grad.dtype)
            return kernel_grad

        dx = total(0, k_out[0]) if need[0] else None
        dw = total(1, k_out[1]) if need[2] else None
        df = [total(2 + j, g) if n and g is not None else None
              for j, (g, n) in enumerate(zip(kernel_grads, need_factors))]
        return (None, None, None, None, None, dx, None, dw, *df)


def split_apply(kernel: KernelExperts, dev: DeviceExperts, x, ids, w, lora=None, cost=None) -> torch.Tensor:
    """experts_apply with the device experts of `dev` computed in torch (see the module
    docstring); same arguments and result. cost: a placement.CostModel choosing, per call, which
    resident experts' tokens run on the device (placement.split); None: all of them."""
    E = dev.num_experts
    if x.dim() != 2 or ids.dim() != 2 or ids.shape[0] != x.shape[0] or tuple(w.shape) != tuple(ids.shape):
        raise ValueError(f"hidden_states / top_k_index / top_k_weights: expected [T, H], [T, k] and [T, k], got "
                         f"{list(x.shape)}, {list(ids.shape)} and {list(w.shape)}")
    if ids.numel() and (int(ids.min()) < -1 or int(ids.max()) >= E):
        raise ValueError(f"topk_ids: expert ids must be in [-1, {E}), got values in "
                         f"[{int(ids.min())}, {int(ids.max())}]")
    gu, dn, scale, factors = lora_parts(lora)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in [x, w, *factors])
    keep = needs_grad and not _hooks_active()
    use_device = None
    if cost is not None:
        ids_h = ids.detach().to("cpu").reshape(-1)
        tokens = torch.bincount(ids_h[ids_h >= 0].to(torch.int64), minlength=E).tolist()
        use_device = split(tokens, cost, resident=dev.ids, stream=False).gpu
    routes = _Routes(dev, ids, use_device)
    return SplitExperts.apply(kernel, dev, routes, scale, keep, x, ids, w, *gu, *dn)
