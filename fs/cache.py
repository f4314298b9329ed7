"""Metadata block cache and the running transaction.

Decoded metadata objects are cached by block number.  A change marks the
object dirty; dirty objects belong to the running transaction and stay
pinned until it commits.  Clean objects are evicted in LRU order.  Each
cached block remembers the inode (or allocator) that owns it, so a
cluster lock downconversion can drop exactly that owner's blocks.

There is only ever one live object per block.  An operation holds the
objects it fetched across awaits and changes them before it marks them;
eviction only drops the cache's own reference, and an evicted object that
someone still holds is found again (weakly referenced) instead of being
decoded afresh from disk -- two copies of a block would each collect half
of the changes, and the one marked last would win.  For the same reason
two tasks that miss on one block at once end with the object the first
of them inserted, and a block whose committed image is still on its way
home (``homing``) is decoded from that image, not read from the disk.

``drop_clean`` (after a journal replay changed blocks under the cache)
breaks that rule on purpose: the next ``get`` decodes the disk afresh.
An object dropped that way may still be held (the allocator's group
descriptors and local-alloc block, an inode an operation is changing) and
be marked again; it then comes back into the cache with the owner its
block had -- owners are per block, and kept for dropped objects -- so that
the lock which covers it still drops it when it goes to another node.

On a shared volume a cached block is trusted while its lock is cached,
with two exceptions: a block a new owner asks for (the other node freed
it and reused it: its new owner's lock never covered this copy) and an
inode tombstone (the other node may have made a new inode in the freed
block, and a new inode's lock is taken by nobody) are read afresh.  A
block read without its lock (readdir's inode prefetch) is not cached if
it was forgotten while the read was in flight.

The cache does not know operations: every change calls ``on_dirty``,
through which the filesystem counts the operation into the running
transaction.
"""
from __future__ import annotations

import errno
import weakref
from collections import OrderedDict

from . import format as F

DECODERS = {
    "inode": F.Inode.decode,
    "extent": F.ExtentLeaf.decode,
    "group": F.GroupDesc.decode,
    "dirleaf": F.DirLeaf.decode,
    "dirtable": F.DirTable.decode,
    "local": F.LocalAlloc.decode,
    "slotmap": F.SlotMap.decode,
    "xattr": F.XattrBlock.decode,
}


def _nothing() -> None:
    pass


