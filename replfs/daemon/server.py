"""replfsd: the node daemon.  It is "the kernel" of a replfs node.

It hosts the block mirror (mirror.py: every resource's replication
driver and device file) and the other components (components.py: the
cluster stack, the mounts), and answers the admin socket (a Unix socket,
mode 0600) for replfsadm, the mount process, the device file and the
benchmarks, dispatching each request through the ``ops`` table of whoever
declares it.  Each request is handled in its own task, so a
slow resync or a waiting `wait-connect` never blocks block I/O.
"""
from __future__ import annotations

import errno
import logging
import os
import signal
import sys
from typing import Awaitable, Callable

import trio

from replfs.blockdev import BlockDeviceError
from replfs.errors import EXIT_EXEC, EXIT_USAGE, ReplfsError
from replfs.ipc import frames
from replfs.ipc.client import SOCKET_NAME

from replfs.blockrepl.core.states import StateChangeRefused
from replfs.blockrepl.driver.resource import Resource

from .mirror import MirrorService

log = logging.getLogger("replfs.daemon")

VERSION = "0.1.0"


class ClientConn:
    """One admin-socket client, as request handlers see it.

    ``handles`` holds what the client opened (released when it goes away);
    ``push`` sends an unsolicited event frame (``{"event": ...}``) to the
    client, for example a lock manager's blocking callback;
    ``on_close`` callbacks (async, no arguments) run when it disconnects.
    """

    def __init__(self, stream: trio.SocketStream):
        self.stream = stream
        self.handles: dict[int, str] = {}
        self.single_node: set[int] = set()     # handles opened by a single-node mount
        self.on_close: list = []
        self.send_lock = trio.Lock()
        self.closed = False

    async def send(self, header: dict, body: bytes = b"") -> None:
        prefix, body = frames.encode_parts(header, body)
        async with self.send_lock:
            if len(body) < 65536:
                await self.stream.send_all(prefix + body)
            else:
                await self.stream.send_all(prefix)
                await self.stream.send_all(body)

    async def push(self, event: str, body: bytes = b"", **fields) -> bool:
        """Send an event; False if the client is gone."""
        if self.closed:
            return False
        try:
            await self.send({"event": event, **fields}, body)
            return True
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self.closed = True
            return False


