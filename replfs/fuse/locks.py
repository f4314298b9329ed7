"""Node-local POSIX byte-range and flock lock table, with deadlock detection.

Pure code (no trio, os or clocks): the session driver and the Operations
helpers in ``lockops.py`` do the waiting.  Semantics follow fcntl(2) and
flock(2) as Linux implements them for local filesystems, because that is
what programs written against ext4 expect from a mount:

* Locks are held by an *owner* per *key* (the filesystem's identity of an
  inode, so two mounts of one volume share locks) and *kind*: POSIX
  (fcntl/lockf) and FLOCK live in separate namespaces and never conflict
  with each other, as on Linux.
* An owner's ranges on one key are kept sorted, disjoint and canonical:
  a new lock replaces whatever the owner held in its range (a conversion),
  and touching or overlapping ranges of the same type merge, so an unlock
  of the middle of a lock splits it in two.
* Read locks are shared, write locks exclusive, between different owners;
  an owner never conflicts with itself.
* Ranges are inclusive ``[start, end]``; ``end == OFFSET_MAX`` is "to end
  of file", which is how the kernel encodes len 0 and flock.
* An owner is ``Owner(mount, id)``: the kernel's lock-owner ids are only
  unique per FUSE connection, and a dead mount's locks must all go at once.
* Blocking waits register wait-for edges (waiter -> owners it waits for);
  a wait that would close a cycle is refused (EDEADLK), as the kernel does
  for local POSIX locks but cannot do for locks a FUSE daemon holds.

The conflict source is pluggable: ``LockTable(remote=...)`` asks an extra
``ConflictSource`` (later: the cluster's lock manager, for locks held on
other nodes) in addition to its own table.  Only the local table exists now.
"""
from __future__ import annotations

import bisect
import enum
from dataclasses import dataclass
from typing import Hashable, Iterable, NamedTuple, Protocol

F_RDLCK = 0     # Linux values, as the kernel sends them in fuse_file_lock.type
F_WRLCK = 1
F_UNLCK = 2
OFFSET_MAX = 0x7FFFFFFFFFFFFFFF

TYPE_NAMES = {F_RDLCK: "read", F_WRLCK: "write", F_UNLCK: "unlock"}


class Kind(enum.Enum):
    POSIX = "posix"
    FLOCK = "flock"


class Owner(NamedTuple):
    mount: Hashable     # the session (FUSE connection) that owner ids belong to
    id: int             # the kernel's lock owner id


@dataclass(frozen=True, slots=True)
class Range:
    start: int
    end: int            # inclusive
    type: int           # F_RDLCK or F_WRLCK
    pid: int


@dataclass(frozen=True, slots=True)
class Conflict:
    """A lock that stands in the way: what GETLK reports."""
    owner: Owner
    start: int
    end: int
    type: int
    pid: int


class LockError(Exception):
    """Misuse of the lock table (bad range or type): our bug, not the kernel's."""


class ConflictSource(Protocol):
    """Where conflicting locks held elsewhere come from (cluster backend)."""

    def conflicts(self, key: Hashable, kind: Kind, owner: Owner, type: int, start: int,
                  end: int) -> list[Conflict]: ...


def _check(type_: int, start: int, end: int) -> None:
    if type_ not in (F_RDLCK, F_WRLCK, F_UNLCK):
        raise LockError(f"lock type {type_!r} is not F_RDLCK, F_WRLCK or F_UNLCK")
    if not 0 <= start <= end <= OFFSET_MAX:
        raise LockError(f"lock range [{start}, {end}] is not within [0, OFFSET_MAX]")


def _incompatible(a: int, b: int) -> bool:
    return a == F_WRLCK or b == F_WRLCK


