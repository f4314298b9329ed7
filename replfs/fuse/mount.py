"""Mounting, unmounting and rescuing FUSE mounts as root, without fusermount.

* ``open_device`` + ``mount_fuse``: mount(2) through ctypes with fstype
  ``fuse.SUBTYPE`` and the kernel's fd=N,rootmode=...,user_id=...,
  group_id=... data, built from mount(8)-style option names.
* ``unmount``: umount2, and a lazy detach (MNT_DETACH) when the mount is
  busy, so a shutdown never leaves a mount behind.
* ``clean_stale_mounts``: at start, lazily unmount mounts of our fstype
  whose server died ("Transport endpoint is not connected").
* ``abort_connection``: the big hammer for a hung server, through
  /sys/fs/fuse/connections/N/abort (fusectl is mounted if needed): every
  waiting caller gets ENOTCONN instead of hanging.

Connection ids and mount state are read from /proc/self/mountinfo rather
than by stat()ing the mount point, because a stat on a hung FUSE mount
hangs too.
"""
from __future__ import annotations

import ctypes
import errno
import logging
import os
import stat
import threading
from dataclasses import dataclass

from .proto import FuseUsageError

log = logging.getLogger("replfs.fuse")

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_SYNCHRONOUS = 16
MS_DIRSYNC = 128
MS_NOATIME = 1024
MS_NODIRATIME = 2048
MS_RELATIME = 1 << 21
MS_STRICTATIME = 1 << 24
MS_LAZYTIME = 1 << 25
MNT_FORCE = 1
MNT_DETACH = 2

FUSECTL = "/sys/fs/fuse/connections"

# mount(8) option -> (flags to set, flags to clear)
_FLAG_OPTIONS = {
    "ro": (MS_RDONLY, 0), "rw": (0, MS_RDONLY),
    "nosuid": (MS_NOSUID, 0), "suid": (0, MS_NOSUID),
    "nodev": (MS_NODEV, 0), "dev": (0, MS_NODEV),
    "noexec": (MS_NOEXEC, 0), "exec": (0, MS_NOEXEC),
    "sync": (MS_SYNCHRONOUS, 0), "async": (0, MS_SYNCHRONOUS),
    "dirsync": (MS_DIRSYNC, 0),
    "noatime": (MS_NOATIME, 0), "atime": (0, MS_NOATIME),
    "nodiratime": (MS_NODIRATIME, 0), "diratime": (0, MS_NODIRATIME),
    "relatime": (MS_RELATIME, 0), "norelatime": (0, MS_RELATIME),
    "strictatime": (MS_STRICTATIME, 0), "lazytime": (MS_LAZYTIME, 0),
    "nolazytime": (0, MS_LAZYTIME),
}
# Options the fuse kernel module itself takes (passed in the data string).
_FUSE_FLAGS = {"default_permissions", "allow_other"}
_FUSE_VALUES = {"max_read", "blksize"}

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                        ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


def _check(rc: int, what: str, path: str) -> None:
    if rc != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}", path)


def sys_mount(source: str, target: str, fstype: str, flags: int, data: str | None) -> None:
    rc = _libc.mount(os.fsencode(source), os.fsencode(target), os.fsencode(fstype), flags,
                     os.fsencode(data) if data is not None else None)
    _check(rc, f"mount -t {fstype}", target)


def sys_umount2(target: str, flags: int = 0) -> None:
    _check(_libc.umount2(os.fsencode(target), flags), "umount", target)


def parse_options(options) -> tuple[int, list[str]]:
    """mount(8)-style options -> (MS_* flags, fuse data options).  Unknown
    options are refused (a typo must not silently mount differently)."""
    flags = 0
    data: list[str] = []
    for opt in options:
        opt = opt.strip()
        if not opt:
            continue
        name, _, value = opt.partition("=")
        if name in _FLAG_OPTIONS and not value:
            on, off = _FLAG_OPTIONS[name]
            flags = (flags | on) & ~off
        elif name in _FUSE_FLAGS and not value:
            data.append(name)
        elif name in _FUSE_VALUES and value.isdigit():
            data.append(f"{name}={int(value)}")
        else:
            raise FuseUsageError(f"unknown or malformed mount option {opt!r}")
    return flags, data


