"""The sparse MoE block for a few tokens (decode) on CUDA: each (token, expert) pair as its own GEMV rows, so a
token's result never depends on the other tokens (bit for bit the same alone or in a batch).

Letters: T = tokens, K = experts per token, P = T*K pairs, D = hidden, I = expert width.
Router GEMV per token, route, pair GEMVs for gate/up (SwiGLU) and down (scaled by the routing weight), each
token's shared expert as rows after the pairs, and a combine that computes the shared gate's dot itself:
5 launches. With quantized stacks too where the shared expert is in their format and widths; else it runs beside
the pairs (its own products).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..gpu_quant import PlanarWeight
from .linear import gemv_block, pdl
from .moe_route import combine_kernel, linear, route, shared_expert, stack_args
from . import qgemv_i8 as qi
from . import qlinear as ql
from .qgemv_i8 import I8_FORMATS, i8_blocks, i8_step, planes_i8, quantize_x
from .qtiles import block_k, dot_step


@triton.jit
def q_step(w, qs, q2, qd, x, stride_x, xd, xs, src, rows, k0, K, FMT: tl.constexpr, BK: tl.constexpr,
           GS: tl.constexpr, RB: tl.constexpr, I8: tl.constexpr, ASM: tl.constexpr):
    """Per-group products of quantized rows with x's row src over columns k0:k0+BK: integer dots on int8 x (I8:
    qgemv_i8.i8_step, [BN, BK/32]) or float ones (qtiles.dot_step, [BN, BK/GS])."""
    if I8:
        out = i8_step(w, qs, q2, qd, x + src * (K // 4), xd + src * (K // 32), xs + src * (K // 16), rows, k0, K,
                      FMT, BK, ASM)
    else:
        xb = tl.load(x + src * stride_x + k0 + tl.arange(0, BK)).to(tl.float32)
        out = dot_step(w, qs, q2, qd, xb, rows, k0, K, FMT, BK, GS, RB)
    return out


@triton.jit
def pair_gemv_kernel(x, stride_x, experts, scale, w, stride_we, stride_wn, ws, stride_wsn, out, N, P,
                     TOP_K: tl.constexpr, K: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GATED: tl.constexpr,
                     PDL: tl.constexpr, qs, q2, qd, FMT: tl.constexpr = 0, GS: tl.constexpr = 1, RB: tl.constexpr = 1,
                     xd=None, xs=None, I8: tl.constexpr = False, ASM: tl.constexpr = True,
                     sq=None, ss=None, sq2=None, sd=None, SHARED_Q: tl.constexpr = False):
    """Few tokens: one GEMV per (token, expert) pair, no layout. Program (row block, pair p): pairs p < P are
    routed (expert experts[p]); p >= P is the shared expert (weights ws) of token p - P.
    GATED: x = tokens, out[p] = SiLU(x[t] W_gate^T) * (x[t] W_up^T) (W rows [gate (N) | up (N)]);
    else x = those [P + T, K] rows, out[p] = (x[p] W^T) * scale[p] (routed; the shared row is left unscaled).
    PDL: launched early; waits for the previous kernel before reading anything (the expert ids come from it).
    FMT > 0: the routed stack is quantized (planes w, qs, q2, qd; see qtiles.dot_step); SHARED_Q: so is the shared
    expert, in the same format and widths (planes sq, ss, sq2, sd), else there are no shared programs.
    I8: x's rows are int8 as qgemv_i8.quantize_x writes them (x = the words, xd, xs) and meet the stack's planes (as
    qgemv_i8.planes_i8 gives them) in integer dot products."""
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    i_b, p = tl.program_id(0), tl.program_id(1)
    shared = p >= P
    e = tl.load(experts + p, mask=p < P, other=0).to(tl.int64)
    if GATED:
        src = tl.where(shared, p - P, p // TOP_K).to(tl.int64)
    else:
        src = p.to(tl.int64)
    base = tl.where(shared, ws, w + e * stride_we)
    sn = tl.where(shared, stride_wsn, stride_wn)
    o_n = i_b * BN + tl.arange(0, BN)
    m_n = o_n < N
    p_w = base + o_n[:, None].to(tl.int64) * sn
    p_u = base + (N + o_n)[:, None].to(tl.int64) * sn
    if FMT == 0:
        acc = tl.zeros([BN, BK], tl.float32)
        acc_u = tl.zeros([BN, BK], tl.float32)
        for k0 in range(0, K, BK):  # K % BK == 0
            o_k = k0 + tl.arange(0, BK)
            b_x = tl.load(x + src * stride_x + o_k).to(tl.float32)[None, :]
            acc, acc_u = gemv_block(acc, acc_u, p_w, p_u, o_k, m_n, b_x, GATED)
    else:  # quantized: per-group dots over rows of the stack
        rows = tl.where(shared, 0, e * (2 * N if GATED else N)) + tl.minimum(o_n, N - 1)
        if SHARED_Q:  # the shared expert's planes for its programs (uniform per program)
            w, qs, q2, qd = tl.where(shared, sq, w), tl.where(shared, ss, qs), tl.where(shared, sq2, q2), \
                tl.where(shared, sd, qd)
        acc = q_step(w, qs, q2, qd, x, stride_x, xd, xs, src, rows, 0, K, FMT, BK, GS, RB, I8, ASM)
        acc_u = acc
        if GATED:
            acc_u = q_step(w, qs, q2, qd, x, stride_x, xd, xs, src, rows + N, 0, K, FMT, BK, GS, RB, I8, ASM)
        for k0 in range(BK, K, BK):
            acc += q_step(w, qs, q2, qd, x, stride_x, xd, xs, src, rows, k0, K, FMT, BK, GS, RB, I8, ASM)
            if GATED:
                acc_u += q_step(w, qs, q2, qd, x, stride_x, xd, xs, src, rows + N, k0, K, FMT, BK, GS, RB, I8, ASM)
    y = tl.sum(acc, axis=1)
    if GATED:
        u = tl.sum(acc_u, axis=1)
        # shared rows as moe_route.shared_expert makes them for more tokens (gate and up rounded to the activations'
        # dtype, then gate_mul's product), routed ones as the grouped matmuls: a token's result alike at any T
        g_r, u_r = y.to(out.dtype.element_ty).to(tl.float32), u.to(out.dtype.element_ty).to(tl.float32)
        y = tl.where(shared, u_r * g_r * tl.sigmoid(g_r), y * tl.sigmoid(y) * u)
    if not GATED:
        y = y * tl.load(scale + p, mask=p < P, other=1.)
    tl.store(out + p.to(tl.int64) * N + o_n, y.to(out.dtype.element_ty), mask=m_n)


@triton.jit
def combine_dot_kernel(y, x, sg, out, D, K: tl.constexpr, SD: tl.constexpr, BD: tl.constexpr,
                       BS: tl.constexpr):
    """Few tokens after pair_gemv: out[t] = sum_k y[t*K + k] (fixed order) + sigmoid(x[t] . sg) * y[T*K + t],
    the shared gate's dot computed here (no launch of its own)."""
    i_t = tl.program_id(0).to(tl.int64)
    T = tl.num_programs(0)
    o_s = tl.arange(0, BS)
    dot = tl.zeros([BS], tl.float32)
    for s0 in range(0, SD, BS):
        m_s = s0 + o_s < SD
        dot += tl.load(x + i_t * SD + s0 + o_s, mask=m_s, other=0.).to(tl.float32) * \
            tl.load(sg + s0 + o_s, mask=m_s, other=0.).to(tl.float32)
    gate = tl.sum(dot, axis=0).to(sg.dtype.element_ty).to(tl.float32)  # rounded as the gate linear's output
    o_d = tl.program_id(1) * BD + tl.arange(0, BD)
    m_d = o_d < D
    acc = tl.load(y + (T * K + i_t) * D + o_d, mask=m_d).to(tl.float32) * tl.sigmoid(gate)
    for j in tl.static_range(K):
        acc += tl.load(y + (i_t * K + j) * D + o_d, mask=m_d).to(tl.float32)
    tl.store(out + i_t * D + o_d, acc.to(out.dtype.element_ty), mask=m_d)


