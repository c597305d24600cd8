"""Tiny random checkpoints of the three architectures, saved by HF transformers (the oracle).

Router weights are scaled x10 and the LM head x20 so expert choice and argmax are decisive:
random MoE routers have near-ties, and a 1e-6 difference must not flip an expert.
"""

from __future__ import annotations

from pathlib import Path

import torch

ARCHS = ("qwen3_next", "qwen3_5", "qwen3_5_moe")


def hf_classes(arch: str):
    import transformers as tf
    return {
        "qwen3_next": (tf.Qwen3NextConfig, tf.Qwen3NextForCausalLM),
        "qwen3_5": (tf.Qwen3_5TextConfig, tf.Qwen3_5ForCausalLM),
        "qwen3_5_moe": (tf.Qwen3_5MoeTextConfig, tf.Qwen3_5MoeForCausalLM),
    }[arch]


def tiny_config(arch: str, **overrides) -> dict:
    cfg = dict(
        vocab_size=256, hidden_size=64, num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
        linear_value_head_dim=16, max_position_embeddings=4096, eos_token_id=None,
    )
    if arch == "qwen3_5":
        cfg.update(intermediate_size=96)
    else:
        cfg.update(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=48)
        if arch == "qwen3_next":
            cfg.update(intermediate_size=96)
    cfg.update(overrides)
    return cfg


def build_hf_model(arch: str, seed: int = 0, **overrides):
    """A random HF model in float32, eval mode, with peaky router and LM head."""
    config_cls, model_cls = hf_classes(arch)
    torch.manual_seed(seed)
    model = model_cls(config_cls(**tiny_config(arch, **overrides))).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.mul_(10)
            elif name == "lm_head.weight":
                p.mul_(20)
    return model


def save_hf_model(arch: str, path: Path, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides) -> Path:
    model = build_hf_model(arch, seed, **overrides)
    model.to(dtype).save_pretrained(path)
    return path


def add_mtp_weights(path: Path, seed: int = 0) -> Path:
    """Gives a saved checkpoint an MTP head (`mtp.*`), its layer shaped like the model's first attention layer."""
    import json

    from safetensors.torch import load_file, save_file

    tensors = load_file(path / "model.safetensors")
    cfg = json.loads((path / "config.json").read_text())
    src = f"model.layers.{cfg['layer_types'].index('full_attention')}."
    g = torch.Generator().manual_seed(seed)
    for name, t in list(tensors.items()):
        if name.startswith(src):
            tensors["mtp.layers.0." + name[len(src):]] = t + 0.02 * torch.randn(t.shape, generator=g)
    d = cfg["hidden_size"]
    tensors["mtp.fc.weight"] = torch.randn(d, 2 * d, generator=g) / (2 * d) ** 0.5
    for n in ("pre_fc_norm_embedding", "pre_fc_norm_hidden", "norm"):
        tensors[f"mtp.{n}.weight"] = torch.zeros(d)
    save_file(tensors, path / "model.safetensors")
    return path


def dense_state_dict(model) -> dict[str, torch.Tensor]:
    """The model's parameters, weights kept in a GGUF file's block formats dequantized to float32 (state_dict
    holds only the tensors)."""
    from deltaserve.kernels.quantized import QuantizedWeight
    from deltaserve.weights.loader import matrix_params

    state = dict(model.state_dict())
    for name in matrix_params(model):
        module_name, _, attr = name.rpartition(".")
        weight = getattr(model.get_submodule(module_name), attr)
        if isinstance(weight, QuantizedWeight):
            state[name] = weight.dequantize()
        elif name not in state:
            state[name] = weight
    return {k: v.float() for k, v in state.items()}
