"""One-row products y = x W^T (decode of a single sequence) as a Triton GEMV; more rows go to cuBLAS.

Letters: N = output features, K = input features, BN/BK = block of W one program reads per step.
One program per BN rows of W streams them once ([BN, BK] tiles, k contiguous, 16-byte loads),
multiplies by x in float32 and reduces at the end; rounded once to the output dtype. Only bf16/fp16
weights take it (float32 models keep cuBLAS's full-fp32 products).
`swiglu_gemv` is the SwiGLU MLP's input half in one launch: W holds 2I rows [gate | up], a program
streams rows n and I + n together and writes SiLU(gate) * up (no [1, 2I] intermediate, no gate launch).
`use_triton_linears(model)` swaps the class of every bias-free nn.Linear for one whose forward calls
`linear` (parameters and state_dict unchanged), as layers/cpu_packed.py does for the CPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import nn


@triton.jit
def gemv_kernel(x, w, out, N, stride_w, K: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, SWIGLU: tl.constexpr):
    """out[n] = W[n] . x; SWIGLU: out[n] = SiLU(W[n] . x) * (W[N + n] . x), W [2N, K] rows [gate | up]."""
    o_n = tl.program_id(0) * BN + tl.arange(0, BN)
    m_n = o_n < N
    p_w = w + o_n[:, None].to(tl.int64) * stride_w
    p_u = w + (N + o_n)[:, None].to(tl.int64) * stride_w  # SWIGLU: the up rows
    acc = tl.zeros([BN, BK], tl.float32)
    acc_u = tl.zeros([BN, BK], tl.float32)
    for k0 in range(0, K, BK):  # K % BK == 0
        o_k = k0 + tl.arange(0, BK)
        b_x = tl.load(x + o_k).to(tl.float32)[None, :]
        acc += tl.load(p_w + o_k[None, :], mask=m_n[:, None], other=0.).to(tl.float32) * b_x
        if SWIGLU:
            acc_u += tl.load(p_u + o_k[None, :], mask=m_n[:, None], other=0.).to(tl.float32) * b_x
    y = tl.sum(acc, axis=1)
    if SWIGLU:
        y = y * tl.sigmoid(y) * tl.sum(acc_u, axis=1)
    tl.store(out + o_n, y.to(out.dtype.element_ty), mask=m_n)


def gemv(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor | None = None, bn: int = 2, bk: int = 1024,
         num_warps: int = 4, swiglu: bool = False) -> torch.Tensor:
    """x [1, K] contiguous; w [N, K] (rows contiguous); K % bk == 0. Returns (or fills) out [1, N], x's dtype;
    swiglu: out [1, N/2] = SiLU(gate) * up of w's rows [gate | up], bn rows of each half per program."""
    n, k = w.shape
    n = n // 2 if swiglu else n
    out = torch.empty(1, n, dtype=x.dtype, device=x.device) if out is None else out
    gemv_kernel[(triton.cdiv(n, bn),)](x, w, out, n, w.stride(0), K=k, BN=bn, BK=bk, SWIGLU=swiglu,
                                       num_warps=num_warps)
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


class TritonLinear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, in] -> [T, out]
        return linear(x, self.weight)


def use_triton_linears(model: nn.Module) -> None:
    """Every bias-free nn.Linear of the model runs `linear` from now on (in place; idempotent)."""
    for mod in model.modules():
        if type(mod) is nn.Linear and mod.bias is None:
            mod.__class__ = TritonLinear
