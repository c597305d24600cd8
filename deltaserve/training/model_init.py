"""The default model's architecture (as a Hugging Face Qwen3-Next config) and its random initialisation."""

from __future__ import annotations

import math

import torch

from ..config import ModelConfig
from ..layers.model import HybridModel

# Qwen3-Next in miniature: layers [GDN, GDN, GDN, attention] x 2, every FFN a top-2-of-8 MoE with a
# sigmoid-gated shared expert, tied embeddings (the vocabulary matrix is a quarter of the weights).
DEFAULT_ARCH = dict(
    hidden_size=192, num_hidden_layers=8, full_attention_interval=4,
    num_attention_heads=4, num_key_value_heads=2, head_dim=32,
    linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=32, linear_value_head_dim=32,
    linear_conv_kernel_dim=4,
    num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=96,
    intermediate_size=384,  # dense-MLP width: unused while every layer is MoE (mlp_only_layers empty)
    decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True,
    rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
    tie_word_embeddings=True, num_nextn_predict_layers=1,
)


def hf_config(vocab_size: int, max_len: int, eos_ids: list[int], **arch) -> dict:
    """config.json contents; `dtype` names the compute dtype, the stored tensors may be narrower."""
    arch = {**DEFAULT_ARCH, **arch}
    n, every = arch["num_hidden_layers"], arch.pop("full_attention_interval")
    layer_types = ["full_attention" if (i + 1) % every == 0 else "linear_attention" for i in range(n)]
    return dict(architectures=["Qwen3NextForCausalLM"], model_type="qwen3_next", vocab_size=vocab_size,
                layer_types=layer_types, max_position_embeddings=max_len, hidden_act="silu",
                eos_token_id=eos_ids[0], bos_token_id=None, pad_token_id=None, dtype="float32", **arch)


@torch.no_grad()
def init_weights(model: HybridModel, cfg: ModelConfig, gen: torch.Generator) -> None:
    """Matrices ~ N(0, 0.02) (output projections scaled by 1/sqrt(2 * layers), GPT-2 style), zero-centred
    norms 0, gated norm 1, A_log = log U(1, 16), dt_bias = softplus^-1 of dt ~ logU(1e-3, 1e-1) (Mamba),
    conv taps ~ U(+-1/sqrt(K))."""
    out_std = 0.02 / math.sqrt(2 * (cfg.num_layers + 1))
    for name, p in model.named_parameters():
        parts = name.split(".")
        leaf = parts[-2] if parts[-1] == "weight" else parts[-1]  # module name, or the bare parameter's
        if name.endswith("mixer.norm.weight"):
            p.fill_(1.0)  # GatedRMSNorm multiplies by its weight directly
        elif "norm" in leaf:
            p.zero_()  # zero-centred RMSNorm computes x * (1 + w)
        elif leaf == "A_log":
            p.copy_(torch.empty_like(p).uniform_(1, 16, generator=gen).log())
        elif leaf == "dt_bias":
            dt = torch.empty_like(p).uniform_(math.log(1e-3), math.log(1e-1), generator=gen).exp()
            p.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        elif leaf == "conv_weight":
            p.uniform_(-p.shape[1] ** -0.5, p.shape[1] ** -0.5, generator=gen)
        elif leaf in ("out_proj", "o_proj", "down", "experts_down"):
            p.normal_(0, out_std, generator=gen)
        else:
            p.normal_(0, 0.02, generator=gen)


def count_params(model: HybridModel) -> dict[str, int]:
    """Total, MTP-head and per-token active parameter counts (active: top-k of the routed experts)."""
    total = sum(p.numel() for p in model.parameters())
    mtp = sum(p.numel() for p in model.mtp.parameters()) if model.mtp is not None else 0
    routed = sum(p.numel() for n, p in model.named_parameters() if ".experts_" in n)
    cfg = model.cfg
    active = total - routed + routed * cfg.top_k // max(cfg.num_experts, 1)
    return {"total": total, "mtp": mtp, "active": active}
