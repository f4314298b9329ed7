"""What the mirror engine asks its driver to do (actions), as values.

Every engine call returns a list of these, to be carried out in order.
Tokens are ints from the engine; the driver reports each one's outcome
with ``Engine.done(token, result)``:

    DiskWrite / DiskFlush / PersistMeta    result 0, or an errno
    DiskRead                               result bytes, or an errno (int)
    RunHandler                             the handler's exit code, or None
                                           (no handler configured)
    ProbeDisk                              the backing disk's size in bytes
                                           (the data disk's, with external
                                           meta-data), or -errno
    GrowMeta                               0, or an errno

Driver obligations (the engine's correctness depends on them):

* ``Send`` packets go out on the session's connection in the order given;
  a send on a connection that has failed is dropped silently (the driver
  reports the failure with ``connection_lost``).
* Disk I/O may run concurrently and complete in any order, but a
  ``DiskWrite`` is reported done only once the data is in the backing
  file (the page cache is enough: durability is what ``DiskFlush`` adds).
* ``PersistMeta`` first flushes the data device (Linux's REQ_PREFLUSH:
  every data write already reported done becomes durable), then writes,
  in this order and each durable before the next, the bitmap pages, the
  activity log record (if any) and the superblock (if any); it is
  reported done only once all of it is durable.  The preflush is what
  lets a bitmap that says "in sync" never be more durable than the data
  it vouches for (a resync target's cleared bits, an extent leaving the
  activity log).
* ``ProbeDisk`` measures the backing disk as it is now (an admin may have
  grown it since it was attached); nothing changes.
* ``GrowMeta`` (online grow) moves the meta-data to ``layout`` and makes
  the usable size ``superblock.data_size``, crash-safely: flush the data,
  write the whole ``bitmap`` and an activity-log record of ``al_extents``
  (the other record's half zeroed) at the new place, flush, then write
  the superblock there and flush.  Until that last flush the old
  superblock, at the old place, is the valid one (the new area lies
  wholly past the old meta-data, which nothing overwrites before the
  engine lets I/O into the grown area, after done).  The driver records
  the new backing-disk size where its attach looks for a superblock that
  is not at the end of the disk (after a crash, or a disk grown while the
  resource was down), and from then on does every meta-data write
  (``PersistMeta``) at the new place and allows data I/O up to the new
  size.  The engine issues no other meta-data write meanwhile.
* ``Complete`` answers an application request (write, read, flush);
  ``OpDone`` an administrative one (primary, attach, ...).
* ``CloseConnection`` closes the session's socket; the driver does not
  report that session's loss back (the engine already knows).
* ``ReleaseDisk`` closes the backing files once the I/O already issued on
  them has finished.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..meta import format as md
from ..proto import packets as P


@dataclass(frozen=True)
class Send:
    session: int
    pkt: P.Packet


@dataclass(frozen=True)
class DiskWrite:
    token: int
    offset: int
    data: bytes


@dataclass(frozen=True)
class DiskRead:
    token: int
    offset: int
    length: int


@dataclass(frozen=True)
class DiskFlush:
    token: int


@dataclass(frozen=True)
class PersistMeta:
    token: int
    bitmap_pages: tuple[tuple[int, bytes], ...] = ()
    al_extents: tuple[int, ...] | None = None
    superblock: md.Superblock | None = None


@dataclass(frozen=True)
class ProbeDisk:
    token: int


@dataclass(frozen=True)
class GrowMeta:
    token: int
    layout: md.Layout
    bitmap: bytes
    al_extents: tuple[int, ...]
    superblock: md.Superblock


@dataclass(frozen=True)
class ReleaseDisk:
    pass


@dataclass(frozen=True)
class Complete:
    req: Any
    error: int = 0              # 0, or an errno
    data: bytes | None = None   # a read's data
    text: str = ""              # why it failed


@dataclass(frozen=True)
class OpDone:
    op: Any
    error: BaseException | None = None


@dataclass(frozen=True)
class PriLost:
    """This Primary's data is being discarded (after-sb call-pri-lost-after-
    sb) while the device is in use: stop what uses it (its mounts)."""
    why: str


@dataclass(frozen=True)
class RunHandler:
    token: int
    name: str


@dataclass(frozen=True)
class CloseConnection:
    session: int
    reason: str


@dataclass(frozen=True)
class Log:
    level: str      # "info" | "warning" | "error"
    text: str
