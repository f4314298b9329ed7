"""Power cuts at arbitrary writes.  A workload runs on a CrashDevice that
dies at write N; the disk is then left with everything flushed plus a
random subset of the unflushed writes.  The next mount must replay the
journal and find a consistent volume holding everything fsync'd."""
from __future__ import annotations

import os
import random

import pytest

from replfs.blockdev import FileBlockDevice
from replfs.fs.core import Filesystem
from tests import soak

from .conftest import CrashDevice, PowerCut, check_volume, format_image, make_image  # noqa: F401


async def workload(fs: Filesystem, rng: random.Random, durable: dict, log: list):
    """Files under /w; ``durable`` is updated with name -> content after
    each fsync that returned.  Names are never reused, so a file that
    was fsync'd and not touched since must be there, byte for byte."""
    d = await fs.mkdir(fs.root_ino, "w")
    await fs.fsync()
    live: dict[str, bytes] = {}
    for step in range(60):
        r = rng.random()
        if r < 0.45 or not live:
            name = f"f{step}"
            data = rng.randbytes(rng.choice([0, 100, 5000, 20000, 70000]))
            fh, _ = await fs.create(d.ino, name)
            if data:
                await fs.write(fh, 0, data)
            await fs.release(fh)
            live[name] = data
        elif r < 0.6:
            name = rng.choice(sorted(live))
            a = await fs.lookup(d.ino, name)
            fh = await fs.open(a.ino, os.O_RDWR)
            extra = rng.randbytes(3000)
            await fs.write(fh, len(live[name]), extra)
            await fs.release(fh)
            live[name] += extra
        elif r < 0.75:
            name = rng.choice(sorted(live))
            await fs.unlink(d.ino, name)
            del live[name]
        elif r < 0.85:
            name = rng.choice(sorted(live))
            new = f"r{step}"
            await fs.rename(d.ino, name, d.ino, new)
            live[new] = live.pop(name)
        else:
            await fs.mkdir(d.ino, f"d{step}")
        if rng.random() < 0.2:
            await fs.fsync()
            durable.clear()
            durable.update(live)
            log.append(step)
    await fs.fsync()
    durable.clear()
    durable.update(live)


async def run_crash(path: str, seed: int, crash_after: int | None) -> tuple[int, dict]:
    make_image(path, 64 << 20)
    await format_image(path, slots=2)
    dev = CrashDevice(path, crash_after)
    durable: dict[str, bytes] = {}
    try:
        fs = await Filesystem.mount(dev)
        await workload(fs, random.Random(seed), durable, [])
        await fs.unmount()
    except PowerCut:
        pass
    except OSError as e:
        # after the power cut the filesystem latches failed: EIO/EROFS
        assert dev.dead, e
    await dev.settle(random.Random(seed * 7 + (crash_after or 0)))
    await dev.inner.close()
    return dev.writes, durable


async def verify(path: str, durable: dict) -> None:
    dev = FileBlockDevice(path)
    fs = await Filesystem.mount(dev)
    try:
        d = await fs.lookup(fs.root_ino, "w")
    except OSError:
        assert not durable
        d = None
    if d is not None:
        names = {n.decode(): i for n, i, _ in await fs.readdir(d.ino)}
        for name, data in durable.items():
            # names are never reused; a durable file may since have been
            # renamed, unlinked or appended to, but a file that is there
            # under its durable name holds at least its durable bytes
            if name in names:
                a = await fs.getattr(names[name])
                fh = await fs.open(a.ino)
                got = await fs.read(fh, 0, a.size)
                await fs.release(fh)
                assert got[:len(data)] == data, name
    await fs.unmount()
    problems = await check_volume(dev)
    await dev.close()
    assert not problems, problems


async def _crash_case(tmp_path, seed, points):
    path = str(tmp_path / "crash.img")
    total, _ = await run_crash(path, seed, None)
    rng = random.Random(seed)
    for n in sorted(rng.sample(range(1, total), min(points, total - 1))):
        _, durable = await run_crash(path, seed, n)
        await verify(path, durable)


@pytest.mark.parametrize("seed", [1, 2])
async def test_power_cut_at_random_writes(tmp_path, seed):
    await _crash_case(tmp_path, seed, 20)


