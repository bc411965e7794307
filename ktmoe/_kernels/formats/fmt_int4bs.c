/* fmt_int4bs.c: the int4bs row, int4 with bf16 scales (weight-only; design.md 5): the signed
 * 4-bit codes and nibble layout of fmt_int4.c, one bf16 scale per row and group of `group`
 * columns kept as bf16 (kt_qmat.scale_bf16), so that a published INT4 checkpoint with bf16
 * scales (compressed-tensors pack-quantized, Kimi K2) is stored in its own bytes: codes +
 * bf16 scales. Stored by qmat.c (ktmoe's quantizer rounds the scale to bf16 before it
 * makes the codes). The codes decode as int4's, so the products are int4's weight-only
 * kernels (kt_wo_int4), whose loops read the scales through kt_qscale. No W8A8 row: int8
 * activations take int4 (fp32 scales, the bf16 ones widened exactly). */
#include "fmt_weight_only.h"

extern const kt_wo_kernels KT_FN(kt_wo_int4);

const kt_fmt_ops KT_FN(kt_fmt_int4bs) = {
    .name = "int4bs", .wformat = KT_W_INT4BS, .act_int8 = 0,
    .code_bits = 4, .qmax = 7.f, .per_row_scale = 0, .scale_bf16 = 1,
    .alloc = kt_qmat_alloc, .pack_rows = kt_qmat_pack_rows, .weight_bytes = kt_qmat_weight_bytes,
    .base_nt = wo_base_nt, .base_nn = wo_base_nn, .wo = &KT_FN(kt_wo_int4), .small_m = QSMALL,
};