def open_device() -> int:
    try:
        return os.open("/dev/fuse", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise OSError(exc.errno, f"cannot open /dev/fuse: {exc.strerror} "
                                 "(is the fuse module loaded, are we root?)") from None


def mount_fuse(fd: int, mountpoint: str, *, subtype: str, fsname: str, options=(),
               rootmode: int = stat.S_IFDIR, uid: int = 0, gid: int = 0) -> None:
    """Mount the connection on ``fd`` at ``mountpoint`` (root only)."""
    if not subtype or any(c in subtype for c in ", \t\n/"):
        raise FuseUsageError(f"bad subtype {subtype!r}")
    flags, data = parse_options(options)
    opts = [f"fd={fd}", f"rootmode={rootmode:o}", f"user_id={uid}", f"group_id={gid}", *data]
    sys_mount(fsname, mountpoint, f"fuse.{subtype}", flags, ",".join(opts))


# --------------------------------------------------------------------- mountinfo

@dataclass(frozen=True)
class MountInfo:
    mount_id: int
    major: int
    minor: int
    mountpoint: str
    fstype: str
    source: str
    options: str

    @property
    def connection(self) -> int:
        """The fusectl connection number: the superblock's dev_t."""
        return (self.major << 20) | self.minor


def _unescape(s: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo
    out, i = [], 0
    while i < len(s):
        if s[i] == "\\" and len(s) >= i + 4 and s[i + 1:i + 4].isdigit():
            out.append(chr(int(s[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(s[i])
            i += 1
    return "".join(out)


def mounts() -> list[MountInfo]:
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.rstrip("\n").partition(" - ")
            fields = left.split(" ")
            rest = right.split(" ")
            major, minor = fields[2].split(":")
            out.append(MountInfo(int(fields[0]), int(major), int(minor), _unescape(fields[4]),
                                 rest[0], _unescape(rest[1]) if len(rest) > 1 else "",
                                 fields[5]))
    return out


def find_mount(mountpoint: str) -> MountInfo | None:
    """The topmost mount at ``mountpoint`` (no stat of the mount point)."""
    mp = os.path.abspath(mountpoint)
    found = [m for m in mounts() if m.mountpoint == mp]
    return found[-1] if found else None


def connection_id(mountpoint: str) -> int | None:
    m = find_mount(mountpoint)
    if m is None or not (m.fstype == "fuse" or m.fstype.startswith("fuse.")):
        return None
    return m.connection


def set_readahead(mountpoint: str, kib: int) -> None:
    """Set the read-ahead window of the FUSE mount at ``mountpoint`` (its
    backing device's read_ahead_kb in sysfs; root only).  The kernel takes
    the size its INIT offered (128 KiB) unless told otherwise; with a
    larger window it asks for up to max_write bytes per READ and keeps
    several READs in flight.  OSError when it cannot be set."""
    m = find_mount(mountpoint)
    if m is None or not (m.fstype == "fuse" or m.fstype.startswith("fuse.")):
        raise OSError(errno.ENOENT, f"no FUSE mount at {mountpoint}")
    with open(f"/sys/class/bdi/{m.major}:{m.minor}/read_ahead_kb", "w") as f:
        f.write(f"{int(kib)}\n")


# --------------------------------------------------------------------- unmount

def unmount(mountpoint: str, *, lazy_on_busy: bool = True) -> str:
    """umount2; EBUSY -> MNT_DETACH.  Returns "unmounted" or "detached".
    Runs requests through the mount: never call it from the thread that
    serves that mount."""
    try:
        sys_umount2(mountpoint, 0)
        return "unmounted"
    except OSError as exc:
        if exc.errno != errno.EBUSY or not lazy_on_busy:
            raise
    sys_umount2(mountpoint, MNT_DETACH)
    return "detached"


def ensure_fusectl() -> None:
    """Mount fusectl at /sys/fs/fuse/connections unless it is mounted."""
    if any(m.fstype == "fusectl" for m in mounts()):
        return
    sys_mount("fusectl", FUSECTL, "fusectl", 0, None)


def abort_connection(conn: int) -> bool:
    """Abort FUSE connection ``conn``: callers get ENOTCONN, the server's
    reads ENODEV.  False if the connection no longer exists."""
    ensure_fusectl()
    try:
        with open(os.path.join(FUSECTL, str(conn), "abort"), "w") as f:
            f.write("1")
        return True
    except FileNotFoundError:
        return False


def _probe(path: str, timeout: float) -> int | None:
    """errno of statvfs(path) (0 when it works), None if it did not return
    in time (a live but hung server: not ours to clean up here).  statvfs,
    not stat: the kernel answers stat of a dead mount's root from its
    attribute cache, but always asks the server for STATFS."""
    result: list[int] = []

    def run():
        try:
            os.statvfs(path)
            result.append(0)
        except OSError as exc:
            result.append(exc.errno or errno.EIO)

    t = threading.Thread(target=run, name="replfs-fuse-probe", daemon=True)
    t.start()
    t.join(timeout)
    return result[0] if result else None


def clean_stale_mounts(subtype: str, *, timeout: float = 2.0,
                       only: set[str] | None = None) -> list[str]:
    """Lazily unmount every ``fuse.SUBTYPE`` mount whose server is gone
    (statvfs gives ENOTCONN) -- with ``only``, just those of these mount
    points.  Returns the mount points cleaned."""
    cleaned = []
    for m in mounts():
        if m.fstype != f"fuse.{subtype}":
            continue
        if only is not None and m.mountpoint not in only:
            continue
        code = _probe(m.mountpoint, timeout)
        if code in (errno.ENOTCONN, errno.ECONNABORTED):
            try:
                sys_umount2(m.mountpoint, MNT_DETACH)
                log.warning("removed stale %s mount at %s (its server is gone)",
                            m.fstype, m.mountpoint)
                cleaned.append(m.mountpoint)
            except OSError as exc:
                log.warning("could not remove stale mount %s: %s", m.mountpoint, exc)
        elif code is None:
            log.warning("%s mount at %s does not answer; leaving it alone", m.fstype,
                        m.mountpoint)
    return cleaned
