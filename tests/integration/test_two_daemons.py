"""The block mirror through real replfsd daemons and replfsadm, on loopback.
The tests wait for states on ``replfsadm events2`` (tests/harness/events.py),
not by polling ``status``."""
import errno
import hashlib
import os
import threading
import time

import pytest

from replfs.blockdev import BlockDeviceError
from replfs.ipc.client import SyncClient, socket_path

from replfs.localpair import read_data
from tests.harness.events import PairEvents, connected


@pytest.fixture
def events(cluster):
    with PairEvents(cluster) as ev:
        yield ev


def data_md5(node, size):
    return hashlib.md5(read_data(node.disk, size)).hexdigest()


def test_full_sync_makes_backing_disks_identical(cluster, events):
    a, b = cluster.alpha, cluster.beta
    for n in cluster.nodes:
        n.adm("create-md", "r0")
        n.start()
    events.start()
    # Fill alpha's disk with data that must travel.
    with open(a.disk, "r+b") as f:
        for i in range(0, 24 * 1024 * 1024, 1024 * 1024):
            f.seek(i)
            f.write(os.urandom(64 * 1024))
    for n in cluster.nodes:
        n.adm("up", "r0")
    st = events[a].wait(connected, what="connection")
    assert st["disk"] == "Inconsistent" and st["peer_disk"] == "Inconsistent", st
    # The walkthrough's refusal, word for word, with exit code 17.
    cp = a.adm("primary", "r0", check=False)
    assert cp.returncode == 17
    assert "State change failed: (-2) Need access to UpToDate data" in cp.stderr
    # The DRBD 8 spelling of the override.
    a.adm("--", "--overwrite-data-of-peer", "primary", "r0")
    events.wait_synced()
    size = a.status()["size"]
    assert data_md5(a, size) == data_md5(b, size)
    assert a.adm("role", "r0").stdout.strip() == "Primary/Secondary"
    assert b.adm("role", "r0").stdout.strip() == "Secondary/Primary"
    assert b.adm("state", "r0").stdout.strip() == "Secondary/Primary"   # seed step 2
    assert a.adm("cstate", "r0").stdout.strip() == "Connected"
    assert a.adm("dstate", "r0").stdout.strip() == "UpToDate/UpToDate"
    proc = a.adm("proc").stdout
    assert "cs:Connected ro:Primary/Secondary ds:UpToDate/UpToDate C r-----" in proc
    ns = int(proc.split("ns:")[1].split()[0])
    assert ns >= size // 1024   # the full sync went over the wire


def test_refusals(cluster, events):
    events.up_fresh()
    a, b = cluster.alpha, cluster.beta
    # A second Primary without allow-two-primaries.
    cp = b.adm("primary", "r0", check=False)
    assert cp.returncode != 0
    assert "Multiple primaries not allowed by config" in cp.stderr
    # A Secondary refuses application I/O.
    with SyncClient(socket_path(b.rundir)) as c:
        with pytest.raises(BlockDeviceError) as e:
            c.call("open", res="r0", write=True)
        assert e.value.errno == errno.EMEDIUMTYPE
    # Unknown resource, bad usage.
    cp = a.adm("primary", "nosuch", check=False)
    assert cp.returncode == 10 and "'nosuch' not defined in your config" in cp.stderr
    cp = a.adm("frobnicate", "r0", check=False)
    assert cp.returncode == 1 and "Unknown command 'frobnicate'" in cp.stderr
    # create-md refuses to overwrite live meta-data.
    cp = a.adm("create-md", "r0", check=False)
    assert cp.returncode != 0 and "attached" in cp.stderr


def _writer(node, blocks, acked, stop):
    """Write 4 KiB blocks with unique content; record each acknowledged one."""
    try:
        with SyncClient(socket_path(node.rundir), timeout=10) as c:
            c.call("open", res="r0", write=True)
            for i in range(blocks):
                if stop.is_set():
                    return
                payload = (b"%08d" % i) * 512
                c.call("write", payload, res="r0", off=i * 4096)
                acked.append(i)
    except Exception:
        return


