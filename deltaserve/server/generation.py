"""The engine requests behind one HTTP request: one per (prompt, choice); their events become text deltas.

A Generation submits its requests to the engine loop, turns each RequestOutput into a ChoiceDelta
(new text, new tokens and their logprobs, finish reason), cuts stop strings, and aborts whatever is
still running in the engine when it is closed early: a stop string, a client gone, a failure.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace

from ..engine.outputs import RequestOutput
from ..sampling.params import SamplingParams
from .detokenizer import IncrementalDetokenizer
from .engine_loop import EngineFailure, EngineLoop, Event, Sink
from .protocol import ApiError

Logprob = tuple[float, dict[int, float]]  # a token's logprob, and the top-k {token id: logprob}


@dataclass(frozen=True)
class ChoiceDelta:
    index: int
    text: str
    token_ids: list[int]
    logprobs: list[Logprob] | None  # one per token_ids entry when logprobs were asked for
    text_offsets: list[int]  # per token_ids entry: where its text starts in the choice's text
    finish_reason: str | None


@dataclass
class _Choice:
    index: int
    request_id: str
    detok: IncrementalDetokenizer
    finish_reason: str | None = None
    cache_counted: bool = False  # its prompt's cached tokens are in Generation.cached_tokens


def check_prompt(prompt: list[int], max_tokens: int | None, vocab_size: int, max_model_len: int) -> None:
    """413 when the prompt alone fills the context, 400 for bad ids or a max_tokens that does not fit."""
    if bad := [t for t in prompt if not 0 <= t < vocab_size]:
        raise ApiError(400, f"prompt token ids must be in [0, {vocab_size}), got {bad[:5]}", param="prompt")
    if len(prompt) >= max_model_len:
        raise ApiError(413, f"prompt is {len(prompt)} tokens, but the context is {max_model_len} tokens "
                            "(prompt plus at least one new token must fit)",
                       param="prompt", code="context_length_exceeded")
    if max_tokens is not None and len(prompt) + max_tokens > max_model_len:
        raise ApiError(400, f"prompt ({len(prompt)} tokens) + max_tokens ({max_tokens}) exceeds the context of "
                            f"{max_model_len} tokens; lower max_tokens to at most {max_model_len - len(prompt)}",
                       param="max_tokens", code="context_length_exceeded")


class Generation:
    def __init__(self, engine: EngineLoop, decode: Callable[[list[int]], str], base_id: str,
                 prompts: list[list[int]], params: SamplingParams, n: int, stop: list[str]):
        """n choices per prompt; choice i of a seeded request samples with seed + i."""
        self._engine, self._n = engine, n
        self._queue: asyncio.Queue[tuple[str, Event]] = asyncio.Queue()
        self._sink = Sink(asyncio.get_running_loop(), self._queue)
        self.prompt_tokens = sum(len(p) for p in prompts)
        self.cached_tokens = 0  # of those, served by the prefix cache (each prompt counted once, as prompt_tokens)
        self._choices: dict[str, _Choice] = {}
        self._requests: list[tuple[str, list[int], SamplingParams]] = []
        for p, prompt in enumerate(prompts):
            for i in range(n):
                index = p * n + i
                rid = f"{base_id}-{index}"
                seeded = params if params.seed is None else replace(params, seed=params.seed + i)
                self._choices[rid] = _Choice(index, rid, IncrementalDetokenizer(decode, stop))
                self._requests.append((rid, prompt, seeded))
        self._open: set[str] = set()  # engine requests that may still be running

    @property
    def num_choices(self) -> int:
        return len(self._choices)

    @property
    def completion_tokens(self) -> int:
        return sum(len(c.detok.ids) for c in self._choices.values())

    def start(self) -> None:
        """Queues the engine requests; raises ApiError (429 busy, 503 not ready) before anything streams."""
        self._engine.submit(self._requests, self._sink)
        self._open = set(self._choices)

    async def deltas(self) -> AsyncIterator[ChoiceDelta]:
        """Every choice's deltas as they come, each choice ending with one that has a finish_reason."""
        try:
            while any(c.finish_reason is None for c in self._choices.values()):
                rid, event = await self._queue.get()
                choice = self._choices[rid]
                if choice.finish_reason is not None:  # output that raced with our abort
                    continue
                if isinstance(event, EngineFailure):
                    self._open.discard(rid)
                    kind = "server_error" if event.status >= 500 else "invalid_request_error"
                    raise ApiError(event.status, event.message, type=kind, code="engine_error")
                yield self._apply(choice, event)
        finally:
            self.close()

    def close(self) -> None:
        """Aborts whatever is still running in the engine (idempotent)."""
        if self._open:
            self._engine.abort(sorted(self._open))
            self._open.clear()

    def _apply(self, choice: _Choice, out: RequestOutput) -> ChoiceDelta:
        detok = choice.detok
        if choice.index % self._n == 0 and not choice.cache_counted:  # each prompt's first choice
            self.cached_tokens += out.num_cached_tokens
            choice.cache_counted = True
        before = len(detok.ids)
        detok.add(out.new_token_ids)
        if out.finished:
            self._open.discard(choice.request_id)
            detok.finish()
            choice.finish_reason = out.finish_reason
        if detok.stopped:  # a stop string: finished here, whatever the engine is doing
            choice.finish_reason = "stop"
            if choice.request_id in self._open:
                self._open.discard(choice.request_id)
                self._engine.abort([choice.request_id], reason="stop")
        new_ids = detok.ids[before:]
        logprobs = None
        if out.logprobs is not None:
            logprobs = out.logprobs[before:before + len(new_ids)]
        return ChoiceDelta(choice.index, detok.take(final=choice.finish_reason is not None), new_ids, logprobs,
                           detok.offsets[before:], choice.finish_reason)
