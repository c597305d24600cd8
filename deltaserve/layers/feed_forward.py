"""Dense SwiGLU MLP and the sparse MoE block with a sigmoid-gated shared expert.

T = tokens, D = hidden, I = expert width, E = experts, K = experts per token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels
from ..config import ModelConfig
from ..kernels.gpu_quant import PlanarWeight
from ..kernels.quantized import QuantizedWeight
from .linear import Linear


class MLP(nn.Module):
    def __init__(self, hidden: int, width: int):
        super().__init__()
        self.gate_up = Linear(hidden, 2 * width)  # rows [gate | up]
        self.down = Linear(width, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, D]
        h = kernels.swiglu_gemv(x, self.gate_up.weight)  # CUDA, one row: one launch; else None
        return self.down(kernels.silu_mul(self.gate_up(x)) if h is None else h)


class SparseMoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        e, i, d = cfg.num_experts, cfg.moe_intermediate_size, cfg.hidden_size
        self.top_k, self.norm_topk = cfg.top_k, cfg.norm_topk_prob
        self.router = Linear(d, e)
        self.experts_gate_up = nn.Parameter(torch.empty(e, 2 * i, d))  # [E, 2I, D] rows [gate | up]
        self.experts_down = nn.Parameter(torch.empty(e, d, i))  # [E, D, I]
        self.shared = MLP(d, cfg.shared_expert_intermediate_size)
        self.shared_gate = Linear(d, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, D]
        fused = kernels.sparse_moe(x, self)  # CUDA, or few float32 tokens on CPU: one call
        if fused is not None:
            return fused
        probs = torch.softmax(self.router(x).float(), dim=-1)  # [T, E]
        weights, experts = probs.topk(self.top_k, dim=-1)  # [T, K]
        if self.norm_topk:
            weights = weights / weights.sum(-1, keepdim=True)
        out = torch.sigmoid(self.shared_gate(x)) * self.shared(x)
        t, k = experts.shape
        flat = experts.flatten()  # [T*K] expert of each (token, choice)
        order = flat.argsort(stable=True)  # rows grouped by expert
        rows = x[order // k]  # [T*K, D]
        ys = torch.empty_like(rows)
        counts = torch.bincount(flat, minlength=self.experts_down.shape[0]).tolist()
        start = 0
        for e, n in enumerate(counts):  # loop over experts hit, never over tokens
            if n:
                ys[start:start + n] = self.expert(e, rows[start:start + n])
                start += n
        # back to (token, choice) order by a gather (index_add_ is pathologically slow on CPU), then a
        # fixed-order sum over the K choices: a token's result never depends on the others in the batch
        ys = ys[order.argsort()].view(t, k, -1)
        return out + (ys * weights.to(x.dtype)[..., None]).sum(1)

    def expert(self, e: int, rows: torch.Tensor) -> torch.Tensor:  # [n, D] -> [n, D]
        gate, up = kernels.linear(rows, _expert(self.experts_gate_up, e)).chunk(2, dim=-1)
        return kernels.linear(F.silu(gate) * up, _expert(self.experts_down, e))


def _expert(stack, e: int):
    """Expert e's matrix of a stack [E, N, K] (a tensor, a QuantizedWeight or a PlanarWeight)."""
    return stack.expert(e) if isinstance(stack, (QuantizedWeight, PlanarWeight)) else stack[e]
