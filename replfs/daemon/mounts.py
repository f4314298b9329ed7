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

Shared mounts.  A resource with ``allow-two-primaries`` is mounted with
cluster locks, as OCFS2 is on a dual-primary DRBD device: the lock cache
calls the DLM domain of the volume (named after its UUID) hosted by this
daemon's cluster stack, the filesystem chooses its slot under the super
lock, and both nodes may mount at once.  The mount is refused unless
sharing is safe: the cluster stack online and not fenced, the volume made
for this cluster, protocol C, no fencing policy weaker than
``resource-and-stonith`` (with none configured, the resource fences as
resource-and-stonith while mounted on both nodes, and without a fence-
peer handler it asks the cluster stack in process: the cluster stack is
the one arbiter of who goes on; replfs-fence-peer does the same as a
command), and a peer that is Primary only while it is a live cluster
member, Connected and UpToDate.  The cluster stack's events
reach the mount in process (``_SharedMount``): a node declared dead is
recovered (its slot's journal replayed) before any of its locks is used
again; a fence stops the mount writing at once (its device refuses
writes, every call answers EIO) until it is unmounted.  A resource
without ``allow-two-primaries`` is mounted by one node (node-local locks;
the peer's promotion is refused while it is mounted).

After a split brain, ``after-sb-1pri``/``after-sb-2pri``
``call-pri-lost-after-sb`` may discard the data of this node while it is
Primary and mounted: the resource then calls ``pri_lost_hook``, and every
mount of that resource stops writing at once (as on a fence); a shared
mount also fences the node in the cluster, as a failed shared filesystem
does, so that the other node recovers its slot and gets its locks.
"""
from __future__ import annotations

import contextvars
import logging
import os

import errno

import trio

from replfs import fuse
from replfs.blockdev import BlockDeviceError
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
    resource, counted as one opener -- a single-node opener (the peer may
    not be promoted meanwhile) unless ``shared`` (cluster locks).  Once
    ``fence(why)`` is called it writes nothing more."""

    def __init__(self, res, *, shared: bool = False, fence_peer=None):
        super().__init__(res)
        res._require_io(write=True)
        self.shared = shared
        if shared:
            # fencing in effect while mounted on both nodes (see
            # Resource.fencing): the cluster stack decides
            res.shared_opens += 1
            res.fence_peer_hook = fence_peer
        else:
            res.open_single_node()
        res.open_count += 1
        self._open = True
        self.fenced: str | None = None

    def fence(self, why: str) -> None:
        self.fenced = why

    def _check(self) -> None:
        if self.fenced is not None:
            raise BlockDeviceError(errno.EIO, f"this node is fenced ({self.fenced}): "
                                   "nothing more is written")

    async def write(self, offset: int, data: bytes, flags: int = 0) -> None:
        self._check()
        await super().write(offset, data, flags)

    async def flush(self) -> None:
        self._check()
        await super().flush()

    async def discard(self, offset: int, length: int) -> None:
        self._check()
        await super().discard(offset, length)

    async def close(self) -> None:
        if self._open:
            self._open = False
            self.res.open_count = max(0, self.res.open_count - 1)
            if self.shared:
                self.res.shared_opens = max(0, self.res.shared_opens - 1)
            else:
                self.res.close_single_node()


class _SharedMount:
    """A shared mount's tie to the cluster stack: the lock manager over the
    volume's DLM domain, and the cluster events (``event``) acted on."""

    def __init__(self, mountpoint: str, dom, node: int, dev: ResourceDevice,
                 nursery: trio.Nursery, cluster=None):
        from replfs.fs.clusterlocks import ClusterLockManager
        from replfs.locking.inproc import InProcessDlm
        self.mountpoint = mountpoint
        self.node = node
        self.dev = dev
        self.nursery = nursery
        self.locks = ClusterLockManager(InProcessDlm({dom.name: dom}, nursery), dom.name,
                                        nursery)
        self.fs = self.ops = self.session = None
        self.early: list[tuple[str, object]] = []     # events before the mount was up
        self.fenced: str | None = None
        self.cluster = cluster
        # dead nodes whose slots are not recovered yet (replfsadm nfs start
        # waits for none: an NFS server's grace must outlast the recovery)
        self.recovering: set[int] = set()

    def mounted(self, fs, ops, session) -> None:
        self.fs, self.ops, self.session = fs, ops, session
        fs.on_fail = self._failed
        early, self.early = self.early, []
        for kind, arg in early:
            self.event(kind, arg)

    def event(self, kind: str, arg) -> None:
        if kind == "fenced":
            self._fence(str(arg))
            return
        if self.fs is None:
            self.early.append((kind, arg))
            return
        if kind == "node-dead":
            self.recovering.add(arg)
            self.fs.node_dead(arg)
        elif kind == "node-down":
            self.recovering.add(arg)
            self.fs.node_dead(arg)          # (no-op if told already)
            self.nursery.start_soon(self._recover, arg)

    def _failed(self, why: str) -> None:
        """The filesystem latched (an I/O error in the middle of a change,
        damage found).  Its EX locks cover changes that never reached the
        disk: the other node can get them only by recovering this slot, so
        this node fences itself (OCFS2's errors=panic for a cluster
        mount)."""
        if self.fenced is not None or self.cluster is None:
            return
        log.critical("%s: the filesystem failed (%s): this node fences itself so that the "
                     "other node can recover its slot", self.mountpoint, why)
        self.nursery.start_soon(self.cluster.fence_self,
                                f"the shared filesystem on {self.mountpoint} failed: {why}")

    async def _recover(self, node: int) -> None:
        _current_mount.set(self.mountpoint)
        try:
            slots = await self.fs.recover_node(node)
            if slots:
                log.warning("%s: recovered the slot(s) %s of dead node %d", self.mountpoint,
                            ", ".join(map(str, slots)), node)
            self.recovering.discard(node)
        except Exception as e:      # noqa: BLE001
            # every lock waits for this recovery: nothing more can be done
            # safely here; say so loudly and stop writing
            log.critical("%s: recovery of dead node %d failed: %s; this mount stops",
                         self.mountpoint, node, e)
            self._fence(f"recovery of node {node} failed: {e}")

    def pri_lost(self, why: str) -> None:
        """This node's data is to be discarded (after-sb
        call-pri-lost-after-sb): stop writing now; the EX locks held cover
        changes the other node will never have, so fence the node (the
        other node then recovers this slot), as ``_failed`` does."""
        if self.fenced is not None:
            return
        self._fence(why)
        if self.cluster is not None:
            self.nursery.start_soon(self.cluster.fence_self, f"{self.mountpoint}: {why}")

    def _fence(self, why: str) -> None:
        if self.fenced is not None:
            return
        self.fenced = why
        self.dev.fence(why)
        log.critical("%s: fenced (%s): nothing more is written; every call answers EIO "
                     "until it is unmounted", self.mountpoint, why)
        if self.fs is not None:
            self.fs._fail(f"this node was fenced: {why}")
        if self.ops is not None:
            self.ops.device_lost(f"this node was fenced: {why}")


def _leaf(eg: BaseExceptionGroup, kind):
    """The first exception of type ``kind`` in ``eg``, however nested."""
    for e in eg.exceptions:
        if isinstance(e, kind):
            return e
        if isinstance(e, BaseExceptionGroup):
            found = _leaf(e, kind)
            if found is not None:
                return found
    return None


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
        # mount point -> (resource, stop it): what Resource.pri_lost_hook does
        self._stoppers: dict[str, tuple[str, object]] = {}

    async def run(self, daemon, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        self.daemon = daemon
        # Mounts of a replfsd of this node that died are dead ("Transport
        # endpoint is not connected"): detach them, as the kernel would on
        # reboot.  Only this node's (listed in its run directory): another
        # replfsd on the machine (a test pair, the demo) owns its own.
        try:
            mine = self._registry_read()
            cleaned = await trio.to_thread.run_sync(
                lambda: fuse.clean_stale_mounts("replfs", only=mine))
            for path in cleaned or ():
                log.warning("detached the dead replfs mount %s", path)
            self._registry_write(set())
        except Exception as e:      # noqa: BLE001  (never a reason not to start)
            log.warning("could not look for dead replfs mounts: %s", e)
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    async def _demote_fenced(self, res, mountpoint: str) -> None:
        """A shared mount ended because the cluster stack fenced this node:
        once nothing has the resource open, make it Secondary, as a fenced
        OCFS2 node comes back.  (When the replication link went too, the
        mirror's lost fence-peer decision demotes it anyway; this covers
        a fence with the link still up -- a short blip, a forced offline.)
        A fenced node left Primary could still be written through its
        device file while the survivor recovered its slot."""
        with trio.move_on_after(60):
            while res.open_count and res.role.value == "Primary":
                await res.wait_state_change()
        if res.role.value != "Primary" or res.open_count:
            return
        try:
            await res.secondary()
            log.warning("%s: %s demoted to Secondary: this node was fenced by the cluster "
                        "stack", mountpoint, res.conf.name)
        except ReplfsError as e:
            log.warning("%s: cannot demote %s after this node was fenced: %s", mountpoint,
                        res.conf.name, e.message)

    # The mount points this replfsd serves, kept in its run directory so
    # that the next one detaches only its own dead mounts.
    def _registry_path(self) -> str:
        return os.path.join(self.daemon.rundir, "mounts")

    def _registry_read(self) -> set[str]:
        try:
            with open(self._registry_path()) as f:
                return {line.rstrip("\n") for line in f if line.strip()}
        except FileNotFoundError:
            return set()

    def _registry_write(self, paths: set[str]) -> None:
        tmp = self._registry_path() + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(f"{p}\n" for p in sorted(paths))
        os.replace(tmp, self._registry_path())

    def _registry_sync(self) -> None:
        try:
            self._registry_write(set(self.mounts))
        except OSError as e:
            log.warning("cannot record the mounts in %s: %s", self._registry_path(), e)

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
        return {"mounts": [{k: (sorted(v) if isinstance(v, set) else v)
                            for k, v in rec.items() if k != "session"}
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
        res = self.daemon.mirror.res({"res": name})
        if res.role.value != "Primary":
            raise ReplfsError(f"cannot mount resource {name}: this node ({self.daemon.node}) "
                              f"is {res.role.value}, not Primary; make it Primary first "
                              f"('replfsadm primary {name}')", EXIT_MOUNT_FAIL)
        cs = self._shared_checks(res) if res.conf.allow_two_primaries else None
        src = M.Source(name, "resource", rundir=self.daemon.rundir)
        if o.slot is not None:
            src.slot = o.slot
        elif cs is not None:
            src.slot = None         # chosen under the super lock
        try:
            await self._nursery.start(self._serve, res, src, mountpoint, o, cs)
        except M.MountError as e:
            raise ReplfsError(e.message, e.exit_code) from None
        except BaseExceptionGroup as eg:
            # a refusal from inside the mount's nurseries
            refusal = _leaf(eg, M.MountError)
            if refusal is None:
                raise
            raise ReplfsError(refusal.message, refusal.exit_code) from None
        return {"slot": src.slot, "shared": cs is not None}

    def _pri_lost(self, name: str, why: str) -> None:
        """Resource.pri_lost_hook: stop every mount of resource ``name``."""
        for mountpoint, (res_name, stop) in list(self._stoppers.items()):
            if res_name == name:
                stop(why)

    @staticmethod
    def _stop_single(dev: ResourceDevice, mountpoint: str, why: str) -> None:
        if dev.fenced is None:
            dev.fence(why)
            log.critical("%s: stopped (%s): nothing more is written; every write answers "
                         "EIO until it is unmounted", mountpoint, why)

    @staticmethod
    async def _fence_peer(cs, res) -> int:
        code, _why = await cs.fence_resource_peer(res)
        return code

    def _cluster(self):
        for c in getattr(self.daemon, "components", ()):
            if hasattr(c, "mount_domain"):
                return c
        return None

    def _shared_checks(self, res):
        """A resource both nodes may make Primary is mounted with cluster
        locks; refuse it (saying what to do) unless sharing is safe."""
        name = res.conf.name
        cs = self._cluster()
        if cs is None:
            raise ReplfsError(f"cannot mount resource {name}: it allows two primaries, so it "
                              f"is mounted with cluster locks, and this replfsd hosts no "
                              f"cluster stack", EXIT_MOUNT_FAIL)
        try:
            on = cs.require_online()
        except ReplfsError as e:
            raise ReplfsError(f"cannot mount resource {name}: it allows two primaries, so it "
                              f"is mounted with cluster locks, and {e.message}",
                              EXIT_MOUNT_FAIL) from None
        if res.conf.protocol != "C":
            raise ReplfsError(f"cannot mount resource {name} on both nodes: it uses protocol "
                              f"{res.conf.protocol}; a shared filesystem needs protocol C "
                              f"(set 'protocol C;' in the resource and 'replfsadm adjust "
                              f"{name}')", EXIT_MOUNT_FAIL)
        configured = res.fencing_configured
        if configured not in (None, "resource-and-stonith"):
            raise ReplfsError(
                f"cannot mount resource {name} on both nodes: it has 'fencing {configured};', "
                f"and a shared filesystem needs 'fencing resource-and-stonith;' (or no "
                f"fencing option: the cluster stack then fences), so that a node that lost "
                f"its peer never goes on writing unless the cluster stack says the peer is "
                f"dead", EXIT_MOUNT_FAIL)
        if res.conf.after_sb_2pri == "violently-as0p":
            # Two Primaries that split would have one's acknowledged writes
            # discarded beneath its live caches and journals.
            raise ReplfsError(
                f"cannot mount resource {name} on both nodes: it has 'after-sb-2pri "
                f"violently-as0p;', which after a split brain discards the data of one "
                f"Primary beneath its mounted filesystem; use 'after-sb-2pri disconnect;' "
                f"(the only safe setting with two Primaries) or call-pri-lost-after-sb",
                EXIT_MOUNT_FAIL)
        for option, value in (("after-sb-0pri", res.conf.after_sb_0pri),
                              ("after-sb-1pri", res.conf.after_sb_1pri)):
            if value not in ("disconnect", "consensus", "call-pri-lost-after-sb"):
                log.warning("%s: '%s %s;' may discard acknowledged writes after a split "
                            "brain once one node has unmounted; 'disconnect' is the safe "
                            "setting for a filesystem mounted on both nodes", name, option,
                            value)
        handler = res.conf.handlers.get("fence-peer")
        if handler and "replfs-fence-peer" not in handler:
            log.warning("%s: fence-peer handler %r is not replfs-fence-peer: it must agree "
                        "with the cluster stack on which node goes on, or a cut link can "
                        "leave both nodes writing", name, handler)
        peer = cs.peer_node(res.peer.name, res.peer.address)
        if res.peer_role.value == "Primary":
            if not cs.is_member(peer.number):
                raise ReplfsError(
                    f"cannot mount resource {name}: the peer {res.peer.name} is Primary but "
                    f"node {peer.name} is not a live member of cluster {on.cluster}; bring "
                    f"the cluster online there ('replfsadm cluster online {on.cluster}')",
                    EXIT_MOUNT_FAIL)
            if res.cstate.value != "Connected" or res.pdsk.value != "UpToDate":
                raise ReplfsError(
                    f"cannot mount resource {name}: the peer is Primary, and sharing needs "
                    f"the pair Connected and UpToDate (now {res.cstate.value}, peer disk "
                    f"{res.pdsk.value}); wait for the resync ('replfsadm wait-sync "
                    f"{name}')", EXIT_MOUNT_FAIL)
        elif cs.is_member(peer.number) and not res.cstate.is_connected:
            # the peer's node is up but the mirror is not: a promotion
            # there would write data this node never sees
            raise ReplfsError(
                f"cannot mount resource {name}: node {peer.name} is up in cluster "
                f"{on.cluster} but the replication link is {res.cstate.value}; connect "
                f"the resource first ('replfsadm connect {name}')", EXIT_MOUNT_FAIL)
        return cs

    async def _serve(self, res, src, mountpoint, o, cs=None, *, task_status) -> None:
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
               "readonly": o.readonly, "shared": cs is not None}
        if o.debug:
            # the daemon's log level is the daemon's; say so instead of
            # pretending the option took effect
            log.warning("%s: mount option debug is not applied to a mount served by "
                        "replfsd (it logs at replfsd's level)", mountpoint)
        try:
            try:
                dev = ResourceDevice(
                    res, shared=cs is not None,
                    fence_peer=(None if cs is None else
                                lambda: self._fence_peer(cs, res)))
            except ReplfsError as e:
                raise M.MountError(f"cannot mount resource {src.name}: {e.message}") from None
            try:
                sb = await read_superblock(dev)
            except OSError as e:
                await dev.close()
                raise M.MountError(f"{src.name}: {e.strerror or e}; not a replfs volume "
                                   f"(make one with mkfs.replfs)") from None
            if src.slot is not None and not 0 <= src.slot < sb.slot_count:
                await dev.close()
                raise M.MountError(f"slot={src.slot} is out of range: the volume has "
                                   f"{sb.slot_count} slots (0-{sb.slot_count - 1})",
                                   EXIT_USAGE)
            # the volume's identity: replfsadm nfs derives the NFS export's
            # fsid from it, the same on both nodes and across remounts
            rec["uuid"] = sb.uuid.hex()
            rec["label"] = sb.label
            made_for = getattr(sb, "cluster_name", "")
            if cs is not None and made_for and made_for != cs.online.cluster:
                await dev.close()
                raise M.MountError(f"cannot mount resource {src.name}: the volume was made "
                                   f"for cluster {made_for}, and this node is in cluster "
                                   f"{cs.online.cluster}")
            started = []

            def ready(message):
                if message is None and not started:
                    started.append(1)
                    rec["slot"] = src.slot
                    self.mounts[mountpoint] = rec
                    self._registry_sync()
                    task_status.started()
            res.pri_lost_hook = lambda why, name=src.name: self._pri_lost(name, why)
            # (serve closes dev at its end, whatever happens)
            if cs is None:
                self._stoppers[mountpoint] = (
                    src.name, lambda why: self._stop_single(dev, mountpoint, why))
                await M.serve(src, mountpoint, o, ready, dev=dev,
                              lock_service=self.lock_service, signals=False,
                              session_hook=lambda s: rec.__setitem__("session", s))
                return
            try:
                dom = await cs.mount_domain(sb.uuid.hex())
            except ReplfsError as e:
                await dev.close()
                raise M.MountError(f"cannot mount resource {src.name}: {e.message}") from None
            node = cs.online.me.number
            rec["node"] = cs.online.me.name
            async with trio.open_nursery() as nursery:
                shared = _SharedMount(mountpoint, dom, node, dev, nursery, cluster=cs)
                rec["recovering"] = shared.recovering
                cs.listeners.append(shared.event)
                self._stoppers[mountpoint] = (src.name, shared.pri_lost)
                try:
                    await M.serve(src, mountpoint, o, ready, dev=dev,
                                  lock_service=self.lock_service, signals=False,
                                  session_hook=lambda s: rec.__setitem__("session", s),
                                  cluster=shared)
                finally:
                    cs.listeners.remove(shared.event)
                    nursery.cancel_scope.cancel()
                    if shared.fenced is not None:
                        self._nursery.start_soon(self._demote_fenced, res, mountpoint)
        finally:
            if self.mounts.pop(mountpoint, None) is not None:
                self._registry_sync()
            self._stoppers.pop(mountpoint, None)
            if handler is not None:
                logging.getLogger("replfs").removeHandler(handler)
                handler.close()
