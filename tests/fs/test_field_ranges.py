"""Every value the core writes on disk against the format's range: times
(the wide-time feature and the clamp of older volumes), ids, device
numbers; and a commit that cannot encode a block latches read-only
without taking anything that is committed with it.

Regression tests for issue 12 ("a timestamp out of range loses data"):
before the fix a time past 2262 was accepted and the next commit died
with struct.error.
"""
from __future__ import annotations

import errno

import pytest

from replfs.blockdev import FileBlockDevice
from replfs.fs import format as F
from replfs.fs.core import Filesystem

from .conftest import check_image, format_image, make_image, remount

NS = 10 ** 9
YEAR_2300 = 10413792000 * NS          # 2300-01-01T00:00:00Z
YEAR_1600 = -11676096000 * NS         # 1600-01-01T00:00:00Z
S64_MAX_SEC = (1 << 63) - 1


async def expect_errno(code, coro):
    with pytest.raises(OSError) as ei:
        await coro
    assert ei.value.errno == code, ei.value


async def mkfile(fs, name):
    fh, a = await fs.create(fs.root_ino, name)
    await fs.release(fh)
    return a.ino


@pytest.mark.parametrize("t", [YEAR_2300, YEAR_1600, S64_MAX_SEC * NS + NS - 1,
                               -(1 << 63) * NS, 0, -1, 1])
async def test_any_time_utimensat_can_pass_is_stored_exactly(fs, t):
    ino = await mkfile(fs, "f")
    a = await fs.setattr(ino, atime_ns=t, mtime_ns=t, ctime_ns=t)
    assert (a.atime_ns, a.mtime_ns, a.ctime_ns) == (t, t, t)
    await fs.sync()
    fs = await remount(fs)
    a = await fs.getattr(ino)
    assert (a.atime_ns, a.mtime_ns, a.ctime_ns) == (t, t, t)


async def test_new_volumes_have_the_wide_time_feature(fs):
    assert fs.sb.feat_incompat & F.FEATURE_INCOMPAT_WIDE_TIME
    ino = await mkfile(fs, "f")
    await fs.sync()
    raw = await fs.dev.read(ino * fs.bs, fs.bs)
    assert F.Inode.decode(raw, fs.sb.volid, ino).flags & F.INODE_FLAG_WIDE_TIME


async def test_wide_inode_decodes_bad_nanoseconds_as_corrupt():
    i = F.Inode(64, mode=0o100644, flags=F.INODE_FLAG_VALID | F.INODE_FLAG_WIDE_TIME,
                mtime_ns=YEAR_2300 + 5)
    raw = bytearray(i.encode(4096, 7))
    assert F.Inode.decode(bytes(raw), 7, 64).mtime_ns == YEAR_2300 + 5
    F.INODE_NSEC.pack_into(raw, F.INODE_NSEC_OFF, 0, NS, 0)
    F.seal(raw, F.SIG_INODE, 7, 64)
    with pytest.raises(F.FormatError):
        F.Inode.decode(bytes(raw), 7, 64)


@pytest.fixture
async def old_image(tmp_path):
    """A volume of the format before the wide-time feature."""
    path = make_image(tmp_path / "old.img")
    await format_image(path, wide_time=False)
    return path


async def test_old_volume_clamps_to_its_range_and_replies_the_clamped_time(old_image):
    dev = FileBlockDevice(old_image)
    fs = await Filesystem.mount(dev)
    assert not fs.wide_time
    ino = await mkfile(fs, "f")
    a = await fs.setattr(ino, atime_ns=YEAR_1600, mtime_ns=YEAR_2300)
    # what the caller (and so the kernel's cache) gets is what is stored
    assert a.atime_ns == F.NARROW_TIME_RANGE[0] and a.mtime_ns == F.NARROW_TIME_RANGE[1]
    await fs.unmount()
    fs = await Filesystem.mount(dev)
    a = await fs.getattr(ino)
    assert a.atime_ns == F.NARROW_TIME_RANGE[0] and a.mtime_ns == F.NARROW_TIME_RANGE[1]
    await fs.unmount()
    await dev.close()
    raw_sb = F.Superblock.decode(open(old_image, "rb").read(F.SB_OFFSET + 4096)[F.SB_OFFSET:],
                                 F.sb_blkno(4096))
    assert not raw_sb.feat_incompat & F.FEATURE_INCOMPAT_WIDE_TIME
    assert await check_image(old_image) == []


async def test_clock_past_the_range_of_an_old_volume_does_not_break_commits(
        old_image, monkeypatch):
    import replfs.fs.core as core
    monkeypatch.setattr(core, "_now", lambda: YEAR_2300 * 2)
    dev = FileBlockDevice(old_image)
    fs = await Filesystem.mount(dev)
    ino = await mkfile(fs, "f")
    await fs.sync()
    assert fs.failed is None
    assert (await fs.getattr(ino)).mtime_ns == F.NARROW_TIME_RANGE[1]
    await fs.unmount()
    await dev.close()
    assert await check_image(old_image) == []


