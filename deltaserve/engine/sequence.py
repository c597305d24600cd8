"""A request's life inside the engine: its tokens, its slot, how much of it the cache already holds."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from ..sampling.params import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Sequence:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    max_tokens: int  # resolved against max_model_len
    keep_logits: bool = False  # keep the logits each output token was sampled from (tests, tools)
    prompt_logits_from: int | None = None  # keep prompt logits of positions >= this (scoring, perplexity)
    output_ids: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    slot: int | None = None
    num_computed: int = 0  # tokens whose state / KV the cache holds
    num_cached: int = 0  # prompt tokens a prefix-cache hit supplied
    branch: int | None = None  # where the prompt leaves cached KV with no snapshot: a prefill split + snapshot
    blocks: list[int] = field(default_factory=list)  # KV blocks of positions 0, BS, 2 BS, ... (engine/kv_manager.py)
    reserved: int = 0  # KV blocks it may still allocate
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    generator: torch.Generator = field(default_factory=torch.Generator)
    prompt_logits: list[torch.Tensor] = field(default_factory=list)
    output_logits: list[torch.Tensor] = field(default_factory=list)
    logprobs: list[tuple[float, dict[int, float]]] = field(default_factory=list)  # per output token
    draft_ids: list[int] = field(default_factory=list)  # MTP drafts for the positions after the pending token
    draft_probs: list[torch.Tensor | None] = field(default_factory=list)  # draft distribution q (None: greedy)
    num_drafted: int = 0
    num_accepted: int = 0

    def __post_init__(self) -> None:
        seed = self.params.seed if self.params.seed is not None else int(torch.randint(2**62, ()))
        self.generator.manual_seed(seed)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def in_prefill(self) -> bool:
        return self.num_computed < len(self.prompt_ids)

    def logits_wanted(self, n: int) -> int:
        """How many trailing tokens of the next n-token segment need logits."""
        if not self.in_prefill:
            return n  # a decode (1) or a verify segment: every token's logits
        end = self.num_computed + n
        completes = int(end == len(self.prompt_ids))
        if self.prompt_logits_from is None:
            return completes
        return max(end - max(self.prompt_logits_from, self.num_computed), completes, 0)

    def decode_tokens(self) -> int:
        """Tokens of its next decode: the pending token plus its drafts."""
        return 1 + len(self.draft_ids)

    def all_tokens(self, start: int, end: int) -> list[int]:
        return (self.prompt_ids + self.output_ids)[start:end]

    def next_tokens(self, n: int) -> list[int]:
        """The next n tokens the cache has not seen yet."""
        start, p = self.num_computed, len(self.prompt_ids)
        if start >= p:
            return self.output_ids[start - p: start - p + n]
        return (self.prompt_ids + self.output_ids)[start: start + n]
