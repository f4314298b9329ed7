"""Tests of the fault-injecting TCP proxy against small trio servers on loopback."""
from __future__ import annotations

import functools
import os
import pathlib
import socket
import struct
import subprocess
import sys

import pytest
import trio

ROOT = pathlib.Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:          # `tests` is not an installed package
    sys.path.insert(0, str(ROOT))

from tests.harness.proxy import FaultProxy, ProxyControl, ProxyError, spawn_proxy  # noqa: E402

HOST_A = "127.0.0.1"
HOST_B = "127.0.0.2"
HOST_P = "127.0.0.3"
TIMEOUT = 10


async def _echo(stream: trio.SocketStream) -> None:
    try:
        async with stream:
            while data := await stream.receive_some(65536):
                await stream.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass


async def start_echo(nursery: trio.Nursery) -> tuple[str, int]:
    listeners = await nursery.start(functools.partial(trio.serve_tcp, _echo, 0, host=HOST_B))
    return listeners[0].socket.getsockname()[:2]


class Peer:
    """A server on node B that hands each accepted stream to the test."""

    def __init__(self) -> None:
        self._send, self.accepted = trio.open_memory_channel(16)
        self.address: tuple[str, int] | None = None

    async def _handler(self, stream: trio.SocketStream) -> None:
        done = trio.Event()
        await self._send.send((stream, done))
        await done.wait()          # keep the stream open until the test ends

    async def start(self, nursery: trio.Nursery) -> tuple[str, int]:
        listeners = await nursery.start(functools.partial(trio.serve_tcp, self._handler, 0, host=HOST_B))
        self.address = listeners[0].socket.getsockname()[:2]
        return self.address

    async def next(self) -> trio.SocketStream:
        stream, _ = await self.accepted.receive()
        return stream


