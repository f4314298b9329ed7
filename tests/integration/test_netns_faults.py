"""Whole-cluster fault runs over real network partitions (Jepsen style).

Two nodes, each in a network namespace of its own (tests/harness/netns.py)
joined by a veth pair: alpha (cluster node 0) on 10.77.0.1 and beta (node
1) on 10.77.0.2, each with its own replfsd, cluster stack and shared
mount of one dual-primary protocol C volume.  The replication link and
o2net both run over the veth, so a fault there hits both, as a broken
network would.  The mounts are in the test's mount namespace (the
daemons enter only the network namespace), so the test drives both
mounts directly.

A seed picks a schedule of faults.  Each phase runs a workload on both
mounts (create+write+fsync, append+fsync, rename and unlink with the
directories fsync'd, reads of its own and the other node's files; every
call recorded with its start, end and result), then one fault:

* ``partition``: both directions dropped (nftables, in both namespaces)
* ``oneway-ab`` / ``oneway-ba``: only alpha->beta (beta->alpha) packets
* ``link-down``: the veth set down
* ``blip``: a symmetric partition shorter than every timeout
* ``kill-alpha`` / ``kill-beta``: kill -9 of the daemon (its mount dies)
* ``pause-alpha`` / ``pause-beta``: SIGSTOP past the dead time, SIGCONT
* ``eio-alpha`` / ``eio-beta``: the node's backing disk answers EIO to
  every read, write and flush (tests/harness/faultydisk.py: the disk is a
  single-file FUSE mount over the image; only in runs that have this
  fault)

What the cluster stack's rule says must happen (locking/heartbeat/core.py
quorum_decision; no disk heartbeat, so both nodes count as heartbeating):
a two-node cluster that loses its link keeps node 0 (alpha) and node 1
(beta) fences itself.  So a partition of any kind, or a pause of either
node, leaves alpha writing and beta fenced (its mount answers EIO until
it is unmounted); a killed beta leaves alpha; a killed alpha leaves
nobody (beta cannot tell a dead alpha from a partition: it fences
itself) until alpha is back.  A blip may fence beta, never alpha.  A
failing disk fences nobody (``on-io-error detach``, the default,
docs/architecture.md): its node detaches it, goes Diskless and goes on
through its peer's disk; the disk is attached again when it works.

After the fault the cluster is healed and brought back the way an admin
does (unmount the fenced mount, restart a killed daemon, wait for the
resync, primary, cluster offline/online, mount), and checked:

* the expected winner was not fenced and its mount took a new fsync'd
  file; the loser's mount refused writes and reads -- a directory
  listing, files by name, and a file it held open with its pages read
  before the fault: a fenced node answers EIO, never a possibly stale
  value;
* every call's result is explainable by the history: a read returns the
  state left by an operation that completed before it started or one
  running while it ran; both mounts show, for every file, the state its
  last acknowledged operation left (an acknowledged fsync is never lost),
  or -- for an operation that failed or was cut short -- the state
  before or after it (an append or a create may be cut short anywhere),
  and no file that no operation explains;
* no call took longer than the configured timeouts allow (HANG_BOUND;
  plus the pause for calls on a paused node);
* at the end, with both disks UpToDate and the mounts gone: the data
  areas of the two backing disks are identical, fsck.replfs -n is clean
  on both nodes, no concurrent writes were seen by the mirror, and no
  daemon logged a traceback.

The same runs with the nodes' wall clocks an hour apart (beta's daemon
under libfaketime): each file's times are its writer's and both mounts
show the same ones, and every check above still holds (timeouts run on
monotonic time).  The network-only heartbeat topology with a fence agent
is in test_netns_fence_agent.py.

A failure names its seed and prints the schedule, the history's tail and
the daemons' logs; ``-k 'seed-N'`` reruns one.  One short seed runs in
``make test``, and the first of the soak's and of the skewed-clock soak's
at their smallest; 120 (and 20 with skewed clocks) in ``make soak``.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import random
import signal
import threading
import time
import subprocess
import sys
from dataclasses import dataclass

import pytest

from tests import soak
from tests.harness import netns as netns_mod

from .test_fs_mount import fuse_usable, force_unmount, mounted, run
from .test_fs_shared import call, fsck_clean, mount, online, shared_pair, wait_closed

_why_not = None if not fuse_usable() else netns_mod.unusable_reason()
pytestmark = [
    pytest.mark.fuse,
    pytest.mark.skipif(not fuse_usable(), reason="needs /dev/fuse, root and mount.fuse3"),
    pytest.mark.skipif(_why_not is not None, reason=f"no network namespaces: {_why_not}"),
]

# The configured timeouts (test_fs_shared.TIMEOUTS and localpair.CONF):
# o2net idle 1.5 s, keepalive 0.3 s, the survivor's grace 0.3 + 1 s;
# replication ping-timeout 2 s, timeout 3 s, connect-int 1 s.  A call on
# a survivor waits at most for the loss to be noticed, the grace, the
# fence-peer decision and the slot's recovery: well under this.
HANG_BOUND = 15.0
DEAD_TIME = 1.5                      # o2net idle timeout
FAULTS = ("partition", "oneway-ab", "oneway-ba", "link-down", "blip",
          "kill-alpha", "kill-beta", "pause-alpha", "pause-beta",
          "eio-alpha", "eio-beta")
DIRS = ("a", "b", "s")               # alpha's, beta's, shared
# libfaketime (scripts/setup.sh installs it): the clock-skew runs
FAKETIME_LIB = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1"
SKEW = 3600                          # beta's wall clock an hour ahead


# -- history and model ---------------------------------------------------------

ABSENT = None


@dataclass(frozen=True)
class State:
    """Where a file is and what it holds; ``path`` None: it does not exist.
    ``low``: if set, the content may be any prefix of ``data`` that
    starts with ``low`` (an append or a create cut short)."""
    path: str | None
    data: bytes = b""
    low: bytes | None = None

    def matches(self, path: str | None, got: bytes | None) -> bool:
        """Whether ``got`` (None: ENOENT) read at ``path`` (None: the file
        is found nowhere) is this state."""
        if got is None:
            return self.path is None if path is None else self.path != path
        if self.path != path:
            return False
        if self.low is None:
            return got == self.data
        return got.startswith(self.low) and self.data.startswith(got)


@dataclass
class Op:
    node: str
    kind: str
    fid: str
    before: State
    after: State
    t0: float
    t1: float = 0.0
    ok: bool | None = None           # None: still running
    err: str = ""

    def outcomes(self) -> list[State]:
        """The states this operation may have left."""
        if self.ok:
            return [self.after]
        out = [self.before, self.after]
        if self.kind in ("create", "append") and self.after.path is not None:
            low = self.before.data if self.kind == "append" else b""
            out.append(State(self.after.path, self.after.data, low))
        return out

    def __str__(self) -> str:
        res = "running" if self.ok is None else ("ok" if self.ok else f"FAILED {self.err}")
        return (f"{self.t0:8.3f}-{self.t1:8.3f} {self.node} {self.kind} {self.fid} "
                f"{self.before.path}({len(self.before.data)}) -> "
                f"{self.after.path}({len(self.after.data)}): {res}")


class History:
    def __init__(self, seed: int):
        self.seed = seed
        self.t0 = time.monotonic()
        self.lock = threading.Lock()
        self.ops: dict[str, list[Op]] = {}          # per file id, in order
        self.all: list[Op] = []
        self.reads: list[str] = []
        self.violations: list[str] = []
        self.counter = {"alpha": 0, "beta": 0}
        # files whose last operation was acknowledged: fid -> state (their
        # owner may go on with them in a later phase)
        self.certain: dict[str, dict[str, State]] = {"alpha": {}, "beta": {}}
        self.slowest: tuple[float, str] = (0.0, "")

    def now(self) -> float:
        return time.monotonic() - self.t0

    def new_fid(self, node: str) -> str:
        with self.lock:
            self.counter[node] += 1
            return f"{node[0]}{self.counter[node]}"

    def begin(self, node, kind, fid, before, after) -> Op:
        op = Op(node, kind, fid, before, after, self.now())
        with self.lock:
            self.ops.setdefault(fid, []).append(op)
            self.all.append(op)
            self.certain[node].pop(fid, None)
        return op

    def end(self, op: Op, exc: BaseException | None) -> None:
        op.t1 = self.now()
        op.ok = exc is None
        if exc is not None:
            op.err = f"{type(exc).__name__}: {exc}"
        with self.lock:
            if op.ok and op.after.path is not None:
                self.certain[op.node][op.fid] = op.after
            took = op.t1 - op.t0
            if took > self.slowest[0]:
                self.slowest = (took, str(op))

    def violation(self, text: str) -> None:
        with self.lock:
            self.violations.append(f"{self.now():8.3f} {text}")

    # what may be seen ------------------------------------------------------

    def candidates(self, fid: str, start: float | None = None,
                   end: float | None = None) -> list[State]:
        """States of file ``fid`` a read running from ``start`` to ``end``
        may see (None: after everything, when nothing runs any more)."""
        with self.lock:
            ops = list(self.ops.get(fid, ()))
        base_i = -1
        for i, op in enumerate(ops):
            if op.ok and (start is None or op.t1 < start):
                base_i = i
        out = [ops[base_i].after if base_i >= 0 else State(ABSENT)]
        for op in ops[base_i + 1:]:
            if end is None or op.t0 < end:
                out.extend(op.outcomes())
        return out

    def check_read(self, fid: str, path: str, got: bytes | None, start: float,
                   end: float, where: str) -> None:
        cands = self.candidates(fid, start, end)
        if not any(c.matches(path, got) for c in cands):
            self.violation(f"{where}: read of {path} ({fid}) from {start:.3f} to {end:.3f} "
                           f"gave {'ENOENT' if got is None else f'{len(got)} bytes'}; "
                           f"explainable: {self._show(cands)}")

    def check_tree(self, tree: dict[str, bytes], where: str) -> None:
        """Everything at rest: ``tree`` (path -> content, lost+found
        excluded) is exactly what the history explains."""
        by_fid: dict[str, list[str]] = {}
        for path in tree:
            fid = fid_of(path)
            if fid is None or fid not in self.ops:
                self.violation(f"{where}: {path} ({len(tree[path])} bytes) was made by "
                               f"no operation")
                continue
            by_fid.setdefault(fid, []).append(path)
        for fid in list(self.ops):
            paths = by_fid.get(fid, [])
            cands = self.candidates(fid)
            if len(paths) > 1:
                self.violation(f"{where}: {fid} is at {paths} at once")
                continue
            path = paths[0] if paths else None
            got = tree[path] if path else None
            if not any(c.matches(path, got) for c in cands):
                ops = self.ops[fid]
                self.violation(
                    f"{where}: {fid} is {'absent' if path is None else path} "
                    f"({'-' if got is None else len(got)} bytes); explainable: "
                    f"{self._show(cands)}; its operations:\n      "
                    + "\n      ".join(map(str, ops)))

    @staticmethod
    def _show(cands) -> str:
        def one(c):
            if c.path is None:
                return "absent"
            return f"{c.path}({len(c.data)}{'' if c.low is None else f' from {len(c.low)}'})"
        return ", ".join(map(one, cands))

    def tail(self, n: int = 40) -> str:
        with self.lock:
            return "\n".join(map(str, self.all[-n:]))


def fid_of(path: str) -> str | None:
    """``a/a17.3`` -> ``a17`` (file a17, renamed three times)."""
    name = path.rsplit("/", 1)[-1]
    fid, dot, _ = name.partition(".")
    return fid if dot else None


HARNESS_FILES = ("probe-", "held-")     # the runner's own files, in no history


def snapshot(root) -> dict[str, bytes]:
    tree = {}
    for d in DIRS:
        for name in os.listdir(os.path.join(root, d)):
            if name.startswith(HARNESS_FILES):
                continue
            with open(os.path.join(root, d, name), "rb") as f:
                tree[f"{d}/{name}"] = f.read()
    return tree


def stale_view_report(c, log) -> None:
    """After a violation: the names one mount lists and the other does not,
    whether a lookup by name finds them there, and whether they appear once
    the other node changed each directory (its locks called back, the
    lister's cached blocks of it dropped): a stale cache, or stale disk
    blocks read into it?"""
    trees = {n: set(snapshot(c.mnt[n])) for n in ("alpha", "beta")}
    for me, other in (("alpha", "beta"), ("beta", "alpha")):
        missing = sorted(trees[other] - trees[me])
        if not missing:
            continue
        found = [p for p in missing if os.path.exists(os.path.join(c.mnt[me], p))]
        log(f"  {me} does not list {missing}; a lookup by name finds {found}")
        dlm_view_report(c, log, sorted({p.split("/")[0] for p in missing}))
        try:
            for d in DIRS:
                probe = os.path.join(c.mnt[other], d, "probe-bounce")
                with open(probe, "wb"):
                    pass
                os.unlink(probe)
        except OSError as e:
            log(f"  (bouncing the directory locks through {other} failed: {e})")
            continue
        again = set(snapshot(c.mnt[me]))
        log(f"  after {other} changed each directory, {me} lists "
            f"{sorted(p for p in missing if p in again)} of them")
        dlm_view_report(c, log, sorted({p.split("/")[0] for p in missing}))


def dlm_view_report(c, log, dirs) -> None:
    """Each node's DLM view of the inode locks of ``dirs``: the locks it
    owns and, as the master, the queues it keeps -- do the owners and
    the master agree on who holds what?"""
    try:
        inos = {d: os.stat(os.path.join(c.mnt["beta"], d)).st_ino for d in dirs}
    except OSError as e:
        log(f"  (no inode numbers: {e})")
        return
    names = {f"M{ino:x}": d for d, ino in inos.items()}
    for n in ("alpha", "beta"):
        try:
            r = call(c.node[n], "dlm-locks", mastered=True)
        except Exception as e:          # noqa: BLE001  (a dead daemon)
            log(f"  {n}'s DLM: {e!r}")
            continue
        for dom, locks in r["locks"].items():
            owned = [(names[lk["resource"]], lk["granted"], lk["requested"], lk["master"])
                     for lk in locks if lk["resource"] in names]
            m = r.get("mastered", {}).get(dom, {})
            queues = {names[k]: v for k, v in m.get("resources", {}).items() if k in names}
            log(f"  {n}'s DLM (epoch {m.get('epoch')}, members {m.get('members')}, "
                f"recovering {m.get('recovering')}): owns {owned}; masters {queues}")


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Worker:
    """One node's workload in one phase: its own files (created in its own
    directory or the shared one), reads of the other node's files."""

    def __init__(self, hist: History, node: str, root: str, seed: int):
        self.hist, self.node, self.root = hist, node, str(root)
        self.rng = random.Random(seed)
        self.stop = threading.Event()
        self.acked = 0
        self.failed = 0
        self.failing = 0                 # failures in a row
        self.thread = threading.Thread(target=self._run, name=f"worker-{node}", daemon=True)
        self.crash: BaseException | None = None

    def start(self) -> "Worker":
        self.thread.start()
        return self

    def _run(self) -> None:
        try:
            while not self.stop.is_set():
                self.step()
                if self.failing > 20:
                    time.sleep(0.05)          # a fenced mount: no need to spin
        except BaseException as e:            # noqa: BLE001  (reported by the test)
            self.crash = e

    def _p(self, rel: str) -> str:
        return os.path.join(self.root, rel)

    def _do(self, kind, fid, before, after, fn) -> bool:
        op = self.hist.begin(self.node, kind, fid, before, after)
        try:
            fn()
        except OSError as e:
            self.hist.end(op, e)
            self.failed += 1
            self.failing += 1
            return False
        self.hist.end(op, None)
        self.acked += 1
        self.failing = 0
        return True

    def step(self) -> None:
        rng, node, hist = self.rng, self.node, self.hist
        mine = dict(hist.certain[node])
        r = rng.random()
        if r < 0.35 or not mine:
            fid = hist.new_fid(node)
            path = f"{rng.choice([node[0], 's'])}/{fid}.0"
            data = rng.randbytes(rng.choice([0, 100, 4096, 9000, 30000]))

            def create():
                fd = os.open(self._p(path), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                try:
                    os.write(fd, data)
                    os.fsync(fd)
                finally:
                    os.close(fd)
                fsync_dir(self._p(path.split("/")[0]))
            self._do("create", fid, State(ABSENT), State(path, data), create)
            return
        fid = rng.choice(sorted(mine))
        st = mine[fid]
        if r < 0.55:
            extra = rng.randbytes(rng.choice([10, 4096, 12000]))

            def append():
                fd = os.open(self._p(st.path), os.O_WRONLY | os.O_APPEND)
                try:
                    os.write(fd, extra)
                    os.fsync(fd)
                finally:
                    os.close(fd)
            self._do("append", fid, st, State(st.path, st.data + extra), append)
        elif r < 0.68:
            gen = int(st.path.rsplit(".", 1)[1]) + 1
            to = f"{rng.choice([node[0], 's'])}/{fid}.{gen}"

            def rename():
                os.rename(self._p(st.path), self._p(to))
                for d in {st.path.split("/")[0], to.split("/")[0]}:
                    fsync_dir(self._p(d))
            self._do("rename", fid, st, State(to, st.data), rename)
        elif r < 0.76:
            def unlink():
                os.unlink(self._p(st.path))
                fsync_dir(self._p(st.path.split("/")[0]))
            self._do("unlink", fid, st, State(ABSENT), unlink)
        elif r < 0.88:
            # my own file: nobody else changes it, so exactly what I left
            t0 = hist.now()
            try:
                with open(self._p(st.path), "rb") as f:
                    got = f.read()
            except FileNotFoundError:
                got = None
            except OSError:
                return
            hist.check_read(fid, st.path, got, t0, hist.now(), f"{node} (own file)")
        else:
            # a file of the other node, found in the shared directory
            t0 = hist.now()
            try:
                # (not the harness's own probe files: no operation of the
                # history makes them)
                names = [n for n in os.listdir(self._p("s"))
                         if not n.startswith(node[0]) and not n.startswith(HARNESS_FILES)]
            except OSError:
                return
            if not names:
                return
            name = rng.choice(sorted(names))
            fid = fid_of(name)
            t0 = hist.now()
            try:
                with open(self._p(f"s/{name}"), "rb") as f:
                    got = f.read()
            except FileNotFoundError:
                got = None
            except OSError:
                return
            if fid is None:
                hist.violation(f"{node}: s/{name} listed, made by no operation")
                return
            hist.check_read(fid, f"s/{name}", got, t0, hist.now(), f"{node} (other's file)")


# -- the cluster ---------------------------------------------------------------

class Cluster:
    """The two namespaced nodes with their mounts, and what the runner
    does to them."""

    def __init__(self, ns, pair, ma, mb, cdir, disks):
        self.ns, self.pair, self.cdir = ns, pair, cdir
        self.mnt = {"alpha": str(ma), "beta": str(mb)}
        self.node = {"alpha": pair.alpha, "beta": pair.beta}
        self.paused: set[str] = set()
        self.disks: dict[str, subprocess.Popen] = disks    # faultydisk servers

    def disk_fails(self, name: str, failing: bool) -> None:
        self.disks[name].send_signal(signal.SIGUSR1 if failing else signal.SIGUSR2)
        self.ns.note(f"{name}'s disk {'fails' if failing else 'works again'}")

    def status(self, name: str) -> dict:
        try:
            return self.node[name].status()
        except Exception as e:          # noqa: BLE001  (a dead daemon)
            return {"error": repr(e)}

    def cluster_status(self, name: str) -> dict:
        try:
            return call(self.node[name], "cluster-status")
        except Exception as e:          # noqa: BLE001
            return {"error": repr(e)}

    def alive(self, name: str) -> bool:
        p = self.node[name].proc
        return p is not None and p.poll() is None

    def kill9(self, name: str) -> None:
        self.node[name].kill9()

    def pause(self, name: str) -> None:
        self.node[name].proc.send_signal(signal.SIGSTOP)
        self.paused.add(name)

    def resume(self, name: str) -> None:
        if name in self.paused and self.alive(name):
            self.node[name].proc.send_signal(signal.SIGCONT)
        self.paused.discard(name)

    def logs(self) -> str:
        return "\n".join(f"===== {n}'s replfsd log (tail) =====\n{self.node[n].log()[-6000:]}"
                         for n in self.node)

    def restore(self, restart_first: bool, log, timeout: float = 60.0) -> None:
        """Bring both nodes back to Primary with the cluster online and both
        mounted, as an admin would: restart a dead daemon (``up``) and
        unmount a fenced mount (either first), wait for the resync,
        primary, cluster offline/online, mount."""
        for name in self.node:
            self.resume(name)
        dead = [name for name in self.node if not self.alive(name)]
        fenced = [name for name in self.node
                  if name not in dead and self.cluster_status(name).get("fenced")]

        def restart():
            for name in dead:
                force_unmount(self.mnt[name])
                self.node[name].start()
                self.node[name].adm("up", "r0")

        def unmount_fenced():
            for name in fenced:
                if mounted(self.mnt[name]):
                    run("umount", self.mnt[name])
                self.node[name].wait(lambda s: s["role"] == "Secondary",
                                     what=f"{name} demoted itself")
        for step in ((restart, unmount_fenced) if restart_first else (unmount_fenced, restart)):
            step()
        for name, n in self.node.items():
            if self.status(name).get("dstate") == "Diskless":
                n.adm("attach", "r0")           # a failed disk that works again
        self.wait_uptodate(log, timeout)
        for n in self.node.values():
            if n.status()["role"] != "Primary":
                n.adm("primary", "r0")
        for name in fenced:
            call(self.node[name], "cluster-offline", cluster="tc")
        online(self.pair, self.cdir)
        for name, n in self.node.items():
            if not mounted(self.mnt[name]):
                mount(n, self.mnt[name])

    def wait_uptodate(self, log, timeout: float = 60.0) -> None:
        """Both Connected and UpToDate."""
        deadline = time.monotonic() + timeout
        while True:
            st = {name: self.status(name) for name in self.node}
            if all(s.get("cstate") == "Connected" and s.get("dstate") == "UpToDate"
                   and s.get("pdsk") == "UpToDate" for s in st.values()):
                return
            if time.monotonic() > deadline:
                raise RunFailed(f"the disks did not become UpToDate in {timeout:.0f} s: {st}")
            time.sleep(0.1)


def start_faulty_disk(node) -> subprocess.Popen:
    """Put ``node``'s backing disk behind tests/harness/faultydisk.py: the
    image moves to disk.img.raw, disk.img becomes its FUSE mount."""
    raw = node.disk + ".raw"
    os.rename(node.disk, raw)
    open(node.disk, "w").close()
    err = open(os.path.join(node.root, "faultydisk.log"), "ab")
    proc = subprocess.Popen([sys.executable, "-m", "tests.harness.faultydisk", raw, node.disk],
                            stdout=subprocess.PIPE, stderr=err, text=True)
    line = proc.stdout.readline()
    if not line.startswith("READY"):
        proc.kill()
        proc.wait(10)
        raise RuntimeError(f"faultydisk for {node.name} did not start: {line!r}")
    return proc


def stop_faulty_disk(proc, path: str) -> None:
    proc.send_signal(signal.SIGUSR2)
    proc.terminate()
    try:
        proc.wait(15)
    except Exception:               # noqa: BLE001
        proc.kill()
        proc.wait(10)
    force_unmount(path)


@contextlib.contextmanager
def netns_cluster(tmp_path, faulty: tuple[str, ...] = (), cluster_extra=None,
                  skew: int | None = None):
    """Two namespaces, the volume made, both nodes mounted; the nodes named
    in ``faulty`` on a disk that can fail; ``cluster_extra(ns)``: lines for
    cluster.conf's cluster stanza; ``skew``: beta's daemon runs with its
    wall clock that many seconds off (libfaketime; its monotonic clock
    keeps its rate).  Everything (mounts, daemons,
    disk servers, namespaces, veth) is removed on the way out, also when
    the test fails."""
    disks: dict = {}

    def before_up(pair):
        for name in faulty:
            disks[name] = start_faulty_disk(getattr(pair, name))
    with netns_mod.NetnsPair() as ns, contextlib.ExitStack() as stack:
        if skew is not None:
            ns.launchers = (ns.launchers[0], [*ns.launchers[1], "env",
                                              f"LD_PRELOAD={FAKETIME_LIB}",
                                              f"FAKETIME={skew:+d}"])

        @stack.callback
        def _stop_disks():
            for name, proc in disks.items():
                stop_faulty_disk(proc, os.path.join(str(tmp_path), name, "disk.img"))
        try:
            extra = cluster_extra(ns) if cluster_extra is not None else ""
            with shared_pair(tmp_path, netns=ns, before_up=before_up,
                             cluster_extra=extra) as (pair, ma, mb, cdir):
                c = Cluster(ns, pair, ma, mb, cdir, disks)
                try:
                    mount(pair.alpha, ma)
                    mount(pair.beta, mb)
                    for d in DIRS:
                        os.mkdir(os.path.join(ma, d))
                    yield c
                finally:
                    for name in ("alpha", "beta"):
                        c.resume(name)          # a stopped daemon ignores SIGTERM
        finally:
            ns.heal()


# -- one seeded run ------------------------------------------------------------

@dataclass
class Fault:
    kind: str
    lead: float                      # workload seconds before the fault
    length: float                    # how long the fault lasts

    def __str__(self) -> str:
        return f"{self.kind} after {self.lead:.2f} s for {self.length:.2f} s"


def schedule(seed: int, n_faults: int) -> list[Fault]:
    rng = random.Random(seed)
    out = []
    for _ in range(n_faults):
        kind = rng.choice(FAULTS)
        if kind == "blip":
            length = rng.uniform(0.2, 0.8)
        elif kind.startswith("kill"):
            length = rng.uniform(0.5, 2.0)     # until the restart
        else:
            length = rng.uniform(DEAD_TIME + 2.5, DEAD_TIME + 5.0)
        out.append(Fault(kind, rng.uniform(0.3, 1.5), length))
    return out


class RunFailed(AssertionError):
    pass


def wait_until(pred, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise RunFailed(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.1)


def _in_thread(fn, timeout: float, hung: str):
    """``fn()`` in a thread; a call that does not return within
    ``timeout`` is a hang (RunFailed saying ``hung``)."""
    result: list = []
    t = threading.Thread(target=lambda: result.append(fn()), daemon=True)
    t.start()
    t.join(timeout)
    if not result:
        raise RunFailed(f"{hung} hung for more than {timeout:.0f} s")
    return result[0]


def probe_write(root: str, name: str, timeout: float) -> tuple[bool, float, str]:
    """A create+write+fsync of ``root/name`` in a thread: (ok, seconds,
    error); a call that does not return within ``timeout`` is a hang."""
    def go():
        t0 = time.monotonic()
        try:
            fd = os.open(os.path.join(root, name), os.O_CREAT | os.O_WRONLY, 0o644)
            try:
                os.write(fd, b"probe")
                os.fsync(fd)
            finally:
                os.close(fd)
            return True, time.monotonic() - t0, ""
        except OSError as e:
            return False, time.monotonic() - t0, f"{errno.errorcode.get(e.errno)}"
    return _in_thread(go, timeout, f"a write to {root}/{name}")


def probe_read(root: str, timeout: float) -> tuple[bool, str]:
    """Read the shared directory and a few of its files, as a reader on
    that node would (its kernel may have them cached): (True, what was
    read) if anything was served, else (False, the error)."""
    def go():
        try:
            names = sorted(os.listdir(os.path.join(root, "s")))
        except OSError as e:
            return False, f"listdir: {errno.errorcode.get(e.errno)}"
        last = "listdir: served an empty directory"
        for name in names[:3]:
            try:
                with open(os.path.join(root, "s", name), "rb") as fh:
                    data = fh.read()
                return True, f"s/{name} ({len(data)} bytes)"
            except OSError as e:
                last = f"read s/{name}: {errno.errorcode.get(e.errno)}"
        return False, last
    return _in_thread(go, timeout, f"a read in {root}")


def run_fault(c: Cluster, f: Fault, log) -> dict:
    """Inject ``f`` and check, while it lasts, what the cluster stack's
    rule says: the loser fenced itself and refuses writes, the winner
    writes.  Returns the pause length (calls on a paused node may take
    that much longer)."""
    ns, k = c.ns, f.kind
    # A file each node holds open and has read (its pages in that node's
    # cache): once the node is fenced, reading it must fail too.
    held: dict[str, tuple[int, str]] = {}
    for who in ("alpha", "beta"):
        path = os.path.join(c.mnt[who], "s", f"held-{who}")
        try:
            with open(path, "wb") as fh:
                fh.write(b"cached " * 100)
            fd = os.open(path, os.O_RDONLY)
            os.pread(fd, 4096, 0)
            held[who] = (fd, path)
        except OSError:
            pass
    try:
        return _run_fault(c, f, log, held)
    finally:
        for fd, path in held.values():
            try:
                os.close(fd)
            except OSError:
                pass


def _run_fault(c: Cluster, f: Fault, log, held) -> dict:
    ns, k = c.ns, f.kind
    t_fault = time.monotonic()

    def fenced(who: str) -> None:
        cs = wait_until(lambda: c.cluster_status(who).get("fenced"), HANG_BOUND,
                        f"{who} to fence itself")
        log(f"  {who} fenced itself after {time.monotonic() - t_fault:.2f} s: {cs}")

    def writes(who: str) -> None:
        cs = c.cluster_status(who)
        if cs.get("fenced"):
            raise RunFailed(f"{who} (the expected survivor) fenced itself: {cs}")
        name = f"s/probe-{who}-{t_fault:.3f}.x"
        ok, took, err = probe_write(c.mnt[who], name, HANG_BOUND)
        if not ok:
            raise RunFailed(f"the survivor {who}'s mount refused a write: {err}")
        os.unlink(os.path.join(c.mnt[who], name))
        log(f"  {who} writes ({took:.2f} s for a probe write, "
            f"{time.monotonic() - t_fault:.2f} s after the fault)")

    def refuses(who: str) -> None:
        ok, took, err = probe_write(c.mnt[who], f"s/probe-{who}-{t_fault:.3f}.x", HANG_BOUND)
        if ok:
            raise RunFailed(f"{who} was fenced but its mount took a write")
        served, what = probe_read(c.mnt[who], HANG_BOUND)
        if not served and who in held:
            try:
                got = os.pread(held[who][0], 4096, 0)
                served, what = True, f"{len(got)} bytes through a file it held open"
            except OSError as e:
                what += f", held file: {errno.errorcode.get(e.errno)}"
        if served:
            raise RunFailed(f"{who} was fenced but its mount served a read: {what} (a read "
                            f"on a fenced node must be EIO, never a possibly stale value)")
        log(f"  {who}'s mount refuses writes ({err}) and reads ({what})")

    def rest() -> None:
        time.sleep(max(0.0, f.length - (time.monotonic() - t_fault)))

    if k in ("partition", "oneway-ab", "oneway-ba", "link-down"):
        if k == "link-down":
            ns.link(False)
        else:
            log("  " + ns.cut({"partition": "both", "oneway-ab": "a->b",
                               "oneway-ba": "b->a"}[k]))
        fenced("beta")
        writes("alpha")
        refuses("beta")
        rest()
        ns.heal()
    elif k == "blip":
        ns.cut("both")
        rest()
        ns.heal()
        time.sleep(DEAD_TIME + 2.0)          # whatever it decides, it has by now
        log(f"  after the blip beta's cluster status says fenced="
            f"{c.cluster_status('beta').get('fenced')}")
        writes("alpha")
    elif k == "kill-beta":
        c.kill9("beta")
        ns.note("kill -9 beta")
        writes("alpha")
    elif k == "kill-alpha":
        c.kill9("alpha")
        ns.note("kill -9 alpha")
        # beta cannot tell a dead alpha from a partition: it fences itself
        fenced("beta")
        refuses("beta")
    elif k == "pause-beta":
        c.pause("beta")
        ns.note("SIGSTOP beta")
        writes("alpha")                      # alpha declared it dead
        rest()
        c.resume("beta")
        ns.note("SIGCONT beta")
        fenced("beta")                       # it woke up cut off
        refuses("beta")
        return f.length
    elif k == "pause-alpha":
        c.pause("alpha")
        ns.note("SIGSTOP alpha")
        fenced("beta")                       # it cannot reach node 0
        refuses("beta")
        rest()
        c.resume("alpha")
        ns.note("SIGCONT alpha")
        writes("alpha")
        return f.length
    elif k.startswith("eio-"):
        who = k.split("-")[1]
        c.disk_fails(who, True)
        # its next disk I/O fails: it detaches and goes on Diskless
        st = wait_until(lambda: (s := c.status(who)).get("dstate") == "Diskless" and s,
                        HANG_BOUND, f"{who} to detach its failing disk")
        log(f"  {who} detached its disk: {st['dstate']}, role {st['role']}, "
            f"peer disk {st['pdsk']}")
        for n in ("alpha", "beta"):
            writes(n)
            cs = c.cluster_status(n)
            if cs.get("fenced"):
                raise RunFailed(f"{n} fenced itself over a failed disk: {cs}")
        rest()
        for n in ("alpha", "beta"):
            cs = c.cluster_status(n)
            if cs.get("fenced"):
                raise RunFailed(f"{n} fenced itself while {who}'s disk was failing: {cs}")
        c.disk_fails(who, False)
    else:
        raise ValueError(k)
    return 0.0


def check_skewed_times(c, log, skew: int) -> None:
    """With beta's wall clock ``skew`` seconds off: a file made on each node
    carries its writer's time (as OCFS2's do), and both mounts show the
    same times for it."""
    made = {}
    for n in ("alpha", "beta"):
        path = os.path.join(c.mnt[n], n[0], "clock")
        with open(path, "wb") as f:
            f.write(n.encode())
            f.flush()
            os.fsync(f.fileno())
        made[n] = time.time()
    for n, writer_offset in (("alpha", 0), ("beta", skew)):
        seen = {m: os.stat(os.path.join(c.mnt[m], n[0], "clock")).st_mtime_ns
                for m in ("alpha", "beta")}
        if len(set(seen.values())) != 1:
            raise RunFailed(f"{n}'s file has different mtimes on the two mounts: {seen}")
        off = seen["alpha"] / 1e9 - made[n]
        if abs(off - writer_offset) > 30:
            raise RunFailed(f"{n}'s file's mtime is {off:+.0f} s off the test's clock, "
                            f"its writer's clock is {writer_offset:+d} s off")
    for n in ("alpha", "beta"):
        os.unlink(os.path.join(c.mnt["alpha"], n[0], "clock"))   # (not in the history)
    log(f"  times: each file carries its writer's clock (beta {skew:+d} s), both mounts agree")


def run_seed(tmp_path, seed: int, n_faults: int, skew: int | None = None) -> None:
    faults = schedule(seed, n_faults)
    hist = History(seed)
    lines: list[str] = []

    def log(text: str) -> None:
        lines.append(f"{hist.now():8.3f} {text}")
        print(lines[-1], flush=True)

    log(f"seed {seed}: " + "; ".join(map(str, faults)))
    c = None
    try:
        faulty = tuple(sorted({f.kind.split("-")[1] for f in faults
                               if f.kind.startswith("eio-")}))
        with netns_cluster(tmp_path, faulty, skew=skew) as c:
            log(f"namespaces {c.ns.ns}, nft: {c.ns.nft}, failing disks: {faulty or 'none'}"
                + (f", beta's wall clock {skew:+d} s" if skew else ""))
            if skew:
                check_skewed_times(c, log, skew)
            for i, f in enumerate(faults):
                log(f"phase {i}: {f}")
                workers = [Worker(hist, n, c.mnt[n], seed * 100 + i * 2 + j).start()
                           for j, n in enumerate(("alpha", "beta"))]
                time.sleep(f.lead)
                paused = f.length if f.kind.startswith("pause") else 0.0
                try:
                    run_fault(c, f, log)
                    time.sleep(0.3)           # the survivor's workload after the fault
                finally:
                    for w in workers:
                        w.stop.set()
                    for w in workers:
                        w.thread.join(HANG_BOUND + paused)
                for w in workers:
                    if w.thread.is_alive():
                        raise RunFailed(f"{w.node}'s workload hangs in a call "
                                        f"(still running: {hist.tail(4)})")
                    if w.crash is not None:
                        raise RunFailed(f"{w.node}'s workload crashed: {w.crash!r}")
                log(f"  workload: alpha {workers[0].acked} acked / {workers[0].failed} "
                    f"failed, beta {workers[1].acked} / {workers[1].failed}")
                if f.kind.startswith("kill"):
                    time.sleep(f.length)
                first = random.Random(seed * 7 + i).random() < 0.5
                log(f"  restore: {'restart a dead daemon' if first else 'unmount a fenced mount'}"
                    f" first")
                c.restore(restart_first=first, log=log)
                log("  restored: both Primary, UpToDate, mounted")
                for n in ("alpha", "beta"):
                    hist.check_tree(snapshot(c.mnt[n]), f"{n} after phase {i}")
                if hist.violations:
                    # a mount's view, or the disks?  (both UpToDate here)
                    size = c.node["alpha"].status()["size"]
                    sums = {n: data_md5(c.node[n].disk, size) for n in c.node}
                    log(f"  backing disks' data areas: {sums} "
                        f"({'identical' if len(set(sums.values())) == 1 else 'DIFFERENT'})")
                    stale_view_report(c, log)
                    raise RunFailed("history violated")
            # the end: both unmounted, both disks identical, fsck clean
            for n in ("alpha", "beta"):
                run("umount", c.mnt[n])
            for n in c.node.values():
                wait_closed(n)
            c.wait_uptodate(log)
            size = c.node["alpha"].status()["size"]
            sums = {n: data_md5(c.node[n].disk, size) for n in c.node}
            if sums["alpha"] != sums["beta"]:
                raise RunFailed(f"the backing disks differ after healing: {sums}")
            for n in c.node.values():
                fsck_clean(n)
                st = n.status()
                if st["concurrent_writes"]:
                    raise RunFailed(f"{n.name}: the mirror saw {st['concurrent_writes']} "
                                    f"concurrent writes")
            for n in c.node.values():
                if "Traceback" in n.log():
                    raise RunFailed(f"{n.name}'s daemon logged a traceback")
            took, what = hist.slowest
            log(f"slowest call {took:.2f} s: {what}")
            limit = HANG_BOUND + max((f.length for f in faults if f.kind.startswith("pause")),
                                     default=0.0)
            if took > limit:
                raise RunFailed(f"a call took {took:.1f} s (bound {limit:.1f} s): {what}")
    except Exception as e:              # (not KeyboardInterrupt: ^C stops the run)
        detail = [f"seed {seed} failed: {e}", "schedule: " + "; ".join(map(str, faults)),
                  "run log:", *lines, "violations:", *hist.violations[:20],
                  "history (tail):", hist.tail()]
        if c is not None:
            detail += ["faults done:", *c.ns.events, c.logs()]
            keep = keep_logs(tmp_path, seed)
            if keep:
                detail.append(f"(the daemons' whole logs are in {keep})")
                with open(os.path.join(keep, "failure.txt"), "w") as f:
                    f.write("\n".join(detail) + "\n\nwhole history:\n"
                            + hist.tail(len(hist.all)) + "\n")
        raise RunFailed("\n".join(detail)) from e


def keep_logs(tmp_path, seed: int) -> str | None:
    """Copy the nodes' logs where the next pytest run does not remove them
    (pytest keeps only its last few temporary directories)."""
    import shutil
    import tempfile
    try:
        dest = tempfile.mkdtemp(prefix=f"netns-faults-seed{seed}-",
                                dir=os.environ.get("REPLFS_KEEP_LOGS", "/tmp"))
        for n in ("alpha", "beta"):
            for rel in ("replfsd.out", "run/replfsd.log", "run/mount-r0.log"):
                src = os.path.join(str(tmp_path), n, rel)
                if os.path.exists(src):
                    shutil.copy(src, os.path.join(dest, f"{n}-{rel.replace('/', '-')}"))
            for name in ("disk.img.raw", "disk.img"):     # (a failing disk's image is .raw)
                disk = os.path.join(str(tmp_path), n, name)
                if os.path.exists(disk):    # (32 MiB each: for fsck.replfs and a diff)
                    try:
                        shutil.copy(disk, os.path.join(dest, f"{n}-disk.img"))
                        break
                    except OSError:
                        continue
        return dest
    except OSError:
        return None


def data_md5(path: str, size: int) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        left = size
        while left:
            chunk = f.read(min(left, 1 << 20))
            if not chunk:
                break
            h.update(chunk)
            left -= len(chunk)
    return h.hexdigest()


# -- the tests -----------------------------------------------------------------

def test_namespaced_nodes_share_one_volume(tmp_path):
    """The set-up itself: both daemons in their namespaces, each mount in
    the test's mount namespace, a change through one seen through the
    other; nothing of it left afterwards."""
    with netns_cluster(tmp_path) as c:
        ns = c.ns
        assert c.cluster_status("alpha")["connected"] == [1]
        assert c.node["beta"].status()["cstate"] == "Connected"
        with open(os.path.join(c.mnt["alpha"], "s", "x.0"), "wb") as f:
            f.write(b"over the veth")
        with open(os.path.join(c.mnt["beta"], "s", "x.0"), "rb") as f:
            assert f.read() == b"over the veth"
        os.unlink(os.path.join(c.mnt["beta"], "s", "x.0"))
    assert not ns.exists()
    assert not mounted(c.mnt["alpha"]) and not mounted(c.mnt["beta"])


def test_killed_alpha_comes_back_while_beta_is_fenced(tmp_path):
    """alpha's daemon is killed -9 while both nodes mount the volume; beta
    fences itself (the quorum rule: it cannot reach node 0), its disk
    Outdated, its mount refusing writes.  alpha's daemon is restarted and
    brought up while beta's fenced mount is still there (beta still
    Primary).  The Outdated beta must not become the SyncSource (seed 7 of
    the fault runs found it did, and stayed Outdated -- not promotable --
    after the resync; fixed in da4aeac): once its mount is gone it
    resyncs from alpha, both disks end UpToDate, beta can be Primary again,
    and alpha's fsync'd file is there."""
    with netns_cluster(tmp_path) as c:
        a, b = c.node["alpha"], c.node["beta"]
        with open(os.path.join(c.mnt["alpha"], "a", "x.0"), "wb") as f:
            f.write(b"before")
            f.flush()           # out of Python's buffer: fsync(2) syncs what was written
            os.fsync(f.fileno())
        c.kill9("alpha")
        force_unmount(c.mnt["alpha"])
        wait_until(lambda: c.cluster_status("beta").get("fenced"), HANG_BOUND, "beta fenced")
        a.start()
        a.adm("up", "r0")
        a.wait(lambda s: s["cstate"] in ("Connected", "WFConnection", "WFReportParams"),
               what="alpha up")
        time.sleep(1.0)                 # a handshake with beta still Primary
        run("umount", c.mnt["beta"])
        b.wait(lambda s: s["role"] == "Secondary", what="beta demoted itself")
        c.wait_uptodate(print, timeout=30)
        assert "bitmap-sync-source" not in b.log(), "the Outdated beta was a SyncSource"
        b.adm("primary", "r0")
        a.adm("primary", "r0")
        call(b, "cluster-offline", cluster="tc")
        online(c.pair, c.cdir)
        mount(a, c.mnt["alpha"])
        mount(b, c.mnt["beta"])
        for n in ("alpha", "beta"):
            with open(os.path.join(c.mnt[n], "a", "x.0"), "rb") as f:
                assert f.read() == b"before", n


def test_failing_disk_is_detached(tmp_path):
    """Both nodes run the workload; one node's backing disk starts answering
    EIO (faultydisk).  With on-io-error detach (the default) that node
    detaches it and goes on Diskless through its peer's disk: nobody is
    fenced, both mounts keep writing.  Then the disk works again, is
    attached and resynced, with nobody fenced either.  Two rounds: beta's
    disk, then alpha's (the seeded runs have failing disks too)."""
    hist = History(0)
    lines: list[str] = []

    def log(text):
        lines.append(text)
    with netns_cluster(tmp_path, ("alpha", "beta")) as c:
        for round_ in range(2):
            who = ("beta", "alpha")[round_ % 2]
            workers = [Worker(hist, n, c.mnt[n], round_ * 2 + j).start()
                       for j, n in enumerate(("alpha", "beta"))]
            try:
                time.sleep(0.5)
                try:
                    run_fault(c, Fault(f"eio-{who}", 0.0, 2.0), log)
                except RunFailed as e:
                    raise AssertionError(f"round {round_}, {who}'s disk failing: {e}\n"
                                         + "\n".join(lines) + "\n" + c.logs()) from None
            finally:
                for w in workers:
                    w.stop.set()
                for w in workers:
                    w.thread.join(HANG_BOUND)
            assert not any(w.thread.is_alive() for w in workers), hist.tail(4)
            c.restore(restart_first=True, log=log, timeout=20)
            for n in ("alpha", "beta"):
                hist.check_tree(snapshot(c.mnt[n]), f"{n} after round {round_}")
            assert not hist.violations, hist.violations


@pytest.mark.parametrize("seed", [2])
def test_netns_faults(tmp_path, seed):
    run_seed(tmp_path, seed, 1)


@pytest.mark.soak(twin="test_netns_faults")
@pytest.mark.parametrize("seed", soak.seeds(range(1000, 1120)))
def test_netns_faults_soak(tmp_path, seed):
    run_seed(tmp_path, seed, soak.size(2, 1))


_no_faketime = None if os.path.exists(FAKETIME_LIB) else \
    f"no {FAKETIME_LIB} (apt install faketime; scripts/setup.sh does)"


@pytest.mark.soak
@pytest.mark.skipif(_no_faketime is not None, reason=str(_no_faketime))
@pytest.mark.parametrize("seed", soak.seeds(range(2000, 2020)))
def test_netns_faults_with_clock_skew_soak(tmp_path, seed):
    """The nodes' wall clocks disagree by an hour (beta ahead, or behind
    for odd seeds): times in the filesystem are the writer's, the same on
    both mounts, and the fault run's checks hold -- every timeout runs on
    monotonic time.  (make test runs its first seed, at one fault.)"""
    run_seed(tmp_path, seed, soak.size(2, 1), skew=-SKEW if seed % 2 else SKEW)