class MetaCache:
    def __init__(self, dev, sb: F.Superblock, limit: int = 20000, *, check: bool = True):
        self.dev = dev
        self.sb = sb
        # Refuse blocks whose values the core cannot work with (see
        # F.block_problem) as corrupt; fsck, which reads damaged blocks
        # to repair them, turns it off.
        self.check = check
        self.bs = sb.block_size
        self.objs: OrderedDict[int, object] = OrderedDict()
        self.owner: dict[int, object] = {}
        self.dirty: dict[int, object] = {}
        # evicted objects that may still be held by a running operation
        self.evicted: weakref.WeakValueDictionary[int, object] = weakref.WeakValueDictionary()
        # objects dropped by drop_clean that someone may still hold (and
        # mark again): never handed out by get, only kept track of so that
        # their blocks' owners are not pruned
        self.detached: weakref.WeakValueDictionary[int, object] = weakref.WeakValueDictionary()
        self.revokes: list[tuple[int, int]] = []
        self.limit = limit
        self.reads = 0            # block reads issued, for tests
        # images committed to the journal whose home writes are in flight
        self.homing: dict[int, bytes] = {}
        self.on_dirty = _nothing  # called on every change (the filesystem's hook)
        # blocks read without their lock (readdir's inode prefetch), and
        # those of them forgotten while the read was in flight: a copy read
        # before a lock hand-over must not be cached after it
        self._unlocked: dict[int, int] = {}
        self._spoiled: set[int] = set()

    def decode(self, kind: str, raw: bytes, blkno: int):
        """Decode a block of ``kind`` read from disk; F.FormatError if it
        does not decode or (``check``) holds what the core cannot use."""
        obj = DECODERS[kind](raw, self.sb.volid, blkno)
        if self.check:
            why = F.block_problem(kind, obj, self.sb)
            if why is not None:
                raise F.FormatError(f"block {blkno}: {why}")
        return obj

    def encode(self, blkno: int, obj) -> bytes:
        if isinstance(obj, F.GroupDesc):
            return obj.encode(self.bs, self.sb.volid, blkno)
        return obj.encode(self.bs, self.sb.volid)

    async def get(self, blkno: int, kind: str, owner=None):
        if type(owner) is int and blkno not in self.dirty:
            known = self.owner.get(blkno)
            if type(known) is int and known != owner:
                # Cached as another inode's block, asked for as this one's:
                # the block was freed and given to another inode elsewhere
                # (the other node), so the new owner's lock hand-over never
                # dropped this copy.  Read it afresh.  Only inode-owned
                # blocks: the allocator's are asked for under more than
                # one name on purpose.
                self.objs.pop(blkno, None)
                self.evicted.pop(blkno, None)
                self.detached.pop(blkno, None)
                self.owner.pop(blkno, None)
        obj = self.objs.get(blkno)
        if obj is None:
            obj = self.evicted.pop(blkno, None)
            if obj is not None:
                self._insert(blkno, obj, owner)
        if (obj is not None and kind == "inode" and isinstance(obj, F.Inode)
                and not obj.flags & F.INODE_FLAG_VALID and blkno not in self.dirty):
            # A tombstone is never trusted: the other node may have made a
            # new inode in the freed block without taking its lock (a new
            # inode is nobody else's yet -- except a node that still caches
            # the lock and the tombstone from a stale lookup).  Read afresh.
            # (netns fault seed 1059: an empty file beta created was missing
            # from alpha's listing and lookups for good.)
            self.objs.pop(blkno, None)
            obj = None
        if obj is not None:
            if kind == "inode" and not isinstance(obj, F.Inode):
                # a stale inode number whose block now holds other metadata
                raise OSError(errno.ESTALE, f"block {blkno} is not an inode")
            self.objs.move_to_end(blkno)
            return obj
        if blkno <= 0 or blkno >= self.sb.total_blocks:
            raise OSError(errno.EIO, f"metadata block {blkno} out of range")
        raw = self.homing.get(blkno)
        if raw is None:
            self.reads += 1
            raw = await self.dev.read(blkno * self.bs, self.bs)
            again = self.objs.get(blkno)
            if again is None:
                again = self.evicted.pop(blkno, None)
                if again is not None:
                    self._insert(blkno, again, owner)
            if again is not None:
                # another task read (or created) it meanwhile: one object
                # per block, so take that one
                if kind == "inode" and not isinstance(again, F.Inode):
                    raise OSError(errno.ESTALE, f"block {blkno} is not an inode")
                return again
            if blkno in self.homing:
                raw = self.homing[blkno]     # committed while we were reading
        if kind == "inode" and F.signature_of(raw) != F.SIG_INODE:
            # An inode number that does not lead to an inode: the file was
            # deleted and its block reused (or never was an inode).
            raise OSError(errno.ESTALE, f"block {blkno} is not an inode")
        try:
            obj = self.decode(kind, raw, blkno)
        except F.FormatError as e:
            raise OSError(errno.EIO, f"corrupt {kind} block: {e}") from None
        self._insert(blkno, obj, owner)
        return obj

    def _insert(self, blkno: int, obj, owner) -> None:
        self.objs[blkno] = obj
        self.objs.move_to_end(blkno)
        if owner is not None:
            self.owner[blkno] = owner
        if len(self.objs) > self.limit:
            self._evict()

    def _evict(self) -> None:
        for blkno in list(self.objs):
            if len(self.objs) <= self.limit * 3 // 4:
                break
            if blkno not in self.dirty:
                # the owner stays: the object may come back from ``evicted``
                self.evicted[blkno] = self.objs.pop(blkno)
        if len(self.owner) > 2 * self.limit:
            self.owner = {b: o for b, o in self.owner.items()
                          if b in self.objs or b in self.evicted or b in self.detached}

    def new(self, blkno: int, obj, owner=None) -> None:
        """A freshly allocated block: cached and dirty, never read."""
        self.evicted.pop(blkno, None)
        self.dirty[blkno] = obj
        self._insert(blkno, obj, owner)
        self.on_dirty()

    def mark(self, blkno: int, obj) -> None:
        self.dirty[blkno] = obj
        self.on_dirty()
        if self.objs.get(blkno) is not obj:
            # evicted (or dropped by drop_clean) while its holder was
            # changing it: cached again, so the next get finds this object
            # and not the older disk copy; its block's owner was kept, so
            # its lock still drops it
            self.evicted.pop(blkno, None)
            self.detached.pop(blkno, None)
            self.objs[blkno] = obj
        self.objs.move_to_end(blkno)

    def begin_unlocked_read(self, blks) -> None:
        """``blks`` are being read without their locks (see
        ``end_unlocked_read``)."""
        for b in blks:
            self._unlocked[b] = self._unlocked.get(b, 0) + 1

    def end_unlocked_read(self, blks) -> set[int]:
        """The blocks of ``blks`` forgotten since ``begin_unlocked_read``
        (a lock hand-over or refresh dropped them): what was read of them
        may be older than the disk and must not be cached."""
        spoiled = set()
        for b in blks:
            if b in self._spoiled:
                spoiled.add(b)
            n = self._unlocked.get(b, 0) - 1
            if n > 0:
                self._unlocked[b] = n
            else:
                self._unlocked.pop(b, None)
                self._spoiled.discard(b)
        return spoiled

    def _spoil(self, blkno: int) -> None:
        if blkno in self._unlocked:
            self._spoiled.add(blkno)

    def forget(self, blkno: int) -> None:
        self._spoil(blkno)
        self.objs.pop(blkno, None)
        self.evicted.pop(blkno, None)
        self.detached.pop(blkno, None)
        self.dirty.pop(blkno, None)
        self.owner.pop(blkno, None)

    def drop_owner(self, owner) -> None:
        for blkno in [b for b, o in self.owner.items() if o == owner]:
            if blkno not in self.dirty:
                self.objs.pop(blkno, None)
                self.evicted.pop(blkno, None)
                self.detached.pop(blkno, None)
                self.owner.pop(blkno, None)

    def drop_clean(self) -> None:
        """Forget every clean object: the next get reads the disk.  The
        owners of their blocks are kept: a holder may mark a dropped
        object again (see the module notes), and it must come back as
        its lock's block, or that lock's hand-over would not drop it (the
        survivor of a slot recovery kept stale group descriptors that way,
        and freed clusters of the other node's next window twice)."""
        self._spoiled.update(self._unlocked)
        for blkno in list(self.objs):
            if blkno not in self.dirty:
                self.detached[blkno] = self.objs.pop(blkno)
        for blkno in list(self.evicted.keys()):
            obj = self.evicted.pop(blkno, None)
            if obj is not None and blkno not in self.dirty:
                self.detached[blkno] = obj

    def take_transaction(self) -> tuple[dict[int, bytes], list[tuple[int, int]]]:
        images = {b: self.encode(b, o) for b, o in self.dirty.items()}
        revokes = self.revokes
        self.dirty = {}
        self.revokes = []
        return images, revokes

    def discard_transaction(self) -> None:
        for blkno in self.dirty:
            self.objs.pop(blkno, None)
            self.evicted.pop(blkno, None)
            self.owner.pop(blkno, None)
        self.dirty = {}
        self.revokes = []
