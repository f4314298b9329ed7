"""The replication engine under faults: partitions, strangers, garbage,
wrong secrets, silent corruption (online verify), protocols A and B.

Two resource drivers run in this trio process and talk real TCP on
loopback; alpha reaches beta through the fault proxy from tests/harness.
"""
import dataclasses
import hashlib
import logging
import os

import pytest
import trio

from replfs.blockrepl.conf.model import Section
from replfs.blockrepl.core.states import ConnState, DiskState
from replfs.blockrepl.driver.disk import create_md
from replfs.blockrepl.driver.resource import Resource
from replfs.blockrepl.proto import packets as P
from tests.harness.proxy import FaultProxy

from .test_resource_pair import fail_writes, make_conf, md5, wait_for


def with_peer_address(conf, node, address, port):
    hosts = tuple(dataclasses.replace(h, address=address, port=port) if h.name == node else h
                  for h in conf.hosts)
    return dataclasses.replace(conf, hosts=hosts)


async def start_pair(nursery, conf_a, conf_b):
    for h in conf_a.hosts:
        create_md(h)
    a, b = Resource(conf_a, "alpha"), Resource(conf_b, "beta")
    for r in (a, b):
        await nursery.start(r.run)
        await r.attach()
    return a, b


def synced(a, b):
    return (a.cstate is ConnState.Connected and b.cstate is ConnState.Connected
            and a.dstate is DiskState.UpToDate and b.dstate is DiskState.UpToDate
            and a.pdsk is DiskState.UpToDate)


async def test_partition_during_writes_then_heal_resyncs(tmp_path, nursery):
    conf = make_conf(tmp_path, net=(("timeout", "20"),))
    beta = conf.host("beta")
    proxy = await nursery.start(FaultProxy(("127.0.0.3", 0), (beta.address, beta.port)).run)
    conf_a = with_peer_address(conf, "beta", *proxy.listen_address)
    a, b = await start_pair(nursery, conf_a, conf)
    a.connect(); b.connect()
    await wait_for(lambda: a.cstate is ConnState.Connected)
    await a.primary(force=True)
    await wait_for(lambda: synced(a, b), 30)
    proxy.partition("both")
    # Protocol C writes cannot complete while the peer is unreachable; they
    # complete (marked out of sync) once the connection is declared dead.
    with trio.fail_after(20):
        for i in range(8):
            await a.write(i * 1024 * 1024, os.urandom(4096))
    assert a.cstate is not ConnState.Connected
    assert a.disk.bitmap.count >= 8
    proxy.heal("both")
    await wait_for(lambda: synced(a, b), 30)
    assert a.disk.bitmap.count == 0
    assert md5(a.me.disk, a.size) == md5(b.me.disk, b.size)


async def _hello(port, resource, node):
    s = await trio.open_tcp_stream("127.0.0.2", port)
    await s.send_all(P.encode(P.Hello.make(P.PROTOCOL_VERSION, b"n" * 16, resource, node)))
    return s


async def test_strangers_and_garbage_are_refused_and_the_real_peer_still_connects(
        tmp_path, nursery, caplog):
    caplog.set_level(logging.WARNING, logger="replfs")
    conf = make_conf(tmp_path)
    a, b = await start_pair(nursery, conf, conf)
    b.connect()
    await wait_for(lambda: b.cstate is ConnState.WFConnection)
    port = conf.host("beta").port
    # A node that is not our peer.
    s = await _hello(port, "r0", "mallory")
    await wait_for(lambda: "wrong peer" in caplog.text)
    await s.aclose()
    # Garbage instead of a packet.
    s = await trio.open_tcp_stream("127.0.0.2", port)
    await s.send_all(os.urandom(64))
    await wait_for(lambda: "bad packet magic" in caplog.text or "handshake failed" in caplog.text)
    await s.aclose()
    await wait_for(lambda: b.cstate is ConnState.WFConnection)
    a.connect()
    await wait_for(lambda: a.cstate is ConnState.Connected and b.cstate is ConnState.Connected)


