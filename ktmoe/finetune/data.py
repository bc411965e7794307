"""Training data: examples (readers.py: JSON lines, JSON array, Parquet, Arrow, save_to_disk) -> token batches.

Layouts of an example (TRL's names; the first that matches its keys is used, other keys are
ignored; "text" does not mix with the others in one data set):

    {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}
    {"conversations": [{"from": "system"|"human"|"gpt", "value": "..."}, ...]}    # ShareGPT
    {"prompt": "...", "completion": "..."}          # "response" is accepted for "completion";
                                                    # an optional "system" adds a system turn
    {"prompt": [turns], "completion": [assistant turns]}   # TRL's conversational prompt-completion
    {"instruction": "...", "input": "...", "output": "..."}   # Alpaca; "input" and "system" optional
    {"text": "..."}                                 # language modelling

ShareGPT maps human -> user, gpt -> assistant (user / assistant also accepted). Alpaca's user
turn is the instruction, then a blank line and the input when there is one. Every layout but
"text" is rendered with the tokenizer's chat template (a plain "<|role|>" template when the
tokenizer has none; unlike TRL, which joins plain-string prompt and completion without one)
and trained on its assistant turns only (for conversational prompt-completion: those of the
completion): the label of every other token is -100. A conversation must end with an
assistant turn. When a template renders earlier assistant turns differently once later turns
follow (e.g. templates that drop reasoning from history), only the final assistant turn of
such examples is trained (one warning). "text" is tokenized as it is (with the tokenizer's
special tokens, e.g. BOS), EOS appended unless the text ends with it (as TRL does), and every
token is trained.

Too long: an example longer than --max-seq-len tokens is TRUNCATED to its first
--max-seq-len tokens (one warning with the count and the first line number); if nothing
trainable is left it is dropped. Every problem is reported as FILE:LINE (FILE: row N for the
binary formats).

Batches: each optimizer step takes a list of whole examples, shuffled per epoch from
--seed, whose padded size (examples x longest) stays within --batch-tokens (an example
longer than that forms a batch of its own).
"""
from __future__ import annotations

import random
import warnings
from dataclasses import dataclass
from pathlib import Path

from . import FinetuneError, readers

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


@dataclass
class Source:
    rows: readers.Rows
    layout: str         # the layouts found, in order: "messages", "messages + prompt-completion", ...
    records: list       # [(number, {"messages": [...], "train_from": i} | {"text": str})]

    def describe(self) -> str:
        return f"{self.layout}, {self.rows.kind}"


def read(path: Path) -> Source:
    """The examples of --data in any accepted file format and layout; FinetuneError naming FILE:LINE."""
    rows = readers.read(path)
    records, layouts = [], {}    # layout: the first example in it
    for n, obj in rows.rows:
        where = rows.where(n)
        name, record = _record(obj, where)
        layouts.setdefault(name, n)
        if len(layouts) > 1 and "text" in layouts:
            other, first = next((k, m) for k, m in layouts.items() if k != name)
            raise FinetuneError(f"{where}: a {name} example in a data set of {other} examples (the first at "
                                f"{rows.unit} {first}); \"text\" (every token trained) does not mix with the "
                                f"layouts trained on answers")
        records.append((n, record))
    return Source(rows, " + ".join(layouts), records)


LAYOUTS = ('"messages" (chat: role / content turns), "conversations" (ShareGPT: from / value turns), '
           '"prompt" + "completion" (or "response"), "instruction" + "output" (+ "input", Alpaca), '
           '"text" (language modelling)')
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system"}


def _record(obj, where: str):
    """(layout name, record) of one example, in the first layout whose keys it has: {"messages": turns,
    "train_from": i} (the assistant turns from index i on are trained) or {"text": str}."""
    if not isinstance(obj, dict):
        raise FinetuneError(f"{where}: expected a JSON object with one of {LAYOUTS}; got {type(obj).__name__}")
    if "messages" in obj:
        return "messages", _chat(obj["messages"], "messages", where)
    if "conversations" in obj:
        return "ShareGPT", _sharegpt(obj["conversations"], where)
    completion = "completion" if "completion" in obj else "response"
    if "prompt" in obj and completion in obj:
        prompt, answer = obj["prompt"], obj[completion]
        if isinstance(prompt, list) and isinstance(answer, list):   # TRL's conversational prompt-completion
            msgs = _chat(prompt + answer, f"prompt + {completion}", where, first_trained=len(prompt))
            if not answer or any(m["role"] != "assistant" for m in answer):
                raise FinetuneError(f"{where}: a conversational \"{completion}\" must hold assistant turns only")
            return "prompt-completion (conversational)", msgs
        _strings(obj, ("prompt", completion), where)
        return "prompt-completion", _turns(obj.get("system"), prompt, answer, where)
    if "instruction" in obj and "output" in obj:
        _strings(obj, ("instruction", "input", "output"), where)
        user = obj["instruction"] + (f"\n\n{obj['input']}" if obj.get("input") else "")
        return "Alpaca", _turns(obj.get("system"), user, obj["output"], where)
    if "text" in obj:
        _strings(obj, ("text",), where)
        if not obj["text"]:
            raise FinetuneError(f"{where}: \"text\" is empty")
        return "text", {"text": obj["text"]}
    raise FinetuneError(f"{where}: no known example layout in keys {sorted(obj)}; expected one of {LAYOUTS}")


