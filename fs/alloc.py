"""Cluster allocation: the global bitmap and this slot's local window.

The global bitmap is split into groups, one descriptor block each.  A
mounted slot reserves a window of contiguous clusters from the global
bitmap (marked used there) and hands out clusters from the window's own
bitmap in its local-alloc block; only refilling the window touches the
global bitmap, which later needs the cluster-wide bitmap lock.

Frees are deferred to commit time: a cluster released by the running
transaction must not be reused (and overwritten by direct data writes)
before that transaction is durable, or a crash would leave the old owner
pointing at foreign data.

Concurrent operations reserve what they may allocate before they change
anything (``Filesystem._reserve``): ``reserved`` is the sum of what the
running operations have reserved and not yet allocated, and every
allocation calls ``on_alloc`` so the filesystem can charge it to the
operation's reservation.
"""
from __future__ import annotations

import errno
import re

from . import format as F


_NOT_FULL = re.compile(rb"[^\xff]")


def first_free(bitmap: bytes | bytearray, nbits: int, start: int) -> int | None:
    """Index of the first clear bit at or after ``start``, or None."""
    i = start
    while i < nbits:
        if i & 7 == 0:
            m = _NOT_FULL.search(bitmap, i >> 3)
            if m is None:
                return None
            i = m.start() << 3
            if i >= nbits:
                return None
        if not bitmap[i >> 3] & (1 << (i & 7)):
            return i
        i += 1
    return None


def free_run(bitmap: bytes | bytearray, start: int, limit: int) -> int:
    """Number of clear bits from ``start`` on, at most ``limit``."""
    n = 0
    while n < limit:
        j = start + n
        if j & 7 == 0 and limit - n >= 8 and bitmap[j >> 3] == 0:
            n += 8
            continue
        if bitmap[j >> 3] & (1 << (j & 7)):
            break
        n += 1
    return n


