"""The local window on a shared volume: an operation holding the global
bitmap's lock leaves the window what the node's other operations reserved
without that lock (they counted on the window alone, and may not refill
it).  Found after the soak's ENOSPC fix: a lock holder took the last
window clusters, and another operation's allocation then needed a refill
without the lock -- the filesystem failed and the node fenced itself."""
from __future__ import annotations

from replfs.blockdev import FileBlockDevice
from replfs.fs.core import Filesystem

from .conftest import format_image, make_image


def take(al, n: int) -> None:
    """``n`` clusters, in as many pieces as the window's runs make."""
    while n:
        _, got = al.alloc(n)
        n -= got


async def test_a_lock_holder_leaves_the_window_to_reservations_without_the_lock(tmp_path):
    path = make_image(tmp_path / "v.img", 32 << 20)
    await format_image(path, slots=2)
    dev = FileBlockDevice(path)
    fs = await Filesystem.mount(dev)
    try:
        al = fs.alloc
        al.global_locked = lambda exclusive: True       # this caller holds the lock
        al.alloc(1)                                     # a window (refilled if empty)
        assert al.window_free() > 3
        while al.window_free() > 3:
            al.alloc(1)
        al.others_reserved = lambda: 2      # reserved by others, against the window
        take(al, 3)
        assert al.window_free() >= 2, al.window_free()
        # nobody else: the window is used up first, as before
        al.others_reserved = lambda: 0
        while al.window_free() > 3:
            al.alloc(1)
        take(al, 3)
        assert al.window_free() == 0
    finally:
        fs.cache.discard_transaction()
        await dev.close()