async def test_fsynced_files_survive_exactly(tmp_path):
    """Everything fsync'd and not touched afterwards is there byte for byte."""
    path = str(tmp_path / "v.img")
    make_image(path, 64 << 20)
    await format_image(path, slots=2)
    dev = CrashDevice(path)
    fs = await Filesystem.mount(dev)
    files = {}
    for i in range(20):
        data = os.urandom(i * 1500)
        fh, a = await fs.create(fs.root_ino, f"f{i}")
        await fs.write(fh, 0, data)
        await fs.release(fh)
        files[f"f{i}"] = (a.ino, data)
    await fs.fsync()
    # more work that is never synced, then the power goes
    for i in range(20, 30):
        fh, _ = await fs.create(fs.root_ino, f"f{i}")
        await fs.write(fh, 0, b"late")
        await fs.release(fh)
    await fs.unlink(fs.root_ino, "f3")
    await dev.settle(random.Random(5))
    await dev.inner.close()
    dev = FileBlockDevice(path)
    fs = await Filesystem.mount(dev)
    assert fs.recovered_slots == [0]
    for name, (ino, data) in files.items():
        if name == "f3":
            continue
        a = await fs.lookup(fs.root_ino, name)
        assert a.ino == ino
        fh = await fs.open(ino)
        assert await fs.read(fh, 0, len(data) + 1) == data
        await fs.release(fh)
    await fs.unmount()
    assert not await check_volume(dev)
    await dev.close()


async def test_replay_of_other_slot(tmp_path):
    """A node mounted in slot 1 dies; a mount in slot 0 recovers it."""
    path = str(tmp_path / "v.img")
    make_image(path, 64 << 20)
    await format_image(path, slots=2)
    dev = CrashDevice(path)
    fs = await Filesystem.mount(dev, 1)
    fh, a = await fs.create(fs.root_ino, "from-slot-1")
    await fs.write(fh, 0, b"payload" * 1000)
    fh2, b = await fs.create(fs.root_ino, "orphan")
    await fs.write(fh2, 0, b"x" * 50000)
    await fs.unlink(fs.root_ino, "orphan")
    await fs.fsync()
    await dev.settle(None)
    await dev.inner.close()
    dev = FileBlockDevice(path)
    fs = await Filesystem.mount(dev, 0)
    assert fs.recovered_slots == [1]
    a2 = await fs.lookup(fs.root_ino, "from-slot-1")
    assert a2.ino == a.ino and a2.size == 7000
    with pytest.raises(OSError):
        await fs.getattr(b.ino)
    await fs.unmount()
    assert not await check_volume(dev)
    await dev.close()
    del fh, fh2


@pytest.mark.soak(twin="test_power_cut_at_random_writes")
@pytest.mark.parametrize("seed", soak.seeds(range(3, 23)))
async def test_power_cut_soak(tmp_path, seed):
    # full: a power cut at every write of the run; smoke: 20 of them
    await _crash_case(tmp_path, seed, soak.size(10 ** 6, 20))



async def _one_file(tmp_path, **fmt):
    """A fresh two-slot volume on a CrashDevice, mounted, with one file
    "f" created and open: (device, filesystem, handle, attributes)."""
    path = str(tmp_path / "v.img")
    make_image(path, 64 << 20)
    await format_image(path, slots=2, **fmt)
    dev = CrashDevice(path)
    fs = await Filesystem.mount(dev)
    fh, a = await fs.create(fs.root_ino, "f")
    return dev, fs, fh, a


async def test_fsync_flushes_twice_and_still_flushes_with_nothing_to_commit(tmp_path):
    """A fsync that commits the file's changes relies on the journal
    commit's two flushes (data written before the first; the home writes
    after the record are the journal's to replay): two flushes, not
    three, and the data survives a power cut.  A fsync that finds nothing
    to commit (another commit took the metadata, possibly before data
    written in place was flushed) must flush itself."""
    dev, fs, fh, a = await _one_file(tmp_path)
    await fs.write(fh, 0, b"a" * 8192)
    before = dev.flushes
    await fs.fsync(fh)
    assert dev.flushes - before == 2
    before = dev.flushes
    await fs.fsync(fh)
    assert dev.flushes - before == 1, "a fsync with nothing to commit did not flush"
    await fs.release(fh)
    await dev.settle(random.Random(1))       # the power goes: unflushed writes may vanish
    await dev.inner.close()
    dev = FileBlockDevice(dev.inner.path)
    fs = await Filesystem.mount(dev)
    fh = await fs.open(a.ino)
    assert await fs.read(fh, 0, 8193) == b"a" * 8192
    await fs.release(fh)
    await fs.unmount()
    assert not await check_volume(dev)
    await dev.close()


