/* gemm_amx.c: the bf16 GEMMs of gemm.h on Intel AMX tiles (AMX-TILE + AMX-BF16).
 *
 *   nt:  C[m, n] (+)= sum_k A[m*lda + k] * W[n*ldw + k]     W is [N, K]
 *   nn:  C[m, n] (+)= sum_k A[m*lda + k] * W[k*ldw + n]     W is [K, N]
 *
 * Blocking. K is cut into panels of KT_KP (512) values and N into chunks of KT_NC (128)
 * columns. For every (K panel, N chunk) the matching piece of W is packed once into a
 * thread-local buffer (128 KiB, L2 resident) and reused for all of M: M is walked in blocks of
 * 32 rows, and each 32-row A block (32 KiB) meets every 32-column block of the chunk in turn.
 * One 32x32 output block uses all 8 tiles: tmm0..3 hold the 2x2 fp32 C tiles (16x16 each),
 * tmm4/5 two A tiles (16 rows x 32 k), tmm6/7 two B tiles (32 k x 16 n); every 32-wide K step
 * is 4 tile loads and 4 TDPBF16PS. C tiles start from zero (first panel, accumulate = 0) or
 * from C, and are stored straight back; only the tiles cut by the M or N edge go through a
 * zero-padded fp32 staging tile and masked AVX-512 loads/stores. Later K panels always add.
 * Blocks with only 16 rows or 16 columns skip the unused tiles.
 *
 * VNNI packing. TDPBF16PS wants its B operand as 16 rows of 64 bytes where row kk holds, for
 * n = 0..15, the bf16 pair (B[2kk, n], B[2kk+1, n]). For nt, B[k, n] = W[n, k]: a pair is one
 * 32-bit word of a W row, so a 32(k) x 16(n) B tile is the 16x16 transpose, in 32-bit words,
 * of 16 W rows of 32 bf16 each (done in AVX-512 registers). For nn, B[k, n] = W[k, n]: row kk
 * interleaves W rows 2kk and 2kk+1 element by element (one VPERMT2W per 16 columns).
 * Tails are zero padded while packing: K beyond the panel and N beyond the matrix.
 *
 * Bounds. W is read with AVX-512 masked loads (masked-out lanes never fault), so only its
 * [N x K] / [K x N] region is touched. A tiles are loaded straight from A when all 16 rows and
 * 32 k values are valid; otherwise (M tail, K tail) the valid part is copied, with masked
 * loads, into a zero-padded 16x32 staging tile. Full C tiles are loaded/stored in place with
 * the tile instructions (exactly 16 rows x 16 floats), cut ones with masked loads/stores. Tiles are
 * configured once per call, all 8 as full 16 rows x 64 bytes (palette 1): tails go through
 * the padded scratch buffers, never through a smaller tile shape.
 *
 * Compiler notes (gcc 12). Its _tile_loadconfig tells the compiler that only the first 8 bytes
 * of the 64-byte configuration are read, so at -O2/-O3 the stores that fill the rest may be
 * deleted or sunk past the ldtilecfg (result: SIGILL/SIGSEGV at the first tile instruction).
 * Likewise its _tile_loadd takes the address as a plain register operand, without declaring a
 * memory read, so stores into a scratch buffer may be moved after the tile load that reads it.
 * KT_MEM_BARRIER (an empty asm that takes the buffer's address and clobbers memory) is placed
 * between filling any buffer and the tile instruction that reads it.
 *
 * The caller must have obtained AMX permission (arch_prctl ARCH_REQ_XCOMP_PERM) for the process.
 * Single-threaded; scratch buffers are thread-local, so concurrent calls from threads are safe.
 */
#include "gemm.h"
#include <immintrin.h>
#include <string.h>

