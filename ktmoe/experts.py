"""MoEExperts: one MoE layer's routed experts on the CPU (forward, backward, LoRA).

Every argument is checked here, before anything reaches a kernel, and every error names
the argument; the caller's arrays are never written except the output and gradient
buffers they hand in. NaN/Inf in inputs propagate to the outputs like any float math.

Threads: a layer runs one call at a time. A call holds the layer from submit_* until its
wait(); another thread's call (forward, backward, submit_*, num_threads, profile) waits
for it, and the same thread submitting twice before wait() gets a RuntimeError. A kept
forward's state is the layer's one saved state: a thread whose own kept forward was
replaced by another thread's is refused in backward, instead of getting the other
forward's gradients. Backward from a thread that made no kept forward (e.g. torch's
autograd thread) uses the last kept forward. Layers are not copyable or picklable.
"""
from __future__ import annotations

import contextlib
import ctypes
import itertools
import threading

import ml_dtypes
import numpy as np

from . import _cpu, _ingest, formats
from ._buffers import Buffer, as_buffer, checked, new_array
from ._kernels import _core
from .lora import LoRA, LoRAGrads

FLOAT_DTYPES = ("float32", "bfloat16")
ID_DTYPES = ("int32", "int64")


def _array(obj, name: str, ndim: int, dtypes, *, writable: bool = False) -> Buffer:
    return checked(as_buffer(obj, name), name, ndim, dtypes, writable=writable)


def _expect_shape(b: Buffer, shape: tuple, name: str, what: str) -> None:
    if b.shape != shape:
        raise ValueError(f"{name}: expected shape {list(shape)} ({what}), got {list(b.shape)}")


