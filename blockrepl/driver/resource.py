"""One replicated resource, driven by trio around the mirror engine.

The rules live in blockrepl/engine (roles, handshake decision, write and
receive paths, resync, verify, fencing); this module does what the engine
may not: sockets, files, clocks, handler processes, and the daemon's
interface.  Every engine call returns actions, carried out by ``_feed``
in order (actions.py lists the driver's obligations).

Task tree (each owned by the resource's nursery):

    Resource.run
      ├─ ticker                 (calls engine.tick at engine.deadline)
      ├─ connection loop        (while the engine wants a connection)
      │    ├─ accept / connect  (until one Hello/Auth succeeds)
      │    └─ session           (one per established connection)
      │         ├─ receiver     (packets -> engine.receive)
      │         └─ sender       (the engine's Send actions, in order)
      └─ one task per disk I/O, meta-data write or handler run
         (each reports back with engine.done)
"""
from __future__ import annotations

import collections
import errno
import functools
import logging
import os
import secrets
import time

import trio

from replfs.blockdev import BlockDeviceError, frozen
from replfs import tls
from replfs.errors import EXIT_CONFIG, ReplfsError
from replfs.metrics import HistogramSet

from ..conf.model import Host, Resource as ResourceConf
from ..core.progress import progress_line
from ..core.states import ConnState, DiskState, Role
from ..engine import actions as A
from ..engine.engine import (Drop, Engine, EngineConfig, Fatal, IOFailure,  # noqa: F401
                             side_of)
from ..proto import handshake
from ..proto import packets as P
from .disk import LocalDisk
from .handlers import handler_env, run_handler

log = logging.getLogger("replfs.blockrepl")

_LOG_LEVELS = {"info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
_SEND_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)
_INLINE_IO = 64 * 1024      # disk requests up to this size are done in _feed, at once
_IOV_MAX = 1024             # buffers one writev takes


async def _reraise(exc: BaseException) -> None:
    raise exc


class _Channel:
    """A connected stream with framing and a send lock."""

    def __init__(self, stream: trio.SocketStream):
        self.stream: trio.abc.Stream = stream
        self.decoder = P.Decoder()
        self.send_lock = trio.Lock()
        self.bytes_sent = 0
        self.tls: str | None = None     # "TLSv1.3 <cipher>" once secured
        try:
            host, port = stream.socket.getpeername()[:2]
            self.remote = f"{host}:{port}"
        except (OSError, AttributeError, ValueError):
            self.remote = "?"

    def buffers(self, sndbuf: int, rcvbuf: int) -> None:
        """sndbuf-size / rcvbuf-size: the socket's kernel buffers (0: auto)."""
        sock = getattr(self.stream, "socket", None)
        for opt, size in ((trio.socket.SO_SNDBUF, sndbuf), (trio.socket.SO_RCVBUF, rcvbuf)):
            if size and sock is not None:
                try:
                    sock.setsockopt(trio.socket.SOL_SOCKET, opt, size)
                except OSError as e:
                    log.warning("cannot set the socket buffer to %d bytes: %s", size, e)

    async def secure(self, ctxs: tls.Contexts, *, server_side: bool, peer: str) -> None:
        """TLS over the connection; the peer must present ``peer``'s certificate."""
        self.stream, _ = await tls.handshake(self.stream, ctxs, server_side=server_side,
                                             expected=peer, where=self.remote)
        self.tls = tls.description(self.stream)

    async def send(self, pkt: P.Packet) -> None:
        data = P.encode(pkt)
        async with self.send_lock:
            await self.stream.send_all(data)
        self.bytes_sent += len(data)

    async def send_buffers(self, bufs: list) -> None:
        """Encoded packets, in order (small ones joined into one send)."""
        async with self.send_lock:
            if sum(len(b) for b in bufs) <= 65536:
                bufs = [b"".join(bufs)]
            for b in bufs:
                await self.stream.send_all(b)
                self.bytes_sent += len(b)

    def fileno(self) -> int | None:
        """The plain TCP socket's descriptor, for sends that need no task
        (``_Session.push``); None with TLS (its stream must encrypt)."""
        sock = getattr(self.stream, "socket", None)
        if self.tls is not None or sock is None:
            return None
        return sock.fileno()

    async def recv(self) -> P.Packet:
        while True:
            pkt = self.decoder.next_packet()
            if pkt is not None:
                return pkt
            data = await self.stream.receive_some(256 * 1024)
            if not data:
                self.decoder.receive_data(b"")
                self.decoder.next_packet()  # raises if closed mid-packet
                raise Drop("peer closed the connection", ConnState.BrokenPipe)
            self.decoder.receive_data(data)

    async def aclose(self) -> None:
        with trio.move_on_after(1) as scope:
            scope.shield = True
            # (the TCP stream itself: TLS's close_notify could wait on a
            # peer that reads nothing)
            await getattr(self.stream, "transport_stream", self.stream).aclose()


