"""``replfsadm nfs ...``: serve a mounted replfs volume over NFS with
NFS-Ganesha (replfs/nfs/ganesha.py), one server per exported resource.

    replfsadm nfs config MOUNTPOINT [OPTIONS]    print the Ganesha configuration
    replfsadm nfs start  MOUNTPOINT [OPTIONS]    write it and start Ganesha
    replfsadm nfs reload RESOURCE|MOUNTPOINT [OPTIONS]   apply changed export options
    replfsadm nfs stop   RESOURCE|MOUNTPOINT     stop Ganesha (SIGKILL after --timeout)
    replfsadm nfs status [RESOURCE|MOUNTPOINT]   0 running, 3 not running

The mount is looked up in this node's replfsd (request ``mounts``), which
knows its resource and volume UUID.  ``stop`` and ``status`` also work
when replfsd or the mount is gone (the HA stop path): the server's files
in RUNDIR/nfs/RESOURCE (or --dir) say what it serves.

Before ``start``, the dead peer's state must be back: the server's NFSv4
grace period starts with it, and must not end before the filesystem has
recovered the dead node's journal slot and locks.  ``start`` waits (up to
--wait-recovery) while the mount recovers a slot, and also while a peer
is unreachable but not yet declared dead by the cluster stack (it is
still a member of the volume's lock domain): its recovery has not even
begun.  ``main(argv, out, err) -> int`` so tests can run it in-process.
"""
from __future__ import annotations

import os
import sys

from replfs.errors import EXIT_CONFIG, EXIT_EXEC, EXIT_TIMEOUT, EXIT_USAGE, ReplfsError
from replfs.ipc.client import (DaemonNotRunning, SyncClient, node_name, rundir_from_env,
                               socket_path)

EXIT_NOT_RUNNING = 3              # LSB status: program is not running

VERBS = [
    ("config", "MOUNTPOINT", "print the Ganesha configuration for the mount"),
    ("start", "MOUNTPOINT", "write the configuration and start Ganesha for the mount"),
    ("reload", "RESOURCE|MOUNTPOINT", "apply changed export options to the running Ganesha"),
    ("stop", "RESOURCE|MOUNTPOINT", "stop the resource's Ganesha (bounded by --timeout)"),
    ("status", "[RESOURCE|MOUNTPOINT]", "show the resource's NFS server; exit 3 if not running,"
                                        " 20 if it does not answer"),
]

# option -> (ExportSpec field or None, converter)
_VALUED = {
    "--address": "address", "--port": "port", "--mount-port": "mount_port",
    "--export-id": "export_id", "--pseudo": "pseudo", "--access": "access",
    "--clients": "clients", "--protocols": "protocols", "--grace": "grace",
    "--lease": "lease", "--squash": "squash", "--log-level": "log_level",
    "--dir": "dir", "--timeout": "timeout", "--wait-recovery": "wait_recovery",
}
# options that are no ExportSpec field
_OWN = ("dir", "timeout", "wait_recovery")
# what a running Ganesha does not re-read on SIGHUP (only its EXPORT and
# LOG blocks; ganesha-config(8), "Reloading Config"): these need a restart
_RESTART_ONLY = ("address", "port", "mount_port", "grace", "lease", "protocols",
                 "log_level")
_INTS = {"port", "mount_port", "export_id", "grace", "lease"}