class LockTable:
    """All locks of one node, by (key, kind) then owner."""

    def __init__(self, remote: ConflictSource | None = None):
        self._locks: dict[tuple[Hashable, Kind], dict[Owner, list[Range]]] = {}
        # wait-for graph: waiter -> {wait token: owners it waits for}
        self._waits: dict[Owner, dict[int, frozenset[Owner]]] = {}
        self._next_token = 0
        self.remote = remote

    # ------------------------------------------------------------- queries

    def held(self, key: Hashable, kind: Kind, owner: Owner) -> list[Range]:
        return list(self._locks.get((key, kind), {}).get(owner, ()))

    def owners(self, key: Hashable, kind: Kind) -> list[Owner]:
        return list(self._locks.get((key, kind), {}))

    def keys(self) -> set[Hashable]:
        return {k for k, _ in self._locks}

    def conflicts(self, key: Hashable, kind: Kind, owner: Owner, type_: int, start: int,
                  end: int) -> list[Conflict]:
        """Every lock of another owner that overlaps and is incompatible,
        lowest start first."""
        _check(type_, start, end)
        if type_ == F_UNLCK:
            return []
        out = []
        for other, ranges in self._locks.get((key, kind), {}).items():
            if other == owner:
                continue
            for r in ranges:
                if r.start > end:
                    break
                if r.end >= start and _incompatible(type_, r.type):
                    out.append(Conflict(other, r.start, r.end, r.type, r.pid))
        if self.remote is not None:
            out.extend(self.remote.conflicts(key, kind, owner, type_, start, end))
        out.sort(key=lambda c: (c.start, c.end))
        return out

    def test(self, key: Hashable, kind: Kind, owner: Owner, type_: int, start: int,
             end: int) -> Conflict | None:
        """GETLK: the first lock that would block this one, or None."""
        found = self.conflicts(key, kind, owner, type_, start, end)
        return found[0] if found else None

    # ------------------------------------------------------------- changes

    def set(self, key: Hashable, kind: Kind, owner: Owner, type_: int, start: int, end: int,
            pid: int = 0) -> Conflict | None:
        """SETLK: apply the lock (or unlock) unless it conflicts; returns
        the first conflict and changes nothing in that case.  F_UNLCK never
        conflicts."""
        c = self.test(key, kind, owner, type_, start, end)
        if c is not None:
            return c
        self._apply(key, kind, owner, type_, start, end, pid)
        return None

    def _apply(self, key, kind, owner, type_, start, end, pid) -> None:
        table = self._locks.setdefault((key, kind), {})
        old = table.get(owner, [])
        new: list[Range] = []
        for r in old:
            # Cut [start, end] out of every range of this owner: the new
            # lock (or the unlock) replaces what was there.
            if r.end < start or r.start > end:
                new.append(r)
                continue
            if r.start < start:
                new.append(Range(r.start, start - 1, r.type, r.pid))
            if r.end > end:
                new.append(Range(end + 1, r.end, r.type, r.pid))
        fresh = None
        if type_ != F_UNLCK:
            fresh = Range(start, end, type_, pid)
            new.append(fresh)
        new.sort(key=lambda r: r.start)
        merged: list[Range] = []
        for r in new:
            if merged:
                last = merged[-1]
                # Adjacent (end + 1 == start) or overlapping ranges of one
                # type become one; a merge with the new lock takes its pid.
                if last.type == r.type and last.end + 1 >= r.start:
                    pid_ = pid if r is fresh else last.pid
                    merged[-1] = Range(last.start, max(last.end, r.end), r.type, pid_)
                    if r is fresh:
                        fresh = merged[-1]
                    continue
            merged.append(r)
        if merged:
            table[owner] = merged
        else:
            table.pop(owner, None)
            if not table:
                del self._locks[(key, kind)]

    def release_owner(self, key: Hashable, kind: Kind, owner: Owner) -> bool:
        """Drop every lock ``owner`` holds on ``key`` (close, FLUSH, RELEASE)."""
        table = self._locks.get((key, kind))
        if not table or owner not in table:
            return False
        del table[owner]
        if not table:
            del self._locks[(key, kind)]
        return True

    def drop_mount(self, mount: Hashable) -> set[Hashable]:
        """A mount died: drop all locks and waits of its owners.  Returns
        the keys whose locks changed (their waiters must look again)."""
        changed = set()
        for (key, kind) in list(self._locks):
            table = self._locks[(key, kind)]
            for owner in [o for o in table if o.mount == mount]:
                del table[owner]
                changed.add(key)
            if not table:
                del self._locks[(key, kind)]
        for waiter in [w for w in self._waits if w.mount == mount]:
            del self._waits[waiter]
        return changed

    # ------------------------------------------------------------- waiting

    def would_deadlock(self, waiter: Owner, blockers: Iterable[Owner]) -> bool:
        """Would ``waiter`` waiting for ``blockers`` close a wait-for cycle?"""
        seen: set[Owner] = set()
        todo = [b for b in blockers]
        while todo:
            o = todo.pop()
            if o == waiter:
                return True
            if o in seen:
                continue
            seen.add(o)
            for targets in self._waits.get(o, {}).values():
                todo.extend(targets)
        return False

    def start_wait(self, waiter: Owner, blockers: Iterable[Owner]) -> int:
        """Record that ``waiter`` sleeps until ``blockers`` let go; returns a
        token for ``end_wait`` (one owner can have several waiting threads)."""
        self._next_token += 1
        self._waits.setdefault(waiter, {})[self._next_token] = frozenset(blockers)
        return self._next_token

    def end_wait(self, waiter: Owner, token: int) -> None:
        waits = self._waits.get(waiter)
        if waits is not None:
            waits.pop(token, None)
            if not waits:
                del self._waits[waiter]

    def waiting(self) -> dict[Owner, set[Owner]]:
        """The wait-for graph, for diagnostics and tests."""
        return {w: set().union(*t.values()) for w, t in self._waits.items()}


def ranges_cover(ranges: list[Range], offset: int) -> Range | None:
    """The range of a canonical list that covers ``offset``, if any."""
    i = bisect.bisect_right([r.start for r in ranges], offset) - 1
    if i >= 0 and ranges[i].end >= offset:
        return ranges[i]
    return None
