"""What llama.cpp's converter does to Hugging Face tensors on the way into GGUF, as pairs of inverses.

The exporter applies the `to_gguf` direction, the GGUF reader the `from_gguf` one; nothing else in
deltaserve needs to know these conventions. Shapes are PyTorch/numpy order (GGUF `ne` reversed).

Hk = key heads, R = value heads per key head, Dk/Dv = key/value head dims, D = hidden, C = conv channels.
"""

from __future__ import annotations

import torch

from ..config import ModelConfig

# GGUF `general.architecture` <-> deltaserve family, and the HF class the family's config names
ARCH_OF_FAMILY = {"qwen3_next": "qwen3next", "qwen3_5": "qwen35", "qwen3_5_moe": "qwen35moe"}
FAMILY_OF_ARCH = {a: f for f, a in ARCH_OF_FAMILY.items()}
HF_CLASS_OF_ARCH = {"qwen3next": "Qwen3NextForCausalLM", "qwen35": "Qwen3_5ForCausalLM",
                    "qwen35moe": "Qwen3_5MoeForCausalLM"}

# Tensors renamed one-to-one: HF name after "model.layers.N." -> GGUF name after "blk.N."
LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "post_attention_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",  # [2*H*Dh, D]: query and output gate, per head
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "linear_attn.in_proj_qkv.weight": "attn_qkv.weight",
    "linear_attn.in_proj_z.weight": "attn_gate.weight",
    "linear_attn.in_proj_b.weight": "ssm_beta.weight",
    "linear_attn.in_proj_a.weight": "ssm_alpha.weight",
    "linear_attn.in_proj_ba.weight": "ssm_ba.weight",  # qwen3next: [b a] packed per key head, as in HF
    "linear_attn.conv1d.weight": "ssm_conv1d.weight",
    "linear_attn.A_log": "ssm_a",  # stored as -exp(A_log), no ".weight" suffix
    "linear_attn.dt_bias": "ssm_dt.bias",
    "linear_attn.norm.weight": "ssm_norm.weight",  # the GDN output norm: plain weight, not zero-centred
    "linear_attn.out_proj.weight": "ssm_out.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "mlp.gate.weight": "ffn_gate_inp.weight",
    "mlp.shared_expert.gate_proj.weight": "ffn_gate_shexp.weight",
    "mlp.shared_expert.up_proj.weight": "ffn_up_shexp.weight",
    "mlp.shared_expert.down_proj.weight": "ffn_down_shexp.weight",
    "mlp.shared_expert_gate.weight": "ffn_gate_inp_shexp.weight",
}
GLOBAL_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                "lm_head.weight": "output.weight"}
# MTP tensors outside its decoder layers; the converter writes them once per nextn block
NEXTN_NAMES = {"mtp.fc.weight": "nextn.eh_proj.weight",
               "mtp.pre_fc_norm_embedding.weight": "nextn.enorm.weight",
               "mtp.pre_fc_norm_hidden.weight": "nextn.hnorm.weight",
               "mtp.norm.weight": "nextn.shared_head_norm.weight"}
# nextn tensors the converter may add that deltaserve does not use (MTP shares the main embedding and head)
IGNORED_NEXTN = ("nextn.embed_tokens.weight", "nextn.shared_head_head.weight")

# Norms stored as 1 + w: every "*norm.weight" of HF except the GDN output norm (the converter's rule)
ZERO_CENTRED = frozenset({"attn_norm.weight", "post_attention_norm.weight", "attn_q_norm.weight",
                          "attn_k_norm.weight", "output_norm.weight", "nextn.enorm.weight", "nextn.hnorm.weight",
                          "nextn.shared_head_norm.weight"})


def gguf_suffix(name: str) -> str:
    """'blk.3.attn_norm.weight' -> 'attn_norm.weight' (global names are their own suffix)."""
    return name.split(".", 2)[2] if name.startswith("blk.") else name


def a_to_gguf(a_log: torch.Tensor) -> torch.Tensor:
    return -torch.exp(a_log.float())


def a_from_gguf(ssm_a: torch.Tensor) -> torch.Tensor:
    return torch.log(-ssm_a.float())


def norm_to_gguf(w: torch.Tensor) -> torch.Tensor:
    return w.float() + 1


def norm_from_gguf(w: torch.Tensor) -> torch.Tensor:
    return w.float() - 1


def _v_order(t: torch.Tensor, dim: int, cfg: ModelConfig, head: int, tile: bool) -> torch.Tensor:
    """qwen35 conversions store V heads tiled [R, Hk] instead of HF's grouped [Hk, R] (each `head` wide)."""
    hk, r = cfg.num_k_heads, cfg.num_v_heads // cfg.num_k_heads
    if r == 1:
        return t
    shape = list(t.shape)
    outer = [hk, r] if tile else [r, hk]
    t = t.reshape(shape[:dim] + outer + [head] + shape[dim + 1:]).transpose(dim, dim + 1)
    return t.reshape(shape).contiguous()


def v_tile(t: torch.Tensor, dim: int, cfg: ModelConfig, head: int) -> torch.Tensor:
    return _v_order(t, dim, cfg, head, tile=True)


def v_group(t: torch.Tensor, dim: int, cfg: ModelConfig, head: int) -> torch.Tensor:
    return _v_order(t, dim, cfg, head, tile=False)


def qkv_v_rows(t: torch.Tensor, cfg: ModelConfig, fn) -> torch.Tensor:
    """Apply a V-order function to the V rows only of [q | k | v] (in_proj_qkv rows, conv channels)."""
    qk = 2 * cfg.num_k_heads * cfg.k_head_dim
    return torch.cat([t[:qk], fn(t[qk:], 0, cfg, cfg.v_head_dim)])


def split_qkvz(qkvz: torch.Tensor, cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """qwen3next in_proj_qkvz [Hk*(2Dk+2R*Dv), D], packed [q k v z] per key head -> attn_qkv, attn_gate."""
    hk, r, dk, dv = cfg.num_k_heads, cfg.num_v_heads // cfg.num_k_heads, cfg.k_head_dim, cfg.v_head_dim
    d = qkvz.shape[1]
    q, k, v, z = qkvz.reshape(hk, 2 * dk + 2 * r * dv, d).split([dk, dk, r * dv, r * dv], dim=1)
    return torch.cat([q.reshape(-1, d), k.reshape(-1, d), v.reshape(-1, d)]), z.reshape(-1, d)


def join_qkvz(qkv: torch.Tensor, z: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """Inverse of split_qkvz: re-pack [q k v z] per key head."""
    hk, r, dk, dv = cfg.num_k_heads, cfg.num_v_heads // cfg.num_k_heads, cfg.k_head_dim, cfg.v_head_dim
    d = qkv.shape[1]
    q, k, v = qkv.split([hk * dk, hk * dk, hk * r * dv])
    parts = [q.reshape(hk, dk, d), k.reshape(hk, dk, d), v.reshape(hk, r * dv, d), z.reshape(hk, r * dv, d)]
    return torch.cat(parts, dim=1).reshape(-1, d)
