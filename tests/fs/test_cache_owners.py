"""The metadata cache and blocks that change owner on the other node.

A node caches a directory leaf as directory 5's block.  The other node
frees that block and gives it to directory 7 (with an entry this node has
never seen), writing it home before it hands the lock of directory 7
over.  This node's hand-over of directory 7's lock drops directory 7's
blocks -- and the cached copy is recorded as directory 5's.  Asked for as
directory 7's, the cache must read the block afresh, not serve the old
copy.  (Written while hunting netns fault seed 1059, whose missing
entry turned out to have another cause: a cached tombstone, see
tests/sim/test_fs_cluster_sim.py's test_new_inode_in_a_block_the_other_
node_saw_freed.)  And an inode read without its lock (readdir's
prefetch) is not cached over a refresh of that lock."""
from __future__ import annotations

import trio

from replfs.blockdev import FileBlockDevice
from replfs.fs import format as F
from replfs.fs.cache import MetaCache

from .conftest import format_image, make_image


async def test_a_block_asked_for_by_a_new_owner_is_read_afresh(tmp_path):
    path = make_image(tmp_path / "vol.img")
    sb = await format_image(path)
    dev = FileBlockDevice(path)
    try:
        blk = sb.total_blocks - 10          # (any metadata-sized block)
        old = F.DirLeaf(blk, 0, 0, [F.DirEntry(1, 100, 1, b"old-name")])
        new = F.DirLeaf(blk, 0, 0, [F.DirEntry(1, 100, 1, b"old-name"),
                                    F.DirEntry(2, 200, 1, b"made-elsewhere")])
        await dev.write(blk * sb.block_size, old.encode(sb.block_size, sb.volid))
        cache = MetaCache(dev, sb)
        got = await cache.get(blk, "dirleaf", 5)
        assert [e.name for e in got.entries] == [b"old-name"]
        # the other node: the block now belongs to directory 7
        await dev.write(blk * sb.block_size, new.encode(sb.block_size, sb.volid))
        cache.drop_owner(7)                 # directory 7's lock came back: its blocks go
        got = await cache.get(blk, "dirleaf", 7)
        assert [e.name for e in got.entries] == [b"old-name", b"made-elsewhere"]
        # the same owner again: the cached object is used
        assert await cache.get(blk, "dirleaf", 7) is got
    finally:
        await dev.close()


async def test_an_inode_read_without_its_lock_is_not_cached_over_a_refresh(fs):
    """readdir prefetches the listed inodes without their locks.  If one
    of them is forgotten while that read is in flight (its lock came back
    from the other node, which changed the inode meanwhile), the copy the
    read returns is older than the disk: it must not be cached, or the
    next getattr under the fresh lock would serve it."""
    fh, attr = await fs.create(fs.root_ino, "f")
    await fs.write(fh, 0, b"12345")
    await fs.release(fh)
    await fs.sync()
    ino, bs = attr.ino, fs.bs
    fs.cache.forget(ino)
    real_read = fs.dev.read
    in_flight, go = trio.Event(), trio.Event()

    async def slow_read(off, n):
        data = await real_read(off, n)
        if off == ino * bs:
            in_flight.set()
            await go.wait()
        return data
    fs.dev.read = slow_read
    async with trio.open_nursery() as n:
        n.start_soon(fs.prefetch_inodes, [ino])
        await in_flight.wait()
        # the other node: the file grows, written home before its lock
        # comes back here -- and the hand-over forgets this node's copy
        raw = await real_read(ino * bs, bs)
        other = F.Inode.decode(raw, fs.sb.volid, ino)
        other.size = 99
        await fs.dev.write(ino * bs, other.encode(bs, fs.sb.volid))
        fs._forget(("inode", ino))
        go.set()
    fs.dev.read = real_read
    assert (await fs.getattr(ino)).size == 99
    # (the other node's change is put back for the volume check after)
    other.size = 5
    await fs.dev.write(ino * bs, other.encode(bs, fs.sb.volid))
    fs.cache.forget(ino)
