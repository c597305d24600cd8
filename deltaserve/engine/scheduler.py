"""Continuous batching as plain Python: which sequences run this step, and with how many tokens.

Every step: decodes first (one token each, round robin when the budget is short), then prefill chunks of
running sequences, then new sequences while a slot is free, all within a token budget. A sequence
keeps its slot from admission to finish, so nothing is ever preempted or recomputed.
"""

from __future__ import annotations

from collections import deque

from ..cache.slot_table import SlotTable
from .sequence import Sequence, Status


class Scheduler:
    def __init__(self, slots: SlotTable, max_num_batched_tokens: int):
        if max_num_batched_tokens < 1:
            raise ValueError("max_num_batched_tokens must be >= 1")
        self.slots = slots
        self.budget = max_num_batched_tokens
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
            if budget and seq.in_prefill:
                n = min(len(seq.prompt_ids) - seq.num_computed, budget)
                plan.append((seq, n))
                budget -= n
        while budget and self.waiting and self.slots.available:
            seq = self.waiting.popleft()
            seq.slot, seq.status = self.slots.allocate(), Status.RUNNING
            self.running.append(seq)
            n = min(len(seq.prompt_ids), budget)
            plan.append((seq, n))
            budget -= n
        return plan

    def finish(self, seq: Sequence, reason: str) -> None:
        """Ends a sequence (finished or aborted) and frees its slot for the next one."""
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
            self.slots.free(seq.slot)
        elif seq.status is Status.WAITING:
            self.waiting.remove(seq)
        seq.status, seq.finish_reason, seq.slot = Status.FINISHED, reason, None
