"""Prefix index for hybrid models: a prompt prefix maps to KV blocks *and* a recurrent-state snapshot at its end.

Attention can resume anywhere its keys are cached, a recurrent state only where it was saved: so a hit is the
longest prefix p that has both a snapshot (conv windows + delta-rule states, in a spare state slot, taken at
exactly p) and every full KV block below p. KV past the last snapshot is not a hit.

Keys: full blocks chain-hash their tokens (block j's hash covers tokens [0, (j+1)*BS), so equal hashes mean equal
prefixes); a snapshot at p is keyed by the hash of its full blocks (p // BS of them) and the tokens of the partial
block after them, and keeps a reference on that partial block, whose first p % BS rows a hit copies.
Snapshots live in a bounded pool of state slots, least recently used evicted first. A lookup also says how far the
cached KV blocks match past the hit: where the prompt branches off an earlier one, so that the engine can leave a
snapshot there for the prompts after it. Plain Python: the engine copies states and blocks (engine/kv_manager.py).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass

from .kv_blocks import BlockPool

ROOT = b"deltaserve-prefix-root"


def chain_hashes(tokens: list[int], block_size: int, n_blocks: int, prev: bytes = ROOT) -> list[bytes]:
    """Chain hashes of the first n_blocks full blocks of tokens."""
    out = []
    for j in range(n_blocks):
        block = tokens[j * block_size:(j + 1) * block_size]
        prev = hashlib.blake2b(prev + b"".join(t.to_bytes(4, "little") for t in block), digest_size=16).digest()
        out.append(prev)
    return out


@dataclass
class Snapshot:
    slot: int  # spare state slot holding the state after `length` tokens
    length: int
    key: tuple[bytes, tuple[int, ...]]
    partial_block: int | None  # the KV block of positions [length // BS * BS, length), when length % BS != 0


@dataclass
class Hit:
    length: int
    blocks: list[int]  # full blocks below length, shared
    snapshot: Snapshot


class PrefixCache:
    def __init__(self, pool: BlockPool, block_size: int, slots: list[int]):
        self.pool, self.bs = pool, block_size
        self.free_slots = list(slots)
        self.num_slots = len(slots)
        self.entries: OrderedDict[tuple, Snapshot] = OrderedDict()  # least recently used first
        self._by_blocks: dict[bytes, dict[tuple[int, ...], Snapshot]] = {}  # full-block hash -> {tail: snapshot}

    def lookup(self, tokens: list[int], limit: int) -> tuple[Hit | None, int]:
        """The longest cached prefix of tokens no longer than limit (a snapshot and its blocks), or None; and how many
        of the tokens (whole blocks, up to limit) cached KV blocks hold, with a snapshot or not."""
        bs = self.bs
        hashes = chain_hashes(tokens, bs, limit // bs)
        full = 0
        while full < len(hashes) and hashes[full] in self.pool.by_hash:
            full += 1
        for i in range(full, -1, -1):  # the snapshot after the most full blocks wins (its tail is < BS)
            tails = self._by_blocks.get(hashes[i - 1] if i else ROOT, {})
            best = max((s for tail, s in tails.items() if s.length <= limit and s.length > 0
                        and tuple(tokens[i * bs:i * bs + len(tail)]) == tail), key=lambda s: s.length, default=None)
            if best is not None:
                self.entries.move_to_end(best.key)
                return Hit(best.length, [self.pool.by_hash[h] for h in hashes[:i]], best), full * bs
        return None, full * bs

    def capture(self, tokens: list[int], blocks: list[int]) -> Snapshot | None:
        """Registers the full blocks of a sequence whose cache holds exactly `tokens` (its block table `blocks`) and
        makes room for a snapshot at len(tokens). Returns the new snapshot, whose slot the caller fills with the
        sequence's state, or None when one is cached already (or the pool has no slots)."""
        bs, n = self.bs, len(tokens)
        hashes = chain_hashes(tokens, bs, n // bs)
        for block, h in zip(blocks, hashes):
            self.pool.register(block, h)
        key = (hashes[-1] if hashes else ROOT, tuple(tokens[n // bs * bs:]))
        if key in self.entries:
            self.entries.move_to_end(key)
            return None
        if not self.free_slots and not self._evict():
            return None
        partial = blocks[n // bs] if n % bs else None
        if partial is not None:
            self.pool.take(partial)
        snap = Snapshot(self.free_slots.pop(), n, key, partial)
        self.entries[key] = snap
        self._by_blocks.setdefault(key[0], {})[key[1]] = snap
        return snap

    def _evict(self) -> bool:
        if not self.entries:
            return False
        key, snap = self.entries.popitem(last=False)
        tails = self._by_blocks[key[0]]
        del tails[key[1]]
        if not tails:
            del self._by_blocks[key[0]]
        if snap.partial_block is not None:
            self.pool.release(snap.partial_block)
        self.free_slots.append(snap.slot)
        return True
