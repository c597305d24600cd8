"""What the engine hands back: each request's output per step, and its running counters."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]  # generated so far
    new_token_ids: list[int]  # generated in this step
    finished: bool
    finish_reason: str | None
    text: str | None = None
    prompt_logits: torch.Tensor | None = None  # [P - from, V] when asked for; row i predicts prompt token from+i+1
    logits: torch.Tensor | None = None  # [len(token_ids), V] when kept: the logits each token was sampled from
    logprobs: list[tuple[float, dict[int, float]]] | None = None  # per token: (its logprob, top-k {id: logprob})
    num_draft_tokens: int = 0  # speculative decoding: MTP drafts verified, and how many were accepted
    num_accepted_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served by the prefix cache


@dataclass
class EngineStats:
    steps: int = 0
    tokens: int = 0  # tokens run through the model
    prompt_tokens: int = 0
    generated_tokens: int = 0
    last_batch_seqs: int = 0
    max_batch_seqs: int = 0
    draft_tokens: int = 0  # speculative decoding: drafts verified / accepted
    accepted_tokens: int = 0
    overlapped_steps: int = 0  # decode steps launched before the previous step's tokens were read
    finished: dict[str, int] = field(default_factory=dict)  # finish reason -> count
