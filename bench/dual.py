"""Dual-primary: both nodes of one shared mount at once against one node alone.

Setup, as a user would build it: a LocalPair (replfsd alpha on 127.0.0.1,
beta on 127.0.0.2) with a protocol C resource r0 and allow-two-primaries,
the o2cb cluster stack online on both, mkfs.replfs -N 2 on alpha, r0
Primary on both, and mount -t fuse.replfs on each node.

Both nodes stay mounted for the whole run.  "one node" is alpha alone with
beta mounted and idle (beta may still hold cached locks from the previous
"two nodes" run: taking them back is part of sharing a volume);
"two nodes" is alpha and beta at once, one thread each in this process,
released together by a barrier.  A rate is the total operations over the
wall time from that release to the last finisher.

Rows:

* create private  — create + 4 KiB write + close of N files in total:
                    each node N/2 in a directory of its own (one node: N/2
                    in each of two directories, one after the other: the
                    same directory sizes);
* create shared   — the same, both nodes in ONE directory (one node: N in
                    one directory);
* 4k write+fsync  — pwrite 4 KiB + fsync, N in total, each writer on a
                    file of its own;
* hand-over       — ping-pong on one file: write 8 bytes on alpha, read
                    them on beta, per round trip (µs, p50); one node: the
                    same write and read through two descriptors on alpha.
                    Every read is checked against the bytes just written;
* seq write 1M    — each writer 64 MiB in 1 MiB writes + fsync at the end
                    to a file of its own; aggregate MB/s (one node writes
                    64 MiB, two nodes 128 MiB).

Each round runs every row once per variant; rounds alternate which
variant goes first.  The table gives the median over rounds and the ratio
two nodes / one node of those medians (for rates > 1 means the second
node adds throughput; for the hand-over it is the cost of the lock moving
between nodes).  The last column splits the two-node figure: each
node's own rate (its operations over its own time), and for the hand-over
alpha's write / beta's read in µs.

    python -m bench.dual [--rounds 5] [--quick]
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time

from replfs.ipc.client import SyncClient, socket_path
from replfs.localpair import LocalPair, cluster_conf, free_port

from .common import Report, add_cli_common, pct

PY = sys.executable
BIN = os.path.dirname(PY)

# o2cb timeouts as the integration tests use them: a silent node is dead
# after 1.5 s (the benchmark never loses a node; short values keep a
# failed run from hanging)
TIMEOUTS = ("O2CB_HEARTBEAT_THRESHOLD=3\nO2CB_IDLE_TIMEOUT_MS=1500\n"
            "O2CB_KEEPALIVE_DELAY_MS=300\nO2CB_RECONNECT_DELAY_MS=200\n")


def _env(**extra) -> dict:
    env = dict(os.environ)
    env.pop("REPLFS_NODE", None)
    env["PATH"] = BIN + os.pathsep + env.get("PATH", "")
    env.update(extra)
    return env


def _run(*cmd, env=None, timeout: float = 120) -> None:
    cp = subprocess.run([str(c) for c in cmd], capture_output=True, text=True,
                        env=env or _env(), timeout=timeout)
    if cp.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} exited {cp.returncode}: "
                           f"{(cp.stderr or cp.stdout).strip()[-500:]}")


def _call(node, op: str, **args) -> dict:
    with SyncClient(socket_path(node.rundir), timeout=30) as c:
        return c.call(op, **args)[0]


def _wait_mounted(mnt: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.ismount(mnt):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{mnt} not mounted after {timeout}s")
        time.sleep(0.05)


def _umount(mnt: str) -> None:
    for cmd in (["umount", mnt], ["umount", "-l", mnt]):
        if not os.path.ismount(mnt):
            return
        subprocess.run(cmd, capture_output=True, timeout=60)


@contextlib.contextmanager
def shared_mounts(root: str, size_mb: int):
    """r0 Primary on both nodes, the cluster stack online, a volume made on
    alpha and mounted on both.  Yields (pair, alpha's mount, beta's mount)."""
    pair = LocalPair(os.path.join(root, "pair"), extra_net="allow-two-primaries;",
                     size=size_mb << 20)
    cdir = os.path.join(root, "etc")
    os.makedirs(cdir)
    conf = os.path.join(cdir, "cluster.conf")
    with open(conf, "w") as f:
        f.write(cluster_conf("tc", free_port("127.0.0.1"), free_port("127.0.0.2")))
    with open(os.path.join(cdir, "o2cb"), "w") as f:
        f.write(TIMEOUTS)
    mnts = {n.name: os.path.join(root, "m" + n.name[0]) for n in pair.nodes}
    for m in mnts.values():
        os.mkdir(m)
    try:
        pair.up_fresh()
        for n in pair.nodes:
            _call(n, "cluster-online", cluster="tc", conf=conf)
        deadline = time.monotonic() + 15
        while not all(_call(n, "cluster-status")["connected"] for n in pair.nodes):
            if time.monotonic() > deadline:
                raise RuntimeError("the cluster nodes did not connect")
            time.sleep(0.05)
        a = pair.alpha
        _run(os.path.join(BIN, "mkfs.replfs"), "-q", "-N", "2", "-c", a.conf,
             "--rundir", a.rundir, "r0", env=_env(REPLFS_NODE=a.name))
        pair.beta.adm("primary", "r0")
        for n in pair.nodes:
            # mount(8) gives the helper no environment: say where things are
            _run("mount", "-t", "fuse.replfs", "r0", mnts[n.name], "-o",
                 f"conf={n.conf},node={n.name},rundir={n.rundir}")
            _wait_mounted(mnts[n.name])
        yield pair, mnts["alpha"], mnts["beta"]
    finally:
        for m in mnts.values():
            _umount(m)
        pair.teardown()


# ---------------------------------------------------------------- workloads

def at_once(jobs: list) -> tuple[float, list[float]]:
    """Run each job in a thread of its own, released together; returns the
    wall time to the last finisher and each job's own time."""
    bar = threading.Barrier(len(jobs))
    starts, ends = [0.0] * len(jobs), [0.0] * len(jobs)
    errors: list[BaseException] = []

    def body(i, job):
        try:
            bar.wait()
            starts[i] = time.perf_counter()
            job()
            ends[i] = time.perf_counter()
        except BaseException as e:      # noqa: BLE001  (raised below)
            errors.append(e)
            bar.abort()

    threads = [threading.Thread(target=body, args=(i, j)) for i, j in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return max(ends) - min(starts), [e - s for s, e in zip(starts, ends)]


def creates(d: str, prefix: str, n: int) -> None:
    payload = b"c" * 4096
    for i in range(n):
        fd = os.open(os.path.join(d, f"{prefix}{i:05d}"),
                     os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        try:
            os.write(fd, payload)
        finally:
            os.close(fd)


def fsync_writes(path: str, n: int) -> None:
    buf = b"w" * 4096
    fd = os.open(path, os.O_WRONLY)
    try:
        for i in range(n):
            os.pwrite(fd, buf, (i % 16) * 4096)
            os.fsync(fd)
    finally:
        os.close(fd)


def stream(path: str, mib: int) -> None:
    buf = os.urandom(1 << 20)
    fd = os.open(path, os.O_CREAT | os.O_TRUNC | os.O_WRONLY, 0o644)
    try:
        for _ in range(mib):
            os.write(fd, buf)
        os.fsync(fd)
    finally:
        os.close(fd)


class Rows:
    """The five rows; each ``row(variant, r)`` returns {"value": ..., "nodes":
    {node: value}} for one round."""

    def __init__(self, ma: str, mb: str, files: int, fsyncs: int, pings: int, mib: int):
        self.ma, self.mb = ma, mb
        self.files, self.fsyncs, self.pings, self.mib = files, fsyncs, pings, mib
        for m, who in ((ma, "a"), (mb, "b")):
            with open(os.path.join(m, f"fsync-{who}"), "wb") as f:
                f.write(bytes(16 * 4096))
        with open(os.path.join(ma, "pingpong"), "wb") as f:
            f.write(bytes(8))
        with open(os.path.join(ma, "pingpong-solo"), "wb") as f:
            f.write(bytes(8))

    def create_private(self, variant: str, r: int) -> dict:
        n = self.files
        half = n // 2
        if variant == "one":
            # the same two directories of N/2, one after the other: a
            # directory's size changes what a create costs
            d1, d2 = os.path.join(self.ma, f"cp{r}-one1"), os.path.join(self.ma, f"cp{r}-one2")
            os.mkdir(d1)
            os.mkdir(d2)
            wall, _ = at_once([lambda: (creates(d1, "a", half), creates(d2, "a", half))])
            return {"value": 2 * half / wall, "nodes": {"alpha": 2 * half / wall}}
        da, db = os.path.join(self.ma, f"cp{r}-a"), os.path.join(self.mb, f"cp{r}-b")
        os.mkdir(da)
        os.mkdir(db)
        wall, each = at_once([lambda: creates(da, "a", half), lambda: creates(db, "b", half)])
        return {"value": 2 * half / wall,
                "nodes": {"alpha": half / each[0], "beta": half / each[1]}}

    def create_shared(self, variant: str, r: int) -> dict:
        n = self.files
        if variant == "one":
            d = os.path.join(self.ma, f"cs{r}-one")
            os.mkdir(d)
            wall, _ = at_once([lambda: creates(d, "a", n)])
            return {"value": n / wall, "nodes": {"alpha": n / wall}}
        os.mkdir(os.path.join(self.ma, f"cs{r}"))
        da, db = os.path.join(self.ma, f"cs{r}"), os.path.join(self.mb, f"cs{r}")
        half = n // 2
        wall, each = at_once([lambda: creates(da, "a", half), lambda: creates(db, "b", half)])
        if len(os.listdir(da)) != 2 * half:
            raise RuntimeError(f"shared directory cs{r}: {len(os.listdir(da))} entries "
                               f"on alpha, expected {2 * half}")
        return {"value": 2 * half / wall,
                "nodes": {"alpha": half / each[0], "beta": half / each[1]}}

    def fsync_4k(self, variant: str, r: int) -> dict:
        n = self.fsyncs
        fa, fb = os.path.join(self.ma, "fsync-a"), os.path.join(self.mb, "fsync-b")
        if variant == "one":
            wall, _ = at_once([lambda: fsync_writes(fa, n)])
            return {"value": n / wall, "nodes": {"alpha": n / wall}}
        half = n // 2
        wall, each = at_once([lambda: fsync_writes(fa, half), lambda: fsync_writes(fb, half)])
        return {"value": 2 * half / wall,
                "nodes": {"alpha": half / each[0], "beta": half / each[1]}}

    def hand_over(self, variant: str, r: int) -> dict:
        if variant == "one":
            w = os.path.join(self.ma, "pingpong-solo")
            rd = w
        else:
            w, rd = os.path.join(self.ma, "pingpong"), os.path.join(self.mb, "pingpong")
        fw, fr = os.open(w, os.O_RDWR), os.open(rd, os.O_RDONLY)
        samples, writes, reads, stale = [], [], [], 0
        clock = time.perf_counter
        try:
            for i in range(self.pings + 5):     # the first 5 are warm-up
                want = struct.pack("<Q", (r << 32) | i)
                t0 = clock()
                os.pwrite(fw, want, 0)
                t1 = clock()
                got = os.pread(fr, 8, 0)
                t2 = clock()
                if got != want:
                    stale += 1
                if i >= 5:
                    samples.append(t2 - t0)
                    writes.append(t1 - t0)
                    reads.append(t2 - t1)
        finally:
            os.close(fw)
            os.close(fr)
        return {"value": pct(samples, 50) * 1e6, "p99_us": pct(samples, 99) * 1e6,
                "write_p50_us": pct(writes, 50) * 1e6, "read_p50_us": pct(reads, 50) * 1e6,
                "stale_reads": stale, "nodes": {}}

    def seq_write(self, variant: str, r: int) -> dict:
        mib = self.mib
        paths = ([os.path.join(self.ma, "stream-one")] if variant == "one" else
                 [os.path.join(self.ma, "stream-a"), os.path.join(self.mb, "stream-b")])
        wall, each = at_once([(lambda p=p: stream(p, mib)) for p in paths])
        for p in paths:
            if os.stat(p).st_size != mib << 20:
                raise RuntimeError(f"{p}: {os.stat(p).st_size} bytes after the stream")
        # deleted on the node that wrote it, outside the timing: the volume
        # needs room for one round only
        for p in paths:
            os.unlink(p)
        written = (mib << 20) / 1e6
        names = ["alpha", "beta"][:len(paths)]
        return {"value": written * len(paths) / wall,
                "nodes": {nm: written / t for nm, t in zip(names, each)}}


# (key, label, unit, higher is better)
ROWS = [("create_private", "create private", "files/s", True),
        ("create_shared", "create shared dir", "files/s", True),
        ("fsync_4k", "4k write+fsync", "ops/s", True),
        ("hand_over", "hand-over write+read", "µs p50", False),
        ("seq_write", "seq write 1M", "MB/s", True)]
VARIANTS = ["one", "two"]


# ---------------------------------------------------------------- main

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.dual", description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--files", type=int, default=400, help="files created per row (in total)")
    ap.add_argument("--fsyncs", type=int, default=400, help="4 KiB write+fsync per row (in total)")
    ap.add_argument("--pings", type=int, default=200, help="hand-over round trips per round")
    ap.add_argument("--mib", type=int, default=64, help="MiB per streaming writer")
    ap.add_argument("--quick", action="store_true", help="small counts, for a smoke run")
    add_cli_common(ap)
    args = ap.parse_args(argv)
    if args.quick:
        args.rounds, args.files, args.fsyncs, args.pings, args.mib = 1, 40, 40, 20, 8
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
        print("bench.dual: needs root and /dev/fuse; skipped")
        return 0
    # one round's streams (3 writers) + every round's small files + 2 journals
    size_mb = max(256, 3 * args.mib + 192)
    per_round: dict[tuple[str, str], list[dict]] = {}
    t_start = time.monotonic()
    try:
        with tempfile.TemporaryDirectory(prefix="replfs-bench-dual-", dir="/var/tmp") as root, \
                shared_mounts(root, size_mb) as (_pair, ma, mb):
            t_setup = time.monotonic() - t_start
            print(f"# setup (pair, cluster, mkfs, two mounts): {t_setup:.1f}s", flush=True)
            rows = Rows(ma, mb, args.files, args.fsyncs, args.pings, args.mib)
            for r in range(args.rounds):
                seq = VARIANTS if r % 2 == 0 else VARIANTS[::-1]
                for key, _, _, _ in ROWS:
                    for v in seq:
                        per_round.setdefault((key, v), []).append(getattr(rows, key)(v, r))
                print(f"round {r + 1}/{args.rounds} done "
                      f"({time.monotonic() - t_start:.0f}s)", flush=True)
    except Exception as e:
        print(f"bench.dual failed: {type(e).__name__}: {e}", flush=True)
        return 1
    total_s = time.monotonic() - t_start

    result = {}
    rep = Report("dual", "Dual-primary: both nodes at once against one node")
    stale = sum(s["stale_reads"] for v in VARIANTS for s in per_round[("hand_over", v)])
    sec = rep.section("dual", "Dual-primary: one shared mount on each node",
                      ["one node", "two nodes"], "two nodes", ["one node"],
                      note=f"one node = alpha alone, beta mounted and idle; medians of "
                           f"{args.rounds} interleaved rounds; hand-over reads that missed the "
                           f"write: {stale}; total {total_s:.0f}s")
    for key, label, unit, higher in ROWS:
        med = {v: statistics.median(s["value"] for s in per_round[(key, v)]) for v in VARIANTS}
        ratio = med["two"] / med["one"] if med["one"] else float("nan")
        two = per_round[(key, "two")]
        entry = {"unit": unit, "higher_is_better": higher, "ratio_two_over_one": ratio}
        for v in VARIANTS:
            rs = per_round[(key, v)]
            entry["one node" if v == "one" else "two nodes"] = {
                "median": med[v], "rounds": [s["value"] for s in rs],
                "per_node_rounds": [s["nodes"] for s in rs],
                **({"p99_us_rounds": [s["p99_us"] for s in rs],
                    "write_p50_us_rounds": [s["write_p50_us"] for s in rs],
                    "read_p50_us_rounds": [s["read_p50_us"] for s in rs],
                    "stale_reads": sum(s["stale_reads"] for s in rs)}
                   if key == "hand_over" else {})}
        result[label] = entry
        sec.add(label, unit, {"one node": med["one"], "two nodes": med["two"]},
                higher_is_better=higher)
        if key == "hand_over":   # alpha's write / beta's read, µs
            sec.add("hand-over: alpha's write p50", "µs", {"two nodes": statistics.median(
                s["write_p50_us"] for s in two)}, higher_is_better=False)
            sec.add("hand-over: beta's read p50", "µs", {"two nodes": statistics.median(
                s["read_p50_us"] for s in two)}, higher_is_better=False)
        else:
            sec.note += "; %s, two nodes, alpha / beta: %.1f / %.1f %s" % (
                label, statistics.median(s["nodes"]["alpha"] for s in two),
                statistics.median(s["nodes"]["beta"] for s in two), unit)
    rep.finish({"args": vars(args), "baseline": "alpha alone, beta mounted and idle",
                "volume_mb": size_mb, "setup_s": t_setup, "total_s": total_s,
                "results": result}, json_out=not args.no_json, charts=not args.no_charts)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
