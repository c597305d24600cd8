// The sampler's passes over whole logits rows (sampling/sampler.py, CPU): R rows of V logits, x = logits /
// temperature computed on the fly and never stored. The torch route makes ~6 [R, V] temporaries per step, each a
// fresh allocation that page-faults in (3 ms per [8, 151936] pass here); these keep one reused weight buffer per
// thread. Rows run in parallel, each row by one thread in a fixed order: a row's result depends on that row alone.
#pragma once
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <vector>
#include "simd.h"

// e^x per lane (x <= 0; 0 below -87.3): Cephes' range reduction and degree-6 polynomial, ~1 ulp, from +, *
// and fma only, so every ISA computes the same bits
static inline f32x16 exp16(f32x16 x) {
  const f32x16 low = splat(-87.3f);
  const i32x16 under = x < low;
  x = under ? low : x;
  const f32x16 n = (x * 1.44269504088896341f + 12582912.f) - 12582912.f;  // round(x / ln 2)
  f32x16 r = fma16(n, splat(-0.693359375f), x);  // x - n ln 2 in two steps
  r = fma16(n, splat(2.12194440e-4f), r);
  f32x16 p = splat(1.9875691500e-4f);
  p = fma16(p, r, splat(1.3981999507e-3f));
  p = fma16(p, r, splat(8.3334519073e-3f));
  p = fma16(p, r, splat(4.1665795894e-2f));
  p = fma16(p, r, splat(1.6666665459e-1f));
  p = fma16(p, r, splat(5.0000001201e-1f));
  p = fma16(p * r, r, r) + 1.f;  // 1 + r + r^2 p(r)
  const f32x16 scale = (f32x16)((__builtin_convertvector(n, i32x16) + 127) << 23);  // 2^n
  return under ? splat(0.f) : p * scale;
}

static inline float hmax(f32x16 v) {
  float m = v[0];
  for (int l = 1; l < 16; ++l) m = std::max(m, v[l]);
  return m;
}

static inline float hsum(f32x16 v) {  // fixed order
  float s = 0.f;
  for (int l = 0; l < 16; ++l) s += v[l];
  return s;
}

static inline f32x16 vmax(f32x16 a, f32x16 b) { return a > b ? a : b; }

constexpr int64_t BLOCK = 64;  // values per block: 4 vectors

// Block sums of w_j = exp(x_j - top) for x_j >= floor (else 0) over a row; w written to `w` [V]. The row's
// total is the sum of the block sums in order.
static void row_weights(const float* l, float t, float top, float floor, int64_t V, float* w, std::vector<float>& bs) {
  const int64_t nb = (V + BLOCK - 1) / BLOCK;
  bs.assign(nb, 0.f);
  for (int64_t b = 0; b < nb; ++b) {
    const int64_t k0 = b * BLOCK;
    if (k0 + BLOCK <= V) {
      f32x16 acc = {};
      for (int u = 0; u < 4; ++u) {
        const f32x16 x = loadv<f32x16>(l + k0 + 16 * u) / t;
        const f32x16 e = exp16(x - top);
        const f32x16 v = x >= floor ? e : splat(0.f);
        storev(w + k0 + 16 * u, v);
        acc += v;
      }
      bs[b] = hsum(acc);
    } else {
      float s = 0.f;
      for (int64_t k = k0; k < V; ++k) {
        const float x = l[k] / t;
        f32x16 e = exp16(splat(x - top));
        w[k] = x >= floor ? e[0] : 0.f;
        s += w[k];
      }
      bs[b] = s;
    }
  }
}

static float row_max(const float* l, float t, int64_t V) {  // max of l / t; t = 1: no division
  f32x16 m = splat(-std::numeric_limits<float>::infinity());
  int64_t k = 0;
  if (t == 1.f)
    for (; k + 16 <= V; k += 16) m = vmax(m, loadv<f32x16>(l + k));
  else
    for (; k + 16 <= V; k += 16) m = vmax(m, loadv<f32x16>(l + k) / t);
  float top = hmax(m);
  for (; k < V; ++k) top = std::max(top, l[k] / t);
  return top;
}

// A row's weights exp(x - max x) over x >= floor into w [V] and their block sums into bs; returns their total
// (the block sums added in order).
static float weigh_row(const float* l, float t, float floor, int64_t V, std::vector<float>& w, std::vector<float>& bs) {
  w.resize(V);
  row_weights(l, t, row_max(l, t, V), floor, V, w.data(), bs);
  float total = 0.f;
  for (float s : bs) total += s;
  return total;
}

// Per row: the index of its largest logit, the first of equal ones ([R] int64, as torch.argmax): the maximum in
// one vector pass, then its first position.
torch::Tensor sample_argmax(torch::Tensor logits) {
  const int64_t R = logits.size(0), V = logits.size(1);
  auto out = torch::empty({R}, logits.options().dtype(torch::kLong));
  const float* lp = logits.data_ptr<float>();
  int64_t* op = out.data_ptr<int64_t>();
  at::parallel_for(0, R, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* l = lp + r * V;
      const float top = row_max(l, 1.f, V);
      int64_t k = 0;
      while (k < V - 1 && !(l[k] == top)) ++k;
      op[r] = k;
    }
  });
  return out;
}

