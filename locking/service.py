"""ClusterService: the o2cb cluster stack as a replfsd component.

``cluster-online`` reads cluster.conf (and the optional o2cb timeouts file
and shared ``key`` next to cluster.conf), finds this node by the daemon's
node name, and starts o2net.  Membership is the network heartbeat: a peer
is up while its o2net connection is (keepalives every
O2CB_KEEPALIVE_DELAY_MS, dropped after O2CB_IDLE_TIMEOUT_MS of silence).
When a peer is lost, o2quo's rule decides (heartbeat/core.quorum_decision
with every configured node counted as still heartbeating, since there is
no disk heartbeat yet): in a two-node cluster node with the lowest number
survives and recovers the peer's locks, the other fences itself: every
lock holder and waiter gets EPERM "fenced", the shared mounts stop
writing, and the node grants nothing until it goes offline and online
again.  The survivor waits one keepalive interval and a second more
before it regrants anything (the loser's own idle timeout expires within
that, and it fences itself first).  A node that goes offline cleanly
(holding no locks) says so first (kind 2 below): the others neither fence
nor wait.  In-process users (the shared mounts) hear of deaths and
fences through ``listeners``.

Lock domains: one DlmDomain (locking/dlmdriver.py) per domain, created by
``dlm-join`` or by the first message a peer sends for it.  o2net payloads
are ``u8 kind | u8 len | domain | data``: kind 0 carries DLM frames, kind
1 announces "I have this domain at epoch e" right after a connection comes
up, so both sides bring the domain to the same epoch (the DLM core's
driver contract) before exchanging lock traffic; kind 2 (no domain, no
data) says "I am leaving the cluster cleanly".
"""
from __future__ import annotations

import errno
import logging
import os
from typing import Optional

import trio

from .. import tls as tlsmod
from ..errors import EXIT_CONFIG, EXIT_STATE, EXIT_USAGE, ReplfsError
from ..blockdev import BlockDeviceError
from . import cluster_conf as cc
from .dlmdriver import DlmDomain, HeldLock, LockRefused
from .dlm.messages import decode as decode_dlm
from .dlm.modes import Mode
from .fence import DEFAULT_DELAY, DEFAULT_TIMEOUT, FenceAgent
from .heartbeat.core import quorum_decision
from .heartbeat.disk import DiskHeartbeat
from .net.driver import O2Net, load_key

log = logging.getLogger("replfs.locking")

KIND_DLM, KIND_EPOCH, KIND_LEAVE = 0, 1, 2
_REFUSAL_ERRNO = {"EAGAIN": errno.EAGAIN, "ETIMEDOUT": errno.ETIMEDOUT,
                  "CANCELLED": errno.ECANCELED, "FENCED": errno.EPERM,
                 "EDEADLK": errno.EDEADLK}


def _pack(kind: int, domain: str, data: bytes) -> bytes:
    d = domain.encode()
    return bytes([kind, len(d)]) + d + data


def _unpack(payload: bytes) -> tuple[int, str, bytes]:
    if len(payload) < 2 or len(payload) < 2 + payload[1]:
        raise ValueError("short cluster payload")
    n = payload[1]
    return payload[0], payload[2:2 + n].decode(), payload[2 + n:]


class _Online:
    def __init__(self, conf_path, conf, cluster, me, nodes, timeouts, key):
        self.conf_path, self.conf, self.cluster = conf_path, conf, cluster
        self.me, self.nodes, self.timeouts, self.key = me, nodes, timeouts, key
        self.net: Optional[O2Net] = None
        self.scope = trio.CancelScope()
        self.domains: dict[str, DlmDomain] = {}
        self.nursery: Optional[trio.Nursery] = None
        self.fenced: Optional[str] = None
        self.net_scope = trio.CancelScope()
        self.hb = None   # DiskHeartbeat, when a heartbeat region is configured
        self.dead: set[int] = set()   # nodes declared dead (until they come back)
        self.left: set[int] = set()   # nodes that said they leave (cluster offline)
        self.fence: Optional[FenceAgent] = None     # cluster.conf's fence_agent


