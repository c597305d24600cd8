// The inner kernels: one group of 16 packed weight rows (packed.h) against RT activation rows (qlinear.h).
// Plain C++ on simd.h (no torch), so they can be timed alone.
#pragma once
#include <cstdint>
#include <cstring>
#include "simd.h"

enum Fmt : int64_t { F32 = 0, F16 = 1, Q4_0 = 2, Q8_0 = 8, Q2_K = 10, Q3_K = 11, Q4_K = 12, Q5_K = 13, Q6_K = 14,
                    IQ4_NL = 20, IQ4_XS = 23, BF16 = 30, MXFP4 = 39 };  // GGML ids
constexpr int64_t GROUP = 16;

// Offsets inside a group's block of the layouts with sub-blocks (block_formats.h)
constexpr int64_t q45_quants(int64_t fmt, int c) { return 320 + c * (fmt == Q5_K ? 640 : 512); }  // c's [8 v] vectors
constexpr int64_t q5_bits(int j) { return 320 + (j / 2) * 640 + 512 + (j % 2) * 64; }  // sub-block j's fifth bits
constexpr int64_t q6_low(int p) { return 288 + 384 * p; }                             // pair p's [4 v] vectors
constexpr int64_t q6_high(int s) { return 288 + 384 * (s / 2) + 256 + 64 * (s % 2); }  // sub-block s's high bits
constexpr int64_t q23_low(int64_t fmt, int s) { return fmt == Q2_K ? 320 + 64 * s : 288 + 96 * s; }  // low 2 bits
constexpr int64_t q3_bits(int s) { return 288 + 96 * s + 64; }                                        // third bits
constexpr int64_t iq4_quants(int j) { return 160 + 256 * j; }  // IQ4_XS sub-block j's [4 v] vectors

// The 16 levels of the 4-bit formats with a level table, stored + 128 so the weight bytes are unsigned: IQ4_NL / IQ4_XS
// (ggml's kvalues_iq4nl) and MXFP4 (e2m1 values, doubled: ggml's kvalues_mxfp4)
constexpr int8_t IQ4_LEVELS[16] = {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113};
constexpr int8_t MXFP4_LEVELS[16] = {0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12};
static inline u8x64 level_table(const int8_t* levels) {
  u8x64 t;
  for (int i = 0; i < 64; ++i) t[i] = (uint8_t)(levels[i % 16] + 128);
  return t;
}

// MXFP4's E8M0 block scale as ggml reads it (GGML_E8M0_TO_FP32_HALF): 2^(e - 128), subnormal for e < 2
static inline float e8m0_half(uint8_t e) {
  const uint32_t bits = e < 2 ? 0x00200000u << e : (uint32_t)(e - 1) << 23;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}
static inline f32x16 e8m0_half(i32x16 e) {
  const i32x16 small = e < 2;  // lanes of -1 where e < 2
  return (f32x16)((small & (splat_i(0x00200000) << e)) | (~small & ((e - 1) << 23)));
}

struct ActRow {       // one activation row as the kernels read it
  const float* x;     // [K] floats (float formats), in the weight's column order
  const int8_t* q;    // [K] int8 (integer formats)
  const float* d;     // [K / 32] block scales
  const int32_t* s;   // [K / 16] sums of q over 16
  const float* sd;    // [K / 16] those sums times their block's scale: the sums as values (the Q2_K mins' term)
};

static inline int32_t bytes4(const int8_t* p) { int32_t v; std::memcpy(&v, p, 4); return v; }

// Float weights are prefetched this far ahead into L2: one core streamed F32 groups at 28.5 GB/s so, 26-28 with no
// prefetch and 24 with 8 KiB (RESULTS.md); the quantized tiles are not: the hardware prefetchers alone streamed them
// 1.6x faster than a prefetch of every line.
constexpr int64_t PREFETCH_BYTES = 2048;

// NG groups (NG * 16 weight rows) of a float format at once: NG * RT accumulators, one FMA chain each over k, so
// a row's result is the same whichever NG and RT computed it.
template <int RT, int NG, class Load>
static void tile_float(const uint8_t* g, int64_t group_bytes, int64_t K, int64_t step, Load load, const ActRow* a,
                       f32x16* out) {
  f32x16 acc[NG][RT] = {};
  for (int64_t k = 0; k < K; ++k, g += step) {
    f32x16 w[NG];
    for (int n = 0; n < NG; ++n) {
      if (k % (64 / step) == 0) __builtin_prefetch(g + n * group_bytes + PREFETCH_BYTES, 0, 1);
      w[n] = load(g + n * group_bytes);
    }
    for (int t = 0; t < RT; ++t) {
      const f32x16 x = splat(a[t].x[k]);
      for (int n = 0; n < NG; ++n) acc[n][t] = fma16(w[n], x, acc[n][t]);
    }
  }
  for (int n = 0; n < NG; ++n)
    for (int t = 0; t < RT; ++t) out[n * RT + t] = acc[n][t];
}

