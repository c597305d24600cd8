// The per-format block layouts of packed weights (packed.h): sizes, and a row's block decoded from the file,
// written into a group, and read back as floats.
//
// Rows go in groups of 16; within a group the 16 rows are interleaved so that one 64-byte vector holds the same
// k-range of all 16 rows (lane r = row r of the group). A kernel then multiplies a whole vector by one broadcast
// activation value (floats) or 4 activation bytes (integer formats) and needs no horizontal sums; the same
// code serves 1 activation row (decode) and many (prefill). Quantized formats keep their own blocks and bits:
// per block, the 16 rows' scales, then their quants. Sizes per group and block (raw: 16 rows in the file):
//   F32 [K][16] f32, F16 / BF16 [K][16] u16                                            same as raw
//   Q8_0 (32): d[16] f16 | q+128 [8 v][16 r][4] u8                                     544 = raw
//   Q4_0 (32): d[16] f16 | [4 v][16 r][4] u8, low nibble k = 4v+j, high k = 16+4v+j    288 = raw
//   IQ4_NL (32): Q4_0's; a nibble is the index of a level (IQ4_LEVELS), not q + 8       288 = raw
//   MXFP4 (32): e[16] u8 (E8M0) | Q4_0's quants, nibbles index MXFP4_LEVELS             272 = raw
//   Q4_K (256): d[16], dmin[16] f16 | scale[8][16], min[8][16] u8 | [4 c][8 v][16 r][4] u8 with low nibble
//               k = 64c+4v+j (sub-block 2c), high k = 64c+32+4v+j (2c+1)                2368 = raw + 2.8%
//   Q5_K (256): Q4_K's, but after each c's quants [8 v][16 r][4] come the fifth bits of its two sub-blocks
//               [2][16 r][4] u8, bit v of k = 4v+j (in the sub-block)                   2880 = raw + 2.3%
//   Q6_K (256): d[16] f16 | scale[16][16] i8 | per pair p of sub-blocks (16 each): low 4 bits [4 v][16 r][4] u8,
//               low nibble k = 32p+4v+j, high k = 32p+16+4v+j, then high 2 bits [2 s][16 r][4] u8, bits 2v of
//               k = 16s+4v+j                                                            3360 = raw
//   Q2_K (256): d[16], dmin[16] f16 | scale | min << 4 [16 s][16 r] u8 | per sub-block s (16 each): quants
//               [16 r][4] u8, bits 2v of k = 16s+4v+j                                   1344 = raw
//   Q3_K (256): d[16] f16 | scale - 32 [16 s][16 r] i8 | per sub-block s: low 2 bits [16 r][4] u8, bits 2v of
//               k = 16s+4v+j, then third bits [4 v] u64 (bit 4r+j)                      1824 = raw + 3.6%
//   IQ4_XS (256): d[16] f16 | scale - 32 [8 j][16 r] i8 | per sub-block j (32 each): IQ4_NL's quants
//                                                                                       2208 = raw + 1.5%
// Each block is read front to back in one pass (two interleaved streams halve what the prefetchers deliver).
// Q3_K/Q4_K/Q5_K store their 6-bit scales (and mins) one per byte (the file packs them into 12 bytes), hence the
// 2-4%.
#pragma once
#include <torch/extension.h>
#include <cstring>
#include "simd.h"
#include "tiles.h"

struct FmtInfo {
  int64_t block, raw_bytes, packed_bytes;  // weights per block; bytes of one row's block; of a group's block
  bool integer;                            // computes on int8 activations (else float activations)
};

static FmtInfo fmt_info(int64_t fmt) {
  switch (fmt) {
    case F32: return {1, 4, 64, false};
    case F16: case BF16: return {1, 2, 32, false};
    case Q8_0: return {32, 34, 544, true};
    case Q4_0: case IQ4_NL: return {32, 18, 288, true};
    case IQ4_XS: return {256, 136, 2208, true};
    case MXFP4: return {32, 17, 272, true};
    case Q4_K: return {256, 144, 2368, true};
    case Q5_K: return {256, 176, 2880, true};
    case Q6_K: return {256, 210, 3360, true};
    case Q2_K: return {256, 84, 1344, true};
    case Q3_K: return {256, 110, 1824, true};
  }
  TORCH_CHECK(false, "weight format ", fmt, " has no CPU kernel");
}

