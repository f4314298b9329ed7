"""Adversarial review of crash safety and allocation (journal, cache,
allocator, replay).  Each test names the failure it guards against."""
from __future__ import annotations

import errno
import os
import random

import pytest

from replfs.blockdev import FileBlockDevice
from replfs.fs import format as F
from replfs.fs import journal as J
from replfs.fs.core import Filesystem
from replfs.fs.mkfs import make_filesystem
from tests import soak

from .conftest import CrashDevice, PowerCut, check_volume, format_image, make_image


async def _crashed(dev: CrashDevice, rng=None) -> FileBlockDevice:
    """Power cut now: keep the flushed state (and a random subset of the
    unflushed writes when ``rng`` is given); return a fresh device."""
    await dev.settle(rng)
    await dev.inner.close()
    return FileBlockDevice(dev.inner.path)


async def _read_all(fs: Filesystem, ino: int) -> bytes:
    a = await fs.getattr(ino)
    fh = await fs.open(ino)
    try:
        return await fs.read(fh, 0, a.size)
    finally:
        await fs.release(fh)


async def _write_file(fs: Filesystem, parent: int, name: str, data: bytes) -> int:
    fh, a = await fs.create(parent, name)
    if data:
        await fs.write(fh, 0, data)
    await fs.release(fh)
    return a.ino


# ------------------------------------------------------------ replay and revokes

async def test_tombstone_of_deleted_inode_survives_a_crash(tmp_path):
    """A deleted inode is rewritten as a tombstone in the same transaction
    that frees (and revokes) its cluster.  Replay skipped every image
    revoked in a transaction at least as new, the tombstone included, so
    a crash between the commit and the home write brought the old inode
    back as valid: a stale inode number then read (and could write) the
    extents of a file whose clusters had been freed and reused."""
    path = make_image(tmp_path / "v.img", 64 << 20)
    await format_image(path, slots=2)
    dev = CrashDevice(path)
    fs = await Filesystem.mount(dev)
    secret = b"old file " * 1000
    ino = await _write_file(fs, fs.root_ino, "victim", secret)
    await fs.fsync()
    await fs.unlink(fs.root_ino, "victim")
    # a background commit (no fsync): the transaction is durable, its
    # home writes are not yet
    await fs.sync()
    assert any(off == ino * fs.bs for off, _, _ in dev.unflushed)
    dev2 = await _crashed(dev)  # the tombstone's home write never landed
    fs = await Filesystem.mount(dev2)
    with pytest.raises(OSError) as ei:
        await fs.getattr(ino)
    assert ei.value.errno in (errno.ESTALE, errno.ENOENT)
    await fs.unmount()
    assert not await check_volume(dev2)
    await dev2.close()


async def test_replay_never_writes_a_revoked_image_over_reused_data(tmp_path):
    """The other half of the revoke rule: a metadata block freed in
    transaction N and reused for file data must not get N's (or an older)
    image replayed over the data once a later transaction made the data
    reachable."""
    path = make_image(tmp_path / "v.img", 64 << 20)
    await format_image(path, slots=2)
    dev = CrashDevice(path)
    fs = await Filesystem.mount(dev)
    d = await fs.mkdir(fs.root_ino, "d")
    ino = await _write_file(fs, d.ino, "f", b"x")
    await fs.fsync()
    freed = {ino, d.ino}
    await fs.unlink(d.ino, "f")
    await fs.rmdir(fs.root_ino, "d")
    await fs.fsync()            # inode blocks revoked (and tombstoned)
    fs.alloc.hint = 0           # the window search wraps round
    data = os.urandom(64 << 10)
    new = await _write_file(fs, fs.root_ino, "data", data)
    await fs.fsync()            # data reachable, possibly in freed clusters
    exts = await fs.ext.load(await fs._inode(new))
    reused = {p << fs.shift for _, p, n in exts for p in range(p, p + n)} & freed
    assert reused, "the test expects the freed inode clusters to be reused"
    dev2 = await _crashed(dev)
    fs = await Filesystem.mount(dev2)
    assert await _read_all(fs, new) == data
    await fs.unmount()
    assert not await check_volume(dev2)
    await dev2.close()


