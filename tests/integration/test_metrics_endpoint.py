"""replfsd --metrics with real daemons: a Prometheus scrape of a node whose
volume is mounted on both nodes shows the resource's state and counters,
I/O latencies that grow with the I/O done, the cluster's members, DLM
lock traffic and the mount's filesystem request latencies; an address
that cannot be used is refused before the daemon starts."""
from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from replfs.localpair import PY, LocalPair, free_port
from tests.harness.events import PairEvents, connected

from .test_fs_mount import fuse_usable, run
from .test_fs_shared import mount, shared_pair, wait_closed


def scrape(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        assert r.headers["Content-Type"].startswith("text/plain")
        text = r.read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(m: dict, name: str, **labels) -> float:
    want = set(labels.items())
    hits = [v for (n, ls), v in m.items() if n == name and want <= set(ls)]
    assert hits, (name, labels, sorted(k for k in m if k[0] == name)[:5])
    return sum(hits)


@pytest.mark.fuse
@pytest.mark.skipif(not fuse_usable(), reason="needs /dev/fuse and root")
def test_scrape_shows_the_node(tmp_path):
    port = free_port("127.0.0.1")

    def before_up(pair):
        pair.alpha.env = dict(pair.alpha.env, REPLFS_METRICS=f"127.0.0.1:{port}")

    with shared_pair(tmp_path, before_up=before_up) as (pair, ma, mb, _):
        a, b = pair.alpha, pair.beta
        m0 = scrape(port)
        assert value(m0, "replfs_resource_role", resource="r0", role="Primary") == 1
        assert value(m0, "replfs_resource_connection_state", resource="r0",
                     state="Connected") == 1
        assert value(m0, "replfs_resource_disk_state", resource="r0", state="UpToDate") == 1
        assert value(m0, "replfs_cluster_online", cluster="tc") == 1
        assert value(m0, "replfs_cluster_node_up", node="beta") == 1
        mount(a, ma)
        mount(b, mb)
        for i in range(20):
            (ma / f"f{i}").write_bytes(os.urandom(8192))
            (mb / f"f{i}").read_bytes()
        os.sync()
        m1 = scrape(port)
        writes0 = value(m0, "replfs_resource_io_seconds_count", resource="r0", op="write")
        writes1 = value(m1, "replfs_resource_io_seconds_count", resource="r0", op="write")
        assert writes1 > writes0
        assert value(m1, "replfs_resource_network_sent_bytes_total", resource="r0") > \
            value(m0, "replfs_resource_network_sent_bytes_total", resource="r0")
        assert value(m1, "replfs_fs_request_seconds_count", mountpoint=str(ma),
                     op="create") >= 20
        assert value(m1, "replfs_mount_info", mountpoint=str(ma), shared="yes") == 1
        # beta read what alpha wrote: alpha's locks were called back
        assert value(m1, "replfs_dlm_basts_total") > 0
        assert value(m1, "replfs_dlm_requests_total", kind="lock") > 0
        # only GET /metrics
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/nothing", timeout=10)
        assert e.value.code == 404
        run("umount", ma)
        run("umount", mb)
        wait_closed(a)
        wait_closed(b)


@pytest.mark.fuse
@pytest.mark.skipif(not fuse_usable(), reason="needs /dev/fuse and root")
def test_a_scrape_answers_while_a_mount_is_stuck(tmp_path):
    """A write through alpha's mount waits for beta (beta read the file, so
    beta holds its lock, and protocol C waits for beta's ack), and beta's
    replfsd is stopped (SIGSTOP, for less than the cluster's dead time): a
    scrape of alpha answers at once, complete, while that write still
    waits -- the scrape takes no cluster lock and waits for nothing the
    mount waits for.  beta is continued and the write completes."""
    port = free_port("127.0.0.1")

    def before_up(pair):
        pair.alpha.env = dict(pair.alpha.env, REPLFS_METRICS=f"127.0.0.1:{port}")

    with shared_pair(tmp_path, before_up=before_up) as (pair, ma, mb, _):
        a, b = pair.alpha, pair.beta
        mount(a, ma)
        mount(b, mb)
        (ma / "f").write_bytes(b"alpha" * 1000)
        assert (mb / "f").read_bytes() == b"alpha" * 1000      # beta holds its lock now
        done = threading.Event()
        errors = []

        def writer():
            try:
                fd = os.open(ma / "f", os.O_WRONLY)
                try:
                    os.pwrite(fd, b"again", 0)
                    os.fsync(fd)
                finally:
                    os.close(fd)
            except OSError as e:
                errors.append(e)
            finally:
                done.set()
        b.proc.send_signal(signal.SIGSTOP)
        try:
            t = threading.Thread(target=writer, daemon=True)
            t.start()
            assert not done.wait(0.3), "the write did not wait for the stopped beta"
            t0 = time.monotonic()
            m = scrape(port)
            took = time.monotonic() - t0
            assert not done.is_set(), "the scrape answered only once the mount went on"
        finally:
            b.proc.send_signal(signal.SIGCONT)
        assert took < 1.0, took
        assert value(m, "replfs_resource_role", resource="r0", role="Primary") == 1
        assert value(m, "replfs_mount_info", mountpoint=str(ma), shared="yes") == 1
        assert value(m, "replfs_cluster_node_up", node="beta") == 1
        t.join(30)
        assert done.is_set() and not errors, errors
        assert (mb / "f").read_bytes()[:5] == b"again"
        run("umount", ma)
        run("umount", mb)
        wait_closed(a)
        wait_closed(b)


def _samples(m: dict, name: str, **labels) -> list[float]:
    want = set(labels.items())
    return [v for (n, ls), v in m.items() if n == name and want <= set(ls)]


DIRTY_BLOCKS = 256                      # 4 KiB blocks written while disconnected
RATE = 512                              # KiB/s: alpha's fixed resync rate


def test_scrape_follows_out_of_sync_bytes_and_the_resync(tmp_path):
    """alpha (Primary, metrics on) writes while beta is disconnected: the
    out-of-sync bytes are exactly what it wrote and the activity log was
    written; after the reconnect the resync's done ratio rises and the
    out-of-sync bytes fall, in step, at the configured rate (bytes per
    second); once in sync no ratio is reported, nothing is out of sync and
    the cleared bitmap was written out.  (alpha resyncs at a slow fixed
    rate, set in its own config only: beta is the source of the initial
    full sync, at its default speed.)"""
    port = free_port("127.0.0.1")
    pair = LocalPair(tmp_path)
    a, b = pair.alpha, pair.beta
    a.env = dict(a.env, REPLFS_METRICS=f"127.0.0.1:{port}")
    with open(a.conf) as f:
        text = f.read()
    with open(a.conf, "w") as f:
        f.write(text.replace("\tprotocol C;", "\tprotocol C;\n\tdisk {\n\t\tc-plan-ahead 0;\n"
                             f"\t\tresync-rate {RATE}k;\n\t}}", 1))
    events = PairEvents(pair)
    try:
        pair.both(lambda n: n.adm("create-md", "r0"))
        pair.start_both()
        events.start()
        pair.both(lambda n: n.adm("up", "r0"))
        events[a].wait(connected, what="connection")
        b.adm("primary", "--force", "r0")
        events.wait_synced()
        b.adm("secondary", "r0")
        a.adm("primary", "r0")
        m0 = scrape(port)
        assert value(m0, "replfs_resource_out_of_sync_bytes", resource="r0") == 0
        assert not _samples(m0, "replfs_resource_resync_done_ratio")
        al0 = value(m0, "replfs_resource_activity_log_writes_total", resource="r0")

        b.adm("disconnect", "r0")
        events[a].wait(lambda s: s["connection"] != "Connected", what="alpha disconnected")
        size = a.status()["size"]
        step = size // DIRTY_BLOCKS // 4096 * 4096
        with a.client() as c:
            for i in range(DIRTY_BLOCKS):
                c.call("write", os.urandom(4096), res="r0", off=i * step)
        m1 = scrape(port)
        dirty = DIRTY_BLOCKS * 4096
        assert value(m1, "replfs_resource_out_of_sync_bytes", resource="r0") == dirty
        assert value(m1, "replfs_resource_activity_log_writes_total", resource="r0") > al0
        assert value(m1, "replfs_resource_disk_written_bytes_total", resource="r0") >= dirty
        bm1 = value(m1, "replfs_resource_bitmap_writes_total", resource="r0")

        # the resync: scrapes while it runs (about dirty / RATE = 2 s)
        mark = events.mark()
        b.adm("connect", "r0")
        events[a].wait(lambda s: s["replication"] == "SyncSource", since=mark[a.name],
                       what="the resync to start")
        during = []
        deadline = time.monotonic() + 30
        while True:
            m = scrape(port)
            ratio = _samples(m, "replfs_resource_resync_done_ratio", resource="r0")
            if not ratio:
                break
            oos = value(m, "replfs_resource_out_of_sync_bytes", resource="r0")
            rate = value(m, "replfs_resource_resync_rate_bytes_per_second", resource="r0")
            assert abs(ratio[0] - (dirty - oos) / dirty) < 0.01, (ratio, oos)
            during.append((ratio[0], oos, rate))
            assert time.monotonic() < deadline, during
            time.sleep(0.2)
        assert len(during) >= 3, during
        assert during[-1][0] > during[0][0] and during[-1][1] < during[0][1], during
        assert all(x[1] >= y[1] for x, y in zip(during, during[1:])), during
        rates = [r for _, _, r in during[1:]]
        assert all(RATE * 1024 / 4 < r < RATE * 1024 * 4 for r in rates), rates
        events.wait_synced()
        m2 = scrape(port)
        assert value(m2, "replfs_resource_out_of_sync_bytes", resource="r0") == 0
        assert not _samples(m2, "replfs_resource_resync_done_ratio")
        assert value(m2, "replfs_resource_bitmap_writes_total", resource="r0") > bm1
        assert value(m2, "replfs_resource_network_sent_bytes_total", resource="r0") >= \
            value(m1, "replfs_resource_network_sent_bytes_total", resource="r0") + dirty
    finally:
        events.close()
        pair.teardown()


def test_an_unusable_address_is_refused(tmp_path):
    cp = subprocess.run([PY, "-m", "replfs.daemon.main", "--rundir", str(tmp_path / "run"),
                         "--node", "alpha", "--metrics", "nonsense"],
                        capture_output=True, text=True, timeout=30)
    assert cp.returncode == 1 and "--metrics: 'nonsense' is not ADDR:PORT" in cp.stderr, cp
    assert "Traceback" not in cp.stderr
