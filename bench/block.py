"""Block mirror benchmark: the replicated device against its baselines.

Rows, all measured in this one run on this machine:

* raw file      — pwrite/fdatasync on a plain file from Python threads
                  (what the daemon itself does underneath);
* standalone    — the same through replfsd's local socket, resource
                  Primary with no peer (the cost of the daemon hop);
* protocol A/B/C — connected to a peer on 127.0.0.2.
* C vs C+TLS    — what ``net { tls yes; }`` costs: two protocol C pairs,
                  one with TLS, measured in turns (``--tls-rounds``), medians.
* slow peer     — protocol A against protocol C where the peer is far:
                  each pair's replication link goes through a TCP proxy
                  that delays every byte (``--slow-peer-ms`` each way,
                  tests/harness/proxy.py), the two pairs measured in turns
                  (``--slow-peer-rounds``), medians.  Protocol A completes
                  a write once it is on the local disk and sent, so it
                  must be measurably faster there.
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

Output: one table per section (daemon API rows, device file, TLS) with the
candidate's speed ratio to its baselines, JSON and PNG charts in
bench/results/: bars per target, p50/p99/p99.9 of the 4 KiB writes, and
fio's latency histogram of the device file's 4 KiB O_DSYNC writes.

    python -m bench.block [--quick] [--only-devfile | --only-tls]
"""
from __future__ import annotations

import argparse
import os
import shutil
import socket
import sys
import tempfile
import threading
import time

import trio

from replfs.blockdev import FileBlockDevice
from replfs.ipc.client import DaemonBlockDevice
from replfs.localpair import LocalPair, free_port

from .common import (Report, Timer, add_cli_common, histogram_from_fio_bins, lat_summary)

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
            "sync4k": {**lat_summary(sync_lat), "iops": n_sync / ts.elapsed},
            "sync4k_samples_s": sync_lat}


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


def _up_pair(root: str, args, *, tls: bool, size_mib: int, protocol: str = "C",
             proxy_port: int | None = None, before_up=None) -> LocalPair:
    """A connected, synced pair, alpha Primary.  ``proxy_port``: alpha
    reaches beta through 127.0.0.3:proxy_port; ``before_up(pair)`` runs
    once the configurations are written (to start the proxy)."""
    pair = LocalPair(root, protocol=protocol, size=size_mib * MiB,
                     extra_net="\n\t\ttls yes;" if tls else "", proxy_port=proxy_port)
    if before_up is not None:
        before_up(pair)
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
        return _in_turns(pairs, args.tls_rounds, small)
    finally:
        for pair in pairs.values():
            pair.teardown()


def _in_turns(pairs: dict[str, LocalPair], rounds: int, small) -> dict:
    """The daemon-API workloads on each pair in turn, ``rounds`` times;
    per pair the medians of the rows the sections show, and every round."""
    runs: dict[str, list[dict]] = {name: [] for name in pairs}
    for _ in range(rounds):
        for name, pair in pairs.items():
            runs[name].append(trio.run(bench_daemon, pair.alpha.rundir, small))
    out = {}
    for name, rs in runs.items():
        out[name] = {"seq_write_MBps": _median([r["seq_write_MBps"] for r in rs]),
                     "write4k_p50_us": _median([r["write4k_qd1"]["p50_us"] for r in rs]),
                     "write4k_p99_us": _median([r["write4k_qd1"]["p99_us"] for r in rs]),
                     "sync4k_iops": _median([r["sync4k"]["iops"] for r in rs]),
                     "runs": [{k: v for k, v in r.items() if k != "sync4k_samples_s"}
                              for r in rs]}
    return out


