"""Which GGUF tensors a Hugging Face checkpoint becomes, following llama.cpp's converter tensor by tensor.

`plan_export` reads only names and shapes; each `Planned.make()` reads its HF tensor(s) and applies the
conventions (renames, +1 norms, -exp(A_log), qwen35 V-head tiling, qkvz split, stacked experts, MTP
as extra `blk.N` blocks). `storage_type` picks the GGML type the way the converter does.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Callable

import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from ..config import ModelConfig
from .gguf_conventions import (GLOBAL_NAMES, LAYER_NAMES, NEXTN_NAMES, ZERO_CENTRED, a_to_gguf, gguf_suffix,
                               norm_to_gguf, qkv_v_rows, split_qkvz, v_tile)
from .safetensors_dir import SafetensorsDir

log = logging.getLogger(__name__)
Q = GGMLQuantizationType
# tensors the converter always keeps in F32 (besides 1-D ones and norms)
F32_SUFFIXES = ("ffn_gate_inp.weight", "ffn_gate_inp_shexp.weight", "ssm_conv1d.weight")
K_QUANTS = (Q.Q4_K, Q.Q6_K)


@dataclass(frozen=True)
class Planned:
    name: str  # GGUF tensor name
    shape: tuple[int, ...]  # PyTorch order
    make: Callable[[], torch.Tensor]


def storage_type(name: str, shape: tuple[int, ...], outtype: GGMLQuantizationType) -> GGMLQuantizationType:
    """F32 for vectors, norms, routers and convs; else `outtype`, falling back (K-quant -> Q8_0 -> F16)
    when rows do not split into whole blocks, as the converter and llama-quantize do."""
    if len(shape) <= 1 or name.endswith("_norm.weight") or not name.endswith(".weight") \
            or gguf_suffix(name) in F32_SUFFIXES:
        return Q.F32
    for qtype in (outtype, Q.Q8_0, Q.F16) if outtype in K_QUANTS else (outtype, Q.F16):
        if shape[-1] % GGML_QUANT_SIZES[qtype][0] == 0:
            return qtype
    return Q.F16


class _Exporter:
    def __init__(self, ckpt: SafetensorsDir, cfg: ModelConfig):
        self.ckpt, self.cfg = ckpt, cfg
        self.out: list[Planned] = []
        self.tiled = cfg.family != "qwen3_next"  # qwen35 conversions reorder V heads

    def emit(self, name: str, shape: tuple[int, ...], make: Callable[[], torch.Tensor]) -> None:
        self.out.append(Planned(name, tuple(shape), make))

    def read(self, hf: str, fn: Callable[[torch.Tensor], torch.Tensor] = lambda t: t) -> Callable[[], torch.Tensor]:
        return lambda: fn(self.ckpt.get(hf).float())

    def tensor(self, hf: str, g: str, suffix: str) -> None:
        """One HF tensor `hf` (layer suffix `suffix`) -> GGUF tensor(s) under prefix `g`."""
        cfg, shape = self.cfg, self.ckpt.shape(hf)
        if suffix == "linear_attn.in_proj_qkvz.weight":
            qkv, rest = cfg.conv_dim, shape[0] - cfg.conv_dim
            self.emit(g + "attn_qkv.weight", (qkv, shape[1]), self.read(hf, lambda t: split_qkvz(t, cfg)[0]))
            self.emit(g + "attn_gate.weight", (rest, shape[1]), self.read(hf, lambda t: split_qkvz(t, cfg)[1]))
            return
        if suffix == "mlp.experts.gate_up_proj":  # fused [E, 2I, D] -> gate and up stacks
            i = shape[1] // 2
            self.emit(g + "ffn_gate_exps.weight", (shape[0], i, shape[2]), self.read(hf, lambda t: t[:, :i]))
            self.emit(g + "ffn_up_exps.weight", (shape[0], i, shape[2]), self.read(hf, lambda t: t[:, i:]))
            return
        if suffix == "mlp.experts.down_proj":
            self.emit(g + "ffn_down_exps.weight", shape, self.read(hf))
            return
        gguf = LAYER_NAMES.get(suffix) or NEXTN_NAMES.get(suffix)
        if gguf is None:
            raise ValueError(f"{self.ckpt.path}: no GGUF name for tensor '{hf}'")
        if gguf == "ssm_conv1d.weight":
            shape = (shape[0], shape[-1])  # [C, 1, K] -> [C, K]
        self.emit(g + gguf, shape, self.read(hf, self.transform(gguf)))

    def transform(self, gguf: str) -> Callable[[torch.Tensor], torch.Tensor]:
        """The converter's change of values for a renamed tensor (none for most)."""
        cfg = self.cfg
        if gguf in ZERO_CENTRED:
            return norm_to_gguf
        if gguf == "ssm_a":
            return lambda t: self.transform("ssm_dt.bias")(a_to_gguf(t))
        if gguf == "ssm_conv1d.weight":
            return lambda t: self.transform("attn_qkv.weight")(t[:, 0])  # channels in [q | k | v] order
        if not self.tiled:
            return lambda t: t
        if gguf == "attn_qkv.weight":
            return lambda t: qkv_v_rows(t, cfg, v_tile)
        # (dim, width) of the V heads to tile: rows of z / b / a / dt, columns of out_proj
        where = {"attn_gate.weight": (0, cfg.v_head_dim), "ssm_out.weight": (1, cfg.v_head_dim),
                 "ssm_beta.weight": (0, 1), "ssm_alpha.weight": (0, 1), "ssm_dt.bias": (0, 1)}.get(gguf)
        return (lambda t: t) if where is None else (lambda t: v_tile(t, where[0], cfg, where[1]))

    def experts(self, hf_prefix: str, g: str, n: int) -> None:
        """Per-expert HF matrices -> one [E, rows, cols] stack per projection."""
        for proj in ("gate", "up", "down"):
            names = [f"{hf_prefix}mlp.experts.{x}.{proj}_proj.weight" for x in range(n)]
            make = lambda names=names: torch.stack([self.ckpt.get(x).float() for x in names])  # noqa: E731
            self.emit(f"{g}ffn_{proj}_exps.weight", (n, *self.ckpt.shape(names[0])), make)


