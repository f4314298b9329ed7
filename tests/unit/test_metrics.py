"""The metrics' pure parts: histograms, the endpoint's address, and the
exposition of a daemon's state (a fake daemon: the collector only reads)."""
from __future__ import annotations

import types

import pytest
from prometheus_client.parser import text_string_to_metric_families

from replfs.daemon import metrics as M
from replfs.errors import ReplfsError
from replfs.metrics import BUCKETS, Histogram, HistogramSet


def test_histogram_buckets_are_cumulative_and_inclusive():
    h = Histogram()
    for v in (0.00005, 0.00006, 0.002, 20.0):
        h.observe(v)
    cum = dict(h.cumulative())
    assert cum["0.00005"] == 1            # an upper bound is inclusive
    assert cum["0.0001"] == 2 and cum["0.0025"] == 3 and cum["10.0"] == 3
    assert cum["+Inf"] == 4 and h.count == 4
    assert abs(h.sum - 20.00211) < 1e-9
    assert len(h.cumulative()) == len(BUCKETS) + 1
    hs = HistogramSet()
    hs.observe("write", 0.001)
    hs.observe("write", 0.001)
    assert hs["write"].count == 2 and "read" not in hs


@pytest.mark.parametrize("text,want", [("127.0.0.1:9942", ("127.0.0.1", 9942)),
                                       (":9942", ("0.0.0.0", 9942)),
                                       ("[::1]:80", ("::1", 80))])
def test_address(text, want):
    assert M.parse_address(text) == want


@pytest.mark.parametrize("text", ["", "9942", "host:", "host:0", "host:70000", "h:x"])
def test_bad_address(text):
    with pytest.raises(ReplfsError):
        M.parse_address(text)


def fake_daemon():
    h = HistogramSet()
    h.observe("write", 0.0004)
    res = types.SimpleNamespace(latency=h, status=lambda: {
        "role": "Primary", "peer_role": "Secondary", "cstate": "SyncSource",
        "dstate": "UpToDate", "pdsk": "Inconsistent", "out_of_sync_kib": 8,
        "sync": {"percent": 25.0, "rate_kib_s": 100, "want_kib_s": None}, "io_suspended": False, "open_count": 1,
        "counters": {"ns": 4, "nr": 0, "dw": 4, "dr": 1, "al": 3, "bm": 2, "lo": 0, "pe": 1,
                     "ua": 0, "ap": 1, "ep": 1, "wo": "f", "oos": 8}})
    broken = types.SimpleNamespace(latency=HistogramSet(), status=lambda: 1 / 0)
    mirror = types.SimpleNamespace(resources={"r0": res, "zz": broken})
    fs = HistogramSet()
    fs.observe("lookup", 0.00002)
    mounts = type("MountService", (), {})()
    mounts.mounts = {"/mnt": {"resource": "r0", "slot": 0, "shared": True,
                              "session": types.SimpleNamespace(latency=fs)}}
    cluster = type("ClusterService", (), {})()
    dom = types.SimpleNamespace(held={1: 0, 2: 0}, waits=Histogram(),
                                stats={"locks": 5, "converts": 2, "unlocks": 1, "basts": 3,
                                       "refused": 0})
    node = lambda name, number: types.SimpleNamespace(name=name, number=number)  # noqa: E731
    cluster.online = types.SimpleNamespace(
        cluster="tc", fenced=None, me=node("alpha", 0), nodes=[node("alpha", 0), node("beta", 1)],
        net=types.SimpleNamespace(connected=lambda: set()), hb=None, domains={"d1": dom})
    return types.SimpleNamespace(mirror=mirror, components=[cluster, mounts])


def test_exposition_of_a_daemon():
    svc = M.MetricsService("127.0.0.1:1")
    svc.daemon = fake_daemon()
    text = svc.render().decode()
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    val = lambda fam, **labels: next(s.value for s in fams[fam].samples    # noqa: E731
                                     if all(s.labels.get(k) == v for k, v in labels.items()))
    assert val("replfs_resource_role", resource="r0", role="Primary") == 1
    assert val("replfs_resource_connection_state", resource="r0", state="SyncSource") == 1
    assert val("replfs_resource_out_of_sync_bytes", resource="r0") == 8192
    assert val("replfs_resource_resync_done_ratio", resource="r0") == 0.25
    assert val("replfs_resource_resync_rate_bytes_per_second", resource="r0") == 102400
    assert "replfs_resource_resync_target_rate_bytes_per_second{" not in text   # no target
    assert val("replfs_resource_network_sent_bytes", resource="r0") == 4096
    assert val("replfs_resource_requests_pending", resource="r0", kind="pe") == 1
    assert "replfs_resource_io_seconds_bucket" in text and 'op="write"' in text
    assert val("replfs_cluster_node_up", node="alpha") == 1
    assert val("replfs_cluster_node_up", node="beta") == 0
    assert val("replfs_dlm_locks_held", domain="d1") == 2
    assert val("replfs_dlm_basts", domain="d1") == 3
    assert val("replfs_dlm_requests", domain="d1", kind="lock") == 5
    assert val("replfs_mount_info", mountpoint="/mnt", shared="yes") == 1
    assert 'replfs_fs_request_seconds_count{mountpoint="/mnt",op="lookup"} 1.0' in text
    assert 'resource="zz"' not in text          # a broken resource is left out, not fatal


def test_grafana_dashboard_uses_only_metrics_replfsd_exports():
    import json
    import os
    import re
    path = os.path.join(os.path.dirname(__file__), "..", "..", "replfs", "ha", "grafana",
                        "replfs-pair.json")
    with open(path) as f:
        dash = json.load(f)
    svc = M.MetricsService("127.0.0.1:1")
    svc.daemon = fake_daemon()
    exported = {s.name for fam in text_string_to_metric_families(svc.render().decode())
                for s in fam.samples}
    used = set()
    for p in dash["panels"]:
        assert p["targets"], p["title"]
        for t in p["targets"]:
            used |= set(re.findall(r"\breplfs_[a-z_]+", t["expr"]))
    assert used and used <= exported, used - exported
