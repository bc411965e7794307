/* gemm_amx_ct.c: the bf16 AMX GEMM's transposed-output path (path 2 atop gemm_amx.c): nt with
 * M <= KT_AMX_MCT computes C^T = W * A^T, W tile-loaded straight from memory (never packed),
 * A^T packed once per K panel into VNNI tiles; blocks of 32 W rows x 32 A rows use all 8
 * tiles, and each 16x16 C^T accumulator is transposed in AVX-512 registers into C. */
#include "gemm_amx.h"
#include <string.h>

/* C^T output tile (16 n x 16 m, fp32, in buf) -> C[m, n] for m < mv, n < nv, (+)=. */
KT_AI void kt_ct_store(float *C, long ldc, float *buf, int mv, int nv, int acc) {
    __m512i r[16];
    for (int i = 0; i < 16; i++) r[i] = _mm512_load_si512((const void *)(buf + 16 * i));
    kt_transpose16x16_epi32(r);
    const __mmask16 m = kt_mask16(nv);
    for (int i = 0; i < mv; i++) {
        __m512 v = _mm512_castsi512_ps(r[i]);
        if (acc) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(m, C + (long)i * ldc));
        _mm512_mask_storeu_ps(C + (long)i * ldc, m, v);
    }
}

#define KT_CT_OUT(t, cc, mv, nv)                                                        \
    do {                                                                                \
        _tile_stored(t, S->cst[t], 64);                                                 \
        KT_MEM_BARRIER(S->cst[t]);                                                      \
        kt_ct_store((cc), ldc, S->cst[t], (mv), (nv), acc);                             \
    } while (0)

/* C[m, n] (+)= sum_k W[n, k] A[m, k] for n < nr (1..32), m < mr (1..32), k < kp, with W at
 * W[n0, k0] and A^T packed (pair layout, ks steps) at atp; tn = nr > 16, tm = mr > 16. */
enum { KT_PF_STEPS = 6 }; /* ct path: K steps of W prefetched ahead */

KT_AI void kt_kernel_ct_body(const int tn, const int tm, const kt_bf16 *W, long ldw, int nr, int kp, int ks,
                             const kt_bf16 *atp, int mr, float *C, long ldc, int acc, kt_scratch *S, int pf) {
    const long sw = ldw * (long)sizeof(kt_bf16);
    const int r0 = kt_min(nr, 16), r1 = nr - r0, m0v = kt_min(mr, 16), m1v = mr - m0v;
    const int kfull = kp / 32; /* K steps whose 32 values are all valid */
    const kt_bf16 *W1 = W + 16 * ldw;
    _tile_zero(0);
    if (tm) _tile_zero(1);
    if (tn) _tile_zero(2);
    if (tn && tm) _tile_zero(3);
    /* edge W tiles go through staging: zero their padding rows once */
    if (r0 < 16 || kfull < ks) memset(S->wst[0] + 32 * r0, 0, sizeof(kt_bf16) * 32 * (size_t)(16 - r0));
    if (tn && (r1 < 16 || kfull < ks)) memset(S->wst[1] + 32 * r1, 0, sizeof(kt_bf16) * 32 * (size_t)(16 - r1));
    const int d0 = r0 == 16 ? kfull : 0, d1 = r1 == 16 ? kfull : 0; /* steps loaded straight from W */
    for (int s = 0; s < ks; s++) {
        const kt_bf16 *b = atp + (long)s * KT_PAIR;
        if (pf && s + KT_PF_STEPS < ks) /* the W lines KT_PF_STEPS steps ahead (W streams from memory) */
            for (int i = 0; i < nr; i++) _mm_prefetch((const char *)(W + (long)i * ldw + 32 * (s + KT_PF_STEPS)), _MM_HINT_T0);
        KT_STEP_2X2(_tile_dpbf16ps, tn, tm, b,
                    KT_LOAD_OPERAND(4, s < d0, W + 32 * s, sw, kt_stage_rows, S->wst[0], ldw, r0, kp - 32 * s),
                    KT_LOAD_OPERAND(5, s < d1, W1 + 32 * s, sw, kt_stage_rows, S->wst[1], ldw, r1, kp - 32 * s));
    }
    KT_MEM_BARRIER(C);
    KT_CT_OUT(0, C, m0v, r0);
    if (tm) KT_CT_OUT(1, C + 16 * ldc, m1v, r0);
    if (tn) KT_CT_OUT(2, C + 16, m0v, r1);
    if (tn && tm) KT_CT_OUT(3, C + 16 * ldc + 16, m1v, r1);
}

static void kt_kernel_ct(const kt_bf16 *W, long ldw, int nr, int kp, int ks, const kt_bf16 *atp, int mr, float *C,
                         long ldc, int acc, kt_scratch *S, int pf) {
    if (nr > 16) {
        if (mr > 16) kt_kernel_ct_body(1, 1, W, ldw, nr, kp, ks, atp, mr, C, ldc, acc, S, pf);
        else kt_kernel_ct_body(1, 0, W, ldw, nr, kp, ks, atp, mr, C, ldc, acc, S, pf);
    } else {
        if (mr > 16) kt_kernel_ct_body(0, 1, W, ldw, nr, kp, ks, atp, mr, C, ldc, acc, S, pf);
        else kt_kernel_ct_body(0, 0, W, ldw, nr, kp, ks, atp, mr, C, ldc, acc, S, pf);
    }
}

void kt_gemm_nt_ct_amx(KT_GEMM_ARGS, kt_scratch *S) {
    for (int k0 = 0; k0 < K; k0 += KT_KP) {
        const int kp = kt_min(KT_KP, K - k0), ks = (kp + 31) / 32;
        const int acc = accumulate || k0 > 0;
        kt_pack_rows_vnni_amx(A + k0, lda, M, kp, S->a, ks);
        KT_MEM_BARRIER(S);
        for (int n0 = 0; n0 < N; n0 += 32)
            for (int m0 = 0; m0 < M; m0 += 32)
                kt_kernel_ct(W + (long)n0 * ldw + k0, ldw, kt_min(32, N - n0), kp, ks, S->a + (long)(m0 / 32) * ks * KT_PAIR,
                             kt_min(32, M - m0), C + (long)m0 * ldc + n0, ldc, acc, S, m0 == 0);
    }
}

