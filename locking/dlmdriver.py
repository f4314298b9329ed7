"""trio host for one DlmNode (one lock domain).

The transport is injected: ``send(node, data)`` is an async callable that
carries bytes to a peer (locking/net's ``O2Net.send`` with a domain
prefix, or an in-memory pipe in tests), and the host calls ``receive``
with the bytes that arrive from each peer (in order, per connection), and
``node_down``/``node_up`` on membership changes.  Actions are carried out
in the order the core returns them, as its contract requires; sends are
serialised by one lock so per-peer order is kept.

Callers see an async API: ``await lock(...)`` returns once the Grant
arrives (or raises LockRefused with "EAGAIN", "ETIMEDOUT", "CANCELLED"),
and BASTs go to the per-lock ``on_bast`` callback, run in the domain's
nursery.
"""
from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Optional

import trio

from .dlm.core import Bast, DlmNode, Grant, Refuse, SendMessage
from .dlm.messages import FrameDecoder, RemoteProtocolError, encode
from .dlm.modes import Mode
from replfs.metrics import Histogram

log = logging.getLogger("replfs.locking.dlm")


class LockRefused(Exception):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass
class HeldLock:
    lockid: int
    resource: str
    mode: Optional[Mode] = None
    lvb: bytes = b""
    lvb_valid: bool = True
    on_bast: Optional[Callable[["HeldLock", Mode], Awaitable[None]]] = None
    _waiter: Optional[trio.Event] = None
    _result: object = None
    owner: object = field(default=None, repr=False)
    abandoned: bool = False


