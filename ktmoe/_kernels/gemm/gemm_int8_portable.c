/* gemm_int8_portable.c: the int8 GEMMs of gemm_int8.h in plain C, for any x86-64 CPU.
 *
 * Same loop orders as gemm_portable.c (unit-stride innermost loop, so the compiler
 * vectorises it): nt is a dot product of a row of A with a row of W, nn an axpy of a row
 * of W into a row of C. Products and sums in int32, exact.
 */
#include "gemm_int8.h"
#include <string.h>

void kt_igemm_nt_portable(KT_IGEMM_ARGS) {
    for (int m = 0; m < M; m++) {
        int32_t *c = C + (long)m * ldc;
        const int8_t *a = A + (long)m * lda;
        for (int n = 0; n < N; n++) {
            const int8_t *w = W + (long)n * ldw;
            int32_t s = 0;
            for (int k = 0; k < K; k++) s += (int32_t)a[k] * (int32_t)w[k];
            c[n] = accumulate ? c[n] + s : s;
        }
    }
}

void kt_igemm_nn_portable(KT_IGEMM_ARGS) {
    for (int m = 0; m < M; m++) {
        int32_t *c = C + (long)m * ldc;
        if (!accumulate) memset(c, 0, sizeof(int32_t) * (size_t)N);
        const int8_t *a = A + (long)m * lda;
        for (int k = 0; k < K; k++) {
            int32_t av = a[k];
            const int8_t *w = W + (long)k * ldw;
            for (int n = 0; n < N; n++) c[n] += av * (int32_t)w[n];
        }
    }
}
