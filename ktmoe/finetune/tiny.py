"""The built-in model of `ktmoe finetune`'s default job: a tiny Qwen3-MoE, built locally.

- Tokenizer: byte-level BPE (512 tokens) trained with the `tokenizers` library on the shipped
  data set (tiny_dataset/tiny_instructions.jsonl), with ChatML special tokens and chat template.
  Training is deterministic, so every build gives the same vocabulary.
- Model: Qwen3-MoE, 4 layers, hidden 128, 8 experts (top-2) of intermediate size 128,
  random weights from a fixed seed. initializer_range 0.1 (not 0.02) so that the frozen
  random output head can express confident predictions: LoRA on attention and experts is
  then enough to learn the data set.
- Written once as an ordinary Hugging Face checkpoint (bf16 safetensors, per-expert tensors
  as transformers saves them) into <out>/base-model, then loaded like any --model directory:
  the default job exercises the same streaming loader as a real checkpoint, and the adapter
  in <out>/adapter loads onto it with plain transformers + PEFT. Nothing is downloaded.
"""
from __future__ import annotations

import json
from pathlib import Path

from .output import atomic_dir

SEED = 0
VERSION = 1
MARKER = "ktmoe_tiny.json"
VOCAB_SIZE = 512
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
MODEL = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, head_dim=32, moe_intermediate_size=128, num_experts=8,
             num_experts_per_tok=2, norm_topk_prob=True, decoder_sparse_step=1, max_position_embeddings=512,
             initializer_range=0.1, tie_word_embeddings=False, rope_theta=10000.0)
# training defaults of the default job (flags given on the command line win)
DEFAULTS = dict(lr=3e-3, batch_tokens=1024, epochs=16, lora_r=16, lora_alpha=32, save_every=50)


def dataset_path() -> Path:
    return Path(__file__).with_name("tiny_dataset") / "tiny_instructions.jsonl"


def _texts(path: Path):
    with open(path, encoding="utf-8") as f:
        for line in f:
            obj = json.loads(line)
            if "messages" in obj:
                yield from (m["content"] for m in obj["messages"])
            else:
                yield obj["prompt"]
                yield obj["response"]


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_texts(dataset_path()), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=None, eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", chat_template=CHAT_TEMPLATE,
                                   model_max_length=MODEL["max_position_embeddings"])


def build_model(tokenizer):
    import torch
    import transformers

    config = transformers.Qwen3MoeConfig(vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id,
                                         pad_token_id=tokenizer.pad_token_id, bos_token_id=None, **MODEL)
    state = torch.random.get_rng_state()
    torch.manual_seed(SEED)
    try:
        model = transformers.Qwen3MoeForCausalLM(config)
    finally:
        torch.random.set_rng_state(state)
    return model.to(torch.bfloat16)


def ensure(path: Path) -> Path:
    """The tiny checkpoint at `path`, built there (atomically) unless a complete one exists."""
    marker = path / MARKER
    if marker.is_file():
        try:
            if json.loads(marker.read_text()).get("version") == VERSION:
                return path
        except (json.JSONDecodeError, OSError):
            pass
    tokenizer = build_tokenizer()
    model = build_model(tokenizer)
    with atomic_dir(path) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / MARKER).write_text(json.dumps({"version": VERSION, "seed": SEED, "what": "ktmoe finetune built-in "
                                              "tiny Qwen3-MoE (random weights)"}) + "\n")
    return path
