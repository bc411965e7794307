/* fp8.h: decoding FP8 e4m3fn weight codes (design.md 5; reference/quant.py decode_fp8), exactly.
 *
 * A code is s.eeee.mmm: value = (-1)^s * (e ? 8 + m : m) * 2^(max(e, 1) - 10), i.e. bias 7,
 * subnormals for e = 0, no infinities, and NaN = s.1111.111 (0x7f, 0xff), which ktmoe rejects
 * when the codes are ingested, so the decoders below never see it. Every e4m3 value is exact
 * in fp32: a normal code's fp32 bits are the code's 7 low bits shifted to the top of the
 * fp32 mantissa plus the exponent rebias 120 << 23; a subnormal (e = 0) is m * 2^-9, made
 * from the integer m. Both use integer operations and normal floats only (no denormal
 * arithmetic, which flush-to-zero modes would change); the vector form goes through fp16
 * (VCVTPH2PS, exact for every fp16 value whatever the MXCSR modes) with AVX-512F / AVX2
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
/* 16 codes (the low 16 bytes of b) -> their 16 values / 256 as fp32. A code's 7 magnitude bits shifted
 * left by 7 are the fp16 number code / 256 (fp16: bias 15, 5 exponent bits, so e4m3's
 * exponent field carries over and its subnormals are fp16 subnormals); the sign goes to bit
 * 15. VCVTPH2PS converts every fp16 value, subnormals included, exactly (it ignores
 * MXCSR.DAZ); times 256 (exact) this is kt_fp8_to_f32. The kernels fold the 256
 * into the scale they apply afterwards. The code sign-extended to 16 bits and shifted left
 * by 7 has the sign in bits 15 and 14; clearing bit 14 (fp16's top exponent bit, 0 for every
 * e4m3 exponent) leaves the fp16 number: three integer operations per 16 codes. */
static inline __attribute__((always_inline)) __m512 kt_fp8x16_to_ps_div256(__m128i b) {
    __m256i h = _mm256_and_si256(_mm256_slli_epi16(_mm256_cvtepi8_epi16(b), 7), _mm256_set1_epi16((short)0xbfff));
    return _mm512_cvtph_ps(h);
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
