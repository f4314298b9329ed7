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


def test_cluster_shared_by_two_files(populated):
    a = inode_of(populated.path, populated.ino["lonely"])
    b = inode_of(populated.path, populated.ino["sparse"])
    l, p, n = b.root[0]
    a.root.append((100, p, 1))
    a.clusters += 1
    a.size = 101 * sb_of(populated.path).cluster_size
    put_inode(populated.path, a)
    damage_cycle(populated.path, "overlaps")


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

    async def go():
        dev = FileBlockDevice(path)
        fs = await Filesystem.mount(dev, 0)
        fh, a = await fs.create(fs.root_ino, "open-then-unlinked")
        await fs.write(fh, 0, b"z" * 100000)
        await fs.unlink(fs.root_ino, "open-then-unlinked")
        await fs.sync()
        # crash: no release, no unmount; the journal is committed and home
        # writes done, so simulate the node's death by cleaning the journal
        # and slot map as a replaying survivor would before freeing orphans
        await dev.close()
        return a.ino
    ino = run(go)
    sb = sb_of(path)

    async def clean_journal():
        dev = FileBlockDevice(path)
        await J.replay(dev, sb, 0)
        raw = await dev.read(sb.slotmap_blk * sb.block_size, sb.block_size)
        sm = F.SlotMap.decode(raw, sb.volid, sb.slotmap_blk)
        sm.slots[0] = (F.SLOT_FREE, 0, sm.slots[0][2])
        await dev.write(sm.blkno * sb.block_size, sm.encode(sb.block_size, sb.volid))
        await dev.close()
    run(clean_journal)
    lines = damage_cycle(path, f"Orphan inode {ino}")
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
