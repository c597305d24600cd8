// The sparse MoE block (router, routed and shared SwiGLU experts) for any number of tokens, in one call.
#pragma once
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <atomic>
#include <cmath>
#include <vector>
#include "packed.h"
#include "qlinear.h"

// One product over every expert hit: ys[p] = W_e . rows[p] for the pairs p of each expert e (w: the routed stack,
// experts 0..E-1; shared: the shared expert, index E). Work items are (expert, block of weight groups), so each
// weight row is read once per step for all tokens routed to its expert. Items cost in proportion to their rows
// (the shared expert's: every token), so threads take them one at a time from a shared counter, costliest first:
// a static split by count left one thread with the shared expert's and a third more work (prefill of 2044 tokens).
// Each item writes its own outputs: which thread runs it changes no result.
static void expert_product(const PackedWeight& w, const PackedWeight& shared, const std::vector<std::vector<int64_t>>& pairs_of,
                           const std::vector<ActRow>& rows, const std::vector<float*>& ys) {
  struct Item { int64_t e, g0, g1, cost; };
  std::vector<Item> items;
  std::vector<std::vector<ActRow>> rows_of(pairs_of.size());
  std::vector<std::vector<float*>> ys_of(pairs_of.size());
  for (int64_t e = 0; e < (int64_t)pairs_of.size(); ++e) {
    const auto& pairs = pairs_of[e];
    if (pairs.empty()) continue;
    for (int64_t p : pairs) rows_of[e].push_back(rows[p]), ys_of[e].push_back(ys[p]);
    const PackedWeight& m = e < w.experts ? w : shared;
    const int64_t grain = group_grain(m, (int64_t)pairs.size()), G = m.groups();
    for (int64_t g = 0; g < G; g += grain)
      items.push_back({e, g, std::min(g + grain, G), (std::min(g + grain, G) - g) * m.k * (int64_t)pairs.size()});
  }
  std::stable_sort(items.begin(), items.end(), [](const Item& a, const Item& b) { return a.cost > b.cost; });
  std::atomic<int64_t> next{0};
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
    for (int64_t i; (i = next.fetch_add(1)) < (int64_t)items.size();) {
      const Item& it = items[i];
      const bool routed = it.e < w.experts;
      linear_groups(routed ? w : shared, routed ? it.e : 0, rows_of[it.e].data(), (int64_t)rows_of[it.e].size(),
                    ys_of[it.e].data(), it.g0, it.g1);
    }
  });
}

// The sparse MoE block: router softmax, top-k (renormalised if norm_topk), routed SwiGLU experts and the
// sigmoid-gated shared expert. x [T, D]; router [E, D]; gate_up [E][2I, D] rows [gate | up]; down [E][D, I];
// shared_gate_up [2Is, D]; shared_down [D, Is]; shared_gate [1, D]. Returns [T, D]. A token's result is summed in
// a fixed order (its routed choices by rank, then the shared expert), never depending on the other tokens.
torch::Tensor moe_block(torch::Tensor x, const PackedWeight& router, const PackedWeight& gate_up,
                        const PackedWeight& down, const PackedWeight& shared_gate_up, const PackedWeight& shared_down,
                        const PackedWeight& shared_gate, int64_t top_k, bool norm_topk) {
  x = x.contiguous();
  const int64_t T = x.size(0), D = x.size(1), E = gate_up.experts, I = down.k, Is = shared_down.k;
  const int64_t K1 = top_k + 1, P = T * K1;  // pairs per token: top_k routed, then the shared expert
  auto logits = packed_linear(x, router), gate_logit = packed_linear(x, shared_gate);  // [T, E], [T, 1]
  const float *lg = logits.data_ptr<float>(), *sg = gate_logit.data_ptr<float>();
  std::vector<std::vector<int64_t>> pairs_of(E + 1);
  std::vector<float> weight(P);
  std::vector<int64_t> order(E);
  for (int64_t t = 0; t < T; ++t) {
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
  // first product: [gate | up] of each pair from its token's row
  const int64_t H = 2 * std::max(I, Is);
  auto h = torch::empty({P, H}, x.options()), y = torch::empty({P, D}, x.options());
  float *hp = h.data_ptr<float>(), *yp = y.data_ptr<float>();
  std::vector<const float*> xs(T);
  for (int64_t t = 0; t < T; ++t) xs[t] = x.data_ptr<float>() + t * D;
  const Acts routed_x(xs.data(), T, D, gate_up), shared_x(xs.data(), T, D, shared_gate_up);
  std::vector<ActRow> rows(P);
  std::vector<float*> hs(P), outs(P);
  for (int64_t p = 0; p < P; ++p)
    rows[p] = (p % K1 < top_k ? routed_x : shared_x).rows[p / K1], hs[p] = hp + p * H, outs[p] = yp + p * D;
  expert_product(gate_up, shared_gate_up, pairs_of, rows, hs);
  std::vector<const float*> h_rows(P);
  at::parallel_for(0, P, 64, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {  // h[p, :width] = silu(gate) * up, in place
      const int64_t width = p % K1 < top_k ? I : Is;
      float* r = hp + p * H;
      for (int64_t i = 0; i < width; ++i) r[i] = r[i] / (1.f + std::exp(-r[i])) * r[width + i];
      h_rows[p] = r;
    }
  });
  // second product: down of each pair
  std::vector<const float*> routed_h, shared_h;
  for (int64_t p = 0; p < P; ++p) (p % K1 < top_k ? routed_h : shared_h).push_back(h_rows[p]);
  const Acts routed_a(routed_h.data(), (int64_t)routed_h.size(), I, down);
  const Acts shared_a(shared_h.data(), (int64_t)shared_h.size(), Is, shared_down);
  for (int64_t p = 0; p < P; ++p)
    rows[p] = p % K1 < top_k ? routed_a.rows[p / K1 * top_k + p % K1] : shared_a.rows[p / K1];
  expert_product(down, shared_down, pairs_of, rows, outs);
  auto out = torch::zeros({T, D}, x.options());
  float* op = out.data_ptr<float>();
  at::parallel_for(0, T, 16, [&](int64_t t0, int64_t t1) {
    for (int64_t p = t0 * K1; p < t1 * K1; ++p)  // fixed order per token: routed choices, then the shared expert
      for (int64_t d = 0; d < D; ++d) op[p / K1 * D + d] += weight[p] * yp[p * D + d];
  });
  return out;
}