class MoEExperts:
    """Packed expert weights of one layer and the kernels that run them.

    Weights: `gate_up` [E, 2I, H] (gate rows first, transformers v5) or `gate` and `up`
    [E, I, H] each; `down` [E, H, I]; float32 or bfloat16. They are copied once into
    the kernel's packed bf16 memory; the caller's arrays may be freed afterwards.

    `transposed_weights=True` (opt-in speed mode) also keeps a transposed copy, so the
    backward reads its weights the way the forward does, at twice the weight memory.

    `num_threads` defaults to ktmoe._cpu.default_num_threads(): $KTMOE_NUM_THREADS, else every
    core of this process's affinity mask (ktmoe.torch leaves one to torch when the rest of the
    model runs on a GPU).

    `MoEExperts.from_quantized(weights, gate_up, down, ...)` takes codes and scales that are
    already quantized (a published INT4 / FP8 checkpoint) as they are, bit for bit: see its
    docstring. FP8 (e4m3 codes with block scales, weight-only) exists only that way.

    `region_bytes` / `pack_region` / `attach`: the packed weights in caller memory (one copy
    that several processes map; see each).

    `weights="int8"` / `"int4"` / `"int4bs"` quantize the expert weights once, here (design.md
    5): int8 with one fp32 scale per output row, int4 with one per output row and `group_size`
    (32, 64 or 128, default 128) input columns, symmetric values in [-7, 7]; int4bs as int4
    with bf16 scales (the scale rounded to bf16 before the codes are made; weight-only).
    Packed memory: int8 rows*cols + 4*rows bytes per matrix, int4 rows*cols/2 +
    4*rows*cols/group_size, int4bs rows*cols/2 + 2*rows*cols/group_size.
    `activations` picks how they are multiplied: "bf16" (weight-only, the default: the
    values bf16(q * scale) in bf16 GEMMs) or "int8" (W8A8: activations quantized per row to
    int8 on the fly, int8 GEMMs with exact int32 sums). Forward and backward use the same
    stored values; reference/quant.py defines both modes exactly.
    """

    def __init__(self, gate_up=None, down=None, *, gate=None, up=None, max_tokens: int = 65536,
                 num_threads: int | None = None, isa: str | None = None, transposed_weights: bool = False,
                 weights: str = "bf16", group_size: int | None = None, activations: str = "bf16"):
        w = _weight_arrays(gate_up, down, gate, up)
        E, H, I = w["shape"]
        group_size, num_threads, isa_choice = _options(H, I, max_tokens, num_threads, isa, transposed_weights,
                                                       weights, group_size, activations)
        layer = _core.Layer(E, H, I, isa_choice[0], num_threads, w["gate"], w["up"], w["stride"], w["dtype"],
                            w["down"], w["down_dtype"], transposed_weights, weights, group_size,
                            activations == "int8")
        del w
        self._init(layer, isa_choice, E, H, I, max_tokens, transposed_weights, weights, group_size, activations)

    @classmethod
    def from_quantized(cls, weights, gate_up=None, down=None, *, gate=None, up=None, group_size=None, block=None,
                       int4_packing: str = "nibbles", max_tokens: int = 65536, num_threads: int | None = None,
                       isa: str | None = None, activations: str = "bf16") -> "MoEExperts":
        """A layer on codes and scales that are already quantized, taken as they are (design.md 5).

        Nothing is re-quantized: the stored codes equal the given ones bit for bit and the
        scales their float32 values (quantized_weights() returns them). Each of gate_up
        ([E, 2I, H], gate rows then up rows, as transformers v5 fuses them), down ([E, H, I])
        and, instead of gate_up, gate= and up= ([E, I, H] each) is a (codes, scales) pair of
        numpy arrays or CPU tensors (DLPack), C-contiguous; scales float32 or bfloat16, one dtype
        for all, finite and >= 0. A weight is code * scale (for FP8, `weight_scale_inv` is this
        scale); the weight-only kernels multiply by bf16(float32(code) * scale).

        - weights="int8": codes int8 [E, rows, cols] in [-127, 127], scales [E, rows, 1].
        - weights="int4": codes uint8 / int8 [E, rows, cols / 2], two per byte: column 2j in the
          low nibble, 2j + 1 in the high one, 4-bit two's complement in [-8, 7]; scales
          [E, rows, cols / group_size], group_size in {32, 64, 128} (None: from the scales'
          shape). int4_packing="pack-quantized" reads compressed-tensors' `weight_packed`
          instead: int32 [E, rows, cols / 8] (or those bytes as uint8 [E, rows, cols / 2]), code
          + 8 as unsigned nibbles, element i of a row at bits 4i of its int32 word; its bytes
          XORed with 0x88 are the default layout (the kernel applies the XOR while copying).
        - weights="int4bs": int4's codes (either packing) with bfloat16 scales, kept as bf16
          (bit-equal to the checkpoint's; packed bytes = codes + bf16 scales, the checkpoint's
          own bytes); fp32 scales raise (take "int4"). Weight-only: activations="int8" raises
          (int4 takes the same codes and scales, widened exactly, for W8A8).
        - weights="fp8": e4m3fn codes uint8 or float8_e4m3fn [E, rows, cols] (NaN codes 0x7f /
          0xff raise, naming the position); block scales [E, ceil(rows / br), cols / bc] with
          block=(br, bc), default (128, 128) (`quantization_config.weight_block_size`); bc a
          multiple of 32 dividing 512, H and I; br >= 1. The fused gate_up's scales are gate's
          [E, ceil(I / br), H / bc] followed by up's (the row block index restarts at row I).
          Weight-only: activations="int8" raises. The kernel keeps a copy of each block's
          scales per row: packed bytes = rows * cols + 4 * rows * cols / bc per matrix (1.031x
          the codes + block scales for 128 x 128 blocks).

        activations="int8" (W8A8) works for int8 and int4 as in the constructor. Memory: the
        codes are copied once, straight into the packed layout (no intermediate copy); the
        caller's arrays may be freed afterwards. Every check runs before anything is copied.
        """
        spec = _ingest.prepare(weights, gate_up, down, gate, up, group_size, block, int4_packing, activations)
        num_threads, isa_choice = _run_options(max_tokens, num_threads, isa)
        E, H, I = spec["E"], spec["H"], spec["I"]
        layer = _core.Layer(E, H, I, isa_choice[0], num_threads, 0, 0, 0, "float32", 0, "float32", False,
                            weights, spec["group"], activations == "int8", sources=spec["sources"])
        del spec["keep"]
        self = cls.__new__(cls)
        self._init(layer, isa_choice, E, H, I, max_tokens, False, weights,
                   spec["group"] if formats.grouped(weights) else 0, activations, block=spec["block"])
        self.prequantized = True
        return self


    # ---- packed weights in caller memory (one copy shared by the processes of a host) ----
    @staticmethod
    def region_bytes(num_experts: int, hidden_size: int, intermediate_size: int, *, isa: str | None = None,
                     transposed_weights: bool = False, weights: str = "bf16", group_size: int | None = None) -> int:
        """Bytes of a memory region that holds one layer's packed weights (pack_region /
        attach): a header page, then the same arrays the layer itself would allocate
        (weight_bytes of them, each page-aligned). Depends on the kernel path (the AMX path
        keeps bf16 weights in its tile layout)."""
        E, H, I = _sizes(num_experts, hidden_size, intermediate_size)
        group = formats.check_layer_format(weights, group_size, "bf16", _flag(transposed_weights), H, I)
        return _core.region_bytes(E, H, I, _cpu.select_isa(isa)[0], transposed_weights, weights, group)

    @staticmethod
    def pack_region(region, gate_up=None, down=None, *, gate=None, up=None, isa: str | None = None,
                    transposed_weights: bool = False, weights: str = "bf16", group_size: int | None = None) -> None:
        """Packs the weights (as for MoEExperts(...)) into `region`: a writable, page-aligned
        1-D uint8 buffer (an mmap, a numpy array) of at least region_bytes(...) bytes. Other
        processes mapping the same memory then build their layer with attach(), without packing."""
        w = _weight_arrays(gate_up, down, gate, up)
        E, H, I = w["shape"]
        group, _, isa_choice = _options(H, I, 1, 1, isa, transposed_weights, weights, group_size, "bf16")
        r = _region(region, writable=True)
        _core.region_pack(r.addr, r.shape[0], E, H, I, isa_choice[0], w["gate"], w["up"], w["stride"], w["dtype"],
                          w["down"], w["down_dtype"], transposed_weights, weights, group)

    @classmethod
    def attach(cls, region, num_experts: int, hidden_size: int, intermediate_size: int, *, max_tokens: int = 65536,
               num_threads: int | None = None, isa: str | None = None, transposed_weights: bool = False,
               weights: str = "bf16", group_size: int | None = None, activations: str = "bf16") -> "MoEExperts":
        """A layer whose packed weights are `region`, filled by pack_region (in this or another
        process) for the same sizes, format and kernel path: raises ValueError naming `region`
        otherwise, or when its packing is not complete. `region` may be read-only (a PROT_READ
        mapping): the layer only reads it, and keeps a reference to it for its lifetime.
        weight_bytes counts the region's weights, which this layer does not own."""
        E, H, I = _sizes(num_experts, hidden_size, intermediate_size)
        group, num_threads, isa_choice = _options(H, I, max_tokens, num_threads, isa, transposed_weights, weights,
                                                  group_size, activations)
        r = _region(region, writable=False)
        layer = _core.Layer(E, H, I, isa_choice[0], num_threads, 0, 0, 0, "bfloat16", 0, "bfloat16",
                            transposed_weights, weights, group, activations == "int8", region=r.addr, region_nbytes=r.shape[0])
        self = cls.__new__(cls)
        self._init(layer, isa_choice, E, H, I, max_tokens, transposed_weights, weights, group, activations)
        self._region = r   # the memory stays alive as long as the layer
        return self

    def _init(self, layer, isa_choice, E, H, I, max_tokens, transposed_weights, weights, group_size, activations,
              block=None):
        self._layer = layer
        self.isa, self.isa_reason = isa_choice
        self.num_experts, self.hidden_size, self.intermediate_size = E, H, I
        self.weights, self.group_size, self.activations = weights, group_size, activations
        self.block = block     # fp8: (rows, cols) of one scale block; else None
        self.prequantized = False   # True for a layer made by from_quantized (codes taken as given)
        self.max_tokens = int(max_tokens)
        self.transposed_weights = transposed_weights
        self._pending = None   # (kind, result, keep-alive) of a submitted call
        self._saved = None     # what backward needs to check its arguments
        self._lock = threading.Lock()   # held from submit_* until wait() (module docstring: Threads)
        self._holder = None             # ident of the thread holding _lock
        self._generation = itertools.count(1)
        self._kept_by = {}     # thread ident -> generation of its last kept forward not yet consumed

    def __reduce_ex__(self, protocol):
        raise TypeError("MoEExperts cannot be pickled or copied: its packed expert weights live in the kernel's "
                        "memory; build another MoEExperts from the original weights (ktmoe.torch shares one "
                        "between deep copies of a patched model)")

    # ---- properties ----
    @property
    def num_threads(self) -> int:
        return self._layer.num_threads

    @num_threads.setter
    def num_threads(self, n: int) -> None:
        if not isinstance(n, (int, np.integer)) or not 1 <= n <= 256:
            raise ValueError(f"num_threads: must be an integer in [1, 256], got {n!r}")
        with self._exclusive():
            self._layer.set_threads(int(n))

    @property
    def weight_bytes(self) -> int:
        """Bytes of packed expert weights held by this layer."""
        return self._layer.weight_bytes

    def profile(self) -> dict:
        """Where this layer's calls spent their time since creation or reset_profile().

        Always collected (a clock read per phase and thread and two per GEMM call). Returns
        {"threads", "passes": {"forward"|"backward": {"calls", "wall_s"}}, "phases": [...]},
        one entry per phase of the passes in their order (ktmoe/_kernels/ktmoe.h): name,
        pass, calls, tasks, wall_s, thread_s (threads x wall), busy_s (threads running tasks;
        thread_s - busy_s is idle time at the phase's barrier), and the thread seconds and
        FLOPs of the GEMMs inside its tasks: base_gemm_* (products with the expert weights)
        and lora_gemm_* (LoRA products and gradients). `ktmoe bench --profile` prints it."""
        with self._exclusive():
            return self._layer.profile()

    def reset_profile(self) -> None:
        """Zeroes the profile (profile())."""
        with self._exclusive():
            self._layer.reset_profile()

    def quantized_weights(self, proj: str):
        """(q, scale) of projection proj ("gate", "up" or "down") as numpy arrays: the stored
        values one per element, q [E, rows, cols] int8, and scale [E, rows, groups] float32
        (groups = 1 for int8; int4bs: bfloat16, its stored scales). fp8: q is the uint8 e4m3fn codes [E, rows, cols] and scale the
        block scales [E, ceil(rows / br), cols / bc] float32 (the first row's copy of each
        block's; every row of a block holds the same). Raises for bf16 weights."""
        if proj not in ("gate", "up", "down"):
            raise ValueError(f"proj: must be 'gate', 'up' or 'down', got {proj!r}")
        row = formats.WEIGHT_FORMATS[self.weights]
        if not row.quantized:
            raise ValueError(f"quantized_weights: this layer holds {self.weights} weights (weights={self.weights!r})")
        E, H, I = self.num_experts, self.hidden_size, self.intermediate_size
        rows, cols = (H, I) if proj == "down" else (I, H)
        per = {"row": cols, "group": self.group_size, "block": self.block and self.block[1]}[row.scaling]
        groups = cols // per
        q = np.empty((E, rows, cols), np.dtype(row.code_dtype))
        scale = np.empty((E, rows, groups), np.float32)
        self._layer.export_quantized(proj, q.ctypes.data, scale.ctypes.data)
        if row.scaling == "block":   # one scale per block of rows: the first row's copy
            scale = np.ascontiguousarray(scale[:, ::self.block[0]])
        if row.scale_dtype == "bfloat16":
            scale = scale.astype(ml_dtypes.bfloat16)   # exported widened to fp32: back to the stored bf16, exactly
        return q, scale

    def saved_bytes_per_token(self, k: int, lora_rank: int = 0) -> int:
        """Bytes kept per token between a forward with keep_for_backward and its backward,
        with rank-`lora_rank` LoRA on all three projections (0: no LoRA)."""
        return _core.saved_bytes_per_token(self.hidden_size, self.intermediate_size, k, 3 * lora_rank)

    def __repr__(self) -> str:
        row = formats.WEIGHT_FORMATS[self.weights]
        fmt = "" if not row.quantized else (
            f", weights={self.weights!r}" + (f", group_size={self.group_size}" if row.scaling == "group" else "")
            + (f", block={self.block}" if row.scaling == "block" else "") + f", activations={self.activations!r}")
        return (f"MoEExperts(E={self.num_experts}, H={self.hidden_size}, I={self.intermediate_size}{fmt}, "
                f"isa={self.isa!r}, num_threads={self.num_threads})")

    # ---- blocking calls ----
    def forward(self, x, topk_ids, topk_weights, lora: LoRA | None = None,
                keep_for_backward: bool = False, out=None):
        """y [T, H] = sum_j w_tj * expert_{id_tj}(x_t), in x's dtype (design.md 2)."""
        self.submit_forward(x, topk_ids, topk_weights, lora, keep_for_backward, out)
        return self.wait()

    def backward(self, dy, lora_grads: LoRAGrads | None = None, dx_out=None, dw_out=None):
        """(dx [T, H], dw [T, k]) of the last kept forward; LoRA gradients are added into
        `lora_grads`, a ktmoe.LoRAGrads in the same layout and shapes as the forward's lora."""
        self.submit_backward(dy, lora_grads, dx_out, dw_out)
        return self.wait()

    # ---- non-blocking pair ----
    def submit_forward(self, x, topk_ids, topk_weights, lora: LoRA | None = None,
                       keep_for_backward: bool = False, out=None) -> None:
        self._acquire()
        try:
            self._submit_forward(x, topk_ids, topk_weights, lora, keep_for_backward, out)
        except BaseException:
            self._release()
            raise

    def submit_backward(self, dy, lora_grads: LoRAGrads | None = None, dx_out=None, dw_out=None) -> None:
        self._acquire()
        try:
            self._submit_backward(dy, lora_grads, dx_out, dw_out)
        except BaseException:
            self._release()
            raise

    def _submit_forward(self, x, topk_ids, topk_weights, lora, keep_for_backward, out) -> None:
        E, H = self.num_experts, self.hidden_size
        xb = _array(x, "x", 2, FLOAT_DTYPES)
        T = xb.shape[0]
        if xb.shape[1] != H:
            raise ValueError(f"x: expected shape [T, H={H}], got {list(xb.shape)}")
        if T > self.max_tokens:
            raise ValueError(f"x: T={T} tokens exceeds max_tokens={self.max_tokens}")
        ids = _array(topk_ids, "topk_ids", 2, ID_DTYPES)
        if ids.shape[0] != T:
            raise ValueError(f"topk_ids: expected {T} rows (one per token of x), got shape {list(ids.shape)}")
        k = ids.shape[1]
        if k < 1:
            raise ValueError("topk_ids: needs at least one expert slot per token (k >= 1)")
        w = _array(topk_weights, "topk_weights", 2, FLOAT_DTYPES)
        if w.shape != ids.shape:
            raise ValueError(f"topk_weights: shape {list(w.shape)} must equal topk_ids' {list(ids.shape)} "
                             f"(same T and k)")
        bad = _core.find_bad_id(ids.addr, ids.dtype, T * k, E)
        if bad >= 0:
            value = _read_id(ids, bad)
            raise ValueError(f"topk_ids: expert id {value} at flat index {bad} is outside [-1, {E})")
        res = None
        if lora is not None:
            if not isinstance(lora, LoRA):
                raise TypeError(f"lora: expected ktmoe.LoRA or None, got {type(lora).__name__}")
            res = lora.resolve(E, H, self.intermediate_size, "lora")
        if out is None:
            out = new_array((T, H), xb.dtype)
        ob = _array(out, "out", 2, (xb.dtype,), writable=True)
        _expect_shape(ob, (T, H), "out", "[T, H] like x")
        self._saved = None   # the kept state is replaced; other threads' entries in _kept_by stay (stale)
        self._kept_by.pop(threading.get_ident(), None)
        if T == 0:
            self._pending = ("forward", out, None)
            if keep_for_backward:
                self._keep({"T": 0, "k": k, "x_dtype": xb.dtype, "w_dtype": w.dtype,
                            "lora": res.signature() if res else None, "empty": True})
            return
        self._layer.submit_forward(T, k, xb.addr, xb.dtype, ids.addr, ids.dtype, w.addr, w.dtype,
                                   res, bool(keep_for_backward), ob.addr)
        self._pending = ("forward", out, (xb, ids, w, res, ob))
        if keep_for_backward:
            self._keep({"T": T, "k": k, "x_dtype": xb.dtype, "w_dtype": w.dtype,
                        "lora": res.signature() if res else None, "empty": False})

    def _keep(self, saved: dict) -> None:
        saved["generation"] = next(self._generation)
        saved["thread"] = threading.get_ident()
        self._saved = saved
        self._kept_by[saved["thread"]] = saved["generation"]

    def _forget_saved(self) -> None:
        """The kept state is consumed (backward) or lost (failed call)."""
        if self._saved is not None and self._kept_by.get(self._saved["thread"]) == self._saved["generation"]:
            del self._kept_by[self._saved["thread"]]
        self._saved = None

    def _submit_backward(self, dy, lora_grads, dx_out, dw_out) -> None:
        s = self._saved
        mine = self._kept_by.get(threading.get_ident())
        if mine is not None and (s is None or s["generation"] != mine):
            del self._kept_by[threading.get_ident()]
            raise RuntimeError("backward: this thread's kept forward was replaced by a forward from another "
                               "thread (a layer holds one kept forward); give each thread its own layer or "
                               "run each forward/backward pair without interleaving")
        if s is None:
            raise RuntimeError("backward: needs a preceding forward with keep_for_backward=True "
                               "(each forward can be backpropagated once)")
        T, k, H = s["T"], s["k"], self.hidden_size
        dyb = _array(dy, "dy", 2, (s["x_dtype"],))
        _expect_shape(dyb, (T, H), "dy", "[T, H] like the forward's x")
        res = None
        if lora_grads is not None:
            if not isinstance(lora_grads, LoRAGrads):
                raise TypeError(f"lora_grads: expected ktmoe.LoRAGrads or None, got {type(lora_grads).__name__}"
                                + (" (gradient buffers are a ktmoe.LoRAGrads: same layout, no scale)"
                                   if isinstance(lora_grads, LoRA) else ""))
            if s["lora"] is None:
                raise ValueError("lora_grads: the forward had no lora, so there are no LoRA gradients")
            res = lora_grads.resolve(self.num_experts, H, self.intermediate_size, "lora_grads", writable=True)
            if res.signature() != s["lora"]:
                raise ValueError(f"lora_grads: must mirror the forward's lora (layout, projections, and "
                                 f"each factor's shape and dtype); got {_describe(res.signature())}, "
                                 f"forward had {_describe(s['lora'])}")
        if dx_out is None:
            dx_out = new_array((T, H), s["x_dtype"])
        if dw_out is None:
            dw_out = new_array((T, k), s["w_dtype"])
        dxb = _array(dx_out, "dx_out", 2, (s["x_dtype"],), writable=True)
        _expect_shape(dxb, (T, H), "dx_out", "[T, H] like x")
        dwb = _array(dw_out, "dw_out", 2, (s["w_dtype"],), writable=True)
        _expect_shape(dwb, (T, k), "dw_out", "[T, k] like topk_weights")
        self._forget_saved()
        if s["empty"]:
            self._pending = ("backward", (dx_out, dw_out), None)
            return
        self._layer.submit_backward(dyb.addr, res, dxb.addr, dwb.addr)
        self._pending = ("backward", (dx_out, dw_out), (dyb, res, dxb, dwb))

    def wait(self):
        """Waits for the submitted call; returns what forward/backward return."""
        if self._holder != threading.get_ident():
            if self._holder is not None:
                raise RuntimeError("wait: the call in flight was submitted by another thread; only that thread "
                                   "can wait() for it")
            raise RuntimeError("wait: nothing was submitted")
        kind, result, keep = self._pending
        try:
            if keep is not None:
                self._layer.wait()
        except BaseException:
            self._forget_saved()
            raise
        finally:
            self._pending = None
            self._release()
        return result

    def _acquire(self) -> None:
        """Takes the layer for one call: waits for another thread's, refuses this thread's second."""
        if self._holder == threading.get_ident():
            raise RuntimeError("this layer has a submitted call in flight: call wait() first")
        self._lock.acquire()
        self._holder = threading.get_ident()

    def _release(self) -> None:
        self._holder = None
        self._lock.release()

    @contextlib.contextmanager
    def _exclusive(self):
        """The layer held for a call that runs no kernel (threads, profile)."""
        self._acquire()
        try:
            yield
        finally:
            self._release()


