"""One lock resource as its master keeps it: three queues and the LVB.

Queue rules (o2dlm's, kept deliberately simple):

* ``granted`` holds every lock that currently has a mode, including locks
  that are waiting to convert (they keep their old mode until then).
* ``converting`` is served before ``waiting``, and each queue in strict
  FIFO order: processing stops at the first request that cannot be
  granted, so a stream of compatible newcomers cannot starve a request.
* A sideways conversion (CW <-> PR, neither mode covers the other) is a
  down-conversion to their meet (CR) followed by an up-conversion.
* A down-conversion (the new mode conflicts with nothing the old one did
  not, see ``modes.covers``) never waits; the owner already treats it as
  done when it asks (see core.py), so the master sends no grant for it.
* A new request is granted at once only when both queues are empty and no
  granted lock conflicts; an up-conversion only when nothing else is
  converting and no other granted lock conflicts.
* Conversion deadlock: when the head of the conversion queue is blocked
  only by locks that are themselves queued to convert, nobody can move
  (they wait behind the head, the head waits for their current modes).
  Those later conversions are refused with EDEADLK; the locks keep their
  granted modes and their owners, who also got a BAST, are expected to
  give way.
* NOQUEUE: a request that cannot be granted at once is refused instead
  of queued, and sends no blocking callbacks.
* Every granted lock that blocks a queued request gets one BAST per
  blocked mode (remembered until its own mode changes).

A fresh resource's LVB is all zeros and marked invalid: "invalid" means
"no holder wrote a value that is known current", which covers both "never
written" and "lost in a crash".  The LVB travels with a sequence number that grows by one per write.  A
write is only applied when its number is newer than the stored one, which
makes replays during recovery harmless.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from .messages import (FLAG_NOQUEUE, LVB_LEN, REASON_CANCELLED, REASON_DEADLOCK,
                       REASON_WOULD_BLOCK)
from .modes import LVB_WRITER_MODES, Mode, compatible, covers, meet

ZERO_LVB = bytes(LVB_LEN)


@dataclass(eq=False)
class MasterLock:
    owner: int
    lockid: int
    granted: Optional[Mode] = None
    requested: Optional[Mode] = None
    flags: int = 0
    basted: set = field(default_factory=set)

    @property
    def key(self) -> tuple[int, int]:
        return (self.owner, self.lockid)


# Results handed back to the core, which turns them into messages.
@dataclass(frozen=True)
class Granted:
    lock: MasterLock
    mode: Mode


@dataclass(frozen=True)
class Blocking:
    lock: MasterLock
    blocked_mode: Mode


@dataclass(frozen=True)
class Refused:
    lock: MasterLock
    reason: int


class LockResource:
    def __init__(self, name: str):
        self.name = name
        self.locks: dict[tuple[int, int], MasterLock] = {}
        self.granted: list[MasterLock] = []
        self.converting: list[MasterLock] = []
        self.waiting: list[MasterLock] = []
        self.lvb = ZERO_LVB
        self.lvb_seq = 0
        # Nobody has written it yet, so its zeros say nothing: a first
        # holder must build the value from its own storage, exactly as
        # after a loss in recovery.
        self.lvb_valid = False

    # ------------------------------------------------------------ queries
    def blockers(self, lock: MasterLock, mode: Mode) -> list[MasterLock]:
        return [g for g in self.granted
                if g is not lock and not compatible(g.granted, mode)]

    def granted_modes(self) -> list[Mode]:
        return [g.granted for g in self.granted]

    # ------------------------------------------------------------ LVB
    def write_lvb(self, lock: MasterLock, lvb: Optional[bytes], seq: int) -> None:
        if lvb is None or lock.granted not in LVB_WRITER_MODES:
            return
        if seq > self.lvb_seq:
            self.lvb, self.lvb_seq, self.lvb_valid = lvb, seq, True

    # ------------------------------------------------------------ operations
    def request(self, owner: int, lockid: int, mode: Mode, flags: int) -> list:
        if (owner, lockid) in self.locks:
            return []  # a duplicate of a request we already hold
        lock = MasterLock(owner, lockid, None, mode, flags)
        self.locks[lock.key] = lock
        if not self.converting and not self.waiting and not self.blockers(lock, mode):
            return [self._grant(lock)] + self.process()
        if flags & FLAG_NOQUEUE:
            del self.locks[lock.key]
            return [Refused(lock, REASON_WOULD_BLOCK)]
        self.waiting.append(lock)
        return self.process()

    def convert(self, owner: int, lockid: int, mode: Mode, flags: int,
                lvb: Optional[bytes], lvb_seq: int) -> list:
        lock = self.locks.get((owner, lockid))
        if lock is None or lock.granted is None or lock.requested is not None:
            return []
        self.write_lvb(lock, lvb, lvb_seq)
        if covers(lock.granted, mode):
            lock.granted = mode
            lock.basted.clear()
            return self.process()
        if not covers(mode, lock.granted):
            # Sideways (CW <-> PR): the owner already stepped down to the
            # meet of both modes when it asked (see core.DlmNode.convert).
            lock.granted = meet(lock.granted, mode)
            lock.basted.clear()
        lock.requested = mode
        lock.flags = flags
        if not self.converting and not self.blockers(lock, mode):
            return [self._grant(lock)] + self.process()
        if flags & FLAG_NOQUEUE:
            lock.requested = None
            return [Refused(lock, REASON_WOULD_BLOCK)]
        self.converting.append(lock)
        return self.process()

    def unlock(self, owner: int, lockid: int, lvb: Optional[bytes], lvb_seq: int) -> list:
        lock = self.locks.pop((owner, lockid), None)
        if lock is None:
            return []
        self.write_lvb(lock, lvb, lvb_seq)
        for q in (self.granted, self.converting, self.waiting):
            if lock in q:
                q.remove(lock)
        return self.process()

    def cancel(self, owner: int, lockid: int) -> list:
        lock = self.locks.get((owner, lockid))
        if lock is None or lock.requested is None:
            return []  # already granted (the grant is on its way) or gone
        if lock in self.waiting:
            self.waiting.remove(lock)
            del self.locks[lock.key]
        else:
            self.converting.remove(lock)
        lock.requested = None
        return [Refused(lock, REASON_CANCELLED)] + self.process()

    def drop_owner(self, owner: int) -> None:
        for key in [k for k in self.locks if k[0] == owner]:
            lock = self.locks.pop(key)
            for q in (self.granted, self.converting, self.waiting):
                if lock in q:
                    q.remove(lock)

    # ------------------------------------------------------------ rebuild
    def add_recovered(self, owner: int, lockid: int, granted: Optional[Mode],
                      requested: Optional[Mode], flags: int) -> None:
        lock = MasterLock(owner, lockid, granted, requested, flags)
        self.locks[lock.key] = lock
        if granted is not None:
            self.granted.append(lock)
            if requested is not None:
                self.converting.append(lock)
        elif requested is not None:
            self.waiting.append(lock)

    def refuse_blocked_noqueue(self) -> list:
        """After a rebuild, NOQUEUE requests that still cannot be granted go."""
        out = []
        for lock in list(self.converting):
            if lock.flags & FLAG_NOQUEUE:
                self.converting.remove(lock)
                lock.requested = None
                out.append(Refused(lock, REASON_WOULD_BLOCK))
        for lock in list(self.waiting):
            if lock.flags & FLAG_NOQUEUE:
                self.waiting.remove(lock)
                del self.locks[lock.key]
                out.append(Refused(lock, REASON_WOULD_BLOCK))
        return out

    # ------------------------------------------------------------ internals
    def _grant(self, lock: MasterLock) -> Granted:
        mode = lock.requested
        if lock.granted is None:
            self.granted.append(lock)
        lock.granted = mode
        lock.requested = None
        lock.basted.clear()
        return Granted(lock, mode)

    def process(self) -> list:
        out: list = []
        while self.converting:
            head = self.converting[0]
            if self.blockers(head, head.requested):
                break
            self.converting.pop(0)
            out.append(self._grant(head))
        if self.converting:
            head = self.converting[0]
            stuck = self.blockers(head, head.requested)
            if all(b in self.converting for b in stuck):
                for b in stuck:
                    self.converting.remove(b)
                    b.requested = None
                    out.append(Refused(b, REASON_DEADLOCK))
        if not self.converting:
            while self.waiting:
                head = self.waiting[0]
                if self.blockers(head, head.requested):
                    break
                self.waiting.pop(0)
                out.append(self._grant(head))
        for queued in self.converting + self.waiting:
            for holder in self.blockers(queued, queued.requested):
                if queued.requested not in holder.basted:
                    holder.basted.add(queued.requested)
                    out.append(Blocking(holder, queued.requested))
        return out
