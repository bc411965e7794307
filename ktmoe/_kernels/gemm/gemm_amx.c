/* gemm_amx.c: the bf16 GEMMs of gemm.h on Intel AMX tiles (AMX-TILE + AMX-BF16).
 *
 *   nt:  C[m, n] (+)= sum_k A[m*lda + k] * W[n*ldw + k]     W is [N, K]
 *   nn:  C[m, n] (+)= sum_k A[m*lda + k] * W[k*ldw + n]     W is [K, N]
 *
 * TDPBF16PS computes Ct (+)= At * Bt: At is 16 rows x 32 bf16 (contraction along the row), Bt
 * is the "VNNI" layout, 16 rows of 64 bytes where row kk holds, for n = 0..15, the pair
 * (B[2kk, n], B[2kk+1, n]). For plain row-major W (the LoRA products, quantized weight-only
 * panels, the gemm.h entry points) the operand that needs the VNNI layout is repacked per call
 * into a per-thread scratch area. The layer's bf16 expert weights are instead prepacked once at
 * load into the forward's tile layout (gemm.h, kt_prepack_amx; 1.00x the bytes for shapes that
 * are multiples of 32): kt_gemm_nt_pre_amx reads its B tiles in place, and kt_gemm_nn_pre_amx
 * makes the backward's row-pair tiles from it in registers (kt_unit_nn_pre: an 8x8 transpose of
 * 64-bit elements and a bf16 swap per 8 rows, about the shuffle work of the plain nn pack, from
 * contiguous 2 KiB blocks instead of strided rows). What the prepacked layout gained and cost,
 * and the measurements behind the constants below: docs/performance-history.md.
 *
 * Three paths, by shape (the crossovers were measured: docs/performance-history.md; the helpers
 * shared with gemm_int8_amx.c are in amx.h):
 *  1. Small M: nt with M < KT_AMX_MSMALL_NT (2), nn with M < KT_AMX_MSMALL_NN (6) call
 *     kt_gemm_*_avx512 (gemm_avx512.c): for 1 row (nt) or 1..5 rows (nn, whose W must be packed)
 *     the AVX-512 BF16 kernels are as fast or faster.
 *  2. nt with M <= KT_AMX_MCT (64), "transposed output": compute C^T = W * A^T.
 *     The At operand is then W itself, tile-loaded straight from W with stride ldw, so W is
 *     never packed; the Bt operand is A^T in VNNI layout, i.e. 16x16 transposes (in 32-bit
 *     words = k pairs) of 16 rows of A, packed once per K panel (M x KT_AMX_KP). Blocks of 32
 *     W rows x 32 A rows use all 8 tiles (4 fp32 accumulators, 2 W tiles, 2 A^T tiles) for the whole K panel; each
 *     16x16 C^T accumulator is then stored to a scratch tile, transposed in AVX-512 registers
 *     and written (or added) into C with masked stores. W tiles cut by the N edge or the K tail
 *     are staged through a zero-padded 16x32 scratch tile.
 *  3. Otherwise (nn, and nt with M > 64), "packed": for each N chunk of KT_AMX_NC (128) columns
 *     and K panel of KT_AMX_KP (512) values, W is packed into VNNI tiles (nt: 16x16 word
 *     transposes of 16 W rows; nn: rows 2kk and 2kk+1 interleaved element-wise by VPERMT2W) and
 *     reused for all of M. The first panel of a chunk is packed up front; panel p + 1 is packed
 *     into a second buffer a few units per K step inside the kernel loop of panel p, so that the
 *     packing (shuffle ports, W loads) overlaps the tile multiplies. M is walked in blocks of 32
 *     rows, each meeting every 32-column block of the chunk: 2x2 fp32 accumulator tiles, 2 A + 2 B
 *     tile loads and 4 TDPBF16PS per 32-wide K step, C tiles loaded / stored once per K panel
 *     (full 16x16 C tiles straight from/to C, edge ones through a zero-padded fp32 staging tile
 *     and masked AVX-512 loads/stores); later K panels add into C. A tiles are loaded straight
 *     from A when all 16 rows and 32 k are valid, else (M edge, K tail) through a zero-padded
 *     staging tile (strided tile loads: copying A blocks into contiguous tiles cost more,
 *     docs/performance-history.md).
 * Packed layout ("pairs"): for every two 16-row/16-column tiles, per K step, tile 0 then tile 1
 * (2 KiB per step, read sequentially). K beyond the panel and rows/columns beyond M or N are
 * zero in packed tiles.
 *
 * Bounds. A and W are only read through masked AVX-512 loads (masked-out lanes never fault) or
 * through tile loads of fully valid 16 x 32 regions, so nothing outside A [M x K] and the
 * [N x K] / [K x N] region of W is touched; C outside [M x N] is never read or written.
 * Tiles are configured once per call, all 8 as full 16 rows x 64 bytes (palette 1).
 *
 * Compiler notes (gcc 12). Its _tile_loadconfig tells the compiler that only the first 8 bytes
 * of the 64-byte configuration are read, so at -O2/-O3 the stores that fill the rest may be
 * deleted or sunk past the ldtilecfg (result: SIGILL/SIGSEGV at the first tile instruction);
 * amx_tiles.h, which configures the tiles, puts a barrier right before it. Likewise its _tile_loadd / _tile_stored are volatile asm with the address as a plain register
 * operand, declaring no memory access, so stores into a buffer may be moved after the tile load
 * that reads it, and loads of a buffer may be moved before the tile store that fills it.
 * KT_MEM_BARRIER (an empty asm that takes the buffer's address and clobbers memory) is placed
 * between filling any buffer and the tile load that reads it, and between a tile store and
 * plain reads of what it wrote.
 *
 * The caller must have obtained AMX permission (arch_prctl ARCH_REQ_XCOMP_PERM) for the process.
 * Single-threaded; the scratch area (~330 KiB) is allocated per thread on first use (freed at
 * thread exit), so concurrent calls from threads are safe; if it cannot be allocated the call
 * falls back to the AVX-512 kernels.
 */
