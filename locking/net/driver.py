"""trio driver for o2net: one TCP connection per node pair.

Every node listens on its cluster.conf ``ip_address:ip_port``; the node
with the lower number connects to the higher one (as o2net does), so a
pair never races two connections.  A connection is live only after the
HELLO/AUTH handshake (see ``proto``), inside TLS when cluster.conf's
cluster stanza has ``tls = yes`` (the peer's certificate must name the
node that its HELLO then claims).  Liveness: a PING goes out after
``keepalive_delay_ms`` without traffic sent; a connection that receives
nothing for ``idle_timeout_ms`` is dropped.  The connecting side retries
every ``reconnect_delay_ms``.  Anything malformed drops that connection
with a log line; the listener and the other connections carry on.

Upper layers see ``on_up(node)``, ``on_down(node)`` and
``on_message(node, payload)`` (all async, called from the connection's
reader task: keep them short) and call ``send(node, payload)``.
"""
from __future__ import annotations

import logging
import os
import secrets
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Optional

import trio

from replfs import tls
from replfs.filemode import exposed_secret_warning

from ..cluster_conf import Node, Timeouts
from . import proto

log = logging.getLogger("replfs.locking.net")

Callback = Callable[..., Awaitable[None]]


def load_key(conf_path: str) -> bytes:
    """The optional shared cluster key: a file ``key`` next to cluster.conf."""
    path = os.path.join(os.path.dirname(os.path.abspath(conf_path)), "key")
    try:
        with open(path, "rb") as f:
            warning = exposed_secret_warning(path, os.fstat(f.fileno()).st_mode,
                                             "the cluster key",
                                             "anyone who reads it can join the cluster")
            if warning:
                log.warning("%s", warning)
            return f.read().strip()
    except FileNotFoundError:
        return b""


class _Refused(Exception):
    pass


@dataclass
class _Conn:
    node: int
    stream: trio.abc.Stream
    send_lock: trio.Lock = field(default_factory=trio.Lock)
    last_sent: float = 0.0


async def _nothing(*_args) -> None:
    return None