def bench_slow_peer(root: str, args) -> dict:
    """Protocol A and protocol C, each pair's link through a delaying
    proxy, measured in turns: what protocol A buys when the peer is far."""
    from tests.harness.proxy import spawn_proxy
    small = argparse.Namespace(seq_mib=args.slow_peer_seq_mib, small=max(50, args.small // 4),
                               sync=max(20, args.sync // 5))
    pairs: dict[str, LocalPair] = {}
    proxies = []
    try:
        for mode in ("A", "C"):
            pport = free_port("127.0.0.3")

            def start_proxy(pair, mode=mode, pport=pport):
                proc, ctl, _ = spawn_proxy(f"127.0.0.3:{pport}", f"127.0.0.2:{pair.port}",
                                           os.path.join(root, f"proxy-{mode}.sock"))
                proxies.append((proc, ctl))
            pairs[mode] = _up_pair(os.path.join(root, f"slow-{mode}"), args, tls=False,
                                   size_mib=args.slow_peer_seq_mib + 24, protocol=mode,
                                   proxy_port=pport, before_up=start_proxy)
        # delayed only once both are in sync (the initial resync is not measured)
        for _, ctl in proxies:
            ctl.delay("both", args.slow_peer_ms)
        return {"delay_ms": args.slow_peer_ms, **_in_turns(pairs, args.slow_peer_rounds, small)}
    finally:
        for pair in pairs.values():
            pair.teardown()
        for proc, _ in proxies:
            proc.kill()
            proc.wait()


def _report_slow_peer(rep: Report, d: dict, rounds: int) -> None:
    a, c = d["A"], d["C"]
    met = "met" if a["write4k_p50_us"] <= 0.5 * c["write4k_p50_us"] else "NOT met"
    sec = rep.section(
        "slow-peer", f"Block: protocol A against C, peer {d['delay_ms']:g} ms away each way "
                     f"(delaying proxy, daemon API)", ["C", "A"], "A", ["C"],
        note=(f"issue 8's target, protocol A measurably faster than C where the peer is slow "
              f"(taken as: 4 KiB write p50 at most half of C's): {met}; a flush waits for the "
              f"peer under protocol C only (protocol A's is local, as DRBD's); medians of "
              f"{rounds} rounds in turns"))
    sec.add("4k write p50 (qd 1)", "µs", {"C": c["write4k_p50_us"], "A": a["write4k_p50_us"]},
            higher_is_better=False)
    sec.add("4k write p99 (qd 1)", "µs", {"C": c["write4k_p99_us"], "A": a["write4k_p99_us"]},
            higher_is_better=False)
    sec.add("seq write 1M", "MB/s", {"C": c["seq_write_MBps"], "A": a["seq_write_MBps"]})
    sec.add("4k write+flush", "IOPS", {"C": c["sync4k_iops"], "A": a["sync4k_iops"]})


# ---------------------------------------------------------------- device file

def _fio(jobs: list[tuple[str, str]], rw: str, bs: str, size: str, *, runtime: int | None = None,
         sync: bool = False) -> list[dict]:
    """One fio run: ``jobs`` [(name, file)] in parallel, O_DIRECT, queue
    depth 1 (psync); ``sync``: O_DSYNC writes.  fio's JSON per job."""
    import json
    import subprocess
    cmd = ["fio", "--output-format=json+", f"--rw={rw}", f"--bs={bs}", f"--size={size}",
           "--direct=1", "--ioengine=psync", "--iodepth=1", "--randrepeat=0",
           "--percentile_list=50:99:99.9"]
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

    def clat(job):
        c = job["write"]["clat_ns"]
        p = c["percentile"]
        return {"p50_us": p["50.000000"] / 1000, "p99_us": p["99.000000"] / 1000,
                "p99_9_us": p["99.900000"] / 1000, "bins_ns": c.get("bins", {})}
    out = {}
    # 4 KiB O_DIRECT|O_DSYNC writes at queue depth 1
    j = _fio([("dev", dev)], "randwrite", "4k", f"{mib}M", runtime=runtime, sync=True)
    out["sync4k_p50_us"] = p50_us(j[0])
    out["clat_device"] = clat(j[0])
    j = _fio([("f1", files[0]), ("f2", files[1])], "randwrite", "4k", f"{mib}M",
             runtime=runtime, sync=True)
    out["sync4k_two_files_p50_us"] = max(p50_us(x) for x in j)
    out["clat_two_files"] = max((clat(x) for x in j), key=lambda c: c["p50_us"])
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
    out = {k: _median([r[k] for r in rounds]) for k in rounds[0] if not k.startswith("clat_")}
    for k in ("clat_device", "clat_two_files"):
        bins: dict = {}
        for r in rounds:
            for ns, c in r[k]["bins_ns"].items():
                bins[ns] = bins.get(ns, 0) + c
        out[k] = {**{p: _median([r[k][p] for r in rounds])
                     for p in ("p50_us", "p99_us", "p99_9_us")}, "bins_ns": bins}
        for r in rounds:
            r[k].pop("bins_ns", None)
    out["rounds"] = rounds
    out["rtt_p50_us"] = rtt_p50_us
    return out


def _report_devfile(rep: Report, d: dict) -> None:
    """The device-file section: protocol C's device file against local files."""
    if not d:
        return
    budget = d["sync4k_two_files_p50_us"] + d["rtt_p50_us"] + 150
    dev, two, raw = "device file (C)", "two local files", "raw file"
    met = ["met" if d["sync4k_p50_us"] <= budget else "NOT met",
           "met" if d["seq_MBps"] >= 0.5 * d["seq_two_files_MBps"] else "NOT met",
           "met" if d["randread_iops"] >= 0.8 * d["randread_raw_iops"] else "NOT met"]
    sec = rep.section(
        "devfile", "Block: fio through the protocol C device file against local files",
        [dev, two, raw], dev, [two],
        note=(f"targets of issue 8: 4k O_DSYNC p50 <= {budget:.0f} us (two files + 1 RTT + "
              f"150 us): {met[0]}; 1M sequential >= 0.5x two files: {met[1]}; 4k random "
              f"read >= 0.8x raw file: {met[2]}.  Baselines: the 4k and 1M jobs on two local "
              f"files at once, the reads on one local file; medians of {len(d['rounds'])} "
              f"rounds in turns"))
    sec.add("4k O_DIRECT|O_DSYNC write p50", "µs",
            {dev: d["sync4k_p50_us"], two: d["sync4k_two_files_p50_us"]},
            higher_is_better=False, baseline=two)
    sec.add("1M sequential write", "MB/s", {dev: d["seq_MBps"], two: d["seq_two_files_MBps"]},
            baseline=two)
    sec.add("4k random read", "IOPS", {dev: d["randread_iops"], raw: d["randread_raw_iops"]},
            baseline=raw)
    label = "4 KiB O_DIRECT|O_DSYNC writes, queue depth 1 (fio clat)"
    for name, key in ((dev, "clat_device"), (two, "clat_two_files")):
        c = d[key]
        rep.add_latency(label, name, p50_us=c["p50_us"], p99_us=c["p99_us"],
                        p99_9_us=c["p99_9_us"])
        if c.get("bins_ns"):
            rep.add_histogram(label, name, *histogram_from_fio_bins(c["bins_ns"]))


def _report_tls(rep: Report, results: dict, args) -> None:
    if "tls" not in results:
        return
    sec = rep.section("tls", "Block: protocol C with and without TLS (daemon API)",
                      ["C", "C+TLS"], "C+TLS", ["C"],
                      note=f"medians of {args.tls_rounds} rounds in turns")
    plain, tls = results["tls"]["C"], results["tls"]["C+TLS"]
    sec.add("seq write 1M", "MB/s", {"C": plain["seq_write_MBps"], "C+TLS": tls["seq_write_MBps"]})
    sec.add("4k write p50", "µs", {"C": plain["write4k_p50_us"], "C+TLS": tls["write4k_p50_us"]},
            higher_is_better=False)
    sec.add("4k write+flush", "IOPS", {"C": plain["sync4k_iops"], "C+TLS": tls["sync4k_iops"]})


MODES = ("raw", "standalone", "A", "B", "C")


def _report_main(rep: Report, results: dict) -> None:
    present = [m for m in MODES if m in results]
    if not present:
        return
    sec = rep.section(
        "daemon", "Block: 4 KiB and 1 MiB writes through replfsd's block API",
        list(present), "C", [b for b in ("raw", "standalone") if b in present],
        note=f"loopback TCP round trip p50 {results['tcp_rtt']['p50_us']:.1f} us; raw: a plain "
             f"file from Python threads; standalone: the daemon, no peer")
    ok = {m: results[m] for m in present if "error" not in results[m]}
    errs = {m: results[m]["error"] for m in present if "error" in results[m]}
    for m, e in errs.items():
        sec.fail_target(m, e)
    sec.add("seq write 1M", "MB/s", {m: r["seq_write_MBps"] for m, r in ok.items()})
    sec.add("4k write p50 (qd 1)", "µs", {m: r["write4k_qd1"]["p50_us"] for m, r in ok.items()},
            higher_is_better=False)
    sec.add("4k write p99 (qd 1)", "µs", {m: r["write4k_qd1"]["p99_us"] for m, r in ok.items()},
            higher_is_better=False)
    sec.add("4k write+flush", "IOPS", {m: r["sync4k"]["iops"] for m, r in ok.items()})
    sec.add("4k write+flush p50", "µs", {m: r["sync4k"]["p50_us"] for m, r in ok.items()},
            higher_is_better=False)
    for m, r in ok.items():
        rep.add_latency_samples("4 KiB write + flush (daemon API)", m,
                                r.pop("sync4k_samples_s", []))
    if "C" in ok and "standalone" in ok:
        c, s = ok["C"]["write4k_qd1"]["p50_us"], ok["standalone"]["write4k_qd1"]["p50_us"]
        rtt = results["tcp_rtt"]["p50_us"]
        sec.note += (f"; protocol C adds {c - s:.1f} us p50 per 4 KiB write over standalone "
                     f"({(c - s) / rtt:.1f} round trips)")


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="python -m bench.block",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("--seq-mib", type=int, default=128, help="MiB of sequential writes")
    ap.add_argument("--small", type=int, default=2000, help="4 KiB writes at queue depth 1")
    ap.add_argument("--sync", type=int, default=500, help="4 KiB write+flush pairs")
    ap.add_argument("--size-mib", type=int, default=256, help="resource size")
    ap.add_argument("--tls-rounds", type=int, default=3, help="rounds of C vs C+TLS (0: none)")
    ap.add_argument("--tls-seq-mib", type=int, default=64)
    ap.add_argument("--only-tls", action="store_true", help="only the C vs C+TLS rows")
    ap.add_argument("--slow-peer-rounds", type=int, default=3,
                    help="rounds of protocol A vs C with a slow peer (0: none)")
    ap.add_argument("--slow-peer-ms", type=float, default=2.0,
                    help="delay the slow peer's link adds, each way (ms)")
    ap.add_argument("--slow-peer-seq-mib", type=int, default=32)
    ap.add_argument("--only-slow-peer", action="store_true",
                    help="only the protocol A vs C rows with a slow peer")
    ap.add_argument("--devfile-rounds", type=int, default=3,
                    help="rounds of the device-file rows (0: none)")
    ap.add_argument("--devfile-mib", type=int, default=64, help="file size of the fio jobs")
    ap.add_argument("--devfile-runtime", type=int, default=5,
                    help="seconds per timed fio job")
    ap.add_argument("--only-devfile", action="store_true",
                    help="only the device-file rows (and the round trip they use)")
    ap.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    add_cli_common(ap)
    args = ap.parse_args(argv)
    if sum((args.only_tls, args.only_devfile, args.only_slow_peer)) > 1:
        ap.error("--only-tls, --only-devfile and --only-slow-peer exclude each other")
    if args.slow_peer_ms <= 0:
        ap.error("--slow-peer-ms must be above 0 (--slow-peer-rounds 0 leaves the rows out)")
    if args.quick:
        args.seq_mib, args.small, args.sync, args.size_mib = 16, 200, 100, 64
        args.tls_rounds, args.tls_seq_mib = 1, 16
        args.slow_peer_rounds, args.slow_peer_seq_mib = 1, 8
        args.devfile_rounds, args.devfile_mib, args.devfile_runtime = 1, 16, 2
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    results: dict = {"params": vars(args)}
    root = tempfile.mkdtemp(prefix="replfs-bench-")
    rep = Report("block", "Block layer")
    rc = 0
    try:
        rc = _run(root, args, results, rep)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    name = ("block-tls" if args.only_tls else "block-devfile" if args.only_devfile
            else "block-slow-peer" if args.only_slow_peer else "block")
    rep.finish(results, json_out=not args.no_json, charts=not args.no_charts, name=name)
    return rc


def _run(root: str, args, results: dict, rep: Report) -> int:
    """Every measurement; a part that fails is reported and the rest runs.
    With one of the --only-* options, that part alone (at least one round)."""
    rc = 0
    only = ("tls" if args.only_tls else "devfile" if args.only_devfile
            else "slow-peer" if args.only_slow_peer else None)
    if only == "tls":
        args.tls_rounds = max(args.tls_rounds, 1)
    elif only == "devfile":
        args.devfile_rounds = max(args.devfile_rounds, 1)
    elif only == "slow-peer":
        args.slow_peer_rounds = max(args.slow_peer_rounds, 1)
    raw = os.path.join(root, "raw.img")
    with open(raw, "wb") as f:
        f.truncate(args.size_mib * MiB)
    print("measuring: loopback TCP round trip", flush=True)
    results["tcp_rtt"] = tcp_rtt()
    if only is None:
        print("measuring: raw file", flush=True)
        results["raw"] = trio.run(bench_raw, raw, args)
        for mode in ("standalone", "A", "B", "C"):
            print(f"measuring: {mode}", flush=True)
            try:
                results[mode] = _bench_mode(root, mode, args)
            except Exception as e:
                print(f"  {mode} failed: {type(e).__name__}: {e}", flush=True)
                results[mode] = {"error": f"{type(e).__name__}: {e}"}
                rc = 1
        _report_main(rep, results)
    if args.devfile_rounds > 0 and only in (None, "devfile"):
        print(f"measuring: device file ({args.devfile_rounds} rounds in turns)", flush=True)
        try:
            results["devfile"] = bench_devfile(root, args, results["tcp_rtt"]["p50_us"])
            _report_devfile(rep, results["devfile"])
        except Exception as e:
            print(f"  device file failed: {type(e).__name__}: {e}", flush=True)
            results["devfile"] = {"error": str(e)}
            rep.section("devfile", "Block: device file", ["device file (C)"],
                        "device file (C)", []).fail_target("device file (C)", str(e))
            rc = 1
    if args.slow_peer_rounds > 0 and only in (None, "slow-peer"):
        print(f"measuring: protocol A vs C, peer {args.slow_peer_ms:g} ms away "
              f"({args.slow_peer_rounds} rounds in turns)", flush=True)
        try:
            results["slow_peer"] = bench_slow_peer(root, args)
            _report_slow_peer(rep, results["slow_peer"], args.slow_peer_rounds)
        except Exception as e:
            print(f"  slow peer failed: {type(e).__name__}: {e}", flush=True)
            results["slow_peer"] = {"error": str(e)}
            rep.section("slow-peer", "Block: protocol A against C with a slow peer", ["A"],
                        "A", []).fail_target("A", str(e))
            rc = 1
    if args.tls_rounds > 0 and only in (None, "tls"):
        print(f"measuring: C vs C+TLS ({args.tls_rounds} rounds in turns)", flush=True)
        try:
            results["tls"] = bench_tls(root, args)
            _report_tls(rep, results, args)
        except Exception as e:
            print(f"  TLS failed: {type(e).__name__}: {e}", flush=True)
            results["tls"] = {"error": str(e)}
            rc = 1
    return rc


def _bench_mode(root: str, mode: str, args) -> dict:
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
        return trio.run(bench_daemon, pair.alpha.rundir, args)
    finally:
        pair.teardown()


if __name__ == "__main__":
    sys.exit(main())
