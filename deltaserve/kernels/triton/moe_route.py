"""Pieces of the sparse MoE block on CUDA that both its paths use (moe.py: many tokens, moe_pairs.py: a few):
routing, the final combine, and the weight arguments of an expert stack (float, or quantized: PlanarWeight).

Letters: T = tokens, K = experts per token, E = experts, D = hidden.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..gpu_quant import PlanarWeight
from .linear import linear as dense_linear
from .linear import pdl
from .qlinear import qlinear
from .qtiles import kernel_args
from .rowwise import gate_mul


@triton.jit
def route_kernel(logits, weights, experts, counts, E, K: tl.constexpr, BE: tl.constexpr, KP: tl.constexpr,
                 NORM: tl.constexpr, COUNT: tl.constexpr, PDL: tl.constexpr):
    if PDL:  # the pair GEMVs after it may launch now (they wait for this kernel before reading)
        tl.extra.cuda.gdc_launch_dependents()
    i_t = tl.program_id(0).to(tl.int64)
    o_e, o_k = tl.arange(0, BE), tl.arange(0, KP)
    b = tl.load(logits + i_t * E + o_e, mask=o_e < E, other=float("-inf")).to(tl.float32)
    b = tl.exp(b - tl.max(b, axis=0))
    b = b / tl.sum(b, axis=0)  # softmax; padding lanes are 0
    # one key per expert: probability bits (>= 0, so ordered as integers) above the reversed index; the
    # largest key is the largest probability, ties going to the lowest expert id; padding lanes -1
    key = (b.to(tl.int32, bitcast=True).to(tl.int64) << 32) | (BE - 1 - o_e).to(tl.int64)
    key = tl.where(o_e < E, key, -1)
    vals = tl.zeros([KP], tl.float32)
    ids = tl.zeros([KP], tl.int32)
    for j in tl.static_range(K):  # top-k, largest first
        top = tl.max(key, axis=0)
        vals = tl.where(o_k == j, (top >> 32).to(tl.int32).to(tl.float32, bitcast=True), vals)
        ids = tl.where(o_k == j, (BE - 1 - (top & 0xFFFFFFFF)).to(tl.int32), ids)
        key = tl.where(key == top, -1, key)
    if NORM:
        vals = vals / tl.sum(vals, axis=0)
    tl.store(weights + i_t * K + o_k, vals, mask=o_k < K)
    tl.store(experts + i_t * K + o_k, ids, mask=o_k < K)
    if COUNT:
        tl.atomic_add(counts + ids, 1, mask=o_k < K)


@triton.jit
def combine_kernel(y, shared, gate_logit, out, D, K: tl.constexpr, BD: tl.constexpr):
    """out[t] = sum_k y[t, k] (fixed order) + sigmoid(gate_logit[t]) * shared[t]."""
    i_t = tl.program_id(0).to(tl.int64)
    o_d = tl.program_id(1) * BD + tl.arange(0, BD)
    m_d = o_d < D
    acc = tl.load(shared + i_t * D + o_d, mask=m_d).to(tl.float32)
    acc *= tl.sigmoid(tl.load(gate_logit + i_t).to(tl.float32))
    for j in tl.static_range(K):
        acc += tl.load(y + (i_t * K + j) * D + o_d, mask=m_d).to(tl.float32)
    tl.store(out + i_t * D + o_d, acc.to(out.dtype.element_ty), mask=m_d)


ROUTE_WARPS = 1  # experts <= 1024: one warp, the top-k's reductions stay in registers and shuffles


def route(logits: torch.Tensor, top_k: int, norm_topk: bool, counts: torch.Tensor | None):
    """logits [T, E] -> (weights [T, K] float32, experts [T, K] int32); counts [E] += pairs per expert (if given)."""
    t, e = logits.shape
    weights = torch.empty(t, top_k, dtype=torch.float32, device=logits.device)
    experts = torch.empty(t, top_k, dtype=torch.int32, device=logits.device)
    be = triton.next_power_of_2(e)
    route_kernel[(t,)](logits, weights, experts, experts if counts is None else counts, e, K=top_k, BE=be,
                       KP=triton.next_power_of_2(top_k), NORM=norm_topk, COUNT=counts is not None,
                       PDL=pdl(logits), num_warps=ROUTE_WARPS if be <= 1024 else 4)
    return weights, experts


def linear(x: torch.Tensor, w) -> torch.Tensor:
    """x W^T for a float or quantized (PlanarWeight) weight."""
    return qlinear(x, w) if isinstance(w, PlanarWeight) else dense_linear(x, w)


def shared_expert(x: torch.Tensor, gate_up, down) -> torch.Tensor:
    """The shared expert's SwiGLU MLP on [T, D] rows (its own width S, which need not be the experts'): gate and up
    rounded to x's dtype, then their product, at any T (moe_pairs' shared rows compute the same)."""
    h = linear(x, gate_up)
    return linear(gate_mul(h[:, h.shape[1] // 2:], h[:, :h.shape[1] // 2], sigmoid=False), down)


def stack_args(w, bk: int) -> dict:
    """The weight arguments of the MoE kernels for an expert stack [E, rows, K]: a float tensor, or a one-segment
    PlanarWeight."""
    if not isinstance(w, PlanarWeight):
        return dict(w=w, stride_we=w.stride(0), stride_wn=w.stride(1), ws=w, wq2=w, wd=w, FMT=0, GS=1, RB=1)
    q, s, q2, d, fmt, gs, rb = kernel_args(w.segments[0], bk)
    return dict(w=q, stride_we=0, stride_wn=0, ws=s, wq2=q2, wd=d, FMT=fmt, GS=gs, RB=rb)
