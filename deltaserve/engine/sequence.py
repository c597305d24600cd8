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
    keep_logits: bool = False  # keep prompt and output logits (scoring, tests)
    output_ids: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    slot: int | None = None
    num_computed: int = 0  # tokens whose state / KV the cache holds
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    generator: torch.Generator = field(default_factory=torch.Generator)
    prompt_logits: list[torch.Tensor] = field(default_factory=list)
    output_logits: list[torch.Tensor] = field(default_factory=list)
    logprobs: list[tuple[float, dict[int, float]]] = field(default_factory=list)  # per output token

    def __post_init__(self) -> None:
        seed = self.params.seed if self.params.seed is not None else int(torch.randint(2**62, ()))
        self.generator.manual_seed(seed)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def in_prefill(self) -> bool:
        return self.num_computed < len(self.prompt_ids)

    def next_tokens(self, n: int) -> list[int]:
        """The next n tokens the cache has not seen yet."""
        start, p = self.num_computed, len(self.prompt_ids)
        if start >= p:
            return self.output_ids[start - p: start - p + n]
        return (self.prompt_ids + self.output_ids)[start: start + n]
