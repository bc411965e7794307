/* gemm_amx.h: what the two files of the bf16 AMX GEMMs share: gemm_amx.c (the entry points,
 * packing, the packed path and the prepacked weights) and gemm_amx_ct.c (the transposed-output
 * path for nt with small M). The design and the paths are described atop gemm_amx.c; the
 * tuning constants (KT_AMX_*) are in amx.h. */
#ifndef KTMOE_GEMM_AMX_H
#define KTMOE_GEMM_AMX_H
#include "gemm.h"
#include "amx.h"

enum {
    KT_KP = KT_AMX_KP,
    KT_NC = KT_AMX_NC,
    KT_MCT = KT_AMX_MCT,
    KT_TILE = 16 * 32,            /* bf16 values in one 16 x 64-byte tile */
    KT_PAIR = 2 * KT_TILE,        /* one K step of a packed tile pair */
    KT_AROWS = KT_MCT > 64 ? (KT_MCT + 31) / 32 * 32 : 64, /* rows of the A^T scratch */
};
_Static_assert(KT_KP % 32 == 0 && KT_KP > 0 && KT_NC % 32 == 0 && KT_NC > 0, "KT_AMX_KP, KT_AMX_NC: multiples of 32");
_Static_assert(KT_AMX_MSMALL_NT >= 1 && KT_AMX_MSMALL_NN >= 1 && KT_MCT >= 0, "KT_AMX_MSMALL_*: >= 1");

/* Per-thread scratch. b: packed W of one (chunk, panel); a: packed A block (packed path) or
 * A^T (transposed path); wst: W edge staging; cst: fp32 C staging / C^T output tiles. */
typedef struct {
    _Alignas(64) kt_bf16 b[2][KT_NC * KT_KP];
    _Alignas(64) kt_bf16 a[KT_AROWS * KT_KP]; /* A^T, up to KT_AMX_MCT rows */
    _Alignas(64) kt_bf16 wst[2][KT_TILE];
    _Alignas(64) float cst[4][16 * 16];
} kt_scratch;

static inline __mmask32 kt_mask32(int n) { return n >= 32 ? 0xffffffffu : n <= 0 ? 0u : ((1u << n) - 1u); }

/* Copy rows [0, rows) x k [0, kv) of X (stride ld) into staging tile buf (rows >= rows stay zero). */
KT_AI void kt_stage_rows(kt_bf16 *buf, const kt_bf16 *X, long ld, int rows, int kv) {
    const __mmask32 km = kt_mask32(kv);
    for (int r = 0; r < rows; r++)
        _mm512_store_si512((void *)(buf + 32 * r), _mm512_maskz_loadu_epi16(km, X + (long)r * ld));
}

/* VNNI pack of S (rows x kp, row-major, stride ld, contraction along the row) into ks K steps
 * of the pair layout at dst (gemm_amx.c); rows beyond `rows` and k beyond kp are zero. */
void kt_pack_rows_vnni_amx(const kt_bf16 *S, long ld, int rows, int kp, kt_bf16 *dst, int ks);
/* the transposed-output path (gemm_amx_ct.c): nt with M <= KT_AMX_MCT, tiles configured */
void kt_gemm_nt_ct_amx(KT_GEMM_ARGS, kt_scratch *S);
#endif
