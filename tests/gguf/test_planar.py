"""GGUF blocks in the CUDA kernels' planar layouts (issue 16), checked on the CPU: every value against gguf-py's
dequantizers (the oracle), and a Q4_K_M-like file loaded as PlanarWeights running the torch reference against
the float32 model of the same dequantized weights. The Triton kernels themselves: tests/cuda/test_quantized.py."""

from __future__ import annotations

import logging

import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize

from deltaserve import LLMEngine
from deltaserve.kernels.gpu_quant import PlanarWeight, dequantize_segment, from_gguf_segment, from_quantized
from deltaserve.kernels.quantized import QuantizedWeight, QuantSegment
from deltaserve.layers.linear import set_weight
from deltaserve.weights.loader import load_model, matrix_params
from drive import prompt_logits
from gguf_edit import random_blocks


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_K, Q.Q5_K, Q.Q6_K], ids=lambda q: q.name)
@pytest.mark.parametrize("shape", [(16, 256), (3, 5, 512)], ids=str)
def test_planar_layout_holds_the_files_values(qtype, shape):
    data = random_blocks(qtype, shape)
    seg = from_gguf_segment(QuantSegment(qtype, torch.from_numpy(data)), torch.float32)
    oracle = torch.from_numpy(dequantize(data, qtype))
    assert torch.equal(dequantize_segment(seg, shape[-1]), oracle)
    w = PlanarWeight(shape, [seg])
    if len(shape) == 3:
        assert torch.equal(w.expert(2).dequantize(), oracle[2])
    else:
        rows = torch.tensor([5, 0, 15, 5])
        assert torch.equal(w.dequantize(rows), oracle[rows])
    file_bytes = data.nbytes
    assert w.nbytes <= file_bytes * {Q.Q8_0: 1.0, Q.Q4_K: 1.03, Q.Q5_K: 1.03, Q.Q6_K: 1.0}[qtype]


def test_rows_of_several_formats_and_unsupported_types():
    parts = [(Q.Q6_K, 3), (Q.Q4_K, 5), (Q.Q8_0, 2)]
    segs = [QuantSegment(q, torch.from_numpy(random_blocks(q, (n, 256), seed=i))) for i, (q, n) in enumerate(parts)]
    w = from_quantized(QuantizedWeight((10, 256), segs), torch.float32)
    full = QuantizedWeight((10, 256), segs).dequantize()
    assert [s.fmt for s in w.segments] == ["q6_k", "q4_k", "q8_0"] and torch.equal(w.dequantize(), full)
    rows = torch.tensor([9, 0, 4, 3, 8])
    assert torch.equal(w.dequantize(rows), full[rows])
    q3 = QuantSegment(Q.Q3_K, torch.from_numpy(random_blocks(Q.Q3_K, (4, 256))))
    assert from_quantized(QuantizedWeight((4, 256), [q3]), torch.float32) is None  # dequantized at load instead
    stack = [QuantSegment(q, torch.from_numpy(random_blocks(q, (2, 3, 256)))) for q in (Q.Q4_K, Q.Q6_K)]
    assert from_quantized(QuantizedWeight((2, 6, 256), stack), torch.float32) is None  # the MoE kernels: one format


PROMPTS = [list(range(3, 43)), [7, 9, 11], list(range(100, 160, 3))]


def score(model, cfg) -> list[torch.Tensor]:
    return prompt_logits(LLMEngine(model, cfg, None, max_num_seqs=4, max_model_len=128, max_num_batched_tokens=64),
                         PROMPTS)


def test_mix_file_loads_planar_and_matches_its_float_model(mix_gguf, caplog):
    with caplog.at_level(logging.WARNING):
        planar, cfg = load_model(mix_gguf, planar=True)
    assert "q_proj.weight (Q4_K/Q4_0/Q6_K rows): the CUDA kernels compute on" in caplog.text  # Q4_0 k rows
    gdn, moe = planar.layers[0].mixer, planar.layers[0].ffn
    assert [s.fmt for s in gdn.in_proj.weight.segments] == ["q6_k", "q4_k", "q8_0"]
    assert [s.fmt for s in gdn.out_proj.weight.segments] == ["q5_k"]
    assert moe.experts_gate_up.fmt == "q4_k" and moe.experts_down.fmt == "q6_k"
    assert all(isinstance(planar.layers[i].ffn.experts_down, torch.Tensor) for i in (1, 2, 3))  # Q3_K, Q2_K, Q5_1
    reference, _ = load_model(mix_gguf, planar=True)
    for name in matrix_params(reference):
        module_name, _, attr = name.rpartition(".")
        module = reference.get_submodule(module_name)
        if isinstance(getattr(module, attr), PlanarWeight):
            set_weight(module, attr, getattr(module, attr).dequantize())
    for got, ref in zip(score(planar, cfg), score(reference, cfg)):
        assert float((got - ref).norm() / ref.norm()) <= 1e-4