// One row's block in the file's layout, decoded: quants as unsigned integers, scales as stored.
struct RawBlock {
  uint16_t d = 0, dmin = 0;  // fp16 bits (MXFP4: d is the E8M0 byte)
  int32_t q[256], scale[16], min[16];
};

static inline uint16_t u16_at(const uint8_t* p) { uint16_t v; std::memcpy(&v, p, 2); return v; }

static void decode_raw(int64_t fmt, const uint8_t* b, RawBlock& o) {
  switch (fmt) {
    case Q8_0:
      o.d = u16_at(b);
      for (int k = 0; k < 32; ++k) o.q[k] = (int8_t)b[2 + k] + 128;
      return;
    case Q4_0: case IQ4_NL: case MXFP4: {
      const int at = fmt == MXFP4 ? 1 : 2;  // the quants follow an E8M0 byte or an fp16 scale
      o.d = fmt == MXFP4 ? b[0] : u16_at(b);
      for (int k = 0; k < 16; ++k) o.q[k] = b[at + k] & 15, o.q[k + 16] = b[at + k] >> 4;
      return;
    }
    case IQ4_XS: {  // d, scales_h (u16: high 2 bits of 8 scales), scales_l [4] (low 4 bits), qs [128] as IQ4_NL's
      o.d = u16_at(b);
      const int high = u16_at(b + 2);
      for (int j = 0; j < 8; ++j)
        o.scale[j] = (((b[4 + j / 2] >> (4 * (j % 2))) & 15) | (((high >> (2 * j)) & 3) << 4)) - 32;
      for (int k = 0; k < 256; ++k) o.q[k] = (b[8 + 16 * (k / 32) + k % 16] >> (4 * (k % 32 / 16))) & 15;
      return;
    }
    case Q4_K: case Q5_K: {
      o.d = u16_at(b), o.dmin = u16_at(b + 2);
      const uint8_t* s = b + 4;  // 8 x (6-bit scale, 6-bit min) in 12 bytes
      for (int j = 0; j < 4; ++j) o.scale[j] = s[j] & 63, o.min[j] = s[j + 4] & 63;
      for (int j = 4; j < 8; ++j)
        o.scale[j] = (s[j + 4] & 15) | ((s[j - 4] >> 6) << 4), o.min[j] = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
      const bool five = fmt == Q5_K;
      const uint8_t *qs = b + (five ? 48 : 16), *qh = b + 16;
      for (int c = 0; c < 4; ++c)
        for (int l = 0; l < 32; ++l) {
          o.q[64 * c + l] = (qs[32 * c + l] & 15) | (five ? ((qh[l] >> (2 * c)) & 1) << 4 : 0);
          o.q[64 * c + 32 + l] = (qs[32 * c + l] >> 4) | (five ? ((qh[l] >> (2 * c + 1)) & 1) << 4 : 0);
        }
      return;
    }
    case Q6_K: {
      const uint8_t *ql = b, *qh = b + 128;
      for (int j = 0; j < 16; ++j) o.scale[j] = (int8_t)b[192 + j];
      o.d = u16_at(b + 208);
      for (int n = 0; n < 2; ++n)
        for (int l = 0; l < 32; ++l) {
          const int h = qh[32 * n + l];
          o.q[128 * n + l] = (ql[64 * n + l] & 15) | ((h & 3) << 4);
          o.q[128 * n + 32 + l] = (ql[64 * n + 32 + l] & 15) | (((h >> 2) & 3) << 4);
          o.q[128 * n + 64 + l] = (ql[64 * n + l] >> 4) | (((h >> 4) & 3) << 4);
          o.q[128 * n + 96 + l] = (ql[64 * n + 32 + l] >> 4) | (((h >> 6) & 3) << 4);
        }
      return;
    }
    case Q2_K: {  // scales [16] (scale | min << 4), qs [64], d, dmin: k = 128n + 32j + l at bits 2j of qs[32n + l]
      o.d = u16_at(b + 80), o.dmin = u16_at(b + 82);
      for (int s = 0; s < 16; ++s) o.scale[s] = b[s] & 15, o.min[s] = b[s] >> 4;
      for (int k = 0; k < 256; ++k) o.q[k] = (b[16 + 32 * (k / 128) + k % 32] >> (2 * (k % 128 / 32))) & 3;
      return;
    }
    case Q3_K: {  // hmask [32], qs [64], scales [12] (16 x 6 bits), d; k's third bit is bit k / 32 of hmask[k % 32]
      o.d = u16_at(b + 108);
      const uint8_t *hm = b, *qs = b + 32, *sc = b + 96;
      for (int j = 0; j < 16; ++j) {  // low 4 bits: byte j % 8, nibble j / 8; high 2: byte 8 + j % 4, bits 2 (j / 4)
        const int lo = (sc[j % 8] >> (4 * (j / 8))) & 15, hi = (sc[8 + j % 4] >> (2 * (j / 4))) & 3;
        o.scale[j] = (lo | (hi << 4)) - 32;
      }
      for (int k = 0; k < 256; ++k)
        o.q[k] = ((qs[32 * (k / 128) + k % 32] >> (2 * (k % 128 / 32))) & 3) | (((hm[k % 32] >> (k / 32)) & 1) << 2);
      return;
    }
  }
  TORCH_CHECK(false, "no block decoder for format ", fmt);
}

