"""Gated DeltaNet token mixer.

T = tokens, C = conv channels (q, k, v), Hk/H = QK/V heads, Dk/Dv = head dims.
Projections are fused at load into one matrix with rows [q | k | v | z | b | a], so one matmul
serves both the Qwen3-Next (interleaved qkvz/ba) and Qwen3.5 (separate) checkpoint layouts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels
from ..config import ModelConfig
from ..engine.batch import ForwardBatch
from .norm import GatedRMSNorm


class GatedDeltaNet(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.hk, self.h = cfg.num_k_heads, cfg.num_v_heads
        self.dk, self.dv = cfg.k_head_dim, cfg.v_head_dim
        self.key_dim, self.value_dim = self.hk * self.dk, self.h * self.dv
        self.in_proj = nn.Linear(cfg.hidden_size, cfg.conv_dim + self.value_dim + 2 * self.h, bias=False)
        self.conv_weight = nn.Parameter(torch.empty(cfg.conv_dim, cfg.conv_kernel))  # [C, K]
        self.A_log = nn.Parameter(torch.empty(self.h))
        self.dt_bias = nn.Parameter(torch.empty(self.h))
        self.norm = GatedRMSNorm(self.dv, cfg.rms_norm_eps)
        self.out_proj = nn.Linear(self.value_dim, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, batch: ForwardBatch, state: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """x [T, hidden]; state = (conv pool [S, K-1, C], delta-rule pool [S, H, Dk, Dv] fp32)."""
        t = x.shape[0]
        conv_dim = self.conv_weight.shape[0]
        mixed, z, b, a = self.in_proj(x).split([conv_dim, self.value_dim, self.h, self.h], dim=-1)
        mixed = kernels.causal_conv(mixed, self.conv_weight, state[0], batch)  # [T, C]
        q, k, v = mixed.split([self.key_dim, self.key_dim, self.value_dim], dim=-1)
        beta = b.float().sigmoid()  # [T, H]
        g = -self.A_log.float().exp() * F.softplus(a.float() + self.dt_bias.float())  # [T, H] log decay
        out = kernels.gated_delta_rule(
            q.view(t, self.hk, self.dk), k.view(t, self.hk, self.dk), v.view(t, self.h, self.dv), g, beta, state[1], batch
        )  # [T, H, Dv] float32
        out = self.norm(out.to(x.dtype), z.view(t, self.h, self.dv))
        return self.out_proj(out.reshape(t, -1))
