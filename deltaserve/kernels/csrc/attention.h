// The gated attention layer's decode step between its projections, over the paged KV cache.
#pragma once
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <vector>
#include "norm.h"
#include "simd.h"

// One decode token per sequence through a gated attention layer between its projections: q/k RMS norm,
// partial rotary, K/V written at (slot, position), softmax attention over the slot's positions 0..position,
// output times sigmoid(gate). qg [B, H*2D] rows per head [q | gate]; k, v [B, G*D]; caches [NB, BS, G, D] (blocks
// of BS positions); block_table [S, MB] int32 (block j of slot s holds positions j*BS ..); slots, positions [B]
// int64. Returns [B, H*D].
torch::Tensor attention_decode(torch::Tensor qg, torch::Tensor k, torch::Tensor v, torch::Tensor q_norm,
                               torch::Tensor k_norm, double eps, int64_t rotary_dim, double theta,
                               torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor block_table,
                               torch::Tensor slots, torch::Tensor positions, double scale) {
  const int64_t B = qg.size(0), BS = k_cache.size(1), G = k_cache.size(2), D = k_cache.size(3);
  const int64_t S = block_table.size(0), MB = block_table.size(1), H = qg.size(1) / (2 * D), half = rotary_dim / 2;
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "KV caches must be contiguous");
  TORCH_CHECK(block_table.is_contiguous() && block_table.scalar_type() == torch::kInt32, "block table: int32");
  const int64_t *sl = slots.data_ptr<int64_t>(), *pos = positions.data_ptr<int64_t>();
  const int32_t* tbl = block_table.data_ptr<int32_t>();
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(sl[b] >= 0 && sl[b] < S && pos[b] >= 0 && pos[b] < MB * BS, "slot ", sl[b], " / position ",
                pos[b], " outside the KV cache");
  auto cache_row = [&](int64_t b, int64_t p) { return (int64_t)tbl[sl[b] * MB + p / BS] * BS + p % BS; };
  std::vector<float> cs(B * half), sn(B * half);  // rotary angles per token, as torch computes them in float
  for (int64_t b = 0; b < B; ++b)
    for (int64_t i = 0; i < half; ++i) {
      const float inv_freq = 1.f / std::pow((float)theta, (float)(2 * i) / (float)rotary_dim);
      const float f = (float)pos[b] * inv_freq;
      cs[b * half + i] = std::cos(f), sn[b * half + i] = std::sin(f);
    }
  float *kc = k_cache.data_ptr<float>(), *vc = v_cache.data_ptr<float>();
  const float *kp = k.data_ptr<float>(), *vp = v.data_ptr<float>(), *qp = qg.data_ptr<float>();
  for (int64_t b = 0; b < B; ++b)  // write this token's K (normed, rotated) and V
    for (int64_t g = 0; g < G; ++g) {
      float* kr = kc + (cache_row(b, pos[b]) * G + g) * D;
      std::copy(kp + (b * G + g) * D, kp + (b * G + g + 1) * D, kr);
      norm_rotary(kr, D, k_norm.data_ptr<float>(), (float)eps, rotary_dim, &cs[b * half], &sn[b * half]);
      std::copy(vp + (b * G + g) * D, vp + (b * G + g + 1) * D, vc + (cache_row(b, pos[b]) * G + g) * D);
    }
  auto out = torch::empty({B, H * D}, qg.options());
  float* op = out.data_ptr<float>();
  at::parallel_for(0, B * H, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> q(D), p;
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / H, h = i % H, g = h / (H / G), n = pos[b] + 1;
      const float* row = qp + b * H * 2 * D + h * 2 * D;  // [q | gate]
      std::copy(row, row + D, q.begin());
      norm_rotary(q.data(), D, q_norm.data_ptr<float>(), (float)eps, rotary_dim, &cs[b * half], &sn[b * half]);
      p.resize(n);
      float mx = -INFINITY, total = 0.f;
      const float* qd = q.data();
      for (int64_t j = 0; j < n; ++j) {  // q . k_j with a SIMD dot (a scalar float sum won't vectorize)
        p[j] = dot_f32(kc + (cache_row(b, j) * G + g) * D, qd, D) * (float)scale;
        mx = std::max(mx, p[j]);
      }
      for (int64_t j = 0; j < n; ++j) total += p[j] = std::exp(p[j] - mx);
      float* o = op + b * H * D + h * D;
      std::fill(o, o + D, 0.f);
      for (int64_t j = 0; j < n; ++j) {
        const float* vr = vc + (cache_row(b, j) * G + g) * D;
        for (int64_t d = 0; d < D; ++d) o[d] += p[j] * vr[d];
      }
      for (int64_t d = 0; d < D; ++d) o[d] = o[d] / total / (1.f + std::exp(-row[D + d]));
    }
  });
  return out;
}
