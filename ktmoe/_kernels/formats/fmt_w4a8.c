/* fmt_w4a8.c: the int4 row with int8 activations (W8A8 on int4 weights; design.md 5): the
 * int4 codes and group scales of fmt_int4.c (qmat.c), A's rows quantized to int8
 * (act_int8.c) and the int8 GEMMs of gemm_int8.h on the codes unpacked to int8, exact int32
 * sums scaled afterwards in fp32.
 *   nt: one GEMM per group of K, C += sa[i] sw[j, g] (Aq Wq_g^T)[i, j]; A's rows are
 *       quantized once per call (cache_fwd).
 *   nn: the scales change with the output column group, so A is folded with them and
 *       quantized once per group (each group of a row block is handled by exactly one task:
 *       no repetition; cache_bwd 0).
 * No transposed or re-quantized copy of W is made. */
#include "layer/pass.h"
#include <string.h>

enum { KP = 512 }; /* K panel of unpacked codes: a multiple of every int4 group size */

/* dst[i, j] = the int4 code of W_e[r0 + i, c0 + j] as int8 (c0, nc even) */
static void unpack(const kt_qmat *W, int e, int r0, int nr, int c0, int nc, int8_t *dst, long ldd) {
    for (int i = 0; i < nr; i++) {
        long row = (long)e * W->rows + r0 + i;
        const int8_t *q = W->q + row * (W->cols / 2) + c0 / 2;
        int8_t *d = dst + i * ldd;
        for (int j = 0; j < nc / 2; j++) {
            d[2 * j] = (int8_t)((int8_t)(q[j] << 4) >> 4);
            d[2 * j + 1] = (int8_t)(q[j] >> 4);
        }
    }
}

static void base_nt(const kt_pass *c, int which, int e, int m, int row0, int n, const kt_bf16 *A, long lda, long p0,
                    float *C, long ldc) {
    const kt_layer *L = c->L;
    const kt_qmat *W = qmat(L, which);
    int K = which ? L->I : L->H;
    const int8_t *aq;
    const float *sa;
    long ldq = act_rows(c, m, K, A, lda, p0, NULL, 0, &aq, &sa);
    int32_t *acc = kt_scratch(KT_SCR_IACC, sizeof(int32_t) * (size_t)(m ? m : 1) * n);
    const float *sw = W->scale + ((long)e * W->rows + row0) * W->ngroups;
    int8_t *wq = kt_scratch(KT_SCR_PANEL, (size_t)n * KP);
    for (int i = 0; i < m; i++) memset(C + i * ldc, 0, sizeof(float) * (size_t)n);
    for (int k0 = 0; k0 < K; k0 += KP) {
        int kp = K - k0 < KP ? K - k0 : KP;
        unpack(W, e, row0, n, k0, kp, wq, kp);
        for (int g0 = k0; g0 < k0 + kp; g0 += W->group) {
            int g = g0 / W->group;
            IGEMM_NT(m, n, W->group, aq + g0, ldq, wq + (g0 - k0), kp, acc, n, 0);
            for (int i = 0; i < m; i++)
                for (int j = 0; j < n; j++)
                    C[i * ldc + j] += sa[i] * sw[(long)j * W->ngroups + g] * (float)acc[(long)i * n + j];
        }
    }
}

static void base_nn(const kt_pass *c, int which, int e, int m, int col0, int n, const kt_bf16 *A, long lda, long p0,
                    float *C, long ldc) {
    const kt_layer *L = c->L;
    const kt_qmat *W = qmat(L, which);
    int K = which ? L->H : 2 * L->I;
    (void)p0;
    int32_t *acc = kt_scratch(KT_SCR_IACC, sizeof(int32_t) * (size_t)(m ? m : 1) * n);
    const float *sw = W->scale + (long)e * W->rows * W->ngroups; /* [K, ngroups] */
    int8_t *aq = kt_scratch(KT_SCR_ACT_Q, (size_t)(m ? m : 1) * K);
    float *sa = kt_scratch(KT_SCR_ACT_SCALE, sizeof(float) * (size_t)(m ? m : 1));
    int8_t *wq = kt_scratch(KT_SCR_PANEL, (size_t)K * n);
    unpack(W, e, 0, K, col0, n, wq, n);
    for (int j0 = 0; j0 < n;) {
        int g = (col0 + j0) / W->group, j1 = (g + 1) * W->group - col0;
        j1 = j1 < n ? j1 : n;
        quantize_act(m, K, A, lda, sw + g, W->ngroups, aq, K, sa);
        IGEMM_NN(m, j1 - j0, K, aq, K, wq + j0, n, acc, n, 0);
        for (int i = 0; i < m; i++)
            for (int j = j0; j < j1; j++) C[i * ldc + j] = sa[i] * (float)acc[(long)i * n + j - j0];
        j0 = j1;
    }
}

const kt_fmt_ops KT_FN(kt_fmt_w4a8) = {
    .name = "int4 w8a8", .wformat = KT_W_INT4, .act_int8 = 1,
    .code_bits = 4, .qmax = 7.f, .per_row_scale = 0,
    .alloc = kt_qmat_alloc, .pack_rows = kt_qmat_pack_rows, .weight_bytes = kt_qmat_weight_bytes,
    .base_nt = base_nt, .base_nn = base_nn, .small_m = 0, .cache_fwd = 1, .cache_bwd = 0,
};