// One float-format tile: NG groups from g (group_bytes apart) x RT rows -> out[n * RT + t]
template <int RT, int NG>
static void tile_floats(int64_t fmt, const uint8_t* g, int64_t group_bytes, int64_t K, const ActRow* a, f32x16* out) {
  switch (fmt) {
    case F32: return tile_float<RT, NG>(g, group_bytes, K, 64, [](const uint8_t* p) { return loadv<f32x16>(p); }, a, out);
    case F16: return tile_float<RT, NG>(g, group_bytes, K, 32, [](const uint8_t* p) { return load_halves((const uint16_t*)p); }, a, out);
    default: return tile_float<RT, NG>(g, group_bytes, K, 32, [](const uint8_t* p) { return load_bf16((const uint16_t*)p); }, a, out);
  }
}

template <int RT>
static void tile_q8_0(const uint8_t* g, int64_t K, const ActRow* a, f32x16* out) {
  f32x16 acc[RT] = {};
  for (int64_t b = 0; b < K / 32; ++b, g += 544) {
    const f32x16 d = load_halves((const uint16_t*)g);
    u8x64 w[8];
    for (int v = 0; v < 8; ++v) w[v] = loadv<u8x64>(g + 32 + 64 * v);
    for (int t = 0; t < RT; ++t) {
      i32x16 p = splat_i(-128 * (a[t].s[2 * b] + a[t].s[2 * b + 1]));  // weights stored as q + 128
      for (int v = 0; v < 8; ++v) p = dot4(p, w[v], bytes4(a[t].q + 32 * b + 4 * v));
      acc[t] = fma16(to_float(p), d * a[t].d[b], acc[t]);
    }
  }
  for (int t = 0; t < RT; ++t) out[t] = acc[t];
}

// Q4_0 (q - 8, an fp16 scale), IQ4_NL (IQ4_LEVELS[q], fp16) and MXFP4 (MXFP4_LEVELS[q], E8M0): blocks of 32 nibbles
template <int RT, int64_t FMT>
static void tile_q4_0(const uint8_t* g, int64_t K, const ActRow* a, f32x16* out) {
  f32x16 acc[RT] = {};
  const u8x64 levels = level_table(FMT == MXFP4 ? MXFP4_LEVELS : IQ4_LEVELS);
  constexpr int64_t QUANTS = FMT == MXFP4 ? 16 : 32, BYTES = QUANTS + 256;
  for (int64_t b = 0; b < K / 32; ++b, g += BYTES) {
    const f32x16 d = FMT == MXFP4 ? e8m0_half(load_u8_as_i32(g)) : load_halves((const uint16_t*)g);
    u8x64 w[8];
    for (int v = 0; v < 4; ++v) {
      const u32x16 l = loadv<u32x16>(g + QUANTS + 64 * v);
      w[v] = (u8x64)(l & 0x0F0F0F0Fu), w[v + 4] = (u8x64)((l >> 4) & 0x0F0F0F0Fu);
      if (FMT != Q4_0) w[v] = lookup16(levels, w[v]), w[v + 4] = lookup16(levels, w[v + 4]);
    }
    for (int t = 0; t < RT; ++t) {
      i32x16 p = splat_i(-(FMT == Q4_0 ? 8 : 128) * (a[t].s[2 * b] + a[t].s[2 * b + 1]));
      for (int v = 0; v < 8; ++v) p = dot4(p, w[v], bytes4(a[t].q + 32 * b + 4 * v));
      acc[t] = fma16(to_float(p), d * a[t].d[b], acc[t]);
    }
  }
  for (int t = 0; t < RT; ++t) out[t] = acc[t];
}

