/* gemm_int8_amx.c: the int8 GEMMs of gemm_int8.h on Intel AMX tiles (AMX-TILE + AMX-INT8).
 *
 *   nt:  C[m, n] (+)= sum_k A[m*lda + k] * W[n*ldw + k]     W is [N, K]
 *   nn:  C[m, n] (+)= sum_k A[m*lda + k] * W[k*ldw + n]     W is [K, N]
 *
 * TDPBSSD computes Ct (+)= At * Bt in exact int32: At is 16 rows x 64 int8 (contraction along
 * the row), Bt is the "VNNI" layout, 16 rows of 64 bytes where row kk holds, for n = 0..15, the
 * quad (B[4kk..4kk+3, n]). At the level of 32-bit words this is the bf16 layout of gemm_amx.c
 * (a bf16 pair and an int8 quad are both one word), and this file follows that file's design:
 *
 *  1. Small M: nt with M < KT_IAMX_MSMALL_NT (4), nn with M < KT_IAMX_MSMALL_NN (12) call
 *     kt_igemm_*_avx512 (gemm_int8_avx512.c), which is faster there (the nn AMX path must pack
 *     all of W, the transposed nt path none of it; the measured crossovers:
 *     docs/performance-history.md).
 *  2. nt with M <= KT_IAMX_MCT (64), "transposed output": C^T = W * A^T. The At operand is W itself,
 *     tile-loaded straight from W with stride ldw (W is never packed); the Bt operand is A^T in
 *     VNNI layout, i.e. 16x16 transposes (in 32-bit words = k quads) of 16 rows of A, packed once
 *     per K panel. Blocks of 32 W rows x 32 A rows use all 8 tiles (4 int32 accumulators, 2 W
 *     tiles, 2 A^T tiles) for the whole K panel; each 16x16 C^T accumulator is stored to a
 *     scratch tile, transposed in AVX-512 registers and written (or added) into C with masked
 *     stores. W tiles cut by the N edge or the K tail are staged through a zero-padded tile.
 *  3. Otherwise (nn, and nt with larger M), "packed": for each N chunk of KT_IAMX_NC columns and
 *     K panel of KT_IAMX_KP values, W is packed into VNNI tiles (nt: 16x16 word transposes of 16
 *     W rows; nn: rows 4kk..4kk+3 interleaved bytewise by unpack epi8 / epi16 and a 4x4 transpose
 *     of 128-bit lanes, 64 columns at a time) and reused for all of M. The first panel of a chunk
 *     is packed up front; panel p + 1 is packed into a second buffer a few units per K step
 *     inside the kernel loop of panel p, so the packing overlaps the tile multiplies. M is walked
 *     in blocks of 32 rows, each meeting every 32-column block of the chunk: 2x2 int32
 *     accumulator tiles, 2 A + 2 B tile loads and 4 TDPBSSD per 64-wide K step, C tiles loaded /
 *     stored once per K panel (full 16x16 C tiles straight from/to C, edge ones through a
 *     zero-padded staging tile and masked AVX-512 loads/stores); later K panels add into C. A
 *     tiles are loaded straight from A when all 16 rows and 64 k are valid, else (M edge, K tail)
 *     through a zero-padded staging tile.
 * Packed layout ("pairs"): for every two 16-row/16-column tiles, per K step, tile 0 then tile 1
 * (2 KiB per step, read sequentially). K beyond the panel and rows/columns beyond M or N are
 * zero in packed tiles.
 *
 * Bounds. A and W are only read through masked AVX-512 loads (masked-out lanes never fault) or
 * through tile loads of fully valid 16 x 64-byte regions, so nothing outside A [M x K] and the
 * [N x K] / [K x N] region of W is touched; C outside [M x N] is never read or written.
 * Tiles are configured once per call (amx_tiles.h), all 8 as full 16 rows x 64 bytes.
 *
 * Compiler notes (gcc 12), as in gemm_amx.c: _tile_loadd / _tile_stored are volatile asm with
 * the address as a plain register operand, declaring no memory access, so KT_MEM_BARRIER (an
 * empty asm that takes the buffer's address and clobbers memory) sits between filling any buffer
 * and the tile load that reads it, and between a tile store and plain reads of what it wrote;
 * amx_tiles.h has the barrier for the tile configuration.
 *
 * The caller must have obtained AMX permission (arch_prctl ARCH_REQ_XCOMP_PERM) for the process.
 * Single-threaded; the scratch area (~340 KiB) is allocated per thread on first use (freed at
 * thread exit), so concurrent calls from threads are safe; if it cannot be allocated the call
 * falls back to the AVX-512 kernels. Every helper is static: the only exported symbols are
 * kt_igemm_nt_amx and kt_igemm_nn_amx.
 */
