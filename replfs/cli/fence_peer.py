"""``replfs-fence-peer``: the fence-peer handler for dual-primary resources.

Configured as DRBD's handlers are (``handlers { fence-peer
"replfs-fence-peer"; }`` with ``fencing resource-and-stonith;``), it is run
by replfsd when a Primary loses its replication link while the peer may
be writing too.  It asks the node's cluster stack (the same o2cb-style
membership that guards the shared mounts' locks) to decide, so the
mirror and the locks always agree on who goes on:

* exit 7 ("peer was stonithed"): the cluster stack declared the peer
  dead -- it fenced itself or died -- and this node's I/O resumes;
* exit 1: this node lost (fenced: its shared mounts stopped writing) or
  no decision was reached in time; I/O stays suspended until an admin
  acts ('replfsadm resume-io' once the peer is known to be down).

The resource comes from $DRBD_RESOURCE (set by replfsd for handlers) or
the argument; the daemon from $REPLFS_RUNDIR or --rundir.
"""
from __future__ import annotations

import argparse
import os
import sys

from replfs.errors import ReplfsError
from replfs.ipc.client import DaemonNotRunning, SyncClient, rundir_from_env, socket_path


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        self.print_usage(sys.stderr)
        print(f"replfs-fence-peer: {message}", file=sys.stderr)
        raise SystemExit(1)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="replfs-fence-peer",
                description="fence-peer handler for dual-primary replfs resources: let "
                            "the cluster stack decide which node goes on")
    p.add_argument("resource", nargs="?", default=os.environ.get("DRBD_RESOURCE"),
                   help="resource name (default $DRBD_RESOURCE)")
    p.add_argument("--rundir", metavar="DIR",
                   help="replfsd's socket directory (default $REPLFS_RUNDIR, else /run/replfs)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.resource:
        print("replfs-fence-peer: no resource (give one, or run as a fence-peer handler, "
              "which sets DRBD_RESOURCE)", file=sys.stderr)
        return 1
    try:
        with SyncClient(socket_path(rundir_from_env(args.rundir)), timeout=70) as c:
            reply, _ = c.call("cluster-fence-peer", res=args.resource)
    except DaemonNotRunning as e:
        print(f"replfs-fence-peer: {e}", file=sys.stderr)
        return 1
    except ReplfsError as e:
        print(f"replfs-fence-peer: {e.message}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"replfs-fence-peer: {e.strerror or e}", file=sys.stderr)
        return 1
    print(f"replfs-fence-peer: {args.resource}: {reply.get('why', '')} "
          f"(exit {reply.get('code', 1)})")
    return int(reply.get("code", 1))


if __name__ == "__main__":
    sys.exit(main())
