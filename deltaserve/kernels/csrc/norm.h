// Row norms: the zero-centred RMS norm (with its residual add), and the q/k norm + rotary of one head.
#pragma once
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <vector>

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
