"""Fixtures for the filesystem core: a file-backed volume formatted by
make_filesystem, a mounted Filesystem, a device wrapper that counts reads
and can simulate a power cut, and an independent consistency checker that
decodes the volume from raw blocks (the test oracle)."""
from __future__ import annotations

import random
import stat

import pytest

from replfs.blockdev import FileBlockDevice
from replfs.fs import format as F
from replfs.fs.core import Filesystem, read_superblock
from replfs.fs.mkfs import make_filesystem

VOLUME = 256 << 20


class PowerCut(BaseException):
    """Raised by CrashDevice once its crash point is reached.  Not an
    Exception: nothing in the code under test may handle a power cut (the
    commit path turns ordinary exceptions into EIO and goes on)."""


class CrashDevice:
    """A BlockDevice over a file that remembers every write not yet made
    durable by flush() (with the bytes it overwrote).

    ``crash_after`` = N makes the N+1st write raise PowerCut and every
    later call fail the same way.  ``settle(rng)`` then turns the file into
    what a disk could hold after the power cut: everything flushed, plus
    any subset of the unflushed writes (kept in their original order).
    """

    def __init__(self, path: str, crash_after: int | None = None):
        self.inner = FileBlockDevice(path)
        self.crash_after = crash_after
        self.writes = 0
        self.reads = 0
        self.dead = False
        self.unflushed: list[tuple[int, bytes, bytes]] = []   # off, old, new
        self.flushes = 0

    @property
    def size(self) -> int:
        return self.inner.size

    def _alive(self) -> None:
        if self.dead:
            raise PowerCut("device lost power")

    async def read(self, off: int, n: int) -> bytes:
        self._alive()
        self.reads += 1
        return await self.inner.read(off, n)

    async def write(self, off: int, data: bytes) -> None:
        self._alive()
        if self.crash_after is not None and self.writes >= self.crash_after:
            self.dead = True
            raise PowerCut("device lost power")
        self.writes += 1
        data = bytes(data)
        old = await self.inner.read(off, len(data))
        self.unflushed.append((off, old, data))
        await self.inner.write(off, data)

    async def flush(self) -> None:
        self._alive()
        await self.inner.flush()
        self.unflushed.clear()
        self.flushes += 1

    async def discard(self, off: int, n: int) -> None:
        await self.write(off, bytes(n))

    async def close(self) -> None:
        await self.inner.close()

    async def settle(self, rng: random.Random | None, keep_all: bool = False) -> None:
        """Undo the unflushed writes, then redo a random subset of them."""
        for off, old, _ in reversed(self.unflushed):
            await self.inner.write(off, old)
        for off, _, new in self.unflushed:
            if keep_all or (rng is not None and rng.random() < 0.5):
                await self.inner.write(off, new)
        self.unflushed.clear()
        self.dead = True


class CountingDevice(FileBlockDevice):
    """FileBlockDevice that counts reads and writes."""

    def __init__(self, path: str):
        super().__init__(path)
        self.reads = 0
        self.writes = 0

    async def read(self, off, n):
        self.reads += 1
        return await super().read(off, n)

    async def write(self, off, data):
        self.writes += 1
        return await super().write(off, data)


def make_image(path, size: int = VOLUME) -> str:
    with open(path, "wb") as f:
        f.truncate(size)
    return str(path)


async def format_image(path: str, **kw) -> F.Superblock:
    dev = FileBlockDevice(path)
    try:
        return await make_filesystem(dev, out=None, **kw)
    finally:
        await dev.close()


@pytest.fixture
async def image(tmp_path):
    path = make_image(tmp_path / "vol.img")
    await format_image(path)
    return path


@pytest.fixture
async def fs(image):
    """A mounted Filesystem; after the test it is unmounted and checked."""
    dev = CountingDevice(image)
    fs = await Filesystem.mount(dev)
    mounts = [fs]
    fs._test_mounts = mounts
    yield fs
    for m in mounts:
        if m.mounted and m.failed is None:
            await m.unmount()
    await dev.close()
    problems = await check_image(image)
    assert not problems, "\n".join(problems)


async def remount(fs: Filesystem) -> Filesystem:
    await fs.unmount()
    new = await Filesystem.mount(fs.dev)
    mounts = getattr(fs, "_test_mounts", None)
    if mounts is not None:
        mounts.append(new)
        new._test_mounts = mounts
    return new


# ---------------------------------------------------------------- the oracle

async def check_image(path: str) -> list[str]:
    dev = FileBlockDevice(path, readonly=True)
    try:
        return await check_volume(dev)
    finally:
        await dev.close()


