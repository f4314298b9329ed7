"""replfsd: the node daemon.  It is "the kernel" of a replfs node.

It hosts every resource's replication driver and answers the admin socket
(a Unix socket, mode 0600) for replfsadm, the mount process, the device
file and the benchmarks.  Each request is handled in its own task, so a
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
from replfs.errors import EXIT_CONFIG, EXIT_EXEC, EXIT_TIMEOUT, EXIT_USAGE, ReplfsError
from replfs.ipc import frames
from replfs.ipc.client import SOCKET_NAME

from replfs.blockrepl import conf as confmod
from replfs.blockrepl.core import startup
from replfs.blockrepl.core.states import (DEMOTE_WHILE_OPEN, ERR_DISCARD_IMPOSSIBLE, ERR_NO_DISK,
                                          DiskState, Role, StateChangeRefused, fail,
                                          refuse)
from replfs.blockrepl.driver.resource import Resource
from replfs.blockrepl.meta import format as md

from .devices import DeviceFiles

log = logging.getLogger("replfs.daemon")

VERSION = "0.1.0"
# How long secondary/down wait for openers that are closing (seconds).
OPENER_GRACE = 5.0


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
        self.resources: dict[str, Resource] = {}
        self._nursery: trio.Nursery | None = None
        self._res_scopes: dict[str, trio.CancelScope] = {}
        self._stop = trio.Event()
        self.devices = DeviceFiles(rundir)
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
                    for name in list(self.resources):
                        try:
                            await self._down(name)
                        except (ReplfsError, StateChangeRefused, OSError) as e:
                            log.warning("%s: down at shutdown: %s", name, e)
                    await self.devices.stop_all()
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
        fn: Callable[..., Awaitable] | None = getattr(self, "op_" + str(op).replace("-", "_"), None)
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

    def _res(self, req: dict) -> Resource:
        name = req.get("res")
        res = self.resources.get(name)
        if res is None:
            raise ReplfsError(f"{name}: no such resource is up on this node "
                              f"(run 'replfsadm up {name}')", EXIT_CONFIG)
        return res

    def _load_conf(self, req: dict):
        path = req.get("conf") or self.conf_path or confmod.DEFAULT_PATH
        self.conf_path = path
        return confmod.load(path)

    async def _ensure(self, req: dict) -> Resource:
        """The resource, created from the config if it is not hosted yet."""
        name = req.get("res")
        if name in self.resources:
            return self.resources[name]
        config = self._load_conf(req)
        if name not in config.resources:
            raise ReplfsError(f"'{name}' not defined in your config (for this host).",
                              EXIT_CONFIG)
        rconf = config.resources[name]
        confmod.check_node(config, rconf, self.node)
        res = Resource(rconf, self.node)
        res.conf_path = self.conf_path
        scope_holder: list[trio.CancelScope] = []

        async def host(task_status=trio.TASK_STATUS_IGNORED):
            with trio.CancelScope() as scope:
                scope_holder.append(scope)
                await res.run(task_status=task_status)

        await self._nursery.start(host)
        self._res_scopes[name] = scope_holder[0]
        self.resources[name] = res
        return res

    # ------------------------------------------------------------ admin ops
    async def op_ping(self, req, body, conn):
        return {"node": self.node, "pid": os.getpid(), "version": VERSION,
                "resources": sorted(self.resources)}

    async def op_shutdown(self, req, body, conn):
        return {}

    async def op_up(self, req, body, conn):
        res = await self._ensure(req)
        await self._attach(res)
        res.connect()
        return {}

    async def op_attach(self, req, body, conn):
        await self._attach(await self._ensure(req))
        return {}

    async def _attach(self, res: Resource) -> None:
        await res.attach()
        await self.devices.start(self._nursery, res, res.me.device)

    async def op_detach(self, req, body, conn):
        res = self._res(req)
        if res.open_count:
            raise refuse(DEMOTE_WHILE_OPEN)
        await self.devices.stop(res.conf.name)
        await res.detach()
        return {}

    async def op_connect(self, req, body, conn):
        res = await self._ensure(req)
        discard = bool(req.get("discard_my_data"))
        if discard and res.role is Role.Primary and not res.conf.allow_two_primaries:
            raise fail(ERR_DISCARD_IMPOSSIBLE, res.me.device)
        res.connect(discard_my_data=discard)
        return {}

    async def op_disconnect(self, req, body, conn):
        await self._res(req).disconnect()
        return {}

    async def op_primary(self, req, body, conn):
        await self._res(req).primary(force=bool(req.get("force")))
        return {}

    async def _wait_openers(self, res: Resource) -> None:
        """Give openers that are closing a moment to go.  umount(8) of a
        replfs mount returns before the mount process has written its
        journal and closed the resource, so `umount; replfsadm secondary`
        (which DRBD users type as one step) would race with it."""
        with trio.move_on_after(OPENER_GRACE):
            while res.open_count:
                await trio.sleep(0.05)

    async def op_secondary(self, req, body, conn):
        res = self._res(req)
        await self._wait_openers(res)
        await res.secondary()
        return {}

    async def op_down(self, req, body, conn):
        await self._down(req.get("res"))
        return {}

    async def _down(self, name: str) -> None:
        res = self.resources.get(name)
        if res is None:
            return
        await self._wait_openers(res)
        if res.open_count:
            raise refuse(DEMOTE_WHILE_OPEN)
        await self.devices.stop(name)
        await res.down()
        scope = self._res_scopes.pop(name, None)
        del self.resources[name]
        if scope is not None:
            scope.cancel()

    @staticmethod
    def _needs_disk(res: Resource) -> Resource:
        """Verbs that work on the local data refuse a Diskless node before
        they start, as DRBD's admin layer does: Failure (138), exit 10."""
        if res.disk is None:
            raise fail(ERR_NO_DISK, res.me.device)
        return res

    async def op_invalidate(self, req, body, conn):
        await self._needs_disk(self._res(req)).invalidate()
        return {}

    async def op_invalidate_remote(self, req, body, conn):
        await self._needs_disk(self._res(req)).invalidate_remote()
        return {}

    async def op_outdate(self, req, body, conn):
        await self._res(req).outdate()
        return {}

    async def op_new_current_uuid(self, req, body, conn):
        await self._needs_disk(self._res(req)).new_current_uuid()
        return {}

    async def op_resume_io(self, req, body, conn):
        self._res(req).resume_io()
        return {}

    async def op_pause_sync(self, req, body, conn):
        await self._res(req).pause_sync()
        return {}

    async def op_resume_sync(self, req, body, conn):
        await self._res(req).resume_sync()
        return {}

    async def op_verify(self, req, body, conn):
        await self._res(req).verify()
        return {}

    async def op_adjust(self, req, body, conn):
        """Bring a resource in line with the config: up, attach, connect."""
        res = await self._ensure(req)
        config = self._load_conf(req)
        new = config.resources.get(res.conf.name)
        if new is not None and new != res.conf:
            if res.cstate.value == "StandAlone" or not res.cstate.is_connected:
                res.conf = new
            else:
                log.info("%s: config changed; new network options apply at the next "
                         "connect", res.conf.name)
                res.conf = new
        if res.disk is None:
            await self._attach(res)
        if not res.want_connect and not res.split_brain:
            res.connect()
        return {}

    async def op_status(self, req, body, conn):
        names = [req["res"]] if req.get("res") else sorted(self.resources)
        out = []
        for name in names:
            res = self.resources.get(name)
            if res is None:
                raise ReplfsError(f"{name}: no such resource is up on this node", EXIT_CONFIG)
            out.append(res.status())
        return {"resources": out, "node": self.node}

    @staticmethod
    def _timeout_kind(res: Resource) -> str:
        """Which startup timeout applies to res (DRBD's timeout type)."""
        disk = res.disk
        sb = disk.sb if disk is not None else None
        return startup.kind_from_metadata(
            primary_flag=bool(sb and sb.has(md.F_PRIMARY)),
            is_primary=res.role is Role.Primary,
            bitmap_uuid=sb.uuids.bitmap if sb else 0,
            peer_outdated=(res.pdsk is DiskState.Outdated
                           or bool(sb and sb.has(md.F_PEER_OUTDATED))))

    async def op_timeout_type(self, req, body, conn):
        return {"kind": self._timeout_kind(self._res(req))}

    async def op_wait_connect(self, req, body, conn):
        """Wait until connected.  ``timeout`` waits that long; otherwise
        ``wfc``/``degr``/``outdated`` (startup's three timeouts) and the
        resource's state choose, as drbdsetup wait-connect does."""
        res = self._res(req)
        if "wfc" in req:
            degr, outdated = req.get("degr"), req.get("outdated")
            choice = startup.choose(self._timeout_kind(res), int(req["wfc"] or 0),
                                    None if degr is None else int(degr),
                                    None if outdated is None else int(outdated))
            kind, seconds = choice.kind, choice.seconds
        else:
            kind, seconds = None, float(req.get("timeout") or 0)
        with trio.move_on_after(seconds or float("inf")):
            while not res.cstate.is_connected:
                await res.wait_state_change()
            return {"cstate": res.cstate.value, "kind": kind}
        using = f", {kind} {seconds:g}s" if kind else ""
        raise ReplfsError(f"{res.conf.name}: timed out waiting for the connection "
                          f"(cstate {res.cstate.value}{using})", EXIT_TIMEOUT)

    async def op_wait_sync(self, req, body, conn):
        """Wait until the resource is Connected with both disks UpToDate."""
        res = self._res(req)
        timeout = float(req.get("timeout") or 0) or float("inf")
        with trio.move_on_after(timeout):
            while not (res.cstate.value == "Connected" and res.dstate.value == "UpToDate"
                       and res.pdsk.value == "UpToDate"):
                await res.wait_state_change()
            return {}
        raise ReplfsError(f"{res.conf.name}: timed out waiting for sync "
                          f"({res.cstate.value} {res.dstate.value}/{res.pdsk.value})", EXIT_TIMEOUT)

    # ------------------------------------------------------------ block I/O
    async def op_open(self, req, body, conn):
        res = self._res(req)
        # As in DRBD 8: a Secondary cannot be opened at all.
        res._require_io(write=bool(req.get("write", True)))
        single = bool(req.get("single_node"))
        if single:
            res.open_single_node()
        res.open_count += 1
        handle = len(conn.handles) + 1
        while handle in conn.handles:
            handle += 1
        conn.handles[handle] = res.conf.name
        if single:
            conn.single_node.add(handle)
        return {"size": res.size, "handle": handle}

    async def op_close(self, req, body, conn):
        handle = req.get("handle")
        name = conn.handles.pop(handle, None)
        if name is not None and name in self.resources:
            res = self.resources[name]
            res.open_count = max(0, res.open_count - 1)
            if handle in conn.single_node:
                conn.single_node.discard(handle)
                res.close_single_node()
        return {}

    async def op_read(self, req, body, conn):
        data = await self._res(req).read(int(req["off"]), int(req["len"]))
        return {}, data

    async def op_write(self, req, body, conn):
        await self._res(req).write(int(req["off"]), body)
        return {}

    async def op_flush(self, req, body, conn):
        await self._res(req).flush()
        return {}

    async def op_discard(self, req, body, conn):
        await self._res(req).discard(int(req["off"]), int(req["len"]))
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
