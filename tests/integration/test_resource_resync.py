"""Resync features of a production pair (issue 10), on real drivers: two
Resources in this trio process over loopback TCP, as in
test_resource_faults.py.  csums-alg moves only the blocks that differ,
pause-sync/resume-sync hold a resync on both nodes, the rate options
bound it, and data-integrity-alg catches data corrupted on the wire.

No assertion depends on timing: amounts come from the engines' counters,
rates are checked only from above (a slow machine makes them lower)."""
import dataclasses
import logging
import os

import pytest
import trio

from replfs.blockdev import BlockDeviceError
from replfs.blockrepl.conf.model import Section
from replfs.blockrepl.core.states import ConnState, DiskState
from replfs.blockrepl.engine.engine import RESYNC_CHUNK, RESYNC_WINDOW
from replfs.blockrepl.proto import packets as P
from replfs.cli import render
from replfs.errors import ReplfsError

from .test_resource_faults import start_pair, synced, with_peer_address
from .test_resource_pair import make_conf, md5, wait_for

BLOCK = 4096


def with_options(conf, *, net=(), disk=()):
    return dataclasses.replace(
        conf, net=Section(conf.net.options + tuple(net)),
        disk=Section(conf.disk.options + tuple(disk)))


async def up_and_synced(nursery, conf_a, conf_b=None):
    a, b = await start_pair(nursery, conf_a, conf_b or conf_a)
    a.connect(); b.connect()
    await wait_for(lambda: a.cstate is ConnState.Connected)
    await a.primary(force=True)
    await wait_for(lambda: synced(a, b), 60)
    return a, b


async def resync_after_invalidate(a, b):
    """beta discards its data (invalidate): a full resync from alpha."""
    await b.disconnect()
    await b.invalidate()
    ns0 = a.ns
    b.connect()
    await wait_for(lambda: synced(a, b), 60)
    return a.ns - ns0


@pytest.mark.parametrize("alg", [None, "md5"])
async def test_csums_resync_sends_only_the_blocks_that_differ(tmp_path, nursery, alg, caplog):
    caplog.set_level(logging.INFO, logger="replfs")
    conf = make_conf(tmp_path)
    if alg:
        conf = with_options(conf, net=(("csums-alg", alg),))
    a, b = await up_and_synced(nursery, conf)
    for i in range(64):
        await a.write(i * 64 * 1024, os.urandom(BLOCK))
    await a.flush()
    await wait_for(lambda: a.engine.counters()["pe"] == 0)
    # Eight blocks of beta's backing file change behind replfs's back.
    bad = [3 * 64 * 16 + i for i in range(8)]      # 4k block numbers
    with open(b.me.disk, "r+b") as f:
        for blk in bad:
            f.seek(blk * BLOCK)
            f.write(os.urandom(BLOCK))
    moved = await resync_after_invalidate(a, b)
    assert md5(a.me.disk, a.size) == md5(b.me.disk, b.size)
    if alg is None:
        assert moved >= a.size                      # every block travelled
    else:
        assert moved == len(bad) * BLOCK            # only those that differed
        assert f"csums-alg {alg}: {a.size // BLOCK - len(bad)} of {a.size // BLOCK} 4k " \
               f"blocks had equal checksums" in caplog.text
        assert "skipped" in a.last_event


async def pause_states(a, b):
    await wait_for(lambda: a.cstate is ConnState.PausedSyncS
                   and b.cstate is ConnState.PausedSyncT, 20)


