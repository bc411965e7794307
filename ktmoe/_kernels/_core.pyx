# cython: language_level=3, boundscheck=False, wraparound=False
"""_core: the Cython face of the C kernels.

Takes raw addresses that ktmoe/experts.py has already validated (it owns every check
and keeps the Python objects alive), releases the GIL while kernels run, and reads
DLPack capsules so any tensor library's CPU tensors can be passed without linking it.
"""
from libc.stdint cimport int8_t, int32_t, int64_t, uint8_t, uint16_t, uint64_t
from cpython.pycapsule cimport PyCapsule_IsValid, PyCapsule_GetPointer

cdef extern from "ktmoe.h":
    enum:
        KT_OK
        KT_ERR_NOMEM
        KT_ERRK_VALUE
        KT_ERRK_MEMORY
        KT_ERRK_RUNTIME
        KT_AT_CREATE
        KT_AT_CALL
    const char *kt_status_message(int status, int at, int *kind)
    ctypedef struct kt_view3:
        void *data
        int dtype
        long stride[3]
    ctypedef struct kt_lora_proj:
        int r
        kt_view3 A
        kt_view3 B
    ctypedef struct kt_lora:
        float scale
        kt_lora_proj proj[3]
    ctypedef struct kt_layer:
        pass
    unsigned kt_cpu_features()
    const char *kt_feature_name(int i)
    int KT_NFEATURE
    int KT_NISA
    const char *kt_isa_name(int isa)
    const char *kt_isa_flags(int isa)
    unsigned kt_isa_needs(int isa)
    int kt_amx_request_permission()
    kt_layer *kt_layer_create(int E, int H, int I, int isa, int num_threads,
                              const void *gate, const void *up, long gate_up_expert_stride, int w_dtype,
                              const void *down, int down_dtype, int transposed,
                              int wformat, int group_size, int act_int8, int *status)
    ctypedef struct kt_qsource:
        const void *codes
        long codes_stride
        const void *scales
        long scales_stride
    kt_layer *kt_layer_create_quantized(int E, int H, int I, int isa, int num_threads, int wformat,
                                        const kt_qsource *gate, const kt_qsource *up, const kt_qsource *down,
                                        int scale_dtype, int block_rows, int group, int code_xor, int act_int8,
                                        int *status) nogil
    long kt_find_byte(const void *p, long n, int mask, int value) nogil
    long kt_find_bad_scale(const void *p, int dtype, long n) nogil
    size_t kt_layer_region_bytes(int E, int H, int I, int isa, int transposed, int wformat, int group_size)
    int kt_region_pack(void *base, size_t bytes, int E, int H, int I, int isa,
                       const void *gate, const void *up, long gate_up_expert_stride, int w_dtype,
                       const void *down, int down_dtype, int transposed, int wformat, int group_size) nogil
    kt_layer *kt_layer_attach(const void *base, size_t bytes, int E, int H, int I, int isa, int num_threads,
                              int transposed, int wformat, int group_size, int act_int8, int *status)
    int kt_layer_export_quantized(const kt_layer *L, int proj, int8_t *q, float *scale) nogil
    void kt_layer_destroy(kt_layer *L) nogil
    size_t kt_layer_weight_bytes(const kt_layer *L)
    int kt_layer_set_threads(kt_layer *L, int num_threads)
    int kt_submit_forward(kt_layer *L, int T, int k, const void *x, int x_dtype,
                          const void *ids, int ids_dtype, const void *weights, int w_dtype,
                          const kt_lora *lora, int keep, void *y) nogil
    int kt_submit_backward(kt_layer *L, const void *dy, const kt_lora *grads, void *dx, void *dw) nogil
    int kt_wait(kt_layer *L) nogil
    int kt_layer_busy(const kt_layer *L)
    int kt_layer_has_saved(const kt_layer *L)
    void kt_layer_release_saved(kt_layer *L)
    size_t kt_saved_bytes_per_token(int H, int I, int k, int lora_ranks)
    long kt_find_bad_id(const void *ids, int ids_dtype, long n, int E) nogil
    int KT_NPHASE
    ctypedef struct kt_phase_stat:
        long calls, tasks
        double wall, thread, busy
        double base_s, base_flops, lora_s, lora_flops
    ctypedef struct kt_profile:
        long passes[2]
        double pass_wall[2]
        kt_phase_stat ph[1]
    const char *kt_phase_name(int phase)
    int kt_phase_is_backward(int phase)
    void kt_layer_profile(const kt_layer *L, kt_profile *out)
    void kt_layer_profile_reset(kt_layer *L)

