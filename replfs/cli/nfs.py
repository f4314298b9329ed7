"""``replfsadm nfs ...``: serve a mounted replfs volume over NFS with
NFS-Ganesha (replfs/nfs/ganesha.py), one server per exported resource.

    replfsadm nfs config MOUNTPOINT [OPTIONS]    print the Ganesha configuration
    replfsadm nfs start  MOUNTPOINT [OPTIONS]    write it and start Ganesha
    replfsadm nfs reload RESOURCE|MOUNTPOINT [OPTIONS]   apply changed export options
    replfsadm nfs stop   RESOURCE|MOUNTPOINT     stop Ganesha (SIGKILL after --timeout)
    replfsadm nfs status [RESOURCE|MOUNTPOINT]   0 running, 3 not running

The mount is looked up in this node's replfsd (request ``mounts``), which
knows its resource and volume UUID.  ``main(argv, out, err) -> int`` so
tests can run it in-process.
"""
from __future__ import annotations

import os
import sys

from replfs.errors import EXIT_CONFIG, EXIT_EXEC, EXIT_USAGE, ReplfsError
from replfs.ipc.client import DaemonNotRunning, SyncClient, rundir_from_env, socket_path

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
    "--dir": "dir", "--timeout": "timeout",
}
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
              "", "Exit codes: 0 ok, 1 usage, 3 not running (status), 10 config, 20 exec.",
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


def _mounts(g) -> list[dict]:
    try:
        with SyncClient(socket_path(rundir_from_env(g["rundir"])), timeout=30) as c:
            return c.call("mounts")[0]["mounts"]
    except DaemonNotRunning:
        raise ReplfsError("replfsd is not running on this node: nothing is mounted through it",
                          EXIT_EXEC) from None


def _find(g, arg: str) -> dict:
    """The replfsd mount record of a mountpoint or resource name."""
    mounts = _mounts(g)
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
        if key in ("dir", "timeout"):
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


def _timeout(opts, default=30.0) -> float:
    val = opts.get("timeout")
    if val is None:
        return default
    try:
        t = float(val)
    except ValueError:
        t = -1
    if not 0 < t <= 3600:
        raise ReplfsError(f"--timeout: '{val}' (seconds, up to 3600)", EXIT_USAGE)
    return t


def _spec_for(g, arg, opts):
    from replfs.nfs import ganesha as G
    m = _find(g, arg)
    spec = G.ExportSpec(resource=m["resource"], mountpoint=m["mountpoint"], uuid=m["uuid"])
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
    spec = _spec_for(g, args[0], opts)
    paths = _paths(g, opts, spec.resource)
    _wait_recovered(g, args[0], _timeout(opts), out)
    pid = G.start(spec, paths, timeout=_timeout(opts))
    hi, lo, derived = G.derive_ids(spec.uuid)
    where = f"{spec.address or '*'}:{spec.port}"
    out(f"{spec.resource}: NFS-Ganesha pid {pid} serves {spec.mountpoint} on {where} as "
        f"{spec.pseudo or '/' + spec.resource} (export id {spec.export_id or derived}, "
        f"fsid {hi:#x}.{lo:#x}, NFSv{'+v'.join(spec.protocols)}); log {paths.log}")


def _wait_recovered(g, arg: str, timeout: float, out) -> None:
    """Wait until the mount has recovered the slots of every dead node:
    the server's grace period starts when it starts, and must not end
    before the dead node's state is back (its locks, its journal)."""
    import time
    deadline = time.monotonic() + timeout
    said = False
    while True:
        pending = _find(g, arg).get("recovering") or []
        if not pending:
            return
        if not said:
            out(f"waiting for the mount to recover the slots of dead node(s) "
                f"{', '.join(map(str, pending))}")
            said = True
        if time.monotonic() > deadline:
            raise ReplfsError(f"{arg}: the slots of dead node(s) {pending} are still not "
                              f"recovered after {timeout:g} s; not starting the NFS server",
                              EXIT_EXEC)
        time.sleep(0.1)


def cmd_reload(g, args, opts, out):
    from replfs.nfs import ganesha as G
    _nargs(args, 1, 1, "reload RESOURCE|MOUNTPOINT [OPTIONS]")
    m = _find(g, args[0])
    paths = _paths(g, opts, m["resource"])
    spec = G.load_spec(paths)
    if spec is None:
        raise ReplfsError(f"resource {m['resource']}: no export started in {paths.dir}",
                          EXIT_EXEC)
    core = {k for k in opts if k in ("address", "port", "mount_port")}
    if core:
        raise ReplfsError(f"--{sorted(core)[0].replace('_', '-')} needs a restart "
                          f"(replfsadm nfs stop, then start): Ganesha reads it only at start",
                          EXIT_USAGE)
    _apply(spec, opts)
    pid = G.reload(spec, paths)
    out(f"{spec.resource}: NFS-Ganesha pid {pid} re-reads its exports")


def cmd_stop(g, args, opts, out):
    from replfs.nfs import ganesha as G
    _nargs(args, 1, 1, "stop RESOURCE|MOUNTPOINT")
    resource = _resource_of(g, args[0])
    paths = _paths(g, opts, resource)
    timeout = _timeout(opts)
    pid, killed = G.stop(paths, timeout=timeout)
    if pid is None:
        out(f"{resource}: NFS-Ganesha is not running")
    elif killed:
        out(f"{resource}: NFS-Ganesha pid {pid} did not stop within {timeout:g} s; killed "
            f"it (SIGKILL)")
    else:
        out(f"{resource}: NFS-Ganesha pid {pid} stopped")


def _resource_of(g, arg: str) -> str:
    """A resource name from a resource or mountpoint argument; a stopped
    export's mount may already be gone, so a plain name is taken as is."""
    if os.path.isabs(arg):
        return _find(g, arg)["resource"]
    return arg


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
        ignored = [o for o, k in (("--node", "node"), ("-c", "config")) if g.get(k)]
        if ignored:
            # the export is found through replfsd's socket (--rundir) and
            # the mount; say so rather than take the option silently
            err(f"replfsadm nfs: {' and '.join(ignored)} not used (the mount is found "
                f"through replfsd in --rundir)")
        fn = _HANDLERS.get(verb)
        if fn is None:
            raise ReplfsError(f"Unknown nfs command '{verb}'\n{usage()}", EXIT_USAGE)
        if verb in ("stop", "status"):
            extra = set(opts) - {"dir", "timeout"}
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
