"""The sparse MoE block on CUDA: routing, two grouped matmuls over (token, expert) pairs, shared expert, combine.

Letters: T = tokens, K = experts per token, P = T*K pairs, E = experts, D = hidden, I = expert width,
MB = row blocks (an upper bound known on the host). Nothing syncs with the host, so a decode step
can be captured in a CUDA graph.
1. route: softmax over the router logits, top-k, renormalise; counts pairs per expert (atomics).
2. layout: prefix sums -> each expert's rows and row blocks, a block -> expert table; each pair then
   takes a row inside its expert's range.
3. gate/up matmul: gathers token rows itself, applies SiLU(gate) * up -> [P, I] in expert order.
4. down matmul: scales by the routing weight, stores each row back at its pair index -> [P, D].
5. combine: sum over a token's K pairs in a fixed order (no atomics on values, so a token's result
   does not depend on the batch) + sigmoid(shared gate) * shared expert.
Up to PAIR_GEMV_TOKENS tokens (decode) with the shared expert as wide as a routed one, `_few_tokens`
replaces 1-5: router GEMV per token, route, then each (token, expert) pair and each token's shared
expert as its own GEMV rows (gate/up with SiLU * up, then down scaled by the routing weight), and a
combine that computes the shared gate's dot itself: 5 launches instead of 11, no counts or layout,
and every token computed independently of the others (bit for bit the same alone or in a batch).
Reference: `SparseMoE.forward` on CPU (layers/feed_forward.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .linear import gemv_block, gemv_rows, linear, pdl, swiglu_gemv
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
def layout_kernel(counts, expert_start, block_start, block_expert, E, MB,
                  BM: tl.constexpr, BE: tl.constexpr, BB: tl.constexpr):
    o_e = tl.arange(0, BE)
    m_e = o_e < E
    n = tl.load(counts + o_e, mask=m_e, other=0)
    tl.store(expert_start + 1 + o_e, tl.cumsum(n, axis=0), mask=m_e)
    ends = tl.cumsum((n + BM - 1) // BM, axis=0)  # block ranges [ends[e-1], ends[e]) of each expert
    tl.store(block_start + 1 + o_e, ends, mask=m_e)
    tl.store(expert_start, 0)
    tl.store(block_start, 0)
    for b0 in range(0, MB, BB):
        o_b = b0 + tl.arange(0, BB)
        owner = tl.sum(((ends[None, :] <= o_b[:, None]) & m_e[None, :]).to(tl.int32), axis=1)  # E: a spare block
        tl.store(block_expert + o_b, owner, mask=o_b < MB)


@triton.jit
def place_kernel(experts, expert_start, fill, pairs, P, BP: tl.constexpr):
    o_p = tl.program_id(0) * BP + tl.arange(0, BP)
    m_p = o_p < P
    e = tl.load(experts + o_p, mask=m_p, other=0)
    row = tl.load(expert_start + e, mask=m_p, other=0) + tl.atomic_add(fill + e, 1, mask=m_p)
    tl.store(pairs + row, o_p, mask=m_p)  # pairs[row] = the pair computed in that row


@triton.jit
def grouped_matmul_kernel(
    a, stride_a, pairs, w, stride_we, stride_wn, out, stride_o, pair_scale, expert_start, block_expert, block_start,
    N, KD, E, TOP_K,
    GATED: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr,
):
    """GATED: rows of `a` gathered by pair (token = pair // K), out = SiLU(a W_gate^T) * (a W_up^T) in expert
    order; else a in expert order, out = (a W^T) * pair_scale stored at the pair's own row."""
    i_m, i_n = tl.program_id(0), tl.program_id(1)
    e = tl.load(block_expert + i_m)
    if e < E:  # blocks past the last expert's rows are spare (the grid is sized for the worst case)
        r0 = tl.load(expert_start + e) + (i_m - tl.load(block_start + e)) * BM
        o_m = r0 + tl.arange(0, BM)
        m_m = o_m < tl.load(expert_start + e + 1)
        pair = tl.load(pairs + o_m, mask=m_m, other=0).to(tl.int64)
        src = pair // TOP_K if GATED else o_m.to(tl.int64)
        o_n = i_n * BN + tl.arange(0, BN)
        m_n = o_n < N
        p_w = w + e.to(tl.int64) * stride_we + o_n[:, None] * stride_wn  # [BN, 1] row starts of W[e]
        acc = tl.zeros([BM, BN], tl.float32)
        acc_up = tl.zeros([BM, BN], tl.float32)
        for k0 in range(0, KD, BK):
            o_k = k0 + tl.arange(0, BK)
            m_k = o_k < KD
            b_a = tl.load(a + src[:, None] * stride_a + o_k[None, :], mask=m_m[:, None] & m_k[None, :], other=0.)
            b_w = tl.load(p_w + o_k[None, :], mask=m_n[:, None] & m_k[None, :], other=0.)  # [BN, BK], k contiguous
            acc = tl.dot(b_a, tl.trans(b_w), acc, input_precision=PREC)
            if GATED:  # rows [gate (N) | up (N)] of W[e]
                b_u = tl.load(p_w + N * stride_wn + o_k[None, :], mask=m_n[:, None] & m_k[None, :], other=0.)
                acc_up = tl.dot(b_a, tl.trans(b_u), acc_up, input_precision=PREC)
        if GATED:
            acc = acc * tl.sigmoid(acc) * acc_up
            dst = o_m.to(tl.int64)
        else:  # back to pair order, scaled by the routing weight
            acc = acc * tl.load(pair_scale + pair, mask=m_m, other=0.)[:, None]
            dst = pair
        tl.store(out + dst[:, None] * stride_o + o_n[None, :], acc.to(out.dtype.element_ty),
                 mask=m_m[:, None] & m_n[None, :])


@triton.jit
def pair_gemv_kernel(x, stride_x, experts, scale, w, stride_we, stride_wn, ws, stride_wsn, out, N, P,
                     TOP_K: tl.constexpr, K: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GATED: tl.constexpr,
                     PDL: tl.constexpr):
    """Few tokens: one GEMV per (token, expert) pair, no layout. Program (row block, pair p): pairs p < P are
    routed (expert experts[p]); p >= P is the shared expert (weights ws) of token p - P.
    GATED: x = tokens, out[p] = SiLU(x[t] W_gate^T) * (x[t] W_up^T) (W rows [gate (N) | up (N)]);
    else x = those [P + T, K] rows, out[p] = (x[p] W^T) * scale[p] (routed; the shared row is left unscaled).
    PDL: launched early; waits for the previous kernel before reading anything (the expert ids come from it)."""
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
    acc = tl.zeros([BN, BK], tl.float32)
    acc_u = tl.zeros([BN, BK], tl.float32)
    for k0 in range(0, K, BK):  # K % BK == 0
        o_k = k0 + tl.arange(0, BK)
        b_x = tl.load(x + src * stride_x + o_k).to(tl.float32)[None, :]
        acc, acc_u = gemv_block(acc, acc_u, p_w, p_u, o_k, m_n, b_x, GATED)
    y = gemv_rows(acc, acc_u, GATED)
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


def expert_layout(experts: torch.Tensor, counts: torch.Tensor, fill: torch.Tensor):
    """Pairs grouped by expert: (pairs [P], expert_start [E+1], block_expert [MB], block_start [E+1], BM);
    rows expert_start[e]..expert_start[e+1] hold expert e's pairs, pairs[row] says which."""
    p, e = experts.numel(), counts.shape[0]
    used = min(e, p)  # at most this many experts own rows
    bm = 16 if p < 32 * used else 64  # few rows per expert (decode): small blocks
    max_blocks = triton.cdiv(p, bm) + used  # sum over experts of ceil(rows / BM), at most
    tables = torch.empty(2 * (e + 1) + max_blocks + p, dtype=torch.int32, device=experts.device)
    expert_start, block_start, block_expert, pairs = tables.split([e + 1, e + 1, max_blocks, p])
    layout_kernel[(1,)](counts, expert_start, block_start, block_expert, e, max_blocks, BM=bm,
                        BE=triton.next_power_of_2(e), BB=16, num_warps=4)
    place_kernel[(triton.cdiv(p, 1024),)](experts, expert_start, fill, pairs, p, BP=1024)
    return pairs, expert_start, block_expert, block_start, bm


def grouped_matmul(a, w, n, layout, top_k, pair_scale=None):
    pairs, expert_start, block_expert, block_start, bm = layout
    out = torch.empty(pairs.shape[0], n, dtype=a.dtype, device=a.device)
    fp32 = a.dtype == torch.float32
    bn, bk = 32 if fp32 or bm == 16 else 64, 32 if fp32 else 64  # narrow blocks: more programs at decode
    grouped_matmul_kernel[(block_expert.shape[0], triton.cdiv(n, bn))](
        a, a.stride(0), pairs, w, w.stride(0), w.stride(1), out, out.stride(0),
        pair_scale if pair_scale is not None else a, expert_start, block_expert, block_start, n, a.shape[1],
        w.shape[0], top_k, GATED=pair_scale is None, BM=bm, BN=bn, BK=bk, PREC="ieee" if fp32 else "tf32",
        num_warps=4,
    )
    return out


def sparse_moe(x: torch.Tensor, router: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor,
               shared_gate_up: torch.Tensor, shared_down: torch.Tensor, shared_gate: torch.Tensor,
               top_k: int, norm_topk: bool) -> torch.Tensor:
    """x [T, D]; router [E, D]; gate_up [E, 2I, D] (rows [gate | up]); down [E, D, I]; shared_gate_up [2S, D];
    shared_down [D, S]; shared_gate [1, D]. Returns [T, D] in x's dtype."""
    t, d = x.shape
    e = router.shape[0]
    if t <= PAIR_GEMV_TOKENS and (out := _few_tokens(x, router, gate_up, down, shared_gate_up, shared_down,
                                                     shared_gate, top_k, norm_topk)) is not None:
        return out
    work = torch.zeros(2, e, dtype=torch.int32, device=x.device)  # pair counts and fill per expert
    weights, experts = route(linear(x, router), top_k, norm_topk, work[0])
    layout = expert_layout(experts.view(-1), work[0], work[1])
    hidden = grouped_matmul(x, gate_up, gate_up.shape[1] // 2, layout, top_k)  # [P, I], expert order
    y = grouped_matmul(hidden, down, d, layout, top_k, pair_scale=weights.view(-1))  # [P, D], pair order
    h = swiglu_gemv(x, shared_gate_up)  # one row: one launch; else None
    if h is None:
        h = linear(x, shared_gate_up)
        h = gate_mul(h[:, h.shape[1] // 2:], h[:, :h.shape[1] // 2], sigmoid=False)
    shared = linear(h, shared_down)
    out = torch.empty_like(x)
    bd = min(1024, triton.next_power_of_2(d))
    combine_kernel[(t, triton.cdiv(d, bd))](y, shared, linear(x, shared_gate), out, d, K=top_k, BD=bd,
                                            num_warps=4)
    return out


PAIR_GEMV_TOKENS = 8  # up to this many tokens, each (token, expert) pair runs as its own GEMV


def _gemv_bk(k: int) -> int:
    return next((b for b in (1024, 512, 256, 128, 64, 32, 16) if k % b == 0), 0)


def _few_tokens(x, router, gate_up, down, shared_gate_up, shared_down, shared_gate, top_k, norm_topk):
    """The block for a few tokens in 5 launches: router GEMV (per token), route, pair GEMVs (gate/up with SwiGLU, then
    down scaled by the routing weight) over the T*K routed pairs plus T shared-expert rows, combine (with the
    shared gate's dot). Each pair reads its expert's rows itself: no counts, layout or grouping, and a
    token's result never depends on the other tokens. None where it does not apply (shared width != expert
    width, or no block size divides the widths): then the grouped path."""
    t, d = x.shape
    i = gate_up.shape[1] // 2
    bk_in, bk_mid = _gemv_bk(d), _gemv_bk(i)
    if (shared_gate_up.shape[0] != 2 * i or not bk_in or not bk_mid or not x.is_contiguous()
            or gate_up.stride(2) != 1 or down.stride(2) != 1 or shared_gate_up.stride(1) != 1
            or shared_down.stride(1) != 1 or router.stride(1) != 1):
        return None
    e = router.shape[0]
    on = pdl(x)
    logits = torch.empty(t, e, dtype=x.dtype, device=x.device)  # router GEMV: each token's row by itself
    pair_gemv_kernel[(triton.cdiv(e, 2 * PAIR_BN), t)](
        x, x.stride(0), x, x, router, 0, 0, router, router.stride(0), logits, e, 0, TOP_K=1, K=d, BN=2 * PAIR_BN,
        BK=bk_in, GATED=False, PDL=on, num_warps=4, launch_pdl=on)
    weights, experts = route(logits, top_k, norm_topk, None)
    p = t * top_k
    hidden = torch.empty(p + t, i, dtype=x.dtype, device=x.device)
    bn = PAIR_BN
    pair_gemv_kernel[(triton.cdiv(i, bn), p + t)](
        x, x.stride(0), experts, weights, gate_up, gate_up.stride(0), gate_up.stride(1), shared_gate_up,
        shared_gate_up.stride(0), hidden, i, p, TOP_K=top_k, K=d, BN=bn, BK=bk_in, GATED=True, PDL=on, num_warps=4,
        launch_pdl=on)
    y = torch.empty(p + t, d, dtype=x.dtype, device=x.device)
    pair_gemv_kernel[(triton.cdiv(d, 2 * bn), p + t)](
        hidden, i, experts, weights, down, down.stride(0), down.stride(1), shared_down, shared_down.stride(0),
        y, d, p, TOP_K=top_k, K=i, BN=2 * bn, BK=bk_mid, GATED=False, PDL=on, num_warps=4, launch_pdl=on)
    out = torch.empty_like(x)
    bd = min(1024, triton.next_power_of_2(d))
    combine_dot_kernel[(t, triton.cdiv(d, bd))](y, x, shared_gate, out, d, K=top_k, SD=d, BD=bd,
                                               BS=min(1024, triton.next_power_of_2(d)), num_warps=4)
    return out


PAIR_BN = 2  # gate/up: rows of each half per program (down: twice as many rows, of half the length)
