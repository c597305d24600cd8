// Few-row float32 matmul on row-major weights: one contiguous stream of weight rows per thread.
#pragma once
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <vector>

constexpr int64_t ITEM_FLOATS = 1 << 16;  // 256 KiB of weights: the smallest share of work worth a thread
// Software prefetch of the weight stream this far ahead, into L2 (prefetcht2). On the 2-core EPYC VM it read a
// step's matrices 17-23% faster in minutes when plain streaming was slow (21.8 -> 26.8 GB/s), and made no
// difference when it was fast (~29 GB/s); prefetchnta gained nothing, the L1-targeted prefetch measured slower.
constexpr int64_t PREFETCH_FLOATS = 2048;

typedef float vf __attribute__((vector_size(64)));  // 16 float lanes; GCC lowers to the target's SIMD

static inline vf load(const float* p) { vf v; __builtin_memcpy(&v, p, sizeof(vf)); return v; }
static inline float lane_sum(vf v) {  // fixed order, so results are reproducible
  float s = 0.f;
  for (int l = 0; l < 16; ++l) s += v[l];
  return s;
}

// y[t * ystride] = w . xs[t] for t < RT: one weight row [K] against RT inputs, 4 accumulators over k.
template <int RT>
static inline void dot_row(const float* w, const float* const* xs, int64_t K, float* y, int64_t ystride) {
  vf acc[RT][4] = {};
  int64_t k = 0;
  for (; k + 64 <= K; k += 64) {
    for (int l = 0; l < 64; l += 16) __builtin_prefetch(w + k + PREFETCH_FLOATS + l, 0, 1);  // into L2
    const vf w0 = load(w + k), w1 = load(w + k + 16), w2 = load(w + k + 32), w3 = load(w + k + 48);
    for (int t = 0; t < RT; ++t) {
      const float* x = xs[t] + k;
      acc[t][0] += w0 * load(x); acc[t][1] += w1 * load(x + 16);
      acc[t][2] += w2 * load(x + 32); acc[t][3] += w3 * load(x + 48);
    }
  }
  for (int u = 0; k + 16 <= K; k += 16, ++u) {
    const vf wv = load(w + k);
    for (int t = 0; t < RT; ++t) acc[t][u] += wv * load(xs[t] + k);
  }
  for (int t = 0; t < RT; ++t) {
    float s = lane_sum((acc[t][0] + acc[t][1]) + (acc[t][2] + acc[t][3]));
    for (int64_t j = k; j < K; ++j) s += w[j] * xs[t][j];
    y[t * ystride] = s;
  }
}

// ys[t][n] = w[n] . xs[t] for rows n in [n0, n1) and all R inputs, 4 inputs per pass over a row.
static void dot_rows(const float* w, int64_t n0, int64_t n1, int64_t K, const float* const* xs, float* const* ys,
                     int64_t R) {
  for (int64_t n = n0; n < n1; ++n) {
    const float* row = w + n * K;
    int64_t t = 0;
    for (; t + 4 <= R; t += 4) {
      float tmp[4];
      dot_row<4>(row, xs + t, K, tmp, 1);
      for (int i = 0; i < 4; ++i) ys[t + i][n] = tmp[i];
    }
    for (; t < R; ++t) dot_row<1>(row, xs + t, K, ys[t] + n, 1);
  }
}

// x [R, K] . w [N, K]^T -> [R, N]; threads split the rows of w.
torch::Tensor small_linear(torch::Tensor x, torch::Tensor w) {
  const int64_t R = x.size(0), K = x.size(1), N = w.size(0);
  TORCH_CHECK(x.is_contiguous() && w.is_contiguous() && w.size(1) == K, "linear: contiguous x [R, K], w [N, K]");
  auto y = torch::empty({R, N}, x.options());
  std::vector<const float*> xs(R);
  std::vector<float*> ys(R);
  for (int64_t t = 0; t < R; ++t) xs[t] = x.data_ptr<float>() + t * K, ys[t] = y.data_ptr<float>() + t * N;
  const float* wp = w.data_ptr<float>();
  at::parallel_for(0, N, std::max<int64_t>(1, ITEM_FLOATS / K),  // small weights: one thread, no wake-up
                   [&](int64_t n0, int64_t n1) { dot_rows(wp, n0, n1, K, xs.data(), ys.data(), R); });
  return y;
}