async def test_fsck_converts_a_wide_inode_on_an_old_volume(old_image):
    from replfs.fs import fsck
    dev = FileBlockDevice(old_image)
    fs = await Filesystem.mount(dev)
    ino = await mkfile(fs, "f")
    await fs.unmount()
    await dev.close()
    # damage: the inode claims wide times the volume cannot have
    with open(old_image, "r+b") as f:
        f.seek(ino * 4096)
        i = F.Inode.decode(f.read(4096), fs.sb.volid, ino)
        i.flags |= F.INODE_FLAG_WIDE_TIME
        f.seek(ino * 4096)
        f.write(i.encode(4096, fs.sb.volid))
    lines: list[str] = []
    dev = FileBlockDevice(old_image)
    try:
        res = await fsck.check(dev, out=lines.append)
        assert res.errors_found >= 1
        assert any("wide timestamps" in ln for ln in lines), lines
        res = await fsck.check(dev, repair=True, out=None, answer="yes")
        assert res.errors_fixed >= 1
        res = await fsck.check(dev, out=None)
        assert res.errors_found == 0
    finally:
        await dev.close()
    assert await check_image(old_image) == []


@pytest.mark.parametrize("field,value", [("uid", 1 << 32), ("gid", -1), ("uid", F.U32_MAX)])
async def test_ids_out_of_range_are_refused_before_anything_changes(fs, field, value):
    ino = await mkfile(fs, "f")
    await expect_errno(errno.EINVAL, fs.setattr(ino, **{field: value}))
    await expect_errno(errno.EINVAL, fs.create(fs.root_ino, "g", uid=value)
                       if field == "uid" else fs.mkdir(fs.root_ino, "g", gid=value))
    assert fs.failed is None
    a = await fs.setattr(ino, **{field: F.U32_MAX - 1})
    assert getattr(a, field) == F.U32_MAX - 1
    await fs.sync()


async def test_device_number_range(fs):
    big = (1 << 64) - 1
    a = await fs.mknod(fs.root_ino, "dev", 0o20644, big)
    assert a.rdev == big
    await expect_errno(errno.EINVAL, fs.mknod(fs.root_ino, "bad", 0o20644, 1 << 64))
    await fs.sync()


async def test_a_block_that_cannot_be_encoded_latches_read_only_and_reads_go_on(image, caplog):
    """Defence in depth: if a bug lets a bad value through, the commit
    must latch read-only with a clear log line, raise EIO (not a
    struct.error that ends the mount), and keep serving committed data."""
    import logging
    caplog.set_level(logging.ERROR, logger="replfs.fs")
    dev = FileBlockDevice(image)
    fs = await Filesystem.mount(dev)
    kept = await mkfile(fs, "kept")
    fh, _ = await fs.create(fs.root_ino, "data")
    await fs.write(fh, 0, b"committed bytes")
    await fs.release(fh)
    await fs.sync()
    ino = await mkfile(fs, "bad")
    inode = await fs._inode(ino)
    inode.nlink = 1 << 40                  # what no operation can produce
    fs._dirty(inode)
    await expect_errno(errno.EIO, fs.sync())
    assert fs.failed and "read-only" in caplog.text
    await expect_errno(errno.EROFS, fs.mkdir(fs.root_ino, "more"))
    # reads of what is committed go on
    assert (await fs.getattr(kept)).nlink == 1
    e = await fs.lookup(fs.root_ino, "data")
    fh = await fs.open(e.ino)
    assert await fs.read(fh, 0, 100) == b"committed bytes"
    await fs.release(fh)
    await expect_errno(errno.ENOENT, fs.lookup(fs.root_ino, "bad"))
    await expect_errno(errno.EROFS, fs.open(e.ino, 1))
    # the commit loop survives the latch
    import trio
    with trio.move_on_after(0.3):
        await fs.commit_loop(0.05)
    await fs.unmount()
    # the next mount replays what was committed; the bad inode never was
    fs = await Filesystem.mount(dev)
    assert fs.recovered_slots == [0]
    assert (await fs.lookup(fs.root_ino, "kept")).ino == kept
    await expect_errno(errno.ENOENT, fs.lookup(fs.root_ino, "bad"))
    await fs.unmount()
    await dev.close()
    assert await check_image(image) == []


async def test_an_operation_that_hangs_below_answers_eio_after_the_timeout(image):
    """timeout=: a request whose device I/O hangs (a peer that stopped
    answering under protocol C, suspended I/O) is answered EIO instead of
    blocking its caller for ever."""
    import trio
    from replfs import fuse
    from replfs.fs.fuseops import ReplfsOperations

    class Hanging(FileBlockDevice):
        hang = False

        async def read(self, off, n):
            if self.hang:
                await trio.sleep_forever()
            return await super().read(off, n)

    dev = Hanging(image)
    fs = await Filesystem.mount(dev)
    ops = ReplfsOperations(fs, op_timeout=0.2)
    fs.cache.drop_clean()
    dev.hang = True
    with trio.fail_after(5):
        with pytest.raises(fuse.FUSEError) as ei:
            await ops.getattr(fuse.ROOT_INODE)
    assert ei.value.errno == errno.EIO
    assert ops.counters["timeouts"] == 1
    dev.hang = False
    await fs.unmount()
    await dev.close()
