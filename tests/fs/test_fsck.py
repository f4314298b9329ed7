"""fsck.replfs: clean volumes pass, each kind of damage is found by -n
(exit 4), fixed by -y (exit 1), and the fixed volume checks clean and
mounts."""
from __future__ import annotations

import functools
import os
import stat
import struct
import subprocess
import sys

import pytest
import trio

from replfs.blockdev import FileBlockDevice
from replfs.fs import format as F
from replfs.fs import fsck
from replfs.fs import journal as J
from replfs.fs.core import Filesystem, read_superblock
from replfs.fs.mkfs import make_filesystem

from .conftest import check_image as oracle

FSCK = os.path.join(os.path.dirname(sys.executable), "fsck.replfs")
MiB = 1 << 20


# ------------------------------------------------------------------ helpers

def run(fn, *args, **kw):
    return trio.run(functools.partial(fn, *args, **kw))


async def _format(path: str, size: int, **kw) -> None:
    with open(path, "wb") as f:
        f.truncate(size)
    dev = FileBlockDevice(path)
    try:
        await make_filesystem(dev, out=None, label=kw.pop("label", "t"), **kw)
    finally:
        await dev.close()


class Vol:
    """An image plus the inode numbers of what ``populate`` made."""

    def __init__(self, path: str):
        self.path = path
        self.ino: dict[str, int] = {}


async def _populate(vol: Vol) -> None:
    dev = FileBlockDevice(vol.path)
    fs = await Filesystem.mount(dev, 0)
    try:
        root = fs.root_ino
        d = await fs.mkdir(root, "dir")
        fh, a = await fs.create(d.ino, "file")
        await fs.write(fh, 0, b"hello world\n" * 1000)
        await fs.release(fh)
        await fs.link(a.ino, root, "hardlink")
        await fs.setxattr(a.ino, "user.colour", b"blue")
        s = await fs.symlink(root, "sym", "dir/file")
        fh, b = await fs.create(root, "sparse")
        await fs.write(fh, 64 * MiB, b"end")
        await fs.write(fh, 0, b"start")
        await fs.release(fh)
        fh, c = await fs.create(root, "lonely")
        await fs.write(fh, 0, b"x" * 10000)
        await fs.release(fh)
        sub = await fs.mkdir(d.ino, "sub")
        for i in range(200):
            fh, _ = await fs.create(sub.ino, f"f{i:03d}")
            await fs.write(fh, 0, bytes([i]) * (i * 37))
            await fs.release(fh)
        await fs.mknod(root, "fifo", stat.S_IFIFO | 0o644)
        # every other cluster: more extents than the inode holds -> leaves
        fh, fr = await fs.create(root, "fragmented")
        for i in range(400):
            await fs.write(fh, 2 * i * 4096, b"f" * 4096)
        await fs.release(fh)
        vol.ino.update(frag=fr.ino, dir=d.ino, file=a.ino, sym=s.ino, sparse=b.ino, lonely=c.ino,
                       sub=sub.ino, root=root)
    finally:
        await fs.unmount()
        await dev.close()


@pytest.fixture
def fresh(tmp_path) -> Vol:
    vol = Vol(str(tmp_path / "fresh.img"))
    run(_format, vol.path, 64 * MiB)
    return vol


_POPULATED: dict[str, bytes] = {}


@pytest.fixture
def populated(tmp_path) -> Vol:
    """A populated 256 MiB volume (built once, copied per test)."""
    vol = Vol(str(tmp_path / "pop.img"))
    if "img" not in _POPULATED:
        run(_format, vol.path, 256 * MiB)
        run(_populate, vol)
        with open(vol.path, "rb") as f:
            _POPULATED["img"] = f.read()
        _POPULATED["ino"] = vol.ino
    else:
        with open(vol.path, "wb") as f:
            f.write(_POPULATED["img"])
        vol.ino = dict(_POPULATED["ino"])
    return vol


def sb_of(path: str) -> F.Superblock:
    async def go():
        dev = FileBlockDevice(path, readonly=True)
        try:
            return await read_superblock(dev)
        finally:
            await dev.close()
    return run(go)