class Allocator:
    def __init__(self, cache, sb: F.Superblock, slot: int, window: int | None = None):
        self.cache = cache
        self.sb = sb
        self.slot = slot
        self.groups: list[F.GroupDesc] = []
        self.gfree = 0
        self.local: F.LocalAlloc | None = None
        self.local_blk = sb.slots[slot].localalloc_blk
        self.pending: list[tuple[int, int]] = []
        self.hint = 0          # where the next search of the window starts
        self.reserved = 0      # reserved by running operations, not yet allocated
        self.on_alloc = lambda n: None
        # On a shared volume the global bitmap may be read and changed only
        # under its cluster lock: ``global_locked(exclusive)`` says whether
        # the running operation holds it.  Without it, only the window
        # counts as free, and frees outside the window wait in ``deferred``
        # (the truncate log) until an operation holding the lock applies
        # them (``flush_deferred``).
        self.global_locked = lambda exclusive: True
        # ``global_cached()``: the lock is this node's (cached EX) right now;
        # enough for the commit to apply frees (a hand-over of the lock
        # commits first, with the lock still EX).
        self.global_cached = lambda: True
        # ``others_reserved()``: clusters other running operations have
        # reserved and not yet allocated.  Those without the global lock
        # counted on the window alone, so an operation holding the lock
        # leaves the window that much (it refills first): otherwise it took
        # their clusters, and their next allocation needed a refill they
        # may not do.
        self.others_reserved = lambda: 0
        self.deferred: list[tuple[int, int]] = []
        self.deferred_total = 0      # clusters that ever had to wait (tests)
        if window is None:
            window = max(8, min(2048, sb.total_clusters // (sb.slot_count * 8)))
        self.window = min(window, F.local_window_max(sb.block_size))

    async def load(self) -> None:
        self.groups = []
        sb = self.sb
        for g in range(sb.group_count):
            gd = await self.cache.get(F.group_desc_blkno(sb, g), "group", "bitmap")
            # A descriptor of another group (or size) would have the
            # allocator mark bits past its bitmap, or write it home to
            # the other group's block (corruption found by fuzzing).
            if gd.group != g or gd.nbits != min(sb.cpg, sb.total_clusters - g * sb.cpg):
                raise OSError(errno.EIO, f"group descriptor {g} is corrupt: it describes "
                              f"group {gd.group} of {gd.nbits} clusters")
            self.groups.append(gd)
        self.gfree = sum(g.free for g in self.groups)
        self.local = await self.cache.get(self.local_blk, "local", "local")

    def window_free(self) -> int:
        la = self.local
        if not la.length:
            return 0
        return la.length - F.count_bits(la.bitmap, la.length)

    def free_clusters(self) -> int:
        return (self.gfree if self.global_locked(False) else 0) + self.window_free()

    def _group_of(self, cl: int) -> tuple[F.GroupDesc, int]:
        return self.groups[cl // self.sb.cpg], cl % self.sb.cpg

    def _mark_global(self, start: int, n: int, used: bool) -> None:
        for cl in range(start, start + n):
            g, bit = self._group_of(cl)
            if g.test(bit) == used:
                raise OSError(errno.EIO, f"cluster {cl} already {'used' if used else 'free'} "
                              "in the global bitmap")
            if used:
                g.set(bit)
                g.free -= 1
                self.gfree -= 1
            else:
                g.clear(bit)
                g.free += 1
                self.gfree += 1
            self.cache.mark(F.group_desc_blkno(self.sb, g.group), g)

    def _find_global_run(self, want: int) -> tuple[int, int]:
        """First free run of ``want`` clusters, else the longest one."""
        best = (0, 0)
        for g in self.groups:
            if g.free == 0:
                continue
            bit = 0
            while True:
                bit = first_free(g.bitmap, g.nbits, bit)
                if bit is None:
                    break
                run = free_run(g.bitmap, bit, min(want, g.nbits - bit))
                if run >= want:
                    return g.group * self.sb.cpg + bit, run
                if run > best[1]:
                    best = (g.group * self.sb.cpg + bit, run)
                bit += run
        return best

    def release_window(self) -> None:
        la = self.local
        if la.length:
            for i in range(la.length):
                if not la.test(i):
                    self._mark_global(la.start + i, 1, False)
        la.start = la.length = 0
        la.bitmap = bytearray()
        self.cache.mark(la.blkno, la)

    def _refill(self, at_least: int = 0) -> None:
        if not self.global_locked(True):
            raise OSError(errno.EIO, "window refill without the global bitmap lock")
        self.release_window()
        size = min(max(self.window, at_least), F.local_window_max(self.sb.block_size))
        start, n = self._find_global_run(size)
        if n == 0:
            raise OSError(errno.ENOSPC, "no free clusters")
        self._mark_global(start, n, True)
        la = self.local
        la.start, la.length = start, n
        la.bitmap = bytearray((n + 7) // 8)
        self.hint = 0
        self.cache.mark(la.blkno, la)

    def alloc(self, want: int, goal: int | None = None) -> tuple[int, int]:
        """Allocate up to ``want`` contiguous clusters, preferring ``goal``."""
        la = self.local
        free = self.window_free()
        if free == 0:
            self._refill()
        elif self.global_locked(True):
            keep = self.others_reserved()
            if keep and free - min(want, free) < keep:
                self._refill(keep + want)
        if goal is not None and la.start <= goal < la.start + la.length and not la.test(goal - la.start):
            first = goal - la.start
        else:
            first = first_free(la.bitmap, la.length, self.hint if self.hint < la.length else 0)
            if first is None:
                first = first_free(la.bitmap, la.length, 0)
        n = free_run(la.bitmap, first, min(want, la.length - first))
        for i in range(first, first + n):
            la.bitmap[i >> 3] |= 1 << (i & 7)
        self.hint = first + n
        self.cache.mark(la.blkno, la)
        self.on_alloc(n)
        return la.start + first, n

    def free(self, start: int, n: int) -> None:
        if n:
            self.pending.append((start, n))

    def apply_pending(self) -> None:
        """Apply deferred frees to the bitmaps of the transaction about to
        commit, and revoke the freed blocks in the journal."""
        la = self.local
        shift = self.sb.cluster_bits - self.sb.block_bits
        for start, n in self.pending:
            for cl in range(start, start + n):
                if la.length and la.start <= cl < la.start + la.length:
                    i = cl - la.start
                    if not la.test(i):
                        raise OSError(errno.EIO, f"double free of cluster {cl}")
                    la.bitmap[i >> 3] &= ~(1 << (i & 7)) & 0xFF
                    self.cache.mark(la.blkno, la)
                elif self.global_locked(True) or self.global_cached():
                    self._mark_global(cl, 1, False)
                else:
                    self.deferred.append((cl, 1))
                    self.deferred_total += 1
            self.cache.revokes.append((start << shift, n << shift))
        self.pending = []

    def flush_deferred(self) -> None:
        """Apply the frees that waited for the global bitmap lock (the
        caller holds it EX, inside an operation)."""
        for start, n in self.deferred:
            self._mark_global(start, n, False)
        self.deferred = []
