"""Per-request cost of replfs.fuse against pyfuse3, same machine, same run.

One small in-memory filesystem, written twice with identical semantics:
on our layer (``replfs.fuse``) and on pyfuse3 ("what a user would write").
Entry and attribute timeouts are 0 on both, so every operation reaches the
server.  Workloads, each timed per operation from this process:

* stat         os.stat of one file (LOOKUP + GETATTRs),
* write+fsync  4 KiB pwrite + fsync (WRITE + FSYNC; fsync is a no-op),
* readdir      os.listdir of a 100-entry directory (OPENDIR, READDIRPLUS,
               RELEASEDIR).

Targets: ``ours`` (inline dispatch, the policy for handlers that never
block), ``ours-tasks`` (the default policy: writes and fsyncs get a task
each, as a filesystem with real I/O would), ``pyfuse3``, and a plain
directory on tmpfs as the kernel floor.  Rounds alternate their order; the
table gives the median over rounds of each round's p50, and the server's
CPU per operation from /proc/PID/task/*/schedstat.

    python -m bench.fuse_layer [--rounds 3] [--quick]
"""
from __future__ import annotations

import argparse
import errno
import os
import select
import signal
import stat
import statistics
import subprocess
import sys
import tempfile
import time

from replfs.fuse.mount import find_mount

from .common import Report, add_cli_common, lat_summary

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------ servers

class _Store:
    """The shared in-memory tree both servers use: ino -> node."""

    def __init__(self):
        now = time.time_ns()
        self.nodes = {1: {"mode": stat.S_IFDIR | 0o755, "kids": {}, "data": bytearray(),
                          "t": now}}
        self.next = 2

    def new(self, parent: int, name: bytes, mode: int) -> int:
        ino = self.next
        self.next += 1
        self.nodes[ino] = {"mode": mode, "kids": {}, "data": bytearray(), "t": time.time_ns()}
        self.nodes[parent]["kids"][name] = ino
        return ino


def _fill(a, ino: int, node: dict) -> None:
    a.st_ino = ino
    a.st_mode = node["mode"]
    a.st_nlink = 2 if stat.S_ISDIR(node["mode"]) else 1
    a.st_size = len(node["data"])
    a.st_blksize = 4096
    a.st_blocks = (len(node["data"]) + 511) // 512
    a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = node["t"]
    a.st_uid = a.st_gid = 0
    a.entry_timeout = a.attr_timeout = 0


def _make_ops(base, EntryAttributes, FileInfo, FUSEError, readdir_reply, extra=None):
    """One Operations class body for both layers (their APIs agree)."""

    class MemOps(base):
        def __init__(self):
            super().__init__()
            self.s = _Store()
            self.fhs: dict[int, int] = {}
            self.nfh = 0

        def _attr(self, ino):
            a = EntryAttributes()
            node = self.s.nodes.get(ino)
            if node is None:
                raise FUSEError(errno.ENOENT)
            _fill(a, ino, node)
            return a

        async def lookup(self, parent, name, ctx=None):
            ino = self.s.nodes[parent]["kids"].get(bytes(name))
            if ino is None:
                raise FUSEError(errno.ENOENT)
            return self._attr(ino)

        async def forget(self, inode_list):
            pass

        async def getattr(self, ino, ctx=None):
            return self._attr(ino)

        async def setattr(self, ino, attr, fields, fh, ctx):
            if fields.update_size:
                del self.s.nodes[ino]["data"][attr.st_size:]
            return self._attr(ino)

        async def _open(self, ino):
            self.nfh += 1
            self.fhs[self.nfh] = ino
            return self.nfh

        async def open(self, ino, flags, ctx):
            return FileInfo(fh=await self._open(ino))

        async def create(self, parent, name, mode, flags, ctx):
            ino = self.s.new(parent, bytes(name), stat.S_IFREG | (mode & 0o7777))
            return FileInfo(fh=await self._open(ino)), self._attr(ino)

        async def mkdir(self, parent, name, mode, ctx):
            return self._attr(self.s.new(parent, bytes(name), stat.S_IFDIR | (mode & 0o7777)))

        async def read(self, fh, off, size):
            return bytes(self.s.nodes[self.fhs[fh]]["data"][off:off + size])

        async def write(self, fh, off, buf):
            data = self.s.nodes[self.fhs[fh]]["data"]
            if off > len(data):
                data.extend(bytes(off - len(data)))
            data[off:off + len(buf)] = buf
            return len(buf)

        async def flush(self, fh):
            pass

        async def fsync(self, fh, datasync):
            pass

        async def release(self, fh):
            self.fhs.pop(fh, None)

        async def opendir(self, ino, ctx):
            return await self._open(ino)

        async def readdir(self, fh, start, token):
            kids = sorted(self.s.nodes[self.fhs[fh]]["kids"].items())
            for i in range(start, len(kids)):
                if not readdir_reply(token, kids[i][0], self._attr(kids[i][1]), i + 1):
                    return

        async def releasedir(self, fh):
            self.fhs.pop(fh, None)

        async def statfs(self, ctx):
            raise FUSEError(errno.ENOSYS)

    for k, v in (extra or {}).items():
        setattr(MemOps, k, v)
    return MemOps