async def test_replay_stops_at_a_stale_record_of_an_earlier_generation(tmp_path):
    """After a checkpoint the log restarts at block 1; blocks further on
    still hold complete, checksummed transactions of the previous
    generation.  They carry older sequence numbers and must never be
    replayed after the new ones."""
    path = make_image(tmp_path / "v.img", 64 << 20)
    await format_image(path, slots=2)
    dev = CrashDevice(path)
    fs = await Filesystem.mount(dev)
    a = await _write_file(fs, fs.root_ino, "a", b"1" * 5000)
    for i in range(30):
        fh = await fs.open(a, os.O_RDWR)
        await fs.write(fh, 0, b"%04d" % i)
        await fs.release(fh)
        await fs.setattr(a, mode=0o600 + (i % 64))
        await fs.fsync()
    head_before = fs.journal.head
    await fs.checkpoint()
    await fs.setattr(a, mode=0o644)
    await fs.fsync()
    assert fs.journal.head < head_before
    dev2 = await _crashed(dev)
    js, txns, _, _ = await J.read_transactions(dev2, fs.sb, 0)
    assert len(txns) == 1 and txns[0][0] == js.first_seq
    fs = await Filesystem.mount(dev2)
    assert (await fs.getattr(a)).mode & 0o777 == 0o644
    await fs.unmount()
    assert not await check_volume(dev2)
    await dev2.close()


# ------------------------------------------------------------ the metadata cache

async def _churn(fs: Filesystem, rng: random.Random, model: dict, d: int) -> None:
    """Creates, appends, overwrites, truncates, renames and unlinks in
    directory ``d``, mirrored in ``model`` (name -> bytes)."""
    for step in range(150):
        r = rng.random()
        if r < 0.35 or not model:
            name = f"f{step}"
            data = rng.randbytes(rng.choice([0, 700, 5000, 40000]))
            await _write_file(fs, d, name, data)
            model[name] = data
            continue
        name = rng.choice(sorted(model))
        ino = (await fs.lookup(d, name)).ino
        if r < 0.6:
            off = rng.randrange(0, len(model[name]) + 9000)
            data = rng.randbytes(rng.choice([10, 3000, 9000]))
            fh = await fs.open(ino, os.O_RDWR)
            await fs.write(fh, off, data)
            await fs.release(fh)
            old = model[name]
            old = old + bytes(max(0, off - len(old)))
            model[name] = old[:off] + data + old[off + len(data):]
        elif r < 0.7:
            size = rng.randrange(0, len(model[name]) + 1)
            await fs.setattr(ino, size=size)
            model[name] = model[name][:size]
        elif r < 0.85:
            new = f"r{step}"
            await fs.rename(d, name, d, new)
            model[new] = model.pop(name)
        else:
            await fs.unlink(d, name)
            del model[name]


@pytest.mark.parametrize("limit", [4, 12])
async def test_tiny_cache_never_loses_an_update(tmp_path, limit):
    """With a cache limit smaller than what one operation touches, an
    object an operation holds (clean when fetched) was evicted under it;
    the operation then changed and marked its copy, the next operation
    read the block again from disk and got the old contents, and whichever
    copy was marked last went into the transaction: lost sizes and
    extents, leaked or doubly-owned clusters."""
    path = make_image(tmp_path / "v.img", 64 << 20)
    await format_image(path, slots=2)
    dev = FileBlockDevice(path)
    fs = await Filesystem.mount(dev)
    fs.cache.limit = limit
    d = (await fs.mkdir(fs.root_ino, "w")).ino
    model: dict[str, bytes] = {}
    await _churn(fs, random.Random(limit), model, d)
    for name, data in model.items():
        assert await _read_all(fs, (await fs.lookup(d, name)).ino) == data, name
    await fs.unmount()
    problems = await check_volume(dev)
    assert not problems, problems
    fs = await Filesystem.mount(dev)
    for name, data in model.items():
        assert await _read_all(fs, (await fs.lookup(d, name)).ino) == data, name
    await fs.unmount()
    await dev.close()


# ------------------------------------------------------------ ENOSPC

async def _fill(fs: Filesystem, parent: int, name: str) -> int:
    """Write to a new file until the volume is full; returns its inode."""
    fh, a = await fs.create(parent, name)
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
    return a.ino


