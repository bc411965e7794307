/* weights.c: where a layer's packed weight arrays live (kt_weight_alloc, moe_internal.h): the
 * layer's own 64-byte aligned memory, page-aligned pieces of a caller's region (moe_region.c), or
 * nothing at all when a region's layout is only measured. Every weight array of every format comes
 * from here, so the region layout follows from the code that sizes a layer's own weights. */
#include "moe_internal.h"
#include <stdlib.h>

static _Alignas(64) char measure_dummy[64]; /* what a measured (not allocated) piece points to */

void *kt_weight_alloc(kt_layer *L, size_t bytes) {
    kt_region *r = &L->region;
    if (r->mode == KT_REGION_NONE) return kt_alloc(bytes);
    size_t at = kt_region_align_up(r->used);
    r->used = at + bytes;
    r->requested += bytes;
    if (r->mode == KT_REGION_MEASURE) return measure_dummy;
    return r->used <= r->size ? r->base + at : NULL;
}

void kt_weight_free(kt_layer *L, void *p) {
    if (L->region.mode == KT_REGION_NONE) free(p);
}