#include "gemm_int8.h"
#include "amx.h"
#include <immintrin.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

enum {
    KT_KP = KT_IAMX_KP,
    KT_NC = KT_IAMX_NC,
    KT_MCT = KT_IAMX_MCT,
    KT_TILE = 16 * 64,            /* int8 values in one 16 x 64-byte tile */
    KT_PAIR = 2 * KT_TILE,        /* one K step of a packed tile pair */
    KT_AROWS = KT_MCT > 64 ? (KT_MCT + 31) / 32 * 32 : 64, /* rows of the A^T scratch */
};
_Static_assert(KT_KP % 64 == 0 && KT_KP > 0 && KT_NC % 64 == 0 && KT_NC > 0, "KT_IAMX_KP, KT_IAMX_NC: multiples of 64");
_Static_assert(KT_IAMX_MSMALL_NT >= 1 && KT_IAMX_MSMALL_NN >= 1 && KT_MCT >= 0, "KT_IAMX_MSMALL_*: >= 1");

/* Per-thread scratch. b: packed W of one (chunk, panel), double-buffered; a: A^T (transposed
 * path); wst: A / W edge staging; cst: int32 C staging / C^T output tiles. */
typedef struct {
    _Alignas(64) int8_t b[2][KT_NC * KT_KP];
    _Alignas(64) int8_t a[KT_AROWS * KT_KP];
    _Alignas(64) int8_t wst[2][KT_TILE];
    _Alignas(64) int32_t cst[4][16 * 16];
} kt_iscratch;

KT_AMX_THREAD_SCRATCH(kt_iscratch, kt_get_iscratch)

static inline __mmask64 kt_mask64(int n) {
    return n >= 64 ? ~(__mmask64)0 : n <= 0 ? (__mmask64)0 : (((__mmask64)1 << n) - 1);
}


/* ---- packing (pair layout: tile t, K step s at dst + (t / 2) * ks * KT_PAIR + s * KT_PAIR +
 * (t % 2) * KT_TILE) ---------------------------------------------------------------------- */

KT_AI int8_t *kt_tile_at(int8_t *dst, int ks, int t, int s) {
    return dst + (long)(t >> 1) * ks * KT_PAIR + (long)s * KT_PAIR + (t & 1) * KT_TILE;
}

/* One unit of a VNNI pack of S (rows x kp, row-major, stride ld, contraction along the row):
 * tile t (rows 16t..16t+15 of S become the 16 columns of the Bt tile), K step s; a 16x16
 * transpose of 32-bit k quads. Rows >= rows and k >= kp are zero. Used for W (nt, packed
 * path) and for A (nt, transposed path). */
static void kt_unit_rows_vnni(const int8_t *S, long ld, int rows, int kp, int8_t *dst, int ks, int t, int s) {
    const int tr = kt_min(16, rows - 16 * t);
    const int8_t *src = S + (long)(16 * t) * ld + 64 * s;
    const __mmask64 km = kt_mask64(kp - 64 * s);
    __m512i r[16];
    if (tr == 16 && km == ~(__mmask64)0) {
        for (int i = 0; i < 16; i++) r[i] = _mm512_loadu_si512((const void *)(src + (long)i * ld));
    } else {
        for (int i = 0; i < 16; i++)
            r[i] = i < tr ? _mm512_maskz_loadu_epi8(km, src + (long)i * ld) : _mm512_setzero_si512();
    }
    kt_transpose16x16_epi32(r);
    int8_t *d = kt_tile_at(dst, ks, t, s);
    for (int i = 0; i < 16; i++) _mm512_store_si512((void *)(d + 64 * i), r[i]);
}

static void kt_pack_rows_vnni(const int8_t *S, long ld, int rows, int kp, int8_t *dst, int ks) {
    for (int t = 0; t < (rows + 15) / 16; t++)
        for (int s = 0; s < ks; s++) kt_unit_rows_vnni(S, ld, rows, kp, dst, ks, t, s);
}