async def test_shared_secret_mismatch_is_refused(tmp_path, nursery, caplog):
    caplog.set_level(logging.WARNING, logger="replfs")
    conf = make_conf(tmp_path)
    secret_a = dataclasses.replace(conf, net=dataclasses.replace(
        conf.net, options=conf.net.options + (("shared-secret", "one"),)))
    secret_b = dataclasses.replace(conf, net=dataclasses.replace(
        conf.net, options=conf.net.options + (("shared-secret", "two"),)))
    a, b = await start_pair(nursery, secret_a, secret_b)
    a.connect(); b.connect()
    await wait_for(lambda: "Authentication of peer failed" in caplog.text)
    assert a.cstate is not ConnState.Connected


@pytest.mark.parametrize("alg", [None, "sha256"])
async def test_online_verify_finds_silent_corruption_and_reconnect_repairs_it(tmp_path, nursery,
                                                                             alg):
    conf = make_conf(tmp_path, net=(("verify-alg", alg),) if alg else ())
    a, b = await start_pair(nursery, conf, conf)
    a.connect(); b.connect()
    await wait_for(lambda: a.cstate is ConnState.Connected)
    await a.primary(force=True)
    await wait_for(lambda: synced(a, b), 30)
    # Flip bytes in one block of beta's backing file behind replfs's back.
    with open(b.me.disk, "r+b") as f:
        f.seek(5 * 4096 + 100)
        f.write(b"corrupt")
    await a.verify()
    def verified() -> bool:
        v = a.engine.counters()["verify"]
        return a.cstate is ConnState.Connected and v is not None and v.done >= a.size
    await wait_for(verified, 30)
    await wait_for(lambda: a.cstate is ConnState.Connected)
    assert a.disk.bitmap.count == 1
    assert a.disk.bitmap.test(5)
    await b.disconnect()
    b.connect()
    await wait_for(lambda: synced(a, b) and a.disk.bitmap.count == 0, 30)
    assert md5(a.me.disk, a.size) == md5(b.me.disk, b.size)


@pytest.mark.parametrize("protocol", ["A", "B"])
async def test_protocols_a_and_b_replicate(tmp_path, nursery, protocol):
    conf = make_conf(tmp_path, protocol=protocol)
    a, b = await start_pair(nursery, conf, conf)
    a.connect(); b.connect()
    await wait_for(lambda: a.cstate is ConnState.Connected)
    await a.primary(force=True)
    await wait_for(lambda: synced(a, b), 30)
    for i in range(50):
        await a.write(i * 8192, os.urandom(8192))
    await a.flush()
    # Every write is on the peer once the pending acks have drained.
    await wait_for(lambda: a.engine.counters()["pe"] == 0)
    assert md5(a.me.disk, a.size) == md5(b.me.disk, b.size)


async def test_epochs_keep_dependent_writes_in_order_on_the_peer(tmp_path, nursery):
    """Protocol A: write 2 is issued after write 1 completed on the Primary,
    so the peer must not let write 2 land before write 1, however slow
    write 1 is there."""
    conf = make_conf(tmp_path, protocol="A")
    a, b = await start_pair(nursery, conf, conf)
    a.connect(); b.connect()
    await wait_for(lambda: a.cstate is ConnState.Connected)
    await a.primary(force=True)
    await wait_for(lambda: synced(a, b), 30)
    landed = []
    real_write = b.disk.data.write

    async def slow_large_writes(offset, data):
        if len(data) > 64 * 1024:
            await trio.sleep(0.3)
        await real_write(offset, data)      # (which lands through write_now)
    real_write_now = b.disk.data.write_now

    def landing(offset, data):          # every write lands here, at once or in a thread
        real_write_now(offset, data)
        landed.append(offset)
    b.disk.data.write = slow_large_writes
    b.disk.data.write_now = landing
    await a.write(0, os.urandom(1024 * 1024))        # epoch n, slow on beta
    await a.write(2 * 1024 * 1024, os.urandom(4096))  # epoch n+1, fast
    await wait_for(lambda: len(landed) == 2)
    assert landed == [0, 2 * 1024 * 1024]


