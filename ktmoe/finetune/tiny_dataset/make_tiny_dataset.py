"""Generates tiny_instructions.jsonl, the instruction data set of `ktmoe finetune`'s default job.

Short, templated tasks a tiny model can visibly learn in a few minutes on a laptop CPU:
two-number arithmetic, reversing / capitalising / counting the letters of a word, country
capitals, opposites and "what comes after N", some with a system message or a second turn.
Most lines are chat `messages`; one in five is a `prompt` / `response` pair, so both input
formats of `ktmoe finetune --data` are exercised. Deterministic (seed 0):

    python ktmoe/finetune/tiny_dataset/make_tiny_dataset.py      # rewrites tiny_instructions.jsonl
"""
import json
import random
from pathlib import Path

WORDS = ["apple", "river", "stone", "cloud", "green", "tiger", "house", "light", "music", "paper",
         "happy", "ocean", "bread", "chair", "plant", "smile", "train", "water", "zebra", "candle",
         "garden", "pencil", "rabbit", "silver", "window", "orange", "planet", "forest", "yellow", "guitar"]
CAPITALS = [("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"),
            ("Japan", "Tokyo"), ("Canada", "Ottawa"), ("Egypt", "Cairo"), ("Kenya", "Nairobi"),
            ("Peru", "Lima"), ("Norway", "Oslo"), ("Greece", "Athens"), ("Poland", "Warsaw"),
            ("Chile", "Santiago"), ("India", "New Delhi"), ("China", "Beijing"), ("Brazil", "Brasilia")]
OPPOSITES = [("hot", "cold"), ("up", "down"), ("big", "small"), ("fast", "slow"), ("day", "night"),
             ("open", "closed"), ("light", "dark"), ("happy", "sad"), ("old", "new"), ("early", "late"),
             ("full", "empty"), ("hard", "soft"), ("left", "right"), ("wet", "dry"), ("loud", "quiet")]
SYSTEM = "You are a helpful assistant. Answer briefly."


def arithmetic(rng):
    a, b = rng.randint(0, 20), rng.randint(0, 20)
    if rng.random() < 0.5:
        return f"What is {a} + {b}?", f"{a} + {b} = {a + b}."
    a, b = max(a, b), min(a, b)
    return f"What is {a} - {b}?", f"{a} - {b} = {a - b}."


def reverse(rng):
    w = rng.choice(WORDS)
    return f'Reverse the word "{w}".', w[::-1]


def upper(rng):
    w = rng.choice(WORDS)
    return f'Write "{w}" in capital letters.', w.upper()


def count(rng):
    w = rng.choice(WORDS)
    return f'How many letters are in "{w}"?', f'"{w}" has {len(w)} letters.'


def capital(rng):
    country, city = rng.choice(CAPITALS)
    return f"What is the capital of {country}?", f"The capital of {country} is {city}."


def opposite(rng):
    word, opp = rng.choice(OPPOSITES)
    return f"What is the opposite of {word}?", f"The opposite of {word} is {opp}."


def after(rng):
    n = rng.randint(0, 98)
    return f"What number comes after {n}?", f"{n + 1} comes after {n}."


TASKS = [arithmetic, reverse, upper, count, capital, opposite, after]


def example(rng, i: int) -> dict:
    q, a = rng.choice(TASKS)(rng)
    if i % 5 == 4:
        return {"prompt": q, "response": a}
    messages = [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    if i % 7 == 0:
        messages.insert(0, {"role": "system", "content": SYSTEM})
    if i % 11 == 0:
        q2, a2 = rng.choice(TASKS)(rng)
        messages += [{"role": "user", "content": q2}, {"role": "assistant", "content": a2}]
    return {"messages": messages}


def main(n: int = 320, path: Path = Path(__file__).with_name("tiny_instructions.jsonl")) -> None:
    rng = random.Random(0)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            f.write(json.dumps(example(rng, i)) + "\n")


if __name__ == "__main__":
    main()
