"""A float weight quantized into a PlanarWeight of a chosen format, on its own device: the way tests and benchmarks
make CUDA-quantized models of any size without writing a file. The blocks are those a file would hold (FP8 as
`write_fp8_checkpoint` writes it, the K-quants as `kquants` writes them for a GGUF file; Q8_0 as llama.cpp defines
it: d = max|w| / 127 per 32 values, q = round(w / d))."""

from __future__ import annotations

from dataclasses import replace

import torch
from gguf import GGMLQuantizationType as Q

from ..kernels.gpu_quant import FP8_BLOCK, PlanarSegment, PlanarWeight, from_gguf_segment
from ..kernels.quantized import QuantSegment
from .fp8 import expand_scales, quantize_fp8
from .kquants import quantize_k


CHUNK = 1 << 25  # values quantized at a time (the float32 temporaries of a 35M-value chunk: ~1 GB)


def quantize_planar(w: torch.Tensor, fmt: str, dtype: torch.dtype = torch.bfloat16) -> PlanarWeight:
    """w [..., N, K] float -> PlanarWeight in fmt ('fp8', 'q8_0', 'q4_k', 'q5_k', 'q6_k') for activations of dtype;
    a large w a chunk of leading rows (or experts) at a time."""
    step = max(1, CHUNK // (w[0].numel()))
    if w.dim() == 2:
        step = -(-step // FP8_BLOCK) * FP8_BLOCK  # fp8 row blocks never straddle chunks
    parts = [_quantize_segment(p, fmt, dtype) for p in w.split(step)]
    planes = {k: torch.cat([getattr(p, k) for p in parts]) for k in ("q", "s", "q2", "d") if getattr(parts[0], k) is not None}
    return PlanarWeight(tuple(w.shape), [replace(parts[0], **planes)], dtype=dtype)


def _quantize_segment(w: torch.Tensor, fmt: str, dtype: torch.dtype) -> PlanarSegment:
    n, k = w.shape[-2:]
    if fmt == "fp8":
        codes, scale = quantize_fp8(w)
        blocked = w.dim() == 2 or n % FP8_BLOCK == 0  # a stack's blocks must not straddle experts
        return PlanarSegment("fp8", codes, s=scale if blocked else expand_scales(scale, n, k),
                             row_block=FP8_BLOCK if blocked else 1)
    if fmt == "q8_0":
        groups = w.float().unflatten(-1, (-1, 32))
        d = (groups.abs().amax(-1) / 127).half()  # [..., N, K/32]
        inv = torch.where(d > 0, 1 / d.float(), torch.zeros_like(d, dtype=torch.float32))
        codes = torch.round(groups * inv[..., None]).clamp(-127, 127).to(torch.int8).flatten(-2)
        return PlanarSegment("q8_0", codes, s=d)
    qtype = {"q4_k": Q.Q4_K, "q5_k": Q.Q5_K, "q6_k": Q.Q6_K}[fmt]
    return from_gguf_segment(QuantSegment(qtype, quantize_k(w, qtype)), dtype)


def quantize_model(model, fmt_of) -> int:
    """Every weight matrix of model (linears, embedding, expert stacks) quantized in place to PlanarWeight:
    fmt_of(parameter name) -> a format, or None to leave it. Returns the number quantized. A tied embedding and
    LM head are quantized once."""
    from ..layers.linear import set_weight
    from .loader import matrix_params
    done = {}
    for name in sorted(matrix_params(model)):
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        weight = getattr(module, attr)
        fmt = fmt_of(name) if isinstance(weight, torch.Tensor) else None
        if fmt is not None and id(weight) not in done:
            done[id(weight)] = quantize_planar(weight.detach(), fmt, model.dtype)
        if id(weight) in done:
            set_weight(module, attr, done[id(weight)])
    return len(done)