// IQ4_XS: sub-blocks of 32 (one activation block each) with a signed 6-bit scale, levels as IQ4_NL's
template <int RT>
static void tile_iq4_xs(const uint8_t* g, int64_t K, const ActRow* a, f32x16* out) {
  f32x16 acc[RT] = {};
  const u8x64 levels = level_table(IQ4_LEVELS);
  for (int64_t sb = 0; sb < K / 256; ++sb, g += 2208) {
    const f32x16 d = load_halves((const uint16_t*)g);
    for (int j = 0; j < 8; ++j) {
      const f32x16 dsc = d * load_i8_as_float((const int8_t*)(g + 32 + 16 * j));
      u8x64 w[8];
      for (int v = 0; v < 4; ++v) {
        const u32x16 l = loadv<u32x16>(g + iq4_quants(j) + 64 * v);
        w[v] = lookup16(levels, (u8x64)(l & 0x0F0F0F0Fu));
        w[v + 4] = lookup16(levels, (u8x64)((l >> 4) & 0x0F0F0F0Fu));
      }
      const int64_t blk = 8 * sb + j;
      for (int t = 0; t < RT; ++t) {
        i32x16 p = splat_i(-128 * (a[t].s[2 * blk] + a[t].s[2 * blk + 1]));
        for (int v = 0; v < 8; ++v) p = dot4(p, w[v], bytes4(a[t].q + 32 * blk + 4 * v));
        acc[t] = fma16(to_float(p), dsc * a[t].d[blk], acc[t]);
      }
    }
  }
  for (int t = 0; t < RT; ++t) out[t] = acc[t];
}

template <int RT, bool FIVE>  // Q4_K, or Q5_K with FIVE
static void tile_q45_k(const uint8_t* g, int64_t K, const ActRow* a, f32x16* out) {
  f32x16 acc[RT] = {};
  constexpr int64_t BYTES = FIVE ? 2880 : 2368;
  for (int64_t sb = 0; sb < K / 256; ++sb, g += BYTES) {
    const f32x16 d = load_halves((const uint16_t*)g), dmin = load_halves((const uint16_t*)(g + 32));
    for (int c = 0; c < 4; ++c) {
      const uint8_t* qs = g + q45_quants(FIVE ? Q5_K : Q4_K, c);
      u32x16 raw[8];
      for (int v = 0; v < 8; ++v) raw[v] = loadv<u32x16>(qs + 64 * v);
      for (int h = 0; h < 2; ++h) {
        const int j = 2 * c + h;  // sub-block of 32
        const f32x16 dsc = d * load_u8_as_float(g + 64 + 16 * j), dm = dmin * load_u8_as_float(g + 192 + 16 * j);
        const u32x16 fifth = FIVE ? loadv<u32x16>(g + q5_bits(j)) : u32x16{};
        u8x64 w[8];
        for (int v = 0; v < 8; ++v) {
          u32x16 q = (h ? raw[v] >> 4 : raw[v]) & 0x0F0F0F0Fu;
          if (FIVE) q |= (v <= 4 ? fifth << (4 - v) : fifth >> (v - 4)) & 0x10101010u;  // bit v of a byte to its bit 4
          w[v] = (u8x64)q;
        }
        const int64_t blk = 8 * sb + j;
        for (int t = 0; t < RT; ++t) {
          i32x16 p = {};
          for (int v = 0; v < 8; ++v) p = dot4(p, w[v], bytes4(a[t].q + 32 * blk + 4 * v));
          const float dx = a[t].d[blk];
          acc[t] = fma16(to_float(p), dsc * dx, acc[t]);
          acc[t] = fma16(dm, splat(-dx * (float)(a[t].s[2 * blk] + a[t].s[2 * blk + 1])), acc[t]);
        }
      }
    }
  }
  for (int t = 0; t < RT; ++t) out[t] = acc[t];
}

template <int RT>
static void tile_q6_k(const uint8_t* g, int64_t K, const ActRow* a, f32x16* out) {
  f32x16 acc[RT] = {};
  for (int64_t sb = 0; sb < K / 256; ++sb, g += 3360) {
    const f32x16 d = load_halves((const uint16_t*)g);
    for (int p = 0; p < 8; ++p) {  // sub-blocks 2p, 2p + 1 (16 each) = activation block 8 sb + p
      u32x16 raw[4];
      for (int v = 0; v < 4; ++v) raw[v] = loadv<u32x16>(g + q6_low(p) + 64 * v);
      for (int h = 0; h < 2; ++h) {
        const int s = 2 * p + h;
        const u32x16 hi = loadv<u32x16>(g + q6_high(s));
        const f32x16 dsc = d * load_i8_as_float((const int8_t*)(g + 32 + 16 * s));
        u8x64 w[4];
        for (int v = 0; v < 4; ++v) {
          const u32x16 top = (v < 2 ? hi << (4 - 2 * v) : hi >> (2 * v - 4)) & 0x30303030u;
          w[v] = (u8x64)(((h ? raw[v] >> 4 : raw[v]) & 0x0F0F0F0Fu) | top);
        }
        const int64_t k0 = 256 * sb + 16 * s;
        for (int t = 0; t < RT; ++t) {
          i32x16 q = splat_i(-32 * a[t].s[k0 / 16]);
          for (int v = 0; v < 4; ++v) q = dot4(q, w[v], bytes4(a[t].q + k0 + 4 * v));
          acc[t] = fma16(to_float(q), dsc * a[t].d[k0 / 32], acc[t]);
        }
      }
    }
  }
  for (int t = 0; t < RT; ++t) out[t] = acc[t];
}

