"""Regression tests for bugs found in review of the replication driver.

Each test describes the interleaving that used to lose data, hang or
crash, and asserts the behaviour that must hold instead.
"""
import dataclasses
import logging
import os

import trio

from replfs.blockrepl.conf.model import Section
from replfs.blockrepl.core.states import ConnState, DiskState
from replfs.blockrepl.driver.disk import LocalDisk
from replfs.blockrepl.proto import packets as P
from tests.harness.proxy import FaultProxy

from .test_resource_faults import start_pair, synced, with_peer_address
from .test_resource_pair import Pair, fail_writes, make_conf, md5, wait_for



async def test_bad_packet_drops_the_connection_not_the_resource(tmp_path, nursery, caplog):
    """A ResyncAck far past the device end used to raise ValueError out of
    Resource.run."""
    caplog.set_level(logging.WARNING, logger="replfs")
    p = Pair(make_conf(tmp_path))
    await p.start(nursery)
    p.a.connect(); p.b.connect()
    await wait_for(p.connected)
    for bad in (P.ResyncAck(1 << 40, 4096), P.StateUpdate(200, 200), P.SyncDoneAck(),
                P.VerifyRequest(0, 4096, b"short")):
        chan = p.b._chan
        errors = caplog.text.count("protocol error")
        await chan.send(bad)
        await wait_for(lambda: caplog.text.count("protocol error") > errors, 10)
        # alpha dropped that connection; wait for a fresh one before the next
        await wait_for(lambda: p.connected() and p.b._chan is not chan, 30)
    # Both resources are alive and connect again.
    await wait_for(p.connected, 30)


async def test_protocol_a_write_stays_covered_until_the_peer_has_it(tmp_path, nursery):
    """Protocol A completes a write once it is in the socket; the activity
    log used to drop its extent right then, so a crash before the peer had
    it left the block neither on the peer nor marked anywhere."""
    conf = make_conf(tmp_path, protocol="A", net=(("timeout", "20"), ("ping-timeout", "20")))
    conf = dataclasses.replace(conf, disk=Section((("al-extents", "1"),)))
    beta = conf.host("beta")
    proxy = await nursery.start(FaultProxy(("127.0.0.3", 0), (beta.address, beta.port)).run)
    a, b = await start_pair(nursery, with_peer_address(conf, "beta", *proxy.listen_address), conf)
    a.connect(); b.connect()
    await wait_for(lambda: a.cstate is ConnState.Connected)
    await a.primary(force=True)
    await wait_for(lambda: synced(a, b), 30)
    proxy.drop("a->b")
    await a.write(0, b"\x5a" * 4096)          # complete for the caller, not on beta

    async def crash_view() -> LocalDisk:
        d = LocalDisk(a.me, 1)
        await d.load()
        await d.close()
        return d
    # Whenever a restart would happen from now on, block 0 is accounted for:
    # the activity log still covers extent 0 ...
    assert (await crash_view()).bitmap.test(0)
    # ... and a write to another extent cannot evict it before the peer has
    # block 0 or the bitmap records that it lacks it.
    with trio.fail_after(30):
        await a.write(8 << 20, b"\x11" * 4096)
    assert (await crash_view()).bitmap.test(0)


async def test_handshake_and_first_unreplicated_write_agree(tmp_path, nursery):
    """A write that could not be replicated used to start a new generation
    after this node had sent its Params, so the two sides decided
    differently and one hung in WFBitMapS."""
    conf = dataclasses.replace(make_conf(tmp_path), disk=Section((("al-extents", "1"),)))
    p = Pair(conf)
    await p.start(nursery)
    a, b = p.a, p.b
    a.connect(); b.connect()
    await wait_for(p.connected)
    await a.primary(force=True)
    await wait_for(p.in_sync, 30)
    await a.write(0, b"\1" * 4096)
    await a.disconnect(); await b.disconnect()
    orig = a.disk.write_al

    async def slow_write_al():
        await orig()
        await trio.sleep(0.3)             # the handshake runs meanwhile
    a.disk.write_al = slow_write_al
    nursery.start_soon(a.write, 8 << 20, b"\x77" * 4096)
    await trio.sleep(0.05)
    a.connect(); b.connect()
    await wait_for(p.in_sync, 30)
    with trio.fail_after(10):
        await a.write(12 << 20, b"\x99" * 4096)
    assert md5(a.me.disk, a.size) == md5(b.me.disk, b.size)


