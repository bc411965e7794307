/* gemm_int8.h: the int8 GEMM shapes every ISA path implements (W8A8 mode, design.md 5).
 *
 * Same two shapes as the bf16 GEMMs of gemm.h, on int8 inputs with exact int32 results:
 *
 *   nt:  C[m, n] (+)= sum_k A[m*lda + k] * W[n*ldw + k]     W is [N, K]
 *   nn:  C[m, n] (+)= sum_k A[m*lda + k] * W[k*ldw + n]     W is [K, N]
 *
 * Inputs are symmetric int8 in [-127, 127] (-128 never occurs: ktmoe's quantizers clip to
 * +-127; implementations may rely on it). K <= 65536, so sums fit int32 exactly.
 * accumulate = 0 overwrites C, 1 adds to it. Any M, N, K >= 0 (tails included); K = 0 with
 * accumulate = 0 writes zeros. Strides are in elements. A, W and C never alias.
 * Single-threaded: callers split the work. Every kernel target <isa> of kt_isas.h defines
 * kt_igemm_nt_<isa> and kt_igemm_nn_<isa>; nothing outside A [M x K], W's
 * [N x K] / [K x N] region and C [M x N] is read or written.
 */
#ifndef KTMOE_GEMM_INT8_H
#define KTMOE_GEMM_INT8_H
#include <stdint.h>
#include "kt_isas.h"

#define KT_IGEMM_ARGS int M, int N, int K, const int8_t *A, long lda, \
                      const int8_t *W, long ldw, int32_t *C, long ldc, int accumulate

typedef void (*kt_igemm_fn)(KT_IGEMM_ARGS);

#define KT_IGEMM_PROTO(name, NAME, needs, flags) void kt_igemm_nt_##name(KT_IGEMM_ARGS); void kt_igemm_nn_##name(KT_IGEMM_ARGS);
KT_ISA_LIST(KT_IGEMM_PROTO)
#undef KT_IGEMM_PROTO
#endif
