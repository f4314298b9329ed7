"""Allocation review: very large (sparse) and very small volumes, the
allocator never handing a cluster out twice, windows given back."""
from __future__ import annotations

import errno
import os
import random

import pytest

from replfs.blockdev import FileBlockDevice
from replfs.fs import format as F
from replfs.fs.core import Filesystem
from replfs.fs.mkfs import make_filesystem

from .conftest import check_volume, format_image, make_image

TIB = 1 << 40


class SparseDevice:
    """An in-memory BlockDevice of any size that stores only the 4 KiB
    pages written (a 20 TiB volume without 20 TiB of disk, and larger than
    the 16 TiB an ext4 file can be)."""

    PAGE = 4096

    def __init__(self, size: int):
        self._size = size
        self.pages: dict[int, bytearray] = {}
        self.max_written = 0

    @property
    def size(self) -> int:
        return self._size

    async def read(self, off: int, n: int) -> bytes:
        n = max(0, min(n, self._size - off))
        out = bytearray(n)
        pos = off
        while pos < off + n:
            pg, within = divmod(pos, self.PAGE)
            take = min(self.PAGE - within, off + n - pos)
            page = self.pages.get(pg)
            if page is not None:
                out[pos - off:pos - off + take] = page[within:within + take]
            pos += take
        return bytes(out)

    async def write(self, off: int, data: bytes) -> None:
        if off + len(data) > self._size:
            raise OSError(errno.ENOSPC, "write past the end")
        self.max_written = max(self.max_written, off + len(data))
        pos = off
        while pos < off + len(data):
            pg, within = divmod(pos, self.PAGE)
            take = min(self.PAGE - within, off + len(data) - pos)
            page = self.pages.setdefault(pg, bytearray(self.PAGE))
            page[within:within + take] = data[pos - off:pos - off + take]
            pos += take

    async def flush(self) -> None:
        pass

    async def discard(self, off: int, n: int) -> None:
        await self.write(off, bytes(n))

    async def close(self) -> None:
        pass


@pytest.mark.parametrize("size,bs,cs", [
    (3 * TIB, 512, 1 << 20),       # 6.4e9 blocks: block numbers past 2**32
    pytest.param(20 * TIB, 512, 1 << 20, marks=pytest.mark.soak),
    pytest.param(20 * TIB, 4096, 1 << 20, marks=pytest.mark.soak),
])
async def test_huge_sparse_volume(size, bs, cs):
    """mkfs, mount, a file written at the far end of the volume (window
    refills past group 2**k, clusters and blocks past 2**32 bytes/blocks),
    remount, fsck.  Nothing is filled."""
    dev = SparseDevice(size)
    sb = await make_filesystem(dev, slots=2, block_size=bs, cluster_size=cs, out=None)
    assert sb.total_clusters == size // cs
    assert sb.total_blocks == size // bs
    fs = await Filesystem.mount(dev)
    last_group = sb.group_count - 1
    fh, a = await fs.create(fs.root_ino, "tail")
    data = os.urandom(3 * cs + 123)
    off = size - 2 * cs          # logical offset near 20 TiB
    await fs.write(fh, off, data)
    await fs.release(fh)
    await fs.fsync()
    # a window in the last group: release ours, then refill from there
    fs.alloc.release_window()
    g = fs.alloc.groups[last_group]
    start = last_group * sb.cpg + 1
    fs.alloc._mark_global(start, min(8, g.nbits - 1), True)
    la = fs.alloc.local
    la.start, la.length = start, min(8, g.nbits - 1)
    la.bitmap = bytearray((la.length + 7) // 8)
    fs.cache.mark(la.blkno, la)
    fh, b = await fs.create(fs.root_ino, "far")
    await fs.write(fh, 0, data)
    await fs.release(fh)
    exts = await fs.ext.load(await fs._inode(b.ino))
    assert exts[0][1] >= last_group * sb.cpg
    assert b.ino >> (sb.cluster_bits - sb.block_bits) >= last_group * sb.cpg
    await fs.unmount()
    fs = await Filesystem.mount(dev)
    for ino in (a.ino, b.ino):
        attr = await fs.getattr(ino)
        fh = await fs.open(ino)
        got = await fs.read(fh, attr.size - len(data), len(data))
        await fs.release(fh)
        assert got == data
    assert (await fs.getattr(a.ino)).size == off + len(data)
    await fs.unmount()
    assert not await check_volume(dev)


async def _fill_small(fs: Filesystem, rng: random.Random, live: dict) -> None:
    """Create files until ENOSPC, delete about half, write again."""
    for rnd in range(2):
        i = 0
        while True:
            name = f"r{rnd}f{i}"
            i += 1
            data = rng.randbytes(rng.choice([1, 3000, 30000, 200000]))
            try:
                fh, a = await fs.create(fs.root_ino, name)
            except OSError as e:
                assert e.errno == errno.ENOSPC
                break
            try:
                n = await fs.write(fh, 0, data)
            except OSError as e:
                assert e.errno == errno.ENOSPC
                n = 0
            await fs.release(fh)
            live[name] = data[:n]
            if n < len(data):
                break
        for name in rng.sample(sorted(live), len(live) // 2):
            await fs.unlink(fs.root_ino, name)
            del live[name]
        await fs.fsync()
    assert fs.failed is None


@pytest.mark.parametrize("bs,slots", [(512, 1), (1024, 4), (2048, 3), (4096, 2)])
async def test_smallest_volume_fills_and_empties_cleanly(tmp_path, bs, slots):
    path = make_image(tmp_path / "v.img", 16 << 20)
    sb = await format_image(path, slots=slots, block_size=bs)
    dev = FileBlockDevice(path)
    fs = await Filesystem.mount(dev)
    live: dict[str, bytes] = {}
    await _fill_small(fs, random.Random(bs + slots), live)
    st = await fs.statfs()
    assert st.bfree < sb.total_clusters
    await fs.unmount()
    problems = await check_volume(dev)
    assert not problems, problems
    fs = await Filesystem.mount(dev)
    for name, data in live.items():
        ino = (await fs.lookup(fs.root_ino, name)).ino
        fh = await fs.open(ino)
        assert await fs.read(fh, 0, len(data) + 1) == data
        await fs.release(fh)
    for name in live:
        await fs.unlink(fs.root_ino, name)
    await fs.unmount()
    fs = await Filesystem.mount(dev)
    # everything back but the root directory's leaves (they never shrink)
    free_empty = (await fs.statfs()).bfree
    root_cl = (await fs.getattr(fs.root_ino)).blocks
    await fs.unmount()
    assert not await check_volume(dev)
    await dev.close()
    path2 = make_image(tmp_path / "fresh.img", 16 << 20)
    await format_image(path2, slots=slots, block_size=bs)
    dev2 = FileBlockDevice(path2)
    fs2 = await Filesystem.mount(dev2)
    grown = (root_cl - (await fs2.getattr(fs2.root_ino)).blocks) // (fs2.cs // 512)
    assert (await fs2.statfs()).bfree == free_empty + grown
    await fs2.unmount()
    await dev2.close()
