"""Continuous batching as plain Python: which sequences run this step, and with how many tokens.

Every step: decodes first (one token each, round robin when the budget is short), then prefill chunks of
running sequences, then new sequences while a slot is free and `admit` accepts them (the KV manager: its blocks
fit, a prefix-cache hit moves its start), all within a token budget. A sequence keeps its slot and blocks from
admission to finish, so nothing is ever preempted or recomputed.

A prompt is split at multiples of `prefill_chunk` from its start, whatever else runs: a chunk that does not fit
the step's remaining budget waits for the next step instead of being cut shorter. So a sequence computes the
same chunks alone or in company (bit for bit on the CPU, where chunk boundaries move float rounding, and int8
activations would magnify it), and one resumed from a prefix-cache snapshot on that grid computes the chunks an
uncached run would. A prompt with a branch point (engine/kv_manager.py) also splits there: a multiple of 64 from the
grid, where the chunked delta rule's chunks begin anyway.
"""

from __future__ import annotations

from collections import deque
from typing import Callable

from ..cache.slot_table import SlotTable
from .sequence import Sequence, Status


def prefill_grid(max_num_batched_tokens: int, prefill_chunk: int | None) -> int:
    """The chunk whose multiples prompts are split at (the whole budget when none is asked for)."""
    return max(1, min(prefill_chunk or max_num_batched_tokens, max_num_batched_tokens))


class Scheduler:
    def __init__(self, slots: SlotTable, max_num_batched_tokens: int, prefill_chunk: int | None = None,
                 admit: Callable[[Sequence], bool] = lambda seq: True,
                 release: Callable[[Sequence], None] = lambda seq: None):
        if max_num_batched_tokens < 1:
            raise ValueError("max_num_batched_tokens must be >= 1")
        self.slots = slots
        self.budget = max_num_batched_tokens
        self.chunk = prefill_grid(max_num_batched_tokens, prefill_chunk)
        self.admit, self.release = admit, release
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[tuple[Sequence, int]]:
        """Returns (sequence, number of tokens) for this step, at most one entry per sequence."""
        budget = self.budget
        plan: list[tuple[Sequence, int]] = []
        for seq in self.running:
            if budget and not seq.in_prefill:
                n = min(seq.decode_tokens(), budget)  # pending token + drafts; drafts dropped if short
                plan.append((seq, n))
                budget -= n
        decodes = [s for s, _ in plan]
        served = {id(s) for s in decodes}  # served ones go to the back: round robin
        self.running = [s for s in self.running if id(s) not in served] + decodes
        for seq in self.running:
            if seq.in_prefill and (n := self._chunk(seq)) <= budget:
                plan.append((seq, n))
                budget -= n
        while self.waiting and self.slots.available and self._chunk(self.waiting[0]) <= budget:
            seq = self.waiting[0]
            seq.slot = self.slots.allocate()
            if not self.admit(seq):  # no room for its KV yet: it stays first in line
                self.slots.free(seq.slot)
                seq.slot = None
                break
            self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
            n = self._chunk(seq)  # a prefix hit shortens it
            plan.append((seq, n))
            budget -= n
        return plan

    def _chunk(self, seq: Sequence) -> int:
        """The sequence's next prefill chunk: up to the next multiple of prefill_chunk, its branch point (a
        multiple of 64 from the grid: the chunked delta rule's chunks stay where an unsplit run has them), or the
        prompt's end."""
        end = min(len(seq.prompt_ids), (seq.num_computed // self.chunk + 1) * self.chunk)
        if seq.branch is not None and seq.num_computed < seq.branch < end:
            end = seq.branch
        return end - seq.num_computed

    def finish(self, seq: Sequence, reason: str) -> None:
        """Ends a sequence (finished or aborted) and frees its slot and KV blocks for the next one."""
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
            self.release(seq)
            self.slots.free(seq.slot)
        elif seq.status is Status.WAITING:
            self.waiting.remove(seq)
        seq.status, seq.finish_reason, seq.slot = Status.FINISHED, reason, None