def serve_ours(mnt: str, policy: str) -> None:
    import trio

    from replfs import fuse

    extra = {"task_opcodes": fuse.ALL_INLINE if policy == "inline" else None}
    Ops = _make_ops(fuse.Operations, fuse.EntryAttributes, fuse.FileInfo, fuse.FUSEError,
                    fuse.readdir_reply, extra)

    async def main():
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as sigs:
            async with trio.open_nursery() as n:
                s = fuse.Session(Ops(), mnt, subtype="replfs-bench", fsname="bench",
                                 options=["default_permissions"])
                await n.start(s.run)
                print("READY", flush=True)
                async for _ in sigs:
                    break
                await s.unmount()
    trio.run(main)


def serve_pyfuse3(mnt: str) -> None:
    import pyfuse3
    import trio

    def _fuse_error(code):
        return pyfuse3.FUSEError(code)
    Ops = _make_ops(pyfuse3.Operations, pyfuse3.EntryAttributes, pyfuse3.FileInfo,
                    _fuse_error, pyfuse3.readdir_reply)
    pyfuse3.init(Ops(), mnt, set(pyfuse3.default_options) | {"fsname=bench-pyfuse3"})

    async def main():
        async with trio.open_nursery() as n:
            n.start_soon(pyfuse3.main)
            print("READY", flush=True)
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as sigs:
                async for _ in sigs:
                    break
            pyfuse3.terminate()
    try:
        trio.run(main)
    finally:
        pyfuse3.close(unmount=True)


# ------------------------------------------------------------------ client side

class Target:
    def __init__(self, name: str, root: str, proc: subprocess.Popen | None = None):
        self.name, self.root, self.proc = name, root, proc

    def cpu_ns(self) -> int:
        if self.proc is None:
            return 0
        total = 0
        base = f"/proc/{self.proc.pid}/task"
        for tid in os.listdir(base):
            try:
                with open(f"{base}/{tid}/schedstat") as f:
                    total += int(f.read().split()[0])
            except OSError:
                pass
        return total


def start_server(kind: str, mnt: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "bench.fuse_layer", "--serve", kind, mnt],
                            cwd=REPO, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": REPO})
    r, _, _ = select.select([proc.stdout], [], [], 30)
    if not r or proc.stdout.readline().strip() != "READY":
        proc.kill()
        raise RuntimeError(f"{kind} server did not start")
    return proc


def stop_server(proc: subprocess.Popen, mnt: str) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)
    if find_mount(mnt) is not None:          # not ismount(): False on a dead mount
        subprocess.run(["umount", "-l", mnt], capture_output=True)


def prepare(root: str) -> None:
    with open(os.path.join(root, "file"), "wb") as f:
        f.write(b"x" * 4096)
    d = os.path.join(root, "dir")
    os.mkdir(d)
    for i in range(100):
        open(os.path.join(d, f"entry-{i:03d}"), "wb").close()


def run_stat(t: Target, n: int) -> list[float]:
    p = os.path.join(t.root, "file")
    out = []
    clock = time.perf_counter
    for _ in range(n):
        t0 = clock()
        os.stat(p)
        out.append(clock() - t0)
    return out


def run_write(t: Target, n: int) -> list[float]:
    fd = os.open(os.path.join(t.root, "file"), os.O_WRONLY)
    buf = b"y" * 4096
    out = []
    clock = time.perf_counter
    try:
        for i in range(n):
            t0 = clock()
            os.pwrite(fd, buf, (i % 16) * 4096)
            os.fsync(fd)
            out.append(clock() - t0)
    finally:
        os.close(fd)
    return out


