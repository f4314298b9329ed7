"""The benchmark report: tables with ratios and FAILED cells, JSON, PNG charts.

A small fake result goes through bench/common.py's Report and
bench/charts.py; the charts must be real PNG files, and a target that
failed must show as FAILED, not break the table.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

from bench import charts, common

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _fake_report() -> common.Report:
    rep = common.Report("fake", "Fake layer")
    sec = rep.section("fs", "Fake filesystem rows", ["local", "baseline", "candidate", "broken"],
                      "candidate", ["baseline"])
    sec.add("seq write 1M", "MB/s", {"local": 900.0, "baseline": 200.0, "candidate": 100.0})
    sec.add("fsync 4k p50", "µs", {"local": 50.0, "baseline": 400.0, "candidate": 800.0},
            higher_is_better=False)
    sec.add("tar x", "s", {"local": 1.0, "baseline": 2.0}, higher_is_better=False,
            errors={"candidate": "tar: exit 2"})
    sec.fail_target("broken", "mount failed")
    rep.add_latency_samples("fsync'd 4 KiB writes", "candidate",
                            [0.001 + i * 1e-5 for i in range(500)], histogram=True)
    rep.add_latency("fsync'd 4 KiB writes", "baseline", p50_us=400, p99_us=900, p99_9_us=2000)
    return rep


def test_ratios_are_speed_ratios_and_failures_show():
    rep = _fake_report().to_json()
    rows = {r["workload"]: r for r in rep["sections"][0]["rows"]}
    assert rows["seq write 1M"]["ratios"]["baseline"] == 0.5
    assert rows["fsync 4k p50"]["ratios"]["baseline"] == 0.5   # twice the latency: half speed
    assert rows["tar x"]["ratios"]["baseline"] is None
    text = common.render_section(rep["sections"][0])
    assert "0.50x" in text
    line = next(ln for ln in text.splitlines() if ln.startswith("tar x"))
    assert "FAILED" in line
    assert "FAILED broken: mount failed" in text
    assert "FAILED candidate: tar x: tar: exit 2" in text


def test_charts_are_png_files(tmp_path):
    rep = _fake_report().to_json()
    pngs = charts.draw_report(rep, str(tmp_path / "fake-1"))
    assert sorted(os.path.basename(p) for p in pngs) == [
        "fake-1-fs.png", "fake-1-histogram.png", "fake-1-latency.png"]
    for p in pngs:
        with open(p, "rb") as f:
            assert f.read(8) == PNG_MAGIC
        assert os.path.getsize(p) > 5000


def test_redraw_from_json(tmp_path):
    path = tmp_path / "fake-2.json"
    path.write_text(json.dumps({"report": _fake_report().to_json()}))
    r = subprocess.run([sys.executable, "-m", "bench.charts", str(path)], cwd=REPO,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "fake-2-fs.png").read_bytes()[:8] == PNG_MAGIC
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    r = subprocess.run([sys.executable, "-m", "bench.charts", str(bad)], cwd=REPO,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "Traceback" not in r.stderr


def test_histogram_bins_hold_every_sample():
    edges, counts = common.histogram_from_samples([10.0, 20.0, 20.0, 1000.0], bins=5)
    assert len(edges) == 6 and sum(counts) == 4 and counts[-1] == 1
    edges, counts = common.histogram_from_fio_bins({"10000": 3, "20000": 1, "2000000": 2})
    assert sum(counts) == 6 and edges[0] == 10.0