class O2Net:
    def __init__(self, *, me: Node, nodes: tuple[Node, ...], cluster: str,
                 timeouts: Timeouts, key: bytes = b"",
                 on_message: Callback = _nothing, on_up: Callback = _nothing,
                 on_down: Callback = _nothing,
                 connect_to: Optional[dict[int, tuple[str, int]]] = None,
                 tls: Optional["tls.Contexts"] = None) -> None:
        self.me = me
        self.tls = tls
        # Where to connect to each peer, when not its cluster.conf address
        # (a fault proxy in tests).
        self.connect_to = dict(connect_to or {})
        self.peers = {n.number: n for n in nodes if n.number != me.number}
        self.cluster = cluster
        self.timeouts = timeouts
        self.key = key
        self.on_message = on_message
        self.on_up = on_up
        self.on_down = on_down
        self.conns: dict[int, _Conn] = {}
        self.listen_port: Optional[int] = None

    # ------------------------------------------------------------ public

    def connected(self) -> set[int]:
        return set(self.conns)

    async def send(self, node: int, payload: bytes) -> bool:
        """Queue-free send; False if there is no live connection to ``node``."""
        conn = self.conns.get(node)
        if conn is None:
            return False
        try:
            await self._send_frame(conn, proto.frame(proto.MSG, payload))
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            return False
        return True

    async def disconnect(self, node: int) -> None:
        conn = self.conns.get(node)
        if conn is not None:
            # (the TCP stream: a TLS close_notify could wait on a full buffer)
            await getattr(conn.stream, "transport_stream", conn.stream).aclose()

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(self.me.ip_port, host=self.me.ip_address)
        self.listen_port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, self._accepted, listeners)
            for number in sorted(self.peers):
                if number > self.me.number:
                    nursery.start_soon(self._connect_loop, self.peers[number])
            task_status.started()

    # ------------------------------------------------------------ internals

    async def _send_frame(self, conn: _Conn, data: bytes) -> None:
        async with conn.send_lock:
            await conn.stream.send_all(data)
            conn.last_sent = trio.current_time()

    async def _connect_loop(self, peer: Node) -> None:
        delay = self.timeouts.reconnect_delay_ms / 1000
        host, port = self.connect_to.get(peer.number, (peer.ip_address, peer.ip_port))
        while True:
            try:
                stream = await trio.open_tcp_stream(host, port)
            except OSError:
                await trio.sleep(delay)
                continue
            await self._serve(stream, expected={peer.number}, where=f"{host}:{port}",
                              server_side=False)
            await trio.sleep(delay)

    async def _accepted(self, stream: trio.SocketStream) -> None:
        try:
            host, port = stream.socket.getpeername()[:2]
            where = f"{host}:{port}"
        except OSError:
            where = "?"
        expected = {n for n in self.peers if n < self.me.number}
        await self._serve(stream, expected=expected, where=where, server_side=True)

    async def _serve(self, stream: trio.abc.Stream, *, expected: set[int], where: str,
                     server_side: bool) -> None:
        decoder = proto.FrameDecoder()
        pending: list[tuple[int, bytes]] = []
        idle = self.timeouts.idle_timeout_ms / 1000

        async def next_frame() -> tuple[int, bytes]:
            while not pending:
                with trio.fail_after(idle):
                    data = await stream.receive_some(65536)
                if not data:
                    raise trio.EndOfChannel
                pending.extend(decoder.feed(data))
            return pending.pop(0)

        node = None
        registered = False
        try:
            async with stream:
                cert_name = None
                if self.tls is not None:
                    names = {self.peers[n].name for n in expected}
                    with trio.fail_after(idle):
                        stream, cert_name = await tls.handshake(
                            stream, self.tls, server_side=server_side, expected=names,
                            where=where)
                mine = secrets.token_bytes(proto.NONCE_LEN)
                await stream.send_all(proto.encode_hello(
                    proto.Hello(proto.VERSION, self.me.number, self.cluster, mine)))
                ftype, payload = await next_frame()
                if ftype != proto.HELLO:
                    raise proto.RemoteProtocolError(f"expected HELLO, got frame type {ftype}")
                hello = proto.decode_hello(payload)
                why = proto.check_hello(hello, cluster=self.cluster, expected=expected)
                if why is None and cert_name is not None \
                        and self.peers[hello.node].name != cert_name:
                    why = (f"node {hello.node} ({self.peers[hello.node].name}) presented the "
                           f"TLS certificate of {cert_name}")
                if why is None and hello.node in self.conns:
                    why = f"node {hello.node} is already connected"
                if why:
                    raise _Refused(why)
                node = hello.node
                await stream.send_all(proto.frame(proto.AUTH, proto.auth_mac(
                    self.key, hello.nonce, self.cluster, self.me.number)))
                ftype, payload = await next_frame()
                want = proto.auth_mac(self.key, mine, self.cluster, node)
                if ftype != proto.AUTH or not _equal(payload, want):
                    raise _Refused(f"node {node} failed authentication (wrong cluster key?)")
                if node in self.conns:
                    raise _Refused(f"node {node} is already connected")
                conn = _Conn(node, stream, last_sent=trio.current_time())
                self.conns[node] = conn
                registered = True
                secured = tls.description(stream)
                log.info("o2net: connected to node %d (%s) at %s%s", node,
                         self.peers[node].name, where, f" over {secured}" if secured else "")
                failure: list[BaseException] = []
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._keepalive, conn)
                    try:
                        await self.on_up(node)
                        while True:
                            ftype, payload = await next_frame()
                            if ftype == proto.MSG:
                                await self.on_message(node, payload)
                            elif ftype == proto.PING:
                                await self._send_frame(conn, proto.frame(proto.PONG))
                            elif ftype == proto.PONG:
                                pass
                            else:
                                raise proto.RemoteProtocolError(
                                    f"unexpected frame type {ftype}")
                    except Exception as e:  # re-raised below, outside the nursery
                        failure.append(e)
                        nursery.cancel_scope.cancel()
                if failure:
                    raise failure[0]
        except _Refused as e:
            log.warning("o2net: refusing connection from %s: %s", where, e)
        except tls.TLSError as e:
            log.warning("o2net: refusing connection from %s: %s", where, e)
        except proto.RemoteProtocolError as e:
            log.warning("o2net: dropping connection %s: protocol error: %s", where, e)
        except trio.TooSlowError:
            log.warning("o2net: no network traffic from %s for %d ms, dropping the connection",
                        where if node is None else f"node {node}", self.timeouts.idle_timeout_ms)
        except (trio.EndOfChannel, trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        finally:
            if registered:
                del self.conns[node]
                log.info("o2net: connection to node %d (%s) lost", node, self.peers[node].name)
                with trio.CancelScope(shield=True):
                    await self.on_down(node)

    async def _keepalive(self, conn: _Conn) -> None:
        delay = self.timeouts.keepalive_delay_ms / 1000
        while True:
            wait = conn.last_sent + delay - trio.current_time()
            if wait > 0:
                await trio.sleep(wait)
                continue
            try:
                await self._send_frame(conn, proto.frame(proto.PING))
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                return


def _equal(a: bytes, b: bytes) -> bool:
    import hmac
    return hmac.compare_digest(a, b)
