/* fmt_weight_only.c: base_nt / base_nn of the weight-only quantized rows (int8, int4, fp8
 * with bf16 activations): blocks of at most QSMALL rows through the format's small-M kernels,
 * others on bf16 panels expanded one K panel at a time (fmt_weight_only.h). */
#include "fmt_weight_only.h"

static void weight_only(const kt_wo_kernels *k, const kt_qmat *W, int nt, int e, int m, int off, int n, int K,
                        const kt_bf16 *A, long lda, float *C, long ldc) {
    if (m <= QSMALL) {
        if (m) (nt ? k->small_nt : k->small_nn)(W, e, m, off, n, A, lda, C, ldc);
        return;
    }
    kt_bf16 *wb = kt_scratch(KT_SCR_PANEL, sizeof(kt_bf16) * (size_t)n * QKP);
    for (int k0 = 0; k0 < K; k0 += QKP) {
        int kp = K - k0 < QKP ? K - k0 : QKP;
        if (nt) {
            k->expand_bf16(W, e, off, n, k0, kp, wb, kp);
            GEMM_NT(m, n, kp, A + k0, lda, wb, kp, C, ldc, k0 > 0);
        } else {
            k->expand_bf16(W, e, k0, kp, off, n, wb, n);
            GEMM_NN(m, n, kp, A + k0, lda, wb, n, C, ldc, k0 > 0);
        }
    }
}

void wo_base_nt(const kt_pass *c, int which, int e, int m, int row0, int n, const kt_bf16 *A, long lda, long p0,
                float *C, long ldc) {
    const kt_layer *L = c->L;
    (void)p0;
    weight_only(L->fmt->wo, qmat(L, which), 1, e, m, row0, n, which ? L->I : L->H, A, lda, C, ldc);
}

void wo_base_nn(const kt_pass *c, int which, int e, int m, int col0, int n, const kt_bf16 *A, long lda, long p0,
                float *C, long ldc) {
    const kt_layer *L = c->L;
    (void)p0;
    weight_only(L->fmt->wo, qmat(L, which), 0, e, m, col0, n, which ? L->H : 2 * L->I, A, lda, C, ldc);
}
