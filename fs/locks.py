"""The lock interface the filesystem takes its locks through, the
node-local manager, and the lock-order checker.

Every object the filesystem caches is covered by a named lock (a
``Res``): an inode's metadata and data ("inode", ino), the slot map and
superblock ("super", 0), the global bitmap ("bitmap", 0), the rename lock
("rename", 0), a slot's journal ("journal", slot).  Locks have DLM modes:
an operation that only reads takes PR, one that changes takes EX.

Two managers implement the interface:

* ``LocalLockManager`` (here): one node, locks between the tasks of one
  process.  Nothing else can want a lock, so the down-conversion hook runs
  only when a test calls ``downconvert``.
* ``fs/clusterlocks.py``: the same locks on dlm-lite through the
  node-local ``LockCache``; when another node wants a lock this node
  holds, the hook runs *before* the lock is given up, with the old and new
  mode, so the filesystem commits, checkpoints and forgets what it may no
  longer trust.

The lock order (docs/fs-locking.md has the reasons; ``OrderChecker``
enforces it in the tests and the simulator):

    0 rename        the rename lock, cross-directory renames only
    1 super         slot map / superblock
    2 dir           the directories an operation changes: ancestor
                    first, else lower inode number first, in one call
    3 inode         the inodes named in them (children), lower number
                    first, in one call
    4 orphan        an orphan directory
    5 bitmap        the global bitmap
    then the transaction: no lock is taken after the operation's first
    change (the commit a down-conversion needs would wait for us)

An operation holds at most one group of locks per level, taken in one
call; it never holds a lock while it takes one of a lower level.
"""
from __future__ import annotations

from typing import Awaitable, Callable, Protocol

import trio

from replfs.locking.dlm.modes import EX, NL, PR, Mode

Res = tuple[str, int]
DownconvertHook = Callable[[Res, Mode, Mode], Awaitable[None]]

LEVELS = {"rename": 0, "super": 1, "dir": 2, "inode": 3, "orphan": 4, "bitmap": 5}

__all__ = ["EX", "NL", "PR", "Mode", "Res", "LEVELS", "LockManager", "LocalLockManager",
           "LockOrderError", "OrderChecker"]


class LockManager(Protocol):
    def hold(self, res: Res, mode: Mode):
        """Async context manager: ``res`` held at ``mode`` inside."""

    def set_downconvert_hook(self, hook: DownconvertHook) -> None: ...


class LockOrderError(AssertionError):
    """A lock was taken against the documented order: a deadlock waiting
    for the right interleaving of two nodes."""


class OrderChecker:
    """Lockdep for one operation: records the levels taken and fails on
    an inversion.  ``level`` names the role the lock plays in the
    operation (a directory is "dir" when its entries change, "inode" when
    it is the child being removed)."""

    def __init__(self) -> None:
        self.levels: list[int] = []

    def check(self, level: str, *, in_transaction: bool) -> None:
        n = LEVELS[level]
        if in_transaction:
            raise LockOrderError(f"{level} lock taken after the operation's first change")
        if self.levels and n <= max(self.levels):
            raise LockOrderError(f"{level} lock taken while holding a lock of level "
                                 f"{max(self.levels)} (order: {', '.join(LEVELS)})")
        self.levels.append(n)

    def release(self, level: str) -> None:
        self.levels.remove(LEVELS[level])


class _RWLock:
    """Shared (PR) / exclusive (EX) lock between tasks.  Taking a free lock
    does not yield to the scheduler: operations take several locks each,
    and a trip through the event loop per lock was most of the cost of a
    create."""

    def __init__(self) -> None:
        self.readers = 0
        self.writer = False
        self.lot = trio.lowlevel.ParkingLot()

    async def acquire(self, shared: bool) -> None:
        while self.writer or (not shared and self.readers):
            await self.lot.park()
        if shared:
            self.readers += 1
        else:
            self.writer = True

    def release(self, shared: bool) -> None:
        if shared:
            self.readers -= 1
        else:
            self.writer = False
        if self.lot:
            self.lot.unpark_all()


class _Held:
    """``async with`` one lock of a LocalLockManager (a class rather than a
    generator: every operation takes one or more, and a generator-based
    context manager costs several times as much)."""
    __slots__ = ("mgr", "res", "shared", "lock")

    def __init__(self, mgr: "LocalLockManager", res: Res, shared: bool):
        self.mgr, self.res, self.shared = mgr, res, shared
        self.lock = None

    async def __aenter__(self) -> None:
        mgr, res = self.mgr, self.res
        lock = mgr._locks.get(res)
        if lock is None:
            lock = mgr._locks[res] = _RWLock()
        mgr._users[res] = mgr._users.get(res, 0) + 1
        try:
            await lock.acquire(self.shared)
        except BaseException:
            mgr._unuse(res)
            raise
        self.lock = lock

    async def __aexit__(self, *exc) -> bool:
        try:
            self.lock.release(self.shared)
        finally:
            self.mgr._unuse(self.res)
        return False


class LocalLockManager:
    """Locks between the tasks of one process (one node, one mount)."""

    def __init__(self) -> None:
        self._locks: dict[Res, _RWLock] = {}
        self._users: dict[Res, int] = {}
        self.hook: DownconvertHook | None = None

    def set_downconvert_hook(self, hook: DownconvertHook) -> None:
        self.hook = hook

    def hold(self, res: Res, mode: Mode) -> "_Held":
        if mode not in (PR, EX):
            raise ValueError(f"the filesystem takes PR or EX locks, not {Mode(mode).name}")
        return _Held(self, res, mode != EX)

    def _unuse(self, res: Res) -> None:
        self._users[res] -= 1
        if not self._users[res]:
            del self._users[res]
            del self._locks[res]

    async def downconvert(self, res: Res, old: Mode = EX, new: Mode = NL) -> None:
        """What the cluster manager does when another node wants ``res``
        (tests call it to play the other node)."""
        if self.hook is not None:
            await self.hook(res, old, new)
