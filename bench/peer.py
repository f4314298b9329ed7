"""`make bench-peer`: replfs against GlusterFS, the system users would pick
instead, side by side in one run on this machine.

* GlusterFS replica 2 — a volume of two bricks on this host (under a
  temporary directory; `force`, since both are on one host and on the root
  filesystem; named by this host's name, which must resolve to 127.0.0.1:
  gluster refuses "127.0.0.1" in a brick), served by glusterd, mounted with its FUSE client
  (mount -t glusterfs 127.0.0.1:/VOLUME);
* replfs r0/C — mkfs.replfs on a protocol C resource of a two-daemon pair
  (127.0.0.1 / 127.0.0.2), mounted with mount -t fuse.replfs (served by
  replfsd), exactly as bench/fs.py sets it up.

Both run bench/fs.py's workloads (its WORKLOADS, without the big-directory
row): sequential write and read, 4 KiB random read and buffered random
write, fsync'd 4 KiB writes (fsync p50), create / stat / readdir / unlink,
`tar x` of a source tree, `du -s`, `rm -rf`, and small files.  --rounds
interleaved rounds (the order reversed every other round), medians, the
table's ratio: replfs / GlusterFS as a speed ratio (above 1: replfs is
faster).  All traffic is on 127.0.0.1.  Everything is undone at the end:
the mounts, the volume (stopped and deleted), glusterd if this run started
it, the resource pair and the temporary directory.

GlusterFS must be installed first: scripts/setup-bench-peer.sh (which
`make bench-peer` runs) installs it from Debian's packages.

    python -m bench.peer [--rounds 3] [--quick]

Exit status: 0 done; 1 GlusterFS missing or its volume could not be made,
or a target failed; 2 usage.
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from . import fs as F
from .common import Report, add_cli_common

GLUSTER = "GlusterFS replica 2"


class GlusterError(RuntimeError):
    pass


def _tool(name: str) -> str | None:
    return shutil.which(name) or next((p for p in (f"/usr/sbin/{name}", f"/sbin/{name}")
                                       if os.access(p, os.X_OK)), None)


def gluster_missing() -> str | None:
    for t in ("glusterd", "gluster", "mount.glusterfs"):
        if _tool(t) is None:
            return t
    return None


def _glusterd_pids() -> list[int]:
    out = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/comm") as f:
                    if f.read().strip() == "glusterd":
                        out.append(int(pid))
            except OSError:
                pass
    return out


def _pids_with(word: str) -> list[int]:
    """Processes whose command line names ``word`` (our volume's name)."""
    out = []
    for pid in os.listdir("/proc"):
        if pid.isdigit() and int(pid) != os.getpid():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if word.encode() in f.read():
                        out.append(int(pid))
            except OSError:
                pass
    return out


def brick_host() -> str:
    """The name the bricks are given: gluster refuses 127.0.0.1 and
    "localhost" in a brick, so this host's name, which must resolve to a
    loopback address (all traffic stays on 127.0.0.1)."""
    import socket
    host = socket.gethostname()
    try:
        addr = socket.gethostbyname(host)
    except OSError as e:
        raise GlusterError(f"this host's name {host!r} does not resolve: {e}") from None
    if not addr.startswith("127."):
        raise GlusterError(f"this host's name {host!r} resolves to {addr}, not a loopback "
                           f"address: the bricks would not be on 127.0.0.1")
    return host


class GlusterVolume(F.Target):
    """A replica-2 volume of two bricks on this host, mounted by FUSE."""
    name = GLUSTER

    def __init__(self, root: str):
        super().__init__(root)
        self.volume = f"replfsbench{os.getpid()}"
        self.started_glusterd = False
        self.created = False
        self.log: list[str] = []

    def gluster(self, *args: str, check: bool = True, timeout: float = 120) -> str:
        cmd = [_tool("gluster") or "gluster", "--mode=script", *args]
        cp = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        self.log.append(f"$ {' '.join(cmd)} -> {cp.returncode}: {(cp.stdout + cp.stderr).strip()}")
        if check and cp.returncode != 0:
            raise GlusterError(f"gluster {' '.join(args)}: "
                               f"{(cp.stderr or cp.stdout).strip()[-300:]}")
        return cp.stdout

    def start(self):
        if not _glusterd_pids():
            pidfile = os.path.join(self.root, "glusterd.pid")
            cp = subprocess.run([_tool("glusterd") or "glusterd", "-p", pidfile,
                                 "-l", os.path.join(self.root, "glusterd.log")],
                                capture_output=True, text=True, timeout=60)
            if cp.returncode != 0:
                raise GlusterError(f"glusterd did not start: {cp.stderr.strip()[-300:]}")
            self.started_glusterd = True
            self.pidfile = pidfile
        deadline = time.monotonic() + 30
        while True:      # glusterd answers once its management port is up
            cp = subprocess.run([_tool("gluster") or "gluster", "--mode=script", "pool", "list"],
                                capture_output=True, text=True, timeout=30)
            if cp.returncode == 0:
                break
            if time.monotonic() > deadline:
                raise GlusterError(f"glusterd does not answer: {cp.stderr.strip()[-200:]}")
            time.sleep(0.3)
        bricks = [os.path.join(self.root, f"brick{i}") for i in (1, 2)]
        for b in bricks:
            os.makedirs(b)
        self.gluster("volume", "create", self.volume, "replica", "2",
                     *[f"{brick_host()}:{b}" for b in bricks], "force")
        self.created = True
        self.gluster("volume", "start", self.volume)
        self.path = os.path.join(self.root, "gluster-mnt")
        os.mkdir(self.path)
        deadline = time.monotonic() + 60
        while True:      # the bricks take a moment to come up after start
            cp = subprocess.run(["mount", "-t", "glusterfs", f"127.0.0.1:/{self.volume}",
                                 self.path], capture_output=True, text=True, timeout=120)
            if cp.returncode == 0 and os.path.ismount(self.path):
                break
            if time.monotonic() > deadline:
                raise GlusterError(f"mount -t glusterfs: {cp.stderr.strip()[-300:]}")
            time.sleep(1)
        os.statvfs(self.path)

    def version(self) -> str:
        cp = subprocess.run([_tool("gluster") or "gluster", "--version"], capture_output=True,
                            text=True, timeout=30)
        return (cp.stdout.splitlines() or ["?"])[0]

    def stop(self):
        problems = []
        if self.path and os.path.ismount(self.path):
            if subprocess.run(["umount", self.path], capture_output=True).returncode != 0:
                subprocess.run(["umount", "-l", self.path], capture_output=True)
        if self.created:
            for args in (("volume", "stop", self.volume, "force"),
                         ("volume", "delete", self.volume)):
                try:
                    self.gluster(*args)
                except (GlusterError, subprocess.TimeoutExpired) as e:
                    problems.append(str(e))
        if self.started_glusterd:
            try:
                with open(self.pidfile) as f:
                    pid = int(f.read().strip())
                os.kill(pid, signal.SIGTERM)
                deadline = time.monotonic() + 15
                while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
                    time.sleep(0.1)
            except (OSError, ValueError) as e:
                problems.append(f"stopping glusterd: {e}")
        # brick or self-heal processes of our volume that outlived it
        for pid in _pids_with(self.volume):
            try:
                os.kill(pid, signal.SIGTERM)
            except OSError:
                pass
        if problems:
            raise GlusterError("; ".join(problems))


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="python -m bench.peer",
                                 description=__doc__.splitlines()[0],
                                 epilog="GlusterFS is installed by scripts/setup-bench-peer.sh "
                                        "(make bench-peer).")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    ap.add_argument("--size", type=int, default=64, metavar="MIB",
                    help="file size of the sequential/random rows (default 64)")
    ap.add_argument("--runtime", type=int, default=3, metavar="S",
                    help="seconds per random and fsync row (default 3)")
    ap.add_argument("--files", type=int, default=2000,
                    help="files to create/stat/readdir/unlink (default 2000)")
    ap.add_argument("--small-files", type=int, default=1000,
                    help="files of 4-64 KiB in the small-file rows (default 1000)")
    ap.add_argument("--quick", action="store_true", help="small sizes, one round")
    add_cli_common(ap)
    args = ap.parse_args(argv)
    if args.rounds < 1:
        ap.error("--rounds must be at least 1")
    if args.quick:
        args.rounds, args.size, args.runtime, args.files, args.small_files = 1, 16, 1, 200, 100
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    missing = gluster_missing()
    if missing:
        print(f"bench.peer: GlusterFS is not installed ({missing} not found); "
              f"scripts/setup-bench-peer.sh installs it (make bench-peer runs it)",
              file=sys.stderr)
        return 1
    why = F.fuse_usable()
    if why:
        print(f"bench.peer: cannot mount FUSE filesystems here: {why}", file=sys.stderr)
        return 1
    cfg = F.Config(args.size, args.runtime, args.files, args.small_files, bigdir=0)
    rep = Report("peer", "replfs against GlusterFS")
    rc = 0
    gv = None
    with tempfile.TemporaryDirectory(prefix="replfs-bench-peer-", dir="/var/tmp") as root:
        cfg.tree_tar, cfg.tree_entries = F.make_tree_tar(root, quick=args.quick)
        gv = GlusterVolume(root)
        res = F.ReplfsResource(root, max(1024, args.size * 4 + 512))
        targets = [gv, res]
        started = []
        version = "?"
        try:
            for t in targets:
                print(f"# starting {t.name}", flush=True)
                started.append(t)
                try:
                    t.start()
                except Exception as e:
                    t.error = f"{type(e).__name__}: {e}"
                    print(f"#   {t.name} failed to start: {e}", flush=True)
                    rc = 1
            version = gv.version()
            per = F.run_rounds(targets, cfg, args.rounds)
        except KeyboardInterrupt:
            print("bench.peer: interrupted; cleaning up", file=sys.stderr)
            rc = 130
        finally:
            for t in reversed(started):
                try:
                    t.stop()
                except Exception as e:
                    print(f"#   cleaning up {t.name}: {e}", flush=True)
                    rc = 1
    if rc == 130:
        return rc
    sec = rep.section("peer", f"replfs (protocol C resource) against {GLUSTER} "
                              f"({version}), FUSE clients, one host",
                      [GLUSTER, res.name], res.name, [GLUSTER],
                      note=f"medians of {args.rounds} interleaved round(s); times (s) and "
                           f"latencies (µs): lower is better; both on this machine's disk, "
                           f"all traffic on 127.0.0.1")
    data = F.add_results(rep, sec, per, targets, args.rounds)
    if any(t.error for t in targets):
        rc = 1
    rep.finish({"args": vars(args), "gluster_version": version, "results": data,
                "gluster_log": gv.log if gv else []},
               json_out=not args.no_json, charts=not args.no_charts)
    return rc


if __name__ == "__main__":
    sys.exit(main())