PAIR_GEMV_TOKENS = 8  # up to this many tokens, each (token, expert) pair runs as its own GEMV


def _gemv_bk(w, k: int) -> int:
    if isinstance(w, PlanarWeight):
        return block_k(w.fmt, k, 1024)
    return next((b for b in (1024, 512, 256, 128, 64, 32, 16) if k % b == 0), 0)


def _dense_rows(*ws) -> bool:
    return all(isinstance(w, torch.Tensor) and w.stride(-1) == 1 for w in ws)


def _like_an_expert(w, stack) -> bool:
    """Whether a shared-expert weight can run as one more pair beside a quantized stack's: one segment of the
    stack's format and row blocks, an expert's shape, columns in order."""
    if not isinstance(w, PlanarWeight) or not isinstance(stack, PlanarWeight) or len(w.segments) != 1:
        return False
    seg, ref = w.segments[0], stack.segments[0]
    return w.col_perm is None and w.shape == stack.shape[1:] and seg.fmt == ref.fmt and seg.row_block == ref.row_block


def few_tokens(x, router, gate_up, down, shared_gate_up, shared_down, shared_gate, top_k, norm_topk):
    """The block for a few tokens in 5 launches: router GEMV (per token), route, pair GEMVs (gate/up with SwiGLU, then
    down scaled by the routing weight) over the T*K routed pairs plus T shared-expert rows, combine (with the
    shared gate's dot). Each pair reads its expert's rows itself: no counts, layout or grouping, and a
    token's result never depends on the other tokens. Quantized stacks: the shared expert runs as one more pair per
    token where its weights are in the stack's format and widths (Qwen's checkpoints), else beside the pairs (two
    products and a gate more). None where it does not apply (no block size divides the widths; float
    stacks with a shared expert of another width or strided rows): then the grouped path."""
    t, d = x.shape
    i = gate_up.shape[1] // 2
    bk_in, bk_mid = _gemv_bk(gate_up, d), _gemv_bk(down, i)
    fused = _dense_rows(gate_up, down, shared_gate_up, shared_down) and shared_gate_up.shape[0] == 2 * i or \
        _like_an_expert(shared_gate_up, gate_up) and _like_an_expert(shared_down, down)
    if not bk_in or not bk_mid or not x.is_contiguous() or not (fused or isinstance(gate_up, PlanarWeight)):
        return None
    e = router.shape[0]
    on = pdl(x)
    if _dense_rows(router):  # router GEMV: each token's row by itself
        logits = torch.empty(t, e, dtype=x.dtype, device=x.device)
        pair_gemv_kernel[(triton.cdiv(e, 2 * PAIR_BN), t)](
            x, x.stride(0), x, x, router, 0, 0, router, router.stride(0), logits, e, 0, TOP_K=1, K=d,
            BN=2 * PAIR_BN, BK=_gemv_bk(router, d), GATED=False, PDL=on, qs=x, q2=x, qd=x, num_warps=4, launch_pdl=on)
    else:
        logits = linear(x, router)
    weights, experts = route(logits, top_k, norm_topk, None)
    p = t * top_k
    hidden = torch.empty(p + t if fused else p, i, dtype=x.dtype, device=x.device)  # [pairs (+ shared rows), I]
    i8 = takes_i8_stacks(x, gate_up, down)
    _pair_gemv(x, experts, weights, gate_up, shared_gate_up if fused else None, hidden, i, p, top_k, PAIR_BN,
               i8_blocks(gate_up.fmt, d)[1] if i8 else bk_in, gated=True, int8_x=i8)
    y = torch.empty(p + t, d, dtype=x.dtype, device=x.device)
    _pair_gemv(hidden, experts, weights, down, shared_down if fused else None, y, d, p, top_k, 2 * PAIR_BN,
               i8_blocks(down.fmt, i)[1] if i8 else bk_mid, gated=False, int8_x=i8)
    if not fused:  # the shared expert's own products, at its own width (not the experts')
        y[p:] = shared_expert(x, shared_gate_up, shared_down)
    out = torch.empty_like(x)
    bd = min(1024, triton.next_power_of_2(d))
    if _dense_rows(shared_gate):
        combine_dot_kernel[(t, triton.cdiv(d, bd))](y, x, shared_gate, out, d, K=top_k, SD=d, BD=bd,
                                                   BS=min(1024, triton.next_power_of_2(d)), num_warps=4)
    else:
        combine_kernel[(t, triton.cdiv(d, bd))](y, y[p:], linear(x, shared_gate), out, d, K=top_k, BD=bd, num_warps=4)
    return out


