"""replfs: the FUSE mount program (``mount -t fuse.replfs SOURCE DIR``).

A resource is served by the node daemon (replfs/daemon/mounts.py uses
``serve`` below with its in-process device); this program asks it to
mount and reports.  An image is served by this program itself, as
follows.

mount(8) hands a ``fuse.replfs`` mount to mount.fuse3, which runs
``replfs SOURCE DIR -o OPTIONS`` (mount(8) has already dropped its own
options such as ``defaults``, ``_netdev``, ``nofail`` and ``x-*``, and
mount.fuse3 appends ``dev,suid`` unless told otherwise).  SOURCE is either
an image file made by mkfs.replfs (no replication) or the name of a
resource of replfs.conf, whose blocks then go through the local replfsd.

Everything that can be refused is checked before the program detaches
(the source, the superblock, the node's role, the mount point, the
options), so ``mount`` prints the reason and fails.  Then the program
forks: the child mounts the filesystem and reports "mounted" or the error
through a pipe; the parent waits for that report and exits with its
status.  ``-f`` keeps everything in the foreground.

Exit status (as mount(8) reads it): 0 mounted, 1 bad command line or
options, 32 mount failure.
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import logging
import os
import signal
import stat
import subprocess
import sys
import time
from dataclasses import dataclass, field

import trio

from replfs import fuse

from . import format as F
from .core import Filesystem, read_superblock
from .fuseops import ReplfsOperations, SharedReplfsOperations

PROG = "replfs"
EXIT_OK = 0
EXIT_USAGE = 1
EXIT_FAIL = 32

log = logging.getLogger("replfs.mount")

DEFAULT_LOG = "/var/log/replfs-mount.log"
LOCK_WAIT = 15.0       # seconds to wait for a previous mount of an image to finish

# Options that belong to mount(8) and mean nothing here; mount(8) normally
# drops them itself, but `replfs` may be run by hand with an fstab line's
# options.
_MOUNT8_ONLY = {"defaults", "auto", "noauto", "nofail", "user", "users", "nouser",
                "owner", "group", "_netdev", "netdev", "nousers", "loud", "silent"}
_MOUNT8_PREFIXES = ("x-", "comment=", "X-", "helper=")
# Generic mount flags passed to the kernel mount as they are (MS_* flags).
_KERNEL_FLAGS = {"suid": 0, "nosuid": 2, "dev": 0, "nodev": 4, "exec": 0, "noexec": 8,
                 "sync": 16, "async": 0, "dirsync": 128}
MS_RDONLY, MS_REMOUNT = 1, 32
MS_NOATIME, MS_NODIRATIME, MS_RELATIME, MS_STRICTATIME = 1024, 2048, 1 << 21, 1 << 24
# Access time options.  FUSE leaves atime to the filesystem: these set the
# filesystem's policy (core._atime_due), and the kernel mount carries the
# matching flag so that /proc/mounts shows it.
_ATIME = {"noatime": "noatime", "relatime": "relatime", "atime": "relatime",
          "strictatime": "strictatime", "norelatime": "strictatime"}
# Accepted, no effect needed: default_permissions is always on; lazytime is
# what replfs does anyway (times reach the disk with the next commit).
_IGNORED = {"lazytime", "nolazytime", "default_permissions"}
# Options that a remount may change; everything else must keep its value.
_REMOUNTABLE = {"readonly", "commit", "atime", "nodiratime", "atime_quantum", "kernel",
                "timeout", "readahead_kb"}
# The largest read-ahead window readahead= takes, in KiB.
READAHEAD_MAX_KIB = 65536


class MountError(Exception):
    def __init__(self, message: str, exit_code: int = EXIT_FAIL):
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code


@dataclass
class Options:
    readonly: bool = False
    allow_other: bool | None = None       # None: on when root
    fsname: str | None = None
    subtype: str = "replfs"
    slot: int | None = None
    commit: float = 5.0
    cache_mb: int | None = None
    conf: str | None = None
    node: str | None = None
    rundir: str | None = None
    logfile: str | None = None
    debug: bool = False
    timeout: float | None = None          # None: 0 for images, 120 s for resources
    kernel: list[str] = field(default_factory=list)
    atime: str = "relatime"
    nodiratime: bool = False
    atime_quantum: int = 60
    readahead_kb: int = 1024              # the kernel's read-ahead window
    remount: bool = False
    explicit: set = field(default_factory=set)   # fields the options named

    def kernel_flags(self) -> int:
        """The MS_* flags of these options, for mount(2) MS_REMOUNT.  The
        atime flags only when an atime option was given: without any, a
        remount keeps the mount's atime flags."""
        flags = MS_RDONLY if self.readonly else 0
        for k in self.kernel:
            flags |= _KERNEL_FLAGS[k]
        if self.explicit & {"atime", "nodiratime"}:
            flags |= {"noatime": MS_NOATIME, "relatime": MS_RELATIME,
                      "strictatime": MS_STRICTATIME}[self.atime]
            if self.nodiratime:
                flags |= MS_NODIRATIME
        return flags


