"""One-row products y = x W^T (decode of a single sequence) as a Triton GEMV; more rows go to cuBLAS.

Letters: N = output features, K = input features, BN/BK = block of W one program reads per step.
One program per BN rows of W streams them once ([BN, BK] tiles, k contiguous, 16-byte loads),
multiplies by x in float32 and reduces at the end; rounded once to the output dtype. Only bf16/fp16
weights take it (float32 models keep cuBLAS's full-fp32 products).
`swiglu_gemv` is the SwiGLU MLP's input half in one launch: W holds 2I rows [gate | up], a program
streams rows n and I + n together and writes SiLU(gate) * up (no [1, 2I] intermediate, no gate launch).
`norm_gemv` puts the delta-rule gated RMS norm (or the attention's sigmoid output gate) into the out
projection's prologue: each program recomputes the normed x from L2 (one launch less per layer).
On Hopper the GEMVs are programmatic dependent launches: a GEMV's programs start while the kernel
before it finishes, load their first weight block (weights: written by no kernel), then wait
(griddepcontrol.wait) before reading x; the row-wise kernels before them signal early
(griddepcontrol.launch_dependents). This hides each GEMV's ramp-up inside a CUDA graph.
`kernels.linear` calls `linear` for CUDA products without autograd.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
import triton
import triton.language as tl


@triton.jit
def x_block(x, g, stride_gh, nw, eps, o_k, BK: tl.constexpr, PRO: tl.constexpr, HD: tl.constexpr, rinv=1.):
    """x[o_k] in float32 after the prologue (see gemv_kernel; rinv: PRO 3's row scale; also the quantized GEMV's
    and quantize_x's prologue)."""
    if PRO == 3:
        b_s = _residual_sum(x, g, o_k)
        return (b_s * rinv * (1. + tl.load(nw + o_k).to(tl.float32))).to(x.dtype.element_ty).to(tl.float32)
    b_x = tl.load(x + o_k).to(tl.float32)
    if PRO == 1:  # BK % HD == 0
        b_r = tl.reshape(b_x, (BK // HD, HD))
        b_r = b_r * tl.rsqrt(tl.sum(b_r * b_r, axis=1) / HD + eps)[:, None]
        b_g = tl.load(g + o_k).to(tl.float32)
        b_x = tl.reshape(b_r, (BK,)) * tl.load(nw + o_k % HD).to(tl.float32) * b_g * tl.sigmoid(b_g)
        b_x = b_x.to(x.dtype.element_ty).to(tl.float32)
    if PRO == 2:
        b_g = tl.load(g + (o_k // HD) * stride_gh + o_k % HD).to(tl.float32)
        b_x = (b_x * tl.sigmoid(b_g)).to(x.dtype.element_ty).to(tl.float32)
    return b_x


@triton.jit
def _residual_sum(x, g, o_k):
    """(x + g)[o_k] rounded to x's dtype (as the residual stream is stored), in float32."""
    return (tl.load(x + o_k).to(tl.float32) + tl.load(g + o_k).to(tl.float32)).to(x.dtype.element_ty).to(tl.float32)


@triton.jit
def residual_rinv(x, g, total, eps, K, BK: tl.constexpr):
    """1 / rms of the residual sum s = x + g over the row (prologue 3; every program sums the whole row, program 0
    stores s to total)."""
    ss = 0.
    for k0 in range(0, K, BK):
        b_s = _residual_sum(x, g, k0 + tl.arange(0, BK))
        ss += tl.sum(b_s * b_s, axis=0)
        if tl.program_id(0) == 0:
            tl.store(total + k0 + tl.arange(0, BK), b_s.to(total.dtype.element_ty))
    return tl.rsqrt(ss / K + eps)


@triton.jit
def gemv_block(acc, acc_u, p_w, p_u, o_k, m_n, b_x, GATED: tl.constexpr):
    """One K block of a GEMV over BN rows: acc += W[rows, o_k] * x[o_k] ([BN, BK] float32; b_x [1, BK]);
    GATED: also acc_u += U[rows, o_k] * x[o_k] for the up rows at p_u."""
    acc += tl.load(p_w + o_k[None, :], mask=m_n[:, None], other=0.).to(tl.float32) * b_x
    if GATED:
        acc_u += tl.load(p_u + o_k[None, :], mask=m_n[:, None], other=0.).to(tl.float32) * b_x
    return acc, acc_u


@triton.jit
def gemv_rows(acc, acc_u, GATED: tl.constexpr):
    """[BN] results of gemv_block's accumulators: the row sums, or SiLU(gate) * up when GATED."""
    y = tl.sum(acc, axis=1)
    if GATED:
        y = y * tl.sigmoid(y) * tl.sum(acc_u, axis=1)
    return y


@triton.jit
def gemv_kernel(x, w, out, N, stride_w, g, stride_gh, nw, eps, K: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                SWIGLU: tl.constexpr, PRO: tl.constexpr, HD: tl.constexpr, PDL: tl.constexpr, total=None):
    """out[n] = W[n] . x; SWIGLU: out[n] = SiLU(W[n] . x) * (W[N + n] . x), W [2N, K] rows [gate | up].
    PRO (prologue on x, heads of HD, rounded to x's dtype as the separate kernel would store it):
    1 = gated RMS norm x / rms_head(x) * nw * SiLU(g) (g contiguous); 2 = x * sigmoid(g), g[k] at
    g + (k // HD) * stride_gh + k % HD; 3 = the residual add and zero-centred RMS norm of the row, s = x + g (each
    program sums the whole row first; program 0 stores s to `total`), s / rms(s) * (1 + nw).
    PDL (launched as a programmatic dependent launch, Hopper): the first weight block (no kernel writes
    weights) is loaded before the wait for the previous kernel; x, g and out only after it."""
    o_n = tl.program_id(0) * BN + tl.arange(0, BN)
    m_n = o_n < N
    p_w = w + o_n[:, None].to(tl.int64) * stride_w
    p_u = w + (N + o_n)[:, None].to(tl.int64) * stride_w  # SWIGLU: the up rows
    o_k = tl.arange(0, BK)
    b_w = tl.load(p_w + o_k[None, :], mask=m_n[:, None], other=0.)
    b_u = b_w
    if SWIGLU:
        b_u = tl.load(p_u + o_k[None, :], mask=m_n[:, None], other=0.)
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    rinv = 1.
    if PRO == 3:
        rinv = residual_rinv(x, g, total, eps, K, BK)
    b_x = x_block(x, g, stride_gh, nw, eps, o_k, BK, PRO, HD, rinv)[None, :]
    acc = b_w.to(tl.float32) * b_x
    acc_u = b_u.to(tl.float32) * b_x
    for k0 in range(BK, K, BK):  # K % BK == 0
        o_k = k0 + tl.arange(0, BK)
        b_x = x_block(x, g, stride_gh, nw, eps, o_k, BK, PRO, HD, rinv)[None, :]
        acc, acc_u = gemv_block(acc, acc_u, p_w, p_u, o_k, m_n, b_x, SWIGLU)
    y = gemv_rows(acc, acc_u, SWIGLU)
    tl.store(out + o_n, y.to(out.dtype.element_ty), mask=m_n)


PDL_ON = True  # programmatic dependent launch of the GEMVs on Hopper and newer (a switch for A/B runs)


@functools.lru_cache(maxsize=None)
def _sm90(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def pdl(t: torch.Tensor) -> bool:
    """Whether kernels on t's device use programmatic dependent launch (griddepcontrol: sm_90+)."""
    return PDL_ON and t.is_cuda and _sm90(t.device.index if t.device.index is not None else
                                          torch.cuda.current_device())


def gemv(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor | None = None, bn: int = 2, bk: int = 1024,
         num_warps: int = 4, swiglu: bool = False) -> torch.Tensor:
    """x [1, K] contiguous; w [N, K] (rows contiguous); K % bk == 0. Returns (or fills) out [1, N], x's dtype;
    swiglu: out [1, N/2] = SiLU(gate) * up of w's rows [gate | up], bn rows of each half per program."""
    n, k = w.shape
    n = n // 2 if swiglu else n
    out = torch.empty(1, n, dtype=x.dtype, device=x.device) if out is None else out
    on = pdl(x)
    gemv_kernel[(triton.cdiv(n, bn),)](x, w, out, n, w.stride(0), x, 0, x, 0., K=k, BN=bn, BK=bk, SWIGLU=swiglu,
                                       PRO=0, HD=1, PDL=on, num_warps=num_warps, launch_pdl=on)
    return out


def _blocks(n: int, k: int) -> tuple[int, int]:
    """(BN, BK): 2 x 1024 where it fits (the fastest on H100 for bench_cuda's shapes but N = 512), else 4 rows."""
    if n >= 1024 and k % 1024 == 0:
        return 2, 1024
    return 4, next((b for b in (512, 256, 128, 64) if k % b == 0), 0)


def _takes_gemv(x: torch.Tensor, w: torch.Tensor, bk: int) -> bool:
    return x.shape[0] == 1 and x.dtype != torch.float32 and bk > 0 and x.is_contiguous() and w.stride(1) == 1


def linear(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """x W^T for [T, K] x: the GEMV when T == 1 (bf16/fp16), else cuBLAS. out: optional [T, N] destination."""
    bn, bk = _blocks(*w.shape)
    if _takes_gemv(x, w, bk):
        return gemv(x, w, out, bn=bn, bk=bk)
    return F.linear(x, w) if out is None else torch.mm(x, w.t(), out=out)


def swiglu_gemv(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor | None:
    """SiLU(x Wg^T) * (x Wu^T) [1, I] for one bf16/fp16 row x [1, K] and w [2I, K] rows [gate | up], one launch
    (half of linear's row block from each half: the same bytes per program); None where the GEMV does not apply."""
    bn, bk = _blocks(*w.shape)
    return gemv(x, w, bn=max(1, bn // 2), bk=bk, swiglu=True) if _takes_gemv(x, w, bk) else None


# the add + norm in the SwiGLU GEMV's prologue, float and quantized weights alike (kernels.add_norm_swiglu reads it;
# H100, 0.8B-class: decode np=1 1.94x its roofline, benchmarks/RESULTS.md)
ADD_NORM_PROLOGUE = True


def add_norm_swiglu(x: torch.Tensor, y: torch.Tensor, norm_w: torch.Tensor, eps: float,
                    w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """One row: (s, SiLU(h Wg^T) * (h Wu^T)) with s = x + y (the residual stream) and h = RMSNorm(s), in one launch
    (the add + norm kernel's work in the SwiGLU GEMV's prologue: a launch less per dense layer). x, y [1, D]
    contiguous; w [2I, D] rows [gate | up]. s and h rounded to x's dtype as the separate kernel stores them. None
    where the GEMV does not apply."""
    bn, bk = _blocks(*w.shape)
    if not _takes_gemv(x, w, bk) or not y.is_contiguous() or y.dtype != x.dtype:
        return None
    n = w.shape[0] // 2
    total, out = torch.empty_like(x), torch.empty(1, n, dtype=x.dtype, device=x.device)
    on = pdl(x)
    gemv_kernel[(triton.cdiv(n, max(1, bn // 2)),)](
        x, w, out, n, w.stride(0), y, 0, norm_w, eps, K=w.shape[1], BN=max(1, bn // 2), BK=bk, SWIGLU=True, PRO=3,
        HD=1, PDL=on, total=total, num_warps=4, launch_pdl=on)
    return total, out


def _prologue_blocks(n: int, k: int, hd: int) -> tuple[int, int]:
    """(BN, BK) of a GEMV whose programs also compute x's prologue (BK a multiple of the head width hd)."""
    bk = next((b for b in (1024, 512, 256, 128, 64, 32, 16) if k % b == 0 and b % hd == 0), 0)
    return (PROLOGUE_BN if n >= 1024 else 4), bk


PROLOGUE_BN = 2  # call 1 (H100): 2 rows beat 4 and 8 in the graph replay


def norm_gemv(x: torch.Tensor, z: torch.Tensor, norm_w: torch.Tensor, eps: float, w: torch.Tensor,
              gated: bool = True) -> torch.Tensor | None:
    """One row: (x / rms_head(x) * norm_w * SiLU(z)) W^T (gated, the delta-rule output norm + out_proj), or
    (x * sigmoid(z)) W^T (not gated: z = the attention output gate), in one launch. x [1, H*Dh] contiguous;
    z [1, H*Dh] contiguous (gated) or a [1, H, Dh] view with unit last stride; w [N, H*Dh]. The prologue's
    result is rounded to x's dtype before the product, as the separate kernel stores it. None where the
    GEMV does not apply (then: the norm/gate kernel and `linear`)."""
    n, k = w.shape
    hd = norm_w.shape[0] if gated else z.shape[-1]
    bn, bk = _prologue_blocks(n, k, hd)
    if not _takes_gemv(x, w, bk) or z.stride(-1) != 1 or z.dtype != x.dtype:
        return None
    if gated and (not z.is_contiguous() or hd > bk):
        return None
    stride_gh = hd if gated else z.stride(-2)
    out = torch.empty(1, n, dtype=x.dtype, device=x.device)
    on = pdl(x)
    gemv_kernel[(triton.cdiv(n, bn),)](x, w, out, n, w.stride(0), z, stride_gh, norm_w if gated else z, eps,
                                       K=k, BN=bn, BK=bk, SWIGLU=False, PRO=1 if gated else 2, HD=hd, PDL=on,
                                       num_warps=4 if bn <= 4 else 8, launch_pdl=on)
    return out

