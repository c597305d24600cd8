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
Up to PAIR_GEMV_TOKENS tokens (decode), `moe_pairs.few_tokens`
replaces 1-5: router GEMV per token, route, then each (token, expert) pair and each token's shared
expert as its own GEMV rows (gate/up with SiLU * up, then down scaled by the routing weight), and a
combine that computes the shared gate's dot itself: 5 launches instead of 11, no counts or layout,
and every token computed independently of the others (bit for bit the same alone or in a batch).
Quantized expert stacks (PlanarWeight): the matmuls dequantize W's tiles in registers (qtiles.w_tile), or with
qlinear.I8_GEMV take int8 x (the tokens, then the SwiGLU rows, quantized per 32) and integer products
(qgemm_i8.i8_group), as the few-token path does.
Reference: `SparseMoE.forward` on CPU (layers/feed_forward.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..gpu_quant import PlanarWeight
from .moe_pairs import PAIR_GEMV_TOKENS, few_tokens, takes_i8_stacks
from .moe_route import combine_kernel, linear, route, shared_expert, stack_args
from .qgemv_i8 import quantize_x
from .qgemm_i8 import i8_group, i8_rows
from .qtiles import block_k, w_tile


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
    a, stride_a, pairs, w, stride_we, stride_wn, ws, wq2, wd, out, stride_o, pair_scale, expert_start, block_expert,
    block_start, N, KD: tl.constexpr, E, TOP_K,
    GATED: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr,
    FMT: tl.constexpr, GS: tl.constexpr, RB: tl.constexpr, xd=None, xs=None, I8: tl.constexpr = False,
):
    """GATED: rows of `a` gathered by pair (token = pair // K), out = SiLU(a W_gate^T) * (a W_up^T) in expert
    order; else a in expert order, out = (a W^T) * pair_scale stored at the pair's own row.
    FMT > 0: W is quantized (planes w, ws, wq2, wd of an [E, rows, KD] stack; see qtiles.w_tile). I8: `a` is its
    rows' int8 codes (with scales xd and sums xs, as quantize_x gives them), 32 columns a step (qgemm_i8.i8_group)."""
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
        rows = e.to(tl.int64) * (2 * N if GATED else N) + tl.minimum(o_n, N - 1)  # quantized: rows of the stack
        acc = tl.zeros([BM, BN], tl.float32)
        acc_up = tl.zeros([BM, BN], tl.float32)
        if I8:
            for k0 in range(0, KD, 32):
                b_a, x_d, x_sum = i8_rows(a, xd, xs, src, m_m, k0, KD)
                acc += i8_group(b_a, x_d, x_sum, w, ws, wq2, wd, rows, k0, KD, FMT)
                if GATED:
                    acc_up += i8_group(b_a, x_d, x_sum, w, ws, wq2, wd, rows + N, k0, KD, FMT)
        else:
            for k0 in range(0, KD, BK):
                o_k = k0 + tl.arange(0, BK)
                m_k = o_k < KD
                b_a = tl.load(a + src[:, None] * stride_a + o_k[None, :], mask=m_m[:, None] & m_k[None, :], other=0.)
                if FMT == 0:
                    b_w = tl.load(p_w + o_k[None, :], mask=m_n[:, None] & m_k[None, :], other=0.)  # [BN, BK]
                else:
                    b_w = w_tile(w, ws, wq2, wd, rows, k0, KD, FMT, BK, GS, RB).to(b_a.dtype)
                acc = tl.dot(b_a, tl.trans(b_w), acc, input_precision=PREC)
                if GATED:  # rows [gate (N) | up (N)] of W[e]
                    if FMT == 0:
                        b_u = tl.load(p_w + N * stride_wn + o_k[None, :], mask=m_n[:, None] & m_k[None, :], other=0.)
                    else:
                        b_u = w_tile(w, ws, wq2, wd, rows + N, k0, KD, FMT, BK, GS, RB).to(b_a.dtype)
                    acc_up = tl.dot(b_a, tl.trans(b_u), acc_up, input_precision=PREC)
        if GATED:
            acc = acc * tl.sigmoid(acc) * acc_up
            dst = o_m.to(tl.int64)
        else:  # back to pair order, scaled by the routing weight
            acc = acc * tl.load(pair_scale + pair, mask=m_m, other=0.)[:, None]
            dst = pair
        tl.store(out + dst[:, None] * stride_o + o_n[None, :], acc.to(out.dtype.element_ty),
                 mask=m_m[:, None] & m_n[None, :])


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


