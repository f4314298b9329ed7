"""Block mirror benchmark: the replicated device against its baselines.

Rows, all measured in this one run on this machine:

* raw file      — pwrite/fdatasync on a plain file from Python threads
                  (what the daemon itself does underneath);
* standalone    — the same through replfsd's local socket, resource
                  Primary with no peer (the cost of the daemon hop);
* protocol A/B/C — connected to a peer on 127.0.0.2.

Workloads: sequential 1 MiB writes (MB/s); 4 KiB writes at queue depth 1
(latency); 4 KiB synchronous writes, each followed by a flush (IOPS and
latency).  The loopback TCP round trip is measured too, since protocol C
should cost "about one round trip" over the standalone row.
"""
from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile
import threading
import time

import trio

from replfs.blockdev import FileBlockDevice
from replfs.ipc.client import DaemonBlockDevice
from replfs.localpair import LocalPair

from .common import Timer, lat_summary, table, write_json

MiB = 1024 * 1024


async def run_workloads(dev, seq_mib: int, n_small: int, n_sync: int) -> dict:
    buf = os.urandom(MiB)
    small = os.urandom(4096)
    # Sequential 1 MiB writes, a few in flight (like a page-cache writeback).
    with Timer() as t:
        async with trio.open_nursery() as n:
            sem = trio.Semaphore(4)

            async def one(i):
                async with sem:
                    await dev.write(i * MiB, buf)
            for i in range(seq_mib):
                await sem.acquire()
                sem.release()
                n.start_soon(one, i)
        await dev.flush()
    seq = seq_mib / t.elapsed
    lat = []
    for i in range(n_small):
        t0 = time.perf_counter()
        await dev.write((i % 4096) * 4096, small)
        lat.append(time.perf_counter() - t0)
    sync_lat = []
    with Timer() as ts:
        for i in range(n_sync):
            t0 = time.perf_counter()
            await dev.write((i % 4096) * 4096 + 16 * MiB, small)
            await dev.flush()
            sync_lat.append(time.perf_counter() - t0)
    return {"seq_write_MBps": seq, "write4k_qd1": lat_summary(lat),
            "sync4k": {**lat_summary(sync_lat), "iops": n_sync / ts.elapsed}}


def tcp_rtt(n: int = 2000) -> dict:
    srv = socket.socket()
    srv.bind(("127.0.0.2", 0))
    srv.listen(1)
    port = srv.getsockname()[1]

    def echo():
        c, _ = srv.accept()
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        while (d := c.recv(64)):
            c.sendall(d)
        c.close()
    th = threading.Thread(target=echo, daemon=True)
    th.start()
    cl = socket.create_connection(("127.0.0.2", port))
    cl.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    lat = []
    for _ in range(n):
        t0 = time.perf_counter()
        cl.sendall(b"x" * 32)
        cl.recv(64)
        lat.append(time.perf_counter() - t0)
    cl.close()
    srv.close()
    return lat_summary(lat)


async def bench_raw(path: str, args) -> dict:
    dev = FileBlockDevice(path)
    try:
        return await run_workloads(dev, args.seq_mib, args.small, args.sync)
    finally:
        await dev.close()


async def bench_daemon(rundir: str, args) -> dict:
    async with trio.open_nursery() as n:
        dev = await DaemonBlockDevice.open(n, "r0", rundir=rundir)
        try:
            return await run_workloads(dev, args.seq_mib, args.small, args.sync)
        finally:
            await dev.close()
            n.cancel_scope.cancel()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.block")
    ap.add_argument("--seq-mib", type=int, default=128)
    ap.add_argument("--small", type=int, default=2000)
    ap.add_argument("--sync", type=int, default=500)
    ap.add_argument("--size-mib", type=int, default=256)
    args = ap.parse_args(argv)
    results: dict = {"params": vars(args)}
    root = tempfile.mkdtemp(prefix="replfs-bench-")
    raw = os.path.join(root, "raw.img")
    with open(raw, "wb") as f:
        f.truncate(args.size_mib * MiB)
    print("measuring: loopback TCP round trip", flush=True)
    results["tcp_rtt"] = tcp_rtt()
    print("measuring: raw file", flush=True)
    results["raw"] = trio.run(bench_raw, raw, args)
    for mode in ("standalone", "A", "B", "C"):
        print(f"measuring: {mode}", flush=True)
        pair = LocalPair(os.path.join(root, mode), protocol="C" if mode == "standalone" else mode,
                         size=args.size_mib * MiB)
        try:
            for n in pair.nodes:
                n.adm("create-md", "r0")
                n.start()
            if mode == "standalone":
                pair.alpha.adm("attach", "r0")
                pair.alpha.adm("primary", "--force", "r0")
            else:
                for n in pair.nodes:
                    n.adm("up", "r0")
                pair.alpha.wait(lambda s: s["cstate"] == "Connected", what="connection")
                pair.alpha.adm("primary", "--force", "r0")
                pair.wait_synced(timeout=300)
            results[mode] = trio.run(bench_daemon, pair.alpha.rundir, args)
        finally:
            pair.teardown()
    path = write_json("block", results)
    raw_r = results["raw"]
    rows = []
    for name in ("raw", "standalone", "A", "B", "C"):
        r = results[name]
        rows.append([name, r["seq_write_MBps"], r["seq_write_MBps"] / raw_r["seq_write_MBps"],
                     r["write4k_qd1"]["p50_us"], r["write4k_qd1"]["p99_us"],
                     r["sync4k"]["iops"], r["sync4k"]["iops"] / raw_r["sync4k"]["iops"],
                     r["sync4k"]["p50_us"], r["sync4k"]["p99_us"]])
    print()
    print(table(rows, ["target", "seq MB/s", "x raw", "4k p50 us", "4k p99 us",
                       "sync IOPS", "x raw", "sync p50 us", "sync p99 us"]))
    rtt = results["tcp_rtt"]
    c, s = results["C"]["write4k_qd1"]["p50_us"], results["standalone"]["write4k_qd1"]["p50_us"]
    print(f"\nloopback TCP round trip p50 {rtt['p50_us']:.1f} us; protocol C adds "
          f"{c - s:.1f} us p50 per 4 KiB write over standalone "
          f"({(c - s) / rtt['p50_us']:.1f} round trips)")
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
