"""replfsd serves the replfs filesystems mounted on its resources.

``mount -t fuse.replfs r0 /mnt`` runs the ``replfs`` program, which asks
the node daemon (request ``mount``) to mount resource r0 on /mnt.  The
daemon opens the resource in process (a block request of the mount is a
call into the resource's engine, not a round trip over a socket), mounts
the filesystem with replfs.fuse, and answers once the mount is live, or
with the refusal.  Every mount of the node lives in this one process, as
OCFS2's live in the kernel: if replfsd dies, the kernel aborts all of
its FUSE connections at once (processes get ENOTCONN, nothing more is
written: the self-fence a cluster filesystem needs), and the next
replfsd detaches the dead mounts it finds.

Images (``mount -t fuse.replfs vol.img /mnt``) are still served by a
one-shot ``replfs`` process on the same layer: they need no daemon.

A mount ends when it is unmounted (umount(8): the kernel closes the
connection) or at daemon shutdown; then its journal is finished and the
resource closed, which is what ``replfsadm secondary`` and ``down`` wait
for.
"""
from __future__ import annotations

import contextvars
import logging
import os

import trio

from replfs import fuse
from replfs.errors import EXIT_USAGE, ReplfsError

from .devices import ResourceIO

log = logging.getLogger("replfs.daemon")

EXIT_MOUNT_FAIL = 32
# Which mount a log record belongs to (set in each mount's task; the tasks
# it starts inherit it), so each mount keeps its own log file.
_current_mount: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "replfs_mount", default=None)


class ResourceDevice(ResourceIO):
    """The BlockDevice of a mount served by replfsd: calls into the
    resource, counted as one opener (and a single-node opener: the guard
    until the filesystem has cluster locks)."""

    def __init__(self, res):
        super().__init__(res)
        res._require_io(write=True)
        res.open_single_node()
        res.open_count += 1
        self._open = True

    async def close(self) -> None:
        if self._open:
            self._open = False
            self.res.open_count = max(0, self.res.open_count - 1)
            self.res.close_single_node()


class _MountLog(logging.Handler):
    """A mount's own log file: the records logged in its tasks."""

    def __init__(self, mountpoint: str, path: str, fmt: logging.Formatter):
        super().__init__()
        self.mountpoint = mountpoint
        self.file = logging.FileHandler(path)
        self.file.setFormatter(fmt)

    def emit(self, record: logging.LogRecord) -> None:
        if _current_mount.get() == self.mountpoint:
            self.file.emit(record)

    def close(self) -> None:
        self.file.close()
        super().close()