def usage() -> str:
    lines = ["USAGE: replfsadm [--node NAME] [--rundir DIR] nfs VERB [ARG] [OPTIONS]", "",
             "Verbs:"]
    lines += [f"  {v:<8} {a:<24} {s}" for v, a, s in VERBS]
    lines += ["", "Options (config, start, reload):",
              "  --address ADDR      bind to this address only (the floating address);",
              "                      default: every address",
              "  --port N            NFS port (2049)",
              "  --mount-port N      MOUNT port for NFSv3 (20048)",
              "  --export-id N       Ganesha Export_Id, 1-65535 (default: from the volume UUID)",
              "  --pseudo PATH       NFSv4 pseudo path, also the NFSv3 mount path (/RESOURCE)",
              "  --access rw|ro      (rw)",
              "  --clients LIST      hosts or networks allowed, comma-separated (*)",
              "  --squash MODE       root_squash (default), no_root_squash, all_squash",
              "  --protocols LIST    3, 4 or 3,4 (3,4)",
              "  --grace SECONDS     NFSv4 grace period after a start or failover (90)",
              "  --lease SECONDS     NFSv4 lease time (60)",
              "  --log-level LEVEL   Ganesha's log level (NIV_EVENT)",
              "Other options:",
              "  --dir DIR           the server's files: configuration, pid, log",
              "                      (default RUNDIR/nfs/RESOURCE)",
              "  --timeout SECONDS   (start) wait for the server; (stop) SIGKILL after (30)",
              "  --wait-recovery SECONDS  (start) wait this long for the filesystem to",
              "                      recover a dead peer's slot first (default: --timeout)",
              "", "Exit codes: 0 ok, 1 usage, 3 not running (status), 5 a dead peer's slot",
              "not recovered in time (start), 10 config, 20 exec.",
              "See replfsadm-nfs(8)."]
    return "\n".join(lines)


def _parse(argv: list[str]):
    g = {"node": None, "rundir": None, "help": False}
    opts: dict = {}
    pos: list[str] = []
    i = 0
    while i < len(argv):
        a = argv[i]
        key = a.split("=", 1)[0]
        if key in ("--node", "--rundir", "-c", "--config") or key in _VALUED:
            if "=" in a:
                val = a.split("=", 1)[1]
            elif i + 1 < len(argv):
                i += 1
                val = argv[i]
            else:
                raise ReplfsError(f"option {a} needs a value", EXIT_USAGE)
            if key in ("--node", "--rundir"):
                g[key[2:]] = val
            elif key in ("-c", "--config"):
                g["config"] = val
            elif key in _VALUED:
                opts[_VALUED[key]] = val
        elif a in ("-h", "--help"):
            g["help"] = True
        elif a.startswith("-") and a != "-":
            raise ReplfsError(f"unknown option '{a}'\n{usage()}", EXIT_USAGE)
        else:
            pos.append(a)
        i += 1
    if pos and pos[0] == "nfs":
        pos = pos[1:]
    return g, pos, opts


def _call(g, op: str, **args) -> dict:
    try:
        with SyncClient(socket_path(rundir_from_env(g["rundir"])), timeout=30) as c:
            return c.call(op, **args)[0]
    except DaemonNotRunning:
        raise ReplfsError("replfsd is not running on this node: nothing is mounted through it",
                          EXIT_EXEC) from None


def _find(g, arg: str) -> dict:
    """The replfsd mount record of a mountpoint or resource name."""
    mounts = _call(g, "mounts")["mounts"]
    real = os.path.realpath(arg) if os.path.isabs(arg) or os.path.exists(arg) else None
    for m in mounts:
        if (real and os.path.realpath(m["mountpoint"]) == real) or m["resource"] == arg:
            if not m.get("uuid"):
                raise ReplfsError(f"{m['mountpoint']}: replfsd does not report the volume's "
                                  f"UUID (restart replfsd with this version)", EXIT_EXEC)
            return m
    if real:
        raise ReplfsError(f"{arg} is not a replfs resource mounted through this node's "
                          f"replfsd (mount -t fuse.replfs RESOURCE {arg})", EXIT_CONFIG)
    raise ReplfsError(f"resource {arg} is not mounted on this node", EXIT_CONFIG)


def _paths(g, opts, resource: str):
    from replfs.nfs import ganesha as G
    d = opts.get("dir") or os.path.join(rundir_from_env(g["rundir"]), "nfs", resource)
    return G.Paths(os.path.abspath(d))


def _apply(spec, opts) -> None:
    for key, val in opts.items():
        if key in _OWN:
            continue
        if key in _INTS:
            if not val.isdigit():
                raise ReplfsError(f"--{key.replace('_', '-')} needs a whole number, not "
                                  f"'{val}'", EXIT_USAGE)
            val = int(val)
        elif key == "clients":
            val = [c.strip() for c in val.split(",")]
        elif key == "protocols":
            val = tuple(p.strip() for p in val.split(",") if p.strip())
        elif key == "access":
            val = val.upper()
        setattr(spec, key, val)


