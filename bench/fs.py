"""Filesystem benchmark: the replfs mount against two baselines, one run.

Targets, all on this machine's local disk:

* local dir    — a plain directory (the ceiling);
* passthrough  — bench/passthrough.py, a minimal pyfuse3 + trio FUSE mount
                 of a local directory: the cost of FUSE and Python alone;
* replfs image — mkfs.replfs on an image file, mounted with `replfs`
                 (no replication): the cost of the filesystem;
* replfs r0/C via socket — the same, served the way it was before replfsd
                 hosted the mounts: a process of its own whose block
                 requests cross the admin socket (bench/hop_mount.py);
* replfs r0/C  — mkfs.replfs on a protocol C resource of a two-daemon pair
                 (127.0.0.1/127.0.0.2), mounted with mount -t fuse.replfs
                 (served by replfsd).

Workloads: sequential 1 MiB write (+fsync) and read, 4 KiB random read and
write, fsync'd 4 KiB writes (fio when installed, a Python loop otherwise),
and a metadata workload: create, stat and unlink N small files, and a
readdir of a directory with M entries.  The table gives each number and
its ratio to the local directory and to the passthrough mount.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

from .common import table, write_json

PY = sys.executable
BIN = os.path.dirname(PY)


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


# ---------------------------------------------------------------- workloads

def fio(path: str, name: str, rw: str, bs: str, size: str, *, runtime: int | None = None,
        fsync: int = 0, end_fsync: bool = False) -> dict:
    cmd = ["fio", f"--name={name}", f"--filename={os.path.join(path, 'fio.dat')}",
           f"--rw={rw}", f"--bs={bs}", f"--size={size}", "--ioengine=psync",
           "--output-format=json", "--invalidate=1"]
    if runtime:
        cmd += [f"--runtime={runtime}", "--time_based"]
    if fsync:
        cmd.append(f"--fsync={fsync}")
    if end_fsync:
        cmd.append("--end_fsync=1")
    cp = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if cp.returncode != 0:
        raise RuntimeError(f"fio {name}: {cp.stderr.strip() or cp.stdout[-500:]}")
    job = json.loads(cp.stdout[cp.stdout.index("{"):])["jobs"][0]
    side = job["read"] if "read" in rw else job["write"]
    lat = side.get("clat_ns") or side.get("lat_ns") or {}
    pcts = lat.get("percentile", {})
    return {"MB/s": side["bw_bytes"] / 1e6, "IOPS": side["iops"],
            "p50 us": pcts.get("50.000000", 0) / 1e3, "p99 us": pcts.get("99.000000", 0) / 1e3}


def py_io(path: str, name: str, rw: str, bs: int, size: int, *, fsync_each: bool = False,
          seconds: float = 5.0) -> dict:
    """The fallback when fio is missing: the same patterns with os calls."""
    import random
    fn = os.path.join(path, "py.dat")
    buf = os.urandom(bs)
    lats = []
    if "read" in rw and not os.path.exists(fn):
        with open(fn, "wb") as f:
            for _ in range(size // (1 << 20)):
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
                if fsync_each:
                    os.fsync(fd)
            lats.append(time.perf_counter() - s)
            i += 1
            if (not rw.startswith("rand") and not fsync_each and i * bs >= size) or \
                    time.perf_counter() - t0 > seconds:
                break
        if "write" in rw:
            os.fsync(fd)
    finally:
        os.close(fd)
    el = time.perf_counter() - t0
    lats.sort()
    return {"MB/s": moved / el / 1e6, "IOPS": len(lats) / el,
            "p50 us": lats[len(lats) // 2] * 1e6, "p99 us": lats[int(len(lats) * 0.99)] * 1e6}


def data_workloads(path: str, size_mb: int, runtime: int) -> dict:
    out = {}
    if shutil.which("fio"):
        out["seq write 1M"] = fio(path, "seqw", "write", "1M", f"{size_mb}M", end_fsync=True)
        out["seq read 1M"] = fio(path, "seqr", "read", "1M", f"{size_mb}M")
        out["rand read 4k"] = fio(path, "randr", "randread", "4k", f"{size_mb}M", runtime=runtime)
        out["rand write 4k"] = fio(path, "randw", "randwrite", "4k", f"{size_mb}M", runtime=runtime)
        out["fsync write 4k"] = fio(path, "syncw", "write", "4k", "16M", runtime=runtime, fsync=1)
    else:
        size = size_mb << 20
        out["seq write 1M"] = py_io(path, "seqw", "write", 1 << 20, size)
        out["seq read 1M"] = py_io(path, "seqr", "read", 1 << 20, size)
        out["rand read 4k"] = py_io(path, "randr", "randread", 4096, size, seconds=runtime)
        out["rand write 4k"] = py_io(path, "randw", "randwrite", 4096, size, seconds=runtime)
        out["fsync write 4k"] = py_io(path, "syncw", "write", 4096, 16 << 20, fsync_each=True,
                                      seconds=runtime)
    for f in ("fio.dat", "py.dat"):
        try:
            os.unlink(os.path.join(path, f))
        except FileNotFoundError:
            pass
    return out


def meta_workloads(path: str, nfiles: int, bigdir: int) -> dict:
    out = {}
    d = os.path.join(path, "meta")
    os.mkdir(d)
    names = [os.path.join(d, f"f{i:06d}") for i in range(nfiles)]
    t0 = time.perf_counter()
    for n in names:
        os.close(os.open(n, os.O_CREAT | os.O_WRONLY, 0o644))
    out["create"] = {"ops/s": nfiles / (time.perf_counter() - t0)}
    t0 = time.perf_counter()
    for n in names:
        os.stat(n)
    out["stat"] = {"ops/s": nfiles / (time.perf_counter() - t0)}
    t0 = time.perf_counter()
    for n in names:
        os.unlink(n)
    out["unlink"] = {"ops/s": nfiles / (time.perf_counter() - t0)}
    big = os.path.join(path, "big")
    os.mkdir(big)
    t0 = time.perf_counter()
    for i in range(bigdir):
        os.close(os.open(os.path.join(big, f"entry-{i:07d}"), os.O_CREAT | os.O_WRONLY, 0o644))
    fill = time.perf_counter() - t0
    t0 = time.perf_counter()
    count = sum(1 for _ in os.scandir(big))
    el = time.perf_counter() - t0
    if count != bigdir:
        raise RuntimeError(f"readdir of {big} returned {count} entries, expected {bigdir}")
    out[f"readdir {bigdir}"] = {"entries/s": bigdir / el, "s": el, "fill ops/s": bigdir / fill}
    t0 = time.perf_counter()
    for i in range(0, bigdir, max(1, bigdir // 1000)):
        os.stat(os.path.join(big, f"entry-{i:07d}"))
    out["stat in big dir"] = {"ops/s": min(1000, bigdir) / (time.perf_counter() - t0)}
    shutil.rmtree(d)
    return out


# ---------------------------------------------------------------- targets

class Target:
    name = "?"

    def __init__(self, root: str):
        self.root = root
        self.path = ""

    def start(self) -> None: ...

    def stop(self) -> None: ...


class LocalDir(Target):
    name = "local dir"

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
        self.proc = subprocess.Popen([PY, "-m", "bench.passthrough", src, self.path],
                                     cwd=os.path.dirname(os.path.dirname(__file__)))
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
                                         cwd=os.path.dirname(os.path.dirname(__file__)))
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

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="bench.fs", description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=128, help="data file size in MiB (default 128)")
    ap.add_argument("--runtime", type=int, default=5, help="seconds per random/fsync row")
    ap.add_argument("--files", type=int, default=10000, help="small files to create/stat/unlink")
    ap.add_argument("--bigdir", type=int, default=100000, help="entries in the readdir test")
    ap.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    ap.add_argument("--targets", default="local,passthrough,image,resource-hop,resource",
                    help="comma-separated: local, passthrough, image, resource-hop "
                         "(the mount served over the admin socket, the old design), "
                         "resource")
    ap.add_argument("--no-json", action="store_true")
    args = ap.parse_args(argv)
    if args.quick:
        args.size, args.runtime, args.files, args.bigdir = 16, 1, 300, 1000
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="replfs-bench-fs-", dir="/var/tmp") as root:
        vol_mb = max(1024, args.size * 4 + 512)
        makers = {"local": lambda: LocalDir(root), "passthrough": lambda: PassthroughMount(root),
                  "image": lambda: ReplfsImage(root, vol_mb),
                  "resource": lambda: ReplfsResource(root, vol_mb),
                  "resource-hop": lambda: ReplfsResource(root, vol_mb, hop=True)}
        for key in args.targets.split(","):
            t = makers[key]()
            print(f"# {t.name}", flush=True)
            try:
                t.start()
                results[t.name] = {**data_workloads(t.path, args.size, args.runtime),
                                   **meta_workloads(t.path, args.files, args.bigdir)}
            except Exception as e:   # a failed target is reported, the others still run
                print(f"#   {t.name} failed: {e}", flush=True)
                results[t.name] = {"error": str(e)}
            finally:
                try:
                    t.stop()
                except Exception as e:
                    print(f"#   stopping {t.name}: {e}", flush=True)
    rows = []
    base = results.get("local dir", {})
    pt = results.get("passthrough", {})
    for tname, res in results.items():
        if "error" in res:
            rows.append([tname, "FAILED", res["error"][:60], "", "", ""])
            continue
        for wl, m in res.items():
            key = "IOPS" if "4k" in wl else next(iter(m))
            v = m[key]
            b, p = base.get(wl, {}).get(key), pt.get(wl, {}).get(key)
            extra = f"p50 {m['p50 us']:.0f}us p99 {m['p99 us']:.0f}us" if "p50 us" in m else ""
            rows.append([tname, wl, f"{v:.1f} {key}", f"{v / b:.2f}" if b else "-",
                         f"{v / p:.2f}" if p else "-", extra])
    print(table(rows, ["target", "workload", "result", "x local", "x passthrough", "latency"]))
    if not args.no_json:
        print("wrote", write_json("fs", {"args": vars(args), "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
