"""Two resource drivers in one trio process, over real TCP on loopback.

These exercise the replication engine end to end (handshake, sync, write
path, reconnect, split brain) faster than the two-daemon tests, which
cover the same through replfsd and replfsadm.
"""
import hashlib
import os
import socket

import pytest
import trio

from replfs.blockrepl.conf.model import Host, MetaDisk, Resource as ResConf, Section
from replfs.blockrepl.core.states import ConnState, DiskState, Role, StateChangeRefused
from replfs.blockrepl.driver.disk import create_md
from replfs.blockrepl.driver.resource import Resource

SIZE = 16 * 1024 * 1024


def _free_port(host):
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def make_conf(tmp_path, protocol="C", net=()):
    port = _free_port("127.0.0.1")
    hosts = []
    for name, addr in (("alpha", "127.0.0.1"), ("beta", "127.0.0.2")):
        disk = tmp_path / f"{name}.img"
        with open(disk, "wb") as f:
            f.truncate(SIZE)
        hosts.append(Host(name, f"/dev/null-{name}", 0, str(disk), addr, port, MetaDisk()))
    opts = (("connect-int", "1"), ("ping-int", "1"), ("ping-timeout", "10")) + tuple(net)
    return ResConf("r0", protocol, tuple(hosts), net=Section(opts))


def md5(path, size):
    with open(path, "rb") as f:
        return hashlib.md5(f.read(size)).hexdigest()


def fail_writes(dev, err: int = 5) -> None:
    """Every write to the backing device ``dev`` fails with ``err`` from
    now on: the awaited write and the small ones the driver does at once
    (write_now) alike."""
    async def failing(offset, data):
        raise OSError(err, os.strerror(err))

    def failing_now(offset, data):
        raise OSError(err, os.strerror(err))
    dev.write, dev.write_now = failing, failing_now


class _Changes:
    """The resources' state-change notifications (Resource.state_hook, the
    hook replfsd's events2 log hangs on): ``wait_for`` wakes on them
    instead of polling."""

    def __init__(self):
        self.event = None

    def hook(self, res) -> None:
        if self.event is not None:
            self.event.set()


CHANGES = _Changes()


async def wait_for(pred, timeout=20):
    """Until ``pred()`` (of the resources' state) holds: looked at again
    after every state change of a Pair's resources (and, should a change
    come by another way, at least every 0.2 s)."""
    with trio.fail_after(timeout):
        while True:
            # (a fresh event before the check: no task runs in between, so
            # a change after the check is never missed)
            CHANGES.event = trio.Event()
            if pred():
                return
            with trio.move_on_after(0.2):
                await CHANGES.event.wait()


async def poll_for(pred, timeout=20):
    """Until ``pred()`` holds, for what is not a resource's state."""
    with trio.fail_after(timeout):
        while not pred():
            await trio.sleep(0.02)


class Pair:
    def __init__(self, conf):
        self.conf = conf
        self.a = Resource(conf, "alpha")
        self.b = Resource(conf, "beta")
        for r in (self.a, self.b):
            r.state_hook = CHANGES.hook

    async def start(self, nursery):
        for h in self.conf.hosts:
            create_md(h)
        for r in (self.a, self.b):
            await nursery.start(r.run)
            await r.attach()

    def connected(self):
        return self.a.cstate is ConnState.Connected and self.b.cstate is ConnState.Connected

    def in_sync(self):
        return (self.connected() and self.a.dstate is DiskState.UpToDate
                and self.b.dstate is DiskState.UpToDate)


@pytest.fixture
async def pair(tmp_path, nursery):
    p = Pair(make_conf(tmp_path))
    await p.start(nursery)
    yield p
    nursery.cancel_scope.cancel()


async def test_fresh_pair_full_sync_after_forced_primary(pair):
    a, b = pair.a, pair.b
    assert a.dstate is DiskState.Inconsistent
    with pytest.raises(StateChangeRefused) as e:
        await a.primary()
    assert e.value.code == -2 and e.value.exit_code == 17
    a.connect()
    b.connect()
    await wait_for(pair.connected)
    await a.primary(force=True)
    await wait_for(pair.in_sync)
    data = os.urandom(64 * 1024)
    await a.write(4096 * 10, data)
    size = a.size
    assert md5(a.me.disk, size) == md5(b.me.disk, size)
    # The Secondary refuses application I/O.
    with pytest.raises(OSError):
        await b.write(0, b"x" * 4096)


