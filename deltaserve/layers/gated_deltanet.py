"""Gated DeltaNet token mixer.

T = tokens, C = conv channels (q, k, v), Hk/H = QK/V heads, Dk/Dv = head dims.
Projections are fused at load into one matrix with rows [q | k | v | z | b | a], so one matmul
serves both the Qwen3-Next (interleaved qkvz/ba) and Qwen3.5 (separate) checkpoint layouts.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import kernels
from ..config import ModelConfig
from ..forward_batch import ForwardBatch
from .linear import Linear
from .norm import GatedRMSNorm


class GatedDeltaNet(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.hk, self.h = cfg.num_k_heads, cfg.num_v_heads
        self.dk, self.dv = cfg.k_head_dim, cfg.v_head_dim
        self.key_dim, self.value_dim = self.hk * self.dk, self.h * self.dv
        self.in_proj = Linear(cfg.hidden_size, cfg.conv_dim + self.value_dim + 2 * self.h)
        self.conv_weight = nn.Parameter(torch.empty(cfg.conv_dim, cfg.conv_kernel))  # [C, K]
        self.A_log = nn.Parameter(torch.empty(self.h))
        self.dt_bias = nn.Parameter(torch.empty(self.h))
        self.norm = GatedRMSNorm(self.dv, cfg.rms_norm_eps)
        self.out_proj = Linear(self.value_dim, cfg.hidden_size)

    def forward(self, x: torch.Tensor, batch: ForwardBatch, state: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """x [T, hidden]; state = (conv pool [S, K-1, C], delta-rule pool [S, H, Dk, Dv] fp32)."""
        return kernels.mix_by_parts(x, self.in_proj(x), batch, state, self.mix, self.out_proj)

    def mix(self, proj: torch.Tensor, batch: ForwardBatch, state: tuple[torch.Tensor, torch.Tensor],
            project: bool = False) -> torch.Tensor:
        """In-projection rows [T, C + H*Dv + 2H] -> the gated-normed delta-rule output [T, H*Dv], or with project
        that through the out-projection [T, hidden]."""
        t = proj.shape[0]
        conv_dim = self.conv_weight.shape[0]
        mixed, z, b, a = proj.split([conv_dim, self.value_dim, self.h, self.h], dim=-1)
        fused = kernels.gated_delta_net_decode(mixed, z, a, b, self, state[0], state[1], batch)
        if fused is None:
            fused = kernels.gated_delta_net_verify(mixed, z, a, b, self, state[0], state[1], batch)
        if fused is not None:  # CPU decode or verify: conv .. gated norm in one call per token
            return self.out_proj(fused) if project else fused
        out = kernels.gated_delta_net(mixed, a, b, self.conv_weight, self.A_log, self.dt_bias, state[0], state[1],
                                      batch, self.hk, self.dk)  # [T, H, Dv]: conv, gating, delta rule by slot
        out = out.to(proj.dtype)
        if project:  # CUDA, one row: norm and projection in one launch
            y = kernels.gated_norm_linear(out.view(t, -1), z, self.norm, self.out_proj.weight)
            if y is not None:
                return y
        out = self.norm(out, z.view(t, self.h, self.dv)).reshape(t, -1)
        return self.out_proj(out) if project else out