#ifndef KT_AMX_KP
#define KT_AMX_KP 512   /* K panel, a multiple of 32 */
#endif
#ifndef KT_AMX_NC
#define KT_AMX_NC 128   /* columns of W packed at once, a multiple of 32 */
#endif
enum {
    KT_KP = KT_AMX_KP,
    KT_NC = KT_AMX_NC,
    KT_KSTEPS = KT_KP / 32,       /* 32-wide K steps per panel */
    KT_TILE_ELEMS = 16 * 32,      /* bf16 values in one 16 x 64-byte tile */
    KT_BLOCK_ELEMS = KT_KSTEPS * 2 * KT_TILE_ELEMS, /* one packed 32-column block */
};
_Static_assert(KT_KP % 32 == 0 && KT_KP > 0 && KT_NC % 32 == 0 && KT_NC > 0, "KT_AMX_KP, KT_AMX_NC: multiples of 32");

/* Compiler-only barrier: the buffer at p (and all memory) must be up to date here. */
#define KT_MEM_BARRIER(p) __asm__ __volatile__("" : : "r"(p) : "memory")

/* Packed W for one (K panel, column chunk): KT_NC / 32 blocks of 32 columns; within a block,
 * per K step, the B tile of columns 0..15 then the one of columns 16..31. */
static __thread _Alignas(64) kt_bf16 kt_bpack[(KT_NC / 32) * KT_BLOCK_ELEMS];
/* Zero-padded staging for partial A tiles (one per A tile register). */
static __thread _Alignas(64) kt_bf16 kt_astage[2][KT_TILE_ELEMS];
/* Staging for partial fp32 C tiles (tmm0..3). */
static __thread _Alignas(64) float kt_cstage[4][16 * 16];

typedef struct {
    uint8_t palette_id;
    uint8_t start_row;
    uint8_t reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} kt_tilecfg;

static void kt_amx_configure(void) {
    _Alignas(64) kt_tilecfg cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette_id = 1;
    for (int i = 0; i < 8; i++) {
        cfg.colsb[i] = 64;
        cfg.rows[i] = 16;
    }
    /* gcc 12's _tile_loadconfig declares only 8 of the 64 bytes as read: without this barrier
     * the stores above may be dropped at -O2/-O3 and ldtilecfg would load garbage. */
    KT_MEM_BARRIER(&cfg);
    _tile_loadconfig(&cfg);
}

static inline __mmask32 kt_mask32(int n) { return n >= 32 ? 0xffffffffu : n <= 0 ? 0u : ((1u << n) - 1u); }
static inline __mmask16 kt_mask16(int n) { return (__mmask16)(n >= 16 ? 0xffffu : n <= 0 ? 0u : ((1u << n) - 1u)); }
static inline int kt_min(int a, int b) { return a < b ? a : b; }

/* In-register transpose of a 16x16 matrix of 32-bit words: r[i] word j -> r[j] word i. */
static inline void kt_transpose16x16_epi32(__m512i r[16]) {
    __m512i t[16], u[16];
    for (int i = 0; i < 8; i++) {
        t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    /* u[4q + c], lane l: rows 4q..4q+3 of column 4l + c */
    for (int q = 0; q < 4; q++) {
        u[4 * q + 0] = _mm512_unpacklo_epi64(t[4 * q], t[4 * q + 2]);
        u[4 * q + 1] = _mm512_unpackhi_epi64(t[4 * q], t[4 * q + 2]);
        u[4 * q + 2] = _mm512_unpacklo_epi64(t[4 * q + 1], t[4 * q + 3]);
        u[4 * q + 3] = _mm512_unpackhi_epi64(t[4 * q + 1], t[4 * q + 3]);
    }
    /* t[c] (c < 4): lanes = rows 0-3 | rows 4-7 (cols c, c+8 interleaved by 0x88/0xdd) */
    for (int c = 0; c < 4; c++) {
        t[c] = _mm512_shuffle_i32x4(u[c], u[4 + c], 0x88);      /* cols c, c+8 of rows 0-7 */
        t[c + 4] = _mm512_shuffle_i32x4(u[c], u[4 + c], 0xdd);  /* cols c+4, c+12 */
        t[c + 8] = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0x88);
        t[c + 12] = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0xdd);
    }
    for (int c = 0; c < 8; c++) {
        r[c] = _mm512_shuffle_i32x4(t[c], t[c + 8], 0x88);
        r[c + 8] = _mm512_shuffle_i32x4(t[c], t[c + 8], 0xdd);
    }
}

