"""DlmDomain (trio host of DlmNode) over real o2net connections on loopback."""
from __future__ import annotations

import struct

import pytest
import trio

from replfs.locking.cluster_conf import Timeouts
from replfs.locking.dlmdriver import DlmDomain, LockRefused
from replfs.locking.dlm.modes import EX, NL, PR
from replfs.locking.net.driver import O2Net
from replfs.locking.cluster_conf import Node


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_nodes():
    return (Node("alpha", 0, "127.0.0.1", free_port(), "c1"),
            Node("beta", 1, "127.0.0.1", free_port(), "c1"))

FAST = Timeouts(idle_timeout_ms=1000, keepalive_delay_ms=200, reconnect_delay_ms=50)


async def pair(nursery):
    nodes = make_nodes()
    doms, nets = {}, {}
    ups = {0: trio.Event(), 1: trio.Event()}
    for n in nodes:
        me = n.number

        async def on_message(src, payload, me=me):
            await doms[me].receive(src, payload)

        async def on_up(src, me=me):
            ups[me].set()

        async def on_down(src, me=me):
            await doms[me].node_down(src)

        nets[me] = O2Net(me=n, nodes=nodes, cluster="c1", timeouts=FAST,
                         on_message=on_message, on_up=on_up, on_down=on_down)
        doms[me] = DlmDomain("d", me, [0, 1], nets[me].send)
    for me in (0, 1):
        await nursery.start(nets[me].run)
        await nursery.start(doms[me].run)
    with trio.fail_after(5):
        await ups[0].wait()
        await ups[1].wait()
    return doms, nets


async def test_counter_under_ex_is_exact(nursery):
    doms, _ = await pair(nursery)
    n = 25

    async def worker(d):
        for _ in range(n):
            lk = await d.lock("counter", EX)
            value = struct.unpack_from(">Q", lk.lvb.ljust(8, b"\0"))[0] if lk.lvb_valid else 0
            await trio.sleep(0)
            await d.unlock(lk, lvb=struct.pack(">Q", value + 1).ljust(len(lk.lvb) or 64, b"\0"))

    with trio.fail_after(20):
        async with trio.open_nursery() as n2:
            n2.start_soon(worker, doms[0])
            n2.start_soon(worker, doms[1])
        lk = await doms[0].lock("counter", PR)
    assert struct.unpack_from(">Q", lk.lvb)[0] == 2 * n


async def test_bast_and_downconvert_unblock_other_node(nursery):
    doms, _ = await pair(nursery)
    basts = []

    async def on_bast(lk, blocked):
        basts.append(blocked)
        await doms[0].convert(lk, NL)

    with trio.fail_after(10):
        held = await doms[0].lock("r", EX, on_bast=on_bast)
        with pytest.raises(LockRefused) as e:
            await doms[1].lock("r", PR, noqueue=True)
        assert e.value.reason == "EAGAIN"
        got = await doms[1].lock("r", PR)
    assert got.mode == PR and basts and held.mode == NL


async def test_timeout_refused(nursery):
    doms, _ = await pair(nursery)
    with trio.fail_after(10):
        await doms[0].lock("t", EX)
        with pytest.raises(LockRefused) as e:
            await doms[1].lock("t", EX, timeout=0.3)
    assert e.value.reason == "ETIMEDOUT"


async def test_survivor_gets_locks_of_dead_node(nursery):
    doms, nets = await pair(nursery)
    with trio.fail_after(10):
        await doms[1].lock("x", EX)
        waiting = trio.Event()
        result = []

        async def want():
            waiting.set()
            result.append(await doms[0].lock("x", EX))

        nursery.start_soon(want)
        await waiting.wait()
        await nets[0].disconnect(1)  # the membership layer declares node 1 dead
        while not result:
            await trio.sleep(0.02)
    assert result[0].mode == EX


async def test_fence_refuses(nursery):
    doms, _ = await pair(nursery)
    await doms[0].fence("lost quorum")
    with pytest.raises(LockRefused) as e:
        await doms[0].lock("y", PR)
    assert e.value.reason == "FENCED"
