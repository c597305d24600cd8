"""Fused recurrent gated delta rule: decode (and speculative verify) steps, state updated in place by slot.

Letters: T = tokens, N = segments, Hk/H = QK/V heads, Dk/Dv = head dims, S = pool slots, W = snapshot columns.
One program per (Dv block, segment, V head) loads its [Dk, BV] block of the slot's state once, runs the
segment's tokens through it and stores it back: gating (g from a, A_log, dt_bias; beta = sigmoid(b)) and
the q/k L2 norm are computed in the kernel. Padding rows (slot -1) start from a zero state and store none.
Reference: `deltaserve.kernels.reference.gated_delta_rule` (decode and verify groups).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .linear import pdl


@triton.jit
def gdn_recurrent_kernel(
    x, stride_x, a, b, stride_ab, A_log, dt_bias, pool, out, cu_seqlens, slots, reset, snaps, stride_snap, W,
    scale, eps,
    HK: tl.constexpr, H: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    HAS_SNAP: tl.constexpr, PDL: tl.constexpr,
):
    if PDL:  # the out-projection GEMV after it may launch at once (it waits for this kernel before reading)
        tl.extra.cuda.gdc_launch_dependents()
    i_v, i_n, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_hk = i_h // (H // HK)
    bos = tl.load(cu_seqlens + i_n).to(tl.int64)
    eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    slot = tl.load(slots + i_n).to(tl.int64)
    keep = (slot >= 0) & (tl.load(reset + i_n) == 0)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < DK, o_v < DV
    m_h = m_k[:, None] & m_v[None, :]
    o_h = i_h * DK * DV + o_k[:, None] * DV + o_v[None, :]  # the block inside one slot's [H, Dk, Dv]
    b_h = tl.load(pool + slot * H * DK * DV + o_h, mask=m_h & keep, other=0.)  # [BK, BV] float32
    b_A = -tl.exp(tl.load(A_log + i_h).to(tl.float32))
    b_dt = tl.load(dt_bias + i_h).to(tl.float32)
    for t in range(bos, eos):
        row = x + t * stride_x
        b_q = tl.load(row + i_hk * DK + o_k, mask=m_k, other=0.).to(tl.float32)
        b_k = tl.load(row + HK * DK + i_hk * DK + o_k, mask=m_k, other=0.).to(tl.float32)
        b_v = tl.load(row + 2 * HK * DK + i_h * DV + o_v, mask=m_v, other=0.).to(tl.float32)
        b_q = b_q * tl.rsqrt(tl.sum(b_q * b_q) + eps) * scale
        b_k = b_k * tl.rsqrt(tl.sum(b_k * b_k) + eps)
        b_a = tl.load(a + t * stride_ab + i_h).to(tl.float32) + b_dt
        softplus = tl.where(b_a > 20., b_a, tl.log(1. + tl.exp(b_a)))
        b_beta = tl.sigmoid(tl.load(b + t * stride_ab + i_h).to(tl.float32))
        b_h *= tl.exp(b_A * softplus)
        b_u = (b_v - tl.sum(b_h * b_k[:, None], axis=0)) * b_beta  # the delta: what the state mispredicts
        b_h += b_k[:, None] * b_u[None, :]
        b_o = tl.sum(b_h * b_q[:, None], axis=0)
        tl.store(out + (t * H + i_h) * DV + o_v, b_o.to(out.dtype.element_ty), mask=m_v)
        if HAS_SNAP:  # speculative verify: the state after token j goes to snapshot slot snaps[n, j]
            if t - bos < tl.minimum(eos - bos - 1, W):
                snap = tl.load(snaps + i_n * stride_snap + t - bos).to(tl.int64)
                if snap >= 0:
                    tl.store(pool + snap * H * DK * DV + o_h, b_h, mask=m_h)
    if slot >= 0:
        tl.store(pool + slot * H * DK * DV + o_h, b_h, mask=m_h)


def block_v(num_segments: int) -> int:
    """V-block width: narrow blocks give a lone sequence more programs; wide ones move state faster in big batches."""
    return 32 if num_segments >= 64 else 16


def gdn_recurrent_fwd(x, a, b, A_log, dt_bias, pool, cu_seqlens, slots, reset, num_k_heads, snaps=None, bv=None):
    _, h, dk, dv = pool.shape
    t = x.shape[0]
    bv = bv or block_v(slots.shape[0])
    out = torch.empty(t, h, dv, dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(dv, bv), slots.shape[0], h)
    gdn_recurrent_kernel[grid](
        x, x.stride(0), a, b, a.stride(0), A_log, dt_bias, pool, out, cu_seqlens, slots, reset,
        snaps if snaps is not None else slots, snaps.stride(0) if snaps is not None else 0,
        snaps.shape[1] if snaps is not None else 0, dk ** -0.5, 1e-6,
        HK=num_k_heads, H=h, DK=dk, DV=dv, BK=triton.next_power_of_2(dk), BV=bv, HAS_SNAP=snaps is not None,
        PDL=pdl(x), num_warps=1 if bv <= 16 else 2,
    )
    return out


def gdn_recurrent(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, A_log: torch.Tensor, dt_bias: torch.Tensor,
                  pool: torch.Tensor, cu_seqlens: torch.Tensor, slots: torch.Tensor, reset: torch.Tensor,
                  num_k_heads: int, snaps: torch.Tensor | None = None) -> torch.Tensor:
    """Recurrent gated delta rule over segments of a few tokens, each slot's state updated in place.

    x [T, C] conv output with columns [q (Hk*Dk) | k (Hk*Dk) | v (H*Dv)]; a, b [T, H] raw gate inputs
    (rows may be strided); A_log, dt_bias [H]; pool [S, H, Dk, Dv] float32; cu_seqlens [N+1];
    slots [N] (-1: padding); reset [N] bool; snaps [N, W] slot for the state after token j (-1: none).
    Returns [T, H, Dv] in x's dtype.
    """
    assert x.stride(1) == 1 and a.stride(1) == 1 and b.stride(0) == a.stride(0) and pool.dtype == torch.float32
    assert pool.is_contiguous()
    return gdn_recurrent_fwd(x, a, b, A_log, dt_bias, pool, cu_seqlens, slots, reset, num_k_heads, snaps)
