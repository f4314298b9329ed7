"""Node-local cache of cluster locks, in the manner of OCFS2's dlmglue.

A filesystem takes the same locks (an inode, the superblock, a bitmap
group) over and over.  Asking the lock manager every time costs a daemon
round trip, and a network one when the resource is mastered elsewhere.
So the cache keeps a lock at the strongest mode it was granted after the
last local holder releases it, and lets the next local holder in without
asking anybody.  It gives the lock up only when another node wants it: the
lock manager's blocking callback (BAST) marks the entry blocked, new local
holders wait, and once the last conflicting local holder is gone the
entry is down-converted to the strongest mode compatible with what the
other node asked for (EX -> PR for a reader, to NL for a writer).

Before a down-conversion the owner's ``on_downconvert(name, old, new)``
runs: that is where a filesystem writes back what it changed under EX
and drops cached copies it may no longer trust.  The lock value block an
EX/PW holder sets with ``set_lvb`` travels with the down-conversion.

    cache = LockCache(dlm, "r1", on_downconvert=flush_and_forget)
    async with cache.hold("inode-17", Mode.EX) as entry:
        ...                       # entry.lvb / cache.set_lvb(entry, b"...")

When a lock is granted again after the cache held it at NL (or never),
the owner's ``on_refresh(name, mode)`` runs before the first local holder
gets in: whatever it cached under the lock before may have been changed
by another node since (OCFS2 re-reads an inode when its lock comes back).

Local holders share an entry freely when their modes are compatible with
each other; a holder that needs a stronger mode than the entry has waits
for the incompatible local holders to leave, then converts.
"""
from __future__ import annotations

import errno
import logging
from contextlib import asynccontextmanager
from typing import Awaitable, Callable, Optional

import trio

from replfs.blockdev import BlockDeviceError

from .dlm.modes import Mode, compatible, covers

log = logging.getLogger("replfs.locking")

DownconvertHook = Callable[[str, Mode, Mode], Awaitable[None]]


def _strongest_compatible(blocked: Mode, current: Mode) -> Mode:
    """The mode to drop to so that ``blocked`` can be granted elsewhere:
    the strongest mode ``current`` covers that is compatible with it."""
    for m in (Mode.EX, Mode.PW, Mode.PR, Mode.CW, Mode.CR):
        if covers(current, m) and compatible(m, blocked) and compatible(blocked, m):
            return m
    return Mode.NL


