"""Exclusive byte-range locks, so overlapping I/O is applied in one order.

Two overlapping writes in flight at once could land in different orders
on the two nodes and leave them different; a resync read racing a write
could ship stale data.  Holders of overlapping ranges therefore take turns.
This is the pure bookkeeping; the driver adds the waiting.
"""
from __future__ import annotations


class IntervalSet:
    def __init__(self) -> None:
        self._held: dict[int, tuple[int, int]] = {}
        self._next = 1

    def overlaps(self, start: int, end: int) -> bool:
        return any(s < end and start < e for s, e in self._held.values())

    def add(self, start: int, end: int) -> int:
        token = self._next
        self._next += 1
        self._held[token] = (start, end)
        return token

    def remove(self, token: int) -> None:
        del self._held[token]

    def __len__(self) -> int:
        return len(self._held)
