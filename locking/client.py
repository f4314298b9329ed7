"""DlmClient: the filesystem's async API to the local replfsd's lock manager.

    async with DlmClient.connect(nursery, rundir) as dlm:
        await dlm.join("r1")
        lk = await dlm.lock("r1", "inode-17", Mode.PR, on_bast=handler)
        await lk.convert(Mode.EX)
        lk.lvb                      # the lock value block as last granted
        await lk.unlock(lvb=b"...")
        async with dlm.locked("r1", "super", Mode.EX) as lk:
            ...

Refusals raise ``replfs.blockdev.BlockDeviceError`` with errno EAGAIN
(noqueue and busy), ETIMEDOUT, ECANCELED or EPERM (this node is fenced).
BASTs arrive as daemon push events and run ``on_bast(lk, blocked_mode)``
in the client's nursery.  Closing the client (or the process dying)
drops every lock it held.

Known limit: if a caller cancels a ``lock()`` that is still waiting, the
request stays queued in the daemon; if it is granted later the lock is
held until this client disconnects.
"""
from __future__ import annotations

from contextlib import asynccontextmanager
from typing import Awaitable, Callable, Optional

import trio

from replfs.ipc.client import AsyncClient, rundir_from_env, socket_path

from .dlm.modes import Mode

BastHandler = Callable[["Lock", Mode], Awaitable[None]]


class Lock:
    def __init__(self, client: "DlmClient", domain: str, name: str, handle: int,
                 mode: Mode, lvb: bytes, lvb_valid: bool, on_bast: Optional[BastHandler]):
        self._client = client
        self.domain, self.name, self.handle = domain, name, handle
        self.mode: Optional[Mode] = mode
        self.lvb, self.lvb_valid = lvb, lvb_valid
        self.on_bast = on_bast

    async def convert(self, mode: Mode, *, noqueue: bool = False,
                      timeout: Optional[float] = None, lvb: Optional[bytes] = None) -> None:
        args = {"handle": self.handle, "mode": Mode(mode).name, "noqueue": noqueue}
        if timeout is not None:
            args["timeout"] = timeout
        reply, body = await self._client.ipc.call("dlm-convert", lvb or b"", **args)
        self.mode = Mode[reply["mode"]]
        self.lvb, self.lvb_valid = body, reply["lvb_valid"]

    async def unlock(self, lvb: Optional[bytes] = None) -> None:
        self._client._locks.pop(self.handle, None)
        self._client._early_basts.pop(self.handle, None)
        await self._client.ipc.call("dlm-unlock", lvb or b"", handle=self.handle)
        self.mode = None

    def __repr__(self) -> str:
        return f"<Lock {self.domain}/{self.name} {self.mode.name if self.mode else 'unlocked'}>"


class DlmClient:
    def __init__(self, ipc: AsyncClient, nursery: trio.Nursery):
        self.ipc = ipc
        self._nursery = nursery
        self._locks: dict[int, Lock] = {}
        self._early_basts: dict[int, tuple[Mode, float]] = {}   # handle -> (mode, when)
        # Set when this node is fenced (the daemon says so) or the daemon
        # connection is gone: every lock held is void from then on.
        self.fenced: Optional[str] = None

    @classmethod
    @asynccontextmanager
    async def connect(cls, nursery: trio.Nursery, rundir: Optional[str] = None):
        ipc = await AsyncClient.connect(socket_path(rundir_from_env(rundir)), nursery)
        self = cls(ipc, nursery)
        nursery.start_soon(self._events)
        try:
            yield self
        finally:
            with trio.move_on_after(5) as cs:
                cs.shield = True
                await ipc.aclose()

    async def _events(self) -> None:
        try:
            await self._event_loop()
        finally:
            if self.fenced is None:
                self.fenced = "the connection to replfsd is lost"

    async def _event_loop(self) -> None:
        async for header, _body in self.ipc.events:
            if header.get("event") == "fenced":
                self.fenced = str(header.get("why") or "this node is fenced")
                continue
            if header.get("event") != "bast":
                continue
            lk = self._locks.get(header.get("handle"))
            if lk is None:
                # The BAST can overtake the task that is still registering
                # the lock it is about: keep it for lock() to deliver.
                # A BAST for a lock already unlocked here would be kept for
                # ever: keep each one only for a while (a lock() registering
                # its handle does so within one round trip).
                now = trio.current_time()
                for h in [h for h, (_m, t) in self._early_basts.items() if now - t > 30]:
                    del self._early_basts[h]
                self._early_basts[header.get("handle")] = (Mode[header["blocked"]], now)
            elif lk.on_bast is not None:
                self._nursery.start_soon(lk.on_bast, lk, Mode[header["blocked"]])

    async def join(self, domain: str) -> None:
        await self.ipc.call("dlm-join", domain=domain)

    async def leave(self, domain: str) -> None:
        await self.ipc.call("dlm-leave", domain=domain)

    async def lock(self, domain: str, name: str, mode: Mode, *, noqueue: bool = False,
                   timeout: Optional[float] = None,
                   on_bast: Optional[BastHandler] = None) -> Lock:
        args = {"domain": domain, "name": name, "mode": Mode(mode).name, "noqueue": noqueue}
        if timeout is not None:
            args["timeout"] = timeout
        reply, body = await self.ipc.call("dlm-lock", **args)
        lk = Lock(self, domain, name, reply["handle"], Mode[reply["mode"]], body,
                  reply["lvb_valid"], on_bast)
        self._locks[lk.handle] = lk
        early = self._early_basts.pop(lk.handle, None)
        if early is not None and on_bast is not None:
            self._nursery.start_soon(on_bast, lk, early[0])
        return lk

    @asynccontextmanager
    async def locked(self, domain: str, name: str, mode: Mode, **kw):
        lk = await self.lock(domain, name, mode, **kw)
        try:
            yield lk
        finally:
            with trio.CancelScope(shield=True):
                if lk.mode is not None:
                    await lk.unlock()

    async def lockdump(self, domain: Optional[str] = None) -> dict:
        reply, _ = await self.ipc.call("dlm-locks", **({"domain": domain} if domain else {}))
        return reply["locks"]
