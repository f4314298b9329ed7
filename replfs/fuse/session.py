"""The trio driver of one FUSE mount: mount, INIT, read loop, replies, notify.

Request model
-------------
One task per mount reads /dev/fuse into one preallocated buffer and drains
it until EAGAIN before it waits again (the batching lever: with requests
queued, no epoll round trip per request).  Each request is then either

* run inline by the reader (the buffer is not reused until it returns), or
* copied out and run by a worker task, for opcodes in the session's
  task set (``DEFAULT_TASK_OPCODES``, or ``Operations.task_opcodes``):
  anything that may wait for I/O or for other callers.  Tasks are capped
  (``max_tasks`` persistent workers, started as needed; with all of them
  busy the reader waits, which is backpressure on the kernel); blocking lock waits (SETLKW) have their own, larger cap,
  because an unlock can only be read while the reader is not stuck behind
  the waiters it would release.

A task runs in a CancelScope registered under its ``unique``; FUSE_INTERRUPT
cancels that scope and the request answers EINTR.  An INTERRUPT for a
request we do not know (already answered, or run inline) is ignored.

Every request except FORGET, BATCH_FORGET and INTERRUPT gets exactly one
reply, through ``dispatch.run_request`` (the error funnel); a request
that ends without one (cancelled at shutdown) is answered EIO.  Debug
mode (``debug=True`` or REPLFS_FUSE_DEBUG=1) raises on a second reply.

Notify messages
---------------
INVAL_INODE/INVAL_ENTRY/DELETE are written by one sender thread per
process (``NotifySender``), never from the trio thread: the kernel may
block such a write on a page lock that a request we have not answered yet
is holding, which would deadlock a single-threaded server.  A notify issued
while a request's handler runs is queued only after that request's reply
is written, so it cannot overtake the reply that created the state.

End of session
--------------
For plain ``fuse`` mounts the kernel never sends DESTROY: read() failing
with ENODEV (unmounted or aborted) is the end.  ``unmount()`` does umount2
(EBUSY -> lazy detach) from a worker thread (umount itself may send
requests this very session must answer), waits for the reader to see
ENODEV, and closes the fd; closing the fd aborts whatever is left.
"""
from __future__ import annotations

import collections
import errno
import logging
import os
import stat
import queue
import threading

import trio

from replfs.metrics import HistogramSet
from . import dispatch, mount as fmount, proto
from .dispatch import CURRENT_REQUEST, Request, run_request
from .errors import FUSEError
from .proto import FuseUsageError, KernelProtocolError, Opcode, UnsupportedKernel

log = logging.getLogger("replfs.fuse")

DEFAULT_TASK_OPCODES = frozenset({
    Opcode.SETLKW, Opcode.SETLK, Opcode.FSYNC, Opcode.FSYNCDIR, Opcode.FLUSH, Opcode.RELEASE,
    Opcode.READ, Opcode.WRITE, Opcode.FALLOCATE, Opcode.COPY_FILE_RANGE, Opcode.CREATE,
    Opcode.OPEN, Opcode.SETATTR, Opcode.UNLINK, Opcode.RMDIR, Opcode.RENAME, Opcode.RENAME2,
    Opcode.MKNOD, Opcode.MKDIR, Opcode.SYMLINK, Opcode.LINK, Opcode.SETXATTR,
    Opcode.REMOVEXATTR, Opcode.LSEEK,
})
ALL_INLINE = frozenset({Opcode.SETLKW})   # for filesystems that never block (tests, bench)
# For filesystems where nearly every handler awaits I/O (replfs volumes):
# every opcode that has a handler runs in a worker.
ALL_TASKS = frozenset(dispatch.HANDLERS)

_NO_REPLY = frozenset({Opcode.FORGET, Opcode.BATCH_FORGET, Opcode.INTERRUPT})
_DRAIN_BURST = 64     # requests handled back to back before other tasks get a turn


# --------------------------------------------------------------------- notify sender