def _number(key: str, value: str, kind=float, minimum=0):
    try:
        v = kind(value)
    except ValueError:
        raise MountError(f"bad value for mount option {key}: '{value}' is not a number",
                         EXIT_USAGE) from None
    if v < minimum:
        raise MountError(f"bad value for mount option {key}: must be at least {minimum}",
                         EXIT_USAGE)
    return v


def _readahead(key: str, value: str) -> int:
    v = _number(key, value, int)
    if v > READAHEAD_MAX_KIB:
        raise MountError(f"bad value for mount option {key}: at most {READAHEAD_MAX_KIB} (KiB)",
                         EXIT_USAGE)
    return v


# Options that take a value: key -> (Options field, converter or None).
_VALUED = {
    "fsname": ("fsname", None), "subtype": ("subtype", None), "conf": ("conf", None),
    "node": ("node", None), "rundir": ("rundir", None), "logfile": ("logfile", None),
    "slot": ("slot", lambda k, v: _number(k, v, int)),
    "commit": ("commit", lambda k, v: _number(k, v) or 5.0),
    "cache_size": ("cache_mb", lambda k, v: _number(k, v, int, 1)),
    "timeout": ("timeout", _number),
    "atime_quantum": ("atime_quantum", lambda k, v: _number(k, v, int)),
    "readahead": ("readahead_kb", _readahead),
    # The kernel's record of the FUSE connection; mount(8) hands them back
    # at a remount (from /proc/mounts).  Nothing to act on.
    "user_id": (None, None), "group_id": (None, None),
}


def parse_options(items: list[str]) -> Options:
    """Parse the -o option strings (each a comma-separated list)."""
    o = Options()
    for item in items:
        for opt in item.split(","):
            opt = opt.strip()
            if not opt or opt in _MOUNT8_ONLY or opt.startswith(_MOUNT8_PREFIXES):
                continue
            key, eq, value = opt.partition("=")
            if opt in ("ro", "rw"):
                o.readonly = opt == "ro"
                o.explicit.add("readonly")
            elif opt == "remount":
                o.remount = True
            elif opt == "allow_other":
                o.allow_other = True
            elif opt == "noallow_other":
                o.allow_other = False
            elif opt == "debug":
                o.debug = True
            elif opt in _KERNEL_FLAGS:
                o.kernel.append(opt)
                o.explicit.add("kernel")
            elif opt in _ATIME:
                o.atime = _ATIME[opt]
                o.explicit.add("atime")
            elif opt in ("nodiratime", "diratime"):
                o.nodiratime = opt == "nodiratime"
                o.explicit.add("nodiratime")
            elif opt in _IGNORED:
                pass
            elif key in _VALUED:
                if not eq:
                    raise MountError(f"mount option {key} needs a value ({key}=...)",
                                     EXIT_USAGE)
                attr, convert = _VALUED[key]
                if attr is None:
                    continue
                setattr(o, attr, convert(key, value) if convert else value)
                o.explicit.add(attr)
            else:
                raise MountError(f"unknown mount option '{opt}' (see mount.replfs(8))",
                                 EXIT_USAGE)
    return o


# ------------------------------------------------------------------ sources

@dataclass
class Source:
    name: str
    kind: str                      # "image" or "resource"
    path: str | None = None        # image file
    rundir: str | None = None      # resource: replfsd's run directory
    lock_fd: int | None = None     # image: flock held for the mount's lifetime
    slot: int = 0
    sb: F.Superblock | None = None


