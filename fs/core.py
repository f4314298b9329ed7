"""The filesystem core: POSIX operations on a replfs volume.

``Filesystem`` is opened on a BlockDevice and a node slot.  Its methods
take and return on-disk inode numbers (the block number of the inode), so
a thin FUSE ``Operations`` class (fs/fuseops.py) can sit on top: inode numbers are the
FUSE inode numbers, the root is ``fs.root_ino``, errors are OSError with
an errno.

Concurrency: operations run concurrently.  Each has its own context
(``_Op``: the locks it holds, its reservation, whether it has changed
anything), found through a context variable.  An operation takes every
lock it needs first, in the order of fs/locks.py, through the lock
manager (node-local, or cluster locks); then it reserves what it may
allocate and changes cached blocks.  From its first reservation or
change until it ends (or commits in the middle, at a consistent point)
it is *in the running transaction*, and a commit waits for every
operation in it to leave -- which they do without waiting for any lock,
so a commit never waits for another node.  Nothing else is locked: the
code between two awaits runs alone (trio), and cached objects are shared.

Durability: metadata changes gather in the running transaction, which
commits to the slot's journal on fsync, sync, unmount, when it grows
large, and from ``commit_loop``.  File data is written in place before the
commit that makes it reachable (ordered mode).
"""
from __future__ import annotations

import contextlib
import errno
import logging
import os
import random
import stat
import time
from contextlib import AsyncExitStack, asynccontextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import trio

from replfs.blockdev import frozen

from . import format as F
from . import journal as J
from .alloc import Allocator
from .cache import MetaCache
from .dirs import Directories
from .extents import ExtentMaps, cut_extents, insert_extent
from .locks import EX, NL, PR, LocalLockManager, LockOrderError, Mode, OrderChecker, Res

log = logging.getLogger("replfs.fs")

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
RENAME_WHITEOUT = 4
XATTR_CREATE = 1
XATTR_REPLACE = 2
XATTR_CAPS = b"security.capability"     # file capabilities: killed on write
MAX_LINKS = 65000
MAX_FILE_SIZE = 1 << 60
MAX_SYMLINK = 4095
WRITE_CHUNK_CLUSTERS = 256
ATIME_POLICIES = ("noatime", "relatime", "strictatime")
ATIME_QUANTUM = 60          # seconds, OCFS2's default atime_quantum
RELATIME_AGE_NS = 24 * 3600 * 1_000_000_000


@dataclass
class Attr:
    ino: int
    mode: int
    nlink: int
    uid: int
    gid: int
    rdev: int
    size: int
    blocks: int          # 512-byte units
    blksize: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    generation: int


@dataclass
class StatFs:
    bsize: int
    frsize: int
    blocks: int
    bfree: int
    bavail: int
    files: int
    ffree: int
    namemax: int


@dataclass
class _Handle:
    ino: int
    flags: int


class FilesystemFailed(OSError):
    pass


class _Op:
    """One operation's context."""
    __slots__ = ("fs", "reading", "dirtied", "active", "reserved", "reserving",
                 "held", "order", "stack", "recovery", "after", "scope", "lean")

    def __init__(self, fs: "Filesystem", reading: bool):
        self.fs = fs
        self.reading = reading
        self.dirtied = False      # changed something not yet committed
        self.active = False       # in the running transaction
        self.reserved = 0         # clusters reserved, not yet allocated
        self.reserving = False    # reserved since it last left the transaction
        self.held: dict[Res, Mode] = {}
        self.order = OrderChecker()
        self.stack = AsyncExitStack()   # locks held until the operation ends
        self.recovery = False     # recovery's own: does not wait for recovery
        self.after: list[int] = []   # unlinked inodes to try to free once it ended
        # Cancellation (a FUSE INTERRUPT, a timeout) reaches an operation
        # only until it joins the transaction; from then on this scope is
        # shielded and the operation finishes (a half-done change would
        # have to latch the filesystem read-only).
        self.scope: trio.CancelScope | None = None
        self.lean = False         # reads only, runs without a scope (Filesystem._op)


_current_op: ContextVar["_Op | None"] = ContextVar("replfs_fs_op", default=None)


async def read_superblock(dev) -> F.Superblock:
    for bs in F.BLOCK_SIZES:
        raw = await dev.read(F.SB_OFFSET, bs)
        if len(raw) == bs and raw[:8] == F.SIG_SUPER:
            try:
                sb = F.Superblock.decode(raw, F.sb_blkno(bs))
            except F.FormatError:
                continue
            if sb.block_size == bs:
                # a damaged geometry would fail anywhere later (fuzzing)
                why = F.superblock_problem(sb, dev.size)
                if why is not None:
                    raise OSError(errno.EUCLEAN, f"the superblock is damaged ({why}); "
                                  "run fsck.replfs")
                return sb
    raise OSError(errno.EINVAL, "no replfs superblock found (not formatted with mkfs.replfs?)")


def _layout(inode: F.Inode) -> tuple:
    """What reaching an inode's data needs (fdatasync's concern)."""
    return (inode.size, inode.clusters, inode.flags, inode.ext_depth, tuple(inode.root))


async def _together(*aws) -> None:
    """Await ``aws`` concurrently; the first error is raised as it is
    (not in a group: a device's own exception types reach the caller)."""
    if len(aws) == 1:
        await aws[0]
        return
    try:
        async with trio.open_nursery() as n:
            for aw in aws:
                n.start_soon(_await, aw)
    except BaseExceptionGroup as g:
        first = g.exceptions[0]
        while isinstance(first, BaseExceptionGroup):
            first = first.exceptions[0]
        raise first from None


async def _await(aw) -> None:
    await aw


def _now() -> int:
    return time.time_ns()


def _check_id(value, what: str) -> None:
    # uid_t/gid_t are 32 bits; (uid_t)-1 means "no change" to chown(2) and
    # never reaches a filesystem as a value.
    if not isinstance(value, int) or not 0 <= value < F.U32_MAX:
        raise OSError(errno.EINVAL, f"{what} {value!r} out of range")


def _check_name(name) -> bytes:
    if isinstance(name, str):
        name = os.fsencode(name)
    if not name:
        raise OSError(errno.ENOENT, "empty name")
    if len(name) > F.MAX_NAME:
        raise OSError(errno.ENAMETOOLONG, "name longer than 255 bytes")
    if b"/" in name or b"\0" in name:
        raise OSError(errno.EINVAL, "name contains '/' or NUL")
    return name