async def test_fdatasync_of_an_overwrite_is_one_flush(tmp_path):
    """fdatasync after writes that moved only the timestamps (the size and
    the clusters as committed) flushes, writes no journal record, and the
    data survives a power cut; after a write that grows the file it
    commits (the new size is what reaching the data needs)."""
    dev, fs, fh, a = await _one_file(tmp_path)
    await fs.write(fh, 0, b"a" * 8192)
    await fs.fsync(fh, datasync=True)         # allocates: commits
    await fs.write(fh, 100, b"b" * 4000)
    writes, flushes = dev.writes, dev.flushes
    await fs.fsync(fh, datasync=True)
    assert (dev.writes - writes, dev.flushes - flushes) == (0, 1)
    await fs.write(fh, 8192, b"c" * 10)       # grows: the size must be committed
    writes = dev.writes
    await fs.fsync(fh, datasync=True)
    assert dev.writes - writes >= 1, "an fdatasync after a size change wrote no record"
    await fs.write(fh, 0, b"d" * 10)
    flushes = dev.flushes
    await fs.fsync(fh, datasync=False)        # fsync commits the timestamps too
    assert dev.flushes - flushes == 2
    await fs.write(fh, 20, b"e" * 10)
    await fs.fsync(fh, datasync=True)
    await fs.release(fh)
    await dev.settle(random.Random(2))        # the power goes
    await dev.inner.close()
    dev = FileBlockDevice(dev.inner.path)
    fs = await Filesystem.mount(dev)
    fh = await fs.open(a.ino)
    want = bytearray(b"a" * 8192 + b"c" * 10)
    want[100:4100] = b"b" * 4000
    want[0:10] = b"d" * 10
    want[20:30] = b"e" * 10
    assert await fs.read(fh, 0, 9000) == bytes(want)
    await fs.release(fh)
    await fs.unmount()
    assert not await check_volume(dev)
    await dev.close()


async def test_power_cut_right_after_a_journal_wrap_keeps_fsynced_appends(tmp_path):
    """fsync'd appends log the same inode (and allocation) blocks again in
    every transaction, their home writes owed from one commit to the next.
    When a commit wraps the log, its checkpoint retires the record that
    holds the last committed images before the new record is durable: the
    owed home writes -- all of them, those the new record logs again
    included -- must have landed first.  The power goes right after that
    checkpoint, before the new record lands."""
    from replfs.fs.mkfs import MIN_JOURNAL_BLOCKS
    dev, fs, fh, a = await _one_file(tmp_path, journal_size=MIN_JOURNAL_BLOCKS * 4096)
    await fs.fsync(fh)
    real_checkpoint = fs.journal.checkpoint
    wraps = []

    async def checkpoint_then_power_cut():
        await real_checkpoint()
        wraps.append(dev.writes)
        dev.crash_after = dev.writes        # the next write -- the record -- never lands
    fs.journal.checkpoint = checkpoint_then_power_cut
    durable = 0
    with pytest.raises(PowerCut):
        for i in range(10_000):
            await fs.write(fh, durable, bytes([i % 251 + 1]) * 4096)
            await fs.fsync(fh)
            durable += 4096
    assert wraps and durable > 0
    fs2 = await Filesystem.mount(await _crashed_device(dev))
    got = await fs2.getattr(a.ino)
    assert got.size >= durable, (got.size, durable)
    fh2 = await fs2.open(a.ino)
    data = await fs2.read(fh2, 0, durable)
    assert data == b"".join(bytes([i % 251 + 1]) * 4096 for i in range(durable // 4096))
    await fs2.release(fh2)
    await fs2.unmount()
    assert not await check_volume(fs2.dev)
    await fs2.dev.close()


async def _crashed_device(dev: CrashDevice) -> FileBlockDevice:
    """The power is cut: only what was flushed is kept."""
    await dev.settle(None)
    await dev.inner.close()
    return FileBlockDevice(dev.inner.path)