/* nt: W points at W[n0, k0]; pack nc (1..KT_NC) columns of N by kp (1..KT_KP) values of K. */
static void kt_pack_nt(const kt_bf16 *W, long ldw, int nc, int kp) {
    const int nks = (kp + 31) / 32;
    const int nsub = (nc + 15) / 16; /* 16-column B tiles */
    for (int t = 0; t < nsub; t++) {
        const int rows = kt_min(16, nc - 16 * t);
        const kt_bf16 *w = W + (long)(16 * t) * ldw;
        kt_bf16 *dst = kt_bpack + (t >> 1) * KT_BLOCK_ELEMS + (t & 1) * KT_TILE_ELEMS;
        for (int s = 0; s < nks; s++) {
            const __mmask32 km = kt_mask32(kp - 32 * s);
            __m512i r[16];
            for (int i = 0; i < 16; i++)
                r[i] = i < rows ? _mm512_maskz_loadu_epi16(km, w + (long)i * ldw + 32 * s) : _mm512_setzero_si512();
            kt_transpose16x16_epi32(r);
            kt_bf16 *d = dst + 2 * s * KT_TILE_ELEMS;
            for (int i = 0; i < 16; i++) _mm512_store_si512((void *)(d + 32 * i), r[i]);
        }
    }
}

/* nn: W points at W[k0, n0]; pack nc (1..KT_NC) columns of N by kp (1..KT_KP) rows of K.
 * Each pair of W rows is read once across the whole chunk (long contiguous runs). */
static void kt_pack_nn(const kt_bf16 *W, long ldw, int nc, int kp) {
    static const uint16_t idx_tab[64] = {
        0, 32, 1, 33, 2, 34, 3, 35, 4, 36, 5, 37, 6, 38, 7, 39,
        8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47,
        16, 48, 17, 49, 18, 50, 19, 51, 20, 52, 21, 53, 22, 54, 23, 55,
        24, 56, 25, 57, 26, 58, 27, 59, 28, 60, 29, 61, 30, 62, 31, 63};
    const __m512i idx_lo = _mm512_loadu_si512((const void *)idx_tab);
    const __m512i idx_hi = _mm512_loadu_si512((const void *)(idx_tab + 32));
    const int nb = (nc + 31) / 32;
    for (int k = 0; k < kp; k += 2) {
        const int s = k >> 5, kk = (k & 31) >> 1;
        const kt_bf16 *w0 = W + (long)k * ldw;
        const kt_bf16 *w1 = k + 1 < kp ? w0 + ldw : NULL;
        kt_bf16 *dst = kt_bpack + 2 * s * KT_TILE_ELEMS + 32 * kk;
        for (int b = 0; b < nb; b++) {
            const int cols = kt_min(32, nc - 32 * b);
            const __mmask32 nm = kt_mask32(cols);
            const __m512i a = _mm512_maskz_loadu_epi16(nm, w0 + 32 * b);
            const __m512i c = w1 ? _mm512_maskz_loadu_epi16(nm, w1 + 32 * b) : _mm512_setzero_si512();
            kt_bf16 *d = dst + b * KT_BLOCK_ELEMS;
            _mm512_store_si512((void *)d, _mm512_permutex2var_epi16(a, idx_lo, c));
            if (cols > 16) _mm512_store_si512((void *)(d + KT_TILE_ELEMS), _mm512_permutex2var_epi16(a, idx_hi, c));
        }
    }
    /* zero the rows of the last K step that lie beyond kp (pairs kk >= ceil(kp / 2) % 16) */
    const int nks = (kp + 31) / 32, kk0 = ((kp + 1) / 2) & 15;
    if (kk0)
        for (int b = 0; b < nb; b++)
            for (int t = 0; t < 2; t++) {
                kt_bf16 *d = kt_bpack + b * KT_BLOCK_ELEMS + (2 * (nks - 1) + t) * KT_TILE_ELEMS;
                memset(d + 32 * kk0, 0, sizeof(kt_bf16) * 32 * (size_t)(16 - kk0));
            }
}

