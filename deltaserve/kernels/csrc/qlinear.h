// y = x W^T on packed weights (packed.h), for any number of activation rows: decode (1-8) and prefill alike.
//
// Integer formats multiply int8 activations: each row is quantized on the fly in blocks of 32 (d = max|x| / 127,
// q = round-half-even(x * 127 / max|x|), plus sums of q over 16), from that row alone. A block's dot product is
// exact in int32 (vpdpbusd with VNNI); the weight's quants are stored unsigned, so its zero point (128 for Q8_0,
// 8 for Q4_0, 32 for Q6_K) comes off as zero point x sum(q); per (sub-)block the int32 result is scaled in float
// and added to the row's accumulator. Float formats (F32, F16, BF16) multiply the float activations exactly.
//
// A tile is one group of 16 weight rows (one vector of 16 lanes) against RT activation rows. Every activation
// row goes through the same instructions in the same order whatever RT is and whatever rows share the tile, so
// a row's output is bit-identical alone or in any batch; threads split groups, never a dot product.
// T = activation rows, K = inputs, N = outputs (weight rows).
#pragma once
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <vector>
#include "packed.h"
#include "simd.h"
#include "tiles.h"

static inline i32x16 round_to_int(f32x16 v) {  // nearest, ties to even (the default rounding mode)
#if defined(__AVX512F__)
  return (i32x16)_mm512_cvtps_epi32((__m512)v);
#else
  i32x16 r;
  for (int l = 0; l < 16; ++l) r[l] = (int32_t)std::nearbyint(v[l]);
  return r;
#endif
}

// x [K] (K a multiple of 32) -> q, d, s as described above, and sd = s times its block's d (ActRow)
static void quantize_row(const float* x, int64_t K, int8_t* q, float* d, int32_t* s, float* sd) {
  for (int64_t b = 0; b < K / 32; ++b) {
    const f32x16 lo = loadv<f32x16>(x + 32 * b), hi = loadv<f32x16>(x + 32 * b + 16);
    float amax = 0.f;
    for (int l = 0; l < 16; ++l) amax = std::max(amax, std::max(std::fabs(lo[l]), std::fabs(hi[l])));
    d[b] = amax / 127.f;
    const float inv = amax > 0.f ? 127.f / amax : 0.f;
    const i32x16 a = round_to_int(lo * inv), c = round_to_int(hi * inv);
    int32_t sa = 0, sc = 0;
    for (int l = 0; l < 16; ++l) q[32 * b + l] = (int8_t)a[l], q[32 * b + 16 + l] = (int8_t)c[l], sa += a[l], sc += c[l];
    s[2 * b] = sa, s[2 * b + 1] = sc, sd[2 * b] = d[b] * (float)sa, sd[2 * b + 1] = d[b] * (float)sc;
  }
}

// Activation rows prepared for one weight: float rows in its column order, int8 rows if it has integer segments.
struct Acts {
  std::vector<ActRow> rows;
  std::vector<float> xf;
  std::vector<int8_t> q;
  std::vector<float> d;
  std::vector<int32_t> s;
  std::vector<float> sd;

  Acts(const float* const* xs, int64_t T, int64_t K, const PackedWeight& w) : rows(T) {
    const bool perm = w.col_perm.has_value(), integer = w.needs(true);
    TORCH_CHECK(!integer || K % 32 == 0, "integer weight formats need K % 32 == 0");
    if (perm) xf.resize(T * K);
    if (integer) q.resize(T * K), d.resize(T * K / 32), s.resize(T * K / 16), sd.resize(T * K / 16);
    const int64_t* pp = perm ? w.col_perm->data_ptr<int64_t>() : nullptr;
    at::parallel_for(0, T, 16, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const float* x = xs[t];
        if (perm) {
          for (int64_t j = 0; j < K; ++j) xf[t * K + pp[j]] = x[j];  // stored column pp[j] meets model column j
          x = &xf[t * K];
        }
        rows[t] = {x, nullptr, nullptr, nullptr, nullptr};
        if (integer) {
          quantize_row(x, K, &q[t * K], &d[t * K / 32], &s[t * K / 16], &sd[t * K / 16]);
          rows[t] = {x, &q[t * K], &d[t * K / 32], &s[t * K / 16], &sd[t * K / 16]};
        }
      }
    });
  }
};

// ---- driver ----