/* One unit of the nn pack of W (at W[k0, n0], kp x nc, stride ldw): 64-column block b (tiles
 * 4b..4b+3), K step s. Row kk of each Bt tile holds, per column, the bytes of W rows 64s + 4kk
 * .. 64s + 4kk + 3: unpack epi8 / epi16 give those quads in 128-bit lane order, and a 4x4
 * transpose of the 128-bit lanes puts 16 consecutive columns in one tile row. Rows beyond kp and
 * columns beyond nc are zero; tiles entirely beyond nc are not written. */
static void kt_unit_nn(const int8_t *W, long ldw, int nc, int kp, int8_t *dst, int ks, int b, int s) {
    const int cols = kt_min(64, nc - 64 * b), kv = kt_min(64, kp - 64 * s);
    const int nt = kt_cdiv(cols, 16);
    const __mmask64 nm = kt_mask64(cols);
    const int full = cols == 64 && kv == 64;
    const int8_t *w = W + (long)(64 * s) * ldw + 64 * b;
    int8_t *d[4];
    for (int j = 0; j < nt; j++) d[j] = kt_tile_at(dst, ks, 4 * b + j, s);
    for (int kk = 0; kk < 16; kk++) {
        __m512i x[4];
        for (int j = 0; j < 4; j++) {
            const int8_t *p = w + (long)(4 * kk + j) * ldw;
            x[j] = full ? _mm512_loadu_si512((const void *)p)
                        : 4 * kk + j < kv ? _mm512_maskz_loadu_epi8(nm, p) : _mm512_setzero_si512();
        }
        const __m512i t0 = _mm512_unpacklo_epi8(x[0], x[1]), t1 = _mm512_unpackhi_epi8(x[0], x[1]);
        const __m512i t2 = _mm512_unpacklo_epi8(x[2], x[3]), t3 = _mm512_unpackhi_epi8(x[2], x[3]);
        /* q_j, lane L: columns 16 L + 4 j .. 16 L + 4 j + 3 */
        const __m512i q0 = _mm512_unpacklo_epi16(t0, t2), q1 = _mm512_unpackhi_epi16(t0, t2);
        const __m512i q2 = _mm512_unpacklo_epi16(t1, t3), q3 = _mm512_unpackhi_epi16(t1, t3);
        const __m512i u0 = _mm512_shuffle_i32x4(q0, q1, 0x44), u1 = _mm512_shuffle_i32x4(q2, q3, 0x44);
        const __m512i u2 = _mm512_shuffle_i32x4(q0, q1, 0xee), u3 = _mm512_shuffle_i32x4(q2, q3, 0xee);
        const __m512i o[4] = {_mm512_shuffle_i32x4(u0, u1, 0x88), _mm512_shuffle_i32x4(u0, u1, 0xdd),
                              _mm512_shuffle_i32x4(u2, u3, 0x88), _mm512_shuffle_i32x4(u2, u3, 0xdd)};
        for (int j = 0; j < nt; j++) _mm512_store_si512((void *)(d[j] + 64 * kk), o[j]);
    }
}

/* Side work done between the tile instructions of the packed kernel: packing the next B panel
 * (into the other of two buffers, so the tile loads in flight never read what it writes).
 * Units (nt: 16 W rows x one K step; nn: 64 W columns x one K step) are done in order up to
 * bend; the job is resumable. */
typedef struct {
    const int8_t *w; long ldw; int w_is_kn, nc, kp, ks; int8_t *bdst; int bu, bend, bn;
} kt_side;

static void kt_side_b(kt_side *j, int n) {
    int u = j->bu;
    const int end = kt_min(j->bend, u + n);
    for (; u < end; u++) {
        const int t = u / j->ks, s = u - t * j->ks;
        if (j->w_is_kn) kt_unit_nn(j->w, j->ldw, j->nc, j->kp, j->bdst, j->ks, t, s);
        else kt_unit_rows_vnni(j->w, j->ldw, j->nc, j->kp, j->bdst, j->ks, t, s);
    }
    j->bu = u;
}

/* Out of line on purpose: it keeps the kernel's loop small; it touches no tile register. */
static __attribute__((noinline)) void kt_side_work(kt_side *j, int nb) {
    if (j->bu < j->bend) kt_side_b(j, nb);
}

/* ---- C tiles ---------------------------------------------------------------------------- */



/* ---- packed path kernel ----------------------------------------------------------------- */

