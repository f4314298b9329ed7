"""Block mirror benchmark: the replicated device against its baselines.

Rows, all measured in this one run on this machine:

* raw file      — pwrite/fdatasync on a plain file from Python threads
                  (what the daemon itself does underneath);
* standalone    — the same through replfsd's local socket, resource
                  Primary with no peer (the cost of the daemon hop);
* protocol A/B/C — connected to a peer on 127.0.0.2.
* C vs C+TLS    — what ``net { tls yes; }`` costs: two protocol C pairs,
                  one with TLS, measured in turns (``--tls-rounds``), medians.
* device file   — fio on the protocol C resource's device file (what an
                  application or a filesystem sees) against fio on local
                  files: the same job on two files in parallel (what the
                  pair writes underneath) and on the raw backing file,
                  measured in turns (``--devfile-rounds``), medians, with
                  the fast-path issue's targets as ratios (``--only-devfile``).

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


def _up_pair(root: str, args, *, tls: bool, size_mib: int) -> LocalPair:
    pair = LocalPair(root, protocol="C", size=size_mib * MiB,
                     extra_net="\n\t\ttls yes;" if tls else "")
    if tls:
        pair.alpha.adm("tls-keygen")
        import shutil
        src, dst = os.path.join(pair.alpha.root, "tls"), os.path.join(pair.beta.root, "tls")
        os.makedirs(dst, mode=0o700, exist_ok=True)
        for name in ("ca.crt", "beta.crt", "beta.key"):
            shutil.copy2(os.path.join(src, name), os.path.join(dst, name))
    for n in pair.nodes:
        n.adm("create-md", "r0")
        n.start()
        n.adm("up", "r0")
    pair.alpha.wait(lambda s: s["cstate"] == "Connected", what="connection")
    pair.alpha.adm("primary", "--force", "r0")
    pair.wait_synced(timeout=300)
    return pair


def _median(values: list[float]) -> float:
    v = sorted(values)
    return v[len(v) // 2] if len(v) % 2 else (v[len(v) // 2 - 1] + v[len(v) // 2]) / 2


def bench_tls(root: str, args) -> dict:
    """Protocol C with and without TLS, measured in turns on two live pairs."""
    size = max(64, args.tls_seq_mib + 24)
    small = argparse.Namespace(seq_mib=args.tls_seq_mib, small=args.small // 2,
                               sync=args.sync // 2)
    pairs = {}
    try:
        for name, on in (("C", False), ("C+TLS", True)):
            pairs[name] = _up_pair(os.path.join(root, f"tls-{name}"), args, tls=on,
                                   size_mib=size)
        assert pairs["C+TLS"].alpha.status()["tls"], "the TLS pair is not using TLS"
        runs: dict[str, list[dict]] = {"C": [], "C+TLS": []}
        for _ in range(args.tls_rounds):
            for name, pair in pairs.items():
                runs[name].append(trio.run(bench_daemon, pair.alpha.rundir, small))
    finally:
        for pair in pairs.values():
            pair.teardown()
    out = {}
    for name, rs in runs.items():
        out[name] = {"seq_write_MBps": _median([r["seq_write_MBps"] for r in rs]),
                     "write4k_p50_us": _median([r["write4k_qd1"]["p50_us"] for r in rs]),
                     "sync4k_iops": _median([r["sync4k"]["iops"] for r in rs]),
                     "runs": rs}
    return out


# ---------------------------------------------------------------- device file

def _fio(jobs: list[tuple[str, str]], rw: str, bs: str, size: str, *, runtime: int | None = None,
         sync: bool = False) -> list[dict]:
    """One fio run: ``jobs`` [(name, file)] in parallel, O_DIRECT, queue
    depth 1 (psync); ``sync``: O_DSYNC writes.  fio's JSON per job."""
    import json
    import subprocess
    cmd = ["fio", "--output-format=json", f"--rw={rw}", f"--bs={bs}", f"--size={size}",
           "--direct=1", "--ioengine=psync", "--iodepth=1", "--randrepeat=0"]
    if sync:
        cmd.append("--sync=dsync")
    if runtime:
        cmd += ["--time_based=1", f"--runtime={runtime}"]
    for name, path in jobs:
        cmd += [f"--name={name}", f"--filename={path}"]
    cp = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if cp.returncode != 0:
        raise RuntimeError(f"fio {rw} {bs}: {cp.stderr.strip() or cp.stdout[-500:]}")
    return json.loads(cp.stdout[cp.stdout.index("{"):])["jobs"]


