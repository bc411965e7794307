"""Training data: JSON lines of chat messages or prompt / response pairs -> token batches.

Accepted lines (blank lines are skipped):

    {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}
    {"prompt": "...", "response": "..."}            # "completion" is accepted for "response";
                                                    # an optional "system" adds a system turn
Each example is rendered with the tokenizer's chat template (a plain "<|role|>" template when
the tokenizer has none) and trained on its assistant turns only: the label of every other
token is -100. A conversation must end with an assistant turn. When a template renders
earlier assistant turns differently once later turns follow (e.g. templates that drop
reasoning from history), only the final assistant turn of such examples is trained (one
warning).

Too long: an example longer than --max-seq-len tokens is TRUNCATED to its first
--max-seq-len tokens (one warning with the count and the first line number); if nothing
trainable is left it is dropped. Every problem in the file is reported as FILE:LINE.

Batches: each optimizer step takes a list of whole examples, shuffled per epoch from
--seed, whose padded size (examples x longest) stays within --batch-tokens (an example
longer than that forms a batch of its own).
"""
from __future__ import annotations

import json
import random
import warnings
from dataclasses import dataclass
from pathlib import Path

from . import FinetuneError

FALLBACK_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
                     "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
ROLES = ("system", "user", "assistant")


@dataclass
class Example:
    ids: list
    labels: list
    line: int

    @property
    def trained_tokens(self) -> int:
        return sum(1 for x in self.labels if x != -100)


def read_jsonl(path: Path) -> list:
    """[(line number, messages)] of a JSON-lines file; FinetuneError naming FILE:LINE."""
    if not path.exists():
        raise FinetuneError(f"--data {path}: no such file")
    if not path.is_file():
        raise FinetuneError(f"--data {path}: not a file")
    out = []
    try:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise FinetuneError(f"{path}:{n}: invalid JSON ({e.msg} at column {e.colno})") from None
                out.append((n, _messages(obj, f"{path}:{n}")))
    except UnicodeDecodeError as e:
        raise FinetuneError(f"{path}: not UTF-8 text ({e})") from None
    except OSError as e:
        raise FinetuneError(f"--data {path}: cannot read ({e.strerror or e})") from None
    if not out:
        raise FinetuneError(f"--data {path}: the data set is empty (no JSON lines)")
    return out


def _messages(obj, where: str) -> list:
    if not isinstance(obj, dict):
        raise FinetuneError(f"{where}: expected a JSON object with \"messages\" or \"prompt\"/\"response\", "
                            f"got {type(obj).__name__}")
    if "messages" in obj:
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise FinetuneError(f"{where}: \"messages\" must be a non-empty list")
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise FinetuneError(f"{where}: messages[{i}] must be {{\"role\": str, \"content\": str}}")
            if m["role"] not in ROLES:
                raise FinetuneError(f"{where}: messages[{i}] has role {m['role']!r} (expected one of {ROLES})")
        if msgs[-1]["role"] != "assistant":
            raise FinetuneError(f"{where}: the last message must be the assistant's (the text to learn)")
        return [{"role": m["role"], "content": m["content"]} for m in msgs]
    response = obj.get("response", obj.get("completion"))
    if "prompt" in obj and response is not None:
        if not isinstance(obj["prompt"], str) or not isinstance(response, str):
            raise FinetuneError(f"{where}: \"prompt\" and \"response\" must be strings")
        msgs = [{"role": "user", "content": obj["prompt"]}, {"role": "assistant", "content": response}]
        if isinstance(obj.get("system"), str):
            msgs.insert(0, {"role": "system", "content": obj["system"]})
        return msgs
    raise FinetuneError(f"{where}: expected \"messages\" or \"prompt\" + \"response\", got keys {sorted(obj)}")


def _render(tokenizer, messages, generation_prompt: bool) -> str:
    template = tokenizer.chat_template or FALLBACK_TEMPLATE
    return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                         add_generation_prompt=generation_prompt)


def _assistant_spans(tokenizer, messages, where: str):
    """(full text, [(start, end) character spans of trained assistant turns], whether a turn was skipped)."""
    full = _render(tokenizer, messages, False)
    spans, skipped = [], False
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix = _render(tokenizer, messages[:i], True) if i else ""
        last = i == len(messages) - 1
        upto = full if last else _render(tokenizer, messages[:i + 1], False)
        if full.startswith(upto) and upto.startswith(prefix) and len(upto) > len(prefix):
            spans.append((len(prefix), len(upto)))
        elif last:
            raise FinetuneError(f"{where}: the chat template does not render this conversation as "
                                f"prompt + answer (cannot tell which tokens are the assistant's)")
        else:
            skipped = True
    return full, spans, skipped