class _Session:
    """The driver's side of one engine session: its channel, the packets
    to send, and the scope that ends it.

    The engine's packets go out from ``Resource._feed`` itself: each batch
    of actions is one vectored, non-blocking write to the socket
    (``push``), with no task in between, while nothing waits before it.
    What the socket does not take waits in ``backlog``, in order, for the
    sender task; so does everything with TLS.  The backlog is unbounded
    (the engine's sends cannot wait), bounded in bytes by Resource.write,
    which waits while ``queued`` is over the limit: a peer that stops
    reading cannot make this node's memory grow."""

    def __init__(self, number: int, chan: _Channel):
        self.number = number
        self.chan = chan
        self.scope = trio.CancelScope()
        self.fd = chan.fileno()
        self.out: list = []             # this batch's encoded packets, not yet pushed
        self.out_data = 0               # ... of which packet data (for ``queued``)
        self.backlog: collections.deque = collections.deque()    # (buffers, data bytes)
        self.queued = 0                 # bytes of data in the backlog
        self.room = trio.Event()        # set when ``queued`` falls under the limit
        self.wake = trio.Event()        # the backlog grew, or the session closes
        self.closed = False             # no more packets go out
        self.closed_by_engine = False

    def put(self, pkt: P.Packet) -> None:
        if self.closed:
            return
        head, tail = P.encode_parts(pkt)
        self.out.append(head)
        if tail:
            self.out.append(tail)
        self.out_data += len(getattr(pkt, "data", b""))

    def push(self) -> None:
        """Send this batch's packets: at once if nothing waits before
        them, else (and whatever the socket does not take) by the sender."""
        bufs, data = self.out, self.out_data
        if not bufs:
            return
        self.out, self.out_data = [], 0
        if self.fd is not None and not self.backlog:
            try:
                n = os.writev(self.fd, bufs[:_IOV_MAX])
            except OSError:
                n = 0       # (EAGAIN; or an error the sender meets and reports)
            self.chan.bytes_sent += n
            while bufs and n >= len(bufs[0]):
                n -= len(bufs[0])
                bufs.pop(0)
            if not bufs:
                return
            if n:
                bufs[0] = memoryview(bufs[0])[n:]
        self.backlog.append((bufs, data))
        self.queued += data
        self.wake.set()

    def close(self) -> None:
        self.closed = True
        self.out, self.out_data = [], 0
        self.wake.set()