def _lock_image(path: str) -> int:
    """An exclusive flock on the image, so two mount processes never share
    it.  Waits a little for a mount that is still finishing its unmount
    (umount(8) returns before the mount process has written its journal)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    deadline = time.monotonic() + LOCK_WAIT
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() >= deadline:
                os.close(fd)
                raise MountError(f"{path}: the image is in use by another replfs mount "
                                 f"process") from None
            time.sleep(0.05)


def _resource_source(name: str, o: Options) -> Source:
    from replfs.errors import ReplfsError
    from replfs.ipc.client import rundir_from_env
    conf_path = o.conf or os.environ.get("REPLFS_CONF") or "/etc/replfs/replfs.conf"
    if os.path.exists(conf_path):
        from replfs.blockrepl import conf
        try:
            cfg = conf.load(conf_path)
        except ReplfsError as e:
            raise MountError(f"cannot read {conf_path}: {e.message}") from None
        if name not in cfg.resources:
            raise MountError(f"{name}: no such file, and no resource of that name in "
                             f"{conf_path}")
        node = o.node or os.environ.get("REPLFS_NODE") or os.uname().nodename
        if cfg.resources[name].host(node) is None:
            raise MountError(f"resource {name} in {conf_path} has no 'on {node}' section "
                             f"(node name '{node}'; use -o node=NAME or REPLFS_NODE)")
    elif o.conf:
        raise MountError(f"{o.conf}: configuration file not found")
    # Role, peer and the guard (one node at a time until the filesystem
    # has cluster locks) are replfsd's to check, atomically with opening
    # the resource: it serves the mount.
    rundir = rundir_from_env(o.rundir)
    return Source(name, "resource", rundir=rundir)


def resolve_source(name: str, o: Options) -> Source:
    if os.path.exists(name):
        st = os.stat(name)
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
            raise MountError(f"{name}: not an image file or block device")
        path = os.path.abspath(name)
        return Source(name, "image", path=path, lock_fd=_lock_image(path))
    if "/" in name:
        raise MountError(f"{name}: no such file or directory")
    return _resource_source(name, o)


async def open_device(nursery: trio.Nursery, src: Source):
    if src.kind == "image":
        from replfs.blockdev import FileBlockDevice
        try:
            return FileBlockDevice(src.path)
        except OSError as e:
            raise MountError(f"{src.path}: {e.strerror or e}") from None
    from replfs.errors import ReplfsError
    from replfs.ipc.client import DaemonBlockDevice
    try:
        return await DaemonBlockDevice.open(nursery, src.name, rundir=src.rundir,
                                            single_node=True)
    except ReplfsError as e:
        raise MountError(f"cannot mount resource {src.name}: {e.message}") from None
    except OSError as e:
        raise MountError(f"cannot open resource {src.name}: {e}") from None


async def _probe(src: Source, o: Options) -> None:
    """Check the superblock and choose the slot, before detaching."""
    async with trio.open_nursery() as nursery:
        dev = await open_device(nursery, src)
        try:
            try:
                src.sb = sb = await read_superblock(dev)
            except OSError as e:
                raise MountError(f"{src.name}: {e.strerror or e}; not a replfs volume "
                                 f"(make one with mkfs.replfs)") from None
            if o.slot is not None:
                if not 0 <= o.slot < sb.slot_count:
                    raise MountError(f"slot={o.slot} is out of range: the volume has "
                                     f"{sb.slot_count} slots (0-{sb.slot_count - 1})",
                                     EXIT_USAGE)
                src.slot = o.slot
            else:
                # No other node can have it mounted (the guard above and in
                # the daemon): stale "in use" records are left by crashed
                # mounts, and slot 0 is ours.
                src.slot = 0
        finally:
            with trio.CancelScope(shield=True):
                await dev.close()
            nursery.cancel_scope.cancel()


def check_mountpoint(path: str) -> str:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise MountError(f"mount point {path} does not exist") from None
    except OSError as e:
        if e.errno == errno.ENOTCONN:
            raise MountError(f"mount point {path}: a dead replfs mount is still there "
                             f"(its process was killed); detach it with 'umount -l {path}'"
                             ) from None
        raise MountError(f"mount point {path}: {e.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise MountError(f"mount point {path} is not a directory")
    return os.path.realpath(path)


# ------------------------------------------------------------------ serving

def fuse_options(src: Source, o: Options) -> list[str]:
    """mount(8)-style options for the kernel mount (replfs.fuse sets the
    MS_* flags and the fuse data options from them)."""
    opts = ["default_permissions", "ro" if o.readonly else "rw"]
    allow_other = o.allow_other if o.allow_other is not None else os.geteuid() == 0
    if allow_other:
        opts.append("allow_other")
    opts.extend(o.kernel)
    opts.append(o.atime)
    if o.nodiratime:
        opts.append("nodiratime")
    return opts


def apply_atime(fs: Filesystem, o: Options) -> None:
    fs.atime_policy = o.atime
    fs.nodiratime = o.nodiratime
    fs.atime_quantum_ns = o.atime_quantum * 1_000_000_000


# ------------------------------------------------------------------ remount
#
# A remount (``mount -o remount,ro MNT``) reaches this program through
# mount(8) and mount.fuse3 with every option of the mount (from
# /proc/mounts and fstab) plus "remount".  The program asks the process
# serving MNT, over a control socket named after the mount's device
# number, to apply the options the filesystem owns, and changes the
# kernel's flags with mount(2) MS_REMOUNT.  Read-only is entered kernel
# first (from then on nothing can be written; the kernel refuses with
# EBUSY while files are open for writing, as for ext4) and left
# filesystem first.

CONTROL_DIR = os.environ.get("REPLFS_MOUNT_CONTROL_DIR", "/run/replfs")


def mountinfo(path: str, resolve: bool = True) -> dict | None:
    """The /proc/self/mountinfo entry of mount point ``path`` (the last
    one, if mounts are stacked).  ``resolve=False`` touches nothing under
    the path: the serving process itself must not, before it serves."""
    if resolve:
        path = os.path.realpath(path)
    found = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields, rest = left.split(), right.split()
            mp = fields[4].replace("\\040", " ")
            if mp == path:
                found = {"dev": fields[2], "fstype": rest[0], "source": rest[1],
                         "options": fields[5]}
    return found


def control_path(dev: str) -> str:
    return os.path.join(CONTROL_DIR, "mount-%s.ctl" % dev.replace(":", "-"))


def _kernel_remount(mountpoint: str, flags: int) -> None:
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mount(None, mountpoint.encode(), None, MS_REMOUNT | flags, None) != 0:
        err = ctypes.get_errno()
        if err == errno.EBUSY:
            raise MountError(f"{mountpoint}: mount point busy (files are open for "
                             f"writing; close them before remounting read-only)")
        raise MountError(f"{mountpoint}: remount refused by the kernel: "
                         f"{os.strerror(err)}")


def _ask(path: str, request: dict, timeout: float = 90.0) -> dict:
    import json
    import socket
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sk:
        sk.settimeout(timeout)
        try:
            sk.connect(path)
            sk.sendall(json.dumps(request).encode() + b"\n")
            data = b""
            while not data.endswith(b"\n"):
                chunk = sk.recv(65536)
                if not chunk:
                    break
                data += chunk
        except OSError as e:
            raise MountError(f"cannot reach the replfs process serving this mount "
                             f"({path}): {e.strerror or e}") from None
    try:
        return json.loads(data)
    except ValueError:
        raise MountError("the replfs mount process gave no answer (see its log)") from None


def remount(mountpoint: str, items: list[str]) -> None:
    """The remount path of the mount program."""
    o = parse_options(items)
    ent = mountinfo(mountpoint)
    if ent is None or ent["fstype"] != "fuse.replfs":
        raise MountError(f"{mountpoint} is not a replfs mount point")
    ctl = control_path(ent["dev"])
    if o.readonly:
        reply = _ask(ctl, {"op": "check", "options": items})
        if reply.get("error"):
            raise MountError(reply["error"], reply.get("code", EXIT_FAIL))
        _kernel_remount(mountpoint, o.kernel_flags())
        reply = _ask(ctl, {"op": "remount", "options": items})
        if reply.get("error"):
            raise MountError(reply["error"], reply.get("code", EXIT_FAIL))
        return
    reply = _ask(ctl, {"op": "remount", "options": items})
    if reply.get("error"):
        raise MountError(reply["error"], reply.get("code", EXIT_FAIL))
    _kernel_remount(mountpoint, o.kernel_flags())


class MountControl:
    """The serving side of a mount's control socket."""

    def __init__(self, src: Source, o: Options, fs: Filesystem, ops: ReplfsOperations):
        self.src, self.o, self.fs, self.ops = src, o, fs, ops

    def _check(self, items: list[str]) -> Options:
        new = parse_options(items)
        for name in sorted(new.explicit - _REMOUNTABLE):
            if getattr(new, name) != getattr(self.o, name):
                now = getattr(self.o, name)
                raise MountError(f"mount option {name} cannot be changed by a remount "
                                 f"(it is {'not set' if now is None else repr(now)}; "
                                 f"unmount and mount again)", EXIT_USAGE)
        if new.readonly is False and self.fs.failed is not None:
            raise MountError(f"the filesystem failed ({self.fs.failed}); it stays "
                             f"read-only until it is unmounted and mounted again")
        return new

    async def handle(self, request: dict) -> dict:
        try:
            new = self._check(request.get("options", []))
            if request.get("op") == "remount":
                await self.apply(new)
            return {"ok": True}
        except MountError as e:
            return {"error": e.message, "code": e.exit_code}
        except OSError as e:
            log.error("remount failed: %s", e)
            return {"error": f"remount failed: {e.strerror or e}", "code": EXIT_FAIL}

    async def apply(self, new: Options) -> None:
        changes = []
        if "readonly" in new.explicit and new.readonly != self.fs.readonly:
            if new.readonly:
                self.ops.readonly = True
                await self.fs.remount(True)
            else:
                await self.fs.remount(False)
                self.ops.readonly = False
            changes.append("read-only" if new.readonly else "read-write")
        for name in ("commit", "atime", "nodiratime", "atime_quantum", "timeout", "kernel"):
            if name in new.explicit and getattr(new, name) != getattr(self.o, name):
                setattr(self.o, name, getattr(new, name))
                changes.append(f"{name}={getattr(new, name)}")
        if "readahead_kb" in new.explicit and new.readahead_kb != self.o.readahead_kb:
            session = getattr(self.ops, "session", None)
            if session is None or not session.set_readahead(new.readahead_kb):
                raise MountError(f"cannot set the read-ahead window to {new.readahead_kb} KiB "
                                 f"(see replfsd's or the mount's log)")
            self.o.readahead_kb = new.readahead_kb
            changes.append(f"readahead={new.readahead_kb}")
        self.o.readonly = self.fs.readonly
        apply_atime(self.fs, self.o)
        if self.o.timeout is not None:
            self.ops.op_timeout = self.o.timeout or None
        log.info("remounted (%s)%s", ", ".join(changes) or "no change",
                 "; slot %d given back, journal clean" % self.src.slot
                 if self.fs.readonly and "read-only" in changes else "")

    async def serve(self, path: str, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        import json
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
        await sock.bind(path)
        os.chmod(path, 0o600)
        sock.listen(4)
        task_status.started()
        try:
            while True:
                conn, _ = await sock.accept()
                with conn:
                    data = b""
                    with trio.move_on_after(10):
                        while not data.endswith(b"\n"):
                            chunk = await conn.recv(65536)
                            if not chunk:
                                break
                            data += chunk
                    try:
                        request = json.loads(data)
                    except ValueError:
                        continue
                    reply = await self.handle(request)
                    with contextlib.suppress(OSError):
                        await conn.send(json.dumps(reply).encode() + b"\n")
        finally:
            sock.close()
            with contextlib.suppress(OSError):
                os.unlink(path)


def _setup_logging(src: Source, o: Options, foreground: bool) -> str | None:
    root = logging.getLogger("replfs")
    root.setLevel(logging.DEBUG if o.debug else logging.INFO)
    fmt = logging.Formatter(f"%(asctime)s replfs[%(process)d] {src.name}: "
                            f"%(levelname)s %(name)s: %(message)s")
    path = o.logfile
    if path is None:
        path = (os.path.join(src.rundir, f"mount-{src.name}.log") if src.kind == "resource"
                else DEFAULT_LOG)
    try:
        handler = logging.FileHandler(path)
    except OSError:
        path = None
    else:
        handler.setFormatter(fmt)
        root.addHandler(handler)
    if foreground:
        sh = logging.StreamHandler(sys.stderr)
        sh.setFormatter(fmt)
        root.addHandler(sh)
    return path


async def _committer(fs: Filesystem, o: Options) -> None:
    """Commit every ``o.commit`` seconds (a remount may change it).  A
    failed commit latches the filesystem read-only on its own; the loop
    must never take the mount down."""
    while True:
        await trio.sleep(o.commit)
        if fs.failed is None and fs.mounted and not fs.readonly:
            try:
                await fs.sync()
            except Exception as e:      # noqa: BLE001
                log.error("background commit failed: %s", e)


async def _watch_signals(session) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as sigs:
        async for signum in sigs:
            log.info("signal %s: unmounting", signal.Signals(signum).name)
            try:
                await session.unmount()
            except OSError as e:
                log.warning("unmount after signal: %s; closing the connection", e)
                session.stop()
            return


async def _watch_daemon(dev, ops: ReplfsOperations) -> None:
    client = getattr(dev, "_c", None)           # DaemonBlockDevice's AsyncClient
    closed = getattr(client, "closed_event", None)
    if closed is None:
        return
    await closed.wait()
    ops.device_lost("the connection to replfsd was lost")


async def serve(src: Source, mountpoint: str, o: Options, ready, *, dev=None,
                lock_service=None, signals: bool = True, session_hook=None,
                cluster=None) -> None:
    """Mount and serve until unmounted (or signalled, with ``signals``).
    ``ready(None)`` is called once the mount is live.  ``dev``: an open
    block device to use (replfsd passes its in-process one; it is closed
    here at the end either way).  ``lock_service``: shared by every mount
    the process serves, so their POSIX/flock locks conflict.

    ``cluster``: a shared mount (both nodes): an object with ``locks``
    (a ClusterLockManager), ``node`` (this node's cluster number) and
    ``mounted(fs, ops, session)``, called once the filesystem is mounted
    and again with the session (replfsd ties the cluster events to
    them).  The slot is chosen under the super lock unless ``-o slot``
    named one."""
    async with trio.open_nursery() as outer:
        if dev is None:
            dev = await open_device(outer, src)
        fs = None
        try:
            try:
                if cluster is not None:
                    fs = await Filesystem.mount(dev, src.slot, locks=cluster.locks,
                                                node=cluster.node, recover_dirty_slots=False,
                                                readonly=o.readonly)
                    src.slot = fs.slot
                else:
                    fs = await Filesystem.mount(dev, src.slot, readonly=o.readonly)
            except OSError as e:
                raise MountError(f"{src.name}: cannot mount: {e.strerror or e}") from None
            if fs.recovered_slots:
                log.info("replayed the journals of slots %s", fs.recovered_slots)
            if o.cache_mb:
                fs.cache.limit = max(256, o.cache_mb * (1 << 20) // fs.bs)
            apply_atime(fs, o)
            timeout = o.timeout if o.timeout is not None else (
                120.0 if src.kind == "resource" else 0)
            ops_class = ReplfsOperations if cluster is None else SharedReplfsOperations
            ops = ops_class(fs, readonly=o.readonly, op_timeout=timeout or None,
                            lock_service=lock_service, shared=cluster is not None)
            session = fuse.Session(ops, mountpoint, subtype="replfs",
                                   fsname=o.fsname or src.name, options=fuse_options(src, o),
                                   readahead_kb=o.readahead_kb)
            ops.session = session
            if session_hook is not None:
                session_hook(session)
            if cluster is not None:
                cluster.mounted(fs, ops, session)
            async with trio.open_nursery() as inner:
                try:
                    await inner.start(session.run)
                except (OSError, fuse.FuseUsageError, fuse.UnsupportedKernel) as e:
                    raise MountError(f"cannot mount on {mountpoint}: {e}") from None
                log.info("mounted %s on %s (slot %d%s)", src.name, mountpoint, src.slot,
                         ", read-only" if o.readonly else "")
                ent = mountinfo(mountpoint, resolve=False)
                if ent is not None:
                    control = MountControl(src, o, fs, ops)
                    try:
                        await inner.start(control.serve, control_path(ent["dev"]))
                    except OSError as e:
                        log.warning("no control socket (remount will not work): %s", e)
                ready(None)
                inner.start_soon(_committer, fs, o)
                if signals:
                    inner.start_soon(_watch_signals, session)
                inner.start_soon(_watch_daemon, dev, ops)
                # umount(8) ends the session (the kernel closes the
                # connection); a signal unmounts it here.
                await session.wait_ended()
                inner.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                # (a session that ends any other way detaches its mount)
                if fs is not None:
                    try:
                        with trio.move_on_after(60):
                            await fs.unmount()
                        if fs.mounted:
                            log.error("unmount did not finish in 60 s; the journal of "
                                      "slot %d stays dirty and is replayed at the next "
                                      "mount", src.slot)
                        elif fs.failed:
                            log.error("the filesystem had failed (%s); the journal is "
                                      "replayed at the next mount", fs.failed)
                        else:
                            log.info("unmounted cleanly")
                    except Exception as e:
                        log.error("unmount failed: %s; the journal is replayed at the "
                                  "next mount", e)
                with trio.move_on_after(10):
                    with contextlib.suppress(Exception):
                        await dev.close()
            outer.cancel_scope.cancel()


# ------------------------------------------------------------------ by replfsd

def _mount_by_daemon(src: Source, mountpoint: str, items: list[str]) -> None:
    from replfs.errors import ReplfsError
    from replfs.ipc.client import SyncClient, socket_path
    try:
        with SyncClient(socket_path(src.rundir), timeout=300) as c:
            c.call("mount", res=src.name, mountpoint=mountpoint, options=items)
    except ReplfsError as e:
        raise MountError(e.message, EXIT_USAGE if e.exit_code == EXIT_USAGE else EXIT_FAIL
                         ) from None
    except OSError as e:
        raise MountError(f"cannot mount resource {src.name}: replfsd in {src.rundir}: "
                         f"{e.strerror or e}") from None


def _stay_in_foreground(mountpoint: str) -> int:
    """``-f`` for a mount replfsd serves: wait until it is unmounted; a
    signal unmounts it."""
    stop = []
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda *_: stop.append(1))
    while mountinfo(mountpoint) is not None:
        if stop:
            subprocess.run(["umount", mountpoint], capture_output=True)
            stop.clear()
        time.sleep(0.2)
    return EXIT_OK


# ------------------------------------------------------------------ process

USAGE = f"""\
usage: {PROG} SOURCE MOUNTPOINT [-o OPTIONS] [-f] [-d] [--help] [--version]

Mount a replfs volume with FUSE (what 'mount -t fuse.replfs' runs).

SOURCE      an image file made by mkfs.replfs (served by this program),
            or a resource name of replfs.conf (served by the local
            replfsd, which this program asks; this node must be Primary)

  -o OPTS   comma-separated mount options:
              ro, rw                  read-only / read-write (default rw)
              slot=N                  node slot (default 0 when no other
                                      node can have the volume mounted,
                                      else the first free slot)
              commit=SECONDS          journal commit interval (default 5)
              cache_size=MB           metadata cache limit
              readahead=KIB           the kernel's read-ahead window
                                      (default 1024; 0 = none)
              timeout=SECONDS         answer EIO when an operation waits
                                      longer (0 = never; default 120 for
                                      resources, 0 for images)
              conf=FILE, node=NAME, rundir=DIR
                                      resource lookup ($REPLFS_CONF,
                                      $REPLFS_NODE, $REPLFS_RUNDIR)
              fsname=NAME, subtype=NAME, allow_other, default_permissions,
              noatime, relatime, nodev, nosuid, noexec, ...
              logfile=FILE, debug
            mount(8) options (defaults, _netdev, nofail, auto, noauto,
            user, users, x-*) are ignored.
  -f        stay in the foreground until unmounted (an image mount
            logs to stderr as well; a signal unmounts)
  -d        debug logging; implies -f
  -h, --help     show this help
  -V, --version  show the version

Exit status: 0 mounted, 1 bad command line or options, 32 mount failure.
See mount.replfs(8)."""


class _ArgParser(argparse.ArgumentParser):
    def error(self, message):
        raise MountError(f"{message}\n{USAGE}", EXIT_USAGE)


def _version() -> str:
    try:
        from importlib.metadata import version
        return version("replfs")
    except Exception:
        return "0.1.0"


def _parse_argv(argv):
    p = _ArgParser(prog=PROG, add_help=False)
    p.add_argument("source", nargs="?")
    p.add_argument("mountpoint", nargs="?")
    p.add_argument("-o", dest="options", action="append", default=[])
    p.add_argument("-f", dest="foreground", action="store_true")
    p.add_argument("-d", dest="debug", action="store_true")
    p.add_argument("-s", dest="single", action="store_true")   # fuse convention; ignored
    p.add_argument("-h", "--help", action="store_true")
    p.add_argument("-V", "--version", action="store_true")
    args, rest = p.parse_known_args(argv)
    if rest:
        raise MountError(f"unexpected arguments: {' '.join(rest)}\n{USAGE}", EXIT_USAGE)
    return args


def _daemonize(work) -> int:
    """Fork; the child runs ``work(report)`` detached, the parent returns
    the status the child reports through a pipe."""
    rfd, wfd = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        os.close(wfd)
        chunks = []
        while chunk := os.read(rfd, 65536):
            chunks.append(chunk)
        os.close(rfd)
        msg = b"".join(chunks).decode(errors="replace")
        if msg.startswith("OK"):
            return EXIT_OK
        if msg.startswith("ERR "):
            code, _, text = msg[4:].partition(" ")
            print(f"{PROG}: {text}", file=sys.stderr)
            return int(code)
        # The child died without a word.
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
        print(f"{PROG}: the mount process exited before the mount was ready "
              f"(see its log)", file=sys.stderr)
        return EXIT_FAIL
    # Child.
    os.close(rfd)
    os.setsid()
    os.chdir("/")
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)
    reported = False

    def report(message: str | None, code: int = EXIT_FAIL) -> None:
        nonlocal reported
        if reported:
            return
        reported = True
        data = b"OK\n" if message is None else f"ERR {code} {message}".encode()
        with contextlib.suppress(OSError):
            os.write(wfd, data)
            os.close(wfd)

    status = work(report)
    report("the mount process ended before the mount was ready", status or EXIT_FAIL)
    os._exit(status)


