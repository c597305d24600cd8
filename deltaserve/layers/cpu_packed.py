"""CPU inference variants of the layers whose matmuls run on prepacked oneDNN weights (issue 9).

`pack_for_cpu(model)` gives every bias-free nn.Linear and every MoE expert a packed copy of its F32
weight and swaps the module's class for a subclass whose forward uses it; nothing else changes
(parameter values and layout, state_dict, the torch code around the matmuls). `unpack` swaps back.
Packing is for inference: the packed ops have no autograd, and weights changed after packing are not seen.

Products of one or two rows (decode of one or two sequences) go instead to the native kernel on the
plain row-major weight (kernels/cpu_native.py), which streams it faster there; from three rows on the
product is compute-bound on this class of CPU and oneDNN's kernels are the faster (benchmarks/RESULTS.md).
The routes agree to rounding (~1e-6 relative, tested). Memory: the packed copies double the weights' footprint.

T = tokens, D = hidden, I = expert width, V = vocab.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import cpu_linear, cpu_native
from .feed_forward import SparseMoE
from .model import HybridModel


def linear(x: torch.Tensor, weight: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:  # [..., in] -> [..., out]
    if 0 < x.numel() <= cpu_native.NATIVE_MAX_ROWS * x.shape[-1] and cpu_native.applies(x):
        return cpu_native.linear(x.reshape(-1, x.shape[-1]), weight).view(*x.shape[:-1], weight.shape[0])
    return cpu_linear.linear(x, packed)


class PackedLinear(nn.Linear):
    packed: torch.Tensor

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, in] -> [T, out]
        return linear(x, self.weight, self.packed)


class PackedSparseMoE(SparseMoE):
    packed_gate_up: list[torch.Tensor]  # per expert, from [2I, D]
    packed_down: list[torch.Tensor]  # per expert, from [D, I]

    def expert(self, e: int, rows: torch.Tensor) -> torch.Tensor:  # [n, D] -> [n, D]
        gate, up = cpu_linear.linear(rows, self.packed_gate_up[e]).chunk(2, dim=-1)
        return cpu_linear.linear(F.silu(gate) * up, self.packed_down[e])


class PackedHybridModel(HybridModel):
    packed_lm_head: torch.Tensor | None  # the embedding's, when the LM head is tied to it

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:  # [R, D] -> [R, V] float32
        if self.lm_head is not None:
            return self.lm_head(hidden).float()
        return linear(hidden, self.embed.weight, self.packed_lm_head).float()


def pack_for_cpu(model: HybridModel) -> bool:
    """Packs a CPU float32 model in place; returns False (model untouched) where that does not apply."""
    weight = model.embed.weight
    if weight.device.type != "cpu" or weight.dtype != torch.float32 or not cpu_linear.available():
        return False
    for module in model.modules():
        if type(module) is nn.Linear and module.bias is None:
            module.packed = cpu_linear.pack(module.weight)
            module.__class__ = PackedLinear
        elif type(module) is SparseMoE:
            module.packed_gate_up = [cpu_linear.pack(w) for w in module.experts_gate_up]
            module.packed_down = [cpu_linear.pack(w) for w in module.experts_down]
            module.__class__ = PackedSparseMoE
    if type(model) is HybridModel:
        model.packed_lm_head = cpu_linear.pack(weight) if model.lm_head is None else None
        model.__class__ = PackedHybridModel
    return True


def unpack(model: HybridModel) -> None:
    """Undoes `pack_for_cpu`: the plain torch path again, packed copies freed."""
    for module in model.modules():
        for packed_cls, cls, attrs in ((PackedLinear, nn.Linear, ["packed"]),
                                       (PackedSparseMoE, SparseMoE, ["packed_gate_up", "packed_down"]),
                                       (PackedHybridModel, HybridModel, ["packed_lm_head"])):
            if type(module) is packed_cls:
                module.__class__ = cls
                for attr in attrs:
                    delattr(module, attr)
