"""Products with quantized weights (PlanarWeight, kernels/gpu_quant.py) on CUDA: the tile dequantizer, a GEMV for one
row and a GEMM (dequantize-in-tile, tensor cores) for more.

Letters: T = activation rows, N = output features, K = inputs, BN/BK = the block of W one program reads per
step, GS = values per scale along K. `w_tile` turns W[rows, k0:k0+BK] into float32 in registers from the
format's planes (FMT: the index in gpu_quant.FORMATS), so only the quantized bytes cross HBM; the MoE kernels
(moe.py) call it too. Rows past N are clamped to N - 1 (loads stay in bounds; their results are not stored).
A row's result depends on its own x only: the K loop's order is the same at any T.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..gpu_quant import FORMATS, PlanarSegment, PlanarWeight
from .linear import linear as dense_linear, pdl, x_block
from .qgemv_i8 import I8_ROWS, QX_SPAN, qgemv_i8, quantize_x, small_int, takes_i8


@triton.jit
def code_tile(q, s, q2, d, rows, k0, K, FMT: tl.constexpr, BK: tl.constexpr, GS: tl.constexpr, RB: tl.constexpr):
    """W[rows, k0:k0+BK] of a scaled format (FMT > 0) as (codes float32 [BN, BK], integers; scale, offset float32
    [BN, BK/GS]): W = codes * scale - offset per group of GS (rows [BN] int64 in bounds, K % BK == 0)."""
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
        if FMT == 3:  # q4_k: d * sc * q - dmin * m
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
        dot = tl.sum(small_int(lo) * xe + small_int(hi) * xo, axis=2)  # [BN, BK/GS]
        xsum = tl.sum(xe + xo, axis=2)  # [1, BK/GS]
        if FMT == 3:  # q4_k: d * sc * dot - dmin * m * sum(x)
            p_s = s + (rows[:, None] * (K // 32) + og) * 2
            p_d = d + (rows[:, None] * (K // 256) + og // 8) * 2
            out = tl.load(p_d).to(tl.float32) * tl.load(p_s).to(tl.float32) * dot - \
                tl.load(p_d + 1).to(tl.float32) * tl.load(p_s + 1).to(tl.float32) * xsum
        else:  # q6_k: d * sc * (q - 32)
            out = tl.load(d + rows[:, None] * (K // 256) + og // 16).to(tl.float32) * \
                tl.load(s + rows[:, None] * (K // 16) + og).to(tl.float32) * (dot - 32. * xsum)
    return out


@triton.jit
def qgemv_kernel(x, q, s, q2, d, out, N, g, stride_gh, nw, eps, K: tl.constexpr, FMT: tl.constexpr,
                 BN: tl.constexpr, BK: tl.constexpr, GS: tl.constexpr, RB: tl.constexpr, PRO: tl.constexpr,
                 HD: tl.constexpr, PDL: tl.constexpr):
    """out[n] = W[n] . x for one row x [K], x through linear.gemv_kernel's prologue PRO (0: none; 1: the gated RMS
    norm with gate g and weight nw per head of HD; 2: the sigmoid gate g). PDL: a programmatic dependent launch
    (Hopper): it lets the next kernel launch, then waits for the previous one before reading or writing."""
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    o_n = tl.program_id(0) * BN + tl.arange(0, BN)
    rows = tl.minimum(o_n, N - 1).to(tl.int64)
    acc = tl.zeros([BN, BK // GS], tl.float32)
    for k0 in range(0, K, BK):
        xb = x_block(x, g, stride_gh, nw, eps, k0 + tl.arange(0, BK), BK, PRO, HD)
        acc += dot_step(q, s, q2, d, xb, rows, k0, K, FMT, BK, GS, RB)
    tl.store(out + o_n, tl.sum(acc, axis=1).to(out.dtype.element_ty), mask=o_n < N)


@triton.jit
def qgemm_kernel(x, stride_x, q, s, q2, d, out, stride_o, T, N, K: tl.constexpr, FMT: tl.constexpr, BM: tl.constexpr,
                 BN: tl.constexpr, BK: tl.constexpr, GS: tl.constexpr, RB: tl.constexpr, PREC: tl.constexpr):
    """out[t, n] = x[t] . W[n] for T rows: each [BN, BK] tile of W dequantized once for BM rows (tensor cores)."""
    o_m = tl.program_id(0) * BM + tl.arange(0, BM)
    m_m = o_m < T
    o_n = tl.program_id(1) * BN + tl.arange(0, BN)
    rows = tl.minimum(o_n, N - 1).to(tl.int64)
    acc = tl.zeros([BM, BN], tl.float32)
    for k0 in range(0, K, BK):
        b_x = tl.load(x + o_m[:, None].to(tl.int64) * stride_x + (k0 + tl.arange(0, BK))[None, :],
                      mask=m_m[:, None], other=0.)
        b_w = w_tile(q, s, q2, d, rows, k0, K, FMT, BK, GS, RB).to(b_x.dtype)
        acc = tl.dot(b_x, tl.trans(b_w), acc, input_precision=PREC)
    tl.store(out + o_m[:, None].to(tl.int64) * stride_o + o_n[None, :], acc.to(out.dtype.element_ty),
             mask=m_m[:, None] & (o_n < N)[None, :])


@triton.jit
def i8_group(a, x_d, x_sum, q, s, q2, d, rows, k0, K, FMT: tl.constexpr):
    """[BM, BN] float32: columns k0..k0+31 of x . W[rows]^T for x rows as int8 codes (a [BM, 32] float16 integers,
    x_d [BM, 1] their scale, x_sum [BM, 1] float32 their sum), W q8_0 / q4_k / q6_k: an exact integer product on
    tensor cores (float32 sums below 2^24), then the group's scales, the math of qgemv_i8 per row."""
    BM: tl.constexpr = a.shape[0]
    BN: tl.constexpr = rows.shape[0]
    if FMT == 4:  # q6_k: a scale per 16 columns, two products
        codes, scale, _ = code_tile(q, s, q2, d, rows, k0, K, FMT, 32, 16, 1)  # codes [BN, 32] = q - 32
        ca, cb = tl.split(tl.permute(tl.reshape(codes.to(tl.float16), (BN, 2, 16)), (0, 2, 1)))
        xa, xb = tl.split(tl.permute(tl.reshape(a, (BM, 2, 16)), (0, 2, 1)))
        sa, sb = tl.split(scale)  # [BN]
        out = (tl.dot(xa, tl.trans(ca)) * sa[None, :] + tl.dot(xb, tl.trans(cb)) * sb[None, :]) * x_d
    else:
        codes, scale, offset = code_tile(q, s, q2, d, rows, k0, K, FMT, 32, 32, 1)  # scale, offset [BN, 1]
        dot = tl.dot(a, tl.trans(codes.to(tl.float16)))  # [BM, BN] integers
        if FMT == 2:  # q8_0
            out = dot * tl.reshape(scale, (1, BN)) * x_d
        else:  # q4_k: d * sc * dot - dmin * m * sum(x)
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


