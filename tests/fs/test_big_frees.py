"""Freeing a file spread over more allocation groups than one transaction
may touch (issue 12, left from part 1): a delete or truncate of a file
over more groups than the journal has blocks (about 2 TiB at 4 KiB
blocks) overflowed one transaction.  Now the frees go in steps from the
end, each its own transaction; an unlinked file is parked in the orphan
directory first, so a crash in between is finished by recovery.

The tests shrink the per-transaction group budget (``commit_threshold``)
instead of building a 2 TiB volume: a 512-byte-block volume has 1.8 MiB
groups, so an 8 MiB file spans five of them.
"""
from __future__ import annotations

import random

import pytest

from replfs.blockdev import FileBlockDevice
from replfs.fs.core import Filesystem

from .conftest import CrashDevice, PowerCut, check_volume, format_image, make_image

FILE = 8 << 20


async def _volume(tmp_path):
    path = make_image(tmp_path / "v.img", 48 << 20)
    await format_image(path, slots=2, block_size=512, cluster_size=512)
    return path


async def _big_file(fs, name="big"):
    fh, a = await fs.create(fs.root_ino, name)
    await fs.write(fh, 0, bytes(range(256)) * (FILE // 256))
    await fs.release(fh)
    await fs.sync()
    return a.ino


async def test_delete_of_a_file_over_many_groups_goes_in_steps(tmp_path):
    path = await _volume(tmp_path)
    dev = FileBlockDevice(path)
    fs = await Filesystem.mount(dev)
    free0 = fs.alloc.free_clusters()
    ino = await _big_file(fs)
    inode = await fs._inode(ino)
    exts = await fs.ext.load(inode)
    assert len(fs._groups([(p, n) for _, p, n in exts])) >= 4
    fs.commit_threshold = 2                       # at most 2 groups per transaction
    seq0 = fs.journal.seq
    await fs.unlink(fs.root_ino, "big")
    await fs.sync()
    assert fs.journal.seq - seq0 >= 3             # parked, then at least two steps
    assert fs.alloc.free_clusters() == free0
    od = await fs._inode(fs.orphan_ino)
    assert [e async for e in fs.dirs.entries(od)] == []
    await fs.unmount()
    assert await check_volume(dev) == []
    await dev.close()


async def test_truncate_of_a_file_over_many_groups_goes_in_steps(tmp_path):
    path = await _volume(tmp_path)
    dev = FileBlockDevice(path)
    fs = await Filesystem.mount(dev)
    ino = await _big_file(fs)
    fs.commit_threshold = 2
    seq0 = fs.journal.seq
    a = await fs.setattr(ino, size=1000)
    assert a.size == 1000
    assert fs.journal.seq - seq0 >= 2
    fh = await fs.open(ino)
    assert await fs.read(fh, 0, 2000) == (bytes(range(256)) * 4)[:1000]
    await fs.release(fh)
    await fs.unmount()
    assert await check_volume(dev) == []
    await dev.close()


@pytest.mark.parametrize("seed", range(6))
async def test_power_cut_during_a_stepped_delete_is_finished_by_recovery(tmp_path, seed):
    path = await _volume(tmp_path)
    dev = FileBlockDevice(path)
    fs = await Filesystem.mount(dev)
    await _big_file(fs)
    keep = await _big_file(fs, "keep")
    await fs.unmount()
    await dev.close()
    rng = random.Random(seed)
    dev = CrashDevice(path, crash_after=None)
    fs = await Filesystem.mount(dev)
    fs.commit_threshold = 2
    dev.crash_after = dev.writes + rng.randrange(1, 60)
    try:
        await fs.unlink(fs.root_ino, "big")
        await fs.sync()
    except PowerCut:
        pass
    except OSError:
        assert dev.dead
    await dev.settle(rng)
    await dev.inner.close()
    dev = FileBlockDevice(path)
    fs = await Filesystem.mount(dev)
    names = [n for n, _, _ in await fs.readdir(fs.root_ino)]
    assert b"keep" in names
    # whether or not the unlink committed, nothing stays parked: recovery
    # finished a parked delete (check_volume below also finds leaked or
    # doubly owned clusters)
    od = await fs._inode(fs.orphan_ino)
    assert [e async for e in fs.dirs.entries(od)] == []
    fh = await fs.open(keep)
    assert await fs.read(fh, 0, 512) == bytes(range(256)) * 2
    await fs.release(fh)
    await fs.unmount()
    assert await check_volume(dev) == []
    await dev.close()