def _kill9_primary_mid_stream(cluster, blocks: int, at_least: int) -> list[int]:
    """Stream writes on alpha and kill -9 its daemon once ``at_least`` are
    acknowledged; the numbers of the acknowledged blocks."""
    a = cluster.alpha
    acked: list[int] = []
    stop = threading.Event()
    t = threading.Thread(target=_writer, args=(a, blocks, acked, stop))
    t.start()
    deadline = time.monotonic() + 20
    while len(acked) < at_least and time.monotonic() < deadline:
        time.sleep(0.01)
    a.kill9()
    stop.set()
    t.join(20)
    assert len(acked) >= at_least, "the write stream did not get going"
    return acked


def test_protocol_c_kill9_primary_loses_no_acknowledged_write(cluster, events):
    events.up_fresh()
    a, b = cluster.alpha, cluster.beta
    acked = _kill9_primary_mid_stream(cluster, 4000, 300)
    events[b].wait(lambda s: s["connection"] != "Connected", what="beta noticing the loss")
    b.adm("primary", "r0")
    with SyncClient(socket_path(b.rundir)) as c:
        for i in acked:
            _, data = c.call("read", res="r0", off=i * 4096, len=4096)
            assert data == (b"%08d" % i) * 512, f"acknowledged block {i} lost"


def test_bitmap_resync_after_disconnect_moves_only_dirty_blocks(cluster, events):
    events.up_fresh()
    a, b = cluster.alpha, cluster.beta
    b.adm("disconnect", "r0")
    events[a].wait(lambda s: s["connection"] != "Connected", what="alpha disconnected")
    with SyncClient(socket_path(a.rundir)) as c:
        for i in range(7):
            c.call("write", os.urandom(4096), res="r0", off=i * 2 * 1024 * 1024)
    st = a.status()
    assert st["counters"]["oos"] == 7 * 4
    ns_before = st["counters"]["ns"]
    b.adm("connect", "r0")
    events.wait_synced()
    st = a.status()
    assert st["counters"]["oos"] == 0
    assert st["counters"]["ns"] - ns_before == 7 * 4  # KiB: only the dirty blocks
    size = st["size"]
    assert data_md5(a, size) == data_md5(b, size)


def test_split_brain_detected_and_manual_recovery(cluster, events):
    events.up_fresh()
    a, b = cluster.alpha, cluster.beta
    a.adm("disconnect", "r0")
    b.adm("disconnect", "r0")
    b.adm("primary", "r0")
    with SyncClient(socket_path(a.rundir)) as c:
        c.call("write", b"a" * 4096, res="r0", off=0)
    with SyncClient(socket_path(b.rundir)) as c:
        c.call("write", b"b" * 4096, res="r0", off=4096)
    b.adm("secondary", "r0")
    mark = events.mark()            # (StandAlone already: wait for the one after connect)
    a.adm("connect", "r0")
    b.adm("connect", "r0")
    for n in cluster.nodes:
        events[n].wait(lambda s: s["connection"] == "StandAlone", since=mark[n.name],
                       what="split brain")
        assert n.status()["split_brain"]
        assert "Split-Brain detected but unresolved, dropping connection!" in n.log()
    # Nothing was overwritten on either side.
    assert read_data(a.disk, 4096) == b"a" * 4096
    assert read_data(b.disk, 8192)[4096:] == b"b" * 4096
    # The walkthrough's recovery: beta is the victim.
    b.adm("secondary", "r0")
    b.adm("--", "--discard-my-data", "connect", "r0")
    a.adm("connect", "r0")
    events.wait_synced()
    size = a.status()["size"]
    assert data_md5(a, size) == data_md5(b, size)
    assert read_data(b.disk, 8192)[4096:] == bytes(4096)


def test_status_views(cluster, events):
    events.up_fresh()
    a = cluster.alpha
    out = a.adm("status", "r0").stdout
    assert out.startswith("r0 role:Primary\n  disk:UpToDate\n  beta connection:Connected role:Secondary\n")
    import json
    js = json.loads(a.adm("status", "--json", "r0").stdout)
    assert js[0]["connection"]["peer-disk-state"] == "UpToDate"
    ov = a.adm("overview").stdout
    assert "0:r0" in ov and "Connected" in ov and "Primary/Secondary" in ov
    gi = a.adm("show-gi", "r0").stdout
    assert "Current data generation UUID" in gi