def _devfile_round(dev: str, files: tuple[str, str], raw: str, mib: int, runtime: int) -> dict:
    """The three workloads on the device file and on their baselines."""
    def p50_us(job, kind="write"):
        return job[kind]["clat_ns"]["percentile"]["50.000000"] / 1000
    out = {}
    # 4 KiB O_DIRECT|O_DSYNC writes at queue depth 1
    j = _fio([("dev", dev)], "randwrite", "4k", f"{mib}M", runtime=runtime, sync=True)
    out["sync4k_p50_us"] = p50_us(j[0])
    j = _fio([("f1", files[0]), ("f2", files[1])], "randwrite", "4k", f"{mib}M",
             runtime=runtime, sync=True)
    out["sync4k_two_files_p50_us"] = max(p50_us(x) for x in j)
    # 1 MiB sequential writes: the device against both backing files at once
    j = _fio([("dev", dev)], "write", "1M", f"{mib}M")
    out["seq_MBps"] = j[0]["write"]["bw_bytes"] / MiB
    j = _fio([("f1", files[0]), ("f2", files[1])], "write", "1M", f"{mib}M")
    out["seq_two_files_MBps"] = min(x["write"]["bw_bytes"] for x in j) / MiB
    # 4 KiB random reads
    j = _fio([("dev", dev)], "randread", "4k", f"{mib}M", runtime=runtime)
    out["randread_iops"] = j[0]["read"]["iops"]
    j = _fio([("raw", raw)], "randread", "4k", f"{mib}M", runtime=runtime)
    out["randread_raw_iops"] = j[0]["read"]["iops"]
    return out


def bench_devfile(root: str, args, rtt_p50_us: float) -> dict:
    """fio through the protocol C device file against local files, in turns."""
    import shutil
    if shutil.which("fio") is None:
        print("  (fio is not installed: no device-file rows; scripts/setup.sh installs it)")
        return {}
    mib = args.devfile_mib
    files = []
    for name in ("two-a.img", "two-b.img", "raw-read.img"):
        path = os.path.join(root, name)
        with open(path, "wb") as f:
            f.write(os.urandom(MiB) * mib)      # written, so reads are reads
        files.append(path)
    pair = _up_pair(os.path.join(root, "devfile"), args, tls=False, size_mib=mib + 16)
    try:
        dev = os.path.join(pair.alpha.root, "drbd0")
        deadline = time.monotonic() + 30
        while not os.path.ismount(dev):
            if time.monotonic() > deadline:
                raise RuntimeError(f"the device file {dev} did not appear")
            time.sleep(0.1)
        rounds = [_devfile_round(dev, (files[0], files[1]), files[2], mib, args.devfile_runtime)
                  for _ in range(args.devfile_rounds)]
    finally:
        pair.teardown()
    out = {k: _median([r[k] for r in rounds]) for k in rounds[0]}
    out["rounds"] = rounds
    out["rtt_p50_us"] = rtt_p50_us
    return out


