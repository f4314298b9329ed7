"""``replfsadm cluster ...``: the o2cb init script's verbs for replfs.

Talks to the local replfsd (its ClusterService component) over the admin
socket; add-node/remove-node edit cluster.conf itself (like o2cb_ctl).
``main(argv, out, err) -> int`` so tests can run it in-process.
"""
from __future__ import annotations

import dataclasses
import os
import sys

from replfs.errors import EXIT_CONFIG, EXIT_STATE, EXIT_USAGE, ReplfsError
from replfs.ipc.client import SyncClient, rundir_from_env, socket_path
from replfs.locking import cluster_conf as cc

ALT_PATH = "/etc/ocfs2/cluster.conf"

VERBS = [
    ("load", "", "start this node's replfsd if needed; check it hosts the cluster stack"),
    ("online", "CLUSTER", "bring the cluster online on this node (o2net + DLM)"),
    ("offline", "CLUSTER", "take the cluster offline on this node"),
    ("force-offline", "[CLUSTER]", "offline even while locks are held (holders lose them)"),
    ("online-status", "[CLUSTER]", "exit 0 if the cluster is online here, 1 if not"),
    ("start", "[CLUSTER]", "load, then online (o2cb start)"),
    ("stop", "[CLUSTER]", "offline if online, then unload (o2cb stop)"),
    ("restart", "[CLUSTER]", "stop, then start"),
    ("unload", "", "refused while the cluster is online"),
    ("status", "", "show whether the cluster is online, this node, connected peers"),
    ("list-nodes", "", "list the cluster's nodes and whether each is up (from cluster.conf when offline)"),
    ("add-node", "NAME NUMBER IP PORT [CLUSTER]", "add a node stanza to cluster.conf"),
    ("remove-node", "NAME", "remove a node stanza from cluster.conf"),
    ("heartbeat", "", "show the heartbeat view: mode, network and disk state per node"),
    ("check", "", "parse cluster.conf and the timeouts without going online"),
    ("locks", "[DOMAIN]", "dump the locks this node holds or waits for"),
    ("dlmfs", "MOUNTPOINT", "mount a dlmfs (ocfs2_dlmfs semantics) for shell scripts"),
]


def usage() -> str:
    lines = ["USAGE: replfsadm [--node NAME] [--rundir DIR] cluster [-C FILE] VERB [ARGS]", "",
             "Verbs:"]
    lines += [f"  {v:<12} {a:<32} {s}" for v, a, s in VERBS]
    lines += ["", "Options:", "  -C, --conf FILE   cluster.conf (default /etc/replfs/cluster.conf, "
              "then /etc/ocfs2/cluster.conf)",
              "  -H, --heartbeat FILE  (online) disk heartbeat region file, shared by the nodes",
              "  --node NAME       this node's name (default $REPLFS_NODE or uname -n)",
              "  --rundir DIR      replfsd's run directory (default $REPLFS_RUNDIR)",
              "", "Exit codes: 0 ok, 1 usage, 2 syntax, 10 config, 11 state, 20 exec/daemon."]
    return "\n".join(lines)


def _parse(argv: list[str]):
    g = {"node": None, "rundir": None, "conf": None, "help": False, "heartbeat": None,
         "config": None}
    pos: list[str] = []
    i = 0
    takes = {"--node": "node", "--rundir": "rundir", "-C": "conf", "--conf": "conf",
             "-H": "heartbeat", "--heartbeat": "heartbeat",
             "-c": "config", "--config": "config"}
    while i < len(argv):
        a = argv[i]
        key = a.split("=", 1)[0]
        if key in takes:
            if "=" in a:
                val = a.split("=", 1)[1]
            elif i + 1 < len(argv):
                i += 1
                val = argv[i]
            else:
                raise ReplfsError(f"option {a} needs a value", EXIT_USAGE)
            if takes[key]:
                g[takes[key]] = val
        elif a in ("-h", "--help"):
            g["help"] = True
        elif a in ("-d", "--dry-run"):
            pass
        elif a.startswith("-") and a != "-":
            raise ReplfsError(f"unknown option '{a}'\n{usage()}", EXIT_USAGE)
        else:
            pos.append(a)
        i += 1
    if pos and pos[0] == "cluster":
        pos = pos[1:]
    return g, pos


def _conf_path(g) -> str:
    if g["conf"]:
        return os.path.abspath(g["conf"])
    if os.environ.get("REPLFS_CLUSTER_CONF"):
        return os.environ["REPLFS_CLUSTER_CONF"]
    if not os.path.exists(cc.DEFAULT_PATH) and os.path.exists(ALT_PATH):
        return ALT_PATH
    return cc.DEFAULT_PATH


