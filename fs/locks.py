"""The lock-manager interface the filesystem reaches its caches through.

Every cached inode (with its directory and extent blocks), the global
bitmap and the slot map are protected by a named lock.  The local manager
here serialises tasks of one process; the cluster manager (dlm-lite) will
implement the same interface and, when another node asks for a lock we
hold, call the registered invalidate hook *before* giving the lock up, so
the filesystem commits its journal and drops the cached blocks.
"""
from __future__ import annotations

from contextlib import asynccontextmanager
from typing import Awaitable, Callable, Protocol

import trio

InvalidateHook = Callable[[str, int], Awaitable[None]]   # (kind, ident)


class LockManager(Protocol):
    def inode(self, ino: int, *, shared: bool = False): ...
    def global_bitmap(self): ...
    def slot_map(self): ...
    def set_invalidate_hook(self, hook: InvalidateHook) -> None: ...


class _RWLock:
    """Readers-writer lock.  Taking a free lock does not yield to the
    scheduler: operations take several inode locks each, and a trip
    through the event loop per lock was most of the cost of a create."""

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


class LocalLockManager:
    """In-process locks; nothing else can take them, so the invalidate hook
    is only called through :meth:`downconvert` (tests use it)."""

    def __init__(self) -> None:
        self._locks: dict[tuple[str, int], _RWLock] = {}
        self._users: dict[tuple[str, int], int] = {}
        self.hook: InvalidateHook | None = None

    def set_invalidate_hook(self, hook: InvalidateHook) -> None:
        self.hook = hook

    @asynccontextmanager
    async def _hold(self, kind: str, ident: int, shared: bool):
        k = (kind, ident)
        lock = self._locks.setdefault(k, _RWLock())
        self._users[k] = self._users.get(k, 0) + 1
        try:
            await lock.acquire(shared)
            try:
                yield
            finally:
                lock.release(shared)
        finally:
            self._users[k] -= 1
            if not self._users[k]:
                del self._users[k]
                del self._locks[k]

    def inode(self, ino: int, *, shared: bool = False):
        return self._hold("inode", ino, shared)

    def global_bitmap(self):
        return self._hold("bitmap", 0, False)

    def slot_map(self):
        return self._hold("slotmap", 0, False)

    async def downconvert(self, kind: str, ident: int) -> None:
        """What the cluster manager does when a peer wants the lock."""
        if self.hook is not None:
            await self.hook(kind, ident)
