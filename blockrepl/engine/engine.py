"""Engine: one node's side of one replicated resource, sans I/O.

The engine owns every rule of the mirror: roles and disk states, the
handshake's sync decision, the write path (epochs, the activity log, when
protocols A, B and C complete), the receive path (the epoch barrier,
acknowledgements), remote reads, the bitmap exchange, resync as source
and target, online verify, fencing and suspended I/O, and what a lost
connection leaves out of sync.  It does no I/O and reads no clock: the
driver feeds it events and carries out the actions it returns
(``actions.py`` lists them with the driver's obligations).

Events (each returns the list of actions it causes):

    application   write(req, offset, data, flags)  read(req, offset, length)
                  flush(req)       (flags: WRITE_PREFLUSH | WRITE_FUA)
    admin         attach(op, sb, bitmap, al_extents)  detach(op)
                  primary(op, force)  secondary(op)  outdate(op)
                  invalidate(op)  invalidate_remote(op)  verify(op)
                  resize(op, assume_clean, limit)
                  new_current_uuid(op)  connect(op, discard_my_data)
                  disconnect(op)  resume_io(op)  pause_sync(op)  resume_sync(op)
                  opened(kind)  closed(kind)
    network       connecting()  connected() -> session
                  receive(session, pkt)  connection_lost(session, state, why)
    completions   done(token, result)
    time          tick(now)        (``deadline`` says when it is next due)

Inside, each sequence of steps is a *flow* (``flows.py``): a generator
that yields what it waits for.  A connection is a *session*; its flows
(handshake, receiver, pinger, resync sender) end with it.  Writes applied
for the peer and resync writes are not session flows: once issued, a disk
write always finishes under its range lock, and the next handshake waits
for them, so a late write can never land on a block a newer one covers.

Resync is pushed by the SyncSource, paced by core/resync_rate.py (a fixed
resync-rate, or DRBD's c-plan-ahead controller, throttled to c-min-rate
while application I/O competes); pause-sync on either node holds it
(PausedSyncS/PausedSyncT on both, told with SyncPause).  With csums-alg
the first pass sends block digests (ResyncCsum): the target clears the
blocks it has equal and answers which differ, and a later pass sends
only their data.  With data-integrity-alg every data-carrying packet
follows a DataDigest of its data, and a mismatch drops the connection.

What is deliberately like DRBD 8.4: the state names and their log lines
("conn( WFReportParams -> Connected )"), the UUID rules (core/uuids.py),
the activity log and bitmap (core/), the epoch barrier, protocol C
completing only after both disks have the write, and a Primary that loses
an UpToDate peer fencing before it acknowledges anything more.

Differences, on purpose: a new data generation starts lazily, at the first
write that cannot be replicated (not when the connection is lost); acks
travel on the one data connection (no separate meta socket).
"""
from __future__ import annotations

import errno
import hashlib
import math
import zlib
from collections import deque
from dataclasses import dataclass, replace
from typing import Any, Callable

from replfs.errors import EXIT_CONFIG, EXIT_NO_LOCAL_DISK, EXIT_STATE, ReplfsError

from ..core.actlog import EXTENT, ActivityLog, ActivityLogFull
from ..core.bitmap import BLOCK, Bitmap, blocks_of
from ..core.intervals import IntervalSet
from ..core.resync_rate import RateConfig, RateController
from ..core.states import (ERR_IMPLICIT_SHRINK, ERR_MD_DISK_TOO_SMALL, ERR_PAUSE_IS_CLEAR,
                           ERR_PAUSE_IS_SET, ERR_PIC_PEER_DEP, ERR_RESIZE_RESYNC,
                           SS_CONCURRENT_ST_CHG, SS_IS_DISKLESS, SS_NEED_CONNECTION,
                           SS_NO_UP_TO_DATE_DISK,
                           SS_PRIMARY_NOP, SS_RESYNC_RUNNING, SS_TWO_PRIMARIES,
                           exit_code_for, fail, refused_by_peer,
                           ConnState, DiskState, Role, StateChangeRefused, View,
                           check_outdate, check_promote, refuse)
from ..core.splitbrain import Policies, Resolution, resolve
from ..core.uuids import JUST_CREATED, Decision, Side, Uuids, compare
from ..meta import format as md
from ..proto import packets as P
from .actions import (CloseConnection, Complete, DiskFlush, DiskRead, DiskWrite, GrowMeta,
                      Log, OpDone, PersistMeta, PriLost, ProbeDisk, ReleaseDisk, RunHandler,
                      Send)
from .flows import FlowSet, Wait

RESYNC_CHUNK = 256 * 1024
RESYNC_WINDOW = 8 * 1024 * 1024
RECV_PARALLEL = 32
VERIFY_WINDOW = 8

# Connection states in which new application writes wait: the generation
# and bitmaps being exchanged must stay true meanwhile (on a SyncTarget, a
# write before the source's bitmap is merged would have its bits set again
# by the merge, and a stale resync chunk written over it).
_HOLD_WRITES = frozenset({ConnState.WFReportParams, ConnState.WFBitMapS,
                          ConnState.StartingSyncS, ConnState.WFBitMapT,
                          ConnState.StartingSyncT})


# Packets that answer this node's own requests (see Engine.receive).
_ANSWERS = frozenset({P.WriteAck, P.NegAck, P.RecvAck, P.FlushAck, P.PingAck,
                      P.ReadReply, P.RoleReply, P.ResizeReply, P.ResizeDone})


# Packets that carry data: with data-integrity-alg, each comes after the
# DataDigest of its data.
_DIGESTED = (P.Data, P.ResyncData, P.ReadReply)
_CHECKED = frozenset(_DIGESTED + (P.DataDigest,))

# A peer disk in one of these states holds data (and acknowledges writes).
_DISK_HOLDS_DATA = frozenset({DiskState.UpToDate, DiskState.Inconsistent,
                              DiskState.Consistent, DiskState.Outdated})

# ... and in these it has none (Attaching: not yet serving I/O)
_NO_DATA_DISK = frozenset({DiskState.Diskless, DiskState.Failed, DiskState.Attaching})

_LOST = "lost"        # an app flush whose FlushAck cannot come any more

# Flags of an application write, as Linux's REQ_PREFLUSH and REQ_FUA: the
# write lands only after every write completed before it is durable
# (PREFLUSH), and completes only once it is durable itself (FUA).  A
# journal commit is one such request, and one network round trip: the
# Flush, the Data and a second Flush go to the peer back to back, which
# handles them in order.
WRITE_PREFLUSH = 1
WRITE_FUA = 2


@dataclass(eq=False)
class _FuaMark:
    """A FUA write's peer Flush, sent right behind its Data, and the local
    flush done as soon as the local write is (while the peer's answers
    are on their way)."""
    seq: int | None = None
    flushed: Any = None         # the disk the local flush succeeded on
_REDECIDE = "redecide"    # a write decided for no disk, and one was attached


# ---------------------------------------------------------------- config
@dataclass(frozen=True)
class EngineConfig:
    """The parts of a resource's configuration the engine acts on."""
    name: str
    node: str
    peer: str
    protocol: str = "C"
    two_primaries: bool = False
    fencing: str | None = None          # as configured (None: not configured)
    after_sb_0pri: str = "disconnect"
    after_sb_1pri: str = "disconnect"
    after_sb_2pri: str = "disconnect"
    on_io_error: str = "detach"
    ping_int: float = 10.0
    ping_timeout: float = 0.5
    timeout: float = 6.0
    ko_count: int | None = None             # None: unacked writes drop the link after timeout;
                                            # N: after N x timeout; 0: never (pings only)
    resync_rate: int = 250 * 1024 * 1024   # bytes per second (the fixed rate, and the start)
    c_plan_ahead: float = 2.0               # seconds; 0: resync_rate is a fixed rate
    c_fill_target: int = 100 * 512          # bytes in flight; 0: use c_delay_target
    c_delay_target: float = 1.0             # seconds
    c_max_rate: int = 100 * 1024 * 1024     # bytes per second
    c_min_rate: int = 250 * 1024            # bytes per second under application I/O; 0: off
    csums_alg: str | None = None            # hashlib name: resync compares digests first
    integrity_alg: str | None = None        # hashlib name: every data packet is checked
    verify_alg: str | None = None           # hashlib name for online verify (None: BLAKE2b)
    on_congestion: str = "block"            # block | pull-ahead | disconnect (protocol A)
    congestion_fill: int = 0                # bytes in flight that mean congestion (0: off)
    congestion_extents: int = 1237          # hot activity-log extents that mean it too
    al_extents: int = 1237
    al_extent_size: int = EXTENT            # bytes one activity-log extent covers
    handlers: frozenset[str] = frozenset()  # names of configured handlers

    @classmethod
    def from_conf(cls, conf, node: str) -> "EngineConfig":
        peer = conf.peer_of(node)
        return cls(
            name=conf.name, node=node, peer=peer.name if peer else "",
            protocol=conf.protocol, two_primaries=conf.allow_two_primaries,
            fencing=conf.disk.get("fencing") or conf.net.get("fencing") or None,
            after_sb_0pri=conf.after_sb_0pri, after_sb_1pri=conf.after_sb_1pri,
            after_sb_2pri=conf.after_sb_2pri, on_io_error=conf.on_io_error,
            ping_int=conf.ping_int_s, ping_timeout=conf.ping_timeout_s,
            timeout=conf.timeout_s, ko_count=conf.ko_count,
            resync_rate=conf.resync_rate_kib * 1024, c_plan_ahead=conf.c_plan_ahead_s,
            c_fill_target=conf.c_fill_target_bytes, c_delay_target=conf.c_delay_target_s,
            c_max_rate=conf.c_max_rate_kib * 1024, c_min_rate=conf.c_min_rate_kib * 1024,
            csums_alg=conf.csums_alg, integrity_alg=conf.data_integrity_alg,
            verify_alg=conf.verify_alg, on_congestion=conf.on_congestion,
            congestion_fill=conf.congestion_fill_bytes,
            congestion_extents=conf.congestion_extents,
            al_extents=conf.al_extents,
            handlers=frozenset(k for k, v in conf.handlers.options if v))

    @property
    def rate(self) -> RateConfig:
        return RateConfig(self.resync_rate, self.c_plan_ahead, self.c_fill_target,
                          self.c_delay_target, self.c_max_rate, self.c_min_rate)


# ---------------------------------------------------------------- failures
class IOFailure(Exception):
    """An application request fails with ``errno``."""

    def __init__(self, err: int, text: str):
        super().__init__(text)
        self.errno = err


class MetaIOError(Exception):
    """The meta-data could not be written."""

    def __init__(self, err: int):
        super().__init__(f"meta-data write failed (errno {err})")
        self.errno = err


class Fatal(Exception):
    """The connection must not be retried (split brain, unrelated data...)."""


class Drop(Exception):
    """Drop this connection and go back to WFConnection."""

    def __init__(self, msg: str, state: ConnState = ConnState.NetworkFailure):
        super().__init__(msg)
        self.state = state


# ---------------------------------------------------------------- records
class Disk:
    """The engine's view of the attached backing disk: its meta-data."""

    def __init__(self, sb: md.Superblock, bitmap: Bitmap, al_capacity: int):
        self.sb = sb
        self.bitmap = bitmap
        self.al = ActivityLog(min(al_capacity, 3000))
        self.al_unsettled: set[int] = set()   # made hot by a transaction in flight
        self.sb_dirty = False                  # sb changed since it was last written
        self.meta_busy = False                 # a meta-data write is in flight
        self.crashed_primary = False
        self.full_if_target = False            # failed under this node (see _attach)


@dataclass(eq=False)
class Pending:
    """A replicated write the peer has not confirmed yet."""
    offset: int
    length: int
    epoch: int
    t0: float
    disk: Disk | None = None       # whose activity log still covers it
    extents: tuple = (0, -1)
    acked: bool = False            # the peer's disk has it
    acked_uptodate: bool = False   # ... and that disk was UpToDate then
    received: bool = False         # the peer has it (protocol B)
    done: bool = False
    abandoned: bool = False        # held while fencing, then the peer came back
    local_ok: bool = False         # the local disk has it


@dataclass(eq=False)
class _Join:
    """A disk attached under a live connection, waiting for the peer's
    AttachReply.  result: None while waiting, then whether it joined."""
    disk: Disk
    dstate: DiskState
    result: bool | None = None
    reason: str = ""
    error: int = 0                 # the disk failed while joining (errno)


@dataclass(eq=False)
class SyncRun:
    role: str                      # "source" | "target"
    total: int                     # blocks
    start: float
    window: int = RESYNC_WINDOW // RESYNC_CHUNK
    acked: int = 0
    rate: RateController | None = None     # the source's pacing
    app_seen: int = 0              # Engine.app_io when the pacing last looked
    paused_since: float | None = None
    paused_total: float = 0.0      # seconds spent paused (pause-sync)
    csum_blocks: int = 0           # blocks compared by digest (csums-alg)
    equal_blocks: int = 0          # ... of which were equal (no data sent)

    def paused_time(self, now: float) -> float:
        extra = now - self.paused_since if self.paused_since is not None else 0.0
        return self.paused_total + extra


@dataclass(eq=False)
class VerifyRun:
    start: float
    total: int
    done: int = 0
    oos: int = 0
    window: int = VERIFY_WINDOW
    rate: RateController | None = None
    app_seen: int = 0


def _role_code(r: Role) -> int:
    return P.ROLE_CODES.index(r.value)


def _disk_code(d: DiskState) -> int:
    return P.DISK_CODES.index(d.value)


def _peer_role(code: int) -> Role:
    if not 0 <= code < len(P.ROLE_CODES):
        raise P.RemoteProtocolError(f"bad role code {code}")
    return Role(P.ROLE_CODES[code])


def _peer_disk(code: int) -> DiskState:
    if not 0 <= code < len(P.DISK_CODES):
        raise P.RemoteProtocolError(f"bad disk state code {code}")
    return DiskState(P.DISK_CODES[code])


def sp_flags(p: P.Params | None) -> int:
    return p.flags if p is not None else 0


def side_of(p: P.Params, name: str) -> Side:
    """One node's inputs to the sync decision, from the Params it sent."""
    return Side(Uuids(p.current, p.bitmap, (p.history1, p.history2)),
                inconsistent=bool(p.flags & P.PF_INCONSISTENT),
                crashed_primary=bool(p.flags & P.PF_CRASHED_PRIMARY),
                primary=p.role == _role_code(Role.Primary), oos_blocks=p.oos_blocks,
                name=name, outdated=p.disk == _disk_code(DiskState.Outdated),
                failed=bool(p.flags & P.PF_FULL_IF_TARGET))


def csums_of(alg: str, data: bytes) -> bytes:
    """The ``alg`` digest of each 4 KiB block (csums-alg resync)."""
    return b"".join(hashlib.new(alg, data[i:i + BLOCK]).digest()
                    for i in range(0, len(data), BLOCK))


def digest_size(alg: str) -> int | None:
    """The digest size of hashlib algorithm ``alg`` (None: unknown, or
    one of variable length)."""
    try:
        size = hashlib.new(alg).digest_size
    except (ValueError, TypeError):
        return None
    return size or None


def block_digests(data: bytes, alg: str | None = None) -> bytes:
    """16-byte digests of each 4 KiB block, as online verify compares them:
    verify-alg's digest (cut or zero-padded to 16 bytes), BLAKE2b-128
    when none is configured."""
    if not alg:
        return b"".join(hashlib.blake2b(data[i:i + BLOCK], digest_size=16).digest()
                        for i in range(0, len(data), BLOCK))
    return b"".join(hashlib.new(alg, data[i:i + BLOCK]).digest()[:16].ljust(16, b"\0")
                    for i in range(0, len(data), BLOCK))


def _until(pred: Callable[[], bool], until: float = math.inf):
    """Wait until ``pred()`` (or the clock reaches ``until``)."""
    if not pred():
        yield Wait(pred, until)