#include "gemm.h"
#include "amx.h"
#include <string.h>

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
} kt_amx_scratch;

static inline __mmask32 kt_mask32(int n) { return n >= 32 ? 0xffffffffu : n <= 0 ? 0u : ((1u << n) - 1u); }

/* Copy rows [0, rows) x k [0, kv) of X (stride ld) into staging tile buf (rows >= rows stay zero). */
KT_AI void kt_stage_rows(kt_bf16 *buf, const kt_bf16 *X, long ld, int rows, int kv) {
    const __mmask32 km = kt_mask32(kv);
    for (int r = 0; r < rows; r++)
        _mm512_store_si512((void *)(buf + 32 * r), _mm512_maskz_loadu_epi16(km, X + (long)r * ld));
}

/* Declared here, defined below; both keep external linkage, as when the transposed-output path
 * was a file of its own. VNNI pack of S (rows x kp, row-major, stride ld, contraction along the
 * row) into ks K steps of the pair layout at dst; rows beyond `rows` and k beyond kp are zero. */
void kt_pack_rows_vnni_amx(const kt_bf16 *S, long ld, int rows, int kp, kt_bf16 *dst, int ks);
/* the transposed-output path (below): nt with M <= KT_AMX_MCT, tiles configured */
void kt_gemm_nt_ct_amx(KT_GEMM_ARGS, kt_amx_scratch *S);

KT_AMX_THREAD_SCRATCH(kt_amx_scratch, kt_get_amx_scratch)

/* ---- packing (pair layout: tile t, K step s at dst + (t / 2) * ks * KT_PAIR + s * KT_PAIR +
 * (t % 2) * KT_TILE) ---------------------------------------------------------------------- */

/* One unit of a VNNI pack of S (rows x kp, row-major, stride ld, contraction along the row):
 * tile t (rows 16t..16t+15 of S become the 16 columns of the Bt tile), K step s; a 16x16
 * transpose of 32-bit k pairs. Rows >= rows and k >= kp are zero. Used for W (nt, packed
 * path) and for A (nt, transposed path). */
