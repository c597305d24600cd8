// The GDN layer's decode step between its projections: conv window, gating, delta rule, gated norm.
#pragma once
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <vector>

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