def _call(g, op, **args) -> dict:
    with SyncClient(socket_path(rundir_from_env(g["rundir"])), timeout=30) as c:
        reply, _ = c.call(op, **args)
    return reply


def main(argv: list[str], *, out=None, err=None) -> int:
    out = out or (lambda s: print(s))
    err = err or (lambda s: print(s, file=sys.stderr))
    try:
        g, pos = _parse(list(argv))
        if g["help"] or not pos:
            (out if g["help"] else err)(usage())
            return 0 if g["help"] else EXIT_USAGE
        verb, args = pos[0], pos[1:]
        fn = _HANDLERS.get(verb)
        if fn is None:
            raise ReplfsError(f"Unknown cluster command '{verb}'\n{usage()}", EXIT_USAGE)
        return fn(g, args, out) or 0
    except ReplfsError as e:
        err(e.message)
        return e.exit_code


def _nargs(args, lo, hi, what):
    if not lo <= len(args) <= hi:
        raise ReplfsError(f"USAGE: replfsadm cluster {what}", EXIT_USAGE)


def _ensure_daemon(g) -> None:
    """Start this node's replfsd if none answers (o2cb's load brings the
    stack up; here the stack lives in replfsd)."""
    from replfs.cli.main import start_daemon
    from replfs.ipc.client import node_name
    start_daemon(node_name(g["node"]), rundir_from_env(g["rundir"]), g["config"])


def cmd_load(g, args, out):
    _ensure_daemon(g)
    _call(g, "cluster-load")
    out("Loading replfs cluster stack: OK")


def _cluster_arg(g, args, what: str) -> str:
    _nargs(args, 0, 1, f"{what} [CLUSTER]")
    if args:
        return args[0]
    conf = cc.load(_conf_path(g))
    if len(conf.clusters) == 1:
        return conf.clusters[0].name
    raise ReplfsError(f"USAGE: replfsadm cluster {what} CLUSTER", EXIT_USAGE)


def cmd_start(g, args, out):
    """o2cb start: load, then bring the cluster online."""
    cluster = _cluster_arg(g, args, "start")
    cmd_load(g, [], out)
    return cmd_online(g, [cluster], out)


def cmd_stop(g, args, out):
    """o2cb stop: take the cluster offline (if it is), then unload."""
    st = _online_status(g)
    if st is not None and st.get("online"):
        cmd_offline(g, args, out)
    return cmd_unload(g, [], out)


def cmd_restart(g, args, out):
    cluster = _cluster_arg(g, args, "restart")
    cmd_stop(g, [cluster], out)
    return cmd_start(g, [cluster], out)


def cmd_online_status(g, args, out):
    """Exit 0 if the cluster is online on this node, 1 if not."""
    st = _online_status(g)
    if st is not None and st.get("online") and (not args or st["cluster"] == args[0]):
        out(f"Cluster {st['cluster']} online")
        return 0
    out(f"Cluster {args[0] if args else ''} offline".replace("  ", " "))
    return 1


def cmd_force_offline(g, args, out):
    """Offline even while lock domains hold locks (their holders lose them)."""
    _nargs(args, 0, 1, "force-offline [CLUSTER]")
    reply = _call(g, "cluster-offline", force=True, **({"cluster": args[0]} if args else {}))
    if reply.get("already"):
        out("Cluster not online")
    else:
        out(f"Stopping O2CB cluster {reply['cluster']}: OK")


def cmd_unload(g, args, out):
    st = _online_status(g)
    if st is not None and st.get("online"):
        raise ReplfsError(f"Unable to unload the cluster stack: cluster {st['cluster']} is "
                          f"online (replfsadm cluster offline {st['cluster']})", EXIT_STATE)
    out("Unloading replfs cluster stack: OK")


def cmd_online(g, args, out):
    _nargs(args, 0, 1, "online CLUSTER")
    path = _conf_path(g)
    conf = cc.load(path)
    cluster = args[0] if args else (conf.clusters[0].name if len(conf.clusters) == 1 else None)
    if cluster is None:
        raise ReplfsError("USAGE: replfsadm cluster online CLUSTER", EXIT_USAGE)
    try:
        extra = {"heartbeat": os.path.abspath(g["heartbeat"])} if g["heartbeat"] else {}
        reply = _call(g, "cluster-online", cluster=cluster, conf=path, **extra)
    except ReplfsError as e:
        out(f"Starting O2CB cluster {cluster}: Failed")
        raise e
    if reply.get("already"):
        out(f"Cluster {cluster} already online")
    else:
        out(f"Starting O2CB cluster {cluster}: OK")


