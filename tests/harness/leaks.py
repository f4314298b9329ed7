"""What a test run leaves behind: FUSE mounts and processes it started.

A test that starts replfsd, a ``replfs`` mount process or a device-file
helper, or mounts something, must take it all down again, failing or
not; on CI leftovers would pile up on the machine and make later runs
flaky.  ``LeakWatch`` (driven by tests/conftest.py) finds them:

* a process is this run's if its environment carries the run's token
  (REPLFS_TEST_SESSION, set by conftest before any test starts anything,
  and inherited through mount(8), daemonizing and setsid) or its command
  line names one of the run's directories (the pytest basetemp, under
  which conftest also puts every tempfile.mkdtemp of the run);
* a mount is this run's if it is a FUSE mount whose mount point or source
  lies in one of those directories.

Only what appeared since a snapshot counts, so processes and mounts that
existed before the run (or belong to another run on the same machine)
are never reported or touched.
"""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from dataclasses import dataclass

TOKEN_VAR = "REPLFS_TEST_SESSION"


@dataclass(frozen=True)
class Proc:
    pid: int
    start: int            # start time in clock ticks: (pid, start) names one process
    cmdline: tuple[str, ...]

    @property
    def kind(self) -> str:
        text = " ".join(self.cmdline)
        if "replfs.daemon.main" in text or os.path.basename(self.cmdline[0] if self.cmdline else "") == "replfsd":
            return "replfsd"
        if "replfs.devexport" in text or "replfs.devfile" in text:
            return "device-file helper"
        if any(os.path.basename(a) in ("replfs", "mount.replfs") for a in self.cmdline[:2]) \
                or "replfs.fs.mount" in text:
            return "replfs mount process"
        if "replfs.cli.main" in text or any(os.path.basename(a) == "replfsadm" for a in self.cmdline[:2]):
            return "replfsadm"
        return "process"

    def describe(self) -> str:
        cmd = " ".join(" ".join(self.cmdline).split())     # python -c scripts span lines
        if len(cmd) > 300:
            cmd = cmd[:300] + " ..."
        return f"{self.kind} pid {self.pid}: {cmd}"


@dataclass(frozen=True)
class Mount:
    mount_id: int
    dev: str              # major:minor; for FUSE the minor is the connection number
    mountpoint: str
    fstype: str
    source: str

    def describe(self) -> str:
        return f"{self.fstype} mount at {self.mountpoint} (source {self.source})"


def _unescape(field: str) -> str:
    # mountinfo writes space, tab, newline and backslash as \ooo
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1:i + 4].isdigit() and len(field[i + 1:i + 4]) == 3:
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mounts() -> list[Mount]:
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            a, b = left.split(), right.split()
            if len(a) < 5 or len(b) < 2:
                continue
            found.append(Mount(int(a[0]), a[2], _unescape(a[4]), b[0], _unescape(b[1])))
    return found


def _read(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return None


class LeakWatch:
    def __init__(self, token: str, roots: list[str]):
        self.token = (TOKEN_VAR + "=" + token).encode()
        self.roots = sorted({os.path.abspath(r) for r in roots} | {os.path.realpath(r) for r in roots})
        self.me = os.getpid()
        # (pid, start) -> (command name, Proc if it is this run's, else None).
        # An exec keeps pid and start time but brings a new program and
        # environment, so a changed command name means a fresh look.
        self._seen: dict[tuple[int, int], tuple[bytes, Proc | None]] = {}

    # ------------------------------------------------------------ looking

    def _under_roots(self, path: str) -> bool:
        return any(path == r or path.startswith(r + "/") for r in self.roots)

    def processes(self) -> set[Proc]:
        """This run's live processes (zombies excluded: they hold nothing)."""
        ours = set()
        seen = {}
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            pid = int(name)
            if pid == self.me:
                continue
            stat = _read(f"/proc/{pid}/stat")
            if stat is None:
                continue
            # the command name may hold spaces and parentheses: split after the last ')'
            rest = stat[stat.rfind(b")") + 2:].split()
            if not rest or rest[0] == b"Z" or rest[0] == b"X":
                continue
            key = (pid, int(rest[19]))
            comm = stat[stat.find(b"(") + 1:stat.rfind(b")")]
            cached = self._seen.get(key)
            if cached is not None and cached[0] == comm:
                seen[key] = cached
                if cached[1] is not None:
                    ours.add(cached[1])
                continue
            raw = _read(f"/proc/{pid}/cmdline") or b""
            proc = None
            cmdline = tuple(a.decode(errors="replace") for a in raw.split(b"\0") if a)
            env = _read(f"/proc/{pid}/environ") or b""
            text = " ".join(cmdline)
            if self.token in env.split(b"\0") or any(r + "/" in text for r in self.roots):
                proc = Proc(pid, key[1], cmdline)
                ours.add(proc)
            seen[key] = (comm, proc)
        self._seen = seen
        return ours

    def fuse_mounts(self) -> set[Mount]:
        """This run's FUSE mounts."""
        return {m for m in mounts()
                if (m.fstype == "fuse" or m.fstype.startswith("fuse.") or m.fstype == "fuseblk")
                and (self._under_roots(m.mountpoint) or self._under_roots(m.source))}

    def snapshot(self) -> tuple[set[Proc], set[Mount]]:
        return self.processes(), self.fuse_mounts()

    def leaked_since(self, before: tuple[set[Proc], set[Mount]], grace: float = 15.0
                     ) -> tuple[list[Proc], list[Mount]]:
        """What appeared since ``before`` and is still there after waiting up
        to ``grace`` seconds (a mount process finishes its journal after
        umount(8) returns, a daemon after its stop request)."""
        deadline = time.monotonic() + grace
        pause = 0.02
        while True:
            procs = self.processes() - before[0]
            mnts = self.fuse_mounts() - before[1]
            if not procs and not mnts or time.monotonic() >= deadline:
                return sorted(procs, key=lambda p: p.pid), sorted(mnts, key=lambda m: m.mount_id)
            time.sleep(pause)
            pause = min(pause * 2, 0.5)

    # ------------------------------------------------------------ reaping

    def reap(self, procs: list[Proc], mnts: list[Mount]) -> list[str]:
        """Take leftovers down: abort the FUSE connections (a server stuck in
        a request to its own mount cannot be killed otherwise), SIGKILL the
        processes, detach the mounts.  Returns what could not be removed."""
        for m in mnts:
            minor = m.dev.partition(":")[2]
            with contextlib.suppress(OSError):
                with open(f"/sys/fs/fuse/connections/{minor}/abort", "w") as f:
                    f.write("1")
        for p in procs:
            stat = _read(f"/proc/{p.pid}/stat")
            if stat is None or int(stat[stat.rfind(b")") + 2:].split()[19]) != p.start:
                continue          # gone, or the pid now names another process
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(p.pid, signal.SIGKILL)
        for m in sorted(mnts, key=lambda m: -len(m.mountpoint)):
            for argv in (["umount", "-l", m.mountpoint], ["fusermount3", "-u", "-z", m.mountpoint]):
                if m.mount_id not in {x.mount_id for x in mounts()}:
                    break
                with contextlib.suppress(OSError, subprocess.TimeoutExpired):
                    subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                   timeout=30)
        deadline = time.monotonic() + 10
        while True:
            live = {(p.pid, p.start) for p in self.processes()}
            left = [p.describe() for p in procs if (p.pid, p.start) in live]
            ids = {x.mount_id for x in mounts()}
            left += [m.describe() for m in mnts if m.mount_id in ids]
            if not left or time.monotonic() >= deadline:
                return left
            time.sleep(0.1)