// Writes lane r of a group's block (g: its first byte) from one decoded row block.
static void encode_lane(int64_t fmt, const RawBlock& o, int r, uint8_t* g) {
  auto put16 = [&](int64_t at, uint16_t v) { std::memcpy(g + at + 2 * r, &v, 2); };
  switch (fmt) {
    case Q8_0:
      put16(0, o.d);
      for (int k = 0; k < 32; ++k) g[32 + (k / 4) * 64 + 4 * r + k % 4] = (uint8_t)o.q[k];
      return;
    case Q4_0: case IQ4_NL: case MXFP4: {
      const int at = fmt == MXFP4 ? 16 : 32;
      if (fmt == MXFP4) g[r] = (uint8_t)o.d;
      else put16(0, o.d);
      for (int k = 0; k < 16; ++k) g[at + (k / 4) * 64 + 4 * r + k % 4] = (uint8_t)(o.q[k] | (o.q[k + 16] << 4));
      return;
    }
    case IQ4_XS:
      put16(0, o.d);
      for (int j = 0; j < 8; ++j) g[32 + 16 * j + r] = (uint8_t)o.scale[j];
      for (int k = 0; k < 256; ++k)  // sub-block k / 32, nibble k % 32 / 16 of vector k % 16 / 4, byte 4r + k % 4
        g[iq4_quants(k / 32) + (k % 16 / 4) * 64 + 4 * r + k % 4] |= (uint8_t)(o.q[k] << (4 * (k % 32 / 16)));
      return;
    case Q4_K: case Q5_K:
      put16(0, o.d), put16(32, o.dmin);
      for (int j = 0; j < 8; ++j) g[64 + 16 * j + r] = (uint8_t)o.scale[j], g[192 + 16 * j + r] = (uint8_t)o.min[j];
      for (int c = 0; c < 4; ++c)
        for (int i = 0; i < 32; ++i)  // i = 4v + j
          g[q45_quants(fmt, c) + (i / 4) * 64 + 4 * r + i % 4] =
              (uint8_t)((o.q[64 * c + i] & 15) | ((o.q[64 * c + 32 + i] & 15) << 4));
      if (fmt == Q5_K)
        for (int k = 0; k < 256; ++k)  // sub-block k / 32 (c = k / 64), byte 4r + k % 4, bit v = k % 32 / 4
          if (o.q[k] & 16) g[q5_bits(k / 32) + 4 * r + k % 4] |= (uint8_t)(1 << (k % 32 / 4));
      return;
    case Q6_K:
      put16(0, o.d);
      for (int s = 0; s < 16; ++s) g[32 + 16 * s + r] = (uint8_t)(int8_t)o.scale[s];
      for (int p = 0; p < 8; ++p)
        for (int i = 0; i < 16; ++i)  // i = 4v + j
          g[q6_low(p) + (i / 4) * 64 + 4 * r + i % 4] =
              (uint8_t)((o.q[32 * p + i] & 15) | ((o.q[32 * p + 16 + i] & 15) << 4));
      for (int k = 0; k < 256; ++k)  // sub-block s = k / 16, vector v = k % 16 / 4
        g[q6_high(k / 16) + 4 * r + k % 4] |= (uint8_t)((o.q[k] >> 4) << (2 * (k % 16 / 4)));
      return;
    case Q2_K: case Q3_K: {
      const bool three = fmt == Q3_K;
      put16(0, o.d);
      if (!three) put16(32, o.dmin);
      for (int s = 0; s < 16; ++s)
        g[(three ? 32 : 64) + 16 * s + r] = (uint8_t)(three ? o.scale[s] : o.scale[s] | (o.min[s] << 4));
      for (int k = 0; k < 256; ++k) {  // sub-block s = k / 16, vector v = k % 16 / 4, byte 4r + k % 4
        g[q23_low(fmt, k / 16) + 4 * r + k % 4] |= (uint8_t)((o.q[k] & 3) << (2 * (k % 16 / 4)));
        const int bit = 4 * r + k % 4;  // of vector k % 16 / 4's 64
        if (three && (o.q[k] & 4)) g[q3_bits(k / 16) + (k % 16 / 4) * 8 + bit / 8] |= (uint8_t)(1 << (bit % 8));
      }
      return;
    }
  }
  TORCH_CHECK(false, "no packer for format ", fmt);
}

