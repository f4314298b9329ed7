"""Filesystem benchmark: the replfs mount against its baselines, one run.

Targets, all on this machine's local disk (``--targets``):

* local        — a plain directory (the ceiling);
* passthrough  — bench/passthrough.py, a minimal pyfuse3 + trio FUSE mount
                 of a local directory: the cost of FUSE and Python alone
                 (the issue's baseline for the ratios);
* image        — mkfs.replfs on an image file, mounted with `replfs`
                 (no replication): the upper bound for the resource mount;
* resource-hop — the resource mount served the way it was before replfsd
                 hosted the mounts: a process of its own whose block
                 requests cross the admin socket (bench/hop_mount.py);
* resource     — mkfs.replfs on a protocol C resource of a two-daemon pair
                 (127.0.0.1/127.0.0.2), mounted with mount -t fuse.replfs
                 (served by replfsd): the candidate.

Workloads (WORKLOADS below; bench/peer.py runs the same ones on GlusterFS):
sequential 1 MiB write (+fsync at the end) and read, 4 KiB random read,
4 KiB buffered random write (fio), fsync'd 4 KiB writes (pwrite + fsync
per write, timed each: ops/s, the fsync's own p50 and a histogram),
create / stat / readdir / unlink of --files empty files, `tar x` of a
source tree (the Python standard library, plus symlinks), `du -s` and
`rm -rf` of it, a small-file workload (--small-files files of 4-64 KiB
written, then read back and checked), and a readdir of a --bigdir entry
directory.  All targets stay mounted; --rounds rounds run each target in
turn, the order reversed every other round, and the table gives medians.

    python -m bench.fs [--quick] [--rounds N] [--targets local,resource]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time

from .common import (Report, add_cli_common, histogram_from_samples, pct)

PY = sys.executable
BIN = os.path.dirname(PY)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env() -> dict:
    env = dict(os.environ)
    env["PATH"] = BIN + os.pathsep + env.get("PATH", "")
    return env


def _wait_mounted(mnt: str, proc: subprocess.Popen | None = None, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.ismount(mnt):
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"mount of {mnt} exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{mnt} not mounted after {timeout}s")
        time.sleep(0.05)


def _umount(mnt: str) -> None:
    if os.path.ismount(mnt):
        if subprocess.run(["umount", mnt], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", mnt], capture_output=True)


def fuse_usable() -> str | None:
    """Why FUSE mounts cannot be made here, or None."""
    if os.geteuid() != 0:
        return "needs root"
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse"
    return None


# ---------------------------------------------------------------- workloads

# (name, unit, higher is better); the order of the table and the charts
WORKLOADS = [
    ("seq write 1M", "MB/s", True),
    ("seq read 1M", "MB/s", True),
    ("rand read 4k", "IOPS", True),
    ("rand write 4k (buffered)", "IOPS", True),
    ("fsync'd 4k writes", "ops/s", True),
    ("fsync p50", "µs", False),
    ("create", "ops/s", True),
    ("stat", "ops/s", True),
    ("readdir", "entries/s", True),
    ("unlink", "ops/s", True),
    ("tar x (source tree)", "s", False),
    ("du -s", "s", False),
    ("rm -rf", "s", False),
    ("small files write", "files/s", True),
    ("small files read", "files/s", True),
    ("readdir big dir", "entries/s", True),
]
SYNC_LABEL = "fsync'd 4 KiB writes (pwrite + fsync)"


class Config:
    """The sizes of one run (the command line's, or bench.peer's)."""

    def __init__(self, size_mb=128, runtime=5, files=10000, small_files=2000, bigdir=0,
                 tree_tar=""):
        self.size_mb, self.runtime, self.files = size_mb, runtime, files
        self.small_files, self.bigdir, self.tree_tar = small_files, bigdir, tree_tar
        self.tree_entries = 0


def fio(path: str, name: str, rw: str, bs: str, size: str, *, runtime: int | None = None,
        end_fsync: bool = False) -> dict:
    cmd = ["fio", f"--name={name}", f"--filename={os.path.join(path, 'fio.dat')}",
           f"--rw={rw}", f"--bs={bs}", f"--size={size}", "--ioengine=psync",
           "--output-format=json", "--invalidate=1", "--percentile_list=50:99:99.9"]
    if runtime:
        cmd += [f"--runtime={runtime}", "--time_based"]
    if end_fsync:
        cmd.append("--end_fsync=1")
    cp = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if cp.returncode != 0:
        raise RuntimeError(f"fio {name}: {cp.stderr.strip()[-300:] or cp.stdout[-300:]}")
    job = json.loads(cp.stdout[cp.stdout.index("{"):])["jobs"][0]
    side = job["read"] if "read" in rw else job["write"]
    pcts = (side.get("clat_ns") or side.get("lat_ns") or {}).get("percentile", {})
    return {"MB/s": side["bw_bytes"] / 1e6, "IOPS": side["iops"],
            "p50_us": pcts.get("50.000000", 0) / 1e3, "p99_us": pcts.get("99.000000", 0) / 1e3,
            "p99_9_us": pcts.get("99.900000", 0) / 1e3}


def py_io(path: str, rw: str, bs: int, size: int, *, seconds: float = 5.0) -> dict:
    """The fallback when fio is missing: the same patterns with os calls."""
    fn = os.path.join(path, "py.dat")
    buf = os.urandom(bs)
    lats = []
    if "read" in rw and not os.path.exists(fn):
        with open(fn, "wb") as f:
            for _ in range(max(1, size // (1 << 20))):
                f.write(os.urandom(1 << 20))
    fd = os.open(fn, os.O_RDWR | os.O_CREAT)
    t0 = time.perf_counter()
    moved = 0
    try:
        i = 0
        while True:
            off = (random.randrange(size // bs) * bs) if rw.startswith("rand") else (i * bs) % size
            s = time.perf_counter()
            if "read" in rw:
                moved += len(os.pread(fd, bs, off))
            else:
                moved += os.pwrite(fd, buf, off)
            lats.append(time.perf_counter() - s)
            i += 1
            if (not rw.startswith("rand") and i * bs >= size) or \
                    time.perf_counter() - t0 > seconds:
                break
        if "write" in rw:
            os.fsync(fd)
    finally:
        os.close(fd)
    el = time.perf_counter() - t0
    return {"MB/s": moved / el / 1e6, "IOPS": len(lats) / el, "p50_us": pct(lats, 50) * 1e6,
            "p99_us": pct(lats, 99) * 1e6, "p99_9_us": pct(lats, 99.9) * 1e6}


def _rm(path: str, *names: str) -> None:
    for n in names:
        try:
            os.unlink(os.path.join(path, n))
        except FileNotFoundError:
            pass


def wl_data(path: str, cfg: Config, out: dict, extra: dict) -> None:
    have_fio = shutil.which("fio") is not None
    size = f"{cfg.size_mb}M"

    def run(name, rw, bs, **kw):
        if have_fio:
            return fio(path, name, rw, bs, size, **kw)
        kw.pop("end_fsync", None)
        return py_io(path, rw, 1 << 20 if bs == "1M" else 4096, cfg.size_mb << 20,
                     seconds=kw.get("runtime") or 60)
    out["seq write 1M"] = lambda: run("seqw", "write", "1M", end_fsync=True)["MB/s"]
    out["seq read 1M"] = lambda: run("seqr", "read", "1M")["MB/s"]

    def rand(name, rw):
        r = run(name, rw, "4k", runtime=cfg.runtime)
        extra.setdefault("fio_latency", {})[name] = r
        return r["IOPS"]
    out["rand read 4k"] = lambda: rand("rand read 4k", "randread")
    out["rand write 4k (buffered)"] = lambda: rand("rand write 4k (buffered)", "randwrite")
    out["__cleanup_data"] = lambda: _rm(path, "fio.dat", "py.dat")


def fsync_writes(path: str, seconds: float, max_ops: int = 100000) -> dict:
    """pwrite 4 KiB + fsync, one after the other, for ``seconds``; each
    write+fsync and each fsync timed."""
    fn = os.path.join(path, "sync.dat")
    buf = os.urandom(4096)
    fd = os.open(fn, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    both, syncs = [], []
    clock = time.perf_counter
    try:
        t0 = clock()
        i = 0
        while i < max_ops and clock() - t0 < seconds:
            a = clock()
            os.pwrite(fd, buf, (i % 4096) * 4096)
            b = clock()
            os.fsync(fd)
            c = clock()
            both.append(c - a)
            syncs.append(c - b)
            i += 1
        el = clock() - t0
    finally:
        os.close(fd)
        os.unlink(fn)
    return {"ops/s": len(both) / el, "samples_s": both, "fsync_samples_s": syncs}


def wl_meta(path: str, cfg: Config, out: dict, extra: dict) -> None:
    d = os.path.join(path, "meta")
    names = [os.path.join(d, f"f{i:06d}") for i in range(cfg.files)]

    def timed_rate(fn, n):
        t0 = time.perf_counter()
        fn()
        return n / (time.perf_counter() - t0)

    def create():
        os.mkdir(d)
        return timed_rate(lambda: [os.close(os.open(n, os.O_CREAT | os.O_WRONLY, 0o644))
                                   for n in names], len(names))

    def stat():
        return timed_rate(lambda: [os.stat(n) for n in names], len(names))

    def readdir():
        t0 = time.perf_counter()
        count = sum(1 for _ in os.scandir(d))
        el = time.perf_counter() - t0
        if count != len(names):
            raise RuntimeError(f"readdir returned {count} entries, expected {len(names)}")
        return count / el

    def unlink():
        r = timed_rate(lambda: [os.unlink(n) for n in names], len(names))
        os.rmdir(d)
        return r
    out["create"], out["stat"], out["readdir"], out["unlink"] = create, stat, readdir, unlink


def _timed_command(cmd: list[str], what: str, timeout: float) -> float:
    """Seconds ``cmd`` took; RuntimeError naming ``what`` if it failed."""
    t0 = time.perf_counter()
    cp = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    el = time.perf_counter() - t0
    if cp.returncode != 0:
        raise RuntimeError(f"{what}: {cp.stderr.strip()[-200:]}")
    return el


def wl_tree(path: str, cfg: Config, out: dict, extra: dict) -> None:
    dest = os.path.join(path, "tree")

    def tar_x():
        os.mkdir(dest)
        el = _timed_command(["tar", "xf", cfg.tree_tar, "-C", dest], "tar x", 1800)
        n = sum(len(ds) + len(fs) for _, ds, fs in os.walk(dest))
        if n != cfg.tree_entries:
            raise RuntimeError(f"tar x left {n} entries, the archive has {cfg.tree_entries}")
        return el

    def du():
        return _timed_command(["du", "-s", dest], "du", 600)

    def rm_rf():
        el = _timed_command(["rm", "-rf", dest], "rm -rf", 1800)
        if os.path.exists(dest):
            raise RuntimeError("rm -rf: the tree is still there")
        return el
    out["tar x (source tree)"], out["du -s"], out["rm -rf"] = tar_x, du, rm_rf


def wl_small(path: str, cfg: Config, out: dict, extra: dict) -> None:
    d = os.path.join(path, "small")
    rnd = random.Random(8)
    sizes = [rnd.choice((4096, 8192, 16384, 32768, 65536)) for _ in range(cfg.small_files)]
    blob = os.urandom(65536)

    def write():
        os.mkdir(d)
        t0 = time.perf_counter()
        for i, s in enumerate(sizes):
            sub = os.path.join(d, f"d{i // 100:03d}")
            if i % 100 == 0:
                os.mkdir(sub)
            with open(os.path.join(sub, f"f{i:05d}"), "wb") as f:
                f.write(blob[:s])
        return len(sizes) / (time.perf_counter() - t0)

    def read():
        t0 = time.perf_counter()
        for i, s in enumerate(sizes):
            with open(os.path.join(d, f"d{i // 100:03d}", f"f{i:05d}"), "rb") as f:
                if f.read() != blob[:s]:
                    raise RuntimeError(f"small file {i}: wrong contents")
        r = len(sizes) / (time.perf_counter() - t0)
        shutil.rmtree(d)
        return r
    out["small files write"], out["small files read"] = write, read


def wl_bigdir(path: str, cfg: Config, out: dict, extra: dict) -> None:
    if not cfg.bigdir:
        return
    big = os.path.join(path, "big")

    def readdir_big():
        os.mkdir(big)
        for i in range(cfg.bigdir):
            os.close(os.open(os.path.join(big, f"entry-{i:07d}"), os.O_CREAT | os.O_WRONLY,
                             0o644))
        t0 = time.perf_counter()
        count = sum(1 for _ in os.scandir(big))
        el = time.perf_counter() - t0
        shutil.rmtree(big)
        if count != cfg.bigdir:
            raise RuntimeError(f"readdir returned {count} entries, expected {cfg.bigdir}")
        return count / el
    out["readdir big dir"] = readdir_big


def run_workloads(path: str, cfg: Config) -> dict:
    """Every workload once on ``path``: {"values": {workload: number},
    "errors": {workload: message}, "sync": samples, "fio_latency": ...}.
    A workload that fails is recorded and the next one still runs (those
    that depend on it fail too: create -> stat -> readdir -> unlink)."""
    steps: dict = {}
    extra: dict = {}
    res = {"values": {}, "errors": {}}
    wl_data(path, cfg, steps, extra)

    def sync():
        r = fsync_writes(path, cfg.runtime)
        res["sync"] = r
        res["values"]["fsync p50"] = pct(r["fsync_samples_s"], 50) * 1e6
        return r["ops/s"]
    steps["fsync'd 4k writes"] = sync
    for fn in (wl_meta, wl_tree, wl_small, wl_bigdir):
        fn(path, cfg, steps, extra)
    for name, fn in steps.items():
        try:
            v = fn()
            if not name.startswith("__"):
                res["values"][name] = v
        except Exception as e:      # a failed workload shows as FAILED
            res["errors"][name] = f"{type(e).__name__}: {e}"
            print(f"#     {name} failed: {e}", flush=True)
    if "fsync'd 4k writes" in res["errors"]:
        res["errors"]["fsync p50"] = res["errors"]["fsync'd 4k writes"]
    res["fio_latency"] = extra.get("fio_latency", {})
    return res


def make_tree_tar(root: str, quick: bool = False) -> tuple[str, int]:
    """A tarball of a real source tree: this Python's standard library
    (no bytecode, tests or installed packages; --quick: a few packages of
    it), plus a directory of symlinks as real trees have.  Returns its path
    and the number of entries it unpacks to."""
    import sysconfig
    std = sysconfig.get_paths()["stdlib"]
    keep = {"email", "json", "asyncio", "xml", "logging"} if quick else None
    skip = {"__pycache__", "site-packages", "dist-packages", "test", "idlelib"}
    tar = os.path.join(root, "tree.tar")
    n = 0

    def filt(ti: tarfile.TarInfo):
        nonlocal n
        parts = ti.name.split("/")
        if any(p in skip or p.startswith("config-") for p in parts):
            return None
        if keep is not None and len(parts) > 1 and parts[1] not in keep:
            return None
        if ti.isdev():
            return None
        n += 1
        return ti
    with tarfile.open(tar, "w") as t:
        t.add(std, arcname="src", filter=filt)
        for i, (name, target) in enumerate((("README", "../src/__future__.py"),
                                            ("lib", "../src"), ("dangling", "nowhere"))):
            ti = tarfile.TarInfo(f"links/{name}")
            ti.type, ti.linkname, ti.mode = tarfile.SYMTYPE, target, 0o777
            t.addfile(ti)
            n += 1
        ti = tarfile.TarInfo("links")
        ti.type, ti.mode = tarfile.DIRTYPE, 0o755
        t.addfile(ti)
        n += 1
    return tar, n


def run_rounds(targets: list, cfg: Config, rounds: int) -> dict:
    """Each target in turn, ``rounds`` times, the order reversed every other
    round; {target name: [one run_workloads result per round]}."""
    per: dict[str, list] = {t.name: [] for t in targets}
    live = [t for t in targets if not getattr(t, "error", None)]
    for r in range(rounds):
        order = live if r % 2 == 0 else live[::-1]
        for t in order:
            print(f"# round {r + 1}/{rounds}: {t.name}", flush=True)
            per[t.name].append(run_workloads(t.path, cfg))
    return per


def add_results(rep: Report, sec, per: dict, targets: list, rounds: int) -> dict:
    """Medians over rounds into the report; the latency chart and the
    histogram of the fsync'd writes; returns the JSON's per-target data."""
    out = {}
    for t in targets:
        rs = per.get(t.name, [])
        err = getattr(t, "error", None)
        if err:
            sec.fail_target(t.name, err)
        out[t.name] = {"error": err, "rounds": [{"values": r["values"], "errors": r["errors"],
                                                 "fio_latency": r["fio_latency"]} for r in rs]}
    for name, unit, higher in WORKLOADS:
        values, errors = {}, {}
        for t in targets:
            rs = per.get(t.name, [])
            got = [r["values"][name] for r in rs if name in r["values"]]
            bad = [r["errors"][name] for r in rs if name in r["errors"]]
            if bad:
                errors[t.name] = f"{bad[0]} ({len(bad)}/{len(rs)} rounds)"
            elif got:
                values[t.name] = statistics.median(got)
        if values or errors:
            sec.add(name, unit, values, higher_is_better=higher, errors=errors)
    for t in targets:
        rs = per.get(t.name, [])
        samples = [s for r in rs if "sync" in r for s in r["sync"]["samples_s"]]
        rep.add_latency_samples(SYNC_LABEL, t.name, samples)
        if samples:
            rep.add_histogram(SYNC_LABEL, t.name, *histogram_from_samples(
                [s * 1e6 for s in samples]))
        fsyncs = [s for r in rs if "sync" in r for s in r["sync"]["fsync_samples_s"]]
        rep.add_latency_samples("fsync alone (of the 4 KiB writes)", t.name, fsyncs)
        for wl in ("rand read 4k", "rand write 4k (buffered)"):
            lat = [r["fio_latency"][wl] for r in rs if wl in r["fio_latency"]]
            if lat:
                rep.add_latency(f"{wl} (fio clat)", t.name,
                                **{k: statistics.median(x[k] for x in lat)
                                   for k in ("p50_us", "p99_us", "p99_9_us")})
    return out


# ---------------------------------------------------------------- targets

class Target:
    name = "?"
    needs_fuse = True
    error: str | None = None

    def __init__(self, root: str):
        self.root = root
        self.path = ""

    def start(self) -> None: ...

    def stop(self) -> None: ...


class LocalDir(Target):
    name = "local dir"
    needs_fuse = False

    def start(self):
        self.path = os.path.join(self.root, "local")
        os.mkdir(self.path)


class PassthroughMount(Target):
    name = "passthrough"

    def start(self):
        src = os.path.join(self.root, "pt-src")
        self.path = os.path.join(self.root, "pt-mnt")
        os.mkdir(src)
        os.mkdir(self.path)
        self.proc = subprocess.Popen([PY, "-m", "bench.passthrough", src, self.path], cwd=REPO)
        _wait_mounted(self.path, self.proc)

    def stop(self):
        _umount(self.path)
        self.proc.wait(30)


class ReplfsImage(Target):
    name = "replfs image"

    def __init__(self, root: str, size_mb: int):
        super().__init__(root)
        self.size_mb = size_mb

    def start(self):
        img = os.path.join(self.root, "replfs.img")
        with open(img, "wb") as f:
            f.truncate(self.size_mb << 20)
        subprocess.run([os.path.join(BIN, "mkfs.replfs"), "-q", "-N", "2", img], check=True,
                       env=_env())
        self.path = os.path.join(self.root, "replfs-mnt")
        os.mkdir(self.path)
        subprocess.run(["mount", "-t", "fuse.replfs", img, self.path], check=True, env=_env())
        _wait_mounted(self.path)

    def stop(self):
        _umount(self.path)


class ReplfsResource(Target):
    """A protocol C resource of a local pair, mounted through mount(8): served
    by replfsd itself.  ``hop=True``: served instead by a process of its own
    over the admin socket (the design before replfsd hosted the mounts;
    bench/hop_mount.py), the same-run baseline of that change."""
    name = "replfs r0/C"

    def __init__(self, root: str, size_mb: int, hop: bool = False):
        super().__init__(root)
        self.size_mb = size_mb
        self.hop = hop
        self.proc = None
        if hop:
            self.name = "replfs r0/C via socket"

    def start(self):
        from replfs.localpair import LocalPair
        self.pair = LocalPair(os.path.join(self.root, "pair-hop" if self.hop else "pair"),
                              size=self.size_mb << 20, protocol="C")
        self.pair.up_fresh()
        self.pair.wait_synced(timeout=600)
        a = self.pair.alpha
        env = _env()
        env.update(REPLFS_CONF=a.conf, REPLFS_NODE=a.name, REPLFS_RUNDIR=a.rundir)
        subprocess.run([os.path.join(BIN, "mkfs.replfs"), "-q", "-N", "2", "r0"], check=True,
                       env=env)
        self.path = os.path.join(self.root, "res-hop-mnt" if self.hop else "res-mnt")
        os.mkdir(self.path)
        if self.hop:
            self.proc = subprocess.Popen([PY, "-m", "bench.hop_mount", "r0", self.path,
                                          a.rundir], env=env,
                                         cwd=REPO)
            _wait_mounted(self.path, self.proc)
            return
        # mount(8) gives the helper no environment: say where things are
        subprocess.run(["mount", "-t", "fuse.replfs", "-o",
                        f"conf={a.conf},node={a.name},rundir={a.rundir}", "r0", self.path],
                       check=True, env=env)
        _wait_mounted(self.path)

    def stop(self):
        _umount(self.path)
        if self.proc is not None:
            self.proc.wait(60)
        self.pair.teardown()


# ---------------------------------------------------------------- main

TARGET_KEYS = ("local", "passthrough", "image", "resource-hop", "resource")


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="python -m bench.fs", description=__doc__.splitlines()[0],
                                 epilog="Targets: local, passthrough, image, resource-hop, "
                                        "resource (see the module's docstring).")
    ap.add_argument("--size", type=int, default=128, metavar="MIB",
                    help="file size of the sequential/random rows (default 128)")
    ap.add_argument("--runtime", type=int, default=5, metavar="S",
                    help="seconds per random and fsync row (default 5)")
    ap.add_argument("--files", type=int, default=10000,
                    help="files to create/stat/readdir/unlink (default 10000)")
    ap.add_argument("--small-files", type=int, default=2000,
                    help="files of 4-64 KiB in the small-file rows (default 2000)")
    ap.add_argument("--bigdir", type=int, default=100000,
                    help="entries of the big-directory readdir (0: no such row; default 100000)")
    ap.add_argument("--rounds", type=int, default=1, help="interleaved rounds, medians (default 1)")
    ap.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    ap.add_argument("--targets", default=",".join(TARGET_KEYS),
                    help="comma-separated subset of: " + ", ".join(TARGET_KEYS))
    add_cli_common(ap)
    args = ap.parse_args(argv)
    keys = [k.strip() for k in args.targets.split(",") if k.strip()]
    bad = [k for k in keys if k not in TARGET_KEYS]
    if bad or not keys:
        ap.error(f"unknown target(s) {', '.join(bad) or '(none given)'}; "
                 f"choose from {', '.join(TARGET_KEYS)}")
    args.targets = keys
    if args.rounds < 1:
        ap.error("--rounds must be at least 1")
    if args.quick:
        args.size, args.runtime, args.files, args.small_files, args.bigdir = 16, 1, 300, 100, 1000
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    cfg = Config(args.size, args.runtime, args.files, args.small_files, args.bigdir)
    rep = Report("fs", "Filesystem layer")
    with tempfile.TemporaryDirectory(prefix="replfs-bench-fs-", dir="/var/tmp") as root:
        cfg.tree_tar, cfg.tree_entries = make_tree_tar(root, quick=args.quick)
        vol_mb = max(1024, args.size * 4 + 512)
        makers = {"local": lambda: LocalDir(root), "passthrough": lambda: PassthroughMount(root),
                  "image": lambda: ReplfsImage(root, vol_mb),
                  "resource": lambda: ReplfsResource(root, vol_mb),
                  "resource-hop": lambda: ReplfsResource(root, vol_mb, hop=True)}
        targets = [makers[k]() for k in args.targets]
        started = []
        try:
            for t in targets:
                print(f"# starting {t.name}", flush=True)
                why = fuse_usable() if t.needs_fuse else None
                try:
                    if why:
                        raise RuntimeError(why)
                    started.append(t)
                    t.start()
                except Exception as e:   # a failed target is reported, the others still run
                    t.error = f"{type(e).__name__}: {e}"
                    print(f"#   {t.name} failed to start: {e}", flush=True)
            per = run_rounds(targets, cfg, args.rounds)
        finally:
            for t in reversed(started):
                try:
                    t.stop()
                except Exception as e:
                    print(f"#   stopping {t.name}: {e}", flush=True)
    names = [t.name for t in targets]
    cand = "replfs r0/C" if "replfs r0/C" in names else names[-1]
    bases = [b for b in ("passthrough", "replfs image") if b in names and b != cand]
    sec = rep.section("fs", "Filesystem: replfs on a protocol C resource against its baselines",
                      names, cand, bases,
                      note=f"medians of {args.rounds} interleaved round(s); times (s) and "
                           f"latencies (µs): lower is better")
    data = add_results(rep, sec, per, targets, args.rounds)
    rep.finish({"args": vars(args), "results": data}, json_out=not args.no_json,
               charts=not args.no_charts)
    return 0


if __name__ == "__main__":
    sys.exit(main())
