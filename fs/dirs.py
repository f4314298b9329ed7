"""Hashed directories (extendible hashing).

Each name has a 63-bit key (keyed hash of the name).  A directory holds a
table of 2**depth leaf pointers, indexed by the key's top ``depth`` bits,
stored in table blocks at logical block DIR_TABLE_LBLK onwards, and leaf
blocks at logical blocks 0, 1, 2, ...  A leaf with local depth ``d``
holds every name whose key starts with its d-bit prefix, so a lookup
reads one table block and one leaf, whatever the directory size -- plus
one extent leaf per mapped block once the directory's extent map no
longer fits in its inode, which is why leaf clusters are mapped in
growing runs (see _prealloc).  A full leaf splits on its next key bit,
doubling the table when needed.  Leaves keep entries sorted by key and
key order is table order, so the key is a stable readdir cookie.

An insert works out before it changes anything how many splits and table
doublings it needs and what they can allocate (_split_plan, _cost): it is
refused with ENOSPC up front rather than failing half-way through a split,
which would leave the running transaction unusable and latch the
filesystem read-only.
"""
from __future__ import annotations

import bisect
import errno
from contextvars import ContextVar

from . import format as F
from .extents import insert_extent

# Leaf clusters a directory maps one at a time; past this many it maps
# runs as long as what it already has (so the number of extents grows with
# the log of the size, not with the size, when inodes and other files are
# allocated in between), at most PREALLOC_BYTES per run.  Mapped blocks
# past the last leaf are simply unused, as the spare blocks of a directory's
# last cluster are when clusters are larger than blocks.
PREALLOC_FROM = 4
PREALLOC_BYTES = 256 << 10
# Preallocation takes at most this fraction of the free space left over
# after what the insert itself needs, so a nearly full volume is not eaten
# by directory runs.
PREALLOC_SHARE = 8


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
        self.prealloc_max = max(1, PREALLOC_BYTES >> sb.cluster_bits)
        # The last lookup that found nothing: (directory inode, name, leaf).
        # Every insert path looks the name up first (it must not exist), so
        # reserve_estimate can size the reservation for that very name; and
        # clusters preallocation may still take during the running insert.
        # Both belong to the operation (the task) that set them: operations
        # run concurrently.
        self._miss_var: ContextVar[tuple[int, bytes, F.DirLeaf] | None] = \
            ContextVar("replfs_dir_miss", default=None)
        self._spare_var: ContextVar[int] = ContextVar("replfs_dir_spare", default=0)

    def key(self, name: bytes) -> int:
        return F.name_key(self.seed, name)

    def table_blocks(self, depth: int) -> int:
        return -(-(1 << depth) // self.tslots)

    async def _map_block(self, d: F.Inode, lblk: int, create: bool = False,
                         want: int = 1) -> int:
        """Physical block of logical block ``lblk``; with ``create``, map
        its cluster if needed, together with up to ``want - 1`` following
        unmapped clusters when they come in the same contiguous run."""
        lcl = lblk >> self.shift
        pcl, hole = await self.ext.lookup(d, lcl)
        if pcl is None:
            if not create:
                raise OSError(errno.EIO, f"directory {d.ino}: logical block {lblk} unmapped")
            if hole > 0:
                want = min(want, hole)
            exts = await self.ext.load(d)
            # right after the cluster mapped just before, so runs merge
            goal = next((p + lcl - l for l, p, n in exts if l < lcl <= l + n), None)
            pcl, n = self.alloc.alloc(max(1, want), goal)
            await self.ext.store(d, insert_extent(exts, lcl, pcl, n))
        return (pcl << self.shift) + (lblk & ((1 << self.shift) - 1))

    async def _table(self, d: F.Inode, i: int) -> F.DirTable:
        blk = await self._map_block(d, F.DIR_TABLE_LBLK + i)
        return await self.cache.get(blk, "dirtable", d.ino)

    async def _leaf(self, d: F.Inode, idx: int) -> F.DirLeaf:
        blk = await self._map_block(d, idx)
        leaf = await self.cache.get(blk, "dirleaf", d.ino)
        if leaf.depth > d.dir_depth:
            # corrupt: the shifts by (table depth - leaf depth) would be
            # negative (ValueError, found by fuzzing)
            raise OSError(errno.EIO, f"directory {d.ino}: leaf {idx} of depth {leaf.depth} "
                          f"in a table of depth {d.dir_depth}")
        return leaf

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

    def _prealloc(self, idx: int) -> int:
        """Spare clusters to map after the cluster of new leaf ``idx``."""
        lcl = idx >> self.shift
        if lcl < PREALLOC_FROM:
            return 0
        return max(0, min(lcl, self.prealloc_max, self._spare_var.get()))

    async def _new_leaf(self, d: F.Inode, depth: int) -> F.DirLeaf:
        idx = d.dir_leaves
        extra = self._prealloc(idx)
        before = d.clusters
        blk = await self._map_block(d, idx, create=True, want=1 + extra)
        self._spare_var.set(self._spare_var.get() - max(0, d.clusters - before - 1))
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

    # ------------------------------------------------------------ space

    def _split_plan(self, d: F.Inode, leaf: F.DirLeaf, key: int, size: int) -> tuple[int, int]:
        """(splits, table doublings) that inserting an entry of ``size``
        bytes with ``key`` into ``leaf`` takes: the loop of insert(),
        without changing anything.  With 512-byte blocks and long names a
        leaf holds one or two entries, and a new key that shares its first
        k bits with them needs k splits, each of which may double the table."""
        entries = leaf.entries
        used = leaf.used()
        depth, tdepth = leaf.depth, d.dir_depth
        splits = doublings = 0
        while used + size > self.bs:
            if depth >= F.MAX_DIR_DEPTH:
                raise OSError(errno.ENOSPC, "directory leaf cannot split further")
            if depth == tdepth:
                tdepth += 1
                doublings += 1
            depth += 1
            splits += 1
            bit = F.KEY_BITS - depth
            side = (key >> bit) & 1
            entries = [e for e in entries if (e.key >> bit) & 1 == side]
            used = F.DIRLEAF_OFF + sum(e.size for e in entries)
        return splits, doublings

    def _mapped_clusters(self, d: F.Inode, first_blk: int, nblocks: int) -> tuple[int, int]:
        """(clusters covering logical blocks [first_blk, first_blk+nblocks),
        how many of them are surely mapped already).  Exact while the
        extent map is in the inode; otherwise only the cluster shared with
        the block before ``first_blk`` is known to be mapped."""
        lo = first_blk >> self.shift
        hi = (first_blk + nblocks - 1) >> self.shift
        if d.ext_depth == 0:
            mapped = sum(max(0, min(hi + 1, l + n) - max(lo, l)) for l, _, n in d.root)
        else:
            mapped = 1 if first_blk & ((1 << self.shift) - 1) else 0
        return hi - lo + 1, mapped

    def _cost(self, d: F.Inode, splits: int, doublings: int) -> int:
        """Clusters that ``splits`` leaf splits and ``doublings`` table
        doublings can allocate at most: new leaf and table clusters, and
        the extent leaves the directory's extent map may grow by (each new
        cluster at worst one more extent)."""
        new = 0
        if splits:
            n, mapped = self._mapped_clusters(d, d.dir_leaves, splits)
            new += n - mapped
        tb0 = self.table_blocks(d.dir_depth)
        tb1 = self.table_blocks(d.dir_depth + doublings)
        if tb1 > tb0:
            n, mapped = self._mapped_clusters(d, F.DIR_TABLE_LBLK + tb0, tb1 - tb0)
            new += n - mapped
        if d.ext_depth == 0:
            nexts, leaves = len(d.root), 0
        else:
            nexts, leaves = sum(r[2] for r in d.root), len(d.root)
        if nexts + new > self.ext.max_extents:
            raise OSError(errno.ENOSPC, f"directory {d.ino}: extent map full (too fragmented)")
        return new + max(0, self.ext.leaves_needed(nexts + new) - leaves)

    def reserve_estimate(self, d: F.Inode, name: bytes | None = None) -> int:
        """Clusters inserting ``name`` into ``d`` may allocate, for the
        caller to reserve before it changes anything; raises ENOSPC if the
        insert cannot be done at all.

        Exact (an upper bound) when ``name`` -- or, without ``name``, the
        name of the last lookup in ``d``, which every insert path does to
        make sure the name is free -- is known: it follows the split chain
        that very key causes, including every table doubling.  Without
        either it assumes one split with one doubling; insert() then still
        checks and refuses before changing anything."""
        m = self._miss_var.get()
        if m is not None and m[0] == d.ino and (name is None or m[1] == name):
            size = F.DIRENT.size + len(m[1])
            return self._cost(d, *self._split_plan(d, m[2], self.key(m[1]), size))
        return self._cost(d, 1, 1)

    # ------------------------------------------------------------ entries

    async def lookup(self, d: F.Inode, name: bytes) -> F.DirEntry | None:
        self._miss_var.set(None)
        key = self.key(name)
        leaf = await self._leaf_for_key(d, key)
        i = bisect.bisect_left(leaf.entries, key, key=lambda e: e.key)
        while i < len(leaf.entries) and leaf.entries[i].key == key:
            if leaf.entries[i].name == name:
                return leaf.entries[i]
            i += 1
        self._miss_var.set((d.ino, name, leaf))
        return None

    async def insert(self, d: F.Inode, name: bytes, ino: int, ftype: int) -> None:
        self._miss_var.set(None)
        key = self.key(name)
        ent = F.DirEntry(key, ino, ftype, name)
        slot = key >> (F.KEY_BITS - d.dir_depth)
        leaf = await self._leaf(d, await self._ptr(d, slot))
        if leaf.used() + ent.size > self.bs:
            # Splits ahead: make sure all of them can be done before the
            # first one changes anything.
            need = self._cost(d, *self._split_plan(d, leaf, key, ent.size))
            # (fsck's repair allocator keeps no free count: it fails into
            # an overlay that is only written when the repair completes)
            if hasattr(self.alloc, "free_clusters"):
                free = self.alloc.free_clusters()
                if free < need:
                    raise OSError(errno.ENOSPC, "no space left on device")
                # what other operations reserved is not ours to preallocate
                # (our own reservation covers ``need``)
                spare = free - getattr(self.alloc, "reserved", 0)
                self._spare_var.set(max(0, spare) // PREALLOC_SHARE)
        try:
            while True:
                used = leaf.used()
                if used + ent.size <= self.bs:
                    i = bisect.bisect_right(leaf.entries, key, key=lambda e: e.key)
                    leaf.entries.insert(i, ent)
                    leaf.nbytes = used + ent.size
                    self.cache.mark(leaf.blkno, leaf)
                    return
                await self._split(d, leaf)
                slot = key >> (F.KEY_BITS - d.dir_depth)
                leaf = await self._leaf(d, await self._ptr(d, slot))
        finally:
            self._spare_var.set(0)

    async def _double(self, d: F.Inode) -> None:
        if d.dir_depth >= F.MAX_DIR_DEPTH:
            raise OSError(errno.ENOSPC, "directory hash table at its maximum depth")
        old_blocks = self.table_blocks(d.dir_depth)
        old = [await self._ptr(d, s) for s in range(1 << d.dir_depth)]
        new = [p for p in old for _ in (0, 1)]
        d.dir_depth += 1
        nblocks = self.table_blocks(d.dir_depth)
        last_cl = (F.DIR_TABLE_LBLK + nblocks - 1) >> self.shift
        for i in range(nblocks):
            lblk = F.DIR_TABLE_LBLK + i
            chunk = new[i * self.tslots:(i + 1) * self.tslots]
            chunk += [0] * (self.tslots - len(chunk))
            if i < old_blocks:
                t = await self._table(d, i)
                t.ptrs = chunk
                self.cache.mark(t.blkno, t)
            else:
                # A new table block: never written, even when its cluster
                # is already mapped (clusters larger than blocks), so it is
                # created, not read.  The new clusters come as one run.
                blk = await self._map_block(d, lblk, create=True,
                                            want=last_cl - (lblk >> self.shift) + 1)
                self.cache.new(blk, F.DirTable(blk, i, chunk), d.ino)
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

