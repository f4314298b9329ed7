"""Operations of one mount running concurrently (fs/core.py's operation
contexts and running transaction, no global lock).

Every device request waits a seeded random (virtual) time, so requests
of different operations interleave at every await.  Several workers
create, write, append, rename (within and across shared directories),
unlink, set xattrs and fsync at once, each on names of its own, so the
final tree is known whatever the interleaving.  Checked: the tree and
every byte; the raw-block oracle (bitmaps against references, link
counts, ...) after unmount; after a power cut at a random write, every
file fsync'd and not touched since.  A mutant whose commit does not wait
for the operations in the running transaction must be caught.
"""
from __future__ import annotations

import os
import random

import pytest
import trio

from replfs.blockdev import FileBlockDevice
from replfs.fs import core as C
from replfs.fs.core import Filesystem
from replfs.fs.locks import LockOrderError
from tests import soak

from .conftest import CrashDevice, PowerCut, check_volume, format_image, make_image


class JitterDevice:
    """Every request first waits a random time (from a seeded generator)."""

    def __init__(self, inner, seed: int, scale: float = 0.002):
        self.inner = inner
        self.rng = random.Random(seed)
        self.scale = scale
        self.dead = False        # the node is gone: nothing more reaches the disk

    @property
    def size(self) -> int:
        return self.inner.size

    async def _wait(self) -> None:
        if self.dead:
            raise OSError(5, "node is dead")
        await trio.sleep(self.rng.random() * self.scale)
        if self.dead:
            raise OSError(5, "node is dead")

    async def read(self, off, n):
        await self._wait()
        return await self.inner.read(off, n)

    async def write(self, off, data):
        await self._wait()
        return await self.inner.write(off, data)

    async def flush(self):
        await self._wait()
        return await self.inner.flush()

    async def discard(self, off, n):
        return await self.inner.discard(off, n)

    async def close(self):
        return await self.inner.close()


class Worker:
    """One writer: files named w<id>-<n> in its private directory and the
    two shared ones.  ``live`` is where each of its files is now and what
    it holds; ``durable`` what an fsync that returned covered; ``touched``
    files changed since their last fsync."""

    def __init__(self, wid: int, rng: random.Random):
        self.wid = wid
        self.rng = rng
        self.live: dict[str, tuple[str, bytes]] = {}     # name -> (dir, data)
        self.durable: dict[str, tuple[str, bytes]] = {}
        self.touched: set[str] = set()
        self.n = 0

    async def run(self, fs, dirs: dict[str, int], steps: int) -> None:
        """``fs``: one Filesystem, or a list of them (the mounts of two
        nodes): then every step runs on one picked at random, so what one
        node wrote is read, renamed, appended to through the other."""
        rng = self.rng
        mine = f"p{self.wid}"
        mounts = fs if isinstance(fs, list) else [fs]
        for _ in range(steps):
            fs = rng.choice(mounts)
            if len(mounts) > 1:
                # a node finds a directory by its path, never by a number
                # learnt on the other node (nothing else reaches an inode)
                dirs = {d: (await fs.lookup(fs.root_ino, d)).ino for d in dirs}
            r = rng.random()
            if r < 0.35 or not self.live:
                self.n += 1
                name = f"w{self.wid}-{self.n}"
                where = rng.choice([mine, "s1", "s2"])
                data = rng.randbytes(rng.choice([0, 300, 5000, 40000]))
                fh, _ = await fs.create(dirs[where], name)
                if data:
                    await fs.write(fh, 0, data)
                await fs.release(fh)
                self.live[name] = (where, data)
                self.touched.add(name)
            elif r < 0.5:
                name = rng.choice(sorted(self.live))
                where, data = self.live[name]
                # touched before the call: a call that fails (a node that
                # dies under it) may still have happened
                self.touched.add(name)
                a = await fs.lookup(dirs[where], name)
                fh = await fs.open(a.ino, os.O_RDWR)
                extra = rng.randbytes(rng.choice([10, 4096, 9000]))
                await fs.write(fh, len(data), extra)
                await fs.release(fh)
                self.live[name] = (where, data + extra)
            elif r < 0.6:
                name = rng.choice(sorted(self.live))
                where, _ = self.live.pop(name)
                self.touched.add(name)
                await fs.unlink(dirs[where], name)
            elif r < 0.75:
                name = rng.choice(sorted(self.live))
                where, data = self.live[name]
                to = rng.choice([mine, "s1", "s2"])
                self.touched.add(name)
                await fs.rename(dirs[where], name, dirs[to], name)
                self.live[name] = (to, data)
            elif r < 0.85:
                name = rng.choice(sorted(self.live))
                where, data = self.live[name]
                a = await fs.lookup(dirs[where], name)
                await fs.setxattr(a.ino, b"user.w", name.encode())
                assert await fs.getxattr(a.ino, b"user.w") == name.encode()
            elif r < 0.93:
                name = rng.choice(sorted(self.live))
                where, data = self.live[name]
                a = await fs.lookup(dirs[where], name)
                fh = await fs.open(a.ino)
                got = await fs.read(fh, 0, len(data) + 10)
                await fs.release(fh)
                assert got == data, (name, len(got), len(data))
            else:
                before = dict(self.live)
                await fs.fsync()
                self.durable = before
                self.touched = set()