def _trio_run(func, *args):
    """trio.run, with a lone exception out of a nursery's group unwrapped
    (a MountError keeps its message and exit code)."""
    try:
        return trio.run(func, *args)
    except BaseExceptionGroup as group:
        leaves = []

        def walk(g):
            for e in g.exceptions:
                walk(e) if isinstance(e, BaseExceptionGroup) else leaves.append(e)
        walk(group)
        for e in leaves:
            if isinstance(e, MountError):
                raise e from None
        if len(leaves) == 1:
            raise leaves[0] from None
        raise


def _run(src: Source, mountpoint: str, o: Options, report) -> int:
    def ready(message):
        report(message)
    try:
        _trio_run(serve, src, mountpoint, o, ready)
        return EXIT_OK
    except MountError as e:
        log.error("%s", e.message)
        report(e.message, e.exit_code)
        return e.exit_code
    except BaseException as e:          # noqa: BLE001  (a crash must still report)
        log.exception("mount process failed")
        report(f"internal error: {type(e).__name__}: {e}")
        return EXIT_FAIL


def main(argv=None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    try:
        args = _parse_argv(argv)
        if args.help:
            print(USAGE)
            return EXIT_OK
        if args.version:
            print(f"{PROG} {_version()}")
            return EXIT_OK
        if not args.source or not args.mountpoint:
            raise MountError(f"SOURCE and MOUNTPOINT are required\n{USAGE}", EXIT_USAGE)
        o = parse_options(args.options)
        if o.remount:
            remount(args.mountpoint, args.options)
            return EXIT_OK
        if o.subtype != "replfs":
            print(f"{PROG}: warning: subtype={o.subtype} is not used: a replfs mount is "
                  f"always of type fuse.replfs", file=sys.stderr)
        if args.debug:
            o.debug = True
            args.foreground = True
        mountpoint = check_mountpoint(args.mountpoint)
        src = resolve_source(args.source, o)
        if src.kind == "resource":
            # replfsd serves the mount itself (its block I/O is a call into
            # the resource's engine); this program asks it and reports.
            _mount_by_daemon(src, mountpoint, args.options)
            if args.foreground:
                return _stay_in_foreground(mountpoint)
            return EXIT_OK
        _trio_run(_probe, src, o)
    except MountError as e:
        print(f"{PROG}: {e.message}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 130

    if args.foreground:
        logpath = _setup_logging(src, o, foreground=True)
        log.debug("logging to %s", logpath)

        def report(message, code=EXIT_FAIL):
            pass            # errors reach stderr through the log handler
        return _run(src, mountpoint, o, report)

    def work(report):
        _setup_logging(src, o, foreground=False)
        return _run(src, mountpoint, o, report)
    return _daemonize(work)


if __name__ == "__main__":
    sys.exit(main())