def test_crashed_primary_restarts_and_resyncs_its_activity_log(cluster, events):
    events.up_fresh()
    a, b = cluster.alpha, cluster.beta
    acked = _kill9_primary_mid_stream(cluster, 3000, 200)
    # alpha comes back (beta was never promoted): alpha's hot extents are
    # resynced from alpha, since writes in flight may have reached only it.
    a.start()
    a.adm("up", "r0")
    log_text = a.log()
    assert "was Primary when it went down" in log_text
    events.wait_synced()        # (alpha's watcher: started again for the new replfsd)
    size = a.status()["size"]
    assert data_md5(a, size) == data_md5(b, size)
    b.adm("primary", "r0")
    with SyncClient(socket_path(b.rundir)) as c:
        for i in acked:
            _, data = c.call("read", res="r0", off=i * 4096, len=4096)
            assert data == (b"%08d" % i) * 512


def test_outdate_invalidate_and_verify_verbs(cluster, events):
    events.up_fresh()
    a, b = cluster.alpha, cluster.beta
    # outdate: only on a disconnected Secondary; an Outdated disk may not be promoted.
    cp = b.adm("outdate", "r0", check=False)
    assert cp.returncode != 0
    b.adm("disconnect", "r0")
    b.adm("outdate", "r0")
    assert b.adm("dstate", "r0").stdout.strip() == "Outdated/DUnknown"
    cp = b.adm("primary", "r0", check=False)
    assert cp.returncode == 17
    assert "State change failed: (-2) Need access to UpToDate data" in cp.stderr
    b.adm("connect", "r0")
    events.wait_synced()
    # invalidate: beta throws its data away and gets all of it again.
    with open(b.disk, "r+b") as f:
        f.seek(3 * 4096)
        f.write(b"garbage!")
    ns_before = a.status()["counters"]["ns"]
    mark = events.mark()                    # (in sync before it too)
    b.adm("invalidate", "r0")
    events.wait_synced(since=mark)
    size = a.status()["size"]
    assert a.status()["counters"]["ns"] - ns_before >= size // 1024
    assert data_md5(a, size) == data_md5(b, size)
    # verify: silent corruption on beta is found and logged.
    with open(b.disk, "r+b") as f:
        f.seek(7 * 4096)
        f.write(b"bitrot")
    mark = events.mark()
    a.adm("verify", "r0")
    events[a].wait(lambda s: s["replication"] == "VerifyS", since=mark[a.name],
                   what="verify to start")
    events[a].wait(connected, what="verify to finish")
    assert "online verify found" in a.status()["last_event"]
    assert "Out of sync: start=56, size=" in a.log()
    assert a.status()["counters"]["oos"] == 4   # exactly the one 4 KiB block


def _pair_with(tmp_path, net: str):
    from replfs.localpair import LocalPair
    return LocalPair(tmp_path, extra_net="".join(f"\n\t\t{line};" for line in net.split(";")
                                                 if line.strip()))


def _split_brain_alpha_older(pair, events, *, alpha_blocks: int, beta_blocks: int) -> None:
    """The link is cut while alpha is Primary; beta is promoted during the
    split; each writes its own blocks (alpha from 0, beta from 1 MiB);
    beta is demoted again (alpha stays Primary)."""
    a, b = pair.alpha, pair.beta
    events.up_fresh()
    a.adm("disconnect", "r0")
    b.adm("disconnect", "r0")
    b.adm("primary", "r0")
    with SyncClient(socket_path(a.rundir)) as c:
        for i in range(alpha_blocks):
            c.call("write", b"a" * 4096, res="r0", off=i * 4096)
    with SyncClient(socket_path(b.rundir)) as c:
        for i in range(beta_blocks):
            c.call("write", b"b" * 4096, res="r0", off=1024 * 1024 + i * 4096)
    b.adm("secondary", "r0")


