"""CPU inference: every weight matrix of a float32 model repacked, in place, for the native kernels (issue 15).

Linear layers, the embedding (and so a tied LM head) and the MoE expert stacks get their weight in the layout of
kernels/csrc/packed.h: groups of 16 rows interleaved, in the format the weight arrived in (float32, bfloat16,
float16, or a GGUF block type), about the same bytes. The original is dropped as each one is packed, so weights
are never held twice. Norms, gates and conv weights stay tensors. Packing is for inference: no autograd,
and state_dict no longer holds the packed weights.
"""

from __future__ import annotations

import torch

from ..kernels import cpu_native
from ..kernels.gpu_quant import PlanarWeight
from .feed_forward import SparseMoE
from .linear import Embedding, Linear, set_weight
from .model import HybridModel


def pack_for_cpu(model: HybridModel) -> bool:
    """Packs a CPU float32 model in place; returns False (model untouched) where that does not apply."""
    if model.norm.weight.device.type != "cpu" or model.dtype != torch.float32 or cpu_native.ops() is None:
        return False
    if any(isinstance(v, PlanarWeight) for m in model.modules() for v in vars(m).values()):
        return False  # weights quantized for the CUDA kernels (a CPU test of them): the torch reference runs it all
    pack_weights(model)
    return True


def pack_weights(root: torch.nn.Module) -> None:
    """Packs the weight matrices of every Linear, Embedding and SparseMoE under root, in place."""
    done: dict[int, object] = {}  # id(weight) -> its packed form: a tied weight is packed once
    for module in root.modules():
        names = (["weight"] if isinstance(module, (Linear, Embedding)) else
                 ["experts_gate_up", "experts_down"] if isinstance(module, SparseMoE) else [])
        for name in names:
            weight = getattr(module, name)
            if not cpu_native.is_packed(weight):
                if id(weight) not in done:
                    done[id(weight)] = cpu_native.pack(weight)
                set_weight(module, name, done[id(weight)])