def _timeout(opts, default=30.0, key="timeout", zero=False) -> float:
    val = opts.get(key)
    if val is None:
        return default
    try:
        t = float(val)
    except ValueError:
        t = -1
    if not (0 <= t if zero else 0 < t) or t > 3600:
        raise ReplfsError(f"--{key.replace('_', '-')}: '{val}' (seconds, up to 3600)",
                          EXIT_USAGE)
    return t


def _node_of(g, m: dict) -> str:
    """The node's name for its NFSv4 recovery directory: the cluster's
    name of this node for a shared mount, else --node / $REPLFS_NODE /
    uname -n."""
    return m.get("node") or node_name(g["node"])


def _spec_for(g, arg, opts, m=None):
    from replfs.nfs import ganesha as G
    m = m or _find(g, arg)
    spec = G.ExportSpec(resource=m["resource"], mountpoint=m["mountpoint"], uuid=m["uuid"],
                        node=_node_of(g, m))
    _apply(spec, opts)
    G.check_spec(spec)
    return spec


def cmd_config(g, args, opts, out):
    from replfs.nfs import ganesha as G
    _nargs(args, 1, 1, "config MOUNTPOINT [OPTIONS]")
    spec = _spec_for(g, args[0], opts)
    out(G.render_config(spec).rstrip("\n"))


def cmd_start(g, args, opts, out):
    from replfs.nfs import ganesha as G
    _nargs(args, 1, 1, "start MOUNTPOINT [OPTIONS]")
    timeout = _timeout(opts)
    wait = _timeout(opts, timeout, "wait_recovery", zero=True)
    _spec_for(g, args[0], opts)                     # refuse bad options before waiting
    m = wait_recovered(_Daemon(g), args[0], wait, out)
    spec = _spec_for(g, args[0], opts, m)
    paths = _paths(g, opts, spec.resource)
    pid = G.start(spec, paths, timeout=timeout)
    hi, lo, derived = G.derive_ids(spec.uuid)
    where = f"{spec.address or '*'}:{spec.port}"
    out(f"{spec.resource}: NFS-Ganesha pid {pid} serves {spec.mountpoint} on {where} as "
        f"{spec.pseudo or '/' + spec.resource} (export id {spec.export_id or derived}, "
        f"fsid {hi:#x}.{lo:#x}, NFSv{'+v'.join(spec.protocols)}); log {paths.log}")


class _Daemon:
    """The questions ``start`` asks this node's replfsd before it starts a
    server (a stand-in answers them in the unit tests)."""

    def __init__(self, g):
        self.g = g

    def mount(self, arg: str) -> dict:
        return _find(self.g, arg)

    def cluster_status(self) -> dict:
        return _call(self.g, "cluster-status")

    def domain_members(self, domain: str) -> list[int] | None:
        """The live members of a lock domain as this node's lock manager
        has them: a node leaves them only when the cluster stack declared
        it dead (or it left cleanly)."""
        reply = _call(self.g, "dlm-locks", domain=domain, mastered=True)
        info = (reply.get("mastered") or {}).get(domain)
        return None if info is None else list(info.get("members") or [])


def pending_recovery(m: dict, status: dict | None, members_of) -> list[str]:
    """Why a server in front of mount record ``m`` must not start yet: []
    when every other node's state is back.  ``status``: the cluster
    stack's cluster-status; ``members_of(uuid)``: the live members of the
    volume's lock domain (asked only when a node is unreachable).

    A node that died is, in turn: unreachable but still a member of the
    lock domain (the cluster stack has not declared it dead: it waits for
    the node to fence itself, or for the fence agent); then recovering in
    the mount's record (from the declaration until its journal slot is
    replayed).  A node that was never up, or left cleanly, is in neither."""
    if "recovering" not in m:
        return []                       # not a shared mount: no other node writes
    if status and status.get("fenced"):
        raise ReplfsError(f"{m['mountpoint']}: this node is fenced ({status['fenced']}); "
                          f"its mount answers EIO: not starting the NFS server", EXIT_EXEC)
    why = []
    if m["recovering"]:
        why.append(f"the mount is recovering the journal slots of dead node(s) "
                   f"{', '.join(map(str, m['recovering']))}")
    if status and status.get("online"):
        up = set(status.get("connected") or []) | {status.get("number")}
        gone = [n for n in status.get("members") or []
                if n not in up and n not in (status.get("dead") or [])
                and n not in m["recovering"]]
        if gone:
            members = set(members_of(m["uuid"]) or [])
            undeclared = [n for n in gone if n in members]
            if undeclared:
                why.append(f"node(s) {', '.join(map(str, undeclared))} unreachable but not "
                           f"yet declared dead by the cluster stack (their journal slots "
                           f"and locks are not recovered yet)")
    return why