def _weight_arrays(gate_up, down, gate, up) -> dict:
    """The validated weight arrays: shape (E, H, I), addresses, gate/up expert stride, dtypes."""
    if down is None:
        raise ValueError("down: the down projection weights are required")
    if gate_up is not None and (gate is not None or up is not None):
        raise ValueError("gate_up: give either gate_up or gate + up, not both")
    d = _array(down, "down", 3, FLOAT_DTYPES)
    E, H, I = d.shape
    if gate_up is not None:
        gu = _array(gate_up, "gate_up", 3, FLOAT_DTYPES)
        _expect_shape(gu, (E, 2 * I, H), "gate_up", "[E, 2I, H] from down's [E, H, I]")
        # gate and up are packed side by side per expert: their expert stride is 2*I*H when
        # fused, I*H when separate
        g_addr, u_addr, dtype, stride, keep = gu.addr, gu.offset(I * H), gu.dtype, 2 * I * H, (gu, d)
    else:
        if gate is None or up is None:
            raise ValueError("gate_up: give gate_up, or both gate and up")
        g = _array(gate, "gate", 3, FLOAT_DTYPES)
        u = _array(up, "up", 3, FLOAT_DTYPES)
        _expect_shape(g, (E, I, H), "gate", "[E, I, H] from down's [E, H, I]")
        _expect_shape(u, (E, I, H), "up", "[E, I, H] from down's [E, H, I]")
        if g.dtype != u.dtype:
            raise TypeError(f"up: dtype {u.dtype} differs from gate's {g.dtype}")
        g_addr, u_addr, dtype, stride, keep = g.addr, u.addr, g.dtype, I * H, (g, u, d)
    if min(E, H, I) < 1:
        raise ValueError(f"down: every dimension must be >= 1, got shape {list(d.shape)}")
    return {"shape": (E, H, I), "gate": g_addr, "up": u_addr, "stride": stride, "dtype": dtype, "down": d.addr,
            "down_dtype": d.dtype, "keep": keep}


