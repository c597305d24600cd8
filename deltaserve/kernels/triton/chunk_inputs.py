"""The chunked delta rule's inputs in the layouts fla's kernels read, each made in one launch (prefill's host cost
is its launch count: issue 17).

Letters: T = tokens, C = conv channels, Hk/H = QK/V heads, Dk/Dv = head dims, N = segments, S = pool slots.
- `chunk_inputs`: from the conv output x [T, C] (rows q | k | v) and the raw gate inputs a, b [T, H] (strided
  views of the in-projection): q and k L2-normalised per head, v, a contiguous, beta = sigmoid(b) in float32,
  one program per token (fla's l2norm, the contiguous copies, the sigmoid: eight launches before).
- `initial_states`: pool[slots], zero where a segment starts at position 0 (three launches before);
  `store_states`: the final states back into pool[slots]. Slot -1 (a padding segment) reads zeros, writes nothing.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _l2norm_heads(p_in, p_out, eps, HK: tl.constexpr, HKB: tl.constexpr, DK: tl.constexpr, DKB: tl.constexpr):
    """One token's HK heads of DK: x / sqrt(sum(x^2) + eps) per head, in float32 (fla's l2norm_fwd)."""
    o_h, o_d = tl.arange(0, HKB)[:, None], tl.arange(0, DKB)[None, :]
    m = (o_h < HK) & (o_d < DK)
    x = tl.load(p_in + o_h * DK + o_d, mask=m, other=0.).to(tl.float32)
    y = x * (1 / tl.sqrt(tl.sum(x * x, axis=1) + eps))[:, None]
    tl.store(p_out + o_h * DK + o_d, y.to(p_out.dtype.element_ty), mask=m)


@triton.jit
def chunk_inputs_kernel(x, stride_x, a, b, stride_ab, q, k, v, a_out, beta, eps, HK: tl.constexpr, HKB: tl.constexpr,
                        DK: tl.constexpr, DKB: tl.constexpr, VD: tl.constexpr, VB: tl.constexpr, H: tl.constexpr,
                        HB: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    row = x + t * stride_x
    _l2norm_heads(row, q + t * HK * DK, eps, HK, HKB, DK, DKB)
    _l2norm_heads(row + HK * DK, k + t * HK * DK, eps, HK, HKB, DK, DKB)
    for c0 in tl.static_range(0, VD, VB):  # v: VD = H * Dv values, VB at a time
        o_c = c0 + tl.arange(0, VB)
        tl.store(v + t * VD + o_c, tl.load(row + 2 * HK * DK + o_c, mask=o_c < VD), mask=o_c < VD)
    o_h = tl.arange(0, HB)
    m_h = o_h < H
    tl.store(a_out + t * H + o_h, tl.load(a + t * stride_ab + o_h, mask=m_h), mask=m_h)
    b_b = tl.load(b + t * stride_ab + o_h, mask=m_h).to(tl.float32)
    tl.store(beta + t * H + o_h, tl.sigmoid(b_b), mask=m_h)


def chunk_inputs(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, num_k_heads: int, dk: int, h: int, dv: int,
                 eps: float = 1e-6) -> tuple[torch.Tensor, ...]:
    """x [T, C] (rows contiguous), a, b [T, H] (same row stride, unit column stride) -> q, k [1, T, Hk, Dk] normed,
    v [1, T, H, Dv], a [1, T, H] in x's / a's dtype, beta [1, T, H] float32, all contiguous."""
    t = x.shape[0]
    assert x.stride(1) == 1 and a.stride(1) == 1 and b.stride(1) == 1 and a.stride(0) == b.stride(0)
    q = torch.empty(1, t, num_k_heads, dk, dtype=x.dtype, device=x.device)
    k = torch.empty_like(q)
    v = torch.empty(1, t, h, dv, dtype=x.dtype, device=x.device)
    a_out = torch.empty(1, t, h, dtype=a.dtype, device=a.device)
    beta = torch.empty(1, t, h, dtype=torch.float32, device=a.device)
    vd = h * dv
    pow2 = triton.next_power_of_2
    chunk_inputs_kernel[(t,)](x, x.stride(0), a, b, a.stride(0), q, k, v, a_out, beta, eps,
                              HK=num_k_heads, HKB=pow2(num_k_heads), DK=dk, DKB=pow2(dk), VD=vd,
                              VB=min(pow2(vd), 1024), H=h, HB=pow2(h))
    return q, k, v, a_out, beta


@triton.jit
def initial_states_kernel(pool, slots, reset, out, SIZE: tl.constexpr, B: tl.constexpr):
    i_n, i_b = tl.program_id(0).to(tl.int64), tl.program_id(1)
    slot = tl.load(slots + i_n).to(tl.int64)
    keep = (tl.load(reset + i_n) == 0) & (slot >= 0)
    o = i_b * B + tl.arange(0, B)
    m = o < SIZE
    tl.store(out + i_n * SIZE + o, tl.load(pool + slot * SIZE + o, mask=m & keep, other=0.), mask=m)


def initial_states(pool: torch.Tensor, slots: torch.Tensor, reset: torch.Tensor) -> torch.Tensor:
    """pool [S, ...] contiguous, slots [N], reset [N] bool -> [N, ...]: each slot's state, zero where reset."""
    size = pool[0].numel()
    out = torch.empty(slots.shape[0], *pool.shape[1:], dtype=pool.dtype, device=pool.device)
    block = 4096
    initial_states_kernel[(slots.shape[0], triton.cdiv(size, block))](pool, slots, reset, out, SIZE=size, B=block)
    return out


@triton.jit
def store_states_kernel(states, slots, pool, SIZE: tl.constexpr, B: tl.constexpr):
    i_n, i_b = tl.program_id(0).to(tl.int64), tl.program_id(1)
    slot = tl.load(slots + i_n).to(tl.int64)
    if slot >= 0:
        o = i_b * B + tl.arange(0, B)
        m = o < SIZE
        tl.store(pool + slot * SIZE + o, tl.load(states + i_n * SIZE + o, mask=m), mask=m)


def store_states(pool: torch.Tensor, slots: torch.Tensor, states: torch.Tensor) -> None:
    """pool[slots[n]] = states[n] for slots >= 0; pool [S, ...] and states [N, ...] contiguous, the same dtype."""
    assert pool.is_contiguous() and states.is_contiguous() and pool.dtype == states.dtype
    size = pool[0].numel()
    block = 4096
    store_states_kernel[(slots.shape[0], triton.cdiv(size, block))](states, slots, pool, SIZE=size, B=block)