def wait_recovered(daemon, arg: str, limit: float, out, *, clock=None, sleep=None) -> dict:
    """Wait until no other node's state is missing from the mount
    (``pending_recovery``); return the mount record.  The server's grace
    period starts when it starts, and must not end before the dead node's
    journal and locks are back.  Refuses (exit 5) after ``limit`` seconds."""
    import time
    clock = clock or time.monotonic
    sleep = sleep or time.sleep
    deadline = clock() + limit
    said = None
    while True:
        m = daemon.mount(arg)
        why = pending_recovery(m, daemon.cluster_status() if "recovering" in m else None,
                               daemon.domain_members)
        if not why:
            return m
        if why != said:
            out(f"waiting before the NFS server starts: {'; '.join(why)}")
            said = why
        if clock() >= deadline:
            raise ReplfsError(f"{arg}: not starting the NFS server: {'; '.join(why)}, still "
                              f"after {limit:g} s (--wait-recovery); its grace period could "
                              f"end before the dead node's state is back. Check "
                              f"'replfsadm cluster status' and replfsd's log", EXIT_TIMEOUT)
        sleep(0.2)


def cmd_reload(g, args, opts, out):
    from replfs.nfs import ganesha as G
    _nargs(args, 1, 1, "reload RESOURCE|MOUNTPOINT [OPTIONS]")
    m = _find(g, args[0])
    paths = _paths(g, opts, m["resource"])
    spec = G.load_spec(paths)
    if spec is None:
        raise ReplfsError(f"resource {m['resource']}: no export started in {paths.dir}",
                          EXIT_EXEC)
    core = [k for k in _RESTART_ONLY if k in opts]
    if core:
        raise ReplfsError(f"--{core[0].replace('_', '-')} needs a restart (replfsadm nfs "
                          f"stop, then start): Ganesha re-reads only its exports on reload",
                          EXIT_USAGE)
    if not spec.node:
        spec.node = _node_of(g, m)      # (an export file written before 'node' was kept)
    _apply(spec, opts)
    pid = G.reload(spec, paths)
    out(f"{spec.resource}: NFS-Ganesha pid {pid} re-reads its exports")


def cmd_stop(g, args, opts, out):
    from replfs.nfs import ganesha as G
    _nargs(args, 1, 1, "stop RESOURCE|MOUNTPOINT")
    timeout = _timeout(opts)
    if opts.get("dir"):
        # the server's own files say everything: no replfsd, no mount needed
        paths = G.Paths(os.path.abspath(opts["dir"]))
        spec = G.load_spec(paths)
        resource = spec.resource if spec else (args[0] if not os.path.isabs(args[0])
                                               else os.path.basename(paths.dir))
    else:
        resource = _resource_of(g, args[0])
        paths = _paths(g, opts, resource)
    pid, killed = G.stop(paths, timeout=timeout)
    if pid is None:
        out(f"{resource}: NFS-Ganesha is not running")
    elif killed:
        out(f"{resource}: NFS-Ganesha pid {pid} did not stop within {timeout:g} s; killed "
            f"it (SIGKILL)")
    else:
        out(f"{resource}: NFS-Ganesha pid {pid} stopped")


def _resource_of(g, arg: str) -> str:
    """A resource name from a resource or mountpoint argument.  A stopped
    export's mount (or replfsd) may already be gone: a plain name is taken
    as is, and a mountpoint replfsd does not know is looked up in the
    export files of RUNDIR/nfs."""
    if not os.path.isabs(arg):
        return arg
    try:
        return _find(g, arg)["resource"]
    except ReplfsError as e:
        from replfs.nfs import ganesha as G
        base = os.path.join(rundir_from_env(g["rundir"]), "nfs")
        want = {os.path.normpath(arg), os.path.realpath(arg)}
        try:
            names = sorted(os.listdir(base))
        except OSError:
            names = []
        for res in names:
            spec = G.load_spec(G.Paths(os.path.join(base, res)))
            if spec is not None and (os.path.normpath(spec.mountpoint) in want
                                     or os.path.realpath(spec.mountpoint) in want):
                return res
        raise ReplfsError(f"{e.message}\n(no export in {base} serves {arg} either; name the "
                          f"resource, or give --dir)", e.exit_code) from None