GROUP = {"plain": 1, "fp8": 128, "q8_0": 32, "q4_k": 32, "q6_k": 16}


def kernel_args(seg: PlanarSegment, bk: int) -> tuple:
    """(q, s, q2, d planes; FMT, GS, RB constants) of a segment for blocks of bk columns (planes a kernel does
    not read are passed as q)."""
    planes = [seg.q, seg.s if seg.s is not None else seg.q, seg.q2 if seg.q2 is not None else seg.q,
              seg.d if seg.d is not None else seg.q]
    return (*planes, FORMATS.index(seg.fmt), min(GROUP[seg.fmt], bk), seg.row_block)


def block_k(fmt: str, k: int, most: int) -> int:
    """The widest BK <= most dividing K that holds whole scale groups (0: none)."""
    least = {"fp8": 16, "q8_0": 32, "q4_k": 32, "q6_k": 16}.get(fmt, 16)
    sizes = (4096, 2048, 1024, 512, 256, 128, 64, 32, 16)
    return next((b for b in sizes if least <= b <= most and k % b == 0), 0)


GEMV_BN, GEMV_BK, GEMV_WARPS = 4, 1024, 4  # rows per program, columns per step, warps (bench_cuda_quant.py)


def gemv_blocks(fmt: str, n: int, k: int) -> tuple[int, int]:
    """(rows per program, columns per step) of the one-row GEMV: the whole row in one step, 2 rows a program, where
    K <= 4096 is one block (a power of two) and N <= 4096 or the format is q6_k (bench_cuda_quant.py --sweep, H100:
    12-17% faster there; 4-12% slower for fp8 / q8_0 / q4_k with N >= 12352); else GEMV_BN x GEMV_BK."""
    if k <= 4096 and block_k(fmt, k, k) == k and (n <= 4096 or fmt == "q6_k"):
        return 2, k
    return GEMV_BN, block_k(fmt, k, GEMV_BK)


GEMM_BN, GEMM_BK = 64, 64
# bf16/fp16 rows against q8_0 / q4_k / q6_k on int8 x: up to 8 rows the dp4a GEMV (qgemv_i8.py), more qgemm_i8 (and
# the MoE's pairs or grouped matmuls likewise); off until a GPU run has checked and timed qgemm_i8 and the grouped MoE
I8_GEMV = False


