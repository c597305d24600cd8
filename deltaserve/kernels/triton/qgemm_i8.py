"""Products of many rows with GGUF-quantized weights (q8_0, q4_k, q5_k, q6_k) on int8 x, on tensor cores: x's int8
codes (quantize_x, qgemv_i8.py) and the weights' integer codes meet as float16 tiles, one exact product per group of 32
columns (integers: float32 sums below 2^24), then the group's scales in the GEMV's order. A row's result equals the
dp4a GEMV's (qgemv_i8) up to the order of float sums, at any T: so a sequence's result does not move by x's
rounding when its step crosses qgemv_i8.I8_ROWS rows. The MoE's grouped matmuls (moe.py) call i8_group too.

Letters: T = rows, N = output features, K = inputs, BM/BN = the tile of x rows and weight rows of a program.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..gpu_quant import PlanarSegment
from .qtiles import GEMM_BN, code_tile, kernel_args


@triton.jit
def i8_group(a, x_d, x_sum, q, s, q2, d, rows, k0, K, FMT: tl.constexpr):
    """[BM, BN] float32: columns k0..k0+31 of x . W[rows]^T for x rows as int8 codes (a [BM, 32] float16 integers,
    x_d [BM, 1] their scale, x_sum [BM, 1] float32 their sum), W q8_0 / q4_k / q5_k / q6_k: an exact integer product
    on tensor cores (float32 sums below 2^24), then the group's scales, the math of qgemv_i8 per row."""
    BN: tl.constexpr = rows.shape[0]
    if FMT == 4:  # q6_k: a scale per 16 columns: two products, each over x with the other half zeroed (splitting
        # the [.., 32] tiles into halves for K = 16 products compiled wrong on an H100, right in the interpreter)
        codes, scale, _ = code_tile(q, s, q2, d, rows, k0, K, FMT, 32, 16, 1)  # codes [BN, 32] = q - 32; scale [BN, 2]
        c = tl.trans(codes.to(tl.float16))  # [32, BN]
        low = (tl.arange(0, 32) < 16).to(tl.float16)[None, :]  # [1, 32]
        half = tl.arange(0, 2)[None, :]
        sa = tl.sum(tl.where(half == 0, scale, 0.), axis=1)  # [BN]
        sb = tl.sum(tl.where(half == 1, scale, 0.), axis=1)
        out = (tl.dot(a * low, c) * sa[None, :] + tl.dot(a * (1 - low), c) * sb[None, :]) * x_d
    else:
        codes, scale, offset = code_tile(q, s, q2, d, rows, k0, K, FMT, 32, 32, 1)  # scale, offset [BN, 1]
        dot = tl.dot(a, tl.trans(codes.to(tl.float16)))  # [BM, BN] integers
        if FMT == 2:  # q8_0
            out = dot * tl.reshape(scale, (1, BN)) * x_d
        else:  # q4_k, q5_k: d * sc * dot - dmin * m * sum(x)
            out = (tl.reshape(scale, (1, BN)) * dot - tl.reshape(offset, (1, BN)) * x_sum) * x_d
    return out


@triton.jit
def i8_rows(xq, xd, xs, src, mask, k0, K):
    """x rows `src` [BM] (int64) as quantize_x gives them (natural order) at columns k0..k0+31: (codes [BM, 32]
    float16, scale [BM, 1], sum [BM, 1] float32); rows outside `mask` zero."""
    a = tl.load(xq + src[:, None] * K + (k0 + tl.arange(0, 32))[None, :], mask=mask[:, None], other=0).to(tl.float16)
    x_d = tl.load(xd + src * (K // 32) + k0 // 32, mask=mask, other=0.)[:, None]
    p_s = xs + src * (K // 16) + k0 // 16
    x_sum = (tl.load(p_s, mask=mask, other=0) + tl.load(p_s + 1, mask=mask, other=0)).to(tl.float32)[:, None]
    return a, x_d, x_sum


@triton.jit
def qgemm_i8_kernel(xq, xd, xs, q, s, q2, d, out, stride_o, T, N, K: tl.constexpr, FMT: tl.constexpr,
                    BM: tl.constexpr, BN: tl.constexpr):
    """out[t, n] = W[n] . x[t] for T rows of x as quantize_x gives them, 32 columns a step (i8_group): a row's result
    within float rounding of its qgemv_i8 result (the order of the float sums differs), the same at any T."""
    o_m = tl.program_id(0) * BM + tl.arange(0, BM)
    m_m = o_m < T
    o_n = tl.program_id(1) * BN + tl.arange(0, BN)
    rows = tl.minimum(o_n, N - 1).to(tl.int64)
    acc = tl.zeros([BM, BN], tl.float32)
    for k0 in range(0, K, 32):
        a, x_d, x_sum = i8_rows(xq, xd, xs, o_m.to(tl.int64), m_m, k0, K)
        acc += i8_group(a, x_d, x_sum, q, s, q2, d, rows, k0, K, FMT)
    tl.store(out + o_m[:, None].to(tl.int64) * stride_o + o_n[None, :], acc.to(out.dtype.element_ty),
             mask=m_m[:, None] & (o_n < N)[None, :])


def qgemm_i8(xq: tuple[torch.Tensor, torch.Tensor, torch.Tensor], seg: PlanarSegment, out: torch.Tensor) -> None:
    """out [T, rows] (rows contiguous, any row stride) = x @ seg^T for rows x quantized by quantize_x (natural
    order)."""
    t, k = xq[0].shape[0], xq[0].shape[1] * 4
    q, s, q2, d, fmt, _, _ = kernel_args(seg, 32)
    bm = 16 if t <= 16 else 64
    qgemm_i8_kernel[(triton.cdiv(t, bm), triton.cdiv(seg.rows, GEMM_BN))](
        xq[0].view(torch.int8), xq[1], xq[2], q, s, q2, d, out, out.stride(0), t, seg.rows, K=k, FMT=fmt, BM=bm,
        BN=GEMM_BN, num_warps=4)
