"""Trio driver of the lock table: blocking waits, interrupts, EDEADLK.

``LockService`` wraps a pure ``locks.LockTable`` for the FUSE lock
requests.  One service is shared by every mount that must see the same
locks (two mounts of one volume on a node); ``LocalLocks`` is the
Operations mixin that routes GETLK/SETLK/SETLKW/flock and the lock
releases on FLUSH/RELEASE/unmount to it.

Why waiting lives here and not in the session: a blocked SETLKW is just
an awaiting handler task.  The session cancels its scope on FUSE_INTERRUPT
(the caller got a signal) and answers EINTR; the kernel then either fails
the syscall or, after SA_RESTART or PEP 475, sends a fresh SETLKW.  The
grant itself happens without a checkpoint after the last conflict test,
so a cancellation can never leave a lock granted that the caller was told
it did not get.
"""
from __future__ import annotations

import errno
import logging
from typing import Hashable

import trio

from .errors import FUSEError
from .locks import F_UNLCK, Conflict, Kind, LockTable, Owner

log = logging.getLogger(__name__)


class LockService:
    def __init__(self, table: LockTable | None = None):
        self.table = table if table is not None else LockTable()
        self._changed: dict[Hashable, trio.Event] = {}
        self.counters = {"granted": 0, "busy": 0, "waits": 0, "deadlocks": 0, "interrupted": 0}

    def wake(self, key: Hashable) -> None:
        """Locks on ``key`` changed (here, or on another node): waiters look again."""
        ev = self._changed.pop(key, None)
        if ev is not None:
            ev.set()

    def getlk(self, key, kind: Kind, owner: Owner, type_: int, start: int,
              end: int) -> Conflict | None:
        return self.table.test(key, kind, owner, type_, start, end)

    def setlk(self, key, kind: Kind, owner: Owner, type_: int, start: int, end: int,
              pid: int) -> None:
        """Non-blocking: EAGAIN on conflict."""
        if self.table.set(key, kind, owner, type_, start, end, pid) is not None:
            self.counters["busy"] += 1
            raise FUSEError(errno.EAGAIN)
        self.counters["granted"] += 1
        self.wake(key)

    async def setlkw(self, key, kind: Kind, owner: Owner, type_: int, start: int, end: int,
                     pid: int) -> None:
        """Blocking: waits for conflicts to go away; EDEADLK (POSIX only)
        if waiting would close a cycle; cancellation (an INTERRUPT) leaves
        nothing behind."""
        if type_ == F_UNLCK:
            # lockf(F_ULOCK) arrives through SETLKW: never waits.
            self.setlk(key, kind, owner, type_, start, end, pid)
            return
        while True:
            found = self.table.conflicts(key, kind, owner, type_, start, end)
            if not found:
                self.table.set(key, kind, owner, type_, start, end, pid)
                self.counters["granted"] += 1
                self.wake(key)
                return
            blockers = {c.owner for c in found}
            if kind is Kind.POSIX and self.table.would_deadlock(owner, blockers):
                self.counters["deadlocks"] += 1
                raise FUSEError(errno.EDEADLK)
            self.counters["waits"] += 1
            ev = self._changed.get(key)
            if ev is None:
                ev = self._changed[key] = trio.Event()
            token = self.table.start_wait(owner, blockers)
            try:
                await ev.wait()
            except trio.Cancelled:
                self.counters["interrupted"] += 1
                raise
            finally:
                self.table.end_wait(owner, token)

    def release_owner(self, key, kind: Kind, owner: Owner) -> None:
        if self.table.release_owner(key, kind, owner):
            self.wake(key)

    def drop_mount(self, mount: Hashable) -> None:
        for key in self.table.drop_mount(mount):
            self.wake(key)
