"""Splitting a step's flat token list back into one segment per sequence (the engine's side of the batch;
the batch itself: deltaserve/forward_batch.py)."""

from __future__ import annotations

from ..forward_batch import BatchError


def decompose_tokens(
    token_ids: list[int], positions: list[int], seq_ids: list[int]
) -> tuple[list[tuple[int, int, list[int]]], list[int]]:
    """Regroup tokens handed over interleaved (llama.cpp style) into one segment per sequence.

    Returns (segments as (seq_id, start_pos, token_ids) in order of first appearance, and for each
    input token its row in the regrouped order). Positions must increase by exactly one within a
    sequence; anything else is rejected rather than run one token at a time.
    """
    if not (len(token_ids) == len(positions) == len(seq_ids)):
        raise BatchError("token_ids, positions and seq_ids differ in length")
    by_seq: dict[int, list[int]] = {}
    for i, sid in enumerate(seq_ids):
        by_seq.setdefault(sid, []).append(i)
    segments, row_of = [], [0] * len(token_ids)
    row = 0
    for sid, idx in by_seq.items():
        for a, b in zip(idx, idx[1:]):
            if positions[b] != positions[a] + 1:
                raise BatchError(
                    f"sequence {sid}: position {positions[b]} follows {positions[a]} "
                    "(positions must increase by one within a sequence)"
                )
        for i in idx:
            row_of[i] = row
            row += 1
        segments.append((sid, positions[idx[0]], [token_ids[i] for i in idx]))
    return segments, row_of