def _sizes(E, H, I) -> tuple:
    for name, n in (("num_experts", E), ("hidden_size", H), ("intermediate_size", I)):
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise ValueError(f"{name}: must be a positive integer, got {n!r}")
    return int(E), int(H), int(I)


def _flag(value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"transposed_weights: must be True or False, got {value!r}")
    return value


def _run_options(max_tokens, num_threads, isa) -> tuple:
    """(thread count, (isa, reason)) of validated max_tokens / num_threads / isa."""
    if not isinstance(max_tokens, (int, np.integer)) or max_tokens < 1:
        raise ValueError(f"max_tokens: must be a positive integer, got {max_tokens!r}")
    return _check_threads(num_threads), _cpu.select_isa(isa)


def _options(H, I, max_tokens, num_threads, isa, transposed_weights, weights, group_size, activations):
    """(kernel group size, thread count, (isa, reason)) of validated layer options."""
    num_threads, isa_choice = _run_options(max_tokens, num_threads, isa)
    return formats.check_layer_format(weights, group_size, activations, _flag(transposed_weights), H, I), num_threads, isa_choice


def _region(region, writable: bool) -> Buffer:
    """A page-aligned 1-D uint8 region (mmap, numpy array, any buffer)."""
    if region is None:
        raise TypeError("region: expected a memory buffer (an mmap or a 1-D uint8 array), got None")
    b = as_buffer(region, "region")
    if b.dtype != "uint8" or len(b.shape) != 1 or not b.contiguous:
        raise ValueError(f"region: must be a contiguous 1-D uint8 buffer, got {b.dtype} of shape {list(b.shape)}")
    if writable and not b.writable:
        raise ValueError("region: is read-only; pack_region writes into it")
    if b.addr % 4096:
        raise ValueError("region: must start on a page boundary (4096 bytes), as an mmap does")
    return b


def _check_threads(num_threads) -> int:
    if num_threads is None:
        num_threads = _cpu.default_num_threads()
    if not isinstance(num_threads, (int, np.integer)) or not 1 <= num_threads <= 256:
        raise ValueError(f"num_threads: must be an integer in [1, 256], got {num_threads!r}")
    return int(num_threads)


def _read_id(ids: Buffer, index: int) -> int:
    """The id at a flat index of a validated id buffer (only used for error messages)."""
    ctype = ctypes.c_int64 if ids.dtype == "int64" else ctypes.c_int32
    return int(ctype.from_address(ids.offset(index)).value)


def _describe(signature: tuple) -> str:
    layout, projs = signature
    parts = [f"{p}: A {list(sa)} {da}, B {list(sb)} {db}" for p, (sa, da, sb, db) in projs]
    return f"{layout} layout [{'; '.join(parts)}]"
