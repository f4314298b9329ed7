"""The block mirror as replfsd hosts it: every replicated resource on this
node, its device file, and the admin-socket requests that act on them.

Like the cluster stack (locking/service.py ClusterService), it is a
component of the daemon: its requests are declared once, in ``ops``, and
the daemon dispatches through that table (no lookup by method name).
Other components reach a resource through ``res()`` / ``resources``,
never through its private fields.
"""
from __future__ import annotations

import errno
import logging

import trio

from replfs.blockflags import FUA, PREFLUSH
from replfs.errors import EXIT_CONFIG, EXIT_TIMEOUT, BlockDeviceError, ReplfsError

from replfs.blockrepl import conf as confmod
from replfs.blockrepl.core import startup
from replfs.blockrepl.core.states import (DEMOTE_WHILE_OPEN, ERR_DISCARD_IMPOSSIBLE, ERR_NO_DISK,
                                          DiskState, Role, StateChangeRefused, fail,
                                          refuse)
from replfs.blockrepl.driver.resource import Resource
from replfs.blockrepl.meta import format as md

from .devices import DeviceFiles
from .events import EventLog

log = logging.getLogger("replfs.daemon")

# How long secondary/down wait for openers that are closing (seconds).
OPENER_GRACE = 5.0


class MirrorService:
    def __init__(self, daemon):
        self.daemon = daemon
        self.resources: dict[str, Resource] = {}
        self._res_scopes: dict[str, trio.CancelScope] = {}
        self._nursery: trio.Nursery | None = None
        self.devices = DeviceFiles(daemon.rundir)
        self.events = EventLog()
        # Every request this component answers (name on the admin socket
        # -> handler(req, body, conn)).
        self.ops = {
            "up": self.op_up,
            "attach": self.op_attach,
            "detach": self.op_detach,
            "connect": self.op_connect,
            "disconnect": self.op_disconnect,
            "primary": self.op_primary,
            "secondary": self.op_secondary,
            "down": self.op_down,
            "invalidate": self.op_invalidate,
            "invalidate-remote": self.op_invalidate_remote,
            "outdate": self.op_outdate,
            "new-current-uuid": self.op_new_current_uuid,
            "resume-io": self.op_resume_io,
            "pause-sync": self.op_pause_sync,
            "resume-sync": self.op_resume_sync,
            "verify": self.op_verify,
            "resize": self.op_resize,
            "adjust": self.op_adjust,
            "status": self.op_status,
            "events": self.op_events,
            "timeout-type": self.op_timeout_type,
            "wait-connect": self.op_wait_connect,
            "wait-sync": self.op_wait_sync,
            "open": self.op_open,
            "close": self.op_close,
            "read": self.op_read,
            "write": self.op_write,
            "flush": self.op_flush,
            "discard": self.op_discard,
        }

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    def res(self, req: dict) -> Resource:
        """The resource a request names (raises if it is not up)."""
        return self._res(req)

    async def down_all(self) -> None:
        """At daemon shutdown: every resource down, the device files gone."""
        for name in list(self.resources):
            try:
                await self._down(name)
            except (ReplfsError, StateChangeRefused, OSError) as e:
                log.warning("%s: down at shutdown: %s", name, e)
        await self.devices.stop_all()

    def _res(self, req: dict) -> Resource:
        name = req.get("res")
        res = self.resources.get(name)
        if res is None:
            raise ReplfsError(f"{name}: no such resource is up on this node "
                              f"(run 'replfsadm up {name}')", EXIT_CONFIG)
        return res

    def _load_conf(self, req: dict):
        path = req.get("conf") or self.daemon.conf_path or confmod.DEFAULT_PATH
        self.daemon.conf_path = path
        return confmod.load(path)

    async def _ensure(self, req: dict) -> Resource:
        """The resource, created from the config if it is not hosted yet."""
        name = req.get("res")
        if name in self.resources:
            return self.resources[name]
        config = self._load_conf(req)
        if name not in config.resources:
            raise ReplfsError(f"'{name}' not defined in your config (for this host).",
                              EXIT_CONFIG)
        rconf = config.resources[name]
        confmod.check_node(config, rconf, self.daemon.node)
        res = Resource(rconf, self.daemon.node)
        res.conf_path = self.daemon.conf_path
        scope_holder: list[trio.CancelScope] = []

        async def host(task_status=trio.TASK_STATUS_IGNORED):
            with trio.CancelScope() as scope:
                scope_holder.append(scope)
                await res.run(task_status=task_status)

        res.state_hook = lambda r, name=name: self.events.observe(name, r)
        await self._nursery.start(host)
        self._res_scopes[name] = scope_holder[0]
        self.resources[name] = res
        self.events.observe(name, res)
        return res

    # ------------------------------------------------------------ admin ops
    async def op_up(self, req, body, conn):
        res = await self._ensure(req)
        await self._attach(res)
        res.connect()
        return {}

    async def op_attach(self, req, body, conn):
        await self._attach(await self._ensure(req))
        return {}

    async def _attach(self, res: Resource) -> None:
        await res.attach()
        await self.devices.start(self._nursery, res, res.me.device)

    async def op_detach(self, req, body, conn):
        res = self._res(req)
        if res.open_count:
            raise refuse(DEMOTE_WHILE_OPEN)
        await self.devices.stop(res.conf.name)
        await res.detach()
        return {}

    async def op_connect(self, req, body, conn):
        res = await self._ensure(req)
        discard = bool(req.get("discard_my_data"))
        if discard and res.role is Role.Primary and not res.conf.allow_two_primaries:
            raise fail(ERR_DISCARD_IMPOSSIBLE, res.me.device)
        res.connect(discard_my_data=discard)
        return {}

    async def op_disconnect(self, req, body, conn):
        await self._res(req).disconnect()
        return {}

    async def op_primary(self, req, body, conn):
        await self._res(req).primary(force=bool(req.get("force")))
        return {}

    async def _wait_openers(self, res: Resource) -> None:
        """Give openers that are closing a moment to go.  umount(8) of a
        replfs mount returns before the mount process has written its
        journal and closed the resource, so `umount; replfsadm secondary`
        (which DRBD users type as one step) would race with it."""
        with trio.move_on_after(OPENER_GRACE):
            while res.open_count:
                await trio.sleep(0.05)

    async def op_secondary(self, req, body, conn):
        res = self._res(req)
        await self._wait_openers(res)
        await res.secondary()
        return {}

    async def op_down(self, req, body, conn):
        await self._down(req.get("res"))
        return {}

    async def _down(self, name: str) -> None:
        res = self.resources.get(name)
        if res is None:
            return
        await self._wait_openers(res)
        if res.open_count:
            raise refuse(DEMOTE_WHILE_OPEN)
        await self.devices.stop(name)
        await res.down()
        scope = self._res_scopes.pop(name, None)
        del self.resources[name]
        res.state_hook = None
        self.events.gone(name)
        if scope is not None:
            scope.cancel()

    @staticmethod
    def _needs_disk(res: Resource) -> Resource:
        """Verbs that work on the local data refuse a Diskless node before
        they start, as DRBD's admin layer does: Failure (138), exit 10."""
        if res.disk is None:
            raise fail(ERR_NO_DISK, res.me.device)
        return res

    async def op_invalidate(self, req, body, conn):
        await self._needs_disk(self._res(req)).invalidate()
        return {}

    async def op_invalidate_remote(self, req, body, conn):
        await self._needs_disk(self._res(req)).invalidate_remote()
        return {}

    async def op_outdate(self, req, body, conn):
        await self._res(req).outdate()
        return {}

    async def op_new_current_uuid(self, req, body, conn):
        await self._needs_disk(self._res(req)).new_current_uuid()
        return {}

    async def op_resume_io(self, req, body, conn):
        self._res(req).resume_io()
        return {}

    async def op_pause_sync(self, req, body, conn):
        await self._res(req).pause_sync()
        return {}

    async def op_resume_sync(self, req, body, conn):
        await self._res(req).resume_sync()
        return {}

    async def op_verify(self, req, body, conn):
        await self._res(req).verify()
        return {}

    async def op_resize(self, req, body, conn):
        """Online grow (replfsadm resize): the request may hold assume_clean and
        size (the most usable bytes wanted, 0: what the disks allow)."""
        res = self._needs_disk(self._res(req))
        old = res.size
        size = req.get("size") or 0
        if not isinstance(size, int) or size < 0:
            raise ReplfsError(f"{res.conf.name}: bad size {size!r}", EXIT_CONFIG)
        await res.resize(assume_clean=bool(req.get("assume_clean")), size=size)
        return {"size": res.size, "old": old}

    async def op_adjust(self, req, body, conn):
        """Bring a resource in line with the config: up, attach, connect."""
        res = await self._ensure(req)
        config = self._load_conf(req)
        new = config.resources.get(res.conf.name)
        if new is not None and new != res.conf:
            if res.cstate.value == "StandAlone" or not res.cstate.is_connected:
                res.conf = new
            else:
                log.info("%s: config changed; new network options apply at the next "
                         "connect", res.conf.name)
                res.conf = new
        if res.disk is None:
            await self._attach(res)
        if not res.want_connect and not res.split_brain:
            res.connect()
        return {}

    async def op_status(self, req, body, conn):
        names = [req["res"]] if req.get("res") else sorted(self.resources)
        out = []
        for name in names:
            res = self.resources.get(name)
            if res is None:
                raise ReplfsError(f"{name}: no such resource is up on this node", EXIT_CONFIG)
            out.append(res.status())
        return {"resources": out, "node": self.daemon.node}

    async def op_events(self, req, body, conn):
        """events2: without ``since``, the current state of every resource
        (``exists`` records) and the sequence number it is at; with it, the
        events after it, waiting up to ``timeout`` seconds for the first."""
        only = req.get("res") or None      # (need not be up yet: its create is an event)
        since = req.get("since")
        if since is None:
            seq, records = self.events.snapshot(only)
            return {"seq": seq, "events": records}
        since = int(since)
        with trio.move_on_after(min(float(req.get("timeout") or 30), 300)):
            while True:
                evs, lost = self.events.since(since, only)
                if evs or lost:
                    return {"seq": self.events.seq, "events": evs, "lost": lost}
                since = self.events.seq        # (events of other resources: skipped)
                await self.events.wait(since)
        return {"seq": since, "events": [], "lost": False}

    @staticmethod
    def _timeout_kind(res: Resource) -> str:
        """Which startup timeout applies to res (DRBD's timeout type)."""
        disk = res.disk
        sb = disk.sb if disk is not None else None
        return startup.kind_from_metadata(
            primary_flag=bool(sb and sb.has(md.F_PRIMARY)),
            is_primary=res.role is Role.Primary,
            bitmap_uuid=sb.uuids.bitmap if sb else 0,
            peer_outdated=(res.pdsk is DiskState.Outdated
                           or bool(sb and sb.has(md.F_PEER_OUTDATED))))

    async def op_timeout_type(self, req, body, conn):
        return {"kind": self._timeout_kind(self._res(req))}

    async def op_wait_connect(self, req, body, conn):
        """Wait until connected.  ``timeout`` waits that long; otherwise
        ``wfc``/``degr``/``outdated`` (startup's three timeouts) and the
        resource's state choose, as drbdsetup wait-connect does."""
        res = self._res(req)
        if "wfc" in req:
            degr, outdated = req.get("degr"), req.get("outdated")
            choice = startup.choose(self._timeout_kind(res), int(req["wfc"] or 0),
                                    None if degr is None else int(degr),
                                    None if outdated is None else int(outdated))
            kind, seconds = choice.kind, choice.seconds
        else:
            kind, seconds = None, float(req.get("timeout") or 0)
        with trio.move_on_after(seconds or float("inf")):
            while not res.cstate.is_connected:
                await res.wait_state_change()
            return {"cstate": res.cstate.value, "kind": kind}
        using = f", {kind} {seconds:g}s" if kind else ""
        raise ReplfsError(f"{res.conf.name}: timed out waiting for the connection "
                          f"(cstate {res.cstate.value}{using})", EXIT_TIMEOUT)

    async def op_wait_sync(self, req, body, conn):
        """Wait until the resource is Connected with both disks UpToDate."""
        res = self._res(req)
        timeout = float(req.get("timeout") or 0) or float("inf")
        with trio.move_on_after(timeout):
            while not (res.cstate.value == "Connected" and res.dstate.value == "UpToDate"
                       and res.pdsk.value == "UpToDate"):
                await res.wait_state_change()
            return {}
        raise ReplfsError(f"{res.conf.name}: timed out waiting for sync "
                          f"({res.cstate.value} {res.dstate.value}/{res.pdsk.value})", EXIT_TIMEOUT)

    # ------------------------------------------------------------ block I/O
    async def op_open(self, req, body, conn):
        res = self._res(req)
        # As in DRBD 8: a Secondary cannot be opened at all.
        res._require_io(write=bool(req.get("write", True)))
        single = bool(req.get("single_node"))
        if single:
            res.open_single_node()
        res.open_count += 1
        handle = len(conn.handles) + 1
        while handle in conn.handles:
            handle += 1
        conn.handles[handle] = res.conf.name
        if single:
            conn.single_node.add(handle)
        return {"size": res.size, "handle": handle}

    async def op_close(self, req, body, conn):
        handle = req.get("handle")
        name = conn.handles.pop(handle, None)
        if name is not None and name in self.resources:
            res = self.resources[name]
            res.open_count = max(0, res.open_count - 1)
            if handle in conn.single_node:
                conn.single_node.discard(handle)
                res.close_single_node()
        return {}

    async def op_read(self, req, body, conn):
        data = await self._res(req).read(int(req["off"]), int(req["len"]))
        return {}, data

    async def op_write(self, req, body, conn):
        flags = int(req.get("flags", 0))
        if flags & ~(PREFLUSH | FUA):
            raise BlockDeviceError(errno.EINVAL, f"unknown write flags {flags:#x}")
        await self._res(req).write(int(req["off"]), body, flags)
        return {}

    async def op_flush(self, req, body, conn):
        await self._res(req).flush()
        return {}

    async def op_discard(self, req, body, conn):
        await self._res(req).discard(int(req["off"]), int(req["len"]))
        return {}

