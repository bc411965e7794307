"""The 2-rank torch.distributed job of tests/test_distributed.py, run under torchrun (gloo, CPU).

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/dist_job.py OUT [ddp,fsdp]

Every rank patches the same tiny Qwen3-MoE (share=None: one packed copy per host, mapped by both
ranks), reports how the shared region is mapped (/proc/self/smaps), then trains a PEFT LoRA
wrapped in DDP for three steps on its half of each global batch (the third step accumulates two
micro-batches, the first under no_sync); rank 0 also runs an unwrapped copy of the same
model (share=False) on the whole global batches from the same parameters, the single-process
reference. "fsdp" runs the
same with FSDP2 (fully_shard per decoder layer and the root) on a fresh model, "trainer" trains
a fresh one with HF Trainer as it is (it finds the process group and wraps the model in DDP). Each rank
writes OUT/rank-R.json (losses, gradients, memory); the test compares them.
"""
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import transformers
from peft import LoraConfig, get_peft_model

import ktmoe.torch

STEPS = 3          # the last one accumulates two micro-batches
SEQ = 12


def make_model():
    torch.manual_seed(0)
    cfg = transformers.Qwen3MoeConfig(vocab_size=64, hidden_size=256, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, head_dim=16, intermediate_size=64,
                                      moe_intermediate_size=256, num_experts=16, num_experts_per_tok=2,
                                      norm_topk_prob=True, max_position_embeddings=64, initializer_range=0.1,
                                      tie_word_embeddings=False)
    return transformers.Qwen3MoeForCausalLM(cfg).eval()


def wrap(model):
    torch.manual_seed(1)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                     target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
                     init_lora_weights=False)
    return get_peft_model(model, cfg)


def global_batch(step, micro):
    """4 sequences with a few -100 labels; rank r of 2 takes sequences 2r, 2r + 1."""
    g = torch.Generator().manual_seed(100 * step + micro)
    ids = torch.randint(0, 64, (4, SEQ), generator=g)
    labels = ids.clone()
    labels[:, :3] = -100
    labels[1, 5:] = -100
    return ids, labels


def loss_of(model, ids, labels, n_items, scale=1.0):
    """Summed token loss / n_items of the whole global batch, times scale (DDP averages over ranks)."""
    out = model(input_ids=ids, labels=labels, num_items_in_batch=n_items)
    return out.loss * scale


def n_items(labels):
    return int((labels[:, 1:] != -100).sum())


def smaps_region():
    """Rss / Pss / private / shared kB of this process's mappings of the shared experts region."""
    tot = {"Rss": 0, "Pss": 0, "Private_Clean": 0, "Private_Dirty": 0, "Shared_Clean": 0, "Shared_Dirty": 0,
           "Anonymous": 0, "mappings": 0}
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            parts = line.split()
            if "-" in parts[0] and len(parts) >= 5 and not parts[0].endswith(":"):
                inside = len(parts) >= 6 and parts[5].startswith("/memfd:ktmoe-experts")
                tot["mappings"] += inside
            elif inside and parts[0].rstrip(":") in tot:
                tot[parts[0].rstrip(":")] += int(parts[1])
    return tot


