"""`make demo`: the admin's walkthrough, on two nodes on this machine.

alpha (127.0.0.1) and beta (127.0.0.2) each get a backing file, a config
and a replfsd.  The demo prints every command as an admin would type it
(with --node/-c/--rundir left out for readability) and its output.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time

from replfs.localpair import LocalPair, Node

BOLD = "\033[1m" if sys.stdout.isatty() else ""
RESET = "\033[0m" if sys.stdout.isatty() else ""


def say(text: str) -> None:
    print(f"\n{BOLD}== {text}{RESET}", flush=True)


def run(node: Node, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    print(f"[{node.name}]# replfsadm {' '.join(args)}", flush=True)
    cp = node.adm(*args, check=False)
    for text in (cp.stdout, cp.stderr):
        if text.strip():
            print("    " + text.rstrip().replace("\n", "\n    "), flush=True)
    if check and cp.returncode != 0:
        raise SystemExit(f"demo: 'replfsadm {' '.join(args)}' failed on {node.name}")
    return cp


def shell(node: Node, cmd: list[str], show: str) -> str:
    print(f"[{node.name}]# {show}", flush=True)
    cp = subprocess.run(cmd, capture_output=True, text=True)
    out = (cp.stdout + cp.stderr).rstrip()
    if out:
        print("    " + out.replace("\n", "\n    "), flush=True)
    if cp.returncode != 0:
        raise SystemExit(f"demo: '{show}' failed on {node.name}")
    return cp.stdout


def wait(node: Node, pred, what: str, timeout: float = 60) -> None:
    node.wait(pred, timeout, what=what)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m replfs.demo",
                                 description="Two-node replfs demo on this machine.")
    ap.add_argument("--dir", help="work directory (default: a new one under /tmp)")
    ap.add_argument("--keep", action="store_true", help="leave the nodes running and the files")
    args = ap.parse_args(argv)
    root = args.dir or tempfile.mkdtemp(prefix="replfs-demo-")
    os.makedirs(root, exist_ok=True)
    pair = LocalPair(root, size=64 * 1024 * 1024)
    a, b = pair.alpha, pair.beta
    try:
        say(f"Two nodes on this machine: alpha (127.0.0.1) and beta (127.0.0.2), in {root}")
        print(open(a.conf).read())

        say("Create the meta-data on both nodes (drbdadm create-md r0)")
        for n in pair.nodes:
            run(n, "create-md", "r0")

        say("Start the node daemons and bring r0 up on both nodes")
        for n in pair.nodes:
            n.start()
            run(n, "up", "r0")
        wait(a, lambda s: s["cstate"] == "Connected", "the connection")
        run(a, "status", "r0")

        say("Nothing is UpToDate yet, so promotion is refused, as in DRBD")
        run(a, "primary", "r0", check=False)

        say("Force alpha to Primary; the initial full sync starts")
        run(a, "--", "--overwrite-data-of-peer", "primary", "r0")
        time.sleep(0.3)
        run(a, "proc")
        run(a, "wait-sync", "r0")
        run(a, "proc")

        say("Write through the replicated device on the Primary")
        payload = os.urandom(1024 * 1024)
        digest = hashlib.sha256(payload).hexdigest()
        from replfs.ipc.client import SyncClient, socket_path
        print(f"[alpha]# (write 1 MiB at offset 8 MiB, sha256 {digest[:16]}...)")
        with SyncClient(socket_path(a.rundir)) as c:
            c.call("open", res="r0", write=True)
            c.call("write", payload, res="r0", off=8 * 1024 * 1024)
            c.call("flush", res="r0")
        run(a, "overview")

        say("Switch over: demote alpha, promote beta, read the data back there")
        run(a, "secondary", "r0")
        run(b, "primary", "r0")
        with SyncClient(socket_path(b.rundir)) as c:
            _, data = c.call("read", res="r0", off=8 * 1024 * 1024, len=len(payload))
        ok = hashlib.sha256(data).hexdigest() == digest
        print(f"[beta]# (read 1 MiB at offset 8 MiB: sha256 {'matches' if ok else 'DIFFERS'})")
        if not ok:
            raise SystemExit("demo: data read on beta differs from what alpha wrote")
        run(b, "overview")

        say("Fail back: beta writes, then alpha is Primary again")
        with SyncClient(socket_path(b.rundir)) as c:
            c.call("write", b"beta was here".ljust(4096, b"\0"), res="r0", off=0)
        run(b, "secondary", "r0")
        run(a, "primary", "r0")
        with SyncClient(socket_path(a.rundir)) as c:
            _, data = c.call("read", res="r0", off=0, len=13)
        print(f"[alpha]# (read offset 0: {data!r})")
        run(a, "status", "r0")

        say("Split brain: both nodes write while disconnected")
        run(a, "disconnect", "r0")
        run(b, "disconnect", "r0")
        run(b, "primary", "r0")
        for n, text in ((a, b"alpha alone"), (b, b"beta alone")):
            with SyncClient(socket_path(n.rundir)) as c:
                c.call("write", text.ljust(4096, b"\0"), res="r0", off=4096)
        run(b, "secondary", "r0")
        run(a, "connect", "r0")
        run(b, "connect", "r0")
        wait(b, lambda s: s["cstate"] == "StandAlone", "split-brain detection")
        for line in b.log().splitlines():
            if "Split-Brain" in line:
                print("    (log) " + line)
                break
        run(b, "cstate", "r0")
        say("Recover: beta discards its changes and becomes SyncTarget")
        run(b, "secondary", "r0")
        run(b, "--", "--discard-my-data", "connect", "r0")
        run(a, "connect", "r0")
        run(a, "wait-sync", "r0")
        run(a, "overview")

        say("Tear down")
        if not args.keep:
            for n in pair.nodes:
                run(n, "down", "r0")
                run(n, "shutdown")
        print("\nreplfs demo finished successfully.")
        return 0
    finally:
        if not args.keep:
            pair.teardown()
            if not args.dir:
                shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
