// Float32 CPU kernels for few-token steps (issue 9): small-row matmul, routed MoE experts, and the
// whole GDN decode (conv window, gating, q/k L2 norm, delta rule, gated RMS norm) in one call.
//
// Why: at decode sizes a step is bound by streaming weights and recurrent states from memory, and the
// torch route pays ~25 small ops per GDN layer and a Python loop over experts. Here each weight row and
// each state matrix is read once, by one contiguous stream per thread.
//
// Batch invariance: every (weight row, token) dot product and every (sequence, head) state update runs
// the same instructions in the same order whatever else is in the call, so a sequence's result never
// depends on the others. Shapes: R = rows (tokens), K = inputs, N = outputs, E = experts, I = expert
// width, B = sequences, S = pool slots, C = conv channels, W = conv width, H/Hk = V/QK heads.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <vector>

constexpr int64_t ITEM_FLOATS = 1 << 16;  // 256 KiB of weights: the smallest share of work worth a thread

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

// x [R, K] copied to rows 64 bytes longer: with rows a multiple of 4 KiB apart, the inputs and the weight
// row would all map to the same L1 sets and evict each other (measured 2-4x slower for 4-8 rows).
static torch::Tensor padded_rows(const torch::Tensor& x) {
  const int64_t K = x.size(1);
  auto out = torch::empty({x.size(0), K + 16}, x.options());
  out.narrow(1, 0, K).copy_(x);
  return out;
}

// x [R, K] . w [N, K]^T -> [R, N]; threads split the rows of w.
torch::Tensor small_linear(torch::Tensor x, torch::Tensor w) {
  const int64_t R = x.size(0), K = x.size(1), N = w.size(0);
  TORCH_CHECK(x.is_contiguous() && w.is_contiguous() && w.size(1) == K, "linear: contiguous x [R, K], w [N, K]");
  auto y = torch::empty({R, N}, x.options());
  const auto xp = padded_rows(x);
  std::vector<const float*> xs(R);
  std::vector<float*> ys(R);
  for (int64_t t = 0; t < R; ++t) xs[t] = xp.data_ptr<float>() + t * xp.stride(0), ys[t] = y.data_ptr<float>() + t * N;
  const float* wp = w.data_ptr<float>();
  at::parallel_for(0, N, std::max<int64_t>(1, ITEM_FLOATS / K),  // small weights: one thread, no wake-up
                   [&](int64_t n0, int64_t n1) { dot_rows(wp, n0, n1, K, xs.data(), ys.data(), R); });
  return y;
}

struct Expert { const float* gate_up; const float* down; int64_t width; };  // [2I, D] rows [gate | up], [D, I]

// y[p] = down(silu(gate) * up)(x[token_of[p]]) for every pair p of every expert; one pass per product over
// (expert, block of output rows), so each weight row is read once for all of its expert's tokens.
static void swiglu_pairs(const float* x, int64_t D, const std::vector<Expert>& experts,
                         const std::vector<std::vector<int64_t>>& pairs_of, const std::vector<int64_t>& token_of,
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
          xs.push_back(first ? x + token_of[p] * D : h + p * h_stride);
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
  std::vector<int64_t> token_of(P);
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
      token_of[t * K1 + j] = t;
      pairs_of[e].push_back(t * K1 + j);
    }
    weight[t * K1 + top_k] = 1.f / (1.f + std::exp(-sg[t]));
  }
  auto h = torch::empty({P, 2 * std::max(I, Is)}, x.options());
  auto y = torch::empty({P, D}, x.options());
  float *yp = y.data_ptr<float>();
  swiglu_pairs(x.data_ptr<float>(), D, experts, pairs_of, token_of, h.data_ptr<float>(), h.size(1), yp);
  auto out = torch::zeros({R, D}, x.options());
  float* op = out.data_ptr<float>();
  for (int64_t p = 0; p < P; ++p)  // fixed order per token: routed choices, then the shared expert
    for (int64_t d = 0; d < D; ++d) op[token_of[p] * D + d] += weight[p] * yp[p * D + d];
  return out;
}

// Zero-centred RMS norm of rows, x / rms(x) * (1 + w), after an optional residual add:
// (x + residual, norm(x + residual)). x, residual [R, D]; weight [D].
std::vector<torch::Tensor> add_rms_norm(torch::Tensor x, c10::optional<torch::Tensor> residual, torch::Tensor weight,
                                        double eps) {
  const int64_t R = x.size(0), D = x.size(1);
  auto sum = residual ? x + *residual : x;
  auto out = torch::empty_like(sum);
  const float *sp = sum.data_ptr<float>(), *w = weight.data_ptr<float>();
  float* op = out.data_ptr<float>();
  for (int64_t r = 0; r < R; ++r) {
    float ss = 0.f;
    for (int64_t d = 0; d < D; ++d) ss += sp[r * D + d] * sp[r * D + d];
    const float inv = 1.f / std::sqrt(ss / D + (float)eps);
    for (int64_t d = 0; d < D; ++d) op[r * D + d] = sp[r * D + d] * inv * (1.f + w[d]);
  }
  return {sum, out};
}

