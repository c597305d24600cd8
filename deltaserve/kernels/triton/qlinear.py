"""Products with quantized weights (PlanarWeight, kernels/gpu_quant.py) on CUDA: a GEMV for one row and a GEMM
(dequantize-in-tile, tensor cores) for more, on the tiles of qtiles.py; on int8 x the integer GEMV (qgemv_i8.py) up
to 8 rows and the integer GEMM (qgemm_i8.py) beyond, behind I8_GEMV.

Letters: T = activation rows, N = output features, K = inputs, BN/BK = the block of W one program reads per
step, GS = values per scale along K. Rows past N are clamped to N - 1 (loads stay in bounds; their results are not
stored). A row's result depends on its own x only: the K loop's order is the same at any T.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..gpu_quant import PlanarSegment, PlanarWeight
from .linear import linear as dense_linear, pdl, residual_rinv, x_block
from .qgemm_i8 import qgemm_i8
from .qgemv_i8 import I8_ROWS, QX_SPAN, qgemv_i8, quantize_x, takes_i8
from .qtiles import GEMM_BN, block_k, dot_step, kernel_args, w_tile


@triton.jit
def qgemv_kernel(x, q, s, q2, d, out, N, g, stride_gh, nw, eps, K: tl.constexpr, FMT: tl.constexpr,
                 BN: tl.constexpr, BK: tl.constexpr, GS: tl.constexpr, RB: tl.constexpr, PRO: tl.constexpr,
                 HD: tl.constexpr, PDL: tl.constexpr, SWIGLU: tl.constexpr = False, total=None):
    """out[n] = W[n] . x for one row x [K], x through linear.gemv_kernel's prologue PRO (0: none; 1: the gated RMS
    norm with gate g and weight nw per head of HD; 2: the sigmoid gate g; 3: the residual add x + g (stored to total)
    and RMS norm with weight nw). SWIGLU: W [2N, K] rows [gate | up], out[n] = SiLU(gate) * up of the two rows'
    products, each rounded to out's dtype first (as silu_mul does on a product's output). PDL: a programmatic
    dependent launch (Hopper): it lets the next kernel launch, then waits for the previous one before reading or
    writing."""
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    o_n = tl.program_id(0) * BN + tl.arange(0, BN)
    rows = tl.minimum(o_n, N - 1).to(tl.int64)
    rinv = 1.
    if PRO == 3:
        rinv = residual_rinv(x, g, total, eps, K, BK)
    acc = tl.zeros([BN, BK // GS], tl.float32)
    acc_u = acc
    for k0 in range(0, K, BK):
        xb = x_block(x, g, stride_gh, nw, eps, k0 + tl.arange(0, BK), BK, PRO, HD, rinv)
        acc += dot_step(q, s, q2, d, xb, rows, k0, K, FMT, BK, GS, RB)
        if SWIGLU:
            acc_u += dot_step(q, s, q2, d, xb, rows + N, k0, K, FMT, BK, GS, RB)
    y = tl.sum(acc, axis=1)
    if SWIGLU:
        g_r = y.to(out.dtype.element_ty).to(tl.float32)
        y = tl.sum(acc_u, axis=1).to(out.dtype.element_ty).to(tl.float32) * g_r * tl.sigmoid(g_r)
    tl.store(out + o_n, y.to(out.dtype.element_ty), mask=o_n < N)


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


GEMV_BN, GEMV_BK, GEMV_WARPS = 4, 1024, 4  # rows per program, columns per step, warps (bench_cuda_quant.py)


def gemv_blocks(fmt: str, n: int, k: int) -> tuple[int, int]:
    """(rows per program, columns per step) of the one-row GEMV: the whole row in one step, 2 rows a program, where
    K <= 4096 is one block (a power of two) and N <= 4096 or the format is q6_k (bench_cuda_quant.py --sweep, H100:
    12-17% faster there; 4-12% slower for fp8 / q8_0 / q4_k with N >= 12352); else GEMV_BN x GEMV_BK."""
    if k <= 4096 and block_k(fmt, k, k) == k and (n <= 4096 or fmt == "q6_k"):
        return 2, k
    return GEMV_BN, block_k(fmt, k, GEMV_BK)


GEMM_BK = 64  # columns per step of the dequantize-in-tile GEMM
# bf16/fp16 rows against q8_0 / q4_k / q6_k on int8 x: up to 8 rows the dp4a GEMV (qgemv_i8.py), more qgemm_i8 (and
# the MoE's pairs or grouped matmuls likewise); off until a GPU run has passed the q6_k GEMM (rewritten after one
# failed) and timed the int8 routes
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


def swiglu_qgemv(x: torch.Tensor, w: PlanarWeight, y: torch.Tensor | None = None, norm_w: torch.Tensor | None = None,
                 eps: float = 0.) -> tuple[torch.Tensor | None, torch.Tensor] | None:
    """A dense MLP's input half for one row in one launch: (None, SiLU(x Wg^T) * (x Wu^T) [1, I]) for w [2I, K] rows
    [gate | up]; with y (and norm_w, eps) x is first the residual add s = x + y and its RMS norm (linear.
    add_norm_swiglu's prologue): (s, the MLP half of norm(s)). None where it does not apply (several segments,
    permuted columns, more than one row; on int8 x, a prologue not in whole quantize_x programs). On int8 x
    (I8_GEMV): x's quantization (with the add + norm) and the integer GEMV with the SwiGLU, two launches."""
    seg, k = w.segments[0], x.shape[1]
    if (len(w.segments) != 1 or w.col_perm is not None or seg.fmt == "plain" or x.shape[0] != 1 or seg.rows % 2
            or not x.is_contiguous() or y is not None and (not y.is_contiguous() or y.dtype != x.dtype)):
        return None
    n = seg.rows // 2
    out = torch.empty(1, n, dtype=x.dtype, device=x.device)
    total = None if y is None else torch.empty_like(x)
    if I8_GEMV and takes_i8(x, seg):
        if y is not None and k % QX_SPAN:
            return None
        pro = None if y is None else (3, y, 0, norm_w, eps, 1)
        qgemv_i8(quantize_x(x, seg.fmt != "q8_0", pro, total), seg, out, swiglu=True)
        return total, out
    bn, bk = gemv_blocks(seg.fmt, seg.rows, k)  # the blocks of the product alone: each row's sums in its order
    q, s, q2, d, fmt, gs, rb = kernel_args(seg, bk)
    on = pdl(x)
    qgemv_kernel[(triton.cdiv(n, bn),)](x, q, s, q2, d, out, n, x if y is None else y, 0,
                                        x if norm_w is None else norm_w, eps, K=k, FMT=fmt, BN=bn, BK=bk, GS=gs, RB=rb,
                                        PRO=0 if y is None else 3, HD=1, PDL=on, SWIGLU=True, total=total,
                                        num_warps=GEMV_WARPS, launch_pdl=on)
    return total, out


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
