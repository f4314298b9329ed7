"""mkfs.replfs: the function, the geometries it accepts, the command line."""
from __future__ import annotations

import os
import stat

import pytest

from replfs.blockdev import FileBlockDevice
from replfs.fs import format as F
from replfs.fs.core import Filesystem, read_superblock
from replfs.fs.mkfs import (MkfsError, detect_signature, main, make_filesystem,
                            mounted_source, parse_size)

from .conftest import check_image, make_image


async def test_output_and_superblock(tmp_path):
    path = make_image(tmp_path / "v.img", 64 << 20)
    lines = []
    dev = FileBlockDevice(path)
    sb = await make_filesystem(dev, slots=3, label="data", out=lines.append)
    await dev.close()
    text = "\n".join(lines)
    for want in ("Label: data", "Block size: 4096", "Cluster size: 4096", "Volume size: ",
                 "Cluster groups: ", "Journal size: ", "Node slots: 3",
                 "Creating bitmaps: done", "Initializing superblock: done",
                 "Writing system files: done", "Writing superblock: done",
                 "Writing backup superblock: 0 block(s)", "Formatting Journals: done",
                 "Writing lost+found: done", "mkfs.replfs successful"):
        assert want in text, want
    order = [text.index(x) for x in ("Creating bitmaps", "Initializing superblock",
                                     "Writing system files", "Writing superblock:",
                                     "Writing backup", "Formatting Journals",
                                     "Writing lost+found", "successful")]
    assert order == sorted(order)
    dev = FileBlockDevice(path)
    got = await read_superblock(dev)
    await dev.close()
    assert got.label == "data" and got.slot_count == 3 and got.uuid == sb.uuid
    assert got.lostfound_ino and got.root_ino
    assert not await check_image(path)


@pytest.mark.parametrize("bs,cs,size", [(512, 4096, 40 << 20), (1024, 1024, 40 << 20),
                                        (2048, 65536, 64 << 20), (8192, 8192, 64 << 20),
                                        (4096, 1 << 20, 256 << 20)])
