"""Model configuration read from a Hugging Face `config.json` (frozen dataclass, no transformers import)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

# architecture name -> family; the family decides projection layout and FFN kind
ARCHITECTURES = {
    "Qwen3NextForCausalLM": "qwen3_next",
    "Qwen3_5ForCausalLM": "qwen3_5",
    "Qwen3_5ForConditionalGeneration": "qwen3_5",
    "Qwen3_5MoeForCausalLM": "qwen3_5_moe",
    "Qwen3_5MoeForConditionalGeneration": "qwen3_5_moe",
}
MODEL_TYPES = {
    "qwen3_next": "qwen3_next",
    "qwen3_5": "qwen3_5",
    "qwen3_5_text": "qwen3_5",
    "qwen3_5_moe": "qwen3_5_moe",
    "qwen3_5_moe_text": "qwen3_5_moe",
}


class ConfigError(ValueError):
    """A config.json that deltaserve cannot serve; the message says which field."""


@dataclass(frozen=True)
class ModelConfig:
    family: str  # qwen3_next | qwen3_5 | qwen3_5_moe
    vocab_size: int
    hidden_size: int
    num_layers: int
    layer_types: tuple[str, ...]  # "linear_attention" | "full_attention" per layer
    rms_norm_eps: float
    tie_word_embeddings: bool
    # gated attention
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rotary_dim: int
    rope_theta: float
    # gated deltanet
    conv_kernel: int
    num_k_heads: int
    num_v_heads: int
    k_head_dim: int
    v_head_dim: int
    # feed-forward: dense MLP width, and MoE (num_experts == 0 means dense everywhere)
    intermediate_size: int
    num_experts: int
    top_k: int
    moe_intermediate_size: int
    shared_expert_intermediate_size: int
    norm_topk_prob: bool
    moe_layers: tuple[bool, ...]
    eos_token_ids: tuple[int, ...]

    @property
    def gdn_layers(self) -> list[int]:
        return [i for i, t in enumerate(self.layer_types) if t == "linear_attention"]

    @property
    def attn_layers(self) -> list[int]:
        return [i for i, t in enumerate(self.layer_types) if t == "full_attention"]

    @property
    def conv_dim(self) -> int:  # channels of the causal conv: q, k and v concatenated
        return 2 * self.num_k_heads * self.k_head_dim + self.num_v_heads * self.v_head_dim

    @classmethod
    def from_dir(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise ConfigError(f"{path}: no config.json (expected a Hugging Face checkpoint directory)")
        try:
            raw = json.loads(cfg_file.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{cfg_file}: not valid JSON ({e})") from None
        eos = _eos_from_generation_config(path)
        return cls.from_dict(raw, extra_eos=eos)

    @classmethod
    def from_dict(cls, raw: dict, extra_eos: tuple[int, ...] = ()) -> "ModelConfig":
        family = _family(raw)
        text = raw.get("text_config", raw)  # *ForConditionalGeneration keeps the LM under text_config
        tie = raw.get("tie_word_embeddings", text.get("tie_word_embeddings", False))

        def need(key: str):
            if key not in text:
                raise ConfigError(f"config.json: missing field '{key}' for {family}")
            return text[key]

        n_layers = need("num_hidden_layers")
        layer_types = text.get("layer_types")
        if layer_types is None:
            interval = text.get("full_attention_interval", 4)
            layer_types = ["full_attention" if (i + 1) % interval == 0 else "linear_attention" for i in range(n_layers)]
        if len(layer_types) != n_layers or set(layer_types) - {"linear_attention", "full_attention"}:
            raise ConfigError(f"config.json: layer_types must list {n_layers} of linear_attention/full_attention")

        rope = dict(text.get("rope_parameters") or text.get("rope_scaling") or {})
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ConfigError(f"config.json: rope_type '{rope_type}' is not supported (only 'default')")
        theta = rope.get("rope_theta", text.get("rope_theta", 10000.0))
        partial = rope.get("partial_rotary_factor", text.get("partial_rotary_factor", 0.25))
        head_dim = text.get("head_dim") or need("hidden_size") // need("num_attention_heads")

        num_experts = text.get("num_experts", 0) if family != "qwen3_5" else 0
        if family == "qwen3_next":
            step = text.get("decoder_sparse_step", 1)
            dense_only = set(text.get("mlp_only_layers") or [])
            moe_layers = [num_experts > 0 and i not in dense_only and (i + 1) % step == 0 for i in range(n_layers)]
        else:
            moe_layers = [num_experts > 0] * n_layers
        eos = text.get("eos_token_id", raw.get("eos_token_id"))
        eos_ids = tuple(eos if isinstance(eos, list) else [] if eos is None else [eos])

        cfg = cls(
            family=family,
            vocab_size=need("vocab_size"),
            hidden_size=need("hidden_size"),
            num_layers=n_layers,
            layer_types=tuple(layer_types),
            rms_norm_eps=text.get("rms_norm_eps", 1e-6),
            tie_word_embeddings=bool(tie),
            num_heads=need("num_attention_heads"),
            num_kv_heads=need("num_key_value_heads"),
            head_dim=head_dim,
            rotary_dim=int(head_dim * partial),
            rope_theta=float(theta),
            conv_kernel=text.get("linear_conv_kernel_dim", 4),
            num_k_heads=need("linear_num_key_heads"),
            num_v_heads=need("linear_num_value_heads"),
            k_head_dim=need("linear_key_head_dim"),
            v_head_dim=need("linear_value_head_dim"),
            intermediate_size=text.get("intermediate_size", 0) or 0,
            num_experts=num_experts,
            top_k=text.get("num_experts_per_tok", 0) if num_experts else 0,
            moe_intermediate_size=text.get("moe_intermediate_size", 0) if num_experts else 0,
            shared_expert_intermediate_size=text.get("shared_expert_intermediate_size", 0) if num_experts else 0,
            norm_topk_prob=bool(text.get("norm_topk_prob", True)) or family == "qwen3_5_moe",
            moe_layers=tuple(moe_layers),
            eos_token_ids=tuple(dict.fromkeys(eos_ids + tuple(extra_eos))),
        )
        cfg._validate()
        return cfg

    def _validate(self) -> None:
        if self.num_v_heads % self.num_k_heads:
            raise ConfigError("linear_num_value_heads must be a multiple of linear_num_key_heads")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError("num_attention_heads must be a multiple of num_key_value_heads")
        if self.rotary_dim % 2 or not 0 < self.rotary_dim <= self.head_dim:
            raise ConfigError(f"rotary dimension {self.rotary_dim} must be even and within head_dim {self.head_dim}")
        if any(self.moe_layers) and not (self.top_k and self.moe_intermediate_size):
            raise ConfigError("MoE layers need num_experts_per_tok and moe_intermediate_size")
        if not all(self.moe_layers) and not self.intermediate_size:
            raise ConfigError("dense MLP layers need intermediate_size")


def _family(raw: dict) -> str:
    for arch in raw.get("architectures") or []:
        if arch in ARCHITECTURES:
            return ARCHITECTURES[arch]
    model_type = raw.get("model_type")
    if model_type in MODEL_TYPES:
        return MODEL_TYPES[model_type]
    known = ", ".join(sorted(ARCHITECTURES))
    raise ConfigError(
        f"config.json: unsupported architecture {raw.get('architectures')} / model_type {model_type!r}; "
        f"deltaserve serves {known}"
    )


def _eos_from_generation_config(path: Path) -> tuple[int, ...]:
    gen = path / "generation_config.json"
    if not gen.is_file():
        return ()
    eos = json.loads(gen.read_text()).get("eos_token_id")
    return tuple(eos if isinstance(eos, list) else [] if eos is None else [eos])
