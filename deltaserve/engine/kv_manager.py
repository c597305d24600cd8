"""Which KV blocks each running sequence holds, and the prefix cache: hits at admission, snapshots after prefill
chunks on the grid, at branch points, at the prompt's end and at a request's end.

Admission reserves the blocks a request can need (prompt + max_tokens + drafts, up to max_model_len) so that
nothing is ever preempted; blocks are allocated as positions are reached. A hit shares the prefix's full blocks,
copies the partial one (a sequence writes only its own blocks), and copies the snapshot's state into the
sequence's slot: the sequence then starts at the hit's position, as if it had computed the prefix itself. A
running sequence never writes a cached snapshot (snapshots are copies), and snapshots are taken only of states
the engine has settled on (after verification with MTP), never rewound.
A prompt whose tokens match cached KV past its hit (a shared system prompt or document that no earlier request
ended at) gets a branch point: the last multiple of BRANCH from its prefill grid point within that match. Its
prefill splits there and snapshots, so the prompts after it that share the prefix resume there.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..cache.kv_blocks import BlockPool
from ..cache.prefix_cache import PrefixCache
from ..cache.state_cache import KV_BLOCK, HybridCache
from .sequence import Sequence

BRANCH = 64  # branch points are this many tokens apart from the grid: the chunked delta rule's chunk


@dataclass
class PrefixStats:
    queries: int = 0  # requests admitted with the prefix cache on
    hits: int = 0
    queried_tokens: int = 0  # prompt tokens of those requests
    cached_tokens: int = 0  # prompt tokens a hit spared
    snapshots: int = 0  # snapshots taken

    @property
    def hit_rate(self) -> float:
        """Share of prompt tokens served from the cache."""
        return self.cached_tokens / self.queried_tokens if self.queried_tokens else 0.0


class KVManager:
    def __init__(self, cache: HybridCache, max_model_len: int, spec_tokens: int, snapshot_slots: list[int],
                 grid: int):
        """grid: the prefill chunk (scheduler): prompts split at its multiples, and snapshot there."""
        self.cache, self.max_model_len, self.spec_tokens, self.grid = cache, max_model_len, spec_tokens, grid
        self.pool = BlockPool(cache.num_kv_blocks)
        self.prefix = PrefixCache(self.pool, KV_BLOCK, snapshot_slots) if snapshot_slots else None
        self.reserved = 0  # blocks running sequences may still allocate
        self.stats = PrefixStats()
        self._table_updates: list[tuple[int, int, int]] = []
        self._snapshot_copies: dict[int, int] = {}  # snapshot slot -> the sequence slot whose state it takes

    def blocks_needed(self, seq: Sequence) -> int:
        most = min(len(seq.prompt_ids) + seq.max_tokens + self.spec_tokens, self.max_model_len)
        return -(-most // KV_BLOCK)

    def check_fits(self, seq: Sequence) -> None:
        if self.blocks_needed(seq) > self.pool.num_blocks:
            raise ValueError(f"request needs {self.blocks_needed(seq)} KV blocks of {KV_BLOCK} positions, but the "
                             f"KV cache has {self.pool.num_blocks}: lower max_tokens or enlarge the KV cache")

    def admit(self, seq: Sequence) -> bool:
        """Takes the request's blocks (and a prefix hit, if any) once its slot is set; False when the KV pool cannot
        hold what it may need yet (it waits)."""
        need = self.blocks_needed(seq)
        hit = None
        if self.prefix is not None:
            limit = len(seq.prompt_ids) - 1  # at least one token to compute: its logits start the output
            if seq.prompt_logits_from is not None:
                limit = min(limit, seq.prompt_logits_from)  # wanted logits are computed, not skipped
            hit, matched = self.prefix.lookup(seq.prompt_ids, limit)
            start = (matched // self.grid) * self.grid
            branch = start + (matched - start) // BRANCH * BRANCH
            seq.branch = branch if branch > (hit.length if hit else 0) and branch % self.grid else None
        shared = hit.blocks if hit else []
        if self.pool.num_free - self.reserved - self.pool.cached_free(shared) < need - len(shared):
            return False
        if self.prefix is not None:
            self.stats.queries += 1
            self.stats.queried_tokens += len(seq.prompt_ids)
        for block in shared:
            self.pool.take(block)
        seq.blocks = list(shared)
        if hit:
            if hit.snapshot.partial_block is not None:  # the prefix's last rows, copied into a block of its own
                seq.blocks.append(self.pool.allocate())
                self.cache.copy_blocks(hit.snapshot.partial_block, seq.blocks[-1])
            self._table_updates += [(seq.slot, j, b) for j, b in enumerate(seq.blocks)]
            self._copy_snapshots()  # the hit's state may be one still to copy; the slot may be another's source
            self.cache.copy_state(hit.snapshot.slot, seq.slot)
            seq.num_computed = seq.num_cached = hit.length
            self.stats.hits += 1
            self.stats.cached_tokens += hit.length
        seq.reserved = need - len(seq.blocks)
        self.reserved += seq.reserved
        return True

    def extend(self, seq: Sequence, end: int) -> None:
        """Blocks for the sequence's positions below `end` (a step's segment reaches end - 1)."""
        end = min(end, self.max_model_len)
        while len(seq.blocks) * KV_BLOCK < end:
            seq.blocks.append(self.pool.allocate())
            self._table_updates.append((seq.slot, len(seq.blocks) - 1, seq.blocks[-1]))
            seq.reserved -= 1
            self.reserved -= 1

    def flush(self) -> None:
        """Copies the snapshots taken since the last step and writes the step's block table changes (before the
        step runs; none: no call, which under tensor parallelism would be a message to every rank)."""
        self._copy_snapshots()
        if self._table_updates:
            self.cache.set_blocks(self._table_updates)
            self._table_updates = []

    def snapshot(self, seq: Sequence, length: int) -> None:
        """Caches the sequence's state, which holds exactly its first `length` tokens, with its KV blocks."""
        if self.prefix is None or length <= 0:
            return
        snap = self.prefix.capture(seq.all_tokens(0, length), seq.blocks)
        if snap is not None:  # copied with the step's others before anything runs or reads it (flush, admit)
            self._snapshot_copies[snap.slot] = seq.slot  # a slot evicted and taken again keeps the last capture
            self.stats.snapshots += 1

    def _copy_snapshots(self) -> None:
        if self._snapshot_copies:
            self.cache.copy_states([(src, dst) for dst, src in self._snapshot_copies.items()])
            self._snapshot_copies = {}

    def release(self, seq: Sequence) -> None:
        """A finished or aborted sequence's blocks go back (registered ones stay cached until evicted)."""
        for block in seq.blocks:
            self.pool.release(block)
        self.reserved -= seq.reserved
        seq.blocks, seq.reserved = [], 0

    def occupancy(self) -> dict[str, int]:
        snaps = self.prefix.entries if self.prefix else {}
        return {"kv_blocks_total": self.pool.num_blocks, "kv_blocks_used": self.pool.num_blocks - self.pool.num_free,
                "kv_blocks_cached": self.pool.num_cached, "snapshots": len(snaps),
                "snapshot_slots": self.prefix.num_slots if self.prefix else 0}
