/* fmt_w8a8.c: the int8 row with int8 activations (W8A8; design.md 5): the int8 codes and
 * per-row scales of fmt_int8.c (qmat.c), A's rows quantized to int8 (act_int8.c) and the
 * int8 GEMMs of gemm_int8.h, whose exact int32 sums are scaled afterwards in fp32.
 *   nt: C = sa[i] sw[j] (Aq Wq^T)[i, j]
 *   nn: the W row scales multiply A's columns before A is quantized (per-row scales fold into
 *       the incoming gradient): C = sa'[i] (A' q Wq)[i, j], A' = A diag(sw).
 * Both fold and quantize A's rows once per call for all column chunks (cache_fwd / cache_bwd).
 * No transposed or re-quantized copy of W is made. */
#include "layer/pass.h"

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
    IGEMM_NT(m, n, K, aq, ldq, W->q + ((long)e * W->rows + row0) * K, K, acc, n, 0);
    for (int i = 0; i < m; i++)
        for (int j = 0; j < n; j++) C[i * ldc + j] = sa[i] * sw[j] * (float)acc[(long)i * n + j];
}

static void base_nn(const kt_pass *c, int which, int e, int m, int col0, int n, const kt_bf16 *A, long lda, long p0,
                    float *C, long ldc) {
    const kt_layer *L = c->L;
    const kt_qmat *W = qmat(L, which);
    int K = which ? L->H : 2 * L->I, cols = which ? L->I : L->H;
    int32_t *acc = kt_scratch(KT_SCR_IACC, sizeof(int32_t) * (size_t)(m ? m : 1) * n);
    const float *sw = W->scale + (long)e * W->rows * W->ngroups; /* [K, ngroups] */
    /* one group: A's rows folded with W's row scales and quantized once */
    const int8_t *aq;
    const float *sa;
    long ldq = act_rows(c, m, K, A, lda, p0, sw, 1, &aq, &sa);
    IGEMM_NN(m, n, K, aq, ldq, W->q + (long)e * K * cols + col0, cols, acc, n, 0);
    for (int i = 0; i < m; i++)
        for (int j = 0; j < n; j++) C[i * ldc + j] = sa[i] * (float)acc[(long)i * n + j];
}

const kt_fmt_ops KT_FN(kt_fmt_w8a8) = {
    .name = "int8 w8a8", .wformat = KT_W_INT8, .act_int8 = 1,
    .code_bits = 8, .qmax = 127.f, .per_row_scale = 1,
    .alloc = kt_qmat_alloc, .pack_rows = kt_qmat_pack_rows, .weight_bytes = kt_qmat_weight_bytes,
    .base_nt = base_nt, .base_nn = base_nn, .small_m = 0, .cache_fwd = 1, .cache_bwd = 1,
};
