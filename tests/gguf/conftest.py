"""Fixtures for the GGUF tests: tiny checkpoints (some with MTP layers) and their GGUF exports."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from deltaserve.config import ModelConfig
from deltaserve.weights.gguf_export import export_gguf
from deltaserve.weights.hf_layout import hf_recipes
from tiny_models import ARCHS, save_hf_model


@pytest.fixture(scope="session")
def f32_ggufs(tiny_dirs, tmp_path_factory) -> dict[str, Path]:
    """{arch: f32 GGUF export of the shared tiny checkpoint}."""
    out = tmp_path_factory.mktemp("gguf_f32")
    return {arch: export_gguf(tiny_dirs[arch], out / f"{arch}.gguf", "f32") for arch in ARCHS}


def add_random_mtp(path: Path, seed: int = 0) -> None:
    """Gives a saved tiny checkpoint one MTP layer (random `mtp.*` tensors, as real Qwen3.5 files carry)."""
    cfg = ModelConfig.from_dir(path)
    weights = load_file(path / "model.safetensors")
    g = torch.Generator().manual_seed(seed)
    for recipe in hf_recipes(cfg, set(weights), mtp_layers=1).values():
        for name, shape in recipe.sources:
            if name.startswith("mtp."):
                weights[name] = torch.randn(shape, generator=g) * 0.1
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})


@pytest.fixture(scope="session")
def mtp_dirs(tmp_path_factory) -> dict[str, Path]:
    """{arch: tiny checkpoint with one random MTP layer; 3 V heads per key head tell tiled from grouped order}."""
    dirs = {}
    for arch in ARCHS:
        path = save_hf_model(arch, tmp_path_factory.mktemp(f"mtp_{arch}"), seed=3, linear_num_value_heads=6)
        add_random_mtp(path)
        dirs[arch] = path
    return dirs