cdef extern from *:
    """
    /* DLPack (v0.8, unversioned capsule "dltensor"): only the fields read here. */
    typedef struct { int32_t device_type; int32_t device_id; } kt_DLDevice;
    typedef struct { uint8_t code; uint8_t bits; uint16_t lanes; } kt_DLDataType;
    typedef struct {
        void *data; kt_DLDevice device; int32_t ndim; kt_DLDataType dtype;
        int64_t *shape; int64_t *strides; uint64_t byte_offset;
    } kt_DLTensor;
    typedef struct kt_DLManagedTensor {
        kt_DLTensor dl_tensor; void *manager_ctx; void (*deleter)(struct kt_DLManagedTensor *);
    } kt_DLManagedTensor;
    """
    ctypedef struct kt_DLDevice:
        int32_t device_type
        int32_t device_id
    ctypedef struct kt_DLDataType:
        uint8_t code
        uint8_t bits
        uint16_t lanes
    ctypedef struct kt_DLTensor:
        void *data
        kt_DLDevice device
        int32_t ndim
        kt_DLDataType dtype
        int64_t *shape
        int64_t *strides
        uint64_t byte_offset
    ctypedef struct kt_DLManagedTensor:
        kt_DLTensor dl_tensor

DTYPE_CODES = {"float32": 0, "bfloat16": 1, "int32": 2, "int64": 3}
FEATURES = tuple(kt_feature_name(i).decode() for i in range(KT_NFEATURE))   # bit i of kt_cpu_features()
# The kernel targets of kt_isas.h (meson.build's list), worst first: name -> code (enum kt_isa)
ISA_CODES = {kt_isa_name(i).decode(): i for i in range(KT_NISA)}
from ktmoe.formats import C_CODES as WEIGHT_FORMATS   # weight format name -> kt_wformat (ktmoe/formats.py)
PROJ_CODES = {"gate": 0, "up": 1, "down": 2}

_DL_NAMES = {(0, 32): "int32", (0, 64): "int64", (2, 32): "float32", (4, 16): "bfloat16",
             (0, 8): "int8", (0, 16): "int16", (1, 8): "uint8", (2, 16): "float16", (2, 64): "float64"}


def dlpack_view(capsule):
    """(address, dtype name, shape, strides in elements or None, device type) of a DLPack capsule."""
    if not PyCapsule_IsValid(capsule, b"dltensor"):
        raise TypeError("expected an unconsumed DLPack capsule named 'dltensor'")
    cdef kt_DLManagedTensor *m = <kt_DLManagedTensor *>PyCapsule_GetPointer(capsule, b"dltensor")
    cdef kt_DLTensor *t = &m.dl_tensor
    shape = tuple(int(t.shape[i]) for i in range(t.ndim))
    strides = None if t.strides == NULL else tuple(int(t.strides[i]) for i in range(t.ndim))
    name = _DL_NAMES.get((t.dtype.code, t.dtype.bits), f"dlpack(code={t.dtype.code},bits={t.dtype.bits})")
    if t.dtype.lanes != 1:
        name = f"{name}x{t.dtype.lanes}"
    return (<size_t>t.data + t.byte_offset, name, shape, strides, int(t.device.device_type))


def cpu_features():
    """{feature: present} for every feature of FEATURES (detected once per process, cpu_features.c)."""
    cdef unsigned bits = kt_cpu_features()
    return {name: bool(bits >> i & 1) for i, name in enumerate(FEATURES)}


def isa_targets():
    """The kernel targets, worst first: [(name, compiler flags, [features it needs])]."""
    out = []
    for i in range(KT_NISA):
        needs = kt_isa_needs(i)
        out.append((kt_isa_name(i).decode(), kt_isa_flags(i).decode(),
                    [name for b, name in enumerate(FEATURES) if needs >> b & 1]))
    return out


def amx_request_permission():
    """0 if Linux granted the AMX tile state to this process, else an errno value."""
    return kt_amx_request_permission()


def saved_bytes_per_token(int H, int I, int k, int lora_ranks):
    return kt_saved_bytes_per_token(H, I, k, lora_ranks)


def find_byte(size_t p, long n, int mask, int value):
    """Index of the first of n bytes at p with (byte & mask) == value, or -1 (GIL released)."""
    cdef long r
    with nogil:
        r = kt_find_byte(<const void *>p, n, mask, value)
    return r


def find_bad_scale(size_t p, str dtype, long n):
    """Index of the first of n scales at p that is NaN, Inf or negative, or -1 (GIL released)."""
    cdef long r
    cdef int code = DTYPE_CODES[dtype]
    with nogil:
        r = kt_find_bad_scale(<const void *>p, code, n)
    return r


