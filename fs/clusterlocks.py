"""The filesystem's locks on dlm-lite: fs/locks.py's interface over the
node-local ``LockCache`` (locking/cache.py), as OCFS2's dlmglue is over
o2dlm.

Lock resources are named after OCFS2's lock types (one DLM resource per
name in the volume's domain):

    ("inode", ino)    "M<ino>"     metadata and data of one inode
    ("super", 0)      "S"          superblock and slot map
    ("rename", 0)     "R"          cross-directory renames
    ("bitmap", 0)     "B"          the global bitmap
    ("journal", s)    "J<s>"       slot s's journal: held EX by its mount
    open lock of ino  "O<ino>"     PR while this node uses the inode (an
                                   open file); EX (try, never queued) to
                                   free an unlinked inode nobody uses

Two hooks tie the cache to the filesystem:

* before a lock goes down for another node, ``Filesystem.downconvert``
  commits and checkpoints what was changed under EX and, going to NL,
  forgets the cached blocks the lock covered;
* when a lock is granted again after NL (or for the first time), the
  cached clean blocks it covers are forgotten before anyone uses them:
  another node may have changed them meanwhile.

The node-local manager (fs/locks.py) is used when the volume is mounted
by one node; this one when both nodes mount it.
"""
from __future__ import annotations

import errno

from replfs.blockdev import BlockDeviceError
from replfs.locking.cache import LockCache

from .locks import EX, PR, DownconvertHook, Mode, Res

_PREFIX = {"inode": "M", "super": "S", "rename": "R", "bitmap": "B", "journal": "J"}
_KIND = {v: k for k, v in _PREFIX.items()}


def lock_name(res: Res) -> str:
    kind, ident = res
    p = _PREFIX[kind]
    return f"{p}{ident:x}" if kind in ("inode", "journal") else p


def parse_lock_name(name: str) -> Res:
    kind = _KIND[name[0]]
    return (kind, int(name[1:], 16) if name[1:] else 0)


class ClusterLockManager:
    """fs/locks.py's ``LockManager`` on a ``LockCache`` over a DLM client
    (``DlmClient`` over replfsd's socket, or ``InProcessDlm``)."""

    clustered = True

    def __init__(self, dlm, domain: str, nursery=None):
        self.hook: DownconvertHook | None = None
        self.forget = None          # the filesystem's forget(res)
        self.cache = LockCache(dlm, domain, on_downconvert=self._downconvert,
                               on_refresh=self._refresh, nursery=nursery)
        self._pins: dict[int, object] = {}

    def set_downconvert_hook(self, hook: DownconvertHook) -> None:
        self.hook = hook

    def set_refresh_hook(self, forget) -> None:
        """``forget(res)``: drop the cached blocks ``res`` covers (run when a
        lock is granted again after NL)."""
        self.forget = forget

    def hold(self, res: Res, mode: Mode):
        """The lock cache's own context manager (no wrapper around it)."""
        if mode not in (PR, EX):
            raise ValueError(f"the filesystem takes PR or EX locks, not {Mode(mode).name}")
        return self.cache.hold(lock_name(res), mode)

    async def _downconvert(self, name: str, old: Mode, new: Mode) -> None:
        if self.hook is not None:
            await self.hook(parse_lock_name(name), old, new)

    def _refresh(self, name: str, mode: Mode) -> None:
        if self.forget is not None:
            self.forget(parse_lock_name(name))

    def cached_ex(self, res: Res) -> bool:
        """Does this node hold ``res`` EX in its cache right now (held or
        not by a local holder)?  A down-conversion runs the filesystem's
        hook before the mode changes, so what is done while this is true
        is written back before another node gets the lock."""
        e = self.cache.entries.get(lock_name(res))
        return e is not None and e.lock is not None and e.mode == EX

    async def journal_lock(self, slot: int, *, wait: bool):
        """EX on slot ``slot``'s journal lock, outside the cache (held for
        a mount's life, or for one recovery): without ``wait`` None when
        it is taken (the slot is live), with it once the lock manager
        has recovered a dead holder's lock.  Unlock with ``.unlock()``."""
        try:
            return await self.cache.dlm.lock(self.cache.domain, f"J{slot:x}", EX,
                                             noqueue=not wait)
        except BlockDeviceError as e:
            if e.errno == errno.EAGAIN and not wait:
                return None
            raise

    # --- open locks (not cached: held exactly while the inode is in use)

    async def open_pin(self, ino: int) -> None:
        """PR on the inode's open lock until ``open_unpin``."""
        if ino in self._pins:
            return
        lk = await self.cache.dlm.lock(self.cache.domain, f"O{ino:x}", PR)
        if ino in self._pins:           # pinned meanwhile by another task
            await lk.unlock()
        else:
            self._pins[ino] = lk

    def pinned(self, ino: int) -> bool:
        return ino in self._pins

    async def open_unpin_all(self) -> None:
        for ino in list(self._pins):
            await self.open_unpin(ino)

    async def open_unpin(self, ino: int) -> None:
        lk = self._pins.pop(ino, None)
        if lk is not None:
            await lk.unlock()

    async def open_try(self, ino: int):
        """EX on the open lock if no node holds it (never waits); the lock
        to unlock after the inode is freed, or None."""
        try:
            return await self.cache.dlm.lock(self.cache.domain, f"O{ino:x}", EX, noqueue=True)
        except BlockDeviceError as e:
            if e.errno == errno.EAGAIN:
                return None
            raise

    async def drop_all(self) -> None:
        """Give every cached lock back (unmount; no holder left)."""
        await self.open_unpin_all()
        await self.cache.drop_all()
