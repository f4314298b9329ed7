"""Corrupt volumes end to end, in process (no FUSE).

A small volume with a tree of files (directories large enough for hashed
leaves, a file fragmented enough for extent leaves, symlinks, xattrs, a
hard link, a FIFO, a sparse file) is built once per geometry -- one
image cleanly unmounted, one left with a dirty journal as a crash leaves
it.  Each seed then damages one to three of its live metadata blocks
(found by walking the tree, so every one of them is something mount and
fsck read) in one of several ways: garbage, bit flips, a zeroed block, a
block written to the wrong place, or a mutation of its fields with the
checksum recomputed (and, in the journal, the commit record's checksum
too) so that it gets past the CRC.  Then:

(a) ``Filesystem.mount`` refuses with OSError, or mounts and answers a
    walk of the whole tree (readdir in pages, lookup, getattr, reads of
    every file, readlink, xattrs, statfs), a few changes (create, write,
    fsync, mkdir, rename, unlink, rmdir, setxattr) and the unmount with
    OSError only -- or latches read-only;
(b) ``fsck.replfs -n`` (in process, as tests/fs/test_fsck.py uses it)
    never raises, writes nothing, and reports damage that breaks a
    checksum (exit status not 0); ``-y`` never raises and leaves a volume
    that a second ``-n`` finds clean, the independent checker of
    tests/fs finds consistent, and the core mounts, walks and changes it
    without any error (and leaves it consistent).  Without a usable
    superblock (the only copy of a small volume is the primary) fsck ends
    with its operational error instead.

Every step runs under trio.fail_after: a hang fails the seed.  A failure
names the seed and what was damaged; ``REPLFS_FUZZ_VOLUME_SEED=N`` runs
that seed alone (the base images are the same bytes in every run).  Each
bug the seeds found is also kept as a scenario made on purpose
(``test_regression``).

A handful of seeds per image in make test, 250 per image under make soak.
"""
from __future__ import annotations

import errno
import os
import random
import stat
import struct
import time
import uuid
import zlib
from dataclasses import dataclass, field

import pytest
import trio

from replfs.blockdev import BlockDeviceError
from replfs.fs import format as F
from replfs.fs import fsck
from replfs.fs.core import Filesystem, read_superblock
from replfs.fs.mkfs import make_filesystem
from tests import soak
from tests.fs.conftest import check_volume

from .mutators import RandDraws, mutate_block
from .test_fuzz_ondisk import DECODERS

MiB = 1 << 20
STEP_LIMIT = 120          # seconds for one mount + walk, or one fsck run


class MemDevice:
    """A BlockDevice in memory: reads past the end are short, writes past
    it fail (as FileBlockDevice); counts writes."""

    def __init__(self, data: bytes | bytearray):
        self.buf = bytearray(data)
        self.writes = 0

    @property
    def size(self) -> int:
        return len(self.buf)

    async def read(self, offset: int, length: int) -> bytes:
        await trio.lowlevel.checkpoint()
        if offset < 0 or length < 0:
            raise BlockDeviceError(errno.EINVAL, "negative offset or length")
        return bytes(self.buf[offset:offset + length])

    async def write(self, offset: int, data: bytes) -> None:
        await trio.lowlevel.checkpoint()
        if offset < 0 or offset + len(data) > len(self.buf):
            raise BlockDeviceError(errno.ENOSPC, "write beyond end of device")
        self.writes += 1
        self.buf[offset:offset + len(data)] = data

    async def flush(self) -> None:
        await trio.lowlevel.checkpoint()

    async def discard(self, offset: int, length: int) -> None:
        await self.write(offset, bytes(length))

    async def close(self) -> None:
        pass


# ---------------------------------------------------------------- base images

async def _populate(fs: Filesystem) -> None:
    root = fs.root_ino
    d = await fs.mkdir(root, "dir")
    fh, a = await fs.create(d.ino, "file")
    await fs.write(fh, 0, b"hello world\n" * 1000)
    await fs.release(fh)
    await fs.link(a.ino, root, "hardlink")
    await fs.setxattr(a.ino, "user.colour", b"blue")
    await fs.setxattr(d.ino, "user.big", b"x" * 300)
    await fs.symlink(root, "sym", "dir/file")
    await fs.symlink(d.ino, "long-sym", "y" * 3000)
    fh, _ = await fs.create(root, "sparse")
    await fs.write(fh, 16 * MiB, b"end")
    await fs.write(fh, 0, b"start")
    await fs.release(fh)
    sub = await fs.mkdir(d.ino, "sub")
    for i in range(150):                # several hashed leaves
        fh, _ = await fs.create(sub.ino, f"entry-with-a-long-name-{i:04d}")
        if i % 10 == 0:
            await fs.write(fh, 0, bytes([i]) * (i * 37))
        await fs.release(fh)
    await fs.mkdir(sub.ino, "deeper")
    await fs.mknod(root, "fifo", stat.S_IFIFO | 0o644)
    fh, _ = await fs.create(root, "fragmented")   # extent leaves
    for i in range(300):
        await fs.write(fh, 2 * i * fs.cs, b"f" * 100)
    await fs.release(fh)