def tokenize(records: list, tokenizer, max_len: int, path: Path) -> list:
    """Examples with labels on assistant tokens; truncation and drops are warned about once."""
    if not getattr(tokenizer, "is_fast", False):
        raise FinetuneError("the tokenizer is not a fast (tokenizers-backed) tokenizer; ktmoe finetune needs "
                            "character offsets to find the assistant tokens")
    examples, truncated, dropped, skipped_turns = [], [], [], 0
    for n, messages in records:
        where = f"{path}:{n}"
        text, spans, skipped = _assistant_spans(tokenizer, messages, where)
        skipped_turns += skipped
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
        labels = [tok if any(s <= a < e for s, e in spans) else -100 for tok, (a, _) in zip(ids, offsets)]
        if len(ids) > max_len:
            truncated.append(n)
            ids, labels = ids[:max_len], labels[:max_len]
        ex = Example(ids, labels, n)
        if ex.trained_tokens == 0 or len(ids) < 2:
            dropped.append(n)
            continue
        examples.append(ex)
    if skipped_turns:
        warnings.warn(f"{path}: in {skipped_turns} multi-turn example(s) the chat template renders earlier "
                      f"assistant turns differently once later turns follow; only their last assistant turn "
                      f"is trained", stacklevel=2)
    if truncated:
        warnings.warn(f"{path}: {len(truncated)} example(s) longer than --max-seq-len {max_len} tokens were "
                      f"truncated (first at line {truncated[0]})", stacklevel=2)
    if dropped:
        warnings.warn(f"{path}: {len(dropped)} example(s) have no assistant token to train on after "
                      f"truncation and were dropped (first at line {dropped[0]})", stacklevel=2)
    if not examples:
        raise FinetuneError(f"--data {path}: no example has any assistant token to train on")
    return examples


def load(path: Path, tokenizer, max_len: int) -> list:
    return tokenize(read_jsonl(path), tokenizer, max_len, path)


def epoch_batches(examples: list, batch_tokens: int, seed: int, epoch: int) -> list:
    """Example indices of each batch of one epoch (deterministic in seed and epoch)."""
    order = list(range(len(examples)))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    batches, cur, longest = [], [], 0
    for i in order:
        n = len(examples[i].ids)
        if cur and (len(cur) + 1) * max(longest, n) > batch_tokens:
            batches.append(cur)
            cur, longest = [], 0
        cur.append(i)
        longest = max(longest, n)
    if cur:
        batches.append(cur)
    return batches


class Schedule:
    """Global step -> (epoch, batch): epochs follow each other, each shuffled afresh."""

    def __init__(self, examples, batch_tokens: int, seed: int):
        self.examples, self.batch_tokens, self.seed = examples, batch_tokens, seed
        self._epochs: list = []

    def epoch(self, e: int) -> list:
        while len(self._epochs) <= e:
            self._epochs.append(epoch_batches(self.examples, self.batch_tokens, self.seed, len(self._epochs)))
        return self._epochs[e]

    def steps_for_epochs(self, epochs: int) -> int:
        return sum(len(self.epoch(e)) for e in range(epochs))

    def at(self, step: int):
        """(epoch, fractional epoch, [example indices]) of a global step."""
        e = 0
        while step >= len(self.epoch(e)):
            step -= len(self.epoch(e))
            e += 1
        n = len(self.epoch(e))
        return e, e + (step + 1) / n, self.epoch(e)[step]


PAD_MULTIPLE = 32


def padded_length(longest: int, rows: int, max_tokens: int | None) -> int:
    """The batch's padded length: `longest` rounded up to a multiple of PAD_MULTIPLE while
    rows * length stays within max_tokens (never below `longest`). A few lengths instead of
    every one: torch and CUDA keep host-side state per tensor shape (kernel and GEMM plans),
    which grew host memory by 0.4 MiB a step over 400 steps of the tiny job on a GPU with
    batches padded to their longest example only, and stays flat with this padding."""
    if max_tokens is None:
        return longest
    return max(longest, min(-(-longest // PAD_MULTIPLE) * PAD_MULTIPLE, max_tokens // rows))


def collate(examples: list, indices: list, pad_id: int, max_tokens: int | None = None):
    """input_ids, attention_mask, labels [B, L] (right padding; L from padded_length) and
    the real token count."""
    import torch
    rows = [examples[i] for i in indices]
    L = padded_length(max(len(r.ids) for r in rows), len(rows), max_tokens)
    ids = torch.full((len(rows), L), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), L), dtype=torch.long)
    labels = torch.full((len(rows), L), -100, dtype=torch.long)
    for b, r in enumerate(rows):
        n = len(r.ids)
        ids[b, :n] = torch.tensor(r.ids)
        mask[b, :n] = 1
        labels[b, :n] = torch.tensor(r.labels)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}, int(mask.sum())
