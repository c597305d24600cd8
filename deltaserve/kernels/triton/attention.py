"""Causal attention of every segment over its slot's KV blocks: store the new keys, then attend.

Letters: T = tokens, N = segments, H = query heads, G = KV heads, R = H / G, D = head dim,
S = slots, NB = KV blocks, BS = positions per block, MB = blocks per slot, NS = key splits of a decode row.
The caches are [NB, BS, G, D]; position p of slot s lives in block block_table[s, p // BS] at row p % BS.
- store_kv: one program per (token, KV head) writes k, v at its slot's position; slot -1 writes nothing.
- decode (one query per segment): split-K flash decoding; a program takes the R query heads of one KV
  head over one split of the keys, a second kernel merges the splits by their log-sum-exp.
- prefill (any segment lengths): one program per (64-query chunk of a segment, query head), the chunks listed
  by the batch's chunk index (forward_batch.chunk_meta: the grid is the step's chunks, not segments x the longest
  one's, which in a graph sized for 8192 tokens would be mostly empty programs), the heaviest (latest) first;
  single-token segments in front (a mixed step's decodes) one program each. Keys [0, position] of its slot,
  online softmax: the keys every query of the chunk sees without a mask, then the diagonal with the causal one;
  a segment in slot -1 (padding) gets zeros.
Both walk the keys with the same online-softmax loop, `_attend`.
Reference: `deltaserve.kernels.reference.attention`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...forward_batch import CHUNK

PREFILL_BM = CHUNK  # queries per prefill program: the chunk of the batch's chunk index, which the GDN layers build too

@triton.jit
def store_kv_kernel(k, v, stride_k, stride_v, k_cache, v_cache, block_table, MB, token_slots, positions,
                    BS: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BD: tl.constexpr):
    i_t, i_g = tl.program_id(0), tl.program_id(1)
    slot = tl.load(token_slots + i_t).to(tl.int64)
    if slot >= 0:
        pos = tl.load(positions + i_t).to(tl.int64)
        o_d = tl.arange(0, BD)
        m_d = o_d < D
        row = tl.load(block_table + slot * MB + pos // BS).to(tl.int64) * BS + pos % BS
        dst = (row * G + i_g) * D + o_d
        tl.store(k_cache + dst, tl.load(k + i_t * stride_k + i_g * D + o_d, mask=m_d), mask=m_d)
        tl.store(v_cache + dst, tl.load(v + i_t * stride_v + i_g * D + o_d, mask=m_d), mask=m_d)


@triton.jit
def _attend(acc, b_m, b_l, b_q, q_pos, k_cache, v_cache, blocks, i_g, lo, hi, scale, o_d, m_d, BD: tl.constexpr,
            BS: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BN: tl.constexpr, CAUSAL: tl.constexpr,
            PREC: tl.constexpr):
    """Online softmax of queries b_q [QB, BD] over keys [lo, hi) of KV head i_g (blocks: the slot's block table
    row), continuing (acc [QB, BD] unnormalised, max [QB], sum [QB]), which it returns; CAUSAL: query i sees key n
    only if n <= q_pos[i]."""
    for n0 in range(lo, hi, BN):
        o_n = n0 + tl.arange(0, BN)
        m_n = o_n < hi
        row = tl.load(blocks + o_n // BS, mask=m_n, other=0).to(tl.int64) * BS + o_n % BS  # [BN] cache rows
        p_kv = (row[:, None] * G + i_g) * D + o_d[None, :]
        b_k = tl.load(k_cache + p_kv, mask=m_n[:, None] & m_d[None, :], other=0.)
        b_s = tl.dot(b_q, tl.trans(b_k), input_precision=PREC) * scale  # [QB, BN]
        if CAUSAL:
            b_s = tl.where(m_n[None, :] & (o_n[None, :] <= q_pos[:, None]), b_s, float("-inf"))
        else:
            b_s = tl.where(m_n[None, :], b_s, float("-inf"))
        m_new = tl.maximum(b_m, tl.max(b_s, axis=1))
        b_p = tl.exp(b_s - m_new[:, None])
        alpha = tl.exp(b_m - m_new)
        b_v = tl.load(v_cache + p_kv, mask=m_n[:, None] & m_d[None, :], other=0.)
        acc = acc * alpha[:, None] + tl.dot(b_p.to(b_v.dtype), b_v, input_precision=PREC)
        b_l = b_l * alpha + tl.sum(b_p, axis=1)
        b_m = m_new
    return acc, b_m, b_l


@triton.jit
def decode_split_kernel(q, stride_qt, stride_qh, k_cache, v_cache, block_table, MB, slots, positions, o_part,
                        lse_part, scale, H: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BD: tl.constexpr,
                        RP: tl.constexpr, BS: tl.constexpr, BN: tl.constexpr, NS: tl.constexpr, PREC: tl.constexpr):
    i_b, i_g, i_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    R: tl.constexpr = H // G
    slot = tl.load(slots + i_b).to(tl.int64)
    length = tl.where(slot >= 0, tl.load(positions + i_b) + 1, 0)  # keys 0..position; padding attends to none
    per = tl.cdiv(tl.cdiv(length, NS), BN) * BN
    lo = i_s * per
    hi = tl.minimum(lo + per, length)
    o_r, o_d = tl.arange(0, RP), tl.arange(0, BD)
    m_r, m_d = o_r < R, o_d < D
    heads = i_g * R + o_r
    b_q = tl.load(q + i_b * stride_qt + heads[:, None] * stride_qh + o_d[None, :],
                  mask=m_r[:, None] & m_d[None, :], other=0.)
    acc, b_m, b_l = _attend(tl.zeros([RP, BD], tl.float32), tl.full([RP], float("-inf"), tl.float32),
                            tl.zeros([RP], tl.float32), b_q, o_r, k_cache, v_cache, block_table + slot * MB, i_g, lo,
                            hi, scale, o_d, m_d, BD=BD, BS=BS, G=G, D=D, BN=BN, CAUSAL=False, PREC=PREC)
    part = (i_b * H + heads) * NS + i_s  # [RP] rows of the partial results
    tl.store(o_part + part[:, None] * BD + o_d[None, :], acc / tl.maximum(b_l, 1e-30)[:, None], mask=m_r[:, None])
    tl.store(lse_part + part, tl.where(b_l > 0, b_m + tl.log(b_l), float("-inf")), mask=m_r)


@triton.jit
def decode_merge_kernel(o_part, lse_part, out, D: tl.constexpr, BD: tl.constexpr, NS: tl.constexpr):
    i_bh = tl.program_id(0)
    o_s, o_d = tl.arange(0, NS), tl.arange(0, BD)
    b_lse = tl.load(lse_part + i_bh * NS + o_s)  # [NS]
    b_max = tl.max(b_lse, axis=0)
    b_w = tl.where(b_lse > float("-inf"), tl.exp(b_lse - b_max), 0.)
    b_o = tl.load(o_part + (i_bh * NS + o_s)[:, None] * BD + o_d[None, :])  # [NS, BD]
    res = tl.sum(b_o * b_w[:, None], axis=0) / tl.maximum(tl.sum(b_w, axis=0), 1e-30)
    tl.store(out + i_bh * D + o_d, res.to(out.dtype.element_ty), mask=o_d < D)


@triton.jit(do_not_specialize=["FIRST", "NT"])  # counts that vary by step: one compile
def prefill_kernel(q, stride_qt, stride_qh, k_cache, v_cache, block_table, MB, out, cu_seqlens, slots, positions,
                   chunks, FIRST, NT, scale, H: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BD: tl.constexpr,
                   BS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr):
    i_p, i_h = tl.program_id(0), tl.program_id(1)
    chunked = i_p >= FIRST  # else a single-token segment; chunk NT-1 first: a segment's last chunk is its heaviest
    c = NT - 1 - (i_p - FIRST)
    i_n = tl.where(chunked, FIRST + tl.load(chunks + 2 * c, mask=chunked, other=0).to(tl.int32), i_p)
    i_m = tl.where(chunked, tl.load(chunks + 2 * c + 1, mask=chunked, other=0).to(tl.int32), 0)
    bos = tl.load(cu_seqlens + i_n).to(tl.int64)
    eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    slot = tl.load(slots + i_n).to(tl.int64)
    q0 = bos + i_m * BM
    o_m, o_d = q0 + tl.arange(0, BM), tl.arange(0, BD)
    m_m, m_d = o_m < eos, o_d < D
    if slot >= 0:
        i_g = i_h // (H // G)
        start = tl.load(positions + bos)  # position of the segment's first token
        q_pos = start + (o_m - bos)
        b_q = tl.load(q + o_m[:, None] * stride_qt + i_h * stride_qh + o_d[None, :],
                      mask=m_m[:, None] & m_d[None, :], other=0.)
        seen = start + q0 - bos  # keys [0, seen) are seen by every query of the chunk: no mask
        hi = start + tl.minimum(q0 + BM, eos) - bos  # keys [0, hi) cover every query of the chunk
        blocks = block_table + slot * MB
        acc, b_m, b_l = _attend(tl.zeros([BM, BD], tl.float32), tl.full([BM], float("-inf"), tl.float32),
                                tl.zeros([BM], tl.float32), b_q, q_pos, k_cache, v_cache, blocks, i_g, 0, seen, scale,
                                o_d, m_d, BD=BD, BS=BS, G=G, D=D, BN=BN, CAUSAL=False, PREC=PREC)
        acc, _, b_l = _attend(acc, b_m, b_l, b_q, q_pos, k_cache, v_cache, blocks, i_g, seen, hi, scale, o_d, m_d,
                              BD=BD, BS=BS, G=G, D=D, BN=BN, CAUSAL=True, PREC=PREC)
        res = acc / tl.maximum(b_l, 1e-30)[:, None]
    else:  # a padding segment (prefill graphs): zeros, so that no garbage reaches the layers after
        res = tl.zeros([BM, BD], tl.float32)
    tl.store(out + (o_m[:, None] * H + i_h) * D + o_d[None, :], res.to(out.dtype.element_ty),
             mask=m_m[:, None] & m_d[None, :])


def store_kv(k, v, k_cache, v_cache, block_table, token_slots, positions):
    t, g, d = k.shape
    store_kv_kernel[(t, g)](k, v, k.stride(0), v.stride(0), k_cache, v_cache, block_table, block_table.shape[1],
                            token_slots, positions, BS=k_cache.shape[1], G=g, D=d, BD=triton.next_power_of_2(d))


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # full fp32 products for fp32 models


def decode_attention(q, k_cache, v_cache, block_table, slots, positions, scale, num_splits=16):
    b, h, d = q.shape
    g = k_cache.shape[2]
    bd = triton.next_power_of_2(d)
    o_part = torch.empty(b * h * num_splits, bd, dtype=torch.float32, device=q.device)
    lse_part = torch.empty(b * h * num_splits, dtype=torch.float32, device=q.device)
    decode_split_kernel[(b, g, num_splits)](
        q, q.stride(0), q.stride(1), k_cache, v_cache, block_table, block_table.shape[1], slots, positions, o_part,
        lse_part, scale, H=h, G=g, D=d, BD=bd, RP=max(16, triton.next_power_of_2(h // g)), BS=k_cache.shape[1],
        BN=32 if d > 128 else 64, NS=num_splits, PREC=_precision(q.dtype), num_warps=4,
    )
    out = torch.empty(b, h, d, dtype=q.dtype, device=q.device)
    decode_merge_kernel[(b * h,)](o_part, lse_part, out, D=d, BD=bd, NS=num_splits, num_warps=4)
    return out


def prefill_attention(q, k_cache, v_cache, block_table, cu_seqlens, slots, positions, first, chunks, scale):
    """first: how many single-token segments lead the batch; chunks [NT, 2] (segment counted from first, chunk of
    PREFILL_BM queries within it) of the others."""
    t, h, d = q.shape
    fp32 = q.dtype == torch.float32
    bn = (32 if d <= 128 else 16) if fp32 else (64 if d <= 128 else 32)  # keys per step: K, V tiles fit shared memory
    out = torch.empty(t, h, d, dtype=q.dtype, device=q.device)
    prefill_kernel[(first + chunks.shape[0], h)](
        q, q.stride(0), q.stride(1), k_cache, v_cache, block_table, block_table.shape[1], out, cu_seqlens, slots,
        positions, chunks, first, chunks.shape[0], scale, H=h, G=k_cache.shape[2], D=d, BD=triton.next_power_of_2(d),
        BS=k_cache.shape[1], BM=PREFILL_BM, BN=bn, PREC=_precision(q.dtype), num_warps=8 if d > 128 else 4,
    )
    return out


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
              block_table: torch.Tensor, token_slots: torch.Tensor, positions: torch.Tensor, cu_seqlens: torch.Tensor,
              slots: torch.Tensor, batch, scale: float) -> torch.Tensor:
    """q [T, H, D]; k, v [T, G, D] (rows may be strided, heads contiguous); caches [NB, BS, G, D]; block_table
    [S, MB] int32; token_slots, positions [T]; cu_seqlens [N+1]; slots [N] (-1: padding row); batch: the
    ForwardBatch (its host lengths and chunk index). Appends k, v at each token's slot and position, then returns
    [T, H, D] in q's dtype."""
    assert q.stride(2) == 1 and k.stride(2) == 1 and v.stride(2) == 1 and k_cache.is_contiguous()
    assert block_table.is_contiguous()
    store_kv(k, v, k_cache, v_cache, block_table, token_slots, positions)
    if batch.num_segments == q.shape[0]:  # one token per segment: decode
        return decode_attention(q, k_cache, v_cache, block_table, slots, positions, scale)
    first = batch.num_decodes
    return prefill_attention(q, k_cache, v_cache, block_table, cu_seqlens, slots, positions, first,
                             batch.chunk_meta(first, PREFILL_BM)[1], scale)