/* Copy rows [0, rows) x k [0, kv) of X (stride ld) into staging tile buf (rows >= rows stay zero). */
KT_AI void kt_stage_rows(int8_t *buf, const int8_t *X, long ld, int rows, int kv) {
    const __mmask64 km = kt_mask64(kv);
    for (int r = 0; r < rows; r++)
        _mm512_store_si512((void *)(buf + 64 * r), _mm512_maskz_loadu_epi8(km, X + (long)r * ld));
}

/* C[rows x cols] (+)= A[rows x kp] * Bp over ks K steps; rows, cols in 1..32; tm = rows > 16,
 * tn = cols > 16 are compile-time constants in each instance. A tiles are loaded straight from
 * A when all 16 rows and 64 k values are valid, else through the zero-padded staging tiles.
 * Per K step, nb units of side work (the next B panel) when nb > 0. */
KT_AI void kt_kernel_packed_body(const int tm, const int tn, const int8_t *A, long lda, int kp, const int8_t *bp,
                                 int ks, int32_t *C, long ldc, int rows, int cols, int acc, kt_iscratch *S,
                                 kt_side *side, int nb) {
    const long sc = ldc * (long)sizeof(int32_t), sa = lda;
    const int r0 = kt_min(rows, 16), r1 = rows - r0, c0 = kt_min(cols, 16), c1 = cols - c0;
    const int kfull = kp / 64;
    const int d0 = r0 == 16 ? kfull : 0, d1 = r1 == 16 ? kfull : 0; /* steps loaded straight from A */
    int32_t (*cst)[256] = S->cst;
    int32_t *C1 = C + 16 * ldc;
    const int8_t *A1 = A + 16 * lda;
    KT_MEM_BARRIER(C); /* C may have been written by plain stores */
    KT_C_BEGIN(0, C, r0, c0);
    if (tn) KT_C_BEGIN(1, C + 16, r0, c1);
    if (tm) KT_C_BEGIN(2, C1, r1, c0);
    if (tm && tn) KT_C_BEGIN(3, C1 + 16, r1, c1);
    if (d0 < ks) memset(S->wst[0] + 64 * r0, 0, (size_t)64 * (size_t)(16 - r0));
    if (tm && d1 < ks) memset(S->wst[1] + 64 * r1, 0, (size_t)64 * (size_t)(16 - r1));
    for (int s = 0; s < ks; s++) {
        const int8_t *b = bp + (long)s * KT_PAIR;
        KT_STEP_2X2(_tile_dpbssd, tm, tn, b,
                    KT_LOAD_OPERAND(4, s < d0, A + 64 * s, sa, kt_stage_rows, S->wst[0], lda, r0, kp - 64 * s),
                    KT_LOAD_OPERAND(5, s < d1, A1 + 64 * s, sa, kt_stage_rows, S->wst[1], lda, r1, kp - 64 * s));
        if (nb) kt_side_work(side, nb); /* writes only the other B buffer */
    }
    KT_C_END(0, C, r0, c0);
    if (tn) KT_C_END(1, C + 16, r0, c1);
    if (tm) KT_C_END(2, C1, r1, c0);
    if (tm && tn) KT_C_END(3, C1 + 16, r1, c1);
    KT_MEM_BARRIER(C); /* the tile stores above wrote C */
}

static void kt_kernel_packed(const int8_t *A, long lda, int kp, const int8_t *bp, int ks, int32_t *C, long ldc,
                             int rows, int cols, int acc, kt_iscratch *S, kt_side *side, int nb) {
    if (rows > 16) {
        if (cols > 16) kt_kernel_packed_body(1, 1, A, lda, kp, bp, ks, C, ldc, rows, cols, acc, S, side, nb);
        else kt_kernel_packed_body(1, 0, A, lda, kp, bp, ks, C, ldc, rows, cols, acc, S, side, nb);
    } else {
        if (cols > 16) kt_kernel_packed_body(0, 1, A, lda, kp, bp, ks, C, ldc, rows, cols, acc, S, side, nb);
        else kt_kernel_packed_body(0, 0, A, lda, kp, bp, ks, C, ldc, rows, cols, acc, S, side, nb);
    }
}