// The `width` largest x of each row, descending: [R, width]. Candidates above a threshold gather in a buffer;
// when it holds 2 width, the best width stay and the threshold rises to the least of them (blocks whose maximum
// does not beat it are skipped whole). Values only: which of equal values is kept does not matter.
torch::Tensor sample_top(torch::Tensor logits, torch::Tensor temperature, int64_t width) {
  const int64_t R = logits.size(0), V = logits.size(1);
  TORCH_CHECK(width >= 1 && width <= V, "width must be in 1..", V, ", got ", width);
  auto out = torch::empty({R, width}, logits.options());
  const float *lp = logits.data_ptr<float>(), *tp = temperature.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, R, 1, [&](int64_t r0, int64_t r1) {
    std::vector<float> keep;
    for (int64_t r = r0; r < r1; ++r) {
      const float* l = lp + r * V;
      const float t = tp[r];
      float thr = -std::numeric_limits<float>::infinity();
      keep.clear();
      auto best = [&]() {  // keep the width largest; the threshold becomes the least of them
        std::nth_element(keep.begin(), keep.begin() + (width - 1), keep.end(), std::greater<float>());
        keep.resize(width);
        thr = keep[width - 1];
      };
      auto offer = [&](float x) {
        if (x > thr || (int64_t)keep.size() < width) {
          keep.push_back(x);
          if ((int64_t)keep.size() == 2 * width) best();
        }
      };
      int64_t k = 0;
      for (; k + BLOCK <= V; k += BLOCK) {
        const f32x16 m = vmax(vmax(loadv<f32x16>(l + k), loadv<f32x16>(l + k + 16)),
                              vmax(loadv<f32x16>(l + k + 32), loadv<f32x16>(l + k + 48))) / t;
        if ((int64_t)keep.size() >= width && !(hmax(m) > thr)) continue;
        for (int64_t j = k; j < k + BLOCK; ++j) offer(l[j] / t);
      }
      for (; k < V; ++k) offer(l[k] / t);
      if ((int64_t)keep.size() > width) best();
      std::sort(keep.begin(), keep.end(), std::greater<float>());
      std::copy(keep.begin(), keep.end(), op + r * width);
    }
  });
  return out;
}

// Per row: sum of exp(x - max x) over x >= floor ([R] float32), in row_weights' order.
torch::Tensor sample_mass(torch::Tensor logits, torch::Tensor temperature, torch::Tensor floor) {
  const int64_t R = logits.size(0), V = logits.size(1);
  auto out = torch::empty({R}, logits.options());
  const float *lp = logits.data_ptr<float>(), *tp = temperature.data_ptr<float>(), *fp = floor.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, R, 1, [&](int64_t r0, int64_t r1) {
    static thread_local std::vector<float> w, bs;
    for (int64_t r = r0; r < r1; ++r) op[r] = weigh_row(lp + r * V, tp[r], fp[r], V, w, bs);
  });
  return out;
}

// Per row: the token whose CDF interval (weights exp(x - max) over x >= floor, in vocabulary order) holds
// u * total ([R] int64); u [R] float64 in [0, 1). Always a token of positive weight.
torch::Tensor sample_invert(torch::Tensor logits, torch::Tensor temperature, torch::Tensor floor, torch::Tensor u) {
  const int64_t R = logits.size(0), V = logits.size(1);
  auto out = torch::empty({R}, logits.options().dtype(torch::kLong));
  const float *lp = logits.data_ptr<float>(), *tp = temperature.data_ptr<float>(), *fp = floor.data_ptr<float>();
  const double* up = u.data_ptr<double>();
  int64_t* op = out.data_ptr<int64_t>();
  at::parallel_for(0, R, 1, [&](int64_t r0, int64_t r1) {
    static thread_local std::vector<float> w, bs;
    for (int64_t r = r0; r < r1; ++r) {
      const float total = weigh_row(lp + r * V, tp[r], fp[r], V, w, bs);
      // strictly below the total: the interval of a zero-weight token past the last kept one is never hit
      const float target = std::min((float)(up[r] * (double)total), std::nextafter(total, 0.f));
      int64_t pick = -1;
      float before = 0.f;  // the CDF before block b
      for (int64_t b = 0; b < (int64_t)bs.size() && pick < 0; ++b) {
        if (before + bs[b] > target) {
          float s = 0.f;
          for (int64_t j = b * BLOCK; j < std::min(V, (b + 1) * BLOCK); ++j) {
            s += w[j];
            if (before + s > target) {
              pick = j;
              break;
            }
          }
        }
        before += bs[b];
      }
      if (pick < 0)  // rounding kept the in-block sums below the block sum: the last token of positive weight
        for (int64_t j = V - 1; j >= 0 && pick < 0; --j)
          if (w[j] > 0.f) pick = j;
      op[r] = pick;
    }
  });
  return out;
}