async def test_bitmap_resync_moves_only_dirty_blocks(pair):
    a, b = pair.a, pair.b
    a.connect(); b.connect()
    await wait_for(pair.connected)
    await a.primary(force=True)
    await wait_for(pair.in_sync)
    await b.disconnect()
    await wait_for(lambda: a.cstate is not ConnState.Connected)
    for i in range(5):
        await a.write(i * 1024 * 1024, os.urandom(4096))
    assert a.disk.bitmap.count == 5
    uuids_before = a.disk.sb.uuids
    assert uuids_before.bitmap != 0  # a new generation started
    sent_before = a.ns
    b.connect()
    await wait_for(pair.in_sync)
    assert a.ns - sent_before == 5 * 4096
    assert md5(a.me.disk, a.size) == md5(b.me.disk, b.size)
    assert a.disk.sb.uuids.current == b.disk.sb.uuids.current
    assert a.disk.sb.uuids.bitmap == 0


async def test_split_brain_detected_and_discard_my_data_recovers(pair):
    a, b = pair.a, pair.b
    a.connect(); b.connect()
    await wait_for(pair.connected)
    await a.primary(force=True)
    await wait_for(pair.in_sync)
    await a.disconnect()
    await b.disconnect()
    await b.primary()
    await a.write(0, b"A" * 4096)
    await b.write(8192, b"B" * 4096)
    a.connect(); b.connect()
    await wait_for(lambda: a.cstate is ConnState.StandAlone and b.cstate is ConnState.StandAlone
                   and a.split_brain and b.split_brain)
    # Recovery: beta is the victim.
    await b.secondary()
    b.connect(discard_my_data=True)
    a.connect()
    await wait_for(pair.in_sync)
    assert md5(a.me.disk, a.size) == md5(b.me.disk, b.size)
    with open(b.me.disk, "rb") as f:
        assert f.read(4096) == b"A" * 4096
        f.seek(8192)
        assert f.read(4096) == bytes(4096)  # beta's split-brain write is discarded


async def test_second_primary_refused_without_allow_two_primaries(pair):
    a, b = pair.a, pair.b
    a.connect(); b.connect()
    await wait_for(pair.connected)
    await a.primary(force=True)
    await wait_for(pair.in_sync)
    with pytest.raises(StateChangeRefused) as e:
        await b.primary()
    assert "Multiple primaries" in str(e.value)


async def test_sync_progress_is_reported_like_proc_drbd(tmp_path, nursery):
    conf = make_conf(tmp_path, net=())
    import dataclasses
    conf = dataclasses.replace(conf, disk=Section((("resync-rate", "4M"),)))
    p = Pair(conf)
    await p.start(nursery)
    p.a.connect(); p.b.connect()
    await wait_for(p.connected)
    await p.a.primary(force=True)
    await wait_for(lambda: p.a.cstate is ConnState.SyncSource)
    await trio.sleep(1.0)
    st = p.a.status()
    assert st["cstate"] == "SyncSource" and st["pdsk"] == "Inconsistent"
    line = st["sync"]["line"]
    assert "sync'ed:" in line and "finish:" in line and "K/sec" in line
    assert 5.0 < st["sync"]["percent"] < 95.0
    tgt = p.b.status()
    assert tgt["cstate"] == "SyncTarget" and tgt["dstate"] == "Inconsistent"
    await wait_for(p.in_sync, 30)


async def test_dual_primary_with_allow_two_primaries(tmp_path, nursery):
    conf = make_conf(tmp_path, net=(("allow-two-primaries", ""),))
    assert conf.allow_two_primaries
    p = Pair(conf)
    await p.start(nursery)
    p.a.connect(); p.b.connect()
    await wait_for(p.connected)
    await p.a.primary(force=True)
    await wait_for(p.in_sync, 30)
    await p.b.primary()
    assert p.a.role is Role.Primary and p.b.role is Role.Primary
    await wait_for(lambda: p.a.peer_role is Role.Primary and p.b.peer_role is Role.Primary)
    await p.a.write(0, b"a" * 4096)
    await p.b.write(8192, b"b" * 4096)
    assert await p.b.read(0, 4096) == b"a" * 4096
    assert await p.a.read(8192, 4096) == b"b" * 4096
    assert md5(p.a.me.disk, p.a.size) == md5(p.b.me.disk, p.b.size)


