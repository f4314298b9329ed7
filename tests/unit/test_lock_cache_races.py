"""LockCache races between two nodes, on real DLM domains in one process.

Each test builds node 0 and node 1 (domain "d"): a ``DlmDomain`` per node,
joined by ordered in-memory pipes with a fixed latency (plus seeded
jitter), an ``InProcessDlm`` and a ``LockCache`` over it whose hooks
record what they are called with.  Time is virtual (``autojump_clock``),
so "still waiting after 5 s" costs nothing and a hang ends in
``fail_after`` at once.  What is checked: the conversion deadlock, the
refresh hook, BASTs that find the entry busy, waiters of a
down-conversion, a write-back hook that fails, and no holder slipping in
while a conversion runs; and two bugs found on the way (a stronger BAST lost
during a down-conversion, a refused down-conversion retried in a busy loop).
"""
from __future__ import annotations

import errno
import itertools
import math
import random
from contextlib import asynccontextmanager
from functools import partial

import pytest
import trio

from replfs.blockdev import BlockDeviceError
from replfs.locking.cache import LockCache
from replfs.locking.dlm.core import master_of
from replfs.locking.dlm.modes import EX, NL, PR
from replfs.locking.dlmdriver import DlmDomain
from replfs.locking.inproc import InProcessDlm

DOMAIN = "d"


def mastered_by(node: int) -> str:
    """A lock name whose master is ``node`` (the other node's requests
    cross the pipe, its own are served without one)."""
    return next(n for n in (f"res{i}" for i in itertools.count())
                if master_of(n, [0, 1]) == node)


class Node:
    """One user of a node's domain: a LockCache recording its hook calls;
    ``hook`` runs inside ``on_downconvert`` (a slow or failing write-back)."""

    def __init__(self, dom: DlmDomain, nursery: trio.Nursery):
        self.dom, self.hook = dom, None
        self.downs: list[tuple] = []
        self.refreshes: list[tuple] = []
        self.cache = LockCache(InProcessDlm({DOMAIN: dom}, nursery), DOMAIN,
                               on_downconvert=self._down, nursery=nursery,
                               on_refresh=lambda *a: self.refreshes.append(a))

    async def _down(self, name, old, new) -> None:
        self.downs.append((name, old, new))
        if self.hook is not None:
            await self.hook()


@asynccontextmanager
async def two_nodes(*, seed: int = 0, latency: float = 0.001, jitter: float = 0.001):
    """Yields (nursery, [node0, node1]); everything stops on exit."""
    async with trio.open_nursery() as nursery:
        doms: dict[int, DlmDomain] = {}

        def pipe_from(src: int):
            tx, rx = trio.open_memory_channel(math.inf)
            rng = random.Random(seed * 31 + src)

            async def pump():
                async for data in rx:
                    await trio.sleep(latency + rng.random() * jitter)
                    await doms[1 - src].receive(src, data)

            async def send(to, data):
                await tx.send(data)

            nursery.start_soon(pump)
            return send

        async def unstick():
            # A request the lock manager has not answered may not be
            # cancellable (a cache may shield it): when the test ends
            # (fail_after included), fencing refuses them, so that it ends.
            try:
                await trio.sleep_forever()
            finally:
                for dom in doms.values():
                    if any(lk["requested"] for lk in dom.lockdump()):
                        await dom.fence("a request was still waiting when the test ended")

        for me in (0, 1):
            doms[me] = DlmDomain(DOMAIN, me, [0, 1], pipe_from(me))
            await nursery.start(doms[me].run)
        nursery.start_soon(unstick)
        yield nursery, [Node(doms[0], nursery), Node(doms[1], nursery)]
        nursery.cancel_scope.cancel()


async def hold(nd: Node, name: str, mode, secs: float = 0.0, *, log=None, done=None):
    """Hold ``name`` on ``nd`` for ``secs``: appends ``log[1]`` to ``log[0]``
    on the way in, sets the Event ``done`` on the way out."""
    async with nd.cache.hold(name, mode):
        if log is not None:
            log[0].append(log[1])
        await trio.sleep(secs)
    if done is not None:
        done.set()


def slow_writeback(started: trio.Event, finished: list):
    async def hook():
        started.set()
        await trio.sleep(1)
        finished.append(trio.current_time())
    return hook


async def failing_writeback():
    raise OSError(5, "write-back failed")


