"""replfsd's Prometheus endpoint: ``replfsd --metrics ADDR:PORT`` serves
``GET /metrics`` in the Prometheus text format (prometheus-client's
exposition), built from the node's state at the moment of the scrape.

What it reports (names in Prometheus conventions; replfs-metrics(7) has
the list): per resource its role, connection and disk states, out-of-sync
bytes, resync progress, DRBD's I/O counters and the latency of reads,
writes and flushes; the cluster stack's membership, fencing and disk
heartbeat; per DLM domain the locks held, requests, BASTs, refusals and
lock waits; per mount the latency of each kind of filesystem request.

A scrape only reads what the daemon already keeps: it takes no cluster
lock, sends nothing to the peer and touches no disk, so it answers even
while a mount or the cluster stack is stuck.  The HTTP side is a small
trio server (one request per connection, a time limit per client), in the
daemon's own event loop, so the state is read between two of its steps,
never halfway through one.
"""
from __future__ import annotations

import logging

import trio
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                    HistogramMetricFamily)

from replfs.errors import EXIT_USAGE, ReplfsError

log = logging.getLogger("replfs.daemon")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
MAX_REQUEST = 8192          # bytes of request head read from a client
CLIENT_TIMEOUT = 10.0       # seconds a client may take to send its request


def parse_address(text: str) -> tuple[str, int]:
    """``ADDR:PORT``, ``[V6]:PORT`` or ``:PORT`` (all addresses)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ReplfsError(f"--metrics: '{text}' is not ADDR:PORT (e.g. 127.0.0.1:9942)",
                          EXIT_USAGE)
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port)


def _hist(name: str, doc: str, labels: list[str]):
    return HistogramMetricFamily(name, doc, labels=labels)


def _add_hist(fam, labels: list[str], h) -> None:
    fam.add_metric(labels, h.cumulative(), sum_value=h.sum)


class _Collector:
    """Turns the daemon's state into metric families (called by
    generate_latest in the daemon's thread, between two trio steps)."""

    def __init__(self, daemon):
        self.daemon = daemon

    def collect(self):
        yield from self._resources()
        for comp in self.daemon.components:
            kind = type(comp).__name__
            if kind == "ClusterService":
                yield from self._cluster(comp)
            elif kind == "MountService":
                yield from self._mounts(comp)

    # ------------------------------------------------------------ resources
    def _resources(self):
        g = {
            "role": GaugeMetricFamily("replfs_resource_role", "The resource's role on this "
                                      "node (1 for the current one)", labels=["resource", "role"]),
            "peer_role": GaugeMetricFamily("replfs_resource_peer_role", "The peer's role as "
                                           "this node knows it", labels=["resource", "role"]),
            "cstate": GaugeMetricFamily("replfs_resource_connection_state", "The connection "
                                        "state (DRBD 8.4 names; 1 for the current one)",
                                        labels=["resource", "state"]),
            "dstate": GaugeMetricFamily("replfs_resource_disk_state", "The local disk state",
                                        labels=["resource", "state"]),
            "pdsk": GaugeMetricFamily("replfs_resource_peer_disk_state", "The peer's disk "
                                      "state", labels=["resource", "state"]),
            "oos": GaugeMetricFamily("replfs_resource_out_of_sync_bytes", "Bytes marked out "
                                     "of sync in the bitmap", labels=["resource"]),
            "sync": GaugeMetricFamily("replfs_resource_resync_done_ratio", "Part of the "
                                      "running resync done (0-1); absent when none runs",
                                      labels=["resource"]),
            "rate": GaugeMetricFamily("replfs_resource_resync_rate_bytes_per_second",
                                      "Average resync rate since the running resync began",
                                      labels=["resource"]),
            "want": GaugeMetricFamily("replfs_resource_resync_target_rate_bytes_per_second",
                                      "The rate the resync controller aims at (when it has "
                                      "one)", labels=["resource"]),
            "susp": GaugeMetricFamily("replfs_resource_io_suspended", "1 while application "
                                      "I/O is suspended (fencing)", labels=["resource"]),
            "open": GaugeMetricFamily("replfs_resource_open_count", "Openers of the device "
                                      "(mounts, the device file, NFS)", labels=["resource"]),
            "pending": GaugeMetricFamily("replfs_resource_requests_pending", "Requests in "
                                         "flight, by DRBD's /proc/drbd name (lo, pe, ua, ap)",
                                         labels=["resource", "kind"]),
        }
        counters = {
            "ns": ("replfs_resource_network_sent_bytes", "Bytes sent to the peer"),
            "nr": ("replfs_resource_network_received_bytes", "Bytes received from the peer"),
            "dw": ("replfs_resource_disk_written_bytes", "Bytes written to the local disk"),
            "dr": ("replfs_resource_disk_read_bytes", "Bytes read from the local disk"),
        }
        c = {k: CounterMetricFamily(n, d, labels=["resource"]) for k, (n, d) in counters.items()}
        al = CounterMetricFamily("replfs_resource_activity_log_writes", "Activity-log "
                                 "updates written", labels=["resource"])
        bm = CounterMetricFamily("replfs_resource_bitmap_writes", "Bitmap pages written",
                                 labels=["resource"])
        lat = _hist("replfs_resource_io_seconds", "Time of the device's reads, writes and "
                    "flushes, from the request to its completion", ["resource", "op"])
        for name, res in sorted(self.daemon.mirror.resources.items()):
            try:
                st = res.status()
            except Exception:           # noqa: BLE001 -- a scrape never breaks the daemon
                log.exception("metrics: status of %s", name)
                continue
            g["role"].add_metric([name, st["role"]], 1)
            g["peer_role"].add_metric([name, st["peer_role"]], 1)
            g["cstate"].add_metric([name, st["cstate"]], 1)
            g["dstate"].add_metric([name, st["dstate"]], 1)
            g["pdsk"].add_metric([name, st["pdsk"]], 1)
            g["oos"].add_metric([name], st.get("out_of_sync_kib", 0) * 1024)
            if st.get("sync"):
                sync = st["sync"]
                g["sync"].add_metric([name], sync["percent"] / 100.0)
                g["rate"].add_metric([name], sync.get("rate_kib_s", 0) * 1024)
                if sync.get("want_kib_s") is not None:
                    g["want"].add_metric([name], sync["want_kib_s"] * 1024)
            g["susp"].add_metric([name], 1 if st["io_suspended"] else 0)
            g["open"].add_metric([name], st["open_count"])
            cnt = st["counters"]
            for k in ("lo", "pe", "ua", "ap"):
                g["pending"].add_metric([name, k], cnt[k])
            for k, fam in c.items():
                fam.add_metric([name], cnt[k] * 1024)
            al.add_metric([name], cnt["al"])
            bm.add_metric([name], cnt["bm"])
            for op, h in sorted(res.latency.items()):
                _add_hist(lat, [name, op], h)
        yield from g.values()
        yield from c.values()
        yield al
        yield bm
        yield lat

    # ------------------------------------------------------------ cluster stack
    def _cluster(self, cs):
        online = GaugeMetricFamily("replfs_cluster_online", "1 while this node's cluster "
                                   "stack is online", labels=["cluster"])
        on = cs.online
        if on is None:
            online.add_metric([""], 0)
            yield online
            return
        online.add_metric([on.cluster], 1)
        yield online
        fenced = GaugeMetricFamily("replfs_cluster_fenced", "1 once this node fenced itself",
                                   labels=["cluster"])
        fenced.add_metric([on.cluster], 1 if on.fenced else 0)
        yield fenced
        up = GaugeMetricFamily("replfs_cluster_node_up", "1 for a node this node reaches "
                               "over o2net (itself included)", labels=["cluster", "node"])
        connected = on.net.connected() | {on.me.number}
        for n in on.nodes:
            up.add_metric([on.cluster, n.name], 1 if n.number in connected else 0)
        yield up
        if on.hb is not None:
            live = GaugeMetricFamily("replfs_cluster_disk_heartbeat_live", "1 for a node "
                                     "whose disk heartbeat is live",
                                     labels=["cluster", "node"])
            for n in on.nodes:
                live.add_metric([on.cluster, n.name], 1 if n.number in on.hb.monitor.live else 0)
            yield live
        held = GaugeMetricFamily("replfs_dlm_locks_held", "Locks this node holds or waits "
                                 "for, per lock domain", labels=["domain"])
        reqs = CounterMetricFamily("replfs_dlm_requests", "Lock requests by kind",
                                   labels=["domain", "kind"])
        basts = CounterMetricFamily("replfs_dlm_basts", "Blocking callbacks received (another "
                                    "node wanted a lock this node held)", labels=["domain"])
        refused = CounterMetricFamily("replfs_dlm_refused", "Requests refused (trylock, "
                                      "timeout, deadlock)", labels=["domain"])
        waits = _hist("replfs_dlm_wait_seconds", "Time a lock or convert request waited",
                      ["domain"])
        for name, dom in sorted(on.domains.items()):
            stats = getattr(dom, "stats", None)
            held.add_metric([name], len(getattr(dom, "held", ())))
            if stats is None:
                continue
            for kind in ("locks", "converts", "unlocks"):
                reqs.add_metric([name, kind[:-1]], stats[kind])
            basts.add_metric([name], stats["basts"])
            refused.add_metric([name], stats["refused"])
            _add_hist(waits, [name], dom.waits)
        yield from (held, reqs, basts, refused, waits)

    # ------------------------------------------------------------ mounts
    def _mounts(self, ms):
        info = GaugeMetricFamily("replfs_mount_info", "A replfs filesystem this daemon "
                                 "serves (1)", labels=["resource", "mountpoint", "slot",
                                                       "shared"])
        lat = _hist("replfs_fs_request_seconds", "Time of the filesystem's requests from "
                    "the kernel, by operation", ["mountpoint", "op"])
        for mp, rec in sorted(ms.mounts.items()):
            info.add_metric([rec.get("resource", ""), mp, str(rec.get("slot")),
                             "yes" if rec.get("shared") else "no"], 1)
            session = rec.get("session")
            for op, h in sorted(getattr(session, "latency", {}).items()):
                _add_hist(lat, [mp, op], h)
        yield info
        yield lat