async def test_primary_sync_target_keeps_its_own_writes(tmp_path, nursery):
    """A Primary resyncing a re-attached disk (SyncTarget) used to let late
    resync chunks overwrite the newer data it had just written."""
    conf = make_conf(tmp_path, net=(("timeout", "60"), ("ping-timeout", "60")))
    # (a fixed rate, slow enough for the writes below to race the resync:
    # the dynamic controller would throttle it to c-min-rate while this
    # test writes, and it would last half a minute)
    conf = dataclasses.replace(conf, disk=Section((("resync-rate", "4M"),
                                                   ("c-plan-ahead", "0"))))
    beta = conf.host("beta")
    proxy = await nursery.start(FaultProxy(("127.0.0.3", 0), (beta.address, beta.port)).run)
    a, b = await start_pair(nursery, with_peer_address(conf, "beta", *proxy.listen_address), conf)
    a.connect(); b.connect()
    await wait_for(lambda: a.cstate is ConnState.Connected)
    await a.primary(force=True)
    await wait_for(lambda: synced(a, b), 30)
    fail_writes(a.disk.data)
    await a.write(0, os.urandom(4096))
    await wait_for(lambda: a.dstate is DiskState.Diskless and b.pdsk is DiskState.Diskless)
    for i in range(8):
        await a.write(i << 20, os.urandom(1 << 20))
    proxy.delay("b->a", 300)
    await a.attach()
    await wait_for(lambda: a.cstate is ConnState.SyncTarget, 30)
    written = {}
    rounds = 0
    while a.cstate is ConnState.SyncTarget and rounds < 40:
        rounds += 1
        blocks = []
        for first, count in a.disk.bitmap.runs():
            blocks.extend(range(first, min(first + count, first + 16)))
            if len(blocks) >= 16:
                break
        async with trio.open_nursery() as n:
            for blk in blocks[:16]:
                data = os.urandom(4096)
                written[blk * 4096] = data
                n.start_soon(a.write, blk * 4096, data)
            # a partial-block write into a stale block too
            if blocks:
                off = blocks[-1] * 4096 + 100
                n.start_soon(a.write, off, b"partial")
        if blocks:
            written[blocks[-1] * 4096] = None  # checked below as a whole
        await trio.sleep(0.05)
    proxy.delay("b->a", 0)
    await wait_for(lambda: synced(a, b), 60)
    for off, data in written.items():
        got = await a.read(off, 4096)
        if data is not None:
            assert got == data, f"block at {off} lost the Primary's write"
    assert md5(a.me.disk, a.size) == md5(b.me.disk, b.size)


async def test_peer_persists_out_of_sync_bits_before_acknowledging(tmp_path, nursery):
    """With a Diskless Primary the Secondary held the only copy but marked
    it out of sync in memory only: a crash of the Secondary forgot it."""
    conf = make_conf(tmp_path)
    a, b = await start_pair(nursery, conf, conf)
    a.connect(); b.connect()
    await wait_for(lambda: a.cstate is ConnState.Connected)
    await a.primary(force=True)
    await wait_for(lambda: synced(a, b), 30)
    fail_writes(a.disk.data)
    await a.write(0, os.urandom(4096))
    await wait_for(lambda: a.dstate is DiskState.Diskless and b.pdsk is DiskState.Diskless)
    await a.write(40960, os.urandom(4096))
    d = LocalDisk(b.me, 1)            # what beta would find after kill -9 now
    await d.load()
    await d.close()
    assert d.bitmap.test(10) and d.bitmap.test(0)