static void kt_unit_rows_vnni(const kt_bf16 *S, long ld, int rows, int kp, kt_bf16 *dst, int ks, int t, int s) {
    const int tr = kt_min(16, rows - 16 * t);
    const kt_bf16 *src = S + (long)(16 * t) * ld + 32 * s;
    const __mmask32 km = kt_mask32(kp - 32 * s);
    __m512i r[16];
    if (tr == 16 && km == 0xffffffffu) {
        for (int i = 0; i < 16; i++) r[i] = _mm512_loadu_si512((const void *)(src + (long)i * ld));
    } else {
        for (int i = 0; i < 16; i++)
            r[i] = i < tr ? _mm512_maskz_loadu_epi16(km, src + (long)i * ld) : _mm512_setzero_si512();
    }
    kt_transpose16x16_epi32(r);
    kt_bf16 *d = dst + (long)(t >> 1) * ks * KT_PAIR + (long)s * KT_PAIR + (t & 1) * KT_TILE;
    for (int i = 0; i < 16; i++) _mm512_store_si512((void *)(d + 32 * i), r[i]);
}

void kt_pack_rows_vnni_amx(const kt_bf16 *S, long ld, int rows, int kp, kt_bf16 *dst, int ks) {
    for (int t = 0; t < (rows + 15) / 16; t++)
        for (int s = 0; s < ks; s++) kt_unit_rows_vnni(S, ld, rows, kp, dst, ks, t, s);
}

/* One unit of the nn pack of W (at W[k0, n0], kp x nc, stride ldw): 32-column block b, K step s.
 * Row kk of each Bt tile interleaves W rows 32s + 2kk and 32s + 2kk + 1 element-wise (VPERMT2W);
 * rows beyond kp and columns beyond nc are zero. */
static void kt_unit_nn(const kt_bf16 *W, long ldw, int nc, int kp, kt_bf16 *dst, int ks, int b, int s) {
    static const uint16_t idx_tab[64] = {
        0, 32, 1, 33, 2, 34, 3, 35, 4, 36, 5, 37, 6, 38, 7, 39,
        8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47,
        16, 48, 17, 49, 18, 50, 19, 51, 20, 52, 21, 53, 22, 54, 23, 55,
        24, 56, 25, 57, 26, 58, 27, 59, 28, 60, 29, 61, 30, 62, 31, 63};
    const __m512i idx_lo = _mm512_loadu_si512((const void *)idx_tab);
    const __m512i idx_hi = _mm512_loadu_si512((const void *)(idx_tab + 32));
    const int cols = kt_min(32, nc - 32 * b), kv = kt_min(32, kp - 32 * s);
    const __mmask32 nm = kt_mask32(cols);
    const kt_bf16 *w = W + (long)(32 * s) * ldw + 32 * b;
    kt_bf16 *d = dst + (long)b * ks * KT_PAIR + (long)s * KT_PAIR;
    if (cols == 32 && kv == 32) {
        for (int kk = 0; kk < 16; kk++) {
            const __m512i x = _mm512_loadu_si512((const void *)(w + (long)(2 * kk) * ldw));
            const __m512i y = _mm512_loadu_si512((const void *)(w + (long)(2 * kk + 1) * ldw));
            _mm512_store_si512((void *)(d + 32 * kk), _mm512_permutex2var_epi16(x, idx_lo, y));
            _mm512_store_si512((void *)(d + KT_TILE + 32 * kk), _mm512_permutex2var_epi16(x, idx_hi, y));
        }
        return;
    }
    for (int kk = 0; kk < 16; kk++) {
        const __m512i z = _mm512_setzero_si512();
        const __m512i x = 2 * kk < kv ? _mm512_maskz_loadu_epi16(nm, w + (long)(2 * kk) * ldw) : z;
        const __m512i y = 2 * kk + 1 < kv ? _mm512_maskz_loadu_epi16(nm, w + (long)(2 * kk + 1) * ldw) : z;
        _mm512_store_si512((void *)(d + 32 * kk), _mm512_permutex2var_epi16(x, idx_lo, y));
        if (cols > 16) _mm512_store_si512((void *)(d + KT_TILE + 32 * kk), _mm512_permutex2var_epi16(x, idx_hi, y));
    }
}

/* One nn unit (two Bt tiles: W rows 32P..32P+31 contracted, W columns 32S..32S+31) made from the
 * prepacked layout (gemm.h) instead of plain rows: src is the pair (P, S), two 16-row tiles
 * whose row cp holds, for n = 0..15, the qword-sized pairs (W[16t + n, 2cp], W[16t + n, 2cp+1]).
 * nn tile c (columns 16c..16c+15) row kk must hold, for column j, (W[2kk, j], W[2kk + 1, j]):
 * per group of 8 output rows it is an 8x8 transpose of 64-bit elements (rows 2q, 2q + 1 of W x
 * columns 2cp, 2cp + 1) followed by swapping the middle two bf16 of every qword. */
