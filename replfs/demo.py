"""`make demo`: the admin's walkthrough, on two nodes on this machine.

alpha (127.0.0.1) and beta (127.0.0.2) each get a backing file, a config
and a replfsd.  The demo prints every command as an admin would type it
(with --node/-c/--rundir left out for readability) and its output.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

from replfs.ipc.client import SyncClient, socket_path
from replfs.localpair import LocalPair, Node, cluster_conf, free_port

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


def wait_file(path: str, timeout: float = 15) -> None:
    """Wait until the device file is mounted (replfsd starts it on attach)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open("/proc/self/mountinfo") as f:
            if any(line.split()[4] == path for line in f):
                return
        time.sleep(0.05)
    raise SystemExit(f"demo: device file {path} did not appear")


def wait(node: Node, pred, what: str, timeout: float = 60) -> None:
    node.wait(pred, timeout, what=what)


def fs_env(node: Node) -> dict:
    """What mkfs.replfs, mount(8) and the replfs mount program need to find
    this node's config and daemon (a real node uses the defaults)."""
    env = dict(os.environ)
    env.update(REPLFS_CONF=node.conf, REPLFS_NODE=node.name, REPLFS_RUNDIR=node.rundir)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    return env


def fs_shell(node: Node, cmd: list[str], check: bool = True) -> str:
    print(f"[{node.name}]# {' '.join(cmd)}", flush=True)
    cp = subprocess.run(cmd, capture_output=True, text=True, env=fs_env(node), timeout=120)
    out = (cp.stdout + cp.stderr).rstrip()
    if out:
        print("    " + out.replace("\n", "\n    "), flush=True)
    if check and cp.returncode != 0:
        raise SystemExit(f"demo: '{' '.join(cmd)}' failed on {node.name} ({cp.returncode})")
    return cp.stdout


def fs_demo(a: Node, b: Node) -> None:
    """The cluster filesystem on r0: mkfs, mount(8), write, fail over, read."""
    amnt, bmnt = (os.path.join(n.root, "ha") for n in (a, b))
    for m in (amnt, bmnt):
        os.makedirs(m, exist_ok=True)
    say("The cluster filesystem: mkfs.replfs on r0 (alpha is Primary)")
    fs_shell(a, ["mkfs.replfs", "-N", "2", "-L", "demo", "r0"], check=False)
    say("r0 held a filesystem already, so mkfs.replfs wanted -F")
    fs_shell(a, ["mkfs.replfs", "-F", "-N", "2", "-L", "demo", "r0"])
    fs_shell(a, ["mount", "-t", "fuse.replfs", "r0", amnt])
    try:
        os.makedirs(os.path.join(amnt, "exports/home"))
        with open(os.path.join(amnt, "exports/home/notes.txt"), "w") as f:
            f.write("written on alpha through mount -t fuse.replfs\n")
            f.flush()
            os.fsync(f.fileno())
        print(f"[alpha]# mkdir -p {amnt}/exports/home; echo ... > {amnt}/exports/home/notes.txt")
        fs_shell(a, ["ls", "-lR", amnt])
        run(a, "overview")
    finally:
        fs_shell(a, ["umount", amnt])
    say("Fail over: alpha steps down, beta is promoted and mounts r0")
    run(a, "secondary", "r0")
    run(b, "primary", "r0")
    fs_shell(b, ["fsck.replfs", "-n", "r0"])
    fs_shell(b, ["mount", "-t", "fuse.replfs", "r0", bmnt])
    try:
        fs_shell(b, ["cat", os.path.join(bmnt, "exports/home/notes.txt")])
        run(b, "overview")
        fs_shell(b, ["df", "-h", bmnt])
    finally:
        fs_shell(b, ["umount", bmnt])
    run(b, "secondary", "r0")