// Rows [t0, t0 + rt) against ng groups of seg starting at its local group `local` -> ys.
template <int RT, int NG>
static void run_tile(const Segment& seg, const uint8_t* g, int64_t local, int64_t K, const ActRow* rows,
                     float* const* ys, int64_t t0) {
  f32x16 acc[NG * RT];
  if (NG == 1) tile<RT>(seg.fmt, g, K, rows + t0, acc);
  else tile_floats<RT, NG>(seg.fmt, g, seg.group_bytes, K, rows + t0, acc);
  for (int n = 0; n < NG; ++n) {
    const int64_t first = (local + n) * GROUP, valid = std::min<int64_t>(GROUP, seg.rows - first);
    for (int t = 0; t < RT; ++t) std::memcpy(ys[t0 + t] + seg.row0 + first, &acc[n * RT + t], valid * sizeof(float));
  }
}

// All T rows against NG groups: tiles of RT_MAX rows, the rest in tiles of 4, 2 and 1.
template <int NG, int RT_MAX>
static void run_rows(const Segment& seg, const uint8_t* g, int64_t local, int64_t K, const ActRow* rows, int64_t T,
                     float* const* ys) {
  for (int64_t t0 = 0; t0 < T;) {
    const int64_t left = T - t0;
    const int64_t rt = left >= RT_MAX ? RT_MAX : left >= 4 ? 4 : left >= 2 ? 2 : 1;
    if (rt == RT_MAX) run_tile<RT_MAX, NG>(seg, g, local, K, rows, ys, t0);
    else if (rt == 4) run_tile<4, NG>(seg, g, local, K, rows, ys, t0);
    else if (rt == 2) run_tile<2, NG>(seg, g, local, K, rows, ys, t0);
    else run_tile<1, NG>(seg, g, local, K, rows, ys, t0);
    t0 += rt;
  }
}

// ys[t][n] = W_e[n] . row t for the weight rows of global groups [g0, g1) (groups numbered across segments).
// Float formats take two groups at a time (12 accumulators for 6 rows: FMA-bound rather than load-bound).
static void linear_groups(const PackedWeight& w, int64_t e, const ActRow* rows, int64_t T, float* const* ys,
                          int64_t g0, int64_t g1) {
  int64_t first = 0;  // global number of the segment's first group
  for (const auto& seg : w.segments) {
    const int64_t lo = std::max(g0, first), hi = std::min(g1, first + seg.groups);
    const uint8_t* base = seg.data.data_ptr<uint8_t>() + e * seg.groups * seg.group_bytes;
    const bool floats = !fmt_info(seg.fmt).integer;
    for (int64_t gi = lo; gi < hi;) {
      const int64_t local = gi - first;
      const bool pair = floats && gi + 1 < hi;
      if (pair) run_rows<2, 6>(seg, base + local * seg.group_bytes, local, w.k, rows, T, ys);
      else run_rows<1, 8>(seg, base + local * seg.group_bytes, local, w.k, rows, T, ys);
      gi += pair ? 2 : 1;
    }
    first += seg.groups;
  }
}

// Groups per parallel work item: ~256 KiB of weights, fewer when many rows make each group expensive.
static int64_t group_grain(const PackedWeight& w, int64_t T) {
  const int64_t bytes = std::max<int64_t>(1, w.nbytes() / std::max<int64_t>(1, w.groups() * w.experts));
  return std::max<int64_t>(1, (int64_t(1) << 18) / (bytes * std::max<int64_t>(1, T / 2)));
}

// x [T, K] float32 . W^T -> [T, N] (W: one matrix, expert 0)
torch::Tensor packed_linear(torch::Tensor x, const PackedWeight& w) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.size(1) == w.k, "linear: x must be float32 [T, ",
              w.k, "], got ", x.sizes());
  x = x.contiguous();
  const int64_t T = x.size(0);
  auto y = torch::empty({T, w.n}, x.options());
  std::vector<const float*> xs(T);
  std::vector<float*> ys(T);
  for (int64_t t = 0; t < T; ++t) xs[t] = x.data_ptr<float>() + t * w.k, ys[t] = y.data_ptr<float>() + t * w.n;
  const Acts acts(xs.data(), T, w.k, w);
  at::parallel_for(0, w.groups(), group_grain(w, T),
                   [&](int64_t g0, int64_t g1) { linear_groups(w, 0, acts.rows.data(), T, ys.data(), g0, g1); });
  return y;
}
