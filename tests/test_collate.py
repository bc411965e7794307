"""Batch padding of `ktmoe finetune` (ktmoe/finetune/data.py): lengths rounded up to a multiple of
PAD_MULTIPLE within max_tokens, so that a run meets few tensor shapes (torch / CUDA keep host state per
shape), never shorter than the longest example and never more tokens than max_tokens."""
import torch

from ktmoe.finetune import data


def test_padded_length_rounds_up_within_max_tokens():
    m = data.PAD_MULTIPLE
    assert data.padded_length(1, 1, 1024) == m
    assert data.padded_length(m, 4, 1024) == m
    assert data.padded_length(m + 1, 2, 1024) == 2 * m
    assert data.padded_length(300, 3, 1024) == 320            # 3 * 320 = 960 <= 1024
    assert data.padded_length(300, 3, 950) == 316             # capped: 3 * 316 = 948
    assert data.padded_length(1000, 1, 1000) == 1000          # the budget itself is the cap
    assert data.padded_length(77, 1, None) == 77              # no budget: the longest
    lengths = {data.padded_length(n, b, 1024) for n in range(1, 1025) for b in range(1, 1024 // n + 1)}
    for n in range(1, 1025):
        for b in range(1, 1024 // n + 1):
            L = data.padded_length(n, b, 1024)
            assert n <= L and b * L <= 1024
    assert len(lengths) < 100, f"{len(lengths)} distinct padded lengths"


def test_collate_pads_with_masked_tokens():
    ex = [data.Example(ids=[5, 6, 7], labels=[-100, 6, 7], line=1), data.Example(ids=[1] * 40, labels=[1] * 40, line=2)]
    batch, n = data.collate(ex, [0, 1], pad_id=0, max_tokens=1024)
    assert n == 43
    assert batch["input_ids"].shape == (2, 64)
    assert batch["attention_mask"].sum() == 43
    assert torch.equal(batch["input_ids"][0, :3], torch.tensor([5, 6, 7])) and int(batch["input_ids"][0, 3:].sum()) == 0
    assert bool((batch["labels"][0, 3:] == -100).all()) and bool((batch["labels"][1, 40:] == -100).all())