async def _build(size: int, *, dirty: bool, **geometry) -> bytes:
    dev = MemDevice(bytes(size))
    await make_filesystem(dev, out=None, label="fuzz", slots=2, **geometry)
    fs = await Filesystem.mount(dev, 0)
    await _populate(fs)
    if dirty:
        # a crash after commits the journal still holds: no unmount
        await fs.sync()
        fh, _ = await fs.create(fs.root_ino, "after-the-last-checkpoint")
        await fs.write(fh, 0, b"z" * 5000)
        await fs.release(fh)
        await fs.unlink(fs.root_ino, "sparse")      # frees: a revoke record
        await fs.sync()
    else:
        await fs.unmount()
    return bytes(dev.buf)


BASES = {
    "4k": dict(size=48 * MiB, block_size=4096),
    "1k-16k": dict(size=32 * MiB, block_size=1024, cluster_size=16384),
}


@dataclass
class Base:
    name: str
    image: bytes
    sb: F.Superblock
    dirty: bool
    blocks: list[tuple[int, str]]          # (block number, kind) of live metadata
    txns: list[list[int]] = field(default_factory=list)   # journal blocks per transaction


@pytest.fixture(scope="module")
def bases() -> dict[str, Base]:
    return build_bases()


def build_bases() -> dict[str, Base]:
    """Every base image, clean and dirty (a second or two).  The same
    bytes every time (a fixed volume UUID, which the directory hashes
    depend on, a seeded ``random`` for inode generations, a fake clock),
    so that a seed does the same in every run."""
    state = random.getstate()
    uuid4, time_ns = uuid.uuid4, time.time_ns
    random.seed(20261127)
    clock = iter(range(1_790_000_000 * 10 ** 9, 1 << 62, 1000))
    uuid.uuid4 = lambda: uuid.UUID(int=random.getrandbits(128), version=4)
    time.time_ns = lambda: next(clock)
    try:
        return trio.run(_build_bases)
    finally:
        uuid.uuid4, time.time_ns = uuid4, time_ns
        random.setstate(state)


async def _build_bases() -> dict[str, Base]:
    out = {}
    for name, geo in BASES.items():
        geo = dict(geo)
        size = geo.pop("size")
        for dirty in (False, True):
            image = await _build(size, dirty=dirty, **geo)
            sb = await read_superblock(MemDevice(image))
            blocks, txns = await _live_metadata(MemDevice(image), sb)
            key = f"{name}{'-dirty' if dirty else ''}"
            out[key] = Base(key, image, sb, dirty, blocks, txns)
    return out


