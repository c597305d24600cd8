"""Which GGUF tensors make each Hugging Face tensor, and how (the inverse of llama.cpp's converter).

`plan_sources` reads only the header: every HF name gets a `Source` (GGUF parts, resulting shape, a
function that rebuilds the HF tensor from the dequantized parts). Absent, unexpected and mis-shaped
tensors are all collected and reported together, by their GGUF names, against what the metadata implies.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from math import prod
from typing import Callable

import torch

from ..config import ModelConfig
from .gguf_conventions import (GLOBAL_NAMES, IGNORED_NEXTN, LAYER_NAMES, NEXTN_NAMES, ZERO_CENTRED, a_from_gguf,
                               gguf_suffix, join_qkvz, norm_from_gguf, qkv_v_rows, v_group)
from .gguf_file import GGUFFile
from .hf_layout import hf_recipes
from .safetensors_dir import CheckpointError

Tensors = list[torch.Tensor]
Shapes = list[tuple[int, ...]]


@dataclass(frozen=True)
class Source:
    parts: tuple[str, ...]  # GGUF tensor names, read in this order
    shape: tuple[int, ...]  # shape of the rebuilt HF tensor
    build: Callable[[Tensors], torch.Tensor]  # moves rows only, except where moves_columns
    moves_columns: bool = False  # build permutes the columns of its one part (then: kept as a column permutation)


def _first(ts: Tensors) -> torch.Tensor:
    return ts[0]


def _listing(items: list[str]) -> str:
    more = f" (+{len(items) - 6} more)" if len(items) > 6 else ""
    return "; ".join(items[:6]) + more


class _Planner:
    def __init__(self, f: GGUFFile, cfg: ModelConfig):
        self.f, self.cfg = f, cfg
        self.sources: dict[str, Source] = {}
        self.problems: list[str] = []  # absent or mis-shaped GGUF tensors

    def add(self, hf: str, parts: list[str], build: Callable[[Tensors], torch.Tensor] = _first,
            shape: Callable[[Shapes], tuple[int, ...]] = lambda s: s[0]) -> None:
        if absent := [p for p in parts if p not in self.f.tensors]:
            self.problems.append(f"{' and '.join(absent)} missing (needed for {hf})")
            return
        shapes = [self.f.shape(p) for p in parts]
        try:
            self.sources[hf] = Source(tuple(parts), tuple(shape(shapes)), build)
        except IndexError:  # fewer dimensions than the tensor ever has
            self.problems.append(f"{' and '.join(parts)} of shape {' and '.join(map(str, map(list, shapes)))} "
                                 f"cannot make {hf}")

    def expect(self, name: str, rows: int) -> None:
        """A part whose row count the combined shape alone would not reveal."""
        if name in self.f.tensors and self.f.shape(name)[-2:-1] != (rows,):
            self.problems.append(f"{name} has shape {list(self.f.shape(name))}, expected {rows} rows")

    def renamed(self, g: str, h: str, hf_suffix: str, build: Callable[[Tensors], torch.Tensor] | None = None,
                moves_columns: bool = False) -> None:
        gguf = LAYER_NAMES[hf_suffix]
        self.add(h + hf_suffix, [g + gguf], build or (_norm if gguf in ZERO_CENTRED else _first))
        if moves_columns and h + hf_suffix in self.sources:
            self.sources[h + hf_suffix] = replace(self.sources[h + hf_suffix], moves_columns=True)

    def layer(self, g: str, h: str, kind: str, moe: bool) -> None:
        """g: GGUF prefix 'blk.N.'; h: HF prefix 'model.layers.N.' or 'mtp.layers.J.'."""
        self.renamed(g, h, "input_layernorm.weight")
        self.renamed(g, h, "post_attention_layernorm.weight")
        if (kind == "linear_attention") != (g + "ssm_a" in self.f.tensors):  # ssm_a: in every GDN block, only there
            found = "gated-deltanet" if kind == "full_attention" else "no gated-deltanet"
            self.problems.append(f"{g[:-1]} holds {found} tensors, but the metadata (full_attention_interval / "
                                 f"recurrent_layers) makes it a {kind} layer")
        else:
            (self.gated_deltanet if kind == "linear_attention" else self.attention)(g, h)
        (self.moe if moe else self.mlp)(g, h)

    def gated_deltanet(self, g: str, h: str) -> None:
        cfg, m = self.cfg, "linear_attn."
        if cfg.family == "qwen3_next":
            # current converter: [q|k|v] rows + z rows; legacy files: in_proj_qkvz as-is (ssm_in)
            if g + "ssm_in.weight" in self.f.tensors:
                self.add(h + m + "in_proj_qkvz.weight", [g + "ssm_in.weight"])
            else:
                self.expect(g + "attn_qkv.weight", cfg.conv_dim)
                self.add(h + m + "in_proj_qkvz.weight", [g + "attn_qkv.weight", g + "attn_gate.weight"],
                         lambda ts: join_qkvz(ts[0], ts[1], cfg), lambda s: (s[0][0] + s[1][0], s[0][1]))
            self.renamed(g, h, m + "in_proj_ba.weight")
            self.renamed(g, h, m + "out_proj.weight")
            order = _first
        else:  # qwen35 conversions store V heads tiled; HF groups them by key head
            self.renamed(g, h, m + "in_proj_qkv.weight", lambda ts: qkv_v_rows(ts[0], cfg, v_group))
            self.renamed(g, h, m + "in_proj_z.weight", lambda ts: v_group(ts[0], 0, cfg, cfg.v_head_dim))
            for p in ("in_proj_b.weight", "in_proj_a.weight"):
                self.renamed(g, h, m + p, lambda ts: v_group(ts[0], 0, cfg, 1))
            self.renamed(g, h, m + "out_proj.weight", lambda ts: v_group(ts[0], 1, cfg, cfg.v_head_dim),
                         moves_columns=True)
            order = lambda ts: v_group(ts[0].reshape(-1), 0, cfg, 1)  # noqa: E731  [H] per-V-head vectors
        self.renamed(g, h, m + "A_log", lambda ts: order([a_from_gguf(ts[0])]))
        self.renamed(g, h, m + "dt_bias", order)
        # GGUF keeps the depthwise conv as [C, K]; HF as [C, 1, K]
        conv = _first if cfg.family == "qwen3_next" else lambda ts: qkv_v_rows(ts[0], cfg, v_group)
        self.add(h + m + "conv1d.weight", [g + "ssm_conv1d.weight"],
                 lambda ts: conv([ts[0].reshape(ts[0].shape[0], -1)]).unsqueeze(1), lambda s: (s[0][0], 1, s[0][-1]))
        self.renamed(g, h, m + "norm.weight")

    def attention(self, g: str, h: str) -> None:
        cfg, a = self.cfg, "self_attn."
        if g + "attn_qkv.weight" in self.f.tensors:  # fused q (with gate) | k | v rows
            q, kv = 2 * cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
            self.expect(g + "attn_qkv.weight", q + 2 * kv)
            for name, lo, hi in (("q_proj", 0, q), ("k_proj", q, q + kv), ("v_proj", q + kv, q + 2 * kv)):
                self.add(h + a + name + ".weight", [g + "attn_qkv.weight"],
                         lambda ts, lo=lo, hi=hi: ts[0][lo:hi], lambda s, n=hi - lo: (n, s[0][1]))
        else:
            for name in ("q_proj", "k_proj", "v_proj"):
                self.renamed(g, h, a + name + ".weight")
        for name in ("o_proj", "q_norm", "k_norm"):
            self.renamed(g, h, a + name + ".weight")

    def mlp(self, g: str, h: str) -> None:
        for name in ("gate_proj", "up_proj", "down_proj"):
            self.renamed(g, h, f"mlp.{name}.weight")

    def moe(self, g: str, h: str) -> None:
        self.renamed(g, h, "mlp.gate.weight")
        if g + "ffn_gate_up_exps.weight" in self.f.tensors:
            self.add(h + "mlp.experts.gate_up_proj", [g + "ffn_gate_up_exps.weight"])
        else:  # [E, I, D] each -> [E, 2I, D], gate rows first
            self.expect(g + "ffn_gate_exps.weight", self.cfg.moe_intermediate_size)
            self.add(h + "mlp.experts.gate_up_proj", [g + "ffn_gate_exps.weight", g + "ffn_up_exps.weight"],
                     lambda ts: torch.cat(ts, dim=1), lambda s: (s[0][0], s[0][1] + s[1][1], s[0][2]))
        self.add(h + "mlp.experts.down_proj", [g + "ffn_down_exps.weight"])
        for name in ("gate_proj", "up_proj", "down_proj"):
            self.renamed(g, h, f"mlp.shared_expert.{name}.weight")
        # [D] or [1, D] in GGUF, [1, D] in HF
        self.add(h + "mlp.shared_expert_gate.weight", [g + "ffn_gate_inp_shexp.weight"],
                 lambda ts: ts[0].reshape(1, -1), lambda s: (1, prod(s[0])))


def _norm(ts: Tensors) -> torch.Tensor:
    return norm_from_gguf(ts[0])


def plan_sources(f: GGUFFile, cfg: ModelConfig, n_mtp: int) -> dict[str, Source]:
    """HF name -> Source for every tensor of the model, or CheckpointError naming every problem found."""
    p = _Planner(f, cfg)
    for hf, gguf in GLOBAL_NAMES.items():
        if hf != "lm_head.weight" or not cfg.tie_word_embeddings:
            p.add(hf, [gguf], _norm if gguf in ZERO_CENTRED else _first)
    for i, (kind, moe) in enumerate(zip(cfg.layer_types, cfg.moe_layers)):
        p.layer(f"blk.{i}.", f"model.layers.{i}.", kind, moe)
    first_mtp = cfg.num_layers
    for j in range(n_mtp):
        p.layer(f"blk.{first_mtp + j}.", f"mtp.layers.{j}.", "full_attention", cfg.num_experts > 0)
    if n_mtp:
        for hf, gguf in NEXTN_NAMES.items():
            p.add(hf, [f"blk.{first_mtp}.{gguf}"], _norm if gguf in ZERO_CENTRED else _first)

    used = {part for s in p.sources.values() for part in s.parts}
    nextn = IGNORED_NEXTN + tuple(NEXTN_NAMES.values())  # per-block copies beyond the first are not read
    spare = {n for n in f.tensors if n.startswith("blk.") and gguf_suffix(n) in nextn}
    if unexpected := sorted(set(f.tensors) - used - spare):
        p.problems.append(f"unexpected tensors {', '.join(unexpected[:6])}" + (" ..." if len(unexpected) > 6 else "")
                          + f" (not part of a {cfg.num_layers}-layer {f.arch} model with {n_mtp} nextn layers)")
    expected = {name: shape for r in hf_recipes(cfg, set(p.sources), n_mtp).values() for name, shape in r.sources}
    for name, shape in expected.items():
        src = p.sources.get(name)
        if src is not None and src.shape != shape:
            found = " + ".join(f"{part} {list(f.shape(part))}" for part in src.parts)
            p.problems.append(f"{found} gives {name} of shape {list(src.shape)}, "
                              f"but the metadata implies {list(shape)}")
    if p.problems:
        raise CheckpointError(f"{f.path}: tensors do not match the metadata ({f.arch}): {_listing(p.problems)}")
    return p.sources