// Q2_K and Q3_K: sub-blocks of 16 with an integer scale each, so the two sub-blocks of one activation block combine
// in int32 before one float step: sum_s scale_s (q_s . x); Q2_K's mins come off as dmin min_s (the sum of x over s).
template <int RT, bool THREE>  // Q2_K, or Q3_K with THREE
static void tile_q23_k(const uint8_t* g, int64_t K, const ActRow* a, f32x16* out) {
  f32x16 acc[RT] = {};
  constexpr int64_t FMT = THREE ? Q3_K : Q2_K, BYTES = THREE ? 1824 : 1344;
  for (int64_t sb = 0; sb < K / 256; ++sb, g += BYTES) {
    const f32x16 d = load_halves((const uint16_t*)g), dmin = THREE ? f32x16{} : load_halves((const uint16_t*)(g + 32));
    for (int p = 0; p < 8; ++p) {  // sub-blocks 2p, 2p + 1 = activation block 8 sb + p
      u8x64 w[2][4];
      i32x16 sc[2];
      f32x16 mn[2];  // Q2_K: dmin * min of each row
      for (int h = 0; h < 2; ++h) {
        const int s = 2 * p + h;
        const u32x16 lo = loadv<u32x16>(g + q23_low(FMT, s));
        for (int v = 0; v < 4; ++v) {
          w[h][v] = (u8x64)((lo >> (2 * v)) & 0x03030303u);
          if (THREE) w[h][v] |= bits_to<4>(loadv<uint64_t>(g + q3_bits(s) + 8 * v));
        }
        if (THREE) {
          sc[h] = load_i8_as_i32((const int8_t*)(g + 32 + 16 * s));
        } else {
          const i32x16 sm = load_u8_as_i32(g + 64 + 16 * s);
          sc[h] = sm & 15, mn[h] = dmin * to_float(sm >> 4);
        }
      }
      const int64_t blk = 8 * sb + p;
      for (int t = 0; t < RT; ++t) {
        i32x16 dot = {};
        for (int h = 0; h < 2; ++h) {
          i32x16 q = splat_i(THREE ? -4 * a[t].s[2 * blk + h] : 0);  // Q3_K's quants are stored + 4
          for (int v = 0; v < 4; ++v) q = dot4(q, w[h][v], bytes4(a[t].q + 32 * blk + 16 * h + 4 * v));
          dot += sc[h] * q;
          if (!THREE) acc[t] = fma16(mn[h], splat(-a[t].sd[2 * blk + h]), acc[t]);
        }
        acc[t] = fma16(to_float(dot), d * a[t].d[blk], acc[t]);
      }
    }
  }
  for (int t = 0; t < RT; ++t) out[t] = acc[t];
}

template <int RT>
static void tile(int64_t fmt, const uint8_t* g, int64_t K, const ActRow* a, f32x16* acc) {
  switch (fmt) {
    case F32: case F16: case BF16: return tile_floats<RT, 1>(fmt, g, 0, K, a, acc);
    case Q8_0: return tile_q8_0<RT>(g, K, a, acc);
    case Q4_0: return tile_q4_0<RT, Q4_0>(g, K, a, acc);
    case IQ4_NL: return tile_q4_0<RT, IQ4_NL>(g, K, a, acc);
    case MXFP4: return tile_q4_0<RT, MXFP4>(g, K, a, acc);
    case IQ4_XS: return tile_iq4_xs<RT>(g, K, a, acc);
    case Q4_K: return tile_q45_k<RT, false>(g, K, a, acc);
    case Q5_K: return tile_q45_k<RT, true>(g, K, a, acc);
    case Q6_K: return tile_q6_k<RT>(g, K, a, acc);
    case Q2_K: return tile_q23_k<RT, false>(g, K, a, acc);
    case Q3_K: return tile_q23_k<RT, true>(g, K, a, acc);
  }
}