KT_AI void kt_transpose8x8_epi64(__m512i r[8]) {
    __m512i t[8], u[8];
    for (int a = 0; a < 4; a++) {
        t[2 * a] = _mm512_unpacklo_epi64(r[2 * a], r[2 * a + 1]);     /* lanes: q0, q2, q4, q6 of rows 2a, 2a+1 */
        t[2 * a + 1] = _mm512_unpackhi_epi64(r[2 * a], r[2 * a + 1]); /* q1, q3, q5, q7 */
    }
    for (int o = 0; o < 2; o++) { /* o = 0: even qwords, 1: odd */
        u[4 * o + 0] = _mm512_shuffle_i64x2(t[o], t[2 + o], 0x88);
        u[4 * o + 1] = _mm512_shuffle_i64x2(t[o], t[2 + o], 0xdd);
        u[4 * o + 2] = _mm512_shuffle_i64x2(t[4 + o], t[6 + o], 0x88);
        u[4 * o + 3] = _mm512_shuffle_i64x2(t[4 + o], t[6 + o], 0xdd);
        r[0 + o] = _mm512_shuffle_i64x2(u[4 * o + 0], u[4 * o + 2], 0x88); /* qword 0 + o */
        r[4 + o] = _mm512_shuffle_i64x2(u[4 * o + 0], u[4 * o + 2], 0xdd); /* qword 4 + o */
        r[2 + o] = _mm512_shuffle_i64x2(u[4 * o + 1], u[4 * o + 3], 0x88); /* qword 2 + o */
        r[6 + o] = _mm512_shuffle_i64x2(u[4 * o + 1], u[4 * o + 3], 0xdd); /* qword 6 + o */
    }
}

static void kt_unit_nn_pre(const kt_bf16 *src, kt_bf16 *dst) {
    const __m512i swap = _mm512_set_epi8(15, 14, 11, 10, 13, 12, 9, 8, 7, 6, 3, 2, 5, 4, 1, 0,
                                         15, 14, 11, 10, 13, 12, 9, 8, 7, 6, 3, 2, 5, 4, 1, 0,
                                         15, 14, 11, 10, 13, 12, 9, 8, 7, 6, 3, 2, 5, 4, 1, 0,
                                         15, 14, 11, 10, 13, 12, 9, 8, 7, 6, 3, 2, 5, 4, 1, 0);
    for (int g = 0; g < 4; g++) { /* source tile g & 1, its rows 8 (g >> 1) ..; output tile g >> 1, rows 8 (g & 1) .. */
        const kt_bf16 *f = src + (g & 1) * KT_TILE + (g >> 1) * 8 * 32;
        kt_bf16 *o = dst + (g >> 1) * KT_TILE + (g & 1) * 8 * 32;
        __m512i r[8];
        for (int i = 0; i < 8; i++) r[i] = _mm512_load_si512((const void *)(f + 32 * i));
        kt_transpose8x8_epi64(r);
        for (int i = 0; i < 8; i++) _mm512_store_si512((void *)(o + 32 * i), _mm512_shuffle_epi8(r[i], swap));
    }
}

/* Prepacked W (gemm.h): its base for this expert, total column steps, and the first W row (nt)
 * or column (nn) of the product, a multiple of 32. */
typedef struct { const kt_bf16 *w; int ks; int off; } kt_pre;

/* Side work done between the tile instructions of the packed kernel: packing the next B panel
 * (into the other of two buffers, so the tile loads in flight never read what it writes).
 * Units (nt: 16 W rows x one K step; nn: 32 W columns x one K step) are done in order up to
 * bend; the job is resumable. */
typedef struct {
    const kt_bf16 *w; long ldw; int w_is_kn, nc, kp, ks; kt_bf16 *bdst; int bu, bend, bn;
    const kt_bf16 *pre; long pre_ks; /* nn from the prepacked layout: pair (k step s, block b) at
                                        pre + (s * pre_ks + b) * KT_PAIR (pre already offset), else NULL */
} kt_side;

/* Software prefetch of the W lines that unit u of job j will read (W streams from memory
 * once per call: without it each unit's 16 or 32 row segments are fetched at full DRAM
 * latency, one after another). Prefetches never fault, so edge units need no clipping. */