class MetricsService:
    """The endpoint, as a daemon component (no admin requests)."""

    def __init__(self, address: str):
        self.host, self.port = parse_address(address)
        self.ops: dict = {}
        self.daemon = None
        self.scrapes = 0

    def render(self) -> bytes:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Collector(self.daemon))
        return generate_latest(registry)

    async def run(self, daemon, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        self.daemon = daemon
        try:
            listeners = await trio.open_tcp_listeners(self.port, host=self.host)
        except OSError as e:
            raise ReplfsError(f"--metrics {self.host}:{self.port}: cannot listen: "
                              f"{e.strerror or e}") from None
        log.info("metrics: serving http://%s:%d/metrics", self.host, self.port)
        task_status.started()
        await trio.serve_listeners(self._client, listeners)

    async def shutdown(self) -> None:
        pass

    async def _client(self, stream) -> None:
        async with stream:
            head = b""
            with trio.move_on_after(CLIENT_TIMEOUT):
                while b"\r\n\r\n" not in head and len(head) < MAX_REQUEST:
                    try:
                        chunk = await stream.receive_some(4096)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        return
                    if not chunk:
                        break
                    head += chunk
            line = head.split(b"\r\n", 1)[0].decode("latin-1", "replace").split()
            if len(line) < 2:
                await self._reply(stream, 400, b"bad request\n")
            elif line[0] not in ("GET", "HEAD"):
                await self._reply(stream, 405, b"only GET\n")
            elif line[1].split("?", 1)[0] not in ("/metrics", "/"):
                await self._reply(stream, 404, b"see /metrics\n")
            else:
                self.scrapes += 1
                try:
                    body = self.render()
                except Exception:       # noqa: BLE001
                    log.exception("metrics: rendering failed")
                    await self._reply(stream, 500, b"rendering failed; see replfsd's log\n")
                    return
                await self._reply(stream, 200, b"" if line[0] == "HEAD" else body,
                                  CONTENT_TYPE, length=len(body))

    @staticmethod
    async def _reply(stream, code: int, body: bytes, ctype: str = "text/plain",
                     length: int | None = None) -> None:
        reason = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
                  500: "Internal Server Error"}[code]
        head = (f"HTTP/1.0 {code} {reason}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body) if length is None else length}\r\n"
                f"Connection: close\r\n\r\n").encode()
        try:
            with trio.move_on_after(CLIENT_TIMEOUT):
                await stream.send_all(head + body)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
