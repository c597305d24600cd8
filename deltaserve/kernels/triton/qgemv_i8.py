"""Few-row products with GGUF-quantized weights (q8_0, q4_k, q5_k, q6_k) on integer dot products, llama.cpp's MMVQ way:
x is quantized per 32 values to int8 (scale absmax / 127), and each weight word meets an x word in one `dp4a`
(4 byte products summed into an int32). A float GEMV (qtiles.dot_step) spends ~14 instructions per 4-bit weight
unpacking nibbles one by one, more than HBM's pace allows; here a 32-bit word of 8 nibbles takes 3 integer
operations and 2 dp4a, and floats appear once per group of 32 (or 16) values.

Letters: N = output rows, K = inputs, BN/BK = rows per program / columns per step, G = K / 32. Planes as in
kernels/gpu_quant.py, read as int32 words: q8_0 word i = values 4i..4i+3; the K-quants' word i = values 8i..8i+7
with the even values in the low nibbles. So x is packed in the matching order: natural (q8_0), or per 8 values
[x0 x2 x4 x6 | x1 x3 x5 x7] (SPLIT, the 4-bit formats), each packed word beside its nibbles' partner.
Only bf16 / fp16 rows take this path (float32 models keep the exact float GEMV), up to I8_ROWS of them (decode
batches), each row in programs of its own; the result differs from the float product by x's rounding to 8 bits,
as llama.cpp's does. A row's result depends on its own x only, bit for bit, at any T <= I8_ROWS. Steps of more
rows take qgemm_i8.py on the same int8 x (exact integer products per 32 on tensor cores, the same scales): a row's
result there equals this GEMV's up to the order of float sums; the MoE's grouped matmuls (more than 8 tokens) take
int8 x the same way (moe.py). All of it behind qlinear.I8_GEMV (off until a GPU has passed the q6_k GEMM and timed
the routes).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..gpu_quant import FORMATS, PlanarSegment
from .linear import pdl, residual_rinv, x_block

I8_FORMATS = ("q8_0", "q4_k", "q5_k", "q6_k")
ASM = True  # False: dp4a as four byte products in Triton (Triton's CPU interpreter cannot run inline PTX)


@triton.jit
def small_int(u):
    """Integers 0 <= u < 2^23 (any int type) -> float32 exactly, by an OR and a subtraction: the mantissa of
    2^23 + u (a conversion instruction runs at 1/8 of the FMA rate on Hopper, which a 4-bit GEMV would feel)."""
    return (u.to(tl.int32) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0


@triton.jit
def dp4a(a, b, c, UNSIGNED_A: tl.constexpr, ASM: tl.constexpr):
    """c + sum over the 4 bytes of a (unsigned or signed) times those of b (signed), int32 elementwise."""
    if ASM:
        if UNSIGNED_A:
            return tl.inline_asm_elementwise("dp4a.u32.s32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c],
                                             dtype=tl.int32, is_pure=True, pack=1)
        return tl.inline_asm_elementwise("dp4a.s32.s32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c],
                                         dtype=tl.int32, is_pure=True, pack=1)
    for i in tl.static_range(4):
        if UNSIGNED_A:
            a_i = (a >> (8 * i)) & 255
        else:
            a_i = (a << (24 - 8 * i)) >> 24
        c += a_i * ((b << (24 - 8 * i)) >> 24)
    return c


@triton.jit
def pack4(v):
    """int32 [..., 4] of values in -128..127 -> [...] words, value j in byte j (disjoint bits: the sum is an OR)."""
    return tl.sum((v & 255) << (tl.arange(0, 4) * 8), axis=-1)


@triton.jit
def quantize_x_kernel(x, stride_x, xq, xd, xs, K, g, stride_gh, nw, eps, BG: tl.constexpr, SPLIT: tl.constexpr,
                      PRO: tl.constexpr, HD: tl.constexpr, PDL: tl.constexpr, total=None):
    """Row r = program_id(1) of x [R, K] -> xq int32 [R, K / 4] words, xd float32 [R, G] scales (x ~ q * xd),
    xs int32 [R, K / 16] sums of q per 16. PRO > 0 (one row, K % (32 BG) == 0): x through linear.x_block's
    prologue first (PRO 3: the residual add, stored to total, and RMS norm). PDL: a programmatic dependent launch
    (waits for the previous kernel before reading x)."""
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    r = tl.program_id(1).to(tl.int64)
    x, xq, xd, xs = x + r * stride_x, xq + r * (K // 4), xd + r * (K // 32), xs + r * (K // 16)
    o_g = tl.program_id(0) * BG + tl.arange(0, BG)
    m_g = o_g < K // 32
    if PRO == 0:
        b_x = tl.load(x + o_g[:, None] * 32 + tl.arange(0, 32)[None, :], mask=m_g[:, None], other=0.).to(tl.float32)
    else:
        rinv = 1.
        if PRO == 3:
            rinv = residual_rinv(x, g, total, eps, K, BG * 32)
        o_k = tl.program_id(0) * BG * 32 + tl.arange(0, BG * 32)
        b_x = tl.reshape(x_block(x, g, stride_gh, nw, eps, o_k, BG * 32, PRO, HD, rinv), (BG, 32))
    amax = tl.max(tl.abs(b_x), axis=1)  # [BG]
    scale = tl.math.div_rn(amax, 127.)
    # IEEE division (Triton's `/` is the approximate div.full.f32): codes as the torch reference rounds them
    b_v = tl.math.div_rn(b_x, tl.where(amax > 0, scale, 1.)[:, None])
    b_q = tl.where(b_v >= 0, b_v + 0.5, b_v - 0.5).to(tl.int32)  # [BG, 32] rounded half away from zero
    tl.store(xd + o_g, scale, mask=m_g)
    sums = tl.sum(tl.reshape(b_q, (BG, 2, 16)), axis=2)
    tl.store(xs + o_g[:, None] * 2 + tl.arange(0, 2)[None, :], sums, mask=m_g[:, None])
    if SPLIT:  # per 8 values: word of the even ones, then word of the odd ones
        even, odd = tl.split(tl.reshape(b_q, (BG, 4, 4, 2)))  # [BG, 4 octets, 4]
        words = tl.reshape(tl.join(pack4(even), pack4(odd)), (BG, 8))
    else:
        words = pack4(tl.reshape(b_q, (BG, 8, 4)))
    tl.store(xq + o_g[:, None] * 8 + tl.arange(0, 8)[None, :], words, mask=m_g[:, None])


@triton.jit
def group_dots(qw, q2, xq, rows, k0, K, FMT: tl.constexpr, BK: tl.constexpr, ASM: tl.constexpr):
    """int32 [BN, BK / 16]: per 16 columns of W[rows, k0:k0+BK], the integer dot of the codes with x's (q6_k:
    codes 0..63, the -32 applied by the caller)."""
    BN: tl.constexpr = rows.shape[0]
    r = rows[:, None]
    if FMT == 2:  # q8_0: 4 signed codes a word
        w = tl.load(qw + r * (K // 4) + (k0 // 4 + tl.arange(0, BK // 4))[None, :])  # [BN, BK/4]
        p = dp4a(w, tl.load(xq + k0 // 4 + tl.arange(0, BK // 4))[None, :], tl.zeros_like(w), False, ASM)
        return tl.sum(tl.reshape(p, (BN, BK // 16, 4)), axis=2)
    w = tl.load(qw + r * (K // 8) + (k0 // 8 + tl.arange(0, BK // 8))[None, :])  # [BN, BK/8], 8 values a word
    xe, xo = tl.split(tl.reshape(tl.load(xq + k0 // 4 + tl.arange(0, BK // 4)), (BK // 8, 2)))
    lo = w & 0x0F0F0F0F  # the even values
    hi = (w >> 4) & 0x0F0F0F0F  # the odd ones
    if FMT == 4:  # q6_k: bits 4-5 from q2, whose 16 bits per word hold value 8i + v's at bits 2v
        h = tl.load(q2 + r * (K // 8) + (k0 // 8 + tl.arange(0, BK // 8))[None, :]).to(tl.int32) & 0xFFFF
        t = (h & 0xF) | ((h & 0xF0) << 4) | ((h & 0xF00) << 8) | ((h & 0xF000) << 12)  # nibble b -> byte b
        lo = lo | ((t & 0x03030303) << 4)
        hi = hi | ((t & 0x0C0C0C0C) << 2)
    elif FMT == 5:  # q5_k: bit 4 from q2, whose byte i holds value 8i + v's at bit v: even v to lo, odd to hi
        h = tl.load(q2 + r * (K // 8) + (k0 // 8 + tl.arange(0, BK // 8))[None, :]).to(tl.int32) & 0xFF
        lo = lo | ((h & 1) << 4) | ((h & 4) << 10) | ((h & 16) << 16) | ((h & 64) << 22)
        hi = hi | ((h & 2) << 3) | ((h & 8) << 9) | ((h & 32) << 15) | ((h & 128) << 21)
    p = dp4a(hi, xo[None, :], dp4a(lo, xe[None, :], tl.zeros_like(w), True, ASM), True, ASM)
    return tl.sum(tl.reshape(p, (BN, BK // 16, 2)), axis=2)


@triton.jit
def signed(v):
    """int32 |v| < 2^22 -> float32 exactly (qlinear.small_int shifted)."""
    return small_int(v + 4194304) - 4194304.


@triton.jit
def i8_step(qw, s, q2, d, xq, xd, xs, rows, k0, K, FMT: tl.constexpr, BK: tl.constexpr, ASM: tl.constexpr):
    """float32 [BN, BK / 32]: W[rows, k0:k0+BK] . x per group of 32 columns, scales applied; x is one row as
    quantize_x_kernel writes it (xq, xd, xs at that row); rows [BN] int64 in bounds."""
    BN: tl.constexpr = rows.shape[0]
    r = rows[:, None]
    og = (k0 // 32 + tl.arange(0, BK // 32))[None, :]  # [1, BK/32] groups of 32
    dots = group_dots(qw, q2, xq, rows, k0, K, FMT, BK, ASM)  # [BN, BK/16]
    x_d = tl.load(xd + og)
    if FMT == 4:  # q6_k: d * sc * (dot - 32 sum(x)) per 16; the two halves of a 32-group share x's scale
        o16 = (k0 // 16 + tl.arange(0, BK // 16))[None, :]
        part = signed(dots - 32 * tl.load(xs + o16)) * signed(tl.load(s + r * (K // 16) + o16).to(tl.int32))
        return tl.sum(tl.reshape(part, (BN, BK // 32, 2)), axis=2) * \
            tl.load(d + r * (K // 256) + og // 8).to(tl.float32) * x_d
    dot = signed(tl.sum(tl.reshape(dots, (BN, BK // 32, 2)), axis=2))  # [BN, BK/32]
    if FMT == 2:  # q8_0: s float16 [N, G]
        return dot * tl.load(s + r * (K // 32) + og).to(tl.float32) * x_d
    # q4_k, q5_k: d * sc * dot - dmin * m * sum(x)
    x_sum = signed(tl.sum(tl.reshape(tl.load(xs + k0 // 16 + tl.arange(0, BK // 16)), (BK // 32, 2)), axis=1))
    p_s = s + (r * (K // 32) + og) * 2
    p_d = d + (r * (K // 256) + og // 8) * 2
    return (tl.load(p_d).to(tl.float32) * small_int(tl.load(p_s)) * dot -
            tl.load(p_d + 1).to(tl.float32) * small_int(tl.load(p_s + 1)) * x_sum[None, :]) * x_d


@triton.jit
def qgemv_i8_kernel(xq, xd, xs, qw, s, q2, d, out, stride_o, N, K: tl.constexpr, FMT: tl.constexpr,
                    BN: tl.constexpr, BK: tl.constexpr, ASM: tl.constexpr, PDL: tl.constexpr,
                    SWIGLU: tl.constexpr = False):
    """out[t, n] = W[n] . x[t] for rows x given as quantize_x_kernel's (xq, xd, xs); program (t, row block): a row's
    programs are the same at any T, and the T programs of a row block run side by side (W's rows from L2 after the
    first). K % BK == 0, BK % 256 == 0 (4-bit) or % 32 (q8_0). PDL: as quantize_x_kernel. SWIGLU: as
    qlinear.qgemv_kernel's (W [2N, K] rows [gate | up])."""
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    t = tl.program_id(0).to(tl.int64)
    xq, xd, xs = xq + t * (K // 4), xd + t * (K // 32), xs + t * (K // 16)
    o_n = tl.program_id(1) * BN + tl.arange(0, BN)
    rows = tl.minimum(o_n, N - 1).to(tl.int64)
    acc = tl.zeros([BN, BK // 32], tl.float32)
    acc_u = acc
    for k0 in range(0, K, BK):
        acc += i8_step(qw, s, q2, d, xq, xd, xs, rows, k0, K, FMT, BK, ASM)
        if SWIGLU:
            acc_u += i8_step(qw, s, q2, d, xq, xd, xs, rows + N, k0, K, FMT, BK, ASM)
    y = tl.sum(acc, axis=1)
    if SWIGLU:
        g_r = y.to(out.dtype.element_ty).to(tl.float32)
        y = tl.sum(acc_u, axis=1).to(out.dtype.element_ty).to(tl.float32) * g_r * tl.sigmoid(g_r)
    tl.store(out + t * stride_o + o_n, y.to(out.dtype.element_ty), mask=o_n < N)


I8_BN, I8_BK = 4, 2048  # rows per program, columns per step (bench_cuda_quant.py --sweep)


def i8_blocks(fmt: str, k: int, bn: int = I8_BN, bk: int = I8_BK) -> tuple[int, int]:
    """(BN, BK) for a K: the widest BK <= bk dividing K in whole super-blocks (256; q8_0: 32), 0 if none."""
    least = 32 if fmt == "q8_0" else 256
    return bn, next((b for b in (4096, 2048, 1024, 512, 256, 128, 64, 32) if least <= b <= bk and k % b == 0), 0)


def rounded_x(x: torch.Tensor) -> torch.Tensor:
    """The torch reference of quantize_x: float32 [..., K] of x as the integer GEMV sees it (q * scale per 32)."""
    g = x.float().unflatten(-1, (-1, 32))
    amax = g.abs().amax(-1, keepdim=True)
    scale = amax / torch.full_like(amax, 127)  # IEEE division: torch's `/ 127` on CUDA multiplies by 1/127
    v = g / torch.where(scale > 0, scale, 1)
    return (torch.where(v >= 0, v + 0.5, v - 0.5).trunc() * scale).flatten(-2)


QX_GROUPS = 16  # groups of 32 values per quantize_x program
QX_SPAN = 32 * QX_GROUPS  # with a prologue, K and its heads must fit whole programs


def quantize_x(x: torch.Tensor, split: bool, pro: tuple | None = None,
               total: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [R, K] (K % 32 == 0, unit column stride) -> (xq int32 [R, K/4], xd float32 [R, K/32], xs int32 [R, K/16])
    as the kernels read them; pro: one row through the prologue (PRO, g, stride_gh, nw, eps, HD) of linear.x_block
    first (qlinear.norm_qlinear; PRO 3 stores the residual sum to total: qlinear.swiglu_qgemv)."""
    r, k = x.shape
    xq = torch.empty(r, k // 4, dtype=torch.int32, device=x.device)
    xd = torch.empty(r, k // 32, dtype=torch.float32, device=x.device)
    xs = torch.empty(r, k // 16, dtype=torch.int32, device=x.device)
    kind, g, stride_gh, nw, eps, hd = pro or (0, x, 0, x, 0., 1)
    on = pdl(x)
    quantize_x_kernel[(triton.cdiv(k // 32, QX_GROUPS), r)](x, x.stride(0), xq, xd, xs, k, g, stride_gh, nw, eps,
                                                             BG=QX_GROUPS, SPLIT=split, PRO=kind, HD=hd, PDL=on,
                                                             total=total, num_warps=2, launch_pdl=on)
    return xq, xd, xs


def planes_i8(seg: PlanarSegment) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes as int32 words, group scales, q6_k's high bits as int16 words, super-block scales) of a segment, planes
    a format lacks passed as the scales."""
    return (seg.q.view(torch.int32), seg.s, seg.q2.view(torch.int16) if seg.fmt == "q6_k" else
            seg.q2 if seg.q2 is not None else seg.s,
            seg.d if seg.d is not None else seg.s)


I8_ROWS = 8  # up to this many rows (decode batches) take the integer GEMV, each row by itself; more: qgemm_i8


def takes_i8(x: torch.Tensor, seg: PlanarSegment) -> bool:
    """Whether the product of x and seg takes int8 x (this GEMV up to I8_ROWS rows, qlinear's qgemm_i8 beyond):
    bf16/fp16 rows, a GGUF format, K in whole blocks."""
    return x.dtype in (torch.bfloat16, torch.float16) and seg.fmt in I8_FORMATS and \
        i8_blocks(seg.fmt, x.shape[1])[1] > 0


def qgemv_i8(xq: tuple[torch.Tensor, torch.Tensor, torch.Tensor], seg: PlanarSegment, out: torch.Tensor,
             bn: int = I8_BN, bk: int = I8_BK, num_warps: int = 4, swiglu: bool = False) -> None:
    """out [T, rows] (rows contiguous, any row stride) = x @ seg^T for rows x quantized by quantize_x (split order for
    the 4-bit formats); swiglu: out [T, rows / 2] = SiLU(gate) * up of seg's rows [gate | up]."""
    t, k = xq[0].shape[0], xq[0].shape[1] * 4
    n = seg.rows // 2 if swiglu else seg.rows
    bn, bk = i8_blocks(seg.fmt, k, bn, bk)
    on = pdl(out)
    qgemv_i8_kernel[(t, triton.cdiv(n, bn))](*xq, *planes_i8(seg), out, out.stride(0), n, K=k,
                                             FMT=FORMATS.index(seg.fmt), BN=bn, BK=bk, ASM=ASM, PDL=on, SWIGLU=swiglu,
                                             num_warps=num_warps, launch_pdl=on)