async def test_io_error_on_primary_detaches_and_peer_serves_then_reattach_resyncs(
        tmp_path, nursery, caplog):
    caplog.set_level(logging.WARNING, logger="replfs")
    conf = make_conf(tmp_path)
    a, b = await start_pair(nursery, conf, conf)
    a.connect(); b.connect()
    await wait_for(lambda: a.cstate is ConnState.Connected)
    await a.primary(force=True)
    await wait_for(lambda: synced(a, b), 30)
    written = {}
    for i in range(4):
        written[i * 4096] = os.urandom(4096)
        await a.write(i * 4096, written[i * 4096])

    fail_writes(a.disk.data)
    # The failing write still succeeds: the peer's disk has it (protocol C).
    written[8 * 4096] = os.urandom(4096)
    await a.write(8 * 4096, written[8 * 4096])
    assert "Local IO failed in write" in caplog.text
    await wait_for(lambda: a.dstate is DiskState.Diskless and b.pdsk is DiskState.Diskless)
    # Diskless Primary: writes and reads go through the peer.
    written[9 * 4096] = os.urandom(4096)
    await a.write(9 * 4096, written[9 * 4096])
    await a.flush()
    for off, data in written.items():
        assert await a.read(off, 4096) == data
    assert b.disk.bitmap.test(8) and b.disk.bitmap.test(9)
    # The disk comes back (replaced): attach, resync as SyncTarget while Primary.
    await a.attach()
    assert a.dstate is DiskState.Inconsistent
    await wait_for(lambda: synced(a, b), 30)
    assert a.role.value == "Primary"
    assert md5(a.me.disk, a.size) == md5(b.me.disk, b.size)
    for off, data in written.items():
        assert await a.read(off, 4096) == data


async def test_io_error_without_peer_fails_the_write_with_eio(tmp_path, nursery):
    conf = make_conf(tmp_path)
    a, b = await start_pair(nursery, conf, conf)
    await a.primary(force=True)

    fail_writes(a.disk.data)
    with pytest.raises(OSError) as e:
        await a.write(0, b"x" * 4096)
    assert e.value.errno == 5
    assert a.dstate in (DiskState.Failed, DiskState.Diskless)   # (Failed while it is released)
    await wait_for(lambda: a.dstate is DiskState.Diskless, 10)


def fencing_conf(tmp_path, handler_exit: int):
    conf = make_conf(tmp_path, net=(("timeout", "10"),))
    marker = tmp_path / "fenced"
    script = (f"echo \"$DRBD_RESOURCE $DRBD_PEERS\" > {marker}; sleep 0.3; "
              f"exit {handler_exit}")
    return dataclasses.replace(
        conf, disk=Section((("fencing", "resource-and-stonith"),)),
        handlers=Section((("fence-peer", script),))), marker


@pytest.mark.parametrize("handler_exit", [4, 1])
async def test_fencing_holds_writes_until_the_peer_is_fenced(tmp_path, nursery, handler_exit):
    conf, marker = fencing_conf(tmp_path, handler_exit)
    beta = conf.host("beta")
    proxy = await nursery.start(FaultProxy(("127.0.0.3", 0), (beta.address, beta.port)).run)
    a, b = await start_pair(nursery, with_peer_address(conf, "beta", *proxy.listen_address), conf)
    a.connect(); b.connect()
    await wait_for(lambda: a.cstate is ConnState.Connected)
    await a.primary(force=True)
    await wait_for(lambda: synced(a, b), 30)
    proxy.partition("both")
    done = trio.Event()

    async def writer():
        await a.write(0, b"f" * 4096)
        done.set()
    nursery.start_soon(writer)
    await wait_for(lambda: marker.exists(), 20)
    assert marker.read_text().split() == ["r0", "beta"]
    if handler_exit == 4:
        # Peer fenced: the write completes (marked out of sync) and the peer
        # is known to be Outdated.
        await wait_for(done.is_set, 20)
        assert a.pdsk is DiskState.Outdated and not a.io_suspended
    else:
        # Fencing failed: I/O stays suspended until the admin says so.
        await trio.sleep(1.0)
        assert a.io_suspended and not done.is_set()
        a.resume_io()
        await wait_for(done.is_set, 20)
    assert a.disk.bitmap.test(0)


