"""Helpers for tests that run real node daemons and FUSE mounts as processes.

These are synchronous on purpose: the multi-node fixtures drive daemons
with subprocess, and the helpers must work from plain pytest tests as well
as from trio tests (through trio.to_thread).
"""
from __future__ import annotations

import contextlib
import errno
import os
import signal
import socket
import subprocess
import time


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that nobody listens on right now.

    Racy by nature (another process may take it before the caller binds),
    but on a test machine with per-test addresses that is rare enough.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def wait_for_port(host: str, port: int, timeout: float = 10.0, *,
                  proc: subprocess.Popen | None = None) -> None:
    """Return once ``host:port`` accepts TCP connections.

    Fails fast if ``proc`` (the process expected to listen) has exited.
    """
    deadline = time.monotonic() + timeout
    pause = 0.01
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process {proc.pid} exited with {proc.returncode} "
                               f"before listening on {host}:{port}")
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return
        except OSError:
            pass
        if time.monotonic() >= deadline:
            raise TimeoutError(f"nothing listens on {host}:{port} after {timeout}s")
        time.sleep(pause)
        pause = min(pause * 2, 0.2)


def kill9(proc: subprocess.Popen | int, timeout: float = 10.0) -> None:
    """SIGKILL a process (a Popen or a pid) and reap it if it is our child."""
    pid = proc if isinstance(proc, int) else proc.pid
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    if isinstance(proc, int):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                # Not our child: wait until the pid is gone.
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    return
                time.sleep(0.01)
                continue
            if done:
                return
            time.sleep(0.01)
        raise TimeoutError(f"pid {pid} survived SIGKILL for {timeout}s")
    proc.wait(timeout)


def _unescape_mountinfo(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo octal.
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 3 < len(field) and field[i + 1:i + 4].isdigit():
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mounts() -> list[dict[str, str]]:
    """The mount table of this process's namespace, from /proc/self/mountinfo."""
    entries = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            entries.append({
                "mount_id": fields[0],
                "root": _unescape_mountinfo(fields[3]),
                "mountpoint": _unescape_mountinfo(fields[4]),
                "options": fields[5],
                "fstype": fields[sep + 1],
                "source": _unescape_mountinfo(fields[sep + 2]),
                "super_options": fields[sep + 3] if len(fields) > sep + 3 else "",
            })
    return entries


def mount_entry(path: str) -> dict[str, str] | None:
    """The topmost mount at ``path`` (a directory or a file), or None."""
    target = os.path.realpath(path)
    found = None
    for entry in mounts():
        if entry["mountpoint"] == target:
            found = entry             # later lines are mounted on top
    return found


def mounted(path: str) -> bool:
    return mount_entry(path) is not None


def wait_mounted(path: str, timeout: float = 10.0, *, fstype_prefix: str = "fuse",
                 proc: subprocess.Popen | None = None) -> dict[str, str]:
    """Wait until a mount whose type starts with ``fstype_prefix`` is at ``path``.

    Fails fast if ``proc`` (the FUSE server) exits first.
    """
    deadline = time.monotonic() + timeout
    pause = 0.01
    while True:
        entry = mount_entry(path)
        if entry is not None and entry["fstype"].startswith(fstype_prefix):
            return entry
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process {proc.pid} exited with {proc.returncode} "
                               f"before {path} was mounted")
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{path} not mounted after {timeout}s")
        time.sleep(pause)
        pause = min(pause * 2, 0.1)


def wait_unmounted(path: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while mounted(path):
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{path} still mounted after {timeout}s")
        time.sleep(0.02)


def lazy_umount(path: str) -> bool:
    """Detach whatever is mounted at ``path`` (lazily); True if something was.

    Uses fusermount3 -u -z, which also works for an unprivileged owner of a
    FUSE mount, and falls back to umount -l.  Never raises for "not mounted".
    """
    if not mounted(path):
        return False
    for argv in (["fusermount3", "-u", "-z", path], ["umount", "-l", path]):
        try:
            subprocess.run(argv, check=False, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, timeout=30)
        except (OSError, subprocess.TimeoutExpired) as exc:
            if isinstance(exc, OSError) and exc.errno not in (errno.ENOENT, errno.EACCES):
                raise
            continue
        if not mounted(path):
            return True
    return not mounted(path)