async def check_volume(dev) -> list[str]:
    """Decode the whole volume from raw blocks and list every
    inconsistency: bitmap vs. what is referenced, clusters owned twice,
    link counts, directory hashing, sizes vs. extents.  The volume must be
    cleanly unmounted (or recovered): journals clean."""
    sb = await read_superblock(dev)
    bs, cs = sb.block_size, sb.cluster_size
    shift = sb.cluster_bits - sb.block_bits
    vol = sb.volid
    problems: list[str] = []
    owner: dict[int, str] = {}

    def claim(cl: int, what: str) -> None:
        if not 0 <= cl < sb.total_clusters:
            problems.append(f"{what}: cluster {cl} outside the volume")
        elif cl in owner:
            problems.append(f"cluster {cl} owned by {owner[cl]} and {what}")
        else:
            owner[cl] = what

    async def blk(b: int) -> bytes:
        return await dev.read(b * bs, bs)

    for cl in range(sb.reserved_clusters):
        claim(cl, "reserved")
    for g in range(1, sb.group_count):
        claim(g * sb.cpg, f"group {g}")
    for b in F.backup_sb_blknos(bs, sb.total_blocks):
        claim(b >> shift, "backup superblock")
    windows = []
    for i, s in enumerate(sb.slots):
        js = F.JournalSuper.decode(await blk(s.journal_start), vol, s.journal_start)
        if js.flags & F.JSB_DIRTY:
            problems.append(f"slot {i}: journal dirty")
        for cl in range(s.journal_start >> shift, (s.journal_start + s.journal_blocks) >> shift):
            claim(cl, f"journal {i}")
        claim(s.localalloc_blk >> shift, f"localalloc {i}")
        la = F.LocalAlloc.decode(await blk(s.localalloc_blk), vol, s.localalloc_blk)
        if la.length:
            windows.append(la)
    claim(sb.slotmap_blk >> shift, "slotmap")

    inodes: dict[int, F.Inode] = {}
    links: dict[int, int] = {}
    subdirs: dict[int, int] = {}

    async def extents_of(ino: F.Inode) -> list[tuple[int, int, int]]:
        if ino.ext_depth == 0:
            return list(ino.root)
        out = []
        for first, leafblk, n in ino.root:
            claim(leafblk >> shift, f"extent leaf of {ino.ino}")
            leaf = F.ExtentLeaf.decode(await blk(leafblk), vol, leafblk)
            if len(leaf.recs) != n or (leaf.recs and leaf.recs[0][0] != first):
                problems.append(f"inode {ino.ino}: root record disagrees with leaf {leafblk}")
            out.extend(leaf.recs)
        return out

    def map_lblk(exts, lblk: int) -> int | None:
        lcl = lblk >> shift
        for l, p, n in exts:
            if l <= lcl < l + n:
                return ((p + lcl - l) << shift) + (lblk & ((1 << shift) - 1))
        return None

    async def visit(ino_no: int, what: str) -> F.Inode | None:
        if ino_no in inodes:
            return inodes[ino_no]
        try:
            ino = F.Inode.decode(await blk(ino_no), vol, ino_no)
        except F.FormatError as e:
            problems.append(f"{what}: {e}")
            return None
        if ino_no & ((1 << shift) - 1):
            problems.append(f"inode {ino_no} not at a cluster start")
        inodes[ino_no] = ino
        claim(ino_no >> shift, f"inode {ino_no}")
        exts = await extents_of(ino)
        prev_end = -1
        total = 0
        for l, p, n in exts:
            if l < prev_end:
                problems.append(f"inode {ino_no}: extents overlap or unsorted")
            prev_end = l + n
            total += n
            for c in range(p, p + n):
                claim(c, f"data of {ino_no}")
        if total != ino.clusters:
            problems.append(f"inode {ino_no}: clusters {ino.clusters}, extents hold {total}")
        if ino.xattr_blk:
            claim(ino.xattr_blk >> shift, f"xattrs of {ino_no}")
            F.XattrBlock.decode(await blk(ino.xattr_blk), vol, ino.xattr_blk)
        if not ino.is_dir:
            if stat.S_ISREG(ino.mode) or stat.S_ISLNK(ino.mode):
                data_end = max((l + n for l, _, n in exts), default=0)
                if data_end * cs > -(-ino.size // cs) * cs:
                    problems.append(f"inode {ino_no}: extents beyond size {ino.size}")
            return ino
        # directory: read the table and every leaf
        seen_leaves = set()
        nslots = 1 << ino.dir_depth
        tslots = F.dirtable_slots(bs)
        ptrs = []
        for t in range(-(-nslots // tslots)):
            b = map_lblk(exts, F.DIR_TABLE_LBLK + t)
            if b is None:
                problems.append(f"dir {ino_no}: table block {t} unmapped")
                return ino
            tb = F.DirTable.decode(await blk(b), vol, b)
            ptrs.extend(tb.ptrs)
        ptrs = ptrs[:nslots]
        for s, leafidx in enumerate(ptrs):
            if leafidx >= ino.dir_leaves:
                problems.append(f"dir {ino_no}: slot {s} -> leaf {leafidx} >= {ino.dir_leaves}")
                continue
            if leafidx in seen_leaves:
                continue
            seen_leaves.add(leafidx)
            b = map_lblk(exts, leafidx)
            if b is None:
                problems.append(f"dir {ino_no}: leaf {leafidx} unmapped")
                continue
            leaf = F.DirLeaf.decode(await blk(b), vol, b)
            span = ino.dir_depth - leaf.depth
            if span < 0 or any(ptrs[x] != leafidx for x in
                               range((s >> span) << span, ((s >> span) + 1) << span)):
                problems.append(f"dir {ino_no}: leaf {leafidx} slots inconsistent")
            keys = [e.key for e in leaf.entries]
            if keys != sorted(keys):
                problems.append(f"dir {ino_no}: leaf {leafidx} not sorted")
            for e in leaf.entries:
                if e.key != F.name_key(sb.uuid, e.name):
                    problems.append(f"dir {ino_no}: entry {e.name!r} has a wrong key")
                if leaf.depth and e.key >> (F.KEY_BITS - leaf.depth) != s >> span:
                    problems.append(f"dir {ino_no}: entry {e.name!r} in the wrong leaf")
                child = await visit(e.ino, f"entry {e.name!r} of {ino_no}")
                if child is None:
                    continue
                links[e.ino] = links.get(e.ino, 0) + 1
                if child.is_dir:
                    subdirs[ino_no] = subdirs.get(ino_no, 0) + 1
                    if child.parent != ino_no:
                        problems.append(f"dir {e.ino}: parent {child.parent}, found in {ino_no}")
                if e.ftype != F.ftype_of(child.mode):
                    problems.append(f"dir {ino_no}: entry {e.name!r} has the wrong type")
        if len(seen_leaves) != ino.dir_leaves:
            problems.append(f"dir {ino_no}: {ino.dir_leaves} leaves, {len(seen_leaves)} in the table")
        return ino

    await visit(sb.root_ino, "root")
    orphans = set()
    for i, s in enumerate(sb.slots):
        before = dict(links)
        await visit(s.orphan_ino, f"orphan dir {i}")
        for ino, n in links.items():
            if n != before.get(ino, 0):
                orphans.add(ino)
    for ino_no, ino in inodes.items():
        if ino_no == sb.root_ino or ino_no in {s.orphan_ino for s in sb.slots}:
            continue
        if ino.is_dir:
            want = 2 + subdirs.get(ino_no, 0)
        else:
            want = links.get(ino_no, 0) - (1 if ino_no in orphans else 0)
        if ino_no in orphans:
            problems.append(f"inode {ino_no}: still in an orphan directory after unmount")
        if ino.nlink != want:
            problems.append(f"inode {ino_no}: nlink {ino.nlink}, {want} links found")
    rootino = inodes.get(sb.root_ino)
    if rootino is not None and rootino.nlink != 2 + subdirs.get(sb.root_ino, 0):
        problems.append(f"root: nlink {rootino.nlink}, {2 + subdirs.get(sb.root_ino, 0)} expected")

    # bitmaps: global bit set <=> owned or inside a slot's window;
    # inside a window, the local bit set <=> owned
    in_window = {}
    for la in windows:
        for i in range(la.length):
            in_window[la.start + i] = la.test(i)
    for g in range(sb.group_count):
        gb = F.group_desc_blkno(sb, g)
        gd = F.GroupDesc.decode(await blk(gb), vol, gb)
        if gd.free != gd.nbits - F.count_bits(gd.bitmap, gd.nbits):
            problems.append(f"group {g}: free count {gd.free} disagrees with its bitmap")
        for bit in range(gd.nbits):
            cl = g * sb.cpg + bit
            used = gd.test(bit)
            if cl in in_window:
                if not used:
                    problems.append(f"cluster {cl}: in a window but free globally")
                if in_window[cl] != (cl in owner):
                    problems.append(f"cluster {cl}: window bit {in_window[cl]}, "
                                    f"owned by {owner.get(cl)}")
            elif used != (cl in owner):
                problems.append(f"cluster {cl}: bitmap {'used' if used else 'free'}, "
                                f"owned by {owner.get(cl)}")
        if len(problems) > 50:
            break
    return problems