async def test_verify_alg_must_agree(tmp_path, nursery, caplog):
    """Digests of different algorithms never match: a pair that disagrees
    on verify-alg does not connect (as with data-integrity-alg)."""
    caplog.set_level(logging.ERROR, logger="replfs")
    conf = make_conf(tmp_path, net=(("verify-alg", "sha256"),))
    other = dataclasses.replace(conf, net=Section(tuple(
        (k, "md5" if k == "verify-alg" else v) for k, v in conf.net.options)))
    a, b = await start_pair(nursery, conf, other)
    a.connect(); b.connect()
    await wait_for(lambda: a.cstate is ConnState.StandAlone
                   and "incompatible verify-alg settings" in caplog.text, 30)


async def test_on_congestion_pull_ahead_goes_ahead_and_resyncs(tmp_path, nursery, caplog):
    """Protocol A with on-congestion pull-ahead: with more than
    congestion-fill in flight the Primary goes Ahead (writes only marked for
    the peer, which is Behind and Outdated), and once the data in flight has
    drained it resyncs the peer; the disks end identical."""
    caplog.set_level(logging.INFO, logger="replfs")
    conf = make_conf(tmp_path, protocol="A",
                     net=(("on-congestion", "pull-ahead"), ("congestion-fill", "8s")))
    a, b = await start_pair(nursery, conf, conf)
    a.connect(); b.connect()
    await wait_for(lambda: a.cstate is ConnState.Connected)
    await a.primary(force=True)
    await wait_for(lambda: synced(a, b), 30)
    seen = set()

    async def watch():
        while True:
            seen.add((a.cstate, b.cstate, b.dstate))
            await trio.sleep(0.001)
    nursery.start_soon(watch)
    async with trio.open_nursery() as writers:
        for i in range(64):
            writers.start_soon(a.write, i * 4096, os.urandom(4096))
    assert "going Ahead" in caplog.text
    await wait_for(lambda: synced(a, b) and a.disk.bitmap.count == 0, 30)
    assert any(s[0] is ConnState.Ahead for s in seen), seen
    assert any(s[1] is ConnState.Behind and s[2] is DiskState.Outdated for s in seen), seen
    assert md5(a.me.disk, a.size) == md5(b.me.disk, b.size)


async def test_a_connection_flood_does_not_stop_replication(tmp_path, nursery):
    """Hundreds of connections to the replication ports -- silent ones and
    ones that send garbage -- while the pair replicates: every write goes
    on completing on the same session, and after a reconnect the real
    peer still gets in past the backlog of strangers."""
    conf = make_conf(tmp_path)
    a, b = await start_pair(nursery, conf, conf)
    b.connect()
    a.connect()
    await wait_for(lambda: a.cstate is ConnState.Connected)
    await a.primary(force=True)
    await wait_for(lambda: synced(a, b), 30)
    session = a.engine.session
    strangers = []

    async def flood(host, port, n):
        for i in range(n):
            try:
                s = await trio.open_tcp_stream(host, port)
            except OSError:
                continue
            strangers.append(s)
            if i % 3 == 0:
                try:
                    await s.send_all(os.urandom(256))
                except (trio.BrokenResourceError, OSError):
                    pass
    ports = [(h.address, h.port) for h in conf.hosts]
    with trio.fail_after(60):
        async with trio.open_nursery() as n:
            for host, port in ports:
                n.start_soon(flood, host, port, 150)
            for i in range(200):
                await a.write((i % 64) * 4096, bytes([i % 251]) * 4096)
    assert len(strangers) >= 250, f"only {len(strangers)} connections made"
    assert a.cstate is ConnState.Connected and a.engine.session == session
    # a reconnect with the strangers still queued: the peer gets in
    await a.disconnect()
    await wait_for(lambda: b.cstate is not ConnState.Connected)
    a.connect()
    await wait_for(lambda: synced(a, b), 30)
    for s in strangers:
        await s.aclose()
    assert md5(a.me.disk, a.size) == md5(b.me.disk, b.size)
