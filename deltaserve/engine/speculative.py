"""MTP speculative decoding: the MTP head drafts k tokens, the main model verifies them in one segment.

A recurrent state cannot be truncated, so a verify segment keeps the state after each of its
tokens in the sequence's snapshot slots (spare state slots past max_num_seqs, k per sequence, fixed
by its slot); after acceptance the slot is set to the state after the last accepted token (one
copy, none when all drafts pass). KV entries of rejected tokens are overwritten by position later.

Acceptance is lossless: greedy keeps the drafts that equal the main model's argmax; sampling uses
standard speculative rejection sampling (accept d with min(1, p(d)/q(d)), else resample from
max(0, p - q)), so outputs follow the main model's distribution.
"""

from __future__ import annotations

import torch

from ..sampling.params import SamplingParams
from ..sampling.sampler import filter_logits, greedy
from ..forward_batch import Segment
from .model_runner import ModelRunner
from .sequence import Sequence


def accept(logits: torch.Tensor, drafts: list[int], q_probs: list[torch.Tensor | None], params: SamplingParams,
           generator: torch.Generator) -> list[int]:
    """logits [len(drafts) + 1, V]: row i is the main model's view of draft i. Returns accepted drafts + one
    token of the main model's own (the correction, or the bonus when every draft passed)."""
    if params.greedy:
        target = greedy(logits).tolist()
        m = 0
        while m < len(drafts) and drafts[m] == target[m]:
            m += 1
        return drafts[:m] + [target[m]]
    for i, d in enumerate(drafts):
        p = filter_logits(logits[i], params).softmax(-1)
        q = q_probs[i]
        if torch.rand((), generator=generator) * q[d] < p[d]:  # u < p/q without dividing by q
            continue
        residual = (p - q).clamp_min(0)
        residual = residual if residual.sum() > 0 else p
        return drafts[:i] + [int(torch.multinomial(residual / residual.sum(), 1, generator=generator))]
    bonus = filter_logits(logits[len(drafts)], params).softmax(-1)
    return drafts + [int(torch.multinomial(bonus, 1, generator=generator))]


class MTPDrafter:
    def __init__(self, runner: ModelRunner, k: int, max_num_seqs: int, max_model_len: int):
        self.runner, self.k = runner, k
        self.max_num_seqs, self.max_model_len = max_num_seqs, max_model_len

    def snapshot_slots(self, seq: Sequence, n: int) -> tuple[int, ...]:
        """The spare state slots of a verify segment of n tokens: the state after token j goes to slot j."""
        base = self.max_num_seqs + seq.slot * self.k
        return tuple(range(base, base + n - 1))

    def settle(self, seq: Sequence, n: int, accepted: int) -> None:
        """After verifying n tokens of which `accepted` drafts passed: the slot ends at the last accepted one."""
        if accepted < n - 1:
            self.runner.cache.copy_state(self.snapshot_slots(seq, n)[accepted], seq.slot)

    def propose(self, rows: list[tuple[Sequence, int, torch.Tensor]]) -> None:
        """Feeds the MTP head, and drafts for the sequences that decode next.

        rows: (sequence, first position p, main hidden states [r, D] of positions p..p+r-1). Every
        such row pairs with token p+1 and fills the MTP head's KV cache; the last row of a
        decoding sequence drafts its first token, the next k-1 chain on the head's own output.
        """
        segments, budgets = [], []
        for seq, start, h in rows:
            budgets.append(self._budget(seq))
            tokens = seq.all_tokens(start + 1, start + 1 + h.shape[0])
            segments.append(Segment(tokens, start, seq.slot, num_logits=int(budgets[-1] > 0)))
            seq.draft_ids, seq.draft_probs = [], []
        if not segments:
            return
        live = []  # (sequence, drafts it may make, MTP output of its last row [1, D])
        outs = self.runner.run_mtp(segments, [h for _, _, h in rows], step=0)
        for (seq, _, _), budget, (logits, out) in zip(rows, budgets, outs):
            if budget:
                self._pick(seq, logits[0])
                live.append((seq, budget, out))
        for step in range(1, self.k):  # chain: the head's output and its draft predict the next draft
            live = [entry for entry in live if entry[1] > step]
            if not live:
                break
            chain = [Segment([seq.draft_ids[-1]], seq.num_computed - 1 + step, seq.slot) for seq, _, _ in live]
            outs = self.runner.run_mtp(chain, [out for _, _, out in live], step=step)
            for (seq, _, _), (logits, _) in zip(live, outs):
                self._pick(seq, logits[0])
            live = [(seq, budget, out) for (seq, budget, _), (_, out) in zip(live, outs)]

    def _budget(self, seq: Sequence) -> int:
        """Drafts worth making: no more than max_tokens or the context can take."""
        if seq.in_prefill:
            return 0
        left = seq.max_tokens - len(seq.output_ids) - 1
        room = self.max_model_len - 1 - seq.num_computed
        return max(0, min(self.k, left, room))

    @staticmethod
    def _pick(seq: Sequence, logits: torch.Tensor) -> None:
        if seq.params.greedy:
            seq.draft_ids.append(int(greedy(logits[None])[0]))
            seq.draft_probs.append(None)
            return
        q = filter_logits(logits, seq.params).softmax(-1)
        seq.draft_ids.append(int(torch.multinomial(q, 1, generator=seq.generator)))
        seq.draft_probs.append(q)
