"""Fixtures for the GGUF tests: tiny checkpoints (some with MTP layers) and their GGUF exports."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf.quants import quantize
from safetensors.torch import load_file, save_file

from deltaserve.config import ModelConfig
from deltaserve.weights.gguf_export import export_gguf
from deltaserve.weights.hf_layout import hf_recipes
from deltaserve.weights.gguf_file import GGUFFile
from deltaserve.weights.kquants import quantize_k
from gguf_edit import random_blocks, rewrite_gguf
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


# A model stored in a Q4_K_M-like mix (hidden 256: every matrix splits into 256-blocks).
# Every expert routed (top-k = E): with top-k < E one activation rounding flip can flip an expert choice in a
# random tiny model and move logits by O(1), which no rounding bound describes (as in test_gguf_quant.py).

DIMS = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
            linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=64, linear_value_head_dim=64,
            num_experts=4, num_experts_per_tok=4, moe_intermediate_size=256, shared_expert_intermediate_size=256)
MIX = {"attn_qkv": Q.Q6_K, "attn_gate": Q.Q4_K, "ssm_alpha": Q.Q8_0, "ssm_beta": Q.Q8_0, "ssm_out": Q.Q5_K,
       "attn_q": Q.Q4_K, "attn_k": Q.Q4_0, "attn_v": Q.Q6_K, "attn_output": Q.Q5_K, "ffn_gate_exps": Q.Q4_K,
       "ffn_up_exps": Q.Q4_K, "ffn_down_exps": Q.Q6_K, "ffn_gate_shexp": Q.IQ4_XS, "ffn_up_shexp": Q.MXFP4,
       "ffn_down_shexp": Q.Q6_K, "token_embd": Q.Q4_K, "output": Q.Q6_K}


def stored(name: str, data: np.ndarray) -> tuple[np.ndarray, Q]:
    """A float tensor of the export in the mix's format: quantizers where one exists, else random blocks (the
    file's values are then whatever those blocks hold); the routed down-projections of blk.1 / 2 / 3 as Q3_K and
    Q2_K (kept on the CPU, dequantized on CUDA) and Q5_1 (a type loaded dequantized everywhere)."""
    key = name.split(".")[-2]
    qtype = {"blk.1.ffn_down_exps.weight": Q.Q3_K, "blk.2.ffn_down_exps.weight": Q.Q2_K,
             "blk.3.ffn_down_exps.weight": Q.Q5_1}.get(name, MIX[key])
    if qtype in (Q.Q8_0, Q.Q4_0):
        return quantize(data, qtype), qtype
    if qtype in (Q.Q4_K, Q.Q6_K):
        return quantize_k(data, qtype), qtype
    return random_blocks(qtype, data.shape, seed=len(name), scale=2e-5), qtype  # weights of ~0.05 like the rest


@pytest.fixture(scope="session")
def mix_gguf(tmp_path_factory):
    d = tmp_path_factory.mktemp("mix")
    f32 = export_gguf(save_hf_model("qwen3_5_moe", d / "hf", seed=4, **DIMS), d / "f32.gguf", "f32")
    f = GGUFFile(f32)
    retype = {n: stored(n, f.read(n).numpy()) for n in f.tensors if n.split(".")[-2] in MIX}
    return rewrite_gguf(f32, d / "mix.gguf", retype=retype)
