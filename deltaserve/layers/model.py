"""The hybrid decoder: embedding, GDN / gated-attention layers with MLP or MoE, final norm, LM head.

T = tokens in the batch, D = hidden, V = vocab.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import kernels
from ..cache.state_cache import HybridCache
from ..config import ModelConfig
from ..forward_batch import ForwardBatch
from .attention import GatedAttention
from .feed_forward import MLP, SparseMoE
from .gated_deltanet import GatedDeltaNet
from .linear import Embedding, Linear
from .norm import RMSNorm


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, kind: str, moe: bool):
        super().__init__()
        self.kind = kind
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mixer = GatedDeltaNet(cfg) if kind == "linear_attention" else GatedAttention(cfg)
        self.post_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.ffn = SparseMoE(cfg) if moe else MLP(cfg.hidden_size, cfg.intermediate_size)
        self.tp = None  # a tensor-parallel group: the mixer's and the FFN's outputs are partial sums over it

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, batch: ForwardBatch,
                layer_cache) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, D]: the previous layer's FFN output (or the embeddings); residual [T, D]: the residual stream x
        is to be added to (None for the first layer). Returns (this layer's FFN output, the residual stream it is
        to be added to): each residual add happens inside the next norm (one kernel for add + norm, as vLLM's
        layers pass the residual)."""
        if self.tp is None:  # float32 CPU, 1-2 sequences: one native call (its out-projection adds the residual)
            if (fused := kernels.decoder_layer_decode(x, residual, self, layer_cache, batch)) is not None:
                return fused
        stream, h = (x, self.input_norm(x)) if residual is None else kernels.add_rms_norm(residual, x, self.input_norm)
        mixed = self._summed(self.mixer(h, batch, layer_cache))
        if isinstance(self.ffn, MLP) and (fused := kernels.add_norm_swiglu(stream, mixed, self.post_norm,
                                                                           self.ffn.gate_up.weight)) is not None:
            stream, h = fused  # CUDA, one row: the add + norm in the SwiGLU GEMV's launch
            return self._summed(self.ffn.down(h)), stream
        stream, h = kernels.add_rms_norm(stream, mixed, self.post_norm)
        return self._summed(self.ffn(h)), stream

    def _summed(self, partial: torch.Tensor) -> torch.Tensor:
        return partial if self.tp is None else self.tp.all_reduce(partial)


class MTPHead(nn.Module):
    """Multi-token-prediction module (`mtp.*`): drafts the token after next (trained with it, run by spec decoding)."""

    def __init__(self, cfg: ModelConfig, num_layers: int):
        super().__init__()
        d = cfg.hidden_size
        self.pre_fc_norm_embedding = RMSNorm(d, cfg.rms_norm_eps)
        self.pre_fc_norm_hidden = RMSNorm(d, cfg.rms_norm_eps)
        self.fc = Linear(2 * d, d)
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, "full_attention", cfg.num_experts > 0) for _ in range(num_layers)
        )
        self.norm = RMSNorm(d, cfg.rms_norm_eps)

    def forward(self, hidden: torch.Tensor, next_embeds: torch.Tensor, batch: ForwardBatch,
                kv: tuple[torch.Tensor, torch.Tensor], step: int = 0) -> torch.Tensor:
        """Row t: `hidden` [T, D], the main model's output at position t (after its final norm, as vLLM and
        SGLang feed it), and `next_embeds` [T, D], the embedding of token t+1. Runs at position t with its
        own KV cache `kv` ([S, M, G, Dh] each, slots as in `batch`); returns final-normed [T, D] whose
        logits (shared LM head) predict token t+2. Draft step i uses layer i mod num_layers, as vLLM does.
        """
        x = torch.cat([self.pre_fc_norm_embedding(next_embeds), self.pre_fc_norm_hidden(hidden)], dim=-1)
        x, residual = self.layers[step % len(self.layers)](self.fc(x), None, batch, kv)  # fc: [embedding | hidden]
        return kernels.add_rms_norm(residual, x, self.norm)[1]


class HybridModel(nn.Module):
    def __init__(self, cfg: ModelConfig, mtp_layers: int = 0):
        super().__init__()
        self.cfg = cfg
        self.embed = Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, kind, moe) for kind, moe in zip(cfg.layer_types, cfg.moe_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = None if cfg.tie_word_embeddings else Linear(cfg.hidden_size, cfg.vocab_size)
        self.mtp = MTPHead(cfg, mtp_layers) if mtp_layers else None

    def forward(self, batch: ForwardBatch, cache: HybridCache) -> torch.Tensor:
        """Runs every token of the batch; returns final-normed hidden states [T, D]."""
        x, residual = self.embed(batch.input_ids), None
        for i, layer in enumerate(self.layers):
            x, residual = layer(x, residual, batch, cache.layer(i))
        return kernels.add_rms_norm(residual, x, self.norm)[1]

    def set_tensor_parallel(self, group) -> None:
        """This model is one rank's shard (weights/loader.py, tp=...): its layers sum their outputs over group."""
        for module in self.modules():
            if isinstance(module, DecoderLayer):
                module.tp = group

    @property
    def head_weight(self):
        """The LM head's weight [V, D]: the embedding's when tied."""
        return self.embed.weight if self.lm_head is None else self.lm_head.weight

    def weight_bytes(self) -> int:
        """Bytes the weights take as held: float tensors, quantized or packed weights (a tied one once)."""
        seen: dict[int, int] = {}
        for module in self.modules():
            for value in [*module._parameters.values(), *vars(module).values()]:
                if isinstance(value, torch.Tensor) or hasattr(value, "nbytes") and hasattr(value, "segments"):
                    seen[id(value)] = value.nbytes
        return sum(seen.values())

    @property
    def dtype(self) -> torch.dtype:
        """The activations' dtype (weights may be stored in other formats)."""
        return self.norm.weight.dtype

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[R, D] -> [R, V] float32."""
        return kernels.linear(hidden, self.head_weight).float()