class ClusterService:
    def __init__(self) -> None:
        self.daemon = None
        self.online: Optional[_Online] = None
        self._nursery: Optional[trio.Nursery] = None
        self.ops = {
            "cluster-load": self.op_load,
            "cluster-online": self.op_online,
            "cluster-offline": self.op_offline,
            "cluster-status": self.op_status,
            "cluster-nodes": self.op_nodes,
            "dlm-join": self.op_join,
            "dlm-leave": self.op_leave,
            "dlm-lock": self.op_lock,
            "dlm-convert": self.op_convert,
            "dlm-unlock": self.op_unlock,
            "dlm-locks": self.op_locks,
            "cluster-fence-peer": self.op_fence_peer,
        }
        self._handles: dict[int, tuple[str, HeldLock]] = {}
        self._next_handle = 1
        self._dlm_clients: set = set()     # socket clients holding or asking for locks
        # In-process users of the cluster (the shared mounts), told of
        # membership changes: ``listener(event, arg)`` with
        #   "node-dead", n   before any lock of node n can be regranted;
        #   "node-down", n   once the lock manager has recovered its locks
        #                     (the filesystem recovers n's slots then);
        #   "fenced", why    this node fenced itself: stop writing at once.
        self.listeners: list = []

    # ------------------------------------------------------------ component
    async def run(self, daemon, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        self.daemon = daemon
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    async def shutdown(self) -> None:
        if self.online is not None:
            self.online.scope.cancel()

    # ------------------------------------------------------------ cluster ops
    async def op_load(self, req, body, conn):
        return {"loaded": True}

    async def op_online(self, req, body, conn):
        path = req.get("conf") or cc.DEFAULT_PATH
        conf = cc.load(path)
        tpath = req.get("timeouts") or os.path.join(os.path.dirname(os.path.abspath(path)), "o2cb")
        if not req.get("timeouts") and not os.path.exists(tpath):
            tpath = cc.DEFAULT_TIMEOUTS_PATH
        timeouts = cc.load_timeouts(tpath)
        names = [c.name for c in conf.clusters]
        cluster = req.get("cluster") or (names[0] if len(names) == 1 else None)
        if cluster is None or cluster not in names:
            raise ReplfsError(f"{path}: cluster {cluster!r} is not configured "
                              f"(configured: {', '.join(names) or 'none'})", EXIT_CONFIG)
        if self.online is not None:
            if self.online.cluster == cluster:
                return {"already": True, "cluster": cluster}
            raise ReplfsError(f"cluster {self.online.cluster} is already online on this node; "
                              f"take it offline first", EXIT_STATE)
        me = cc.this_node(conf, self.daemon.node)
        if me.cluster != cluster:
            raise ReplfsError(f"node {me.name} belongs to cluster {me.cluster}, not {cluster}",
                              EXIT_CONFIG)
        on = _Online(path, conf, cluster, me, conf.nodes_of(cluster), timeouts, load_key(path))
        # connect_via {node name: "host:port"}: reach a peer through another
        # address (a fault-injecting proxy in tests).
        via = {}
        for name, hp in (req.get("connect_via") or {}).items():
            node = next((n for n in on.nodes if n.name == name), None)
            if node is None:
                raise ReplfsError(f"connect_via: no node {name!r} in cluster {cluster}", EXIT_USAGE)
            host, _, port = hp.rpartition(":")
            via[node.number] = (host, int(port))
        cconf = conf.cluster(cluster)
        if cconf.fence_agent:
            on.fence = FenceAgent(cconf.fence_agent, cluster,
                                  delay=float(cconf.fence_delay if cconf.fence_delay is not None
                                              else DEFAULT_DELAY),
                                  timeout=float(cconf.fence_timeout or DEFAULT_TIMEOUT))
        link_tls = None
        if cconf.tls == "yes":
            files = tlsmod.TLSFiles.in_dir(tlsmod.default_dir(path), me.name)
            try:
                link_tls = tlsmod.load(files)
            except tlsmod.TLSError as e:
                raise ReplfsError(f"cluster {cluster}: {e}", EXIT_CONFIG) from None
            for warning in link_tls.warnings:
                log.warning("o2net: %s", warning)
        on.net = O2Net(me=me, nodes=on.nodes, cluster=cluster, timeouts=timeouts, key=on.key,
                       on_message=self._on_message, on_up=self._on_up, on_down=self._on_down,
                       connect_to=via, tls=link_tls)
        # The disk heartbeat region: given explicitly, or for a heartbeat:
        # stanza REGION, the file heartbeat/REGION next to cluster.conf.
        region = req.get("heartbeat")
        if not region:
            for h in conf.heartbeats:
                cand = os.path.join(os.path.dirname(os.path.abspath(path)), "heartbeat", h.region)
                if h.cluster == cluster and os.path.exists(cand):
                    region = cand
                    break
        if region:
            on.hb = DiskHeartbeat(region, me.number, [n.number for n in on.nodes], timeouts,
                                  interval=float(req.get("heartbeat_interval") or 2.0))
        self.online = on
        try:
            await self._nursery.start(self._run_online, on)
        except BaseException:
            self.online = None
            raise
        log.info("cluster %s online: node %s (%d) on %s:%d", cluster, me.name, me.number,
                 me.ip_address, me.ip_port)
        return {"cluster": cluster, "node": me.name, "number": me.number}

    async def _run_online(self, on: _Online, *, task_status=trio.TASK_STATUS_IGNORED):
        try:
            with on.scope:
                async with trio.open_nursery() as nursery:
                    on.nursery = nursery
                    try:
                        await nursery.start(self._run_net, on)
                    except OSError as e:
                        raise ReplfsError(f"cannot listen on {on.me.ip_address}:{on.me.ip_port}: "
                                          f"{e.strerror or e}", EXIT_CONFIG) from None
                    if on.hb is not None:
                        await nursery.start(on.hb.run)
                    # online until taken offline, even once the network
                    # and the heartbeat have stopped (a fenced node stays
                    # online, fenced, for the admin to see)
                    nursery.start_soon(trio.sleep_forever)
                    task_status.started()
        finally:
            if self.online is on:
                self.online = None

    async def _run_net(self, on: _Online, *, task_status=trio.TASK_STATUS_IGNORED):
        with on.net_scope:
            await on.net.run(task_status=task_status)

    def _need_online(self) -> _Online:
        if self.online is None:
            raise ReplfsError("the cluster stack is offline on this node "
                              "(run 'replfsadm cluster online CLUSTER')", EXIT_STATE)
        return self.online

    async def op_offline(self, req, body, conn):
        on = self.online
        if on is None:
            return {"already": True}
        if req.get("cluster") and req["cluster"] != on.cluster:
            raise ReplfsError(f"cluster {req['cluster']} is not online (online: {on.cluster})",
                              EXIT_STATE)
        # A fenced node's locks are void (the others recovered them): it may
        # always go offline, to come back online once the cause is fixed.
        busy = [] if on.fenced else [d for d, dom in on.domains.items() if dom.core.locks]
        if busy and not req.get("force"):
            raise ReplfsError(f"cluster {on.cluster} is in use: lock domain(s) "
                              f"{', '.join(sorted(busy))} hold locks", EXIT_STATE)
        if busy:
            # Forced while locks are held: their holders (shared mounts,
            # dlmfs) must stop before the others, who see this node gone,
            # regrant the locks and recover its slots -- a fence.
            await self._fence_self(on, "taken offline by force while holding locks")
        elif not on.fenced:
            # A clean leave: the others hand nothing over and fence nobody
            # (without it, losing node 0's connection fences node 1).
            for peer in sorted(on.net.connected()):
                with trio.move_on_after(2):
                    await on.net.send(peer, _pack(KIND_LEAVE, "", b""))
        on.scope.cancel()
        self.online = None
        return {"cluster": on.cluster}

    async def op_status(self, req, body, conn):
        on = self.online
        if on is None:
            return {"online": False}
        return {"online": True, "cluster": on.cluster, "node": on.me.name,
                "heartbeat": ({"region": on.hb.path, "live": sorted(on.hb.monitor.live)}
                              if on.hb else None),
                "number": on.me.number, "fenced": on.fenced,
                "members": sorted(n.number for n in on.nodes),
                "dead": sorted(on.dead),
                "timeouts": {"heartbeat_threshold": on.timeouts.heartbeat_threshold,
                             "idle_timeout_ms": on.timeouts.idle_timeout_ms,
                             "keepalive_delay_ms": on.timeouts.keepalive_delay_ms,
                             "reconnect_delay_ms": on.timeouts.reconnect_delay_ms},
                "connected": sorted(on.net.connected()),
                "domains": sorted(on.domains)}

    async def op_nodes(self, req, body, conn):
        on = self._need_online()
        up = on.net.connected() | {on.me.number}
        return {"nodes": [{"name": n.name, "number": n.number, "ip_address": n.ip_address,
                           "ip_port": n.ip_port, "up": n.number in up} for n in on.nodes]}

    # ------------------------------------------------------------ membership
    async def _on_up(self, node: int) -> None:
        on = self.online
        if on is None:
            return
        on.dead.discard(node)
        for name, dom in list(on.domains.items()):
            await on.net.send(node, _pack(KIND_EPOCH, name, dom.core.epoch.to_bytes(8, "big")))
        # Let the peer know even when we have no domains, so the exchange is complete.
        await on.net.send(node, _pack(KIND_EPOCH, "", b""))

    async def _on_down(self, node: int) -> None:
        on = self.online
        if on is None or on.fenced:
            return
        if node in on.left:
            # it said it was leaving and held no locks: nothing to decide
            on.left.discard(node)
            log.info("node %d left the cluster", node)
            for dom in on.domains.values():
                await dom.node_down(node)
            return
        if on.hb is not None:
            on.nursery.start_soon(self._decide_with_disk, on, node)
            return
        # (in a task of its own: a survivor waits before it recovers)
        on.nursery.start_soon(self._decide, on, node, {n.number for n in on.nodes})

    async def _decide_with_disk(self, on: _Online, node: int) -> None:
        """Network lost: a node whose disk heartbeat also stops is dead (no
        quorum question); one still heartbeating after the dead time is
        on the other side of a partition, and o2quo decides."""
        log.warning("network connection to node %d lost; watching its disk heartbeat", node)
        with trio.move_on_after(on.hb.monitor.dead_after + 2 * on.hb.interval):
            while node in on.hb.monitor.live:
                await on.hb.changed.wait()
        if on.fenced or self.online is not on:
            return
        await self._decide(on, node, set(on.hb.monitor.live))

    async def _decide(self, on: _Online, node: int, everyone: set[int]) -> None:
        reach = on.net.connected() | {on.me.number}
        verdict = quorum_decision(on.me.number, reach, everyone)
        if verdict == "fence":
            why = (f"lost node {node}; quorum rule: this node ({on.me.number}) cannot reach "
                   f"the lowest-numbered half of the cluster")
            if on.fence is None:
                await self._fence_self(on, why)
                return
            # The rule would fence this node, but a fence agent can prove the
            # peer is off: give the peer (if alive, it shoots at once) the
            # delay to switch this node off first, then shoot.
            log.warning("%s; with a fence agent: switching node %d off in %.0f s unless it "
                        "switches this node off first", why, node, on.fence.delay)
            await trio.sleep(on.fence.delay)
            if on.fenced or self.online is not on:
                return
            if node in on.net.connected():
                await self._fence_self(on, f"the connection to node {node} dropped and came "
                                           f"back: lock messages may be lost")
                return
            if not await self._shoot(on, node):
                return
            await self._recover(on, node, confirmed=True)
            return
        if on.hb is not None and node in everyone and node in on.net.connected():
            # It came back before we had to decide.  DLM messages sent while
            # the connection was down are lost, and nothing resends them:
            # the pair must not simply go on.  The higher-numbered node
            # fences itself (as it would in a partition); the lower one
            # recovers it once its connection drops and its heartbeat stops.
            if on.me.number > node:
                await self._fence_self(on, f"the connection to node {node} dropped and "
                                           f"came back: lock messages may be lost")
            return
        if on.fence is not None:
            # Confirmed, not assumed: the peer is switched off before its
            # locks and journal are taken over.
            if await self._shoot(on, node):
                await self._recover(on, node, confirmed=True)
            return
        await self._recover(on, node, confirmed=False)

    async def _shoot(self, on: _Online, node: int) -> bool:
        """Run the fence agent on ``node``; a failure fences this node
        (nothing confirms the peer stopped, and it may be about to shoot)."""
        peer = next(n for n in on.nodes if n.number == node)
        ok, out = await on.fence.off(peer)
        if on.fenced or self.online is not on:
            return False
        if not ok:
            await self._fence_self(on, f"lost node {node} ({peer.name}) and could not switch "
                                       f"it off: {out}")
            return False
        log.warning("node %d (%s) is off: the fence agent confirmed it%s", node, peer.name,
                    f" ({out})" if out else "")
        return True

    async def _recover(self, on: _Online, node: int, *, confirmed: bool) -> None:
        """Declare ``node`` dead: its locks are recovered, its slots replayed."""
        if not confirmed:
            # o2cb's timing rule: a node cut off fences itself when its own
            # idle timeout expires, which is at most about one keepalive
            # interval after ours.  Wait that long and a margin before its
            # locks are regranted and its journal replayed, so that nothing it
            # still writes can land after the recovery started.
            grace = on.timeouts.keepalive_delay_ms / 1000 + 1.0
            log.warning("node %d is gone; recovering its locks in %.1f s (its own fence "
                        "first)", node, grace)
            await trio.sleep(grace)
            if on.fenced or self.online is not on:
                return
        log.warning("node %d is gone; recovering its locks", node)
        # The filesystems hear of the death before the lock manager can
        # regrant a lock the dead node held (OCFS2's eviction callback).
        self._tell("node-dead", node)
        for dom in on.domains.values():
            await dom.node_down(node)
        on.dead.add(node)
        self._tell("node-down", node)

    async def fence_self(self, why: str) -> None:
        """Fence this node (a user of the cluster found it must stop, e.g.
        a shared filesystem that failed holding EX locks)."""
        on = self.online
        if on is not None:
            await self._fence_self(on, why)

    async def _fence_self(self, on: _Online, why: str) -> None:
        """This node must stop: every lock request fails from now on, the
        shared mounts stop writing, and the node leaves the network until
        an admin takes the cluster offline and online again (a fenced node
        never rejoins on its own)."""
        if on.fenced:
            return
        on.fenced = why
        log.critical("*** FENCING node %s (%d): %s ***", on.me.name, on.me.number, why)
        if on.hb is not None:
            on.hb.stopped = True        # no more beats from a fenced node
        self._tell("fenced", why)
        for dom in on.domains.values():
            await dom.fence(why)
        # lock holders over the socket (dlmfs, scripts) are told too
        for conn in list(self._dlm_clients):
            with trio.move_on_after(1):
                await conn.push("fenced", why=why)
        on.net_scope.cancel()

    def _tell(self, event: str, arg) -> None:
        for listener in list(self.listeners):
            try:
                listener(event, arg)
            except Exception:       # noqa: BLE001  (one user must not stop the others)
                log.exception("cluster event %s: a listener failed", event)

    async def _on_message(self, src: int, payload: bytes) -> None:
        on = self.online
        if on is None or on.fenced:
            return
        try:
            kind, name, data = _unpack(payload)
        except (ValueError, UnicodeDecodeError):
            log.warning("malformed cluster message from node %d, dropping the connection", src)
            await on.net.disconnect(src)
            return
        if kind == KIND_LEAVE:
            on.left.add(src)
            return
        if kind == KIND_EPOCH:
            if not name:
                # End of the peer's list: domains it did not mention are new to it.
                for dname, dom in on.domains.items():
                    if src not in dom.core.members:
                        await dom.node_up(src)
                return
            theirs = int.from_bytes(data, "big")
            dom = on.domains.get(name)
            if dom is not None and src not in dom.core.members:
                dom.core.epoch = max(dom.core.epoch, theirs)
                await dom.node_up(src)
            return
        dom = on.domains.get(name)
        try:
            if dom is None:
                # A peer brought us into its domain: build the node at the
                # epoch it reached on node_up for us and join (core contract).
                epoch = decode_dlm(data).epoch
                dom = await self._make_domain(on, name, members=[on.me.number, src], epoch=epoch)
                await dom._apply(dom.core.join())
            await dom.receive(src, data)
        except Exception as e:
            log.warning("bad DLM message from node %d (%s), dropping the connection", src, e)
            await on.net.disconnect(src)

    async def _make_domain(self, on: _Online, name: str, members, epoch: int = 0) -> DlmDomain:
        async def send(node, data, name=name):
            await on.net.send(node, _pack(KIND_DLM, name, data))
        dom = DlmDomain(name, on.me.number, members, send, epoch=epoch)
        on.domains[name] = dom
        await on.nursery.start(dom.run)
        log.info("joined lock domain %s", name)
        return dom

    # ------------------------------------------------------------ shared mounts

    def require_online(self) -> _Online:
        """The online, unfenced cluster (a shared mount needs it)."""
        on = self.online
        if on is None:
            raise ReplfsError("the cluster stack is not online on this node (run "
                              "'replfsadm cluster online CLUSTER' on both nodes first)",
                              EXIT_STATE)
        if on.fenced:
            raise ReplfsError(f"this node is fenced ({on.fenced}); take the cluster offline "
                              f"and online again once the cause is fixed", EXIT_STATE)
        return on

    def peer_node(self, peer_name: str, peer_address: str = ""):
        """The cluster node that is the replication peer ``peer_name``: the
        node of that name, else of that address, else in a two-node
        cluster the other node (DRBD host names and o2cb node names need
        not match, as in the seed walkthrough)."""
        on = self.require_online()
        for n in on.nodes:
            if n.name == peer_name:
                return n
        for n in on.nodes:
            if peer_address and n.ip_address == peer_address and n.number != on.me.number:
                return n
        others = [n for n in on.nodes if n.number != on.me.number]
        if len(others) == 1:
            return others[0]
        raise ReplfsError(f"the replication peer {peer_name} is not a node of cluster "
                          f"{on.cluster} (nodes: {', '.join(n.name for n in on.nodes)})",
                          EXIT_CONFIG)

    def is_member(self, number: int) -> bool:
        """Is node ``number`` up (this node, or connected over o2net)?"""
        on = self.online
        return on is not None and (number == on.me.number or number in on.net.connected())

    async def mount_domain(self, name: str) -> DlmDomain:
        """The lock domain ``name`` (a volume's UUID), joined if needed."""
        on = self.require_online()
        dom = on.domains.get(name)
        if dom is None:
            dom = await self._make_domain(on, name, members=[on.me.number])
            for peer in sorted(on.net.connected()):
                await dom.node_up(peer)
        return dom

    async def fence_peer(self, peer: int, timeout: float) -> tuple[int, str]:
        """The replication link to node ``peer`` is gone while both nodes
        may write (DRBD's fence-peer, decided by this cluster stack so that
        the mirror and the locks never pick different losers).  Returns
        DRBD's handler exit code and why:

        7  the peer is dead to the cluster: declared dead (after o2cb's
           timeouts, by which a cut-off node has fenced itself) -- or it
           leaves within ``timeout`` because the quorum rule makes it
           the loser;
        6  this node lost ("peer is primary, outdating myself"): it is
           fenced, or the quorum rule picks it and it fences itself now
           (the shared mounts stop writing); its resource outdates its
           disk and resyncs from the winner when the link comes back;
        1  no decision (cluster offline, or no death within ``timeout``):
           I/O stays suspended until an admin acts."""
        on = self.online
        if on is None:
            return 1, "the cluster stack is offline"
        if on.fenced:
            return 6, f"this node is fenced: {on.fenced}"
        if peer in on.dead and peer not in on.net.connected():
            return 7, f"node {peer} was declared dead by the cluster stack"
        if peer in on.net.connected():
            # Both nodes are up, only the replication link is gone: the
            # cluster's rule picks the loser (the lower number survives).
            if on.me.number > peer:
                await self._fence_self(on, f"the replication link to node {peer} is gone "
                                           f"and node {peer} has the lower number")
                return 6, "this node lost (the peer has the lower node number): fenced"
        with trio.move_on_after(timeout):
            while not (peer in on.dead and peer not in on.net.connected()):
                if on.fenced:
                    return 6, f"this node is fenced: {on.fenced}"
                await trio.sleep(0.1)
            return 7, f"node {peer} was declared dead by the cluster stack"
        return 1, f"node {peer} was not declared dead within {timeout:.0f} s"

    async def op_fence_peer(self, req, body, conn):
        """The replfs-fence-peer handler's request: fence resource
        ``res``'s peer as this cluster stack decides (see fence_peer)."""
        code, why = await self.fence_resource_peer(self.daemon.mirror.res(req))
        return {"code": code, "why": why}

    async def fence_resource_peer(self, res) -> tuple[int, str]:
        """fence_peer for the replication peer of resource ``res``."""
        if self.online is None:
            return 1, "the cluster stack is offline on this node"
        if self.online.fenced:
            return 6, f"this node is fenced: {self.online.fenced}"
        try:
            node = self.peer_node(res.peer.name, res.peer.address)
        except ReplfsError as e:
            return 1, e.message
        t = self.online.timeouts
        # o2net declares a silent peer dead after its idle timeout; wait
        # that long and a margin, within the handler's own time limit
        timeout = min(55.0, t.idle_timeout_ms / 1000 + 15)
        code, why = await self.fence_peer(node.number, timeout)
        (log.warning if code == 7 else log.error)(
            "%s: fence-peer: node %s (%d): %s", res.conf.name, node.name, node.number, why)
        return code, why

    # ------------------------------------------------------------ DLM ops
    def _domain(self, req) -> DlmDomain:
        on = self._need_online()
        if on.fenced:
            raise BlockDeviceError(errno.EPERM, f"this node is fenced: {on.fenced}")
        name = req.get("domain")
        dom = on.domains.get(name)
        if dom is None:
            raise ReplfsError(f"lock domain {name!r} is not joined (dlm-join first)", EXIT_STATE)
        return dom

    async def op_join(self, req, body, conn):
        on = self._need_online()
        name = req.get("domain") or ""
        if not name or len(name.encode()) > 64 or "/" in name:
            raise ReplfsError(f"bad lock domain name {name!r}", EXIT_USAGE)
        if name not in on.domains:
            dom = await self._make_domain(on, name, members=[on.me.number])
            for peer in sorted(on.net.connected()):
                await dom.node_up(peer)
        return {"domain": name}

    async def op_leave(self, req, body, conn):
        dom = self._domain(req)
        if dom.core.locks:
            raise ReplfsError(f"lock domain {dom.name} still has locks", EXIT_STATE)
        return {"domain": dom.name}

    def _mode(self, req) -> Mode:
        try:
            return Mode[str(req.get("mode", "")).upper()]
        except KeyError:
            raise ReplfsError(f"bad lock mode {req.get('mode')!r} "
                              f"(one of {', '.join(m.name for m in Mode)})", EXIT_USAGE) from None

    async def op_lock(self, req, body, conn):
        dom = self._domain(req)
        mode = self._mode(req)
        handle = self._next_handle
        self._next_handle += 1

        async def on_bast(lk, blocked):
            await conn.push("bast", handle=handle, domain=dom.name, name=lk.resource,
                            blocked=Mode(blocked).name)

        try:
            lk = await dom.lock(req["name"], mode, noqueue=bool(req.get("noqueue")),
                                timeout=req.get("timeout"), on_bast=on_bast, owner=conn)
        except LockRefused as e:
            raise BlockDeviceError(_REFUSAL_ERRNO.get(e.reason, errno.EIO),
                                   f"{dom.name}/{req['name']}: lock refused: {e.reason}") from None
        if conn.closed:  # the client went away while it waited
            await dom.abandon(lk)
            return {"handle": handle, "mode": lk.mode.name, "lvb_valid": lk.lvb_valid}, lk.lvb
        self._handles[handle] = (dom.name, lk)
        if not getattr(conn, "_dlm_cleanup", False):
            conn._dlm_cleanup = True
            self._dlm_clients.add(conn)
            conn.on_close.append(lambda: self._drop_client(conn))
        return {"handle": handle, "mode": lk.mode.name, "lvb_valid": lk.lvb_valid}, lk.lvb

    def _lock(self, req):
        item = self._handles.get(req.get("handle"))
        if item is None:
            raise BlockDeviceError(errno.EINVAL, f"no such lock handle {req.get('handle')}")
        dom = self._domain({"domain": item[0]})
        return dom, item[1]

    async def op_convert(self, req, body, conn):
        dom, lk = self._lock(req)
        try:
            await dom.convert(lk, self._mode(req), noqueue=bool(req.get("noqueue")),
                              lvb=body or None, timeout=req.get("timeout"))
        except LockRefused as e:
            raise BlockDeviceError(_REFUSAL_ERRNO.get(e.reason, errno.EIO),
                                   f"{dom.name}/{lk.resource}: convert refused: {e.reason}") from None
        return {"mode": lk.mode.name, "lvb_valid": lk.lvb_valid}, lk.lvb

    async def op_unlock(self, req, body, conn):
        dom, lk = self._lock(req)
        del self._handles[req["handle"]]
        await dom.unlock(lk, lvb=body or None)
        return {}

    async def _drop_client(self, conn) -> None:
        self._dlm_clients.discard(conn)
        on = self.online
        for handle, (dname, lk) in list(self._handles.items()):
            if lk.owner is conn:
                del self._handles[handle]
                dom = on.domains.get(dname) if on else None
                if dom is not None and not dom.fenced:
                    await dom.abandon(lk)

    async def op_locks(self, req, body, conn):
        on = self._need_online()
        names = [req["domain"]] if req.get("domain") else sorted(on.domains)
        reply = {"locks": {d: on.domains[d].lockdump() for d in names if d in on.domains}}
        if req.get("mastered"):
            reply["mastered"] = {d: on.domains[d].masterdump() for d in names if d in on.domains}
        return reply
