"""One replicated resource, driven by trio: role, disk, peer link, resync.

The decisions (which state changes are allowed, which way to sync, how a
packet is framed) come from the pure modules in core/, meta/ and proto/;
this module does the waiting, the sockets and the disk I/O around them.

Task tree (each owned by the resource's nursery, cancelled by its owner):

    Resource.run
      └─ connection loop          (while connect is wanted)
           ├─ accept / connect    (until one handshake succeeds)
           └─ session             (one per established connection)
                ├─ receiver       (every packet from the peer)
                ├─ pinger         (keepalive + ack timeout watchdog)
                └─ resync/verify  (as source)
"""
from __future__ import annotations

import errno
import hashlib
import hmac
import logging
import math
import secrets
import time
import zlib
from dataclasses import dataclass, field

import trio

from replfs.blockdev import BlockDeviceError
from replfs.errors import EXIT_CONFIG, EXIT_NO_LOCAL_DISK, EXIT_STATE, ReplfsError

from ..conf.model import Host, Resource as ResourceConf
from ..core.actlog import ActivityLogFull, extents_of
from ..core.bitmap import BLOCK, blocks_of
from ..core.intervals import IntervalSet
from ..core.progress import progress_line
from ..core.splitbrain import Policies, Resolution, resolve
from ..core.states import (SS_IS_DISKLESS, SS_NEED_CONNECTION, SS_RESYNC_RUNNING,
                           ConnState, DiskState, Role, StateChangeRefused, View,
                           check_outdate, check_promote, refuse)
from ..core.uuids import JUST_CREATED, Decision, Side, Uuids, compare
from ..meta import format as md
from ..proto import packets as P
from ..engine.engine import side_of
from .disk import LocalDisk
from .handlers import handler_env, run_handler

log = logging.getLogger("replfs.blockrepl")

RESYNC_CHUNK = 256 * 1024
RESYNC_WINDOW = 8 * 1024 * 1024
RECV_PARALLEL = 32


class _Fatal(Exception):
    """The connection must not be retried (split brain, unrelated data...)."""


class _Drop(Exception):
    """Drop this connection and go back to WFConnection."""

    def __init__(self, msg: str, state: ConnState = ConnState.NetworkFailure):
        super().__init__(msg)
        self.state = state


@dataclass
class _Pending:
    offset: int
    length: int
    epoch: int = 0
    t0: float = 0.0            # when it was sent (for the ack timeout)
    disk: "LocalDisk | None" = None   # whose activity log still covers it
    extents: tuple = (0, -1)
    acked: bool = False        # the peer's disk has it
    done: trio.Event = field(default_factory=trio.Event)
    received: trio.Event = field(default_factory=trio.Event)
    error: int = 0


class _Channel:
    """A connected stream with framing and a send lock."""

    def __init__(self, stream: trio.SocketStream):
        self.stream = stream
        self.decoder = P.Decoder()
        self.send_lock = trio.Lock()
        self.bytes_sent = 0
        self.last_heard = time.monotonic()
        self.quiesced = False   # holds unreplicated writes (see Resource._handshake)

    async def send(self, pkt: P.Packet) -> None:
        data = P.encode(pkt)
        async with self.send_lock:
            await self.stream.send_all(data)
        self.bytes_sent += len(data)

    async def recv(self) -> P.Packet:
        while True:
            pkt = self.decoder.next_packet()
            if pkt is not None:
                self.last_heard = time.monotonic()
                return pkt
            data = await self.stream.receive_some(256 * 1024)
            if not data:
                self.decoder.receive_data(b"")
                self.decoder.next_packet()  # raises if closed mid-packet
                raise _Drop("peer closed the connection", ConnState.BrokenPipe)
            self.decoder.receive_data(data)

    async def aclose(self) -> None:
        with trio.move_on_after(1) as scope:
            scope.shield = True
            await self.stream.aclose()


async def _unwrapped(coro):
    """Await ``coro``; if it fails with an exception group from a nursery,
    raise the first real (non-Cancelled) exception in it instead.

    The connection code reacts to *why* a connection ended (split brain,
    timeout, reset); that reason is one exception from one of the session's
    tasks, the others are just cancelled siblings.
    """
    try:
        return await coro
    except BaseExceptionGroup as eg:
        raise _first_real(eg) from None


def _first_real(eg: BaseExceptionGroup) -> BaseException:
    """The first exception in the (nested) group that is not Cancelled."""
    def real(g):
        for exc in g.exceptions:
            if isinstance(exc, BaseExceptionGroup):
                found = real(exc)
                if found is not None:
                    return found
            elif not isinstance(exc, trio.Cancelled):
                return exc
        return None
    found = real(eg)
    if found is not None:
        return found
    first = eg.exceptions[0]
    while isinstance(first, BaseExceptionGroup):
        first = first.exceptions[0]
    return first


def _block_digests(data: bytes) -> bytes:
    """16-byte digests of each 4 KiB block (online verify compares these)."""
    return b"".join(hashlib.blake2b(data[i:i + BLOCK], digest_size=16).digest()
                    for i in range(0, len(data), BLOCK))


def _peer_role(code: int) -> Role:
    if not 0 <= code < len(P.ROLE_CODES):
        raise P.RemoteProtocolError(f"bad role code {code}")
    return Role(P.ROLE_CODES[code])


def _peer_disk(code: int) -> DiskState:
    if not 0 <= code < len(P.DISK_CODES):
        raise P.RemoteProtocolError(f"bad disk state code {code}")
    return DiskState(P.DISK_CODES[code])


def _role_code(r: Role) -> int:
    return P.ROLE_CODES.index(r.value)


def _disk_code(d: DiskState) -> int:
    return P.DISK_CODES.index(d.value)


