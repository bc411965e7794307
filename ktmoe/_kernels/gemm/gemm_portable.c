/* gemm_portable.c: the bf16 GEMMs of gemm.h in plain C, for any x86-64 CPU.
 *
 * Loop order keeps the innermost loop unit-stride so the compiler can vectorise it with
 * whatever the baseline ISA offers (SSE2): nt walks a row of A against a row of W (a dot
 * product), nn streams a row of W into a row of C (an axpy). fp32 accumulation throughout.
 */
#include "gemm.h"
#include <string.h>

void kt_gemm_nt_portable(KT_GEMM_ARGS) {
    enum { KB = 256 };
    float a32[KB];
    for (int m = 0; m < M; m++) {
        float *c = C + (long)m * ldc;
        if (!accumulate) memset(c, 0, sizeof(float) * (size_t)N);
        for (int k0 = 0; k0 < K; k0 += KB) {
            int kb = K - k0 < KB ? K - k0 : KB;
            const kt_bf16 *a = A + (long)m * lda + k0;
            for (int k = 0; k < kb; k++) a32[k] = kt_bf16_to_f32(a[k]);
            for (int n = 0; n < N; n++) {
                const kt_bf16 *w = W + (long)n * ldw + k0;
                float s = 0.f;
                for (int k = 0; k < kb; k++) s += a32[k] * kt_bf16_to_f32(w[k]);
                c[n] += s;
            }
        }
    }
}

void kt_gemm_nn_portable(KT_GEMM_ARGS) {
    for (int m = 0; m < M; m++) {
        float *c = C + (long)m * ldc;
        if (!accumulate) memset(c, 0, sizeof(float) * (size_t)N);
        const kt_bf16 *a = A + (long)m * lda;
        for (int k = 0; k < K; k++) {
            float av = kt_bf16_to_f32(a[k]);
            const kt_bf16 *w = W + (long)k * ldw;
            for (int n = 0; n < N; n++) c[n] += av * kt_bf16_to_f32(w[n]);
        }
    }
}