# ---------------------------------------------------------------- the engine
class Engine:
    """One node's replication state machine for one resource."""

    # State attribute -> the word DRBD logs its changes under.
    _STATE_WORDS = (("cstate", "conn"), ("dstate", "disk"), ("role", "role"),
                    ("pdsk", "pdsk"), ("peer_role", "peer"))

    def __init__(self, cfg: EngineConfig, *, new_uuid: Callable[[], int],
                 now: float = 0.0):
        self.cfg = cfg
        self.now = now
        self._new_uuid = new_uuid      # fresh generation UUIDs (randomness is an input)
        self.flows = FlowSet(lambda: self.now, self._flow_failed)
        self._out: list = []
        # States, as DRBD shows them.
        self.role = Role.Secondary
        self.peer_role = Role.Unknown
        self.cstate = ConnState.StandAlone
        self.dstate = DiskState.Diskless
        self.pdsk = DiskState.DUnknown
        self.disk: Disk | None = None
        self.size = 0                  # agreed device size (kept while Diskless)
        self.want_connect = False
        self.discard_my_data = False
        self.split_brain = False
        self.last_event = ""
        self.susp = False              # fencing: writes wait for resume-io
        # The fence-peer handler said this node lost (exit 6): its disk is
        # Outdated, nothing more is written or acknowledged, and no new data
        # generation starts, so that when the link is back it is a plain
        # SyncTarget of the winner (no split brain).
        self.fence_lost = False
        self.concurrent_writes = 0
        # Opens of the device, by kind ("any" counts all of them).
        self.opens = {"any": 0, "single": 0, "shared": 0}
        self._peer_promotion_allowed_at = -math.inf
        # Session (one per established connection).
        self.session = 0
        self.live = False              # the current session's connection is up
        self._losing = False           # a lost connection is being cleaned up
        self._rx: deque = deque()
        self.last_heard = now
        self._sent_params: P.Params | None = None
        self.peer_params: P.Params | None = None
        self._peer_bitmap_done = False
        self._joining: _Join | None = None     # a disk attached under the live connection
        self._joined_unmerged = False          # ... joined; the peer's bitmap not yet merged
        self.ed_uuid = 0                       # see _note_exposed_data
        self.peer_current = 0                  # the peer's current UUID, as last told
        self._disk_failed = False              # a local disk failed; none attached since
        self._unconfirmed_generation = None    # (new, old) Uuids whose write failed
        # Writes completed with only this disk's volatile cache holding them
        # (no UpToDate peer acknowledged them), and how many of those a
        # completed flush covers.  A disk failure with some not covered
        # fails the next flush once (as Linux reports a writeback error).
        self._lone_writes = 0
        self._lone_flushed = 0
        self._demoting = False          # a secondary request is under way
        self._writeback_error = False
        self._quiesce = 0              # handshakes agreeing generation/bitmap
        # Write path.
        self._seq = 0
        self._epoch = 0                # epoch of the writes being sent
        self._epoch_closed = False     # a write completed since the last send
        self._pending: dict[int, Pending] = {}
        # app flushes waiting for the peer's FlushAck: False while waiting,
        # True once it came, _LOST if the peer's disk or the link went first
        self._flushes: dict[int, object] = {}
        # The transfer log: writes the peer acknowledged but may still hold
        # only in a volatile cache (its disk's, or its page cache before a
        # power failure).  A FlushAck for a Flush sent after them proves
        # them durable; a connection lost before that leaves them out of
        # sync, so that a peer that lost its cache is resynced (DRBD keeps
        # requests in its transfer log until the epoch's barrier ack).
        self._unstable: deque = deque()      # of Pending (still holding the AL)
        self._unstable_added = 0             # ever appended
        self._unstable_dropped = 0           # ever proven durable
        self._flush_marks: dict[int, int] = {}   # Flush seq -> _unstable_added then
        self._reads: dict[int, list] = {}
        self._role_replies: dict[int, int | None] = {}
        # Online grow: this node's resize in progress (the peer refuses
        # one of its own meanwhile), the backing-disk size measured for
        # it, the peer's answers by token.
        self._resizing = False
        self._probed_disk_size = 0
        self._resize_answers: dict[int, P.Packet | None] = {}
        self._ranges = IntervalSet()   # application ranges being written / resynced
        self._app_writes: dict[int, tuple[int, int]] = {}
        self._unrepl_inflight = 0
        self._uuid_busy = False
        self._promoting = 0            # a promotion of this node is being decided
        self._fencing = False          # a fence-peer run for writes without the peer
        self._role_news = False        # tell the peer our role once connected
        self._deciding = False         # the handshake's decision is being made
        self._lost_after_decision: tuple | None = None
        self._role_at_split: Role | None = None   # our role when the last link ended
        self._gen_pending = 0          # a lost link's new generation is not written yet
        self._held: list[Pending] = []  # completed by a lost link while fencing
        # Receive path.
        self._recv_ranges = IntervalSet()
        self._recv_epoch = 0
        self._recv_slots = 0
        self._sync: SyncRun | None = None
        self._verify: VerifyRun | None = None
        self._rx_digest: bytes | None = None   # data-integrity-alg: for the next data packet
        self._integrity: str | None = None     # the session's data-integrity-alg (agreed)
        self._verify_alg: str | None = None    # the session's verify-alg (agreed)
        # pause-sync: this node's flag (kept across resyncs and connections,
        # as DRBD's user_isp) and the peer's (known while connected).
        self.user_isp = False
        self.peer_isp = False
        self.app_io = 0                # application requests ever started (here or the peer's)
        # /proc/drbd counters (bytes or counts).
        self.ns = self.nr = self.dw = self.dr = 0
        self.lo = self.ap = self.ua = 0
        self.al_writes = self.bm_writes = 0

    # ============================================================ plumbing
    def _emit(self, action) -> None:
        self._out.append(action)

    def _drain(self) -> list:
        # (never called from inside a flow: the actions would go astray)
        assert not self.flows.running, "an engine event called from inside a flow"
        self.flows.run()
        out, self._out = self._out, []
        return out

    def _log(self, level: str, text: str) -> None:
        self._emit(Log(level, f"{self.cfg.name}: {text}"))

    def _start(self, gen, *, group: Any = None, name: str = "") -> None:
        self.flows.start(gen, group=group, name=name)

    def _flow_failed(self, flow, exc: BaseException) -> None:
        if flow.group is not None and flow.group == self.session and self.live:
            self._session_failed(exc)
            return
        if isinstance(exc, (Drop, Fatal, P.RemoteProtocolError)):
            return      # a session flow of a connection already gone
        self._log("error", f"internal error in {flow.name}: {exc!r}")

    def _set(self, **changes) -> None:
        """Change states, logging each change the way DRBD does."""
        for attr, word in self._STATE_WORDS:
            new = changes.pop(attr, None)
            old = getattr(self, attr)
            if new is not None and new is not old:
                self._log("info", f"{word}( {old.value} -> {new.value} )")
                setattr(self, attr, new)
        assert not changes, f"unknown state fields {sorted(changes)}"
        self._note_exposed_data()
        if self.fence_lost and self.dstate is DiskState.UpToDate:
            # resynced from the winner: the lost decision is behind us
            self.fence_lost = False
            if self.susp:
                self._log("warning", "susp( 1 -> 0 ) resynced after a lost fence-peer "
                                     "decision")
            self.susp = False

    def _note_exposed_data(self, peer_current: int = 0) -> None:
        """ed_uuid, as DRBD's: the generation of the data this Primary
        serves -- its own disk's, or (without one) the peer's it last
        connected to.  A Primary that lost its disk may connect only to a
        peer with that data or data grown from it (_session_main)."""
        if self.role is not Role.Primary:
            return
        disk = self.disk
        if disk is not None and self.dstate in (DiskState.UpToDate, DiskState.Consistent):
            self.ed_uuid = disk.sb.uuids.current
        elif disk is None and peer_current:
            self.ed_uuid = peer_current

    def _send(self, pkt: P.Packet) -> None:
        if self.live:
            self._emit(Send(self.session, pkt))

    def _send_data(self, pkt: P.Packet, data: bytes) -> None:
        """Send a packet carrying data; with data-integrity-alg, its digest
        goes right before it."""
        alg = self._integrity
        if alg and self.live:
            self._send(P.DataDigest(hashlib.new(alg, data).digest()))
        self._send(pkt)

    def _take_digest(self, pkt) -> bool:
        """data-integrity-alg, as packets arrive: keep a DataDigest for the
        packet after it (True: nothing more to do with it), check that
        packet's data against it."""
        if type(pkt) is P.DataDigest:
            if self._rx_digest is not None:
                raise P.RemoteProtocolError("two DataDigests in a row")
            self._rx_digest = pkt.digest
            return True
        self._check_integrity(pkt)
        return False

    def _check_integrity(self, pkt) -> None:
        """data-integrity-alg: the data of ``pkt`` must match the digest
        sent before it; if not, DRBD's error, and the connection goes."""
        digest, self._rx_digest = self._rx_digest, None
        if digest is None:
            raise P.RemoteProtocolError(f"{type(pkt).__name__} without its digest "
                                        f"(data-integrity-alg)")
        data = pkt.data
        if not self._digest_ok(hashlib.new(self._integrity, data).digest(), digest):
            where = getattr(pkt, "offset", None)
            where = f"{where // 512}s +{len(data)}" if where is not None else \
                f"read reply {pkt.seq} +{len(data)}"
            self._log("error", f"Digest integrity check FAILED: {where}")
            self.last_event = f"data-integrity-alg: digest integrity check failed ({where})"
            raise Drop("data-integrity-alg: the data did not match its digest; dropping "
                       "the connection", ConnState.ProtocolError)

    @staticmethod
    def _digest_ok(mine: bytes, theirs: bytes) -> bool:
        return mine == theirs

    def _tell_peer_state(self, dstate: DiskState | None = None) -> None:
        if self.live and self.cstate.is_connected:
            self._send(P.StateUpdate(_role_code(self.role), _disk_code(dstate or self.dstate)))

    def view(self) -> View:
        return View(self.role, self.peer_role, self.dstate, self.pdsk, self.cstate,
                    self.cfg.two_primaries)

    def counters(self) -> dict:
        """What status shows of the engine's inside: requests waiting for
        the peer (pe), their epochs (ep), the resync and verify runs."""
        return {"pe": len(self._pending),
                "ep": max(1, len({p.epoch for p in self._pending.values()})),
                "sync": self._sync, "verify": self._verify}

    @property
    def deadline(self) -> float:
        """When ``tick`` must be called next (inf: not before another event)."""
        return self.flows.next_deadline()

    @property
    def can_connect(self) -> bool:
        """The driver should be establishing a connection now."""
        return self.want_connect and not self.live and not self._losing

    @property
    def fencing(self) -> str:
        """The policy in effect: the configured one; with none configured,
        resource-and-stonith while a filesystem is mounted on both nodes
        (two writers must never both go on after losing each other)."""
        if self.cfg.fencing:
            return self.cfg.fencing
        return "resource-and-stonith" if self.opens["shared"] else "dont-care"

    # ------------------------------------------------------------ waiting helpers
    def _issue(self, action_type, *args) -> int:
        token = self.flows.token()
        self._emit(action_type(token, *args))
        return token

    def _persist(self, disk: Disk, *, sb: md.Superblock | None = None,
                 al: bool = False):
        """Write the bitmap's dirty pages (and the activity log, and ``sb``).

        One meta-data write at a time, each with what memory holds when it
        starts: written concurrently, a later one (a superblock clearing
        the Primary flag) could land before an earlier one (the bits of
        the writes the peer lacks), and a crash in between lose both."""
        moved = sb is not None and sb.uuids.current != disk.sb.uuids.current
        if sb is not None:
            disk.sb = sb
            disk.sb_dirty = True
        yield from _until(lambda: not disk.meta_busy)
        pages = tuple(disk.bitmap.take_dirty_pages())
        sbw = disk.sb if disk.sb_dirty else None
        if not pages and sbw is None and not al:
            return
        disk.sb_dirty = False
        disk.meta_busy = True
        self.bm_writes += len(pages)
        self.al_writes += al
        try:
            token = self._issue(PersistMeta, pages, tuple(disk.al.extents) if al else None,
                                sbw)
            err = yield token
        finally:
            disk.meta_busy = False
        if err:
            disk.bitmap.mark_all_pages_dirty()
            disk.sb_dirty = disk.sb_dirty or sbw is not None
            if self.disk is disk:
                # A meta-data write that fails is a local I/O error like any
                # other (on-io-error): with detach, the disk goes at once --
                # a write waiting for this activity-log transaction, or for
                # these bits to be on disk, must not be issued to it.
                yield from self._local_io_error("meta-data write", err, 0, 0)
            raise MetaIOError(err)
        if moved and self.disk is disk and self.live and self.cstate.is_connected:
            # (a peer without a disk serving our data follows it: ed_uuid)
            self._send(P.CurrentUuid(disk.sb.uuids.current))

    def _op(self, op, gen):
        """Run an administrative request; OpDone carries its refusal."""
        try:
            yield from gen
        except (ReplfsError, StateChangeRefused) as e:
            self._emit(OpDone(op, e))
        except MetaIOError as e:
            self._emit(OpDone(op, ReplfsError(f"{self.cfg.name}: {e}", EXIT_STATE)))
        except Exception as e:      # a bug: say so, and never leave the caller waiting
            self._log("error", f"internal error: {e!r}")
            self._emit(OpDone(op, ReplfsError(f"{self.cfg.name}: internal error: {e!r}",
                                              EXIT_STATE)))
        else:
            self._emit(OpDone(op, None))

    def _app(self, req, gen):
        """Run an application request; Complete carries its result."""
        try:
            data = yield from gen
        except IOFailure as e:
            self._emit(Complete(req, e.errno, None, str(e)))
        except MetaIOError as e:
            self._emit(Complete(req, errno.EIO, None, str(e)))
        except Exception as e:      # a bug: say so, and never leave the caller waiting
            self._log("error", f"internal error: {e!r}")
            self._emit(Complete(req, errno.EIO, None, f"internal error: {e!r}"))
        else:
            self._emit(Complete(req, 0, data))

    # ============================================================ events
    def tick(self, now: float) -> list:
        self.now = max(self.now, now)
        return self._drain()

    def done(self, token: int, result: Any = 0) -> list:
        self.flows.complete(token, result)
        return self._drain()

    def opened(self, kind: str = "any") -> list:
        """The device was opened: "any" counts every open; "single" (a
        filesystem mounted for one node alone) and "shared" (mounted on
        both nodes) are counted on their own, besides."""
        self.opens[kind] += 1
        return self._drain()

    def closed(self, kind: str = "any") -> list:
        self.opens[kind] = max(0, self.opens[kind] - 1)
        return self._drain()

    def check_single_open(self) -> None:
        """Raise if a filesystem mounted for one node alone may not open the
        device now: the peer is Primary or was just allowed to become it."""
        recently = self.now - self._peer_promotion_allowed_at < self.cfg.timeout + 2
        if self.peer_role is Role.Primary or recently:
            raise ReplfsError(
                f"{self.cfg.name}: the peer is Primary too; this filesystem is mounted "
                f"on one node at a time: unmount it there and make it Secondary "
                f"('replfsadm secondary {self.cfg.name}' on the peer)", EXIT_STATE)

    # ============================================================ disk
    def attach(self, op, sb: md.Superblock, bitmap: Bitmap, al_extents: list[int]) -> list:
        self._start(self._op(op, self._attach(sb, bitmap, al_extents)), name="attach")
        return self._drain()

    def _attach(self, sb, bitmap, al_extents):
        if self.disk is not None:
            return
        if self.dstate is DiskState.Failed:
            self._emit(ReleaseDisk())
            raise ReplfsError(f"{self.cfg.name}: the failed disk is still being detached; "
                              f"try again in a moment", EXIT_STATE)
        disk = Disk(sb, bitmap, self.cfg.al_extents)
        nblocks = len(bitmap)
        if self.role is Role.Primary and not self._may_join_live(disk):
            # (DRBD: "Can only attach to data with current UUID") A Primary
            # without a disk serves its peer's data; a disk attached now
            # may be older than that -- it missed what was written while
            # it was away -- and only the peer can say by how much.
            self._emit(ReleaseDisk())
            raise ReplfsError(
                f"{self.cfg.name}: State change failed: this node is Primary without a "
                f"disk: a disk can only be attached while Connected to an UpToDate peer "
                f"(it then resyncs from it); or demote this node first", EXIT_STATE)
        if sb.has(md.F_PRIMARY):
            # Went down while Primary: blocks of every hot extent may
            # differ from the peer's copy.
            disk.crashed_primary = True
            for e in al_extents:
                per = self.cfg.al_extent_size // BLOCK
                first = e * per
                if first < nblocks:
                    bitmap.set_range(first, min(per, nblocks - first))
            if al_extents:
                self._log("warning", f"was Primary when it went down; marking "
                                     f"{len(al_extents)} activity-log extents out of sync")
        self._set(dstate=DiskState.Attaching)
        yield from self._attach_persist(disk)
        if self.role is Role.Primary:
            yield from self._attach_persist(disk, disk.sb.with_flags(set_=md.F_PRIMARY))
        unused = self._unconfirmed_generation
        if unused is not None and disk.sb.uuids.current == unused[0].current:
            # The disk failed while a new generation was being written to
            # it: the write landed after all, but it was reported failed,
            # so no write of that generation was ever acknowledged.  Back
            # to the one before, which is what this node (and its peer)
            # went on with.
            self._log("warning", "new current UUID %016X reached the failed disk although "
                                 "its write failed; no write of it was acknowledged: back "
                                 "to %016X" % (unused[0].current, unused[1].current))
            yield from self._attach_persist(disk, replace(disk.sb, uuids=unused[1]))
        self._unconfirmed_generation = None
        ds = self._attached_state(disk.sb)
        if self._disk_failed:
            # A disk that failed under this node: what it missed at the
            # moment it failed (writes in its cache, a write that failed on
            # it while the note of it to the peer was lost with the link)
            # is recorded nowhere.  Should it be the SyncTarget, all of it
            # is resynced (PF_FULL_IF_TARGET); and it is Outdated -- never
            # promoted on its own, never the winner within a generation.
            disk.full_if_target = True
            if ds in (DiskState.UpToDate, DiskState.Consistent):
                yield from self._attach_persist(disk, disk.sb.with_flags(set_=md.F_OUTDATED))
                ds = DiskState.Outdated
            self._log("warning", "this disk failed earlier: Outdated; resynced in full if "
                                 "it is the SyncTarget")
            self._disk_failed = False
        if self._may_join_live(disk):
            if (yield from self._join_live(disk, ds)):
                return
        if self.role is Role.Primary:
            # The peer refused, or the link went while the disk was being
            # prepared: the rule checked at the start holds.
            self._set(dstate=DiskState.Diskless)
            self._emit(ReleaseDisk())
            raise ReplfsError(f"{self.cfg.name}: State change failed: this node is Primary "
                              f"without a disk and the peer did not take the attached disk "
                              f"as SyncTarget (see the log); demote this node first",
                              EXIT_STATE)
        self.disk = disk
        self.size = sb.data_size
        self._set(dstate=ds)
        self._tell_peer_state()
        if self.live:
            # A disk attached under a live connection (or during its
            # handshake, which told the peer there was none) that the peer
            # would not resync in place: agree afresh.
            self._end_session(ConnState.NetworkFailure, False, "disk attached: reconnecting")

    def _attach_persist(self, disk: Disk, sb: md.Superblock | None = None):
        """A meta-data write of a disk being attached; if it fails, the
        attach fails and the disk is released."""
        try:
            yield from self._persist(disk, sb=sb)
        except MetaIOError:
            self._set(dstate=DiskState.Diskless)
            self._emit(ReleaseDisk())
            raise

    def _attached_state(self, sb: md.Superblock) -> DiskState:
        """The state a disk with this superblock has when it is attached."""
        if not sb.has(md.F_CONSISTENT):
            return DiskState.Inconsistent
        if sb.has(md.F_OUTDATED):
            return DiskState.Outdated
        if sb.has(md.F_WAS_UP_TO_DATE) and (not self.cfg.fencing
                                           or self.cfg.fencing == "dont-care"
                                           or sb.has(md.F_PEER_OUTDATED)):
            return DiskState.UpToDate
        # As DRBD: with fencing, data not known to be newer than the peer's
        # is only Consistent until the pair connects or the peer is fenced
        # (a node that rebooted alone may have missed writes the peer made
        # after fencing it).
        return DiskState.Consistent

    def _may_join_live(self, disk: Disk) -> bool:
        """A disk attached while Connected to an UpToDate peer (a disk that
        failed and came back, say) is offered to the peer as SyncTarget on
        the same connection, as DRBD does: dropping the connection instead
        would make a Primary peer fence this node."""
        return (self.live and self.cstate is ConnState.Connected
                and self.pdsk is DiskState.UpToDate and self._joining is None
                and disk.sb.data_size == self.size)

    def _join_live(self, disk: Disk, ds: DiskState):
        """Send the attached disk's Params on the live connection and wait
        for the peer's AttachReply (_on_attach_reply installs the disk).
        True: joined; False: the caller attaches it the old way."""
        session = self.session
        join = _Join(disk, ds)
        self._joining = join
        try:
            self._log("info", "disk attached while connected: asking the peer to resync it")
            # Our writes that went to the peer alone land there (and are
            # marked there, as the only copy) before it hears of the disk;
            # none starts until the join is over (_replicated_write).
            yield from _until(lambda: not any(p.disk is None for p in self._pending.values())
                              or self.session != session or not self.live)
            if self.session != session or not self.live:
                return False
            self._send(self._my_params(disk, ds))
            yield from _until(lambda: join.result is not None or self.session != session
                              or not self.live)
        finally:
            self._joining = None
        if join.error:
            raise MetaIOError(join.error)
        if join.result is None:
            return False        # the link went first
        if not join.result:
            self._log("warning", f"the peer will not resync the attached disk on this "
                                 f"connection ({join.reason}): reconnecting")
        return join.result

    def detach(self, op) -> list:
        self._start(self._op(op, self._detach()), name="detach")
        return self._drain()

    def _detach(self):
        if self.disk is None:
            return
        if self.role is Role.Primary and not self._peer_serves():
            raise ReplfsError(f"{self.cfg.name}: State change failed: (-2) Refusing to "
                              f"detach the disk of a Primary without an UpToDate peer",
                              EXIT_STATE)
        if self.cstate.is_syncing:
            raise refuse(SS_RESYNC_RUNNING)
        yield from _until(lambda: not len(self._ranges) and not self.lo)
        disk, self.disk = self.disk, None
        self._tell_peer_state(DiskState.Diskless)    # (before any write goes to it alone)
        try:
            yield from self._persist(disk)
        finally:
            self._emit(ReleaseDisk())
            self._set(dstate=DiskState.Diskless)
            self._tell_peer_state()

    # ============================================================ roles
    def primary(self, op, force: bool = False) -> list:
        self._start(self._op(op, self._primary(force)), name="primary")
        return self._drain()

    def _primary(self, force: bool):
        if self.role is Role.Primary:
            return
        self._promoting += 1
        try:
            yield from self._become_primary(force)
        finally:
            self._promoting -= 1

    def _become_primary(self, force: bool):
        while True:
            # (judged with the link settled: not while it is being lost,
            # nor while a handshake is still agreeing who syncs from whom)
            yield from _until(lambda: not self._losing and not (
                self.live and self.cstate is ConnState.WFReportParams))
            link = (self.session, self.live, self.cstate.is_connected)
            yield from self._may_promote(force)
            disk = self.disk
            if disk is not None and not disk.sb.has(md.F_PRIMARY):
                yield from self._persist(disk, sb=disk.sb.with_flags(set_=md.F_PRIMARY))
            if (self.session, self.live, self.cstate.is_connected) == link \
                    and not self._losing:
                break
            # The connection came or went while we waited: what the peer
            # agreed to (or could not object to) is stale; judge again.
            self._log("info", "connection changed during promotion; checking again")
        self._set(role=Role.Primary)
        if self.live:
            self._note_exposed_data(self.peer_current)
        self._tell_peer_state()
        if force and self.cstate is ConnState.Connected and self.pdsk in (
                DiskState.Inconsistent, DiskState.Outdated, DiskState.Consistent):
            # Connected fresh pair: the forced node's data wins, full sync now.
            self._start(self._begin_sync_as_source(True), group=self.session,
                        name="sync-source")

    def _may_promote(self, force: bool):
        """Raise unless this node may become Primary now (may ask the peer,
        or have it fenced)."""
        try:
            if self.live and self.cstate.is_connected:
                # Ask the peer first: its reply travels behind any role change
                # it made a moment ago, so the check below sees its real role.
                result = yield from self._ask_peer_role(Role.Primary)
                # (no answer because the connection went away: judged below
                # as a disconnected node, never taken as a yes)
                yield from _until(lambda: not self._losing)
                if result == SS_TWO_PRIMARIES.code and self.live:
                    raise refuse(SS_TWO_PRIMARIES)     # (the peer is Primary: say so)
                if result and self.live and self.cstate.is_connected:
                    e = refused_by_peer(result)
                    self._log("warning", f"State change failed: ({result}) {e.peer_text} "
                                         f"(the peer refused this node's promotion)")
                    raise e
            if self.fencing != "dont-care" and not (self.live and self.cstate.is_connected) \
                    and self.pdsk in (DiskState.DUnknown, DiskState.Consistent,
                                      DiskState.UpToDate) \
                    and (force or self.dstate in (DiskState.UpToDate, DiskState.Consistent)):
                # As DRBD: with fencing, a node that cannot see its peer has
                # the peer fenced (outdated, or shot) before it may be Primary;
                # then Consistent data is the newest there is.
                link = (self.session, self.live)
                code = yield from self._handler("fence-peer")
                if (self.session, self.live) != link:
                    return      # the peer is back meanwhile: judged again
                if code not in (3, 4, 5, 7):
                    if not force:
                        self._log("warning", f"fence-peer helper returned {code}: not "
                                             f"becoming Primary")
                        raise refuse(SS_PRIMARY_NOP)
                    # as DRBD: --force goes on, and says what it risks
                    self._log("warning", f"fence-peer helper returned {code}: Forced into "
                                         f"split brain situation!")
                    self._set(pdsk=DiskState.Outdated)
                else:
                    self._log("warning", f"fence-peer helper returned {code}: peer outdated")
                    yield from self._peer_outdated()
                    if self.dstate is DiskState.Consistent and self.disk is not None:
                        yield from self._persist(self.disk, sb=self.disk.sb.with_flags(
                            set_=md.F_WAS_UP_TO_DATE))
                        self._set(dstate=DiskState.UpToDate)
            check_promote(self.view(), force=force)
            if self.disk is None and not self._peer_serves():
                raise refuse(SS_IS_DISKLESS, EXIT_NO_LOCAL_DISK)
            if force and self.dstate is not DiskState.UpToDate:
                yield from self._force_uptodate()
        except (StateChangeRefused, ReplfsError):
            disk = self.disk
            if disk is not None and disk.sb.has(md.F_PRIMARY):
                # set by an earlier round of this promotion: not Primary after all
                yield from self._persist(disk, sb=disk.sb.with_flags(clear=md.F_PRIMARY))
            raise

    def _ask_peer_role(self, role: Role):
        """Ask the connected peer whether we may take ``role``; 0 means yes."""
        self._seq += 1
        token = self._seq
        self._role_replies[token] = None
        session = self.session
        self._send(P.RoleRequest(token, _role_code(role)))
        yield from _until(lambda: self._role_replies.get(token) is not None
                          or self.session != session or not self.live,
                          self.now + self.cfg.timeout + 1)
        return self._role_replies.pop(token, None) or 0

    def _force_uptodate(self):
        """`primary --force`: declare the local data good (a new generation)."""
        disk = self.disk
        uuids = disk.sb.uuids
        if uuids.current == JUST_CREATED:
            uuids = Uuids(self._new_uuid(), 0, uuids.history)
        else:
            uuids = uuids.with_new_current(self._new_uuid(), was_primary=self._was_primary())
        sb = replace(disk.sb.with_flags(set_=md.F_CONSISTENT | md.F_WAS_UP_TO_DATE,
                                        clear=md.F_OUTDATED), uuids=uuids)
        if self.pdsk is not DiskState.UpToDate:
            disk.bitmap.set_all()
        yield from self._persist(disk, sb=sb)
        self._set(dstate=DiskState.UpToDate)

    def secondary(self, op) -> list:
        self._start(self._op(op, self._secondary()), name="secondary")
        return self._drain()

    def _secondary(self):
        if self.role is Role.Secondary:
            return
        if self.opens["any"]:
            raise ReplfsError(f"{self.cfg.name}: State change failed: (-12) Device is held "
                              f"open by someone", EXIT_STATE)
        # No application I/O starts from here on: a write let in while the
        # meta-data is written would complete on a Secondary, and a resync
        # in the other direction could take it back.
        self._demoting = True
        try:
            yield from _until(lambda: not len(self._ranges) and not self.lo)
            if self.disk is not None:
                yield from self._persist(self.disk,
                                         sb=self.disk.sb.with_flags(clear=md.F_PRIMARY))
            self._set(role=Role.Secondary)
        finally:
            self._demoting = False
        self._tell_peer_state()

    def outdate(self, op) -> list:
        self._start(self._op(op, self._outdate()), name="outdate")
        return self._drain()

    def _outdate(self):
        check_outdate(self.view())
        if self.cstate.is_connected:
            raise ReplfsError(f"{self.cfg.name}: State change failed: (-10) Refusing to "
                              f"outdate a connected disk", EXIT_STATE)
        if self.dstate is DiskState.Outdated:
            return
        yield from self._persist(self.disk, sb=self.disk.sb.with_flags(set_=md.F_OUTDATED))
        self._set(dstate=DiskState.Outdated)

    def new_current_uuid(self, op) -> list:
        def gen():
            if self.disk is None:
                raise refuse(SS_IS_DISKLESS, EXIT_NO_LOCAL_DISK)
            yield from self._new_generation(force=True)
        self._start(self._op(op, gen()), name="new-current-uuid")
        return self._drain()

    def _new_generation(self, *, force: bool = False):
        """Start a new data generation: writes from here on are not on the
        peer.  Returns once it is on disk (also when another flow started
        it); a no-op when the generation has moved on already."""
        yield from _until(lambda: not self._uuid_busy)
        disk = self.disk
        if disk is None:
            return
        uuids = disk.sb.uuids
        if uuids.bitmap and not force:
            return
        self._uuid_busy = True
        new = uuids.with_new_current(self._new_uuid(), was_primary=self._was_primary())
        try:
            yield from self._persist(disk, sb=replace(disk.sb, uuids=new))
        except MetaIOError:
            # It may have landed all the same (see _attach).
            self._unconfirmed_generation = (new, uuids)
            raise
        finally:
            self._uuid_busy = False
        self._log("info", "new current UUID %016X (bitmap UUID %016X)"
                  % (disk.sb.uuids.current, disk.sb.uuids.bitmap))
        self._note_exposed_data()

    def _was_primary(self) -> bool:
        """Was this node Primary when the generation being left began to
        diverge (the split)?  Recorded in the new UUIDs for the after-sb
        younger/older-primary policies: the role now if connected, else the
        role when the link ended, else whether it crashed as Primary."""
        if self.live:
            return self.role is Role.Primary
        if self._role_at_split is not None:
            return self._role_at_split is Role.Primary
        return bool(self.disk and self.disk.crashed_primary)

    def invalidate(self, op) -> list:
        self._start(self._op(op, self._invalidate()), name="invalidate")
        return self._drain()

    def _invalidate(self):
        """Discard local data; full sync from the peer (now, or on connect)."""
        if self.disk is None:
            raise refuse(SS_IS_DISKLESS, EXIT_NO_LOCAL_DISK)
        if self.role is Role.Primary:
            raise ReplfsError(f"{self.cfg.name}: State change failed: (-2) Refusing to "
                              f"invalidate the data of a Primary", EXIT_STATE)
        if self.cstate.is_syncing:
            raise refuse(SS_RESYNC_RUNNING)
        disk = self.disk
        disk.bitmap.set_all()
        yield from self._persist(disk, sb=disk.sb.with_flags(
            clear=md.F_CONSISTENT | md.F_WAS_UP_TO_DATE))
        self._set(dstate=DiskState.Inconsistent)
        self._tell_peer_state()
        if self.live and self.cstate is ConnState.Connected:
            self._end_session(ConnState.NetworkFailure, False, "invalidated: reconnecting")

    def invalidate_remote(self, op) -> list:
        def gen():
            if self.disk is None:
                raise refuse(SS_IS_DISKLESS, EXIT_NO_LOCAL_DISK)
            if self.cstate is not ConnState.Connected:
                raise refuse(SS_NEED_CONNECTION)
            if self.dstate is not DiskState.UpToDate:
                raise refuse((-2, "Refusing to be SyncSource without an UpToDate disk"))
            self._start(self._begin_sync_as_source(True), group=self.session,
                        name="sync-source")
            return
            yield
        self._start(self._op(op, gen()), name="invalidate-remote")
        return self._drain()

    def resume_io(self, op=None) -> list:
        self._resume_io()
        if op is not None:
            self._emit(OpDone(op, None))
        return self._drain()

    # ------------------------------------------------------------ pause-sync
    def pause_sync(self, op) -> list:
        """Set this node's sync-pause flag: a resync (now or later) stays
        PausedSyncS/PausedSyncT on both nodes until resume-sync."""
        if self.user_isp:
            self._emit(OpDone(op, fail(ERR_PAUSE_IS_SET, self.cfg.name)))
        else:
            self._set_isp(user=True)
            self._emit(OpDone(op, None))
        return self._drain()

    def resume_sync(self, op) -> list:
        if not self.user_isp:
            why = ERR_PIC_PEER_DEP if self.peer_isp and self.cstate in (
                ConnState.PausedSyncS, ConnState.PausedSyncT) else ERR_PAUSE_IS_CLEAR
            self._emit(OpDone(op, fail(why, self.cfg.name)))
        else:
            self._set_isp(user=False)
            self._emit(OpDone(op, None))
        return self._drain()

    def _set_isp(self, *, user: bool | None = None, peer: bool | None = None) -> None:
        """Change a sync-pause flag (logged as DRBD does), tell the peer of
        ours, and move a running resync to or from its Paused state."""
        if user is not None and user != self.user_isp:
            self._log("info", f"user_isp( {int(self.user_isp)} -> {int(user)} )")
            self.user_isp = user
            if self.live and self.cstate.is_connected:
                self._send(P.SyncPause(int(user)))
        if peer is not None and peer != self.peer_isp:
            self._log("info", f"peer_isp( {int(self.peer_isp)} -> {int(peer)} )")
            self.peer_isp = peer
        if self.cstate.is_syncing:
            self._set(cstate=self._sync_state())

    def _sync_paused(self) -> bool:
        return self.user_isp or self.peer_isp

    def _sync_state(self) -> ConnState:
        """SyncSource/SyncTarget, or their Paused forms while a flag is set;
        a change starts or ends the run's paused time."""
        sync = self._sync
        source = sync.role == "source" if sync is not None else \
            self.cstate in (ConnState.SyncSource, ConnState.PausedSyncS)
        paused = self._sync_paused()
        if sync is not None:
            if paused and sync.paused_since is None:
                sync.paused_since = self.now
            elif not paused and sync.paused_since is not None:
                sync.paused_total += self.now - sync.paused_since
                sync.paused_since = None
        if source:
            return ConnState.PausedSyncS if paused else ConnState.SyncSource
        return ConnState.PausedSyncT if paused else ConnState.SyncTarget

    def _resume_io(self) -> None:
        if self.susp:
            self._log("warning", "susp( 1 -> 0 )")
        self.susp = False
        self._held.clear()       # they complete: this node goes on

    # ============================================================ application I/O
    def _require_io(self) -> Disk | None:
        """The local disk to use, or None when the peer serves the I/O."""
        if self.role is not Role.Primary or self._demoting:
            raise IOFailure(errno.EMEDIUMTYPE,
                            f"{self.cfg.name} is Secondary: no application I/O")
        if self.disk is not None and self.dstate in (DiskState.UpToDate, DiskState.Consistent):
            return self.disk
        if self.disk is not None and self.dstate is DiskState.Inconsistent \
                and self._peer_serves():
            return self.disk     # SyncTarget while Primary: stale blocks come from the peer
        if self.disk is None and self._peer_serves():
            return None          # Diskless Primary
        raise IOFailure(errno.EIO, f"{self.cfg.name}: no UpToDate disk reachable")

    def _peer_serves(self) -> bool:
        return self.live and self.cstate.is_connected and self.pdsk is DiskState.UpToDate

    def _replicating(self) -> bool:
        return (self.live and self.cstate.is_connected
                and self.pdsk in (DiskState.UpToDate, DiskState.Inconsistent,
                                  DiskState.Consistent, DiskState.Outdated))

    def _check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0:
            raise IOFailure(errno.EINVAL, "negative offset or length")
        if offset + length > self.size:
            raise IOFailure(errno.ENOSPC, f"I/O beyond end of device "
                            f"({offset}+{length} > {self.size})")

    def _lock_range(self, start: int, end: int):
        yield from _until(lambda: not self._ranges.overlaps(start, end))
        return self._ranges.add(start, end)

    # ------------------------------------------------------------ read
    def read(self, req, offset: int, length: int) -> list:
        self._start(self._app(req, self._read(offset, length)), name="read")
        return self._drain()

    def local_read_ok(self, offset: int, length: int) -> bool:
        """Whether the driver may serve this application read from the
        local disk itself, with no flow (the fast path; DRBD reads locally
        too): Primary, the local disk attached and UpToDate (every block
        current here: no stale block to fetch from the peer), I/O not
        suspended, the range inside the device.  A read the driver so
        serves is reported with local_read_done; one that fails goes
        through read() instead, whose flow handles the disk error."""
        return (self.role is Role.Primary and self.disk is not None
                and self.dstate is DiskState.UpToDate and not self.susp
                and not self._joined_unmerged
                and offset >= 0 and length >= 0 and offset + length <= self.size)

    def local_read_done(self, nbytes: int) -> None:
        """Count a read served by local_read_ok's fast path (no actions)."""
        self.app_io += 1
        self.dr += nbytes

    def _read(self, offset: int, length: int):
        disk = self._require_io()
        self.app_io += 1
        if offset < 0 or length < 0:
            raise IOFailure(errno.EINVAL, "negative offset or length")
        length = max(0, min(length, self.size - offset))
        if disk is not None and (self._joined_unmerged or (
                disk.full_if_target and self.dstate is not DiskState.UpToDate)):
            # (joined under the live connection: until the peer's bitmap is
            # merged, this one does not say which blocks are stale; a disk
            # that failed under this node and waits for its full resync:
            # none of its blocks is known good -- its bitmap says nothing
            # until the SyncStart marks it all)
            return (yield from self._remote_read(offset, length))
        if disk is not None and self.dstate is DiskState.Inconsistent:
            first, count = blocks_of(offset, length)
            if any(disk.bitmap.test(b) for b in range(first, first + count)):
                return (yield from self._remote_read(offset, length))
        if disk is None:
            return (yield from self._remote_read(offset, length))
        self.lo += 1
        try:
            result = yield self._issue(DiskRead, offset, length)
        finally:
            self.lo -= 1
        if isinstance(result, int):
            yield from self._local_io_error("read", result, offset, length)
            if self._peer_serves():
                return (yield from self._remote_read(offset, length))
            raise IOFailure(errno.EIO, f"{self.cfg.name}: local read failed and no peer "
                                       f"has the data")
        self.dr += len(result)
        return result

    def _remote_read(self, offset: int, length: int):
        if not self._peer_serves():
            raise IOFailure(errno.EIO, f"{self.cfg.name}: no UpToDate disk reachable")
        self._seq += 1
        seq = self._seq
        box: list = []
        self._reads[seq] = box
        try:
            self._send(P.ReadRequest(seq, offset, length))
            yield from _until(lambda: bool(box))
        finally:
            self._reads.pop(seq, None)
        if isinstance(box[0], int):
            raise IOFailure(box[0] or errno.EIO, f"{self.cfg.name}: read through the peer "
                                                 f"failed")
        self.nr += len(box[0])
        return box[0]

    # ------------------------------------------------------------ write
    def write(self, req, offset: int, data: bytes, flags: int = 0) -> list:
        """An application write; ``flags``: WRITE_PREFLUSH | WRITE_FUA."""
        if flags & ~(WRITE_PREFLUSH | WRITE_FUA):
            raise ValueError(f"unknown write flags {flags:#x}")
        gen = self._write_flagged(offset, data, flags) if flags else self._write(offset, data)
        self._start(self._app(req, gen), name="write")
        return self._drain()

    def _write_flagged(self, offset: int, data: bytes, flags: int):
        """A write with PREFLUSH and/or FUA.  PREFLUSH: the peer's Flush is
        sent first and the local flush done before the write is issued;
        the peer handles its Flush before the Data behind it, so its
        answer is not waited for before the write.  FUA: a Flush follows
        the Data on the link at once (the peer handles it once the write
        has landed), and the local disk is flushed once the write is."""
        seqs: list[int] = []
        try:
            if flags & WRITE_PREFLUSH:
                disk = self._require_io()
                covers = self._lone_writes
                seq1 = self._flush_start(disk)
                if seq1 is not None:
                    seqs.append(seq1)
                ok1 = yield from self._flush_local(disk, seq1)
            fua = _FuaMark() if flags & WRITE_FUA else None
            yield from self._write(offset, data, fua)
            if flags & WRITE_PREFLUSH:
                yield from self._flush_wait(seq1, ok1)
                self._flush_end(covers)
            if fua is not None:
                if fua.seq is not None:
                    seqs.append(fua.seq)
                disk = self._require_io()
                covers = self._lone_writes
                if fua.seq is None and disk is None:
                    # no local disk, and the Data went nowhere a Flush could
                    # follow (the write went to a peer that is now gone):
                    # nothing can vouch for it
                    raise IOFailure(errno.EIO, f"{self.cfg.name}: FUA write: no disk "
                                               f"reachable to make it durable")
                ok2 = yield from self._flush_local(disk, fua.seq,
                                                   flushed=disk is not None
                                                   and fua.flushed is disk)
                yield from self._flush_wait(fua.seq, ok2)
                self._flush_end(covers)
        finally:
            for seq in seqs:
                self._flushes.pop(seq, None)
        return None

    def _write(self, offset: int, data: bytes, fua: _FuaMark | None = None):
        self._require_io()
        self._check_range(offset, len(data))
        if not data:
            return None
        yield from _until(lambda: not self.susp or self.fence_lost)
        if self.fence_lost:
            raise IOFailure(errno.EIO, f"{self.cfg.name}: this node lost the fence-peer "
                                       f"decision; its disk is Outdated")
        # (and while a disk that just joined waits for the resync to start:
        # as during a handshake, the bitmaps are exchanged with no write of
        # ours landing on it in between)
        yield from _until(lambda: self.cstate not in _HOLD_WRITES and not self._joined_unmerged)
        self.ap += 1
        self.app_io += 1
        # Ranges are locked in whole 4 KiB blocks: the unit of the bitmap,
        # of resync, and of a read-modify-write below.
        lock_start = offset - offset % BLOCK
        lock_end = -(-(offset + len(data)) // BLOCK) * BLOCK
        token = None
        try:
            token = yield from self._lock_range(lock_start, lock_end)
            self._app_writes[token] = (offset, offset + len(data))
            while True:
                disk = self._require_io()   # may have changed while we waited
                if disk is None:
                    if (yield from self._replicated_write(None, offset, data,
                                                          fua=fua)) is _REDECIDE:
                        continue    # a disk was attached meanwhile
                    return None
                target = self.dstate is DiskState.Inconsistent
                if target:
                    offset, data = yield from self._fill_stale_blocks(disk, offset, data)
                e_first, e_last = self._extents_of(offset, len(data))
                if (yield from self._al_begin(disk, e_first, e_last)):
                    break
                # (the disk was detached while this write waited for the
                # activity log: decide again where it goes)
            sent: list[Pending] = []
            try:
                yield from self._replicated_write(disk, offset, data, sent, fua=fua)
            finally:
                disk.al.end(e_first, e_last)
                if target and self.disk is disk and sent and sent[0].local_ok \
                        and (sent[0].acked or not sent[0].done):
                    # These blocks are now current here and (or soon) on the
                    # peer, even if this write is failed for want of the
                    # peer's ack: a resync chunk for them read before it
                    # must not overwrite them.
                    first = -(-offset // BLOCK)
                    last = (offset + len(data)) // BLOCK
                    if last > first:
                        disk.bitmap.clear_range(first, last - first)
        finally:
            if token is not None:
                self._app_writes.pop(token, None)
                self._ranges.remove(token)
            self.ap -= 1
        return None

    def _fill_stale_blocks(self, disk: Disk, offset: int, data: bytes):
        """A Primary that is SyncTarget writes part of a block this disk does
        not have yet: complete the block from the peer's copy first."""
        first, count = blocks_of(offset, len(data))
        end = offset + len(data)
        head_stale = offset % BLOCK and disk.bitmap.test(first)
        tail_stale = end % BLOCK and disk.bitmap.test(first + count - 1)
        if not (head_stale or tail_stale):
            return offset, data
        start = first * BLOCK
        current = bytearray((yield from self._remote_read(start, count * BLOCK)))
        current[offset - start:end - start] = data
        return start, bytes(current)

    def _al_begin(self, disk: Disk, first: int, last: int):
        """Make extents [first, last] hot, and durably so before the write.
        True once they are; False (nothing held) if the disk was detached
        while waiting for room."""
        mine = set(range(first, last + 1))
        while True:
            if self.disk is not disk:
                return False
            before = set(disk.al.extents)
            try:
                changed = disk.al.begin(first, last)
                break
            except ActivityLogFull:
                self._barrier()     # (acknowledged writes hold extents until durable)
                in_flight = disk.al.in_flight()
                yield Wait(lambda: disk.al.in_flight() < in_flight or self.disk is not disk)
        if changed:
            added = mine - before
            disk.al_unsettled |= added
            try:
                yield from self._persist(disk, al=True)
            except MetaIOError:
                disk.al.end(first, last)
                if self.disk is not disk:
                    return False        # detached (_persist): decide again
                raise
            finally:
                disk.al_unsettled -= added
        else:
            # Hot already, but perhaps only by a transaction still being
            # written: a crash now must still find the extent in the log.
            yield from _until(lambda: self._al_settled(disk, mine) or self.disk is not disk)
        if self.disk is not disk:
            disk.al.end(first, last)
            return False
        return True

    def _extents_of(self, offset: int, length: int) -> tuple[int, int]:
        """The first and last activity-log extent a byte range touches."""
        last = offset + max(length, 1) - 1
        return offset // self.cfg.al_extent_size, last // self.cfg.al_extent_size

    @staticmethod
    def _al_settled(disk: Disk, extents: set[int]) -> bool:
        return not (extents & disk.al_unsettled)

    def _replicated_write(self, disk: Disk | None, offset: int, data: bytes,
                          sent: list | None = None, fua: _FuaMark | None = None):
        while True:
            # (checked again here: the write may have waited for its range
            # or the activity log while a new handshake began)
            yield from _until(lambda: (self._replicating() or not self._quiesce)
                              and self.cstate not in _HOLD_WRITES)
            if self._replicating() or self.fence_lost:
                break
            if disk is None and self.disk is not None:
                return _REDECIDE
            if self.susp:
                # Not replicable while the peer is being fenced: wait for the
                # decision (or the peer's return), since the generation may
                # only move on on the winner.
                yield from _until(lambda: self._replicating() or not self.susp
                                  or self.fence_lost)
                continue
            if self._unfenced_peer():
                # About to write what the peer will lack, and the peer was
                # never fenced (the link was lost before a handshake ended,
                # say): fence it first, as DRBD suspends a disconnected
                # Primary whose peer is not known Outdated.
                yield from self._fence_alone()
                continue
            break
        if self.fence_lost and not self._replicating():
            raise IOFailure(errno.EIO, f"{self.cfg.name}: this node lost the fence-peer "
                                       f"decision; its disk is Outdated")
        if disk is None and not self._replicating():
            raise IOFailure(errno.EIO, f"{self.cfg.name}: no UpToDate disk reachable")
        pending = None
        local_error = 0
        target = disk is not None and self.dstate is not DiskState.UpToDate \
            and self.dstate is not DiskState.Consistent
        if target and not self._replicating():
            raise IOFailure(errno.EIO, f"{self.cfg.name}: no UpToDate disk reachable")
        if self._replicating() and disk is not None and not target and (
                self.cstate is ConnState.Ahead
                or (self.cstate is ConnState.Connected and self._congested())):
            if self.cfg.on_congestion == "disconnect" and self.cstate is not ConnState.Ahead:
                self._end_session(ConnState.NetworkFailure, False,
                                  "congestion: dropping the connection (on-congestion "
                                  "disconnect)")
                yield from _until(lambda: not self._losing)
            else:
                if self.cstate is not ConnState.Ahead:
                    self._go_ahead()
                # Ahead: written here, only marked for the peer (its resync
                # brings the data when the congestion is over).
                first, count = blocks_of(offset, len(data))
                disk.bitmap.set_range(first, count)
                self._send(P.OutOfSync(offset, len(data)))
                local_error = yield from self._local_write(offset, data)
                if local_error:
                    yield from self._local_io_error("write", local_error, offset, len(data))
                    raise IOFailure(errno.EIO, f"{self.cfg.name}: local write failed while "
                                               f"Ahead (the peer does not have it)")
                self._lone_writes += 1
                return
        if self._replicating():
            self._seq += 1
            seq = self._seq
            if self._epoch_closed:
                # Some write completed since the last one was sent: this one
                # may depend on it, so it starts a new epoch.
                self._epoch += 1
                self._epoch_closed = False
            if disk is None and (self._joining is not None or self._joined_unmerged):
                # A disk is joining: no write goes to the peer alone until
                # it has (see _join_live); then decide again.
                yield from _until(lambda: self._joining is None and not self._joined_unmerged)
                return _REDECIDE
            if disk is None and self.disk is not None:
                return _REDECIDE
            pending = Pending(offset, len(data), self._epoch, self.now)
            if disk is not None:
                # The activity log covers this write until the peer has it
                # (WriteAck) or the bitmap records that it does not.
                pending.disk = disk
                pending.extents = self._extents_of(offset, len(data))
                disk.al.begin(*pending.extents)   # hot already: no transaction
            self._pending[seq] = pending
            if sent is not None:
                sent.append(pending)
            self._send_data(P.Data(seq, pending.epoch, offset, data), data)
            self.ns += len(data)
            if fua is not None and fua.seq is None:
                # right behind the Data: the peer flushes once it has landed
                fua.seq = self._flush_start(disk)
            if disk is not None:
                local_error = yield from self._local_write(offset, data)
                pending.local_ok = not local_error
                if fua is not None and not local_error:
                    # (an error here is met again, and handled, by the
                    # flush _write_flagged does when this one failed)
                    if not (yield self._issue(DiskFlush)):
                        fua.flushed = disk
            yield from self._peer_has_it(pending, disk)
            self._epoch_closed = True
            # Completed by a connection loss rather than by the peer: with
            # fencing that failed, nothing more is acknowledged until the
            # admin resumes I/O.
            yield from _until(lambda: self._lost_write_may_complete(pending))
            if not pending.acked and self.fence_lost:
                raise IOFailure(errno.EIO, f"{self.cfg.name}: not acknowledged: this node "
                                           f"lost the fence-peer decision")
            if not pending.acked and pending.abandoned:
                raise IOFailure(errno.EIO, f"{self.cfg.name}: not acknowledged: held while "
                                           f"fencing, and the peer was back first")
        else:
            self._unrepl_inflight += 1
            try:
                yield from self._mark_unreplicated(offset, len(data))
                local_error = yield from self._local_write(offset, data)
            finally:
                self._unrepl_inflight -= 1
        if local_error:
            yield from self._local_io_error("write", local_error, offset, len(data))
            # The write still counts if the peer's disk has it.
            if pending is None:
                raise IOFailure(errno.EIO, f"{self.cfg.name}: local write failed and there "
                                           f"is no peer to hold it")
            yield from _until(lambda: pending.done)
        # (a local copy in a disk that failed before the write completed
        # counts no more than one that failed to be written)
        local_lost = bool(local_error) or (disk is not None and self.disk is not disk)
        if local_lost and pending is not None:
            if pending.acked_uptodate and self._peer_serves():
                # The peer's copy is the only one now: it counts once the
                # peer has made it durable and has taken in that our disk is
                # gone (our StateUpdate went before this Flush: its new
                # generation then makes its copy win over ours whatever
                # becomes of the link).
                yield from self._peer_flush()
        peer_copy = pending is not None and pending.acked_uptodate and (
            self._peer_serves() or (not local_lost and disk is not None and not target))
        if (local_lost or disk is None or target) and not peer_copy:
            # Only an UpToDate peer's copy counts (an Inconsistent disk --
            # a Primary that is SyncTarget, or a peer that is -- is not a
            # copy anyone may rely on), and when it is the only copy, only
            # while that peer is still connected and UpToDate: one cut off
            # meanwhile may be outdated by fencing and resynced over.
            raise IOFailure(errno.EIO, f"{self.cfg.name}: the write reached no disk")
        if not (pending and pending.acked_uptodate):
            if self.disk is not disk:
                # written, but the disk failed (detached) before the write
                # could complete: its cache may not have kept it
                raise IOFailure(errno.EIO, f"{self.cfg.name}: the local disk failed before "
                                           f"the write completed, and no peer has it")
            self._lone_writes += 1      # only this disk's volatile cache has it

    # ------------------------------------------------------------ congestion
    def _congested(self) -> bool:
        """on-congestion (protocol A): too much data in flight to the peer,
        or too many activity-log extents hot."""
        if self.cfg.on_congestion == "block" or self.cfg.protocol != "A":
            return False
        if self.cfg.congestion_fill:
            in_flight = sum(p.length for p in self._pending.values())
            if in_flight >= self.cfg.congestion_fill:
                return True
        disk = self.disk
        hot = sum(1 for n in disk.al._lru.values() if n) if disk is not None else 0
        return hot >= self.cfg.congestion_extents

    def _go_ahead(self) -> None:
        self._log("warning", "Congestion detected: going Ahead (on-congestion pull-ahead)")
        # (the peer goes Behind and Outdated -- it must not be promoted with
        # the data it is only told about -- and says so: pdsk follows its
        # StateUpdate, never our assumption, or a lost Congestion packet
        # would leave it UpToDate while we believe it fenced)
        self._set(cstate=ConnState.Ahead)
        self._send(P.Congestion(1))
        self._start(self._leave_ahead(), group=self.session, name="leave-ahead")

    def _leave_ahead(self):
        """Once what was in flight has reached the peer, resync what was
        only marked: Ahead becomes SyncSource, the peer SyncTarget."""
        yield from _until(lambda: not self._pending)
        yield Wait(until=self.now + 1.0)        # (as DRBD: not at once)
        yield from _until(lambda: not self._pending)
        if self.cstate is not ConnState.Ahead:
            return
        self._log("info", "Congestion over: resyncing the peer (Ahead -> SyncSource)")
        yield from self._begin_sync_as_source(False, exchange=False)

    def _peer_has_it(self, pending: Pending, disk: Disk | None):
        """Wait until the peer's part of a write is done, as the protocol
        says: A when sent, B when received, C when on the peer's disk (and
        always C without a local disk: the peer's is the only copy)."""
        proto = self.cfg.protocol
        if disk is None or proto == "C":
            yield from _until(lambda: pending.done)
        elif proto == "B":
            yield from _until(lambda: pending.received)

    def _lost_write_may_complete(self, pending: Pending) -> bool:
        """A write the link lost before the peer confirmed it completes only
        once fencing is decided and its new generation is written."""
        return pending.acked or self.fence_lost or not (
            self.susp or self._gen_pending or self._losing)

    def _local_write(self, offset: int, data: bytes):
        self.lo += 1
        try:
            err = yield self._issue(DiskWrite, offset, data)
        finally:
            self.lo -= 1
        if not err:
            self.dw += len(data)
        return err

    def _mark_unreplicated(self, offset: int, length: int):
        """This write will not reach the peer: remember it in the bitmap."""
        disk = self.disk
        if disk is None:
            return
        # (the bits first: a flow cancelled in the wait below -- an answer
        # flow when the session ends -- must not lose them)
        first, count = blocks_of(offset, length)
        disk.bitmap.set_range(first, count)
        if self.role is Role.Primary:
            # (called even when the bitmap UUID is set: it may be one whose
            # write is still in flight, and this write must not complete
            # before the new generation is on disk)
            yield from self._new_generation()

    def _peer_lacks(self, offset: int, length: int):
        """The peer's disk does not have this range (it failed or is gone)."""
        disk = self.disk
        if disk is None:
            return
        first, count = blocks_of(offset, length)
        changed = disk.bitmap.set_range(first, count)   # (first: see _mark_unreplicated)
        if self.dstate is DiskState.UpToDate:       # (see _mark_unreplicated)
            # (an Inconsistent disk holds no generation of its own to move
            # on from: the blocks are only marked)
            yield from self._new_generation()
        if changed:
            # This node may be the only one that knows: persist before the
            # write that made it so is acknowledged.
            yield from self._persist(disk)

    def _al_release(self, p: Pending) -> None:
        """The peer has the write, or the bitmap says it lacks it."""
        if p.disk is not None:
            p.disk.al.end(*p.extents)
            p.disk = None

    # ------------------------------------------------------------ flush
    def flush(self, req) -> list:
        self._start(self._app(req, self._flush()), name="flush")
        return self._drain()

    def _flush(self):
        disk = self._require_io()
        covers = self._lone_writes
        seq = self._flush_start(disk)
        try:
            local_ok = yield from self._flush_local(disk, seq)
            yield from self._flush_wait(seq, local_ok)
        finally:
            if seq is not None:
                self._flushes.pop(seq, None)
        self._flush_end(covers)
        return None

    def _flush_start(self, disk: Disk | None) -> int | None:
        """Send the peer a Flush if its copy counts (protocol B or C, or
        this node has no disk); its sequence number, or None."""
        if self._replicating() and (self.cfg.protocol != "A" or disk is None):
            self._seq += 1
            seq = self._seq
            self._flushes[seq] = False
            self._send_flush(seq)
            return seq
        return None

    def _flush_local(self, disk: Disk | None, seq: int | None, flushed: bool = False):
        """Flush the local disk (unless ``flushed`` already) and persist
        the meta-data; whether it did.  Raises when neither it nor the
        peer (``seq``) can."""
        if disk is not None:
            err = 0 if flushed else (yield self._issue(DiskFlush))
            if not err:
                try:
                    yield from self._persist(disk)
                except MetaIOError as e:
                    err = e.errno
            if err:
                yield from self._local_io_error("flush", err, 0, 0)
                if seq is None:
                    raise IOFailure(errno.EIO, f"{self.cfg.name}: flush failed and no "
                                               f"peer holds the data")
                return False
            return True
        if seq is None:
            raise IOFailure(errno.EIO, f"{self.cfg.name}: no UpToDate disk reachable")
        return False

    def _flush_wait(self, seq: int | None, local_ok: bool):
        """Wait for the peer's answer to Flush ``seq``."""
        if seq is not None:
            yield from _until(lambda: self._flushes.get(seq, True) is not False)
            if not local_ok and self._flushes.get(seq) is _LOST:
                # Neither disk confirmed: what was acknowledged may be
                # in no disk's stable storage.
                raise IOFailure(errno.EIO, f"{self.cfg.name}: flush: the peer's disk or "
                                           f"the link went before it confirmed, and this "
                                           f"node's disk failed or is gone")

    def _flush_end(self, covers: int) -> None:
        if self._writeback_error:
            self._writeback_error = False
            self._lone_flushed = self._lone_writes
            raise IOFailure(errno.EIO, f"{self.cfg.name}: flush: the local disk failed with "
                                       f"writes no peer had confirmed; they may be lost")
        self._lone_flushed = max(self._lone_flushed, covers)

    def _peer_flush(self):
        """One Flush round trip to the peer; False if its answer cannot
        come (the link or its disk went first)."""
        self._seq += 1
        seq = self._seq
        self._flushes[seq] = False
        try:
            self._send_flush(seq)
            yield from _until(lambda: self._flushes.get(seq, _LOST) is not False)
            return self._flushes.get(seq) is True
        finally:
            self._flushes.pop(seq, None)

    def _keep_until_durable(self, p: Pending) -> bool:
        """An acknowledged write stays in the transfer log, its extents hot
        in the activity log, until the peer has made it durable."""
        self._unstable.append(p)
        self._unstable_added += 1
        if len(self._unstable) >= 256:
            self._barrier()
        return True

    def _send_flush(self, seq: int) -> None:
        self._flush_marks[seq] = self._unstable_added
        self._send(P.Flush(seq))

    def _barrier(self) -> None:
        """Ask the peer to make what it acknowledged durable, so that the
        transfer log stays short, unless such a request is in flight."""
        if self._unstable and self.live and not self._flush_marks:
            self._seq += 1
            self._send_flush(self._seq)

    # ------------------------------------------------------------ local I/O errors
    def _local_io_error(self, what: str, err: int, offset: int, length: int):
        """A local read or write failed: apply the on-io-error policy."""
        policy = self.cfg.on_io_error
        self._log("error", "Local IO failed in %s at %d+%d: errno %d. %s" % (
            what, offset, length, err,
            "Passing the error on." if policy == "pass_on" else "Detaching..."))
        if policy == "call-local-io-error":
            yield from self._handler("local-io-error")
        if policy == "pass_on":
            return
        # The peer must resync this range (and everything the disk misses
        # from now on) into this disk should it come back -- also for an
        # I/O that fails after the disk was given up (it was issued before).
        if self.cstate.is_connected and self.pdsk in _DISK_HOLDS_DATA and length:
            self._send(P.OutOfSync(offset, length))
        if self.disk is None:
            return
        disk, self.disk = self.disk, None
        self._disk_failed = True
        if self._lone_writes > self._lone_flushed:
            self._writeback_error = True
        self._set(dstate=DiskState.Failed)
        # Told at once, before anything else is sent: from here on our
        # writes go to the peer alone, and it must know that of each.
        self._tell_peer_state()
        # (a flow of its own: the flow that met the error may be one the
        # end of a session cancels, and the disk must be released anyway)
        # Marked Inconsistent (if it still takes the write) only when the
        # peer has UpToDate data to resync it from: without one, this disk
        # may hold the newest data there is, and keeps its claim to it.
        peer_good = self._peer_serves()
        self._start(self._release_failed_disk(disk, peer_good), name="release-failed-disk")

    def _release_failed_disk(self, disk: Disk, mark_inconsistent: bool):
        try:
            if mark_inconsistent:
                yield from self._persist(disk, sb=disk.sb.with_flags(clear=md.F_CONSISTENT))
            else:
                yield from self._persist(disk)
        except MetaIOError:
            self._log("error", "could not mark the failed disk inconsistent"
                      if mark_inconsistent else "could not write the failed disk's meta-data")
        self._emit(ReleaseDisk())
        self._set(dstate=DiskState.Diskless)
        self._tell_peer_state()

    def _handler(self, name: str):
        """Run handler ``name``; its exit code, or None if none runs."""
        code = yield self._issue(RunHandler, name)
        return code

    # ============================================================ connection
    def connect(self, op=None, *, discard_my_data: bool = False) -> list:
        if discard_my_data and self.role is Role.Primary and not self.cfg.two_primaries:
            err = ReplfsError(f"{self.cfg.name}: --discard-my-data is refused on a Primary; "
                              f"run 'replfsadm secondary {self.cfg.name}' first", EXIT_STATE)
            if op is not None:
                self._emit(OpDone(op, err))
                return self._drain()
            raise err
        if discard_my_data:
            self.discard_my_data = True
        if not self.want_connect:
            self.want_connect = True
            self.split_brain = False
            if not self.live and not self._losing:
                self._set(cstate=ConnState.Unconnected)
        if op is not None:
            self._emit(OpDone(op, None))
        return self._drain()

    def connecting(self) -> list:
        """The driver listens and connects (WFConnection)."""
        if self.want_connect and not self.live:
            self._set(cstate=ConnState.WFConnection)
        return self._drain()

    def disconnect(self, op=None) -> list:
        self.want_connect = False
        if self.live:
            self._set(cstate=ConnState.Disconnecting)
            self._send(P.Goodbye())
            self._end_session(ConnState.TearDown, False, "disconnecting")
        self._start(self._op(op, self._disconnected()) if op is not None
                    else self._disconnected(), name="disconnect")
        return self._drain()

    def _disconnected(self):
        yield from _until(lambda: not self._losing)
        if not self.want_connect:
            self._set(cstate=ConnState.StandAlone, pdsk=DiskState.DUnknown,
                      peer_role=Role.Unknown)

    def connected(self) -> tuple[int, list]:
        """A connection to the peer is up and authenticated: a new session."""
        assert not self.live, "a session is already live"
        self.session += 1
        self.live = True
        # (a config change applies at the next connection, as on both nodes)
        self._integrity = self.cfg.integrity_alg
        self._verify_alg = self.cfg.verify_alg      # (agreed in the handshake)
        self._deciding = False
        self._lost_after_decision = None
        self._rx.clear()
        self.last_heard = self.now
        self._start(self._session_main(), group=self.session, name="session")
        return self.session, self._drain()

    def receive(self, session: int, pkt: P.Packet) -> list:
        if session != self.session or not self.live:
            return []
        self.last_heard = self.now
        if self._integrity and type(pkt) in _CHECKED:
            # (paired in arrival order, before answers are taken out of turn)
            try:
                if self._take_digest(pkt):
                    return self._drain()
            except (Drop, P.RemoteProtocolError) as e:
                self._session_failed(e)
                return self._drain()
        if type(pkt) in _ANSWERS and self.cstate.is_connected:
            # Answers to our own requests are taken at once, not queued
            # behind the peer's data (DRBD sends them on a socket of their
            # own): a peer write waiting for a range our write holds must
            # not keep that write's ack, or the FlushAck that frees the
            # activity log, from us.
            self._start(self._answer(pkt), group=self.session, name="answer")
        else:
            self._rx.append(pkt)
        return self._drain()

    def _answer(self, pkt: P.Packet):
        step = self._HANDLERS[type(pkt)](self, pkt)
        if step is not None:
            yield from step

    def connection_lost(self, session: int, state: ConnState = ConnState.NetworkFailure,
                        why: str = "connection lost") -> list:
        if session == self.session and self.live:
            if self._deciding or (self.cstate is ConnState.WFReportParams and any(
                    isinstance(p, P.Params) for p in self._rx)):
                # The peer's Params arrived before its close: the decision
                # (a split brain, say) is made and acted on first, as it
                # would be had the close come a moment later.
                self._lost_after_decision = (state, why)
                return self._drain()
            self._log("warning", why)
            self._end_session(state, False, why, close=False)
        return self._drain()

    def _session_failed(self, exc: BaseException) -> None:
        if isinstance(exc, Fatal):
            self._log("error", str(exc))
            self.last_event = str(exc)
            self._end_session(ConnState.StandAlone, True, str(exc))
        elif isinstance(exc, Drop):
            self._log("warning", str(exc))
            self._end_session(exc.state, False, str(exc))
        elif isinstance(exc, P.RemoteProtocolError):
            self._log("error", f"protocol error from peer: {exc}")
            self._end_session(ConnState.ProtocolError, False, f"protocol error: {exc}")
        elif isinstance(exc, MetaIOError):
            self._log("error", f"{exc}; dropping the connection")
            self._end_session(ConnState.NetworkFailure, False, str(exc))
        else:
            # Whatever the peer sent, or whatever went wrong handling it,
            # costs this connection, never the resource.
            self._log("error", f"error handling the peer's data ({exc!r}); dropping the "
                               f"connection")
            self._end_session(ConnState.ProtocolError, False, repr(exc))

    def _end_session(self, state: ConnState, fatal: bool, why: str, *,
                     close: bool = True) -> None:
        if not self.live:
            return
        session = self.session
        self.live = False
        self.peer_isp = False
        self._rx_digest = None
        self._joined_unmerged = False
        self._role_at_split = self.role
        if close:
            self._emit(CloseConnection(session, why))
        self.flows.cancel_group(session)
        if self._quiesce:
            self._quiesce = 0
        if fatal:
            self.want_connect = False
        if self._must_fence() and self.fencing == "resource-and-stonith":
            # Suspended from this moment: no write may complete, or start
            # a new generation, before the fence-peer decision.
            self.susp = True
            self._log("warning", "susp( 0 -> 1 ) fencing the peer")
        self._losing = True
        self._start(self._connection_lost(state, fatal), name="connection-lost")

    def _connection_lost(self, state: ConnState, fatal: bool):
        """Every write the peer has not confirmed is now out of sync."""
        try:
            self._sync = None
            self._verify = None
            pendings = list(self._pending.values())
            self._pending.clear()
            unstable = list(self._unstable)
            self._unstable.clear()
            self._unstable_dropped = self._unstable_added
            self._flush_marks.clear()
            # No acknowledgement can come for these any more; when they may
            # complete is _lost_write_may_complete's rule (not before this
            # cleanup, nor while fencing is undecided).
            for p in pendings:
                p.received = p.done = True
            if self._must_fence():
                # Not an orderly disconnect: fence before completing anything.
                yield from self._fence_peer()
            try:
                if (pendings or unstable) and self.disk is not None:
                    if self._may_start_generation():
                        # The writes the peer may lack are a new generation,
                        # started before any of them completes -- but never
                        # while fencing is undecided (only a winner moves on;
                        # the loser's blocks, marked below, come back from
                        # the winner), so it may wait for resume-io.
                        if self.susp:
                            self._gen_pending += 1
                            self._start(self._bump_after_fencing(self.session),
                                        name="bump-after-fencing")
                        else:
                            yield from self._new_generation()
                    self._mark_lost([(p.offset, p.length) for p in pendings + unstable])
                if self.disk is not None:
                    yield from self._persist(self.disk)
            except MetaIOError as e:
                # The meta-data cannot record what the peer misses: this disk
                # can no longer be trusted to know; give it up.
                yield from self._local_io_error("meta-data write", e.errno, 0, 0)
            finally:
                for p in unstable:
                    self._al_release(p)
                for p in pendings:
                    self._al_release(p)
                    if self.susp and not p.acked:
                        self._held.append(p)
                for seq in self._flushes:
                    if self._flushes[seq] is False:
                        self._flushes[seq] = _LOST
                for box in self._reads.values():
                    if not box:
                        box.append(errno.EIO)
                for token in self._role_replies:
                    if self._role_replies[token] is None:
                        self._role_replies[token] = 0
        finally:
            self._losing = False
        # A fenced peer is known to be Outdated (ds:UpToDate/Outdated).
        pdsk = DiskState.Outdated if self.pdsk is DiskState.Outdated else DiskState.DUnknown
        self._set(cstate=state, peer_role=Role.Unknown, pdsk=pdsk)
        if fatal or not self.want_connect:
            self.want_connect = False
            self._set(cstate=ConnState.StandAlone)
        else:
            self._set(cstate=ConnState.Unconnected)

    def _may_start_generation(self) -> bool:
        """Only a Primary with good data that did not lose the fence-peer
        decision moves the data generation on."""
        return (self.role is Role.Primary and not self.fence_lost
                and self.dstate is DiskState.UpToDate)

    def _mark_lost(self, ranges: list[tuple[int, int]]) -> None:
        """These ranges may be missing on the peer: resync them later."""
        disk = self.disk
        if disk is not None:
            for offset, length in ranges:
                first, count = blocks_of(offset, length)
                disk.bitmap.set_range(first, count)

    def _bump_after_fencing(self, session: int):
        """The new generation for writes a lost link left unconfirmed, once
        this node is known to go on (resume-io); not if it lost, nor if the
        peer came back first (that handshake settled them)."""
        try:
            yield from _until(lambda: not self.susp or self.fence_lost)
            if self._may_start_generation() and self.session == session:
                yield from self._new_generation()
        except MetaIOError as e:
            self._log("error", f"cannot start a new generation: {e}")
        finally:
            self._gen_pending -= 1

    def _peer_outdated(self):
        """The peer is known not to have our newest data: remember it (a
        restart then finds this disk UpToDate, as DRBD's peer-outdated flag)."""
        self._set(pdsk=DiskState.Outdated)
        disk = self.disk
        if disk is not None and not disk.sb.has(md.F_PEER_OUTDATED):
            yield from self._persist(disk, sb=disk.sb.with_flags(set_=md.F_PEER_OUTDATED))

    def _peer_current(self):
        """The peer is connected and UpToDate again."""
        disk = self.disk
        if disk is not None and disk.sb.has(md.F_PEER_OUTDATED):
            yield from self._persist(disk, sb=disk.sb.with_flags(clear=md.F_PEER_OUTDATED))

    def _unfenced_peer(self) -> bool:
        return (self.role is Role.Primary and self.fencing != "dont-care"
                and self.dstate is DiskState.UpToDate and not self.live
                and not self._losing
                and self.pdsk in (DiskState.DUnknown, DiskState.Consistent,
                                  DiskState.UpToDate))

    def _fence_alone(self):
        """Have the peer fenced before writing without it (one fence-peer
        run at a time; every writer waits for its outcome)."""
        if not self._fencing:
            self._fencing = True
            if self.fencing == "resource-and-stonith":
                self.susp = True
                self._log("warning", "susp( 0 -> 1 ) fencing the peer before writing "
                                     "without it")
            self._start(self._fence_alone_flow(), name="fence-peer")
        yield from _until(lambda: not self._fencing)

    def _fence_alone_flow(self):
        try:
            yield from self._fence_peer()
        finally:
            self._fencing = False

    def _must_fence(self) -> bool:
        # (only a peer we were connected to: not one lost mid-handshake)
        return (self.role is Role.Primary and self.pdsk is DiskState.UpToDate
                and self.dstate is DiskState.UpToDate and self.cstate.is_connected
                and self.disk is not None and self.want_connect
                and self.fencing != "dont-care")

    def _fence_peer(self):
        """A Primary lost an UpToDate peer: make sure the peer cannot be
        promoted with old data before anything more is acknowledged."""
        if self.fencing == "dont-care" or self.role is not Role.Primary:
            return
        stonith = self.fencing == "resource-and-stonith"
        code = yield from self._handler("fence-peer")
        # (a handshake under way: its outcome says whether the answer
        # still matters -- one that fails leaves us without the peer)
        yield from _until(lambda: not self.live or self.cstate.is_connected)
        if self.live:
            # The peer came back while the handler ran: the handshake
            # settled who has what (and ended the suspension); a late
            # answer about a peer we are connected to means nothing now.
            self._log("warning", f"fence-peer helper returned {code} after the peer was "
                                 f"back; not applied")
            return
        if code == 6 and stonith:
            # The peer goes on (the cluster stack chose it): this node
            # outdates itself and fails what it held.
            self._log("warning", "fence-peer helper returned 6 (peer is primary, "
                                 "outdating myself)")
            self.last_event = "fence-peer: this node lost; disk Outdated"
            if self.disk is not None:
                # (Outdated in memory first: while the meta-data is being
                # written this disk must not count as UpToDate anywhere --
                # _set takes an UpToDate disk with fence_lost as resynced)
                self._set(dstate=DiskState.Outdated)
            self.fence_lost = True
            if self.disk is not None:
                try:
                    yield from self._persist(self.disk, sb=self.disk.sb.with_flags(
                        set_=md.F_OUTDATED))
                except MetaIOError as e:
                    self._log("error", f"cannot record Outdated: {e}")
            self._start(self._demote_when_unused(), name="demote-when-unused")
            return
        if code in (3, 4, 5, 7):
            what = {3: "peer is inconsistent or outdated already", 4: "peer was fenced",
                    5: "peer is unreachable, assumed to be dead",
                    7: "peer was stonithed"}[code]
            self._log("warning", f"fence-peer helper returned {code} ({what})")
            try:
                yield from self._peer_outdated()
            except MetaIOError as e:
                self._log("error", f"cannot record the peer as outdated: {e}")
            self._resume_io()
        else:
            self._log("error", "fence-peer helper %s (returned %s); %s" % (
                "missing" if code is None and "fence-peer" not in self.cfg.handlers
                else "broken", code,
                "I/O stays suspended until 'replfsadm resume-io'" if stonith
                else "continuing without fencing"))
            self.last_event = f"fence-peer failed ({code})"

    def _demote_when_unused(self):
        """After a lost fence-peer decision: once nothing has the device open
        (the fenced mounts are unmounted), become Secondary, so the next
        connection makes this node the winner's SyncTarget."""
        yield from _until(lambda: not self.fence_lost or self.role is not Role.Primary
                          or not self.opens["any"])
        if self.fence_lost and self.role is Role.Primary:
            try:
                yield from self._secondary()
                self._log("warning", "demoted after losing the fence-peer decision; it "
                                     "resyncs from the peer when the link is back")
            except (ReplfsError, MetaIOError) as e:
                self._log("error", f"cannot demote after a lost fence-peer decision: {e}")

    # ------------------------------------------------------------ handshake
    def _recv(self, until: float = math.inf):
        yield from _until(lambda: bool(self._rx), until)
        if not self._rx:
            raise Drop("handshake timed out", ConnState.Timeout)
        return self._rx.popleft()

    def _my_params(self, disk: Disk | None = None, dstate: DiskState | None = None
                   ) -> P.Params:
        """What this node tells the peer in a handshake (or, with ``disk``,
        about a disk attached under a live connection)."""
        if disk is None:
            disk, dstate = self.disk, self.dstate
        proto = self.cfg.protocol.encode()
        common = (proto, int(self.cfg.two_primaries), int(self.discard_my_data),
                  _role_code(self.role), _disk_code(dstate))
        alg = (self._integrity or "").encode()
        valg = (self.cfg.verify_alg or "").encode()
        if disk is None:
            return P.Params(*common, 0, 0, 0, 0, 0, 0, 0, 0, alg, valg)
        u = disk.sb.uuids
        flags = 0
        if dstate is DiskState.Inconsistent:
            flags |= P.PF_INCONSISTENT
        if disk.crashed_primary:
            flags |= P.PF_CRASHED_PRIMARY
        if disk.full_if_target:
            flags |= P.PF_FULL_IF_TARGET
        return P.Params(*common, flags, disk.sb.data_size, disk.sb.device_uuid,
                        u.current, u.bitmap, u.history[0], u.history[1], disk.bitmap.count,
                        alg, valg)

    def _session_main(self):
        self._set(cstate=ConnState.WFReportParams)
        # From here until the sync decision is made, nothing may change the
        # generation or the bitmap we tell the peer about: writes that
        # cannot be replicated wait, and those already running finish
        # first; so do the previous session's writes for the peer.
        self._quiesce += 1
        limit = self.now + max(self.cfg.timeout, 5.0)
        yield from _until(lambda: not self._unrepl_inflight and not len(self._recv_ranges),
                          limit)
        self._sent_params = self._my_params()
        self._send(self._sent_params)
        params = yield from self._recv(limit)
        if not isinstance(params, P.Params):
            raise P.RemoteProtocolError(f"expected Params, got {type(params).__name__}")
        if self.disk is None and params.data_size:
            self.size = params.data_size
        if params.protocol.decode(errors="replace") != self.cfg.protocol:
            raise Fatal(f"incompatible protocol settings (we use {self.cfg.protocol}, "
                        f"peer uses {params.protocol.decode(errors='replace')})")
        if bool(params.two_primaries) != self.cfg.two_primaries:
            raise Fatal("incompatible allow-two-primaries settings")
        peer_alg = params.integrity_alg.rstrip(b"\0").decode(errors="replace")
        if peer_alg != (self._integrity or ""):
            raise Fatal(f"incompatible data-integrity-alg settings (we use "
                        f"{self._integrity or 'none'}, peer uses {peer_alg or 'none'})")
        peer_valg = params.verify_alg.decode(errors="replace")
        if peer_valg != (self.cfg.verify_alg or ""):
            raise Fatal(f"incompatible verify-alg settings (we use "
                        f"{self.cfg.verify_alg or 'none'}, peer uses {peer_valg or 'none'})")
        if self.disk is not None and params.data_size and params.data_size != self.size:
            yield from self._finish_interrupted_grow(params.data_size)
        self.peer_params = params
        self._set(peer_role=_peer_role(params.role), pdsk=_peer_disk(params.disk))
        if self.role is Role.Primary and self.disk is None and self.ed_uuid \
                and params.data_size:
            # (DRBD: "Can only connect to data with current UUID") The data
            # this diskless Primary served may be newer than the peer's
            # disk: one that missed writes must not take new ones.
            ed = self.ed_uuid & ~1
            if (params.current & ~1) != ed and (params.bitmap & ~1) != ed:
                raise Fatal(f"Can only connect to data with current UUID={self.ed_uuid:016X} "
                            f"(this node is Primary without a disk; the peer's data is "
                            f"{params.current:016X})")
        self.peer_current = params.current
        if self.role is Role.Primary and self.disk is None:
            self._note_exposed_data(params.current)
        self._deciding = True
        try:
            decision, split_brain = self._decide(params)
            if split_brain is not None:
                decision = yield from self._after_split_brain(split_brain)
        finally:
            self._deciding = False
        if self._lost_after_decision is not None:
            state, why = self._lost_after_decision
            raise Drop(why, state)
        # A SyncTarget whose disk failed under it is resynced in full (both
        # sides read the flag from the Params exchanged: the same answer).
        if decision is Decision.BITMAP_TARGET and sp_flags(self._sent_params) & P.PF_FULL_IF_TARGET:
            decision = Decision.FULL_TARGET
        elif decision is Decision.BITMAP_SOURCE and params.flags & P.PF_FULL_IF_TARGET:
            decision = Decision.FULL_SOURCE
        if self.disk is not None and not decision.i_am_target:
            self.disk.full_if_target = False    # its data stands as it is
        if decision is Decision.UNRELATED:
            raise Fatal("Unrelated data, aborting!")
        if decision.i_am_source and self.dstate is DiskState.Inconsistent:
            # (DRBD's words) newer by its UUIDs, but not a whole copy of
            # that data: an admin decides (invalidate, or primary --force)
            raise Fatal("I shall become SyncSource, but I am inconsistent!")
        if decision.i_am_target and self.role is Role.Primary and \
                self.dstate is not DiskState.Inconsistent:
            if self.fence_lost:
                raise Drop("I shall become SyncTarget, but I am primary (the loser of the "
                           "fence-peer decision: retrying once it is demoted)")
            # (DRBD's rr-conflict disconnect, its default; replfs has no
            # other: after-sb violently-as0p that discards a Primary's data
            # ends here too, as it does in DRBD unless rr-conflict says so)
            raise Fatal("I shall become SyncTarget, but I am primary!")
        if (self.role is Role.Primary and self.peer_role is Role.Primary
                and not self.cfg.two_primaries):
            raise Fatal("both nodes are Primary and allow-two-primaries is not set; "
                        "demote one with 'replfsadm secondary'")
        self.discard_my_data = False
        self._peer_bitmap_done = False
        if decision.i_am_target and self.dstate in (DiskState.UpToDate, DiskState.Consistent):
            # As DRBD: a node that is to be SyncTarget has no data anyone
            # should rely on from this moment, even if the sync never
            # starts (the link breaks first): Outdated at most.
            yield from self._persist(self.disk, sb=self.disk.sb.with_flags(set_=md.F_OUTDATED))
            self._set(dstate=DiskState.Outdated)
        if self.susp and not self.fence_lost:
            # The peer is back before anyone decided the fence: the writes
            # held since the link was lost were settled by this handshake
            # (marked out of sync, resynced whichever way it says), so they
            # fail rather than claim a place in a generation never started.
            self._log("warning", "susp( 1 -> 0 ) the peer is back: writes held since the "
                                 "link was lost fail")
            for p in self._held:
                p.abandoned = True
            self._held.clear()
            self.susp = False
        # Go straight to the state the decision calls for: showing
        # "Connected" first would tell wait-sync (and admins) that the
        # disks agree before the resync has even started.
        if decision.i_am_source:
            self._set(cstate=ConnState.StartingSyncS if decision.full else ConnState.WFBitMapS)
        elif decision.i_am_target:
            self._set(cstate=ConnState.StartingSyncT if decision.full else ConnState.WFBitMapT)
        else:
            self._set(cstate=ConnState.Connected)
        self._quiesce = 0
        sp = self._sent_params
        if self._role_news or sp.role != _role_code(self.role) \
                or sp.disk != _disk_code(self.dstate):
            # (changed since our Params went out: told now, or never)
            self._role_news = False
            self._tell_peer_state()
        if self.disk is not None and sp.current != self.disk.sb.uuids.current:
            self._send(P.CurrentUuid(self.disk.sb.uuids.current))
        if self.user_isp:
            self._send(P.SyncPause(1))      # (the peer's flag for us starts cleared)
        session = self.session
        self._start(self._receiver(), group=session, name="receiver")
        self._start(self._pinger(), group=session, name="pinger")
        if decision is Decision.NO_SYNC and self.disk is not None:
            yield from self._connected_in_sync(params)
        elif decision.i_am_source:
            if self.dstate in (DiskState.Consistent, DiskState.Outdated):
                # the comparison found this data the newest there is
                yield from self._persist(self.disk, sb=self.disk.sb.with_flags(
                    set_=md.F_WAS_UP_TO_DATE, clear=md.F_OUTDATED))
                self._set(dstate=DiskState.UpToDate)
                self._tell_peer_state()
            yield from self._begin_sync_as_source(decision.full)
        elif decision.i_am_target:
            if not decision.full:
                self._send_bitmap()
        elif decision is Decision.BOTH_FRESH:
            self._log("info", "both disks are fresh (just created): no sync until one "
                              "node is made Primary with --force")

    def _decide(self, params: P.Params) -> tuple[Decision, Resolution | None]:
        """The sync decision, and after a split brain how the after-sb
        policies resolve it (core/splitbrain.py), or None when there was
        none.  Decided from exactly what we told the peer, so both sides
        reach mirror-image decisions even if something changed meanwhile."""
        sp = self._sent_params
        if self.disk is None or sp.data_size == 0 or params.data_size == 0:
            return Decision.NO_SYNC, None
        me = side_of(sp, self.cfg.node)
        peer = side_of(params, self.cfg.peer)
        decision = compare(me, peer)
        self._log("info", f"uuid_compare: {decision.value} (me {me.uuids.show()}, "
                          f"peer {peer.uuids.show()})")
        if decision is not Decision.SPLIT_BRAIN:
            return decision, None
        cfg = self.cfg
        resolution = resolve(me, peer, Policies(cfg.after_sb_0pri, cfg.after_sb_1pri,
                                                cfg.after_sb_2pri),
                             discard_mine=bool(sp.discard_my_data),
                             discard_peer=bool(params.discard_my_data))
        return resolution.decision, resolution

    def _after_split_brain(self, sb: Resolution):
        """Act on how a split brain is resolved: log it as DRBD does; a
        Primary whose data call-pri-lost-after-sb discards gives up its
        role, or, when it cannot (the device is in use), has its mounts
        stopped (PriLost), runs the pri-lost-after-sb handler, and the split
        brain stays unresolved.  Unresolved: the split-brain handler runs
        and the connection is dropped for good (StandAlone)."""
        for note in sb.notes:
            self._log("warning", note)
        if sb.pri_lost and self.role is Role.Primary:
            gave_up = False
            if not self.opens["any"] and not self.ap:
                try:
                    yield from self._secondary()
                    gave_up = True
                except (ReplfsError, StateChangeRefused, MetaIOError) as e:
                    self._log("error", f"cannot give up the primary role: {e}")
            if gave_up:
                self._log("warning", "Successfully gave up primary role.")
                self._role_news = True      # (the peer was told "Primary" in Params)
            else:
                why = ("split brain: after-sb call-pri-lost-after-sb discards the data of "
                       "this Primary")
                self._log("error", f"{why}, and the device is in use: its filesystem "
                                   f"mounts are stopped and pri-lost-after-sb runs")
                self.last_event = why
                self._emit(PriLost(why))
                yield from self._handler("pri-lost-after-sb")
                sb = sb.refused()
        if sb.resolved:
            self._log("warning", sb.line)
            return sb.decision
        self.split_brain = True
        yield from self._handler("split-brain")
        raise Fatal(sb.line)

    def _connected_in_sync(self, params: P.Params):
        disk = self.disk
        peer_disk = _peer_disk(params.disk)
        if self.dstate in (DiskState.Consistent, DiskState.Outdated) and \
                peer_disk in (DiskState.UpToDate, DiskState.Consistent, DiskState.Outdated):
            yield from self._persist(disk, sb=disk.sb.with_flags(
                set_=md.F_CONSISTENT | md.F_WAS_UP_TO_DATE, clear=md.F_OUTDATED))
            self._set(dstate=DiskState.UpToDate)
            self._tell_peer_state()
        if self.dstate is DiskState.UpToDate and peer_disk is DiskState.UpToDate:
            yield from self._peer_current()
        yield from self._forget_crash()

    def _forget_crash(self):
        """The peer has what we had: a past crash as Primary no longer matters."""
        disk = self.disk
        if disk is not None and disk.crashed_primary:
            disk.crashed_primary = False
            if self.role is not Role.Primary and disk.sb.has(md.F_PRIMARY):
                yield from self._persist(disk, sb=disk.sb.with_flags(clear=md.F_PRIMARY))

    # ------------------------------------------------------------ keepalive
    def _pinger(self):
        token = 0
        interval = min(self.cfg.ping_int, self.cfg.ping_timeout, 1.0)
        while True:
            yield Wait(until=self.now + interval)
            now = self.now
            if now - self.last_heard > self.cfg.ping_int + self.cfg.ping_timeout:
                raise Drop("PingAck did not arrive in time.", ConnState.Timeout)
            if now - self.last_heard > self.cfg.ping_int / 2:
                token += 1
                self._send(P.Ping(token))
            self._barrier()
            oldest = min((p.t0 for p in self._pending.values()), default=now)
            ko = self.cfg.ko_count
            limit = max(self.cfg.timeout, self.cfg.ping_timeout) * (ko or 1)
            if ko != 0 and now - oldest > limit:
                if ko is None:
                    raise Drop("peer did not acknowledge writes in time", ConnState.Timeout)
                raise Drop(f"Remote failed to finish a request within {limit * 1000:.0f}ms > "
                           f"ko-count ({ko}) * timeout ({self.cfg.timeout * 10:.0f} * 0.1s)",
                           ConnState.Timeout)

    # ============================================================ resync
    def _send_bitmap(self) -> None:
        raw = self.disk.bitmap.to_bytes()
        step = 1024 * 1024
        for off in range(0, max(len(raw), 1), step):
            last = int(off + step >= len(raw))
            self._send(P.BitmapChunk(off, last, zlib.compress(raw[off:off + step], 1)))

    def _begin_sync_as_source(self, full: bool, *, exchange: bool = True):
        """Start a resync to the peer.  ``exchange``: send our bitmap and
        merge the peer's first (after a handshake); not after Ahead, where
        the peer was told every block by OutOfSync."""
        disk = self.disk
        if full:
            self._set(cstate=ConnState.StartingSyncS)
            disk.bitmap.set_all()
            yield from self._persist(disk)
        elif not exchange:
            yield from self._persist(disk)
        else:
            self._set(cstate=ConnState.WFBitMapS)
            self._send_bitmap()
            limit = self.now + max(self.cfg.timeout * 3, 30)
            yield from _until(lambda: self._peer_bitmap_done, limit)
            if not self._peer_bitmap_done:
                raise Drop("the peer's bitmap did not arrive in time", ConnState.Timeout)
        total = disk.bitmap.count
        self._send(P.SyncStart(disk.sb.uuids.current, total, int(full)))
        self._sync = SyncRun("source", total, self.now,
                             rate=RateController(self.cfg.rate, self.now))
        self._set(cstate=self._sync_state(), pdsk=DiskState.Inconsistent)
        self._start(self._resync_sender(), group=self.session, name="resync-sender")

    def _resync_sender(self):
        """Send what the bitmap marks, paced by the rate controller.  With
        csums-alg, the first pass sends each block's digest instead of its
        data; the target clears what it has already, and the blocks that
        differ stay marked for a later pass, which sends data."""
        disk = self.disk
        sync = self._sync
        full_window = RESYNC_WINDOW // RESYNC_CHUNK
        chunk_blocks = RESYNC_CHUNK // BLOCK
        alg = self.cfg.csums_alg
        first_pass = True
        while True:
            for first, count in list(disk.bitmap.runs()):
                pos = first
                while pos < first + count:
                    n = min(chunk_blocks, first + count - pos)
                    yield from self._pace(sync, paused=self._sync_paused)
                    sync.window -= 1
                    off = pos * BLOCK
                    # (after any write of the peer's to these blocks has
                    # landed here too: a SyncTarget whose own copy lacks a
                    # write it sent us must not get the data from before it)
                    yield from _until(lambda: not self._recv_ranges.overlaps(
                        off, off + n * BLOCK))
                    token = yield from self._lock_range(off, off + n * BLOCK)
                    try:
                        data = yield self._issue(DiskRead, off, n * BLOCK)
                    finally:
                        self._ranges.remove(token)
                    if isinstance(data, int):
                        yield from self._local_io_error("read (resync)", data, off, n * BLOCK)
                        raise Drop("local read failed during resync")
                    self.dr += len(data)
                    if alg and first_pass:
                        self._send(P.ResyncCsum(off, len(data), alg.encode(),
                                                csums_of(alg, data)))
                        sync.csum_blocks += n
                    else:
                        self._send_data(P.ResyncData(off, data), data)
                        self.ns += len(data)
                    sync.rate.sent(len(data))
                    pos += n
            # Wait until every chunk is acknowledged, then finish.
            yield from _until(lambda: sync.window == full_window)
            if not disk.bitmap.count:
                break
            # Blocks that differed, or were marked again while we were
            # syncing: go round once more (with data).
            first_pass = False
        self._send(P.SyncDone(disk.sb.uuids.current))

    def _pace(self, run, paused: Callable[[], bool] = lambda: False):
        """Wait until ``run`` may send its next chunk: not paused, a slot in
        its window, and the rate controller allows it (application I/O
        since it last looked, or in flight, counts as competing)."""
        ctl = run.rate
        while True:
            yield from _until(lambda: run.window > 0 and not paused())
            busy = bool(self.ap or self.ua) or self.app_io != run.app_seen
            run.app_seen = self.app_io
            if ctl.may_send(self.now, busy):
                return
            yield Wait(until=ctl.next_turn)

    def _finish_sync_as_source(self):
        disk = self.disk
        yield from self._persist(disk, sb=replace(
            disk.sb.with_flags(clear=md.F_PEER_OUTDATED), uuids=disk.sb.uuids.retire_bitmap()))
        yield from self._forget_crash()
        sync = self._sync
        if sync is not None:
            self._log_sync_done(sync)
        self._sync = None
        self._set(cstate=ConnState.Connected, pdsk=DiskState.UpToDate)

    def _log_sync_done(self, sync: SyncRun) -> None:
        paused = sync.paused_time(self.now)
        active = self.now - sync.start - paused
        self._log("info", "Resync done (total %d sec; paused %d sec; %d K/sec)" % (
            self.now - sync.start, paused, sync.total * 4 / active if active > 0 else 0))
        if sync.csum_blocks:
            equal = sync.equal_blocks
            self._log("info", "csums-alg %s: %d of %d 4k blocks had equal checksums "
                      "(%d %%), eliminated: %dK; transferred %dK total %dK" % (
                          self.cfg.csums_alg, equal, sync.csum_blocks,
                          100 * equal // sync.csum_blocks, equal * 4,
                          (sync.total - equal) * 4, sync.total * 4))
            self.last_event = (f"resync skipped {equal} blocks with equal checksums "
                               f"({equal * 4}K of {sync.total * 4}K)")

    def _begin_sync_as_target(self, pkt: P.SyncStart):
        if "before-resync-target" in self.cfg.handlers:
            yield from self._handler("before-resync-target")
        disk = self.disk
        if pkt.full:
            disk.bitmap.set_all()
        self._joined_unmerged = False
        yield from self._persist(disk, sb=disk.sb.with_flags(clear=md.F_CONSISTENT))
        disk.full_if_target = False         # (every block it needs is marked, durably)
        self._sync = SyncRun("target", disk.bitmap.count, self.now)
        self._set(cstate=self._sync_state(), dstate=DiskState.Inconsistent)

    def _apply_resync(self, session: int, pkt: P.ResyncData, recv_token: int):
        ok = False
        try:
            disk = self.disk
            if disk is None:
                return
            # Under the application range lock, and only into blocks still
            # marked: a Primary that is SyncTarget may have written newer
            # data into some of them since the peer read this chunk.
            app = yield from self._lock_range(pkt.offset, pkt.offset + len(pkt.data))
            try:
                first, count = blocks_of(pkt.offset, len(pkt.data))
                blk = first
                while blk < first + count:
                    if not disk.bitmap.test(blk):
                        blk += 1
                        continue
                    run = blk
                    while run < first + count and disk.bitmap.test(run):
                        run += 1
                    lo, hi = (blk - first) * BLOCK, (run - first) * BLOCK
                    err = yield self._issue(DiskWrite, pkt.offset + lo, pkt.data[lo:hi])
                    if err:
                        yield from self._local_io_error("write (resync)", err,
                                                        pkt.offset + lo, hi - lo)
                        return
                    self.dw += hi - lo
                    disk.bitmap.clear_range(blk, run - blk)
                    blk = run
                ok = True
            finally:
                self._ranges.remove(app)
        finally:
            self._recv_ranges.remove(recv_token)
            self._recv_slots -= 1
        if ok and self.session == session and self.live:
            if self._sync is not None:
                self._sync.acked += len(pkt.data)
            self._send(P.ResyncAck(pkt.offset, len(pkt.data)))

    def _finish_sync_as_target(self, pkt: P.SyncDone):
        disk = self.disk
        err = yield self._issue(DiskFlush)
        if err:
            raise MetaIOError(err)
        disk.bitmap.clear_all()
        sb = disk.sb
        flags = (sb.flags | md.F_CONSISTENT | md.F_WAS_UP_TO_DATE) & ~md.F_OUTDATED
        yield from self._persist(disk, sb=replace(sb, uuids=sb.uuids.adopt(pkt.source_current),
                                                  flags=flags))
        yield from self._forget_crash()
        if self._sync is not None:
            self._log_sync_done(self._sync)
        self._sync = None
        self._set(cstate=ConnState.Connected, dstate=DiskState.UpToDate)
        if "after-resync-target" in self.cfg.handlers:
            self._start(self._handler("after-resync-target"), name="after-resync-target")

    # ============================================================ online grow
    # replfsadm resize (DRBD's drbdadm resize), while Connected with both
    # disks UpToDate.  The initiator measures its backing disk (ProbeDisk),
    # asks the peer for what its own allows (ResizeRequest/ResizeReply),
    # takes the minimum (at most ``limit``), grows its own meta-data
    # (GrowMeta: moved to the new end of an internal disk, crash-safely),
    # then tells the peer to do the same (ResizeCommit/ResizeDone).  The
    # new area is marked out of sync on both nodes (unless assume_clean)
    # and resynced from the SyncSource: the initiator, unless the peer is
    # Primary and the initiator is not.  Shrinking is refused.
    def resize(self, op, *, assume_clean: bool = False, limit: int = 0) -> list:
        self._start(self._op(op, self._resize(assume_clean, limit)), name="resize")
        return self._drain()

    def _check_resize(self) -> None:
        """Raise unless this node can take part in an online grow now."""
        if self.disk is None:
            raise refuse(SS_IS_DISKLESS, EXIT_NO_LOCAL_DISK)
        if self._resizing:
            raise refuse(SS_CONCURRENT_ST_CHG)      # (both nodes at once: both refused)
        if self.live and self.cstate.is_connected and self.cstate is not ConnState.Connected:
            raise fail(ERR_RESIZE_RESYNC, self.cfg.name)
        if not self.live or self.cstate is not ConnState.Connected:
            raise refuse((SS_NEED_CONNECTION[0], "Need a connection for an online resize "
                                                 "(both nodes Connected)"))
        if self.dstate is not DiskState.UpToDate or self.pdsk is not DiskState.UpToDate:
            raise refuse((SS_NO_UP_TO_DATE_DISK[0], "Need access to UpToDate data: an "
                                                    "online resize needs both disks UpToDate"))

    def _probe_resize(self):
        """(backing disk size, largest usable size it allows, why not more)."""
        disk = self.disk
        size = yield self._issue(ProbeDisk)
        if self.disk is not disk:
            raise ReplfsError(f"{self.cfg.name}: the disk was detached during resize",
                              EXIT_STATE)
        if size < 0:
            raise ReplfsError(f"{self.cfg.name}: cannot measure the backing disk "
                              f"(errno {-size})", EXIT_STATE)
        self._probed_disk_size = size
        most, why = md.max_grown_size(disk.sb.layout, size)
        return size, most, why

    def _resize(self, assume_clean: bool, limit: int):
        self._check_resize()
        self._resizing = True
        try:
            yield from self._resize_steps(assume_clean, limit)
        finally:
            self._resizing = False
            self._probed_disk_size = 0

    def _await_answer(self, token: int, session: int):
        """The peer's ResizeReply/ResizeDone for ``token`` (None: link lost)."""
        self._resize_answers[token] = None
        try:
            yield from _until(lambda: self._resize_answers[token] is not None
                              or self.session != session or not self.live)
            return self._resize_answers[token]
        finally:
            del self._resize_answers[token]

    def _resize_steps(self, assume_clean: bool, limit: int):
        name = self.cfg.name
        session = self.session
        disk_size, mine, my_why = yield from self._probe_resize()
        token = self.flows.token()
        self._send(P.ResizeRequest(token))
        reply = yield from self._await_answer(token, session)
        if reply is None:
            raise ReplfsError(f"{name}: the connection was lost during resize; nothing "
                              f"was changed", EXIT_STATE)
        peer_why = reply.reason.decode(errors="replace")
        if reply.result:
            raise ReplfsError(f"{name}: the peer refused the resize: {peer_why}",
                              exit_code_for(reply.result) if reply.result < 0 else EXIT_STATE)
        old = self.size
        limit -= limit % BLOCK
        new = min(mine, reply.max_size)
        if limit:
            if limit < old:
                raise ReplfsError(f"{name}: {ERR_IMPLICIT_SHRINK.message}\n--size={limit} "
                                  f"is less than the current size ({old} bytes): shrinking "
                                  f"online is not supported", EXIT_CONFIG)
            new = min(new, limit)
        if new < old:
            which = (f"this node's allows {mine}" if mine < old
                     else f"the peer's allows {reply.max_size}")
            raise ReplfsError(f"{name}: {ERR_IMPLICIT_SHRINK.message}\nA backing disk is "
                              f"smaller than the device ({old} bytes): {which}; shrinking "
                              f"online is not supported", EXIT_CONFIG)
        if new == old:
            why = my_why if mine == old and my_why else \
                peer_why if reply.max_size == old and peer_why else ""
            if why:
                raise ReplfsError(f"{name}: {ERR_MD_DISK_TOO_SMALL.message}\n{why}",
                                  EXIT_CONFIG)
            self._log("info", f"resize: nothing to do: the device already has the size "
                              f"both backing disks allow ({old} bytes)")
            self.last_event = f"resize: nothing to do (size {old // 1024} KB)"
            return
        self._check_resize_again(session)
        yield from self._grow(disk_size, new, mark=not assume_clean)
        source = self.role is Role.Primary or self.peer_role is not Role.Primary
        flags = (P.RZ_ASSUME_CLEAN if assume_clean else 0) | \
            (0 if source else P.RZ_YOU_ARE_SOURCE)
        token = self.flows.token()
        self._send(P.ResizeCommit(token, new, flags))
        done = yield from self._await_answer(token, session)
        if done is None or done.result:
            why = "the connection was lost" if done is None else \
                done.reason.decode(errors="replace")
            self.last_event = f"resize: grown here, not on the peer ({why})"
            raise ReplfsError(f"{name}: this node grew to {new} bytes but the peer did not "
                              f"confirm its own grow ({why}); the nodes will not connect "
                              f"until both have the same size (see 'Resize' in "
                              f"docs/mirror-engine.md)", EXIT_STATE)
        self.last_event = f"resized from {old // 1024} KB to {new // 1024} KB"
        if source and not assume_clean and self.live and self.session == session \
                and self.cstate is ConnState.Connected:
            self._start(self._begin_sync_as_source(False, exchange=False), group=session,
                        name="sync-source")

    def _check_resize_again(self, session: int) -> None:
        """The state may have changed while the peer answered."""
        if self.session != session or not self.live or self.cstate is not ConnState.Connected \
                or self.dstate is not DiskState.UpToDate or self.pdsk is not DiskState.UpToDate:
            raise ReplfsError(f"{self.cfg.name}: the state changed during resize (now "
                              f"{self.cstate.value}, {self.dstate.value}/{self.pdsk.value}); "
                              f"nothing was changed", EXIT_STATE)

    def _grow(self, disk_size: int, new_size: int, *, mark: bool):
        """Grow the meta-data to ``new_size`` usable bytes (GrowMeta) and
        then the device; ``mark``: the new blocks are out of sync."""
        disk = self.disk
        old = self.size
        try:
            lay = md.grown_layout(disk.sb.layout, disk_size, new_size)
        except md.MetaDataError as e:
            raise ReplfsError(f"{self.cfg.name}: {ERR_MD_DISK_TOO_SMALL.message}\n{e}",
                              EXIT_CONFIG) from None
        nblocks = new_size // BLOCK
        yield from _until(lambda: not disk.meta_busy)
        disk.meta_busy = True
        try:
            # The whole grown bitmap goes to the new place: the pages not
            # yet written go with it (marked dirty again if it fails).
            disk.bitmap.take_dirty_pages()
            bits = disk.bitmap.grown_bytes(nblocks, set_new=mark)
            sb = replace(disk.sb, data_size=new_size, layout=lay)
            self.bm_writes += (len(bits) + BLOCK - 1) // BLOCK
            self.al_writes += 1
            err = yield self._issue(GrowMeta, lay, bits, tuple(disk.al.extents), sb)
        finally:
            disk.meta_busy = False
        if err:
            disk.bitmap.mark_all_pages_dirty()
            if self.disk is disk:
                yield from self._local_io_error("meta-data write (resize)", err, 0, 0)
            raise MetaIOError(err)
        # (no yield from here on: no flow sees the old size with the new
        # layout, or the reverse)
        disk.bitmap.grow(nblocks, set_new=mark)
        disk.sb = replace(disk.sb, data_size=new_size, layout=lay)
        if self.disk is disk:
            self.size = new_size
        self._log("info", "size = %d KB (was %d KB)%s" % (
            new_size // 1024, old // 1024, "" if mark else "; new area assumed clean"))

    def _finish_interrupted_grow(self, peer_size: int):
        """The sizes differ in a handshake: an online grow finished on one
        node only (a crash, or the link lost, between the two nodes'
        meta-data moves).  The smaller node grows too, if its backing
        disk allows, with the new area marked out of sync (the handshake
        after the reconnect then resyncs it: equal UUIDs and set bits
        make a bitmap resync), and both connect again.  If it cannot,
        the connection is refused for good on that side; the larger
        node keeps trying (it may grow later)."""
        if peer_size < self.size:
            raise Drop(f"the peer's disk ({peer_size} bytes) is smaller than ours "
                       f"({self.size} bytes): an online resize was interrupted; waiting "
                       f"for the peer to finish it")
        try:
            disk_size, most, why = yield from self._probe_resize()
            if most < peer_size:
                raise ReplfsError(f"this backing disk allows {most} bytes"
                                  f"{' (' + why + ')' if why else ''}", EXIT_STATE)
            self._log("warning", f"the peer's disk has {peer_size} bytes, ours {self.size}: "
                                 f"finishing an interrupted online resize")
            yield from self._grow(disk_size, peer_size, mark=True)
        except ReplfsError as e:
            raise Fatal(f"the peer's disk size ({peer_size} bytes) differs from ours "
                        f"({self.size} bytes) and ours cannot grow to it: {e}; grow the "
                        f"backing disk, then connect") from None
        finally:
            self._probed_disk_size = 0
        raise Drop("grew to the peer's size (an interrupted online resize): reconnecting")

    def _on_resize_request(self, pkt: P.ResizeRequest):
        self._start(self._answer_resize(self.session, pkt.token), group=self.session,
                    name="resize-answer")

    def _answer_resize(self, session: int, token: int):
        try:
            self._check_resize()
            _size, most, why = yield from self._probe_resize()
        except StateChangeRefused as e:
            self._send(P.ResizeReply(token, 0, e.code, str(e).encode()))
            return
        except ReplfsError as e:
            self._send(P.ResizeReply(token, 0, 1, e.message.encode()))
            return
        if self.session == session and self.live:
            self._send(P.ResizeReply(token, most, 0, why.encode()))

    def _on_resize_commit(self, pkt: P.ResizeCommit):
        disk = self._need_disk("ResizeCommit")
        session = self.session
        mark = not pkt.flags & P.RZ_ASSUME_CLEAN
        try:
            if pkt.new_size < self.size:
                raise ReplfsError("the peer asked to shrink the device", EXIT_STATE)
            if pkt.new_size > self.size:
                if not self._probed_disk_size:
                    yield from self._probe_resize()
                most, why = md.max_grown_size(disk.sb.layout, self._probed_disk_size)
                if pkt.new_size > most or pkt.new_size % BLOCK:
                    raise ReplfsError(f"this node's backing disk allows {most} bytes, not "
                                      f"{pkt.new_size}{' (' + why + ')' if why else ''}",
                                      EXIT_STATE)
                yield from self._grow(self._probed_disk_size, pkt.new_size, mark=mark)
        except (ReplfsError, MetaIOError) as e:
            self._log("error", f"resize to {pkt.new_size} bytes failed: {e}")
            self._send(P.ResizeDone(pkt.token, 1, str(e).encode()))
            return
        finally:
            self._probed_disk_size = 0
        self._send(P.ResizeDone(pkt.token, 0))
        self.last_event = f"resized to {pkt.new_size // 1024} KB by the peer"
        if pkt.flags & P.RZ_YOU_ARE_SOURCE and mark and disk is self.disk \
                and self.session == session and self.cstate is ConnState.Connected:
            self._start(self._begin_sync_as_source(False, exchange=False), group=session,
                        name="sync-source")

    def _on_resize_answer(self, pkt):
        if pkt.token in self._resize_answers:
            self._resize_answers[pkt.token] = pkt

    # ============================================================ verify
    def verify(self, op) -> list:
        def gen():
            if self.cstate is not ConnState.Connected or not self.live:
                raise refuse(SS_NEED_CONNECTION)
            if self.disk is None or self.dstate is not DiskState.UpToDate:
                raise refuse(SS_IS_DISKLESS, EXIT_NO_LOCAL_DISK)
            self._verify = VerifyRun(self.now, self.size,
                                     rate=RateController(self.cfg.rate, self.now))
            self._set(cstate=ConnState.VerifyS)
            self._start(self._verify_sender(), group=self.session, name="verify-sender")
            return
            yield
        self._start(self._op(op, gen()), name="verify")
        return self._drain()

    def _verify_sender(self):
        v = self._verify
        step = RESYNC_CHUNK
        for off in range(0, self.size, step):
            n = min(step, self.size - off)
            yield from self._pace(v)
            v.window -= 1
            token = yield from self._lock_range(off, off + n)
            try:
                data = yield self._issue(DiskRead, off, n)
            finally:
                self._ranges.remove(token)
            if isinstance(data, int):
                raise Drop("local read failed during verify")
            self.dr += len(data)
            self._send(P.VerifyRequest(off, n, block_digests(data, self._verify_alg)))
            v.rate.sent(n)
        yield from _until(lambda: v.window == VERIFY_WINDOW)
        yield from self._persist(self.disk)
        self._send(P.VerifyDone(v.oos))
        elapsed = self.now - v.start
        self._log("info", "Online verify done (total %d sec; paused 0 sec; %d K/sec)" % (
            elapsed, self.size / 1024 / max(elapsed, 0.001)))
        if v.oos:
            self._log("warning", f"Online verify found {v.oos} 4k block out of sync!")
        self.last_event = f"online verify found {v.oos} 4k blocks out of sync"
        self._set(cstate=ConnState.Connected)

    def _log_oos_runs(self, first: int, bits: list[bool]) -> int:
        """Mark and log each run of differing blocks; the number marked."""
        marked = 0
        run_start = None
        for i in range(len(bits) + 1):
            differs = i < len(bits) and bits[i]
            if differs and run_start is None:
                run_start = i
            elif not differs and run_start is not None:
                count = i - run_start
                marked += count
                if self.disk is not None:
                    self.disk.bitmap.set_range(first + run_start, count)
                self._log("warning", "Out of sync: start=%d, size=%d (sectors)" % (
                    (first + run_start) * BLOCK // 512, count * BLOCK // 512))
                run_start = None
        return marked

    # ============================================================ receiving
    def _receiver(self):
        while True:
            yield from _until(lambda: bool(self._rx))
            pkt = self._rx.popleft()
            handler = self._HANDLERS.get(type(pkt))
            if handler is None:
                raise P.RemoteProtocolError(
                    f"unexpected {type(pkt).__name__} on an established connection")
            step = handler(self, pkt)
            if step is not None:
                yield from step

    def _need_disk(self, what: str) -> Disk:
        if self.disk is None:
            raise P.RemoteProtocolError(f"{what} received but this node has no disk")
        return self.disk

    def _check_peer_range(self, offset: int, length: int) -> None:
        if self.disk is None or offset < 0 or offset + length > self.size:
            raise P.RemoteProtocolError(f"peer wrote outside the device ({offset}+{length})")

    def _check_concurrent(self, offset: int, length: int) -> None:
        """Both nodes Primary and the peer's write overlaps one of ours in
        flight: the two disks may end up with the two writes in different
        orders.  Not resolved here (the cluster filesystem's locks must
        prevent it): logged as DRBD does, counted, and the blocks marked
        out of sync so the next resync or verify makes the disks agree."""
        if self.role is not Role.Primary or not self._app_writes:
            return
        end = offset + length
        for start, stop in self._app_writes.values():
            if start < end and offset < stop:
                self.concurrent_writes += 1
                self._log("error", "Concurrent local write detected! new: %ds +%d; "
                          "pending: %ds +%d (both nodes are Primary: the blocks are marked "
                          "out of sync)" % (offset // 512, length, start // 512, stop - start))
                if self.disk is not None:
                    first, count = blocks_of(offset, length)
                    self.disk.bitmap.set_range(first, count)
                return

    def _on_data(self, pkt: P.Data):
        self.nr += len(pkt.data)
        self.app_io += 1
        if self.disk is None:
            self._send(P.NegAck(pkt.seq, errno.EIO))
            return
        self._check_peer_range(pkt.offset, len(pkt.data))
        yield from self._epoch_barrier(pkt.epoch)
        self._check_concurrent(pkt.offset, len(pkt.data))
        start, end = pkt.offset, pkt.offset + len(pkt.data)
        yield from _until(lambda: self._recv_slots < RECV_PARALLEL
                          and not self._recv_ranges.overlaps(start, end))
        token = self._recv_ranges.add(start, end)
        self._recv_slots += 1
        self.ua += 1
        if self.cfg.protocol == "B":
            self._send(P.RecvAck(pkt.seq))
        # Whether the sender wrote this to a disk of its own is what its
        # state was when it sent it -- the state now, in stream order --,
        # not when our write completes.  (A peer whose disk joins sends no
        # write it did without it after its Params: _join_live.)
        only_copy = self.pdsk in _NO_DATA_DISK
        self._start(self._apply_peer_write(self.session, pkt, token, only_copy),
                    name="peer-write")

    def _epoch_barrier(self, epoch: int):
        """A write of a new epoch starts only once every write of the
        earlier epochs has landed (DRBD's write barriers)."""
        if epoch != self._recv_epoch:
            yield from _until(lambda: not len(self._recv_ranges))
            self._recv_epoch = epoch

    def _apply_peer_write(self, session: int, pkt: P.Data, token: int, only_copy: bool):
        failed = 0
        try:
            disk = self.disk
            if disk is None:
                failed = errno.EIO
            else:
                if only_copy:
                    # The sender has no disk: this will be the only copy.
                    # Recorded (durably) before it is written: a crash
                    # between the two must not leave data no bitmap knows.
                    yield from self._peer_lacks(pkt.offset, len(pkt.data))
                failed = yield from self._local_write(pkt.offset, pkt.data)
        except MetaIOError as e:
            failed = e.errno      # what the peer lacks could not be recorded
        finally:
            self._recv_ranges.remove(token)
            self._recv_slots -= 1
            self.ua -= 1
        if failed and self.disk is not None:
            yield from self._local_io_error("write (peer data)", failed, pkt.offset,
                                            len(pkt.data))
        if self.session == session and self.live:
            self._send(P.NegAck(pkt.seq, failed) if failed else P.WriteAck(pkt.seq))

    def _on_ack(self, pkt):
        read = self._reads.get(pkt.seq)
        if read is not None and type(pkt) is P.NegAck:
            read.append(pkt.errno or errno.EIO)
            return
        p = self._pending.pop(pkt.seq, None)
        if p is None:
            return
        p.acked = type(pkt) is P.WriteAck
        p.acked_uptodate = p.acked and self.pdsk is DiskState.UpToDate
        kept = p.acked and self.disk is not None and self._keep_until_durable(p)
        try:
            if type(pkt) is P.NegAck and self.disk is not None:
                self._log("error", "peer failed to write %d bytes at %d (errno %d); marking "
                          "out of sync" % (p.length, p.offset, pkt.errno))
                if self.live and self.cstate.is_connected and self.pdsk is DiskState.Inconsistent:
                    # The peer's disk is joining as SyncTarget (it failed
                    # this write before it had one): it must mark the range
                    # too, or it drops the resync of it as not needed.
                    self._send(P.OutOfSync(p.offset, p.length))
                yield from self._mark_unreplicated(p.offset, p.length)
                yield from self._persist(self.disk)
        finally:
            if not kept:
                self._al_release(p)
            p.received = p.done = True

    def _on_recv_ack(self, pkt: P.RecvAck):
        p = self._pending.get(pkt.seq)
        if p is not None:
            p.received = True

    def _on_flush(self, pkt: P.Flush):
        yield from _until(lambda: not len(self._recv_ranges))
        if self.disk is None:
            # No disk (it failed, or was detached, after the peer sent
            # this): nothing here can be made durable.  The StateUpdate
            # that said so went first; _on_peer_lost_disk settles it there.
            return
        if self.disk is not None:
            err = yield self._issue(DiskFlush)
            if err:
                yield from self._local_io_error("flush (peer)", err, 0, 0)
                if self.disk is not None:
                    # (on-io-error pass_on: the disk stays, and the peer
                    # cannot be told which writes it may have lost)
                    raise Drop("local flush failed")
                # Detached: the StateUpdate sent before this answer tells
                # the peer that what it asked to make durable is not here
                # (_on_peer_lost_disk marks it), so no FlushAck follows.
                return
        self._send(P.FlushAck(pkt.seq))

    def _on_flush_ack(self, pkt: P.FlushAck):
        if pkt.seq in self._flushes:
            self._flushes[pkt.seq] = True
        mark = self._flush_marks.pop(pkt.seq, None)
        if mark is not None:
            while self._unstable_dropped < mark and self._unstable:
                self._al_release(self._unstable.popleft())
                self._unstable_dropped += 1

    def _on_read_request(self, pkt: P.ReadRequest):
        if self.disk is None or self.dstate is not DiskState.UpToDate:
            self._send(P.NegAck(pkt.seq, errno.EIO))
            return
        self._check_peer_range(pkt.offset, pkt.length)
        start, end = pkt.offset, pkt.offset + pkt.length
        yield from _until(lambda: not self._recv_ranges.overlaps(start, end))
        data = yield self._issue(DiskRead, pkt.offset, pkt.length)
        if isinstance(data, int):
            self._send(P.NegAck(pkt.seq, data or errno.EIO))
            yield from self._local_io_error("read", data, pkt.offset, pkt.length)
            return
        self.dr += len(data)
        self._send_data(P.ReadReply(pkt.seq, data), data)
        self.ns += len(data)

    def _on_read_reply(self, pkt: P.ReadReply):
        read = self._reads.get(pkt.seq)
        if read is not None:
            read.append(pkt.data)

    def _on_out_of_sync(self, pkt: P.OutOfSync):
        if self.disk is None:
            return      # (sent before our StateUpdate said we have no disk)
        self._check_peer_range(pkt.offset, pkt.length)
        if self.cstate is ConnState.Behind and self.disk is not None:
            # the peer is Ahead: it has the data, we resync it later (no
            # generation of our own starts)
            first, count = blocks_of(pkt.offset, pkt.length)
            if self.disk.bitmap.set_range(first, count):
                yield from self._persist(self.disk)
            return
        yield from self._peer_lacks(pkt.offset, pkt.length)

    def _on_congestion(self, pkt: P.Congestion):
        if pkt.ahead and self.cstate is ConnState.Connected and self.disk is not None:
            # Our data falls behind the peer's until the resync: Outdated
            # (not promotable) from now on, as DRBD's Behind.
            self._set(cstate=ConnState.Behind)
            if self.dstate is DiskState.UpToDate:
                yield from self._persist(self.disk, sb=self.disk.sb.with_flags(
                    set_=md.F_OUTDATED))
                self._set(dstate=DiskState.Outdated)
                self._tell_peer_state()

    def _on_ping(self, pkt: P.Ping):
        self._send(P.PingAck(pkt.token))

    def _on_current_uuid(self, pkt: P.CurrentUuid):
        self.peer_current = pkt.uuid
        if self.disk is None:
            self._note_exposed_data(pkt.uuid)

    def _on_ping_ack(self, pkt: P.PingAck):
        return None

    def _on_state_update(self, pkt: P.StateUpdate):
        had_disk = self.pdsk in _DISK_HOLDS_DATA
        self._set(peer_role=_peer_role(pkt.role), pdsk=_peer_disk(pkt.disk))
        if self.peer_role is Role.Primary:
            # the promotion we allowed is done; peer_role tells from now on
            self._peer_promotion_allowed_at = -math.inf
        if had_disk and self.pdsk in (DiskState.Diskless, DiskState.Failed):
            yield from self._on_peer_lost_disk()

    def _on_peer_lost_disk(self):
        """The peer detached its disk (it failed, or an admin detached it).
        What it acknowledged but had not made durable may be gone with it:
        marked out of sync here, as after a lost link, in a new generation
        (this disk is the only copy from now on); app flushes waiting for
        its FlushAck are answered by this node's disk alone."""
        unstable = list(self._unstable)
        self._unstable.clear()
        self._unstable_dropped = self._unstable_added
        self._flush_marks.clear()
        for seq in self._flushes:
            if self._flushes[seq] is False:
                self._flushes[seq] = _LOST
        try:
            disk = self.disk
            if disk is not None:
                # (marked before anything waits: this runs in the session's
                # receiver, which the end of the session cancels)
                self._mark_lost([(p.offset, p.length) for p in unstable])
                if self.dstate is DiskState.UpToDate:
                    yield from self._new_generation()
                yield from self._persist(disk)
        except MetaIOError as e:
            yield from self._local_io_error("meta-data write", e.errno, 0, 0)
        finally:
            for p in unstable:
                self._al_release(p)

    def _on_params(self, params: P.Params):
        """Params on an established connection: the peer attached a disk
        and asks to join as SyncTarget (_join_live).  Accepted when this
        node's disk is UpToDate, nothing else is going on, and the UUIDs
        say the peer's disk is behind ours or the same generation; the
        resync exchanges both bitmaps (their union is resynced).  Anything
        else -- a split brain, the peer's data newer -- is left to a full
        handshake: the peer reconnects."""
        reason = None
        if self.disk is None or self.dstate is not DiskState.UpToDate:
            reason = f"this node's disk is {self.dstate.value}"
        elif self.cstate is not ConnState.Connected or self._sync or self._verify:
            reason = f"this node is busy ({self.cstate.value})"
        elif self.pdsk not in _NO_DATA_DISK:
            reason = f"the peer's disk was {self.pdsk.value}"
        elif params.data_size != self.size:
            reason = (f"the disk's size ({params.data_size} bytes) differs from "
                      f"ours ({self.size} bytes)")
        else:
            me = side_of(self._my_params(), self.cfg.node)
            peer = side_of(params, self.cfg.peer)
            decision = compare(me, peer)
            self._log("info", f"uuid_compare: {decision.value} for the disk the peer attached "
                              f"(me {me.uuids.show()}, peer {peer.uuids.show()})")
            if decision is not Decision.NO_SYNC and not decision.i_am_source:
                reason = f"the UUIDs say {decision.value}"
        if reason is not None:
            self._log("warning", f"the peer attached a disk; not resyncing it on this "
                                 f"connection: {reason}")
            self._send(P.AttachReply(0, 0, reason.encode()))
            return
        full = decision.i_am_source and (
            decision.full or bool(params.flags & P.PF_FULL_IF_TARGET))
        self.peer_params = params
        self._peer_bitmap_done = False
        self._send(P.AttachReply(1, int(full)))
        # From here on writes go to the peer's disk too; what it misses is
        # in the bitmaps the resync exchanges.
        self._set(pdsk=DiskState.Inconsistent)
        self._log("info", "the peer attached its disk: %s resync" % (
            "full" if full else "bitmap"))
        self._start(self._begin_sync_as_source(full), group=self.session, name="join-sync")

    def _on_attach_reply(self, pkt: P.AttachReply):
        join = self._joining
        if join is None or join.result is not None:
            raise P.RemoteProtocolError("AttachReply without an attach waiting for it")
        if not pkt.result:
            join.reason = pkt.reason.decode(errors="replace")
            join.result = False
            return
        disk = join.disk
        try:
            # (in this handler: the peer's bitmap and data follow at once)
            yield from self._persist(disk, sb=disk.sb.with_flags(clear=md.F_CONSISTENT))
        except MetaIOError as e:
            self._emit(ReleaseDisk())
            self._set(dstate=DiskState.Diskless)
            join.error = e.errno
            join.result = False
            raise Drop("the attached disk failed while joining") from None
        self.disk = disk
        self.size = disk.sb.data_size
        self._joined_unmerged = True
        join.result = True
        self._set(dstate=DiskState.Inconsistent)
        self._tell_peer_state()
        # (no write of ours went to the peer alone since our Params: the
        # bitmaps say all; should the link go first, the next handshake
        # exchanges them)
        if not pkt.full:
            self._send_bitmap()

    def _on_role_request(self, pkt: P.RoleRequest):
        result = 0
        if pkt.role == _role_code(Role.Primary):
            if self.role is Role.Primary and not self.cfg.two_primaries:
                result = -1
            elif self._promoting and not self.cfg.two_primaries:
                # both asked at once: neither goes on (DRBD's -19)
                result = SS_CONCURRENT_ST_CHG.code
            elif self.opens["single"]:
                result = -12
            else:
                self._peer_promotion_allowed_at = self.now
        self._send(P.RoleReply(pkt.token, result))

    def _on_role_reply(self, pkt: P.RoleReply):
        if pkt.token in self._role_replies:
            self._role_replies[pkt.token] = pkt.result

    def _on_bitmap_chunk(self, pkt: P.BitmapChunk):
        disk = self._need_disk("BitmapChunk")
        limit = (len(disk.bitmap) + 7) // 8
        if pkt.offset > limit:
            raise P.RemoteProtocolError("bitmap chunk beyond the bitmap")
        try:
            dec = zlib.decompressobj()
            bits = dec.decompress(pkt.data, limit - pkt.offset + 1)
        except zlib.error:
            raise P.RemoteProtocolError("corrupt bitmap chunk") from None
        if len(bits) > limit - pkt.offset:
            raise P.RemoteProtocolError("bitmap chunk larger than the bitmap")
        self._merge_peer_bitmap(disk, bits, pkt.offset)
        if pkt.last:
            self._peer_bitmap_done = True

    def _merge_peer_bitmap(self, disk: Disk, bits: bytes, offset: int) -> None:
        """Both sides' out-of-sync blocks are resynced: the union."""
        disk.bitmap.merge(bits, offset)

    def _on_sync_start(self, pkt: P.SyncStart):
        self._need_disk("SyncStart")
        yield from self._begin_sync_as_target(pkt)

    def _on_resync_data(self, pkt: P.ResyncData):
        self.nr += len(pkt.data)
        self._check_peer_range(pkt.offset, len(pkt.data))
        start, end = pkt.offset, pkt.offset + len(pkt.data)
        yield from _until(lambda: self._recv_slots < RECV_PARALLEL
                          and not self._recv_ranges.overlaps(start, end))
        token = self._recv_ranges.add(start, end)
        self._recv_slots += 1
        self._start(self._apply_resync(self.session, pkt, token), name="resync-write")

    def _on_resync_ack(self, pkt: P.ResyncAck):
        self._check_peer_range(pkt.offset, pkt.length)
        if self._sync is None or self._sync.role != "source":
            raise P.RemoteProtocolError("ResyncAck while not SyncSource")
        first, count = blocks_of(pkt.offset, pkt.length)
        self.disk.bitmap.clear_range(first, count)
        self._sync.acked += pkt.length
        self._sync.window += 1
        self._sync.rate.acked(pkt.length)

    def _on_resync_csum(self, pkt: P.ResyncCsum):
        """csums-alg, on the SyncTarget: compare the source's digests with
        this disk's blocks."""
        self._check_peer_range(pkt.offset, pkt.length)
        if self._sync is None or self._sync.role != "target":
            raise P.RemoteProtocolError("ResyncCsum while not SyncTarget")
        alg = pkt.alg.rstrip(b"\0").decode(errors="replace")
        size = digest_size(alg)
        if size is None:
            raise P.RemoteProtocolError(f"ResyncCsum with unknown csums-alg {alg!r}")
        if pkt.offset % BLOCK or pkt.length % BLOCK \
                or len(pkt.digests) != size * (pkt.length // BLOCK):
            raise P.RemoteProtocolError("ResyncCsum digests do not match its range")
        start, end = pkt.offset, pkt.offset + pkt.length
        yield from _until(lambda: self._recv_slots < RECV_PARALLEL
                          and not self._recv_ranges.overlaps(start, end))
        token = self._recv_ranges.add(start, end)
        self._recv_slots += 1
        self._start(self._compare_csums(self.session, pkt, alg, size, token),
                    name="resync-csum")

    def _compare_csums(self, session: int, pkt: P.ResyncCsum, alg: str, size: int,
                       recv_token: int):
        """Blocks still marked whose digest equals the source's are in
        sync: cleared here, and the reply tells the source which ones still
        differ (it sends their data).  Under the application range lock,
        as a resync write: a Primary's newer write is never compared with
        (or overwritten by) an older copy."""
        ok = False
        nblocks = pkt.length // BLOCK
        mismatch = bytearray((nblocks + 7) // 8)
        try:
            disk = self.disk
            if disk is None:
                return
            app = yield from self._lock_range(pkt.offset, pkt.offset + pkt.length)
            try:
                data = yield self._issue(DiskRead, pkt.offset, pkt.length)
                if isinstance(data, int):
                    yield from self._local_io_error("read (resync checksums)", data,
                                                    pkt.offset, pkt.length)
                    return
                self.dr += len(data)
                first = pkt.offset // BLOCK
                equal = 0
                for i in range(nblocks):
                    if not disk.bitmap.test(first + i):
                        continue        # written here since: needs nothing
                    mine = hashlib.new(alg, data[i * BLOCK:(i + 1) * BLOCK]).digest()
                    if self._csum_equal(mine, pkt.digests[i * size:(i + 1) * size]):
                        disk.bitmap.clear_range(first + i, 1)
                        equal += 1
                    else:
                        mismatch[i >> 3] |= 1 << (i & 7)
                ok = True
            finally:
                self._ranges.remove(app)
        finally:
            self._recv_ranges.remove(recv_token)
            self._recv_slots -= 1
        if ok and self.session == session and self.live:
            if self._sync is not None:
                self._sync.csum_blocks += nblocks
                self._sync.equal_blocks += equal
            self._send(P.ResyncCsumReply(pkt.offset, pkt.length, bytes(mismatch)))

    @staticmethod
    def _csum_equal(mine: bytes, theirs: bytes) -> bool:
        return mine == theirs

    def _on_resync_csum_reply(self, pkt: P.ResyncCsumReply):
        """csums-alg, on the SyncSource: blocks the target did not ask for
        are in sync; the others stay marked for the next pass."""
        self._check_peer_range(pkt.offset, pkt.length)
        sync = self._sync
        if sync is None or sync.role != "source":
            raise P.RemoteProtocolError("ResyncCsumReply while not SyncSource")
        first, count = blocks_of(pkt.offset, pkt.length)
        for i in range(count):
            differs = (i >> 3) < len(pkt.mismatch) and pkt.mismatch[i >> 3] & (1 << (i & 7))
            if not differs:
                self.disk.bitmap.clear_range(first + i, 1)
                sync.equal_blocks += 1
        sync.acked += pkt.length
        sync.window += 1
        sync.rate.acked(pkt.length)

    def _on_sync_pause(self, pkt: P.SyncPause):
        self._set_isp(peer=bool(pkt.paused))

    def _on_sync_done(self, pkt: P.SyncDone):
        if self._sync is None or self._sync.role != "target":
            raise P.RemoteProtocolError("SyncDone while not SyncTarget")
        yield from _until(lambda: not len(self._recv_ranges))
        yield from self._finish_sync_as_target(pkt)
        self._send(P.SyncDoneAck())

    def _on_sync_done_ack(self, pkt: P.SyncDoneAck):
        if self._sync is None or self._sync.role != "source":
            raise P.RemoteProtocolError("SyncDoneAck while not SyncSource")
        yield from self._finish_sync_as_source()

    def _on_verify_request(self, pkt: P.VerifyRequest):
        self._check_peer_range(pkt.offset, pkt.length)
        nblocks = (pkt.length + BLOCK - 1) // BLOCK
        if len(pkt.digests) != 16 * nblocks:
            raise P.RemoteProtocolError("VerifyRequest digest count does not match")
        if self.cstate is ConnState.Connected:
            self._set(cstate=ConnState.VerifyT)
        data = yield self._issue(DiskRead, pkt.offset, pkt.length)
        if isinstance(data, int):
            raise Drop("local read failed during verify")
        self.dr += len(data)
        mine = block_digests(data, self._verify_alg)
        bits = [mine[i * 16:(i + 1) * 16] != pkt.digests[i * 16:(i + 1) * 16]
                for i in range(nblocks)]
        self._log_oos_runs(pkt.offset // BLOCK, bits)
        mismatch = bytearray((nblocks + 7) // 8)
        for i, differs in enumerate(bits):
            if differs:
                mismatch[i >> 3] |= 1 << (i & 7)
        self._send(P.VerifyReply(pkt.offset, pkt.length, bytes(mismatch)))

    def _on_verify_reply(self, pkt: P.VerifyReply):
        self._check_peer_range(pkt.offset, pkt.length)
        v = self._verify
        if v is None:
            return
        v.done += pkt.length
        nblocks = (pkt.length + BLOCK - 1) // BLOCK
        bits = [(i >> 3) < len(pkt.mismatch) and bool(pkt.mismatch[i >> 3] & (1 << (i & 7)))
                for i in range(nblocks)]
        v.oos += self._log_oos_runs(pkt.offset // BLOCK, bits)
        v.window += 1
        v.rate.acked(pkt.length)

    def _on_verify_done(self, pkt: P.VerifyDone):
        if self.disk is not None:
            yield from self._persist(self.disk)
        self._set(cstate=ConnState.Connected)
        if pkt.oos_blocks:
            self._log("warning", f"Online verify found {pkt.oos_blocks} 4k block out of sync!")

    def _on_goodbye(self, pkt: P.Goodbye):
        raise Drop("peer disconnected", ConnState.TearDown)

    _HANDLERS: dict = {
        P.Data: _on_data,
        P.WriteAck: _on_ack,
        P.NegAck: _on_ack,
        P.RecvAck: _on_recv_ack,
        P.Flush: _on_flush,
        P.FlushAck: _on_flush_ack,
        P.ReadRequest: _on_read_request,
        P.ReadReply: _on_read_reply,
        P.OutOfSync: _on_out_of_sync,
        P.Congestion: _on_congestion,
        P.Ping: _on_ping,
        P.PingAck: _on_ping_ack,
        P.StateUpdate: _on_state_update,
        P.RoleRequest: _on_role_request,
        P.RoleReply: _on_role_reply,
        P.BitmapChunk: _on_bitmap_chunk,
        P.SyncStart: _on_sync_start,
        P.ResyncData: _on_resync_data,
        P.ResyncAck: _on_resync_ack,
        P.SyncDone: _on_sync_done,
        P.SyncDoneAck: _on_sync_done_ack,
        P.ResyncCsum: _on_resync_csum,
        P.ResyncCsumReply: _on_resync_csum_reply,
        P.SyncPause: _on_sync_pause,
        P.VerifyRequest: _on_verify_request,
        P.VerifyReply: _on_verify_reply,
        P.VerifyDone: _on_verify_done,
        P.Goodbye: _on_goodbye,
        P.Params: _on_params,
        P.AttachReply: _on_attach_reply,
        P.CurrentUuid: _on_current_uuid,
        P.ResizeRequest: _on_resize_request,
        P.ResizeReply: _on_resize_answer,
        P.ResizeCommit: _on_resize_commit,
        P.ResizeDone: _on_resize_answer,
    }
