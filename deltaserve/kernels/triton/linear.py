"""One-row products y = x W^T (decode of a single sequence) as a Triton GEMV; more rows go to cuBLAS.

Letters: N = output features, K = input features, BN/BK = block of W one program reads per step.
One program per BN rows of W streams them once ([BN, BK] tiles, k contiguous, 16-byte loads),
multiplies by x in float32 and reduces at the end; rounded once to the output dtype. Only bf16/fp16
weights take it (float32 models keep cuBLAS's full-fp32 products).
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
def gemv_kernel(x, w, out, N, stride_w, K: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    o_n = tl.program_id(0) * BN + tl.arange(0, BN)
    m_n = o_n < N
    p_w = w + o_n[:, None].to(tl.int64) * stride_w
    acc = tl.zeros([BN, BK], tl.float32)
    for k0 in range(0, K, BK):  # K % BK == 0
        o_k = k0 + tl.arange(0, BK)
        b_w = tl.load(p_w + o_k[None, :], mask=m_n[:, None], other=0.)
        acc += b_w.to(tl.float32) * tl.load(x + o_k).to(tl.float32)[None, :]
    tl.store(out + o_n, tl.sum(acc, axis=1).to(out.dtype.element_ty), mask=m_n)


def gemv(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor | None = None, bn: int = 2, bk: int = 1024,
         num_warps: int = 4) -> torch.Tensor:
    """x [1, K] contiguous; w [N, K] (rows contiguous); K % bk == 0. Returns (or fills) out [1, N], x's dtype."""
    n, k = w.shape
    out = torch.empty(1, n, dtype=x.dtype, device=x.device) if out is None else out
    gemv_kernel[(triton.cdiv(n, bn),)](x, w, out, n, w.stride(0), K=k, BN=bn, BK=bk, num_warps=num_warps)
    return out


def _blocks(n: int, k: int) -> tuple[int, int]:
    """(BN, BK): 2 x 1024 where it fits (the fastest on H100 for bench_cuda's shapes but N = 512), else 4 rows."""
    if n >= 1024 and k % 1024 == 0:
        return 2, 1024
    return 4, next((b for b in (512, 256, 128, 64) if k % b == 0), 0)


def linear(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """x W^T for [T, K] x: the GEMV when T == 1 (bf16/fp16), else cuBLAS. out: optional [T, N] destination."""
    bn, bk = _blocks(*w.shape)
    if x.shape[0] == 1 and x.dtype != torch.float32 and bk and x.is_contiguous() and w.stride(1) == 1:
        return gemv(x, w, out, bn=bn, bk=bk)
    return F.linear(x, w) if out is None else torch.mm(x, w.t(), out=out)


class TritonLinear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, in] -> [T, out]
        return linear(x, self.weight)


def use_triton_linears(model: nn.Module) -> None:
    """Every bias-free nn.Linear of the model runs `linear` from now on (in place; idempotent)."""
    for mod in model.modules():
        if type(mod) is nn.Linear and mod.bias is None:
            mod.__class__ = TritonLinear