/* Copy rows [0, rows) x k [0, kv) of A into staging tile buf (rows >= rows were zeroed). */
static inline void kt_stage_a(kt_bf16 *buf, const kt_bf16 *A, long lda, int rows, int kv) {
    const __mmask32 km = kt_mask32(kv);
    for (int r = 0; r < rows; r++)
        _mm512_store_si512((void *)(buf + 32 * r), _mm512_maskz_loadu_epi16(km, A + (long)r * lda));
}

/* Partial C tile <-> zero-padded 16x16 fp32 staging tile. */
static inline void kt_stage_c(float *buf, const float *C, long ldc, int rows, int cols) {
    const __mmask16 m = kt_mask16(cols);
    for (int r = 0; r < 16; r++)
        _mm512_store_ps(buf + 16 * r, r < rows ? _mm512_maskz_loadu_ps(m, C + (long)r * ldc) : _mm512_setzero_ps());
}
static inline void kt_unstage_c(float *C, long ldc, const float *buf, int rows, int cols) {
    const __mmask16 m = kt_mask16(cols);
    for (int r = 0; r < rows; r++) _mm512_mask_storeu_ps(C + (long)r * ldc, m, _mm512_load_ps(buf + 16 * r));
}

/* C tile t (rows x cols valid, at c): start from zero or from C; full tiles go straight. */
#define KT_C_BEGIN(t, c, rows, cols)                                                    \
    do {                                                                                \
        if (!acc) {                                                                     \
            _tile_zero(t);                                                              \
        } else if ((rows) == 16 && (cols) == 16) {                                      \
            _tile_loadd(t, (c), sc);                                                    \
        } else {                                                                        \
            kt_stage_c(kt_cstage[t], (c), ldc, (rows), (cols));                         \
            KT_MEM_BARRIER(kt_cstage[t]);                                               \
            _tile_loadd(t, kt_cstage[t], 64);                                           \
        }                                                                               \
    } while (0)
#define KT_C_END(t, c, rows, cols)                                                      \
    do {                                                                                \
        if ((rows) == 16 && (cols) == 16) {                                             \
            _tile_stored(t, (c), sc);                                                   \
        } else {                                                                        \
            _tile_stored(t, kt_cstage[t], 64);                                          \
            kt_unstage_c((c), ldc, kt_cstage[t], (rows), (cols));                       \
        }                                                                               \
    } while (0)

/* C[mr x nc] = (acc ? C : 0) + A[mr x kp] * B, mr, nc in 1..32, B the packed block at bp.
 * A points at A[m0, k0], C at C[m0, n0]. */