static inline float softplus(float x) { return x > 20.f ? x : std::log1p(std::exp(x)); }

// One decode token per sequence through a GDN layer's conv window, gating and delta rule, states by slot.
// mixed [B, C] pre-conv q|k|v; z [B, H*Dv]; a, b [B, H]; conv_weight [C, W]; A_log, dt_bias [H];
// norm_weight [Dv]; conv_pool [S, W-1, C]; ssm_pool [S, H, Dk, Dv]; slots [B] int64; reset [B] bool.
// Returns the gated-RMS-normed output [B, H*Dv].
torch::Tensor gdn_decode(torch::Tensor mixed, torch::Tensor z, torch::Tensor a, torch::Tensor b,
                         torch::Tensor conv_weight, torch::Tensor A_log, torch::Tensor dt_bias,
                         torch::Tensor norm_weight, double eps, torch::Tensor conv_pool, torch::Tensor ssm_pool,
                         torch::Tensor slots, torch::Tensor reset, int64_t Hk, int64_t Dk) {
  const int64_t B = mixed.size(0), C = mixed.size(1), W = conv_weight.size(1), H = a.size(1);
  const int64_t Dv = ssm_pool.size(3), kd = Hk * Dk, rep = H / Hk;
  TORCH_CHECK(conv_pool.is_contiguous() && ssm_pool.is_contiguous(), "state pools must be contiguous");
  TORCH_CHECK(conv_weight.is_contiguous() && A_log.is_contiguous() && dt_bias.is_contiguous() &&
              norm_weight.is_contiguous(), "layer parameters must be contiguous");
  const int64_t* sl = slots.data_ptr<int64_t>();
  const bool* rs = reset.data_ptr<bool>();
  for (int64_t i = 0; i < B; ++i)
    TORCH_CHECK(sl[i] >= 0 && sl[i] < ssm_pool.size(0), "slot ", sl[i], " out of range");
  auto conv = torch::empty({B, C}, mixed.options());  // q (normed, scaled) | k (normed) | v
  const float *mx = mixed.data_ptr<float>(), *cw = conv_weight.data_ptr<float>();
  float *cv = conv.data_ptr<float>(), *cpool = conv_pool.data_ptr<float>();
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t s = b0; s < b1; ++s) {
      float* win = cpool + sl[s] * (W - 1) * C;  // [W-1, C], oldest first
      if (rs[s]) std::fill(win, win + (W - 1) * C, 0.f);
      const float* x = mx + s * C;
      float* o = cv + s * C;
      for (int64_t c = 0; c < C; ++c) {
        float acc = cw[c * W + W - 1] * x[c];
        for (int64_t j = 0; j < W - 1; ++j) acc += cw[c * W + j] * win[j * C + c];
        o[c] = acc / (1.f + std::exp(-acc));
      }
      for (int64_t j = 0; j + 1 < W - 1; ++j) std::copy(win + (j + 1) * C, win + (j + 2) * C, win + j * C);
      std::copy(x, x + C, win + (W - 2) * C);
      for (int64_t hh = 0; hh < 2 * Hk; ++hh) {  // L2 norm of each q and k head; q also scaled by Dk^-1/2
        float* v = o + hh * Dk;
        float ss = 0.f;
        for (int64_t i = 0; i < Dk; ++i) ss += v[i] * v[i];
        const float scale = 1.f / std::sqrt(ss + 1e-6f) * (hh < Hk ? 1.f / std::sqrt((float)Dk) : 1.f);
        for (int64_t i = 0; i < Dk; ++i) v[i] *= scale;
      }
    }
  });
  auto out = torch::empty({B, H * Dv}, mixed.options());
  const float *ap = a.data_ptr<float>(), *bp = b.data_ptr<float>(), *al = A_log.data_ptr<float>();
  const float *dt = dt_bias.data_ptr<float>(), *zp = z.data_ptr<float>(), *nw = norm_weight.data_ptr<float>();
  float *op = out.data_ptr<float>(), *pool = ssm_pool.data_ptr<float>();
  at::parallel_for(0, B * H, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> qs(Dv), ks(Dv), u(Dv);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t s = i / H, h = i % H;
      const float* q = cv + s * C + (h / rep) * Dk;
      const float* k = q + kd;
      const float* v = cv + s * C + 2 * kd + h * Dv;
      float* S = pool + (sl[s] * H + h) * Dk * Dv;  // [Dk, Dv]
      const float decay = rs[s] ? 0.f : std::exp(-std::exp(al[h]) * softplus(ap[s * H + h] + dt[h]));
      const float beta = 1.f / (1.f + std::exp(-bp[s * H + h]));
      if (rs[s]) std::fill(S, S + Dk * Dv, 0.f);
      std::fill(qs.begin(), qs.end(), 0.f);
      std::fill(ks.begin(), ks.end(), 0.f);
      float qk = 0.f;
      for (int64_t r = 0; r < Dk; ++r) {  // q.(gS) and k.(gS) in one pass
        const float* row = S + r * Dv;
        for (int64_t j = 0; j < Dv; ++j) {
          const float x = row[j] * decay;
          qs[j] += q[r] * x;
          ks[j] += k[r] * x;
        }
        qk += q[r] * k[r];
      }
      for (int64_t j = 0; j < Dv; ++j) u[j] = beta * (v[j] - ks[j]);
      for (int64_t r = 0; r < Dk; ++r) {  // S' = gS + k u^T, in place
        float* row = S + r * Dv;
        for (int64_t j = 0; j < Dv; ++j) row[j] = row[j] * decay + k[r] * u[j];
      }
      float* o = op + s * H * Dv + h * Dv;  // o = q.S' = q.(gS) + (q.k) u, then the gated RMS norm
      float ss = 0.f;
      for (int64_t j = 0; j < Dv; ++j) o[j] = qs[j] + qk * u[j], ss += o[j] * o[j];
      const float inv = 1.f / std::sqrt(ss / Dv + (float)eps);
      const float* zz = zp + s * H * Dv + h * Dv;
      for (int64_t j = 0; j < Dv; ++j) o[j] = nw[j] * (o[j] * inv) * (zz[j] / (1.f + std::exp(-zz[j])));
    }
  });
  return out;
}