async def test_concurrent_writes_of_two_primaries_are_detected(tmp_path, nursery, caplog):
    """Both Primaries write the same block at once (what the cluster
    filesystem's locks must prevent): the mirror logs DRBD's "Concurrent
    local write detected!", counts it, and marks the block out of sync;
    after a reconnect the resync makes both disks identical again.
    Writes to different blocks are not conflicts."""
    conf = make_conf(tmp_path, net=(("allow-two-primaries", ""),))
    p = Pair(conf)
    await p.start(nursery)
    p.a.connect(); p.b.connect()
    await wait_for(p.connected)
    await p.a.primary(force=True)
    await wait_for(p.in_sync, 30)
    await p.b.primary()
    await wait_for(lambda: p.a.peer_role is Role.Primary and p.b.peer_role is Role.Primary)
    # disjoint blocks, at once: no conflict
    async with trio.open_nursery() as n:
        for i in range(20):
            n.start_soon(p.a.write, 4096 * (2 * i), b"a" * 4096)
            n.start_soon(p.b.write, 4096 * (2 * i + 1), b"b" * 4096)
    assert p.a.concurrent_writes == 0 and p.b.concurrent_writes == 0
    # the same block, at once
    async with trio.open_nursery() as n:
        for i in range(20):
            n.start_soon(p.a.write, 65536, bytes([i]) * 4096)
            n.start_soon(p.b.write, 65536, bytes([100 + i]) * 4096)
    assert p.a.concurrent_writes + p.b.concurrent_writes > 0
    assert "Concurrent local write detected!" in caplog.text
    # the marked blocks are resynced at the next connection
    await p.b.secondary()
    await p.b.disconnect(); await p.a.disconnect()
    await wait_for(lambda: p.a.cstate is ConnState.StandAlone and p.b.cstate is ConnState.StandAlone)
    p.a.connect(); p.b.connect()
    await wait_for(p.in_sync, 30)
    assert md5(p.a.me.disk, p.a.size) == md5(p.b.me.disk, p.b.size)


async def _split_brain(p, *, a_blocks, b_blocks):
    """alpha Primary and in sync with beta; the link is cut (alpha stays
    Primary), beta is promoted; each writes its own blocks (alpha at
    0.., beta from 1 MiB); beta is demoted again."""
    a, b = p.a, p.b
    a.connect(); b.connect()
    await wait_for(p.connected)
    await a.primary(force=True)
    await wait_for(p.in_sync)
    await a.disconnect()
    await b.disconnect()
    await b.primary()
    for i in range(a_blocks):
        await a.write(i * 4096, b"A" * 4096)
    for i in range(b_blocks):
        await b.write(1024 * 1024 + i * 4096, b"B" * 4096)
    await b.secondary()


def _pri_lost_conf(tmp_path, marker):
    import dataclasses
    conf = make_conf(tmp_path, net=(("after-sb-0pri", "discard-least-changes"),
                                    ("after-sb-1pri", "call-pri-lost-after-sb")))
    return dataclasses.replace(conf, handlers=Section(
        (("pri-lost-after-sb", f"echo lost > {marker}"),)))


async def test_call_pri_lost_after_sb_primary_not_in_use_gives_up_its_role(
        tmp_path, nursery, caplog):
    caplog.set_level("INFO", logger="replfs.blockrepl")
    marker = tmp_path / "pri-lost"
    p = Pair(_pri_lost_conf(tmp_path, marker))
    await p.start(nursery)
    a, b = p.a, p.b
    # alpha (Primary) changed less: discard-least-changes discards its data
    await _split_brain(p, a_blocks=1, b_blocks=3)
    a.connect(); b.connect()
    await wait_for(p.in_sync)
    assert a.role is Role.Secondary and not a.split_brain and not marker.exists()
    assert md5(a.me.disk, a.size) == md5(b.me.disk, b.size)
    with open(a.me.disk, "rb") as f:
        assert f.read(4096) == bytes(4096)          # alpha's split-brain write is gone
    text = caplog.text
    assert "Successfully gave up primary role." in text
    assert "r0: Split-Brain detected, 1 primaries, automatically solved. Sync from peer node" \
        in text
    assert "r0: Split-Brain detected, 1 primaries, automatically solved. Sync from this node" \
        in text
    # beta learned that alpha is Secondary now
    await wait_for(lambda: b.peer_role is Role.Secondary)


async def test_call_pri_lost_after_sb_primary_in_use_stops_its_mounts_and_runs_the_handler(
        tmp_path, nursery):
    marker = tmp_path / "pri-lost"
    p = Pair(_pri_lost_conf(tmp_path, marker))
    await p.start(nursery)
    a, b = p.a, p.b
    await _split_brain(p, a_blocks=1, b_blocks=3)
    stopped = []
    a.pri_lost_hook = stopped.append
    a.open_count += 1                # a filesystem has the device open
    a.connect(); b.connect()
    await wait_for(lambda: a.cstate is ConnState.StandAlone and a.split_brain)
    assert a.role is Role.Primary
    assert len(stopped) == 1 and "call-pri-lost-after-sb" in stopped[0]
    await poll_for(lambda: marker.exists())
    assert a.last_event == "Split-Brain detected but unresolved, dropping connection!"
    with open(a.me.disk, "rb") as f:
        assert f.read(4096) == b"A" * 4096          # nothing was overwritten
    a.open_count -= 1