def cmd_offline(g, args, out):
    _nargs(args, 0, 1, "offline CLUSTER")
    try:
        reply = _call(g, "cluster-offline", **({"cluster": args[0]} if args else {}))
    except ReplfsError as e:
        out(f"Stopping O2CB cluster {args[0] if args else ''}: Failed".replace("  ", " "))
        raise e
    if reply.get("already"):
        out("Cluster not online")
    else:
        out(f"Stopping O2CB cluster {reply['cluster']}: OK")


def cmd_status(g, args, out):
    st = _call(g, "cluster-status")
    out("Driver for \"replfs cluster stack\": Loaded")
    if not st.get("online"):
        out("Cluster: Offline")
        return 0
    out(f"Cluster {st['cluster']}: Online")
    out(f"  Node: {st['node']} (number {st['number']})")
    out(f"  Connected peers: {', '.join(map(str, st['connected'])) or 'none'}")
    out(f"  Lock domains: {', '.join(st['domains']) or 'none'}")
    if st.get("heartbeat"):
        hb = st["heartbeat"]
        out(f"  Heartbeat: disk region {hb['region']} (live: "
            f"{', '.join(map(str, hb['live']))}) and network")
    else:
        out("  Heartbeat: network (o2net keepalives) only")
    t = st.get("timeouts")
    if t:
        out(f"  Timeouts: heartbeat threshold {t['heartbeat_threshold']}, idle "
            f"{t['idle_timeout_ms']} ms, keepalive {t['keepalive_delay_ms']} ms, reconnect "
            f"{t['reconnect_delay_ms']} ms")
    if st.get("fenced"):
        out(f"  FENCED: {st['fenced']}")
    return 0


def _online_status(g) -> dict | None:
    """The daemon's cluster-status, or None when no daemon answers."""
    from replfs.ipc.client import DaemonNotRunning
    try:
        return _call(g, "cluster-status")
    except DaemonNotRunning:
        return None


def cmd_list_nodes(g, args, out):
    """The node table: from the running cluster (with each node's state),
    else from cluster.conf itself (state unknown: the cluster is offline)."""
    st = _online_status(g)
    if st is not None and st.get("online"):
        reply = _call(g, "cluster-nodes")
        nodes = [(n["number"], n["name"], f"{n['ip_address']}:{n['ip_port']}",
                  "up" if n["up"] else "down") for n in reply["nodes"]]
    else:
        path = _conf_path(g)
        conf = cc.load(path)
        nodes = [(n.number, n.name, f"{n.ip_address}:{n.ip_port}", "offline")
                 for n in conf.nodes]
    out(f"{'NUMBER':<7} {'NAME':<16} {'ADDRESS':<22} STATE")
    for number, name, addr, state in nodes:
        out(f"{number:<7} {name:<16} {addr:<22} {state}")


def cmd_heartbeat(g, args, out):
    """The heartbeat view: the mode, and per node what the network
    heartbeat (o2net) and the disk heartbeat say, and whether the node was
    declared dead."""
    st = _call(g, "cluster-status")
    if not st.get("online"):
        out("Cluster: Offline")
        return 0
    hb = st.get("heartbeat")
    out(f"Heartbeat mode: {'disk region ' + hb['region'] + ' and network' if hb else 'network (o2net keepalives) only'}")
    out(f"{'NODE':<7} {'NETWORK':<10} {'DISK':<10} STATE")
    numbers = sorted(set(st.get("members") or []) | set(st["connected"]) | {st["number"]}
                     | set(hb["live"] if hb else []) | set(st.get("dead") or []))
    for n in numbers:
        net = "self" if n == st["number"] else ("up" if n in st["connected"] else "down")
        disk = "-" if not hb else ("live" if n in hb["live"] else "silent")
        state = ("fenced" if n == st["number"] and st.get("fenced")
                 else "dead" if n in (st.get("dead") or []) else "ok")
        out(f"{n:<7} {net:<10} {disk:<10} {state}")
    return 0


def cmd_check(g, args, out):
    """Parse cluster.conf (and the o2cb timeouts file next to it) without
    bringing anything online: errors are file:line."""
    path = _conf_path(g)
    conf = cc.load(path)
    tpath = os.path.join(os.path.dirname(os.path.abspath(path)), "o2cb")
    if not os.path.exists(tpath):
        tpath = cc.DEFAULT_TIMEOUTS_PATH
    t = cc.load_timeouts(tpath)
    for c in conf.clusters:
        members = [n for n in conf.nodes if n.cluster == c.name]
        out(f"{path}: cluster {c.name}: {len(members)} node(s): "
            + ", ".join(f"{n.name} ({n.number})" for n in members))
    out(f"timeouts: heartbeat threshold {t.heartbeat_threshold}, idle {t.idle_timeout_ms} ms, "
        f"keepalive {t.keepalive_delay_ms} ms, reconnect {t.reconnect_delay_ms} ms")
    return 0


