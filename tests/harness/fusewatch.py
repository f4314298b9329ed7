"""Hang-proofing for tests that touch real FUSE mounts.

A FUSE server that misses a reply does not fail a test, it hangs it, and
the blocked callers cannot be killed until the connection is aborted.
``FuseWatch`` gives every such test a hard deadline: when it passes, a
watchdog thread aborts the watched connections through
/sys/fs/fuse/connections/N/abort (callers get ENOTCONN and the test fails
instead of hanging) and kills the watched processes.  Whatever happens,
closing the watch unmounts what is left (lazily if busy) and kills what
was started, so no mount or process outlives the test.

``MemfsServer`` runs ``tests.harness.memfs`` in a subprocess under a watch
and waits for its READY line (never a sleep).

    with FuseWatch(timeout=20) as watch:
        srv = MemfsServer(watch, [mnt_a, mnt_b], notify=True)
        ...
        stats = srv.stop()
"""
from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import threading
import time

from replfs.fuse import mount as fmount

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def fuse_unusable_reason() -> str | None:
    """Why real FUSE mounts cannot be tested here, or None."""
    if os.geteuid() != 0:
        return "FUSE mount tests need root (mount(2) without fusermount)"
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing (modprobe fuse)"
    try:
        os.close(os.open("/dev/fuse", os.O_RDWR))
    except OSError as exc:
        return f"/dev/fuse cannot be opened: {exc.strerror}"
    return None


class WatchdogFired(AssertionError):
    pass


class FuseWatch:
    def __init__(self, timeout: float = 20.0):
        self.timeout = timeout
        self.mounts: dict[str, int | None] = {}      # mountpoint -> connection id
        self.procs: list[subprocess.Popen] = []
        self.fired = False
        self._timer = threading.Timer(timeout, self._fire)
        self._timer.daemon = True
        self.log: list[str] = []

    def __enter__(self):
        self._timer.start()
        return self

    def __exit__(self, *exc):
        self.close()
        if self.fired and exc[0] is None:
            raise WatchdogFired(f"test exceeded its {self.timeout:.0f} s FUSE deadline; "
                                f"connections aborted: {self.log}")
        return False

    # ------------------------------------------------------------ watching

    def add_mount(self, mountpoint: str) -> None:
        """Watch a mount (call once it is mounted, to record its connection)."""
        mp = os.path.abspath(mountpoint)
        self.mounts[mp] = fmount.connection_id(mp)

    def add_proc(self, proc: subprocess.Popen) -> subprocess.Popen:
        self.procs.append(proc)
        return proc

    def _abort_all(self) -> None:
        for mp, conn in self.mounts.items():
            if conn is None:
                conn = fmount.connection_id(mp)
            if conn is not None:
                try:
                    if fmount.abort_connection(conn):
                        self.log.append(f"aborted {mp} (connection {conn})")
                except OSError as exc:
                    self.log.append(f"abort {mp}: {exc}")

    def _fire(self) -> None:
        self.fired = True
        self._abort_all()
        for p in self.procs:
            if p.poll() is None:
                p.kill()

    # ------------------------------------------------------------ cleanup

    def close(self) -> None:
        self._timer.cancel()
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        deadline = time.monotonic() + 5
        for p in self.procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                # Stuck (probably in a FUSE request): abort, then kill.
                self._abort_all()
                p.kill()
                p.wait(5)
        for mp in self.mounts:
            m = fmount.find_mount(mp)
            if m is None or not m.fstype.startswith("fuse"):
                continue
            self.log.append(f"left mounted: {mp}")
            fmount.abort_connection(m.connection)
            try:
                fmount.sys_umount2(mp, fmount.MNT_DETACH)
            except OSError as exc:
                self.log.append(f"detach {mp}: {exc}")

    def leftovers(self) -> list[str]:
        out = [f"process {p.pid} alive" for p in self.procs if p.poll() is None]
        out += [f"{mp} mounted" for mp in self.mounts
                if (m := fmount.find_mount(mp)) is not None and m.fstype.startswith("fuse")]
        return out


class MemfsServer:
    """``python -m tests.harness.memfs`` in a subprocess, under a FuseWatch."""

    def __init__(self, watch: FuseWatch, mountpoints, *, subtype: str = "replfs-test",
                 notify: bool = False, attr_timeout: float = 1.0, keep_cache: bool = False,
                 ready_timeout: float = 15.0):
        self.mountpoints = [os.path.abspath(m) for m in mountpoints]
        cmd = [sys.executable, "-m", "tests.harness.memfs", *self.mountpoints,
               "--subtype", subtype, "--attr-timeout", str(attr_timeout)]
        if notify:
            cmd.append("--notify")
        if keep_cache:
            cmd.append("--keep-cache")
        self.watch = watch
        self.proc = watch.add_proc(subprocess.Popen(
            cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "PYTHONPATH": REPO}))
        line = self._readline(ready_timeout)
        if not line.startswith("READY"):
            err = self._stderr_now()
            raise RuntimeError(f"memfs did not start: {line!r}\n{err}")
        for mp in self.mountpoints:
            watch.add_mount(mp)
        self.stats: dict | None = None
        self.stderr = ""

    def _readline(self, timeout: float) -> str:
        r, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not r:
            return ""
        return self.proc.stdout.readline()

    def _stderr_now(self) -> str:
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            return self.proc.communicate(timeout=5)[1]
        except subprocess.TimeoutExpired:
            return ""

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self, timeout: float = 10.0) -> dict:
        """SIGTERM: the server unmounts everything and reports its STATS."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            out, self.stderr = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, self.stderr = self.proc.communicate(timeout=5)
            raise AssertionError(f"memfs did not stop on SIGTERM\n{self.stderr}")
        for line in out.splitlines():
            if line.startswith("STATS "):
                self.stats = json.loads(line[6:])
        if self.stats is None:
            raise AssertionError(f"memfs exited {self.proc.returncode} without STATS\n"
                                 f"{self.stderr}")
        return self.stats

    def assert_clean(self) -> None:
        """After stop(): no protocol violation, no handler error."""
        assert self.stats is not None
        for mp, s in self.stats.items():
            assert s["violations"] == [], (mp, s["violations"])
            assert s["stats"].get("handler_errors", 0) == 0, (mp, self.stderr)
            assert s["stats"].get("protocol_errors", 0) == 0, (mp, self.stderr)
            assert s["stats"].get("malformed", 0) == 0, (mp, self.stderr)
        assert "Traceback" not in self.stderr, self.stderr
