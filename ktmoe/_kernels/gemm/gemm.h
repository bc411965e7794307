/* gemm.h: the two bf16 GEMM shapes every ISA path implements.
 *
 * Weights are stored plain, row-major bf16 (the torch nn.Linear orientation [out, in]),
 * so one copy serves the forward ("nt": multiply by W^T) and the backward ("nn": multiply
 * by W) without a second, transposed copy. Activations are bf16, results fp32.
 *
 *   nt:  C[m, n] (+)= sum_k A[m*lda + k] * W[n*ldw + k]     W is [N, K]
 *   nn:  C[m, n] (+)= sum_k A[m*lda + k] * W[k*ldw + n]     W is [K, N]
 *
 * accumulate = 0 overwrites C, 1 adds to it. Any M, N, K >= 0 (tails included); M, N or K
 * equal to 0 is allowed (K = 0 with accumulate = 0 writes zeros). Strides are in elements.
 * A, W and C never alias. Single-threaded: callers split the work. Every kernel target <isa> of
 * kt_isas.h (meson.build's list) defines kt_gemm_nt_<isa> and kt_gemm_nn_<isa>.
 */
#ifndef KTMOE_GEMM_H
#define KTMOE_GEMM_H
#include <stdint.h>
#include <string.h>
#include "kt_isas.h"

typedef uint16_t kt_bf16;

#define KT_GEMM_ARGS int M, int N, int K, const kt_bf16 *A, long lda, \
                     const kt_bf16 *W, long ldw, float *C, long ldc, int accumulate

typedef void (*kt_gemm_fn)(KT_GEMM_ARGS);

#define KT_GEMM_PROTO(name, NAME, needs, flags) void kt_gemm_nt_##name(KT_GEMM_ARGS); void kt_gemm_nn_##name(KT_GEMM_ARGS);
KT_ISA_LIST(KT_GEMM_PROTO)
#undef KT_GEMM_PROTO

/* AMX only: weights prepacked once, at load, into the tile layout the forward's multiplies
 * read, so that no call repacks them (the layer does this for bf16 weights on the amx path).
 * Layout of a [rows, cols] matrix: pairs of 16-row tiles (32 rows; the last pair zero-padded)
 * one after another; within a pair, for every 32-column step s (the last zero-padded), the
 * two VNNI tiles of that step, 512 bf16 each, where row kk, word n of tile t holds the pair
 * (W[16t + n, 32s + 2kk], W[16t + n, 32s + 2kk + 1]). Element offset of (pair p, step s,
 * tile t) = (p * ks + s) * 1024 + t * 512, ks = ceil(cols / 32); total kt_prepacked_elems.
 * The products read it in place (nt: C = A W[row0 : row0 + N, :]^T, all cols contracted) or
 * make the backward's tiles from it in registers (nn: C = A W[:, col0 : col0 + N], all rows
 * contracted); row0 / col0 are multiples of 32. They overwrite C; 0, or -2 if the per-thread
 * scratch cannot be allocated. */
size_t kt_prepacked_elems(int rows, int cols);
void kt_prepack_amx(const kt_bf16 *W, long ldw, int rows, int cols, kt_bf16 *dst);
int kt_gemm_nt_pre_amx(int M, int N, const kt_bf16 *A, long lda, const kt_bf16 *Wp, int rows, int cols, int row0,
                       float *C, long ldc);
int kt_gemm_nn_pre_amx(int M, int N, const kt_bf16 *A, long lda, const kt_bf16 *Wp, int rows, int cols, int col0,
                       float *C, long ldc);

/* AMX needs per-thread tile configuration and OS permission; kt_amx_request_permission()
 * (cpu_features.c) must have succeeded before any kt_gemm_*_amx call. */

/* bf16 <-> fp32, round to nearest even; NaN stays NaN. Bit casts through memcpy (not
 * unions) and a select instead of a branch, so that loops of conversions vectorise. */
static inline float kt_bf16_to_f32(kt_bf16 h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}
static inline kt_bf16 kt_f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    uint32_t quiet_nan = (u >> 16) | 0x40u;
    return (kt_bf16)((u & 0x7fffffffu) > 0x7f800000u ? quiet_nan : rounded);
}
#endif