enum { KT_PF_UNITS = 8 };  /* units ahead: ~8 KiB in flight per thread */

KT_AI void kt_prefetch_unit(const kt_side *j, int u) {
    if (u >= j->bn) return;
    const int t = u / j->ks, s = u - t * j->ks;
    if (j->pre) {
        const char *w = (const char *)(j->pre + ((long)s * j->pre_ks + t) * KT_PAIR);
        for (int i = 0; i < 32; i++) _mm_prefetch(w + 64 * i, _MM_HINT_T0);
    } else if (j->w_is_kn) {
        const char *w = (const char *)(j->w + (long)(32 * s) * j->ldw + 32 * t);
        for (int i = 0; i < 32; i++) _mm_prefetch(w + (long)i * j->ldw * (long)sizeof(kt_bf16), _MM_HINT_T0);
    } else {
        const char *w = (const char *)(j->w + (long)(16 * t) * j->ldw + 32 * s);
        for (int i = 0; i < 16; i++) _mm_prefetch(w + (long)i * j->ldw * (long)sizeof(kt_bf16), _MM_HINT_T0);
    }
}

static void kt_side_b(kt_side *j, int n) {
    int u = j->bu;
    const int end = kt_min(j->bend, u + n);
    if (u == 0)
        for (int v = 0; v < KT_PF_UNITS; v++) kt_prefetch_unit(j, v);
    for (; u < end; u++) {
        kt_prefetch_unit(j, u + KT_PF_UNITS);
        const int t = u / j->ks, s = u - t * j->ks;
        if (j->pre) kt_unit_nn_pre(j->pre + ((long)s * j->pre_ks + t) * KT_PAIR, j->bdst + (long)t * j->ks * KT_PAIR + (long)s * KT_PAIR);
        else if (j->w_is_kn) kt_unit_nn(j->w, j->ldw, j->nc, j->kp, j->bdst, j->ks, t, s);
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


/* C[rows x cols] (+)= A[rows x kp] * Bp over ks K steps; rows, cols in 1..32; tm = rows > 16,
 * tn = cols > 16 are compile-time constants in each instance. A tiles are loaded straight from
 * A when all 16 rows and 32 k values are valid, else through the zero-padded staging tiles.
 * Per K step, nb units of side work (the next B panel) when nb > 0. */
KT_AI void kt_kernel_packed_body(const int tm, const int tn, const kt_bf16 *A, long lda, int kp, const kt_bf16 *bp,
                                 int ks, float *C, long ldc, int rows, int cols, int acc, kt_amx_scratch *S,
                                 kt_side *side, int nb, int first, int pfd) {
    const long sc = ldc * (long)sizeof(float), sa = lda * (long)sizeof(kt_bf16);
    const int r0 = kt_min(rows, 16), r1 = rows - r0, c0 = kt_min(cols, 16), c1 = cols - c0;
    const int kfull = kp / 32;
    const int d0 = r0 == 16 ? kfull : 0, d1 = r1 == 16 ? kfull : 0; /* steps loaded straight from A */
    float (*cst)[256] = S->cst;
    float *C1 = C + 16 * ldc;
    const kt_bf16 *A1 = A + 16 * lda;
    KT_MEM_BARRIER(C); /* C may have been written by plain stores */
    KT_C_BEGIN(0, C, r0, c0);
    if (tn) KT_C_BEGIN(1, C + 16, r0, c1);
    if (tm) KT_C_BEGIN(2, C1, r1, c0);
    if (tm && tn) KT_C_BEGIN(3, C1 + 16, r1, c1);
    if (d0 < ks) memset(S->wst[0] + 32 * r0, 0, sizeof(kt_bf16) * 32 * (size_t)(16 - r0));
    if (tm && d1 < ks) memset(S->wst[1] + 32 * r1, 0, sizeof(kt_bf16) * 32 * (size_t)(16 - r1));
    /* Each operand tile is reloaded for step s + 1 right after the last TDP that reads it in
     * step s (tiles are not renamed: a load must wait for its tile's readers), so the loads
     * of the next step overlap the remaining multiplies of this one. */
#define KT_LOAD_A0(st) KT_LOAD_OPERAND(4, (st) < d0, A + 32 * (st), sa, kt_stage_rows, S->wst[0], lda, r0, kp - 32 * (st))
#define KT_LOAD_A1(st) KT_LOAD_OPERAND(5, (st) < d1, A1 + 32 * (st), sa, kt_stage_rows, S->wst[1], lda, r1, kp - 32 * (st))
    KT_LOAD_A0(0);
    _tile_loadd(6, bp, 64);
    if (tn) _tile_loadd(7, bp + KT_TILE, 64);
    if (tm) KT_LOAD_A1(0);
    for (int s = 0; s < ks; s++) {
        const kt_bf16 *bn = bp + (long)(s + 1) * KT_PAIR; /* next step's B pair */
        const int more = s + 1 < ks;
        if (pfd && s + pfd < ks) { /* B comes from L2 or memory: its lines a few steps ahead into L1 */
            const char *pb = (const char *)(bp + (long)(s + pfd) * KT_PAIR);
            for (int l = 0; l < (tn ? 32 : 16); l++) _mm_prefetch(pb + 64 * l, _MM_HINT_T0);
        }
        if (KT_AMX_PFA && first && s + KT_AMX_PFA < ks)
            for (int i = 0; i < rows; i++) _mm_prefetch((const char *)(A + (long)i * lda + 32 * (s + KT_AMX_PFA)), _MM_HINT_T0);
        _tile_dpbf16ps(0, 4, 6);
        if (tn) _tile_dpbf16ps(1, 4, 7);
        if (more) KT_LOAD_A0(s + 1);
        if (tm) _tile_dpbf16ps(2, 5, 6);
        if (more) _tile_loadd(6, bn, 64);
        if (tm && tn) _tile_dpbf16ps(3, 5, 7);
        if (more) {
            if (tn) _tile_loadd(7, bn + KT_TILE, 64);
            if (tm) KT_LOAD_A1(s + 1);
        }
        if (nb) kt_side_work(side, nb); /* writes only the other B buffer */
    }
#undef KT_LOAD_A0
#undef KT_LOAD_A1
    KT_C_END(0, C, r0, c0);
    if (tn) KT_C_END(1, C + 16, r0, c1);
    if (tm) KT_C_END(2, C1, r1, c0);
    if (tm && tn) KT_C_END(3, C1 + 16, r1, c1);
    KT_MEM_BARRIER(C); /* the tile stores above wrote C */
}

static void kt_kernel_packed(const kt_bf16 *A, long lda, int kp, const kt_bf16 *bp, int ks, float *C, long ldc,
                             int rows, int cols, int acc, kt_amx_scratch *S, kt_side *side, int nb, int first, int pfd) {
    if (rows > 16) {
        if (cols > 16) kt_kernel_packed_body(1, 1, A, lda, kp, bp, ks, C, ldc, rows, cols, acc, S, side, nb, first, pfd);
        else kt_kernel_packed_body(1, 0, A, lda, kp, bp, ks, C, ldc, rows, cols, acc, S, side, nb, first, pfd);
    } else {
        if (cols > 16) kt_kernel_packed_body(0, 1, A, lda, kp, bp, ks, C, ldc, rows, cols, acc, S, side, nb, first, pfd);
        else kt_kernel_packed_body(0, 0, A, lda, kp, bp, ks, C, ldc, rows, cols, acc, S, side, nb, first, pfd);
    }
}


/* Set up the B job for panel k0 of the chunk at n0, packing into dst. */
static void kt_side_set_b(kt_side *j, const kt_bf16 *W, long ldw, int w_is_kn, int n0, int nc, int k0, int K,
                          kt_bf16 *dst, const kt_pre *pre) {
    memset(j, 0, sizeof *j);
    j->kp = kt_min(KT_KP, K - k0);
    j->ks = kt_cdiv(j->kp, 32);
    j->w_is_kn = w_is_kn, j->nc = nc, j->ldw = ldw, j->bdst = dst;
    j->w = !W ? NULL : w_is_kn ? W + (long)k0 * ldw + n0 : W + (long)n0 * ldw + k0;
    j->bn = (w_is_kn ? kt_cdiv(nc, 32) : kt_cdiv(nc, 16)) * j->ks;
    if (pre) { /* nn only: W rows k0.. are pairs k0 / 32 .., columns off + n0 .. are steps (off + n0) / 32 .. */
        j->pre = pre->w + ((long)(k0 / 32) * pre->ks + (pre->off + n0) / 32) * KT_PAIR;
        j->pre_ks = pre->ks;
    }
}

/* Packed path. Order: N chunks, K panels, 32-row blocks of M, 32-column blocks of the chunk.
 * The first B panel is packed up front; while panel p computes, the next one (of this chunk or
 * the first of the next) is packed into the other buffer a few units per K step, spread evenly
 * over the M blocks. With a prepacked W (pre != NULL): nt reads its B tiles straight from it
 * (nothing is packed); nn converts its units from it (kt_unit_nn_pre) instead of plain rows. */
static void kt_gemm_packed(KT_GEMM_ARGS, int w_is_kn, kt_amx_scratch *S, const kt_pre *pre) {
    const int nmb = kt_cdiv(M, 32), npan = kt_cdiv(K, KT_KP);
    const int direct = pre && !w_is_kn; /* B tiles read in place */
    kt_side bj;
    memset(&bj, 0, sizeof bj);
    int g = 0; /* panels done over all chunks: panel g is in buffer g & 1 */
    if (!direct) {
        kt_side_set_b(&bj, W, ldw, w_is_kn, 0, kt_min(KT_NC, N), 0, K, S->b[0], pre);
        bj.bend = bj.bn;
        kt_side_b(&bj, bj.bn); /* the very first panel up front; every later one is packed during the one before */
    }
    for (int n0 = 0; n0 < N; n0 += KT_NC) {
        const int nc = kt_min(KT_NC, N - n0), nblk = kt_cdiv(nc, 32);
        for (int p = 0; p < npan; p++, g++) {
            const int k0 = p * KT_KP, kp = kt_min(KT_KP, K - k0), ks = kt_cdiv(kp, 32);
            const int acc = accumulate || p > 0;
            const kt_bf16 *bp = S->b[g & 1];
            long bstride = (long)ks * KT_PAIR; /* between the 32-column blocks of the panel */
            int nextp = 0;
            if (direct) {
                bp = pre->w + ((long)((pre->off + n0) / 32) * pre->ks + k0 / 32) * KT_PAIR;
                bstride = (long)pre->ks * KT_PAIR;
            } else {
                /* the next panel: of this chunk, or the first of the next chunk */
                nextp = p + 1 < npan || n0 + KT_NC < N;
                if (p + 1 < npan) kt_side_set_b(&bj, W, ldw, w_is_kn, n0, nc, k0 + KT_KP, K, S->b[(g + 1) & 1], pre);
                else if (nextp)
                    kt_side_set_b(&bj, W, ldw, w_is_kn, n0 + KT_NC, kt_min(KT_NC, N - n0 - KT_NC), 0, K, S->b[(g + 1) & 1], pre);
            }
            KT_MEM_BARRIER(S);
            for (int i = 0; i < nmb; i++) {
                const int m0 = 32 * i, rows = kt_min(32, M - m0);
                int nb = 0;
                if (nextp) {
                    bj.bend = (int)(((long)bj.bn * (i + 1) + nmb - 1) / nmb);
                    nb = kt_cdiv(bj.bend - bj.bu, nblk * ks);
                }
                /* B from memory (prepacked, first M block) needs a longer prefetch than from L2 */
                const int pfd = direct && i == 0 ? KT_AMX_PFB_MEM : KT_AMX_PFB;
                for (int j = 0; j < nc; j += 32)
                    kt_kernel_packed(A + (long)m0 * lda + k0, lda, kp, bp + (long)(j / 32) * bstride, ks,
                                     C + (long)m0 * ldc + n0 + j, ldc, rows, kt_min(32, nc - j), acc, S, &bj, nb, j == 0, pfd);
                if (nextp) kt_side_b(&bj, bj.bend - bj.bu); /* finish this block's share */
            }
        }
    }
}

/* ---- transposed-output path (path 2 above) ----------------------------------------------------
 * nt with M <= KT_AMX_MCT computes C^T = W * A^T, W tile-loaded straight from memory (never
 * packed), A^T packed once per K panel into VNNI tiles; blocks of 32 W rows x 32 A rows use all 8
 * tiles, and each 16x16 C^T accumulator is transposed in AVX-512 registers into C. */

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
                             const kt_bf16 *atp, int mr, float *C, long ldc, int acc, kt_amx_scratch *S, int pf) {
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
                         long ldc, int acc, kt_amx_scratch *S, int pf) {
    if (nr > 16) {
        if (mr > 16) kt_kernel_ct_body(1, 1, W, ldw, nr, kp, ks, atp, mr, C, ldc, acc, S, pf);
        else kt_kernel_ct_body(1, 0, W, ldw, nr, kp, ks, atp, mr, C, ldc, acc, S, pf);
    } else {
        if (mr > 16) kt_kernel_ct_body(0, 1, W, ldw, nr, kp, ks, atp, mr, C, ldc, acc, S, pf);
        else kt_kernel_ct_body(0, 0, W, ldw, nr, kp, ks, atp, mr, C, ldc, acc, S, pf);
    }
}

void kt_gemm_nt_ct_amx(KT_GEMM_ARGS, kt_amx_scratch *S) {
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

/* ---- entry points ----------------------------------------------------------------------- */

static void kt_gemm_amx(KT_GEMM_ARGS, int w_is_kn) {
    if (kt_gemm_degenerate(M, N, K, C, ldc, accumulate)) return;
    kt_amx_scratch *S = M < (w_is_kn ? KT_AMX_MSMALL_NN : KT_AMX_MSMALL_NT) ? NULL : kt_get_amx_scratch();
    if (!S) {
        (w_is_kn ? kt_gemm_nn_avx512 : kt_gemm_nt_avx512)(M, N, K, A, lda, W, ldw, C, ldc, accumulate);
        return;
    }
    kt_amx_configure();
    if (!w_is_kn && M <= KT_MCT)
        kt_gemm_nt_ct_amx(M, N, K, A, lda, W, ldw, C, ldc, accumulate, S);
    else
        kt_gemm_packed(M, N, K, A, lda, W, ldw, C, ldc, accumulate, w_is_kn, S, NULL);
}

void kt_gemm_nt_amx(KT_GEMM_ARGS) { kt_gemm_amx(M, N, K, A, lda, W, ldw, C, ldc, accumulate, 0); }

void kt_gemm_nn_amx(KT_GEMM_ARGS) { kt_gemm_amx(M, N, K, A, lda, W, ldw, C, ldc, accumulate, 1); }

/* ---- prepacked weights (gemm.h) ----------------------------------------------------------- */

size_t kt_prepacked_elems(int rows, int cols) {
    return (size_t)kt_cdiv(rows, 32) * kt_cdiv(cols, 32) * KT_PAIR;
}

void kt_prepack_amx(const kt_bf16 *W, long ldw, int rows, int cols, kt_bf16 *dst) {
    memset(dst, 0, sizeof(kt_bf16) * kt_prepacked_elems(rows, cols)); /* padding rows / columns, odd last tile */
    if (rows > 0 && cols > 0) kt_pack_rows_vnni_amx(W, ldw, rows, cols, dst, kt_cdiv(cols, 32));
}

static int kt_gemm_pre(int M, int N, const kt_bf16 *A, long lda, const kt_bf16 *Wp, int rows, int cols, int off,
                       float *C, long ldc, int w_is_kn) {
    const int K = w_is_kn ? rows : cols;
    if (kt_gemm_degenerate(M, N, K, C, ldc, 0)) return 0;
    kt_amx_scratch *S = kt_get_amx_scratch();
    if (!S) return -2;
    kt_amx_configure();
    const kt_pre pre = {Wp, kt_cdiv(cols, 32), off};
    kt_gemm_packed(M, N, K, A, lda, NULL, 0, C, ldc, 0, w_is_kn, S, &pre);
    return 0;
}

int kt_gemm_nt_pre_amx(int M, int N, const kt_bf16 *A, long lda, const kt_bf16 *Wp, int rows, int cols, int row0,
                       float *C, long ldc) {
    return kt_gemm_pre(M, N, A, lda, Wp, rows, cols, row0, C, ldc, 0);
}

int kt_gemm_nn_pre_amx(int M, int N, const kt_bf16 *A, long lda, const kt_bf16 *Wp, int rows, int cols, int col0,
                       float *C, long ldc) {
    return kt_gemm_pre(M, N, A, lda, Wp, rows, cols, col0, C, ldc, 1);
}