async def setup_dirs(fs: Filesystem, workers: int) -> dict[str, int]:
    dirs = {}
    for name in ["s1", "s2"] + [f"p{i}" for i in range(workers)]:
        dirs[name] = (await fs.mkdir(fs.root_ino, name)).ino
    await fs.fsync()
    return dirs


async def run_workers(fs: Filesystem, seed: int, workers: int, steps: int) -> list[Worker]:
    dirs = await setup_dirs(fs, workers)
    ws = [Worker(i, random.Random(seed * 100 + i)) for i in range(workers)]

    async def committer():
        rng = random.Random(seed)
        while True:
            await trio.sleep(rng.random() * 0.05)
            await fs.sync()

    async with trio.open_nursery() as outer:
        outer.start_soon(committer)
        async with trio.open_nursery() as n:
            for w in ws:
                n.start_soon(w.run, fs, dirs, steps)
        outer.cancel_scope.cancel()
    return ws


async def check_tree(fs: Filesystem, ws: list[Worker], workers: int) -> None:
    want: dict[str, dict[str, bytes]] = {d: {} for d in ["s1", "s2"] +
                                         [f"p{i}" for i in range(workers)]}
    for w in ws:
        for name, (where, data) in w.live.items():
            want[where][name] = data
    for d, files in want.items():
        a = await fs.lookup(fs.root_ino, d)
        got = {n.decode(): i for n, i, _ in await fs.readdir(a.ino)}
        assert sorted(got) == sorted(files), d
        for name, data in files.items():
            fh = await fs.open(got[name])
            assert await fs.read(fh, 0, len(data) + 1) == data, name
            await fs.release(fh)


async def _one_run(tmp_path, seed: int, workers: int = 4, steps: int = 60) -> None:
    path = make_image(tmp_path / f"c{seed}.img", 64 << 20)
    await format_image(path, slots=2)
    dev = JitterDevice(FileBlockDevice(path), seed)
    fs = await Filesystem.mount(dev)
    ws = await run_workers(fs, seed, workers, steps)
    assert fs.failed is None
    await check_tree(fs, ws, workers)
    await fs.unmount()
    fs = await Filesystem.mount(dev)
    await check_tree(fs, ws, workers)
    await fs.unmount()
    problems = await check_volume(dev)
    await dev.close()
    assert not problems, (seed, problems)


@pytest.mark.parametrize("seed", range(1, 5))
async def test_concurrent_workers(tmp_path, autojump_clock, seed):
    await _one_run(tmp_path, seed)


@pytest.mark.soak(twin="test_concurrent_workers")
@pytest.mark.parametrize("seed", soak.seeds(range(100, 160)))
async def test_concurrent_workers_soak(tmp_path, autojump_clock, seed):
    await _one_run(tmp_path, seed, workers=6, steps=150)


# ------------------------------------------------------------ power cuts

