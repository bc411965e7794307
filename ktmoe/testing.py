"""The one harness that compares the kernel with the numpy reference (design.md 6), and the
case table the kernel tests draw from. Used by tests/, `ktmoe verify` and the bench checks.

    assert_matches_reference(layer_kwargs, x, ids, weights, lora, isa=...)

runs ktmoe.MoEExperts forward (keep_for_backward) and backward, with LoRA gradient buffers
pre-filled with random values (gradients must ACCUMULATE, and experts with no token must
be left untouched), then checks y, dx, dw and every LoRA gradient against ktmoe.reference
with the design.md 6 limits (ktmoe/formats.py TOLERANCES): relative Frobenius error <= 1e-2
and cosine >= 0.9999; where the reference is exactly zero the kernel must be exactly zero.
The worst error per (path, tensor) is kept in WORST for the summary tests/conftest.py prints.
run_against_reference() is the same run without the assertions (`ktmoe verify` reports its
errors); compare() / rel_error() are the metric.

The make_* functions build small random problems of the right scale (every term, LoRA
included, contributes O(1), so a missing or wrong term shows up well above 1e-2). CASES
(and QUANTIZED_CASES, PREQUANTIZED_CASES, which reuse its routings at other sizes) are the
routing / shape cases of design.md 11 as data: Case.route(rng) draws a case's routing.
"""
import ctypes
import dataclasses
import mmap
import os
import time
from types import SimpleNamespace

import ml_dtypes
import numpy as np

import ktmoe
from ktmoe import formats, lora_layout, reference

BF16 = ml_dtypes.bfloat16
WORST = {}   # (isa, tensor name) -> (largest relative error, smallest cosine, test with the largest error)

try:
    import torch
except ImportError:   # torch is a test dependency; only test_torch_inputs.py needs it
    torch = None


def is_torch(a):
    return torch is not None and isinstance(a, torch.Tensor)


def to64(a):
    """float64 numpy copy of a numpy array or torch tensor (bf16 and fp32 convert exactly)."""
    if is_torch(a):
        return a.detach().to(torch.float64).numpy()
    return np.asarray(a, dtype=np.float64)


def to_numpy(a):
    """A numpy array with the same values and dtype (torch bf16 becomes ml_dtypes bf16)."""
    if is_torch(a):
        if a.dtype == torch.bfloat16:
            return a.detach().float().numpy().astype(BF16)
        return a.detach().numpy().copy()
    return a


def dtype_name(a):
    return str(a.dtype).replace("torch.", "")


# ---------------------------------------------------------------- random problems

def make_weights(rng, E, H, I, dtype=BF16, fused=True):
    """Base weights scaled so G, U, D are O(1). Returns MoEExperts keyword arguments."""
    Wg = rng.standard_normal((E, I, H)) / np.sqrt(H)
    Wu = rng.standard_normal((E, I, H)) / np.sqrt(H)
    Wd = rng.standard_normal((E, H, I)) / np.sqrt(I)
    if fused:
        return dict(gate_up=np.concatenate([Wg, Wu], axis=1).astype(dtype), down=Wd.astype(dtype))
    return dict(gate=Wg.astype(dtype), up=Wu.astype(dtype), down=Wd.astype(dtype))


def make_routing(rng, T, k, E, minus_one=0.0, id_dtype=np.int32, w_dtype=np.float32):
    """Distinct experts per token (as a top-k router gives), weights in (0, 1)."""
    ids = np.stack([rng.permutation(E)[:k] for _ in range(T)]).astype(id_dtype)
    if minus_one:
        ids[rng.random((T, k)) < minus_one] = -1
    w = (0.1 + rng.random((T, k))).astype(w_dtype)
    return ids, w


def make_lora(rng, layout, E, H, I, ranks, dtype=np.float32, scale=2.0, zero_B=False):
    """A reference.LoRA; ranks = {projection: r} ("gate"/"up"/"down", or "gate_up"/"down" for PEFT).

    A is PEFT's kaiming-uniform range; B is random (or zeros, PEFT's init) and sized so the
    LoRA term is about half the base term.
    """
    def pair(r, n_in, n_out, peft):
        A = rng.uniform(-1, 1, (E * r, n_in) if peft else (E, r, n_in)) / np.sqrt(n_in)
        B = rng.standard_normal((n_out, E * r) if peft else (E, n_out, r)) * (0.5 / np.sqrt(r))
        if zero_B:
            B[...] = 0
        return A.astype(dtype), B.astype(dtype)
    dims = {"gate": (H, I), "up": (H, I), "down": (I, H), "gate_up": (H, 2 * I)}
    params = {name: pair(r, *dims[name], layout == "peft") for name, r in ranks.items()}
    if layout == "peft":
        return reference.LoRA.peft(**params, scale=scale)
    return reference.LoRA(**params, scale=scale)