def plan_export(ckpt: SafetensorsDir, cfg: ModelConfig, n_mtp: int) -> list[Planned]:
    """Every GGUF tensor of the export, in the order of HF names (MTP blocks after the trunk)."""
    e = _Exporter(ckpt, cfg)
    names = ckpt.names()
    expert = re.compile(r"(.*)mlp\.experts\.\d+\.(gate|up|down)_proj\.weight$")
    stacked: set[str] = set()
    key = lambda n: [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", n)]  # noqa: E731  natural order
    for hf in sorted(names, key=key):
        if hf in GLOBAL_NAMES:
            gguf = GLOBAL_NAMES[hf]
            e.emit(gguf, ckpt.shape(hf), e.read(hf, norm_to_gguf if gguf in ZERO_CENTRED else lambda t: t))
            continue
        if hf.startswith("mtp.") and not n_mtp:
            continue  # --no-mtp, or qwen3next (whose MTP the converter drops)
        if m := re.match(r"model\.layers\.(\d+)\.(.*)", hf):
            bid, suffix, prefix = int(m[1]), m[2], f"model.layers.{m[1]}."
        elif m := re.match(r"mtp\.layers\.(\d+)\.(.*)", hf):
            bid, suffix, prefix = cfg.num_layers + int(m[1]), m[2], f"mtp.layers.{m[1]}."
        elif not hf.startswith("mtp."):
            raise ValueError(f"{ckpt.path}: no GGUF name for tensor '{hf}'")
        else:  # mtp.fc / mtp norms: copied into every nextn block
            for b in range(cfg.num_layers, cfg.num_layers + n_mtp):
                e.tensor(hf, f"blk.{b}.", hf)
            continue
        if x := expert.match(hf):
            if x[1] not in stacked:
                stacked.add(x[1])
                e.experts(prefix, f"blk.{bid}.", cfg.num_experts)
            continue
        e.tensor(hf, f"blk.{bid}.", suffix)
    if not n_mtp and (dropped := sum(n.startswith("mtp.") for n in names)):
        log.info("%d mtp.* tensors left out (as llama.cpp's converter does for qwen3next)", dropped)
    return e.out
