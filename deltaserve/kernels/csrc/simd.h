// 16-lane vectors and the few ISA-specific primitives the weight kernels need.
//
// Vectors are GCC vector extensions (64 bytes): one zmm register with AVX-512, two ymm with AVX2, and plain
// C elsewhere, so the kernels are written once. Only the primitives below choose an instruction by the ISA the
// module was compiled for; cpu_native.py picks those flags from the CPU it runs on (never AMX). Every primitive
// computes the same exact result on every ISA (integer math, or one IEEE fma), so a kernel's output does not
// depend on which path ran.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

typedef float f32x16 __attribute__((vector_size(64)));
typedef int32_t i32x16 __attribute__((vector_size(64)));
typedef uint32_t u32x16 __attribute__((vector_size(64)));
typedef uint8_t u8x64 __attribute__((vector_size(64)));
typedef uint8_t u8x16 __attribute__((vector_size(16)));
typedef int8_t i8x16 __attribute__((vector_size(16)));
typedef uint16_t u16x16 __attribute__((vector_size(32)));
typedef float f32x8 __attribute__((vector_size(32)));

template <class V>
static inline V loadv(const void* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}
template <class V>
static inline void storev(void* p, V v) { std::memcpy(p, &v, sizeof(V)); }

static inline f32x16 splat(float x) { return f32x16{} + x; }
static inline i32x16 splat_i(int32_t x) { return i32x16{} + x; }
static inline f32x16 to_float(i32x16 v) { return __builtin_convertvector(v, f32x16); }

// a * b + c with one rounding per lane
static inline f32x16 fma16(f32x16 a, f32x16 b, f32x16 c) {
#if defined(__AVX512F__)
  return (f32x16)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c);
#elif defined(__FMA__)
  f32x8 r[2];
  for (int h = 0; h < 2; ++h) {
    f32x8 x, y, z;
    std::memcpy(&x, (const char*)&a + 32 * h, 32), std::memcpy(&y, (const char*)&b + 32 * h, 32);
    std::memcpy(&z, (const char*)&c + 32 * h, 32);
    r[h] = (f32x8)_mm256_fmadd_ps((__m256)x, (__m256)y, (__m256)z);
  }
  return loadv<f32x16>(r);
#else
  f32x16 r;
  for (int l = 0; l < 16; ++l) r[l] = std::fma(a[l], b[l], c[l]);
  return r;
#endif
}

// acc[l] += sum_j w[4l + j] * x[j] for the 4 signed bytes of x: unsigned weight bytes times signed activation
// bytes, exact in 32 bits (vpdpbusd with AVX512-VNNI; pairs of 16-bit products elsewhere)
static inline i32x16 dot4(i32x16 acc, u8x64 w, int32_t x) {
#if defined(__AVX512VNNI__)
  return (i32x16)_mm512_dpbusd_epi32((__m512i)acc, (__m512i)w, _mm512_set1_epi32(x));
#else
  const u32x16 wl = (u32x16)w;
  const i32x16 w02 = (i32x16)(wl & 0x00FF00FFu), w13 = (i32x16)((wl >> 8) & 0x00FF00FFu);  // bytes as int16 pairs
  const int32_t b0 = (int8_t)x, b1 = (int8_t)(x >> 8), b2 = (int8_t)(x >> 16), b3 = (int8_t)(x >> 24);
#if defined(__AVX512BW__)
  const __m512i x02 = _mm512_set1_epi32((b0 & 0xFFFF) | (b2 << 16)), x13 = _mm512_set1_epi32((b1 & 0xFFFF) | (b3 << 16));
  return acc + (i32x16)_mm512_madd_epi16((__m512i)w02, x02) + (i32x16)_mm512_madd_epi16((__m512i)w13, x13);
#elif defined(__AVX2__)
  const __m256i x02 = _mm256_set1_epi32((b0 & 0xFFFF) | (b2 << 16)), x13 = _mm256_set1_epi32((b1 & 0xFFFF) | (b3 << 16));
  __m256i r[2];
  for (int h = 0; h < 2; ++h) {
    __m256i a, b, c;
    std::memcpy(&a, (const char*)&w02 + 32 * h, 32), std::memcpy(&b, (const char*)&w13 + 32 * h, 32);
    std::memcpy(&c, (const char*)&acc + 32 * h, 32);
    r[h] = _mm256_add_epi32(c, _mm256_add_epi32(_mm256_madd_epi16(a, x02), _mm256_madd_epi16(b, x13)));
  }
  return loadv<i32x16>(r);
#else
  return acc + (w02 & 0xFFFF) * b0 + (w02 >> 16) * b2 + (w13 & 0xFFFF) * b1 + (w13 >> 16) * b3;
#endif
#endif
}