class NotifySender:
    """The one thread per process that writes notify messages to /dev/fuse."""

    _instance: "NotifySender | None" = None
    _instance_lock = threading.Lock()

    @classmethod
    def get(cls) -> "NotifySender":
        with cls._instance_lock:
            if cls._instance is None or not cls._instance._thread.is_alive():
                cls._instance = cls()
            return cls._instance

    def __init__(self):
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="replfs-fuse-notify",
                                        daemon=True)
        self._thread.start()

    def submit(self, session: "Session", message: bytes | None, done=None) -> None:
        """Queue ``message`` for ``session``'s fd; ``done(errno)`` is called
        from the sender thread (0 = delivered).  ``message=None`` is a
        barrier: only ``done`` runs, after everything queued before it."""
        self._queue.put((session, message, done))

    def _run(self) -> None:
        while True:
            session, message, done = self._queue.get()
            result = 0
            if message is not None:
                with session._fd_lock:
                    fd = session._fd
                    if fd is None:
                        result = errno.ENODEV
                    else:
                        try:
                            os.write(fd, message)
                        except OSError as exc:
                            result = exc.errno or errno.EIO
                session._notify_result(result)
            if done is not None:
                try:
                    done(result)
                except Exception:       # a callback must not kill the sender
                    log.exception("notify completion callback failed")


# --------------------------------------------------------------------- session

