"""Which slice of each parameter a tensor-parallel rank holds (as vLLM and SGLang shard Gated-DeltaNet hybrids).

Column-parallel (rows split, each part by head): the GDN in-projection's q | k | v | z | b | a parts, its conv
channels q | k | v, A_log and dt_bias; attention's q+gate | k | v rows (KV heads split, or replicated where there
are fewer than ranks); the MLP's and every expert's gate | up rows. Row-parallel (columns split): the GDN
out-projection, attention's o-projection, the MLP's and every expert's down projection; each rank's output is
then a partial sum that the group adds (two all-reduces a layer: after the mixer, after the MLP / MoE, the shared
expert's share inside the MoE's). Everything else (embedding, LM head, norms, router, shared-expert gate, MTP fc)
is replicated. Nothing inside a GDN layer communicates: its states and conv windows are per rank, per head.
"""

from __future__ import annotations

import dataclasses

import torch

from ..config import ModelConfig


class ShardError(ValueError):
    pass


def shard_config(cfg: ModelConfig, tp: int) -> ModelConfig:
    """The config of one rank's model: head counts and widths divided by tp (KV heads: at least one)."""
    need = {"linear_num_key_heads": cfg.num_k_heads, "linear_num_value_heads": cfg.num_v_heads,
            "num_attention_heads": cfg.num_heads, "intermediate_size": cfg.intermediate_size,
            "moe_intermediate_size": cfg.moe_intermediate_size,
            "shared_expert_intermediate_size": cfg.shared_expert_intermediate_size}
    bad = [f"{k} {v}" for k, v in need.items() if v % tp]
    if cfg.num_kv_heads % tp and tp % cfg.num_kv_heads:
        bad.append(f"num_key_value_heads {cfg.num_kv_heads} (nor does it divide the group)")
    if bad:
        raise ShardError(f"tensor_parallel_size {tp} must divide {', '.join(bad)}")
    return dataclasses.replace(
        cfg, num_k_heads=cfg.num_k_heads // tp, num_v_heads=cfg.num_v_heads // tp, num_heads=cfg.num_heads // tp,
        num_kv_heads=max(1, cfg.num_kv_heads // tp), intermediate_size=cfg.intermediate_size // tp,
        moe_intermediate_size=cfg.moe_intermediate_size // tp,
        shared_expert_intermediate_size=cfg.shared_expert_intermediate_size // tp)


def _parts(w: torch.Tensor, sizes: list[int], rank: int, tp: int, dim: int = 0) -> torch.Tensor:
    """Each part (of `sizes` along dim) split into tp equal slices; rank's slice of every part, concatenated."""
    return torch.cat([p.chunk(tp, dim)[rank] for p in w.split(sizes, dim)], dim)


def _kv_heads(w: torch.Tensor, heads: int, rank: int, tp: int) -> torch.Tensor:
    """Rows of `heads` KV heads: split by rank, or (fewer heads than ranks) the one head this rank's q heads use."""
    if heads % tp == 0:
        return w.chunk(tp)[rank]
    return w.chunk(heads)[rank * heads // tp]


def shard_param(name: str, w: torch.Tensor, cfg: ModelConfig, rank: int, tp: int) -> torch.Tensor:
    """Rank's slice of the full parameter `name` (deltaserve's names, full config cfg)."""
    leaf = name.split(".")[-2:]
    mixer, ffn = "mixer" in name, ".ffn." in name or name.startswith("ffn.")
    kd, vd, hv = cfg.num_k_heads * cfg.k_head_dim, cfg.num_v_heads * cfg.v_head_dim, cfg.num_v_heads
    if mixer and leaf == ["in_proj", "weight"]:
        return _parts(w, [kd, kd, vd, vd, hv, hv], rank, tp)
    if mixer and leaf[-1] == "conv_weight":
        return _parts(w, [kd, kd, vd], rank, tp)
    if mixer and leaf[-1] in ("A_log", "dt_bias"):
        return w.chunk(tp)[rank]
    if mixer and leaf[0] in ("out_proj", "o_proj"):
        return w.chunk(tp, dim=1)[rank]
    if mixer and leaf == ["qkv_proj", "weight"]:
        q, k, v = w.split([2 * cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim,
                           cfg.num_kv_heads * cfg.head_dim])
        return torch.cat([q.chunk(tp)[rank], _kv_heads(k, cfg.num_kv_heads, rank, tp),
                          _kv_heads(v, cfg.num_kv_heads, rank, tp)])
    if ffn and leaf[-1] == "experts_gate_up":
        return _parts(w, [w.shape[1] // 2] * 2, rank, tp, dim=1)
    if ffn and leaf[-1] == "experts_down":
        return w.chunk(tp, dim=2)[rank]
    if ffn and leaf == ["gate_up", "weight"]:
        return _parts(w, [w.shape[0] // 2] * 2, rank, tp)
    if ffn and leaf == ["down", "weight"]:
        return w.chunk(tp, dim=1)[rank]
    return w