async def test_enospc_after_a_deferred_free_is_clean(tmp_path):
    """On a full volume with frees pending (an unlink not yet committed),
    an allocation commits to make the frees usable; when that is still
    not enough it answers ENOSPC.  The commit marked the allocator blocks,
    so the operation counted as having changed something and its ENOSPC
    latched the whole filesystem read-only."""
    path = make_image(tmp_path / "v.img", 24 << 20)
    await format_image(path, slots=2)
    dev = FileBlockDevice(path)
    fs = await Filesystem.mount(dev)
    small = await _write_file(fs, fs.root_ino, "small", b"s" * 100)
    big = await _fill(fs, fs.root_ino, "big")
    await fs.fsync()
    await fs.unlink(fs.root_ino, "small")          # 2 clusters pending
    fh = await fs.open(big, os.O_RDWR)
    size = (await fs.getattr(big)).size
    with pytest.raises(OSError) as ei:
        # needs far more than the two clusters the unlink gives back
        await fs.fallocate(fh, size, 64 * fs.cs)
    assert ei.value.errno == errno.ENOSPC
    assert fs.failed is None
    # a directory needs 4 clusters (inode, table, leaf, one spare); the
    # unlink gave back 2 (inode and data of "small")
    assert fs.alloc.free_clusters() < 4
    with pytest.raises(OSError) as ei:
        await fs.mkdir(fs.root_ino, "d" * 200)
    assert ei.value.errno == errno.ENOSPC
    assert fs.failed is None
    # the filesystem still works: the freed clusters are usable
    n = await fs.write(fh, (await fs.getattr(big)).size, b"x" * fs.cs)
    assert n == fs.cs
    await fs.release(fh)
    await fs.unmount()
    assert not await check_volume(dev)
    await dev.close()
    del small


async def test_enospc_in_reserve_after_a_deferred_free_is_clean(tmp_path):
    """Same through _reserve: a mkdir on a full volume after an unlink."""
    path = make_image(tmp_path / "v.img", 24 << 20)
    await format_image(path, slots=2)
    dev = FileBlockDevice(path)
    fs = await Filesystem.mount(dev)
    await _write_file(fs, fs.root_ino, "small", b"s" * 100)
    await _fill(fs, fs.root_ino, "big")
    await fs.fsync()
    await fs.unlink(fs.root_ino, "small")
    # the commit gives back 2 clusters; a directory needs 4
    with pytest.raises(OSError) as ei:
        await fs.mkdir(fs.root_ino, "another")
    assert ei.value.errno == errno.ENOSPC
    assert fs.failed is None
    await fs.unmount()
    assert not await check_volume(dev)
    await dev.close()


# ------------------------------------------------------------ fixed in fs/core.py

async def test_recovering_a_dead_slot_keeps_the_other_nodes_newer_blocks(tmp_path):
    """Two mounts of one volume (slots 0 and 1), the lock hand-overs done
    by hand as the cluster lock manager would: A changes the root
    directory, a file and the global bitmap and commits; A gives the locks
    to B; B changes the same blocks and fsyncs; A dies; B recovers A's
    slot.  A's log still holds the old images of those blocks."""
    path = make_image(tmp_path / "v.img", 64 << 20)
    await format_image(path, slots=2)
    dev_a, dev_b = FileBlockDevice(path), FileBlockDevice(path)
    fs_a = await Filesystem.mount(dev_a, 0, recover_dirty_slots=False)
    a = await _write_file(fs_a, fs_a.root_ino, "a", b"A" * 5000)
    await fs_a.sync()
    # B asks for the root directory, file a and the global bitmap
    for res in (("inode", fs_a.root_ino), ("inode", a), ("bitmap", 0)):
        await fs_a.locks.downconvert(res)
    fs_b = await Filesystem.mount(dev_b, 1, recover_dirty_slots=False)
    fh = await fs_b.open(a, os.O_RDWR)
    await fs_b.write(fh, 5000, b"B" * 50000)
    await fs_b.release(fh)
    b = await _write_file(fs_b, fs_b.root_ino, "b", b"b" * 3000)
    await fs_b.fsync()
    # A's node dies: its slot is dirty, its log not checkpointed
    await dev_a.close()
    await fs_b.recover_slot(0)
    assert (await fs_b.lookup(fs_b.root_ino, "b")).ino == b
    assert await _read_all(fs_b, a) == b"A" * 5000 + b"B" * 50000
    await fs_b.unmount()
    problems = await check_volume(dev_b)
    await dev_b.close()
    assert not problems, problems


