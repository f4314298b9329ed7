"""Directories and space (fs/dirs.py): an insert whose leaf splits -- a
chain of splits and table doublings with 512-byte blocks and long names --
is refused with ENOSPC before it changes anything when the volume cannot
hold what the chain allocates (it used to run out half-way through a split
and latch the filesystem read-only); a table that grows past one block
when clusters are larger than blocks; and a directory whose leaves are
allocated between other files keeps its extent map in the inode, so a
lookup reads the inode, a table block and a leaf however large it is.
Each volume is checked with the raw-block oracle afterwards."""
from __future__ import annotations

import errno

import pytest

from replfs.blockdev import FileBlockDevice
from replfs.fs.core import Filesystem

from .conftest import CountingDevice, check_volume, format_image, make_image

LONG = 250          # two entries of this length do not fit a 512-byte leaf


def colliding_name(fs: Filesystem, other: bytes, bits: int) -> bytes:
    """A LONG-byte name whose key starts with the same ``bits`` bits as
    the key of ``other`` (and differs in the next one)."""
    want = fs.dirs.key(other) >> (63 - bits - 1)
    i = 0
    while True:
        name = b"%d-" % i
        name += b"n" * (LONG - len(name))
        if fs.dirs.key(name) >> (63 - bits - 1) == want ^ 1:
            return name
        i += 1


async def fill_to(fs: Filesystem, parent: int, free: int) -> None:
    """Fill the volume, leaving about ``free`` clusters free: a file of
    ``free - 1`` clusters set aside, another written until ENOSPC, then
    the first removed (a truncate on a full volume is refused)."""
    fh, a = await fs.create(parent, "room")
    await fs.write(fh, 0, b"R" * ((free - 1) * fs.cs))
    await fs.release(fh)
    fh, a = await fs.create(parent, "filler")
    off = 0
    chunk = b"F" * (1 << 20)
    while True:
        try:
            n = await fs.write(fh, off, chunk)
        except OSError as e:
            assert e.errno == errno.ENOSPC
            break
        off += n
        if n < len(chunk):
            break
    await fs.release(fh)
    await fs.unlink(parent, "room")
    await fs.sync()


@pytest.mark.parametrize("cs,bits", [(4096, 15), (512, 10)])
async def test_split_chain_that_cannot_fit_is_refused_cleanly(tmp_path, cs, bits):
    """512-byte blocks and 250-byte names: a leaf holds one entry.  A new
    name whose key shares its first ``bits`` bits with the one already
    there needs bits+1 splits and as many table doublings (with 4 KiB
    clusters and 15 bits: 65,536 slots, 556 table blocks, ~70 clusters;
    with 512-byte clusters and 10 bits: 18 table blocks, 11 leaves and
    the extent leaves for ~30 new extents).  With ~20 clusters free the
    old estimate (room for one split and one doubling) let the create
    start; it ran out in the middle and the filesystem went read-only.
    Now it is refused up front and the filesystem stays writable; with
    room, the same create works."""
    path = make_image(tmp_path / "v.img", 16 << 20)
    await format_image(path, slots=1, block_size=512, cluster_size=cs)
    dev = FileBlockDevice(path)
    fs = await Filesystem.mount(dev)
    d = await fs.mkdir(fs.root_ino, "d")
    first = b"first-" + b"x" * (LONG - 6)
    await fs.mknod(d.ino, first, 0o644)
    second = colliding_name(fs, first, bits)
    await fill_to(fs, fs.root_ino, 20)
    free = fs.alloc.free_clusters()
    assert 12 <= free <= 24, free
    for attempt in (fs.mknod(d.ino, second, 0o644),
                    fs.mkdir(d.ino, second),
                    fs.link((await fs.lookup(d.ino, first)).ino, d.ino, second),
                    fs.rename(d.ino, first, d.ino, second)):
        try:
            await attempt
        except OSError as e:
            assert e.errno == errno.ENOSPC, e
        else:
            raise AssertionError("an insert that cannot fit succeeded")
        assert fs.failed is None
    assert fs.alloc.free_clusters() == free
    # still writable: other names go in, the volume is intact
    await fs.mknod(d.ino, "short", 0o644)
    assert (await fs.lookup(d.ino, first)).ino
    # with room again the same create goes through
    await fs.unlink(fs.root_ino, "filler")
    await fs.mknod(d.ino, second, 0o644)
    dd = await fs._inode(d.ino)
    assert dd.dir_depth == bits + 1
    assert (await fs.lookup(d.ino, second)).ino
    await fs.unmount()
    assert not await check_volume(dev)
    await dev.close()