def find_bad_id(size_t ids, str dtype, long n, int E):
    cdef long r
    cdef int code = DTYPE_CODES[dtype]
    with nogil:
        r = kt_find_bad_id(<const void *>ids, code, n, E)
    return r


def region_bytes(int E, int H, int I, str isa, bint transposed, str weights, int group_size):
    """Bytes of a region holding one layer's packed weights (ktmoe.h: kt_layer_region_bytes)."""
    return kt_layer_region_bytes(E, H, I, ISA_CODES[isa], transposed, WEIGHT_FORMATS[weights], group_size)


def region_pack(size_t base, size_t nbytes, int E, int H, int I, str isa, size_t gate, size_t up,
                long gate_up_expert_stride, str w_dtype, size_t down, str down_dtype, bint transposed,
                str weights, int group_size):
    """Packs one layer's weights into the writable region at base (ktmoe.h: kt_region_pack)."""
    cdef int rc
    cdef int isa_c = ISA_CODES[isa], wd = DTYPE_CODES[w_dtype], dd = DTYPE_CODES[down_dtype]
    cdef int wf = WEIGHT_FORMATS[weights]
    with nogil:
        rc = kt_region_pack(<void *>base, nbytes, E, H, I, isa_c, <const void *>gate, <const void *>up,
                            gate_up_expert_stride, wd, <const void *>down, dd, transposed, wf, group_size)
    _create_status(rc)


def _create_status(int status):
    _raise_status(status, KT_AT_CREATE)


# the C struct's projection order (enum kt_proj: KT_GATE, KT_UP, KT_DOWN)
_KT_PROJECTIONS = ("gate", "up", "down")


cdef void fill_lora(kt_lora *out, res):
    """Copies a ktmoe.lora.ResolvedLoRA (its scale, and per projection name a ProjView or
    nothing) into the C struct kt_lora: the one LoRA form between Python and C (a gradient
    container's scale is 0: the kernel reads the forward's)."""
    out.scale = res.scale
    for p in range(3):
        v = res.proj.get(_KT_PROJECTIONS[p])
        if v is None:
            out.proj[p].r = 0
            continue
        out.proj[p].r = v.r
        out.proj[p].A.data = <void *><size_t>v.a_addr
        out.proj[p].A.dtype = DTYPE_CODES[v.a_dtype]
        out.proj[p].B.data = <void *><size_t>v.b_addr
        out.proj[p].B.dtype = DTYPE_CODES[v.b_dtype]
        for i in range(3):
            out.proj[p].A.stride[i] = v.a_strides[i]
            out.proj[p].B.stride[i] = v.b_strides[i]


