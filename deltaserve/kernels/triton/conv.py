"""Causal depthwise conv + SiLU over segments, continuing each slot's window in place.

Letters: T = tokens, N = segments, C = channels, K = conv width, S = pool slots, W = snapshot columns.
Two layouts, the same sums in the same order (bit for bit equal):
- decodes and verifies (steps whose segments are short): one program per (channel block, segment) walks the
  segment's tokens, so the old window is read and the new one written by the same program, in one launch;
- steps with prompt chunks: programs per (token tile, channel block) over all the step's rows, each row finding
  its segment's start and slot through token_segment (a 2048-token prompt is 32 tiles, not one program walking
  2048 rows), then one program per (channel block, segment) writes the new windows: a second launch, so that no
  tile reads a window another program has already overwritten.
Reference: `deltaserve.kernels.reference.causal_conv`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _window_after(x, stride_x, p_win, keep, bos, n, o_c, m_c, C, K: tl.constexpr, KP: tl.constexpr):
    """Rows [KP, BC] of ext = (old window ++ tokens) from ext row n on: the window after n tokens."""
    o_i = tl.arange(0, KP)
    p = n + o_i
    m_i = o_i < K - 1
    b_x = tl.load(x + (bos + p - (K - 1))[:, None].to(tl.int64) * stride_x + o_c[None, :],
                  mask=(m_i & (p >= K - 1))[:, None] & m_c[None, :], other=0.)
    b_w = tl.load(p_win + p[:, None] * C + o_c[None, :], mask=(m_i & (p < K - 1) & keep)[:, None] & m_c[None, :],
                  other=0.)
    return b_x.to(p_win.dtype.element_ty) + b_w


@triton.jit
def causal_conv_kernel(
    x, stride_x, w, pool, out, cu_seqlens, slots, reset, snaps, stride_snap, W, C,
    K: tl.constexpr, KP: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, HAS_SNAP: tl.constexpr,
):
    i_c, i_n = tl.program_id(0), tl.program_id(1)
    bos = tl.load(cu_seqlens + i_n).to(tl.int64)
    eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    slot = tl.load(slots + i_n).to(tl.int64)
    keep = (slot >= 0) & (tl.load(reset + i_n) == 0)  # continue the slot's window (else it starts at zero)
    o_c = i_c * BC + tl.arange(0, BC)
    m_c = o_c < C
    p_win = pool + slot * (K - 1) * C  # [K-1, C] window of the slot
    for t0 in range(bos, eos, BT):
        o_t = t0 + tl.arange(0, BT)
        m_t = o_t < eos
        acc = tl.zeros([BT, BC], dtype=tl.float32)
        for j in tl.static_range(K):
            src = o_t + j - (K - 1)  # input row of tap j; rows before bos live in the window
            b_x = tl.load(x + src[:, None].to(tl.int64) * stride_x + o_c[None, :],
                          mask=(m_t & (src >= bos))[:, None] & m_c[None, :], other=0.)
            b_win = tl.load(p_win + (src - bos + K - 1)[:, None] * C + o_c[None, :],
                            mask=(m_t & (src < bos) & keep)[:, None] & m_c[None, :], other=0.)
            b_w = tl.load(w + o_c * K + j, mask=m_c, other=0.).to(tl.float32)
            acc += (b_x.to(tl.float32) + b_win.to(tl.float32)) * b_w[None, :]
        tl.store(out + o_t[:, None].to(tl.int64) * C + o_c[None, :], (acc * tl.sigmoid(acc)).to(out.dtype.element_ty),
                 mask=m_t[:, None] & m_c[None, :])
    o_i = tl.arange(0, KP)
    m_rows = (o_i < K - 1)[:, None] & m_c[None, :]
    if HAS_SNAP:  # speculative verify: the window after token j goes to snapshot slot snaps[n, j]
        for j in range(0, tl.minimum(eos - bos - 1, W)):
            snap = tl.load(snaps + i_n * stride_snap + j).to(tl.int64)
            if snap >= 0:
                b_new = _window_after(x, stride_x, p_win, keep, bos, j + 1, o_c, m_c, C, K, KP)
                tl.store(pool + snap * (K - 1) * C + o_i[:, None] * C + o_c[None, :], b_new, mask=m_rows)
    if slot >= 0:
        b_new = _window_after(x, stride_x, p_win, keep, bos, eos - bos, o_c, m_c, C, K, KP)
        tl.debug_barrier()  # every thread has read the old window before any overwrites it
        tl.store(p_win + o_i[:, None] * C + o_c[None, :], b_new, mask=m_rows)


@triton.jit(do_not_specialize=["T"])  # any step length: one compile, not one per T % 16
def conv_tiles_kernel(x, stride_x, w, pool, out, token_segment, cu_seqlens, slots, reset, T, C,
                      K: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr):
    """Rows [BT] x channels [BC] of conv + SiLU; taps before a row's segment start read its slot's old window."""
    o_t = tl.program_id(0) * BT + tl.arange(0, BT)
    o_c = tl.program_id(1) * BC + tl.arange(0, BC)
    m_t, m_c = o_t < T, o_c < C
    seg = tl.load(token_segment + o_t, mask=m_t, other=0)
    bos = tl.load(cu_seqlens + seg)  # [BT]
    slot = tl.load(slots + seg).to(tl.int64)
    keep = (slot >= 0) & (tl.load(reset + seg) == 0)  # continue the slot's window (else it starts at zero)
    acc = tl.zeros([BT, BC], dtype=tl.float32)
    for j in tl.static_range(K):
        src = o_t + j - (K - 1)  # input row of tap j; rows before bos live in the window
        b_x = tl.load(x + src[:, None].to(tl.int64) * stride_x + o_c[None, :],
                      mask=(m_t & (src >= bos))[:, None] & m_c[None, :], other=0.)
        b_win = tl.load(pool + (slot * (K - 1) + src - bos + K - 1)[:, None] * C + o_c[None, :],
                        mask=(m_t & (src < bos) & keep)[:, None] & m_c[None, :], other=0.)
        b_w = tl.load(w + o_c * K + j, mask=m_c, other=0.).to(tl.float32)
        acc += (b_x.to(tl.float32) + b_win.to(tl.float32)) * b_w[None, :]
    tl.store(out + o_t[:, None].to(tl.int64) * C + o_c[None, :], (acc * tl.sigmoid(acc)).to(out.dtype.element_ty),
             mask=m_t[:, None] & m_c[None, :])


@triton.jit
def conv_windows_kernel(x, stride_x, pool, cu_seqlens, slots, reset, C, K: tl.constexpr, KP: tl.constexpr,
                        BC: tl.constexpr):
    """Each segment's slot window <- the window after its tokens (after conv_tiles_kernel has read the old ones)."""
    i_c, i_n = tl.program_id(0), tl.program_id(1)
    slot = tl.load(slots + i_n).to(tl.int64)
    if slot >= 0:
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        n = tl.load(cu_seqlens + i_n + 1).to(tl.int64) - bos
        keep = tl.load(reset + i_n) == 0
        o_c = i_c * BC + tl.arange(0, BC)
        m_c = o_c < C
        o_i = tl.arange(0, KP)
        p_win = pool + slot * (K - 1) * C
        b_new = _window_after(x, stride_x, p_win, keep, bos, n, o_c, m_c, C, K, KP)
        tl.debug_barrier()  # every thread has read the old window before any overwrites it
        tl.store(p_win + o_i[:, None] * C + o_c[None, :], b_new, mask=(o_i < K - 1)[:, None] & m_c[None, :])