def grouped_matmul(a, w, n, layout, top_k, pair_scale=None, int8_x: bool = False):
    """int8_x: a's rows quantized per 32 first (quantize_x) and W's products integer ones (qgemm_i8.i8_group)."""
    pairs, expert_start, block_expert, block_start, bm = layout
    out = torch.empty(pairs.shape[0], n, dtype=a.dtype, device=a.device)
    fp32 = a.dtype == torch.float32
    bn, bk = 32 if fp32 or bm == 16 else 64, 32 if fp32 else 64  # narrow blocks: more programs at decode
    if isinstance(w, PlanarWeight):
        bk = block_k(w.fmt, a.shape[1], bk)
    xq = quantize_x(a, False) if int8_x else None
    grouped_matmul_kernel[(block_expert.shape[0], triton.cdiv(n, bn))](
        a if xq is None else xq[0].view(torch.int8), a.stride(0), pairs, out=out, stride_o=out.stride(0),
        pair_scale=pair_scale if pair_scale is not None else a, expert_start=expert_start, block_expert=block_expert,
        block_start=block_start, N=n, KD=a.shape[1], E=w.shape[0], TOP_K=top_k, GATED=pair_scale is None, BM=bm,
        BN=bn, BK=bk, PREC="ieee" if fp32 else "tf32", num_warps=4, xd=None if xq is None else xq[1],
        xs=None if xq is None else xq[2], I8=int8_x, **stack_args(w, bk))
    return out


def sparse_moe(x: torch.Tensor, router: torch.Tensor, gate_up, down, shared_gate_up, shared_down,
               shared_gate: torch.Tensor, top_k: int, norm_topk: bool) -> torch.Tensor:
    """x [T, D]; router [E, D]; gate_up [E, 2I, D] (rows [gate | up]); down [E, D, I]; shared_gate_up [2S, D];
    shared_down [D, S]; shared_gate [1, D]. Expert stacks and shared matrices may be PlanarWeights (one segment
    each for the stacks: the loader sees to it). Returns [T, D] in x's dtype."""
    t, d = x.shape
    e = router.shape[0]
    if t <= PAIR_GEMV_TOKENS and (out := few_tokens(x, router, gate_up, down, shared_gate_up, shared_down,
                                                     shared_gate, top_k, norm_topk)) is not None:
        return out
    work = torch.zeros(2, e, dtype=torch.int32, device=x.device)  # pair counts and fill per expert
    weights, experts = route(linear(x, router), top_k, norm_topk, work[0])
    layout = expert_layout(experts.view(-1), work[0], work[1])
    i8 = takes_i8_stacks(x, gate_up, down)  # int8 x as the few-token path has it (moe_pairs.py)
    hidden = grouped_matmul(x, gate_up, gate_up.shape[1] // 2, layout, top_k, int8_x=i8)  # [P, I], expert order
    y = grouped_matmul(hidden, down, d, layout, top_k, pair_scale=weights.view(-1), int8_x=i8)  # [P, D], pair order
    shared = shared_expert(x, shared_gate_up, shared_down)
    out = torch.empty_like(x)
    bd = min(1024, triton.next_power_of_2(d))
    combine_kernel[(t, triton.cdiv(d, bd))](y, shared, linear(x, shared_gate), out, d, K=top_k, BD=bd,
                                            num_warps=4)
    return out