def takes_i8_stacks(x: torch.Tensor, gate_up, down) -> bool:
    """Whether the MoE block runs on int8 x (qgemv_i8.py): bf16/fp16 tokens, both stacks in a format it computes on."""
    return ql.I8_GEMV and x.dtype in (torch.bfloat16, torch.float16) and all(
        isinstance(w, PlanarWeight) and w.fmt in I8_FORMATS and i8_blocks(w.fmt, w.shape[-1])[1]
        for w in (gate_up, down))


def _pair_gemv(x, experts, weights, stack, shared, out, n, p, top_k, bn, bk, gated: bool, int8_x: bool = False):
    """out [P + T, n]: rows of the P routed pairs (and, with `shared`, the T shared-expert rows after them). gated:
    x = the tokens [T, D], SwiGLU of gate/up; else x = [P + T, I], down scaled by the routing weight. int8_x: x's
    rows quantized first (quantize_x) and the pairs' products integer dots."""
    args = _weight_args(stack, bk, int8_x)
    xq = quantize_x(x, stack.fmt != "q8_0") if int8_x else None
    shared_q = {}
    if isinstance(shared, PlanarWeight):  # the shared expert's planes (few_tokens checked: as an expert's)
        sargs = _weight_args(shared, bk, int8_x)
        shared_q = dict(zip(("sq", "ss", "sq2", "sd"), (sargs[k] for k in PLANES)), SHARED_Q=True)
    dense_shared = isinstance(shared, torch.Tensor)
    grid = (triton.cdiv(n, bn), p + (out.shape[0] - p) * (shared is not None))
    on = pdl(x)
    pair_gemv_kernel[grid](
        x if xq is None else xq[0], x.stride(0), experts, weights, args["w"], args["stride_we"], args["stride_wn"],
        shared if dense_shared else args["w"], shared.stride(0) if dense_shared else 0, out, n, p,
        TOP_K=top_k, K=x.shape[1], BN=bn, BK=bk, GATED=gated, PDL=on, qs=args["ws"], q2=args["wq2"], qd=args["wd"],
        FMT=args["FMT"], GS=args["GS"], RB=args["RB"], xd=None if xq is None else xq[1],
        xs=None if xq is None else xq[2], I8=int8_x, ASM=qi.ASM, num_warps=4, launch_pdl=on, **shared_q)


PLANES = ("w", "ws", "wq2", "wd")  # stack_args' names of a weight's planes


def _weight_args(w, bk: int, int8_x: bool) -> dict:
    """stack_args of a stack or matrix, its planes as the integer kernels read them with int8_x."""
    args = stack_args(w, bk)
    if int8_x:
        args.update(zip(PLANES, planes_i8(w.segments[0])))
    return args


PAIR_BN = 2  # gate/up: rows of each half per program (down: twice as many rows, of half the length)