// Row lane r of a group's block as floats (the weights the kernels multiply by).
static void decode_lane(int64_t fmt, const uint8_t* g, int r, float* out) {
  auto half = [&](int64_t at) { return half_to_float(u16_at(g + at + 2 * r)); };
  auto byte = [&](int64_t at) { return g[at + 4 * r]; };  // at: offset of a [16 r][4] vector, plus j
  switch (fmt) {
    case Q8_0: {
      const float d = half(0);
      for (int k = 0; k < 32; ++k) out[k] = d * (float)(byte(32 + (k / 4) * 64 + k % 4) - 128);
      return;
    }
    case Q4_0: case IQ4_NL: case MXFP4: {
      const float d = fmt == MXFP4 ? e8m0_half(g[r]) : half(0);
      const int8_t* levels = fmt == MXFP4 ? MXFP4_LEVELS : IQ4_LEVELS;
      auto level = [&](int q) { return (float)(fmt == Q4_0 ? q - 8 : levels[q]); };
      for (int k = 0; k < 16; ++k) {
        const int b = byte((fmt == MXFP4 ? 16 : 32) + (k / 4) * 64 + k % 4);
        out[k] = d * level(b & 15), out[k + 16] = d * level(b >> 4);
      }
      return;
    }
    case IQ4_XS: {
      const float d = half(0);
      for (int k = 0; k < 256; ++k) {
        const int b = byte(iq4_quants(k / 32) + (k % 16 / 4) * 64 + k % 4);
        out[k] = d * (float)(int8_t)g[32 + 16 * (k / 32) + r] * (float)IQ4_LEVELS[(b >> (4 * (k % 32 / 16))) & 15];
      }
      return;
    }
    case Q4_K: case Q5_K: {
      const float d = half(0), dmin = half(32);
      for (int k = 0; k < 256; ++k) {
        const int c = k / 64, i = k % 32, b = byte(q45_quants(fmt, c) + (i / 4) * 64 + i % 4), j = k / 32;
        int q = (k % 64 < 32) ? (b & 15) : (b >> 4);
        if (fmt == Q5_K) q |= ((byte(q5_bits(j) + k % 4) >> (i / 4)) & 1) << 4;
        out[k] = d * (float)g[64 + 16 * j + r] * (float)q - dmin * (float)g[192 + 16 * j + r];
      }
      return;
    }
    case Q6_K: {
      const float d = half(0);
      for (int k = 0; k < 256; ++k) {
        const int s = k / 16, p = k / 32, i = k % 16, b = byte(q6_low(p) + (i / 4) * 64 + i % 4);
        const int lo = (k % 32 < 16) ? (b & 15) : (b >> 4), hi = (byte(q6_high(s) + k % 4) >> (2 * (i / 4))) & 3;
        out[k] = d * (float)(int8_t)g[32 + 16 * s + r] * (float)((lo | (hi << 4)) - 32);
      }
      return;
    }
    case Q2_K: case Q3_K: {
      const float d = half(0);
      for (int k = 0; k < 256; ++k) {
        const int s = k / 16, lo = (byte(q23_low(fmt, s) + k % 4) >> (2 * (k % 16 / 4))) & 3;
        if (fmt == Q2_K) {
          const int sm = g[64 + 16 * s + r];
          out[k] = d * (float)(sm & 15) * (float)lo - half(32) * (float)(sm >> 4);
        } else {
          const int hi = (g[q3_bits(s) + (k % 16 / 4) * 8 + (4 * r + k % 4) / 8] >> ((4 * r + k % 4) % 8)) & 1;
          out[k] = d * (float)(int8_t)g[32 + 16 * s + r] * (float)((lo | (hi << 2)) - 4);
        }
      }
      return;
    }
  }
  TORCH_CHECK(false, "no unpacker for format ", fmt);
}
