"""Randomized fault runs of the real replication driver (protocol C).

Two resources over loopback TCP, alpha reaching beta through the fault
proxy.  A seeded random sequence of steps — writes, partitions, heals,
disconnects, switchovers, crashes of the Primary (with or without a
failover to the peer) — runs against a model of what was acknowledged.
Invariants:

* every write that returned success is on the Primary after any crash or
  failover, and on both disks once they are connected and in sync;
* a write that failed or was cut short by a crash may or may not be there
  (either value is allowed), nothing else;
* at the end both backing disks are identical.

A failing run names its seed.  A few seeds run with `make test`; many more
with `make soak`.
"""
import dataclasses
import os
import random

import pytest
import trio

from replfs.blockrepl.core.states import ConnState, DiskState, Role
from replfs.blockrepl.driver.disk import create_md
from replfs.blockrepl.driver.resource import Resource
from tests.harness.proxy import FaultProxy
from tests import soak

from .test_resource_faults import with_peer_address
from .test_resource_pair import make_conf, md5, wait_for

BLOCKS = 64


class DeadDevice:
    """What a killed process's disk looks like to code still running in it:
    nothing it does reaches the disk any more."""
    size = 0
    INLINE_MAX = 0          # no request is done at once: each waits for ever

    def write_now(self, offset, data):
        raise AssertionError("a dead disk is never written at once (INLINE_MAX 0)")

    def read_now(self, offset, length):
        raise AssertionError("a dead disk is never read at once (INLINE_MAX 0)")

    async def write(self, offset, data):
        await trio.sleep_forever()

    async def read(self, offset, length):
        await trio.sleep_forever()

    async def flush(self):
        await trio.sleep_forever()

    async def discard(self, offset, length):
        await trio.sleep_forever()

    async def close(self):
        pass


class Node:
    def __init__(self, nursery, conf, name):
        self.nursery, self.conf, self.name = nursery, conf, name
        self.res: Resource | None = None
        self.scope: trio.CancelScope | None = None
        self.crashing = False

    async def start(self):
        self.crashing = False
        self.res = Resource(self.conf, self.name)
        done = trio.Event()

        async def host(task_status=trio.TASK_STATUS_IGNORED):
            with trio.CancelScope() as scope:
                self.scope = scope
                try:
                    await self.res.run(task_status=task_status)
                finally:
                    done.set()
        self._done = done
        await self.nursery.start(host)
        await self.res.attach()
        self.res.connect()

    async def crash(self):
        """kill -9: no more disk writes, no more packets, no cleanup, and no
        completion reaches an application any more (its connection to the
        daemon died with it)."""
        self.crashing = True
        res = self.res
        if res.disk is not None:
            res.disk.data = DeadDevice()
            res.disk.meta = DeadDevice()
        chan = res._chan
        if chan is not None:
            chan.stream.socket.close()
        self.scope.cancel()
        await self._done.wait()


class Model:
    """Per block: the set of values the block may hold now."""

    def __init__(self, initial: bytes):
        self.possible = {i: {initial} for i in range(BLOCKS)}

    def acked(self, block, value):
        self.possible[block] = {value}

    def uncertain(self, block, value):
        self.possible[block] = self.possible[block] | {value}

    def check(self, block, actual, seed, where):
        assert actual in self.possible[block], (
            f"seed {seed}: block {block} on {where} holds a value no write left there "
            f"(an acknowledged write was lost or data was corrupted)")
        # Once read back, the block holds exactly that value.
        self.possible[block] = {actual}