async def test_geometries_mount_and_work(tmp_path, bs, cs, size):
    path = make_image(tmp_path / "v.img", size)
    dev = FileBlockDevice(path)
    await make_filesystem(dev, block_size=bs, cluster_size=cs, slots=2, out=None)
    fs = await Filesystem.mount(dev)
    d = await fs.mkdir(fs.root_ino, "d")
    data = os.urandom(3 * cs + 17)
    n = 300 if cs <= 65536 else 60        # an inode takes a whole cluster
    for i in range(n):
        fh, a = await fs.create(d.ino, f"f{i}")
        if i % 50 == 0:
            await fs.write(fh, 0, data)
        await fs.release(fh)
    await fs.setxattr(d.ino, "user.x", b"v" * (bs // 4))
    await fs.symlink(fs.root_ino, "l", "d/f0")
    await fs.unmount()
    fs = await Filesystem.mount(dev)
    a = await fs.lookup(d.ino, "f50")
    fh = await fs.open(a.ino)
    assert await fs.read(fh, 0, len(data)) == data
    await fs.release(fh)
    assert len(await fs.readdir(d.ino)) == n
    await fs.unmount()
    await dev.close()
    assert not await check_image(path)


async def test_backup_superblocks(tmp_path):
    path = make_image(tmp_path / "v.img", (1 << 30) + (64 << 20))
    lines = []
    dev = FileBlockDevice(path)
    sb = await make_filesystem(dev, out=lines.append)
    assert "Writing backup superblock: 1 block(s)" in lines
    raw = await dev.read(1 << 30, 4096)
    assert F.Superblock.decode(raw, (1 << 30) // 4096).uuid == sb.uuid
    await dev.close()
    assert not await check_image(path)


async def test_bad_parameters(tmp_path):
    path = make_image(tmp_path / "v.img", 64 << 20)
    dev = FileBlockDevice(path)
    for kw in (dict(block_size=3000), dict(cluster_size=2048), dict(cluster_size=3 << 12),
               dict(slots=0), dict(slots=1000), dict(label="x" * 65),
               dict(journal_size=4096), dict(journal_size=1 << 30)):
        with pytest.raises(MkfsError):
            await make_filesystem(dev, out=None, **kw)
    await dev.close()
    small = make_image(tmp_path / "s.img", 4 << 20)
    dev = FileBlockDevice(small)
    with pytest.raises(MkfsError, match="too small"):
        await make_filesystem(dev, out=None)
    await dev.close()


def test_parse_size():
    assert parse_size("4096") == 4096
    assert parse_size("4k") == 4096
    assert parse_size("16M") == 16 << 20
    assert parse_size("2G") == 2 << 30
    assert parse_size("1MB") == 1 << 20
    for bad in ("", "x", "-1", "0", "1.5M"):
        with pytest.raises(MkfsError):
            parse_size(bad)


def test_signatures():
    def probe_of(buf):
        return lambda o, n: buf[o:o + n]
    blank = bytearray(70000)
    assert detect_signature(bytes(blank), probe_of(blank)) is None
    ext = bytearray(blank)
    ext[1080:1082] = b"\x53\xef"
    assert "ext" in detect_signature(bytes(ext), probe_of(ext))
    xfs = bytearray(blank)
    xfs[:4] = b"XFSB"
    assert "XFS" in detect_signature(bytes(xfs), probe_of(xfs))
    btr = bytearray(blank)
    btr[0x10040:0x10048] = b"_BHRfS_M"
    assert "btrfs" in detect_signature(bytes(btr), probe_of(btr))
    ocfs = bytearray(blank)
    ocfs[8192:8198] = b"OCFSV2"
    assert "OCFS2" in detect_signature(bytes(ocfs), probe_of(ocfs))


def test_mounted_source(tmp_path):
    info = tmp_path / "mountinfo"
    info.write_text("36 35 98:0 / /mnt/a rw,noatime shared:1 - ext4 /dev/vdz9 rw\n"
                    "37 35 98:0 / /mnt/with\\040space rw - fuse.replfs r0 rw\n")
    assert mounted_source("/dev/vdz9", str(info)) == "/mnt/a"
    assert mounted_source("r0", str(info)) == "/mnt/with space"
    assert mounted_source("/dev/other", str(info)) is None


def test_cli(tmp_path, capsys):
    path = make_image(tmp_path / "v.img", 64 << 20)
    assert main(["-L", "x", "-N", "2", "-b", "1K", "-C", "4K", "-J", "size=2M", path]) == 0
    out = capsys.readouterr().out
    assert "Block size: 1024" in out and "Node slots: 2" in out and "successful" in out
    # a second run refuses: the target holds a replfs filesystem
    assert main([path]) == 1
    err = capsys.readouterr().err
    assert "replfs filesystem" in err and "-F" in err
    assert main(["-F", "-q", path]) == 0
    assert capsys.readouterr().out == ""
    ext = make_image(tmp_path / "ext.img", 64 << 20)
    with open(ext, "r+b") as f:
        f.seek(1080)
        f.write(b"\x53\xef")
    assert main([ext]) == 1
    assert "ext2/ext3/ext4" in capsys.readouterr().err
    assert main(["-b", "3000", path]) == 1
    assert "invalid block size" in capsys.readouterr().err
    assert main(["-J", "bogus=1", "-F", path]) == 1
    assert main(["--no-such-option", path]) == 1
    assert main([]) == 1
    conf = tmp_path / "replfs.conf"
    conf.write_text("")
    assert main(["-c", str(conf), "no-such-resource"]) == 1
    assert "no resource" in capsys.readouterr().err
    assert main(["--version"]) == 0
    assert main(["--help"]) == 0
    assert "mkfs.replfs" in capsys.readouterr().out
    assert stat.S_ISREG(os.stat(path).st_mode)