async def test_conversion_deadlock_is_broken_by_giving_pr_up(autojump_clock):
    deadlocks = 0
    for seed in range(8):
        name = f"res{seed}"                 # masters alternate between the nodes
        with trio.fail_after(60):
            async with two_nodes(seed=seed) as (_, nodes):
                for nd in nodes:            # both cache PR, no local holders
                    await hold(nd, name, PR)
                inside, most = [0], [0]

                async def writer(nd):
                    async with nd.cache.hold(name, EX):
                        inside[0] += 1
                        most[0] = max(most[0], inside[0])
                        await trio.sleep(0.01)
                        inside[0] -= 1

                async with trio.open_nursery() as n:
                    for nd in nodes:
                        n.start_soon(writer, nd)
                assert most[0] == 1, f"seed {seed}: both nodes held EX at once"
                for nd in nodes:
                    d = nd.cache.stats.get("deadlocks", 0)
                    if d:       # the refused side gave its PR up before asking again
                        assert nd.downs[:1] == [(name, PR, NL)], (seed, nd.downs)
                    deadlocks += d
    assert deadlocks >= 1, "no round ran into the conversion deadlock"


async def test_on_refresh_only_when_the_lock_comes_back(autojump_clock):
    name = mastered_by(1)
    with trio.fail_after(60):
        async with two_nodes() as (_, (a, b)):
            async with a.cache.hold(name, PR):
                assert a.refreshes == [(name, PR)]      # before the holder got in
            await hold(a, name, PR)                     # a hit
            assert a.cache.stats["hits"] == 1 and a.refreshes == [(name, PR)]
            await hold(b, name, EX)                     # a drops to NL
            assert a.downs == [(name, PR, NL)] and b.refreshes == [(name, EX)]
            async with a.cache.hold(name, PR):          # back from NL: refreshed
                assert a.refreshes == [(name, PR), (name, PR)]
            await hold(b, name, PR)                     # b went EX -> PR: a hit
            await hold(b, name, EX)                     # PR -> EX: nothing to re-read
            assert b.downs == [(name, EX, PR)] and b.refreshes == [(name, EX)]


async def test_a_bast_that_finds_a_conversion_under_way_is_acted_on_later(autojump_clock):
    name = mastered_by(1)
    with trio.fail_after(60):
        async with two_nodes(latency=0.01, jitter=0) as (nursery, (a, b)):
            await hold(a, name, PR)
            e, order, b_done = a.cache.entries[name], [], trio.Event()
            nursery.start_soon(partial(hold, a, name, EX, 1, log=(order, "a")))  # at 0.01
            await trio.sleep(0.001)
            nursery.start_soon(partial(hold, b, name, EX, log=(order, "b"), done=b_done))
            await trio.sleep(0.014)     # b's BAST reached a at 0.011, a's grant comes at 0.02
            assert e.busy.locked() and e.blocked == EX, e
            await b_done.wait()
            assert order == ["a", "b"] and a.downs == [(name, EX, NL)]


@pytest.mark.parametrize("remote", [PR, EX], ids=["PR", "EX"])
@pytest.mark.parametrize("queued", ["during", "before"])
async def test_waiters_of_a_down_conversion_all_get_in(autojump_clock, remote, queued):
    """"during": readers come while a's write-back runs.  "before": they
    wait for a local EX writer when the BAST comes; when it leaves, each
    reader woken before the down-conversion took the entry starts one of
    its own (trio runs them first in about half the rounds); those find
    nothing left to do and return early, and must wake the readers too."""
    name = mastered_by(1)
    for _ in range(8):
        with trio.fail_after(60):
            async with two_nodes() as (nursery, (a, b)):
                started, hook_done, got_in = trio.Event(), [], []

                async def reader():
                    async with a.cache.hold(name, PR):
                        got_in.append(trio.current_time())
                        await trio.sleep(0.01)

                await hold(a, name, EX)
                a.hook = slow_writeback(started, hook_done)
                async with trio.open_nursery() as n:
                    if queued == "during":
                        nursery.start_soon(hold, b, name, remote, 0.5)
                        await started.wait()
                        for _ in range(4):
                            n.start_soon(reader)
                    else:
                        async with a.cache.hold(name, EX):
                            for _ in range(4):
                                n.start_soon(reader)
                            await trio.sleep(0.1)
                            nursery.start_soon(hold, b, name, remote, 0.5)
                            await trio.sleep(0.1)       # the BAST is in: blocked
                            assert a.cache.entries[name].blocked is not None and not got_in
                assert len(got_in) == 4 and min(got_in) >= hook_done[0]


