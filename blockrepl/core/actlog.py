"""The activity log: which 4 MiB extents of the device may have writes in flight.

If a Primary crashes, any block it was writing may differ between the two
nodes; scanning the whole device to find out would take hours.  Instead,
before a write touches an extent that is not "hot", the hot set is written
to the meta-data area (an AL transaction).  After a crash the blocks of
every hot extent are marked out of sync, and a short resync repairs them.

The hot set has a fixed capacity (``al-extents``); the least recently used
extent without writes in flight is evicted to make room.
"""
from __future__ import annotations

from collections import OrderedDict

EXTENT = 4 * 1024 * 1024
BLOCKS_PER_EXTENT = EXTENT // 4096


class ActivityLogFull(Exception):
    """Every hot extent has writes in flight; the caller must wait."""


class ActivityLog:
    def __init__(self, capacity: int, extents: list[int] | None = None):
        if capacity < 1:
            raise ValueError("al-extents must be at least 1")
        self.capacity = capacity
        self._lru: OrderedDict[int, int] = OrderedDict()  # extent -> writes in flight
        for e in extents or ():
            self._lru[e] = 0
        self.transactions = 0

    @property
    def extents(self) -> list[int]:
        return list(self._lru)

    def begin(self, first_extent: int, last_extent: int) -> bool:
        """Account a write to extents [first, last]; True if the hot set changed.

        When it returns True the caller must persist ``extents`` before
        issuing the write.
        """
        # All or nothing: a refusal must leave no extent counted, or a
        # retried write would pin its extents for ever.
        wanted = range(first_extent, last_extent + 1)
        new = sum(1 for e in wanted if e not in self._lru)
        room = self.capacity - len(self._lru)
        if new > room:
            idle = sum(1 for e, pending in self._lru.items()
                       if pending == 0 and e not in wanted)
            if new - room > idle:
                raise ActivityLogFull("all activity-log extents have writes in flight")
        changed = False
        for e in wanted:
            if e in self._lru:
                self._lru.move_to_end(e)
                self._lru[e] += 1
                continue
            if len(self._lru) >= self.capacity:
                self._evict_one(wanted)
            self._lru[e] = 1
            changed = True
        if changed:
            self.transactions += 1
        return changed

    def end(self, first_extent: int, last_extent: int) -> None:
        for e in range(first_extent, last_extent + 1):
            if self._lru.get(e, 0) > 0:
                self._lru[e] -= 1

    def in_flight(self) -> int:
        return sum(self._lru.values())

    def _evict_one(self, keep: range = range(0)) -> None:
        for e, pending in self._lru.items():
            if pending == 0 and e not in keep:
                del self._lru[e]
                return
        raise ActivityLogFull("all activity-log extents have writes in flight")


def extents_of(offset: int, length: int) -> tuple[int, int]:
    """The first and last extent a byte range touches."""
    last = offset + max(length, 1) - 1
    return offset // EXTENT, last // EXTENT