async def _crash_run(path: str, seed: int, crash_after: int | None, workers: int):
    make_image(path, 64 << 20)
    await format_image(path, slots=2)
    cdev = CrashDevice(path, crash_after)
    dev = JitterDevice(cdev, seed)
    ws: list[Worker] = []
    try:
        fs = await Filesystem.mount(dev)
        dirs = await setup_dirs(fs, workers)
        ws = [Worker(i, random.Random(seed * 100 + i)) for i in range(workers)]
        async with trio.open_nursery() as n:
            for w in ws:
                n.start_soon(w.run, fs, dirs, 40)
        await fs.unmount()
    except* PowerCut:
        pass
    except* OSError as eg:
        # once the device is gone the filesystem latches: EIO/EROFS
        assert cdev.dead, eg
    await cdev.settle(random.Random(seed * 7 + (crash_after or 0)))
    await cdev.inner.close()
    return cdev.writes, ws


async def _verify_crash(path: str, ws: list[Worker]) -> None:
    dev = FileBlockDevice(path)
    fs = await Filesystem.mount(dev)
    try:
        for w in ws:
            for name, (where, data) in w.durable.items():
                if name in w.touched:
                    continue
                a = await fs.lookup(fs.root_ino, where)
                b = await fs.lookup(a.ino, name)
                fh = await fs.open(b.ino)
                assert await fs.read(fh, 0, len(data) + 1) == data, name
                await fs.release(fh)
    finally:
        await fs.unmount()
    problems = await check_volume(dev)
    await dev.close()
    assert not problems, problems


async def _crash_case(tmp_path, seed: int, points: int, workers: int = 3) -> None:
    path = str(tmp_path / "crash.img")
    total, _ = await _crash_run(path, seed, None, workers)
    rng = random.Random(seed)
    for n in sorted(rng.sample(range(1, total), min(points, total - 1))):
        _, ws = await _crash_run(path, seed, n, workers)
        await _verify_crash(path, ws)


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_concurrent_power_cuts(tmp_path, autojump_clock, seed):
    await _crash_case(tmp_path, seed, 12)


@pytest.mark.soak(twin="test_concurrent_power_cuts")
@pytest.mark.parametrize("seed", soak.seeds(range(200, 240)))
async def test_concurrent_power_cuts_soak(tmp_path, autojump_clock, seed):
    await _crash_case(tmp_path, seed, 40, workers=5)


# ------------------------------------------------------------ mutants

async def test_mutant_commit_without_drain_is_caught(tmp_path, autojump_clock, monkeypatch):
    """A commit that does not wait for the operations in the running
    transaction takes half of an operation: the oracle must notice, on
    one of a handful of seeds."""

    async def commit_no_drain(self):
        op = C._current_op.get()
        if op is not None and op.fs is self:
            self._settle(op)
        async with self._commit_lock:
            self._closing += 1
            try:
                await self._commit_now()
            finally:
                self._closing -= 1
                self._tx_lot.unpark_all()

    monkeypatch.setattr(Filesystem, "_commit", commit_no_drain)
    caught = []
    for seed in range(1, 9):
        path = str(tmp_path / "crash.img")
        total, _ = await _crash_run(path, seed, None, 3)
        rng = random.Random(seed)
        for n in sorted(rng.sample(range(1, total), min(6, total - 1))):
            _, ws = await _crash_run(path, seed, n, 3)
            try:
                await _verify_crash(path, ws)
            except (AssertionError, OSError) as e:
                caught.append((seed, n, str(e)[:200]))
                break
        if caught:
            break
    assert caught, "the power-cut harness did not notice commits taking half an operation"


# ------------------------------------------------------------ lock order

async def test_lock_after_first_change_is_refused(tmp_path):
    path = make_image(tmp_path / "v.img", 64 << 20)
    await format_image(path)
    dev = FileBlockDevice(path)
    fs = await Filesystem.mount(dev)
    d = await fs.mkdir(fs.root_ino, "d")
    with pytest.raises(LockOrderError):
        async with fs._op(), fs._locked(fs.root_ino, level="dir"):
            root = await fs._inode(fs.root_ino)
            fs._dirty(root)
            async with fs._locked(d.ino):
                pass
    # that operation latched (it had changed something); a fresh mount
    # after replay is clean
    assert fs.failed
    await dev.close()