def qlinear(x: torch.Tensor, w: PlanarWeight, out: torch.Tensor | None = None) -> torch.Tensor:
    """x [T, K] @ w^T -> [T, N] in x's dtype: one launch per segment (plain segments: the dense path)."""
    if w.x_order is not None:
        x = x[:, w.x_order]  # the stored column order
    x = x.contiguous()
    t, k = x.shape
    out = torch.empty(t, w.shape[-2], dtype=x.dtype, device=x.device) if out is None else out
    n0 = 0
    xq = {}  # x quantized for the integer GEMV, per packing order (split: the 4-bit formats')
    for seg in w.segments:
        dst = out[:, n0:n0 + seg.rows]
        if seg.fmt == "plain":
            dst.copy_(dense_linear(x, seg.q))
        elif I8_GEMV and takes_i8(x, seg):
            split = seg.fmt != "q8_0" and t <= I8_ROWS  # the GEMV's order for the 4-bit formats; the GEMM's natural
            if split not in xq:
                xq[split] = quantize_x(x, split)
            (qgemv_i8 if t <= I8_ROWS else qgemm_i8)(xq[split], seg, dst)
        else:
            segment_product(x, seg, dst)
        n0 += seg.rows
    return out


def gemv(x: torch.Tensor, seg: PlanarSegment, out: torch.Tensor, pro: tuple | None = None) -> None:
    """out [1, rows] = x [1, K] @ seg^T, x through the prologue pro = (PRO, g, stride_gh, nw, eps, HD) of
    linear.x_block if given; a programmatic dependent launch on Hopper."""
    n, k = seg.rows, x.shape[1]
    bn, bk = gemv_blocks(seg.fmt, n, k)
    q, s, q2, d, fmt, gs, rb = kernel_args(seg, bk)
    kind, g, stride_gh, nw, eps, hd = pro or (0, x, 0, x, 0., 1)
    on = pdl(x)
    qgemv_kernel[(triton.cdiv(n, bn),)](x, q, s, q2, d, out, n, g, stride_gh, nw, eps, K=k, FMT=fmt, BN=bn, BK=bk,
                                        GS=gs, RB=rb, PRO=kind, HD=hd, PDL=on, num_warps=GEMV_WARPS, launch_pdl=on)


def norm_qlinear(x: torch.Tensor, z: torch.Tensor, norm_w: torch.Tensor, eps: float, w: PlanarWeight,
                 gated: bool = True) -> torch.Tensor | None:
    """linear.norm_gemv on a quantized weight: one row x [1, H*Dh] through the gated RMS norm (gate z, weight norm_w
    per head) or the sigmoid gate z ([1, H, Dh] view), then w, the prologue inside the GEMV (or inside x's int8
    quantization, the GEMV on int8 x after it): a launch less. None where it does not apply (several segments,
    permuted columns, blocks not in whole heads)."""
    seg, k = w.segments[0], x.shape[1]
    if (len(w.segments) != 1 or w.col_perm is not None or seg.fmt == "plain" or x.shape[0] != 1
            or not x.is_contiguous() or z.stride(-1) != 1 or z.dtype != x.dtype or gated and not z.is_contiguous()):
        return None
    hd = norm_w.shape[0] if gated else z.shape[-1]
    pro = (1 if gated else 2, z, hd if gated else z.stride(-2), norm_w if gated else z, eps, hd)
    out = torch.empty(1, seg.rows, dtype=x.dtype, device=x.device)
    if I8_GEMV and takes_i8(x, seg):
        if k % QX_SPAN or gated and QX_SPAN % hd:
            return None
        qgemv_i8(quantize_x(x, seg.fmt != "q8_0", pro), seg, out)
    elif gated and gemv_blocks(seg.fmt, seg.rows, k)[1] % hd:
        return None
    else:
        gemv(x, seg, out, pro)
    return out


def segment_product(x: torch.Tensor, seg: PlanarSegment, out: torch.Tensor) -> None:
    """out [T, rows] (rows contiguous, any row stride) = x [T, K] @ seg^T."""
    t, k = x.shape
    n = seg.rows
    if t == 1:
        gemv(x, seg, out)
        return
    bk = block_k(seg.fmt, k, GEMM_BK)
    q, s, q2, d, fmt, gs, rb = kernel_args(seg, bk)
    bm = 16 if t <= 16 else 64
    qgemm_kernel[(triton.cdiv(t, bm), triton.cdiv(n, GEMM_BN))](
        x, x.stride(0), q, s, q2, d, out, out.stride(0), t, n, K=k, FMT=fmt, BM=bm, BN=GEMM_BN, BK=bk, GS=gs, RB=rb,
        PREC="ieee" if x.dtype == torch.float32 else "tf32", num_warps=4)


def qgemm_i8(xq: tuple[torch.Tensor, torch.Tensor, torch.Tensor], seg: PlanarSegment, out: torch.Tensor) -> None:
    """out [T, rows] (rows contiguous, any row stride) = x @ seg^T for rows x quantized by quantize_x (natural
    order)."""
    t, k = xq[0].shape[0], xq[0].shape[1] * 4
    q, s, q2, d, fmt, _, _ = kernel_args(seg, 32)
    bm = 16 if t <= 16 else 64
    qgemm_i8_kernel[(triton.cdiv(t, bm), triton.cdiv(seg.rows, GEMM_BN))](
        xq[0].view(torch.int8), xq[1], xq[2], q, s, q2, d, out, out.stride(0), t, seg.rows, K=k, FMT=fmt, BM=bm,
        BN=GEMM_BN, num_warps=4)
