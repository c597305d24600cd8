// The sparse MoE block for few tokens (router, routed and shared SwiGLU experts) in one call.
#pragma once
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <vector>
#include "matmul.h"

struct Expert { const float* gate_up; const float* down; int64_t width; };  // [2I, D] rows [gate | up], [D, I]

// y[p] = down(silu(gate) * up)(x[p / pairs_per_token]) for every pair p of every expert; one pass per product over
// (expert, block of output rows), so each weight row is read once for all of its expert's tokens.
static void swiglu_pairs(const float* x, int64_t D, const std::vector<Expert>& experts,
                         const std::vector<std::vector<int64_t>>& pairs_of, int64_t pairs_per_token,
                         float* h, int64_t h_stride, float* y) {
  struct Item { int64_t e, n0, n1; };
  auto product = [&](bool first) {
    std::vector<Item> items;
    for (int64_t e = 0; e < (int64_t)experts.size(); ++e) {
      const int64_t rows = first ? 2 * experts[e].width : D, cols = first ? D : experts[e].width;
      const int64_t block = std::max<int64_t>(16, ITEM_FLOATS / cols);  // equal bytes per item: balanced threads
      if (!pairs_of[e].empty())
        for (int64_t n = 0; n < rows; n += block) items.push_back({e, n, std::min(n + block, rows)});
    }
    at::parallel_for(0, (int64_t)items.size(), 1, [&](int64_t i0, int64_t i1) {
      std::vector<const float*> xs; std::vector<float*> ys;
      for (int64_t i = i0; i < i1; ++i) {
        const Item& it = items[i];
        const Expert& ex = experts[it.e];
        xs.clear(); ys.clear();
        for (int64_t p : pairs_of[it.e]) {
          xs.push_back(first ? x + p / pairs_per_token * D : h + p * h_stride);
          ys.push_back(first ? h + p * h_stride : y + p * D);
        }
        dot_rows(first ? ex.gate_up : ex.down, it.n0, it.n1, first ? D : ex.width, xs.data(), ys.data(),
                 (int64_t)xs.size());
      }
    });
  };
  product(true);
  for (int64_t e = 0; e < (int64_t)experts.size(); ++e)  // h[p, :I] = silu(gate) * up, in place
    for (int64_t p : pairs_of[e])
      for (int64_t i = 0, I = experts[e].width; i < I; ++i) {
        const float g = h[p * h_stride + i];
        h[p * h_stride + i] = g / (1.f + std::exp(-g)) * h[p * h_stride + I + i];
      }
  product(false);
}

// The sparse MoE block for few tokens: router softmax, top-k (renormalised if norm_topk), routed SwiGLU
// experts and the sigmoid-gated shared expert. x [R, D]; router [E, D]; gate_up [E, 2I, D]; down [E, D, I];
// shared_gate_up [2Is, D]; shared_down [D, Is]; shared_gate [1, D]. Returns [R, D].
torch::Tensor moe_block(torch::Tensor x, torch::Tensor router, torch::Tensor gate_up, torch::Tensor down,
                        torch::Tensor shared_gate_up, torch::Tensor shared_down, torch::Tensor shared_gate,
                        int64_t top_k, bool norm_topk) {
  const int64_t R = x.size(0), D = x.size(1), E = gate_up.size(0), I = down.size(2), Is = shared_down.size(1);
  const int64_t K1 = top_k + 1, P = R * K1;  // pairs per token: top_k routed, then the shared expert
  for (const auto& w : {router, gate_up, down, shared_gate_up, shared_down, shared_gate})
    TORCH_CHECK(w.is_contiguous() && w.scalar_type() == at::kFloat, "MoE weights must be contiguous float32");
  auto logits = small_linear(x, router), gate_logit = small_linear(x, shared_gate);  // [R, E], [R, 1]
  const float *lg = logits.data_ptr<float>(), *sg = gate_logit.data_ptr<float>();
  std::vector<Expert> experts;
  for (int64_t e = 0; e < E; ++e)
    experts.push_back({gate_up.data_ptr<float>() + e * 2 * I * D, down.data_ptr<float>() + e * D * I, I});
  experts.push_back({shared_gate_up.data_ptr<float>(), shared_down.data_ptr<float>(), Is});
  std::vector<std::vector<int64_t>> pairs_of(E + 1);
  std::vector<float> weight(P);
  std::vector<int64_t> order(E);
  for (int64_t t = 0; t < R; ++t) {
    const float* l = lg + t * E;
    const float mx = *std::max_element(l, l + E);
    float total = 0.f;
    for (int64_t e = 0; e < E; ++e) total += std::exp(l[e] - mx);
    for (int64_t e = 0; e < E; ++e) order[e] = e;
    std::partial_sort(order.begin(), order.begin() + top_k, order.end(),  // largest first, ties by index
                      [&](int64_t a, int64_t b) { return l[a] > l[b] || (l[a] == l[b] && a < b); });
    float picked = 0.f;
    for (int64_t j = 0; j < top_k; ++j) picked += weight[t * K1 + j] = std::exp(l[order[j]] - mx) / total;
    for (int64_t j = 0; j < K1; ++j) {
      const int64_t e = j < top_k ? order[j] : E;
      if (j < top_k && norm_topk) weight[t * K1 + j] /= picked;
      pairs_of[e].push_back(t * K1 + j);
    }
    weight[t * K1 + top_k] = 1.f / (1.f + std::exp(-sg[t]));
  }
  auto h = torch::empty({P, 2 * std::max(I, Is)}, x.options());
  auto y = torch::empty({P, D}, x.options());
  float *yp = y.data_ptr<float>();
  swiglu_pairs(x.data_ptr<float>(), D, experts, pairs_of, K1, h.data_ptr<float>(), h.size(1), yp);
  auto out = torch::zeros({R, D}, x.options());
  float* op = out.data_ptr<float>();
  for (int64_t p = 0; p < P; ++p)  // fixed order per token: routed choices, then the shared expert
    for (int64_t d = 0; d < D; ++d) op[p / K1 * D + d] += weight[p] * yp[p * D + d];
  return out;
}