async def test_filling_a_small_block_volume_with_long_names_stays_writable(tmp_path):
    """Create files with long names in one directory of a small 512-byte
    block volume until ENOSPC: every refusal is clean, and after removing
    some the directory takes new names again (those that land in a leaf
    with room: leaves do not merge, and a directory that grew while the
    volume was nearly full may have used up the 266 extents a 512-byte
    inode's map holds, so a name that needs a new leaf cluster can still
    be refused -- cleanly)."""
    path = make_image(tmp_path / "v.img", 16 << 20)
    await format_image(path, slots=1, block_size=512)
    dev = FileBlockDevice(path)
    fs = await Filesystem.mount(dev)
    d = await fs.mkdir(fs.root_ino, "d")
    made = []
    refused = 0
    for i in range(20_000):
        name = (b"%06d-" % i).ljust(LONG, b"z")
        try:
            await fs.mknod(d.ino, name, 0o644)
            made.append(name)
        except OSError as e:
            assert e.errno == errno.ENOSPC, e
            assert fs.failed is None
            refused += 1
            if refused > 20:
                break
    assert refused > 20 and len(made) > 200
    for name in made[::2]:
        await fs.unlink(d.ino, name)
    await fs.sync()
    took = 0
    for i in range(40):
        try:
            await fs.mknod(d.ino, (b"again-%d-" % i).ljust(LONG, b"a"), 0o644)
            took += 1
        except OSError as e:
            assert e.errno == errno.ENOSPC, e
            assert fs.failed is None
    assert took >= 10
    await fs.unmount()
    assert not await check_volume(dev)
    await dev.close()


async def test_table_grows_past_one_block_when_clusters_hold_several(tmp_path):
    """512-byte blocks in 4 KiB clusters: the hash table's second block
    lies in the cluster already mapped for the first.  Doubling read it
    from disk as if it held a table (it never did: EIO, read-only) once a
    directory passed a few thousand entries."""
    path = make_image(tmp_path / "v.img", 64 << 20)
    await format_image(path, slots=1, block_size=512)
    dev = FileBlockDevice(path)
    fs = await Filesystem.mount(dev)
    d = await fs.mkdir(fs.root_ino, "d")
    n = 0
    while (await fs._inode(d.ino)).dir_depth < 9:       # 512 slots, 5 table blocks
        await fs.mknod(d.ino, f"file-{n}", 0o644)
        n += 1
    for i in range(0, n, 37):
        assert (await fs.lookup(d.ino, f"file-{i}")).ino
    await fs.unmount()
    assert not await check_volume(dev)
    await dev.close()


async def test_directory_extent_map_stays_in_the_inode(tmp_path):
    """Leaves allocated between the inodes of the files created in the
    directory used to take one extent each: past 164 leaves (about
    15,000 names at 4 KiB) the extent map left the inode and a cold lookup
    read two extent leaves more (6 blocks, not 4).  Leaf clusters now come
    in growing runs; the soak test takes this to 100,000 names."""
    path = make_image(tmp_path / "v.img", 256 << 20)
    await format_image(path, slots=2)
    dev = CountingDevice(path)
    fs = await Filesystem.mount(dev)
    d = await fs.mkdir(fs.root_ino, "d")
    for i in range(4000):
        await fs.mknod(d.ino, f"file-{i}", 0o644)
    dd = await fs._inode(d.ino)
    exts = await fs.ext.load(dd)
    leaf_clusters = -(-dd.dir_leaves // (1 << fs.dirs.shift))
    assert dd.ext_depth == 0
    # one extent per leaf cluster before; now about log2 of them
    assert len(exts) <= 12 < leaf_clusters, (len(exts), leaf_clusters)
    # what is mapped past the last leaf is bounded (at most doubles it)
    assert dd.clusters <= 2 * leaf_clusters + 4
    await fs.sync()
    for i in range(0, 4000, 397):
        fs.cache.drop_clean()
        before = fs.cache.reads
        await fs.lookup(d.ino, f"file-{i}")
        # directory inode, table block, leaf, the child's inode
        assert fs.cache.reads - before <= 4
    # an rmdir of a directory with preallocated clusters frees them all
    free0 = fs.alloc.free_clusters()
    for i in range(4000):
        await fs.unlink(d.ino, f"file-{i}")
    await fs.rmdir(fs.root_ino, "d")
    await fs.sync()
    assert fs.alloc.free_clusters() >= free0 + 4000 + dd.clusters
    await fs.unmount()
    assert not await check_volume(dev)
    await dev.close()