def ktmoe_lora(lora, arrays=None):
    """The ktmoe.LoRA of a reference.LoRA (same layout), over `arrays` {name: (A, B)} if given."""
    arrays = lora.params if arrays is None else arrays
    if lora.layout == "peft":
        return ktmoe.LoRA.peft(**arrays, scale=lora.scale)
    return ktmoe.LoRA(**arrays, scale=lora.scale)


def ktmoe_grads(lora, arrays):
    """The ktmoe.LoRAGrads over gradient buffers `arrays` {name: (dA, dB)} in a reference.LoRA's layout."""
    if lora.layout == "peft":
        return ktmoe.LoRAGrads.peft(**arrays)
    return ktmoe.LoRAGrads(**arrays)


def reference_weights(layer_kwargs):
    """(Wg, Wu, Wd) as numpy from MoEExperts keyword arguments (fused or split)."""
    if layer_kwargs.get("gate_up") is not None:
        gu = to_numpy(layer_kwargs["gate_up"])
        I = gu.shape[1] // 2
        return gu[:, :I], gu[:, I:], to_numpy(layer_kwargs["down"])
    return tuple(to_numpy(layer_kwargs[n]) for n in ("gate", "up", "down"))


def make_prequantized(rng, fmt, E, H, I, *, group_size=32, block=(128, 128), fused=True,
                      scale_dtype=np.float32, packing="nibbles"):
    """Layer arguments for MoEExperts.from_quantized, as a published checkpoint holds them, with
    the reference's weights: {"from_quantized": kwargs, "reference": (Qg, Qu, Qd)}.

    fmt "int4": random codes over all of [-8, 7] (-8 included) and random scales (bf16 or fp32
    as scale_dtype), packed as ktmoe's nibbles or compressed-tensors' int32 words (packing);
    "int4bs": the same with bf16 scales (its format's scale dtype; scale_dtype is ignored);
    "fp8": make_weights quantized by reference.quantize_fp8 with `block` (codes over the whole
    e4m3 range, subnormals included); "int8": reference.quantize's codes given as they are.
    Weights are O(1 / sqrt(fan_in)) like make_weights'."""
    if fmt == "fp8":
        w = make_weights(rng, E, H, I, dtype=np.float32, fused=False)
        Q = tuple(reference.quantize_fp8(w[n], block) for n in ("gate", "up", "down"))
        pack = lambda q: q.q.view(ml_dtypes.float8_e4m3fn)       # noqa: E731  (the dtype a checkpoint has)
        scales = [q.scale.astype(scale_dtype) for q in Q]
        Q = tuple(reference.fp8_weight(q.q, s, block) for q, s in zip(Q, scales))
        opts = {"block": block}
    elif fmt == "int8":
        w = make_weights(rng, E, H, I, dtype=np.float32, fused=False)
        Q = tuple(reference.quantize(w[n], "int8") for n in ("gate", "up", "down"))
        pack = lambda q: q.q                                      # noqa: E731
        scales = [q.scale.astype(scale_dtype) for q in Q]
        Q = tuple(reference.QuantizedWeight(q.q, s.astype(np.float32), "int8", q.group_size, q.shape)
                  for q, s in zip(Q, scales))
        opts = {}
    else:
        if formats.WEIGHT_FORMATS[fmt].scale_dtype == "bfloat16":
            scale_dtype = BF16

        def one(rows, cols):
            q = rng.integers(-8, 8, (E, rows, cols)).astype(np.int8)
            q[:, 0, :2] = (-8, 7)
            s = rng.uniform(0.5, 1.5, (E, rows, cols // group_size)) / (4.6 * np.sqrt(cols))
            return reference.int4_weight(q, s.astype(scale_dtype), group_size, format=fmt)
        Q = (one(I, H), one(I, H), one(H, I))
        if packing == "pack-quantized":
            pack = lambda q: reference.pack_quantized(q.q)        # noqa: E731
        else:
            pack = lambda q: reference.pack_int4(q.q)             # noqa: E731
        scales = [q.scale.astype(scale_dtype) for q in Q]
        opts = {"group_size": group_size, "int4_packing": packing}
    codes = [pack(q) for q in Q]
    if fused:
        kw = dict(gate_up=(np.concatenate(codes[:2], axis=1), np.concatenate(scales[:2], axis=1)))
    else:
        kw = dict(gate=(codes[0], scales[0]), up=(codes[1], scales[1]))
    return {"from_quantized": dict(weights=fmt, down=(codes[2], scales[2]), **kw, **opts), "reference": Q}


def quantized_reference(layer_kwargs, layer):
    """(Wg, Wu, Wd) for the reference: arrays (bf16 layer) or reference.QuantizedWeight's made
    by the reference quantizer (quantized layer), or given (pre-quantized layer, layer_kwargs
    from make_prequantized). For a quantized layer the kernel's stored values and scales must
    equal the reference's bit for bit."""
    if "reference" in layer_kwargs:
        for proj, qw in zip(("gate", "up", "down"), layer_kwargs["reference"]):
            q, scale = layer.quantized_weights(proj)
            assert np.array_equal(q, qw.q), f"{proj}: kernel's stored codes differ from the given ones"
            assert np.array_equal(scale, qw.scale.reshape(scale.shape)), f"{proj}: kernel's scales differ from the given ones"
        return layer_kwargs["reference"]
    weights = reference_weights(layer_kwargs)
    if layer.weights == "bf16":
        return weights
    group = layer.group_size if formats.grouped(layer.weights) else None
    out = []
    for proj, w in zip(("gate", "up", "down"), weights):
        qw = reference.quantize(w, layer.weights, **({"group_size": group} if group else {}))
        q, scale = layer.quantized_weights(proj)
        assert np.array_equal(q, qw.q), f"{proj}: kernel's quantized values differ from reference.quantize's"
        assert np.array_equal(scale, qw.scale.reshape(scale.shape)), f"{proj}: kernel's scales differ from the reference's"
        out.append(qw)
    return tuple(out)


def path_name(layer):
    """ISA plus weight format, the key of the error summary (amx, amx int8, amx int4/g32 w8a8...)."""
    fmt = formats.path_label(layer.weights, layer.activations, layer.group_size, layer.block, layer.prequantized)
    return f"{layer.isa} {fmt}" if fmt else layer.isa


def expert_slices(layout, name, E, shape_A):
    """For each expert e, index expressions selecting its part of (A, B) in this layout."""
    if layout == "peft":
        r = shape_A[0] // E
        return {e: lora_layout.expert_parts(E, r, e) for e in range(E)}
    return {e: ((e,), (e,)) for e in range(E)}


# ---------------------------------------------------------------- the case table (design.md 11)

def _routing_random(rng, c):
    return make_routing(rng, c.T, c.k, c.E, minus_one=c.minus_one)


def _routing_every_expert_hit(rng, c):
    ids, w = make_routing(rng, c.T, c.k, c.E)
    ids[:, 0] = np.arange(c.T) % c.E
    ids[:, 1] = (np.arange(c.T) + 3) % c.E
    return ids, w


def _routing_expert_without_token(rng, c):
    """Expert E // 2 gets no token."""
    live = [e for e in range(c.E) if e != c.E // 2]
    ids = np.stack([rng.choice(live, c.k, replace=False) for _ in range(c.T)]).astype(np.int32)
    return ids, (0.1 + rng.random((c.T, c.k))).astype(np.float32)


def _routing_one_expert_takes_all(rng, c):
    ids, w = make_routing(rng, c.T, c.k, c.E - 1)
    ids[:, 0] = c.E - 1            # the last expert has every token; others share the second slot
    return ids, w


def _routing_all_on_last_expert(rng, c):
    ids, w = make_routing(rng, c.T, c.k, c.E)
    ids[:] = c.E - 1
    return ids, w


def _routing_token_routed_nowhere(rng, c):
    ids, w = make_routing(rng, c.T, c.k, c.E, minus_one=c.minus_one)
    ids[5] = -1                    # a token routed nowhere
    return ids, w


def _routing_all_minus_one(rng, c):
    ids, w = make_routing(rng, c.T, c.k, c.E)
    ids[:] = -1
    return ids, w


def _routing_hot_expert(rng, c):
    ids, w = make_routing(rng, c.T, c.k, c.E)
    ids[:, 0] = 0                  # expert 0 takes every token: more rows than one task block
    ids[:, 1] = 1 + np.arange(c.T) % 2
    return ids, w


ROUTINGS = {"random": _routing_random, "every_expert_hit": _routing_every_expert_hit,
            "expert_without_token": _routing_expert_without_token,
            "one_expert_takes_all": _routing_one_expert_takes_all, "all_on_last_expert": _routing_all_on_last_expert,
            "token_routed_nowhere": _routing_token_routed_nowhere, "all_minus_one": _routing_all_minus_one,
            "hot_expert": _routing_hot_expert}


@dataclasses.dataclass(frozen=True)
class Case:
    """One shape / routing case: sizes, how its routing is drawn (ROUTINGS) and, for the suites
    that take them, the LoRA layout, fused weights, B = 0, the fp8 block and the int4 group."""
    E: int
    H: int
    I: int
    r: int
    T: int
    k: int
    routing: str = "random"
    minus_one: float = 0.0
    layout: str = "peft"
    fused: bool = True
    zero_B: bool = False
    block: tuple = (128, 32)
    group: int = 32

    def route(self, rng):
        """(topk_ids int32 [T, k], topk_weights float32 [T, k]) of this case."""
        return ROUTINGS[self.routing](rng, self)

    def ranks(self, layout=None):
        """The LoRA ranks of `layout` (default: the case's): {projection: r}."""
        layout = layout or self.layout
        return {"gate_up": self.r, "down": self.r} if layout == "peft" else {"gate": self.r, "up": self.r,
                                                                              "down": self.r}


_r = dataclasses.replace
CASES = {   # the bf16 grid (tests/test_kernel_vs_reference.py) and the base of every other table
    "T1": Case(4, 64, 32, 4, 1, 2),
    "every_expert_hit": Case(8, 64, 32, 4, 16, 2, "every_expert_hit"),
    "expert_without_token": Case(6, 64, 32, 4, 20, 2, "expert_without_token"),
    "one_expert_takes_all": Case(5, 64, 32, 4, 24, 2, "one_expert_takes_all"),
    "k1_all_on_last_expert": Case(5, 64, 32, 4, 24, 1, "all_on_last_expert"),
    "minus_one_slots": Case(6, 64, 32, 4, 16, 3, "token_routed_nowhere", 0.3),
    "all_minus_one": Case(4, 64, 32, 4, 8, 2, "all_minus_one"),
    "tails_40_24_r3": Case(4, 40, 24, 3, 13, 2, minus_one=0.1),
    "tails_72_56_r5": Case(5, 72, 56, 5, 19, 3, minus_one=0.1),
    "odd_tiny_17_9_r1": Case(3, 17, 9, 1, 7, 2),
    "hot_expert_700_rows": Case(3, 40, 24, 3, 700, 2, "hot_expert"),
    "several_chunks_300_200": Case(4, 300, 200, 4, 24, 2, minus_one=0.1),   # H, I span several column chunks
    "medium_256_160": Case(8, 256, 160, 8, 64, 2),
}
# quantized weights (tests/test_quantized.py): sizes that int4 groups divide. T1 at H, I = 128, 64:
# dA of one token is rank one, at 64, 32 it measured 1.04e-2 (int4, vs 0.74e-2 on fp32 q*s)
QUANTIZED_CASES = {
    "T1": _r(CASES["T1"], H=128, I=64, layout="per_projection", fused=False),
    "every_expert_hit": _r(CASES["every_expert_hit"], H=128, I=64),
    "minus_one_slots": _r(CASES["minus_one_slots"], H=128, I=128),
    "hot_expert_700_rows": _r(CASES["hot_expert_700_rows"], H=128, I=64),
    "panels_640_384": Case(3, 640, 384, 4, 24, 2, minus_one=0.1, block=(128, 128), group=128),   # K above one
    "tails_72_56_r5": CASES["tails_72_56_r5"],        # int8 only: no int4 group divides these    # panel (512)
    "odd_tiny_17_9_r1": CASES["odd_tiny_17_9_r1"],
}
# pre-quantized codes (tests/test_prequantized.py): fp8 blocks and int4 groups per case
PREQUANTIZED_CASES = {
    "T1": QUANTIZED_CASES["T1"],
    "every_expert_hit": CASES["every_expert_hit"],                        # 4 rows per expert: M <= 4 kernels
    "k1_all_on_last_expert": _r(CASES["k1_all_on_last_expert"], layout="per_projection"),
    "minus_one_slots": CASES["minus_one_slots"],
    "zero_B": Case(4, 128, 96, 4, 20, 2, zero_B=True),
    "row_blocks_restart_at_I": Case(3, 192, 96, 3, 30, 2, minus_one=0.1, block=(64, 32)),   # fp8: I % br != 0
    "hot_expert_700_rows": _r(QUANTIZED_CASES["hot_expert_700_rows"], block=(48, 64), group=64),
    "panels_640_384": QUANTIZED_CASES["panels_640_384"],
}


# ---------------------------------------------------------------- guard pages

PAGE = mmap.PAGESIZE
PROT_NONE = 0   # <sys/mman.h>; the mmap module has PROT_READ / PROT_WRITE only


def _mprotect(addr, nbytes, prot):
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    libc.mprotect.restype = ctypes.c_int
    if libc.mprotect(ctypes.c_void_p(addr), nbytes, prot) != 0:
        raise OSError(ctypes.get_errno(), "mprotect")


def guarded_buffer(nbytes, side):
    """(a writable uint8 array of nbytes in its own mmap, flush against a PROT_NONE page).

    side "after": the buffer ends exactly at the page boundary before the guard page;
    side "before": it starts exactly at the page boundary after the guard page. The mmap
    stays alive as long as the array (numpy keeps the buffer's owner referenced)."""
    data_pages = max(1, -(-nbytes // PAGE))
    mm = mmap.mmap(-1, (data_pages + 1) * PAGE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    base = ctypes.addressof(ctypes.c_char.from_buffer(mm))
    if side == "after":
        guard, offset = base + data_pages * PAGE, data_pages * PAGE - nbytes
    elif side == "before":
        guard, offset = base, PAGE
    else:
        raise ValueError(side)
    buf = np.frombuffer(mm, dtype=np.uint8, count=nbytes, offset=offset)
    _mprotect(guard, PAGE, PROT_NONE)
    start = buf.__array_interface__["data"][0]
    assert (start + nbytes == guard) if side == "after" else (start == guard + PAGE)
    return buf


def guarded(values, side):
    """A writable copy of `values` (C-contiguous) flush against a PROT_NONE page (guarded_buffer)."""
    values = np.ascontiguousarray(values)
    arr = guarded_buffer(values.nbytes, side).view(values.dtype).reshape(values.shape)
    arr[...] = values
    return arr


def guarded_matrix(rows, cols, ld, dtype, side, fill):
    """A [rows, cols] view with row stride ld (elements) of a guarded buffer holding exactly
    (rows - 1) * ld + cols elements, every element (the gaps between rows too) set to `fill`."""
    dtype = np.dtype(dtype)
    n = (rows - 1) * ld + cols if rows and cols else 0
    flat = guarded_buffer(n * dtype.itemsize, side).view(dtype)
    flat[...] = fill
    if n == 0:
        return np.zeros((rows, cols), dtype), flat
    return np.lib.stride_tricks.as_strided(flat, (rows, cols), (ld * dtype.itemsize, dtype.itemsize)), flat


# ---------------------------------------------------------------- the GEMM harness

@dataclasses.dataclass(frozen=True)
class GemmTarget:
    """One GEMM this CPU runs: bf16 (gemm.h, fp32 out) or int8 (gemm_int8.h, int32 out), nt or
    nn, on one kernel target of the build (the avx512 sub-variants without BF16 / VNNI are their
    own target, avx512f, compiled without those instructions)."""
    dtype: str      # "bf16" or "int8"
    kind: str       # "nt" (W [N, K]) or "nn" (W [K, N])
    isa: str

    @property
    def name(self) -> str:
        return f"{self.dtype}-{self.kind}-{self.isa}"

    def __call__(self, A, W, C, accumulate):
        from ._kernels import _gemm
        fn = _gemm.gemm if self.dtype == "bf16" else _gemm.igemm
        return fn(self.kind, self.isa, A, W, C, accumulate)


def gemm_targets() -> list:
    """Every GemmTarget this CPU can run: each GEMM x each kernel target of ktmoe.available_isas()."""
    return [GemmTarget(dtype, kind, isa) for isa in ktmoe.available_isas()
            for dtype in ("bf16", "int8") for kind in ("nt", "nn")]


GEMM_SENTINEL = {"bf16": np.float32(-7.25e19), "int8": np.int32(0x5A5A1234)}


def check_gemm_guarded(target, rng, M, N, K, accumulate, side, extreme=False, tol=1e-5):
    """One GEMM call with A, W and C each flush against a PROT_NONE page (`side`), row strides
    longer than the rows (lda = K + 5, ldw = width + 3, ldc = N + 7) and, for side "after", a pad
    before C: a read or write past either end faults, and the gaps and the pad (sentinel) must
    stay untouched. C is compared with a float64 / int64 numpy product of the same values: exact
    for int8 (int32 sums), relative Frobenius error <= tol for bf16 (fp32 sums). extreme: int8
    inputs of +-127 only. Returns the relative error (0 for int8)."""
    bf16 = target.dtype == "bf16"
    in_dt, out_dt = (np.uint16, np.float32) if bf16 else (np.int8, np.int32)
    wrows, wcols = (N, K) if target.kind == "nt" else (K, N)
    lda, ldw, ldc = K + 5, wcols + 3, N + 7
    A, _ = guarded_matrix(M, K, lda, in_dt, side, 0)
    W, _ = guarded_matrix(wrows, wcols, ldw, in_dt, side, 0)
    pad = 16 if side == "after" else 0
    sentinel = GEMM_SENTINEL[target.dtype]
    cn = (M - 1) * ldc + N if M and N else 0
    cflat = guarded_buffer((pad + cn) * np.dtype(out_dt).itemsize, side).view(out_dt)
    cflat[...] = sentinel
    C = (np.lib.stride_tricks.as_strided(cflat[pad:], (M, N), (ldc * cflat.itemsize, cflat.itemsize))
         if cn else np.zeros((M, N), out_dt))
    if bf16:
        a, w = rng.standard_normal((M, K)).astype(BF16), rng.standard_normal((wrows, wcols)).astype(BF16)
        A[...], W[...] = a.view(np.uint16), w.view(np.uint16)
        c0 = rng.standard_normal((M, N)).astype(np.float32)
    elif extreme:
        A[...] = np.where(rng.random((M, K)) < 0.5, 127, -127)
        W[...] = np.where(rng.random((wrows, wcols)) < 0.5, 127, -127)
        c0 = rng.integers(-1000000, 1000001, (M, N)).astype(np.int32)
    else:
        A[...] = rng.integers(-127, 128, (M, K))
        W[...] = rng.integers(-127, 128, (wrows, wcols))
        c0 = rng.integers(-1000000, 1000001, (M, N)).astype(np.int32)
    C[...] = c0
    # float64 products and sums are exact for int8 (|sum| <= 127^2 * 65536 + 10^6 < 2^53)
    av = (A.view(BF16) if bf16 else A).astype(np.float64)
    wv = (W.view(BF16) if bf16 else W).astype(np.float64)
    ref = av @ (wv.T if target.kind == "nt" else wv) + (c0 if accumulate else 0)
    out = target(A, W, C, accumulate)
    assert out is C
    where = f"{target.name} M={M} N={N} K={K} acc={accumulate} side={side}"
    assert np.all(cflat[:pad] == sentinel), f"{where}: wrote into the pad before C"
    if cn:
        gaps = np.ones(cn, bool)
        for m in range(M):
            gaps[m * ldc:m * ldc + N] = False
        assert np.all(cflat[pad:][gaps] == sentinel), f"{where}: wrote into the gaps between C's rows"
    if not bf16:
        assert np.array_equal(C.astype(np.float64), ref), f"{where}: int32 sums differ from the exact ones"
        return 0.0
    if K == 0:   # nothing to sum: C is exactly C0 (accumulate) or zeros
        assert np.array_equal(C, c0 if accumulate else np.zeros_like(C)), where
        return 0.0
    if M == 0 or N == 0:
        return 0.0
    assert np.isfinite(C).all(), where
    err = float(np.linalg.norm(C - ref) / np.linalg.norm(ref))
    assert err <= tol, f"{where}: rel Frobenius error {err:.2e} > {tol}"
    return err


# ---------------------------------------------------------------- comparison

TOLERANCE = formats.TOLERANCES["bf16"]   # design.md 6; the quantized class has the same limits


def rel_error(got, want) -> float:
    """Relative Frobenius error ||got - want|| / ||want|| in float64 (||got|| where want is 0)."""
    got, want = to64(got), to64(want)
    nw = np.linalg.norm(want)
    return float(np.linalg.norm(got - want) / nw) if nw else float(np.linalg.norm(got))


def compare(got, want) -> tuple:
    """(relative error, cosine) of one tensor against the reference, asserting nothing."""
    got, want = to64(got), to64(want)
    if not np.any(want):
        return (0.0, 1.0) if not np.any(got) else (float("inf"), 0.0)
    nw, ng = np.linalg.norm(want), np.linalg.norm(got)
    err = float(np.linalg.norm(got - want) / nw) if np.isfinite(got).all() else float("inf")
    cos = float(np.vdot(got, want) / (nw * ng)) if ng > 0 and np.isfinite(got).all() else 0.0
    return err, cos


def check(name, got, want, isa, tolerance=None):
    """One tensor against the reference; returns (relative error, cosine)."""
    tol = tolerance or TOLERANCE
    got, want = to64(got), to64(want)
    assert got.shape == want.shape, f"{name}: shape {got.shape} != reference {want.shape}"
    if not np.any(want):
        # exactly-zero reference (B = 0 -> dA, id -1 slots, no token): exactly zero required
        assert not np.any(got), f"{name}: reference is exactly 0, kernel max |.| = {np.nanmax(np.abs(got))}"
    else:
        assert np.isfinite(got).all(), f"{name}: kernel has NaN/Inf where the reference is finite"
    err, cos = compare(got, want)
    key = (isa, name)
    old_err, old_cos, where = WORST.get(key, (-1.0, 1.0, ""))
    if err > old_err:
        where = os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0].split("::")[-1]
    WORST[key] = (max(old_err, err), min(old_cos, cos), where)
    assert err <= tol["rel"], f"{name}: relative error {err:.3e} > {tol['rel']:g} (design.md 6)"
    assert cos >= tol["cos"], f"{name}: cosine {cos:.6f} < {tol['cos']} (design.md 6)"
    return err, cos


def check_outputs(isa, ref, y=None, dx=None, dw=None, grads=None):
    """check() of each given kernel result against ref = (y, dx, dw, {name: (dA, dB)}) of
    reference.moe_forward / moe_backward; grads {name: (dA, dB)} as the buffers hold them."""
    y_ref, dx_ref, dw_ref, g_ref = ref
    for name, got, want in (("y", y, y_ref), ("dx", dx, dx_ref), ("dw", dw, dw_ref)):
        if got is not None:
            check(name, got, want, isa)
    for n, (gA, gB) in (grads or {}).items():
        check(f"dA_{n}", gA, g_ref[n][0], isa)
        check(f"dB_{n}", gB, g_ref[n][1], isa)


def make_layer(layer_kwargs, isa=None, num_threads=None):
    """The MoEExperts of harness layer arguments: MoEExperts keyword arguments, or
    make_prequantized's {"from_quantized": ..., "reference": ...} (plus "activations")."""
    threads = {} if num_threads is None else {"num_threads": num_threads}
    if "from_quantized" in layer_kwargs:
        return ktmoe.MoEExperts.from_quantized(**layer_kwargs["from_quantized"], isa=isa, **threads,
                                               activations=layer_kwargs.get("activations", "bf16"))
    return ktmoe.MoEExperts(**layer_kwargs, isa=isa, **threads)


def run_against_reference(layer_kwargs, x, ids, weights, lora=None, *, isa=None, layer=None, dy=None, seed=0,
                          submit=False, use_out=False, backward_calls=1, num_threads=None):
    """The kernel's forward + backward and the reference's on the same values, nothing asserted
    but the stored codes (quantized layers: they must equal the reference's bit for bit).

    Returns a namespace: y, dx, dw, grads (the LoRA gradient buffers, pre-filled), init (their
    values before), layer, path (the summary key), fwd_s / bwd_s (the last call's seconds) and
    ref (y, dx, dw, grads of the reference). Arguments as assert_matches_reference's."""
    rng = np.random.default_rng(seed)
    if layer is None:
        layer = make_layer(layer_kwargs, isa, num_threads)
    T, H = x.shape
    if dy is None:
        dy = rng.standard_normal((T, H)).astype(BF16 if dtype_name(x) == "bfloat16" else np.float32)
        if is_torch(x):
            dy = torch.tensor(dy.astype(np.float32)).to(x.dtype)

    # reference, on the same values
    ref_lora = None
    if lora is not None:
        ref_lora = reference.LoRA(scale=lora.scale)
        ref_lora.layout = lora.layout
        ref_lora.params = {n: (to_numpy(A), to_numpy(B)) for n, (A, B) in lora.params.items()}
    y_ref, cache = reference.moe_forward(to_numpy(x), to_numpy(ids), to_numpy(weights),
                                         *quantized_reference(layer_kwargs, layer), ref_lora,
                                         activations=layer.activations)
    dx_ref, dw_ref, g_ref = reference.moe_backward(to_numpy(dy), cache)

    # gradient buffers in the parameters' dtype (and kind), pre-filled at the gradients' scale
    kt_lora = ktmoe_lora(lora) if lora is not None else None
    bufs, init, kt_grads = None, None, None
    if lora is not None:
        bufs, init = {}, {}
        for name, (A, B) in lora.params.items():
            pair = []
            for p, g in zip((A, B), g_ref[name]):
                rms = np.sqrt(np.mean(g ** 2)) or 1.0
                v = (rng.standard_normal(g.shape) * 0.5 * rms).astype(np.float32)
                buf = torch.tensor(v).to(p.dtype) if is_torch(p) else v.astype(p.dtype)
                pair.append(buf)
            bufs[name] = tuple(pair)
            init[name] = tuple(to64(b) for b in pair)
        kt_grads = ktmoe_grads(lora, bufs)

    for _ in range(backward_calls):
        out = np.full((T, H), np.nan, dtype=BF16 if dtype_name(x) == "bfloat16" else np.float32) if use_out else None
        fwd = dict(lora=kt_lora, keep_for_backward=True, out=out)
        t0 = time.perf_counter()
        if submit:
            layer.submit_forward(x, ids, weights, **fwd)
            y = layer.wait()
        else:
            y = layer.forward(x, ids, weights, **fwd)
        t1 = time.perf_counter()
        bwd = dict(lora_grads=kt_grads)
        if use_out:
            bwd["dx_out"] = np.full((T, H), np.nan, dtype=out.dtype)
            bwd["dw_out"] = np.full(ids.shape, np.nan,
                                    dtype=BF16 if dtype_name(weights) == "bfloat16" else np.float32)
        if submit:
            layer.submit_backward(dy, **bwd)
            dx, dw = layer.wait()
        else:
            dx, dw = layer.backward(dy, **bwd)
        t2 = time.perf_counter()
        if use_out:
            assert y is out and dx is bwd["dx_out"] and dw is bwd["dw_out"], "out buffers not returned"
    return SimpleNamespace(y=y, dx=dx, dw=dw, grads=bufs, init=init, layer=layer, path=path_name(layer),
                           lora=lora, ids=ids, x=x, weights=weights, backward_calls=backward_calls,
                           fwd_s=t1 - t0, bwd_s=t2 - t1,
                           ref=SimpleNamespace(y=y_ref, dx=dx_ref, dw=dw_ref, grads=g_ref))


def gradient_increments(run) -> dict:
    """{"dA_<name>" / "dB_<name>": (what the kernel added into the buffer, the reference's
    gradient x backward_calls)} of a run_against_reference result."""
    out = {}
    for name, (bA, bB) in (run.grads or {}).items():
        for i, (tag, buf) in enumerate((("dA", bA), ("dB", bB))):
            out[f"{tag}_{name}"] = (to64(buf) - run.init[name][i], run.backward_calls * run.ref.grads[name][i])
    return out


def errors(run) -> dict:
    """{tensor: relative error} of a run (y, dx, dw, then each LoRA gradient), asserting nothing."""
    errs = {t: rel_error(getattr(run, t), getattr(run.ref, t)) for t in ("y", "dx", "dw")}
    errs.update({n: rel_error(got, want) for n, (got, want) in gradient_increments(run).items()})
    return errs


def assert_matches_reference(layer_kwargs, x, ids, weights, lora=None, *, isa=None, layer=None,
                             dy=None, seed=0, submit=False, use_out=False, backward_calls=1):
    """Kernel forward + backward vs reference; returns a namespace with errors and kernel results.

    layer_kwargs: MoEExperts keyword arguments (weights and options); `layer` reuses an
    existing instance instead (then layer_kwargs still gives the weights for the reference).
    lora: a reference.LoRA (its arrays, numpy or torch, are handed to the kernel as they are).
    submit: use submit_forward/submit_backward + wait. use_out: pass NaN-filled out buffers.
    backward_calls: forward + backward this many times into the same gradient buffers; the
    accumulated increment must equal backward_calls x the reference gradient.
    """
    run = run_against_reference(layer_kwargs, x, ids, weights, lora, isa=isa, layer=layer, dy=dy, seed=seed,
                                submit=submit, use_out=use_out, backward_calls=backward_calls)
    y, dx, dw, layer, path = run.y, run.dx, run.dw, run.layer, run.path
    T, H = x.shape
    tol = formats.TOLERANCES[formats.mode(layer.weights, layer.activations).tolerance]

    # dtypes and shapes (design.md 2: output in the caller's dtype)
    assert dtype_name(y) == dtype_name(x) and tuple(y.shape) == (T, H), "y"
    assert dtype_name(dx) == dtype_name(x) and tuple(dx.shape) == (T, H), "dx"
    assert dtype_name(dw) == dtype_name(weights) and tuple(dw.shape) == tuple(ids.shape), "dw"

    errs = {t: check(t, getattr(run, t), getattr(run.ref, t), path, tol) for t in ("y", "dx", "dw")}
    ids_np = to_numpy(ids)
    none = ids_np == -1
    assert np.all(to64(dw)[none] == 0), "dw of id -1 slots must be exactly 0"
    dead = none.all(axis=1)      # tokens routed nowhere
    assert np.all(to64(y)[dead] == 0) and np.all(to64(dx)[dead] == 0), "y/dx of a token with only -1 slots"

    if lora is not None:
        E = layer.num_experts
        hit = set(np.unique(ids_np[ids_np >= 0]).tolist())
        for name, (bA, bB) in run.grads.items():
            assert dtype_name(bA) == dtype_name(lora.params[name][0])
            assert dtype_name(bB) == dtype_name(lora.params[name][1])
        for tensor, (got, want) in gradient_increments(run).items():
            errs[tensor] = check(tensor, got, want, path, tol)
        for name, (bA, bB) in run.grads.items():
            # experts that got no token: buffers untouched (bit-exact values)
            for e, (ia, ib) in expert_slices(lora.layout, name, E, bA.shape).items():
                if e not in hit:
                    assert np.array_equal(to64(bA)[ia], run.init[name][0][ia]), f"dA_{name} of idle expert {e} touched"
                    assert np.array_equal(to64(bB)[ib], run.init[name][1][ib]), f"dB_{name} of idle expert {e} touched"

    return SimpleNamespace(errors=errs, y=y, dx=dx, dw=dw, grads=run.grads, layer=layer, ref=run.ref)