class Session:
    """One mounted filesystem served by one reader task."""

    _ids = 0

    def __init__(self, ops, mountpoint: str, *, subtype: str = "replfs",
                 fsname: str | None = None, options=(), max_write: int = 1 << 20,
                 max_tasks: int = 64, max_lock_waiters: int = 1024,
                 task_opcodes=None, debug: bool | None = None, name: str | None = None,
                 rootmode: int = stat.S_IFDIR, readahead_kb: int | None = None):
        Session._ids += 1
        self.id = Session._ids
        self.ops = ops
        self.mountpoint = os.path.abspath(mountpoint)
        self.subtype = subtype
        self.fsname = fsname or subtype
        self.options = tuple(options)
        self.rootmode = rootmode      # S_IFREG: a single-file mount (device files)
        # the mount's read-ahead window (None: the kernel's 128 KiB)
        self.readahead_kb = readahead_kb
        self.max_write = max_write
        self.max_tasks = max_tasks
        self.max_lock_waiters = max_lock_waiters
        # open direct_io handles (fh -> opens): their O_DSYNC writes are synced here
        self.direct_handles: collections.Counter = collections.Counter()
        if task_opcodes is None:
            task_opcodes = getattr(ops, "task_opcodes", None)
        self.task_opcodes = frozenset(DEFAULT_TASK_OPCODES if task_opcodes is None
                                      else task_opcodes)
        self.debug = (os.environ.get("REPLFS_FUSE_DEBUG") == "1") if debug is None else debug
        self.name = name or f"fuse[{self.id}:{os.path.basename(self.mountpoint)}]"
        self.negotiated: proto.Negotiated | None = None
        self.connection: int | None = None
        self.mounted = False
        self.destroy_received = False
        self.stats: collections.Counter = collections.Counter()
        self.op_counts: collections.Counter = collections.Counter()
        # the time each request took, by operation (replfsd's metrics)
        self.latency = HistogramSet()
        self.violations: list[str] = []        # exactly-one-reply breaches (tests assert empty)
        self._fd: int | None = None
        self._fd_lock = threading.Lock()        # the notify thread vs close()
        self._pending: dict[int, trio.CancelScope] = {}
        self._inflight: dict[int, Request] = {}
        self._work_send = None                  # hand-off to idle workers (capacity 0)
        self._work_recv = None
        self._workers = 0
        self._lock_waiters = 0
        self._stop = trio.CancelScope()
        self._ended = trio.Event()
        self._started = False
        self._sender = NotifySender.get()
        self._trio_token = None
        self._trace = False

    def __repr__(self) -> str:
        return f"<Session {self.name} at {self.mountpoint}>"

    # ----------------------------------------------------------------- running

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED, fd: int | None = None) -> None:
        """Mount, negotiate, serve until unmounted or aborted.  Use with
        ``await nursery.start(session.run)``: it returns once the mount
        answers requests.  With ``fd`` the session serves a connection
        that is already open (and mounted, or a test's fake kernel) and
        mounts nothing."""
        if self._started:
            raise FuseUsageError("a Session runs once")
        self._started = True
        self._trio_token = trio.lowlevel.current_trio_token()
        own_mount = fd is None
        if fd is None:
            fd = fmount.open_device()
        with self._fd_lock:
            self._fd = fd
        initialized = False
        try:
            if own_mount:
                await trio.to_thread.run_sync(
                    lambda: fmount.mount_fuse(fd, self.mountpoint, subtype=self.subtype,
                                              fsname=self.fsname, options=self.options,
                                              rootmode=self.rootmode))
                self.mounted = True
                self.connection = fmount.connection_id(self.mountpoint)
            await self._handshake()
            if own_mount and self.readahead_kb is not None:
                self.set_readahead(self.readahead_kb)
            self.ops.init(self)
            initialized = True
            self._trace = log.isEnabledFor(logging.DEBUG)
            async with trio.open_nursery() as nursery:
                self._work_send, self._work_recv = trio.open_memory_channel(0)
                task_status.started(self)
                with self._stop:
                    await self._read_loop(nursery)
                # ENODEV or stop(): nothing can be answered any more.
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                if initialized:
                    with trio.move_on_after(10):
                        try:
                            await self.ops.destroy(self)
                        except Exception:
                            log.exception("%s: destroy failed", self.name)
                self._close_fd()
                if self.mounted:
                    await trio.to_thread.run_sync(self._detach_leftover)
                if self._inflight:
                    self.violations.append(f"{len(self._inflight)} requests never answered")
                    log.error("%s: %d requests were never answered", self.name,
                              len(self._inflight))
                self._ended.set()

    def set_readahead(self, kib: int) -> bool:
        """Set the mount's read-ahead window; False (and a warning) if the
        kernel would not take it: the mount works on with what it had."""
        try:
            fmount.set_readahead(self.mountpoint, kib)
        except (OSError, ValueError) as exc:
            log.warning("%s: cannot set read-ahead to %d KiB: %s", self.name, kib, exc)
            return False
        self.readahead_kb = kib
        return True

    async def _handshake(self) -> None:
        buf = bytearray(max(proto.MIN_READ_BUFFER, self.max_write + 4096))
        n = await self._read_one(buf)
        if n is None:
            raise KernelProtocolError("the connection ended before INIT")
        h = proto.decode_header(buf, n)
        if h.opcode != Opcode.INIT:
            raise KernelProtocolError(f"first request is opcode {h.opcode}, not INIT")
        init = proto.decode_args(Opcode.INIT, proto.body_of(memoryview(buf)[:n], h))
        try:
            self.negotiated = proto.negotiate(init, want=type(self.ops).init_flags(),
                                              max_write=self.max_write,
                                              max_background=min(self.max_tasks, 0xFFFF))
        except UnsupportedKernel as exc:
            self._write([proto.out_header(h.unique, errno.EPROTO, 0)])
            log.error("%s: %s", self.name, exc)
            raise
        self._write([proto.out_header(h.unique, 0, proto.INIT_OUT.size),
                     proto.init_out(self.negotiated)])
        n = self.negotiated
        log.info("%s: INIT kernel 7.%d flags=%#x -> 7.%d %s max_write=%d", self.name,
                 n.kernel_minor, n.kernel_flags, n.minor, proto.flag_names(n.flags), n.max_write)

    async def _read_one(self, buf) -> int | None:
        """Read one request; None when the session is over (ENODEV)."""
        fd = self._fd
        while True:
            try:
                n = os.readv(fd, [buf])
                return n or None        # 0: a test transport was closed
            except BlockingIOError:
                await trio.lowlevel.wait_readable(fd)
            except InterruptedError:
                continue
            except OSError as exc:
                if exc.errno == errno.ENOENT:
                    # The request was interrupted/aborted before we read it.
                    continue
                if exc.errno == errno.ENODEV:
                    return None
                raise

    async def _read_loop(self, nursery) -> None:
        bufsize = max(proto.MIN_READ_BUFFER, self.negotiated.max_write + 4096)
        buf = bytearray(bufsize)
        view = memoryview(buf)
        fd = self._fd
        burst = 0
        while True:
            try:
                n = os.readv(fd, [buf])
            except BlockingIOError:
                burst = 0
                await trio.lowlevel.wait_readable(fd)
                continue
            except InterruptedError:
                continue
            except OSError as exc:
                if exc.errno == errno.ENOENT:
                    continue
                if exc.errno == errno.ENODEV:
                    log.debug("%s: connection ended (ENODEV)", self.name)
                    return
                raise
            if n == 0:
                return          # /dev/fuse never reads 0; a test transport closed
            await self._dispatch(view[:n], n, nursery)
            burst += 1
            if burst >= _DRAIN_BURST:
                burst = 0
                await trio.lowlevel.checkpoint()

    async def _dispatch(self, view, n: int, nursery) -> None:
        try:
            h = proto.decode_header(view, n)
        except KernelProtocolError as exc:
            # Without a trustworthy header there is nobody to answer.
            self.stats["malformed"] += 1
            log.error("%s: dropping malformed request: %s", self.name, exc)
            if len(view) >= proto.IN_HEADER.size:
                unique = proto.IN_HEADER.unpack_from(view)[2]
                self._write([proto.out_header(unique, errno.EIO, 0)])
            return
        op = h.opcode
        self.op_counts[op] += 1
        if self._trace:
            log.debug("%s <- %s unique=%d nodeid=%d pid=%d len=%d", self.name,
                      dispatch._opname(op), h.unique, h.nodeid, h.pid, h.length)
        if op == Opcode.INTERRUPT:
            self._interrupt(view, h)
            return
        if op == Opcode.FORGET or op == Opcode.BATCH_FORGET:
            await self._forget(view, h)
            return
        is_task = op in self.task_opcodes
        try:
            body = proto.body_of(view, h)
            if is_task:
                body = bytes(body)      # the buffer is reused for the next request
            args = proto.decode_args(op, body)
        except KernelProtocolError as exc:
            self.stats["malformed"] += 1
            log.error("%s: malformed %s: %s", self.name, dispatch._opname(op), exc)
            req = Request(h, None, self)
            self._inflight[h.unique] = req
            self.reply_error(req, errno.EIO)
            return
        req = Request(h, args, self)
        self._inflight[h.unique] = req
        if op == Opcode.INIT:
            self.reply_error(req, errno.EPROTO)     # a second INIT is a kernel bug
            return
        if not is_task:
            await run_request(self, req)
            return
        scope = trio.CancelScope()
        self._pending[h.unique] = scope
        if op == Opcode.SETLKW:
            if self._lock_waiters >= self.max_lock_waiters:
                del self._pending[h.unique]
                self.reply_error(req, errno.ENOLCK)
                return
            self._lock_waiters += 1
            nursery.start_soon(self._task, req, scope, False)
            return
        item = (req, scope)
        try:
            # An idle worker takes it at once (no checkpoint, so the reader
            # keeps draining); otherwise grow the pool up to max_tasks, and
            # beyond that wait for a free worker (backpressure).
            self._work_send.send_nowait(item)
        except trio.WouldBlock:
            if self._workers < self.max_tasks:
                self._workers += 1
                nursery.start_soon(self._worker, item)
            else:
                await self._work_send.send(item)

    async def _worker(self, item) -> None:
        # A persistent worker: starting a trio task per request costs more
        # than the request itself (~30 µs), handing one to a waiting worker
        # does not.
        while True:
            req, scope = item
            await self._task(req, scope, True)
            item = None
            item = await self._work_recv.receive()

    async def _task(self, req: Request, scope: trio.CancelScope, pooled: bool) -> None:
        try:
            with scope:
                await run_request(self, req)
        finally:
            self._pending.pop(req.unique, None)
            if not pooled:
                self._lock_waiters -= 1
            if not req.replied:
                if scope.cancelled_caught:
                    self.stats["interrupted"] += 1
                    self.reply_error(req, errno.EINTR)
                else:
                    self.reply_error(req, errno.EIO)

    def _interrupt(self, view, h: proto.InHeader) -> None:
        try:
            target = proto.decode_args(Opcode.INTERRUPT, proto.body_of(view, h)).unique
        except KernelProtocolError as exc:
            log.error("%s: malformed INTERRUPT: %s", self.name, exc)
            return
        scope = self._pending.get(target)
        if scope is None:
            self.stats["interrupt_unknown"] += 1
            return
        self.stats["interrupt"] += 1
        log.debug("%s: INTERRUPT of %d", self.name, target)
        scope.cancel()

    async def _forget(self, view, h: proto.InHeader) -> None:
        try:
            args = proto.decode_args(h.opcode, proto.body_of(view, h))
        except KernelProtocolError as exc:
            log.error("%s: malformed forget: %s", self.name, exc)
            return
        items = [(h.nodeid, args.nlookup)] if h.opcode == Opcode.FORGET else list(args.items)
        try:
            await self.ops.forget(items)
        except Exception:
            # forget has no reply: a failure can only be logged.
            self.stats["handler_errors"] += 1
            log.exception("%s: forget failed", self.name)

    # ----------------------------------------------------------------- replies

    def _write(self, parts) -> int:
        """Write one message; 0 or the errno of a failed write."""
        try:
            os.writev(self._fd, parts)
            return 0
        except OSError as exc:
            return exc.errno or errno.EIO

    def _claim(self, req: Request) -> bool:
        if req.replied:
            msg = (f"second reply to {dispatch._opname(req.opcode)} (unique {req.unique})")
            self.violations.append(msg)
            log.error("%s: %s", self.name, msg)
            if self.debug:
                raise AssertionError(msg)
            return False
        req.replied = True
        self._inflight.pop(req.unique, None)
        return True

    def reply_ok(self, req: Request, payload) -> bool:
        """Send a success reply; False if the kernel did not take it."""
        if not self._claim(req):
            return False
        payload = b"" if payload is None else payload
        code = self._write([proto.out_header(req.unique, 0, len(payload)), payload])
        if code == errno.EINVAL:
            # Our reply was malformed (bad size for this opcode): fail the
            # request instead, so the caller does not hang.
            self.stats["bad_replies"] += 1
            log.error("%s: kernel refused our reply to %s (unique %d, %d bytes); answering EIO",
                      self.name, dispatch._opname(req.opcode), req.unique, len(payload))
            code = self._write([proto.out_header(req.unique, errno.EIO, 0)])
            self._after_reply(req, code)
            return False
        self._after_reply(req, code)
        return code == 0

    def reply_error(self, req: Request, code: int) -> None:
        if not self._claim(req):
            return
        if self._trace:
            log.debug("%s -> %s unique=%d: %s", self.name, dispatch._opname(req.opcode),
                      req.unique, errno.errorcode.get(code, code))
        self.stats["error_replies"] += 1
        self._after_reply(req, self._write([proto.out_header(req.unique, code, 0)]))

    def _after_reply(self, req: Request, code: int) -> None:
        if code == errno.ENOENT:
            self.stats["reply_lost"] += 1      # the caller was interrupted or killed
        elif code == errno.ENODEV:
            self.stats["reply_after_end"] += 1
        elif code:
            self.stats["reply_failed"] += 1
            log.warning("%s: reply to unique %d failed: %s", self.name, req.unique,
                        os.strerror(code))
        if req.notifies:
            for session, msg in req.notifies:
                self._sender.submit(session, msg)
            req.notifies = None

    # ----------------------------------------------------------------- notify

    def _notify(self, message: bytes) -> None:
        req = CURRENT_REQUEST.get()
        if req is not None and not req.replied:
            if req.notifies is None:
                req.notifies = []
            req.notifies.append((self, message))
            return
        self._sender.submit(self, message)

    def invalidate_inode(self, inode: int, offset: int = 0, length: int = 0) -> None:
        """Drop the kernel's cached attributes of ``inode`` and (offset >= 0)
        its cached pages from offset for length bytes (0: to the end).
        Returns at once; ENOENT (inode not cached) is normal."""
        self._notify(proto.notify_inval_inode(inode, offset, length))

    async def invalidate_inode_wait(self, inode: int, timeout: float) -> bool:
        """Drop the kernel's cached attributes and pages of ``inode`` and
        wait (at most ``timeout`` s) until the kernel has done it.  Sent at
        once, even from within a request (a cluster lock's hand-over must
        not wait for a reply).  True if it finished in time.  The kernel
        may write dirty mmap pages back first (WRITE requests): a caller
        that makes such writes wait must not wait here without a bound."""
        done = trio.Event()
        token = trio.lowlevel.current_trio_token()

        def finished(_result):
            try:
                token.run_sync_soon(done.set)
            except trio.RunFinishedError:
                pass
        self._sender.submit(self, proto.notify_inval_inode(inode, 0, 0), finished)
        with trio.move_on_after(timeout):
            await done.wait()
            return True
        self.stats["notify_slow"] += 1
        return False

    def invalidate_entry(self, parent: int, name: bytes) -> None:
        """Drop the cached dentry ``name`` in ``parent``."""
        self._notify(proto.notify_inval_entry(parent, bytes(name)))

    def notify_delete(self, parent: int, child: int, name: bytes) -> None:
        """``name`` in ``parent`` (inode ``child``) is gone: drop the dentry
        and, if it is a directory's mountpoint-free entry, detach it."""
        self._notify(proto.notify_delete(parent, child, bytes(name)))

    async def notify_barrier(self) -> None:
        """Wait until every notify queued so far has been written (tests)."""
        done = trio.Event()
        token = self._trio_token or trio.lowlevel.current_trio_token()
        self._sender.submit(self, None, lambda _r: token.run_sync_soon(done.set))
        await done.wait()

    def _notify_result(self, code: int) -> None:
        # Called from the sender thread: Counter updates are GIL-atomic enough
        # for statistics.
        if code == 0:
            self.stats["notify_ok"] += 1
        elif code == errno.ENOENT:
            self.stats["notify_not_cached"] += 1
        else:
            self.stats["notify_failed"] += 1

    # ----------------------------------------------------------------- ending

    async def unmount(self, *, grace: float = 5.0) -> str | None:
        """umount (EBUSY -> lazy), wait for the reader to see ENODEV, and
        close the fd.  After ``grace`` seconds (a lazy detach with files
        still open) the connection is closed anyway."""
        how = None
        if self.mounted:
            try:
                how = await trio.to_thread.run_sync(fmount.unmount, self.mountpoint)
                self.mounted = False
            except OSError as exc:
                if exc.errno not in (errno.EINVAL, errno.ENOENT):
                    raise
                self.mounted = False      # already unmounted from outside
        with trio.move_on_after(grace):
            await self._ended.wait()
        if not self._ended.is_set():
            log.warning("%s: still busy %.0f s after unmount; closing the connection",
                        self.name, grace)
            self.stop()
            await self._ended.wait()
        return how

    def stop(self) -> None:
        """End the session now: the reader stops; ``run`` closes the fd,
        which aborts the connection (callers get ENOTCONN)."""
        self._stop.cancel()

    async def wait_ended(self) -> None:
        await self._ended.wait()

    @property
    def ended(self) -> bool:
        return self._ended.is_set()

    def _close_fd(self) -> None:
        with self._fd_lock:
            fd, self._fd = self._fd, None
        if fd is not None:
            try:
                trio.lowlevel.notify_closing(fd)
            except Exception:
                pass
            os.close(fd)

    def _detach_leftover(self) -> None:
        # The session ended without unmount() (stop, crash, cancellation):
        # detach the mount so nothing dead stays behind, but only if the
        # mount at that path is still ours.
        m = fmount.find_mount(self.mountpoint)
        if m is None or m.connection != self.connection:
            self.mounted = False
            return
        try:
            fmount.sys_umount2(self.mountpoint, fmount.MNT_DETACH)
        except OSError as exc:
            log.warning("%s: could not detach %s: %s", self.name, self.mountpoint, exc)
        self.mounted = False


async def serve(ops, mountpoint: str, *, task_status=trio.TASK_STATUS_IGNORED, **kw) -> None:
    """Serve one mount until it is unmounted: ``await nursery.start(serve, ops, mp)``
    gives the Session."""
    session = Session(ops, mountpoint, **kw)
    await session.run(task_status=task_status)


__all__ = ["Session", "NotifySender", "serve", "DEFAULT_TASK_OPCODES", "ALL_INLINE", "ALL_TASKS",
           "FUSEError"]