class Resource:
    """The live state of one resource on this node."""

    def __init__(self, conf: ResourceConf, node: str):
        self.conf = conf
        self.node = node
        me = conf.host(node)
        peer = conf.peer_of(node)
        if me is None or peer is None:
            raise ReplfsError(f"resource {conf.name} has no 'on {node}' section for this "
                              f"node (use --node or REPLFS_NODE to override)", EXIT_CONFIG)
        self.me: Host = me
        self.peer: Host = peer
        self.role = Role.Secondary
        self.peer_role = Role.Unknown
        self.cstate = ConnState.StandAlone
        self.dstate = DiskState.Diskless
        self.pdsk = DiskState.DUnknown
        self.disk: LocalDisk | None = None
        self.want_connect = False
        self.discard_my_data = False
        self._nursery: trio.Nursery | None = None
        self._conn_scope: trio.CancelScope | None = None
        self._chan: _Channel | None = None
        self._seq = 0
        self._pending: dict[int, _Pending] = {}
        self._flushes: dict[int, trio.Event] = {}
        self._role_replies: dict[int, trio.MemorySendChannel] = {}
        self._ranges = IntervalSet()
        self._ranges_changed = trio.Event()
        # Application writes in flight here, exact byte ranges: a peer's
        # write that overlaps one while both nodes are Primary is a
        # concurrent write the cluster filesystem's locks should have
        # prevented (DRBD logs "Concurrent local write detected!").
        self._app_writes: dict[int, tuple[int, int]] = {}
        self.concurrent_writes = 0
        self._recv_ranges = IntervalSet()
        self._recv_changed = trio.Event()
        self._state_changed = trio.Event()
        self._sync: dict | None = None
        self._verify: dict | None = None
        self._uuid_lock = trio.Lock()
        self.open_count = 0
        # Opens by a replfs filesystem mounted for one node alone (no
        # cluster locks yet): while there are any, the peer may not become
        # Primary, and such an open is refused while the peer is Primary
        # or was just allowed to become it.
        self.single_node_opens = 0
        # Filesystems mounted on both nodes (cluster locks) that use this
        # resource, and the in-process fence-peer decision replfsd gives
        # them (the cluster stack's): with a shared mount and no fencing
        # configured, the resource fences as resource-and-stonith with it.
        self.shared_opens = 0
        self.fence_peer_hook = None
        # Set by replfsd's mounts: stop this node's filesystem mounts of the
        # resource at once (called with the reason) when after-sb
        # call-pri-lost-after-sb discards this Primary's data in use.
        self.pri_lost_hook = None
        # Role when the last connection ended: whether this node was
        # Primary at the split, which a new generation records in the
        # bitmap UUID (discard-younger/older-primary read it).
        self._role_at_split: Role | None = None
        self._peer_promotion_allowed_at = float("-inf")
        self.last_event = ""
        self.split_brain = False
        self.devfile_proc = None
        self._session_nursery: trio.Nursery | None = None
        self._reads: dict[int, tuple[trio.Event, list]] = {}
        self._quiesce = 0                   # handshakes agreeing generation/bitmap
        self._handshake_over = trio.Event()
        self._unrepl_inflight = 0           # unreplicated writes in progress
        self._unrepl_changed = trio.Event()
        self._sent_params: P.Params | None = None
        self.conf_path: str | None = None   # for handlers' DRBD_CONF
        self.io_suspended = False           # fencing: writes wait for resume
        self._io_resumed = trio.Event()
        # The fence-peer handler said this node lost (exit 6): its disk is
        # Outdated, nothing more is written or acknowledged, and no new
        # data generation is started, so that when the link comes back it
        # is a plain SyncTarget of the winner (no split brain).
        self.fence_lost = False
        self._size = 0               # agreed device size (kept while Diskless)
        self._epoch = 0              # epoch of the writes being sent
        self._epoch_closed = False   # a write completed since the last send
        self._recv_epoch = 0         # newest epoch the receiver has started
        self._peer_bitmap_done = trio.Event()
        self._peer_params: P.Params | None = None
        # /proc/drbd counters (KiB or counts).
        self.ns = self.nr = self.dw = self.dr = 0
        self.lo = self.ap = self.ua = 0

    # ------------------------------------------------------------ plumbing
    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            try:
                await trio.sleep_forever()
            finally:
                with trio.CancelScope(shield=True):
                    await self._shutdown()

    # State attribute -> the word DRBD logs its changes under.
    _STATE_WORDS = (("cstate", "conn"), ("dstate", "disk"), ("role", "role"),
                    ("pdsk", "pdsk"), ("peer_role", "peer"))

    def _set(self, **changes) -> None:
        """Change state (cstate, dstate, role, pdsk, peer_role), log each
        change the way DRBD does, and wake everyone waiting for a change."""
        for attr, word in self._STATE_WORDS:
            new = changes.pop(attr, None)
            old = getattr(self, attr)
            if new is not None and new is not old:
                log.info("%s: %s( %s -> %s )", self.conf.name, word, old.value, new.value)
                setattr(self, attr, new)
        assert not changes, f"unknown state fields {sorted(changes)}"
        if self.fence_lost and self.dstate is DiskState.UpToDate:
            # resynced from the winner: the lost decision is behind us
            self.fence_lost = False
            if self.io_suspended:
                log.warning("%s: susp( 1 -> 0 ) resynced after a lost fence-peer decision",
                            self.conf.name)
            self.io_suspended = False
            self._io_resumed.set()
        self._state_changed.set()
        self._state_changed = trio.Event()

    async def wait_state_change(self) -> None:
        await self._state_changed.wait()

    def _view(self) -> View:
        return View(self.role, self.peer_role, self.dstate, self.pdsk, self.cstate,
                    self.conf.allow_two_primaries)

    async def _tell_peer_state(self) -> None:
        chan = self._chan
        if chan is not None and self.cstate.is_connected:
            try:
                await chan.send(P.StateUpdate(_role_code(self.role), _disk_code(self.dstate)))
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass

    # ------------------------------------------------------------ disk
    async def attach(self) -> None:
        if self.disk is not None:
            return
        self._set(dstate=DiskState.Attaching)
        try:
            disk = LocalDisk(self.me, self.conf.al_extents)
            await disk.load()
        except BaseException:
            self._set(dstate=DiskState.Diskless)
            raise
        self.disk = disk
        self._size = disk.layout.data_size
        sb = disk.sb
        if not sb.has(md.F_CONSISTENT):
            ds = DiskState.Inconsistent
        elif sb.has(md.F_OUTDATED):
            ds = DiskState.Outdated
        elif sb.has(md.F_WAS_UP_TO_DATE):
            ds = DiskState.UpToDate
        else:
            ds = DiskState.Consistent
        if self.role is Role.Primary:
            await disk.write_superblock(disk.sb.with_flags(set_=md.F_PRIMARY))
        self._set(dstate=ds)
        await self._tell_peer_state()
        if self.cstate.is_connected and self._chan is not None:
            # A disk attached under a live connection: agree on it afresh
            # (the handshake decides whether and which way to resync).
            await self._reconnect_for_sync()

    async def detach(self) -> None:
        if self.disk is None:
            return
        if self.role is Role.Primary and not self._peer_serves():
            raise ReplfsError(f"{self.conf.name}: State change failed: (-2) Refusing to "
                              f"detach the disk of a Primary without an UpToDate peer",
                              EXIT_STATE)
        if self.cstate.is_syncing:
            raise refuse(SS_RESYNC_RUNNING)
        await self._drain_local_io()
        disk, self.disk = self.disk, None
        await disk.write_bitmap()
        await disk.close()
        self._set(dstate=DiskState.Diskless)
        await self._tell_peer_state()

    async def _drain_local_io(self) -> None:
        while len(self._ranges) or self.lo:
            await self._ranges_changed.wait()

    # ------------------------------------------------------------ roles
    async def primary(self, *, force: bool = False) -> None:
        if self.role is Role.Primary:
            return
        if self.cstate.is_connected and self._chan is not None:
            # Ask the peer first: its reply travels behind any role change
            # it made a moment ago, so the check below sees its real role.
            result = await self._ask_peer_role(Role.Primary)
            if result:
                raise StateChangeRefused(result, dict(
                    [(-1, "Multiple primaries not allowed by config"),
                     (-12, "Device is held open by the peer: a replfs filesystem is "
                           "mounted there, and replfs mounts a volume on one node at a "
                           "time (unmount it there first)")]).get(result, "Refused by peer"))
        check_promote(self._view(), force=force)
        if self.disk is None and not self._peer_serves():
            raise refuse(SS_IS_DISKLESS, EXIT_NO_LOCAL_DISK)
        if force and self.dstate is not DiskState.UpToDate:
            await self._force_uptodate()
        disk = self.disk
        if disk is not None:
            await disk.write_superblock(disk.sb.with_flags(set_=md.F_PRIMARY))
        self._set(role=Role.Primary)
        await self._tell_peer_state()
        if force and self.cstate is ConnState.Connected and self.pdsk in (
                DiskState.Inconsistent, DiskState.Outdated, DiskState.Consistent):
            # Connected fresh pair: the forced node's data wins, full sync now.
            self._start_full_sync_as_source()

    def open_single_node(self) -> None:
        """Register an open by a filesystem that relies on being the only
        node with the volume mounted (the guard until replfs has cluster
        locks).  Checked and counted in one step of the daemon's loop, so
        a peer's promotion request is answered either before (and this
        open is refused) or after (and the promotion is)."""
        recently = (trio.current_time() - self._peer_promotion_allowed_at
                    < self.conf.timeout_s + 2)
        if self.peer_role is Role.Primary or recently:
            raise ReplfsError(
                f"{self.conf.name}: the peer is Primary too; replfs mounts a volume on one "
                f"node at a time (mounting on both nodes needs the cluster locks, not built "
                f"yet): unmount it there and make it Secondary ('replfsadm secondary "
                f"{self.conf.name}' on the peer)", EXIT_STATE)
        self.single_node_opens += 1

    def close_single_node(self) -> None:
        self.single_node_opens = max(0, self.single_node_opens - 1)

    async def _ask_peer_role(self, role: Role) -> int:
        """Ask the connected peer whether we may take ``role``; 0 means yes."""
        token = secrets.randbits(62)
        send, recv = trio.open_memory_channel(1)
        self._role_replies[token] = send
        try:
            await self._chan.send(P.RoleRequest(token, _role_code(role)))
            with trio.move_on_after(self.conf.timeout_s + 1):
                return await recv.receive()
            return 0   # no answer: the connection is going away anyway
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError, AttributeError):
            return 0
        finally:
            self._role_replies.pop(token, None)

    async def _force_uptodate(self) -> None:
        """`primary --force`: declare the local data good (a new generation)."""
        disk = self.disk
        uuids = disk.sb.uuids
        if uuids.current == JUST_CREATED:
            uuids = Uuids(secrets.randbits(63) << 1, 0, uuids.history)
        else:
            # (as in _new_generation: was this node Primary at the split?)
            if self._chan is not None:
                was_primary = self.role is Role.Primary
            elif self._role_at_split is not None:
                was_primary = self._role_at_split is Role.Primary
            else:
                was_primary = disk.crashed_primary
            uuids = uuids.with_new_current(secrets.randbits(63) << 1, was_primary=was_primary)
        sb = disk.sb.with_flags(set_=md.F_CONSISTENT | md.F_WAS_UP_TO_DATE,
                                clear=md.F_OUTDATED)
        await disk.write_superblock(md.Superblock(sb.data_size, uuids, sb.flags,
                                                  sb.device_uuid, sb.al_extents, sb.layout))
        if self.pdsk is not DiskState.UpToDate:
            disk.bitmap.set_all()
            await disk.write_bitmap()
        self._set(dstate=DiskState.UpToDate)

    async def secondary(self) -> None:
        if self.role is Role.Secondary:
            return
        if self.open_count:
            raise ReplfsError(f"{self.conf.name}: State change failed: (-12) Device is held "
                              f"open by someone", EXIT_STATE)
        await self._drain_local_io()
        if self.disk is not None:
            await self.disk.write_bitmap()
            await self.disk.write_superblock(self.disk.sb.with_flags(clear=md.F_PRIMARY))
        self._set(role=Role.Secondary)
        await self._tell_peer_state()

    async def outdate(self) -> None:
        check_outdate(self._view())
        if self.cstate.is_connected:
            raise ReplfsError(f"{self.conf.name}: State change failed: (-10) Refusing to "
                              f"outdate a connected disk", EXIT_STATE)
        if self.dstate is DiskState.Outdated:
            return
        await self.disk.write_superblock(self.disk.sb.with_flags(set_=md.F_OUTDATED))
        self._set(dstate=DiskState.Outdated)

    async def new_current_uuid(self) -> None:
        if self.disk is None:
            raise refuse(SS_IS_DISKLESS, EXIT_NO_LOCAL_DISK)
        await self._new_generation(force=True)

    async def _new_generation(self, *, force: bool = False) -> None:
        """Start a new data generation: writes from here on are not on the peer."""
        async with self._uuid_lock:
            disk = self.disk
            uuids = disk.sb.uuids
            if uuids.bitmap and not force:
                return
            # Was this node Primary when it lost its peer?  DRBD starts the
            # generation right then and flags the old one (now the bitmap
            # UUID) with the role; replfs starts it lazily, at the first
            # write the peer misses, so it asks: connected now -- its role
            # now; else its role when the last connection ended; not
            # connected since replfsd started -- whether it went down as
            # Primary.
            if self._chan is not None:
                was_primary = self.role is Role.Primary
            elif self._role_at_split is not None:
                was_primary = self._role_at_split is Role.Primary
            else:
                was_primary = disk.crashed_primary
            sb = disk.sb
            await disk.write_superblock(md.Superblock(
                sb.data_size, uuids.with_new_current(secrets.randbits(63) << 1,
                                                     was_primary=was_primary),
                sb.flags, sb.device_uuid, sb.al_extents, sb.layout))
            log.info("%s: new current UUID %016X (bitmap UUID %016X)", self.conf.name,
                     disk.sb.uuids.current, disk.sb.uuids.bitmap)

    async def invalidate(self) -> None:
        """Discard local data; full sync from the peer (now, or on connect)."""
        if self.disk is None:
            raise refuse(SS_IS_DISKLESS, EXIT_NO_LOCAL_DISK)
        if self.role is Role.Primary:
            raise ReplfsError(f"{self.conf.name}: State change failed: (-2) Refusing to "
                              f"invalidate the data of a Primary", EXIT_STATE)
        if self.cstate.is_syncing:
            raise refuse(SS_RESYNC_RUNNING)
        disk = self.disk
        disk.bitmap.set_all()
        await disk.write_bitmap()
        await disk.write_superblock(disk.sb.with_flags(clear=md.F_CONSISTENT | md.F_WAS_UP_TO_DATE))
        self._set(dstate=DiskState.Inconsistent)
        await self._tell_peer_state()
        if self.cstate is ConnState.Connected:
            await self._reconnect_for_sync()

    async def invalidate_remote(self) -> None:
        if self.disk is None:
            raise refuse(SS_IS_DISKLESS, EXIT_NO_LOCAL_DISK)
        if not self.cstate is ConnState.Connected:
            raise refuse(SS_NEED_CONNECTION)
        if self.dstate is not DiskState.UpToDate:
            raise refuse((-2, "Refusing to be SyncSource without an UpToDate disk"))
        self._start_full_sync_as_source()

    async def _reconnect_for_sync(self) -> None:
        chan = self._chan
        if chan is not None:
            await chan.aclose()

    # ------------------------------------------------------------ application I/O
    def _require_io(self, write: bool) -> LocalDisk | None:
        """The local disk to use, or None when the peer serves the I/O."""
        if self.role is not Role.Primary:
            raise BlockDeviceError(errno.EMEDIUMTYPE,
                                   f"{self.conf.name} is Secondary: no application I/O")
        if self.disk is not None and self.dstate in (DiskState.UpToDate, DiskState.Consistent):
            return self.disk
        if self.disk is not None and self.dstate is DiskState.Inconsistent \
                and self._peer_serves():
            return self.disk     # SyncTarget while Primary: stale blocks come from the peer
        if self.disk is None and self._peer_serves():
            return None          # Diskless Primary
        raise BlockDeviceError(errno.EIO, f"{self.conf.name}: no UpToDate disk reachable")

    def _peer_serves(self) -> bool:
        return (self._chan is not None and self.cstate.is_connected
                and self.pdsk is DiskState.UpToDate)

    @property
    def size(self) -> int:
        return self.disk.layout.data_size if self.disk else self._size

    def _check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0:
            raise BlockDeviceError(errno.EINVAL, "negative offset or length")
        if offset + length > self.size:
            raise BlockDeviceError(errno.ENOSPC, f"I/O beyond end of device "
                                   f"({offset}+{length} > {self.size})")

    async def _lock_range(self, start: int, end: int) -> int:
        while self._ranges.overlaps(start, end):
            await self._ranges_changed.wait()
        return self._ranges.add(start, end)

    def _unlock_range(self, token: int) -> None:
        self._ranges.remove(token)
        self._ranges_changed.set()
        self._ranges_changed = trio.Event()

    def _replicating(self) -> bool:
        return (self._chan is not None and self.cstate.is_connected
                and self.pdsk in (DiskState.UpToDate, DiskState.Inconsistent,
                                  DiskState.Consistent, DiskState.Outdated))

    async def read(self, offset: int, length: int) -> bytes:
        disk = self._require_io(write=False)
        length = max(0, min(length, self.size - offset))
        if disk is not None and self.dstate is DiskState.Inconsistent:
            first, count = blocks_of(offset, length)
            if any(disk.bitmap.test(b) for b in range(first, first + count)):
                return await self._remote_read(offset, length)
        if disk is None:
            return await self._remote_read(offset, length)
        self.lo += 1
        try:
            data = await disk.data.read(offset, length)
        except OSError as e:
            await self._local_io_error("read", e, offset, length)
            if self._peer_serves():
                return await self._remote_read(offset, length)
            raise BlockDeviceError(errno.EIO, f"{self.conf.name}: local read failed and "
                                   f"no peer has the data") from None
        finally:
            self.lo -= 1
        self.dr += len(data)
        return data

    async def _remote_read(self, offset: int, length: int) -> bytes:
        chan = self._chan
        if chan is None or not self._peer_serves():
            raise BlockDeviceError(errno.EIO, f"{self.conf.name}: no UpToDate disk reachable")
        self._seq += 1
        seq = self._seq
        ev, box = trio.Event(), []
        self._reads[seq] = (ev, box)
        try:
            await chan.send(P.ReadRequest(seq, offset, length))
            await ev.wait()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        finally:
            self._reads.pop(seq, None)
        if not box or isinstance(box[0], int):
            code = box[0] if box else errno.EIO
            raise BlockDeviceError(code or errno.EIO, f"{self.conf.name}: read through the "
                                   f"peer failed")
        self.nr += len(box[0])
        return box[0]

    async def write(self, offset: int, data: bytes) -> None:
        disk = self._require_io(write=True)
        self._check_range(offset, len(data))
        if not data:
            return
        while self.io_suspended and not self.fence_lost:
            await self._io_resumed.wait()
        if self.fence_lost:
            raise BlockDeviceError(errno.EIO, f"{self.conf.name}: this node lost the "
                                   f"fence-peer decision; its disk is Outdated")
        while self.cstate in (ConnState.WFReportParams, ConnState.WFBitMapS,
                              ConnState.StartingSyncS):
            # Replication parameters are being agreed: hold new writes so
            # the generation and bitmap the peer was told stay true.
            await self._state_changed.wait()
        self.ap += 1
        # Ranges are locked in whole 4 KiB blocks: the unit of the bitmap,
        # of resync, and of a read-modify-write below.
        lock_start = offset - offset % BLOCK
        lock_end = -(-(offset + len(data)) // BLOCK) * BLOCK
        token = await self._lock_range(lock_start, lock_end)
        self._app_writes[token] = (offset, offset + len(data))
        try:
            disk = self._require_io(write=True)   # may have changed while we waited
            if disk is None:
                await self._replicated_write(None, offset, data)
                return
            target = self.dstate is DiskState.Inconsistent
            if target:
                offset, data = await self._fill_stale_blocks(disk, offset, data)
            e_first, e_last = extents_of(offset, len(data))
            await self._al_begin(e_first, e_last)
            try:
                await self._replicated_write(disk, offset, data)
            finally:
                disk.al.end(e_first, e_last)
            if target and self.disk is disk:
                # These blocks are now current here and on the peer: a resync
                # chunk for them still in flight must not overwrite them.
                first = -(-offset // BLOCK)
                last = (offset + len(data)) // BLOCK
                if last > first:
                    disk.bitmap.clear_range(first, last - first)
        finally:
            self._app_writes.pop(token, None)
            self._unlock_range(token)
            self.ap -= 1

    async def _fill_stale_blocks(self, disk: LocalDisk, offset: int,
                                 data: bytes) -> tuple[int, bytes]:
        """A Primary that is SyncTarget writes part of a block this disk does
        not have yet: complete the block from the peer's copy first, so the
        whole block is written here (and can be marked in sync)."""
        first, count = blocks_of(offset, len(data))
        head_stale = offset % BLOCK and disk.bitmap.test(first)
        end = offset + len(data)
        tail_stale = end % BLOCK and disk.bitmap.test(first + count - 1)
        if not (head_stale or tail_stale):
            return offset, data
        start = first * BLOCK
        current = bytearray(await self._remote_read(start, count * BLOCK))
        current[offset - start:end - start] = data
        return start, bytes(current)

    async def _al_begin(self, first: int, last: int) -> None:
        disk = self.disk
        while True:
            try:
                changed = disk.al.begin(first, last)
                break
            except ActivityLogFull:
                await self._ranges_changed.wait()
        if changed:
            await disk.write_al()

    async def _replicated_write(self, disk: LocalDisk | None, offset: int, data: bytes) -> None:
        pending = None
        local_error: list[OSError] = []
        while not self._replicating() and self._handshaking:
            await self._handshake_over.wait()
        if disk is None and not self._replicating():
            raise BlockDeviceError(errno.EIO, f"{self.conf.name}: no UpToDate disk reachable")
        unreplicated = False
        if self._replicating():
            self._seq += 1
            seq = self._seq
            if self._epoch_closed:
                # Some write completed since the last one was sent: this one
                # may depend on it, so it starts a new epoch.
                self._epoch += 1
                self._epoch_closed = False
            epoch = self._epoch
            pending = _Pending(offset, len(data), epoch, time.monotonic())
            if disk is not None:
                # The activity log covers this write until the peer has it
                # (WriteAck) or the bitmap records that it does not; with
                # protocols A and B that is after the caller's completion.
                pending.disk = disk
                pending.extents = extents_of(offset, len(data))
                disk.al.begin(*pending.extents)   # hot already: no transaction
            self._pending[seq] = pending
        else:
            unreplicated = True
            self._unrepl_inflight += 1

        async def local() -> None:
            if disk is None:
                return
            self.lo += 1
            try:
                await disk.data.write(offset, data)
                self.dw += len(data)
            except OSError as e:
                local_error.append(e)
            finally:
                self.lo -= 1

        async def remote() -> None:
            try:
                await self._chan.send(P.Data(seq, epoch, offset, data))
                self.ns += len(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError, AttributeError):
                # The connection teardown marks this write out of sync.
                await pending.done.wait()
                return
            proto = self.conf.protocol
            if proto == "A" and disk is not None:
                return
            if proto == "B" and disk is not None:
                await pending.received.wait()
                return
            # Protocol C, or no local disk: the peer's disk is the only copy.
            await pending.done.wait()

        if pending is None:
            try:
                await self._mark_unreplicated(offset, len(data))
                await local()
            finally:
                if unreplicated:
                    self._unrepl_inflight -= 1
                    self._unrepl_changed.set()
                    self._unrepl_changed = trio.Event()
        else:
            async def both() -> None:
                async with trio.open_nursery() as n:
                    n.start_soon(local)
                    n.start_soon(remote)
            await _unwrapped(both())
            self._epoch_closed = True
            # Completed by a connection loss rather than by the peer: with
            # fencing that failed, nothing more is acknowledged until the
            # admin resumes I/O.
            while not pending.acked and self.io_suspended and not self.fence_lost:
                await self._io_resumed.wait()
            if not pending.acked and self.fence_lost:
                raise BlockDeviceError(errno.EIO, f"{self.conf.name}: not acknowledged: "
                                       f"this node lost the fence-peer decision")
        if local_error:
            await self._local_io_error("write", local_error[0], offset, len(data))
            # The write still counts if the peer's disk has it.
            if pending is None:
                raise BlockDeviceError(errno.EIO, f"{self.conf.name}: local write failed "
                                       f"and there is no peer to hold it")
            await pending.done.wait()
        if (local_error or disk is None) and not pending.acked:
            raise BlockDeviceError(errno.EIO, f"{self.conf.name}: the write reached no disk")

    async def _local_io_error(self, what: str, exc: OSError, offset: int, length: int) -> None:
        """A local read or write failed: apply the on-io-error policy."""
        policy = self.conf.on_io_error
        log.error("%s: Local IO failed in %s at %d+%d: %s. %s", self.conf.name, what, offset,
                  length, exc, "Passing the error on." if policy == "pass_on" else "Detaching...")
        if policy == "call-local-io-error":
            await self.handler("local-io-error")
        if policy == "pass_on" or self.disk is None:
            return
        # The peer must resync this range (and everything the disk misses
        # from now on) into this disk should it come back.
        chan = self._chan
        if chan is not None and self.cstate.is_connected:
            try:
                await chan.send(P.OutOfSync(offset, length))
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass
        disk, self.disk = self.disk, None
        self._set(dstate=DiskState.Failed)
        try:
            with trio.move_on_after(2):
                await disk.write_superblock(disk.sb.with_flags(clear=md.F_CONSISTENT))
        except OSError:
            log.error("%s: could not mark the failed disk inconsistent", self.conf.name)
        try:
            await disk.close()
        except OSError:
            pass
        self._set(dstate=DiskState.Diskless)
        await self._tell_peer_state()

    async def _peer_lacks(self, offset: int, length: int) -> None:
        """The peer's disk does not have this range (it failed or is gone)."""
        disk = self.disk
        if disk is None:
            return
        if not disk.sb.uuids.bitmap:
            await self._new_generation()
        first, count = blocks_of(offset, length)
        if disk.bitmap.set_range(first, count):
            # This node may be the only one that knows: persist before the
            # write that made it so is acknowledged.
            await disk.write_bitmap()

    async def _mark_unreplicated(self, offset: int, length: int) -> None:
        """This write will not reach the peer: remember it in the bitmap."""
        disk = self.disk
        if not disk.sb.uuids.bitmap and self.role is Role.Primary:
            await self._new_generation()
        first, count = blocks_of(offset, length)
        disk.bitmap.set_range(first, count)

    async def flush(self) -> None:
        disk = self._require_io(write=True)
        waiter = None
        if self._replicating() and (self.conf.protocol != "A" or disk is None):
            self._seq += 1
            seq = self._seq
            waiter = trio.Event()
            self._flushes[seq] = waiter
            try:
                await self._chan.send(P.Flush(seq))
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError, AttributeError):
                waiter = None
        if disk is not None:
            try:
                await disk.data.flush()
                await disk.write_bitmap()
            except OSError as e:
                await self._local_io_error("flush", e, 0, 0)
                if waiter is None:
                    raise BlockDeviceError(errno.EIO, f"{self.conf.name}: flush failed and "
                                           f"no peer holds the data") from None
        elif waiter is None:
            raise BlockDeviceError(errno.EIO, f"{self.conf.name}: no UpToDate disk reachable")
        if waiter is not None:
            await waiter.wait()

    async def discard(self, offset: int, length: int) -> None:
        # Zeroes travel like a write; simple and keeps both copies equal.
        self._check_range(offset, length)
        step = 1024 * 1024
        pos = offset
        while pos < offset + length:
            n = min(step, offset + length - pos)
            await self.write(pos, bytes(n))
            pos += n

    # ------------------------------------------------------------ connection
    def connect(self, *, discard_my_data: bool = False) -> None:
        if self.want_connect and self._conn_scope is not None:
            if discard_my_data:
                self.discard_my_data = True
            return
        if discard_my_data and self.role is Role.Primary and not self.conf.allow_two_primaries:
            raise ReplfsError(f"{self.conf.name}: --discard-my-data is refused on a Primary; "
                              f"run 'replfsadm secondary {self.conf.name}' first", EXIT_STATE)
        self.want_connect = True
        self.discard_my_data = discard_my_data
        self.split_brain = False
        self._nursery.start_soon(self._connection_loop)

    async def disconnect(self) -> None:
        self.want_connect = False
        scope = self._conn_scope
        if scope is None:
            self._set(cstate=ConnState.StandAlone)
            return
        self._set(cstate=ConnState.Disconnecting)
        chan = self._chan
        if chan is not None:
            with trio.move_on_after(1):
                try:
                    await chan.send(P.Goodbye())
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    pass
        scope.cancel()
        while self._conn_scope is scope:
            await self._state_changed.wait()
        self._set(cstate=ConnState.StandAlone, pdsk=DiskState.DUnknown, peer_role=Role.Unknown)

    async def _connection_loop(self) -> None:
        with trio.CancelScope() as scope:
            self._conn_scope = scope
            try:
                await self._connection_loop_inner()
            finally:
                self._conn_scope = None
                self._set()
        if not self.want_connect and self.cstate is not ConnState.StandAlone:
            self._set(cstate=ConnState.StandAlone)

    async def _connection_loop_inner(self) -> None:
        name = self.conf.name
        self._set(cstate=ConnState.Unconnected)
        try:
            listeners = await trio.open_tcp_listeners(self.me.port, host=self.me.address)
        except OSError as e:
            log.error("%s: cannot listen on %s:%d: %s", name, self.me.address, self.me.port, e)
            self.last_event = f"cannot listen on {self.me.address}:{self.me.port}: {e.strerror}"
            self.want_connect = False
            self._set(cstate=ConnState.StandAlone)
            return
        try:
            while self.want_connect:
                self._set(cstate=ConnState.WFConnection)
                try:
                    chan = await _unwrapped(self._establish(listeners))
                except _Fatal as e:
                    log.error("%s: %s", name, e)
                    self.last_event = str(e)
                    self.want_connect = False
                    self._set(cstate=ConnState.StandAlone)
                    return
                try:
                    await _unwrapped(self._session(chan))
                    next_state = ConnState.TearDown
                except _Fatal as e:
                    log.error("%s: %s", name, e)
                    self.last_event = str(e)
                    self.want_connect = False
                    next_state = ConnState.StandAlone
                except _Drop as e:
                    log.warning("%s: %s", name, e)
                    next_state = e.state
                except P.RemoteProtocolError as e:
                    log.error("%s: protocol error from peer: %s", name, e)
                    next_state = ConnState.ProtocolError
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
                    log.warning("%s: connection lost: %s", name, e)
                    next_state = ConnState.NetworkFailure
                except Exception:
                    # Whatever the peer sent, or whatever went wrong handling
                    # it, costs this connection, never the resource.
                    log.exception("%s: error handling the peer's data; dropping the "
                                  "connection", name)
                    next_state = ConnState.ProtocolError
                finally:
                    self._chan = None
                    self._end_handshake(chan)
                    with trio.CancelScope(shield=True):
                        await chan.aclose()
                        await self._connection_lost()
                # A fenced peer is known to be Outdated (ds:UpToDate/Outdated).
                self._set(cstate=next_state, peer_role=Role.Unknown,
                          pdsk=DiskState.Outdated if self.pdsk is DiskState.Outdated
                          else DiskState.DUnknown)
                if next_state is ConnState.StandAlone:
                    return
                self._set(cstate=ConnState.Unconnected)
                await trio.sleep(min(self.conf.connect_int_s, 1.0))
        finally:
            with trio.CancelScope(shield=True):
                for lst in listeners:
                    await lst.aclose()
                if self._chan is not None:
                    await self._chan.aclose()
                    self._chan = None
                await self._connection_lost()

    async def handler(self, name: str) -> int | None:
        """Run the configured handler ``name``; None if none is configured.
        Without a fence-peer command, a resource mounted on both nodes asks
        the cluster stack in process (``fence_peer_hook``)."""
        command = self.conf.handlers.get(name)
        if not command and name == "fence-peer" and self.shared_opens \
                and self.fence_peer_hook is not None:
            log.warning("%s: fence-peer: asking the cluster stack (no handler configured; "
                        "the resource is mounted on both nodes)", self.conf.name)
            return await self.fence_peer_hook()
        if not command:
            return None
        env = handler_env(self.conf, self.me, self.peer, self.node, self.conf_path)
        return await run_handler(name, command, env, resource=self.conf.name)

    @property
    def fencing_configured(self) -> str | None:
        return self.conf.disk.get("fencing") or self.conf.net.get("fencing")

    @property
    def fencing(self) -> str:
        """The policy in effect: the configured one; with none configured,
        resource-and-stonith while a filesystem is mounted on both nodes
        (two writers must never both go on after losing each other)."""
        configured = self.fencing_configured
        if configured:
            return configured
        return "resource-and-stonith" if self.shared_opens else "dont-care"

    async def _fence_peer(self) -> None:
        """A Primary lost an UpToDate peer: make sure the peer cannot be
        promoted with old data before anything more is acknowledged.

        With `fencing resource-and-stonith` application writes are held
        (I/O suspended) while the fence-peer handler runs; exit codes 3
        (peer already outdated), 4 (outdated), 5 (peer down), 7 (peer
        fenced) let I/O resume.  Anything else leaves I/O suspended until
        `replfsadm resume-io`.  `resource-only` runs the handler without
        holding I/O.
        """
        if self.fencing == "dont-care" or self.role is not Role.Primary:
            return
        stonith = self.fencing == "resource-and-stonith"
        if stonith:
            self.io_suspended = True
            self._io_resumed = trio.Event()
            log.warning("%s: susp( 0 -> 1 ) fencing the peer", self.conf.name)
        code = await self.handler("fence-peer")
        if code == 6 and stonith:
            # The peer goes on (the cluster stack chose it): this node
            # outdates itself and fails what it held.
            log.warning("%s: fence-peer helper returned 6 (peer is primary, outdating "
                        "myself)", self.conf.name)
            self.fence_lost = True
            self.last_event = "fence-peer: this node lost; disk Outdated"
            if self.disk is not None:
                try:
                    await self.disk.write_superblock(
                        self.disk.sb.with_flags(set_=md.F_OUTDATED))
                except OSError as e:
                    log.error("%s: cannot record Outdated: %s", self.conf.name, e)
                self._set(dstate=DiskState.Outdated)
            self._io_resumed.set()          # held writes wake up and fail
            if self._nursery is not None:
                self._nursery.start_soon(self._demote_when_unused)
            return
        if code in (3, 4, 5, 7):
            what = {3: "peer is inconsistent or outdated already", 4: "peer was fenced",
                    5: "peer is unreachable, assumed to be dead",
                    7: "peer was stonithed"}[code]
            log.warning("%s: fence-peer helper returned %d (%s)", self.conf.name, code, what)
            self._set(pdsk=DiskState.Outdated)
            self.resume_io()
        else:
            log.error("%s: fence-peer helper %s (returned %s); %s", self.conf.name,
                      "missing" if code is None and not self.conf.handlers.get("fence-peer")
                      else "broken", code,
                      "I/O stays suspended until 'replfsadm resume-io'" if stonith
                      else "continuing without fencing")
            self.last_event = f"fence-peer failed ({code})"

    async def _demote_when_unused(self) -> None:
        """After a lost fence-peer decision: once nothing has the device
        open (the fenced mounts are unmounted), become Secondary, so the
        next connection makes this node the winner's SyncTarget."""
        while self.fence_lost and self.role is Role.Primary:
            if not self.open_count:
                try:
                    await self.secondary()
                    log.warning("%s: demoted after losing the fence-peer decision; it "
                                "resyncs from the peer when the link is back", self.conf.name)
                except (ReplfsError, OSError) as e:
                    log.error("%s: cannot demote after a lost fence-peer decision: %s",
                              self.conf.name, e)
                return
            await trio.sleep(0.2)

    def resume_io(self) -> None:
        if self.io_suspended:
            log.warning("%s: susp( 1 -> 0 )", self.conf.name)
        self.io_suspended = False
        self._io_resumed.set()
        self._set()

    async def _connection_lost(self) -> None:
        """Every write the peer has not confirmed is now out of sync."""
        if self._sync is not None:
            self._sync = None
        self._verify = None
        if self.role is Role.Primary and self.pdsk is DiskState.UpToDate \
                and self.disk is not None and self.want_connect:
            # Not an orderly disconnect: fence before completing anything.
            await self._fence_peer()
        pendings = list(self._pending.values())
        self._pending.clear()
        try:
            if pendings and self.disk is not None:
                if self.role is Role.Primary and not self.fence_lost:
                    # (the loser starts no generation: its unacknowledged
                    # blocks, marked below, come back from the winner)
                    await self._new_generation()
                for p in pendings:
                    first, count = blocks_of(p.offset, p.length)
                    self.disk.bitmap.set_range(first, count)
                await self.disk.write_bitmap()
            if self.disk is not None:
                await self.disk.write_bitmap()
        except OSError as e:
            # The meta-data cannot record what the peer misses: this disk
            # can no longer be trusted to know; give it up.
            await self._local_io_error("meta-data write", e, 0, 0)
        finally:
            for p in pendings:
                self._al_release(p)
                p.received.set()
                p.done.set()
            for ev in self._flushes.values():
                ev.set()
            self._flushes.clear()
            for ev, _box in self._reads.values():
                ev.set()
            self._reads.clear()
            for send in self._role_replies.values():
                try:
                    send.send_nowait(0)
                except trio.WouldBlock:
                    pass
            self._role_replies.clear()

    async def _establish(self, listeners) -> _Channel:
        """Accept or connect until one handshake succeeds.

        Each accepted connection is handshaken in its own task, so a silent
        stranger cannot hold up the real peer.  The first connection to
        authenticate and agree wins; any other is closed.
        """
        won: list[tuple[_Channel, P.Params]] = []
        i_connect = self.node < self.peer.name
        async with trio.open_nursery() as n:
            async def attempt(stream) -> bool:
                chan = _Channel(stream)
                ok = False
                try:
                    params = await self._try_handshake(chan)
                    if params is not None and not won:
                        won.append((chan, params))
                        ok = True
                        n.cancel_scope.cancel()
                finally:
                    if not ok:
                        self._end_handshake(chan)
                        await chan.aclose()
                return ok

            async def accept_loop():
                while True:
                    stream = await listeners[0].accept()
                    n.start_soon(attempt, stream)

            async def connect_loop():
                while True:
                    try:
                        with trio.fail_after(self.conf.connect_int_s + 5):
                            stream = await trio.open_tcp_stream(self.peer.address, self.peer.port)
                    except (OSError, trio.TooSlowError):
                        await trio.sleep(min(self.conf.connect_int_s, 0.5))
                        continue
                    if await attempt(stream):
                        return
                    await trio.sleep(min(self.conf.connect_int_s, 1.0))

            n.start_soon(accept_loop)
            if i_connect:
                n.start_soon(connect_loop)
        chan, params = won[0]
        self._peer_params = params
        self._chan = chan
        self._set(peer_role=_peer_role(params.role), pdsk=_peer_disk(params.disk))
        return chan

    async def _try_handshake(self, chan: _Channel) -> P.Params | None:
        """The peer's Params if the handshake succeeds, else None (logged)."""
        try:
            with trio.fail_after(max(self.conf.timeout_s, 5)):
                return await self._handshake(chan)
        except _Fatal:
            raise
        except (_Drop, P.RemoteProtocolError, trio.TooSlowError, trio.BrokenResourceError,
                trio.ClosedResourceError, OSError, ValueError, IndexError, KeyError) as e:
            log.warning("%s: handshake failed: %s", self.conf.name, e)
            self.last_event = f"handshake failed: {e}"
            self._end_handshake(chan)
            if self.cstate is ConnState.WFReportParams:
                self._set(cstate=ConnState.WFConnection)
            return None

    @property
    def _handshaking(self) -> bool:
        return self._quiesce > 0

    def _hold_unreplicated(self, chan: _Channel) -> None:
        if not chan.quiesced:
            chan.quiesced = True
            if self._quiesce == 0:
                self._handshake_over = trio.Event()
            self._quiesce += 1

    def _end_handshake(self, chan: _Channel) -> None:
        """This handshake no longer holds writes that cannot be replicated."""
        if chan.quiesced:
            chan.quiesced = False
            self._quiesce -= 1
            if self._quiesce == 0:
                self._handshake_over.set()

    def _my_params(self) -> P.Params:
        disk = self.disk
        if disk is not None:
            u = disk.sb.uuids
            flags = 0
            if self.dstate is DiskState.Inconsistent:
                flags |= P.PF_INCONSISTENT
            if disk.crashed_primary:
                flags |= P.PF_CRASHED_PRIMARY
            return P.Params(self.conf.protocol.encode(), int(self.conf.allow_two_primaries),
                            int(self.discard_my_data), _role_code(self.role),
                            _disk_code(self.dstate), flags, disk.layout.data_size,
                            disk.sb.device_uuid, u.current, u.bitmap, u.history[0],
                            u.history[1], disk.bitmap.count)
        return P.Params(self.conf.protocol.encode(), int(self.conf.allow_two_primaries),
                        int(self.discard_my_data), _role_code(self.role),
                        _disk_code(self.dstate), 0, 0, 0, 0, 0, 0, 0, 0)

    async def _handshake(self, chan: _Channel) -> P.Params:
        nonce = secrets.token_bytes(16)
        await chan.send(P.Hello.make(P.PROTOCOL_VERSION, nonce, self.conf.name, self.node))
        hello = await chan.recv()
        if isinstance(hello, P.Refuse):
            raise _Drop(f"peer refused the connection: {hello.reason.decode(errors='replace')}")
        if not isinstance(hello, P.Hello):
            raise P.RemoteProtocolError(f"expected Hello, got {type(hello).__name__}")
        res, node = hello.split_names()
        if hello.version != P.PROTOCOL_VERSION:
            await chan.send(P.Refuse(b"incompatible protocol version"))
            raise _Drop(f"peer speaks protocol version {hello.version}, we speak "
                        f"{P.PROTOCOL_VERSION}", ConnState.ProtocolError)
        if res != self.conf.name or node != self.peer.name:
            await chan.send(P.Refuse(f"expected resource {self.conf.name} node "
                                     f"{self.node}".encode()))
            raise _Drop(f"wrong peer: connection presented resource '{res}' node '{node}', "
                        f"expected resource '{self.conf.name}' node '{self.peer.name}'",
                        ConnState.ProtocolError)
        secret = (self.conf.shared_secret or "").encode()
        await chan.send(P.Auth(hmac.new(secret, hello.nonce, hashlib.sha256).digest()))
        auth = await chan.recv()
        if not isinstance(auth, P.Auth):
            raise P.RemoteProtocolError(f"expected Auth, got {type(auth).__name__}")
        want = hmac.new(secret, nonce, hashlib.sha256).digest()
        if not hmac.compare_digest(auth.mac, want):
            raise _Drop("Authentication of peer failed (shared-secret mismatch)",
                        ConnState.ProtocolError)
        self._set(cstate=ConnState.WFReportParams)
        # From here until the sync decision is made, nothing may change the
        # generation or the bitmap we tell the peer about: writes that
        # cannot be replicated wait, and those already running finish first.
        self._hold_unreplicated(chan)
        while self._unrepl_inflight:
            await self._unrepl_changed.wait()
        self._sent_params = self._my_params()
        await chan.send(self._sent_params)
        params = await chan.recv()
        if not isinstance(params, P.Params):
            raise P.RemoteProtocolError(f"expected Params, got {type(params).__name__}")
        if self.disk is None and params.data_size:
            self._size = params.data_size
        if params.protocol.decode(errors="replace") != self.conf.protocol:
            raise _Fatal(f"incompatible protocol settings (we use {self.conf.protocol}, "
                         f"peer uses {params.protocol.decode(errors='replace')})")
        if bool(params.two_primaries) != self.conf.allow_two_primaries:
            raise _Fatal("incompatible allow-two-primaries settings")
        if self.disk is not None and params.data_size and params.data_size != self.size:
            raise _Fatal(f"the peer's disk size ({params.data_size} bytes) differs from "
                         f"ours ({self.size} bytes); resizing is not supported")
        _peer_role(params.role), _peer_disk(params.disk)   # validate
        return params

    def _decide(self, params: P.Params) -> tuple[Decision, Resolution | None]:
        """The sync decision, and after a split brain how it is resolved
        (core/splitbrain.py), or None when there was none."""
        # Decide from exactly what we told the peer, so both sides reach
        # mirror-image decisions even if something changed meanwhile.
        sp = self._sent_params
        if self.disk is None or sp.data_size == 0 or params.data_size == 0:
            return Decision.NO_SYNC, None
        me = side_of(sp, self.node)
        peer = side_of(params, self.peer.name)
        decision = compare(me, peer)
        log.info("%s: uuid_compare: %s (me %s, peer %s)", self.conf.name, decision.value,
                 me.uuids.show(), peer.uuids.show())
        if decision is not Decision.SPLIT_BRAIN:
            return decision, None
        conf = self.conf
        resolution = resolve(me, peer, Policies(conf.after_sb_0pri, conf.after_sb_1pri,
                                                conf.after_sb_2pri),
                             discard_mine=bool(sp.discard_my_data),
                             discard_peer=bool(params.discard_my_data))
        return resolution.decision, resolution

    async def _after_split_brain(self, chan: _Channel, sb: Resolution) -> Decision:
        """Act on how a split brain is resolved: log it as DRBD does; a
        Primary whose data call-pri-lost-after-sb discards gives up its
        role, or, when it cannot (the device is in use), stops its
        filesystem mounts, runs the pri-lost-after-sb handler, and the split
        brain stays unresolved.  Unresolved: the split-brain handler runs
        and the connection is dropped for good (StandAlone)."""
        name = self.conf.name
        for note in sb.notes:
            log.warning("%s: %s", name, note)
        if sb.pri_lost and self.role is Role.Primary:
            gave_up = False
            if not self.open_count and not self.ap:
                try:
                    await self.secondary()
                    gave_up = True
                except (ReplfsError, OSError) as e:
                    log.error("%s: cannot give up the primary role: %s", name, e)
            if gave_up:
                log.warning("%s: Successfully gave up primary role.", name)

                async def tell_peer_once_connected() -> None:
                    # (the peer was told "Primary" in the handshake)
                    while self._chan is chan and not self.cstate.is_connected:
                        await self._state_changed.wait()
                    if self._chan is chan:
                        await self._tell_peer_state()
                self._nursery.start_soon(tell_peer_once_connected)
            else:
                why = ("split brain: after-sb call-pri-lost-after-sb discards the data of "
                       "this Primary")
                log.critical("%s: %s, and the device is in use: its filesystem mounts are "
                             "stopped and pri-lost-after-sb runs", name, why)
                self.last_event = why
                if self.pri_lost_hook is not None:
                    self.pri_lost_hook(why)
                await self.handler("pri-lost-after-sb")
                sb = sb.refused()
        if sb.resolved:
            log.warning("%s: %s", name, sb.line)
            return sb.decision
        self.split_brain = True
        await self.handler("split-brain")
        raise _Fatal(sb.line)         # logged as an error by the connection loop

    async def _session(self, chan: _Channel) -> None:
        params = self._peer_params
        decision, split_brain = self._decide(params)
        name = self.conf.name
        if split_brain is not None:
            decision = await self._after_split_brain(chan, split_brain)
        if decision is Decision.UNRELATED:
            raise _Fatal("Unrelated data, aborting!")
        if decision.i_am_target and self.role is Role.Primary and \
                self.dstate is not DiskState.Inconsistent:
            if self.fence_lost:
                # the loser of a fence-peer decision is demoted as soon as
                # its last opener is gone; try again until then
                raise _Drop("I shall become SyncTarget, but I am primary (the loser of the "
                            "fence-peer decision: retrying once it is demoted)")
            # (DRBD's rr-conflict disconnect, its default; replfs has no
            # other: after-sb violently-as0p that discards a Primary's data
            # ends here too, as it does in DRBD unless rr-conflict says
            # violently)
            raise _Fatal("I shall become SyncTarget, but I am primary!")
        if (self.role is Role.Primary and self.peer_role is Role.Primary
                and not self.conf.allow_two_primaries):
            raise _Fatal("both nodes are Primary and allow-two-primaries is not set; "
                         "demote one with 'replfsadm secondary'")
        self.discard_my_data = False
        self._peer_bitmap_done = trio.Event()
        try:
            await self._run_session(chan, params, decision)
        finally:
            self._session_nursery = None
            self._role_at_split = self.role

    async def _run_session(self, chan: _Channel, params: P.Params, decision: Decision) -> None:
        name = self.conf.name
        async with trio.open_nursery() as n:
            self._session_nursery = n
            # Go straight to the state the decision calls for: showing
            # "Connected" first would tell wait-sync (and admins) that the
            # disks agree before the resync has even started.
            if decision.i_am_source:
                self._set(cstate=ConnState.StartingSyncS if decision.full else ConnState.WFBitMapS)
            elif decision.i_am_target:
                self._set(cstate=ConnState.StartingSyncT if decision.full else ConnState.WFBitMapT)
            else:
                self._set(cstate=ConnState.Connected)
            self._end_handshake(chan)
            n.start_soon(self._receiver, chan)
            n.start_soon(self._pinger, chan)
            if decision is Decision.NO_SYNC and self.disk is not None:
                await self._connected_in_sync(params)
            elif decision.i_am_source:
                await self._begin_sync_as_source(chan, full=decision.full)
            elif decision.i_am_target:
                self._set(cstate=ConnState.WFBitMapT if not decision.full else ConnState.StartingSyncT)
                if not decision.full:
                    await self._send_bitmap(chan)
            elif decision is Decision.BOTH_FRESH:
                log.info("%s: both disks are fresh (just created): no sync until one node "
                         "is made Primary with --force", name)
        # The nursery ends when the receiver ends: connection over.

    async def _connected_in_sync(self, params: P.Params) -> None:
        disk = self.disk
        peer_disk = _peer_disk(params.disk)
        if self.dstate in (DiskState.Consistent, DiskState.Outdated) and \
                peer_disk in (DiskState.UpToDate, DiskState.Consistent, DiskState.Outdated):
            await disk.write_superblock(disk.sb.with_flags(
                set_=md.F_CONSISTENT | md.F_WAS_UP_TO_DATE, clear=md.F_OUTDATED))
            self._set(dstate=DiskState.UpToDate)
            await self._tell_peer_state()
        await self._forget_crash()

    async def _forget_crash(self) -> None:
        """The peer has what we had: a past crash as Primary no longer matters."""
        disk = self.disk
        if disk is not None and disk.crashed_primary:
            disk.crashed_primary = False
            if self.role is not Role.Primary and disk.sb.has(md.F_PRIMARY):
                await disk.write_superblock(disk.sb.with_flags(clear=md.F_PRIMARY))

    # ------------------------------------------------------------ resync
    def _session_nursery_start(self, fn, *args) -> None:
        n = self._session_nursery or self._nursery
        if n is not None:
            n.start_soon(fn, *args)

    def _start_full_sync_as_source(self) -> None:
        chan = self._chan
        if chan is None:
            return
        self._session_nursery.start_soon(self._begin_sync_as_source, chan, True)

    async def _send_bitmap(self, chan: _Channel) -> None:
        raw = self.disk.bitmap.to_bytes()
        step = 1024 * 1024
        for off in range(0, max(len(raw), 1), step):
            last = int(off + step >= len(raw))
            await chan.send(P.BitmapChunk(off, last, zlib.compress(raw[off:off + step], 1)))

    async def _begin_sync_as_source(self, chan: _Channel, full: bool) -> None:
        disk = self.disk
        if full:
            self._set(cstate=ConnState.StartingSyncS)
            disk.bitmap.set_all()
            await disk.write_bitmap()
        else:
            self._set(cstate=ConnState.WFBitMapS)
            await self._send_bitmap(chan)
            with trio.move_on_after(max(self.conf.timeout_s * 3, 30)) as waited:
                await self._peer_bitmap_done.wait()
            if waited.cancelled_caught:
                raise _Drop("the peer's bitmap did not arrive in time", ConnState.Timeout)
        total = disk.bitmap.count
        await chan.send(P.SyncStart(disk.sb.uuids.current, total, int(full)))
        self._sync = {"role": "source", "total": total, "start": time.monotonic(),
                      "window": trio.Semaphore(RESYNC_WINDOW // RESYNC_CHUNK),
                      "recent": [], "acked": 0}
        self._set(cstate=ConnState.SyncSource, pdsk=DiskState.Inconsistent)
        self._session_nursery.start_soon(self._resync_sender, chan)

    async def _resync_sender(self, chan: _Channel) -> None:
        disk = self.disk
        sync = self._sync
        rate = self.conf.resync_rate_kib * 1024
        started = time.monotonic()
        sent = 0
        chunk_blocks = RESYNC_CHUNK // BLOCK
        for first, count in disk.bitmap.runs():
            pos = first
            while pos < first + count:
                n = min(chunk_blocks, first + count - pos)
                await sync["window"].acquire()
                off = pos * BLOCK
                token = await self._lock_range(off, off + n * BLOCK)
                try:
                    data = await disk.data.read(off, n * BLOCK)
                    self.dr += len(data)
                    await chan.send(P.ResyncData(off, data))
                    self.ns += len(data)
                finally:
                    self._unlock_range(token)
                sent += len(data)
                pos += n
                # Rate limit: sleep until we are back under the configured rate.
                ahead = sent / rate - (time.monotonic() - started)
                if ahead > 0:
                    await trio.sleep(ahead)
        # Wait until every chunk is acknowledged, then finish.
        for _ in range(RESYNC_WINDOW // RESYNC_CHUNK):
            await sync["window"].acquire()
        if disk.bitmap.count:
            # Blocks marked again while we were syncing: go round once more.
            for _ in range(RESYNC_WINDOW // RESYNC_CHUNK):
                sync["window"].release()
            self._session_nursery.start_soon(self._resync_sender, chan)
            return
        await chan.send(P.SyncDone(disk.sb.uuids.current))

    async def _finish_sync_as_source(self) -> None:
        disk = self.disk
        sb = disk.sb
        await disk.write_superblock(md.Superblock(sb.data_size, sb.uuids.retire_bitmap(),
                                                  sb.flags, sb.device_uuid, sb.al_extents,
                                                  sb.layout))
        await disk.write_bitmap()
        await self._forget_crash()
        elapsed = time.monotonic() - self._sync["start"] if self._sync else 0
        log.info("%s: Resync done (total %d sec; paused 0 sec; %d K/sec)", self.conf.name,
                 elapsed, (self._sync["total"] * 4 / elapsed) if elapsed else 0)
        self._sync = None
        self._set(cstate=ConnState.Connected, pdsk=DiskState.UpToDate)

    # ------------------------------------------------------------ receiving
    async def _receiver(self, chan: _Channel) -> None:
        async with trio.open_nursery() as writers:
            slots = trio.Semaphore(RECV_PARALLEL)
            while True:
                pkt = await chan.recv()
                await self._dispatch(chan, pkt, writers, slots)

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
                log.error("%s: Concurrent local write detected! new: %ds +%d; pending: %ds "
                          "+%d (both nodes are Primary: the blocks are marked out of sync)",
                          self.conf.name, offset // 512, length, start // 512, stop - start)
                if self.disk is not None:
                    first, count = blocks_of(offset, length)
                    self.disk.bitmap.set_range(first, count)
                return

    async def _recv_lock(self, start: int, end: int) -> int:
        while self._recv_ranges.overlaps(start, end):
            await self._recv_changed.wait()
        return self._recv_ranges.add(start, end)

    def _recv_unlock(self, token: int) -> None:
        self._recv_ranges.remove(token)
        self._recv_changed.set()
        self._recv_changed = trio.Event()

    async def _recv_drain(self) -> None:
        while len(self._recv_ranges):
            await self._recv_changed.wait()

    async def _dispatch(self, chan: _Channel, pkt: P.Packet, writers, slots) -> None:
        t = type(pkt)
        if t is P.Data:
            self.nr += len(pkt.data)
            if self.disk is None:
                await chan.send(P.NegAck(pkt.seq, errno.EIO))
                return
            self._check_peer_range(pkt.offset, len(pkt.data))
            if pkt.epoch != self._recv_epoch:
                # Barrier: everything of the earlier epochs lands first.
                await self._recv_drain()
                self._recv_epoch = pkt.epoch
            self._check_concurrent(pkt.offset, len(pkt.data))
            await slots.acquire()
            token = await self._recv_lock(pkt.offset, pkt.offset + len(pkt.data))
            self.ua += 1
            if self.conf.protocol == "B":
                await chan.send(P.RecvAck(pkt.seq))
            writers.start_soon(self._apply_peer_write, chan, pkt, token, slots)
        elif t is P.WriteAck or t is P.NegAck:
            read = self._reads.get(pkt.seq)
            if read is not None and t is P.NegAck:
                read[1].append(pkt.errno or errno.EIO)
                read[0].set()
                return
            p = self._pending.pop(pkt.seq, None)
            if p is not None:
                p.acked = t is P.WriteAck
                if t is P.NegAck and self.disk is not None:
                    log.error("%s: peer failed to write %d bytes at %d (errno %d); "
                              "marking out of sync", self.conf.name, p.length, p.offset, pkt.errno)
                    await self._mark_unreplicated(p.offset, p.length)
                    await self.disk.write_bitmap()
                self._al_release(p)
                p.received.set()
                p.done.set()
        elif t is P.RecvAck:
            p = self._pending.get(pkt.seq)
            if p is not None:
                p.received.set()
        elif t is P.Flush:
            await self._recv_drain()
            if self.disk is not None:
                await self.disk.data.flush()
            await chan.send(P.FlushAck(pkt.seq))
        elif t is P.FlushAck:
            ev = self._flushes.pop(pkt.seq, None)
            if ev is not None:
                ev.set()
        elif t is P.ReadRequest:
            if self.disk is None or self.dstate is not DiskState.UpToDate:
                await chan.send(P.NegAck(pkt.seq, errno.EIO))
                return
            self._check_peer_range(pkt.offset, pkt.length)
            try:
                data = await self.disk.data.read(pkt.offset, pkt.length)
            except OSError as e:
                await chan.send(P.NegAck(pkt.seq, e.errno or errno.EIO))
                await self._local_io_error("read", e, pkt.offset, pkt.length)
                return
            self.dr += len(data)
            await chan.send(P.ReadReply(pkt.seq, data))
            self.ns += len(data)
        elif t is P.ReadReply:
            read = self._reads.get(pkt.seq)
            if read is not None:
                read[1].append(pkt.data)
                read[0].set()
        elif t is P.OutOfSync:
            self._check_peer_range(pkt.offset, pkt.length)
            await self._peer_lacks(pkt.offset, pkt.length)
        elif t is P.Ping:
            await chan.send(P.PingAck(pkt.token))
        elif t is P.PingAck:
            pass
        elif t is P.StateUpdate:
            self._set(peer_role=_peer_role(pkt.role), pdsk=_peer_disk(pkt.disk))
            if self.peer_role is Role.Primary:
                # the promotion we allowed is done; peer_role tells from now on
                self._peer_promotion_allowed_at = float("-inf")
        elif t is P.RoleRequest:
            result = 0
            if pkt.role == _role_code(Role.Primary):
                if self.role is Role.Primary and not self.conf.allow_two_primaries:
                    result = -1
                elif self.single_node_opens:
                    result = -12
                else:
                    self._peer_promotion_allowed_at = trio.current_time()
            await chan.send(P.RoleReply(pkt.token, result))
        elif t is P.RoleReply:
            send = self._role_replies.pop(pkt.token, None)
            if send is not None:
                send.send_nowait(pkt.result)
        elif t is P.BitmapChunk:
            disk = self._need_disk("BitmapChunk")
            limit = (disk.bitmap.nblocks + 7) // 8
            if pkt.offset > limit:
                raise P.RemoteProtocolError("bitmap chunk beyond the bitmap")
            try:
                dec = zlib.decompressobj()
                bits = dec.decompress(pkt.data, limit - pkt.offset + 1)
            except zlib.error:
                raise P.RemoteProtocolError("corrupt bitmap chunk") from None
            if len(bits) > limit - pkt.offset:
                raise P.RemoteProtocolError("bitmap chunk larger than the bitmap")
            disk.bitmap.merge(bits, pkt.offset)
            if pkt.last:
                self._peer_bitmap_done.set()
        elif t is P.SyncStart:
            self._need_disk("SyncStart")
            await self._begin_sync_as_target(pkt)
        elif t is P.ResyncData:
            self.nr += len(pkt.data)
            self._check_peer_range(pkt.offset, len(pkt.data))
            await slots.acquire()
            token = await self._recv_lock(pkt.offset, pkt.offset + len(pkt.data))
            writers.start_soon(self._apply_resync, chan, pkt, token, slots)
        elif t is P.ResyncAck:
            self._check_peer_range(pkt.offset, pkt.length)
            if self._sync is None or self._sync["role"] != "source":
                raise P.RemoteProtocolError("ResyncAck while not SyncSource")
            first, count = blocks_of(pkt.offset, pkt.length)
            self.disk.bitmap.clear_range(first, count)
            if self._sync is not None:
                self._sync["acked"] += pkt.length
                self._sync["window"].release()
        elif t is P.SyncDone:
            if self._sync is None or self._sync["role"] != "target":
                raise P.RemoteProtocolError("SyncDone while not SyncTarget")
            await self._recv_drain()
            await self._finish_sync_as_target(pkt)
            await chan.send(P.SyncDoneAck())
        elif t is P.SyncDoneAck:
            if self._sync is None or self._sync["role"] != "source":
                raise P.RemoteProtocolError("SyncDoneAck while not SyncSource")
            await self._finish_sync_as_source()
        elif t is P.VerifyRequest:
            self._check_peer_range(pkt.offset, pkt.length)
            if len(pkt.digests) != 16 * ((pkt.length + BLOCK - 1) // BLOCK):
                raise P.RemoteProtocolError("VerifyRequest digest count does not match")
            await self._verify_answer(chan, pkt)
        elif t is P.VerifyReply:
            self._check_peer_range(pkt.offset, pkt.length)
            self._verify_reply(pkt)
        elif t is P.VerifyDone:
            self._set(cstate=ConnState.Connected)
            if pkt.oos_blocks:
                log.warning("%s: Online verify found %d 4k block out of sync!",
                            self.conf.name, pkt.oos_blocks)
        elif t is P.Goodbye:
            raise _Drop("peer disconnected", ConnState.TearDown)
        else:
            raise P.RemoteProtocolError(f"unexpected {t.__name__} on an established connection")

    def _al_release(self, p: _Pending) -> None:
        """The peer has the write, or the bitmap says it lacks it."""
        if p.disk is not None:
            p.disk.al.end(*p.extents)
            p.disk = None
            # Writes waiting for room in the activity log may go on.
            self._ranges_changed.set()
            self._ranges_changed = trio.Event()

    def _need_disk(self, what: str) -> LocalDisk:
        if self.disk is None:
            raise P.RemoteProtocolError(f"{what} received but this node has no disk")
        return self.disk

    def _check_peer_range(self, offset: int, length: int) -> None:
        if self.disk is None or offset < 0 or offset + length > self.size:
            raise P.RemoteProtocolError(f"peer wrote outside the device ({offset}+{length})")

    async def _apply_peer_write(self, chan: _Channel, pkt: P.Data, token: int, slots) -> None:
        failed = None
        try:
            try:
                disk = self.disk
                if disk is None:
                    raise BlockDeviceError(errno.EIO, "no local disk")
                await disk.data.write(pkt.offset, pkt.data)
                self.dw += len(pkt.data)
                if self.pdsk in (DiskState.Diskless, DiskState.Failed):
                    # The sender has no disk: this is the only copy.
                    await self._peer_lacks(pkt.offset, len(pkt.data))
                reply: P.Packet = P.WriteAck(pkt.seq)
            except OSError as e:
                failed = e
                reply = P.NegAck(pkt.seq, e.errno or errno.EIO)
        finally:
            self._recv_unlock(token)
            slots.release()
            self.ua -= 1
        if failed is not None and self.disk is not None:
            await self._local_io_error("write (peer data)", failed, pkt.offset, len(pkt.data))
        try:
            await chan.send(reply)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass

    async def _begin_sync_as_target(self, pkt: P.SyncStart) -> None:
        await self.handler("before-resync-target")
        disk = self.disk
        if pkt.full:
            disk.bitmap.set_all()
        await disk.write_bitmap()
        await disk.write_superblock(disk.sb.with_flags(clear=md.F_CONSISTENT))
        self._sync = {"role": "target", "total": disk.bitmap.count, "start": time.monotonic(),
                      "recent": [], "acked": 0}
        self._set(cstate=ConnState.SyncTarget, dstate=DiskState.Inconsistent)

    async def _apply_resync(self, chan: _Channel, pkt: P.ResyncData, token: int, slots) -> None:
        try:
            disk = self._need_disk("ResyncData")
            # Under the application range lock, and only into blocks still
            # marked: a Primary that is SyncTarget may have written newer
            # data into some of them since the peer read this chunk.
            app = await self._lock_range(pkt.offset, pkt.offset + len(pkt.data))
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
                    await disk.data.write(pkt.offset + lo, pkt.data[lo:hi])
                    self.dw += hi - lo
                    disk.bitmap.clear_range(blk, run - blk)
                    blk = run
            finally:
                self._unlock_range(app)
        finally:
            self._recv_unlock(token)
            slots.release()
        if self._sync is not None:
            self._sync["acked"] += len(pkt.data)
        try:
            await chan.send(P.ResyncAck(pkt.offset, len(pkt.data)))
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass

    async def _finish_sync_as_target(self, pkt: P.SyncDone) -> None:
        disk = self.disk
        await disk.data.flush()
        disk.bitmap.clear_all()
        await disk.write_bitmap()
        sb = disk.sb
        flags = (sb.flags | md.F_CONSISTENT | md.F_WAS_UP_TO_DATE) & ~md.F_OUTDATED
        await disk.write_superblock(md.Superblock(sb.data_size, sb.uuids.adopt(pkt.source_current),
                                                  flags, sb.device_uuid, sb.al_extents, sb.layout))
        await self._forget_crash()
        elapsed = time.monotonic() - self._sync["start"] if self._sync else 0
        log.info("%s: Resync done (total %d sec; paused 0 sec)", self.conf.name, elapsed)
        self._sync = None
        self._set(cstate=ConnState.Connected, dstate=DiskState.UpToDate)
        self._session_nursery_start(self.handler, "after-resync-target")

    # ------------------------------------------------------------ keepalive
    async def _pinger(self, chan: _Channel) -> None:
        ping_int = self.conf.ping_int_s
        ping_timeout = self.conf.ping_timeout_s
        ack_timeout = self.conf.timeout_s
        token = 0
        while True:
            await trio.sleep(min(ping_int, ping_timeout, 1.0))
            now = time.monotonic()
            if now - chan.last_heard > ping_int + ping_timeout:
                raise _Drop("PingAck did not arrive in time.", ConnState.Timeout)
            if now - chan.last_heard > ping_int / 2:
                token += 1
                await chan.send(P.Ping(token))
            oldest = min((p.t0 for p in self._pending.values()), default=now)
            if now - oldest > max(ack_timeout, ping_timeout):
                raise _Drop("peer did not acknowledge writes in time", ConnState.Timeout)

    # ------------------------------------------------------------ verify
    async def verify(self) -> None:
        if self.cstate is not ConnState.Connected or self._chan is None:
            raise refuse(SS_NEED_CONNECTION)
        if self.disk is None or self.dstate is not DiskState.UpToDate:
            raise refuse(SS_IS_DISKLESS, EXIT_NO_LOCAL_DISK)
        self._verify = {"start": time.monotonic(), "oos": 0, "done": 0,
                        "total": self.size, "window": trio.Semaphore(8)}
        self._set(cstate=ConnState.VerifyS)
        self._session_nursery.start_soon(self._verify_sender, self._chan)

    async def _verify_sender(self, chan: _Channel) -> None:
        v = self._verify
        step = RESYNC_CHUNK
        rate = self.conf.resync_rate_kib * 1024
        for off in range(0, self.size, step):
            n = min(step, self.size - off)
            await v["window"].acquire()
            token = await self._lock_range(off, off + n)
            try:
                data = await self.disk.data.read(off, n)
            finally:
                self._unlock_range(token)
            self.dr += len(data)
            await chan.send(P.VerifyRequest(off, n, _block_digests(data)))
            ahead = (off + n) / rate - (time.monotonic() - v["start"])
            if ahead > 0:
                await trio.sleep(ahead)
        for _ in range(8):
            await v["window"].acquire()
        await self.disk.write_bitmap()
        await chan.send(P.VerifyDone(v["oos"]))
        elapsed = time.monotonic() - v["start"]
        log.info("%s: Online verify done (total %d sec; paused 0 sec; %d K/sec)",
                 self.conf.name, elapsed, self.size / 1024 / max(elapsed, 0.001))
        if v["oos"]:
            log.warning("%s: Online verify found %d 4k block out of sync!", self.conf.name, v["oos"])
        self.last_event = f"online verify found {v['oos']} 4k blocks out of sync"
        self._set(cstate=ConnState.Connected)

    async def _verify_answer(self, chan: _Channel, pkt: P.VerifyRequest) -> None:
        if self.cstate is ConnState.Connected:
            self._set(cstate=ConnState.VerifyT)
        data = await self.disk.data.read(pkt.offset, pkt.length)
        self.dr += len(data)
        mine = _block_digests(data)
        nblocks = (pkt.length + BLOCK - 1) // BLOCK
        mismatch = bytearray((nblocks + 7) // 8)
        for i in range(nblocks):
            if mine[i * 16:(i + 1) * 16] != pkt.digests[i * 16:(i + 1) * 16]:
                mismatch[i >> 3] |= 1 << (i & 7)
                self.disk.bitmap.set_range(pkt.offset // BLOCK + i, 1)
        await chan.send(P.VerifyReply(pkt.offset, pkt.length, bytes(mismatch)))

    def _verify_reply(self, pkt: P.VerifyReply) -> None:
        v = self._verify
        if v is None:
            return
        v["done"] += pkt.length
        first = pkt.offset // BLOCK
        nblocks = (pkt.length + BLOCK - 1) // BLOCK
        run_start = None
        for i in range(nblocks + 1):
            differs = i < nblocks and bool(pkt.mismatch[i >> 3] & (1 << (i & 7))) \
                if (i >> 3) < len(pkt.mismatch) else False
            if differs and run_start is None:
                run_start = i
            elif not differs and run_start is not None:
                count = i - run_start
                v["oos"] += count
                self.disk.bitmap.set_range(first + run_start, count)
                log.warning("%s: Out of sync: start=%d, size=%d (sectors)", self.conf.name,
                            (first + run_start) * BLOCK // 512, count * BLOCK // 512)
                run_start = None
        v["window"].release()

    # ------------------------------------------------------------ teardown
    async def down(self) -> None:
        if self.role is Role.Primary:
            await self.secondary()
        await self.disconnect()
        await self.detach()

    async def _shutdown(self) -> None:
        if self.disk is not None:
            try:
                await self.disk.write_bitmap()
            except OSError:
                pass
            await self.disk.close()
            self.disk = None

    # ------------------------------------------------------------ status
    def status(self) -> dict:
        disk = self.disk
        oos_kib = disk.bitmap.count * 4 if disk else 0
        st = {
            "name": self.conf.name,
            "minor": self.me.minor,
            "device": self.me.device,
            "disk_path": self.me.disk,
            "node": self.node,
            "peer": self.peer.name,
            "protocol": self.conf.protocol,
            "role": self.role.value,
            "peer_role": self.peer_role.value,
            "cstate": self.cstate.value,
            "dstate": self.dstate.value,
            "pdsk": self.pdsk.value,
            "size": self.size,
            "split_brain": self.split_brain,
            "last_event": self.last_event,
            "open_count": self.open_count,
            "single_node_opens": self.single_node_opens,
            "io_suspended": self.io_suspended,
            "concurrent_writes": self.concurrent_writes,
            "fence_lost": self.fence_lost,
            "counters": {
                "ns": self.ns // 1024, "nr": self.nr // 1024, "dw": self.dw // 1024,
                "dr": self.dr // 1024, "al": disk.al_writes if disk else 0,
                "bm": disk.bm_writes if disk else 0, "lo": self.lo,
                "pe": len(self._pending), "ua": self.ua, "ap": self.ap,
                "ep": max(1, len({p.epoch for p in self._pending.values()})),
                "wo": "f", "oos": oos_kib,
            },
        }
        if disk is not None:
            st["uuids"] = disk.sb.uuids.show()
            st["out_of_sync_kib"] = oos_kib
        sync = self._sync
        if sync is not None and self.cstate.is_syncing:
            total = sync["total"] * 4
            elapsed = time.monotonic() - sync["start"]
            st["sync"] = {
                "role": sync["role"], "total_kib": total, "left_kib": oos_kib,
                "percent": round(100.0 * (total - oos_kib) / total, 1) if total else 100.0,
                "line": progress_line(
                    total, oos_kib, elapsed, 0.0,
                    want_kib_s=(self.conf.resync_rate_kib if sync["role"] == "target"
                                else None)),
            }
        if self._verify is not None and self.cstate in (ConnState.VerifyS,):
            v = self._verify
            st["verify"] = {"done": v["done"], "total": v["total"], "oos_blocks": v["oos"]}
            elapsed = time.monotonic() - v.get("start", time.monotonic())
            # (total and done are bytes here)
            st["verify"]["line"] = progress_line(v["total"] // 1024,
                                                 (v["total"] - v["done"]) // 1024,
                                                 elapsed, 0.0, verify=True)
        return st
