"""Gated full attention: q/k RMSNorm, partial RoPE, output gated by sigmoid of a per-head gate.

T = tokens, H = query heads, G = KV heads, D = head dim.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import kernels
from ..config import ModelConfig
from ..forward_batch import ForwardBatch
from .linear import Linear
from .norm import RMSNorm
from .rotary import PartialRotary


class GatedAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.h, self.g, self.d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        # fused [q and gate interleaved per head (H*2D) | k (G*D) | v (G*D)] rows
        self.qkv_proj = Linear(cfg.hidden_size, self.h * self.d * 2 + 2 * self.g * self.d)
        self.o_proj = Linear(self.h * self.d, cfg.hidden_size)
        self.q_norm = RMSNorm(self.d, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(self.d, cfg.rms_norm_eps)
        self.rotary = PartialRotary(cfg.rotary_dim, cfg.rope_theta)

    def forward(self, x: torch.Tensor, batch: ForwardBatch, kv: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return kernels.mix_by_parts(x, self.qkv_proj(x), batch, kv, self.attend, self.o_proj)

    def attend(self, proj: torch.Tensor, batch: ForwardBatch, kv: tuple[torch.Tensor, torch.Tensor],
               project: bool = False) -> torch.Tensor:
        """qkv-projection rows [T, H*2D + 2G*D] -> the gated attention output [T, H*D], or with project that through
        the o-projection [T, hidden]."""
        t = proj.shape[0]
        qg, k, v = proj.split([self.h * self.d * 2, self.g * self.d, self.g * self.d], dim=-1)
        fused = kernels.gated_attention_decode(qg, k, v, self, kv, batch)
        if fused is None:
            fused = kernels.gated_attention_verify(qg, k, v, self, kv, batch)
        if fused is not None:  # CPU decode or verify: norms, rotary, KV write, attention, gate in one call per token
            return self.o_proj(fused) if project else fused
        q, gate = qg.view(t, self.h, 2 * self.d).chunk(2, dim=-1)  # [T, H, D] each
        q = kernels.norm_rotary(q, self.q_norm, self.rotary, batch.positions)
        k = kernels.norm_rotary(k.view(t, self.g, self.d), self.k_norm, self.rotary, batch.positions)  # [T, G, D]
        v = v.view(t, self.g, self.d)
        out = kernels.attention(q, k, v, kv[0], kv[1], batch, self.d ** -0.5)  # [T, H, D]
        if project:  # CUDA, one row: gate and projection in one launch
            y = kernels.sigmoid_gate_linear(out.reshape(t, -1), gate, self.o_proj.weight)
            if y is not None:
                return y
        out = kernels.sigmoid_gate(out, gate).reshape(t, -1)
        return self.o_proj(out) if project else out
