"""Partial rotary embedding (rotate-half layout) on the first `rotary_dim` dims of each head."""

from __future__ import annotations

import torch


class PartialRotary:
    def __init__(self, rotary_dim: int, theta: float):
        self.rotary_dim, self.theta = rotary_dim, theta

    def __call__(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x [T, H, D], positions [T] -> x with its first R dims rotated by position."""
        r = self.rotary_dim
        inv_freq = 1.0 / self.theta ** (torch.arange(0, r, 2, dtype=torch.float32, device=x.device) / r)  # [R/2]
        freqs = positions[:, None].float() * inv_freq  # [T, R/2]
        cos = freqs.cos().repeat(1, 2)[:, None].to(x.dtype)  # [T, 1, R]
        sin = freqs.sin().repeat(1, 2)[:, None].to(x.dtype)
        rot, rest = x[..., :r], x[..., r:]
        half = r // 2
        rotated = torch.cat([-rot[..., half:], rot[..., :half]], dim=-1)
        return torch.cat([rot * cos + rotated * sin, rest], dim=-1)