async def test_more_orphans_than_the_journal_holds(tmp_path):
    path = make_image(tmp_path / "v.img", 64 << 20)
    await format_image(path, slots=2)
    dev = FileBlockDevice(path)
    fs = await Filesystem.mount(dev)
    cap = fs.journal.capacity()
    d = (await fs.mkdir(fs.root_ino, "tmp")).ino
    fhs = []
    for i in range(cap + 100):
        fh, _ = await fs.create(d, f"t{i}")
        fhs.append(fh)
    for i in range(cap + 100):
        await fs.unlink(d, f"t{i}")      # still open: orphans
    await fs.fsync()
    try:
        await fs.unmount()               # frees every orphan
    finally:
        await dev.close()
    dev = FileBlockDevice(path)
    fs = await Filesystem.mount(dev)
    await fs.unmount()
    problems = await check_volume(dev)
    await dev.close()
    assert not problems, problems


# ------------------------------------------------------------ power cuts, small volume

async def _small_workload(fs: Filesystem, rng: random.Random, snap: dict, gone: set) -> None:
    """Fill a small volume to ENOSPC, delete half, fill again, fsync now
    and then.  ``snap`` is what the last fsync made durable, ``gone`` the
    names unlinked since."""
    live: dict[str, bytes] = {}
    for rnd in range(2):
        i = 0
        while True:
            name = f"r{rnd}f{i}"
            i += 1
            data = rng.randbytes(rng.choice([1, 3000, 30000, 200000]))
            try:
                fh, _ = await fs.create(fs.root_ino, name)
            except OSError as e:
                assert e.errno == errno.ENOSPC
                break
            try:
                n = await fs.write(fh, 0, data)
            except OSError as e:
                assert e.errno == errno.ENOSPC
                n = 0
            await fs.release(fh)
            live[name] = data[:n]
            if rng.random() < 0.1:
                await fs.fsync()
                snap.clear()
                snap.update(live)
                gone.clear()
            if n < len(data):
                break
        for name in rng.sample(sorted(live), len(live) // 2):
            await fs.unlink(fs.root_ino, name)
            del live[name]
            gone.add(name)
    await fs.fsync()
    snap.clear()
    snap.update(live)
    gone.clear()


async def _small_crash_run(path: str, seed: int, crash_after: int | None) -> int:
    make_image(path, 16 << 20)
    await format_image(path, slots=1, block_size=512)
    dev = CrashDevice(path, crash_after)
    snap: dict[str, bytes] = {}
    gone: set[str] = set()
    try:
        fs = await Filesystem.mount(dev)
        await _small_workload(fs, random.Random(seed), snap, gone)
        await fs.unmount()
    except PowerCut:
        pass
    except OSError as e:
        assert dev.dead, e
    await dev.settle(random.Random(seed * 31 + (crash_after or 0)))
    await dev.inner.close()
    if crash_after is None:
        return dev.writes
    dev = FileBlockDevice(path)
    fs = await Filesystem.mount(dev)
    names = {n.decode(): i for n, i, _ in await fs.readdir(fs.root_ino)}
    for name, data in snap.items():
        if name in gone and name not in names:
            continue
        assert name in names, name
        assert await _read_all(fs, names[name]) == data, name
    await fs.unmount()
    problems = await check_volume(dev)
    await dev.close()
    assert not problems, problems
    return 0


@pytest.mark.parametrize("seed", [1])
async def test_power_cuts_on_a_full_small_volume(tmp_path, seed):
    """512-byte blocks: the 1024-block journal wraps (checkpoints) many
    times; the volume runs full twice; power cuts at random writes."""
    path = str(tmp_path / "s.img")
    total = await _small_crash_run(path, seed, None)
    rng = random.Random(seed)
    for n in sorted(rng.sample(range(1, total), 12)):
        await _small_crash_run(path, seed, n)


@pytest.mark.soak(twin="test_power_cuts_on_a_full_small_volume")
@pytest.mark.parametrize("seed", soak.seeds(range(2, 12)))
async def test_power_cuts_on_a_full_small_volume_soak(tmp_path, seed):
    path = str(tmp_path / "s.img")
    total = await _small_crash_run(path, seed, None)
    rng = random.Random(seed)
    for n in sorted(rng.sample(range(1, total), soak.size(60, 12))):
        await _small_crash_run(path, seed, n)