class Filesystem:
    def __init__(self, dev, sb: F.Superblock, slot: int, locks, node: int):
        self.dev = dev
        self.sb = sb
        self.slot = slot
        self.node = node
        self.locks = locks
        self.bs = sb.block_size
        self.cs = sb.cluster_size
        self.shift = sb.cluster_bits - sb.block_bits
        self.cache = MetaCache(dev, sb)
        self.alloc = Allocator(self.cache, sb, slot)
        self.ext = ExtentMaps(self.cache, self.alloc, sb)
        self.dirs = Directories(self.cache, self.alloc, self.ext, sb)
        self.journal = J.Journal(dev, sb, slot)
        self.root_ino = sb.root_ino
        # Times outside what the volume stores are clamped, as the kernel
        # clamps to a filesystem's s_time_min/s_time_max; replies carry
        # the clamped value, so every node caches the time that is stored.
        self.wide_time = bool(sb.feat_incompat & F.FEATURE_INCOMPAT_WIDE_TIME)
        # Access times (mount options noatime/relatime/strictatime,
        # nodiratime, atime_quantum): see _atime_due.
        self.atime_policy = "relatime"
        self.nodiratime = False
        self.atime_quantum_ns = ATIME_QUANTUM * 1_000_000_000
        self.time_min, self.time_max = F.time_range(sb.feat_incompat)
        self.orphan_ino = sb.slots[slot].orphan_ino
        # The running transaction: operations in it, commits waiting for
        # them to leave, one commit (or checkpoint) at a time.
        self._active = 0
        self._closing = 0         # a commit is draining or writing the journal
        self._tx_lot = trio.lowlevel.ParkingLot()
        self._commit_lock = trio.Lock()
        # The last transaction's home writes, owed: the journal holds them,
        # so they go out with the next commit's journal write (one round
        # trip on a replicated resource, not two per fsync), or before
        # anything that needs the home blocks current -- a checkpoint, a
        # lock going to another node, unmount (``pay_home``).
        self._owed: dict[int, bytes] = {}
        self.defer_home = True
        # The layout (what reaching the data needs: size, clusters, extent
        # root, flags) of each inode as last committed: an fdatasync that
        # finds it unchanged needs a flush, not a commit (ext4's fdatasync
        # after an overwrite that moved only the timestamps).
        self._committed_layout: dict[int, tuple] = {}
        self._live: set[_Op] = set()
        # read-only remount: writers finish before the slot is given back
        self._writers = 0
        self._freeze = False
        # check that every allocation was reserved first (tests turn it on)
        self.strict = os.environ.get("REPLFS_FS_STRICT") == "1"
        self.cache.on_dirty = self._on_dirty
        self.alloc.on_alloc = self._on_alloc
        # Shared by two nodes (cluster locks): the global bitmap only under
        # its lock, the journal lock held for the mount's life.
        self.clustered = bool(getattr(locks, "clustered", False))
        self.alloc.global_locked = self._global_locked
        self.alloc.others_reserved = self._others_reserved
        if self.clustered:
            self.alloc.global_cached = lambda: self.locks.cached_ex(("bitmap", 0))
        self._life = AsyncExitStack()
        # ``async kernel_hook(ino)``: another node is about to change inode
        # ``ino`` (its lock goes to NL here): the FUSE layer drops the
        # kernel's cached pages and attributes of it.
        self.kernel_hook = None
        # ``on_fail(why)``: called once when the filesystem latches (a shared
        # mount's node then fences itself: its EX locks cover changes that
        # never reached the disk, and only the other node's recovery of
        # this slot can free them)
        self.on_fail = None
        # Nodes declared dead whose slots are not recovered yet: no lock is
        # used until then (their journals may hold newer blocks).
        self.dead_nodes: set[int] = set()
        self._recovered = trio.Event()
        self.recoveries: list[tuple[int, int, float]] = []   # (node, slot, seconds)
        self._handles: dict[int, _Handle] = {}
        # References that keep an unlinked inode alive (as an orphan): open
        # handles, and the kernel's lookup references (``hold``/``unhold``).
        self._opens: dict[int, int] = {}
        self._next_fh = 1
        self.failed: str | None = None
        self.commit_threshold = max(16, self.journal.capacity() // 4)
        self.mounted = False
        self.readonly = False
        self.recovered_slots: list[int] = []
        self._bitmap_stale = False

    # ------------------------------------------------------------ mount

    @classmethod
    async def mount(cls, dev, slot: int | None = 0, *, locks=None, node: int = 0,
                    recover_dirty_slots: bool = True, readonly: bool = False) -> "Filesystem":
        """Open the volume in ``slot`` (None: a shared mount chooses its
        slot under the super lock; one node alone takes slot 0).  A dirty
        journal in that slot is replayed first.  With ``recover_dirty_slots`` (single-node use) the
        journals of other slots left dirty are replayed too; a cluster
        mount passes False and recovers a slot only when its node is dead.

        ``readonly`` writes nothing at all, not even the slot map; a
        volume whose journals need recovery is refused then, since the
        replay would have to write."""
        sb = await read_superblock(dev)
        if sb.feat_incompat & ~F.FEATURE_INCOMPAT_KNOWN:
            raise OSError(errno.EINVAL, "volume uses features this replfs does not know")
        pick = slot is None
        if pick:
            slot = 0            # a shared mount chooses under the super lock
        elif not 0 <= slot < sb.slot_count:
            raise OSError(errno.EINVAL, f"slot {slot} out of range (volume has {sb.slot_count})")
        fs = cls(dev, sb, slot, locks or LocalLockManager(), node)
        fs.locks.set_downconvert_hook(fs.downconvert)
        if fs.clustered:
            fs.locks.set_refresh_hook(fs._forget)
            if readonly:
                raise OSError(errno.EINVAL, "read-only mounts of a shared volume are not "
                              "supported yet")
            await fs._mount_shared(pick)
            return fs
        if readonly:
            dirty = [s for s in range(sb.slot_count)
                     if (await J.journal_state(dev, sb, s)).flags & F.JSB_DIRTY]
            if dirty:
                raise OSError(errno.EROFS, "journal of slot(s) "
                              f"{', '.join(map(str, dirty))} needs recovery: mount read-write "
                              "once, or run fsck.replfs -y, before a read-only mount")
            await fs.alloc.load()
            fs.readonly = True
            fs.mounted = True
            return fs
        own_dirty = (await J.journal_state(dev, sb, slot)).flags & F.JSB_DIRTY
        if own_dirty:
            await J.replay(dev, sb, slot)
        await fs.alloc.load()
        await fs.journal.open()
        fs.mounted = True
        await fs._take_slot()
        if own_dirty:
            fs.recovered_slots.append(slot)
        if recover_dirty_slots:
            for other in range(sb.slot_count):
                if other != slot and (await J.journal_state(dev, sb, other)).flags & F.JSB_DIRTY:
                    await fs.recover_slot(other)
        await fs.sync()
        return fs

    def _set_slot(self, slot: int) -> None:
        self.slot = slot
        self.alloc.slot = slot
        self.alloc.local_blk = self.sb.slots[slot].localalloc_blk
        self.journal = J.Journal(self.dev, self.sb, slot)
        self.orphan_ino = self.sb.slots[slot].orphan_ino
        self.commit_threshold = max(16, self.journal.capacity() // 4)

    def _slot_candidates(self, sm: F.SlotMap) -> list[int]:
        """Slots a mount of this node may take, best first: the one the
        slot map still gives to this node (an earlier mount of it died; its
        journal is replayed now), then the free ones.  The first whose
        journal lock is free wins."""
        mine = [s for s, (state, owner, _) in enumerate(sm.slots)
                if state == F.SLOT_IN_USE and owner == self.node]
        free = [s for s, (state, _, _) in enumerate(sm.slots) if state == F.SLOT_FREE]
        return mine + free

    async def _mount_shared(self, pick: bool) -> None:
        """Mount with cluster locks.  Under the super lock: choose the slot
        (``pick``; two nodes mounting at once cannot choose the same one),
        take the slot's journal lock for the mount's life, replay our own
        journal if it is dirty, open it and mark the slot in use; then free
        the slot's leftover orphans."""
        sb = self.sb
        stale: list[int] = []
        stale_windows: list = []
        try:
            async with self._op(internal=True):
                await self._take(("super", 0), EX, "super")
                sm = await self.cache.get(sb.slotmap_blk, "slotmap", "slotmap")
                # The slot's journal lock, tried without waiting: a live
                # mount holds its slot's for its whole life.
                for cand in (self._slot_candidates(sm) if pick else [self.slot]):
                    jl = await self.locks.journal_lock(cand, wait=False)
                    if jl is not None:
                        break
                else:
                    raise OSError(errno.EUSERS, f"no node slot of the volume is free (all "
                                  f"{len(sm.slots)} in use; mkfs.replfs -N sets how many "
                                  "nodes may mount it at once)")
                self._life.push_async_callback(jl.unlock)
                if pick:
                    self._set_slot(cand)
                slot = self.slot
                # OCFS2's mark_dead_nodes: a slot in use whose journal lock
                # is free has no live mount -- its node died while no other
                # node was mounted to recover it.  Recover it now, under
                # the super lock, before reading anything it may have
                # changed.  (A node that dies after this is recovered
                # through node_dead/recover_node.)
                for other, (state, owner, _) in enumerate(sm.slots):
                    if other == slot or state != F.SLOT_IN_USE:
                        continue
                    ojl = await self.locks.journal_lock(other, wait=False)
                    if ojl is not None:
                        log.warning("slot %d (node %d) is in use but has no live mount: "
                                    "recovering it", other, owner)
                        await self._recover_slot_held(other, ojl, stale_windows)
                        stale.append(other)
                own_dirty = (await J.journal_state(self.dev, sb, slot)).flags & F.JSB_DIRTY
                if own_dirty:
                    async with self._commit_lock:
                        await J.replay(self.dev, sb, slot)
                    self.cache.drop_clean()
                    self.recovered_slots.append(slot)
                await self.alloc.load()
                self._bitmap_stale = True    # read without its lock: again under it
                await self.journal.open()
                self.mounted = True
                await self._mark_slot(slot, in_use=True)
            if stale:
                self.recovered_slots.extend(stale)
                await self._finish_recovery(stale, stale_windows)
            await self._recover_orphans(slot, keep=set(self._opens))
            await self.sync()
        except BaseException:
            with trio.CancelScope(shield=True):
                await self._life.aclose()
                # the locks taken so far go back, after what was changed
                # under them is written back (a failed filesystem keeps
                # them: see downconvert)
                with contextlib.suppress(Exception):
                    await self.locks.drop_all()
            raise

    # ------------------------------------------------------------ node death

    def node_dead(self, node: int) -> None:
        """The cluster stack declared ``node`` dead.  Called before the
        lock manager may grant anything the dead node held: from now until
        its slots are recovered, every lock taken here waits (before it is
        asked for and again once granted), so nobody reads a block older
        than what the dead node's journal holds."""
        if not self.clustered or node == self.node:
            return
        if not self.dead_nodes:
            self._recovered = trio.Event()
        self.dead_nodes.add(node)

    async def _wait_recovery(self, op: _Op) -> None:
        while self.dead_nodes and not op.recovery:
            await self._recovered.wait()

    async def recover_node(self, node: int) -> list[int]:
        """Recover the slots a dead node held, while mounted (OCFS2's
        order): under the super lock, for each of its slots take the
        slot's journal lock (granted once the lock manager has recovered:
        a live mount keeps it), replay the journal if dirty, take the
        slot's allocation window out and mark the slot free; then let
        operations go on, and afterwards give the window back to the
        global bitmap and free the slot's orphans."""
        t0 = trio.current_time()
        windows: list[tuple[int, int, bytearray]] = []
        slots: list[int] = []
        async with self._op(internal=True) as op:
            op.recovery = True
            await self._take(("super", 0), EX, "super")
            sm = await self.cache.get(self.sb.slotmap_blk, "slotmap", "slotmap")
            slots = [s for s, (state, owner, _) in enumerate(sm.slots)
                     if state == F.SLOT_IN_USE and owner == node and s != self.slot]
            for s in slots:
                jl = await self.locks.journal_lock(s, wait=True)
                await self._recover_slot_held(s, jl, windows)
            await self._commit()
        self.dead_nodes.discard(node)
        if not self.dead_nodes:
            self._recovered.set()
        await self._finish_recovery(slots, windows)
        for s in slots:
            self.recoveries.append((node, s, trio.current_time() - t0))
            log.warning("recovered slot %d of dead node %d in %.3f s", s, node,
                        trio.current_time() - t0)
        return slots

    async def _recover_slot_held(self, s: int, jl, windows: list) -> None:
        """The part of a dead slot's recovery done under the super lock and
        the slot's journal lock ``jl`` (released here): replay the journal
        if dirty, take the allocation window out (into ``windows``), mark
        the slot free."""
        try:
            if (await J.journal_state(self.dev, self.sb, s)).flags & F.JSB_DIRTY:
                async with self._commit_lock:
                    await J.replay(self.dev, self.sb, s)
                # blocks this node cached are under its own locks, which
                # the dead node did not hold; but the slot map and the
                # dead slot's own blocks may have moved
                self.cache.drop_clean()
            la = await self.cache.get(self.sb.slots[s].localalloc_blk, "local", ("local", s))
            if la.length:
                windows.append((la.start, la.length, bytearray(la.bitmap)))
            la.start = la.length = 0
            la.bitmap = bytearray()
            self.cache.mark(la.blkno, la)
            await self._mark_slot(s, in_use=False)
        finally:
            with trio.CancelScope(shield=True):
                await jl.unlock()

    async def _finish_recovery(self, slots: list[int], windows: list) -> None:
        """After the slots are free: their windows back to the global
        bitmap, then their orphans (each through the open lock)."""
        if windows:
            async with self._op(internal=True):
                await self._take(("bitmap", 0), EX, "bitmap")
                for start, length, bitmap in windows:
                    for i in range(length):
                        if not bitmap[i >> 3] & (1 << (i & 7)):
                            self.alloc._mark_global(start + i, 1, False)
        for s in slots:
            await self._recover_orphans(s)
        await self.sync()

    async def recover_slot(self, slot: int) -> None:
        """Replay a (dead) slot's journal, return its allocation window,
        mark it free, then free its orphans (OCFS2's order: journal,
        local alloc, slot map, and the orphans after, each orphan its own
        operation)."""
        async with self._op(internal=True):
            await self._take(("super", 0), EX, "super")
            await self._take(("bitmap", 0), EX, "bitmap")
            await self._commit()
            async with self._commit_lock:
                await J.replay(self.dev, self.sb, slot)
            self.cache.drop_clean()
            await self.alloc.load()
            la = await self.cache.get(self.sb.slots[slot].localalloc_blk, "local", "local")
            for i in range(la.length):
                if not la.test(i):
                    self.alloc._mark_global(la.start + i, 1, False)
            la.start = la.length = 0
            la.bitmap = bytearray()
            self.cache.mark(la.blkno, la)
            await self._mark_slot(slot, in_use=False)
        await self._recover_orphans(slot)
        self.recovered_slots.append(slot)
        await self.sync()

    async def _recover_orphans(self, slot: int, keep=()) -> None:
        """Free the orphans of ``slot`` (inodes unlinked while in use),
        except those in ``keep`` (still in use here).  Each orphan is one
        operation: the inode's lock, then the orphan directory's."""
        od_ino = self.sb.slots[slot].orphan_ino
        async with (self._op(reading=True, internal=True),
                    self._locked(od_ino, shared=True, level="orphan")):
            od = await self._inode(od_ino)
            victims = [(e.name, e.ino) async for e in self.dirs.entries(od) if e.ino not in keep]
        if self.clustered:
            for _, ino in victims:
                await self._try_wipe(ino, od_ino)
            return
        for name, ino in victims:
            async with self._op(internal=True):
                await self._take(("inode", ino), EX, "inode")
                await self._take(("inode", od_ino), EX, "orphan")
                od = await self._inode(od_ino)
                e = await self.dirs.lookup(od, name)
                if e is None or e.ino != ino:
                    continue            # gone meanwhile
                inode = await self._inode(ino)
                if inode.nlink == 0 and await self._too_big_to_free_at_once(inode):
                    await self._truncate(inode, 0)     # in steps, still parked
                await self.dirs.remove(od, name)
                if inode.nlink == 0:
                    await self._destroy(inode)

    async def remount(self, readonly: bool) -> None:
        """``mount -o remount,ro|rw``.  Going read-only lets running
        changes finish (new ones get EROFS), commits, frees the orphans
        nothing holds, returns the allocation window, gives the slot back
        and closes the journal clean, so a crash while read-only needs no
        recovery.  Orphans still open stay in the slot's orphan directory;
        a later read-write mount or remount of this slot frees them.
        Going read-write takes the slot and opens the journal again."""
        if readonly == self.readonly:
            return
        if self.failed is not None:
            raise FilesystemFailed(errno.EROFS, f"filesystem failed, read-only: {self.failed}")
        if readonly:
            self._freeze = True
            try:
                while self._writers:
                    await self._tx_lot.park()
                await self._leave_slot(keep=set(self._opens))
                self.readonly = True
            finally:
                self._freeze = False
            return
        async with self._commit_lock:
            if (await J.journal_state(self.dev, self.sb, self.slot)).flags & F.JSB_DIRTY:
                raise OSError(errno.EBUSY, f"the journal of slot {self.slot} is dirty "
                              "(another mount used it?); unmount and mount again")
            self.cache.drop_clean()
            await self.alloc.load()
            await self.journal.open()
            self.readonly = False
        await self._take_slot()
        await self.sync()

    async def unmount(self) -> None:
        if not self.mounted:
            return
        if self.failed is None and not self.readonly:
            # Nothing holds an inode once the mount goes away: every orphan
            # of this slot (unlinked while open or while the kernel still
            # knew it) is freed.
            self._opens.clear()
            self._handles.clear()
            if self.clustered:
                await self.locks.open_unpin_all()
                await self.orphan_scan()
            await self._leave_slot(keep=())
        self.mounted = False
        if self.clustered and self.failed is None:
            # everything is written and checkpointed: the locks go back
            await self._life.aclose()
            await self.locks.drop_all()

    async def _mark_slot(self, slot: int, *, in_use: bool) -> None:
        """Record ``slot`` in the slot map as in use by this node (a new
        mount generation) or free; inside an operation holding the super
        lock."""
        sm = await self.cache.get(self.sb.slotmap_blk, "slotmap", "slotmap")
        _, _, gen = sm.slots[slot]
        sm.slots[slot] = (F.SLOT_IN_USE, self.node, gen + 1) if in_use else (F.SLOT_FREE, 0, gen)
        self.cache.mark(sm.blkno, sm)

    async def _take_slot(self) -> None:
        """Start writing in our slot (mount, remount rw): mark it in use
        and free the orphans left in it that nothing here holds (left by a
        crash, or by a read-only remount while they were open)."""
        async with self._op(internal=True):
            await self._take(("super", 0), EX, "super")
            await self._mark_slot(self.slot, in_use=True)
        await self._recover_orphans(self.slot, keep=set(self._opens))

    async def _leave_slot(self, keep) -> None:
        """Stop writing in our slot (unmount, remount ro): free the orphans
        not in ``keep``, return the window, mark the slot free, commit and
        close the journal clean."""
        await self._recover_orphans(self.slot, keep=keep)
        async with self._op(internal=True):
            await self._take(("super", 0), EX, "super")
            await self._take(("bitmap", 0), EX, "bitmap")
            await self._commit()        # pending frees, under the bitmap lock
            self.alloc.flush_deferred()
            self.alloc.release_window()
            await self._mark_slot(self.slot, in_use=False)
        await self._commit()
        async with self._commit_lock:
            await self._pay_home_locked()
            await self.journal.close()

    # ------------------------------------------------------------ plumbing

    def _fail(self, why: str) -> None:
        if self.failed is None:
            log.error("filesystem error, now read-only until remounted (the next mount "
                      "replays the journal): %s", why)
            self.failed = why
            self.cache.discard_transaction()
            self.alloc.pending = []
            if self.on_fail is not None:
                self.on_fail(why)

    # --- the running transaction

    def _on_dirty(self) -> None:
        """Every change to a cached block: the operation joins the running
        transaction (if it has not reserved already)."""
        op = _current_op.get()
        if op is None or op.fs is not self:
            return      # mount, recovery and commit work outside operations
        if op.lean and self.strict:
            raise LockOrderError("a lean (read-only) operation changed a cached block")
        op.dirtied = True
        self._enter(op)

    def _enter(self, op: _Op) -> None:
        """``op`` is in the running transaction: a commit waits for it, and
        cancellation no longer reaches it."""
        if op.scope is not None and not op.scope.shield:
            op.scope.shield = True      # (a set recalculates every task's cancel state)
        if not op.active:
            op.active = True
            self._active += 1

    def _others_reserved(self) -> int:
        if not self.clustered:
            return 0            # a single node refills its window whenever it must
        op = _current_op.get()
        mine = op.reserved if op is not None and op.fs is self else 0
        return self.alloc.reserved - mine

    def _on_alloc(self, n: int) -> None:
        op = _current_op.get()
        if op is None or op.fs is not self:
            return
        if self.strict and not op.reserving:
            raise LockOrderError("allocation without a reservation (a concurrent commit "
                                 "could hand the cluster out before its free is durable)")
        used = min(n, op.reserved)
        op.reserved -= used
        self.alloc.reserved -= used

    async def _join(self, op: _Op) -> None:
        """Enter the running transaction before reserving: never while a
        commit is draining it or writing it (frees it applies must not be
        handed out before they are durable)."""
        while self._closing:
            await self._tx_lot.park()
        self._enter(op)

    def _settle(self, op: _Op) -> None:
        """``op`` is at a consistent point: a commit may take its changes."""
        op.reserving = False
        if op.active:
            op.active = False
            self._active -= 1
            if not self._active:
                self._tx_lot.unpark_all()

    def _global_locked(self, exclusive: bool) -> bool:
        if not self.clustered:
            return True
        op = _current_op.get()
        if op is None or op.fs is not self:
            return False
        m = op.held.get(("bitmap", 0))
        return m is not None and (m == EX or not exclusive)

    async def _lock_for_frees(self) -> None:
        """On a shared volume, an operation that may free clusters outside
        this slot's window takes the global bitmap's lock before it
        changes anything: the commit that carries the frees then applies
        them to the global bitmap under the lock (still this node's, a
        hand-over commits first), in the same transaction -- nothing
        waits in memory for a lock a crash would lose."""
        if self.clustered:
            await self._take(("bitmap", 0), EX, "bitmap")

    def _avail(self) -> int:
        """Clusters this operation may still reserve."""
        op = _current_op.get()
        mine = op.reserved if op is not None and op.fs is self else 0
        return self.alloc.free_clusters() - (self.alloc.reserved - mine)

    async def _try_reserve(self, n: int) -> bool:
        """Reserve ``n`` clusters for the current operation (in all, not
        more), committing deferred frees if that makes room.  Joins the
        transaction: the operation may allocate afterwards, and takes no
        lock any more."""
        op = _current_op.get()
        if op is None or op.fs is not self:
            return self.alloc.free_clusters() >= n
        while True:
            if self.clustered and ("bitmap", 0) not in op.held and self._avail() < n:
                # The window is short: the global bitmap's lock, taken at a
                # consistent point of the operation and before it joins the
                # transaction again (it is the last lock in the order).
                if op.active:
                    await self._commit()
                await self._take(("bitmap", 0), EX, "bitmap")
            if not op.active:
                await self._join(op)
            if self._avail() < n and self.alloc.pending:
                await self._commit()
                await self._join(op)
            if self._avail() >= n or not self.clustered or ("bitmap", 0) in op.held:
                break
            # Joining (or committing) waited, and other operations of this
            # node took the window meanwhile: the window alone is short
            # again, so the global bitmap's lock after all (found by the
            # soak: ENOSPC on a volume 43 % free).
        if self._avail() < n:
            return False
        if n > op.reserved:
            self.alloc.reserved += n - op.reserved
            op.reserved = n
        op.reserving = True
        return True

    async def _reserve(self, n: int) -> None:
        if not await self._try_reserve(n):
            raise OSError(errno.ENOSPC, "no space left on device")

    @asynccontextmanager
    async def _op(self, *, reading: bool = False, internal: bool = False, lean: bool = False):
        """One operation.  ``reading`` operations go on after the
        filesystem latched read-only: they see what is committed (the
        latch dropped everything uncommitted from memory).  Nested calls
        join the operation already running in this task.

        ``lean``: a reading operation that never changes anything (getattr,
        read, lookup, ...): it runs without a cancel scope of its own,
        which only an operation that may join the transaction needs (to
        shield itself from then on); REPLFS_FS_STRICT makes a lean
        operation that changes something fail loudly."""
        cur = _current_op.get()
        if cur is not None and cur.fs is self:
            yield cur
            return
        if self.failed is not None and not reading:
            raise FilesystemFailed(errno.EROFS, f"filesystem failed, read-only: {self.failed}")
        # a request cancelled already (FUSE INTERRUPT) does not start
        await trio.lowlevel.checkpoint_if_cancelled()
        counted = not reading and not internal
        if counted:
            if self._freeze:
                raise OSError(errno.EROFS, "read-only mount")
            self._writers += 1
        op = _Op(self, reading)
        op.lean = lean
        token = _current_op.set(op)
        self._live.add(op)
        try:
            if lean:
                try:
                    async with op.stack:
                        yield op
                finally:
                    self._settle(op)
                return
            with trio.CancelScope() as op.scope:
                async with op.stack:
                    try:
                        yield op
                    except BaseException as e:
                        self._settle(op)
                        if op.dirtied:
                            if self.readonly:
                                self.cache.discard_transaction()
                                self.alloc.pending = []
                            else:
                                self._fail(f"{type(e).__name__}: {e} in the middle of an update")
                        raise
                    self._settle(op)
                    if self.readonly and op.dirtied:
                        # Nothing may reach the disk: undo what the operation
                        # did in memory and refuse it.
                        self.cache.discard_transaction()
                        self.alloc.pending = []
                        self.cache.drop_clean()
                        await self.alloc.load()
                        raise OSError(errno.EROFS, "read-only mount")
        finally:
            self.alloc.reserved -= op.reserved
            op.reserved = 0
            self._live.discard(op)
            _current_op.reset(token)
            if counted:
                self._writers -= 1
                if not self._writers:
                    self._tx_lot.unpark_all()
        # what the operation leaves behind runs under its shield too
        if op.after or (len(self.cache.dirty) >= self.commit_threshold
                        and self.failed is None):
            await self._after_op(op)

    async def _after_op(self, op: _Op) -> None:
        with trio.CancelScope(shield=op.scope is not None and op.scope.shield):
            if len(self.cache.dirty) >= self.commit_threshold and self.failed is None:
                await self._commit()
            for ino in op.after:
                await self._try_wipe(ino)

    # --- locks

    def _cur(self) -> _Op:
        op = _current_op.get()
        if op is None or op.fs is not self:
            raise RuntimeError("a lock taken outside an operation")
        return op

    def _wanted(self, op: _Op, res: Res, mode: Mode) -> bool:
        """Does ``op`` still have to take ``res``?  A lock it holds is not
        taken again (the managers' locks are not re-entrant); a stronger
        mode than held would be an upgrade inside an operation, which two
        nodes can deadlock on."""
        held = op.held.get(res)
        if held is None:
            return True
        if mode == EX and held != EX:
            raise LockOrderError(f"{res} held {held.name}, wanted {mode.name} in one operation")
        return False

    async def _take(self, res: Res, mode: Mode, level: str) -> None:
        """Take ``res`` for the rest of the current operation."""
        op = self._cur()
        if not self._wanted(op, res, mode):
            return
        op.order.check(level, in_transaction=op.active)
        # (not for the super lock: recovery takes it, and who holds it
        # -- mount, unmount -- must not wait for recovery with it)
        waits = res[0] != "super" and ("super", 0) not in op.held
        if res[0] == "super":
            await self._wait_recovery(op)       # before it, not with it held
        if waits:
            await self._wait_recovery(op)
        await op.stack.enter_async_context(self.locks.hold(res, mode))
        op.held[res] = mode
        if waits:
            await self._wait_recovery(op)
        if res == ("bitmap", 0):
            if self._bitmap_stale:
                self._bitmap_stale = False
                await self.alloc.load()
            if mode == EX and self.alloc.deferred:
                self.alloc.flush_deferred()

    @asynccontextmanager
    async def _locked(self, *inos: int, shared: bool = False, level: str = "inode",
                      ordered: bool = False):
        """Hold inode locks inside the current operation: PR (``shared``)
        or EX, taken in ascending inode order unless the caller gives the
        order (``ordered``: directories ancestor first)."""
        op = self._cur()
        mode = PR if shared else EX
        todo = []
        for ino in inos:
            res = ("inode", ino)
            if res not in [("inode", t) for t in todo] and self._wanted(op, res, mode):
                todo.append(ino)
        if not ordered:
            todo.sort()
        if not todo:
            yield
            return
        op.order.check(level, in_transaction=op.active)
        waits = ("super", 0) not in op.held
        if len(todo) == 1:
            # one lock (most operations): no exit stack
            res = ("inode", todo[0])
            try:
                if waits:
                    await self._wait_recovery(op)
                async with self.locks.hold(res, mode):
                    op.held[res] = mode
                    try:
                        if waits:
                            await self._wait_recovery(op)
                        yield
                    finally:
                        op.held.pop(res, None)
            finally:
                op.order.release(level)
            return
        try:
            async with AsyncExitStack() as stack:
                if waits:
                    await self._wait_recovery(op)
                for ino in todo:
                    await stack.enter_async_context(self.locks.hold(("inode", ino), mode))
                    op.held[("inode", ino)] = mode
                    stack.callback(op.held.pop, ("inode", ino), None)
                if waits:
                    await self._wait_recovery(op)
                yield
        finally:
            op.order.release(level)

    # --- commit

    async def _commit(self) -> bool:
        """Commit the running transaction.  Called inside an operation, at
        a consistent point of it (its changes so far go with the commit),
        or outside any.  True if this call wrote a transaction: then every
        device write completed before the call is durable (the journal
        commit flushes before its record, and after it)."""
        op = _current_op.get()
        if op is not None and op.fs is self:
            self._settle(op)
        async with self._commit_lock:
            self._closing += 1
            try:
                while self._active:
                    await self._tx_lot.park()
                return await self._commit_now()
            finally:
                self._closing -= 1
                self._tx_lot.unpark_all()

    async def _commit_now(self) -> bool:
        if self.failed is not None:
            # what operations still in flight changed after the latch
            self.cache.discard_transaction()
            self.alloc.pending = []
            raise FilesystemFailed(errno.EROFS, f"filesystem failed, read-only: {self.failed}")
        if not self.cache.dirty and not self.alloc.pending:
            return False
        if self.readonly or not self.mounted:
            # a read-only remount closed the journal clean: nothing more
            # may reach the disk (what an operation still changed is lost
            # with it, as on a read-only mount)
            self.cache.discard_transaction()
            self.alloc.pending = []
            return False
        # Once the transaction is taken it is written whole: a cancelled
        # caller (an interrupted fsync, the commit loop at unmount) must
        # not leave memory ahead of the disk and latch the filesystem.
        with trio.CancelScope(shield=True):
            await self._commit_taken()
        return True

    async def _commit_taken(self) -> None:
        try:
            frees = bool(self.alloc.pending)
            self.alloc.apply_pending()
            layouts = {b: _layout(o) for b, o in self.cache.dirty.items()
                       if type(o) is F.Inode}
            images, revokes = self.cache.take_transaction()
            # What the operations changed so far leaves with this
            # transaction (and a commit that fails latches by itself): an
            # error one raises after a mid-operation commit -- ENOSPC once
            # committing the deferred frees did not make enough room --
            # leaves nothing half done in memory and must not latch.
            for o in self._live:
                o.dirtied = False
            self.cache.homing.update(images)
            # The home writes the last commit owes, but for blocks this
            # one logs again (its own home write replaces them) -- unless
            # the log wraps: then the checkpoint retires the record that
            # holds them before this one is durable, so every one of them
            # lands first, those logged again included.
            prev, self._owed = self._owed, {}
            owed = {b: img for b, img in prev.items() if b not in images}
            if prev and not self.journal.fits(len(images), len(revokes)):
                await self._write_home(prev)
                owed = {}
            # Operations may reserve (and allocate) again while the journal
            # and home writes go on -- unless this commit frees clusters:
            # those must not be handed out before the free is durable, nor
            # before the last home write of a freed block (an inode's
            # tombstone) has landed, or it would land on the new data; so
            # such a commit also writes its own home blocks before it ends.
            reopen = not frees
            if reopen:
                self._closing -= 1
                self._tx_lot.unpark_all()
            try:
                if owed:
                    # (the older images are in the log already: they may
                    # land in any order with this record)
                    await _together(self.journal.commit(images, revokes),
                                    self._write_home(owed))
                else:
                    await self.journal.commit(images, revokes)
                if len(self._committed_layout) > 65536:
                    self._committed_layout.clear()      # (bounded; a miss only commits)
                self._committed_layout.update(layouts)
                if frees or not self.defer_home:
                    await self._write_home(images)
                else:
                    self._owed = images
            finally:
                if reopen:
                    self._closing += 1
        except BaseException as e:
            # Memory and disk no longer agree (the transaction may or may
            # not have reached the journal; or a block could not even be
            # encoded).  Latch read-only: what is committed keeps being
            # served, and only a replay at the next mount can tell what
            # survived.  Whatever the cause, the caller sees an OSError,
            # never an exception that would take the mount down.
            self._fail(f"commit failed: {type(e).__name__}: {e}")
            if not isinstance(e, Exception):
                raise               # cancellation and the like
            raise OSError(errno.EIO, f"journal commit failed: {e}") from e

    async def _write_home(self, images: dict[int, bytes]) -> None:
        """Write committed images to their home blocks, runs of adjacent
        blocks coalesced, all in flight at once (the journal holds them:
        their order does not matter, and on a replicated resource each
        one is a network round trip)."""
        blks = sorted(images)
        runs = []
        i = 0
        while i < len(blks):
            j = i + 1
            while j < len(blks) and blks[j] == blks[j - 1] + 1 and j - i < 256:
                j += 1
            runs.append((blks[i] * self.bs, b"".join(images[b] for b in blks[i:j])))
            i = j
        await _together(*(self.dev.write(off, data) for off, data in runs))
        # (only once written: after a failure, reads keep being served
        # the committed images, not the older homes)
        for b, img in images.items():
            if self.cache.homing.get(b) is img:
                del self.cache.homing[b]

    async def _pay_home_locked(self) -> None:
        """The owed home writes, now (the commit lock held): before a
        checkpoint retires the log, before the journal closes, before a
        lock goes to a node that reads the blocks from their homes."""
        owed, self._owed = self._owed, {}
        if not owed or self.failed is not None:
            return      # (failed: the next mount's replay writes them)
        try:
            with trio.CancelScope(shield=True):
                await self._write_home(owed)
        except Exception as e:
            self._fail(f"home write failed: {type(e).__name__}: {e}")
            raise OSError(errno.EIO, f"home write failed: {e}") from e

    async def pay_home(self) -> None:
        """Write the owed home blocks now (``sync`` does, and so the
        periodic commit: an idle mount's homes lack nothing of its log)."""
        if self._owed:
            async with self._commit_lock:
                await self._pay_home_locked()

    async def sync(self) -> None:
        """Commit, and write the home blocks (fsync does not wait for
        those: the journal holds them)."""
        async with self._op(internal=True):
            await self._commit()
        await self.pay_home()

    async def checkpoint(self) -> None:
        if self.readonly:
            return
        async with self._op():
            await self._commit()
            async with self._commit_lock:
                await self._pay_home_locked()
                await self.journal.checkpoint()

    async def commit_loop(self, interval: float = 5.0, *, task_status=trio.TASK_STATUS_IGNORED):
        """Background commit every ``interval`` seconds (run in a nursery)."""
        task_status.started()
        while True:
            await trio.sleep(interval)
            if self.failed is None and self.mounted:
                await self.sync()
                if self.alloc.deferred and not self.readonly:
                    await self.flush_frees()

    async def flush_frees(self) -> None:
        """Give clusters freed outside this slot's window back to the
        global bitmap (they wait for its lock; see Allocator.deferred)."""
        async with self._op(internal=True):
            await self._take(("bitmap", 0), EX, "bitmap")
        await self.sync()

    async def downconvert(self, res: Res, old: Mode, new: Mode) -> None:
        """Called by the lock manager before it gives up ``res`` from mode
        ``old`` to ``new`` for another node.

        * A lock held EX may cover changes: commit them, so their home
          blocks are written before another node reads them.
        * A lock going to NL (another node wants to change what it covers):
          retire this slot's log first (a checkpoint, as OCFS2 does):
          images left in it would be replayed over the other node's newer
          blocks if this slot were ever recovered.  Going from EX to PR the
          other node only reads, so the log may stay: a ping-pong of one
          writer and one reader never checkpoints (it is retired at the
          next hand-over to NL, or by the journal filling up).
        * Going to NL: forget what the lock covered.

        Runs outside every operation and takes no lock; the commit waits
        only for operations already in the transaction, which wait for no
        lock."""
        token = _current_op.set(None)
        try:
            if self.failed is not None and (old == EX or (new == NL and self.journal.head != 1)):
                # what was changed under the lock never reached the disk,
                # or the log still holds images: the other node must wait
                # until this one is fenced and its journal recovered
                # (LockCache keeps the lock)
                raise FilesystemFailed(errno.EIO, f"filesystem failed: {self.failed}")
            if new == NL and res[0] == "inode" and self.kernel_hook is not None:
                # first, while the lock still covers them: mmap pages the
                # kernel writes back on invalidation reach the disk now
                await self.kernel_hook(res[1])
            if self.mounted and not self.readonly:
                if old == EX:
                    await self._commit()
                    # the next holder reads these blocks from their homes
                    await self.pay_home()
                if new == NL:
                    async with self._commit_lock:
                        await self._pay_home_locked()
                        await self.journal.checkpoint()
            if new == NL:
                self._forget(res)
        finally:
            _current_op.reset(token)

    def _forget(self, res: Res) -> None:
        kind, ident = res
        if kind == "inode":
            self.cache.drop_owner(ident)
            if ident not in self.cache.dirty:
                self.cache.forget(ident)
        elif kind == "bitmap":
            self.cache.drop_owner("bitmap")
            self._bitmap_stale = True
        elif kind == "super":
            self.cache.drop_owner("slotmap")

    async def _inode(self, ino: int) -> F.Inode:
        if not isinstance(ino, int) or ino <= 0 or ino >= self.sb.total_blocks:
            raise OSError(errno.ENOENT, f"no inode {ino}")
        inode = await self.cache.get(ino, "inode", ino)
        if not inode.flags & F.INODE_FLAG_VALID:
            raise OSError(errno.ESTALE, f"inode {ino} was deleted")
        if self.wide_time and not inode.flags & F.INODE_FLAG_WIDE_TIME:
            # written in the wide encoding whenever it is next written
            inode.flags |= F.INODE_FLAG_WIDE_TIME
        return inode

    async def _dir(self, ino: int) -> F.Inode:
        d = await self._inode(ino)
        if not d.is_dir:
            raise OSError(errno.ENOTDIR, "not a directory")
        return d

    def _dirty(self, inode: F.Inode) -> None:
        self.cache.mark(inode.ino, inode)

    def _attr(self, i: F.Inode) -> Attr:
        return Attr(i.ino, i.mode, i.nlink, i.uid, i.gid, i.rdev, i.size,
                    i.clusters * (self.cs // 512), self.cs, i.atime_ns, i.mtime_ns,
                    i.ctime_ns, i.generation)

    def _clamp_time(self, ns: int) -> int:
        return min(max(ns, self.time_min), self.time_max)

    def _now(self) -> int:
        # a clock set past what the volume stores must not break commits
        return self._clamp_time(_now())

    def _atime_due(self, inode: F.Inode, now: int) -> bool:
        """Should a read of ``inode`` now write its atime?  Never more
        often than once per atime quantum (OCFS2's rule: an atime update
        is a metadata write, and on a shared volume an exclusive lock, so
        files read on both nodes must not bounce for it); relatime further
        only when the atime is not newer than mtime/ctime or is a day old."""
        if self.atime_policy == "noatime" or self.readonly or self.failed is not None:
            return False
        if inode.is_dir and self.nodiratime:
            return False
        if now - inode.atime_ns < self.atime_quantum_ns:
            return False
        if self.atime_policy == "strictatime":
            return True
        return (inode.atime_ns <= inode.mtime_ns or inode.atime_ns <= inode.ctime_ns
                or now - inode.atime_ns >= RELATIME_AGE_NS)

    async def _touch_atime(self, ino: int) -> None:
        """Update the atime of ``ino`` after a read, when due.  A separate
        short operation after the read, so the read itself never waits for
        an exclusive lock; a failure here is not the reader's."""
        cached = self.cache.objs.get(ino)
        if isinstance(cached, F.Inode) and not self._atime_due(cached, self._now()):
            return
        try:
            async with self._op(), self._locked(ino):
                inode = await self._inode(ino)
                now = self._now()
                if self._atime_due(inode, now):
                    inode.atime_ns = now
                    self._dirty(inode)
        except OSError as e:
            log.debug("atime update of inode %d skipped: %s", ino, e)

    def _new_inode(self, mode: int, uid: int, gid: int, rdev: int = 0) -> F.Inode:
        _check_id(uid, "uid")
        _check_id(gid, "gid")
        if not 0 <= rdev <= F.U64_MAX:
            raise OSError(errno.EINVAL, "device number out of range")
        cl, _ = self.alloc.alloc(1)
        now = self._now()
        flags = F.INODE_FLAG_VALID | (F.INODE_FLAG_WIDE_TIME if self.wide_time else 0)
        inode = F.Inode(cl << self.shift, mode=mode, uid=uid, gid=gid, nlink=1, flags=flags,
                        generation=random.getrandbits(32), atime_ns=now, mtime_ns=now,
                        ctime_ns=now, rdev=rdev)
        self.cache.new(inode.ino, inode, inode.ino)
        return inode

    async def _destroy(self, inode: F.Inode) -> None:
        """Free an inode and everything it owns."""
        exts = await self.ext.load(inode)
        if inode.is_dir:
            for _, p, n in exts:
                for b in range(p << self.shift, (p + n) << self.shift):
                    self.cache.forget(b)
        for _, p, n in exts:
            self.alloc.free(p, n)
        await self.ext.store(inode, [])
        if inode.xattr_blk:
            self.alloc.free(inode.xattr_blk >> self.shift, 1)
            self.cache.forget(inode.xattr_blk)
            inode.xattr_blk = 0
        self.alloc.free(inode.ino >> self.shift, 1)
        # A tombstone, not just a forgotten block: a stale inode number
        # (FUSE, NFS handle) must find an invalid inode, not the old one.
        inode.flags &= F.INODE_FLAG_WIDE_TIME   # the time encoding stays
        inode.nlink = 0
        self._dirty(inode)
        self._opens.pop(inode.ino, None)

    async def _too_big_to_free_at_once(self, inode: F.Inode) -> bool:
        if not stat.S_ISREG(inode.mode) or not inode.clusters:
            return False
        exts = await self.ext.load(inode)
        return self._chunk_cut(exts, 0) != 0

    async def _parks_as_orphan(self, inode: F.Inode) -> bool:
        """Will dropping the last link of ``inode`` go through the orphan
        directory (open here, or too big to free in one transaction)?"""
        if self.clustered:
            return True     # the other node may use it: only the open lock can tell
        return bool(self._opens.get(inode.ino)) or await self._too_big_to_free_at_once(inode)

    async def _orphan_need(self, inode: F.Inode) -> int:
        """Clusters that parking ``inode`` in the orphan directory may
        allocate when the operation drops its last link: reserved with the
        rest before the operation changes anything (a split of the orphan
        directory on a full volume must be refused, not latch)."""
        if (inode.nlink > 1 and not inode.is_dir) or not await self._parks_as_orphan(inode):
            return 0
        await self._take(("inode", self.orphan_ino), EX, "orphan")
        od = await self._inode(self.orphan_ino)
        name = b"%016x" % inode.ino
        await self.dirs.lookup(od, name)        # reserve_estimate follows this name
        return self.dirs.reserve_estimate(od, name)

    async def _drop_link(self, inode: F.Inode) -> None:
        """The last name of ``inode`` went away (nlink already 0).  On a
        shared volume it is always parked in this slot's orphan directory
        (its ``parent`` says which); the last node to stop using it frees
        it, once it gets the open lock EX (``_try_wipe``)."""
        in_use = bool(self._opens.get(inode.ino))
        if self.clustered:
            inode.flags |= F.INODE_FLAG_ORPHAN
            inode.parent = self.orphan_ino
            self._dirty(inode)
            od = await self._inode(self.orphan_ino)
            await self.dirs.insert(od, b"%016x" % inode.ino, inode.ino, F.ftype_of(inode.mode))
            if not in_use:
                self._cur().after.append(inode.ino)
            return
        if in_use or await self._too_big_to_free_at_once(inode):
            inode.flags |= F.INODE_FLAG_ORPHAN
            self._dirty(inode)
            od = await self._inode(self.orphan_ino)
            await self.dirs.insert(od, b"%016x" % inode.ino, inode.ino, F.ftype_of(inode.mode))
            if not in_use:
                # Parked and committed first: a crash while the data is
                # freed in steps leaves an orphan that recovery finishes.
                await self._commit()
                await self._truncate(inode, 0)
                await self._drop_orphan(inode)
        else:
            await self._destroy(inode)

    async def _try_wipe(self, ino: int, orphan_dir: int | None = None) -> bool:
        """Free unlinked inode ``ino`` if no node uses it any more (shared
        volume: the open lock is granted EX without waiting), from the
        orphan directory it was parked in.  True if it was freed."""
        if self.failed is not None or self.readonly or not self.mounted:
            return False
        async with self._op(internal=True):
            await self._take(("inode", ino), EX, "inode")
            try:
                inode = await self._inode(ino)
            except OSError:
                return False                    # freed already
            if inode.nlink != 0 or not inode.flags & F.INODE_FLAG_ORPHAN:
                return False
            orphan_dirs = {s.orphan_ino for s in self.sb.slots}
            od_ino = inode.parent if inode.parent in orphan_dirs else orphan_dir
            if od_ino is None or self._opens.get(ino):
                return False
            lk = await self.locks.open_try(ino)
            if lk is None:
                return False                    # the other node still uses it
            try:
                await self._take(("inode", od_ino), EX, "orphan")
                await self._lock_for_frees()
                od = await self._inode(od_ino)
                name = b"%016x" % ino
                e = await self.dirs.lookup(od, name)
                if e is None or e.ino != ino:
                    return False
                if await self._too_big_to_free_at_once(inode):
                    await self._truncate(inode, 0)     # in steps, still parked
                await self.dirs.remove(od, name)
                await self._destroy(inode)
                return True
            finally:
                with trio.CancelScope(shield=True):
                    await lk.unlock()

    async def orphan_scan(self) -> int:
        """Free the orphans of every slot that no node uses any more (the
        last user may have been a node that left or died).  Returns how
        many were freed."""
        freed = 0
        for info in self.sb.slots:
            async with (self._op(reading=True, internal=True),
                        self._locked(info.orphan_ino, shared=True, level="orphan")):
                od = await self._inode(info.orphan_ino)
                inos = [e.ino async for e in self.dirs.entries(od)]
            for ino in inos:
                if not self._opens.get(ino):
                    freed += await self._try_wipe(ino, info.orphan_ino)
        return freed

    async def _drop_orphan(self, inode: F.Inode) -> None:
        od = await self._inode(self.orphan_ino)
        await self.dirs.remove(od, b"%016x" % inode.ino)
        await self._destroy(inode)

    # ------------------------------------------------------------ names

    async def lookup(self, parent: int, name) -> Attr:
        """The child's attributes under its own lock, taken inside the
        directory's (parent before child, as every operation); ".." is
        looked up after the directory's lock is given up, since the
        parent of a directory comes before it in the lock order."""
        name = _check_name(name)
        if name == b"..":
            return await self.lookup_dotdot(parent)
        async with self._op(reading=True, lean=True), self._locked(parent, shared=True, level="dir"):
            if name == b".":
                # any inode, not only a directory: the kernel asks this to
                # turn a file handle (NFS export) back into an inode
                return self._attr(await self._inode(parent))
            d = await self._dir(parent)
            e = await self.dirs.lookup(d, name)
            if e is None:
                raise OSError(errno.ENOENT, "no such file or directory")
            async with self._locked(e.ino, shared=True):
                return self._attr(await self._inode(e.ino))

    async def getattr(self, ino: int) -> Attr:
        async with self._op(reading=True, lean=True), self._locked(ino, shared=True):
            return self._attr(await self._inode(ino))

    async def getattr_many(self, inos) -> list[Attr | None]:
        """getattr of each of ``inos`` in one operation (a readdir batch):
        each inode's lock is taken and given back in turn, as separate
        getattrs would; None for an inode gone meanwhile (ENOENT, ESTALE)."""
        out: list[Attr | None] = []
        async with self._op(reading=True, lean=True):
            for ino in inos:
                try:
                    async with self._locked(ino, shared=True):
                        out.append(self._attr(await self._inode(ino)))
                except OSError as e:
                    if e.errno not in (errno.ENOENT, errno.ESTALE):
                        raise
                    out.append(None)
        return out

    async def _make(self, parent: int, name, mode: int, uid: int, gid: int,
                    rdev: int = 0, data: bytes | None = None) -> F.Inode:
        name = _check_name(name)
        if name in (b".", b".."):
            raise OSError(errno.EEXIST, "file exists")
        d = await self._dir(parent)
        if d.nlink == 0:
            raise OSError(errno.ENOENT, "directory was removed")
        if await self.dirs.lookup(d, name) is not None:
            raise OSError(errno.EEXIST, "file exists")
        is_dir = stat.S_ISDIR(mode)
        if is_dir and d.nlink >= MAX_LINKS:
            raise OSError(errno.EMLINK, "too many links")
        need = 1 + self.dirs.reserve_estimate(d, name) + (3 if is_dir else 0)
        if data:
            need += -(-len(data) // self.cs) + 2
        await self._reserve(need)
        inode = self._new_inode(mode, uid, gid, rdev)
        if is_dir:
            inode.nlink = 2
            inode.parent = d.ino
            await self.dirs.init(inode)
            d.nlink += 1
        if data:
            await self._write_data(inode, 0, data)
        await self.dirs.insert(d, name, inode.ino, F.ftype_of(mode))
        d.mtime_ns = d.ctime_ns = self._now()
        self._dirty(d)
        return inode

    async def mknod(self, parent: int, name, mode: int, rdev: int = 0,
                    uid: int = 0, gid: int = 0) -> Attr:
        if stat.S_IFMT(mode) == 0:
            mode |= stat.S_IFREG
        if stat.S_ISDIR(mode) or stat.S_ISLNK(mode):
            raise OSError(errno.EINVAL, "use mkdir/symlink")
        async with self._op(), self._locked(parent, level="dir"):
            return self._attr(await self._make(parent, name, mode, uid, gid, rdev))

    async def mkdir(self, parent: int, name, mode: int = 0o755, uid: int = 0,
                    gid: int = 0) -> Attr:
        mode = stat.S_IMODE(mode) | stat.S_IFDIR
        async with self._op(), self._locked(parent, level="dir"):
            return self._attr(await self._make(parent, name, mode, uid, gid))

    async def create(self, parent: int, name, mode: int = 0o644, flags: int = os.O_RDWR,
                     uid: int = 0, gid: int = 0) -> tuple[int, Attr]:
        mode = stat.S_IMODE(mode) | stat.S_IFREG
        async with self._op(), self._locked(parent, level="dir"):
            inode = await self._make(parent, name, mode, uid, gid)
            return await self._open_handle(inode, flags), self._attr(inode)

    async def symlink(self, parent: int, name, target, uid: int = 0, gid: int = 0) -> Attr:
        if isinstance(target, str):
            target = os.fsencode(target)
        if not target:
            raise OSError(errno.ENOENT, "empty symlink target")
        if len(target) > MAX_SYMLINK:
            raise OSError(errno.ENAMETOOLONG, "symlink target too long")
        async with self._op(), self._locked(parent, level="dir"):
            return self._attr(await self._make(parent, name, stat.S_IFLNK | 0o777, uid, gid,
                                               data=target))

    async def readlink(self, ino: int) -> bytes:
        async with self._op(reading=True, lean=True), self._locked(ino, shared=True):
            inode = await self._inode(ino)
            if not stat.S_ISLNK(inode.mode):
                raise OSError(errno.EINVAL, "not a symbolic link")
            if inode.size > MAX_SYMLINK:
                # corrupt: the read would allocate the whole claimed size
                raise OSError(errno.EIO, f"symbolic link {ino} of {inode.size} bytes")
            target = await self._read_data(inode, 0, inode.size)
        await self._touch_atime(ino)
        return bytes(target)

    async def link(self, ino: int, new_parent: int, new_name) -> Attr:
        new_name = _check_name(new_name)
        async with self._op(), self._locked(new_parent, level="dir"), self._locked(ino):
            inode = await self._inode(ino)
            if inode.is_dir:
                raise OSError(errno.EPERM, "hard link to a directory")
            if inode.nlink == 0:
                raise OSError(errno.ENOENT, "file was removed")
            if inode.nlink >= MAX_LINKS:
                raise OSError(errno.EMLINK, "too many links")
            d = await self._dir(new_parent)
            if d.nlink == 0:
                raise OSError(errno.ENOENT, "directory was removed")
            if new_name in (b".", b"..") or await self.dirs.lookup(d, new_name) is not None:
                raise OSError(errno.EEXIST, "file exists")
            await self._reserve(self.dirs.reserve_estimate(d, new_name))
            await self.dirs.insert(d, new_name, ino, F.ftype_of(inode.mode))
            inode.nlink += 1
            now = self._now()
            inode.ctime_ns = d.mtime_ns = d.ctime_ns = now
            self._dirty(inode)
            self._dirty(d)
            return self._attr(inode)

    async def unlink(self, parent: int, name) -> None:
        name = _check_name(name)
        async with self._op(), self._locked(parent, level="dir"):
            d = await self._dir(parent)
            if name in (b".", b".."):
                raise OSError(errno.EISDIR, "is a directory")
            e = await self.dirs.lookup(d, name)
            if e is None:
                raise OSError(errno.ENOENT, "no such file or directory")
            async with self._locked(e.ino):
                inode = await self._inode(e.ino)
                if inode.is_dir:
                    raise OSError(errno.EISDIR, "is a directory")
                need = await self._orphan_need(inode)
                if need:
                    await self._reserve(need)
                await self.dirs.remove(d, name)
                now = self._now()
                d.mtime_ns = d.ctime_ns = inode.ctime_ns = now
                self._dirty(d)
                inode.nlink -= 1
                self._dirty(inode)
                if inode.nlink == 0:
                    await self._drop_link(inode)

    async def rmdir(self, parent: int, name) -> None:
        name = _check_name(name)
        async with self._op(), self._locked(parent, level="dir"):
            d = await self._dir(parent)
            if name == b".":
                raise OSError(errno.EINVAL, "cannot remove '.'")
            if name == b"..":
                raise OSError(errno.ENOTEMPTY, "directory not empty")
            e = await self.dirs.lookup(d, name)
            if e is None:
                raise OSError(errno.ENOENT, "no such file or directory")
            async with self._locked(e.ino):
                child = await self._inode(e.ino)
                if not child.is_dir:
                    raise OSError(errno.ENOTDIR, "not a directory")
                if not await self.dirs.is_empty(child):
                    raise OSError(errno.ENOTEMPTY, "directory not empty")
                need = await self._orphan_need(child)
                if need:
                    await self._reserve(need)
                await self.dirs.remove(d, name)
                d.nlink -= 1
                d.mtime_ns = d.ctime_ns = self._now()
                self._dirty(d)
                child.nlink = 0
                self._dirty(child)
                await self._drop_link(child)

    async def _parent_of(self, ino: int) -> int:
        """Parent pointer of directory ``ino`` for an ancestry walk under
        the rename lock.  On a shared volume a copy cached without the
        inode's lock may be older than the disk (the other node's rename
        did not have to ask this node), so unless this node changed it
        (dirty, or on its way home) it is read from the disk."""
        if not self.clustered or ino in self.cache.dirty:
            return (await self._inode(ino)).parent
        raw = self.cache.homing.get(ino)
        if raw is None:
            raw = await self.dev.read(ino * self.bs, self.bs)
        try:
            return F.Inode.decode(raw, self.sb.volid, ino).parent
        except F.FormatError:
            raise OSError(errno.ESTALE, f"inode {ino} is gone") from None

    async def _is_ancestor(self, anc: int, ino: int) -> bool:
        """Is directory ``anc`` equal to or above directory ``ino``?"""
        seen = 0
        while True:
            if ino == anc:
                return True
            if ino == self.root_ino or seen > 100000:
                return False
            ino = await self._parent_of(ino)
            seen += 1

    async def rename(self, old_parent: int, old_name, new_parent: int, new_name,
                     flags: int = 0, uid: int = 0, gid: int = 0) -> None:
        """rename(2)/renameat2(2).  RENAME_WHITEOUT leaves a whiteout (a
        character device 0:0 owned by ``uid``/``gid``) at the old name, as
        overlayfs asks of its upper filesystem."""
        old_name = _check_name(old_name)
        new_name = _check_name(new_name)
        if (flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE | RENAME_WHITEOUT)
                or flags & RENAME_EXCHANGE and flags & (RENAME_NOREPLACE | RENAME_WHITEOUT)):
            raise OSError(errno.EINVAL, "bad rename flags")
        if flags & RENAME_WHITEOUT:
            _check_id(uid, "uid")
            _check_id(gid, "gid")
        if old_name in (b".", b"..") or new_name in (b".", b".."):
            raise OSError(errno.EBUSY, "cannot rename '.' or '..'")
        async with self._op():
            if old_parent != new_parent:
                # Across directories: the rename lock first.  It is what
                # keeps parent pointers still (only a cross-directory
                # rename changes one), so the ancestry walks below may
                # read them without the inodes' locks.
                await self._take(("rename", 0), EX, "rename")
                parents = await self._parent_order(old_parent, new_parent)
            else:
                parents = (old_parent,)
            async with self._locked(*parents, level="dir", ordered=True):
                await self._rename_locked(old_parent, old_name, new_parent, new_name,
                                          flags, uid, gid)

    async def _parent_order(self, a: int, b: int) -> tuple[int, int]:
        """The two directories of a rename in lock order: an ancestor
        before its descendant, otherwise the lower inode number first."""
        try:
            if await self._is_ancestor(a, b):
                return a, b
            if await self._is_ancestor(b, a):
                return b, a
        except OSError:
            pass            # not directories: the rename fails under the locks
        return (a, b) if a < b else (b, a)

    async def _rename_locked(self, old_parent, old_name, new_parent, new_name,
                             flags, uid, gid) -> None:
        if True:
            od = await self._dir(old_parent)
            nd = await self._dir(new_parent)
            se = await self.dirs.lookup(od, old_name)
            if se is None:
                raise OSError(errno.ENOENT, "no such file or directory")
            de = await self.dirs.lookup(nd, new_name)
            if nd.nlink == 0:
                raise OSError(errno.ENOENT, "directory was removed")
            if flags & RENAME_EXCHANGE and de is None:
                # (Linux's order: a missing target before the loop check)
                raise OSError(errno.ENOENT, "no such file or directory")
            if flags & RENAME_NOREPLACE and de is not None:
                # (and an existing one, with NOREPLACE, before it too)
                raise OSError(errno.EEXIST, "file exists")
            # Moving a directory under itself is refused before its lock
            # is taken: the rename holds the new parent, and a descendant
            # is locked after its ancestors everywhere else.
            if od.ino != nd.ino:
                if se.ftype == F.FT_DIR and await self._is_ancestor(se.ino, nd.ino):
                    raise OSError(errno.EINVAL, "cannot move a directory into itself")
                if (flags & RENAME_EXCHANGE and de is not None and de.ftype == F.FT_DIR
                        and await self._is_ancestor(de.ino, od.ino)):
                    raise OSError(errno.EINVAL, "cannot move a directory into itself")
            async with self._locked(se.ino, *( [de.ino] if de else [])):
                src = await self._inode(se.ino)
                dst = await self._inode(de.ino) if de else None
                if flags & RENAME_EXCHANGE:
                    if dst is None:
                        raise OSError(errno.ENOENT, "no such file or directory")
                    await self._exchange(od, old_name, src, nd, new_name, dst)
                    return
                if dst is not None and flags & RENAME_NOREPLACE:
                    raise OSError(errno.EEXIST, "file exists")
                if src.is_dir and od.ino != nd.ino and await self._is_ancestor(src.ino, nd.ino):
                    raise OSError(errno.EINVAL, "cannot move a directory into itself")
                if dst is not None:
                    if dst.ino == src.ino:
                        return
                    if src.is_dir and not dst.is_dir:
                        raise OSError(errno.ENOTDIR, "not a directory")
                    if dst.is_dir and not src.is_dir:
                        raise OSError(errno.EISDIR, "is a directory")
                    if dst.is_dir and not await self.dirs.is_empty(dst):
                        raise OSError(errno.ENOTEMPTY, "directory not empty")
                # Everything the rename may allocate is reserved before the
                # first change (a refusal halfway would latch read-only).
                need = 0 if dst is not None else self.dirs.reserve_estimate(nd, new_name)
                if flags & RENAME_WHITEOUT:
                    need += 1 + self.dirs.reserve_estimate(od, old_name)
                if dst is not None:
                    need += await self._orphan_need(dst)
                if need:
                    await self._reserve(need)
                now = self._now()
                if dst is not None:
                    await self.dirs.retarget(nd, new_name, src.ino, F.ftype_of(src.mode))
                    dst.ctime_ns = now
                    if dst.is_dir:
                        dst.nlink = 0
                        nd.nlink -= 1
                    else:
                        dst.nlink -= 1
                    self._dirty(dst)
                else:
                    await self.dirs.insert(nd, new_name, src.ino, F.ftype_of(src.mode))
                await self.dirs.remove(od, old_name)
                if flags & RENAME_WHITEOUT:
                    wh = self._new_inode(stat.S_IFCHR, uid, gid, 0)
                    await self.dirs.insert(od, old_name, wh.ino, F.ftype_of(wh.mode))
                if src.is_dir and od.ino != nd.ino:
                    src.parent = nd.ino
                    od.nlink -= 1
                    nd.nlink += 1
                src.ctime_ns = od.mtime_ns = od.ctime_ns = nd.mtime_ns = nd.ctime_ns = now
                self._dirty(src)
                self._dirty(od)
                self._dirty(nd)
                if dst is not None and dst.nlink == 0:
                    await self._drop_link(dst)

    async def _exchange(self, od, old_name, src, nd, new_name, dst) -> None:
        if od.ino != nd.ino:
            if src.is_dir and await self._is_ancestor(src.ino, nd.ino):
                raise OSError(errno.EINVAL, "cannot move a directory into itself")
            if dst.is_dir and await self._is_ancestor(dst.ino, od.ino):
                raise OSError(errno.EINVAL, "cannot move a directory into itself")
        if src.ino == dst.ino:
            return
        await self.dirs.retarget(od, old_name, dst.ino, F.ftype_of(dst.mode))
        await self.dirs.retarget(nd, new_name, src.ino, F.ftype_of(src.mode))
        if od.ino != nd.ino:
            if src.is_dir:
                src.parent = nd.ino
                od.nlink -= 1
                nd.nlink += 1
            if dst.is_dir:
                dst.parent = od.ino
                nd.nlink -= 1
                od.nlink += 1
        now = self._now()
        src.ctime_ns = dst.ctime_ns = od.mtime_ns = od.ctime_ns = nd.mtime_ns = nd.ctime_ns = now
        for i in (src, dst, od, nd):
            self._dirty(i)

    async def readdir(self, ino: int, start_id: int = 0, limit: int | None = None
                      ) -> list[tuple[bytes, int, int]]:
        """Entries after cookie ``start_id`` as (name, inode, next cookie);
        '.' and '..' are not included.  Cookies are name hashes, stable
        across inserts and removals."""
        async with self._op(reading=True, lean=True), self._locked(ino, shared=True):
            d = await self._dir(ino)
            out = []
            async for e in self.dirs.entries(d, start_id):
                out.append((e.name, e.ino, e.key))
                if limit is not None and len(out) >= limit:
                    break
        if not start_id:
            await self._touch_atime(ino)
        return out

    async def prefetch_inodes(self, inos) -> None:
        """Bring the inode blocks of ``inos`` into the cache, adjacent ones
        (or nearly: small gaps are read through) in one device request.
        readdir of a big directory would otherwise pay a device round trip
        per entry for the attributes."""
        bs = self.bs
        want = sorted({i for i in inos if isinstance(i, int) and 0 < i < self.sb.total_blocks
                       and i not in self.cache.objs and i not in self.cache.evicted
                       and i not in self.cache.homing})
        runs: list[list[int]] = []
        for i in want:
            if runs and i - runs[-1][-1] <= 4 and i - runs[-1][0] < 256:
                runs[-1].append(i)
            else:
                runs.append([i])
        async with self._op(reading=True):
            for run in runs:
                first = run[0]
                # Read without the inodes' locks: a block forgotten while
                # the read is in flight (its lock came back from another
                # node, which may have changed it) is not cached from it.
                self.cache.begin_unlocked_read(run)
                try:
                    raw = await self.dev.read(first * bs, (run[-1] - first + 1) * bs)
                finally:
                    spoiled = self.cache.end_unlocked_read(run)
                self.cache.reads += 1
                for i in run:
                    if i in spoiled:
                        continue
                    if i in self.cache.objs or i in self.cache.evicted or i in self.cache.homing:
                        continue        # changed meanwhile: the cached copy is newer
                    blk = raw[(i - first) * bs:(i - first + 1) * bs]
                    if F.signature_of(blk) != F.SIG_INODE:
                        continue        # stale number; lookup will say ESTALE
                    try:
                        obj = self.cache.decode("inode", blk, i)
                    except F.FormatError:
                        continue        # reported when the inode is really used
                    self.cache._insert(i, obj, i)

    # ------------------------------------------------------------ attributes

    async def setattr(self, ino: int, *, mode: int | None = None, uid: int | None = None,
                      gid: int | None = None, size: int | None = None,
                      atime_ns: int | None = None, mtime_ns: int | None = None,
                      ctime_ns: int | None = None, kill_suidgid: bool = False) -> Attr:
        """``kill_suidgid`` (FUSE's FATTR_KILL_SUIDGID: a chown, or a
        truncate by a caller without CAP_FSETID): setuid, and setgid with
        group execute, go, after any mode given here."""
        # Everything is checked before anything changes: a value the
        # on-disk format cannot hold must be refused here, not found by
        # the commit (which would then lose the whole transaction).
        if uid is not None:
            _check_id(uid, "uid")
        if gid is not None:
            _check_id(gid, "gid")
        for t in (atime_ns, mtime_ns, ctime_ns):
            if t is not None and not isinstance(t, int):
                raise OSError(errno.EINVAL, "time is not an integer")
        async with self._op(), self._locked(ino):
            inode = await self._inode(ino)
            now = self._now()
            if size is not None:
                if inode.is_dir:
                    raise OSError(errno.EISDIR, "is a directory")
                if not stat.S_ISREG(inode.mode):
                    raise OSError(errno.EINVAL, "not a regular file")
                if size < 0:
                    raise OSError(errno.EINVAL, "negative size")
                if size > MAX_FILE_SIZE:
                    raise OSError(errno.EFBIG, "file too large")
                if size < inode.size:
                    await self._lock_for_frees()
            if (size is not None or uid is not None or gid is not None or kill_suidgid) \
                    and inode.xattr_blk:
                await self._kill_caps(inode)
            if size is not None:
                await self._reserve(4)
                await self._truncate(inode, size)
                inode.mtime_ns = now
            if mode is not None:
                inode.mode = (inode.mode & F.S_IFMT) | stat.S_IMODE(mode)
            if kill_suidgid:
                self._kill_setid(inode)
            if uid is not None:
                inode.uid = uid
            if gid is not None:
                inode.gid = gid
            if atime_ns is not None:
                inode.atime_ns = self._clamp_time(atime_ns)
            if mtime_ns is not None:
                inode.mtime_ns = self._clamp_time(mtime_ns)
            inode.ctime_ns = self._clamp_time(now if ctime_ns is None else ctime_ns)
            self._dirty(inode)
            return self._attr(inode)

    def _groups(self, runs) -> set[int]:
        cpg = self.sb.cpg
        out: set[int] = set()
        for p, n in runs:
            out.update(range(p // cpg, (p + n - 1) // cpg + 1))
        return out

    def _chunk_cut(self, exts, keep: int) -> int:
        """Where the next step of cutting a file down to ``keep`` clusters
        stops: the frees of one transaction may touch at most
        ``commit_threshold`` allocation groups (each dirties a group
        descriptor; a file spread over more groups than the journal has
        blocks could never be deleted in one transaction).  ``keep`` when
        the rest fits."""
        budget = self.commit_threshold
        cpg = self.sb.cpg
        acc: set[int] = set()
        cut = keep
        for l, p, n in sorted(exts, reverse=True):
            if l + n <= keep:
                break
            lo = max(l, keep)
            g = self._groups([(p + lo - l, l + n - lo)])
            if len(acc | g) <= budget:
                acc |= g
                cut = lo
                continue
            room = budget - len(acc)
            if room >= 2:
                # a run of (room - 1) * cpg clusters touches at most room groups
                return max(lo + 1, l + n - (room - 1) * cpg)
            return cut if cut > keep else l + n - 1
        return keep

    async def _truncate(self, inode: F.Inode, size: int) -> None:
        """Cut the file to ``size``.  Frees too large for one transaction
        go in steps from the end, each committed (the file shrinks step by
        step; after a crash it is left at a step's size, and an unlinked
        file parked in the orphan directory is finished by recovery)."""
        if size < inode.size:
            keep = -(-size // self.cs)
            while True:
                exts = await self.ext.load(inode)
                cut = self._chunk_cut(exts, keep)
                kept, freed = cut_extents(exts, cut)
                if freed:
                    await self.ext.store(inode, kept)
                    for p, n in freed:
                        self.alloc.free(p, n)
                if cut == keep:
                    break
                inode.size = min(inode.size, cut * self.cs)
                self._dirty(inode)
                await self._commit()
            # Bytes past EOF in the last cluster must read back as zeros if
            # the file grows again.
            if size % self.cs:
                pcl, _ = await self.ext.lookup(inode, size // self.cs)
                if pcl is not None:
                    tail = self.cs - size % self.cs
                    await self.dev.write(pcl * self.cs + size % self.cs, bytes(tail))
        inode.size = size
        self._dirty(inode)

    # ------------------------------------------------------------ file data

    async def _open_handle(self, inode: F.Inode, flags: int) -> int:
        fh = self._next_fh
        self._next_fh += 1
        self._handles[fh] = _Handle(inode.ino, flags)
        n = self._opens.get(inode.ino, 0)
        self._opens[inode.ino] = n + 1
        if self.clustered and not self.locks.pinned(inode.ino):
            # The open lock, PR while the file is open here: taken under
            # the inode's lock (an existing inode) or on an inode nobody
            # else can know yet (a new one).  Only a node freeing the
            # inode holds it EX, and that node holds the inode's lock EX:
            # so this never waits for another node's operation, even
            # inside the transaction.
            try:
                await self.locks.open_pin(inode.ino)
            except BaseException:
                del self._handles[fh]
                self._opens[inode.ino] -= 1
                if not self._opens[inode.ino]:
                    del self._opens[inode.ino]
                raise
        return fh

    async def open(self, ino: int, flags: int = os.O_RDONLY, *,
                   kill_suidgid: bool = False) -> int:
        reading = flags & os.O_ACCMODE == os.O_RDONLY and not flags & os.O_TRUNC
        # a read-only open changes nothing: PR (the open lock it pins needs
        # only that a node freeing the inode holds the inode's lock EX)
        async with self._op(reading=reading), self._locked(ino, shared=reading):
            inode = await self._inode(ino)
            acc = flags & os.O_ACCMODE
            if inode.is_dir and acc != os.O_RDONLY:
                raise OSError(errno.EISDIR, "is a directory")
            # O_TRUNC truncates whatever the access mode (Linux does so for
            # O_RDONLY too; the kernel has checked write permission).
            if flags & os.O_TRUNC and stat.S_ISREG(inode.mode):
                if inode.size:
                    await self._lock_for_frees()
                if inode.xattr_blk:
                    await self._kill_caps(inode)
                await self._reserve(4)
                await self._truncate(inode, 0)
                if kill_suidgid:
                    self._kill_setid(inode)
                inode.mtime_ns = inode.ctime_ns = self._now()
            return await self._open_handle(inode, flags)

    async def release(self, fh: int) -> None:
        async with self._op(reading=True):
            h = self._handles.pop(fh, None)
            if h is None:
                raise OSError(errno.EBADF, "bad file handle")
            await self._unref(h.ino)

    def hold(self, ino: int) -> None:
        """Someone above (the kernel, through a FUSE lookup reference)
        still knows inode ``ino``: if its last name goes, it stays as an
        orphan until ``unhold``, as an open file does until release.
        No I/O, so it cannot race with an operation."""
        self._opens[ino] = self._opens.get(ino, 0) + 1

    async def pin_open(self, ino: int, generation: int | None = None) -> None:
        """On a shared volume: pin the open lock of ``ino``, held (``hold``)
        here, so the other node does not free it while this node's kernel
        knows it; released with the last reference (``_unref``).

        The lookup that found ``ino`` let its locks go before this pin, so
        the other node may have freed the inode meanwhile, and even made a
        new one in its block: with ``generation`` (the lookup's), the pin
        in place, it checks that the inode is still the one found, and
        answers ESTALE if not (the caller drops its reference, which
        unpins with the last one).  Every lookup checks, not only the one
        that pins: another may have read the inode before the pin."""
        if not self.clustered:
            return
        if not self.locks.pinned(ino):
            await self.locks.open_pin(ino)
        if generation is not None:
            async with self._op(reading=True), self._locked(ino, shared=True):
                inode = await self._inode(ino)      # ESTALE if freed
                if inode.generation != generation:
                    raise OSError(errno.ESTALE, f"inode {ino} was freed and used "
                                  f"again since it was looked up")

    async def unhold(self, ino: int) -> None:
        """Drop a ``hold``; frees the inode if that was its last reference
        and it has no name left."""
        async with self._op(reading=True):
            await self._unref(ino)

    async def _unref(self, ino: int) -> None:
        left = self._opens.get(ino, 0) - 1
        if left > 0:
            self._opens[ino] = left
            return
        self._opens.pop(ino, None)
        if self.clustered and left == 0:
            await self.locks.open_unpin(ino)
        if left < 0 or self.failed is not None or self.readonly:
            # not referenced (freed already); or latched: nothing may be
            # written, the orphan is freed by the next mount's recovery
            return
        if self.clustered:
            await self._try_wipe(ino)
            return
        async with self._locked(ino):
            inode = await self._inode(ino)
            if inode.nlink == 0:
                await self._take(("inode", self.orphan_ino), EX, "orphan")
                await self._drop_orphan(inode)

    def _handle(self, fh: int) -> _Handle:
        h = self._handles.get(fh)
        if h is None:
            raise OSError(errno.EBADF, "bad file handle")
        return h

    async def read(self, fh: int, offset: int, size: int) -> bytes:
        h = self._handle(fh)
        if h.flags & os.O_ACCMODE == os.O_WRONLY:
            raise OSError(errno.EBADF, "not open for reading")
        if offset < 0 or size < 0:
            raise OSError(errno.EINVAL, "negative offset or size")
        async with self._op(reading=True, lean=True), self._locked(h.ino, shared=True):
            inode = await self._inode(h.ino)
            if inode.is_dir:
                raise OSError(errno.EISDIR, "is a directory")
            data = await self._read_data(inode, offset, size)
        await self._touch_atime(h.ino)
        return data

    async def _read_data(self, inode: F.Inode, offset: int, size: int) -> bytes:
        end = min(inode.size, offset + size)
        if offset >= end:
            return b""
        out = None
        pos = offset
        while pos < end:
            lcl, within = divmod(pos, self.cs)
            pcl, run = await self.ext.lookup(inode, lcl)
            avail = end - pos if run < 0 else min(end - pos, run * self.cs - within)
            part = bytes(avail) if pcl is None else await self.dev.read(pcl * self.cs + within,
                                                                         avail)
            if out is None and pos + avail >= end:
                return part             # one extent (or hole): no copy
            if out is None:
                out = bytearray()
            out += part
            pos += avail
        return out

    async def write(self, fh: int, offset: int, data: bytes, *,
                    kill_suidgid: bool = False) -> int:
        """``kill_suidgid``: the writer lacks CAP_FSETID (FUSE's
        WRITE_KILL_SUIDGID): setuid, and setgid with group execute, go."""
        h = self._handle(fh)
        if h.flags & os.O_ACCMODE == os.O_RDONLY:
            raise OSError(errno.EBADF, "not open for writing")
        if offset < 0:
            raise OSError(errno.EINVAL, "negative offset")
        async with self._op(), self._locked(h.ino):
            inode = await self._inode(h.ino)
            if h.flags & os.O_APPEND:
                offset = inode.size
            if offset + len(data) > MAX_FILE_SIZE:
                raise OSError(errno.EFBIG, "file too large")
            if inode.xattr_blk:
                await self._kill_caps(inode)
            n = await self._write_data(inode, offset, frozen(data))
            if kill_suidgid:
                self._kill_setid(inode)
            inode.mtime_ns = inode.ctime_ns = self._now()
            self._dirty(inode)
            return n

    async def _holes(self, inode: F.Inode, first: int, end: int) -> int:
        n = 0
        lcl = first
        while lcl < end:
            pcl, run = await self.ext.lookup(inode, lcl)
            step = end - lcl if run < 0 else min(run, end - lcl)
            if pcl is None:
                n += step
            lcl += step
        return n

    async def _write_data(self, inode: F.Inode, offset: int, data: bytes) -> int:
        """Write data in chunks; returns bytes written (short on ENOSPC)."""
        data = memoryview(data)         # chunks are views, not copies
        done = 0
        cs = self.cs
        while done < len(data):
            pos = offset + done
            first = pos // cs
            chunk_end = min(offset + len(data), (first + WRITE_CHUNK_CLUSTERS) * cs)
            while True:
                end_cl = -(-chunk_end // cs)
                holes = await self._holes(inode, first, end_cl)
                nexts = len(await self.ext.load(inode)) if holes else 0
                leaves = self.ext.leaves_needed(nexts + holes) + 1 if holes else 0
                if holes and nexts + holes > self.ext.max_extents:
                    if chunk_end - pos > cs:
                        chunk_end = pos + max(cs - pos % cs, (chunk_end - pos) // 2)
                        continue
                    raise OSError(errno.EFBIG, "file too fragmented")
                if await self._try_reserve(holes + leaves):
                    break
                if chunk_end - pos > cs - pos % cs:
                    chunk_end = pos + max(cs - pos % cs, (chunk_end - pos) // 2)
                    continue
                if done:
                    return done
                raise OSError(errno.ENOSPC, "no space left on device")
            await self._write_chunk(inode, pos, data[done:done + chunk_end - pos])
            done += chunk_end - pos
            if len(self.cache.dirty) >= self.commit_threshold:
                await self._commit()
        return done

    async def _write_chunk(self, inode: F.Inode, pos: int, data: bytes) -> None:
        cs = self.cs
        end = pos + len(data)
        lcl = pos // cs
        end_cl = -(-end // cs)
        exts = None
        while lcl < end_cl:
            pcl, run = await self.ext.lookup(inode, lcl)
            step = end_cl - lcl if run < 0 else min(run, end_cl - lcl)
            if pcl is None:
                if exts is None:
                    exts = await self.ext.load(inode)
                goal = None
                prev = [e for e in exts if e[0] + e[2] == lcl]
                if prev:
                    goal = prev[0][1] + prev[0][2]
                pcl, step = self.alloc.alloc(step, goal)
                exts = insert_extent(exts, lcl, pcl, step)
                # A fresh cluster is written whole: zeros around the data.
                lo = max(pos, lcl * cs)
                hi = min(end, (lcl + step) * cs)
                if lo == lcl * cs and hi == (lcl + step) * cs:
                    buf = data[lo - pos:hi - pos]       # whole clusters: as it is
                else:
                    buf = b"".join((bytes(lo - lcl * cs), data[lo - pos:hi - pos],
                                    bytes((lcl + step) * cs - hi)))
                await self.dev.write(pcl * cs, buf)
            else:
                lo = max(pos, lcl * cs)
                hi = min(end, (lcl + step) * cs)
                await self.dev.write(pcl * cs + (lo - lcl * cs), data[lo - pos:hi - pos])
            lcl += step
        if exts is not None:
            await self.ext.store(inode, exts)
        if end > inode.size:
            inode.size = end
        self._dirty(inode)

    async def fsync(self, fh: int | None = None, datasync: bool = False) -> None:
        if fh is not None:
            h = self._handle(fh)
            if datasync and self._layout_durable(h.ino):
                # fdatasync, and nothing that reaching the data needs has
                # changed since it was committed (an overwrite, timestamps
                # only): the data written in place wants a flush, no commit
                await self.dev.flush()
                return
        async with self._op():
            committed = await self._commit()
        if not committed:
            # Nothing to commit (another commit took this file's metadata,
            # or there was none): the data written in place still needs
            # its flush.  After a commit of this call's own it is durable
            # already -- written before the commit's first flush, and the
            # home writes after it are the journal's to replay -- so a
            # fsync'd write costs two flushes, not three.
            await self.dev.flush()

    def _layout_durable(self, ino: int) -> bool:
        """Whether ``ino``'s layout as in memory is committed: no commit
        under way (it may be writing the change), the inode clean or its
        layout the one last committed, and no extent leaf of it dirty."""
        if self._commit_lock.locked() or self._closing or self.failed is not None:
            return False
        inode = self.cache.dirty.get(ino)
        if inode is None:
            inode = self.cache.objs.get(ino)    # clean: as committed (None: commit)
        elif _layout(inode) != self._committed_layout.get(ino):
            return False
        if type(inode) is not F.Inode:
            return False
        if inode.ext_depth:
            return not any(blk in self.cache.dirty for _, blk, _ in inode.root)
        return True

    async def statfs(self) -> StatFs:
        async with self._op(reading=True, lean=True):
            if self.clustered:
                await self._take(("bitmap", 0), PR, "bitmap")
            free = self.alloc.free_clusters()
            return StatFs(self.cs, self.cs, self.sb.total_clusters, free, free,
                          self.sb.total_clusters, free, F.MAX_NAME)

    # ------------------------------------------------------------ xattrs

    async def _xattrs(self, inode: F.Inode) -> F.XattrBlock | None:
        if not inode.xattr_blk:
            return None
        return await self.cache.get(inode.xattr_blk, "xattr", inode.ino)

    @staticmethod
    def _xname(name) -> bytes:
        if isinstance(name, str):
            name = name.encode()
        if not name or len(name) > 255:
            raise OSError(errno.ERANGE, "bad xattr name length")
        return name

    async def getxattr(self, ino: int, name) -> bytes:
        name = self._xname(name)
        async with self._op(reading=True, lean=True), self._locked(ino, shared=True):
            xb = await self._xattrs(await self._inode(ino))
            if xb is None or name not in xb.attrs:
                raise OSError(errno.ENODATA, "no such attribute")
            return xb.attrs[name]

    async def listxattr(self, ino: int) -> list[bytes]:
        async with self._op(reading=True, lean=True), self._locked(ino, shared=True):
            xb = await self._xattrs(await self._inode(ino))
            return sorted(xb.attrs) if xb else []

    async def setxattr(self, ino: int, name, value: bytes, flags: int = 0) -> None:
        name = self._xname(name)
        value = bytes(value)
        async with self._op(), self._locked(ino):
            inode = await self._inode(ino)
            xb = await self._xattrs(inode)
            exists = xb is not None and name in xb.attrs
            if flags & XATTR_CREATE and exists:
                raise OSError(errno.EEXIST, "attribute exists")
            if flags & XATTR_REPLACE and not exists:
                raise OSError(errno.ENODATA, "no such attribute")
            attrs = dict(xb.attrs) if xb else {}
            attrs[name] = value
            if F.XattrBlock(0, attrs).used() > self.bs:
                raise OSError(errno.ENOSPC, "no room for the extended attribute")
            if xb is None:
                await self._reserve(1)
                cl, _ = self.alloc.alloc(1)
                xb = F.XattrBlock(cl << self.shift, attrs)
                self.cache.new(xb.blkno, xb, ino)
                inode.xattr_blk = xb.blkno
            else:
                xb.attrs = attrs
                self.cache.mark(xb.blkno, xb)
            inode.ctime_ns = self._now()
            self._dirty(inode)

    async def removexattr(self, ino: int, name) -> None:
        name = self._xname(name)
        async with self._op(), self._locked(ino):
            inode = await self._inode(ino)
            xb = await self._xattrs(inode)
            if xb is None or name not in xb.attrs:
                raise OSError(errno.ENODATA, "no such attribute")
            await self._drop_xattr(inode, xb, name)
            inode.ctime_ns = self._now()
            self._dirty(inode)

    async def _drop_xattr(self, inode: F.Inode, xb: F.XattrBlock, name: bytes) -> None:
        if len(xb.attrs) == 1:
            await self._lock_for_frees()
        del xb.attrs[name]
        if xb.attrs:
            self.cache.mark(xb.blkno, xb)
        else:
            self.alloc.free(xb.blkno >> self.shift, 1)
            self.cache.forget(xb.blkno)
            inode.xattr_blk = 0

    @staticmethod
    def _setid_lost(mode: int) -> int:
        """The set-id bits a write or truncate without CAP_FSETID clears
        (as Linux: setuid; setgid only with group execute -- without it,
        setgid marks mandatory locking, not privilege)."""
        lost = mode & stat.S_ISUID
        if mode & stat.S_ISGID and mode & stat.S_IXGRP:
            lost |= stat.S_ISGID
        return lost

    # What the kernel leaves to the filesystem under FUSE's
    # HANDLE_KILLPRIV_V2 when a regular file is written, truncated or
    # chowned: its file capabilities (security.capability) go, whoever
    # writes (_kill_caps: before the operation's first change, since
    # dropping the last xattr may lock); its set-id bits go as
    # _setid_lost says (_kill_setid: with the operation's other inode
    # changes, before it dirties the inode).

    async def _kill_caps(self, inode: F.Inode) -> None:
        if stat.S_ISREG(inode.mode) and inode.xattr_blk:
            xb = await self._xattrs(inode)
            if xb is not None and XATTR_CAPS in xb.attrs:
                await self._drop_xattr(inode, xb, XATTR_CAPS)

    def _kill_setid(self, inode: F.Inode) -> None:
        if stat.S_ISREG(inode.mode):
            inode.mode &= ~self._setid_lost(inode.mode)

    # ------------------------------------------------------------ additions

    async def lookup_dotdot(self, ino: int) -> Attr:
        """Attributes of the parent of directory ``ino`` (NFS export asks
        this with nothing but a directory's handle).  The parent is locked
        after the directory's lock is given up (it comes first in the
        lock order); if the directory moved meanwhile, ask again."""
        async with self._op(reading=True, lean=True):
            for _ in range(100):
                async with self._locked(ino, shared=True):
                    parent = (await self._dir(ino)).parent
                async with self._locked(parent, shared=True, level="dir"):
                    attr = self._attr(await self._inode(parent))
                    if parent == ino or (await self._dir(ino)).parent == parent:
                        return attr
            raise OSError(errno.EAGAIN, "directory keeps moving")

    async def fallocate(self, fh: int, offset: int, length: int, mode: int = 0) -> None:
        """posix_fallocate: back [offset, offset+length) with clusters
        (holes become zero-filled clusters, existing data is kept) and
        grow the file to cover it.  Other modes: EOPNOTSUPP."""
        if mode:
            raise OSError(errno.EOPNOTSUPP, "only plain allocation is supported")
        h = self._handle(fh)
        if h.flags & os.O_ACCMODE == os.O_RDONLY:
            raise OSError(errno.EBADF, "not open for writing")
        if offset < 0 or length <= 0:
            raise OSError(errno.EINVAL, "bad offset or length")
        if offset + length > MAX_FILE_SIZE:
            raise OSError(errno.EFBIG, "file too large")
        async with self._op(), self._locked(h.ino):
            inode = await self._inode(h.ino)
            if not stat.S_ISREG(inode.mode):
                raise OSError(errno.ENODEV, "not a regular file")
            end = offset + length
            lcl, end_cl = offset // self.cs, -(-end // self.cs)
            await self._reserve(await self._holes(inode, lcl, end_cl) + 2)
            while lcl < end_cl:
                pcl, run = await self.ext.lookup(inode, lcl)
                step = end_cl - lcl if run < 0 else min(run, end_cl - lcl)
                if pcl is None:
                    lo = lcl * self.cs
                    hi = min((lcl + step) * self.cs, max(end, inode.size))
                    hi = max(hi, lo + 1)
                    size = inode.size
                    done = await self._write_data(inode, lo, bytes(hi - lo))
                    if done < hi - lo:
                        inode.size = max(size, lo + done)
                        raise OSError(errno.ENOSPC, "no space left on device")
                    # a hole inside the file must not move EOF past ``end``
                    inode.size = max(size, min(hi, end))
                lcl += step
            if end > inode.size:
                inode.size = end
            # as ext4 does for a fallocate that may change the size
            inode.mtime_ns = inode.ctime_ns = self._now()
            self._dirty(inode)

    async def lseek(self, fh: int, offset: int, whence: int) -> int:
        """SEEK_DATA / SEEK_HOLE at cluster granularity (a mapped cluster is
        data, an unmapped one a hole; EOF ends the last hole)."""
        h = self._handle(fh)
        if whence not in (os.SEEK_DATA, os.SEEK_HOLE):
            raise OSError(errno.EINVAL, "only SEEK_DATA and SEEK_HOLE")
        async with self._op(reading=True, lean=True), self._locked(h.ino, shared=True):
            inode = await self._inode(h.ino)
            size = inode.size
            if offset < 0 or offset >= size:
                raise OSError(errno.ENXIO, "offset at or past the end of the file")
            lcl = offset // self.cs
            end_cl = -(-size // self.cs)
            while lcl < end_cl:
                pcl, run = await self.ext.lookup(inode, lcl)
                step = end_cl - lcl if run < 0 else min(run, end_cl - lcl)
                if (pcl is not None) == (whence == os.SEEK_DATA):
                    return max(offset, lcl * self.cs)
                lcl += step
            if whence == os.SEEK_HOLE:
                return size
            raise OSError(errno.ENXIO, "no data past the offset")

    async def copy_file_range(self, fh_in: int, off_in: int, fh_out: int, off_out: int,
                              length: int) -> int:
        """Copy bytes between two open files; returns the number copied
        (short at the source's EOF)."""
        done = 0
        step = WRITE_CHUNK_CLUSTERS * self.cs
        while done < length:
            data = await self.read(fh_in, off_in + done, min(step, length - done))
            if not data:
                break
            n = await self.write(fh_out, off_out + done, data)
            done += n
            if n < len(data):
                break
        return done