cdef class Layer:
    """Packed expert weights of one layer plus the state a kept forward leaves for backward."""
    cdef kt_layer *L
    cdef readonly int E, H, I, num_threads
    cdef readonly str isa, weights
    cdef readonly int group_size

    def __cinit__(self, int E, int H, int I, str isa, int num_threads, size_t gate, size_t up,
                  long gate_up_expert_stride, str w_dtype, size_t down, str down_dtype, bint transposed=False,
                  str weights="bf16", int group_size=0, bint act_int8=False, tuple sources=None,
                  size_t region=0, size_t region_nbytes=0):
        """sources (pre-quantized weights, kt_layer_create_quantized): (gate, up, down, scale dtype,
        block_rows, code_xor), each of gate / up / down = (codes address, codes expert stride in
        bytes, scales address, scales expert stride in elements); region != 0: attach to that
        packed region (ktmoe.h). With either, gate, up, ... w_dtype, down, down_dtype are unused."""
        cdef int status = 0
        cdef kt_qsource src[3]
        cdef int sdt, br, xor, wf = WEIGHT_FORMATS[weights], ic = ISA_CODES[isa]
        if sources is not None:
            for i in range(3):
                c, cs, sc, ss = sources[i]
                src[i].codes = <const void *><size_t>c
                src[i].codes_stride = cs
                src[i].scales = <const void *><size_t>sc
                src[i].scales_stride = ss
            sdt, br, xor = DTYPE_CODES[sources[3]], sources[4], sources[5]
            with nogil:
                self.L = kt_layer_create_quantized(E, H, I, ic, num_threads, wf, &src[0], &src[1], &src[2],
                                                   sdt, br, group_size, xor, act_int8, &status)
        elif region:
            self.L = kt_layer_attach(<const void *>region, region_nbytes, E, H, I, ic, num_threads,
                                     transposed, wf, group_size, act_int8, &status)
        else:
            self.L = kt_layer_create(E, H, I, ic, num_threads, <const void *>gate,
                                     <const void *>up, gate_up_expert_stride, DTYPE_CODES[w_dtype],
                                     <const void *>down, DTYPE_CODES[down_dtype], transposed,
                                     wf, group_size, act_int8, &status)
        if self.L == NULL:
            _create_status(status if status else KT_ERR_NOMEM)
        self.E, self.H, self.I, self.isa, self.num_threads = E, H, I, isa, num_threads
        self.weights, self.group_size = weights, group_size

    def export_quantized(self, str proj, size_t q, size_t scale):
        """Writes projection proj's int8 values [E, rows, cols] and scales [E, rows, groups]."""
        if kt_layer_export_quantized(self.L, PROJ_CODES[proj], <int8_t *>q, <float *>scale):
            raise ValueError("ktmoe: this layer holds bf16 weights, not quantized ones")

    def __dealloc__(self):
        if self.L != NULL:
            with nogil:
                kt_layer_destroy(self.L)
            self.L = NULL

    @property
    def weight_bytes(self):
        return kt_layer_weight_bytes(self.L)

    @property
    def busy(self):
        return bool(kt_layer_busy(self.L))

    @property
    def has_saved(self):
        return bool(kt_layer_has_saved(self.L))

    def release_saved(self):
        kt_layer_release_saved(self.L)

    def profile(self):
        """The per-phase profile since creation or the last reset_profile() (ktmoe.h)."""
        cdef kt_profile p
        cdef int i
        kt_layer_profile(self.L, &p)
        phases = []
        for i in range(KT_NPHASE):
            st = p.ph[i]
            phases.append({"name": kt_phase_name(i).decode(), "pass": "backward" if kt_phase_is_backward(i) else "forward",
                           "calls": st.calls, "tasks": st.tasks, "wall_s": st.wall, "thread_s": st.thread,
                           "busy_s": st.busy, "base_gemm_s": st.base_s, "base_gemm_flops": st.base_flops,
                           "lora_gemm_s": st.lora_s, "lora_gemm_flops": st.lora_flops})
        return {"threads": self.num_threads,
                "passes": {"forward": {"calls": p.passes[0], "wall_s": p.pass_wall[0]},
                           "backward": {"calls": p.passes[1], "wall_s": p.pass_wall[1]}},
                "phases": phases}

    def reset_profile(self):
        kt_layer_profile_reset(self.L)

    def set_threads(self, int n):
        if kt_layer_set_threads(self.L, n):
            raise RuntimeError(f"ktmoe: could not start {n} worker threads")
        self.num_threads = n

    def submit_forward(self, int T, int k, size_t x, str x_dtype, size_t ids, str ids_dtype,
                       size_t w, str w_dtype, lora, bint keep, size_t y):
        cdef kt_lora lo
        cdef kt_lora *lp = NULL
        cdef int rc
        cdef int xd = DTYPE_CODES[x_dtype], idd = DTYPE_CODES[ids_dtype], wd = DTYPE_CODES[w_dtype]
        if lora is not None:
            fill_lora(&lo, lora)
            lp = &lo
        with nogil:
            rc = kt_submit_forward(self.L, T, k, <const void *>x, xd, <const void *>ids, idd,
                                   <const void *>w, wd, lp, keep, <void *>y)
        _check(rc)

    def submit_backward(self, size_t dy, grads, size_t dx, size_t dw):
        cdef kt_lora lo
        cdef kt_lora *lp = NULL
        cdef int rc
        if grads is not None:
            fill_lora(&lo, grads)
            lp = &lo
        with nogil:
            rc = kt_submit_backward(self.L, <const void *>dy, lp, <void *>dx, <void *>dw)
        _check(rc)

    def wait(self):
        cdef int rc
        with nogil:
            rc = kt_wait(self.L)
        _check(rc)


def _check(int rc):
    _raise_status(rc, KT_AT_CALL)


_ERROR_KINDS = {KT_ERRK_VALUE: ValueError, KT_ERRK_MEMORY: MemoryError, KT_ERRK_RUNTIME: RuntimeError}


def _raise_status(int status, int at):
    """Raises the error of a non-zero C status, as the table of status.c says (nothing for 0)."""
    cdef int kind = KT_ERRK_RUNTIME
    cdef const char *msg
    if status == KT_OK:
        return
    msg = kt_status_message(status, at, &kind)
    if msg == NULL:
        raise RuntimeError(f"ktmoe: kernel error {status}")
    raise _ERROR_KINDS[kind](msg.decode())
