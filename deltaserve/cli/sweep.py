"""Measurements behind `deltaserve bench`, on the model runner (no scheduler, no sampling).

A recurrent state cannot be cut back like a KV cache, so the depth sweep snapshots the slot's
state into a spare slot before generating and restores it afterwards: the next depth continues
from the snapshot without re-prefilling. (KV entries past the depth are simply overwritten.)
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

from ..forward_batch import Segment
from ..engine.llm_engine import LLMEngine


@dataclass
class DepthRow:
    depth: int
    pp_tokens: int
    pp_tps: float
    tg_tokens: int
    tg_tps: float


@dataclass
class ConcurrencyRow:
    np: int
    slots: list[int]
    aggregate_tps: float

    @property
    def per_seq_tps(self) -> float:
        return self.aggregate_tps / self.np


def _tokens(rng: random.Random, n: int, vocab: int) -> list[int]:
    return [rng.randrange(vocab) for _ in range(n)]


def decode(engine: LLMEngine, slots: list[int], start: int, steps: int, first: list[int]) -> float:
    """Greedy decode of one token per slot for `steps` steps from position `start`; returns seconds."""
    run, last = engine.runner.run, first
    t0 = time.perf_counter()
    for i in range(steps):
        logits = run([Segment([t], start + i, s) for t, s in zip(last, slots)])
        last = [int(lg[-1].argmax()) for lg in logits]
    return time.perf_counter() - t0


def depth_sweep(engine: LLMEngine, max_depth: int, ubatch: int, gen: int, seed: int = 0, progress=None):
    """At depth 0, ub, 2ub, ... < max_depth: t/s of generating `gen` tokens, then of a ub-token prompt chunk."""
    rng, vocab, run = random.Random(seed), engine.cfg.vocab_size, engine.runner.run
    spare = engine.cache.max_num_seqs  # first spare state slot
    rows, last = [], [rng.randrange(vocab)]
    for depth in range(0, max_depth, ubatch):
        engine.cache.copy_state(0, spare)  # generate at this depth, then return to it
        tg = gen / decode(engine, [0], depth, gen, last)
        engine.cache.copy_state(spare, 0)
        chunk = _tokens(rng, ubatch, vocab)
        t0 = time.perf_counter()
        last = [int(run([Segment(chunk, depth, 0)])[0][-1].argmax())]
        rows.append(DepthRow(depth, ubatch, ubatch / (time.perf_counter() - t0), gen, tg))
        if progress:
            progress()
    return rows


def concurrency_sweep(engine: LLMEngine, nps: list[int], prompt_len: int, gen: int, seed: int = 0, progress=None):
    """Aggregate decode t/s with np sequences in slots 0..np-1, plus one run in every other slot."""
    rng, vocab, run = random.Random(seed), engine.cfg.vocab_size, engine.runner.run
    layouts = [list(range(n)) for n in nps]
    half = max(n for n in nps if 2 * n - 1 <= engine.cache.max_num_seqs)
    if half > 1:
        layouts.append(list(range(0, 2 * half, 2)))  # busy slots not consecutive
    rows = []
    for slots in layouts:
        logits = run([Segment(_tokens(rng, prompt_len, vocab), 0, s) for s in slots])
        first = [int(lg[-1].argmax()) for lg in logits]
        rows.append(ConcurrencyRow(len(slots), slots, len(slots) * gen / decode(engine, slots, prompt_len, gen, first)))
        if progress:
            progress()
    return rows


@dataclass
class SpecRow:
    np: int
    aggregate_tps: float
    acceptance: float


def spec_sweep(engine: LLMEngine, nps: list[int], prompt_len: int, gen: int, seed: int = 0, progress=None):
    """Greedy generation through the engine (so MTP drafts are made and verified): t/s and acceptance."""
    from ..sampling.params import SamplingParams

    rng, vocab, rows = random.Random(seed), engine.cfg.vocab_size, []
    params = SamplingParams(max_tokens=gen + 1, temperature=0, ignore_eos=True)
    for np_ in nps:
        for i in range(np_):
            engine.add_request(f"spec{np_}-{i}", _tokens(rng, prompt_len, vocab), params)
        while engine.scheduler.waiting or any(not s.output_ids for s in engine.scheduler.running):
            engine.step()  # prefill and first tokens
        drafted, accepted = engine.stats.draft_tokens, engine.stats.accepted_tokens
        t0 = time.perf_counter()
        while engine.has_unfinished_requests():
            engine.step()
        seconds = time.perf_counter() - t0
        drafted = engine.stats.draft_tokens - drafted
        rows.append(SpecRow(np_, np_ * gen / seconds, (engine.stats.accepted_tokens - accepted) / max(drafted, 1)))
        if progress:
            progress()
    return rows