def conv_tiled(x, weight, pool, token_segment, cu_seqlens, slots, reset):
    t, c = x.shape
    k = weight.shape[1]
    out = torch.empty(t, c, dtype=x.dtype, device=x.device)
    bt, bc = 32, 128
    conv_tiles_kernel[(triton.cdiv(t, bt), triton.cdiv(c, bc))](
        x, x.stride(0), weight, pool, out, token_segment, cu_seqlens, slots, reset, t, c, K=k, BT=bt, BC=bc,
        num_warps=4)
    conv_windows_kernel[(triton.cdiv(c, 256), slots.shape[0])](
        x, x.stride(0), pool, cu_seqlens, slots, reset, c, K=k, KP=triton.next_power_of_2(k - 1), BC=256,
        num_warps=4)
    return out


def causal_conv_fwd(x, weight, pool, cu_seqlens, slots, reset, max_len, snaps=None):
    t, c = x.shape
    k = weight.shape[1]
    out = torch.empty(t, c, dtype=x.dtype, device=x.device)
    bt = min(64, triton.next_power_of_2(max_len))
    bc = 128 if bt > 1 else 256
    grid = (triton.cdiv(c, bc), slots.shape[0])
    causal_conv_kernel[grid](
        x, x.stride(0), weight, pool, out, cu_seqlens, slots, reset,
        snaps if snaps is not None else slots, snaps.stride(0) if snaps is not None else 0,
        snaps.shape[1] if snaps is not None else 0, c,
        K=k, KP=triton.next_power_of_2(k - 1), BT=bt, BC=bc, HAS_SNAP=snaps is not None, num_warps=4,
    )
    return out


def causal_conv(x: torch.Tensor, weight: torch.Tensor, pool: torch.Tensor, cu_seqlens: torch.Tensor,
                slots: torch.Tensor, reset: torch.Tensor, max_len: int,
                snaps: torch.Tensor | None = None, token_segment: torch.Tensor | None = None) -> torch.Tensor:
    """Conv + SiLU of every segment, reading and updating its slot's window in place.

    x [T, C] (rows may be strided, channels contiguous); weight [C, K]; pool [S, K-1, C] (x's dtype);
    cu_seqlens [N+1]; slots [N] (-1: padding, no window read or written); reset [N] bool (start from a
    zero window); max_len: longest segment (host int); snaps [N, W] slot of the window after token j
    (-1: none); token_segment [T] segment of each row: given, steps of more rows than segments take the tiled
    layout (a choice by shape, the same at a graph's capture and replays). Returns [T, C] in x's dtype.
    """
    assert x.stride(1) == 1 and weight.is_contiguous() and pool.is_contiguous() and pool.dtype == x.dtype
    if token_segment is not None and snaps is None and x.shape[0] > slots.shape[0]:
        return conv_tiled(x, weight, pool, token_segment, cu_seqlens, slots, reset)
    return causal_conv_fwd(x, weight, pool, cu_seqlens, slots, reset, max_len, snaps)