def main():
    out = Path(sys.argv[1])
    modes = sys.argv[2].split(",") if len(sys.argv) > 2 else ["ddp"]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    model = ktmoe.torch.patch(make_model())   # share=None: one copy per host
    experts = [m for m in model.modules() if ktmoe.torch.experts.is_converted(m)]
    region = experts[0]._ktmoe.layer._region.owner[1].obj   # the read-only mmap of the host region
    region_bytes = len(region)
    weight_bytes = sum(m._ktmoe.layer.weight_bytes for m in experts)
    bytes(memoryview(region))   # every page of the region read once by this rank
    dist.barrier()
    mem = smaps_region()
    dist.barrier()
    result = {"rank": rank, "world": world, "region_bytes": region_bytes, "weight_bytes": weight_bytes,
              "smaps": mem, "threads": [m._ktmoe.layer.num_threads for m in experts],
              "attached": all(getattr(m._ktmoe.layer, "_region", None) is not None for m in experts)}

    for mode in modes:
        if mode != modes[0]:
            model = ktmoe.torch.patch(make_model())
        result[mode] = trainer(model, out) if mode == "trainer" else train(model, mode, rank, world)
    (out / f"rank-{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


def train(model, mode, rank, world):
    """Losses and gradients of STEPS steps of the engine and (rank 0) of the reference."""
    peft = wrap(model)
    if mode == "ddp":
        engine = torch.nn.parallel.DistributedDataParallel(peft)
    else:
        from torch.distributed.fsdp import fully_shard
        for layer in peft.base_model.model.model.layers:
            fully_shard(layer)
        engine = fully_shard(peft)
    opt = torch.optim.SGD([p for p in engine.parameters() if p.requires_grad], lr=0.2)
    ref = wrap(ktmoe.torch.patch(make_model(), share=False)) if rank == 0 else None
    losses, ref_losses, grads, ref_grads = [], [], [], []
    for step in range(STEPS):
        micros = [0, 1] if step == STEPS - 1 else [0]
        total, ref_total = 0.0, 0.0
        for i, micro in enumerate(micros):
            ids, labels = global_batch(step, micro)
            n = n_items(labels) * len(micros)
            mine = slice(2 * rank, 2 * rank + 2)
            last = i == len(micros) - 1
            if mode == "ddp" and not last:
                with engine.no_sync():
                    loss = loss_of(engine, ids[mine], labels[mine], n, world)
                    loss.backward()
            else:
                if mode == "fsdp":
                    engine.set_requires_gradient_sync(last)
                loss = loss_of(engine, ids[mine], labels[mine], n, world)
                loss.backward()
            total += loss.detach() / world
            if rank == 0:
                r = loss_of(ref, ids, labels, n)
                r.backward()
                ref_total += float(r)
        dist.all_reduce(total)
        losses.append(float(total))
        ref_losses.append(ref_total)
        grads.append({n.removeprefix("module."): _full(p.grad).tolist() for n, p in engine.named_parameters()
                      if p.requires_grad})
        if rank == 0:
            ref_grads.append({n: p.grad.tolist() for n, p in ref.named_parameters() if p.requires_grad})
            ref.zero_grad(set_to_none=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
        # the reference continues from the parameters the engine has now: every step compares the
        # same function at the same point (a trajectory of its own would drift: bf16 rounding inside
        # the kernel turns 1e-7 parameter differences into 1e-3 jumps of single activations)
        now = {n.removeprefix("module."): _full(p.detach()) for n, p in engine.named_parameters() if p.requires_grad}
        if rank == 0:
            with torch.no_grad():
                for n, p in ref.named_parameters():
                    if p.requires_grad:
                        p.copy_(now[n])
    return dict(losses=losses, grads=grads, ref_losses=ref_losses, ref_grads=ref_grads)


def trainer(model, out):
    """HF Trainer, unmodified, on the process group torchrun started: LoRA values before and after."""
    from transformers import Trainer, TrainingArguments
    peft = wrap(model)
    before = {n: p.detach().clone() for n, p in peft.named_parameters() if p.requires_grad}
    rows = []
    for step in range(4):
        ids, labels = global_batch(step, 0)
        rows += [{"input_ids": i, "labels": l} for i, l in zip(ids, labels)]
    args = TrainingArguments(output_dir=str(out / "trainer"), per_device_train_batch_size=2, max_steps=2,
                             learning_rate=1e-2, use_cpu=True, report_to=[], save_strategy="no", logging_steps=1,
                             ddp_backend="gloo", disable_tqdm=True, dataloader_num_workers=0)
    t = Trainer(model=peft, args=args, train_dataset=rows)
    t.train()
    return {"engine": type(t.model_wrapped).__name__, "losses": [e["loss"] for e in t.state.log_history if "loss" in e],
            "change": {n: float((p.detach() - before[n]).norm()) for n, p in peft.named_parameters() if n in before},
            "after": {n: p.detach().flatten()[:8].tolist() for n, p in peft.named_parameters() if n in before}}


def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


if __name__ == "__main__":
    main()