class MountService:
    """The daemon component that hosts the mounts (see module docstring)."""

    def __init__(self):
        self.daemon = None
        self.mounts: dict[str, dict] = {}          # mount point -> record
        # One lock table for every mount of this node (node-local POSIX
        # and flock locks; the DLM makes them cluster-wide later).
        self.lock_service = fuse.LockService()
        self._nursery: trio.Nursery | None = None
        self.ops = {"mount": self.op_mount, "mounts": self.op_mounts}

    async def run(self, daemon, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        self.daemon = daemon
        # Mounts of a replfsd that died are dead ("Transport endpoint is
        # not connected"): detach them, as the kernel would on reboot.
        try:
            cleaned = await trio.to_thread.run_sync(fuse.clean_stale_mounts, "replfs")
            for path in cleaned or ():
                log.warning("detached the dead replfs mount %s", path)
        except Exception as e:      # noqa: BLE001  (never a reason not to start)
            log.warning("could not look for dead replfs mounts: %s", e)
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    async def stop_users(self) -> None:
        """At daemon shutdown, before the resources go down: unmount."""
        for rec in list(self.mounts.values()):
            session = rec.get("session")
            if session is not None and not session.ended:
                try:
                    await session.unmount()
                except OSError as e:
                    log.warning("%s: unmount at shutdown: %s", rec["mountpoint"], e)
                    session.stop()
        with trio.move_on_after(70):
            while self.mounts:
                await trio.sleep(0.05)

    async def shutdown(self) -> None:
        await self.stop_users()

    async def op_mounts(self, req, body, conn):
        return {"mounts": [{k: v for k, v in rec.items() if k != "session"}
                           for rec in self.mounts.values()]}

    async def op_mount(self, req, body, conn):
        from replfs.fs import mount as M
        name = req.get("res")
        mountpoint = req.get("mountpoint") or ""
        items = list(req.get("options") or [])
        try:
            o = M.parse_options(items)
            mountpoint = M.check_mountpoint(mountpoint)
        except M.MountError as e:
            raise ReplfsError(e.message, e.exit_code) from None
        if mountpoint in self.mounts:
            raise ReplfsError(f"{mountpoint}: replfs already serves a mount there",
                              EXIT_MOUNT_FAIL)
        for rec in self.mounts.values():
            if rec["resource"] == name:
                # one node, one slot: a second mount would share its journal
                raise ReplfsError(f"cannot mount resource {name}: it is already mounted on "
                                  f"{rec['mountpoint']} on this node", EXIT_MOUNT_FAIL)
        res = self.daemon._res({"res": name})
        if res.role.value != "Primary":
            raise ReplfsError(f"cannot mount resource {name}: this node ({self.daemon.node}) "
                              f"is {res.role.value}, not Primary; make it Primary first "
                              f"('replfsadm primary {name}')", EXIT_MOUNT_FAIL)
        src = M.Source(name, "resource", rundir=self.daemon.rundir)
        if o.slot is not None:
            src.slot = o.slot
        try:
            await self._nursery.start(self._serve, res, src, mountpoint, o)
        except M.MountError as e:
            raise ReplfsError(e.message, e.exit_code) from None
        return {"slot": src.slot}

    async def _serve(self, res, src, mountpoint, o, *, task_status) -> None:
        from replfs.fs import mount as M
        from replfs.fs.core import read_superblock
        _current_mount.set(mountpoint)
        path = o.logfile or os.path.join(self.daemon.rundir, f"mount-{src.name}.log")
        handler = None
        try:
            handler = _MountLog(mountpoint, path, logging.Formatter(
                f"%(asctime)s replfsd[%(process)d] {src.name}: %(levelname)s %(name)s: "
                f"%(message)s"))
            logging.getLogger("replfs").addHandler(handler)
        except OSError as e:
            log.warning("%s: no mount log %s: %s", mountpoint, path, e)
        rec = {"resource": src.name, "mountpoint": mountpoint, "slot": None,
               "readonly": o.readonly}
        if o.debug:
            # the daemon's log level is the daemon's; say so instead of
            # pretending the option took effect
            log.warning("%s: mount option debug is not applied to a mount served by "
                        "replfsd (it logs at replfsd's level)", mountpoint)
        try:
            try:
                dev = ResourceDevice(res)
            except ReplfsError as e:
                raise M.MountError(f"cannot mount resource {src.name}: {e.message}") from None
            try:
                sb = await read_superblock(dev)
            except OSError as e:
                await dev.close()
                raise M.MountError(f"{src.name}: {e.strerror or e}; not a replfs volume "
                                   f"(make one with mkfs.replfs)") from None
            if not 0 <= src.slot < sb.slot_count:
                await dev.close()
                raise M.MountError(f"slot={src.slot} is out of range: the volume has "
                                   f"{sb.slot_count} slots (0-{sb.slot_count - 1})",
                                   EXIT_USAGE)
            rec["slot"] = src.slot
            started = []

            def ready(message):
                if message is None and not started:
                    started.append(1)
                    self.mounts[mountpoint] = rec
                    task_status.started()
            # (serve closes dev at its end, whatever happens)
            await M.serve(src, mountpoint, o, ready, dev=dev,
                          lock_service=self.lock_service, signals=False,
                          session_hook=lambda s: rec.__setitem__("session", s))
        finally:
            self.mounts.pop(mountpoint, None)
            if handler is not None:
                logging.getLogger("replfs").removeHandler(handler)
                handler.close()