async def _live_metadata(dev, sb: F.Superblock):
    """Every metadata block mount and fsck read, with its kind; and the
    block numbers of each committed journal transaction."""
    bs, shift, vol = sb.block_size, sb.cluster_bits - sb.block_bits, sb.volid
    out: list[tuple[int, str]] = [(F.sb_blkno(bs), "superblock"), (sb.slotmap_blk, "slotmap")]
    for g in range(sb.group_count):
        out.append((F.group_desc_blkno(sb, g), "group"))
    for s in sb.slots:
        out += [(s.journal_start, "jsuper"), (s.localalloc_blk, "local")]

    async def blk(b: int) -> bytes:
        return await dev.read(b * bs, bs)

    def lblk(exts, lb: int) -> int:
        lcl = lb >> shift
        for l, p, n in exts:
            if l <= lcl < l + n:
                return ((p + lcl - l) << shift) + (lb & ((1 << shift) - 1))
        raise AssertionError(f"logical block {lb} unmapped")

    seen: set[int] = set()
    todo = [sb.root_ino] + [s.orphan_ino for s in sb.slots]
    while todo:
        ino_no = todo.pop()
        if ino_no in seen:
            continue
        seen.add(ino_no)
        ino = F.Inode.decode(await blk(ino_no), vol, ino_no)
        out.append((ino_no, "inode"))
        exts = list(ino.root)
        if ino.ext_depth:
            exts = []
            for _, leafblk, _ in ino.root:
                out.append((leafblk, "extent"))
                exts += F.ExtentLeaf.decode(await blk(leafblk), vol, leafblk).recs
        if ino.xattr_blk:
            out.append((ino.xattr_blk, "xattr"))
        if not ino.is_dir:
            continue
        for t in range(-(-(1 << ino.dir_depth) // F.dirtable_slots(bs))):
            out.append((lblk(exts, F.DIR_TABLE_LBLK + t), "dirtable"))
        for i in range(ino.dir_leaves):
            b = lblk(exts, i)
            out.append((b, "dirleaf"))
            todo += [e.ino for e in F.DirLeaf.decode(await blk(b), vol, b).entries]
    txns: list[list[int]] = []
    for s in sb.slots:
        js = F.JournalSuper.decode(await blk(s.journal_start), vol, s.journal_start)
        if not js.flags & F.JSB_DIRTY:
            continue
        pos, cur = 1, []
        while pos < s.journal_blocks:
            b = s.journal_start + pos
            sig = F.signature_of(await blk(b))
            if sig == F.SIG_JDESC:
                _, targets = F.decode_jdesc(await blk(b), vol, b)
                cur += list(range(b, b + 1 + len(targets)))
                pos += 1 + len(targets)
            elif sig == F.SIG_JREVOKE:
                cur.append(b)
                pos += 1
            elif sig == F.SIG_JCOMMIT:
                seq, _, _ = F.decode_jcommit(await blk(b), vol, b)
                if seq < js.first_seq + len(txns):
                    break               # an older lap of the log
                cur.append(b)
                txns.append(cur)
                out += [(x, "journal") for x in cur]
                cur = []
                pos += 1
            else:
                break
    return sorted(set(out)), txns


# ---------------------------------------------------------------- damage

_KIND_DECODER = {"superblock": "fs-superblock", "slotmap": "fs-slot-map", "group": "fs-group",
                 "jsuper": "fs-journal-super", "local": "fs-local-alloc", "inode": "fs-inode",
                 "extent": "fs-extent-leaf", "xattr": "fs-xattr", "dirtable": "fs-dir-table",
                 "dirleaf": "fs-dir-leaf"}
_SIG = {"fs-superblock": F.SIG_SUPER, "fs-slot-map": F.SIG_SLOTMAP, "fs-group": F.SIG_GROUP,
        "fs-journal-super": F.SIG_JSUPER, "fs-local-alloc": F.SIG_LOCALALLOC,
        "fs-inode": F.SIG_INODE, "fs-extent-leaf": F.SIG_EXTENT, "fs-xattr": F.SIG_XATTR,
        "fs-dir-table": F.SIG_DIRTABLE, "fs-dir-leaf": F.SIG_DIRLEAF}
# damage that breaks a checksum (or a signature, or the block number)
# and that fsck must therefore always report
DETECTABLE = {"garbage", "flip", "zero", "misplaced"}


def _reseal(buf: bytearray, orig: bytes) -> None:
    """The header ``orig`` had (signature, volume, block number: for an
    image in the journal, its home block), and a CRC that matches."""
    sig, _, vol, blkno, _ = F.HDR.unpack_from(orig, 0)
    F.HDR.pack_into(buf, 0, sig, 0, vol, blkno, 0)
    struct.pack_into("<I", buf, 8, F.block_crc(buf))


def _fix_commit(img: bytearray, base: Base, txn: list[int]) -> None:
    """Recompute the commit record of a journal transaction after one of
    its blocks changed, so that replay applies it."""
    bs = base.sb.block_size
    crc = 0
    for b in txn[:-1]:
        crc = zlib.crc32(img[b * bs:(b + 1) * bs], crc)
    c = txn[-1]
    buf = bytearray(img[c * bs:(c + 1) * bs])
    seq, nb, _ = F.JCOMMIT_BODY.unpack_from(buf, F.HDR_SIZE)
    F.JCOMMIT_BODY.pack_into(buf, F.HDR_SIZE, seq, nb, crc)
    struct.pack_into("<I", buf, 8, F.block_crc(buf))
    img[c * bs:(c + 1) * bs] = buf


def damage(base: Base, rng: random.Random) -> tuple[bytearray, list[str], bool]:
    """A copy of the base image with one to three live metadata blocks
    damaged; (image, what was done, whether fsck must notice)."""
    img = bytearray(base.image)
    bs = base.sb.block_size
    draws = RandDraws(rng)
    done: list[str] = []
    detectable: dict[int, bool] = {}
    kinds = sorted({k for _, k in base.blocks})
    for _ in range(rng.choice((1, 1, 1, 2, 3))):
        # every kind as often (inodes are most of the blocks)
        kind = rng.choice(kinds)
        blkno = rng.choice([b for b, k in base.blocks if k == kind])
        orig = bytes(img[blkno * bs:(blkno + 1) * bs])
        buf = bytearray(orig)
        how = rng.choice(["garbage", "flip", "zero", "misplaced", "fields", "fields",
                          "fields", "fields", "other"])
        if how == "garbage":
            a = rng.randrange(bs)
            n = rng.randint(1, bs - a)
            buf[a:a + n] = rng.randbytes(n)
        elif how == "flip":
            for _ in range(rng.randint(1, 8)):
                buf[rng.randrange(bs)] ^= 1 << rng.randrange(8)
        elif how == "zero":
            buf[:] = bytes(bs)
        elif how == "misplaced":
            # another metadata block's image written here (a misdirected write)
            other, _ = rng.choice(base.blocks)
            buf[:] = img[other * bs:(other + 1) * bs]
            if other == blkno:
                continue
        elif how == "other":
            # a block of the same kind, re-sealed here: its pointers now
            # claim what another block already owns
            others = [b for b, k in base.blocks if k == kind and b != blkno]
            if not others:
                continue
            o = rng.choice(others)
            buf[:] = img[o * bs:(o + 1) * bs]
            _reseal(buf, orig)
        else:
            dec = DECODERS.get(_KIND_DECODER.get(kind, ""))
            fields = dec.fields if dec else []
            header = F.HDR_SIZE
            buf = bytearray(mutate_block(draws, orig, fields, header))
            buf = (buf + bytes(bs))[:bs]            # blocks stay blocks
            if kind == "journal" and rng.random() < 0.3:
                # an image in the journal sealed for its place in the
                # journal, not for its home (replayed, it is misplaced)
                sealed_for = bytearray(orig)
                struct.pack_into("<Q", sealed_for, 16, blkno)
                _reseal(buf, sealed_for)
                how = "fields-misplaced"
            else:
                _reseal(buf, orig)
        if bytes(buf) == orig:
            continue
        img[blkno * bs:(blkno + 1) * bs] = buf
        if kind == "journal":
            txn = next(t for t in base.txns if blkno in t)
            if blkno != txn[-1] and how in ("fields", "fields-misplaced", "other"):
                _fix_commit(img, base, txn)
                how += "+commit"
        done.append(f"{kind} block {blkno}: {how}")
        # a journal block may be one the replay never reaches (after a
        # damaged one); every other kind is read by fsck.  The last damage
        # of a block is what it holds.
        detectable[blkno] = how in DETECTABLE and kind != "journal"
    return img, done, any(detectable.values())


# ---------------------------------------------------------------- the checks

async def walk(fs: Filesystem, *, strict: bool) -> int:
    """Read everything there is to read.  OSError is an answer (unless
    ``strict``); anything else propagates.  Returns how many inodes it
    reached."""
    seen: set[int] = set()
    todo = [fs.root_ino]

    async def answer(coro, *expected: int):
        try:
            return await coro
        except OSError as e:
            if strict and e.errno not in expected:
                raise
            return None

    await answer(fs.statfs())
    while todo and len(seen) < 5000:
        ino = todo.pop()
        if ino in seen:
            continue
        seen.add(ino)
        a = await answer(fs.getattr(ino))
        if a is None:
            continue
        await answer(fs.listxattr(ino))
        await answer(fs.getxattr(ino, "user.colour"), errno.ENODATA)
        if stat.S_ISDIR(a.mode):
            cookie, pages = 0, 0
            while pages < 1000:
                page = await answer(fs.readdir(ino, cookie, limit=50))
                if not page:
                    break
                pages += 1
                for name, child, nxt in page:
                    cookie = nxt
                    c = await answer(fs.lookup(ino, name))
                    if c is not None:
                        todo.append(c.ino)
                    else:
                        todo.append(child)
            await answer(fs.lookup(ino, "no-such-name"), errno.ENOENT)
            await answer(fs.lookup(ino, ".."))
        elif stat.S_ISLNK(a.mode):
            await answer(fs.readlink(ino))
        elif stat.S_ISREG(a.mode):
            fh = await answer(fs.open(ino))
            if fh is None:
                continue
            try:
                for off in (0, 128 << 10, max(0, a.size - 4096)):
                    await answer(fs.read(fh, off, 128 << 10))
            finally:
                await answer(fs.release(fh))
    return len(seen)


async def change(fs: Filesystem, *, strict: bool) -> None:
    """A few changes: create, write, fsync, mkdir, rename, unlink, rmdir,
    setxattr.  On a damaged volume each may fail with OSError (and the
    filesystem may latch read-only), nothing else."""
    async def answer(coro):
        try:
            return await coro
        except OSError:
            if strict:
                raise
            return None

    root = fs.root_ino
    made = await answer(fs.create(root, "fuzz-new"))
    if made is not None:
        fh, a = made
        await answer(fs.write(fh, 0, b"n" * 100_000))
        await answer(fs.fsync(fh))
        await answer(fs.setxattr(a.ino, "user.fuzz", b"v" * 100))
        await answer(fs.release(fh))
    d = await answer(fs.mkdir(root, "fuzz-dir"))
    if d is not None:
        for i in range(20):
            made = await answer(fs.create(d.ino, f"f{i}"))
            if made is not None:
                await answer(fs.release(made[0]))
        await answer(fs.rename(root, "fuzz-new", d.ino, "moved"))
        for i in range(20):
            await answer(fs.unlink(d.ino, f"f{i}"))
        await answer(fs.unlink(d.ino, "moved"))
        await answer(fs.rmdir(root, "fuzz-dir"))
    await answer(fs.sync())


async def mount_and_walk(dev: MemDevice, *, strict: bool = False, writes: bool = True) -> str:
    try:
        fs = await Filesystem.mount(dev, 0)
    except OSError as e:
        if strict:
            raise
        return f"mount refused: {e}"
    try:
        n = await walk(fs, strict=strict)
        if writes:
            await change(fs, strict=strict)
    finally:
        try:
            await fs.unmount()
        except OSError:
            if strict:
                raise
    return f"mounted, {n} inodes reached" + (f", failed: {fs.failed}" if fs.failed else "")


async def run_fsck(dev: MemDevice, repair: bool) -> tuple[fsck.Result, list[str]]:
    lines: list[str] = []
    res = await fsck.check(dev, repair=repair, out=lines.append)
    return res, lines


async def check_seed(base: Base, seed: int) -> None:
    rng = random.Random(seed)
    img, done, detectable = damage(base, rng)
    where = f"seed {seed} on {base.name}: {'; '.join(done) or 'nothing damaged'}"
    await check_damaged(base, img, done, detectable, where)


async def check_damaged(base: Base, img: bytes, done: list[str], detectable: bool,
                        where: str) -> list[str]:
    """(a) and (b) of the module's doc on a damaged copy ``img`` of
    ``base``; returns what was said (the mount's summary, fsck's lines)."""
    step = "mount"
    log: list[str] = []
    try:
        # (a) the core: a walk alone, then one with changes
        for writes in (False, True):
            with trio.fail_after(STEP_LIMIT):
                log.append(await mount_and_walk(MemDevice(img), writes=writes))
        # (b) fsck -n: reports, writes nothing
        step = "fsck -n"
        dev = MemDevice(img)
        with trio.fail_after(STEP_LIMIT):
            res, lines = await run_fsck(dev, repair=False)
        log += lines
        assert dev.writes == 0, "fsck -n wrote to the device"
        no_sb = res.exit_code == fsck.EXIT_OPERATIONAL
        if no_sb:
            assert any("superblock" in d for d in done) and base.sb.total_blocks * \
                base.sb.block_size <= F.BACKUP_SB_OFFSETS[0], res.operational_error
        if detectable:
            assert res.exit_code != 0, "fsck -n found nothing"
        # fsck -y: repairs
        step = "fsck -y"
        with trio.fail_after(STEP_LIMIT):
            res, lines = await run_fsck(dev, repair=True)
        log += lines
        if no_sb:
            assert res.exit_code == fsck.EXIT_OPERATIONAL
            return log
        assert res.exit_code in (0, fsck.EXIT_FIXED, fsck.EXIT_FIXED | fsck.EXIT_UNCORRECTED,
                                 fsck.EXIT_UNCORRECTED), res.exit_code
        step = "fsck -n after -y"
        with trio.fail_after(STEP_LIMIT):
            res, lines = await run_fsck(dev, repair=False)
        log += lines
        assert res.exit_code == 0, "the repaired volume is not clean"
        step = "checker after -y"
        with trio.fail_after(STEP_LIMIT):
            problems = await check_volume(dev)
        assert problems == [], problems
        step = "mount after -y"
        with trio.fail_after(STEP_LIMIT):
            log.append(await mount_and_walk(dev, strict=True))
        step = "checker after changes"
        with trio.fail_after(STEP_LIMIT):
            problems = await check_volume(dev)
        assert problems == [], problems
        return log
    except BaseException as e:
        tail = "\n".join(log[-40:])
        raise AssertionError(f"{where}\nfailed at {step}: {type(e).__name__}: {e}\n"
                             f"--- last output:\n{tail}") from e


def _seeds(n: int) -> list[int]:
    one = os.environ.get("REPLFS_FUZZ_VOLUME_SEED")
    return [int(one)] if one else list(range(n))


# a handful in make test, 250 per image under make soak
@pytest.mark.parametrize("seed", _seeds(5))
@pytest.mark.parametrize("name", ["4k", "4k-dirty", "1k-16k", "1k-16k-dirty"])
async def test_corrupt_volume(bases, name, seed):
    await check_seed(bases[name], seed)


@pytest.mark.soak
@pytest.mark.parametrize("seed", soak.seeds(range(1000, 1250)) if not
                         os.environ.get("REPLFS_FUZZ_VOLUME_SEED") else _seeds(0))
@pytest.mark.parametrize("name", ["4k", "4k-dirty", "1k-16k", "1k-16k-dirty"])
async def test_corrupt_volume_soak(bases, name, seed):
    await check_seed(bases[name], seed)


async def test_bases_are_clean(bases):
    """The images the seeds start from check clean, and every block the
    seeds damage decodes as what it is listed as."""
    for base in bases.values():
        dev = MemDevice(base.image)
        res, lines = await run_fsck(dev, repair=False)
        if base.dirty:
            assert res.exit_code == fsck.EXIT_UNCORRECTED and res.journals_replayed == 1, lines
            assert base.txns
        else:
            assert res.exit_code == 0, "\n".join(lines)
            assert await check_volume(dev) == []
        kinds = {k for _, k in base.blocks}
        assert {"inode", "extent", "xattr", "dirtable", "dirleaf", "group"} <= kinds
        assert ("journal" in kinds) == base.dirty


# ---------------------------------------------------------------- regressions

# What the seeds found, as damage made on purpose: each of these made the
# core or fsck fail with something else than OSError / a clean repair
# before its fix.  Blocks are decoded, changed and encoded again (so the
# checksum is right); ``where`` names an inode by its path.

async def _ino(base: Base, path: str) -> int:
    """The inode number of ``path`` in ``base`` (a read-only mount of a
    clean image; a dirty one is replayed on a copy)."""
    fs = await Filesystem.mount(MemDevice(base.image), 0, readonly=not base.dirty)
    ino = fs.root_ino
    for part in path.strip("/").split("/"):
        ino = (await fs.lookup(ino, part)).ino
    return ino


class Edit:
    """Changes to a copy of a base image, block by block."""

    def __init__(self, base: Base):
        self.base = base
        self.img = bytearray(base.image)
        self.bs = base.sb.block_size
        self.vol = base.sb.volid

    def raw(self, blkno: int) -> bytes:
        return bytes(self.img[blkno * self.bs:(blkno + 1) * self.bs])

    def put(self, blkno: int, data: bytes) -> None:
        assert len(data) == self.bs
        self.img[blkno * self.bs:(blkno + 1) * self.bs] = data

    def obj(self, cls, blkno: int, change) -> None:
        """Decode block ``blkno`` as ``cls``, ``change(obj)``, encode it."""
        o = cls.decode(self.raw(blkno), self.vol, blkno)
        change(o)
        self.put(blkno, o.encode(self.bs, self.vol, blkno) if cls is F.GroupDesc
                 else o.encode(self.bs, self.vol))

    def sb(self, change) -> None:
        blkno = F.sb_blkno(self.bs)
        sb = F.Superblock.decode(self.raw(blkno), blkno)
        change(sb)
        self.put(blkno, sb.encode(blkno))

    def inode(self, ino: int, change) -> None:
        self.obj(F.Inode, ino, change)

    def leaves(self, ino: int) -> list[int]:
        """The extent-leaf blocks of inode ``ino`` (depth 1) or the leaf
        blocks of directory ``ino`` (extents in the inode)."""
        i = F.Inode.decode(self.raw(ino), self.vol, ino)
        if i.ext_depth:
            return [b for _, b, _ in i.root]
        shift = self.base.sb.cluster_bits - self.base.sb.block_bits
        out = []
        for n in range(i.dir_leaves):
            for l, p, k in i.root:
                if l <= n >> shift < l + k:
                    out.append(((p + (n >> shift) - l) << shift) + (n & ((1 << shift) - 1)))
        return out

    def journal(self, change) -> None:
        """``change(bytearray of the block)`` on the first block of the
        first transaction of the dirty journal, then the commit fixed."""
        txn = self.base.txns[0]
        buf = bytearray(self.raw(txn[0]))
        change(buf)
        struct.pack_into("<I", buf, 8, F.block_crc(buf))
        self.put(txn[0], bytes(buf))
        _fix_commit(self.img, self.base, txn)


def _set(**fields):
    def change(o):
        for k, v in fields.items():
            setattr(o, k, v)
    return change


def _slot0(**fields):
    def change(sb):
        for k, v in fields.items():
            setattr(sb.slots[0], k, v)
    return change


def _swap_extents(leaf):
    # not the first: a leaf whose first record is not its index record's
    # is rewritten anyway
    leaf.recs[1], leaf.recs[2] = leaf.recs[2], leaf.recs[1]


def _huge_logical(leaf):
    l, p, n = leaf.recs[-1]
    leaf.recs[-1] = (1 << 62, p, n)


def _huge_count(leaf):
    l, p, n = leaf.recs[3]
    leaf.recs[3] = (l, p, (1 << 31))
    # and a first record that is not the index record's: the repair then
    # writes new extent leaves, which need free clusters
    l, p, n = leaf.recs[0]
    leaf.recs[0] = (l + 1, p, n)


async def _scenario(base: Base, name: str) -> tuple[bytes, bool]:
    """The damaged image of regression ``name``; and whether fsck -n must
    report it."""
    e = Edit(base)
    sb = base.sb
    if name == "journal superblock garbage":      # FormatError out of mount
        e.put(sb.slots[0].journal_start, bytes(40) + e.raw(sb.slots[0].journal_start)[40:])
        return e.img, True
    if name == "journal of 8 blocks":             # passed fsck, broke every commit
        e.sb(_slot0(journal_blocks=8))
    elif name == "journal in the reserved area":  # fsck 'repaired' it over the reserved area
        e.sb(_slot0(journal_start=0))
    elif name == "journal sequence at the end":   # struct.error at the next commit
        e.obj(F.JournalSuper, sb.slots[0].journal_start, _set(first_seq=(1 << 64) - 1))
    elif name == "hash table depth 100":          # ValueError: negative shift
        e.inode(await _ino(base, "dir/sub"), _set(dir_depth=100))
    elif name == "leaf deeper than its table":    # ValueError: negative shift
        sub = await _ino(base, "dir/sub")
        d = F.Inode.decode(e.raw(sub), e.vol, sub).dir_depth
        e.obj(F.DirLeaf, e.leaves(sub)[0], _set(depth=d + 1))
    elif name == "window past the volume":        # IndexError at unmount
        e.obj(F.LocalAlloc, sb.slots[0].localalloc_blk,
              _set(start=sb.total_clusters + 5, length=10, bitmap=bytearray(2)))
    elif name == "descriptor of another group":   # the allocator wrote it to that group
        e.obj(F.GroupDesc, F.group_desc_blkno(sb, 0), _set(group=1))
    elif name == "slot map of no slot":           # IndexError at mount
        e.obj(F.SlotMap, sb.slotmap_blk, lambda m: m.slots.clear())
    elif name == "symbolic link of 2**60 bytes":  # readlink allocated it
        e.inode(await _ino(base, "sym"), _set(size=1 << 60))
    elif name == "extents out of order":          # fsck missed it
        e.obj(F.ExtentLeaf, e.leaves(await _ino(base, "fragmented"))[0], _swap_extents)
    elif name == "extent at 2**62":               # fsck: struct.error setting the size
        e.obj(F.ExtentLeaf, e.leaves(await _ino(base, "fragmented"))[0], _huge_logical)
    elif name == "extent of 2**31 clusters":      # fsck: ENOSPC for the repair
        e.obj(F.ExtentLeaf, e.leaves(await _ino(base, "fragmented"))[0], _huge_count)
    elif name == "orphan directory holds a leaf of another":   # fsck did not converge
        od = sb.slots[0].orphan_ino
        other = e.raw(e.leaves(await _ino(base, "dir/sub"))[0])
        leaf = F.DirLeaf.decode(other, e.vol, e.leaves(await _ino(base, "dir/sub"))[0])
        leaf.blkno, leaf.index = e.leaves(od)[0], 0
        e.put(leaf.blkno, leaf.encode(e.bs, e.vol))
    elif name == "descriptor naming a block past the volume":   # fsck: OSError
        e.journal(lambda b: struct.pack_into("<Q", b, F.HDR_SIZE + F.JDESC_HDR.size,
                                             sb.total_blocks + 5))
    elif name == "revoke of 2**63 blocks":        # replay looped over them
        txn = next(t for t in base.txns
                   if any(F.signature_of(e.raw(b)) == F.SIG_JREVOKE for b in t))
        r = next(b for b in txn if F.signature_of(e.raw(b)) == F.SIG_JREVOKE)
        buf = bytearray(e.raw(r))
        struct.pack_into("<QQ", buf, F.HDR_SIZE + F.JDESC_HDR.size, 100, 1 << 63)
        struct.pack_into("<I", buf, 8, F.block_crc(buf))
        e.put(r, bytes(buf))
        _fix_commit(e.img, base, txn)
    elif name == "slot map image sealed for the journal":   # replayed after the check
        e.journal(lambda b: None)
        txn = base.txns[0]
        _, targets = F.decode_jdesc(e.raw(txn[0]), e.vol, txn[0])
        i = targets.index(sb.slotmap_blk)
        img = bytearray(e.raw(txn[1 + i]))
        struct.pack_into("<Q", img, 16, txn[1 + i])
        struct.pack_into("<I", img, 8, F.block_crc(img))
        e.put(txn[1 + i], bytes(img))
        _fix_commit(e.img, base, txn)
    elif name == "journal superblock checksum only":   # fsck -n raised
        js = bytearray(e.raw(sb.slots[0].journal_start))
        js[-1] ^= 1
        e.put(sb.slots[0].journal_start, bytes(js))
        return e.img, True
    elif name == "empty xattr name, bad checksum":     # fsck freed the block in use
        x = F.Inode.decode(e.raw(await _ino(base, "dir/file")), e.vol,
                           await _ino(base, "dir/file")).xattr_blk
        e.obj(F.XattrBlock, x, lambda xb: xb.attrs.update({b"": b"v"}))
        raw = bytearray(e.raw(x))
        raw[-1] ^= 1
        e.put(x, bytes(raw))
        return e.img, True
    else:
        raise KeyError(name)
    return e.img, False


SCENARIOS = [
    ("journal superblock garbage", "4k-dirty"), ("journal of 8 blocks", "4k"),
    ("journal in the reserved area", "1k-16k"), ("journal sequence at the end", "4k-dirty"),
    ("hash table depth 100", "4k"), ("leaf deeper than its table", "1k-16k"),
    ("window past the volume", "4k"), ("descriptor of another group", "4k"),
    ("slot map of no slot", "1k-16k"), ("symbolic link of 2**60 bytes", "4k"),
    ("extents out of order", "4k"), ("extent at 2**62", "1k-16k"),
    ("extent of 2**31 clusters", "1k-16k"),
    ("orphan directory holds a leaf of another", "1k-16k"),
    ("descriptor naming a block past the volume", "4k-dirty"),
    ("revoke of 2**63 blocks", "1k-16k-dirty"),
    ("slot map image sealed for the journal", "4k-dirty"),
    ("journal superblock checksum only", "4k-dirty"),
    ("empty xattr name, bad checksum", "1k-16k"),
]


@pytest.mark.parametrize("name,base_name", SCENARIOS, ids=[n for n, _ in SCENARIOS])
async def test_regression(bases, name, base_name):
    base = bases[base_name]
    img, detectable = await _scenario(base, name)
    done = [("superblock: " if name.startswith("journal of") or "reserved" in name else "")
            + name]
    log = await check_damaged(base, img, done, detectable, f"{name} on {base_name}")
    assert log, name