static inline float half_to_float(uint16_t h) {
#if defined(__F16C__)
  return _cvtsh_ss(h);
#else
  const uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1F, man = h & 0x3FF;
  uint32_t bits;
  if (exp == 0x1F) bits = sign | 0x7F800000u | (man << 13);
  else if (exp) bits = sign | ((exp + 112) << 23) | (man << 13);
  else if (!man) bits = sign;
  else {  // subnormal half: normalise
    int e = -1;
    uint32_t m = man;
    do { ++e; m <<= 1; } while (!(m & 0x400));
    bits = sign | ((uint32_t)(112 - e) << 23) | ((m & 0x3FF) << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
#endif
}

// 16 consecutive fp16 values -> f32x16
static inline f32x16 load_halves(const uint16_t* p) {
#if defined(__AVX512F__)
  return (f32x16)_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p));
#elif defined(__F16C__)
  f32x8 r[2] = {(f32x8)_mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p)),
                (f32x8)_mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(p + 8)))};
  return loadv<f32x16>(r);
#else
  f32x16 r;
  for (int l = 0; l < 16; ++l) r[l] = half_to_float(p[l]);
  return r;
#endif
}

// 16 consecutive bf16 values -> f32x16 (exact: bf16 is the top half of a float)
static inline f32x16 load_bf16(const uint16_t* p) {
  return (f32x16)(__builtin_convertvector(loadv<u16x16>(p), u32x16) << 16);
}

// byte i of the result = V if bit i of mask is set, else 0 (the top bit of a Q3_K or Q5_K quant)
template <uint8_t V>
static inline u8x64 bits_to(uint64_t mask) {
#if defined(__AVX512BW__)
  return (u8x64)_mm512_maskz_mov_epi8(mask, _mm512_set1_epi8(V));
#else
  u8x64 r;
  for (int i = 0; i < 64; ++i) r[i] = ((mask >> i) & 1) ? V : 0;
  return r;
#endif
}

// byte i of the result = table[idx[i]] for idx < 16 (table: 16 bytes repeated in each 16-byte lane)
static inline u8x64 lookup16(u8x64 table, u8x64 idx) {
#if defined(__AVX512BW__)
  return (u8x64)_mm512_shuffle_epi8((__m512i)table, (__m512i)idx);
#elif defined(__AVX2__)
  __m256i t, i, r[2];
  for (int h = 0; h < 2; ++h) {
    std::memcpy(&t, (const char*)&table + 32 * h, 32), std::memcpy(&i, (const char*)&idx + 32 * h, 32);
    r[h] = _mm256_shuffle_epi8(t, i);
  }
  return loadv<u8x64>(r);
#else
  u8x64 r;
  for (int l = 0; l < 64; ++l) r[l] = table[idx[l]];
  return r;
#endif
}

// 16 bytes -> 16 int32, signed or unsigned (GCC scalarises __builtin_convertvector of bytes, hence intrinsics)
template <bool SIGNED>
static inline i32x16 bytes_to_i32(const void* p) {
#if defined(__AVX512F__)
  const __m128i b = _mm_loadu_si128((const __m128i*)p);
  return (i32x16)(SIGNED ? _mm512_cvtepi8_epi32(b) : _mm512_cvtepu8_epi32(b));
#elif defined(__AVX2__)
  __m256i r[2];
  for (int h = 0; h < 2; ++h) {
    const __m128i b = _mm_loadl_epi64((const __m128i*)((const char*)p + 8 * h));
    r[h] = SIGNED ? _mm256_cvtepi8_epi32(b) : _mm256_cvtepu8_epi32(b);
  }
  return loadv<i32x16>(r);
#else
  return SIGNED ? __builtin_convertvector(loadv<i8x16>(p), i32x16) : __builtin_convertvector(loadv<u8x16>(p), i32x16);
#endif
}
static inline i32x16 load_u8_as_i32(const uint8_t* p) { return bytes_to_i32<false>(p); }
static inline i32x16 load_i8_as_i32(const int8_t* p) { return bytes_to_i32<true>(p); }
static inline f32x16 load_u8_as_float(const uint8_t* p) { return to_float(load_u8_as_i32(p)); }
static inline f32x16 load_i8_as_float(const int8_t* p) { return to_float(load_i8_as_i32(p)); }

// a . b over n floats: 4 vector accumulators, summed in a fixed order (reproducible)
static inline float dot_f32(const float* a, const float* b, int64_t n) {
  f32x16 acc[4] = {};
  int64_t k = 0;
  for (; k + 64 <= n; k += 64)
    for (int u = 0; u < 4; ++u) acc[u] = fma16(loadv<f32x16>(a + k + 16 * u), loadv<f32x16>(b + k + 16 * u), acc[u]);
  for (int u = 0; k + 16 <= n; k += 16, ++u) acc[u] = fma16(loadv<f32x16>(a + k), loadv<f32x16>(b + k), acc[u]);
  const f32x16 v = (acc[0] + acc[1]) + (acc[2] + acc[3]);
  float s = 0.f;
  for (int l = 0; l < 16; ++l) s += v[l];
  for (; k < n; ++k) s += a[k] * b[k];
  return s;
}
