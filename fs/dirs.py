"""Hashed directories (extendible hashing).

Each name has a 63-bit key (keyed hash of the name).  A directory holds a
table of 2**depth leaf pointers, indexed by the key's top ``depth`` bits,
stored in table blocks at logical block DIR_TABLE_LBLK onwards, and leaf
blocks at logical blocks 0, 1, 2, ...  A leaf with local depth ``d``
holds every name whose key starts with its d-bit prefix, so a lookup
reads one table block and one leaf, whatever the directory size.  A full
leaf splits on its next key bit, doubling the table when needed.  Leaves
keep entries sorted by key and key order is table order, so the key is
a stable readdir cookie.
"""
from __future__ import annotations

import bisect
import errno

from . import format as F
from .extents import insert_extent


class Directories:
    def __init__(self, cache, alloc, extents, sb: F.Superblock):
        self.cache = cache
        self.alloc = alloc
        self.ext = extents
        self.sb = sb
        self.bs = sb.block_size
        self.shift = sb.cluster_bits - sb.block_bits
        self.tslots = F.dirtable_slots(self.bs)
        self.seed = sb.uuid

    def key(self, name: bytes) -> int:
        return F.name_key(self.seed, name)

    def table_blocks(self, depth: int) -> int:
        return -(-(1 << depth) // self.tslots)

    async def _map_block(self, d: F.Inode, lblk: int, create: bool = False) -> int:
        lcl = lblk >> self.shift
        pcl, _ = await self.ext.lookup(d, lcl)
        if pcl is None:
            if not create:
                raise OSError(errno.EIO, f"directory {d.ino}: logical block {lblk} unmapped")
            pcl, _ = self.alloc.alloc(1)
            exts = await self.ext.load(d)
            await self.ext.store(d, insert_extent(exts, lcl, pcl, 1))
        return (pcl << self.shift) + (lblk & ((1 << self.shift) - 1))

    async def _table(self, d: F.Inode, i: int) -> F.DirTable:
        blk = await self._map_block(d, F.DIR_TABLE_LBLK + i)
        return await self.cache.get(blk, "dirtable", d.ino)

    async def _leaf(self, d: F.Inode, idx: int) -> F.DirLeaf:
        blk = await self._map_block(d, idx)
        return await self.cache.get(blk, "dirleaf", d.ino)

    async def _ptr(self, d: F.Inode, slot: int) -> int:
        t = await self._table(d, slot // self.tslots)
        return t.ptrs[slot % self.tslots]

    async def _set_ptr(self, d: F.Inode, slot: int, leaf: int) -> None:
        t = await self._table(d, slot // self.tslots)
        t.ptrs[slot % self.tslots] = leaf
        self.cache.mark(t.blkno, t)

    async def _leaf_for_key(self, d: F.Inode, key: int) -> F.DirLeaf:
        slot = key >> (F.KEY_BITS - d.dir_depth)
        return await self._leaf(d, await self._ptr(d, slot))

    async def _new_leaf(self, d: F.Inode, depth: int) -> F.DirLeaf:
        idx = d.dir_leaves
        blk = await self._map_block(d, idx, create=True)
        leaf = F.DirLeaf(blk, idx, depth, [])
        self.cache.new(blk, leaf, d.ino)
        d.dir_leaves += 1
        self.cache.mark(d.ino, d)
        return leaf

    async def init(self, d: F.Inode) -> None:
        d.dir_depth = 0
        d.dir_leaves = 0
        blk = await self._map_block(d, F.DIR_TABLE_LBLK, create=True)
        t = F.DirTable(blk, 0, [0] * self.tslots)
        self.cache.new(blk, t, d.ino)
        await self._new_leaf(d, 0)

    def reserve_estimate(self, d: F.Inode) -> int:
        """Clusters an insert may need in the worst realistic case."""
        return 8 + self.table_blocks(d.dir_depth + 1) + 2 * self.ext.leaves_needed(0)

    async def lookup(self, d: F.Inode, name: bytes) -> F.DirEntry | None:
        key = self.key(name)
        leaf = await self._leaf_for_key(d, key)
        i = bisect.bisect_left(leaf.entries, key, key=lambda e: e.key)
        while i < len(leaf.entries) and leaf.entries[i].key == key:
            if leaf.entries[i].name == name:
                return leaf.entries[i]
            i += 1
        return None

    async def insert(self, d: F.Inode, name: bytes, ino: int, ftype: int) -> None:
        key = self.key(name)
        ent = F.DirEntry(key, ino, ftype, name)
        while True:
            slot = key >> (F.KEY_BITS - d.dir_depth)
            leaf = await self._leaf(d, await self._ptr(d, slot))
            used = leaf.used()
            if used + ent.size <= self.bs:
                i = bisect.bisect_right(leaf.entries, key, key=lambda e: e.key)
                leaf.entries.insert(i, ent)
                leaf.nbytes = used + ent.size
                self.cache.mark(leaf.blkno, leaf)
                return
            await self._split(d, leaf)

    async def _double(self, d: F.Inode) -> None:
        if d.dir_depth >= F.MAX_DIR_DEPTH:
            raise OSError(errno.ENOSPC, "directory hash table at its maximum depth")
        old = [await self._ptr(d, s) for s in range(1 << d.dir_depth)]
        new = [p for p in old for _ in (0, 1)]
        d.dir_depth += 1
        for i in range(self.table_blocks(d.dir_depth)):
            lblk = F.DIR_TABLE_LBLK + i
            chunk = new[i * self.tslots:(i + 1) * self.tslots]
            chunk += [0] * (self.tslots - len(chunk))
            pcl, _ = await self.ext.lookup(d, lblk >> self.shift)
            if pcl is None:
                blk = await self._map_block(d, lblk, create=True)
                self.cache.new(blk, F.DirTable(blk, i, chunk), d.ino)
            else:
                t = await self._table(d, i)
                t.ptrs = chunk
                self.cache.mark(t.blkno, t)
        self.cache.mark(d.ino, d)

    async def _split(self, d: F.Inode, leaf: F.DirLeaf) -> None:
        if leaf.depth >= F.MAX_DIR_DEPTH:
            raise OSError(errno.ENOSPC, "directory leaf cannot split further")
        if leaf.depth == d.dir_depth:
            await self._double(d)
        nd = leaf.depth + 1
        bitpos = F.KEY_BITS - nd
        sib = await self._new_leaf(d, nd)
        keep = [e for e in leaf.entries if not (e.key >> bitpos) & 1]
        sib.entries = [e for e in leaf.entries if (e.key >> bitpos) & 1]
        leaf.entries = keep
        leaf.nbytes = sib.nbytes = -1
        leaf.depth = nd
        self.cache.mark(leaf.blkno, leaf)
        self.cache.mark(sib.blkno, sib)
        # The table slots of the old leaf's range whose next bit is 1 now
        # point at the sibling.
        span = d.dir_depth - nd          # slots per new half, as a power of 2
        some = (keep or sib.entries)
        if some:
            prefix = some[0].key >> (F.KEY_BITS - leaf.depth + 1)
        else:
            prefix = await self._find_prefix(d, leaf)
        first = (prefix << 1 | 1) << span
        for s in range(first, first + (1 << span)):
            await self._set_ptr(d, s, sib.index)

    async def _find_prefix(self, d: F.Inode, leaf: F.DirLeaf) -> int:
        for s in range(1 << d.dir_depth):
            if await self._ptr(d, s) == leaf.index:
                return s >> (d.dir_depth - leaf.depth + 1)
        raise OSError(errno.EIO, f"directory {d.ino}: leaf {leaf.index} not in table")

    async def remove(self, d: F.Inode, name: bytes) -> F.DirEntry:
        key = self.key(name)
        leaf = await self._leaf_for_key(d, key)
        for i, e in enumerate(leaf.entries):
            if e.key == key and e.name == name:
                del leaf.entries[i]
                leaf.nbytes = -1
                self.cache.mark(leaf.blkno, leaf)
                return e
        raise OSError(errno.ENOENT, "no such entry")

    async def retarget(self, d: F.Inode, name: bytes, ino: int, ftype: int) -> None:
        key = self.key(name)
        leaf = await self._leaf_for_key(d, key)
        for e in leaf.entries:
            if e.key == key and e.name == name:
                e.ino, e.ftype = ino, ftype
                self.cache.mark(leaf.blkno, leaf)
                return
        raise OSError(errno.ENOENT, "no such entry")

    async def leaves_in_order(self, d: F.Inode, after_key: int = 0):
        """Yield each leaf once, in key order, starting with the leaf that
        holds keys just above ``after_key``."""
        n = 1 << d.dir_depth
        s = (after_key + 1) >> (F.KEY_BITS - d.dir_depth) if after_key + 1 < (1 << F.KEY_BITS) else n
        while s < n:
            leaf = await self._leaf(d, await self._ptr(d, s))
            yield leaf
            s = ((s >> (d.dir_depth - leaf.depth)) + 1) << (d.dir_depth - leaf.depth)

    async def entries(self, d: F.Inode, after_key: int = 0):
        async for leaf in self.leaves_in_order(d, after_key):
            for e in leaf.entries:
                if e.key > after_key:
                    yield e

    async def is_empty(self, d: F.Inode) -> bool:
        async for _ in self.entries(d):
            return False
        return True

