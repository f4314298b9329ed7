"""The driver's side of an online grow (LocalDisk.grow and attach's search
for the superblock), on real files: a crash at any point of the meta-data
move leaves either the old superblock or the new one valid, and attach
finds it; a disk grown while the resource was down is found too."""
import os

import pytest
import trio

from replfs.blockrepl.conf.model import Host
from replfs.blockrepl.core.bitmap import BLOCK, Bitmap
from replfs.blockrepl.driver import disk as D
from replfs.blockrepl.meta import format as md
from replfs.errors import ReplfsError

MIB = 1024 * 1024


class Crash(Exception):
    pass


@pytest.fixture
def host(tmp_path, monkeypatch):
    monkeypatch.setenv("REPLFS_STATEDIR", str(tmp_path / "state"))
    path = str(tmp_path / "disk.img")
    with open(path, "wb") as f:
        f.truncate(4 * MIB)
    h = Host("alpha", str(tmp_path / "drbd0"), 0, path, "127.0.0.1", 7789)
    D.create_md(h)
    return h


def grow_file(h, size):
    with open(h.disk, "r+b") as f:
        f.truncate(size)


async def attach(h) -> D.LocalDisk:
    d = D.LocalDisk(h, 61)
    await d.load(mark_al=False)
    return d


def grow_args(d, disk_size, mark=True):
    old = d.layout
    size, why = md.max_grown_size(old, disk_size)
    assert size > old.data_size, why
    lay = md.grown_layout(old, disk_size, size)
    bits = d.bitmap.grown_bytes(size // BLOCK, set_new=mark)
    sb = md.Superblock(size, d.sb.uuids, d.sb.flags, d.sb.device_uuid, d.sb.al_extents, lay)
    return lay, bits, (3, 5), sb


@pytest.mark.parametrize("crash_at", ["bitmap", "al", "superblock", None])
def test_a_crash_during_the_move_leaves_one_valid_superblock(host, crash_at):
    async def main():
        d = await attach(host)
        old = d.layout
        grow_file(host, 8 * MIB)
        lay, bits, al, sb = grow_args(d, 8 * MIB)
        real_write = d.meta.write

        async def write(offset, data):
            where = {lay.bm_offset: "bitmap", lay.al_offset: "al",
                     lay.sb_offset: "superblock"}.get(offset)
            if where == crash_at:
                raise Crash(where)
            await real_write(offset, data)
        d.meta.write = write
        try:
            await d.grow(lay, bits, al, sb)
        except Crash:
            pass
        await d.close()
        # (what the old meta-data said is still where it was)
        after = await attach(host)
        try:
            if crash_at is None:
                assert after.layout == lay and after.sb.data_size == sb.data_size
                assert after.bitmap.count == (sb.data_size - old.data_size) // BLOCK
                assert sorted(after.al_extents_on_disk) == [3, 5]
                assert D.read_size_hints(host.disk) == [8 * MIB]
            else:
                assert after.layout == old and after.sb.data_size == old.data_size
                assert after.bitmap.count == 0
                assert after.data.size == old.data_size
        finally:
            await after.close()
    trio.run(main)


def test_a_disk_grown_while_down_is_found_by_the_recorded_size(host):
    async def main():
        d = await attach(host)
        old = d.layout
        await d.close()
        assert D.read_size_hints(host.disk) == [4 * MIB]
        grow_file(host, 9 * MIB)
        d = await attach(host)
        assert d.layout == old and d.data.size == old.data_size
        await d.close()
        # Without the record, the superblock is not found: said clearly.
        os.unlink(D._hints_path(host.disk))
        with pytest.raises(ReplfsError, match="create-md"):
            D.LocalDisk(host, 61)
    trio.run(main)


def test_a_shrunk_disk_is_refused_at_attach(host):
    async def main():
        d = await attach(host)
        grow_file(host, 8 * MIB)
        await d.grow(*grow_args(d, 8 * MIB))
        await d.close()
        grow_file(host, 6 * MIB)
        grow_file(host, 8 * MIB - 1)     # (a few bytes short: still not the old end)
        with pytest.raises(ReplfsError):
            D.LocalDisk(host, 61)
    trio.run(main)


def test_external_meta_data_grows_its_bitmap_in_place(tmp_path, monkeypatch):
    from replfs.blockrepl.conf.model import MetaDisk
    monkeypatch.setenv("REPLFS_STATEDIR", str(tmp_path / "state"))
    data, meta = str(tmp_path / "data.img"), str(tmp_path / "meta.img")
    for path, size in ((data, 4 * MIB), (meta, 2 * md.EXTERNAL_SLOT)):
        with open(path, "wb") as f:
            f.truncate(size)
    h = Host("alpha", str(tmp_path / "drbd0"), 0, data, "127.0.0.1", 7789,
             MetaDisk(False, meta, 1))
    D.create_md(h)

    async def main():
        d = await attach(h)
        old = d.layout
        assert old.sb_offset == md.EXTERNAL_SLOT and old.data_size == 4 * MIB
        grow_file(h, 64 * MIB)
        lay, bits, al, sb = grow_args(d, 64 * MIB)
        assert lay.data_size == 64 * MIB and lay.bm_offset == old.bm_offset
        await d.grow(lay, bits, al, sb)
        await d.close()
        d = await attach(h)
        assert d.sb.data_size == 64 * MIB and d.data.size == 64 * MIB
        assert d.bitmap.count == (60 * MIB) // BLOCK
        await d.close()
        # the slot's limit: about 4 TiB of data
        most, why = md.max_grown_size(lay, 8 << 40)
        assert most < 8 << 40 and "128 MiB" in why
    trio.run(main)