def _strings(obj, keys, where: str) -> None:
    bad = [k for k in keys if k in obj and not isinstance(obj[k], str)]
    if bad:
        raise FinetuneError(f"{where}: {' and '.join(chr(34) + k + chr(34) for k in bad)} must be "
                            f"{'a string' if len(bad) == 1 else 'strings'} (got {type(obj[bad[0]]).__name__})")


def _turns(system, user: str, assistant: str, where: str) -> dict:
    msgs = [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    if system is not None:
        if not isinstance(system, str):
            raise FinetuneError(f"{where}: \"system\" must be a string")
        if system:
            msgs.insert(0, {"role": "system", "content": system})
    return {"messages": msgs, "train_from": 0}


def _chat(msgs, key: str, where: str, first_trained: int = 0) -> dict:
    if not isinstance(msgs, list) or not msgs:
        raise FinetuneError(f"{where}: \"{key}\" must be a non-empty list")
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise FinetuneError(f"{where}: {key}[{i}] must be {{\"role\": str, \"content\": str}}")
        if m["role"] not in ROLES:
            raise FinetuneError(f"{where}: {key}[{i}] has role {m['role']!r} (expected one of {ROLES})")
    if msgs[-1]["role"] != "assistant":
        raise FinetuneError(f"{where}: the last message must be the assistant's (the text to learn)")
    return {"messages": [{"role": m["role"], "content": m["content"]} for m in msgs], "train_from": first_trained}


def _sharegpt(turns, where: str) -> dict:
    if not isinstance(turns, list) or not turns:
        raise FinetuneError(f"{where}: \"conversations\" must be a non-empty list")
    msgs = []
    for i, t in enumerate(turns):
        if not isinstance(t, dict) or not isinstance(t.get("from"), str) or not isinstance(t.get("value"), str):
            raise FinetuneError(f"{where}: conversations[{i}] must be {{\"from\": str, \"value\": str}}")
        if t["from"] not in SHAREGPT_ROLES:
            raise FinetuneError(f"{where}: conversations[{i}] is from {t['from']!r} (expected one of "
                                f"{tuple(SHAREGPT_ROLES)})")
        msgs.append({"role": SHAREGPT_ROLES[t["from"]], "content": t["value"]})
    return _chat(msgs, "conversations", where)


def _render(tokenizer, messages, generation_prompt: bool) -> str:
    template = tokenizer.chat_template or FALLBACK_TEMPLATE
    return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                         add_generation_prompt=generation_prompt)


def _assistant_spans(tokenizer, messages, train_from: int, where: str):
    """(full text, [(start, end) character spans of trained assistant turns], whether a turn was skipped)."""
    full = _render(tokenizer, messages, False)
    spans, skipped = [], False
    for i, m in enumerate(messages):
        if m["role"] != "assistant" or i < train_from:
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


def _tokens(tokenizer, record: dict, where: str):
    """(token ids, labels, whether an earlier assistant turn was skipped) of one record."""
    if "text" in record:   # language modelling: every token, then EOS as TRL adds it
        ids = list(tokenizer(record["text"])["input_ids"])
        eos = tokenizer.eos_token
        if eos is not None and not record["text"].endswith(eos):
            ids.append(tokenizer.eos_token_id)
        return ids, list(ids), False
    text, spans, skipped = _assistant_spans(tokenizer, record["messages"], record["train_from"], where)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    labels = [tok if any(s <= a < e for s, e in spans) else -100 for tok, (a, _) in zip(ids, offsets)]
    return ids, labels, skipped


def tokenize(source: Source, tokenizer, max_len: int) -> list:
    """Examples with labels on the trained tokens; truncation and drops are warned about once."""
    if not getattr(tokenizer, "is_fast", False):
        raise FinetuneError("the tokenizer is not a fast (tokenizers-backed) tokenizer; ktmoe finetune needs "
                            "character offsets to find the assistant tokens")
    path, unit = source.rows.path, source.rows.unit
    examples, truncated, dropped, skipped_turns = [], [], [], 0
    for n, record in source.records:
        ids, labels, skipped = _tokens(tokenizer, record, source.rows.where(n))
        skipped_turns += skipped
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
                      f"truncated (first at {unit} {truncated[0]})", stacklevel=2)
    what = "token" if source.layout == "text" else "assistant token"
    if dropped:
        warnings.warn(f"{path}: {len(dropped)} example(s) have no {what} to train on after "
                      f"truncation and were dropped (first at {unit} {dropped[0]})", stacklevel=2)
    if not examples:
        raise FinetuneError(f"--data {path}: no example has any {what} to train on")
    return examples


def load(path: Path, tokenizer, max_len: int):
    """(examples, a description of the data: its layout and file format)."""
    source = read(path)
    return tokenize(source, tokenizer, max_len), source.describe()


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