def run_readdir(t: Target, n: int) -> list[float]:
    d = os.path.join(t.root, "dir")
    out = []
    clock = time.perf_counter
    for _ in range(n):
        t0 = clock()
        os.listdir(d)
        out.append(clock() - t0)
    return out


WORKLOADS = [("stat", run_stat, 5000), ("4k write+fsync", run_write, 2000),
             ("readdir 100", run_readdir, 300)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.fuse_layer",
                                description=__doc__.splitlines()[0])
    p.add_argument("--serve", nargs=2, metavar=("KIND", "MNT"), help=argparse.SUPPRESS)
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    p.add_argument("--quick", action="store_true", help="a tenth of the operations")
    add_cli_common(p)
    args = p.parse_args(argv)
    if args.serve:
        kind, mnt = args.serve
        if kind == "pyfuse3":
            serve_pyfuse3(mnt)
        else:
            serve_ours(mnt, "inline" if kind == "ours" else "default")
        return 0
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
        print("bench.fuse_layer: needs root and /dev/fuse; skipped")
        return 0
    scale = 0.1 if args.quick else 1.0
    kinds = ["ours", "ours-tasks", "pyfuse3"]
    tmp = tempfile.mkdtemp(prefix="bench-fuse-")
    shm = tempfile.mkdtemp(prefix="bench-fuse-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    targets: dict[str, Target] = {}
    procs = []
    per_round: dict[tuple[str, str], list[dict]] = {}
    try:
        for k in kinds:
            mnt = os.path.join(tmp, k)
            os.mkdir(mnt)
            proc = start_server(k, mnt)
            procs.append((proc, mnt))
            targets[k] = Target(k, mnt, proc)
        targets["tmpfs"] = Target("tmpfs", shm)
        for t in targets.values():
            prepare(t.root)
        order = list(targets)
        for r in range(args.rounds):
            seq = order if r % 2 == 0 else order[::-1]
            for wname, fn, n in WORKLOADS:
                n = max(10, int(n * scale))
                for name in seq:
                    t = targets[name]
                    cpu0 = t.cpu_ns()
                    samples = fn(t, n)
                    cpu = (t.cpu_ns() - cpu0) / n / 1000
                    s = lat_summary(samples)
                    s["server_cpu_us"] = cpu
                    per_round.setdefault((wname, name), []).append(s)
            print(f"round {r + 1}/{args.rounds} done", flush=True)
    except Exception as e:
        print(f"bench.fuse_layer failed: {type(e).__name__}: {e}", flush=True)
        return 1
    finally:
        for proc, mnt in procs:
            stop_server(proc, mnt)
        subprocess.run(["rm", "-rf", shm], capture_output=True)
        for _, mnt in procs:
            if find_mount(mnt) is None:
                os.rmdir(mnt)
        if not any(find_mount(m) for _, m in procs):
            os.rmdir(tmp)

    result = {}
    rep = Report("fuse_layer", "FUSE layer: replfs.fuse against pyfuse3")
    names = list(targets)
    sec = rep.section("fuse_layer", "FUSE layer: per-request latency, in-memory filesystem",
                      names, "ours", ["pyfuse3"],
                      note=f"medians over {args.rounds} interleaved rounds of each round's "
                           f"percentile; ours: inline dispatch, ours-tasks: a task per write "
                           f"and fsync; tmpfs: the kernel floor")
    for wname, _, _ in WORKLOADS:
        med = {}
        for name in names:
            rs = per_round[(wname, name)]
            med[name] = {k: statistics.median(s[k] for s in rs)
                         for k in ("p50_us", "p99_us", "p99_9_us", "server_cpu_us")}
            result.setdefault(wname, {})[name] = {
                **med[name], "rounds_p50_us": [s["p50_us"] for s in rs]}
            rep.add_latency(wname, name, p50_us=med[name]["p50_us"],
                            p99_us=med[name]["p99_us"], p99_9_us=med[name]["p99_9_us"])
        sec.add(f"{wname} p50", "µs", {n: m["p50_us"] for n, m in med.items()},
                higher_is_better=False)
        sec.add(f"{wname} p99", "µs", {n: m["p99_us"] for n, m in med.items()},
                higher_is_better=False)
        sec.add(f"{wname} server CPU", "µs/op",
                {n: m["server_cpu_us"] for n, m in med.items() if n != "tmpfs"},
                higher_is_better=False)
    rep.finish({"rounds": args.rounds, "scale": scale, "results": result},
               json_out=not args.no_json, charts=not args.no_charts)
    return 0


if __name__ == "__main__":
    sys.exit(main())