def read_block(path: str, blk: int, bs: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(blk * bs)
        return f.read(bs)


def write_block(path: str, blk: int, bs: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(blk * bs)
        f.write(data)


def check(path: str, repair: bool = False) -> tuple[fsck.Result, list[str]]:
    lines: list[str] = []
    res = fsck.check_image(path, repair=repair, out=lines.append)
    return res, lines


def assert_mounts(path: str) -> None:
    async def go():
        dev = FileBlockDevice(path)
        fs = await Filesystem.mount(dev, 1)
        try:
            names = [n for n, _, _ in await fs.readdir(fs.root_ino)]
            assert b"lost+found" in names
            fh, _ = await fs.create(fs.root_ino, "after-fsck")
            await fs.write(fh, 0, b"ok")
            await fs.release(fh)
        finally:
            await fs.unmount()
            await dev.close()
    run(go)
    fsck.assert_clean(path)


def damage_cycle(path: str, expect: str | None = None) -> list[str]:
    """-n finds it (4), -y fixes it (1), -n then finds nothing (0), and the
    core mounts the result."""
    res, lines = check(path)
    text = "\n".join(lines)
    assert res.exit_code == fsck.EXIT_UNCORRECTED, text
    if expect:
        assert expect in text, text
    res, fix_lines = check(path, repair=True)
    assert res.exit_code == fsck.EXIT_FIXED, "\n".join(fix_lines)
    res, again = check(path)
    assert res.exit_code == 0, "\n".join(again)
    assert run(oracle, path) == []
    assert_mounts(path)
    return lines + fix_lines


def group_of(sb: F.Superblock, cl: int) -> tuple[int, int]:
    return F.group_desc_blkno(sb, cl // sb.cpg), cl % sb.cpg


def edit_group(path: str, cl: int, used: bool) -> None:
    sb = sb_of(path)
    blk, bit = group_of(sb, cl)
    gd = F.GroupDesc.decode(read_block(path, blk, sb.block_size), sb.volid, blk)
    if used:
        gd.set(bit)
        gd.free -= 1
    else:
        gd.clear(bit)
        gd.free += 1
    write_block(path, blk, sb.block_size, gd.encode(sb.block_size, sb.volid, blk))


def inode_of(path: str, ino: int) -> F.Inode:
    sb = sb_of(path)
    return F.Inode.decode(read_block(path, ino, sb.block_size), sb.volid, ino)


def put_inode(path: str, inode: F.Inode) -> None:
    sb = sb_of(path)
    write_block(path, inode.ino, sb.block_size, inode.encode(sb.block_size, sb.volid))


def dir_leaves(path: str, ino: int) -> list[F.DirLeaf]:
    """Every leaf of a (depth-0 extent map) directory."""
    sb = sb_of(path)
    d = inode_of(path, ino)
    shift = sb.cluster_bits - sb.block_bits
    out = []
    for i in range(d.dir_leaves):
        lcl = i >> shift
        for l, p, n in d.root:
            if l <= lcl < l + n:
                blk = ((p + lcl - l) << shift) + (i & ((1 << shift) - 1))
                out.append(F.DirLeaf.decode(read_block(path, blk, sb.block_size), sb.volid, blk))
    return out


def edit_entry(path: str, dir_ino: int, name: bytes, *, ino: int | None = None,
               remove: bool = False) -> int:
    sb = sb_of(path)
    for leaf in dir_leaves(path, dir_ino):
        for i, e in enumerate(leaf.entries):
            if e.name == name:
                old = e.ino
                if remove:
                    del leaf.entries[i]
                else:
                    e.ino = ino
                write_block(path, leaf.blkno, sb.block_size,
                            leaf.encode(sb.block_size, sb.volid))
                return old
    raise KeyError(name)


def free_cluster(path: str) -> int:
    """A cluster near the end of the volume that nothing uses."""
    sb = sb_of(path)
    cl = sb.total_clusters - 3
    blk, bit = group_of(sb, cl)
    gd = F.GroupDesc.decode(read_block(path, blk, sb.block_size), sb.volid, blk)
    assert not gd.test(bit)
    return cl


# ------------------------------------------------------------------ clean volumes

def test_fresh_volume_is_clean(fresh):
    res, lines = check(fresh.path)
    assert res.exit_code == 0, "\n".join(lines)
    assert res.errors_found == 0
    assert "Pass 0: Checking superblock and journals" in lines
    assert "Pass 5: Checking cluster allocation bitmaps" in lines
    assert res.directories == 2 and res.files == 0     # / and lost+found
    assert any(line.startswith("t: 0 files, 2 directories, ") for line in lines)


def test_populated_volume_is_clean(populated):
    res, lines = check(populated.path)
    assert res.exit_code == 0, "\n".join(lines)
    assert res.files == 206 and res.directories == 4
    # repair mode on a clean volume changes nothing
    before = open(populated.path, "rb").read()
    res, lines = check(populated.path, repair=True)
    assert res.exit_code == 0, "\n".join(lines)
    assert open(populated.path, "rb").read() == before


def test_other_geometries_clean(tmp_path):
    path = str(tmp_path / "small.img")
    run(_format, path, 32 * MiB, block_size=1024, cluster_size=16384, slots=2)
    vol = Vol(path)
    run(_populate, vol)
    res, lines = check(path)
    assert res.exit_code == 0, "\n".join(lines)


# ------------------------------------------------------------------ damage

def test_used_cluster_marked_free(populated):
    ino = inode_of(populated.path, populated.ino["lonely"])
    cl = ino.root[0][1]
    edit_group(populated.path, cl, used=False)
    damage_cycle(populated.path, "in use but marked free")


def test_free_cluster_marked_used(populated):
    edit_group(populated.path, free_cluster(populated.path), used=True)
    damage_cycle(populated.path, "marked in use but free")


def test_group_free_count_wrong(populated):
    sb = sb_of(populated.path)
    blk = F.group_desc_blkno(sb, 1)
    gd = F.GroupDesc.decode(read_block(populated.path, blk, sb.block_size), sb.volid, blk)
    gd.free -= 7
    write_block(populated.path, blk, sb.block_size, gd.encode(sb.block_size, sb.volid, blk))
    damage_cycle(populated.path, "free clusters")


def test_wrong_link_count(populated):
    ino = inode_of(populated.path, populated.ino["file"])
    assert ino.nlink == 2
    ino.nlink = 5
    put_inode(populated.path, ino)
    lines = damage_cycle(populated.path, "link count 5, should be 2")
    assert inode_of(populated.path, populated.ino["file"]).nlink == 2


def test_wrong_directory_link_count(populated):
    ino = inode_of(populated.path, populated.ino["dir"])
    assert ino.nlink == 3
    ino.nlink = 2
    put_inode(populated.path, ino)
    damage_cycle(populated.path, "should be 3")


def test_entry_pointing_to_free_inode(populated):
    free_blk = free_cluster(populated.path) << (sb_of(populated.path).cluster_bits
                                                  - sb_of(populated.path).block_bits)
    edit_entry(populated.path, populated.ino["root"], b"hardlink", ino=free_blk)
    damage_cycle(populated.path, "Entry 'hardlink'")


def test_entry_pointing_to_deleted_inode(populated):
    ino = inode_of(populated.path, populated.ino["lonely"])
    ino.flags = 0
    put_inode(populated.path, ino)
    damage_cycle(populated.path, "not in use")


def test_wrong_file_type_in_entry(populated):
    sb = sb_of(populated.path)
    for leaf in dir_leaves(populated.path, populated.ino["root"]):
        for e in leaf.entries:
            if e.name == b"sym":
                e.ftype = F.FT_REG
                write_block(populated.path, leaf.blkno, sb.block_size,
                            leaf.encode(sb.block_size, sb.volid))
    damage_cycle(populated.path, "has file type")


def test_unreachable_file_goes_to_lost_and_found(populated):
    edit_entry(populated.path, populated.ino["root"], b"lonely", remove=True)
    lines = damage_cycle(populated.path, "Unattached inode")
    names = [e.name for leaf in dir_leaves(populated.path, sb_of(populated.path).lostfound_ino)
             for e in leaf.entries]
    assert b"#%d" % populated.ino["lonely"] in names


def test_unreachable_directory_tree_reconnected(populated):
    edit_entry(populated.path, populated.ino["dir"], b"sub", remove=True)
    damage_cycle(populated.path, "Unattached directory")
    sub = inode_of(populated.path, populated.ino["sub"])
    assert sub.parent == sb_of(populated.path).lostfound_ino
    # its 200 files came along (+1 made by assert_mounts)
    res, _ = check(populated.path)
    assert res.files == 207


def test_inode_checksum_flip(populated):
    sb = sb_of(populated.path)
    blk = populated.ino["lonely"]
    raw = bytearray(read_block(populated.path, blk, sb.block_size))
    raw[F.HDR_SIZE + 60] ^= 0x40          # a byte of atime: CRC no longer matches
    write_block(populated.path, blk, sb.block_size, bytes(raw))
    damage_cycle(populated.path, "bad checksum")


def test_inode_garbage_entry_cleared(populated):
    sb = sb_of(populated.path)
    blk = populated.ino["lonely"]
    write_block(populated.path, blk, sb.block_size, os.urandom(sb.block_size))
    damage_cycle(populated.path, "Entry 'lonely'")


def test_directory_leaf_checksum_flip(populated):
    sb = sb_of(populated.path)
    leaf = dir_leaves(populated.path, populated.ino["root"])[0]
    raw = bytearray(read_block(populated.path, leaf.blkno, sb.block_size))
    raw[9] ^= 1                          # the CRC itself
    write_block(populated.path, leaf.blkno, sb.block_size, bytes(raw))
    damage_cycle(populated.path, "bad checksum")


def test_misplaced_directory_entry_rebuilds(populated):
    """An entry with a wrong hash key: the directory is rebuilt."""
    sb = sb_of(populated.path)
    for leaf in dir_leaves(populated.path, populated.ino["root"]):
        for e in leaf.entries:
            if e.name == b"sparse":
                e.key ^= 1
                leaf.entries.sort(key=lambda x: x.key)
                write_block(populated.path, leaf.blkno, sb.block_size,
                            leaf.encode(sb.block_size, sb.volid))
    damage_cycle(populated.path, "wrong hash")


def test_extent_past_the_volume(populated):
    ino = inode_of(populated.path, populated.ino["lonely"])
    l, p, n = ino.root[-1]
    ino.root.append((l + n + 5, sb_of(populated.path).total_clusters + 10, 2))
    ino.clusters += 2
    put_inode(populated.path, ino)
    damage_cycle(populated.path, "damaged extent map")


def with_fs(path: str, fn, slot: int = 0):
    """Mount ``path`` in ``slot``, run ``await fn(fs)``, unmount."""
    async def go():
        dev = FileBlockDevice(path)
        fs = await Filesystem.mount(dev, slot)
        try:
            return await fn(fs)
        finally:
            await fs.unmount()
            await dev.close()
    return run(go)


async def _ino_at(fs: Filesystem, rel: str) -> int:
    ino = fs.root_ino
    for part in rel.split("/"):
        ino = (await fs.lookup(ino, part)).ino
    return ino


async def _slurp(fs: Filesystem, rel: str, offset: int = 0, size: int | None = None) -> bytes:
    ino = await _ino_at(fs, rel)
    if size is None:
        size = (await fs.lookup(ino, ".")).size - offset
    fh = await fs.open(ino)
    try:
        return await fs.read(fh, offset, size)
    finally:
        await fs.release(fh)


async def _names(fs: Filesystem, rel: str | None = None) -> set[bytes]:
    ino = fs.root_ino if rel is None else await _ino_at(fs, rel)
    return {n for n, _, _ in await fs.readdir(ino)}


def read_cluster(path: str, cl: int) -> bytes:
    sb = sb_of(path)
    with open(path, "rb") as f:
        f.seek(cl * sb.cluster_size)
        return f.read(sb.cluster_size)


def share_cluster(path: str, ino: int, cl: int, lcl: int = 100, n: int = 1) -> None:
    """Give inode ``ino`` an extra extent (lcl, cl, n): clusters something
    else owns."""
    a = inode_of(path, ino)
    a.root.append((lcl, cl, n))
    a.clusters += n
    a.size = (lcl + n) * sb_of(path).cluster_size
    put_inode(path, a)


FRAG = b"".join(b"f" * 4096 + bytes(4096) for _ in range(399)) + b"f" * 4096


def test_cluster_shared_by_two_files(populated):
    """The later file gets its own copy of the shared cluster (e2fsck's
    pass 1D); both keep their bytes."""
    path, ino = populated.path, populated.ino
    cs = sb_of(path).cluster_size
    sparse = inode_of(path, ino["sparse"])
    l, p, n = sparse.root[0]
    share_cluster(path, ino["lonely"], p)
    res, lines = check(path)
    text = "\n".join(lines)
    assert res.exit_code == 4, text
    keep, lose = sorted([("/sparse", ino["sparse"]), ("/lonely", ino["lonely"])],
                        key=lambda x: x[1])
    assert f"Multiply-claimed cluster(s) in inode {lose[1]}: {p}" in text
    assert (f"File {lose[0]} (inode #{lose[1]}) has 1 multiply-claimed cluster(s), shared "
            f"with 1 file(s):\n\t{keep[0]} (inode #{keep[1]})\n"
            f"Clone multiply-claimed clusters? no") in text, text
    lines = damage_cycle(path, "multiply-claimed")
    fixed = "\n".join(lines)
    assert "Clone multiply-claimed clusters? yes" in fixed
    assert "bitmap differences" not in fixed            # the copies are allocated
    assert "damaged extent map" not in fixed
    mapped = {r[0]: r[1] for r in inode_of(path, ino["lonely"]).root}
    mapped_s = {r[0]: r[1] for r in inode_of(path, ino["sparse"]).root}
    assert mapped[100] != mapped_s[l]
    assert p in (mapped[100], mapped_s[l])

    async def both(fs):
        return (await _slurp(fs, "lonely"), await _slurp(fs, "sparse", 0, cs),
                await _slurp(fs, "sparse", 64 * MiB))
    lonely, sparse0, tail = with_fs(path, both)
    assert lonely == b"x" * 10000 + bytes(100 * cs - 10000) + b"start" + bytes(cs - 5)
    assert sparse0 == b"start" + bytes(cs - 5) and tail == b"end"


def _metadata_cluster(vol: Vol, kind: str) -> tuple[int, str]:
    """A cluster of metadata of ``kind`` and how fsck names its owner."""
    sb = sb_of(vol.path)
    shift = sb.cluster_bits - sb.block_bits
    if kind == "journal":
        return (sb.slots[3].journal_start >> shift) + 5, "<filesystem metadata: journal of slot 3>"
    if kind == "group":
        return sb.cpg, "<filesystem metadata: group 1 descriptor>"
    if kind == "dirblock":
        return dir_leaves(vol.path, vol.ino["dir"])[0].blkno >> shift, \
            f"/dir (inode #{vol.ino['dir']})"
    if kind == "xattr":
        return inode_of(vol.path, vol.ino["file"]).xattr_blk >> shift, \
            f" (inode #{vol.ino['file']})"          # /dir/file or /hardlink
    if kind == "inode":
        return vol.ino["sparse"] >> shift, f"/sparse (inode #{vol.ino['sparse']})"
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["journal", "group", "dirblock", "xattr", "inode"])
def test_file_sharing_a_metadata_cluster_gets_a_copy(populated, kind):
    """Metadata keeps a cluster a file also claims; the file gets a copy
    of it (what it read there before)."""
    path, ino = populated.path, populated.ino
    cl, owner = _metadata_cluster(populated, kind)
    before = read_cluster(path, cl)
    share_cluster(path, ino["lonely"], cl)
    lines = damage_cycle(path, f"File /lonely (inode #{ino['lonely']}) has 1 "
                               f"multiply-claimed cluster(s), shared with 1 file(s):\n\t")
    text = "\n".join(lines)
    assert f"shared with 1 file(s):\n\t{owner}" in text or f"{owner}\nClone" in text, text
    assert "Clone multiply-claimed clusters? yes" in text
    assert "bitmap differences" not in "\n".join(lines)
    assert read_cluster(path, cl) == before              # the owner's cluster is untouched
    mapped = {r[0]: r[1] for r in inode_of(path, ino["lonely"]).root}
    assert mapped[100] != cl
    cs = sb_of(path).cluster_size

    async def look(fs):
        return (await _slurp(fs, "lonely", 100 * cs), await _slurp(fs, "dir/file"),
                await fs.getxattr(await _ino_at(fs, "dir/file"), "user.colour"),
                await _names(fs, "dir"), await _slurp(fs, "sparse", 64 * MiB))
    copy, data, colour, names, tail = with_fs(path, look)
    assert copy == before
    assert data == b"hello world\n" * 1000 and colour == b"blue"
    assert names == {b"file", b"sub"} and tail == b"end"


def test_extent_leaf_shared_by_two_files(populated):
    """A depth-1 extent tree whose leaves (and so all its data) another
    file claims: the later one gets copies of the leaves and the data."""
    path, ino = populated.path, populated.ino
    frag = inode_of(path, ino["frag"])
    lonely = inode_of(path, ino["lonely"])
    lonely.root, lonely.ext_depth = list(frag.root), 1
    lonely.clusters, lonely.size = frag.clusters, frag.size
    put_inode(path, lonely)
    lines = damage_cycle(path, "multiply-claimed cluster(s), shared with 1 file(s)")
    assert "Cannot repair" not in "\n".join(lines)
    a, b = inode_of(path, ino["lonely"]), inode_of(path, ino["frag"])
    assert a.ext_depth == b.ext_depth == 1
    assert not {r[1] for r in a.root} & {r[1] for r in b.root}

    async def both(fs):
        return await _slurp(fs, "lonely"), await _slurp(fs, "fragmented")
    assert with_fs(path, both) == (FRAG, FRAG)


def test_xattr_block_shared_by_two_files(populated):
    path, ino = populated.path, populated.ino
    lonely = inode_of(path, ino["lonely"])
    lonely.xattr_blk = inode_of(path, ino["file"]).xattr_blk
    put_inode(path, lonely)
    lines = damage_cycle(path, "multiply-claimed")
    assert "Drop its extended attributes" not in "\n".join(lines)
    assert inode_of(path, ino["lonely"]).xattr_blk not in (0, inode_of(path, ino["file"]).xattr_blk)

    async def colours(fs):
        return [await fs.getxattr(await _ino_at(fs, n), "user.colour")
                for n in ("lonely", "dir/file")]
    assert with_fs(path, colours) == [b"blue", b"blue"]


@pytest.mark.parametrize("geometry", [{}, {"block_size": 1024, "cluster_size": 16384}],
                         ids=["4k", "1k-in-16k-clusters"])
def test_directory_blocks_shared_by_two_directories(tmp_path, geometry):
    """Directory b's extent map names a's blocks: b gets a copy of them
    (and so a's names, resealed for their new place, several per cluster
    with small blocks); what b held goes to lost+found."""
    path = str(tmp_path / "d.img")
    run(_format, path, 64 * MiB, **geometry)

    async def make(fs):
        a = await fs.mkdir(fs.root_ino, "a")
        b = await fs.mkdir(fs.root_ino, "b")
        out = {"a": a.ino, "b": b.ino}
        many = [(a.ino, f"n{i:03d}-" + "x" * 40, b"") for i in range(60)]
        for d, name, data in [(a.ino, "one", b"1" * 5000), (a.ino, "two", b"2"),
                              (b.ino, "three", b"3" * 9000)] + many:
            fh, attr = await fs.create(d, name)
            await fs.write(fh, 0, data)
            await fs.release(fh)
            out[name] = attr.ino
        return out
    ino = with_fs(path, make)
    a, b = inode_of(path, ino["a"]), inode_of(path, ino["b"])
    assert not geometry or a.dir_leaves > 2        # several leaves in one cluster
    b.root, b.ext_depth, b.clusters = list(a.root), a.ext_depth, a.clusters
    b.dir_depth, b.dir_leaves = a.dir_depth, a.dir_leaves
    put_inode(path, b)
    lines = damage_cycle(path, f"File /b (inode #{ino['b']}) has")
    assert "Clone multiply-claimed clusters? yes" in "\n".join(lines)
    assert not {r[1] for r in inode_of(path, ino["a"]).root} & \
        {r[1] for r in inode_of(path, ino["b"]).root}

    async def look(fs):
        return (await _names(fs, "a"), await _names(fs, "b"), await _names(fs, "lost+found"),
                await _slurp(fs, "b/one"), await _slurp(fs, f"lost+found/#{ino['three']}"),
                (await fs.lookup(await _ino_at(fs, "a/one"), ".")).nlink)
    names_a, names_b, lf, one, three, nlink = with_fs(path, look)
    assert names_a == names_b and {b"one", b"two"} <= names_a and len(names_a) == 62
    assert f"#{ino['three']}".encode() in lf
    assert one == b"1" * 5000 and three == b"3" * 9000 and nlink == 2


def test_no_space_to_clone_falls_back_to_removing(tmp_path):
    """A full volume: the shared extent is removed from the later file, as
    before cloning existed, and fsck says why."""
    path = str(tmp_path / "full.img")
    run(_format, path, 32 * MiB)

    async def fill(fs):
        fh, b = await fs.create(fs.root_ino, "big")
        fh2, a = await fs.create(fs.root_ino, "small")       # the later inode loses
        await fs.write(fh2, 0, b"s" * 100)
        await fs.release(fh2)
        fh2, _ = await fs.create(fs.root_ino, "spare")       # room for assert_mounts
        await fs.write(fh2, 0, bytes(64 << 10))
        await fs.release(fh2)
        off, chunk = 0, MiB
        while chunk >= 4096:
            try:
                done = await fs.write(fh, off, b"b" * chunk)
            except OSError:
                done = 0
            off += done
            if done < chunk:
                chunk //= 2
        await fs.release(fh)
        await fs.unlink(fs.root_ino, "spare")
        return a.ino, b.ino, off
    small, big, size = with_fs(path, fill)
    assert sb_of(path).total_clusters * sb_of(path).cluster_size - size < 20 * MiB
    res, lines = check(path)
    free = res.total_clusters - res.clusters_used
    assert free < 40, "\n".join(lines)
    l, p, n = inode_of(path, big).root[-1]
    assert n > free
    share_cluster(path, small, p, n=free + 1)
    lines = damage_cycle(path, "Clone multiply-claimed clusters? no")
    text = "\n".join(lines)
    assert "Cannot clone them (not enough free clusters)" in text
    assert f"is removed from inode {small}" in text
    assert "Remove the bad extents? yes" in text
    assert [r[0] for r in inode_of(path, small).root] == [0]

    async def look(fs):
        return await _slurp(fs, "small", 0, 100), await _slurp(fs, "big")
    head, data = with_fs(path, look)
    assert head == b"s" * 100 and data == b"b" * size


def _zero_block(path: str, blk: int) -> None:
    write_block(path, blk, sb_of(path).block_size, bytes(sb_of(path).block_size))


def _check_populated_in_lost_and_found(path: str, ino: dict) -> None:
    async def look(fs):
        lf = f"lost+found/#{ino['dir']}"
        return (await _names(fs), await _names(fs, "lost+found"),
                await _slurp(fs, f"{lf}/file"), await _slurp(fs, f"lost+found/#{ino['lonely']}"),
                await fs.readlink(await _ino_at(fs, f"lost+found/#{ino['sym']}")),
                await _slurp(fs, f"lost+found/#{ino['frag']}"),
                len(await _names(fs, f"{lf}/sub")),
                (await fs.lookup(await _ino_at(fs, f"{lf}/file"), ".")).nlink)
    root, lf, file, lonely, sym, frag, nsub, nlink = with_fs(path, look)
    assert root == {b"lost+found", b"after-fsck"}
    for k in ("dir", "lonely", "sym", "sparse", "frag"):
        assert f"#{ino[k]}".encode() in lf, (k, lf)
    assert b"#%d" % ino["file"] not in lf       # still named in dir
    assert file == b"hello world\n" * 1000 and lonely == b"x" * 10000
    assert sym == b"dir/file" and frag == FRAG and nsub == 200
    assert nlink == 1                             # 'hardlink' went with the root


@pytest.mark.parametrize("how", ["zeroed", "garbage"])
def test_root_inode_lost_is_recreated(populated, how):
    """e2fsck's 'Root inode not allocated. Allocate?': a new root in the
    same place; everything it named goes to lost+found (which the new root
    names again)."""
    path, ino = populated.path, populated.ino
    sb = sb_of(path)
    if how == "zeroed":
        _zero_block(path, sb.root_ino)
    else:
        write_block(path, sb.root_ino, sb.block_size, os.urandom(sb.block_size))
    lines = damage_cycle(path, f"Root inode not allocated (inode {sb.root_ino}")
    text = "\n".join(lines)
    assert "Allocate? yes" in text
    assert f"/lost+found (inode {sb.lostfound_ino}) is not connected" in text
    assert sb_of(path).root_ino == sb.root_ino and sb_of(path).lostfound_ino == sb.lostfound_ino
    root = inode_of(path, sb.root_ino)
    assert root.is_dir and root.parent == root.ino and root.mode & 0o7777 == 0o755
    assert root.flags == F.INODE_FLAG_VALID | F.INODE_FLAG_WIDE_TIME
    assert inode_of(path, sb.lostfound_ino).parent == sb.root_ino
    _check_populated_in_lost_and_found(path, ino)


def test_root_inode_not_a_directory(populated):
    """e2fsck's 'Root inode is not a directory. Clear?' then 'Allocate?'."""
    path, ino = populated.path, populated.ino
    sb = sb_of(path)
    root = inode_of(path, sb.root_ino)
    root.mode = stat.S_IFREG | 0o644
    put_inode(path, root)
    lines = damage_cycle(path, f"Root inode (inode {sb.root_ino}) is not a directory.\nClear? no")
    text = "\n".join(lines)
    assert "Clear? yes" in text and "Root inode not allocated" in text and "Allocate? yes" in text
    assert sb_of(path).root_ino == sb.root_ino
    _check_populated_in_lost_and_found(path, ino)


def test_root_recreated_elsewhere_when_its_cluster_is_taken(tmp_path):
    """The root's block is lost and its cluster now belongs to a file:
    the new root goes elsewhere, in the superblock and its backup."""
    path = str(tmp_path / "big.img")
    run(_format, path, 1024 * MiB + 64 * MiB)

    async def make(fs):
        d = await fs.mkdir(fs.root_ino, "d")
        fh, f = await fs.create(d.ino, "f")
        await fs.write(fh, 0, b"data" * 1000)
        await fs.release(fh)
        return d.ino, f.ino
    d, f = with_fs(path, make)
    sb = sb_of(path)
    shift = sb.cluster_bits - sb.block_bits
    (backup,) = F.backup_sb_blknos(sb.block_size, sb.total_blocks)
    _zero_block(path, sb.root_ino)
    share_cluster(path, f, sb.root_ino >> shift, lcl=50)
    lines = damage_cycle(path, "Root inode not allocated")
    text = "\n".join(lines)
    new = sb_of(path).root_ino
    assert new != sb.root_ino
    assert f"the root directory is now inode {new}" in text
    raw = read_block(path, backup, sb.block_size)
    assert F.Superblock.decode(raw, backup).root_ino == new
    cs = sb.cluster_size

    async def look(fs):
        return (fs.root_ino, await _names(fs, f"lost+found/#{d}"),
                await _slurp(fs, f"lost+found/#{d}/f", 0, 4000),
                await _slurp(fs, f"lost+found/#{d}/f", 50 * cs))
    root, names, head, tail = with_fs(path, look)
    assert root == new and names == {b"f"}
    assert head == b"data" * 1000 and tail == bytes(cs)   # what it shared: the zeroed block


def test_lost_and_found_unnamed_is_reconnected(fresh):
    """An intact lost+found that lost its name goes back to the root (it
    used to be 'reconnected' into itself)."""
    sb = sb_of(fresh.path)
    edit_entry(fresh.path, sb.root_ino, b"lost+found", remove=True)
    damage_cycle(fresh.path, f"/lost+found (inode {sb.lostfound_ino}) is not connected")
    assert sb_of(fresh.path).lostfound_ino == sb.lostfound_ino
    assert inode_of(fresh.path, sb.lostfound_ino).parent == sb.root_ino
    names = {e.name: e.ino for leaf in dir_leaves(fresh.path, sb.root_ino) for e in leaf.entries}
    assert names[b"lost+found"] == sb.lostfound_ino


def test_lost_and_found_recreated_with_wide_times(populated):
    path = populated.path
    sb = sb_of(path)
    _zero_block(path, sb.lostfound_ino)
    edit_entry(path, populated.ino["root"], b"lonely", remove=True)
    damage_cycle(path, "/lost+found is missing")
    lf = inode_of(path, sb_of(path).lostfound_ino)
    assert lf.flags == F.INODE_FLAG_VALID | F.INODE_FLAG_WIDE_TIME and lf.generation


@pytest.mark.parametrize("wide", [True, False])
def test_orphan_directory_lost_is_recreated(tmp_path, wide):
    path = str(tmp_path / "o.img")
    run(_format, path, 64 * MiB, wide_time=wide)
    sb = sb_of(path)
    od = sb.slots[1].orphan_ino
    _zero_block(path, od)
    damage_cycle(path, f"Orphan directory of slot 1 (inode {od}) is unusable")
    assert sb_of(path).slots[1].orphan_ino == od
    d = inode_of(path, od)
    want = F.INODE_FLAG_VALID | F.INODE_FLAG_SYSTEM | (F.INODE_FLAG_WIDE_TIME if wide else 0)
    assert d.flags == want and d.mode == stat.S_IFDIR | 0o700
    assert d.parent == od and d.nlink == 2 and d.generation
    assert [e for leaf in dir_leaves(path, od) for e in leaf.entries] == []


def _crash_with_orphan(path: str, slot: int = 0) -> int:
    """A file unlinked while open in ``slot``, then the node died; the
    journal is replayed and the slot freed as a survivor would (the
    orphan is still listed)."""
    async def go():
        dev = FileBlockDevice(path)
        fs = await Filesystem.mount(dev, slot)
        fh, a = await fs.create(fs.root_ino, "open-then-unlinked")
        await fs.write(fh, 0, b"z" * 100000)
        await fs.unlink(fs.root_ino, "open-then-unlinked")
        await fs.sync()
        await dev.close()
        return a.ino
    ino = run(go)
    sb = sb_of(path)

    async def clean_journal():
        dev = FileBlockDevice(path)
        await J.replay(dev, sb, slot)
        raw = await dev.read(sb.slotmap_blk * sb.block_size, sb.block_size)
        sm = F.SlotMap.decode(raw, sb.volid, sb.slotmap_blk)
        sm.slots[slot] = (F.SLOT_FREE, 0, sm.slots[slot][2])
        await dev.write(sm.blkno * sb.block_size, sm.encode(sb.block_size, sb.volid))
        await dev.close()
    run(clean_journal)
    return ino


def test_orphan_directory_lost_with_its_orphans(tmp_path):
    """The orphans that were in a lost orphan directory are unattached with
    no links: freed, not put in lost+found."""
    path = str(tmp_path / "orph.img")
    run(_format, path, 64 * MiB)
    ino = _crash_with_orphan(path, 0)
    assert inode_of(path, ino).nlink == 0
    sb = sb_of(path)
    _zero_block(path, sb.slots[0].orphan_ino)
    lines = damage_cycle(path, f"Unattached orphan inode {ino} has link count 0")
    text = "\n".join(lines)
    assert "Recreate it? yes" in text and "Free it? yes" in text
    assert "Connect it to /lost+found" not in text
    assert not inode_of(path, ino).flags & F.INODE_FLAG_VALID
    names = [e.name for leaf in dir_leaves(path, sb.lostfound_ino) for e in leaf.entries]
    assert names == []


def test_orphan_directory_recreated_elsewhere(populated):
    """The orphan directory's cluster now belongs to a file: a new one
    elsewhere, recorded in the slot record; the slot mounts and uses it."""
    path, ino = populated.path, populated.ino
    sb = sb_of(path)
    shift = sb.cluster_bits - sb.block_bits
    old = sb.slots[2].orphan_ino
    _zero_block(path, old)
    share_cluster(path, ino["lonely"], old >> shift)
    lines = damage_cycle(path, f"Orphan directory of slot 2 (inode {old}) is unusable")
    new = sb_of(path).slots[2].orphan_ino
    assert new != old
    assert f"the orphan directory of slot 2 is now inode {new}" in "\n".join(lines)
    assert [s.orphan_ino for i, s in enumerate(sb_of(path).slots) if i != 2] == \
        [s.orphan_ino for i, s in enumerate(sb.slots) if i != 2]
    d = inode_of(path, new)
    assert d.flags & F.INODE_FLAG_SYSTEM and d.parent == new

    async def use(fs):
        assert fs.orphan_ino == new
        fh, a = await fs.create(fs.root_ino, "held")
        await fs.write(fh, 0, b"h" * 5000)
        await fs.unlink(fs.root_ino, "held")
        names = await _names_of(fs, new)
        await fs.release(fh)
        return a.ino, names, await _names_of(fs, new)
    held, during, after = with_fs(path, use, slot=2)
    assert during == {b"%016x" % held} and after == set()
    fsck.assert_clean(path)


async def _names_of(fs, ino: int) -> set[bytes]:
    return {n for n, _, _ in await fs.readdir(ino)}


def test_extent_leaf_damage(populated):
    ino = inode_of(populated.path, populated.ino["frag"])
    assert ino.ext_depth == 1 and len(ino.root) >= 2
    sb = sb_of(populated.path)
    blk = ino.root[1][1]
    raw = bytearray(read_block(populated.path, blk, sb.block_size))
    raw[F.EXTLEAF_OFF + 5] ^= 0x10                    # body flip: a checksum error
    write_block(populated.path, blk, sb.block_size, bytes(raw))
    damage_cycle(populated.path, "bad checksum")


def test_extent_leaf_lost(populated):
    ino = inode_of(populated.path, populated.ino["frag"])
    sb = sb_of(populated.path)
    write_block(populated.path, ino.root[0][1], sb.block_size, bytes(sb.block_size))
    damage_cycle(populated.path, "damaged extent map")


def test_size_smaller_than_extents(populated):
    ino = inode_of(populated.path, populated.ino["lonely"])
    ino.size = 10
    put_inode(populated.path, ino)
    damage_cycle(populated.path, "Set the size")


def test_bad_xattr_block(populated):
    sb = sb_of(populated.path)
    ino = inode_of(populated.path, populated.ino["file"])
    write_block(populated.path, ino.xattr_blk, sb.block_size, bytes(sb.block_size))
    damage_cycle(populated.path, "xattr block")


def test_orphan_is_freed(tmp_path):
    path = str(tmp_path / "orph.img")
    run(_format, path, 64 * MiB)
    ino = _crash_with_orphan(path, 0)
    damage_cycle(path, f"Orphan inode {ino}")
    assert not inode_of(path, ino).flags & F.INODE_FLAG_VALID


def test_primary_superblock_corrupt_uses_backup(tmp_path):
    path = str(tmp_path / "big.img")
    run(_format, path, 1024 * MiB + 64 * MiB)
    sb = sb_of(path)
    assert F.backup_sb_blknos(sb.block_size, sb.total_blocks)
    with open(path, "r+b") as f:
        f.seek(F.SB_OFFSET + 100)
        f.write(b"\xff" * 8)
    lines = damage_cycle(path, "using the backup superblock")
    assert sb_of(path).uuid == sb.uuid


def _set_cluster_name_bytes(path: str, blk: int, raw_name: bytes) -> None:
    """Store ``raw_name`` as the cluster name of the superblock at ``blk``,
    with a good checksum (damage the checksum cannot see)."""
    sb = sb_of(path)
    bs = sb.block_size
    buf = bytearray(read_block(path, blk, bs))
    off = F.cluster_name_offset(sb.slot_count)
    buf[off:off + F.CLUSTER_NAME_LEN] = raw_name.ljust(F.CLUSTER_NAME_LEN, b"\0")
    struct.pack_into("<I", buf, 8, F.block_crc(buf))
    write_block(path, blk, bs, bytes(buf))


def test_cluster_name_shown_with_verbose(tmp_path, capsys):
    path = str(tmp_path / "named.img")
    run(_format, path, 64 * MiB, cluster_name="ocfs2")
    assert fsck.main(["-n", "-v", path]) == 0
    assert "  cluster: ocfs2" in capsys.readouterr().out
    run(_format, path, 64 * MiB)
    assert fsck.main(["-n", "-v", path]) == 0
    assert "  cluster: none\n" in capsys.readouterr().out


@pytest.mark.parametrize("raw_name", [b"oc fs2", b"ocfs2\x01", b"\xff" * 16, b""])
def test_cluster_name_damaged_is_cleared(tmp_path, raw_name):
    path = str(tmp_path / "named.img")
    run(_format, path, 1024 * MiB + 64 * MiB, cluster_name="ocfs2")
    sb = sb_of(path)
    backups = F.backup_sb_blknos(sb.block_size, sb.total_blocks)
    assert backups
    _set_cluster_name_bytes(path, F.sb_blkno(sb.block_size), raw_name)
    assert sb_of(path).feat_compat & F.FEATURE_COMPAT_CLUSTER_NAME
    lines = damage_cycle(path, "Superblock cluster name is damaged")
    assert "Clear the cluster name? yes" in "\n".join(lines)
    got = sb_of(path)
    assert got.cluster_name == "" and not got.feat_compat & F.FEATURE_COMPAT_CLUSTER_NAME
    for blk in backups:                       # the backups say the same
        raw = read_block(path, blk, sb.block_size)
        assert F.Superblock.decode(raw, blk).cluster_name == ""


def test_dirty_journal_replayed(populated):
    """A committed transaction whose home writes never happened."""
    path = populated.path
    sb = sb_of(path)
    ino = inode_of(path, populated.ino["lonely"])
    ino.uid = 4242

    async def go():
        dev = FileBlockDevice(path)
        j = J.Journal(dev, sb, 2)
        await j.open()
        await j.commit({ino.ino: ino.encode(sb.block_size, sb.volid)}, [])
        await dev.close()
    run(go)
    assert inode_of(path, ino.ino).uid == 0
    res, lines = check(path)
    assert res.exit_code == 4, "\n".join(lines)
    assert "Journal of slot 2 needs recovery" in "\n".join(lines)
    assert inode_of(path, ino.ino).uid == 0          # -n wrote nothing
    damage_cycle(path, "needs recovery")
    assert inode_of(path, ino.ino).uid == 4242


def test_crashed_mount_needs_force(populated):
    """A node died while mounted: slot map in use and a dirty journal."""
    path = populated.path

    async def crash():
        dev = FileBlockDevice(path)
        fs = await Filesystem.mount(dev, 0)
        fh, _ = await fs.create(fs.root_ino, "written-before-crash")
        await fs.write(fh, 0, b"data")
        await fs.release(fh)
        await fs.sync()
        await dev.close()             # no unmount
    run(crash)
    r = subprocess.run([FSCK, "-y", path], capture_output=True, text=True)
    assert r.returncode == 8, r.stdout + r.stderr
    assert "in use" in r.stderr
    r = subprocess.run([FSCK, "-n", path], capture_output=True, text=True)
    assert r.returncode == 4, r.stdout + r.stderr
    assert "WARNING" in r.stdout and "needs recovery" in r.stdout
    r = subprocess.run([FSCK, "-y", "-f", path], capture_output=True, text=True)
    assert r.returncode == 1, r.stdout + r.stderr
    r = subprocess.run([FSCK, "-n", path], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert_mounts(path)


# ------------------------------------------------------------------ command line

def test_cli_clean_and_repair(populated):
    r = subprocess.run([FSCK, "-n", populated.path], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Pass 3: Checking directory connectivity" in r.stdout
    assert "t: 206 files, 4 directories" in r.stdout
    ino = inode_of(populated.path, populated.ino["file"])
    ino.nlink = 9
    put_inode(populated.path, ino)
    r = subprocess.run([FSCK, "-n", populated.path], capture_output=True, text=True)
    assert r.returncode == 4, r.stdout + r.stderr
    # no terminal and neither -n nor -y: behaves as -n and says so
    r = subprocess.run([FSCK, populated.path], capture_output=True, text=True,
                       stdin=subprocess.DEVNULL)
    assert r.returncode == 4
    assert "as -n" in r.stderr
    r = subprocess.run([FSCK, "-y", populated.path], capture_output=True, text=True)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "FILE SYSTEM WAS MODIFIED" in r.stdout
    r = subprocess.run([FSCK, "-n", populated.path], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_cli_usage_and_operational_errors(tmp_path):
    r = subprocess.run([FSCK], capture_output=True, text=True)
    assert r.returncode == 16
    r = subprocess.run([FSCK, "-n", "-y", "x"], capture_output=True, text=True)
    assert r.returncode == 16
    r = subprocess.run([FSCK, "--bogus", "x"], capture_output=True, text=True)
    assert r.returncode == 16
    r = subprocess.run([FSCK, "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "Exit status" in r.stdout
    r = subprocess.run([FSCK, "--version"], capture_output=True, text=True)
    assert r.returncode == 0 and "fsck.replfs" in r.stdout
    blank = tmp_path / "blank.img"
    blank.write_bytes(bytes(4 * MiB))
    r = subprocess.run([FSCK, "-n", str(blank)], capture_output=True, text=True)
    assert r.returncode == 8 and "superblock" in r.stderr
    conf = tmp_path / "replfs.conf"
    conf.write_text("")
    r = subprocess.run([FSCK, "-n", "-c", str(conf), "nosuchres"], capture_output=True,
                       text=True)
    assert r.returncode == 8, r.stderr


def test_main_in_process(populated, capsys):
    assert fsck.main(["-n", populated.path]) == 0
    assert "Pass 5" in capsys.readouterr().out


def test_speed_many_files(tmp_path):
    """A 1 GiB volume with a few thousand files checks in seconds."""
    path = str(tmp_path / "speed.img")
    run(_format, path, 1024 * MiB)

    async def fill():
        dev = FileBlockDevice(path)
        fs = await Filesystem.mount(dev, 0)
        for d in range(20):
            dd = await fs.mkdir(fs.root_ino, f"d{d}")
            for i in range(150):
                fh, _ = await fs.create(dd.ino, f"file{i}")
                await fs.write(fh, 0, b"q" * 5000)
                await fs.release(fh)
        await fs.unmount()
        await dev.close()
    run(fill)
    import time
    t0 = time.monotonic()
    res, lines = check(path)
    took = time.monotonic() - t0
    assert res.exit_code == 0, "\n".join(lines)
    assert res.files == 3000
    assert took < 10, took


def test_resource_through_the_daemon(tmp_path):
    """TARGET as a resource name of replfs.conf, opened through replfsd."""
    from replfs.localpair import LocalPair
    pair = LocalPair(tmp_path, size=96 * MiB)
    try:
        pair.up_fresh()
        a = pair.alpha
        common = ["-c", a.conf, "--rundir", a.rundir]
        env = dict(a.env, REPLFS_NODE=a.name)
        mkfs = os.path.join(os.path.dirname(sys.executable), "mkfs.replfs")
        r = subprocess.run([mkfs, "-q", *common, "r0"], capture_output=True, text=True, env=env)
        assert r.returncode == 0, r.stdout + r.stderr
        r = subprocess.run([FSCK, "-n", *common, "r0"], capture_output=True, text=True,
                           env=env)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "Pass 5" in r.stdout
        r = subprocess.run([FSCK, "-y", *common, "--node", a.name, "r0"],
                           capture_output=True, text=True, env=env)
        assert r.returncode == 0, r.stdout + r.stderr
        r = subprocess.run([FSCK, "-n", *common, "nosuch"], capture_output=True, text=True,
                           env=env)
        assert r.returncode == 8 and "no resource" in r.stderr, r.stderr
    finally:
        pair.teardown()


def test_help_options_are_in_the_man_page():
    here = os.path.dirname(os.path.abspath(__file__))
    page = open(os.path.join(here, "..", "..", "man", "fsck.replfs.8")).read()
    page = page.replace("\\-", "-")
    for opt in ("-n", "--no", "-y", "--yes", "-p", "-a", "-f", "--force", "-v", "--verbose",
                "-c", "--config", "--node", "--rundir", "--help", "--version"):
        assert opt in fsck.HELP, opt
        assert opt in page, opt
    for code in ("0", "1", "2", "4", "8", "16", "32"):
        assert f".B {code}\n" in page