def cmd_status(g, args, opts, out):
    from replfs.nfs import ganesha as G
    from replfs.nfs import rpc
    _nargs(args, 0, 1, "status [RESOURCE|MOUNTPOINT]")
    if opts.get("dir"):
        d = os.path.abspath(opts["dir"])
        servers = [(os.path.basename(d), G.Paths(d))]
    elif args:
        res = _resource_of(g, args[0])
        servers = [(res, _paths(g, {}, res))]
    else:
        base = os.path.join(rundir_from_env(g["rundir"]), "nfs")
        try:
            names = sorted(os.listdir(base))
        except OSError:
            names = []
        servers = [(res, G.Paths(os.path.join(base, res))) for res in names]
    if not servers:
        out("no NFS exports on this node")
    running = failed = False
    for res, paths in servers:
        pid = G.read_pid(paths)
        spec = G.load_spec(paths)
        if spec is None:
            out(f"{res}: no NFS export" + (f" (but a Ganesha, pid {pid})" if pid else ""))
            running = running or pid is not None
            continue
        where = f"{spec.address or '*'}:{spec.port}"
        if pid is None:
            out(f"{res}: NFS-Ganesha not running (configured for {where})")
            continue
        hi, lo, derived = G.derive_ids(spec.uuid)
        try:
            rpc.probe(spec.address or "127.0.0.1", spec.port, timeout=2.0)
        except rpc.RPCError as e:
            # running but not serving: a failure, not "not running" (a
            # cluster manager must recover it, not start a second one)
            out(f"{res}: NFS-Ganesha pid {pid} runs but does not answer on {where}: {e}")
            failed = True
            continue
        running = True
        out(f"{res}: NFS-Ganesha running, pid {pid}, {spec.mountpoint} on {where} as "
            f"{spec.pseudo or '/' + res}, export id {spec.export_id or derived}, "
            f"fsid {hi:#x}.{lo:#x}")
    if failed:
        return EXIT_EXEC
    return 0 if running else EXIT_NOT_RUNNING


def _nargs(args, lo, hi, what):
    if not lo <= len(args) <= hi:
        raise ReplfsError(f"USAGE: replfsadm nfs {what}", EXIT_USAGE)


_HANDLERS = {"config": cmd_config, "start": cmd_start, "reload": cmd_reload,
             "stop": cmd_stop, "status": cmd_status}


def main(argv: list[str], *, out=None, err=None) -> int:
    out = out or (lambda s: print(s))
    err = err or (lambda s: print(s, file=sys.stderr))
    try:
        g, pos, opts = _parse(list(argv))
        if g["help"] or not pos:
            (out if g["help"] else err)(usage())
            return 0 if g["help"] else EXIT_USAGE
        verb, args = pos[0], pos[1:]
        if g.get("config"):
            # the export is found through replfsd's socket (--rundir) and
            # the mount; say so rather than take the option silently
            err("replfsadm nfs: -c not used (the mount is found through replfsd in "
                "--rundir)")
        fn = _HANDLERS.get(verb)
        if fn is None:
            raise ReplfsError(f"Unknown nfs command '{verb}'\n{usage()}", EXIT_USAGE)
        if verb in ("stop", "status"):
            allowed = {"dir", "timeout"}
        elif verb == "start":
            allowed = set(_VALUED.values())
        else:
            allowed = set(_VALUED.values()) - {"wait_recovery"}
        extra = set(opts) - allowed
        if extra:
            raise ReplfsError(f"'nfs {verb}' does not take "
                              f"--{sorted(extra)[0].replace('_', '-')}", EXIT_USAGE)
        return fn(g, args, opts, out) or 0
    except ReplfsError as e:
        err(e.message)
        return e.exit_code
    except OSError as e:
        err(f"replfsadm nfs: {e.filename + ': ' if e.filename else ''}{e.strerror or e}")
        return EXIT_EXEC
