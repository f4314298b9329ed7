"""Flags of a block write, as Linux's REQ_PREFLUSH and REQ_FUA, and the
helper that gives any BlockDevice (replfs.blockdev) their meaning.  Pure:
the filesystem's journal uses it.

``PREFLUSH``: every write completed before this one is durable before it
lands.  ``FUA``: it completes only once it is durable itself.  A device
that takes them in one request says so with ``write_flags = True`` (a
replicated resource then needs one network round trip where flush,
write, flush need three); for any other ``write_flagged`` does flush,
write, flush.
"""
from __future__ import annotations

PREFLUSH = 1
FUA = 2


async def write_flagged(dev, offset: int, data: bytes, flags: int) -> None:
    """``dev.write`` with PREFLUSH/FUA ``flags``: one request where the
    device takes them (``write_flags``), else flush, write, flush."""
    if getattr(dev, "write_flags", False):
        await dev.write(offset, data, flags)
        return
    if flags & PREFLUSH:
        await dev.flush()
    await dev.write(offset, data)
    if flags & FUA:
        await dev.flush()
