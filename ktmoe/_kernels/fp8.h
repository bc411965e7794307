/* fp8.h: decoding FP8 e4m3fn weight codes (SPEC.md 5; reference/quant.py decode_fp8), exactly.
 *
 * A code is s.eeee.mmm: value = (-1)^s * (e ? 8 + m : m) * 2^(max(e, 1) - 10), i.e. bias 7,
 * subnormals for e = 0, no infinities, and NaN = s.1111.111 (0x7f, 0xff), which ktmoe rejects
 * when the codes are ingested, so the decoders below never see it. Every e4m3 value is exact
 * in fp32: a normal code's fp32 bits are the code's 7 low bits shifted to the top of the
 * fp32 mantissa plus the exponent rebias 120 << 23; a subnormal (e = 0) is m * 2^-9, made
 * from the integer m. Both use integer operations and normal floats only (no denormal
 * arithmetic, which flush-to-zero modes would change), and the vector form uses AVX-512F
 * instructions only, so it runs wherever the avx512 path is selected.
 */
#ifndef KTMOE_FP8_H
#define KTMOE_FP8_H
#include <stdint.h>
#include <string.h>

static inline float kt_fp8_to_f32(uint8_t c) {
    uint32_t em = c & 0x7fu, sign = (uint32_t)(c & 0x80u) << 24;
    uint32_t bits = (em << 20) + (120u << 23);
    float normal, sub = (float)em * 0x1p-9f, v;
    memcpy(&normal, &bits, sizeof normal);
    v = em < 8 ? sub : normal;
    uint32_t u;
    memcpy(&u, &v, sizeof u);
    u |= sign;
    memcpy(&v, &u, sizeof v);
    return v;
}

#if defined(__AVX512F__)
#include <immintrin.h>
/* 16 codes (the low 16 bytes of b) -> 16 fp32 values */
static inline __attribute__((always_inline)) __m512 kt_fp8x16_to_ps(__m128i b) {
    __m512i c = _mm512_cvtepu8_epi32(b);
    __m512i em = _mm512_and_si512(c, _mm512_set1_epi32(0x7f));
    __m512i sign = _mm512_slli_epi32(_mm512_and_si512(c, _mm512_set1_epi32(0x80)), 24);
    __m512i normal = _mm512_add_epi32(_mm512_slli_epi32(em, 20), _mm512_set1_epi32(120 << 23));
    __m512 sub = _mm512_mul_ps(_mm512_cvtepi32_ps(em), _mm512_set1_ps(0x1p-9f));
    __mmask16 is_sub = _mm512_cmplt_epu32_mask(em, _mm512_set1_epi32(8));
    __m512i v = _mm512_mask_blend_epi32(is_sub, normal, _mm512_castps_si512(sub));
    return _mm512_castsi512_ps(_mm512_or_si512(v, sign));
}

/* 16 fp32 values -> bf16, round to nearest even (kt_f32_to_bf16 for non-NaN values), with
 * AVX-512F integer operations only (no AVX512-BF16 instruction) */
static inline __attribute__((always_inline)) __m256i kt_ps_to_bf16x16(__m512 f) {
    __m512i u = _mm512_castps_si512(f);
    __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), odd), 16);
    return _mm512_cvtepi32_epi16(r);
}
#endif
#endif
