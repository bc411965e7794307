"""Which experts run on the GPU (issue 24; design.md 13): pure Python, no torch.

- `check_gpu_experts(value)`: the `gpu_experts=` option, normalised ("off", N, "auto", ids)
  or ValueError naming the argument.
- `resident(layers, choice, budget, expert_bytes)`: per layer, the experts kept on the GPU:
  the hottest by routing counts (`hottest`), as many as N per layer or, on "auto", as many as
  the byte budget allows, hottest first over all layers.
- `split(tokens, cost)`: per layer and call, the cost model: which experts' tokens run on the
  GPU and which in the CPU kernel so that the slower side finishes first (`CostModel`).
- `RoutingCounts`: routing counts per layer, gathered by ktmoe.torch.count_routing.
"""
from __future__ import annotations

from dataclasses import dataclass


def check_gpu_experts(value):
    """'off' (0 / None / False), an int N >= 1 (N per layer), 'auto', or a tuple of distinct
    expert ids >= 0 (the same in every layer); anything else raises ValueError."""
    if value is None or value is False or (isinstance(value, int) and not isinstance(value, bool) and value == 0):
        return "off"
    if isinstance(value, str):
        if value == "auto":
            return "auto"
        raise ValueError(f"gpu_experts: expected 'auto', an int >= 0 or a list of expert ids, got {value!r}")
    if isinstance(value, bool) or (isinstance(value, int) and value < 0):
        raise ValueError(f"gpu_experts: expected 'auto', an int >= 0 or a list of expert ids, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, (list, tuple, set, frozenset, range)):
        ids = list(value)
        if not ids or not all(isinstance(e, int) and not isinstance(e, bool) and e >= 0 for e in ids) \
                or len(set(ids)) != len(ids):
            raise ValueError(f"gpu_experts: a list of expert ids must be non-empty, distinct ints >= 0, got {value!r}")
        return tuple(sorted(ids))
    raise ValueError(f"gpu_experts: expected 'auto', an int >= 0 or a list of expert ids, got "
                     f"{type(value).__name__} {value!r}")


def expert_bytes(hidden_size: int, intermediate_size: int) -> int:
    """GPU bytes of one resident expert: gate, up and down as bf16 (3 H I 2), whatever the
    kernel's format (quantized experts are dequantized to bf16 on the GPU)."""
    return 3 * hidden_size * intermediate_size * 2


def hottest(counts, n: int) -> list:
    """The n experts with the most routed tokens (ties: the lower id), as sorted ids."""
    order = sorted(range(len(counts)), key=lambda e: (-counts[e], e))
    return sorted(order[:n])


def resident(layers: dict, choice, *, budget: int | None = None, counts: dict | None = None) -> dict:
    """{layer name: sorted expert ids to keep on the GPU} for layers {name: (E, bytes per
    expert)} and a checked gpu_experts choice (check_gpu_experts):

    - ids: those ids in every layer (each must be < that layer's E);
    - N: the N hottest of each layer (min(N, E)); counts {name: [count per expert]} needed
      unless N >= E;
    - 'auto': the hottest (layer, expert) pairs over all layers, by count, while their bytes fit
      in `budget`; counts needed unless every expert of every layer fits.
    Raises ValueError naming the argument at fault."""
    if choice == "off":
        return {}
    if isinstance(choice, tuple):
        out = {}
        for name, (E, _) in layers.items():
            if choice[-1] >= E:
                raise ValueError(f"gpu_experts: expert id {choice[-1]} is out of range for {name} (E={E})")
            out[name] = list(choice)
        return out

    def counts_of(name, E):
        if counts is None or name not in counts:
            raise ValueError(f"expert_counts: needed to pick the hottest experts of {name} (gpu_experts={choice!r} "
                             f"keeps fewer than its {E} experts): routing counts per layer, e.g. from "
                             f"ktmoe.torch.count_routing")
        c = list(counts[name])
        if len(c) != E or not all(isinstance(v, (int, float)) and v >= 0 for v in c):
            raise ValueError(f"expert_counts: {name} needs {E} counts >= 0, got {c!r}")
        return c

    if choice != "auto":
        return {name: (list(range(E)) if choice >= E else hottest(counts_of(name, E), choice))
                for name, (E, _) in layers.items()}
    if budget is None or not isinstance(budget, int) or isinstance(budget, bool) or budget < 0:
        raise ValueError(f"gpu_memory: gpu_experts='auto' needs a byte budget (an int >= 0), got {budget!r}")
    if sum(E * b for E, b in layers.values()) <= budget:
        return {name: list(range(E)) for name, (E, _) in layers.items()}
    pairs = []
    for name, (E, b) in layers.items():
        c = counts_of(name, E)
        pairs += [(-c[e], name, e, b) for e in range(E)]
    out, used = {name: [] for name in layers}, 0
    for _, name, e, b in sorted(pairs):
        if used + b <= budget:
            out[name].append(e)
            used += b
    return {name: sorted(ids) for name, ids in out.items() if ids}


@dataclass(frozen=True)
class CostModel:
    """The measured rates the split is chosen from (design.md 13):

        flops(n)  = n * 2 * (3 H I + r (2 H + 3 I)) * passes    (base + LoRA, per expert with n tokens)
        cpu(e)    = flops(n_e) / cpu_flops
        gpu(e)    = flops(n_e) / gpu_flops + (0 if e is resident else weight_bytes / h2d_bytes_per_s)
        time(S)   = max(sum of cpu(e) for e not in S, sum of gpu(e) for e in S)

    S, the experts computed on the GPU, minimises time(S): the two sides run concurrently (the
    kernel is submitted first; streamed weights are copied on a side stream), so the slower side
    sets the time. passes: 1 for a forward, 3 for forward + backward (the backward does about
    twice the forward's products). weight_bytes: one expert's bytes on the host (bf16: 3 H I 2)."""
    hidden_size: int
    intermediate_size: int
    cpu_flops: float
    gpu_flops: float
    h2d_bytes_per_s: float
    lora_rank: int = 0
    weight_bytes: int | None = None
    passes: int = 3

    def __post_init__(self):
        for name in ("hidden_size", "intermediate_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name}: expected an int >= 1, got {v!r}")
        for name in ("cpu_flops", "gpu_flops", "h2d_bytes_per_s"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not v > 0 or v == float("inf"):
                raise ValueError(f"{name}: expected a finite number > 0, got {v!r}")
        if not isinstance(self.lora_rank, int) or self.lora_rank < 0:
            raise ValueError(f"lora_rank: expected an int >= 0, got {self.lora_rank!r}")
        if self.passes not in (1, 3):
            raise ValueError(f"passes: 1 (forward) or 3 (forward + backward), got {self.passes!r}")
        if self.weight_bytes is not None and (not isinstance(self.weight_bytes, int) or self.weight_bytes < 0):
            raise ValueError(f"weight_bytes: expected an int >= 0 or None, got {self.weight_bytes!r}")

    def flops(self, tokens: int) -> float:
        H, I, r = self.hidden_size, self.intermediate_size, self.lora_rank
        return tokens * 2.0 * (3 * H * I + r * (2 * H + 3 * I)) * self.passes

    def cpu_seconds(self, tokens: int) -> float:
        return self.flops(tokens) / self.cpu_flops

    def gpu_seconds(self, tokens: int, resident: bool) -> float:
        wb = expert_bytes(self.hidden_size, self.intermediate_size) if self.weight_bytes is None else self.weight_bytes
        return self.flops(tokens) / self.gpu_flops + (0.0 if resident else wb / self.h2d_bytes_per_s)


@dataclass(frozen=True)
class Split:
    gpu: tuple          # expert ids computed on the GPU
    cpu_seconds: float  # the CPU kernel's modelled time
    gpu_seconds: float  # the GPU's (compute + weight copies)

    @property
    def seconds(self) -> float:
        return max(self.cpu_seconds, self.gpu_seconds)


def split(tokens, cost: CostModel, resident=(), stream: bool = True) -> Split:
    """The split of one layer call with tokens[e] rows routed to expert e. Candidates for the
    GPU: the resident experts, and with stream=True every other expert too (its weights
    copied in). Experts with no tokens stay where they cost nothing (the CPU). The candidates
    are ordered by cpu / gpu time (most gained per GPU second first) and the best prefix of
    that order is taken (the optimum of the fractional problem; whole experts make it at most
    one expert's time worse); ties go to fewer GPU experts."""
    if any(not isinstance(n, int) or isinstance(n, bool) or n < 0 for n in tokens):
        raise ValueError(f"tokens: expected ints >= 0 per expert, got {list(tokens)!r}")
    res = set(resident)
    if res and (min(res) < 0 or max(res) >= len(tokens)):
        raise ValueError(f"resident: expert ids must be in [0, {len(tokens)}), got {sorted(res)}")
    cpu = [cost.cpu_seconds(n) for n in tokens]
    gpu = [cost.gpu_seconds(n, e in res) for e, n in enumerate(tokens)]
    cands = [e for e, n in enumerate(tokens) if n > 0 and (stream or e in res)]
    cands.sort(key=lambda e: (-(cpu[e] / gpu[e]) if gpu[e] > 0 else float("-inf"), e))
    cpu_left, gpu_used = sum(cpu), 0.0
    best = (max(cpu_left, gpu_used), 0, cpu_left, gpu_used)
    for i, e in enumerate(cands, 1):
        cpu_left -= cpu[e]
        gpu_used += gpu[e]
        t = max(cpu_left, gpu_used)
        if t < best[0]:
            best = (t, i, cpu_left, gpu_used)
    return Split(tuple(sorted(cands[:best[1]])), max(best[2], 0.0), best[3])


class RoutingCounts(dict):
    """{experts module name: [tokens routed to each expert]}, filled by count_routing."""

    def add(self, name: str, counts) -> None:
        """Adds one call's tokens per expert to layer `name`'s counts."""
        c = self.setdefault(name, [0] * len(counts))
        if len(c) != len(counts):
            raise ValueError(f"counts: {name} has {len(c)} experts, got {len(counts)} counts")
        for e, n in enumerate(counts):
            c[e] += int(n)