class Daemon:
    def __init__(self, node: str, rundir: str, conf_path: str | None = None):
        self.node = node
        self.rundir = rundir
        self.conf_path = conf_path
        self._nursery: trio.Nursery | None = None
        self._stop = trio.Event()
        # The block mirror: every resource, its device file and requests.
        self.mirror = MirrorService(self)
        # The daemon's own requests.
        self.ops = {"ping": self.op_ping, "shutdown": self.op_shutdown}
        # Components hosted beside the resources (the cluster stack, ...).
        # Each has `ops: dict[str, handler]` (handler(req, body, handles)
        # -> dict | (dict, bytes)), `async run(daemon, *, task_status)`
        # and `async shutdown()`; see replfs/daemon/components.py.
        self.components: list = []

    @property
    def socket_path(self) -> str:
        return os.path.join(self.rundir, SOCKET_NAME)

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        os.makedirs(self.rundir, mode=0o700, exist_ok=True)
        path = self.socket_path
        if os.path.exists(path):
            os.unlink(path)
        sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
        old_umask = os.umask(0o177)
        try:
            await sock.bind(path)
        finally:
            os.umask(old_umask)
        os.chmod(path, 0o600)
        sock.listen(64)
        for opt in (trio.socket.SO_SNDBUF, trio.socket.SO_RCVBUF):
            sock.setsockopt(trio.socket.SOL_SOCKET, opt, 4 * 1024 * 1024)
        listener = trio.SocketListener(sock)
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                await nursery.start(self.mirror.run)
                nursery.start_soon(trio.serve_listeners, self._serve_conn, [listener])
                for comp in self.components:
                    await nursery.start(comp.run, self)
                task_status.started()
                log.info("replfsd %s started on node %s (socket %s)", VERSION, self.node, path)
                await self._stop.wait()
                log.info("replfsd shutting down")
                with trio.move_on_after(30) as cleanup:
                    cleanup.shield = True
                    for comp in self.components:
                        stop_users = getattr(comp, "stop_users", None)
                        if stop_users is not None:
                            try:
                                await stop_users()
                            except Exception:
                                log.exception("component stop failed")
                    await self.mirror.down_all()
                    for comp in reversed(self.components):
                        try:
                            await comp.shutdown()
                        except Exception:
                            log.exception("component shutdown failed")
                nursery.cancel_scope.cancel()
        finally:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass

    def stop(self) -> None:
        self._stop.set()

    @property
    def resources(self) -> dict[str, Resource]:
        return self.mirror.resources

    @property
    def devices(self):
        return self.mirror.devices

    def _res(self, req: dict) -> Resource:
        return self.mirror.res(req)

    # ------------------------------------------------------------ connections
    # Requests a client may withdraw while they wait (op "cancel", sent by
    # AsyncClient when the call is cancelled on its side): lock requests,
    # which would otherwise stay queued and be granted to nobody.
    CANCELLABLE = frozenset({"dlm-lock", "dlm-convert"})
    # Requests that only wait: they end when their client goes away (an
    # admin who stopped a boot wait leaves no wait behind in the daemon).
    WAITS = frozenset({"wait-connect", "wait-sync"})

    async def _serve_conn(self, stream: trio.SocketStream) -> None:
        dec = frames.FrameDecoder()
        conn = ClientConn(stream)
        waiting: dict = {}          # request id -> CancelScope (cancellable ops, waits)
        waits: set = set()          # request ids of WAITS

        async def handle(req: dict, body: bytes) -> None:
            try:
                await answer(req, body)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                # The client went away before its answer: nothing to tell,
                # and never a reason to take the daemon down.
                log.debug("admin socket: client gone before the answer to %r", req.get("op"))

        async def answer(req: dict, body: bytes) -> None:
            rid = req.get("id")
            try:
                if req.get("op") in self.CANCELLABLE or req.get("op") in self.WAITS:
                    with trio.CancelScope() as scope:
                        waiting[rid] = scope
                        if req.get("op") in self.WAITS:
                            waits.add(rid)
                        try:
                            out, data = await self._dispatch(req, body, conn)
                        finally:
                            waiting.pop(rid, None)
                            waits.discard(rid)
                    if scope.cancelled_caught:
                        await conn.send({"id": rid, "ok": False, "errno": errno.ECANCELED,
                                         "error": "cancelled by the client"})
                        return
                else:
                    out, data = await self._dispatch(req, body, conn)
                await conn.send({"id": rid, "ok": True, **out}, data)
                if req.get("op") == "shutdown":
                    self.stop()  # only now: the caller has its answer
            except BlockDeviceError as e:
                await conn.send({"id": rid, "ok": False, "errno": e.errno or errno.EIO,
                                 "error": str(e.strerror or e)})
            except StateChangeRefused as e:
                res = self.resources.get(req.get("res", ""))
                where = res.me.device if res is not None else req.get("res", "")
                await conn.send({"id": rid, "ok": False, "exit": e.exit_code,
                                 "error": f"{where}: {e}" if where else str(e)})
            except ReplfsError as e:
                await conn.send({"id": rid, "ok": False, "exit": e.exit_code, "error": e.message})
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                raise
            except Exception as e:  # a bug: report it, keep the daemon alive
                log.exception("internal error handling %r", req.get("op"))
                await conn.send({"id": rid, "ok": False, "exit": EXIT_EXEC,
                                 "error": f"internal error in replfsd: {type(e).__name__}: {e}"})

        try:
            async with trio.open_nursery() as n:
                try:
                    while True:
                        data = await stream.receive_some(1 << 20)
                        if not data:
                            break
                        dec.receive_data(data)
                        while (fr := dec.next_frame()) is not None:
                            if fr[0].get("op") == "cancel":
                                scope = waiting.get(fr[0].get("target"))
                                if scope is not None:
                                    scope.cancel()
                                continue        # (no answer)
                            n.start_soon(handle, *fr)
                except frames.FrameError as e:
                    log.warning("admin socket: dropping client: %s", e)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
                finally:
                    # Requests still running (a lock that waits, a write in
                    # flight) finish on their own and see that nobody is
                    # left to answer; mere waits end now.
                    conn.closed = True
                    for rid in list(waits):
                        scope = waiting.get(rid)
                        if scope is not None:
                            scope.cancel()
        finally:
            conn.closed = True
            with trio.CancelScope(shield=True):
                for handle, name in conn.handles.items():
                    res = self.resources.get(name)
                    if res is not None and res.open_count > 0:
                        res.open_count -= 1
                    if res is not None and handle in conn.single_node:
                        res.close_single_node()
                for cb in conn.on_close:
                    try:
                        await cb()
                    except Exception:
                        log.exception("admin socket: close callback failed")
                await stream.aclose()

    # ------------------------------------------------------------ dispatch
    async def _dispatch(self, req: dict, body: bytes, conn: ClientConn) -> tuple[dict, bytes]:
        op = req.get("op")
        fn: Callable[..., Awaitable] | None = self.ops.get(op) or self.mirror.ops.get(op)
        if fn is None:
            for comp in self.components:
                fn = comp.ops.get(op)
                if fn is not None:
                    break
        if fn is None:
            raise ReplfsError(f"replfsd: unknown request '{op}'", EXIT_USAGE)
        result = await fn(req, body, conn)
        if isinstance(result, tuple):
            return result
        return (result or {}), b""

    # ------------------------------------------------------------ admin ops
    async def op_ping(self, req, body, conn):
        return {"node": self.node, "pid": os.getpid(), "version": VERSION,
                "resources": sorted(self.resources)}

    async def op_shutdown(self, req, body, conn):
        return {}


def setup_logging(rundir: str, foreground: bool, level: int = logging.INFO) -> None:
    fmt = logging.Formatter("%(asctime)s %(name)s: %(message)s")
    root = logging.getLogger("replfs")
    root.setLevel(level)
    fh = logging.FileHandler(os.path.join(rundir, "replfsd.log"))
    fh.setFormatter(fmt)
    root.addHandler(fh)
    if foreground:
        sh = logging.StreamHandler(sys.stderr)
        sh.setFormatter(fmt)
        root.addHandler(sh)


async def serve(daemon: Daemon) -> None:
    """Run the daemon until SIGTERM/SIGINT or a shutdown request."""
    async with trio.open_nursery() as n:
        async def signals():
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as sigs:
                async for _ in sigs:
                    daemon.stop()
        n.start_soon(signals)
        await daemon.run()
        n.cancel_scope.cancel()