async def test_a_failed_writeback_keeps_the_lock_and_the_nursery(autojump_clock, caplog):
    name = mastered_by(0)
    with trio.fail_after(60):
        async with two_nodes() as (nursery, (a, b)):
            await hold(a, name, EX)
            a.hook = failing_writeback
            b_done = trio.Event()
            nursery.start_soon(partial(hold, b, name, EX, done=b_done))
            await trio.sleep(5)
            e = a.cache.entries[name]
            assert not b_done.is_set() and e.mode == EX and e.lock.mode == EX
            assert a.downs == [(name, EX, NL)] and a.cache.stats["refused"] == 1
            assert "must be fenced" in caplog.text
            a.hook = None
            await a.cache.drop_all()        # node 0 leaves (unmount): b gets it
            await b_done.wait()


async def test_no_holder_slips_in_while_a_conversion_runs(autojump_clock):
    name = mastered_by(1)
    with trio.fail_after(60):
        async with two_nodes() as (nursery, (a, b)):
            await hold(a, name, PR)
            b_holds, b_release, order = trio.Event(), trio.Event(), []

            async def b_reader():
                async with b.cache.hold(name, PR):
                    b_holds.set()
                    await b_release.wait()

            nursery.start_soon(b_reader)
            await b_holds.wait()
            async with trio.open_nursery() as n:
                n.start_soon(partial(hold, a, name, EX, 0.1, log=(order, "writer")))
                await trio.sleep(0.1)       # PR -> EX waits for b's PR
                assert a.cache.entries[name].busy.locked()
                # a's PR would cover a reader: it must wait all the same
                n.start_soon(partial(hold, a, name, PR, log=(order, "reader")))
                await trio.sleep(1)
                assert order == [], "a holder got in while PR -> EX was under way"
                b_release.set()
            assert order == ["writer", "reader"]


async def test_a_stronger_bast_during_a_down_conversion_is_not_lost(autojump_clock):
    name = mastered_by(0)
    with trio.fail_after(60):
        async with two_nodes() as (nursery, (a, b)):
            b2 = Node(b.dom, nursery)       # a second user of node 1's domain
            started, b2_done = trio.Event(), trio.Event()
            await hold(a, name, EX)
            a.hook = slow_writeback(started, [])
            nursery.start_soon(hold, b, name, PR)
            await started.wait()            # a goes EX -> PR for b's reader...
            nursery.start_soon(partial(hold, b2, name, EX, done=b2_done))
            with trio.move_on_after(30):    # ...and b2 wants EX meanwhile
                await b2_done.wait()
            stuck = None if b2_done.is_set() else repr(a.cache.entries[name])
            await a.cache.drop_all()        # (lets b2 in, so that the test ends)
            await b2_done.wait()
            assert stuck is None, f"b2 waited 30 s for node 0's {stuck}"


async def test_a_refused_down_conversion_is_not_retried_in_a_busy_loop(autojump_clock):
    name = mastered_by(0)
    with trio.fail_after(60):
        async with two_nodes() as (nursery, (a, b)):
            calls, b_done = [], trio.Event()

            async def failing_writeback_counted():
                calls.append(trio.current_time())
                if len(calls) == 20:
                    a.hook = None           # ends the loop, so that the test ends
                await failing_writeback()

            await hold(a, name, EX)
            a.hook = failing_writeback_counted
            nursery.start_soon(partial(hold, b, name, EX, done=b_done))
            await trio.sleep(1)
            assert len(calls) == 1
            refused = []

            async def local_reader():
                try:
                    await hold(a, name, PR)
                except BlockDeviceError as e:
                    refused.append(e.errno)
            nursery.start_soon(local_reader)   # a local holder comes: refused, EIO
            await trio.sleep(1)
            assert refused == [errno.EIO]
            tried = len(calls)
            a.hook = None
            await a.cache.drop_all()        # (lets b in, so that the test ends)
            await b_done.wait()
            assert tried <= 2, f"on_downconvert called {tried} times, at t={calls[-1]:.3f}"
