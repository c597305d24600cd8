"""Quantized exports: every weight within the error its format allows, logits within what that error implies.

Per-element bounds, as a fraction of the largest |w| in the same row (a quantization block never spans rows):
  Q8_0  d = amax/127 rounds x/d, then d is stored as f16: |err| <= d/2 + 127 * d * 2^-11 = amax * 0.00443
  Q6_K  16-value groups, step s = amax_g/32 (6-bit, -32..31), s itself an int8 multiple of d = max s/127:
        |err| <= s + 16.5 d <= amax * (1/32 + 16.5/4064) = amax * 0.0353 (the +32 end clamps to 31)
  Q4_K  32-value groups, step (max - min)/15 and offset each 6-bit multiples of a per-256 f16 scale:
        |err| <= step/2 + 7.5 d + dmin/2 <= amax * 0.092
  F16 (the fallback for rows that do not split into blocks): |err| <= |w| * 2^-11.

Logits: each quantized matrix perturbs its output by about its relative weight error eps (uncorrelated
rounding noise), and the n such perturbations along the network add in quadrature, so the relative RMS
logit error is about eps * sqrt(n) times a gain of order one (measured 0.6-1.1 on these models). The
bound allows a gain of 2: rel_rms(logits) <= 2 * sqrt(n) * eps, with eps and n measured from the loaded
weights. MoE routers use every expert here (top-k = E), so routing stays continuous: with top-k < E a
weight error of 1e-3 can flip an expert and move logits by O(1), which no error bound describes.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize

from deltaserve import LLM
from deltaserve.weights.gguf_export import export_gguf
from deltaserve.weights.kquants import quantize_k
from deltaserve.weights.loader import load_model
from tiny_models import ARCHS, dense_state_dict, save_hf_model

ROW_BOUND = {"q8_0": 0.00443, "q6_k": 0.0354, "q5_k": 0.046, "q4_k": 0.092}  # worst case incl. fallbacks (Q8_0, F16)
# dims that are multiples of 256, so K-quants apply to every weight matrix; every expert routed (top-k = E)
KQUANT_DIMS = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                   linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=64, linear_value_head_dim=64,
                   intermediate_size=256)
MOE = dict(num_experts=4, num_experts_per_tok=4, moe_intermediate_size=256, shared_expert_intermediate_size=256)
PROMPT = list(range(3, 243, 5))  # 48 tokens


@pytest.mark.parametrize("qtype", [Q.Q6_K, Q.Q5_K, Q.Q4_K])
def test_k_quantizers_invert_ggufs_dequantizers(qtype):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((24, 512)) * np.exp(2 * rng.standard_normal((24, 1)))).astype(np.float32)
    x[0] = 0  # all-zero block
    x[1, :256] = 3.0  # constant block
    x[2, :16] = 0  # zero sub-block next to live ones
    x[3] = rng.standard_t(1.5, 512)  # heavy tails
    y = dequantize(quantize_k(x, qtype), qtype)
    amax = np.abs(x).reshape(24, 2, 256).max(-1).repeat(256, -1)
    bound = ROW_BOUND[qtype.name.lower()] * amax
    assert y.shape == x.shape and np.all(np.abs(y - x) <= bound + 1e-30)
    assert np.array_equal(y[0], x[0])


@pytest.fixture(scope="module", params=ARCHS)
def kq_model(request, tmp_path_factory):
    arch = request.param
    path = save_hf_model(arch, tmp_path_factory.mktemp(f"kq_{arch}"), seed=5, **KQUANT_DIMS,
                          **({} if arch == "qwen3_5" else MOE))
    logits = LLM(path, dtype="float32", max_num_seqs=1, max_model_len=64).score([PROMPT])[0]
    return path, dense_state_dict(load_model(path)[0]), logits


@pytest.mark.parametrize("outtype", ["q8_0", "q6_k", "q4_k"])
def test_quantized_export_within_bounds(kq_model, outtype):
    path, reference, ref_logits = kq_model
    gguf = export_gguf(path, path / f"m-{outtype}.gguf", outtype)
    weights = dense_state_dict(load_model(gguf)[0])
    err2 = ref2 = 0.0
    quantized = 0
    for name, w in reference.items():
        err = (weights[name] - w).abs()
        row_amax = w.abs().amax(-1, keepdim=True) if w.dim() else w.abs()
        assert (err <= ROW_BOUND[outtype] * row_amax + 1e-6).all(), f"{name}: max error {float(err.max()):.3g}"
        if w.dim() >= 2 and err.max() > 0:
            quantized += 1
            err2, ref2 = err2 + float((err ** 2).sum()), ref2 + float((w ** 2).sum())
    if outtype == "q6_k":
        return  # weights suffice; logits are checked for Q8_0 and one K-quant
    eps = math.sqrt(err2 / ref2)
    logits = LLM(gguf, dtype="float32", max_num_seqs=1, max_model_len=64).score([PROMPT])[0]
    rel_rms = float((logits - ref_logits).pow(2).mean().sqrt() / ref_logits.pow(2).mean().sqrt())
    assert 0 < rel_rms <= 2 * math.sqrt(quantized) * eps, (rel_rms, eps, quantized)