def _report_devfile(d: dict) -> None:
    if not d:
        return
    budget = d["sync4k_two_files_p50_us"] + d["rtt_p50_us"] + 150
    rows = [["4k O_DSYNC write p50 us", d["sync4k_p50_us"], d["sync4k_two_files_p50_us"],
             d["sync4k_p50_us"] / d["sync4k_two_files_p50_us"],
             f"<= {budget:.0f} us (two files + 1 RTT + 150 us): "
             f"{'met' if d['sync4k_p50_us'] <= budget else 'NOT met'}"],
            ["1M sequential write MB/s", d["seq_MBps"], d["seq_two_files_MBps"],
             d["seq_MBps"] / d["seq_two_files_MBps"],
             f">= 0.5x: {'met' if d['seq_MBps'] >= 0.5 * d['seq_two_files_MBps'] else 'NOT met'}"],
            ["4k random read IOPS", d["randread_iops"], d["randread_raw_iops"],
             d["randread_iops"] / d["randread_raw_iops"],
             f">= 0.8x: {'met' if d['randread_iops'] >= 0.8 * d['randread_raw_iops'] else 'NOT met'}"]]
    print()
    print(table(rows, ["device file, protocol C (fio)", "device", "baseline", "ratio",
                       "target"]))
    print(f"(baselines: the 4k and 1M jobs on two local files at once, the reads on a "
          f"local file; medians of {len(d['rounds'])} rounds in turns)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.block")
    ap.add_argument("--seq-mib", type=int, default=128)
    ap.add_argument("--small", type=int, default=2000)
    ap.add_argument("--sync", type=int, default=500)
    ap.add_argument("--size-mib", type=int, default=256)
    ap.add_argument("--tls-rounds", type=int, default=3)
    ap.add_argument("--tls-seq-mib", type=int, default=64)
    ap.add_argument("--only-tls", action="store_true", help="only the C vs C+TLS rows")
    ap.add_argument("--devfile-rounds", type=int, default=3,
                    help="rounds of the device-file rows (0: none)")
    ap.add_argument("--devfile-mib", type=int, default=64, help="file size of the fio jobs")
    ap.add_argument("--devfile-runtime", type=int, default=5,
                    help="seconds per timed fio job")
    ap.add_argument("--only-devfile", action="store_true",
                    help="only the device-file rows (and the round trip they use)")
    args = ap.parse_args(argv)
    results: dict = {"params": vars(args)}
    root = tempfile.mkdtemp(prefix="replfs-bench-")
    raw = os.path.join(root, "raw.img")
    with open(raw, "wb") as f:
        f.truncate(args.size_mib * MiB)
    if args.only_tls:
        results["tls"] = bench_tls(root, args)
        args.tls_rounds = max(args.tls_rounds, 1)
        return _report_tls(results, args, write_json("block-tls", results))
    print("measuring: loopback TCP round trip", flush=True)
    results["tcp_rtt"] = tcp_rtt()
    if args.only_devfile:
        args.devfile_rounds = max(args.devfile_rounds, 1)
        print(f"measuring: device file ({args.devfile_rounds} rounds in turns)", flush=True)
        results["devfile"] = bench_devfile(root, args, results["tcp_rtt"]["p50_us"])
        path = write_json("block-devfile", results)
        _report_devfile(results["devfile"])
        print(f"results: {path}")
        return 0
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
    if args.tls_rounds > 0:
        print(f"measuring: C vs C+TLS ({args.tls_rounds} rounds in turns)", flush=True)
        results["tls"] = bench_tls(root, args)
    if args.devfile_rounds > 0:
        print(f"measuring: device file ({args.devfile_rounds} rounds in turns)", flush=True)
        results["devfile"] = bench_devfile(root, args, results["tcp_rtt"]["p50_us"])
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
    _report_devfile(results.get("devfile", {}))
    return _report_tls(results, args, path)


def _report_tls(results: dict, args, path: str) -> int:
    if "tls" in results:
        plain, tls = results["tls"]["C"], results["tls"]["C+TLS"]
        print()
        print(table([[name, r["seq_write_MBps"], r["seq_write_MBps"] / plain["seq_write_MBps"],
                      r["write4k_p50_us"], r["sync4k_iops"],
                      r["sync4k_iops"] / plain["sync4k_iops"]]
                     for name, r in (("C", plain), ("C+TLS", tls))],
                    ["protocol C", "seq MB/s", "x plain", "4k p50 us", "sync IOPS",
                     "x plain"]))
        print(f"TLS costs {tls['write4k_p50_us'] - plain['write4k_p50_us']:.0f} us p50 per "
              f"4 KiB write and {100 * (1 - tls['seq_write_MBps'] / plain['seq_write_MBps']):.0f}"
              f"% of sequential throughput (medians of {args.tls_rounds} rounds in turns)")
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