async def run_seed(seed, tmp_path, steps):
    rnd = random.Random(seed)
    conf = make_conf(tmp_path, net=(("ping-timeout", "5"), ("timeout", "10")))
    beta = conf.host("beta")
    async with trio.open_nursery() as nursery:
        proxy = await nursery.start(FaultProxy(("127.0.0.3", 0), (beta.address, beta.port)).run)
        conf_a = with_peer_address(conf, "beta", *proxy.listen_address)
        for h in conf.hosts:
            create_md(h)
        nodes = {"alpha": Node(nursery, conf_a, "alpha"), "beta": Node(nursery, conf, "beta")}
        for n in nodes.values():
            await n.start()
        a, b = nodes["alpha"].res, nodes["beta"].res
        await wait_for(lambda: a.cstate is ConnState.Connected)
        await a.primary(force=True)

        def synced():
            x, y = nodes["alpha"].res, nodes["beta"].res
            return (x.cstate is ConnState.Connected and y.cstate is ConnState.Connected
                    and x.dstate is DiskState.UpToDate and y.dstate is DiskState.UpToDate
                    and x.pdsk is DiskState.UpToDate and y.pdsk is DiskState.UpToDate)
        await wait_for(synced, 30)
        model = Model(bytes(4096))
        primary = "alpha"
        partitioned = False
        counter = 0

        async def write_some(node, n_writes):
            nonlocal counter
            res = nodes[node].res
            for _ in range(n_writes):
                block = rnd.randrange(BLOCKS)
                counter += 1
                value = counter.to_bytes(8, "little") * 512
                model.uncertain(block, value)
                print(f"  write {counter} -> block {block} on {node}")
                try:
                    with trio.fail_after(15):
                        await res.write(block * 4096, value)
                except OSError:
                    continue
                if nodes[node].crashing:
                    continue   # completed inside a dead process: nobody saw it
                model.acked(block, value)
                print(f"  acked {counter}")

        for step in range(steps):
            action = rnd.choice(["write", "write", "write", "partition", "disconnect",
                                 "switch", "crash", "crash-failover"])
            other = "beta" if primary == "alpha" else "alpha"
            print(f"seed {seed} step {step}: {action} (primary {primary})")
            if action == "write":
                await write_some(primary, rnd.randint(1, 6))
            elif action == "partition" and not partitioned:
                proxy.partition("both")
                partitioned = True
                await write_some(primary, 2)   # completes once the link is declared dead
                proxy.heal("both")
                partitioned = False
                await wait_for(synced, 30)
            elif action == "disconnect":
                await nodes[other].res.disconnect()
                await write_some(primary, 3)
                nodes[other].res.connect()
                await wait_for(synced, 30)
            elif action == "switch":
                await wait_for(synced, 30)
                await nodes[primary].res.secondary()
                await nodes[other].res.primary()
                primary = other
            elif action in ("crash", "crash-failover"):
                await wait_for(synced, 30)
                # Crash in the middle of a write stream.
                async with trio.open_nursery() as wn:
                    wn.start_soon(write_some, primary, 50)
                    await trio.sleep(rnd.uniform(0, 0.05))
                    await nodes[primary].crash()
                    wn.cancel_scope.cancel()
                survivor = other
                if action == "crash-failover":
                    await wait_for(lambda: nodes[survivor].res.cstate is not ConnState.Connected)
                    await nodes[survivor].res.primary()
                    for blk in range(BLOCKS):
                        model.check(blk, await nodes[survivor].res.read(blk * 4096, 4096),
                                    seed, f"{survivor} after failover")
                    await write_some(survivor, 3)
                    await nodes[primary].start()
                    primary = survivor
                else:
                    await nodes[primary].start()
                    await wait_for(synced, 30)
                    await nodes[primary].res.primary()
                await wait_for(synced, 30)
        await wait_for(synced, 30)
        p, s = nodes[primary].res, nodes["beta" if primary == "alpha" else "alpha"].res
        for blk in range(BLOCKS):
            model.check(blk, await p.read(blk * 4096, 4096), seed, f"{primary} at the end")
        assert md5(p.me.disk, p.size) == md5(s.me.disk, s.size), f"seed {seed}: disks differ"
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("seed", [1])
async def test_random_faults(seed, tmp_path):
    await run_seed(seed, tmp_path, steps=12)


@pytest.mark.soak(twin="test_random_faults")
@pytest.mark.parametrize("seed", soak.seeds(range(100, 160)))
async def test_random_faults_soak(seed, tmp_path):
    await run_seed(seed, tmp_path, steps=soak.size(40, 12))