class Resource:
    """The live state of one resource on this node."""

    def __init__(self, conf: ResourceConf, node: str):
        self.node = node
        me = conf.host(node)
        peer = conf.peer_of(node)
        if me is None or peer is None:
            raise ReplfsError(f"resource {conf.name} has no 'on {node}' section for this "
                              f"node (use --node or REPLFS_NODE to override)", EXIT_CONFIG)
        self.me: Host = me
        self.peer: Host = peer
        self._conf = conf
        self.engine = Engine(EngineConfig.from_conf(conf, node), now=time.monotonic(),
                             new_uuid=lambda: secrets.randbits(63) << 1)
        self.disk: LocalDisk | None = None
        self._nursery: trio.Nursery | None = None
        self._state_changed = trio.Event()
        # the time each read, write and flush took (Prometheus endpoint)
        self.latency = HistogramSet()
        # called after every change of the engine's state (replfsd's event
        # log: replfsadm events2); must be cheap and must not raise
        self.state_hook = None
        self._tick_wake = trio.Event()
        self._tick_at = 0.0         # when the ticker wakes next by itself
        self._results: dict[int, object] = {}
        self._done_events: dict[int, trio.Event] = {}
        self._next_req = 0
        self._session: _Session | None = None
        self._conn_task = False
        self._io_inflight = 0
        self._io_idle = trio.Event()
        self._closing = False
        self.conf_path: str | None = None   # for handlers' DRBD_CONF
        self._tls: tls.Contexts | None = None   # net { tls yes; }: loaded at connect
        self._tls_warned: set[str] = set()
        # max-buffers: data writes on their way to the local disk (the
        # peer's, as DRBD counts them, and this node's own)
        self._write_bytes = 0
        self._write_room = trio.Event()
        # In-process hooks replfsd sets: the cluster stack's fence-peer
        # decision for a resource mounted on both nodes, and what stops the
        # mounts when after-sb call-pri-lost-after-sb discards this Primary.
        self.fence_peer_hook = None
        self.pri_lost_hook = None
        # Called with the new size after an online grow (the device file
        # tells the kernel its size changed).
        self.resize_hooks: list = []

    # ------------------------------------------------------------ the engine's state
    @property
    def conf(self) -> ResourceConf:
        return self._conf

    @conf.setter
    def conf(self, new: ResourceConf) -> None:
        """A changed config (adjust) applies to the engine at once; new
        network options take effect at the next connect."""
        self._conf = new
        self.engine.cfg = EngineConfig.from_conf(new, self.node)

    role = property(lambda self: self.engine.role)
    peer_role = property(lambda self: self.engine.peer_role)
    cstate = property(lambda self: self.engine.cstate)
    dstate = property(lambda self: self.engine.dstate)
    pdsk = property(lambda self: self.engine.pdsk)
    want_connect = property(lambda self: self.engine.want_connect)
    split_brain = property(lambda self: self.engine.split_brain)
    fence_lost = property(lambda self: self.engine.fence_lost)
    io_suspended = property(lambda self: self.engine.susp)
    concurrent_writes = property(lambda self: self.engine.concurrent_writes)
    fencing = property(lambda self: self.engine.fencing)
    # /proc/drbd counters (bytes or counts), kept by the engine
    ns = property(lambda self: self.engine.ns)
    nr = property(lambda self: self.engine.nr)
    dw = property(lambda self: self.engine.dw)
    dr = property(lambda self: self.engine.dr)
    lo = property(lambda self: self.engine.lo)
    ap = property(lambda self: self.engine.ap)
    ua = property(lambda self: self.engine.ua)

    @property
    def last_event(self) -> str:
        return self.engine.last_event

    @last_event.setter
    def last_event(self, text: str) -> None:
        self.engine.last_event = text

    @property
    def size(self) -> int:
        return self.engine.size

    @property
    def fencing_configured(self) -> str | None:
        return self.conf.disk.get("fencing") or self.conf.net.get("fencing")

    @property
    def _chan(self) -> _Channel | None:
        s = self._session
        return s.chan if s is not None and self.engine.live else None

    def _opens(kind: str):
        def get(self) -> int:
            return self.engine.opens[kind]

        def put(self, value: int) -> None:
            delta = value - self.engine.opens[kind]
            for _ in range(abs(delta)):
                self._call(self.engine.opened if delta > 0 else self.engine.closed, kind)
        return property(get, put)

    open_count = _opens("any")
    shared_opens = _opens("shared")
    single_node_opens = _opens("single")
    del _opens

    async def wait_state_change(self) -> None:
        await self._state_changed.wait()

    # ------------------------------------------------------------ feeding the engine
    def _call(self, method, *args, **kw):
        """Call an engine event with the clock up to date; carry out what
        it returns."""
        eng = self.engine
        eng.now = max(eng.now, time.monotonic())
        out = method(*args, **kw)
        if method == eng.connected:
            session, out = out
            self._feed(out)
            return session
        self._feed(out)
        return None

    def _feed(self, actions: list) -> None:
        if self._closing:
            return      # shutting down: nothing more is done for the engine
        nursery = self._nursery
        todo = collections.deque(actions)
        while todo:
            a = todo.popleft()
            t = type(a)
            if t is A.DiskWrite or t is A.DiskRead:
                s = self._session
                if s is not None and s.out:
                    s.push()        # (the packets before it go out first)
                # Small disk I/O is done here and now (a pwrite or pread of
                # up to 64 KiB into the page cache costs microseconds; a
                # task per request costs more than the I/O), its completion
                # fed back at once; what the engine asks next joins the end
                # of the queue, after the rest of this batch, in order.
                result = self._disk_io_now(a)
                if result is not None:
                    eng = self.engine
                    eng.now = max(eng.now, time.monotonic())
                    todo.extend(eng.done(a.token, result))
                    continue
            if t is A.Send:
                s = self._session
                if s is not None and s.number == a.session:
                    s.put(a.pkt)
            elif t is A.Log:
                log.log(_LOG_LEVELS.get(a.level, logging.INFO), "%s", a.text)
            elif t in (A.Complete, A.OpDone):
                key = a.req if t is A.Complete else a.op
                self._results[key] = a
                ev = self._done_events.pop(key, None)
                if ev is not None:
                    ev.set()
            elif t is A.CloseConnection:
                s = self._session
                if s is not None and s.number == a.session:
                    # What was sent before the close goes out first (the
                    # peer must see our Params, or the Goodbye), then the
                    # sender ends the session -- within a second.
                    s.closed_by_engine = True
                    s.push()
                    s.closed = True
                    s.wake.set()
                    s.scope.deadline = min(s.scope.deadline, trio.current_time() + 1)
            elif t is A.PriLost:
                if self.pri_lost_hook is not None:
                    try:
                        self.pri_lost_hook(a.why)
                    except Exception:
                        log.exception("%s: stopping the mounts failed", self.conf.name)
            elif nursery is None:
                # (the engine acts only through a running resource)
                log.error("%s: engine action %r before the resource runs", self.conf.name, a)
            elif t is A.DiskWrite:
                self._io_begin()
                self._write_bytes += len(a.data)
                nursery.start_soon(self._disk_io, self.disk, a.token, "write", a.offset, a.data)
            elif t is A.DiskRead:
                self._io_begin()
                nursery.start_soon(self._disk_io, self.disk, a.token, "read", a.offset,
                                   a.length)
            elif t is A.DiskFlush:
                self._io_begin()
                disk = self.disk
                soon = getattr(disk.data, "flush_soon", None) if disk is not None else None
                if soon is not None:
                    # no task: the device's flush thread calls back
                    soon(functools.partial(self._flushed, a.token))
                else:
                    nursery.start_soon(self._disk_io, disk, a.token, "flush", 0, 0)
            elif t is A.PersistMeta:
                self._io_begin()
                nursery.start_soon(self._persist, self.disk, a)
            elif t is A.RunHandler:
                nursery.start_soon(self._run_handler, a)
            elif t is A.ProbeDisk:
                nursery.start_soon(self._probe_disk, a.token)
            elif t is A.GrowMeta:
                self._io_begin()
                nursery.start_soon(self._grow, self.disk, a)
            elif t is A.ReleaseDisk:
                disk, self.disk = self.disk, None
                if disk is not None:
                    nursery.start_soon(self._release, disk)
            else:
                log.error("%s: unknown engine action %r", self.conf.name, a)
        s = self._session
        if s is not None and s.out:
            s.push()
        self._state_changed.set()
        self._state_changed = trio.Event()
        if self.state_hook is not None:
            self.state_hook(self)
        if self.engine.deadline < self._tick_at:
            # (woken only when the engine wants it sooner than it sleeps
            # for: a wake-up per engine call is a task switch per packet)
            self._tick_wake.set()

    def _disk_io_now(self, a) -> object | None:
        """A small DiskWrite or DiskRead done at once: its result (0, the
        bytes read, or an errno), or None to do it in a task instead."""
        disk = self.disk
        if disk is None or self._nursery is None:
            return None
        dev = disk.data
        # (the device says how much it does at once: INLINE_MAX bytes; 0
        # sends everything the task way, as a dead process's disk does)
        limit = min(_INLINE_IO, dev.INLINE_MAX)
        try:
            if type(a) is A.DiskWrite:
                if len(a.data) > limit:
                    return None
                dev.write_now(a.offset, a.data)
                return 0
            if a.length > limit:
                return None
            return dev.read_now(a.offset, a.length)
        except OSError as e:
            return e.errno or errno.EIO

    def _flushed(self, token: int, err: int) -> None:
        """A DiskFlush's end (called back by the device, in trio's thread,
        outside any task): must not raise."""
        try:
            self._io_end()
            self._call(self.engine.done, token, err)
        except Exception as e:
            # a bug: fail the resource with it, as in any of its tasks
            # (logged and dropped, the rest of the batch would be lost)
            if self._nursery is None:
                log.exception("%s: completing a disk flush failed", self.conf.name)
            else:
                self._nursery.start_soon(_reraise, e)

    def _io_begin(self) -> None:
        self._io_inflight += 1

    def _io_end(self) -> None:
        self._io_inflight -= 1
        if not self._io_inflight:
            self._io_idle.set()
            self._io_idle = trio.Event()

    async def _disk_io(self, disk: LocalDisk | None, token: int, kind: str, offset: int,
                       arg) -> None:
        try:
            if disk is None:
                result: object = errno.EIO
            elif kind == "write":
                await disk.data.write(offset, arg)
                result = 0
            elif kind == "read":
                result = await disk.data.read(offset, arg)
            else:
                await disk.data.flush()
                result = 0
        except OSError as e:
            result = e.errno or errno.EIO
        finally:
            self._io_end()
            if kind == "write":
                self._write_bytes -= len(arg)
                if self._write_bytes <= self._buffer_limit:
                    self._write_room.set()
        self._call(self.engine.done, token, result)

    async def _persist(self, disk: LocalDisk | None, a: A.PersistMeta) -> None:
        try:
            if disk is None:
                result = errno.EIO
            else:
                await disk.persist(a.bitmap_pages, a.al_extents, a.superblock)
                result = 0
        except OSError as e:
            result = e.errno or errno.EIO
        finally:
            self._io_end()
        self._call(self.engine.done, a.token, result)

    async def _probe_disk(self, token: int) -> None:
        """The backing disk's size now (the data disk's, with external
        meta-data): an admin may have grown it."""
        try:
            fd = os.open(self.me.disk, os.O_RDONLY | os.O_CLOEXEC)
            try:
                result = os.lseek(fd, 0, os.SEEK_END)
            finally:
                os.close(fd)
            disk = self.disk
            if result > 0 and disk is not None and not disk.layout.internal:
                # External meta-data: the bitmap grows in place, up to the
                # end of the meta-data file (the 128 MiB slot's own limit
                # is the engine's: meta/format.max_grown_size).
                fd = os.open(disk.md_path, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    room = os.lseek(fd, 0, os.SEEK_END) - disk.layout.bm_offset
                finally:
                    os.close(fd)
                cap = max(0, room - room % 4096) * 8 * 4096
                if result > cap:
                    log.warning("%s: the meta-data file %s holds the bitmap of %d bytes "
                                "of data; the data disk has %d", self.conf.name,
                                disk.md_path, cap, result)
                    result = max(cap, disk.layout.data_size)
        except OSError as e:
            result = -(e.errno or errno.EIO)
        await trio.lowlevel.checkpoint()
        self._call(self.engine.done, token, result)

    async def _grow(self, disk: LocalDisk | None, a: A.GrowMeta) -> None:
        try:
            if disk is None:
                result = errno.EIO
            else:
                await disk.grow(a.layout, a.bitmap, a.al_extents, a.superblock)
                result = 0
        except (OSError, BlockDeviceError) as e:
            log.error("%s: moving the meta-data for resize failed: %s", self.conf.name, e)
            result = getattr(e, "errno", None) or errno.EIO
        finally:
            self._io_end()
        self._call(self.engine.done, a.token, result)
        if not result:
            for hook in list(self.resize_hooks):
                try:
                    hook(self.size)
                except Exception:
                    log.exception("%s: a resize hook failed", self.conf.name)

    async def _run_handler(self, a: A.RunHandler) -> None:
        try:
            code = await self.handler(a.name)
        except Exception:
            log.exception("%s: handler %s failed", self.conf.name, a.name)
            code = None
        self._call(self.engine.done, a.token, code)

    async def _release(self, disk: LocalDisk) -> None:
        while self._io_inflight:
            await self._io_idle.wait()
        try:
            await disk.close()
        except OSError:
            pass

    async def _request(self, method, *args, **kw):
        """Run an engine request (application I/O or admin); its result."""
        self._next_req += 1
        key = self._next_req
        ev = trio.Event()
        self._done_events[key] = ev
        self._call(method, key, *args, **kw)
        try:
            if key not in self._results:
                await ev.wait()
        finally:
            self._done_events.pop(key, None)
        return self._results.pop(key)

    async def _op(self, method, *args, **kw) -> None:
        done = await self._request(method, *args, **kw)
        if done.error is not None:
            raise done.error

    # ------------------------------------------------------------ plumbing
    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._ticker)
            task_status.started()
            try:
                await trio.sleep_forever()
            finally:
                with trio.CancelScope(shield=True):
                    await self._shutdown()

    async def _ticker(self) -> None:
        while True:
            now = time.monotonic()
            self._tick_at = min(self.engine.deadline, now + 1.0)
            with trio.move_on_after(max(0.0, self._tick_at - now)):
                await self._tick_wake.wait()
            self._tick_wake = trio.Event()
            self._tick_at = 0.0     # (running: any change wakes it again)
            if time.monotonic() >= self.engine.deadline:
                self._call(self.engine.tick, time.monotonic())

    # ------------------------------------------------------------ disk
    async def attach(self) -> None:
        if self.disk is not None:
            return
        disk = LocalDisk(self.me, self.conf.al_extents)
        try:
            await disk.load(mark_al=False)
        except BaseException:
            await disk.close()
            raise
        self.disk = disk
        try:
            await self._op(self.engine.attach, disk.sb, disk.bitmap, disk.al_extents_on_disk)
        except BaseException:
            if self.disk is disk:
                self.disk = None
                await disk.close()
            raise
        disk.engine_disk = self.engine.disk

    async def detach(self) -> None:
        await self._op(self.engine.detach)

    # ------------------------------------------------------------ roles
    async def primary(self, *, force: bool = False) -> None:
        await self._op(self.engine.primary, force)

    async def secondary(self) -> None:
        await self._op(self.engine.secondary)

    async def outdate(self) -> None:
        await self._op(self.engine.outdate)

    async def new_current_uuid(self) -> None:
        await self._op(self.engine.new_current_uuid)

    async def invalidate(self) -> None:
        await self._op(self.engine.invalidate)

    async def invalidate_remote(self) -> None:
        await self._op(self.engine.invalidate_remote)

    async def verify(self) -> None:
        await self._op(self.engine.verify)

    async def resize(self, *, assume_clean: bool = False, size: int = 0) -> None:
        """Online grow to what both backing disks allow (at most ``size``)."""
        await self._op(self.engine.resize, assume_clean=assume_clean, limit=size)

    def resume_io(self) -> None:
        self._call(self.engine.resume_io)

    async def pause_sync(self) -> None:
        await self._op(self.engine.pause_sync)

    async def resume_sync(self) -> None:
        await self._op(self.engine.resume_sync)

    def open_single_node(self) -> None:
        """Register an open by a filesystem that relies on being the only
        node with the volume mounted: refused while the peer is Primary or
        was just allowed to become it."""
        self.engine.now = max(self.engine.now, time.monotonic())
        self.engine.check_single_open()
        self.single_node_opens += 1

    def close_single_node(self) -> None:
        self.single_node_opens = max(0, self.single_node_opens - 1)

    async def down(self) -> None:
        if self.role is Role.Primary:
            await self.secondary()
        await self.disconnect()
        await self.detach()

    # ------------------------------------------------------------ application I/O
    def _require_io(self, write: bool) -> LocalDisk | None:
        """Raise BlockDeviceError unless application I/O may start (open)."""
        try:
            self.engine._require_io()
        except IOFailure as e:
            raise BlockDeviceError(e.errno, str(e)) from None
        return self.disk

    async def _io(self, method, *args):
        done = await self._request(method, *args)
        if done.error:
            raise BlockDeviceError(done.error, done.text or os.strerror(done.error))
        return done.data

    async def read(self, offset: int, length: int) -> bytes:
        t0 = time.perf_counter()
        try:
            return await self._read(offset, length)
        finally:
            self.latency.observe("read", time.perf_counter() - t0)

    async def _read(self, offset: int, length: int) -> bytes:
        eng, disk = self.engine, self.disk
        if disk is not None and eng.local_read_ok(offset, length):
            # The fast path: straight from the UpToDate backing file.  An
            # error goes the engine's way (detach, the peer's copy).
            self._io_begin()
            try:
                data = await disk.data.read(offset, length)
            except OSError:
                data = None
            finally:
                self._io_end()
            if data is not None:
                eng.local_read_done(len(data))
                return data
        return await self._io(self.engine.read, offset, length)

    @property
    def _buffer_limit(self) -> int:
        """Bytes of data that may wait for the socket, and separately for
        the local disk: max-buffers pages of 4 KiB (DRBD's default 2048:
        8 MiB), or sndbuf-size if that is larger."""
        return max(self.conf.max_buffers * 4096, self.conf.sndbuf_size_bytes)

    async def _send_room(self) -> None:
        """Wait while the connection's send queue is over the limit (a slow
        or stalled peer blocks the writers, as a full socket buffer blocks
        DRBD's; on-congestion pull-ahead goes Ahead before that)."""
        while True:
            s = self._session
            if s is None or s.queued <= self._buffer_limit:
                return
            if s.room.is_set():
                s.room = trio.Event()
            await s.room.wait()

    # PREFLUSH/FUA writes are one engine request (see replfs.blockdev)
    write_flags = True

    async def write(self, offset: int, data: bytes, flags: int = 0) -> None:
        t0 = time.perf_counter()
        try:
            await self._send_room()
            await self._io(self.engine.write, offset, frozen(data), flags)
        finally:
            self.latency.observe("write", time.perf_counter() - t0)

    async def flush(self) -> None:
        t0 = time.perf_counter()
        try:
            await self._io(self.engine.flush)
        finally:
            self.latency.observe("flush", time.perf_counter() - t0)

    async def discard(self, offset: int, length: int) -> None:
        # Zeroes travel like a write; simple and keeps both copies equal.
        if offset < 0 or length < 0 or offset + length > self.size:
            raise BlockDeviceError(errno.EINVAL if offset < 0 or length < 0 else errno.ENOSPC,
                                   f"discard outside the device ({offset}+{length})")
        step = 1024 * 1024
        pos = offset
        while pos < offset + length:
            n = min(step, offset + length - pos)
            await self.write(pos, bytes(n))
            pos += n

    # ------------------------------------------------------------ connection
    def connect(self, *, discard_my_data: bool = False) -> None:
        self._load_tls()
        self._call(self.engine.connect, None, discard_my_data=discard_my_data)
        if not self._conn_task and self._nursery is not None:
            self._conn_task = True
            self._nursery.start_soon(self._connection_loop)

    def _load_tls(self) -> None:
        """net { tls yes; }: this node's certificate, key and keyring, read
        at connect (a missing file fails it: ReplfsError) and afresh for
        each connection attempt (``_tls_now``: replaced files apply without
        a restart)."""
        try:
            self._tls_now()
        except tls.TLSError as e:
            raise ReplfsError(f"{self.conf.name}: {e}", EXIT_CONFIG) from None

    def _tls_now(self) -> None:
        if not self.conf.tls:
            self._tls = None
            return
        self._tls = tls.load(tls.resource_files(self.conf.net, self.node, self.conf_path))
        for warning in self._tls.warnings:
            if warning not in self._tls_warned:
                self._tls_warned.add(warning)
                log.warning("%s: %s", self.conf.name, warning)

    async def disconnect(self) -> None:
        await self._op(self.engine.disconnect)
        while self._conn_task:
            await self._state_changed.wait()

    async def _connection_loop(self) -> None:
        name = self.conf.name
        try:
            while self.engine.want_connect:
                try:
                    listeners = await trio.open_tcp_listeners(self.me.port,
                                                              host=self.me.address)
                except OSError as e:
                    log.error("%s: cannot listen on %s:%d: %s", name, self.me.address,
                              self.me.port, e)
                    self.last_event = (f"cannot listen on {self.me.address}:{self.me.port}: "
                                       f"{e.strerror}")
                    self._call(self.engine.disconnect)
                    return
                try:
                    while self.engine.want_connect:
                        while self.engine.want_connect and not self.engine.can_connect:
                            await self._state_changed.wait()
                        if not self.engine.want_connect:
                            break
                        self._call(self.engine.connecting)
                        chan = await self._establish(listeners)
                        if chan is None:
                            break
                        if not self.engine.can_connect:
                            await chan.aclose()
                            continue
                        await self._run_session(chan)
                        # (a pause before the next try -- cut short when the
                        # admin disconnects, so 'down' does not wait for it)
                        with trio.move_on_after(min(self.conf.connect_int_s, 1.0)):
                            while self.engine.want_connect:
                                await self._state_changed.wait()
                finally:
                    with trio.CancelScope(shield=True):
                        for lst in listeners:
                            await lst.aclose()
        finally:
            self._conn_task = False
            self._state_changed.set()
            self._state_changed = trio.Event()

    async def _establish(self, listeners) -> _Channel | None:
        """Accept or connect until one peer authenticates (None: stop).

        Each accepted connection is authenticated in its own task under a
        time limit, so a silent stranger cannot hold up the real peer and
        junk connections are closed, not left in the backlog.  The first to
        authenticate wins; any other is closed.  A peer that fails the
        shared-secret check stops the resource connecting (StandAlone), as
        DRBD does.
        """
        won: list[_Channel] = []
        fatal: list[str] = []
        i_connect = self.node < self.peer.name
        async with trio.open_nursery() as n:
            async def attempt(stream, server_side: bool) -> bool:
                chan = _Channel(stream)
                chan.buffers(self.conf.sndbuf_size_bytes, self.conf.rcvbuf_size_bytes)
                ok = False
                try:
                    with trio.move_on_after(max(self.conf.timeout_s, 5)) as scope:
                        if self.conf.tls:
                            self._tls_now()     # (replaced files apply at the next try)
                            await chan.secure(self._tls, server_side=server_side,
                                              peer=self.peer.name)
                        await self._hello(chan)
                    if scope.cancelled_caught:
                        raise Drop(f"handshake with {chan.remote} timed out")
                    if not won:
                        won.append(chan)
                        ok = True
                        n.cancel_scope.cancel()
                except Fatal as e:
                    fatal.append(f"{e} ({chan.remote})")
                    n.cancel_scope.cancel()
                except tls.TLSError as e:
                    # (retried: the admin may fix the files, read at connect)
                    log.error("%s: %s", self.conf.name, e)
                    self.last_event = str(e)
                except (Drop, P.RemoteProtocolError, ValueError, IndexError, KeyError,
                        *_SEND_ERRORS) as e:
                    log.warning("%s: handshake with %s failed: %s", self.conf.name,
                                chan.remote, e)
                    self.last_event = f"handshake with {chan.remote} failed: {e}"
                finally:
                    if not ok:
                        await chan.aclose()
                return ok

            async def accept_loop():
                while True:
                    stream = await listeners[0].accept()
                    n.start_soon(attempt, stream, True)

            async def connect_loop():
                # A refused connection (the peer not listening yet: both
                # nodes brought up together) is tried again soon, then less
                # often: 50 ms, doubling up to connect-int or 0.5 s.
                delay = 0.05
                while True:
                    try:
                        with trio.fail_after(self.conf.connect_int_s + 5):
                            stream = await trio.open_tcp_stream(self.peer.address, self.peer.port)
                    except (OSError, trio.TooSlowError):
                        await trio.sleep(min(delay, self.conf.connect_int_s, 0.5))
                        delay *= 2
                        continue
                    if await attempt(stream, False):
                        return
                    await trio.sleep(min(self.conf.connect_int_s, 1.0))

            async def give_up():
                while self.engine.want_connect:
                    await self._state_changed.wait()
                n.cancel_scope.cancel()

            n.start_soon(accept_loop)
            n.start_soon(give_up)
            if i_connect:
                n.start_soon(connect_loop)
        if fatal and not won:
            log.error("%s: %s", self.conf.name, fatal[0])
            self.last_event = fatal[0]
            self._call(self.engine.disconnect)
            return None
        return won[0] if won else None

    async def _hello(self, chan: _Channel) -> None:
        """Hello and Auth: who the peer is, and that it knows the secret."""
        nonce = secrets.token_bytes(16)
        await chan.send(P.Hello.make(P.PROTOCOL_VERSION, nonce, self.conf.name, self.node))
        hello = await chan.recv()
        if isinstance(hello, P.Refuse):
            raise Drop(f"peer refused the connection: {hello.reason.decode(errors='replace')}")
        if not isinstance(hello, P.Hello):
            raise P.RemoteProtocolError(f"expected Hello, got {type(hello).__name__}")
        res, node = hello.split_names()
        if hello.version != P.PROTOCOL_VERSION:
            await chan.send(P.Refuse(b"incompatible protocol version"))
            raise Drop(f"peer speaks protocol version {hello.version}, we speak "
                        f"{P.PROTOCOL_VERSION}", ConnState.ProtocolError)
        if res != self.conf.name or node != self.peer.name:
            await chan.send(P.Refuse(f"expected resource {self.conf.name} node "
                                     f"{self.node}".encode()))
            raise Drop(f"wrong peer: connection presented resource '{res}' node '{node}', "
                        f"expected resource '{self.conf.name}' node '{self.peer.name}'",
                        ConnState.ProtocolError)
        if bytes(hello.nonce) == nonce:
            # (our own nonce sent back: someone fishing for our answer)
            raise Drop("peer presented our own challenge", ConnState.ProtocolError)
        secret = (self.conf.shared_secret or "").encode()
        await chan.send(P.Auth(handshake.answer(secret, hello.nonce, self.node, self.peer.name,
                                                self.conf.name)))
        auth = await chan.recv()
        if not isinstance(auth, P.Auth):
            raise P.RemoteProtocolError(f"expected Auth, got {type(auth).__name__}")
        if not handshake.verify(secret, nonce, auth.mac, self.node, self.peer.name,
                                self.conf.name):
            raise Fatal("Authentication of peer failed (shared-secret mismatch); "
                         "not retrying: fix the secret, then 'replfsadm connect'")

    async def _run_session(self, chan: _Channel) -> None:
        """One engine session over an authenticated connection."""
        number = self.engine.session + 1
        s = _Session(number, chan)
        self._session = s
        state, why = ConnState.NetworkFailure, "connection lost"
        try:
            with s.scope:
                async with trio.open_nursery() as n:
                    n.start_soon(self._sender, s)
                    got = self._call(self.engine.connected)
                    assert got == number, (got, number)
                    try:
                        while True:
                            # max-buffers: while the local disk has that much
                            # to write, stop reading (TCP pushes back on the peer)
                            while self._write_bytes > self._buffer_limit:
                                if self._write_room.is_set():
                                    self._write_room = trio.Event()
                                await self._write_room.wait()
                            pkt = await chan.recv()
                            self._call(self.engine.receive, number, pkt)
                    except Drop as e:
                        state, why = e.state, str(e)
                    except P.RemoteProtocolError as e:
                        state, why = ConnState.ProtocolError, f"protocol error from peer: {e}"
                    except _SEND_ERRORS as e:
                        state, why = ConnState.NetworkFailure, f"connection lost: {e}"
                    n.cancel_scope.cancel()
        finally:
            s.close()
            s.backlog.clear()
            s.queued = 0
            s.room.set()            # (writers waiting for room go on without the peer)
            with trio.CancelScope(shield=True):
                await chan.aclose()
            if not s.closed_by_engine:
                self._call(self.engine.connection_lost, number, state, why)
            if self._session is s:
                self._session = None

    async def _sender(self, s: _Session) -> None:
        """Send the backlog (see _Session), oldest first; an entry leaves
        it only once sent, so nothing overtakes it meanwhile."""
        try:
            while True:
                if s.backlog:
                    bufs, n = s.backlog[0]
                    await s.chan.send_buffers(bufs)
                    s.backlog.popleft()
                    if n:
                        s.queued -= n
                        if s.queued <= self._buffer_limit:
                            s.room.set()
                elif s.closed:
                    break
                else:
                    s.wake = trio.Event()
                    await s.wake.wait()
            s.scope.cancel()        # closed by the engine, and all sent
        except _SEND_ERRORS as e:
            if not s.closed_by_engine:
                self._call(self.engine.connection_lost, s.number, ConnState.NetworkFailure,
                           f"connection lost: {e}")
            s.scope.cancel()

    # ------------------------------------------------------------ handlers
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

    # ------------------------------------------------------------ teardown
    async def _shutdown(self) -> None:
        self._closing = True
        disk, self.disk = self.disk, None
        if disk is not None:
            try:
                eng = disk.engine_disk
                if eng is not None:
                    pages = eng.bitmap.take_dirty_pages()
                    if pages or eng.sb_dirty:
                        await disk.persist(pages, None, eng.sb if eng.sb_dirty else None)
            except OSError:
                pass
            await disk.close()

    # ------------------------------------------------------------ status
    def status(self) -> dict:
        eng = self.engine
        disk = self.disk
        bitmap = eng.disk.bitmap if eng.disk is not None else None
        oos_kib = bitmap.count * 4 if bitmap is not None else 0
        inner = eng.counters()
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
            # the replication link's TLS ("TLSv1.3 <cipher>") when connected
            "tls": self._chan.tls if self._chan is not None else None,
            "tls_configured": self.conf.tls,
            "open_count": self.open_count,
            "single_node_opens": self.single_node_opens,
            "io_suspended": self.io_suspended,
            "concurrent_writes": self.concurrent_writes,
            "fence_lost": self.fence_lost,
            # sync-pause flags (DRBD's user_isp, and the peer's as peer_isp)
            "user_isp": eng.user_isp,
            "peer_isp": eng.peer_isp,
            "counters": {
                "ns": eng.ns // 1024, "nr": eng.nr // 1024, "dw": eng.dw // 1024,
                "dr": eng.dr // 1024, "al": disk.al_writes if disk else 0,
                "bm": disk.bm_writes if disk else 0, "lo": eng.lo,
                "pe": inner["pe"], "ua": eng.ua, "ap": eng.ap, "ep": inner["ep"],
                "wo": "f", "oos": oos_kib,
            },
        }
        if eng.disk is not None:
            st["uuids"] = eng.disk.sb.uuids.show()
            st["out_of_sync_kib"] = oos_kib
        sync = inner["sync"]
        if sync is not None and self.cstate.is_syncing:
            total = sync.total * 4
            paused = sync.paused_time(eng.now)
            elapsed = eng.now - sync.start - paused     # (DRBD leaves paused time out)
            want = None
            if sync.rate is not None:
                want = int(sync.rate.rate() // 1024)     # the controller's current rate
            elif sync.role == "target" and self.conf.c_plan_ahead_s == 0:
                want = self.conf.resync_rate_kib
            st["sync"] = {
                "role": sync.role, "total_kib": total, "left_kib": oos_kib,
                "percent": round(100.0 * (total - oos_kib) / total, 1) if total else 100.0,
                "paused": self.cstate in (ConnState.PausedSyncS, ConnState.PausedSyncT),
                "paused_s": round(paused, 1),
                "csum_blocks": sync.csum_blocks, "equal_blocks": sync.equal_blocks,
                "line": progress_line(total, oos_kib, elapsed, 0.0, want_kib_s=want),
                # KiB/s since the resync began (paused time left out), and
                # the rate the controller aims at (None: no target)
                "rate_kib_s": round((total - oos_kib) / elapsed) if elapsed > 0 else 0,
                "want_kib_s": want,
            }
        v = inner["verify"]
        if v is not None and self.cstate is ConnState.VerifyS:
            st["verify"] = {"done": v.done, "total": v.total, "oos_blocks": v.oos}
            elapsed = eng.now - v.start
            st["verify"]["line"] = progress_line(v.total // 1024, (v.total - v.done) // 1024,
                                                 elapsed, 0.0, verify=True)
        return st