def cmd_locks(g, args, out):
    _nargs(args, 0, 1, "locks [DOMAIN]")
    reply = _call(g, "dlm-locks", **({"domain": args[0]} if args else {}))
    out(f"{'DOMAIN':<12} {'RESOURCE':<24} {'GRANTED':<8} {'WANTED':<8} MASTER")
    for dom, locks in reply["locks"].items():
        for lk in locks:
            out(f"{dom:<12} {lk['resource']:<24} {lk['granted'] or '-':<8} "
                f"{lk['requested'] or '-':<8} {lk['master']}")


def _rewrite(path, conf):
    text = cc.dump(conf)
    cc.parse(text, path)  # validate before writing
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def cmd_add_node(g, args, out):
    _nargs(args, 4, 5, "add-node NAME NUMBER IP PORT [CLUSTER]")
    path = _conf_path(g)
    conf = cc.load(path) if os.path.exists(path) else cc.ClusterConf()
    name, number, ip, port = args[:4]
    if not number.isdigit() or not port.isdigit():
        raise ReplfsError("NUMBER and PORT must be whole numbers", EXIT_USAGE)
    if len(args) == 5:
        cluster = args[4]
    elif len(conf.clusters) == 1:
        cluster = conf.clusters[0].name
    else:
        raise ReplfsError("name the CLUSTER to add the node to", EXIT_USAGE)
    clusters = list(conf.clusters)
    if cluster not in [c.name for c in clusters]:
        clusters.append(cc.Cluster(cluster, 0))
    nodes = list(conf.nodes) + [cc.Node(name, int(number), ip, int(port), cluster)]
    clusters = [dataclasses.replace(c, node_count=sum(n.cluster == c.name for n in nodes))
                for c in clusters]
    _rewrite(path, dataclasses.replace(conf, nodes=tuple(nodes), clusters=tuple(clusters)))
    out(f"Node {name} added to cluster {cluster} in {path}")


def cmd_remove_node(g, args, out):
    _nargs(args, 1, 1, "remove-node NAME")
    path = _conf_path(g)
    conf = cc.load(path)
    if args[0] not in [n.name for n in conf.nodes]:
        raise ReplfsError(f"{path}: no node named {args[0]}", EXIT_CONFIG)
    nodes = [n for n in conf.nodes if n.name != args[0]]
    clusters = [dataclasses.replace(c, node_count=sum(n.cluster == c.name for n in nodes))
                for c in conf.clusters]
    _rewrite(path, dataclasses.replace(conf, nodes=tuple(nodes), clusters=tuple(clusters)))
    out(f"Node {args[0]} removed from {path}")


def cmd_dlmfs(g, args, out):
    _nargs(args, 1, 1, "dlmfs MOUNTPOINT")
    import subprocess
    rundir = rundir_from_env(g["rundir"])
    os.makedirs(args[0], exist_ok=True)
    logf = open(os.path.join(rundir, "dlmfs.log"), "ab")
    proc = subprocess.Popen([sys.executable, "-m", "replfs.locking.dlmfs", args[0],
                             "--rundir", rundir], stdout=subprocess.PIPE, stderr=logf,
                            start_new_session=True)
    line = proc.stdout.readline().decode()
    if not line.startswith("READY"):
        proc.wait(10)
        raise ReplfsError(f"dlmfs: mounting {args[0]} failed (see {rundir}/dlmfs.log)", 20)
    out(f"Mounting dlmfs filesystem at {args[0]}: OK (pid {proc.pid}; "
        f"umount {args[0]} or kill {proc.pid} to stop)")


_HANDLERS = {
    "load": cmd_load, "online": cmd_online, "offline": cmd_offline, "status": cmd_status,
    "list-nodes": cmd_list_nodes, "heartbeat": cmd_heartbeat, "locks": cmd_locks,
    "add-node": cmd_add_node, "remove-node": cmd_remove_node, "dlmfs": cmd_dlmfs,
    "check": cmd_check, "start": cmd_start, "stop": cmd_stop, "restart": cmd_restart,
    "online-status": cmd_online_status, "force-offline": cmd_force_offline,
    "unload": cmd_unload,
}

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
