"""CPU matmul through oneDNN with prepacked weights (issue 9).

On AMD CPUs torch's default F32 `F.linear` goes to MKL, which runs few-row products far below memory
bandwidth. oneDNN's JIT kernels on a weight reordered once into its blocked layout run the same
product 1.1-3x faster for 1-8 rows and ~1.3x for prefill-sized batches (benchmarks/RESULTS.md).
A row's result does not depend on how many rows share the call (checked in tests), so batching
keeps a sequence's outputs independent of the others.

N = output features, K = input features, R = rows.
"""

from __future__ import annotations

import torch


def available() -> bool:
    """True when this torch build has the oneDNN linear ops (x86 builds with MKLDNN)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def pack(weight: torch.Tensor) -> torch.Tensor:
    """[N, K] float32 weight -> opaque oneDNN tensor in the layout its kernels read fastest."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), None)


def linear(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """x [..., K] float32, packed from `pack` -> [..., N], equal to F.linear(x, weight) up to rounding."""
    if x.dim() != 2:
        return linear(x.reshape(-1, x.shape[-1]), packed).view(*x.shape[:-1], -1)
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed, None, "none", [], "")
