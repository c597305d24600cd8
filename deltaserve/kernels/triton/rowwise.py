"""Row-wise kernels of the layers: norms (plain, gated, after a residual add, before rotary) and gating.

Letters: R = rows, B = heads of a row, D = width (head dim), P = rotary dims, T = tokens, H = heads.
Each is one launch where torch takes 2-15 small ones; at decode these launches, not their bytes, set
the time. Inputs may be strided views ([R, D] or [R, B, D], last dim contiguous); outputs are
contiguous. Math in float32, rounded once (the residual sum is rounded before it is normalised, as
in torch). References: the CPU code of layers/norm.py, rotary.py, feed_forward.py, attention.py.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from .linear import pdl


@triton.jit(do_not_specialize=["R"])  # any row count: one compile
def rms_norm_kernel(x, stride_0, stride_1, w, out, z, stride_z0, stride_z1, eps, B, R,
                    D: tl.constexpr, BD: tl.constexpr, BR: tl.constexpr, GATED: tl.constexpr, PDL: tl.constexpr):
    """Rows [BR] of R: GATED: x / rms(x) * w * SiLU(z) (the delta-rule output norm); else zero-centred
    x / rms(x) * (1 + w). BR rows a program (fixed by D: a row's math never depends on the batch), so a prompt's
    T x 16 heads of 128 are T programs, not 16 T tiny ones. PDL: a GEMV after it may launch at once (it waits for
    this kernel before reading; see linear.py)."""
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
    i_r = tl.program_id(0) * BR + tl.arange(0, BR)
    m_r = i_r < R
    i_0, i_1 = (i_r // B).to(tl.int64), i_r % B
    o_d = tl.arange(0, BD)
    m = m_r[:, None] & (o_d < D)[None, :]
    b_x = tl.load(x + (i_0 * stride_0 + i_1 * stride_1)[:, None] + o_d[None, :], mask=m, other=0.).to(tl.float32)
    b_x = b_x * tl.rsqrt(tl.sum(b_x * b_x, axis=1) / D + eps)[:, None]
    b_w = tl.load(w + o_d, mask=o_d < D, other=0.).to(tl.float32)[None, :]
    if GATED:
        b_z = tl.load(z + (i_0 * stride_z0 + i_1 * stride_z1)[:, None] + o_d[None, :], mask=m, other=0.)
        b_z = b_z.to(tl.float32)
        b_x = b_x * b_w * b_z * tl.sigmoid(b_z)
    else:
        b_x = b_x * (1. + b_w)
    tl.store(out + i_r.to(tl.int64)[:, None] * D + o_d[None, :], b_x.to(out.dtype.element_ty), mask=m)


@triton.jit
def add_rms_norm_kernel(x, y, total, out, w, eps, D: tl.constexpr, BD: tl.constexpr, PDL: tl.constexpr):
    """total = x + y (the residual stream); out = zero-centred RMSNorm(total). PDL: as rms_norm_kernel."""
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
    row = tl.program_id(0).to(tl.int64) * D
    o_d = tl.arange(0, BD)
    m_d = o_d < D
    b_s = tl.load(x + row + o_d, mask=m_d, other=0.).to(tl.float32) + tl.load(y + row + o_d, mask=m_d, other=0.)
    b_s = b_s.to(total.dtype.element_ty)
    tl.store(total + row + o_d, b_s, mask=m_d)
    b_s = b_s.to(tl.float32)
    b_w = tl.load(w + o_d, mask=m_d, other=0.).to(tl.float32)
    b_s = b_s * tl.rsqrt(tl.sum(b_s * b_s, axis=0) / D + eps) * (1. + b_w)
    tl.store(out + row + o_d, b_s.to(out.dtype.element_ty), mask=m_d)


@triton.jit
def norm_rotary_kernel(x, stride_t, stride_h, w, out, positions, inv_freq, eps, H: tl.constexpr, D: tl.constexpr,
                       BH: tl.constexpr, BD: tl.constexpr, P: tl.constexpr):
    """Per head: zero-centred RMSNorm, then rotate-half rotary on the first P dims at the token's position."""
    i_t = tl.program_id(0)
    o_h, o_d = tl.arange(0, BH), tl.arange(0, BD)
    m = (o_h < H)[:, None] & (o_d < D)[None, :]
    half: tl.constexpr = P // 2
    rot = o_d < P
    partner = tl.where(o_d < half, o_d + half, o_d - half)  # rotate-half pairs dim i with i +- P/2
    p_row = x + i_t.to(tl.int64) * stride_t + o_h[:, None] * stride_h
    b_x = tl.load(p_row + o_d[None, :], mask=m, other=0.).to(tl.float32)
    b_p = tl.load(p_row + partner[None, :], mask=m & rot[None, :], other=0.).to(tl.float32)
    r = tl.rsqrt(tl.sum(b_x * b_x, axis=1) / D + eps)[:, None]
    b_x = b_x * r * (1. + tl.load(w + o_d, mask=o_d < D, other=0.).to(tl.float32))[None, :]
    b_p = b_p * r * (1. + tl.load(w + partner, mask=rot, other=0.).to(tl.float32))[None, :]
    angle = tl.load(positions + i_t).to(tl.float32) * tl.load(inv_freq + o_d % half, mask=rot, other=0.)
    b_cos, b_sin = libdevice.cos(angle)[None, :], libdevice.sin(angle)[None, :]  # full range: angles reach ~1e5
    b_o = tl.where(rot[None, :], b_x * b_cos + tl.where(o_d < half, -1., 1.)[None, :] * b_p * b_sin, b_x)
    tl.store(out + i_t.to(tl.int64) * H * D + o_h[:, None] * D + o_d[None, :], b_o.to(out.dtype.element_ty), mask=m)


@triton.jit
def gate_mul_kernel(x, stride_x0, stride_x1, g, stride_g0, stride_g1, out, B, D: tl.constexpr, BD: tl.constexpr,
                    SIGMOID: tl.constexpr):
    """x * sigmoid(g) (SIGMOID) or x * SiLU(g)."""
    i_r = tl.program_id(0)
    i_0, i_1 = (i_r // B).to(tl.int64), i_r % B
    o_d = tl.program_id(1) * BD + tl.arange(0, BD)
    m_d = o_d < D
    b_x = tl.load(x + i_0 * stride_x0 + i_1 * stride_x1 + o_d, mask=m_d, other=0.).to(tl.float32)
    b_g = tl.load(g + i_0 * stride_g0 + i_1 * stride_g1 + o_d, mask=m_d, other=0.).to(tl.float32)
    b_o = b_x * tl.sigmoid(b_g) if SIGMOID else b_x * b_g * tl.sigmoid(b_g)
    tl.store(out + i_r.to(tl.int64) * D + o_d, b_o.to(out.dtype.element_ty), mask=m_d)


def _rows(x: torch.Tensor) -> tuple[int, int, int, int]:
    """[R0, D] or [R0, B, D] (last dim contiguous) -> (R0, B, stride of R0, stride of B)."""
    assert x.stride(-1) == 1 and x.dim() in (2, 3)
    return (x.shape[0], 1, x.stride(0), 0) if x.dim() == 2 else (x.shape[0], x.shape[1], x.stride(0), x.stride(1))


def _warps(bd: int) -> int:
    return 4 if bd >= 1024 else 1


def _rows_per_program(bd: int) -> int:
    return max(1, 2048 // bd)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Zero-centred RMSNorm x / rms(x) * (1 + w) of [R, D] or [R, B, D] rows."""
    r0, b, s0, s1 = _rows(x)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    bd = triton.next_power_of_2(x.shape[-1])
    br = _rows_per_program(bd)
    rms_norm_kernel[(triton.cdiv(r0 * b, br),)](x, s0, s1, weight, out, x, 0, 0, eps, b, r0 * b, D=x.shape[-1],
                                                BD=bd, BR=br, GATED=False, PDL=pdl(x), num_warps=_warps(bd * br))
    return out


def gated_rms_norm(x: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / rms(x) * w * SiLU(z), in z's dtype. x, z [R, B, D] or [R, D]; weight [D]."""
    r0, b, s0, s1 = _rows(x)
    _, _, z0, z1 = _rows(z)
    out = torch.empty(x.shape, dtype=z.dtype, device=x.device)
    bd = triton.next_power_of_2(x.shape[-1])
    br = _rows_per_program(bd)
    rms_norm_kernel[(triton.cdiv(r0 * b, br),)](x, s0, s1, weight, out, z, z0, z1, eps, b, r0 * b, D=x.shape[-1],
                                                BD=bd, BR=br, GATED=True, PDL=pdl(x), num_warps=_warps(bd * br))
    return out


def add_rms_norm(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, eps: float):
    """(x + y, RMSNorm(x + y)) for contiguous [R, D] x, y."""
    assert x.is_contiguous() and y.is_contiguous()
    total, out = torch.empty_like(x), torch.empty_like(x)
    bd = triton.next_power_of_2(x.shape[1])
    add_rms_norm_kernel[(x.shape[0],)](x, y, total, out, weight, eps, D=x.shape[1], BD=bd, PDL=pdl(x),
                                       num_warps=_warps(bd))
    return total, out


@functools.lru_cache(maxsize=None)
def _inv_freq(rotary_dim: int, theta: float, device: torch.device) -> torch.Tensor:
    # bit for bit as layers/rotary.py computes it on CPU; once per device (before any CUDA graph capture)
    return (1.0 / theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim)).to(device)


def norm_rotary(x: torch.Tensor, weight: torch.Tensor, eps: float, positions: torch.Tensor, rotary_dim: int,
                theta: float) -> torch.Tensor:
    """Zero-centred RMSNorm per head, then partial rotary. x [T, H, D] (strided tokens and heads), positions [T]."""
    t, h, d = x.shape
    assert x.stride(2) == 1
    out = torch.empty(t, h, d, dtype=x.dtype, device=x.device)
    inv_freq = _inv_freq(rotary_dim, theta, x.device)
    norm_rotary_kernel[(t,)](x, x.stride(0), x.stride(1), weight, out, positions, inv_freq, eps, H=h, D=d,
                             BH=triton.next_power_of_2(h), BD=triton.next_power_of_2(d), P=rotary_dim, num_warps=4)
    return out


def gate_mul(x: torch.Tensor, gate: torch.Tensor, sigmoid: bool, out: torch.Tensor | None = None) -> torch.Tensor:
    """x * sigmoid(gate) or x * SiLU(gate), same-shaped [R, D] or [R, B, D] views. Returns contiguous (or fills
    out, contiguous), x's dtype."""
    r0, b, x0, x1 = _rows(x)
    _, _, g0, g1 = _rows(gate)
    d = x.shape[-1]
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device) if out is None else out
    bd = min(1024, triton.next_power_of_2(d))
    gate_mul_kernel[(r0 * b, triton.cdiv(d, bd))](x, x0, x1, gate, g0, g1, out, b, D=d, BD=bd, SIGMOID=sigmoid,
                                                  num_warps=4 if bd >= 512 else 1)
    return out
