"""replfsd --metrics with real daemons: a Prometheus scrape of a node whose
volume is mounted on both nodes shows the resource's state and counters,
I/O latencies that grow with the I/O done, the cluster's members, DLM
lock traffic and the mount's filesystem request latencies; an address
that cannot be used is refused before the daemon starts."""
from __future__ import annotations

import os
import subprocess
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from replfs.localpair import PY, free_port

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


def test_an_unusable_address_is_refused(tmp_path):
    cp = subprocess.run([PY, "-m", "replfs.daemon.main", "--rundir", str(tmp_path / "run"),
                         "--node", "alpha", "--metrics", "nonsense"],
                        capture_output=True, text=True, timeout=30)
    assert cp.returncode == 1 and "--metrics: 'nonsense' is not ADDR:PORT" in cp.stderr, cp
    assert "Traceback" not in cp.stderr