def test_split_brain_0pri_discard_younger_primary(tmp_path):
    """No Primary when they meet: the node promoted during the split
    (beta) loses, although it changed more (discard-least-changes, the
    fallback when the flags do not decide, would discard alpha's)."""
    pair = _pair_with(tmp_path, "after-sb-0pri discard-younger-primary")
    try:
        a, b = pair.alpha, pair.beta
        events = PairEvents(pair)
        _split_brain_alpha_older(pair, events, alpha_blocks=1, beta_blocks=3)
        a.adm("secondary", "r0")
        a.adm("connect", "r0")
        b.adm("connect", "r0")
        events.wait_synced()
        assert ("Split-Brain detected, 0 primaries, automatically solved. Sync from this node"
                in a.log())
        assert ("Split-Brain detected, 0 primaries, automatically solved. Sync from peer node"
                in b.log())
        size = a.status()["size"]
        assert data_md5(a, size) == data_md5(b, size)
        data = read_data(b.disk, 2 * 1024 * 1024)
        assert data[:4096] == b"a" * 4096
        assert data[1024 * 1024:] == bytes(1024 * 1024)    # beta's changes are gone
        assert not a.status()["split_brain"] and not b.status()["split_brain"]
    finally:
        events.close()
        pair.teardown()


def test_split_brain_1pri_discard_secondary(tmp_path):
    """One Primary when they meet: the Secondary's changes go, whatever
    the 0pri policy would say (beta changed more; its 0pri policy says
    disconnect)."""
    pair = _pair_with(tmp_path, "after-sb-1pri discard-secondary")
    try:
        a, b = pair.alpha, pair.beta
        events = PairEvents(pair)
        _split_brain_alpha_older(pair, events, alpha_blocks=1, beta_blocks=3)
        a.adm("connect", "r0")
        b.adm("connect", "r0")
        events.wait_synced()
        assert ("Split-Brain detected, 1 primaries, automatically solved. Sync from this node"
                in a.log())
        assert ("Split-Brain detected, 1 primaries, automatically solved. Sync from peer node"
                in b.log())
        assert a.adm("role", "r0").stdout.strip() == "Primary/Secondary"
        size = a.status()["size"]
        assert data_md5(a, size) == data_md5(b, size)
        assert read_data(b.disk, 2 * 1024 * 1024)[1024 * 1024:] == bytes(1024 * 1024)
    finally:
        events.close()
        pair.teardown()


def test_pause_sync_and_resume_sync_verbs(tmp_path):
    """pause-sync/resume-sync through replfsadm and replfsd: both nodes show
    the Paused state (proc flags u and p), the resync waits, and finishes
    after resume-sync; DRBD's Failure (134)/(135) for a flag already set /
    cleared."""
    from replfs.localpair import LocalPair
    pair = LocalPair(tmp_path, size=8 << 20,
                     extra_res="disk { c-plan-ahead 0; resync-rate 2M; }")
    events = PairEvents(pair)
    try:
        a, b = pair.alpha, pair.beta
        for n in pair.nodes:
            n.adm("create-md", "r0")
            n.start()
            n.adm("up", "r0")
        events[a].wait(connected, what="connection")
        b.adm("pause-sync", "r0")
        cp = b.adm("pause-sync", "r0", check=False)
        assert cp.returncode == 10 and "Failure: (134) Sync-pause flag is already set" \
            in cp.stderr
        a.adm("primary", "--force", "r0")
        events[a].wait(lambda s: s["replication"] == "PausedSyncS", what="PausedSyncS")
        events[b].wait(lambda s: s["replication"] == "PausedSyncT", what="PausedSyncT")
        assert " C r--u--" in b.adm("proc").stdout
        assert " C r-p---" in a.adm("proc").stdout
        assert "resync-suspended:user" in b.adm("status", "r0").stdout
        left = a.status()["counters"]["oos"]
        assert left > 0
        time.sleep(0.5)
        assert a.status()["counters"]["oos"] == left
        b.adm("resume-sync", "r0")
        cp = b.adm("resume-sync", "r0", check=False)
        assert cp.returncode == 10 and "Failure: (135) Sync-pause flag is already cleared" \
            in cp.stderr
        events.wait_synced()
        size = a.status()["size"]
        assert data_md5(a, size) == data_md5(b, size)
    finally:
        events.close()
        pair.teardown()
