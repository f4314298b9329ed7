"""o2net: handshake, key, keepalive/idle timeout, malformed input (real loopback TCP)."""
from __future__ import annotations

import logging
import socket

import pytest
import trio
from hypothesis import given, strategies as st

from replfs.locking.cluster_conf import Node, Timeouts
from replfs.locking.net import proto
from replfs.locking.net.driver import O2Net, load_key


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_nodes():
    return (Node("alpha", 0, "127.0.0.1", free_port(), "c1"),
            Node("beta", 1, "127.0.0.1", free_port(), "c1"))


FAST = Timeouts(idle_timeout_ms=600, keepalive_delay_ms=100, reconnect_delay_ms=50)


class Recorder:
    def __init__(self):
        self.msgs = []
        self.events = []
        self.changed = trio.Event()

    async def on_message(self, node, payload):
        self.msgs.append((node, payload))
        self._kick()

    async def on_up(self, node):
        self.events.append(("up", node))
        self._kick()

    async def on_down(self, node):
        self.events.append(("down", node))
        self._kick()

    def _kick(self):
        self.changed.set()
        self.changed = trio.Event()

    async def wait(self, pred):
        with trio.fail_after(5):
            while not pred():
                await self.changed.wait()


def net(me, nodes, rec, key=b"", cluster="c1", timeouts=FAST):
    return O2Net(me=me, nodes=nodes, cluster=cluster, timeouts=timeouts, key=key,
                 on_message=rec.on_message, on_up=rec.on_up, on_down=rec.on_down)


async def test_pair_connects_and_exchanges_messages(nursery):
    nodes = make_nodes()
    ra, rb = Recorder(), Recorder()
    a, b = net(nodes[0], nodes, ra, key=b"s3cret"), net(nodes[1], nodes, rb, key=b"s3cret")
    await nursery.start(b.run)
    await nursery.start(a.run)
    await ra.wait(lambda: ("up", 1) in ra.events)
    await rb.wait(lambda: ("up", 0) in rb.events)
    assert await a.send(1, b"hello beta")
    assert await b.send(0, b"hello alpha")
    await rb.wait(lambda: rb.msgs == [(0, b"hello beta")])
    await ra.wait(lambda: ra.msgs == [(1, b"hello alpha")])
    # keepalives keep an otherwise silent connection alive past the idle timeout
    await trio.sleep(1.0)
    assert a.connected() == {1} and b.connected() == {0}
    assert ("down", 1) not in ra.events


async def test_wrong_key_refused_with_log(nursery, caplog):
    caplog.set_level(logging.WARNING, "replfs.locking.net")
    nodes = make_nodes()
    ra, rb = Recorder(), Recorder()
    await nursery.start(net(nodes[1], nodes, rb, key=b"right").run)
    a = net(nodes[0], nodes, ra, key=b"wrong")
    await nursery.start(a.run)
    with trio.fail_after(5):
        while "failed authentication" not in caplog.text:
            await trio.sleep(0.02)
    assert ra.events == [] and rb.events == []
    assert await a.send(1, b"x") is False


async def test_stranger_cluster_refused(nursery, caplog):
    caplog.set_level(logging.WARNING, "replfs.locking.net")
    nodes = make_nodes()
    rb = Recorder()
    await nursery.start(net(nodes[1], nodes, rb).run)
    await nursery.start(net(nodes[0], nodes, Recorder(), cluster="other").run)
    with trio.fail_after(5):
        while "is not ours" not in caplog.text:
            await trio.sleep(0.02)
    assert rb.events == []


async def test_garbage_drops_connection_listener_survives(nursery, caplog):
    caplog.set_level(logging.WARNING, "replfs.locking.net")
    nodes = make_nodes()
    rb = Recorder()
    b = net(nodes[1], nodes, rb)
    await nursery.start(b.run)
    s = await trio.open_tcp_stream("127.0.0.1", nodes[1].ip_port)
    await s.send_all(b"GET / HTTP/1.0\r\n\r\n")
    with trio.fail_after(5):
        assert await s.receive_some(100)  # beta's HELLO
        while await s.receive_some(100):
            pass  # then beta closes
    assert "bad magic" in caplog.text
    # a proper peer still gets in afterwards
    ra = Recorder()
    await nursery.start(net(nodes[0], nodes, ra).run)
    await ra.wait(lambda: ("up", 1) in ra.events)


async def test_silent_peer_hits_idle_timeout(nursery, caplog):
    """A peer that completes the handshake and then says nothing is dropped."""
    caplog.set_level(logging.WARNING, "replfs.locking.net")
    nodes = make_nodes()
    rb = Recorder()
    await nursery.start(net(nodes[1], nodes, rb).run)
    s = await trio.open_tcp_stream("127.0.0.1", nodes[1].ip_port)
    dec = proto.FrameDecoder()
    frames = []
    with trio.fail_after(5):
        while not frames:
            frames += dec.feed(await s.receive_some(1000))
    theirs = proto.decode_hello(frames[0][1])
    mine = b"n" * proto.NONCE_LEN
    await s.send_all(proto.encode_hello(proto.Hello(proto.VERSION, 0, "c1", mine)))
    await s.send_all(proto.frame(proto.AUTH, proto.auth_mac(b"", theirs.nonce, "c1", 0)))
    await rb.wait(lambda: ("up", 0) in rb.events)
    await rb.wait(lambda: ("down", 0) in rb.events)
    assert "no network traffic" in caplog.text
    await s.aclose()


async def test_reconnects_after_peer_restart(nursery):
    nodes = make_nodes()
    ra = Recorder()
    await nursery.start(net(nodes[0], nodes, ra).run)
    for _ in range(2):
        async with trio.open_nursery() as inner:
            await inner.start(net(nodes[1], nodes, Recorder()).run)
            n = ra.events.count(("up", 1))
            await ra.wait(lambda: ra.events.count(("up", 1)) == n + 1)
            inner.cancel_scope.cancel()
        await ra.wait(lambda: ra.events.count(("down", 1)) == ra.events.count(("up", 1)))


def test_load_key(tmp_path):
    conf = tmp_path / "cluster.conf"
    assert load_key(str(conf)) == b""
    (tmp_path / "key").write_bytes(b"abc\n")
    assert load_key(str(conf)) == b"abc"


@given(st.binary(max_size=200), st.integers(min_value=1, max_value=50))
def test_decoder_never_crashes_and_splits_frames(junk, step):
    good = proto.frame(proto.MSG, junk) + proto.frame(proto.PING)
    for data in (good, junk):
        dec = proto.FrameDecoder()
        out = []
        try:
            for i in range(0, len(data), step):
                out += dec.feed(data[i:i + step])
        except proto.RemoteProtocolError:
            assert data is junk
            continue
        if data is good:
            assert out == [(proto.MSG, junk), (proto.PING, b"")]


def test_check_hello():
    h = proto.Hello(proto.VERSION, 3, "c1", b"x" * 16)
    assert proto.check_hello(h, cluster="c1", expected={3}) is None
    assert "not ours" in proto.check_hello(h, cluster="c2", expected={3})
    assert "node number 3" in proto.check_hello(h, cluster="c1", expected={1})
    assert proto.decode_hello(proto.encode_hello(h)[8:]) == h
    with pytest.raises(proto.RemoteProtocolError):
        proto.decode_hello(b"\x01\x03\x09c1")
