"""replfsd command line: start the node daemon."""
from __future__ import annotations

import argparse
import os
import socket
import sys

import trio

from replfs.errors import EXIT_EXEC, EXIT_USAGE, ReplfsError
from replfs.ipc.client import (DaemonNotRunning, SyncClient, node_name,  # noqa: F401
                               rundir_from_env, socket_path)

from .server import VERSION, Daemon, serve, setup_logging




def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="replfsd",
        description="The replfs node daemon: hosts this node's replicated resources "
                    "and answers replfsadm on a Unix socket (mode 0600).")
    p.add_argument("-c", "--config", metavar="FILE",
                   help="resource configuration (default /etc/replfs/replfs.conf)")
    p.add_argument("--node", metavar="NAME",
                   help="this node's name (default $REPLFS_NODE, else uname -n)")
    p.add_argument("--rundir", metavar="DIR",
                   help="socket, pid and log directory (default $REPLFS_RUNDIR, else /run/replfs)")
    p.add_argument("-f", "--foreground", action="store_true",
                   help="stay in the foreground and log to stderr too")
    p.add_argument("--metrics", metavar="ADDR:PORT", default=os.environ.get("REPLFS_METRICS"),
                   help="serve Prometheus metrics at http://ADDR:PORT/metrics (default "
                        "$REPLFS_METRICS; none: no endpoint)")
    p.add_argument("--version", action="version", version=f"replfsd {VERSION}")
    return p


def _already_running(rundir: str) -> bool:
    try:
        with SyncClient(socket_path(rundir), timeout=2) as c:
            c.call("ping")
        return True
    except (DaemonNotRunning, OSError, ReplfsError):
        return False


def _daemonize(rundir: str) -> None:
    """Classic double fork; the parent returns once the child is detached."""
    if os.fork() > 0:
        os._exit(0)
    os.setsid()
    if os.fork() > 0:
        os._exit(0)
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.chdir("/")


def secure_rundir(rundir: str) -> str | None:
    """The run directory holds the admin socket: it must belong to this
    user and be writable by nobody else (or another user could put a
    socket of their own where replfsadm looks).  One that already existed
    with a looser mode is tightened; one owned by someone else is refused.
    Returns the refusal, or None."""
    st = os.stat(rundir)
    if st.st_uid != os.geteuid():
        return (f"refusing to use {rundir}: it belongs to uid {st.st_uid}, not to this "
                f"user (uid {os.geteuid()})")
    if st.st_mode & 0o077:
        os.chmod(rundir, 0o700)
    return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    rundir = rundir_from_env(args.rundir)
    node = node_name(args.node)
    if args.metrics:
        from .metrics import parse_address
        try:
            parse_address(args.metrics)
        except ReplfsError as e:
            print(f"replfsd: {e.message}", file=sys.stderr)
            return e.exit_code
    try:
        os.makedirs(rundir, mode=0o700, exist_ok=True)
    except OSError as e:
        print(f"replfsd: cannot create {rundir}: {e.strerror}", file=sys.stderr)
        return EXIT_EXEC
    problem = secure_rundir(rundir)
    if problem:
        print(f"replfsd: {problem}", file=sys.stderr)
        return EXIT_EXEC
    if _already_running(rundir):
        print(f"replfsd: already running (socket {socket_path(rundir)})", file=sys.stderr)
        return EXIT_EXEC
    if not args.foreground:
        _daemonize(rundir)
    with open(os.path.join(rundir, "replfsd.pid"), "w") as f:
        f.write(f"{os.getpid()}\n")
    setup_logging(rundir, args.foreground)
    # handlers (replfs-fence-peer) find this daemon by the environment
    os.environ["REPLFS_RUNDIR"] = rundir
    daemon = Daemon(node, rundir, os.path.abspath(args.config) if args.config else None)
    from .components import default_components
    daemon.components = default_components()
    if args.metrics:
        from .metrics import MetricsService
        daemon.components.append(MetricsService(args.metrics))
    try:
        trio.run(serve, daemon)
    except ReplfsError as e:
        print(f"replfsd: {e}", file=sys.stderr)
        return e.exit_code
    finally:
        try:
            os.unlink(os.path.join(rundir, "replfsd.pid"))
        except FileNotFoundError:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
