"""Directory splits on a nearly full volume, through a real FUSE mount:
with 512-byte blocks and long names a create can need a chain of leaf
splits and table doublings far larger than one split.  When the volume
cannot hold it, the create fails with ENOSPC and the mount stays writable
(it used to run out half-way, latch read-only and answer EROFS to
everything); the volume checks clean afterwards."""
from __future__ import annotations

import errno
import os

import pytest
import trio

from replfs.blockdev import FileBlockDevice
from replfs.fs import format as F
from replfs.fs.core import read_superblock

from .test_fs_mount import fsck_ok, mkfs, mounted_image
from .test_fs_mount import pytestmark  # noqa: F401  (needs FUSE)

LONG = 250


def _uuid(img: str) -> bytes:
    async def read():
        dev = FileBlockDevice(img, readonly=True)
        try:
            return (await read_superblock(dev)).uuid
        finally:
            await dev.close()
    return trio.run(read)


def _colliding(uuid: bytes, other: bytes, bits: int) -> bytes:
    """A LONG-byte name whose key shares exactly ``bits`` leading bits with
    the key of ``other``."""
    want = F.name_key(uuid, other) >> (63 - bits - 1)
    i = 0
    while True:
        name = b"%d-" % i
        name += b"n" * (LONG - len(name))
        if F.name_key(uuid, name) >> (63 - bits - 1) == want ^ 1:
            return name
        i += 1


def test_create_needing_a_long_split_chain_on_a_full_volume(tmp_path):
    img = mkfs(tmp_path / "v.img", 16 << 20, "-N", "1", "-b", "512", "-C", "512")
    mnt = str(tmp_path / "mnt")
    first = b"first-" + b"x" * (LONG - 6)
    # 11 splits and 11 doublings: ~30 new clusters and extent leaves
    second = _colliding(_uuid(img), first, 10)
    with mounted_image(img, mnt):
        d = os.path.join(mnt, "d").encode()
        os.mkdir(d)
        open(os.path.join(d, first), "w").close()
        cs = os.statvfs(mnt).f_frsize
        with open(os.path.join(mnt, "room"), "wb") as f:
            f.write(b"R" * (19 * cs))
        with open(os.path.join(mnt, "filler"), "wb") as f:
            try:
                while True:
                    f.write(b"F" * (1 << 16))
                    f.flush()
            except OSError as e:
                assert e.errno == errno.ENOSPC
        os.unlink(os.path.join(mnt, "room"))
        os.sync()
        for attempt in (lambda: open(os.path.join(d, second), "w").close(),
                        lambda: os.mkdir(os.path.join(d, second)),
                        lambda: os.link(os.path.join(d, first), os.path.join(d, second)),
                        lambda: os.rename(os.path.join(d, first), os.path.join(d, second))):
            with pytest.raises(OSError) as ei:
                attempt()
            assert ei.value.errno == errno.ENOSPC
        # still writable
        open(os.path.join(d, b"short"), "w").close()
        assert os.path.exists(os.path.join(d, first))
        os.unlink(os.path.join(mnt, "filler"))
        os.sync()
        # with room the same name goes in
        open(os.path.join(d, second), "w").close()
        assert sorted(os.listdir(d)) == sorted([first, second, b"short"])
    fsck_ok(img)
