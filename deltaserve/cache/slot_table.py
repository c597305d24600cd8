"""Free-list of slot indices. Plain Python: which slot a sequence holds is data, never a constant."""

from __future__ import annotations


class SlotTable:
    def __init__(self, size: int):
        self.size = size
        self._free = list(range(size - 1, -1, -1))  # pop() hands out the lowest slot first
        self._used: set[int] = set()

    @property
    def available(self) -> int:
        return len(self._free)

    @property
    def used(self) -> set[int]:
        return set(self._used)

    def allocate(self) -> int:
        if not self._free:
            raise RuntimeError(f"all {self.size} slots are in use")
        slot = self._free.pop()
        self._used.add(slot)
        return slot

    def take(self, slot: int) -> int:
        """Allocate a specific slot (benchmarks pin sequences to chosen slots)."""
        if slot not in self._free:
            raise RuntimeError(f"slot {slot} is not free")
        self._free.remove(slot)
        self._used.add(slot)
        return slot

    def free(self, slot: int) -> None:
        if slot not in self._used:
            raise RuntimeError(f"slot {slot} is not allocated")
        self._used.remove(slot)
        self._free.append(slot)