static void kt_block(const kt_bf16 *A, long lda, int mr, int nc, int kp, const kt_bf16 *bp,
                     float *C, long ldc, int acc) {
    const int two_m = mr > 16, two_n = nc > 16;
    const int r0 = kt_min(mr, 16), r1 = mr - r0;
    const int c0 = kt_min(nc, 16), c1 = nc - c0;
    const int nks = (kp + 31) / 32;
    const long sa = lda * (long)sizeof(kt_bf16), sc = ldc * (long)sizeof(float);
    const kt_bf16 *A1 = two_m ? A + 16 * lda : A; /* second A tile: rows 16..31 */
    float *C1 = two_m ? C + 16 * ldc : C;

    KT_MEM_BARRIER(C); /* C may have been written by plain stores of an earlier panel */
    KT_C_BEGIN(0, C, r0, c0);
    if (two_n) KT_C_BEGIN(1, C + 16, r0, c1);
    if (two_m) {
        KT_C_BEGIN(2, C1, r1, c0);
        if (two_n) KT_C_BEGIN(3, C1 + 16, r1, c1);
    }

    /* Partial A tiles go through staging: zero the padding rows once per block. */
    const int ktail = kp & 31;
    if (r0 < 16 || ktail) memset(kt_astage[0] + 32 * r0, 0, sizeof(kt_bf16) * 32 * (size_t)(16 - r0));
    if (two_m && (r1 < 16 || ktail)) memset(kt_astage[1] + 32 * r1, 0, sizeof(kt_bf16) * 32 * (size_t)(16 - r1));

    for (int s = 0; s < nks; s++) {
        const kt_bf16 *b = bp + 2 * s * KT_TILE_ELEMS;
        const int kv = kt_min(32, kp - 32 * s);
        if (r0 == 16 && kv == 32) {
            _tile_loadd(4, A + 32 * s, sa);
        } else {
            kt_stage_a(kt_astage[0], A + 32 * s, lda, r0, kv);
            KT_MEM_BARRIER(kt_astage[0]);
            _tile_loadd(4, kt_astage[0], 64);
        }
        _tile_loadd(6, b, 64);
        if (two_n) _tile_loadd(7, b + KT_TILE_ELEMS, 64);
        if (two_m) {
            if (r1 == 16 && kv == 32) {
                _tile_loadd(5, A1 + 32 * s, sa);
            } else {
                kt_stage_a(kt_astage[1], A1 + 32 * s, lda, r1, kv);
                KT_MEM_BARRIER(kt_astage[1]);
                _tile_loadd(5, kt_astage[1], 64);
            }
        }
        _tile_dpbf16ps(0, 4, 6);
        if (two_n) _tile_dpbf16ps(1, 4, 7);
        if (two_m) {
            _tile_dpbf16ps(2, 5, 6);
            if (two_n) _tile_dpbf16ps(3, 5, 7);
        }
    }

    KT_C_END(0, C, r0, c0);
    if (two_n) KT_C_END(1, C + 16, r0, c1);
    if (two_m) {
        KT_C_END(2, C1, r1, c0);
        if (two_n) KT_C_END(3, C1 + 16, r1, c1);
    }
}

static void kt_gemm_amx(KT_GEMM_ARGS, int w_is_kn) {
    if (M <= 0 || N <= 0) return;
    if (K <= 0) {
        if (!accumulate)
            for (int m = 0; m < M; m++) memset(C + (long)m * ldc, 0, sizeof(float) * (size_t)N);
        return;
    }
    kt_amx_configure();
    for (int k0 = 0; k0 < K; k0 += KT_KP) {
        const int kp = kt_min(KT_KP, K - k0);
        const int acc = accumulate || k0 > 0;
        for (int n0 = 0; n0 < N; n0 += KT_NC) {
            const int nc = kt_min(KT_NC, N - n0);
            if (w_is_kn)
                kt_pack_nn(W + (long)k0 * ldw + n0, ldw, nc, kp);
            else
                kt_pack_nt(W + (long)n0 * ldw + k0, ldw, nc, kp);
            KT_MEM_BARRIER(kt_bpack);
            /* the 32-row A block stays in L1 while it meets every 32-column block of the chunk */
            for (int m0 = 0; m0 < M; m0 += 32)
                for (int j = 0; j < nc; j += 32)
                    kt_block(A + (long)m0 * lda + k0, lda, kt_min(32, M - m0), kt_min(32, nc - j), kp,
                             kt_bpack + (j / 32) * KT_BLOCK_ELEMS, C + (long)m0 * ldc + n0 + j, ldc, acc);
        }
    }
}

void kt_gemm_nt_amx(KT_GEMM_ARGS) { kt_gemm_amx(M, N, K, A, lda, W, ldw, C, ldc, accumulate, 0); }

void kt_gemm_nn_amx(KT_GEMM_ARGS) { kt_gemm_amx(M, N, K, A, lda, W, ldw, C, ldc, accumulate, 1); }
