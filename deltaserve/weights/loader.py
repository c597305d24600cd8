"""Builds a HybridModel from a checkpoint directory or GGUF file, checking every tensor against the config first.

On the CPU with float32 activations, weight matrices keep the format the file stores them in (bf16 tensors stay
bf16, GGUF blocks stay blocks: QuantizedWeight) and the CPU runner packs them for the native kernels. On CUDA,
quantized matrices (block-FP8; GGUF Q8_0, Q4_K, Q5_K, Q6_K) stay quantized in the CUDA kernels' planar layouts
(PlanarWeight); any other tensor is converted to the model's dtype (other GGUF block types dequantized, with a warning).
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch

from ..config import ModelConfig
from ..kernels.gpu_quant import PlanarWeight, from_quantized
from ..kernels.quantized import QuantizedWeight
from ..layers.feed_forward import SparseMoE
from ..layers.linear import Embedding, Linear, set_weight
from ..layers.model import HybridModel
from .hf_layout import hf_recipes
from ..parallel.shard import shard_config
from .fp8 import combine_fp8
from .rows import combine_rows
from .safetensors_dir import CheckpointError, SafetensorsDir
from .shard_read import columns_of, rank_plan, read_shard

log = logging.getLogger(__name__)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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


def load_model(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
               planar: bool | None = None, tp: tuple[int, int] = (0, 1)):
    """Returns (model, config). Missing, unexpected or mis-shaped tensors raise CheckpointError naming them.
    planar: quantized matrices as PlanarWeights (default: on CUDA; on the CPU they then run the torch reference).
    tp = (rank, size): the rank's shard of a tensor-parallel model (parallel/shard.py) and its config: float
    tensors read row run by row run where the file allows, matrices in their stored formats cut before fusing
    (weights/shard_read.py)."""
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

    rank, size = tp
    full_cfg, cfg = cfg, shard_config(cfg, size) if size > 1 else cfg
    with torch.device("meta"):
        model = HybridModel(cfg, mtp_layers)
    planar = torch.device(device).type == "cuda" if planar is None else planar
    as_stored = torch.device(device).type == "cpu" and dtype == torch.float32 and not planar
    matrices = matrix_params(model) if as_stored or planar else set()
    state, kept, split = {}, {}, []  # split: matrices whose rank columns cut through the file's blocks
    for param, recipe in recipes.items():
        weight = None
        if param in matrices:
            if size > 1 and all(ckpt.reads_rows(name) for name, _ in recipe.sources):
                weight = read_shard(ckpt, recipe, param, full_cfg, rank, size)  # float rows, as the file stores them
            else:
                build, cols = rank_plan(param, recipe, full_cfg, rank, size)
                weight = planar_weight(ckpt, recipe, build, cols, dtype) if planar else \
                    stored_weight(ckpt, recipe, build, cols)
                if weight is None:
                    split.append(param)
            if isinstance(weight, PlanarWeight) or not planar and (isinstance(weight, QuantizedWeight) or
                                                                    weight is not None and weight.dtype != dtype):
                kept[param] = weight.to(device) if planar else weight
                continue
        if weight is None:
            weight = read_shard(ckpt, recipe, param, full_cfg, rank, size) if size > 1 else \
                recipe.combine([ckpt.get(name) for name, _ in recipe.sources])
        state[param] = weight.to(device=device, dtype=dtype).contiguous()
    if split:
        log.warning("rank %d of %d: %d matrices read as %s, their columns split inside the file's blocks: %s", rank,
                    size, len(split), dtype, _listing(split))
    model.load_state_dict(state, strict=False, assign=True)
    for param, weight in kept.items():
        module_name, _, attr = param.rpartition(".")
        set_weight(model.get_submodule(module_name), attr, weight)
    log.info("%s: weights %.1f MiB as loaded (%d matrices in their stored formats); the file's tensors %.1f MiB",
             Path(path).name, model.weight_bytes() / 2**20, len(kept), ckpt.file_bytes / 2**20)
    return model.eval(), cfg


def stored_weight(ckpt, recipe, build, cols: slice | None) -> torch.Tensor | QuantizedWeight | None:
    """A weight matrix (a tensor-parallel rank's shard: rank_plan's build and cols) with its rows in the formats the
    file stores them in; None where cols do not cover whole blocks."""
    parts = [columns_of(ckpt.get_stored(name), cols) for name, _ in recipe.sources]
    if any(p is None for p in parts):
        return None
    weight = combine_rows(build, parts)
    return weight.contiguous() if isinstance(weight, torch.Tensor) else weight


def planar_weight(ckpt, recipe, build, cols: slice | None, dtype: torch.dtype) -> PlanarWeight | torch.Tensor | None:
    """A weight matrix for the CUDA kernels: quantized rows in planar form (PlanarWeight), else a float tensor;
    None as stored_weight."""
    names = [name for name, _ in recipe.sources]
    fp8 = [ckpt.get_fp8(name) if hasattr(ckpt, "get_fp8") else None for name in names]
    if any(p is not None for p in fp8):
        parts = [columns_of(p if p is not None else ckpt.get(n), cols) for p, n in zip(fp8, names)]
        return None if any(p is None for p in parts) else combine_fp8(build, parts, dtype)
    weight = stored_weight(ckpt, recipe, build, cols)
    if not isinstance(weight, QuantizedWeight):
        return weight
    if (out := from_quantized(weight, dtype)) is None:
        log.warning("%s (%s rows): the CUDA kernels compute on Q8_0, Q4_K, Q5_K and Q6_K (one format per expert "
                    "stack); dequantized to %s at load", names[0], "/".join(weight.qtypes), dtype)
        return weight.dequantize()
    return out


def matrix_params(model: HybridModel) -> set[str]:
    """Names of the weight matrices (linear layers, embedding, expert stacks): those that may stay quantized."""
    out = set()
    for name, module in model.named_modules():
        if isinstance(module, (Linear, Embedding)):
            out.add(f"{name}.weight")
        elif isinstance(module, SparseMoE):
            out.update({f"{name}.experts_gate_up", f"{name}.experts_down"})
    return out


def resolve_dtype(path: str | Path, dtype: str, device: torch.device) -> torch.dtype:
    """The activations' dtype for a checkpoint: `auto` is the config's dtype (GGUF: bf16 on CUDA, float32 on the CPU,
    whose kernels take float32 activations), else one of DTYPES by name."""
    if dtype == "auto" and str(path).endswith(".gguf"):
        dtype = "bfloat16" if device.type == "cuda" else "float32"
    elif dtype == "auto":
        raw = json.loads((Path(path) / "config.json").read_text())
        dtype = raw.get("dtype") or raw.get("torch_dtype") or "float32"
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of auto, {', '.join(DTYPES)}; got {dtype!r}")
    return DTYPES[dtype]
