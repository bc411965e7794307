/* vec.h: the elementwise helpers of the passes and the format kernels, in plain C that the
 * compiler vectorises for each ISA the file is compiled for (no intrinsics): e^x and the
 * SiLU's sigmoid, fp32 dot products, bf16 <-> fp32 rows, round-half-even, and the split of an
 * fp32 value into two bf16 numbers hi + lo that the LoRA products use (pass_lora.c). */
#ifndef KTMOE_VEC_H
#define KTMOE_VEC_H
#include "gemm/gemm.h"
#include "ktmoe.h"
#include <stdint.h>
#include <string.h>

/* e^x for the SiLU, in plain float arithmetic so loops of it vectorise (libm's expf does
 * not without -ffast-math): 2^n * p(r), x = n ln2 + r, |r| <= ln2/2, p the degree-6 Taylor
 * polynomial (relative error about 1e-7). x is clamped to [-87, 88] (e^x stays a normal,
 * finite float); comparisons keep NaN as NaN. */
static inline float exp_f32(float x) {
    x = x < -87.f ? -87.f : x;
    x = x > 88.f ? 88.f : x;
    const float shift = 12582912.f; /* 1.5 * 2^23: adding it rounds to an integer */
    float n = (x * 1.44269504f + shift) - shift;
    float r = (x - n * 0.693145752f) - n * 1.42860677e-6f;
    float p = 1.f + r * (1.f + r * (0.5f + r * (1.f / 6 + r * (1.f / 24 + r * (1.f / 120 + r * (1.f / 720))))));
    uint32_t bits = (uint32_t)((int)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

static inline float sigmoid(float g) { return 1.f / (1.f + exp_f32(-g)); }

/* sum_i a[i] * b[i] with 16 independent partial sums (vectorises without reassociation) */
static inline float dot_f32(const float *a, const float *b, int n) {
    float part[16] = {0}, s = 0.f;
    int i = 0;
    for (; i + 16 <= n; i += 16)
        for (int l = 0; l < 16; l++) part[l] += a[i + l] * b[i + l];
    for (; i < n; i++) s += a[i] * b[i];
    for (int l = 0; l < 16; l++) s += part[l];
    return s;
}

static inline void row_to_f32(float *dst, const kt_bf16 *src, int n) {
    for (int i = 0; i < n; i++) dst[i] = kt_bf16_to_f32(src[i]);
}
static inline void row_to_bf16(kt_bf16 *dst, const float *src, int n, float scale) {
    for (int i = 0; i < n; i++) dst[i] = kt_f32_to_bf16(scale * src[i]);
}
static inline void row_out(void *dst, int dtype, const float *src, int n) {
    if (dtype == KT_F32) memcpy(dst, src, sizeof(float) * (size_t)n);
    else row_to_bf16(dst, src, n, 1.f);
}

static inline float round_even(float v) {
    const float shift = 12582912.f; /* 1.5 * 2^23: exact round-half-even for |v| < 2^22 */
    return (v + shift) - shift;
}

/* v = hi + lo as two bf16 numbers (the split-bf16 LoRA quantities, pass_lora.c) */
static inline void split(float v, kt_bf16 *hi, kt_bf16 *lo) {
    *hi = kt_f32_to_bf16(v);
    *lo = kt_f32_to_bf16(v - kt_bf16_to_f32(*hi));
}

/* value j of a split product row [hi, lo, hi] of rank r */
static inline float unsplit(const kt_bf16 *row, int r, int j) {
    return kt_bf16_to_f32(row[j]) + kt_bf16_to_f32(row[r + j]);
}
#endif
