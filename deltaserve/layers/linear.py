"""The model's linear layers and embedding: nn.Linear / nn.Embedding whose products go through the kernels' one
dispatch point, so a weight may be a float tensor, a QuantizedWeight (its GGUF blocks) or a packed CPU weight.

`set_weight` puts a weight that is not a float Parameter in place (the loader's quantized weights, the CPU packer's
packed ones); state_dict then no longer holds it.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import kernels


class Linear(nn.Linear):
    """Bias-free y = x W^T; W [out, in]."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, in] -> [T, out]
        return kernels.linear(x, self.weight)


class Embedding(nn.Embedding):
    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # [T] -> [T, D]
        return kernels.embedding(ids, self.weight)

    def reset_parameters(self) -> None:
        # a model built on the meta device is then loaded; and torch's normal_ on a meta tensor allocates a
        # CPU buffer of ~70 MB the first time (measured with torch 2.13), which stays in the process
        if not self.weight.is_meta:
            super().reset_parameters()


def set_weight(module: nn.Module, name: str, weight) -> None:
    """module.<name> = weight, replacing a Parameter by any weight object (tensor, QuantizedWeight, packed)."""
    if name in module._parameters:
        del module._parameters[name]
    if isinstance(weight, torch.Tensor) and not isinstance(weight, nn.Parameter):
        weight = nn.Parameter(weight, requires_grad=False)
    setattr(module, name, weight)
