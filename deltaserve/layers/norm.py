"""RMS norms. D = normalised width."""

from __future__ import annotations

import torch
from torch import nn

from .. import kernels


class RMSNorm(nn.Module):
    """Zero-centred RMSNorm: x / rms(x) * (1 + w), computed in float32 (Qwen3-Next / Qwen3.5)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., D]
        fused = kernels.rms_norm(x, self.weight, self.eps)  # CUDA; float32 CPU ([R, D] or [R, B, D] rows)
        if fused is not None:
            return fused
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * (1.0 + self.weight.float())).to(x.dtype)


class GatedRMSNorm(nn.Module):
    """The delta-rule output norm: plain weight, then multiplied by SiLU(z)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:  # x, z [..., D]
        if x.is_cuda:
            return kernels.gated_rms_norm(x, z, self.weight, self.eps)
        dtype = z.dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        out = self.weight * xf.to(dtype)
        return (out * torch.nn.functional.silu(z.float())).to(dtype)
