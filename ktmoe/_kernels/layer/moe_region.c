/* moe_region.c: a layer's packed expert weights in caller-provided memory (one shared-memory
 * region per host, mapped by every local rank: ktmoe/torch/distributed.py).
 *
 * Layout of a region: one header page (kt_region_header: the shapes and format it was packed
 * for, and a ready flag set last), then the layer's weight arrays in the order and sizes
 * kt_layer_alloc_weights (moe_layer.c) allocates them, each starting on a page boundary. The
 * layout is therefore derived from the same code that sizes a layer's own weights, for every
 * format. kt_region_pack fills a writable region (with the same packing as kt_layer_create);
 * kt_layer_attach builds a layer over a packed region, mapped read-only if the caller likes: the
 * layer never writes to it and never frees it. Offsets, not addresses, are stored, so every
 * process may map the region anywhere. */
#include "moe_internal.h"
#include <stdlib.h>
#include <string.h>

#define KT_REGION_MAGIC 0x4e4f4947455254ebULL /* arbitrary */
#define KT_REGION_VERSION 1

typedef struct {
    uint64_t magic;
    int32_t version, E, H, I, isa, transposed, wformat, group_size;
    uint64_t bytes;  /* the region's size for this layout (kt_layer_region_bytes) */
    int32_t ready;   /* 1 once every weight is packed (written last, release order) */
} kt_region_header;

size_t kt_layer_region_bytes(int E, int H, int I, int isa, int transposed, int wformat, int group_size) {
    kt_layer L;
    memset(&L, 0, sizeof L);
    L.E = E; L.H = H; L.I = I; L.isa = isa; L.wformat = wformat;
    L.fmt = kt_fmt_of(isa, wformat, 0);
    if (!L.fmt) return 0; /* no such format: creating the layer fails with KT_ERR_FORMAT */
    L.region.mode = KT_REGION_MEASURE;
    L.region.used = KT_REGION_ALIGN; /* the header page */
    kt_layer_alloc_weights(&L, transposed, group_size);
    return kt_region_align_up(L.region.used);
}

static void header_fill(kt_region_header *h, int E, int H, int I, int isa, int transposed, int wformat,
                        int group_size, size_t bytes) {
    memset(h, 0, sizeof *h);
    h->magic = KT_REGION_MAGIC;
    h->version = KT_REGION_VERSION;
    h->E = E; h->H = H; h->I = I; h->isa = isa; h->transposed = transposed; h->wformat = wformat;
    const kt_fmt_ops *f = kt_fmt_of(isa, wformat, 0);
    h->group_size = f && f->code_bits && !f->per_row_scale ? group_size : 0; /* only a grouped layout depends on it */
    h->bytes = bytes;
}

/* The layer over base[0, bytes): weights after the header page; -6 if the region is smaller than
 * the layout or the layer's weight arrays did not all come from it. */
static kt_layer *create_in(void *base, size_t bytes, int attach, int E, int H, int I, int isa, int num_threads,
                           const void *gate, const void *up, long stride, int w_dtype, const void *down,
                           int down_dtype, int transposed, int wformat, int group_size, int act_int8,
                           int *status) {
    kt_region r = {KT_REGION_IN, base, bytes, KT_REGION_ALIGN, 0};
    kt_layer *L = kt_layer_create_ex(E, H, I, isa, num_threads, gate, up, stride, w_dtype, down, down_dtype,
                                     transposed, wformat, group_size, act_int8, &r, attach, status);
    if (L && L->region.requested != kt_layer_weight_bytes(L)) { /* a weight array outside kt_weight_alloc */
        kt_layer_destroy(L);
        *status = KT_ERR_REGION_SMALL;
        return NULL;
    }
    if (!L && *status == KT_ERR_NOMEM && kt_layer_region_bytes(E, H, I, isa, transposed, wformat, group_size) > bytes)
        *status = KT_ERR_REGION_SMALL;
    return L;
}

int kt_region_pack(void *base, size_t bytes, int E, int H, int I, int isa,
                   const void *gate, const void *up, long gate_up_expert_stride, int w_dtype,
                   const void *down, int down_dtype, int transposed, int wformat, int group_size) {
    size_t need = kt_layer_region_bytes(E, H, I, isa, transposed, wformat, group_size);
    if (bytes < need) return KT_ERR_REGION_SMALL;
    kt_region_header *h = base;
    header_fill(h, E, H, I, isa, transposed, wformat, group_size, need);
    int status;
    kt_layer *L = create_in(base, bytes, 0, E, H, I, isa, 1, gate, up, gate_up_expert_stride, w_dtype, down,
                            down_dtype, transposed, wformat, group_size, 0, &status);
    if (!L) return status;
    kt_layer_destroy(L); /* the weights stay in the region */
    __atomic_store_n(&h->ready, 1, __ATOMIC_RELEASE);
    return 0;
}

kt_layer *kt_layer_attach(const void *base, size_t bytes, int E, int H, int I, int isa, int num_threads,
                          int transposed, int wformat, int group_size, int act_int8, int *status) {
    const kt_region_header *h = base;
    kt_region_header want;
    size_t need = kt_layer_region_bytes(E, H, I, isa, transposed, wformat, group_size);
    header_fill(&want, E, H, I, isa, transposed, wformat, group_size, need);
    if (bytes < need || bytes < sizeof *h) { *status = KT_ERR_REGION_SMALL; return NULL; }
    if (!__atomic_load_n(&h->ready, __ATOMIC_ACQUIRE)) { *status = KT_ERR_REGION_NOT_PACKED; return NULL; }
    want.ready = 1;
    if (memcmp(h, &want, sizeof want)) { *status = KT_ERR_REGION_MISMATCH; return NULL; }
    /* the layer only reads the region (its pieces are never written or freed in attach mode) */
    return create_in((void *)base, bytes, 1, E, H, I, isa, num_threads, NULL, NULL, 0, KT_BF16, NULL, KT_BF16,
                     transposed, wformat, group_size, act_int8, status);
}
