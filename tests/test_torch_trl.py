"""The lazy plug-in path (`from_pretrained(..., experts_implementation="ktmoe")`, experts
converted on first use) under PEFT and TRL (issue 22 item 6).

get_peft_model before the first forward must find ktmoe experts (PEFT converts them as it
wraps; ktmoe/torch/peft.py), and TRL's SFTTrainer, which loads the model from a path with
`model_init_kwargs` and wraps it with `peft_config` exactly so, trains the expert LoRA inside
the kernel. Everything is built here: a tiny Qwen3-MoE and a word-level tokenizer saved into
tmp_path, a small in-memory data set; nothing is downloaded.
"""
import math

import datasets
import torch
import trl
from peft import LoraConfig
from transformers import AutoModelForCausalLM

import torch_models as tm
from ktmoe.testing import TOLERANCE, compare

RTOL, MIN_COS = TOLERANCE["rel"], TOLERANCE["cos"]   # design.md 6: 1e-2, 0.9999
WORDS = [f"w{i}" for i in range(tm.COMMON["vocab_size"] - 3)]


def assert_close(name, got, want):
    rel, cos = compare(got, want)   # the harness's metric (relative Frobenius error, cosine)
    assert rel <= RTOL, f"{name}: relative error {rel:.3e} > {RTOL} (design.md 6)"
    assert cos >= MIN_COS, f"{name}: cosine {cos:.6f} < {MIN_COS} (design.md 6)"


def save_tiny(path):
    """A tiny Qwen3-MoE checkpoint plus a word-level tokenizer (vocabulary = the model's) in `path`."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {w: i for i, w in enumerate(["<pad>", "<eos>", "<unk>"] + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                        unk_token="<unk>")
    model = tm.make_model("qwen3_moe")   # the model test_torch_models.py compares (errors known there)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model


def test_lazy_path_wrapped_by_peft_before_first_forward(tmp_path):
    ref = save_tiny(tmp_path)
    kt = AutoModelForCausalLM.from_pretrained(tmp_path, experts_implementation="ktmoe", dtype=torch.float32)
    assert not tm.experts_modules(kt)                 # lazy: nothing converted before the first call
    ref, kt = tm.wrap_pair(ref, kt, "qwen3_moe")      # get_peft_model before any forward
    assert len(tm.experts_modules(kt)) == 2           # PEFT's wrapping converted both layers' experts
    ref.train(); kt.train()
    b = tm.batch()
    out_r, out_k = ref(**b), kt(**b)
    assert_close("logits", out_k.logits, out_r.logits)   # rel <= 1e-2, cos >= 0.9999
    out_r.loss.backward(); out_k.loss.backward()
    grads = {n: p.grad for n, p in ref.named_parameters() if p.requires_grad}
    expert_lora = 0
    for n, p in kt.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, f"{n}: no gradient under ktmoe"
            assert_close(f"grad {n}", p.grad, grads[n])   # rel <= 1e-2, cos >= 0.9999
            expert_lora += "experts" in n and "lora_" in n
    assert expert_lora == 8   # 2 layers x (gate_up, down) x (A, B)


def test_sft_trainer_trains_expert_lora_in_ktmoe(tmp_path):
    save_tiny(tmp_path / "model")
    g = torch.Generator().manual_seed(0)
    texts = [" ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (12,), generator=g).tolist()) for _ in range(8)]
    args = trl.SFTConfig(output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=4,
                         learning_rate=1e-2, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                         bf16=False, max_length=32, dataloader_num_workers=0,
                         model_init_kwargs={"experts_implementation": "ktmoe", "dtype": torch.float32})
    peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                             target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    trainer = trl.SFTTrainer(model=str(tmp_path / "model"), args=args, peft_config=peft_config,
                             train_dataset=datasets.Dataset.from_dict({"text": texts}))
    layers = tm.experts_modules(trainer.model)
    assert len(layers) == 2                            # converted when TRL's get_peft_model wrapped them
    expert_lora = {n: p for n, p in trainer.model.named_parameters() if "experts" in n and "lora_" in n}
    assert len(expert_lora) == 8 and all(p.requires_grad for p in expert_lora.values())
    before = {n: p.detach().clone() for n, p in expert_lora.items()}
    for m in layers:
        m._ktmoe.layer.reset_profile()
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses), trainer.state.log_history
    for n, p in expert_lora.items():   # lora_B starts at zero: both factors move only if both got gradients
        assert not torch.equal(p.detach(), before[n]), f"{n}: unchanged after two optimizer steps"
    for m in layers:                   # the experts ran in the kernel, forward and backward
        passes = m._ktmoe.layer.profile()["passes"]
        assert passes["forward"]["calls"] > 0 and passes["backward"]["calls"] > 0, passes
    trainer.save_model(str(tmp_path / "adapter"))   # TRL saves the PEFT adapter (not the kernel's weights)
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
