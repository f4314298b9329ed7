"""Cluster lock benchmark: two real replfsd daemons (127.0.0.1, 127.0.0.2).

Rows, measured in this one run:

* tcp rtt        — raw TCP loopback round trip (64 bytes), the baseline;
* ipc rtt        — a no-op request to the local replfsd (the daemon hop);
* cached         — hold+release EX of a lock this node already holds,
                   through the node-local LockCache (locking/cache.py):
                   the filesystem's common case, no daemon call;
* local master   — lock+unlock EX through the daemon of a resource this
                   node masters (no network message);
* remote master  — lock+unlock EX of an uncontended resource mastered by
                   the other node (one round trip each for lock and unlock);
* EX ping-pong   — both nodes take turns: each lock needs the other node's
                   unlock first (time per hand-over).

The table has a column per row above and p50/p99/p99.9 latency and ops/s
as its rows; the ratio compares the remote-master lock with the raw TCP
round trip (its floor).  JSON and charts go to bench/results/.

    python -m bench.locking [-n OPS] [--quick]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import trio

from replfs.ipc.client import SyncClient, socket_path
from replfs.localpair import Node, cluster_conf, free_port
from replfs.locking.cache import LockCache
from replfs.locking.client import DlmClient
from replfs.locking.dlm.core import master_of
from replfs.locking.dlm.modes import Mode

from .common import Report, add_cli_common, lat_summary



async def tcp_rtt(n: int) -> list[float]:
    async def echo(stream):
        while data := await stream.receive_some(1024):
            await stream.send_all(data)

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            lambda task_status: trio.serve_tcp(echo, 0, host="127.0.0.1", task_status=task_status))
        port = listeners[0].socket.getsockname()[1]
        s = await trio.open_tcp_stream("127.0.0.1", port)
        out = []
        msg = b"x" * 64
        for _ in range(n):
            t0 = time.perf_counter()
            await s.send_all(msg)
            got = 0
            while got < len(msg):
                got += len(await s.receive_some(1024))
            out.append(time.perf_counter() - t0)
        await s.aclose()
        nursery.cancel_scope.cancel()
    return out


def name_mastered_by(node: int, prefix: str) -> str:
    i = 0
    while master_of(f"{prefix}{i}", frozenset({0, 1})) != node:
        i += 1
    return f"{prefix}{i}"


async def run(nodes, n: int) -> dict:
    res = {}
    res["tcp rtt"] = await tcp_rtt(n)
    async with trio.open_nursery() as nursery:
        async with DlmClient.connect(nursery, nodes[0].rundir) as a, \
                DlmClient.connect(nursery, nodes[1].rundir) as b:
            while not (await a.ipc.call("cluster-status"))[0]["connected"]:
                await trio.sleep(0.05)
            await a.join("bench")
            await b.join("bench")
            samples = []
            for _ in range(n):
                t0 = time.perf_counter()
                await a.ipc.call("cluster-status")
                samples.append(time.perf_counter() - t0)
            res["ipc rtt"] = samples
            # an already-held lock through the node-local cache (the path the
            # filesystem takes): no daemon call once the lock is cached
            cache = LockCache(a, "bench")
            async with cache.hold("cached", Mode.EX):
                pass
            samples = []
            for _ in range(n):
                t0 = time.perf_counter()
                async with cache.hold("cached", Mode.EX):
                    pass
                samples.append(time.perf_counter() - t0)
            res["cached lock+unlock"] = samples
            await cache.drop_all()
            for label, node in (("local master", 0), ("remote master", 1)):
                name = name_mastered_by(node, "r")
                samples = []
                for _ in range(n):
                    t0 = time.perf_counter()
                    lk = await a.lock("bench", name, Mode.EX)
                    await lk.unlock()
                    samples.append(time.perf_counter() - t0)
                res[label + " lock+unlock"] = samples
            # ping-pong: a turn token in each client; each waits for its turn
            samples = []
            turn = {"who": 0, "ev": trio.Event()}

            async def player(me, c):
                for i in range(n):
                    while turn["who"] != me:
                        await turn["ev"].wait()
                    t0 = time.perf_counter()
                    lk = await c.lock("bench", "pingpong", Mode.EX)
                    samples.append(time.perf_counter() - t0)
                    await lk.unlock()
                    turn["who"] = 1 - me
                    ev, turn["ev"] = turn["ev"], trio.Event()
                    ev.set()

            async with trio.open_nursery() as inner:
                inner.start_soon(player, 0, a)
                inner.start_soon(player, 1, b)
            res["EX ping-pong (lock)"] = samples
        nursery.cancel_scope.cancel()
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.locking",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=500, help="operations per row (default 500)")
    ap.add_argument("--quick", action="store_true", help="100 operations per row")
    add_cli_common(ap)
    args = ap.parse_args(argv)
    if args.quick:
        args.n = 100
    rep = Report("locking", "Cluster lock manager")
    error = None
    res: dict = {}
    with tempfile.TemporaryDirectory(prefix="replfs-bench-lock-") as tmp:
        conf = os.path.join(tmp, "cluster.conf")
        with open(conf, "w") as f:
            f.write(cluster_conf("bench", free_port("127.0.0.1"), free_port("127.0.0.2")))
        nodes = [Node(nm, ad, os.path.join(tmp, nm), conf=os.path.join(tmp, "replfs.conf"))
                 for nm, ad in (("alpha", "127.0.0.1"), ("beta", "127.0.0.2"))]
        try:
            for nd in nodes:
                nd.start()
            for nd in nodes:
                with SyncClient(socket_path(nd.rundir), timeout=10) as c:
                    c.call("cluster-online", cluster="bench", conf=conf)
            res = trio.run(run, nodes, args.n)
        except Exception as e:
            error = f"{type(e).__name__}: {e}"
            print(f"bench.locking failed: {error}", flush=True)
        finally:
            for nd in nodes:
                try:
                    nd.kill9()
                except Exception:
                    pass
    out = {}
    for label, samples in res.items():
        s = lat_summary(samples)
        s["ops_per_s"] = len(samples) / sum(samples) if samples else 0.0
        out[label] = s
        rep.add_latency(label, "replfs DLM" if label != "tcp rtt" else "TCP", p50_us=s["p50_us"],
                        p99_us=s["p99_us"], p99_9_us=s["p99_9_us"])
    labels = list(out) or ["tcp rtt", "remote master lock+unlock"]
    sec = rep.section("locking", "Cluster locks: one operation at a time, two daemons",
                      labels, "remote master lock+unlock", ["tcp rtt"],
                      note=f"{args.n} operations per column; the ratio: the raw TCP round "
                           f"trip is the floor of a remote lock")
    if error:
        for lb in labels:
            sec.fail_target(lb, error)
    for key, unit, higher in (("p50_us", "µs", False), ("p99_us", "µs", False),
                              ("p99_9_us", "µs", False), ("ops_per_s", "ops/s", True)):
        sec.add(key.replace("_us", "").replace("_9", ".9").replace("ops_per_s", "rate"), unit,
                {lb: r[key] for lb, r in out.items()}, higher_is_better=higher)
    rep.finish({"n": args.n, "rows": out}, json_out=not args.no_json,
               charts=not args.no_charts)
    return 1 if error else 0


if __name__ == "__main__":
    sys.exit(main())
