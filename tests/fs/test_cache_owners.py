"""The metadata cache and blocks that change owner on the other node.

A node caches a directory leaf as directory 5's block.  The other node
frees that block and gives it to directory 7 (with an entry this node has
never seen), writing it home before it hands the lock of directory 7
over.  This node's hand-over of directory 7's lock drops directory 7's
blocks -- and the cached copy is recorded as directory 5's.  Asked for as
directory 7's, the cache must read the block afresh, not serve the old
copy.  (Written while hunting netns fault seed 1059, whose missing
directory entry turned out to have another cause.)"""
from __future__ import annotations

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
