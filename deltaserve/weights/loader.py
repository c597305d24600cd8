"""Builds a HybridModel from a checkpoint directory, checking every tensor against the config first."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from ..config import ModelConfig
from ..layers.model import HybridModel
from .hf_layout import hf_recipes
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
    state = {}
    for param, recipe in recipes.items():
        tensor = recipe.combine([ckpt.get(name) for name, _ in recipe.sources])
        state[param] = tensor.to(device=device, dtype=dtype).contiguous()
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval(), cfg