/* Set up the B job for panel k0 of the chunk at n0, packing into dst. */
static void kt_side_set_b(kt_side *j, const int8_t *W, long ldw, int w_is_kn, int n0, int nc, int k0, int K,
                          int8_t *dst) {
    memset(j, 0, sizeof *j);
    j->kp = kt_min(KT_KP, K - k0);
    j->ks = kt_cdiv(j->kp, 64);
    j->w_is_kn = w_is_kn, j->nc = nc, j->ldw = ldw, j->bdst = dst;
    j->w = w_is_kn ? W + (long)k0 * ldw + n0 : W + (long)n0 * ldw + k0;
    j->bn = (w_is_kn ? kt_cdiv(nc, 64) : kt_cdiv(nc, 16)) * j->ks;
}

/* Packed path. Order: N chunks, K panels, 32-row blocks of M, 32-column blocks of the chunk.
 * The first B panel of a chunk is packed up front; while panel p computes, panel p + 1 is
 * packed (into the other buffer) a few units per K step, spread evenly over the M blocks. */
static void kt_igemm_packed(KT_IGEMM_ARGS, int w_is_kn, kt_iscratch *S) {
    const int nmb = kt_cdiv(M, 32), npan = kt_cdiv(K, KT_KP);
    kt_side bj;
    for (int n0 = 0; n0 < N; n0 += KT_NC) {
        const int nc = kt_min(KT_NC, N - n0), nblk = kt_cdiv(nc, 32);
        kt_side_set_b(&bj, W, ldw, w_is_kn, n0, nc, 0, K, S->b[0]);
        bj.bend = bj.bn;
        kt_side_b(&bj, bj.bn);
        for (int p = 0; p < npan; p++) {
            const int k0 = p * KT_KP, kp = kt_min(KT_KP, K - k0), ks = kt_cdiv(kp, 64);
            const int acc = accumulate || p > 0;
            const int8_t *bp = S->b[p & 1];
            const int nextp = p + 1 < npan;
            if (nextp) kt_side_set_b(&bj, W, ldw, w_is_kn, n0, nc, k0 + KT_KP, K, S->b[(p + 1) & 1]);
            KT_MEM_BARRIER(S);
            for (int i = 0; i < nmb; i++) {
                const int m0 = 32 * i, rows = kt_min(32, M - m0);
                int nb = 0;
                if (nextp) {
                    bj.bend = (int)(((long)bj.bn * (i + 1) + nmb - 1) / nmb);
                    nb = kt_cdiv(bj.bend - bj.bu, nblk * ks);
                }
                for (int j = 0; j < nc; j += 32)
                    kt_kernel_packed(A + (long)m0 * lda + k0, lda, kp, bp + (long)(j / 32) * ks * KT_PAIR, ks,
                                     C + (long)m0 * ldc + n0 + j, ldc, rows, kt_min(32, nc - j), acc, S, &bj, nb);
                if (nextp) kt_side_b(&bj, bj.bend - bj.bu); /* finish this block's share */
            }
        }
    }
}

/* ---- transposed-output path (nt, small M) ----------------------------------------------- */

