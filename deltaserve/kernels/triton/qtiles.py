"""Quantized weight tiles in registers (PlanarWeight planes, kernels/gpu_quant.py), the building blocks of the CUDA
GEMV, GEMM and MoE kernels (qlinear.py, qgemm_i8.py, moe.py, moe_pairs.py).

Letters: N = output features, K = inputs, BN/BK = the block of W one program reads per step, GS = values per scale
along K. `w_tile` turns W[rows, k0:k0+BK] into float32 in registers from the format's planes (FMT: the index in
gpu_quant.FORMATS), so only the quantized bytes cross HBM; `dot_step` is the GEMV's per-group dot of such a block
with one row; `code_tile` gives the integer codes and scales apart (qgemm_i8's exact integer products).
"""

from __future__ import annotations

import triton
import triton.language as tl

from ..gpu_quant import FORMATS, PlanarSegment
from .qgemv_i8 import small_int


@triton.jit
def code_tile(q, s, q2, d, rows, k0, K, FMT: tl.constexpr, BK: tl.constexpr, GS: tl.constexpr, RB: tl.constexpr):
    """W[rows, k0:k0+BK] of a scaled format (FMT > 0) as (codes float32 [BN, BK], integers; scale, offset float32
    [BN, BK/GS]): W = codes * scale - offset per group of GS (rows [BN] int64 in bounds, K % BK == 0)."""
    BN: tl.constexpr = rows.shape[0]
    r = rows[:, None]
    og = k0 // GS + tl.arange(0, BK // GS)[None, :]  # [1, BK/GS] group index along K
    if FMT == 1:  # fp8: q * s[row // RB, k // 128]
        codes = tl.load(q + r * K + (k0 + tl.arange(0, BK))[None, :]).to(tl.float32)
        scale = tl.load(s + (r // RB) * tl.cdiv(K, 128) + og * GS // 128)
        offset = tl.zeros_like(scale)
    elif FMT == 2:  # q8_0: q * s[k // 32]
        codes = small_int(tl.load(q + r * K + (k0 + tl.arange(0, BK))[None, :]).to(tl.int32) + 128) - 128.
        scale = tl.load(s + r * (K // 32) + og).to(tl.float32)
        offset = tl.zeros_like(scale)
    else:  # the K-quants: 4 low bits two to a byte, then per-format high bits and scales
        b = tl.load(q + r * (K // 2) + (k0 // 2 + tl.arange(0, BK // 2))[None, :])
        low = tl.interleave(b & 15, b >> 4)  # [BN, BK] natural order
        if FMT == 5:  # q5_k: the fifth bit of value 8j + i at bit i of q2 byte j
            h = tl.load(q2 + r * (K // 8) + (k0 // 8 + tl.arange(0, BK // 8))[None, :])
            low = low | tl.reshape(((h[:, :, None] >> tl.arange(0, 8)[None, None, :]) & 1) << 4, (BN, BK))
        if FMT == 3 or FMT == 5:  # q4_k, q5_k: d * sc * q - dmin * m
            codes = small_int(low)
            p_s = s + (r * (K // 32) + og) * 2
            p_d = d + (r * (K // 256) + og // 8) * 2
            scale = tl.load(p_d).to(tl.float32) * tl.load(p_s).to(tl.float32)
            offset = tl.load(p_d + 1).to(tl.float32) * tl.load(p_s + 1).to(tl.float32)
        else:  # q6_k: d * sc * (q - 32), the high 2 bits four to a byte
            h = tl.load(q2 + r * (K // 4) + (k0 // 4 + tl.arange(0, BK // 4))[None, :])
            high = tl.interleave(tl.interleave(h & 3, (h >> 4) & 3), tl.interleave((h >> 2) & 3, h >> 6))
            codes = small_int(low | (high << 4)) - 32.
            scale = tl.load(d + r * (K // 256) + og // 16).to(tl.float32) * \
                tl.load(s + r * (K // 16) + og).to(tl.float32)
            offset = tl.zeros_like(scale)
    return codes, scale, offset


@triton.jit
def w_tile(q, s, q2, d, rows, k0, K, FMT: tl.constexpr, BK: tl.constexpr, GS: tl.constexpr, RB: tl.constexpr):
    """float32 [BN, BK] = W[rows, k0:k0+BK] (rows [BN] int64 in bounds, K % BK == 0, BK % GS == 0)."""
    BN: tl.constexpr = rows.shape[0]
    if FMT == 0:  # plain
        w = tl.load(q + rows[:, None] * K + (k0 + tl.arange(0, BK))[None, :]).to(tl.float32)
    else:
        codes, scale, offset = code_tile(q, s, q2, d, rows, k0, K, FMT, BK, GS, RB)
        w = tl.reshape(codes, (BN, BK // GS, GS)) * scale[:, :, None] - offset[:, :, None]
        w = tl.reshape(w, (BN, BK))
    return w


@triton.jit
def dot_step(q, s, q2, d, xb, rows, k0, K, FMT: tl.constexpr, BK: tl.constexpr, GS: tl.constexpr,
             RB: tl.constexpr):
    """[BN, BK/GS] float32: per group of GS columns of W[rows, k0:k0+BK], the group's dot with xb = x[k0:k0+BK]
    ([BK] float32, one row). Codes meet x as integers-turned-floats and each group's scale multiplies its sum once
    (not every weight); the 4-bit formats pair byte j's nibbles with x's even and odd columns (no interleave)."""
    r = rows[:, None, None]
    g = tl.arange(0, BK // GS)[None, :, None]
    og = k0 // GS + tl.arange(0, BK // GS)[None, :]  # [1, BK/GS] group index along K
    if FMT == 0:  # plain: GS = 1
        out = tl.load(q + rows[:, None] * K + (k0 + tl.arange(0, BK))[None, :]).to(tl.float32) * xb[None, :]
    elif FMT <= 2:  # fp8, q8_0: one code per byte
        j = tl.arange(0, GS)[None, None, :]
        b = tl.load(q + r * K + k0 + g * GS + j)  # [BN, BK/GS, GS]
        xg = tl.reshape(xb, (1, BK // GS, GS))
        if FMT == 1:
            out = tl.sum(b.to(tl.float32) * xg, axis=2) * \
                tl.load(s + (rows[:, None] // RB) * tl.cdiv(K, 128) + og * GS // 128)
        else:
            out = tl.sum((small_int(b.to(tl.int32) + 128) - 128.) * xg, axis=2) * \
                tl.load(s + rows[:, None] * (K // 32) + og).to(tl.float32)
    else:
        j = tl.arange(0, GS // 2)[None, None, :]
        b = tl.load(q + r * (K // 2) + k0 // 2 + g * (GS // 2) + j)  # [BN, BK/GS, GS/2]: values 2j | 2j+1
        xe, xo = tl.split(tl.reshape(xb, (1, BK // GS, GS // 2, 2)))
        lo = (b & 15).to(tl.int32)
        hi = (b >> 4).to(tl.int32)
        if FMT == 4:  # q6_k: the high 2 bits of value v at bits 2 (v % 4) of q2 byte v // 4
            h = tl.load(q2 + r * (K // 4) + k0 // 4 + g * (GS // 4) + j // 2).to(tl.int32)
            sh = (j % 2) * 4
            lo = lo | (((h >> sh) & 3) << 4)
            hi = hi | (((h >> (sh + 2)) & 3) << 4)
        elif FMT == 5:  # q5_k: the fifth bit of value v at bit v % 8 of q2 byte v // 8
            h = tl.load(q2 + r * (K // 8) + k0 // 8 + g * (GS // 8) + j // 4).to(tl.int32)
            sh = (j % 4) * 2
            lo = lo | (((h >> sh) & 1) << 4)
            hi = hi | (((h >> (sh + 1)) & 1) << 4)
        dot = tl.sum(small_int(lo) * xe + small_int(hi) * xo, axis=2)  # [BN, BK/GS]
        xsum = tl.sum(xe + xo, axis=2)  # [1, BK/GS]
        if FMT == 3 or FMT == 5:  # q4_k, q5_k: d * sc * dot - dmin * m * sum(x)
            p_s = s + (rows[:, None] * (K // 32) + og) * 2
            p_d = d + (rows[:, None] * (K // 256) + og // 8) * 2
            out = tl.load(p_d).to(tl.float32) * tl.load(p_s).to(tl.float32) * dot - \
                tl.load(p_d + 1).to(tl.float32) * tl.load(p_s + 1).to(tl.float32) * xsum
        else:  # q6_k: d * sc * (q - 32)
            out = tl.load(d + rows[:, None] * (K // 256) + og // 16).to(tl.float32) * \
                tl.load(s + rows[:, None] * (K // 16) + og).to(tl.float32) * (dot - 32. * xsum)
    return out


GEMM_BN = 64  # weight rows per program of the GEMMs (qlinear.qgemm_kernel, qgemm_i8)
GROUP = {"plain": 1, "fp8": 128, "q8_0": 32, "q4_k": 32, "q5_k": 32, "q6_k": 16}


def kernel_args(seg: PlanarSegment, bk: int) -> tuple:
    """(q, s, q2, d planes; FMT, GS, RB constants) of a segment for blocks of bk columns (planes a kernel does
    not read are passed as q)."""
    planes = [seg.q, seg.s if seg.s is not None else seg.q, seg.q2 if seg.q2 is not None else seg.q,
              seg.d if seg.d is not None else seg.q]
    return (*planes, FORMATS.index(seg.fmt), min(GROUP[seg.fmt], bk), seg.row_block)


def block_k(fmt: str, k: int, most: int) -> int:
    """The widest BK <= most dividing K that holds whole scale groups (0: none)."""
    least = {"fp8": 16, "q8_0": 32, "q4_k": 32, "q5_k": 32, "q6_k": 16}.get(fmt, 16)
    sizes = (4096, 2048, 1024, 512, 256, 128, 64, 32, 16)
    return next((b for b in sizes if least <= b <= most and k % b == 0), 0)

