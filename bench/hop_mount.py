"""Benchmark baseline only: serve a resource's replfs mount the way it was
served before replfsd hosted the mounts -- a process of its own whose
every block request crosses the admin socket to replfsd and back
(``DaemonBlockDevice``).  ``bench.fs`` measures it beside the mount that
replfsd serves, in the same run, to show what removing the hop gives.

    python -m bench.hop_mount RESOURCE MOUNTPOINT RUNDIR

Runs in the foreground until the mount is unmounted or SIGTERM.
"""
from __future__ import annotations

import sys

import trio

from replfs.fs import mount as M


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 3 or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv and argv[0] in ("-h", "--help") else 1
    name, mountpoint, rundir = argv
    src = M.Source(name, "resource", rundir=rundir)
    o = M.Options()

    def ready(message):
        print("READY" if message is None else f"ERROR {message}", flush=True)

    trio.run(M.serve, src, M.check_mountpoint(mountpoint), o, ready)
    return 0


if __name__ == "__main__":
    sys.exit(main())