async def receive_exactly(stream: trio.SocketStream, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        data = await stream.receive_some(n - len(buf))
        if not data:
            raise EOFError(f"EOF after {len(buf)} of {n} bytes")
        buf += data
    return buf


async def nothing_arrives(stream: trio.SocketStream, seconds: float) -> bool:
    """True if neither data nor EOF shows up within ``seconds``."""
    with trio.move_on_after(seconds):
        await stream.receive_some(65536)
        return False
    return True


async def connect(address: tuple[str, int]) -> trio.SocketStream:
    return await trio.open_tcp_stream(*address)


async def expect_refused(address: tuple[str, int]) -> None:
    """A refused connection is reset either during connect or on the first read."""
    try:
        stream = await trio.open_tcp_stream(*address)
    except OSError:
        return
    with pytest.raises(trio.BrokenResourceError):
        data = await stream.receive_some(10)
        assert data, "expected a reset, got a clean EOF"
    await stream.aclose()


async def test_pass_through_and_counters():
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            target = await start_echo(nursery)
            async with FaultProxy(listen=(HOST_P, 0), target=target) as proxy:
                stream = await connect(proxy.listen_address)
                payload = os.urandom(300_000)
                async with trio.open_nursery() as inner:
                    inner.start_soon(stream.send_all, payload)
                    echoed = await receive_exactly(stream, len(payload))
                assert echoed == payload
                stats = proxy.stats()
                assert stats["a->b"]["bytes_out"] == len(payload)
                assert stats["b->a"]["bytes_out"] == len(payload)
                assert stats["accepted"] == 1 and stats["connections"] == 1
                await stream.aclose()
            nursery.cancel_scope.cancel()


async def test_half_close_is_forwarded():
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            target = await start_echo(nursery)
            async with FaultProxy(listen=(HOST_P, 0), target=target) as proxy:
                stream = await connect(proxy.listen_address)
                await stream.send_all(b"last words")
                await stream.send_eof()
                assert await receive_exactly(stream, 10) == b"last words"
                assert await stream.receive_some(100) == b""
            nursery.cancel_scope.cancel()


async def _round_trip(stream: trio.SocketStream) -> float:
    start = trio.current_time()
    await stream.send_all(b"ping")
    assert await receive_exactly(stream, 4) == b"ping"
    return trio.current_time() - start


async def test_delay_shows_in_round_trip():
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            target = await start_echo(nursery)
            async with FaultProxy(listen=(HOST_P, 0), target=target) as proxy:
                stream = await connect(proxy.listen_address)
                baseline = await _round_trip(stream)
                assert baseline < 0.1
                proxy.delay("a->b", 150)
                one_way = await _round_trip(stream)
                assert one_way >= 0.15
                proxy.delay("both", 100, jitter_ms=20)
                both = await _round_trip(stream)
                assert 0.2 <= both < 0.2 + 0.04 + 1.0
                proxy.heal()
                assert await _round_trip(stream) < 0.1
            nursery.cancel_scope.cancel()


async def test_delayed_stream_keeps_order():
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            target = await start_echo(nursery)
            async with FaultProxy(listen=(HOST_P, 0), target=target, seed=1) as proxy:
                proxy.delay("both", 5, jitter_ms=20)
                stream = await connect(proxy.listen_address)
                payload = b"".join(struct.pack(">I", i) for i in range(20_000))
                async with trio.open_nursery() as inner:
                    for i in range(0, len(payload), 1000):
                        await stream.send_all(payload[i:i + 1000])
                    assert await receive_exactly(stream, len(payload)) == payload
            nursery.cancel_scope.cancel()


async def test_drop_blackholes_but_keeps_connection_open():
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            target = await start_echo(nursery)
            async with FaultProxy(listen=(HOST_P, 0), target=target) as proxy:
                stream = await connect(proxy.listen_address)
                await _round_trip(stream)
                proxy.drop("a->b")
                await stream.send_all(b"into the void")
                assert await nothing_arrives(stream, 0.3)
                stats = proxy.stats()
                assert stats["a->b"]["bytes_dropped"] == 13
                assert stats["connections"] == 1
                # The connection is still open: the client can keep writing.
                await stream.send_all(b"more")
                assert await nothing_arrives(stream, 0.1)
            nursery.cancel_scope.cancel()


async def test_cut_resets_connections_and_can_refuse_new_ones():
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            peer = Peer()
            await peer.start(nursery)
            async with FaultProxy(listen=(HOST_P, 0), target=peer.address) as proxy:
                a = await connect(proxy.listen_address)
                b = await peer.next()
                await a.send_all(b"x")
                assert await receive_exactly(b, 1) == b"x"
                proxy.cut(refuse=True)
                for stream in (a, b):
                    with pytest.raises(trio.BrokenResourceError):
                        # RST, not a polite FIN: a read fails with ECONNRESET.
                        data = await stream.receive_some(10)
                        assert data, "expected a reset, got a clean EOF"
                # A new connection is accepted by the kernel, then reset.
                await expect_refused(proxy.listen_address)
                assert proxy.stats()["refused"] == 1
                proxy.heal()
                d = await connect(proxy.listen_address)
                db = await peer.next()
                await d.send_all(b"back")
                assert await receive_exactly(db, 4) == b"back"
                assert proxy.stats()["connections"] == 1
                await d.aclose()
            nursery.cancel_scope.cancel()


async def test_one_way_partition_then_heal():
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            peer = Peer()
            await peer.start(nursery)
            async with FaultProxy(listen=(HOST_P, 0), target=peer.address) as proxy:
                a = await connect(proxy.listen_address)
                b = await peer.next()
                proxy.partition("a->b")
                await a.send_all(b"lost")
                assert await nothing_arrives(b, 0.3)
                await b.send_all(b"still flows")
                assert await receive_exactly(a, 11) == b"still flows"
                # New connections are refused while partitioned.
                await expect_refused(proxy.listen_address)
                proxy.heal()
                # The old connection lost bytes, so heal resets it.
                with pytest.raises(trio.BrokenResourceError):
                    data = await a.receive_some(10)
                    assert data, "expected a reset"
                fresh = await connect(proxy.listen_address)
                fb = await peer.next()
                await fresh.send_all(b"hello again")
                assert await receive_exactly(fb, 11) == b"hello again"
                await fb.send_all(b"hi")
                assert await receive_exactly(fresh, 2) == b"hi"
            nursery.cancel_scope.cancel()


async def test_heal_can_keep_damaged_connections():
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            target = await start_echo(nursery)
            async with FaultProxy(listen=(HOST_P, 0), target=target) as proxy:
                stream = await connect(proxy.listen_address)
                proxy.drop("both")
                await stream.send_all(b"gone")
                assert await nothing_arrives(stream, 0.2)
                proxy.heal(cut_damaged=False)
                assert await _round_trip(stream) < 1
            nursery.cancel_scope.cancel()


async def test_survives_peer_resets_and_refused_target():
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            peer = Peer()
            await peer.start(nursery)
            async with FaultProxy(listen=(HOST_P, 0), target=peer.address) as proxy:
                # Client resets mid-stream.
                a = await connect(proxy.listen_address)
                b = await peer.next()
                await a.send_all(b"abc")
                await receive_exactly(b, 3)
                a.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                await a.aclose()
                with pytest.raises(trio.BrokenResourceError):
                    data = await b.receive_some(10)
                    assert data, "the reset should reach the server"
                # Server resets mid-stream.
                a2 = await connect(proxy.listen_address)
                b2 = await peer.next()
                b2.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                await b2.aclose()
                with pytest.raises(trio.BrokenResourceError):
                    data = await a2.receive_some(10)
                    assert data, "the reset should reach the client"
                # The proxy still works.
                a3 = await connect(proxy.listen_address)
                b3 = await peer.next()
                await a3.send_all(b"ok")
                assert await receive_exactly(b3, 2) == b"ok"
            # A target nobody listens on: the client is reset, the proxy lives on.
            free = socket.socket()
            free.bind((HOST_B, 0))
            dead_target = free.getsockname()
            free.close()
            async with FaultProxy(listen=(HOST_P, 0), target=dead_target) as proxy:
                for _ in range(2):
                    await expect_refused(proxy.listen_address)
            nursery.cancel_scope.cancel()


async def test_reverse_route_counts_in_node_terms():
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            peer_b, peer_a = Peer(), Peer()
            await peer_b.start(nursery)
            listeners = await nursery.start(
                functools.partial(trio.serve_tcp, peer_a._handler, 0, host=HOST_A))
            addr_a = listeners[0].socket.getsockname()[:2]
            async with FaultProxy(listen=(HOST_P, 0), target=peer_b.address,
                                  reverse=((HOST_P, 0), addr_a)) as proxy:
                # B opens a connection to A through the reverse route.
                from_b = await connect(proxy.reverse_address)
                at_a = await peer_a.next()
                proxy.partition("a->b")
                await from_b.send_all(b"b speaks")
                assert await receive_exactly(at_a, 8) == b"b speaks"
                await at_a.send_all(b"a speaks")
                assert await nothing_arrives(from_b, 0.2)
                stats = proxy.stats()
                assert stats["b->a"]["bytes_out"] == 8
                assert stats["a->b"]["bytes_dropped"] == 8
            nursery.cancel_scope.cancel()


async def test_control_protocol_in_process(tmp_path):
    path = str(tmp_path / "ctl.sock")
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            target = await start_echo(nursery)
            async with FaultProxy(listen=(HOST_P, 0), target=target) as proxy:
                await nursery.start(proxy.serve_control, path)
                control = ProxyControl(path)
                await trio.to_thread.run_sync(control.ping)
                await trio.to_thread.run_sync(control.delay, "b->a", 40, 5)
                assert proxy.state["b->a"].delay == pytest.approx(0.04)
                await trio.to_thread.run_sync(control.partition, "both")
                assert proxy.refuse_new and proxy.state["a->b"].blackhole
                await trio.to_thread.run_sync(control.heal)
                assert not proxy.refuse_new and not proxy.state["b->a"].blackhole
                stats = await trio.to_thread.run_sync(control.stats)
                assert set(stats) >= {"a->b", "b->a", "connections"}
                with pytest.raises(ProxyError):
                    await trio.to_thread.run_sync(control.command, "drop sideways")
                with pytest.raises(ProxyError):
                    await trio.to_thread.run_sync(control.command, "explode")
            nursery.cancel_scope.cancel()


def test_proxy_as_a_process(tmp_path):
    """The CLI form, driven synchronously as a test with subprocess daemons would."""
    echo = socket.socket()
    echo.bind((HOST_B, 0))
    echo.listen(4)
    echo.settimeout(TIMEOUT)
    control_path = str(tmp_path / "proxy.sock")
    proc, control, ready = spawn_proxy(f"{HOST_P}:0", "%s:%d" % echo.getsockname(),
                                       control_path)
    try:
        host, port = ready["forward"][0]
        assert control.addresses()["forward"][0] == [host, port]
        client = socket.create_connection((host, port), timeout=TIMEOUT)
        server, _ = echo.accept()
        server.settimeout(TIMEOUT)
        client.sendall(b"hello")
        assert server.recv(5) == b"hello"
        control.drop("a->b")
        client.sendall(b"dropped")
        server.settimeout(0.3)
        with pytest.raises(socket.timeout):
            server.recv(10)
        assert control.stats()["a->b"]["bytes_dropped"] == 7
        control.cut()
        client.settimeout(TIMEOUT)
        with pytest.raises(ConnectionResetError):
            if client.recv(10) == b"":
                raise AssertionError("expected a reset, got EOF")
        client.close()
        server.close()
    finally:
        proc.terminate()
        try:
            assert proc.wait(TIMEOUT) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
            echo.close()
    assert not os.path.exists(control_path)