class CacheEntry:
    def __init__(self, name: str):
        self.name = name
        self.lock = None                      # the DlmClient Lock, once taken
        self.mode: Mode = Mode.NL             # what the lock manager granted
        self.holders: dict[Mode, int] = {}    # local holders by mode
        self.blocked: Optional[Mode] = None   # a remote node waits for this mode
        self.lvb: bytes = b""
        self.lvb_valid = False
        self.lvb_out: Optional[bytes] = None  # set by an EX/PW holder
        self.busy = trio.Lock()               # one lock-manager call at a time
        self.refused: Optional[str] = None    # write-back failed: kept until fenced
        self.changed = trio.Event()

    def held_modes(self):
        return [m for m, n in self.holders.items() if n > 0]

    def _notify(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    def __repr__(self) -> str:
        return (f"<CacheEntry {self.name} {self.mode.name} holders="
                f"{ {m.name: n for m, n in self.holders.items() if n} } "
                f"blocked={self.blocked.name if self.blocked is not None else None}>")


class LockCache:
    def __init__(self, dlm, domain: str, *, on_downconvert: Optional[DownconvertHook] = None,
                 on_refresh: Optional[Callable[[str, Mode], None]] = None,
                 nursery: Optional[trio.Nursery] = None):
        self.dlm = dlm
        self.domain = domain
        self.on_downconvert = on_downconvert
        self.on_refresh = on_refresh
        self._nursery = nursery or dlm._nursery
        self.entries: dict[str, CacheEntry] = {}
        self.stats = {"hits": 0, "requests": 0, "converts": 0, "downconverts": 0}

    def _entry(self, name: str) -> CacheEntry:
        e = self.entries.get(name)
        if e is None:
            e = self.entries[name] = CacheEntry(name)
        return e

    # ------------------------------------------------------------ holders
    async def acquire(self, name: str, mode: Mode) -> CacheEntry:
        mode = Mode(mode)
        e = self._entry(name)
        while True:
            if e.refused is not None:
                # its owner could not write back what it changed under it:
                # nothing here may use it again (the node must be fenced)
                raise BlockDeviceError(errno.EIO, f"{self.domain}/{name}: unusable, "
                                       f"the write-back failed ({e.refused})")
            others_ok = all(compatible(m, mode) for m in e.held_modes())
            # (not while a conversion is under way: holders that slipped in
            # under the old mode would keep a conversion deadlock unbroken)
            if (e.blocked is None and others_ok and e.lock is not None
                    and covers(e.mode, mode) and not e.busy.locked()):
                self.stats["hits"] += 1
                e.holders[mode] = e.holders.get(mode, 0) + 1
                return e
            if e.blocked is not None or not others_ok or e.busy.locked():
                # a down-conversion is due, or local holders conflict, or a
                # lock-manager call is running: wait for the entry to change
                if e.blocked is not None and not e.busy.locked():
                    # (a BAST that came while a call was running found the
                    # entry busy: the down-conversion starts now)
                    self._maybe_downconvert(e)
                await e.changed.wait()
                continue
            try:
                async with e.busy:
                    if e.blocked is not None or not all(compatible(m, mode) for m in e.held_modes()):
                        e._notify()
                        continue
                    want = mode if e.lock is None else self._upgrade(e.mode, mode)
                    fresh = e.lock is None or e.mode == Mode.NL
                    # The request is the cache's, not the caller's: a caller
                    # cancelled while it waits (a FUSE INTERRUPT, a timeout)
                    # must not leave a request queued that is granted to nobody
                    # -- the other node would wait for a BAST nobody answers.
                    # So the wait is not cancellable (as OCFS2's cluster lock
                    # waits are not); a cancelled caller goes away once it is
                    # granted, and the grant stays cached here.
                    if e.lock is None:
                        self.stats["requests"] += 1
                        with trio.CancelScope(shield=True):
                            e.lock = await self.dlm.lock(self.domain, name, want,
                                                         on_bast=self._bast)
                    else:
                        self.stats["converts"] += 1
                        try:
                            with trio.CancelScope(shield=True):
                                await e.lock.convert(want)
                        except BlockDeviceError as err:
                            if err.errno != errno.EDEADLK or e.held_modes():
                                raise
                            # Another node converts up on the same lock and the
                            # lock manager broke the conversion deadlock by
                            # refusing ours: give our (unused) mode up and ask
                            # again from NL, behind the other node.
                            self.stats["deadlocks"] = self.stats.get("deadlocks", 0) + 1
                            if self.on_downconvert is not None and e.mode != Mode.NL:
                                await self.on_downconvert(e.name, e.mode, Mode.NL)
                            await e.lock.convert(Mode.NL, lvb=e.lvb_out
                                                 if e.mode in (Mode.EX, Mode.PW) else None)
                            e.mode, e.lvb_out = Mode.NL, None
                            e._notify()
                            continue
                    e.mode = e.lock.mode
                    e.lvb, e.lvb_valid = e.lock.lvb, e.lock.lvb_valid
                    if fresh and self.on_refresh is not None:
                        self.on_refresh(e.name, e.mode)
                    # The grant is ours to use once, even if another node asked
                    # for the lock meanwhile: otherwise two nodes could hand it
                    # back and forth without either getting work done.
                    if covers(e.mode, mode) and all(compatible(m, mode) for m in e.held_modes()):
                        e.holders[mode] = e.holders.get(mode, 0) + 1
                        granted = True
                    else:
                        granted = False
            except BaseException:
                e._notify()     # who waited while the call ran looks again
                raise
            e._notify()
            if granted:
                try:
                    # a caller cancelled during the (uncancellable) wait
                    # goes away now, the grant staying cached
                    await trio.lowlevel.checkpoint_if_cancelled()
                except BaseException:
                    self.release(e, mode)
                    raise
                return e
            self._maybe_downconvert(e)

    @staticmethod
    def _upgrade(current: Mode, wanted: Mode) -> Mode:
        if covers(wanted, current):
            return wanted
        return Mode.EX   # incomparable modes (CW and PR): take the one that covers both

    def release(self, e: CacheEntry, mode: Mode) -> None:
        mode = Mode(mode)
        n = e.holders.get(mode, 0)
        if n <= 0:
            raise RuntimeError(f"{e.name}: release of {mode.name} that is not held")
        e.holders[mode] = n - 1
        if e.blocked is not None:
            self._maybe_downconvert(e)
        e._notify()

    @asynccontextmanager
    async def hold(self, name: str, mode: Mode):
        e = await self.acquire(name, mode)
        try:
            yield e
        finally:
            self.release(e, mode)

    def set_lvb(self, e: CacheEntry, lvb: bytes) -> None:
        """Value to publish with the next down-conversion (EX/PW holders)."""
        e.lvb_out = bytes(lvb)
        e.lvb, e.lvb_valid = bytes(lvb), True

    # ------------------------------------------------------------ BAST side
    async def _bast(self, lk, blocked: Mode) -> None:
        e = self.entries.get(lk.name)
        if e is None or (e.lock is not None and e.lock is not lk):
            return      # a BAST for a lock this cache has already given up
        if e.blocked is None or covers(blocked, e.blocked):
            e.blocked = blocked
        elif not covers(e.blocked, blocked):
            e.blocked = Mode.EX     # two incomparable requests: make room for both
        self._maybe_downconvert(e)
        e._notify()

    def _maybe_downconvert(self, e: CacheEntry) -> None:
        if e.blocked is None or e.busy.locked() or e.refused is not None:
            return
        target = _strongest_compatible(e.blocked, e.mode)
        if any(not covers(target, m) for m in e.held_modes()):
            return          # the last conflicting holder's release calls us again
        self._nursery.start_soon(self._downconvert, e, target)

    async def _downconvert(self, e: CacheEntry, target: Mode) -> None:
        try:
            await self._downconvert_locked(e, target)
        finally:
            # whatever happened, holders that waited while the entry was
            # busy look again
            e._notify()

    async def _downconvert_locked(self, e: CacheEntry, target: Mode) -> None:
        async with e.busy:
            if e.blocked is None or e.lock is None:
                return
            if any(not covers(target, m) for m in e.held_modes()):
                return
            old = e.mode
            if target != old:
                if self.on_downconvert is not None:
                    try:
                        await self.on_downconvert(e.name, old, target)
                    except Exception as err:
                        # The owner could not write back what it changed
                        # under the lock: giving it up would hand the other
                        # node old blocks.  Keep it; the other node waits
                        # until this one is fenced and its journal recovered.
                        log.error("%s/%s: not given up, the owner could not write its "
                                  "changes back (%s); this node must be fenced",
                                  self.domain, e.name, err)
                        self.stats["refused"] = self.stats.get("refused", 0) + 1
                        e.refused = str(err)
                        return
                self.stats["downconverts"] += 1
                lvb = e.lvb_out if old in (Mode.EX, Mode.PW) else None
                try:
                    await e.lock.convert(target, lvb=lvb)
                except BlockDeviceError as err:
                    # The connection is gone (the daemon drops a client's
                    # locks with it) or this node is fenced: either way the
                    # lock is lost, and the next holder asks afresh.  This
                    # task runs in the owner's nursery and must not take it
                    # down for that.
                    log.warning("%s/%s: down-conversion failed, lock dropped: %s",
                                self.domain, e.name, err)
                    e.lock, e.mode, e.blocked, e.lvb_out = None, Mode.NL, None, None
                    e._notify()
                    return
                e.mode = e.lock.mode
                e.lvb_out = None
            # Done for the request that started it; a BAST for a stronger
            # one that came meanwhile stays (and starts another round).
            if e.blocked is not None and compatible(e.mode, e.blocked) \
                    and compatible(e.blocked, e.mode):
                e.blocked = None
        e._notify()
        # a BAST may have arrived for a stronger conflict while we converted
        if e.blocked is not None:
            self._maybe_downconvert(e)

    # ------------------------------------------------------------ teardown
    async def drop_all(self) -> None:
        """Unlock every cached lock (unmount).  Local holders must be gone."""
        for e in list(self.entries.values()):
            async with e.busy:
                if e.lock is not None and e.lock.mode is not None:
                    lvb = e.lvb_out if e.mode in (Mode.EX, Mode.PW) else None
                    if (self.on_downconvert is not None and e.mode != Mode.NL
                            and e.refused is None):
                        await self.on_downconvert(e.name, e.mode, Mode.NL)
                    await e.lock.unlock(lvb=lvb)
                e.lock, e.mode = None, Mode.NL
        self.entries.clear()