/* C^T output tile (16 n x 16 m, int32, in buf) -> C[m, n] for m < mv, n < nv, (+)=. */
KT_AI void kt_ct_store(int32_t *C, long ldc, int32_t *buf, int mv, int nv, int acc) {
    __m512i r[16];
    for (int i = 0; i < 16; i++) r[i] = _mm512_load_si512((const void *)(buf + 16 * i));
    kt_transpose16x16_epi32(r);
    const __mmask16 m = kt_mask16(nv);
    for (int i = 0; i < mv; i++) {
        __m512i v = r[i];
        if (acc) v = _mm512_add_epi32(v, _mm512_maskz_loadu_epi32(m, C + (long)i * ldc));
        _mm512_mask_storeu_epi32(C + (long)i * ldc, m, v);
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
KT_AI void kt_kernel_ct_body(const int tn, const int tm, const int8_t *W, long ldw, int nr, int kp, int ks,
                             const int8_t *atp, int mr, int32_t *C, long ldc, int acc, kt_iscratch *S) {
    const long sw = ldw;
    const int r0 = kt_min(nr, 16), r1 = nr - r0, m0v = kt_min(mr, 16), m1v = mr - m0v;
    const int kfull = kp / 64; /* K steps whose 64 values are all valid */
    const int8_t *W1 = W + 16 * ldw;
    _tile_zero(0);
    if (tm) _tile_zero(1);
    if (tn) _tile_zero(2);
    if (tn && tm) _tile_zero(3);
    /* edge W tiles go through staging: zero their padding rows once */
    if (r0 < 16 || kfull < ks) memset(S->wst[0] + 64 * r0, 0, (size_t)64 * (size_t)(16 - r0));
    if (tn && (r1 < 16 || kfull < ks)) memset(S->wst[1] + 64 * r1, 0, (size_t)64 * (size_t)(16 - r1));
    const int d0 = r0 == 16 ? kfull : 0, d1 = r1 == 16 ? kfull : 0; /* steps loaded straight from W */
    for (int s = 0; s < ks; s++) {
        const int8_t *b = atp + (long)s * KT_PAIR;
        KT_STEP_2X2(_tile_dpbssd, tn, tm, b,
                    KT_LOAD_OPERAND(4, s < d0, W + 64 * s, sw, kt_stage_rows, S->wst[0], ldw, r0, kp - 64 * s),
                    KT_LOAD_OPERAND(5, s < d1, W1 + 64 * s, sw, kt_stage_rows, S->wst[1], ldw, r1, kp - 64 * s));
    }
    KT_MEM_BARRIER(C);
    KT_CT_OUT(0, C, m0v, r0);
    if (tm) KT_CT_OUT(1, C + 16 * ldc, m1v, r0);
    if (tn) KT_CT_OUT(2, C + 16, m0v, r1);
    if (tn && tm) KT_CT_OUT(3, C + 16 * ldc + 16, m1v, r1);
}

static void kt_kernel_ct(const int8_t *W, long ldw, int nr, int kp, int ks, const int8_t *atp, int mr, int32_t *C,
                         long ldc, int acc, kt_iscratch *S) {
    if (nr > 16) {
        if (mr > 16) kt_kernel_ct_body(1, 1, W, ldw, nr, kp, ks, atp, mr, C, ldc, acc, S);
        else kt_kernel_ct_body(1, 0, W, ldw, nr, kp, ks, atp, mr, C, ldc, acc, S);
    } else {
        if (mr > 16) kt_kernel_ct_body(0, 1, W, ldw, nr, kp, ks, atp, mr, C, ldc, acc, S);
        else kt_kernel_ct_body(0, 0, W, ldw, nr, kp, ks, atp, mr, C, ldc, acc, S);
    }
}

static void kt_igemm_nt_ct(KT_IGEMM_ARGS, kt_iscratch *S) {
    for (int k0 = 0; k0 < K; k0 += KT_KP) {
        const int kp = kt_min(KT_KP, K - k0), ks = kt_cdiv(kp, 64);
        const int acc = accumulate || k0 > 0;
        kt_pack_rows_vnni(A + k0, lda, M, kp, S->a, ks);
        KT_MEM_BARRIER(S);
        for (int n0 = 0; n0 < N; n0 += 32)
            for (int m0 = 0; m0 < M; m0 += 32)
                kt_kernel_ct(W + (long)n0 * ldw + k0, ldw, kt_min(32, N - n0), kp, ks,
                             S->a + (long)(m0 / 32) * ks * KT_PAIR, kt_min(32, M - m0), C + (long)m0 * ldc + n0, ldc,
                             acc, S);
    }
}

/* ---- entry points ----------------------------------------------------------------------- */

static void kt_igemm_amx(KT_IGEMM_ARGS, int w_is_kn) {
    if (kt_gemm_degenerate(M, N, K, C, ldc, accumulate)) return;
    kt_iscratch *S = M < (w_is_kn ? KT_IAMX_MSMALL_NN : KT_IAMX_MSMALL_NT) ? NULL : kt_get_iscratch();
    if (!S) {
        (w_is_kn ? kt_igemm_nn_avx512 : kt_igemm_nt_avx512)(M, N, K, A, lda, W, ldw, C, ldc, accumulate);
        return;
    }
    kt_amx_configure();
    if (!w_is_kn && M <= KT_MCT)
        kt_igemm_nt_ct(M, N, K, A, lda, W, ldw, C, ldc, accumulate, S);
    else
        kt_igemm_packed(M, N, K, A, lda, W, ldw, C, ldc, accumulate, w_is_kn, S);
}

void kt_igemm_nt_amx(KT_IGEMM_ARGS) { kt_igemm_amx(M, N, K, A, lda, W, ldw, C, ldc, accumulate, 0); }

void kt_igemm_nn_amx(KT_IGEMM_ARGS) { kt_igemm_amx(M, N, K, A, lda, W, ldw, C, ldc, accumulate, 1); }
