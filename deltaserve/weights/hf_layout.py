"""Where each deltaserve parameter comes from in a Hugging Face checkpoint, and how it is assembled.

One `Recipe` per parameter: the checkpoint tensors it reads (with the shape each must have) and
a function that fuses them (e.g. q/k/v rows into one projection, per-expert matrices into a stack).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..config import ModelConfig

Tensors = list[torch.Tensor]


@dataclass(frozen=True)
class Recipe:
    sources: tuple[tuple[str, tuple[int, ...]], ...]  # (checkpoint name, expected shape)
    combine: Callable[[Tensors], torch.Tensor]


def _one(name: str, shape: tuple[int, ...], fn: Callable[[torch.Tensor], torch.Tensor] = lambda t: t) -> Recipe:
    return Recipe(((name, shape),), lambda ts: fn(ts[0]))


def _cat(*sources: tuple[str, tuple[int, ...]]) -> Recipe:
    return Recipe(tuple(sources), lambda ts: torch.cat(ts, dim=0))


def _deinterleave_qwen3_next(cfg: ModelConfig) -> Callable[[Tensors], torch.Tensor]:
    """Qwen3-Next packs [q k v z] and [b a] per key-head group; reorder to [q | k | v | z | b | a]."""
    hk, r, dk, dv = cfg.num_k_heads, cfg.num_v_heads // cfg.num_k_heads, cfg.k_head_dim, cfg.v_head_dim

    def combine(ts: Tensors) -> torch.Tensor:
        qkvz, ba = ts
        d = qkvz.shape[1]
        parts = qkvz.view(hk, 2 * dk + 2 * r * dv, d).split([dk, dk, r * dv, r * dv], dim=1)
        parts += ba.view(hk, 2 * r, d).split([r, r], dim=1)
        return torch.cat([p.reshape(-1, d) for p in parts])

    return combine


def _experts(prefix: str, cfg: ModelConfig, fused: bool) -> dict[str, Recipe]:
    e, i, d = cfg.num_experts, cfg.moe_intermediate_size, cfg.hidden_size
    if fused:
        return {"experts_gate_up": _one(prefix + "experts.gate_up_proj", (e, 2 * i, d)),
                "experts_down": _one(prefix + "experts.down_proj", (e, d, i))}
    gate_up = [(f"{prefix}experts.{x}.{p}_proj.weight", (i, d)) for x in range(e) for p in ("gate", "up")]
    down = [(f"{prefix}experts.{x}.down_proj.weight", (d, i)) for x in range(e)]
    return {
        "experts_gate_up": Recipe(tuple(gate_up), lambda ts: torch.stack([torch.cat(ts[j:j + 2]) for j in range(0, len(ts), 2)])),
        "experts_down": Recipe(tuple(down), torch.stack),
    }


def _layer(cfg: ModelConfig, src: str, dst: str, kind: str, moe: bool, fused_experts: bool) -> dict[str, Recipe]:
    d, eps_shape = cfg.hidden_size, (cfg.hidden_size,)
    out = {dst + "input_norm.weight": _one(src + "input_layernorm.weight", eps_shape),
           dst + "post_norm.weight": _one(src + "post_attention_layernorm.weight", eps_shape)}
    m, mx = src + ("linear_attn." if kind == "linear_attention" else "self_attn."), dst + "mixer."
    if kind == "linear_attention":
        h, vd = cfg.num_v_heads, cfg.num_v_heads * cfg.v_head_dim
        if cfg.family == "qwen3_next":
            out[mx + "in_proj.weight"] = Recipe(
                ((m + "in_proj_qkvz.weight", (cfg.conv_dim + vd, d)), (m + "in_proj_ba.weight", (2 * h, d))),
                _deinterleave_qwen3_next(cfg))
        else:
            out[mx + "in_proj.weight"] = _cat((m + "in_proj_qkv.weight", (cfg.conv_dim, d)), (m + "in_proj_z.weight", (vd, d)),
                                              (m + "in_proj_b.weight", (h, d)), (m + "in_proj_a.weight", (h, d)))
        out[mx + "conv_weight"] = _one(m + "conv1d.weight", (cfg.conv_dim, 1, cfg.conv_kernel), lambda t: t[:, 0])
        out[mx + "A_log"] = _one(m + "A_log", (h,))
        out[mx + "dt_bias"] = _one(m + "dt_bias", (h,))
        out[mx + "norm.weight"] = _one(m + "norm.weight", (cfg.v_head_dim,))
        out[mx + "out_proj.weight"] = _one(m + "out_proj.weight", (d, vd))
    else:
        hd, kvd = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        out[mx + "qkv_proj.weight"] = _cat((m + "q_proj.weight", (2 * hd, d)), (m + "k_proj.weight", (kvd, d)),
                                           (m + "v_proj.weight", (kvd, d)))
        out[mx + "q_norm.weight"] = _one(m + "q_norm.weight", (cfg.head_dim,))
        out[mx + "k_norm.weight"] = _one(m + "k_norm.weight", (cfg.head_dim,))
        out[mx + "o_proj.weight"] = _one(m + "o_proj.weight", (d, hd))
    f, fx = src + "mlp.", dst + "ffn."
    if moe:
        s = cfg.shared_expert_intermediate_size
        out[fx + "router.weight"] = _one(f + "gate.weight", (cfg.num_experts, d))
        out.update({fx + k: v for k, v in _experts(f, cfg, fused_experts).items()})
        out[fx + "shared.gate_up.weight"] = _cat((f + "shared_expert.gate_proj.weight", (s, d)),
                                                 (f + "shared_expert.up_proj.weight", (s, d)))
        out[fx + "shared.down.weight"] = _one(f + "shared_expert.down_proj.weight", (d, s))
        out[fx + "shared_gate.weight"] = _one(f + "shared_expert_gate.weight", (1, d))
    else:
        w = cfg.intermediate_size
        out[fx + "gate_up.weight"] = _cat((f + "gate_proj.weight", (w, d)), (f + "up_proj.weight", (w, d)))
        out[fx + "down.weight"] = _one(f + "down_proj.weight", (d, w))
    return out


def hf_recipes(cfg: ModelConfig, names: set[str], mtp_layers: int) -> dict[str, Recipe]:
    """Recipes for every parameter of HybridModel(cfg, mtp_layers), given the checkpoint's tensor names."""
    d, v = cfg.hidden_size, cfg.vocab_size
    out = {"embed.weight": _one("model.embed_tokens.weight", (v, d)), "norm.weight": _one("model.norm.weight", (d,))}
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = _one("lm_head.weight", (v, d))
    for i, (kind, moe) in enumerate(zip(cfg.layer_types, cfg.moe_layers)):
        src = f"model.layers.{i}."
        out.update(_layer(cfg, src, f"layers.{i}.", kind, moe, src + "mlp.experts.gate_up_proj" in names))
    if mtp_layers:
        out["mtp.fc.weight"] = _one("mtp.fc.weight", (d, 2 * d))
        for n in ("pre_fc_norm_embedding", "pre_fc_norm_hidden", "norm"):
            out[f"mtp.{n}.weight"] = _one(f"mtp.{n}.weight", (d,))
        for j in range(mtp_layers):
            src = f"mtp.layers.{j}."
            out.update(_layer(cfg, src, src, "full_attention", cfg.num_experts > 0, src + "mlp.experts.gate_up_proj" in names))
    return out