async def test_pause_sync_holds_the_resync_on_both_nodes_until_resume(tmp_path, nursery):
    # A slow fixed rate, so that the resync is still running when paused.
    conf = with_options(make_conf(tmp_path),
                        disk=(("c-plan-ahead", "0"), ("resync-rate", "2M")))
    a, b = await start_pair(nursery, conf, conf)
    a.connect(); b.connect()
    await wait_for(lambda: a.cstate is ConnState.Connected)
    await a.primary(force=True)
    await wait_for(lambda: a.cstate is ConnState.SyncSource)
    await b.pause_sync()                            # the target pauses
    await pause_states(a, b)
    sa, sb = a.status(), b.status()
    assert (sa["user_isp"], sa["peer_isp"], sb["user_isp"], sb["peer_isp"]) == \
        (False, True, True, False)
    proc = render.proc_drbd([sb])
    assert "cs:PausedSyncT ro:Secondary/Primary ds:Inconsistent/UpToDate C r--u--" in proc
    assert "sync'ed" not in proc                    # no progress lines while paused
    assert "r-p---" in render.proc_drbd([sa])
    assert "resync-suspended:user" in render.status_text(sb, "r0")
    assert "resync-suspended:peer" in render.status_text(sa, "r0")
    assert render.status_json(sa, "r0")["connection"]["resync-suspended"] == "peer"
    # Nothing more is sent: what was in flight lands, then the bitmap stands still.
    await wait_for(lambda: a.engine.counters()["sync"].window == RESYNC_WINDOW // RESYNC_CHUNK)
    left = a.disk.bitmap.count
    ns = a.ns
    await trio.sleep(0.5)
    assert a.disk.bitmap.count == left > 0 and a.ns == ns
    # Both nodes may pause; the resync goes on once neither does.
    await a.pause_sync()
    with pytest.raises(ReplfsError) as info:
        await a.pause_sync()
    assert "Failure: (134) Sync-pause flag is already set" in str(info.value)
    await b.resume_sync()
    await trio.sleep(0.3)
    assert a.cstate is ConnState.PausedSyncS and a.disk.bitmap.count == left
    with pytest.raises(ReplfsError) as info:
        await b.resume_sync()
    assert "(157) Sync-pause flag is already cleared" in str(info.value)
    await a.resume_sync()
    await wait_for(lambda: synced(a, b), 60)
    assert md5(a.me.disk, a.size) == md5(b.me.disk, b.size)
    assert not any(a.status()[k] or b.status()[k] for k in ("user_isp", "peer_isp"))


async def test_a_resync_that_starts_while_paused_starts_paused(tmp_path, nursery):
    conf = make_conf(tmp_path)
    a, b = await start_pair(nursery, conf, conf)
    await a.pause_sync()                            # kept until resume-sync
    a.connect(); b.connect()
    await wait_for(lambda: a.cstate is ConnState.Connected)
    await a.primary(force=True)
    await pause_states(a, b)
    assert b.dstate is DiskState.Inconsistent and a.disk.bitmap.count > 0
    await a.resume_sync()
    await wait_for(lambda: synced(a, b), 60)


def sync_rate_kib_s(a, caplog) -> float:
    """The rate of alpha's last resync, from its 'Resync done' line."""
    line = [r.getMessage() for r in caplog.records if "Resync done" in r.getMessage()][-1]
    return float(line.rsplit("; ", 1)[1].split()[0])


async def timed_full_sync(nursery, conf, caplog):
    a, b = await start_pair(nursery, conf, conf)
    a.connect(); b.connect()
    await wait_for(lambda: a.cstate is ConnState.Connected)
    await a.primary(force=True)
    start = trio.current_time()
    await wait_for(lambda: synced(a, b), 120)
    return a, b, trio.current_time() - start


async def test_fixed_resync_rate_is_an_upper_bound(tmp_path, nursery, caplog):
    caplog.set_level(logging.INFO, logger="replfs")
    rate_kib = 8 * 1024
    conf = with_options(make_conf(tmp_path),
                        disk=(("c-plan-ahead", "0"), ("resync-rate", f"{rate_kib}k")))
    a, b, took = await timed_full_sync(nursery, conf, caplog)
    total_kib = a.size // 1024
    # never faster than the rate (a chunk of slack), whatever the machine
    assert total_kib / took <= rate_kib * 1.25 + 256 / took
    assert sync_rate_kib_s(a, caplog) <= rate_kib * 1.25 + 256 / took


async def test_controller_keeps_to_c_max_rate(tmp_path, nursery, caplog):
    caplog.set_level(logging.INFO, logger="replfs")
    max_kib = 8 * 1024
    conf = with_options(make_conf(tmp_path),
                        disk=(("c-plan-ahead", "10"), ("c-fill-target", "1M"),
                              ("c-max-rate", f"{max_kib}k"), ("resync-rate", "500M")))
    a, b, took = await timed_full_sync(nursery, conf, caplog)
    assert (a.size // 1024) / took <= max_kib * 1.25 + 256 / took


async def test_c_min_rate_throttles_resync_while_the_application_writes(tmp_path, nursery,
                                                                          caplog):
    """With writes going on all the time, resync runs at c-min-rate (not
    the much higher resync-rate); it speeds up once they stop."""
    caplog.set_level(logging.INFO, logger="replfs")
    conf = with_options(make_conf(tmp_path),
                        disk=(("c-plan-ahead", "0"), ("resync-rate", "50M"),
                              ("c-min-rate", "2M")))
    stop = trio.Event()

    async def writer(a):
        i = 0
        while not stop.is_set():
            await a.write((i % 64) * BLOCK, os.urandom(BLOCK))
            i += 1
            await trio.sleep(0.01)

    a, b = await up_and_synced(nursery, conf)
    await b.disconnect()
    await b.invalidate()                            # a full resync to come
    nursery.start_soon(writer, a)
    await wait_for(lambda: a.engine.app_io > 10)
    b.connect()
    await wait_for(lambda: a.cstate is ConnState.SyncSource)
    t0, left0 = trio.current_time(), a.disk.bitmap.count
    await trio.sleep(2.0)
    t1, left1 = trio.current_time(), a.disk.bitmap.count
    throttled_kib_s = (left0 - left1) * 4 / (t1 - t0)
    assert left1 > 0, "the resync finished while throttled: 2M/s would take longer"
    assert throttled_kib_s <= 2 * 1024 * 1.25 + 2 * 256 / (t1 - t0)
    stop.set()
    await wait_for(lambda: synced(a, b), 60)
    assert md5(a.me.disk, a.size) == md5(b.me.disk, b.size)


async def corrupting_relay(nursery, listen_host, target, corrupt_once, kind=P.Data):
    """A TCP relay alpha <-> beta that flips one bit in the data of the
    first packet of type ``kind`` (Data: alpha -> beta; ReadReply: beta ->
    alpha) after ``corrupt_once`` is set (the framing is left intact: only
    what a bad NIC behind TCP's checksum would do)."""
    listeners = await trio.open_tcp_listeners(0, host=listen_host)
    port = listeners[0].socket.getsockname()[1]
    flipped = []

    async def pump_plain(src, dst):
        try:
            while data := await src.receive_some(65536):
                await dst.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        finally:
            await dst.aclose()

    async def pump_corrupting(src, dst):
        dec = P.Decoder()
        try:
            while data := await src.receive_some(65536):
                dec.receive_data(data)
                out = bytearray()
                while (pkt := dec.next_packet()) is not None:
                    if type(pkt) is kind and corrupt_once.is_set() and not flipped:
                        bad = bytearray(pkt.data)
                        bad[len(bad) // 2] ^= 0x10
                        pkt = dataclasses.replace(pkt, data=bytes(bad))
                        flipped.append(getattr(pkt, "offset", pkt.data))
                    out += P.encode(pkt)
                await dst.send_all(bytes(out))
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        finally:
            await dst.aclose()

    async def handle(client):
        server = await trio.open_tcp_stream(*target)
        async with trio.open_nursery() as n:
            if kind is P.Data:
                n.start_soon(pump_corrupting, client, server)
                n.start_soon(pump_plain, server, client)
            else:
                n.start_soon(pump_plain, client, server)
                n.start_soon(pump_corrupting, server, client)

    nursery.start_soon(trio.serve_listeners, handle, listeners)
    return port, flipped


@pytest.mark.parametrize("integrity", ["sha1", None])
async def test_data_integrity_alg_catches_corruption_on_the_wire(tmp_path, nursery, caplog,
                                                                 integrity):
    caplog.set_level(logging.INFO, logger="replfs")
    conf = make_conf(tmp_path)
    if integrity:
        conf = with_options(conf, net=(("data-integrity-alg", integrity),))
    beta = conf.host("beta")
    corrupt = trio.Event()
    port, flipped = await corrupting_relay(nursery, "127.0.0.3", (beta.address, beta.port),
                                           corrupt)
    conf_a = with_peer_address(conf, "beta", "127.0.0.3", port)
    a, b = await up_and_synced(nursery, conf_a, conf)
    corrupt.set()
    data = os.urandom(BLOCK)
    await a.write(7 * BLOCK, data)
    assert flipped == [7 * BLOCK]
    if integrity is None:
        # Nothing notices: beta holds a corrupted block and both say UpToDate
        # (what data-integrity-alg is for).
        await wait_for(lambda: a.engine.counters()["pe"] == 0)
        assert md5(a.me.disk, a.size) != md5(b.me.disk, b.size)
        assert "Digest integrity check FAILED" not in caplog.text
        return
    await wait_for(lambda: "Digest integrity check FAILED: 56s +4096" in caplog.text)
    # beta dropped the connection (ProtocolError); the write is resynced
    # after the reconnect, and the copies agree.
    await wait_for(lambda: synced(a, b) and a.disk.bitmap.count == 0, 60)
    assert md5(a.me.disk, a.size) == md5(b.me.disk, b.size)
    assert await a.read(7 * BLOCK, BLOCK) == data


async def test_data_integrity_alg_must_agree(tmp_path, nursery, caplog):
    caplog.set_level(logging.INFO, logger="replfs")
    conf = make_conf(tmp_path)
    a, b = await start_pair(nursery, with_options(conf, net=(("data-integrity-alg", "md5"),)),
                            with_options(conf, net=(("data-integrity-alg", "sha1"),)))
    a.connect(); b.connect()
    await wait_for(lambda: "incompatible data-integrity-alg settings" in caplog.text)
    await wait_for(lambda: a.cstate is ConnState.StandAlone
                   or b.cstate is ConnState.StandAlone)


async def test_data_integrity_alg_covers_reads_through_the_peer(tmp_path, nursery, caplog):
    """A Diskless Primary reads through its peer: the ReadReply (an answer
    taken out of turn) is checked against the digest sent before it."""
    caplog.set_level(logging.INFO, logger="replfs")
    conf = with_options(make_conf(tmp_path), net=(("data-integrity-alg", "sha256"),))
    a, b = await up_and_synced(nursery, conf)
    data = {i: os.urandom(BLOCK) for i in range(16)}
    for i, d in data.items():
        await a.write(i * 3 * BLOCK, d)
    await a.detach()
    assert a.dstate is DiskState.Diskless
    for _ in range(3):
        for i, d in data.items():
            assert await a.read(i * 3 * BLOCK, BLOCK) == d
            await a.write(i * 3 * BLOCK + BLOCK, d)
    assert "Digest integrity check FAILED" not in caplog.text
    assert a.cstate is ConnState.Connected


async def test_data_integrity_alg_checks_read_replies_too(tmp_path, nursery, caplog):
    caplog.set_level(logging.INFO, logger="replfs")
    conf = with_options(make_conf(tmp_path), net=(("data-integrity-alg", "md5"),))
    beta = conf.host("beta")
    corrupt = trio.Event()
    port, flipped = await corrupting_relay(nursery, "127.0.0.3", (beta.address, beta.port),
                                           corrupt, kind=P.ReadReply)
    a, b = await up_and_synced(nursery, with_peer_address(conf, "beta", "127.0.0.3", port),
                               conf)
    data = os.urandom(BLOCK)
    await a.write(0, data)
    await a.detach()
    corrupt.set()
    # The corrupted reply is caught: the connection goes, and the read
    # fails rather than return wrong data.
    with pytest.raises(BlockDeviceError):
        await a.read(0, BLOCK)
    assert flipped
    await wait_for(lambda: "Digest integrity check FAILED: read reply" in caplog.text)