def dual_primary_demo(pair: LocalPair) -> None:
    """The seed's ending: r1 Primary on both nodes, the cluster stack
    online, one filesystem mounted on both nodes at once."""
    a, b = pair.alpha, pair.beta
    say("The seed's last step: a dual-primary resource r1 (protocol C, allow-two-primaries),\n"
        "the o2cb cluster online, one filesystem mounted on both nodes")
    cdir = os.path.join(pair.root, "cluster")
    os.makedirs(cdir, exist_ok=True)
    cconf = os.path.join(cdir, "cluster.conf")
    with open(cconf, "w") as f:
        f.write(cluster_conf("ocfs2", free_port("127.0.0.1"), free_port("127.0.0.2")))
    print(f"[both]# cat {cconf}")
    print(open(cconf).read())
    for n in pair.nodes:
        run(n, "cluster", "-C", cconf, "load")
        run(n, "cluster", "-C", cconf, "online", "ocfs2")
    for n in pair.nodes:
        run(n, "create-md", "r1")
        run(n, "up", "r1")
    wait(a, lambda s: s["cstate"] == "Connected", "r1's connection")
    run(a, "--", "--overwrite-data-of-peer", "primary", "r1")
    run(a, "wait-sync", "r1")
    run(b, "primary", "r1")
    run(a, "overview")
    fs_shell(a, ["mkfs.replfs", "-N", "4", "-L", "shared", "r1"])
    amnt, bmnt = (os.path.join(n.root, "shared") for n in (a, b))
    for m in (amnt, bmnt):
        os.makedirs(m, exist_ok=True)
    fs_shell(a, ["mount", "-t", "fuse.replfs", "r1", amnt])
    try:
        fs_shell(b, ["mount", "-t", "fuse.replfs", "r1", bmnt])
        try:
            run(b, "mounted", "-f", "r1")
            with open(os.path.join(amnt, "from-alpha.txt"), "w") as f:
                f.write("written on alpha while beta has it mounted too\n")
            print(f"[alpha]# echo '...' > {amnt}/from-alpha.txt")
            fs_shell(b, ["cat", os.path.join(bmnt, "from-alpha.txt")])
            fs_shell(b, ["mv", os.path.join(bmnt, "from-alpha.txt"),
                         os.path.join(bmnt, "renamed-on-beta.txt")])
            fs_shell(a, ["ls", "-l", amnt])
            fs_shell(a, ["df", "-h", amnt])
        finally:
            fs_shell(b, ["umount", bmnt])
    finally:
        fs_shell(a, ["umount", amnt])
    deadline = time.monotonic() + 30
    while a.status("r1")["open_count"] or b.status("r1")["open_count"]:
        if time.monotonic() > deadline:
            raise SystemExit("demo: the mounts of r1 did not finish")
        time.sleep(0.1)
    fs_shell(a, ["fsck.replfs", "-n", "r1"])
    for n in pair.nodes:
        run(n, "secondary", "r1")
        run(n, "down", "r1")
    for n in pair.nodes:
        run(n, "cluster", "-C", cconf, "offline", "ocfs2")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m replfs.demo",
                                 description="Two-node replfs demo on this machine.")
    ap.add_argument("--dir", help="work directory (default: a new one under /tmp)")
    ap.add_argument("--keep", action="store_true", help="leave the nodes running and the files")
    args = ap.parse_args(argv)
    root = args.dir or tempfile.mkdtemp(prefix="replfs-demo-")
    os.makedirs(root, exist_ok=True)
    pair = LocalPair(root, size=64 * 1024 * 1024, dual=True)
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

        say("The device file: what /dev/drbd0 is for DRBD (a FUSE single-file mount)")
        adev, bdev = (os.path.join(n.root, "drbd0") for n in (a, b))
        wait_file(adev)
        shell(a, ["ls", "-l", adev], f"ls -l {adev}")
        loop = subprocess.run(["losetup", "-f"], capture_output=True).returncode == 0
        amnt, bmnt = (os.path.join(n.root, "mnt") for n in (a, b))
        if loop:
            say("mkfs on the Primary's device, mount it, write")
            shell(a, ["mkfs.ext4", "-q", "-F", adev], f"mkfs.ext4 -q {adev}")
            os.makedirs(amnt, exist_ok=True)
            shell(a, ["mount", "-o", "loop", adev, amnt], f"mount -o loop {adev} {amnt}")
            with open(os.path.join(amnt, "hello.txt"), "w") as f:
                f.write("written on alpha\n")
            print(f"[alpha]# echo 'written on alpha' > {amnt}/hello.txt")
            run(a, "overview")
            shell(a, ["umount", amnt], f"umount {amnt}")
        else:
            say("Write through the device file on the Primary (no loop devices here)")
            with open(adev, "r+b") as f:
                f.seek(8 * 1024 * 1024)
                f.write(b"written on alpha".ljust(4096, b"\0"))
                os.fsync(f.fileno())
            print(f"[alpha]# (wrote 4 KiB at 8 MiB into {adev})")

        say("Switch over: unmount, demote alpha, promote beta, mount there")
        run(a, "secondary", "r0")
        run(b, "primary", "r0")
        if loop:
            shell(b, ["e2fsck", "-fn", bdev], f"e2fsck -fn {bdev}")
            os.makedirs(bmnt, exist_ok=True)
            shell(b, ["mount", "-o", "loop", bdev, bmnt], f"mount -o loop {bdev} {bmnt}")
            shell(b, ["cat", os.path.join(bmnt, "hello.txt")], f"cat {bmnt}/hello.txt")
            run(b, "overview")
            shell(b, ["umount", bmnt], f"umount {bmnt}")
        else:
            with open(bdev, "rb") as f:
                f.seek(8 * 1024 * 1024)
                print(f"[beta]# (read back: {f.read(16)!r})")
            run(b, "overview")

        # The rest writes raw blocks at the end of the device, after the
        # filesystem's last block group, through the daemon's socket.
        tail = a.status()["size"] - 8192
        say("Fail back: beta writes, then alpha is Primary again")
        with SyncClient(socket_path(b.rundir)) as c:
            c.call("write", b"beta was here".ljust(4096, b"\0"), res="r0", off=tail)
        run(b, "secondary", "r0")
        run(a, "primary", "r0")
        with SyncClient(socket_path(a.rundir)) as c:
            _, data = c.call("read", res="r0", off=tail, len=13)
        print(f"[alpha]# (read the block beta wrote: {data!r})")
        run(a, "status", "r0")

        say("Split brain: both nodes write while disconnected")
        run(a, "disconnect", "r0")
        run(b, "disconnect", "r0")
        run(b, "primary", "r0")
        for n, text in ((a, b"alpha alone"), (b, b"beta alone")):
            with SyncClient(socket_path(n.rundir)) as c:
                c.call("write", text.ljust(4096, b"\0"), res="r0", off=tail + 4096)
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

        fs_demo(a, b)
        dual_primary_demo(pair)

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
