"""The node-local lock cache (locking/cache.py) on two real daemons."""
from __future__ import annotations

import struct

import trio

from replfs.locking.cache import LockCache
from replfs.locking.client import DlmClient
from replfs.locking.dlm.modes import Mode

from .test_cluster_pair import cluster  # noqa: F401  (fixture)


async def _pair(nursery, cluster, stack):  # noqa: F811
    a = await stack.enter_async_context(DlmClient.connect(nursery, cluster[0].rundir))
    b = await stack.enter_async_context(DlmClient.connect(nursery, cluster[1].rundir))
    with trio.fail_after(15):
        while not (await a.ipc.call("cluster-status"))[0]["connected"]:
            await trio.sleep(0.05)
    await a.join("fs")
    await b.join("fs")
    return a, b


def _lvb(v: int) -> bytes:
    return struct.pack(">Q", v).ljust(64, b"\0")


async def test_cached_lock_is_reused_without_asking_the_daemon(cluster, nursery):  # noqa: F811
    from contextlib import AsyncExitStack
    async with AsyncExitStack() as stack:
        a, _ = await _pair(nursery, cluster, stack)
        cache = LockCache(a, "fs")
        with trio.fail_after(15):
            for _ in range(50):
                async with cache.hold("inode-1", Mode.PR):
                    pass
            async with cache.hold("inode-1", Mode.EX):
                pass
            for _ in range(20):
                async with cache.hold("inode-1", Mode.PR):
                    pass           # EX covers PR: still no request
        assert cache.stats["requests"] == 1
        assert cache.stats["converts"] == 1
        assert cache.stats["hits"] == 69
        dump = await a.lockdump("fs")
        assert dump["fs"][0]["granted"] == "EX"


async def test_remote_request_downconverts_after_the_local_holder_leaves(cluster, nursery):  # noqa: F811
    from contextlib import AsyncExitStack
    async with AsyncExitStack() as stack:
        a, b = await _pair(nursery, cluster, stack)
        events = []

        async def flush(name, old, new):
            events.append((name, old, new))

        ca = LockCache(a, "fs", on_downconvert=flush)
        cb = LockCache(b, "fs")
        with trio.fail_after(15):
            e = await ca.acquire("sb", Mode.EX)
            ca.set_lvb(e, _lvb(41))
            got = trio.Event()

            async def other():
                async with cb.hold("sb", Mode.PR) as eb:
                    assert eb.lvb[:8] == _lvb(41)[:8]
                    got.set()

            nursery.start_soon(other)
            await trio.sleep(0.5)
            assert not got.is_set(), "the remote reader got in while EX was held here"
            assert events == []
            ca.release(e, Mode.EX)
            await got.wait()
            while ca.entries["sb"].blocked is not None:   # our convert's reply
                await trio.sleep(0.01)
        # a reader elsewhere: EX drops to PR here, not further
        assert events == [("sb", Mode.EX, Mode.PR)]
        assert ca.entries["sb"].mode == Mode.PR


async def test_counter_with_cached_locks_from_both_nodes(cluster, nursery):  # noqa: F811
    from contextlib import AsyncExitStack
    async with AsyncExitStack() as stack:
        a, b = await _pair(nursery, cluster, stack)
        caches = [LockCache(a, "fs"), LockCache(b, "fs")]
        n = 25

        async def worker(cache):
            for _ in range(n):
                async with cache.hold("counter", Mode.EX) as e:
                    v = struct.unpack_from(">Q", e.lvb)[0] if e.lvb_valid and e.lvb else 0
                    await trio.sleep(0)
                    cache.set_lvb(e, _lvb(v + 1))

        with trio.fail_after(60):
            async with trio.open_nursery() as n2:
                for c in caches:
                    n2.start_soon(worker, c)
            async with caches[0].hold("counter", Mode.PR) as e:
                assert struct.unpack_from(">Q", e.lvb)[0] == 2 * n
        assert sum(c.stats["downconverts"] for c in caches) >= 1