class DlmDomain:
    def __init__(self, name: str, node_id: int, members, send, *, epoch: int = 0):
        self.name = name
        self.core = DlmNode(node_id, members, epoch)
        self._send = send
        self._send_lock = trio.Lock()
        self._decoders: dict[int, FrameDecoder] = {}
        self._ids = itertools.count(1)
        self.held: dict[int, HeldLock] = {}
        self._nursery: Optional[trio.Nursery] = None
        self.fenced: Optional[str] = None
        # counts for replfsd's metrics: requests, converts, unlocks, BASTs
        # received, refusals, and the time requests waited (a histogram)
        self.stats = {"locks": 0, "converts": 0, "unlocks": 0, "basts": 0, "refused": 0}
        self.waits = Histogram()

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._ticker)
            task_status.started()

    async def _ticker(self) -> None:
        while True:
            await self._apply(self.core.tick(trio.current_time()))
            await trio.sleep(0.1)

    # ------------------------------------------------------------ actions
    async def _apply(self, actions) -> None:
        for a in actions:
            if isinstance(a, SendMessage):
                async with self._send_lock:
                    await self._send(a.to, encode(a.msg))
            elif isinstance(a, Grant):
                lk = self.held.get(a.lockid)
                if lk is None:
                    continue
                lk.mode, lk.lvb, lk.lvb_valid = a.mode, a.lvb, a.lvb_valid
                if lk.abandoned and self._idle(lk):
                    await self.unlock(lk)
                    continue
                self._wake(lk, a)
            elif isinstance(a, Refuse):
                self.stats["refused"] += 1
                lk = self.held.get(a.lockid)
                if lk is None:
                    continue
                lk.mode = self.core.held_mode(a.lockid)
                if lk.mode is None and a.lockid not in self.core.locks:
                    self.held.pop(a.lockid, None)
                self._wake(lk, a)
            elif isinstance(a, Bast):
                self.stats["basts"] += 1
                lk = self.held.get(a.lockid)
                if lk is not None and lk.on_bast is not None and self._nursery is not None:
                    self._nursery.start_soon(self._run_bast, lk, a.blocked_mode)

    async def _run_bast(self, lk: HeldLock, blocked: Mode) -> None:
        """One holder's BAST callback; its failure is that holder's problem
        (logged), never the domain's: the other holders go on."""
        try:
            await lk.on_bast(lk, blocked)
        except Exception:       # noqa: BLE001
            log.exception("DLM domain %s: the blocking callback of %s failed; the lock "
                          "stays held", self.name, lk.resource)

    @staticmethod
    def _wake(lk: HeldLock, result) -> None:
        if lk._waiter is not None:
            lk._result = result
            lk._waiter.set()

    async def _wait(self, lk: HeldLock, actions) -> HeldLock:
        lk._waiter = trio.Event()
        lk._result = None
        await self._apply(actions)
        try:
            await lk._waiter.wait()
        except trio.Cancelled:
            if lk.lockid in self.core.locks and self.core.locks[lk.lockid].requested is not None:
                with trio.CancelScope(shield=True):
                    await self._apply(self.core.cancel(lk.lockid))
            raise
        finally:
            lk._waiter = None
        if isinstance(lk._result, Refuse):
            raise LockRefused(lk._result.reason)
        return lk

    # ------------------------------------------------------------ API
    def _check(self) -> None:
        if self.fenced:
            raise LockRefused("FENCED")

    async def lock(self, resource: str, mode: Mode, *, noqueue: bool = False,
                   timeout: Optional[float] = None, on_bast=None, owner=None) -> HeldLock:
        self._check()
        lk = HeldLock(next(self._ids), resource, on_bast=on_bast, owner=owner)
        self.held[lk.lockid] = lk
        self.stats["locks"] += 1
        t0 = time.perf_counter()
        try:
            return await self._wait(lk, self.core.lock(lk.lockid, resource, Mode(mode),
                                                       noqueue=noqueue, timeout=timeout))
        except BaseException:
            if lk.lockid not in self.core.locks:
                self.held.pop(lk.lockid, None)
            raise
        finally:
            self.waits.observe(time.perf_counter() - t0)

    async def convert(self, lk: HeldLock, mode: Mode, *, noqueue: bool = False,
                      lvb: Optional[bytes] = None, timeout: Optional[float] = None) -> HeldLock:
        self._check()
        self.stats["converts"] += 1
        t0 = time.perf_counter()
        try:
            return await self._wait(lk, self.core.convert(lk.lockid, Mode(mode),
                                                          noqueue=noqueue, lvb=lvb,
                                                          timeout=timeout))
        finally:
            self.waits.observe(time.perf_counter() - t0)

    async def unlock(self, lk: HeldLock, lvb: Optional[bytes] = None) -> None:
        self.stats["unlocks"] += 1
        self.held.pop(lk.lockid, None)
        if lk.lockid in self.core.locks:
            await self._apply(self.core.unlock(lk.lockid, lvb))
        lk.mode = None

    def _idle(self, lk: HeldLock) -> bool:
        owned = self.core.locks.get(lk.lockid)
        return owned is not None and owned.requested is None

    async def abandon(self, lk: HeldLock) -> None:
        """Its owner is gone: unlock it now, or as soon as a pending
        request is granted (a cancel is sent; the grant may still win)."""
        lk.abandoned = True
        owned = self.core.locks.get(lk.lockid)
        if owned is None:
            self.held.pop(lk.lockid, None)
        elif owned.requested is None:
            await self.unlock(lk)
        elif owned.cancel_reason is None:
            await self._apply(self.core.cancel(lk.lockid))

    # ------------------------------------------------------------ host
    async def receive(self, src: int, data: bytes) -> None:
        dec = self._decoders.setdefault(src, FrameDecoder())
        try:
            msgs = dec.feed(data)
        except RemoteProtocolError:
            self._decoders.pop(src, None)
            raise
        for m in msgs:
            await self._apply(self.core.receive(src, m))

    async def node_down(self, node: int) -> None:
        self._decoders.pop(node, None)
        await self._apply(self.core.node_down(node))

    async def node_up(self, node: int) -> None:
        await self._apply(self.core.node_up(node))

    async def fence(self, why: str) -> None:
        """Stop granting: every waiter and holder learns it is fenced."""
        self.fenced = why
        log.error("DLM domain %s: node FENCED: %s; all locks are lost", self.name, why)
        for lk in list(self.held.values()):
            self._wake(lk, Refuse(lk.lockid, "FENCED"))

    def lockdump(self) -> list[dict]:
        out = []
        for lk in self.core.locks.values():
            out.append({"lockid": lk.lockid, "resource": lk.resource,
                        "granted": lk.granted.name if lk.granted is not None else None,
                        "requested": lk.requested.name if lk.requested is not None else None,
                        "master": self.core.master_of(lk.resource)})
        return out

    def masterdump(self) -> dict:
        """What this node knows as a master: each resource it masters with
        its granted, converting and waiting locks as [owner, lockid, mode],
        and the domain's epoch and members (for diagnosing a lock two
        nodes disagree on)."""
        def q(locks, attr):
            return [[m.owner, m.lockid, getattr(m, attr).name if getattr(m, attr) else None]
                    for m in locks]
        c = self.core
        return {"epoch": c.epoch, "members": sorted(c.members), "recovering": c.recovering,
                "resources": {name: {"granted": q(r.granted, "granted"),
                                     "converting": q(r.converting, "requested"),
                                     "waiting": q(r.waiting, "requested")}
                              for name, r in c.mastered.items()}}
