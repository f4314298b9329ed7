"""The benchmark command lines: --help prints usage and exits 0, a wrong
argument is a usage error (exit 2) with no traceback, and the layer
selection of `python -m bench` is checked before anything runs."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from bench import __main__ as bench_main

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODULES = ["bench", "bench.block", "bench.locking", "bench.fs", "bench.fuse_layer",
           "bench.dual", "bench.peer", "bench.charts", "bench.passthrough"]


def run(*argv):
    return subprocess.run([sys.executable, "-m", *argv], cwd=REPO, capture_output=True,
                          text=True, timeout=60)


@pytest.mark.parametrize("mod", MODULES)
def test_help_exits_0_and_bad_option_exits_2(mod):
    r = run(mod, "--help")
    assert r.returncode == 0, r.stderr
    assert "usage" in r.stdout.lower() and "Traceback" not in r.stderr
    r = run(mod, "--no-such-option")
    assert r.returncode == 2 and "Traceback" not in r.stderr


def test_unknown_layer_is_a_usage_error():
    r = run("bench", "block", "nope")
    assert r.returncode == 2
    assert "unknown layer(s): nope" in r.stderr and "Traceback" not in r.stderr


def test_selection_runs_only_the_named_layers(monkeypatch, capsys):
    ran = []

    class Fake:
        def __init__(self, name, rc):
            self.name, self.rc = name, rc

        def main(self, argv):
            ran.append((self.name, argv))
            if self.rc == "raise":
                raise RuntimeError("boom")
            return self.rc
    fakes = {"bench.block": Fake("block", 0), "bench.fs": Fake("fs", "raise"),
             "bench.locking": Fake("locking", 0)}
    monkeypatch.setattr(bench_main.importlib, "import_module", lambda n: fakes[n])
    assert bench_main.main(["--quick", "fs", "block"]) == 1
    assert ran == [("fs", ["--quick"]), ("block", ["--quick"])]
    out = capsys.readouterr().out
    assert "bench.fs FAILED: RuntimeError: boom" in out and "layers that failed: fs" in out


def test_fs_targets_are_checked():
    r = run("bench.fs", "--targets", "local,zzz")
    assert r.returncode == 2 and "unknown target(s) zzz" in r.stderr


def test_peer_without_glusterfs_says_so(monkeypatch, capsys):
    from bench import peer
    monkeypatch.setattr(peer, "_tool", lambda name: None)
    assert peer.main([]) == 1
    err = capsys.readouterr().err
    assert "GlusterFS is not installed" in err and "setup-bench-peer.sh" in err


def test_a_failing_workload_is_reported_and_the_rest_runs(tmp_path):
    from bench import common, fs
    cfg = fs.Config(size_mb=1, runtime=0.2, files=20, small_files=5, bigdir=0,
                    tree_tar=str(tmp_path / "no-such.tar"))
    cfg.tree_entries = 1
    work = tmp_path / "work"
    work.mkdir()
    res = fs.run_workloads(str(work), cfg)
    assert "tar x (source tree)" in res["errors"]
    assert res["values"]["create"] > 0 and res["values"]["small files read"] > 0
    assert res["values"]["fsync'd 4k writes"] > 0 and len(res["sync"]["samples_s"]) > 0

    class T:
        name, error = "t", None
    rep = common.Report("fs", "t")
    sec = rep.section("fs", "t", ["t"], "t", [])
    fs.add_results(rep, sec, {"t": [res]}, [T()], 1)
    text = common.render_section(sec.to_json())
    assert next(ln for ln in text.splitlines() if ln.startswith("tar x")).split()[-1] == "FAILED"
    assert rep.histograms and rep.histograms[0]["label"] == fs.SYNC_LABEL


@pytest.mark.parametrize("argv,words", [
    (["--only-tls", "--only-slow-peer"], "exclude each other"),
    (["--only-devfile", "--only-tls"], "exclude each other"),
    (["--slow-peer-ms", "0"], "--slow-peer-ms must be above 0"),
])
def test_block_options_that_contradict_are_usage_errors(argv, words):
    r = run("bench.block", *argv)
    assert r.returncode == 2 and words in r.stderr and "Traceback" not in r.stderr, r.stderr
