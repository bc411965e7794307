/* memory.c: the kernels' allocations (memory.h): aligned blocks, growing buffers, the job's
 * workspace and the per-thread scratch slots. */
#include "memory.h"
#include <stdlib.h>
#include <sys/mman.h>

#define KT_HUGE (2u << 20)

void *kt_alloc(size_t bytes) {
    if (bytes == 0) bytes = 64;
    void *p = NULL;
    size_t align = bytes >= 4 * (size_t)KT_HUGE ? KT_HUGE : 64;
    if (posix_memalign(&p, align, (bytes + 63) & ~(size_t)63)) return NULL;
    /* big buffers: ask for transparent huge pages (fewer page faults and TLB misses) */
    if (align == KT_HUGE) madvise(p, bytes, MADV_HUGEPAGE);
    return p;
}

void *kt_buf_get(kt_buf *b, size_t bytes) {
    if (b->n < bytes || !b->p) {
        free(b->p);
        b->p = kt_alloc(bytes);
        b->n = b->p ? bytes : 0;
    }
    return b->p;
}

void kt_buf_free(kt_buf *b) {
    free(b->p);
    b->p = NULL;
    b->n = 0;
}

static kt_buf workspace[KT_WS_COUNT];

void *kt_workspace(int slot, size_t bytes) { return kt_buf_get(&workspace[slot], bytes); }

static __thread struct { void *p; size_t n; } scratch[KT_SCR_COUNT];

void *kt_scratch(int slot, size_t bytes) {
    if (scratch[slot].n < bytes) {
        free(scratch[slot].p);
        scratch[slot].p = kt_alloc(bytes);
        scratch[slot].n = scratch[slot].p ? bytes : 0;
    }
    return scratch[slot].p;
}
