"""Turns one logits row per sequence into a token. B = sequences, V = vocab.

Each sampled row draws from its sequence's own torch.Generator, so a request's randomness never
depends on which other requests share the batch.
"""

from __future__ import annotations

import torch

from .params import SamplingParams


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, top-k and top-p applied to one row [V]; filtered entries become -inf."""
    logits = logits / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = logits.topk(params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = logits.sort(descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the tokens ranked above it already cover top_p (the top token always stays)
        drop = probs.cumsum(-1) - probs >= params.top_p
        logits = logits.masked_fill(drop.scatter(0, order, drop), float("-inf"))
    return logits


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator]) -> list[int]:
    """logits [B, V] float32 -> one token id per row."""
    tokens = logits.argmax(-1).tolist()
    for i, p in enumerate(params):
        if not p.greedy:
            probs = filter_logits(logits[i].cpu(), p).softmax(-1)  # each sequence's generator lives on the CPU
            tokens[i] = int(torch.multinomial(probs, 1, generator=generators[i]))
    return tokens


def token_logprobs(row: torch.Tensor, token: int, k: int) -> tuple[float, dict[int, float]]:
    """The sampled token's log-probability under the model's raw distribution, and the top k ([V] row)."""
    logp = row.log_softmax(-1)
    top = logp.topk(k) if k else None
    return float(logp[token]), ({} if top is None else dict(zip(top.indices.tolist(), top.values.tolist())))