async def test_lock_order_inversion_is_refused(tmp_path):
    path = make_image(tmp_path / "v.img", 64 << 20)
    await format_image(path)
    dev = FileBlockDevice(path)
    fs = await Filesystem.mount(dev)
    d = await fs.mkdir(fs.root_ino, "d")
    # a child before its directory
    with pytest.raises(LockOrderError):
        async with fs._op(reading=True), fs._locked(d.ino, shared=True):
            async with fs._locked(fs.root_ino, shared=True, level="dir"):
                pass
    # the global bitmap before an inode
    with pytest.raises(LockOrderError):
        async with fs._op(reading=True):
            await fs._take(("bitmap", 0), C.EX, "bitmap")
            async with fs._locked(d.ino):
                pass
    # an upgrade inside one operation
    with pytest.raises(LockOrderError):
        async with fs._op(reading=True), fs._locked(d.ino, shared=True):
            async with fs._locked(d.ino):
                pass
    assert fs.failed is None
    await fs.unmount()
    assert not await check_volume(dev)
    await dev.close()


async def test_reads_do_not_wait_for_a_slow_write(tmp_path, autojump_clock):
    """No global lock: a read of one file goes on while a write of
    another waits for the device."""
    path = make_image(tmp_path / "v.img", 64 << 20)
    await format_image(path)
    inner = FileBlockDevice(path)
    fs = await Filesystem.mount(inner)
    fh_a, a = await fs.create(fs.root_ino, "a")
    await fs.write(fh_a, 0, b"x" * 8192)
    fh_b, b = await fs.create(fs.root_ino, "b")
    await fs.write(fh_b, 0, b"y" * 100)
    gate = trio.Event()
    slow_off = None

    class Slow:
        size = inner.size

        async def read(self, off, n):
            return await inner.read(off, n)

        async def write(self, off, data):
            if off == slow_off:
                await gate.wait()
            return await inner.write(off, data)

        async def flush(self):
            return await inner.flush()

    # the next data write to file a's first cluster blocks
    exts = await fs.ext.load(await fs._inode(a.ino))
    slow_off = exts[0][1] * fs.cs
    fs.dev = Slow()
    done = []

    async def writer():
        await fs.write(fh_a, 0, b"z" * 10)
        done.append("write")

    async with trio.open_nursery() as n:
        n.start_soon(writer)
        await trio.sleep(1)
        assert await fs.read(fh_b, 0, 200) == b"y" * 100
        assert (await fs.lookup(fs.root_ino, "b")).size == 100
        await fs.mkdir(fs.root_ino, "meanwhile")
        assert not done
        gate.set()
    assert done == ["write"]
    fs.dev = inner
    for fh in (fh_a, fh_b):
        await fs.release(fh)
    await fs.unmount()
    assert not await check_volume(inner)
    await inner.close()


async def test_an_interrupted_write_finishes_instead_of_latching(tmp_path):
    """Cancellation (a FUSE INTERRUPT, a timeout) reaches an operation only
    before its first change; a write cancelled half-way used to latch the
    whole filesystem read-only and lose the new file."""
    path = make_image(tmp_path / "v.img", 64 << 20)
    await format_image(path)
    dev = FileBlockDevice(path)
    fs = await Filesystem.mount(dev)
    fh, a = await fs.create(fs.root_ino, "f")
    data = os.urandom(8 << 20)
    with trio.move_on_after(0.002) as scope:
        await fs.write(fh, 0, data)
    assert fs.failed is None
    assert (await fs.getattr(a.ino)).size == len(data)
    assert await fs.read(fh, 0, len(data)) == data
    # cancelled before it changes anything: nothing happens at all
    with trio.CancelScope() as scope:
        scope.cancel()
        await fs.mkdir(fs.root_ino, "never")
    with pytest.raises(OSError):
        await fs.lookup(fs.root_ino, "never")
    await fs.release(fh)
    await fs.unmount()
    assert not await check_volume(dev)
    await dev.close()
