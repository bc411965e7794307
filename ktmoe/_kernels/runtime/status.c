/* status.c: the one table of the C API's status codes (ktmoe.h, enum kt_status): for each
 * non-zero status the error message and the kind of exception the Cython side (_core.pyx)
 * raises. A status returned while a layer is created or packed and one returned by a call
 * may read differently (out of memory: the packed weights vs the call's buffers). */
#include "ktmoe.h"
#include <stddef.h>

typedef struct {
    int status, at; /* at: KT_AT_CREATE, KT_AT_CALL, or -1 for both */
    int kind;
    const char *message;
} kt_status_row;

static const kt_status_row rows[] = {
    {KT_ERR_BUSY, -1, KT_ERRK_RUNTIME, "ktmoe: this layer already has a call in flight; wait() for it first"},
    {KT_ERR_NOMEM, KT_AT_CALL, KT_ERRK_MEMORY, "ktmoe: out of memory for this call's buffers"},
    {KT_ERR_NOMEM, KT_AT_CREATE, KT_ERRK_MEMORY,
     "ktmoe: could not allocate the packed expert weights or start worker threads"},
    {KT_ERR_NOT_KEPT, -1, KT_ERRK_RUNTIME, "ktmoe: backward needs a forward with keep_for_backward=True first"},
    {KT_ERR_GATE_UP_NONFINITE, -1, KT_ERRK_VALUE, "gate_up: contains NaN or Inf; such weights cannot be quantized"},
    {KT_ERR_DOWN_NONFINITE, -1, KT_ERRK_VALUE, "down: contains NaN or Inf; such weights cannot be quantized"},
    {KT_ERR_REGION_SMALL, -1, KT_ERRK_VALUE,
     "region: smaller than MoEExperts.region_bytes(...) for these shapes and format"},
    {KT_ERR_REGION_NOT_PACKED, -1, KT_ERRK_VALUE, "region: holds no packed weights yet (its packing has not completed)"},
    {KT_ERR_REGION_MISMATCH, -1, KT_ERRK_VALUE,
     "region: was packed for other shapes, weight format or kernel path than the ones given"},
    {KT_ERR_FORMAT, -1, KT_ERRK_VALUE,
     "weights: this weight format, activation mode and weight source have no kernel (fmt_table.c)"},
};

/* NULL for KT_OK and for a status the table does not know (the caller reports its number). */
const char *kt_status_message(int status, int at, int *kind) {
    for (size_t i = 0; i < sizeof rows / sizeof *rows; i++)
        if (rows[i].status == status && (rows[i].at < 0 || rows[i].at == at)) {
            *kind = rows[i].kind;
            return rows[i].message;
        }
    *kind = KT_ERRK_RUNTIME;
    return NULL;
}
