"""The DlmClient API over lock domains hosted in this very process.

A filesystem served by replfsd (and the two-node simulator) reaches its
DLM domain without a socket: ``InProcessDlm`` offers what ``LockCache``
needs from ``locking/client.py``'s ``DlmClient`` -- ``lock()`` returning a
lock with ``convert``/``unlock``, ``mode``, ``lvb``/``lvb_valid``, BASTs
to ``on_bast(lock, blocked_mode)`` -- directly over ``DlmDomain`` objects.
Refusals raise the same ``BlockDeviceError`` errnos as the daemon's
(EAGAIN, ETIMEDOUT, ECANCELED, EPERM when fenced).

    dlm = InProcessDlm({"r1": domain}, nursery)
    cache = LockCache(dlm, "r1", on_downconvert=...)
"""
from __future__ import annotations

import errno
from typing import Awaitable, Callable, Optional

import trio

from replfs.blockdev import BlockDeviceError

from .dlmdriver import DlmDomain, HeldLock, LockRefused
from .dlm.modes import Mode

REFUSAL_ERRNO = {"EAGAIN": errno.EAGAIN, "ETIMEDOUT": errno.ETIMEDOUT,
                 "CANCELLED": errno.ECANCELED, "FENCED": errno.EPERM,
                 "EDEADLK": errno.EDEADLK}


def _refused(where: str, e: LockRefused) -> BlockDeviceError:
    return BlockDeviceError(REFUSAL_ERRNO.get(e.reason, errno.EIO),
                            f"{where}: lock refused: {e.reason}")


class InProcessLock:
    def __init__(self, dom: DlmDomain, name: str,
                 on_bast: Optional[Callable[["InProcessLock", Mode], Awaitable[None]]]):
        self._dom = dom
        self.domain = dom.name
        self.name = name
        self.on_bast = on_bast
        self.held: Optional[HeldLock] = None

    @property
    def mode(self) -> Optional[Mode]:
        return self.held.mode if self.held is not None else None

    @property
    def lvb(self) -> bytes:
        return self.held.lvb if self.held is not None else b""

    @property
    def lvb_valid(self) -> bool:
        return self.held.lvb_valid if self.held is not None else False

    async def _bast(self, _held: HeldLock, blocked: Mode) -> None:
        if self.on_bast is not None:
            await self.on_bast(self, blocked)

    async def convert(self, mode: Mode, *, noqueue: bool = False,
                      timeout: Optional[float] = None, lvb: Optional[bytes] = None) -> None:
        try:
            await self._dom.convert(self.held, Mode(mode), noqueue=noqueue, lvb=lvb,
                                    timeout=timeout)
        except LockRefused as e:
            raise _refused(f"{self.domain}/{self.name}", e) from None

    async def unlock(self, lvb: Optional[bytes] = None) -> None:
        if self.held is not None:
            await self._dom.unlock(self.held, lvb)

    def __repr__(self) -> str:
        return f"<InProcessLock {self.domain}/{self.name} {self.mode}>"


class InProcessDlm:
    def __init__(self, domains: dict[str, DlmDomain], nursery: trio.Nursery):
        self.domains = domains
        self._nursery = nursery          # LockCache runs down-conversions here

    async def lock(self, domain: str, name: str, mode: Mode, *, noqueue: bool = False,
                   timeout: Optional[float] = None, on_bast=None) -> InProcessLock:
        dom = self.domains.get(domain)
        if dom is None:
            raise BlockDeviceError(errno.ENOENT, f"no lock domain {domain!r} here")
        lk = InProcessLock(dom, name, on_bast)
        try:
            lk.held = await dom.lock(name, Mode(mode), noqueue=noqueue, timeout=timeout,
                                     on_bast=lk._bast)
        except LockRefused as e:
            raise _refused(f"{domain}/{name}", e) from None
        return lk
