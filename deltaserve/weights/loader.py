"""Builds a HybridModel from a checkpoint directory or GGUF file, checking every tensor against the config first.

On the CPU with float32 activations, weight matrices keep the format the file stores them in (bf16 tensors stay
bf16, GGUF blocks stay blocks: QuantizedWeight) and the CPU runner packs them for the native kernels; elsewhere
every tensor is converted to the model's dtype (GGUF blocks dequantized).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch

from ..config import ModelConfig
from ..kernels.quantized import QuantizedWeight
from ..layers.feed_forward import SparseMoE
from ..layers.linear import Embedding, Linear, set_weight
from ..layers.model import HybridModel
from .hf_layout import hf_recipes
from .rows import combine_rows

log = logging.getLogger(__name__)
from .safetensors_dir import CheckpointError, SafetensorsDir


def _listing(names) -> str:
    names = sorted(names)
    more = f" (+{len(names) - 5} more)" if len(names) > 5 else ""
    return ", ".join(names[:5]) + more


def open_checkpoint(path: str | Path):
    """The checkpoint's tensors (names in Hugging Face layout: names(), shape(name), get(name)) and its config."""
    if str(path).endswith(".gguf"):  # a llama.cpp GGUF file, dequantized at load
        from .gguf_checkpoint import open_gguf
        return open_gguf(path)
    return SafetensorsDir(path), ModelConfig.from_dir(path)


def load_model(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """Returns (model, config). Missing, unexpected or mis-shaped tensors raise CheckpointError naming them."""
    ckpt, cfg = open_checkpoint(path)
    names = ckpt.names()
    mtp_layers = len({m.group(1) for n in names if (m := re.match(r"mtp\.layers\.(\d+)\.", n))})
    recipes = hf_recipes(cfg, names, mtp_layers)
    expected = {name: shape for r in recipes.values() for name, shape in r.sources}
    if missing := set(expected) - names:
        raise CheckpointError(f"{path}: missing tensors {_listing(missing)}")
    if extra := names - set(expected):
        raise CheckpointError(f"{path}: unexpected tensors {_listing(extra)} (not used by {cfg.family})")
    for name, shape in expected.items():
        if ckpt.shape(name) != shape:
            raise CheckpointError(f"{path}: tensor '{name}' has shape {list(ckpt.shape(name))}, expected {list(shape)}")

    with torch.device("meta"):
        model = HybridModel(cfg, mtp_layers)
    as_stored = torch.device(device).type == "cpu" and dtype == torch.float32
    matrices = matrix_params(model) if as_stored else set()
    state, kept = {}, {}
    for param, recipe in recipes.items():
        if param in matrices:  # rows in their stored formats
            weight = combine_rows(recipe.combine, [ckpt.get_stored(name) for name, _ in recipe.sources])
            if isinstance(weight, QuantizedWeight) or weight.dtype != dtype:
                kept[param] = weight.contiguous() if isinstance(weight, torch.Tensor) else weight
                continue
        else:
            weight = recipe.combine([ckpt.get(name) for name, _ in recipe.sources])
        state[param] = weight.to(device=device, dtype=dtype).contiguous()
    model.load_state_dict(state, strict=False, assign=True)
    for param, weight in kept.items():
        module_name, _, attr = param.rpartition(".")
        set_weight(model.get_submodule(module_name), attr, weight)
    log.info("%s: weights %.1f MiB as loaded (%d matrices in their stored formats); the file's tensors %.1f MiB",
             Path(path).name, model.weight_bytes() / 2**20, len(kept), ckpt.file_bytes / 2**20)
    return model.eval(), cfg


def matrix_params(model: HybridModel) -> set[str]:
    """Names of the weight matrices (linear layers, embedding, expert stacks): those that may stay quantized."""
    out = set()
    for name, module in model.named_modules():
        if isinstance(module, (Linear, Embedding)):
            out.add(f"{name}.weight")
        elif isinstance(module, SparseMoE):
            out.update({f"{name}.experts_gate_up", f"{name}.experts_down"})
    return out
