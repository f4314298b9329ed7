"""Extent maps: which physical clusters hold which logical clusters of
an inode.  The tree has depth 0 (extents in the inode) or depth 1 (the
inode points at extent leaf blocks, each covering a sorted run of
extents).  Changes rewrite the map as a whole, reusing leaf blocks, and
dirty only the leaves whose contents changed.
"""
from __future__ import annotations

import bisect
import errno

from . import format as F

Extent = tuple[int, int, int]   # logical cluster, physical cluster, length


def insert_extent(exts: list[Extent], lcl: int, pcl: int, n: int) -> list[Extent]:
    """Insert a mapping for a hole, merging with neighbours."""
    i = bisect.bisect_left(exts, (lcl,))
    out = exts[:i]
    if out and out[-1][0] + out[-1][2] == lcl and out[-1][1] + out[-1][2] == pcl:
        a = out.pop()
        lcl, pcl, n = a[0], a[1], a[2] + n
    rest = exts[i:]
    if rest and lcl + n == rest[0][0] and pcl + n == rest[0][1]:
        n += rest[0][2]
        rest = rest[1:]
    return out + [(lcl, pcl, n)] + rest


def cut_extents(exts: list[Extent], first: int, end: int | None = None
                ) -> tuple[list[Extent], list[tuple[int, int]]]:
    """Unmap logical clusters [first, end); return (kept, freed physical runs)."""
    kept: list[Extent] = []
    freed: list[tuple[int, int]] = []
    for l, p, n in exts:
        e_end = l + n
        lo = max(l, first)
        hi = e_end if end is None else min(e_end, end)
        if lo >= hi:
            kept.append((l, p, n))
            continue
        if l < lo:
            kept.append((l, p, lo - l))
        freed.append((p + (lo - l), hi - lo))
        if hi < e_end:
            kept.append((hi, p + (hi - l), e_end - hi))
    return kept, freed


class ExtentMaps:
    def __init__(self, cache, alloc, sb: F.Superblock):
        self.cache = cache
        self.alloc = alloc
        self.sb = sb
        self.rcap = F.inode_root_capacity(sb.block_size)
        self.lcap = F.extent_leaf_capacity(sb.block_size)

    @property
    def max_extents(self) -> int:
        return self.rcap * self.lcap

    async def load(self, ino: F.Inode) -> list[Extent]:
        if ino.ext_depth == 0:
            return list(ino.root)
        out: list[Extent] = []
        for _, blk, _ in ino.root:
            leaf = await self.cache.get(blk, "extent", ino.ino)
            out.extend(leaf.recs)
        return out

    async def lookup(self, ino: F.Inode, lcl: int) -> tuple[int | None, int]:
        """Physical cluster of ``lcl`` and the length of the run (mapped or
        hole) that starts there; a trailing hole has length -1."""
        recs = ino.root
        if ino.ext_depth == 1:
            i = bisect.bisect_right(recs, (lcl, float("inf"))) - 1
            if i < 0:
                nxt = recs[0][0] if recs else None
                return None, (nxt - lcl) if nxt is not None else -1
            leaf = await self.cache.get(recs[i][1], "extent", ino.ino)
            leafrecs = leaf.recs
            nxt_leaf = recs[i + 1][0] if i + 1 < len(recs) else None
        else:
            leafrecs = recs
            nxt_leaf = None
        j = bisect.bisect_right(leafrecs, (lcl, float("inf"))) - 1
        if j >= 0:
            l, p, n = leafrecs[j]
            if lcl < l + n:
                return p + (lcl - l), l + n - lcl
        nxt = leafrecs[j + 1][0] if j + 1 < len(leafrecs) else nxt_leaf
        return None, (nxt - lcl) if nxt is not None else -1

    def leaves_needed(self, n: int) -> int:
        return 0 if n <= self.rcap else -(-n // self.lcap)

    async def store(self, ino: F.Inode, exts: list[Extent]) -> None:
        if len(exts) > self.max_extents:
            raise OSError(errno.EFBIG, "file too fragmented for its extent tree")
        old = [blk for _, blk, _ in ino.root] if ino.ext_depth == 1 else []
        shift = self.sb.cluster_bits - self.sb.block_bits
        if len(exts) <= self.rcap:
            for blk in old:
                self.alloc.free(blk >> shift, 1)
                self.cache.forget(blk)
            ino.root = list(exts)
            ino.ext_depth = 0
        else:
            k = self.leaves_needed(len(exts))
            root = []
            for i in range(k):
                recs = exts[i * self.lcap:(i + 1) * self.lcap]
                if i < len(old):
                    leaf = await self.cache.get(old[i], "extent", ino.ino)
                    if leaf.recs != recs:
                        leaf.recs = recs
                        self.cache.mark(leaf.blkno, leaf)
                else:
                    cl, _ = self.alloc.alloc(1)
                    leaf = F.ExtentLeaf(cl << shift, recs)
                    self.cache.new(leaf.blkno, leaf, ino.ino)
                root.append((recs[0][0], leaf.blkno, len(recs)))
            for blk in old[k:]:
                self.alloc.free(blk >> shift, 1)
                self.cache.forget(blk)
            ino.root = root
            ino.ext_depth = 1
        ino.clusters = sum(n for _, _, n in exts)
        self.cache.mark(ino.ino, ino)