// In place on one head row x [D]: zero-centred RMS norm, then rotary (rotate-half) on its first r dims.
static void norm_rotary(float* x, int64_t D, const float* w, float eps, int64_t r, const float* cs, const float* sn) {
  float ss = 0.f;
  for (int64_t d = 0; d < D; ++d) ss += x[d] * x[d];
  const float inv = 1.f / std::sqrt(ss / D + eps);
  for (int64_t d = 0; d < D; ++d) x[d] = x[d] * inv * (1.f + w[d]);
  for (int64_t i = 0, half = r / 2; i < half; ++i) {
    const float a = x[i], b = x[i + half];
    x[i] = a * cs[i] - b * sn[i];
    x[i + half] = b * cs[i] + a * sn[i];
  }
}

// One decode token per sequence through a gated attention layer between its projections: q/k RMS norm,
// partial rotary, K/V written at (slot, position), softmax attention over the slot's positions 0..position,
// output times sigmoid(gate). qg [B, H*2D] rows per head [q | gate]; k, v [B, G*D]; caches [S, M, G, D];
// slots, positions [B] int64. Returns [B, H*D].
torch::Tensor attention_decode(torch::Tensor qg, torch::Tensor k, torch::Tensor v, torch::Tensor q_norm,
                               torch::Tensor k_norm, double eps, int64_t rotary_dim, double theta,
                               torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor slots,
                               torch::Tensor positions, double scale) {
  const int64_t B = qg.size(0), S = k_cache.size(0), M = k_cache.size(1), G = k_cache.size(2), D = k_cache.size(3);
  const int64_t H = qg.size(1) / (2 * D), half = rotary_dim / 2;
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "KV caches must be contiguous");
  const int64_t *sl = slots.data_ptr<int64_t>(), *pos = positions.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(sl[b] >= 0 && sl[b] < S && pos[b] >= 0 && pos[b] < M, "slot ", sl[b], " / position ", pos[b],
                " outside the KV cache");
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
      float* kr = kc + ((sl[b] * M + pos[b]) * G + g) * D;
      std::copy(kp + (b * G + g) * D, kp + (b * G + g + 1) * D, kr);
      norm_rotary(kr, D, k_norm.data_ptr<float>(), (float)eps, rotary_dim, &cs[b * half], &sn[b * half]);
      std::copy(vp + (b * G + g) * D, vp + (b * G + g + 1) * D, vc + ((sl[b] * M + pos[b]) * G + g) * D);
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
      for (int64_t j = 0; j < n; ++j) {
        const float* kr = kc + ((sl[b] * M + j) * G + g) * D;
        float dot = 0.f;
        for (int64_t d = 0; d < D; ++d) dot += q[d] * kr[d];
        p[j] = dot * (float)scale, mx = std::max(mx, p[j]);
      }
      for (int64_t j = 0; j < n; ++j) total += p[j] = std::exp(p[j] - mx);
      float* o = op + b * H * D + h * D;
      std::fill(o, o + D, 0.f);
      for (int64_t j = 0; j < n; ++j) {
        const float* vr = vc + ((sl[b] * M + j) * G + g) * D;
        for (int64_t d = 0; d < D; ++d) o[d] += p[j] * vr[d];
      }
      for (int64_t d = 0; d < D; ++d) o[d] = o[d] / total / (1.f + std::exp(-row[D + d]));
    }
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("linear", &small_linear);
  m.def("moe_block", &moe_block);
  m.def("add_rms_norm", &add_rms_norm);
  m.def("gdn_decode", &gdn_decode);
  m.def("attention_decode", &attention_decode);
}
