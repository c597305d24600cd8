"""KV cache blocks as plain Python: which block holds what, who uses it, and which full blocks a prefix maps to.

A block holds BS consecutive positions of one sequence's keys and values (cache/state_cache.py lays the pool out as
[NB, BS, G, D]). Blocks are reference-counted: the sequences whose block tables hold them, plus a prefix-cache
snapshot that keeps its last, partly filled block. A full block whose positions are final can be registered under
its chain hash (the hash of every token up to its end, cache/prefix_cache.py); when nobody references it, it stays
in the pool with its contents and hash, evictable least recently used first, until a new block is needed.
"""

from __future__ import annotations

from collections import OrderedDict, deque


class BlockPool:
    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self.refs = [0] * num_blocks
        self._empty: deque[int] = deque(range(num_blocks))  # free, holding nothing worth keeping
        self._cached: OrderedDict[int, None] = OrderedDict()  # free but registered: least recently used first
        self.by_hash: dict[bytes, int] = {}
        self.hash_of: dict[int, bytes] = {}

    @property
    def num_free(self) -> int:
        """Blocks that allocate() may hand out (empty ones, then cached ones by eviction)."""
        return len(self._empty) + len(self._cached)

    @property
    def num_cached(self) -> int:
        """Registered blocks (in use or not)."""
        return len(self.hash_of)

    def allocate(self) -> int:
        """A block for new contents, referenced once: an empty one, else the least recently used cached one."""
        if self._empty:
            block = self._empty.popleft()
        elif self._cached:
            block, _ = self._cached.popitem(last=False)
            del self.by_hash[self.hash_of.pop(block)]
        else:
            raise RuntimeError(f"all {self.num_blocks} KV blocks are in use")
        self.refs[block] = 1
        return block

    def take(self, block: int) -> None:
        """One more reference to a block that holds contents (a cached block leaves the evictable set)."""
        if self.refs[block] == 0:
            if block not in self._cached:
                raise RuntimeError(f"block {block} is free and holds nothing")
            del self._cached[block]
        self.refs[block] += 1

    def release(self, block: int) -> None:
        if self.refs[block] <= 0:
            raise RuntimeError(f"block {block} is not referenced")
        self.refs[block] -= 1
        if self.refs[block] == 0:
            if block in self.hash_of:
                self._cached[block] = None  # most recently used end
            else:
                self._empty.append(block)

    def register(self, block: int, chain_hash: bytes) -> None:
        """Index a full, final block under its chain hash (a block or hash already indexed stays as it is)."""
        if chain_hash not in self.by_hash and block not in self.hash_of:
            self.by_hash[chain_hash] = block
            self.hash_of[block] = chain_hash

    def cached_free(self, blocks: list[int]) -> int:
        """How many of these blocks are unreferenced (taking them removes them from the free count)."""
        return sum(self.refs[b] == 0 for b in blocks)
