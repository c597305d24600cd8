// A decoder layer's whole token-mixer block for decode steps (one token per sequence): the residual add of
// the previous layer's output and the input norm, the input projection, the decode step of gdn.h /
// attention.h, the output projection, the residual add and the post-mixer norm, in one call.
//
// Why: between the weight streams a step otherwise pays a dozen torch ops and their Python per layer, each one
// starting with cold caches (streaming the weights evicts the interpreter's working set). These are the same
// kernels in the same order as the per-op route, so results are bit-identical to it (tested).
//
// Both take x [R, D], the previous layer's FFN output (or the embeddings), and residual [R, D], the stream
// before it (None for the first layer), and return {stream, post_norm(stream)} with stream = x + residual +
// mixer(input_norm(x + residual)): the layer's new residual stream and its FFN input.
#pragma once
#include <torch/extension.h>
#include <vector>
#include "attention.h"
#include "gdn.h"
#include "norm.h"
#include "packed.h"
#include "qlinear.h"

// GatedDeltaNet: in_proj [C + H*Dv + 2H, D] rows [q | k | v | z | b | a]; out_proj [D, H*Dv]; the rest as gdn_decode.
std::vector<torch::Tensor> gdn_block(torch::Tensor x, c10::optional<torch::Tensor> residual,
                                     torch::Tensor input_norm, torch::Tensor post_norm, double eps,
                                     const PackedWeight& in_proj, const PackedWeight& out_proj, torch::Tensor conv_weight,
                                     torch::Tensor A_log, torch::Tensor dt_bias, torch::Tensor gated_norm,
                                     double gated_eps, int64_t Hk, int64_t Dk, torch::Tensor conv_pool,
                                     torch::Tensor ssm_pool, torch::Tensor slots, torch::Tensor reset) {
  const int64_t C = conv_weight.size(0), H = A_log.size(0), V = out_proj.k;
  auto in = add_rms_norm(x, residual, input_norm, eps);  // {stream, normed}
  auto p = packed_linear(in[1], in_proj).split_with_sizes({C, V, H, H}, 1);  // mixed, z, b, a
  auto mixed = gdn_decode(p[0].contiguous(), p[1].contiguous(), p[3].contiguous(), p[2].contiguous(), conv_weight,
                          A_log, dt_bias, gated_norm, gated_eps, conv_pool, ssm_pool, slots, reset, Hk, Dk);
  return add_rms_norm(in[0], packed_linear(mixed, out_proj), post_norm, eps);
}

// GatedAttention: qkv_proj [H*2D + 2G*D, D] rows [q and gate interleaved per head | k | v]; o_proj [D, H*D]; the
// rest as attention_decode.
std::vector<torch::Tensor> attention_block(torch::Tensor x, c10::optional<torch::Tensor> residual,
                                           torch::Tensor input_norm, torch::Tensor post_norm, double eps,
                                           const PackedWeight& qkv_proj, const PackedWeight& o_proj, torch::Tensor q_norm,
                                           torch::Tensor k_norm, double head_eps, int64_t rotary_dim, double theta,
                                           double scale, torch::Tensor k_cache, torch::Tensor v_cache,
                                           torch::Tensor block_table, torch::Tensor slots, torch::Tensor positions) {
  const int64_t GD = k_cache.size(2) * k_cache.size(3), QG = qkv_proj.n - 2 * GD;
  auto in = add_rms_norm(x, residual, input_norm, eps);
  auto p = packed_linear(in[1], qkv_proj).split_with_sizes({QG, GD, GD}, 1);  // q|gate, k, v
  auto mixed = attention_decode(p[0].contiguous(), p[1].contiguous(), p[2].contiguous(), q_norm, k_norm, head_eps,
                                rotary_dim, theta, k_cache, v_cache, block_table, slots, positions, scale);
  return add_rms_norm(in[0], packed_linear(mixed, o_proj), post_norm, eps);
}
