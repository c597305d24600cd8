"""GGUF metadata (`{arch}.*` keys, as llama.cpp's converter writes them) -> a Hugging Face style config dict.

The dict feeds ModelConfig.from_dict unchanged, so GGUF and safetensors checkpoints share one config path.
Facts the metadata does not carry come from the tensors: vocab size (token_embd rows), tied embeddings
(no output.weight), dense layers in a qwen3next MoE model (no ffn_gate_inp).
"""

from __future__ import annotations

import numpy as np

from ..config import ConfigError, ModelConfig
from .gguf_conventions import FAMILY_OF_ARCH, HF_CLASS_OF_ARCH
from .gguf_file import GGUFFile
from .safetensors_dir import CheckpointError


def _f32_decimal(x: float) -> float:
    """The shortest decimal that reads back as the stored float32 (1e-06, not 9.99999997e-07)."""
    return float(str(np.float32(x)))


def _layer_types(f: GGUFFile, arch: str, n_layers: int, n_all: int) -> list[str]:
    """Per-layer kinds: the explicit recurrent-layer flags if present, else every interval-th layer attends."""
    flags = f.get(f"{arch}.attention.recurrent_layers", list, None)
    if flags is not None:
        if len(flags) not in (n_layers, n_all):
            raise CheckpointError(f"{f.path}: metadata key '{arch}.attention.recurrent_layers' has {len(flags)} "
                                  f"entries, expected {n_all} (block_count)")
        return ["linear_attention" if flags[i] else "full_attention" for i in range(n_layers)]
    interval = f.get(f"{arch}.full_attention_interval", int, 4)
    if interval < 1:
        raise CheckpointError(f"{f.path}: metadata key '{arch}.full_attention_interval' is {interval}, expected >= 1")
    return ["full_attention" if (i + 1) % interval == 0 else "linear_attention" for i in range(n_layers)]


def hf_config_from_gguf(f: GGUFFile) -> tuple[dict, int]:
    """(config dict in HF layout, number of MTP layers) for a qwen3next / qwen35 / qwen35moe file."""
    arch = f.arch
    if arch not in FAMILY_OF_ARCH:
        raise CheckpointError(f"{f.path}: GGUF architecture '{arch}' is not supported; deltaserve reads "
                              f"{', '.join(FAMILY_OF_ARCH)}")

    def key(name: str, kind: type = int, default=None):
        return f.get(f"{arch}.{name}", kind) if default is None else f.get(f"{arch}.{name}", kind, default)

    if "token_embd.weight" not in f.tensors:
        raise CheckpointError(f"{f.path}: tensor 'token_embd.weight' is missing")
    n_all, n_mtp = key("block_count"), key("nextn_predict_layers", int, 0)
    n_layers = n_all - n_mtp  # MTP (nextn) blocks are appended after the trunk
    if n_layers < 1:
        raise CheckpointError(f"{f.path}: block_count {n_all} leaves no layers after {n_mtp} nextn layers")
    heads = key("attention.head_count")
    hidden = key("embedding_length")
    head_dim = key("attention.key_length", int, hidden // max(heads, 1))
    rope_dim = key("rope.dimension_count", int, head_dim)
    v_heads = key("ssm.time_step_rank")
    scaling = key("rope.scaling.type", str, "none")

    raw = {
        "architectures": [HF_CLASS_OF_ARCH[arch]],
        "vocab_size": f.shape("token_embd.weight")[0],
        "hidden_size": hidden,
        "num_hidden_layers": n_layers,
        "layer_types": _layer_types(f, arch, n_layers, n_all),
        "rms_norm_eps": _f32_decimal(key("attention.layer_norm_rms_epsilon", float)),
        "tie_word_embeddings": "output.weight" not in f.tensors,
        "num_attention_heads": heads,
        "num_key_value_heads": key("attention.head_count_kv"),
        "head_dim": head_dim,
        "rope_parameters": {"rope_type": "default" if scaling == "none" else scaling,
                            "rope_theta": _f32_decimal(key("rope.freq_base", float, 10000.0)),
                            "partial_rotary_factor": rope_dim / head_dim},
        "linear_conv_kernel_dim": key("ssm.conv_kernel"),
        "linear_num_key_heads": key("ssm.group_count"),
        "linear_num_value_heads": v_heads,
        "linear_key_head_dim": key("ssm.state_size"),
        "linear_value_head_dim": key("ssm.inner_size") // max(v_heads, 1),
        "intermediate_size": key("feed_forward_length", int, 0),
        "max_position_embeddings": key("context_length", int, 0),
        "mtp_num_hidden_layers": n_mtp,
    }
    experts = key("expert_count", int, 0)
    if experts:
        raw.update(num_experts=experts, num_experts_per_tok=key("expert_used_count"),
                   moe_intermediate_size=key("expert_feed_forward_length"),
                   shared_expert_intermediate_size=key("expert_shared_feed_forward_length", int, 0),
                   norm_topk_prob=key("expert_weights_norm", bool, True), decoder_sparse_step=1,
                   mlp_only_layers=[i for i in range(n_layers) if f"blk.{i}.ffn_gate_inp.weight" not in f.tensors])
    eos = [f.get(k, int, None) for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id")]
    raw["eos_token_id"] = list(dict.fromkeys(e for e in eos if e is not None)) or None
    return raw, n_mtp


def config_from_gguf(f: GGUFFile) -> tuple[ModelConfig, int]:
    raw, n_mtp = hf_config_from_gguf(f)
    try:
        return ModelConfig.from_dict(raw), n_mtp
    except ConfigError as e:
        raise CheckpointError(f"{f.path}: GGUF metadata gives an unusable config: {e}") from None
