"""fsck.replfs: check and repair an unmounted replfs volume.

The checker works like e2fsck / fsck.ocfs2, in passes:

0. superblock (falling back to a backup; a damaged cluster name is
   cleared), slot map, journals (a dirty journal is replayed first);
1. inodes, extent trees, xattr blocks and cluster ownership; clusters
   claimed more than once are resolved as e2fsck's passes 1B-1D do
   (metadata keeps them, every other claimant gets its own copy);
2. directory structure (hash table, leaves, entries);
3. connectivity (a lost root or orphan directory is recreated, unattached
   inodes go to lost+found, orphans are freed);
4. link counts;
5. cluster allocation bitmaps (group descriptors and local windows).

Everything is read through an in-memory overlay of the device: writes
(journal replay, repairs) land in the overlay and reach the device only
at the end, and only when repairing.  So ``-n`` can replay a dirty journal
and check the replayed view without writing a byte.

Metadata is found by walking the tree from the root, the orphan
directories and, for inodes nothing points at, by probing clusters the
bitmaps call used that no walked structure claims.  Each wave of the walk
reads its blocks in a few large, coalesced, concurrent reads.

Repairs that need new space (rebuilding a directory, reconnecting into
lost+found) reuse the filesystem's own directory and extent code on a
private cache, with an allocator that hands out clusters nothing claims;
the bitmaps are then rebuilt from what the final tree references.
"""
from __future__ import annotations

import argparse
import errno
import heapq
import os
import random
import stat
import struct
import sys
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import trio

from . import format as F
from . import journal as J
from .cache import MetaCache
from .dirs import Directories
from .extents import ExtentMaps

PROG = "fsck.replfs"

EXIT_OK = 0
EXIT_FIXED = 1
EXIT_REBOOT = 2
EXIT_UNCORRECTED = 4
EXIT_OPERATIONAL = 8
EXIT_USAGE = 16
EXIT_CANCELLED = 32

_DECODE_ERRORS = (F.FormatError, struct.error, ValueError, UnicodeError, IndexError)
_VALID_TYPES = {stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK, stat.S_IFCHR, stat.S_IFBLK,
                stat.S_IFIFO, stat.S_IFSOCK}
MAX_SYMLINK = 4095
# No extent maps past this offset (the core's limit, fs/core.py): a size
# set to cover one could not even be stored in an inode.
MAX_FILE_SIZE = 1 << 60
MAX_REPORTED_RUNS = 8


class FsckError(Exception):
    """The check cannot go on (exit code 8)."""


class Cancelled(Exception):
    """The user quit at a question (exit code 32)."""


@dataclass
class Result:
    errors_found: int = 0
    errors_fixed: int = 0
    operational_error: str | None = None
    cancelled: bool = False
    label: str = ""
    files: int = 0
    directories: int = 0
    clusters_used: int = 0
    total_clusters: int = 0
    journals_replayed: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def errors_left(self) -> int:
        return self.errors_found - self.errors_fixed

    @property
    def exit_code(self) -> int:
        if self.cancelled:
            return EXIT_CANCELLED | (EXIT_FIXED if self.errors_fixed else 0)
        if self.operational_error is not None:
            return EXIT_OPERATIONAL
        code = EXIT_OK
        if self.errors_fixed:
            code |= EXIT_FIXED
        if self.errors_left:
            code |= EXIT_UNCORRECTED
        return code

    @property
    def clean(self) -> bool:
        return self.exit_code == EXIT_OK


# ------------------------------------------------------------------ devices

class OverlayDevice:
    """A BlockDevice that keeps writes in memory, block by block, over a
    base device; ``commit`` writes them through."""

    def __init__(self, base, bs: int):
        self.base = base
        self.bs = bs
        self.blocks: dict[int, bytes] = {}

    @property
    def size(self) -> int:
        return self.base.size

    async def read(self, offset: int, length: int) -> bytes:
        data = await self.base.read(offset, length)
        if not self.blocks or not data:
            return data
        bs = self.bs
        end = offset + len(data)
        first, last = offset // bs, (end - 1) // bs
        if last - first + 1 <= len(self.blocks):
            hits = [b for b in range(first, last + 1) if b in self.blocks]
        else:
            hits = [b for b in self.blocks if first <= b <= last]
        if not hits:
            return data
        buf = bytearray(data)
        for b in hits:
            img = self.blocks[b]
            lo, hi = max(offset, b * bs), min(end, (b + 1) * bs)
            buf[lo - offset:hi - offset] = img[lo - b * bs:hi - b * bs]
        return bytes(buf)

    async def write(self, offset: int, data: bytes) -> None:
        bs = self.bs
        if offset + len(data) > self.size:
            raise OSError(28, "write beyond the end of the device")
        pos = 0
        while pos < len(data):
            b, within = divmod(offset + pos, bs)
            n = min(bs - within, len(data) - pos)
            if n == bs:
                self.blocks[b] = bytes(data[pos:pos + bs])
            else:
                cur = bytearray(await self.read(b * bs, bs))
                cur[within:within + n] = data[pos:pos + n]
                self.blocks[b] = bytes(cur)
            pos += n

    async def flush(self) -> None:
        pass

    async def discard(self, offset: int, length: int) -> None:
        await self.write(offset, bytes(length))

    async def close(self) -> None:
        pass

    async def commit(self) -> int:
        """Write every held block to the base device (coalesced), flush."""
        blks = sorted(self.blocks)
        i = 0
        while i < len(blks):
            j = i + 1
            while j < len(blks) and blks[j] == blks[j - 1] + 1 and j - i < 256:
                j += 1
            await self.base.write(blks[i] * self.bs,
                                  b"".join(self.blocks[b] for b in blks[i:j]))
            i = j
        if blks:
            await self.base.flush()
        n = len(blks)
        self.blocks.clear()
        return n


async def read_blocks(dev, bs: int, blknos, *, gap: int = 16, maxrun: int = 256,
                      parallel: int = 8) -> dict[int, bytes]:
    """Read many blocks in a few large reads: sorted, merged across small
    gaps, issued concurrently."""
    blks = sorted(set(blknos))
    runs: list[list[int]] = []
    for b in blks:
        if runs and b - runs[-1][1] <= gap and b + 1 - runs[-1][0] <= maxrun:
            runs[-1][1] = b + 1
        else:
            runs.append([b, b + 1])
    out: dict[int, bytes] = {}
    want = set(blks)
    limiter = trio.CapacityLimiter(parallel)

    async def one(a: int, e: int) -> None:
        async with limiter:
            data = await dev.read(a * bs, (e - a) * bs)
        for b in range(a, e):
            if b in want:
                out[b] = data[(b - a) * bs:(b - a + 1) * bs]

    if len(runs) == 1:
        await one(*runs[0])
    elif runs:
        async with trio.open_nursery() as n:
            for a, e in runs:
                n.start_soon(one, a, e)
    return out


# ------------------------------------------------------------------ model

@dataclass
class Ent:
    """A directory entry as found on disk."""
    dir: int
    name: bytes
    ino: int
    ftype: int
    key: int
    leaf_blk: int


@dataclass
class Node:
    ino: int
    inode: F.Inode | None = None
    error: str | None = None          # why the inode is unusable
    exts: list = field(default_factory=list)
    leaf_blks: list = field(default_factory=list)
    tree_errors: list = field(default_factory=list)
    refs: list = field(default_factory=list)        # Ents naming this inode
    unattached: bool = False
    # directories
    entries: list = field(default_factory=list)     # Ents in this directory
    dir_errors: list = field(default_factory=list)  # structural: needs a rebuild
    # symlinks
    target: bytes | None = None
    xattr_error: str | None = None

    @property
    def ok(self) -> bool:
        return self.inode is not None and self.error is None

    @property
    def is_dir(self) -> bool:
        return self.ok and self.inode.is_dir


@dataclass(eq=False)
class Claim:
    """One owner's claim on a run of clusters (pass 1 ownership)."""
    start: int
    n: int
    owner: int | None        # inode number; None for filesystem metadata
    kind: str                # meta, inode, leaf, xattr, dir (directory blocks), data
    ref: object              # meta: what; leaf/xattr: block; dir/data: extent record
    key: tuple = ()          # who keeps a cluster claimed twice: the smallest key
    lost: list = field(default_factory=list)    # (first, end) runs to give up

    @property
    def end(self) -> int:
        return self.start + self.n


# Who keeps a multiply-claimed cluster: filesystem metadata, then an
# inode's own cluster, then inode metadata (extent leaves, xattr blocks,
# directory blocks), then file data; among equals the lowest inode number.
_CLAIM_PRIORITY = {"meta": 0, "inode": 1, "leaf": 2, "xattr": 2, "dir": 2, "data": 3}


def _merge(ranges) -> list[tuple[int, int]]:
    """Sorted union of (first, end) ranges."""
    out: list[list[int]] = []
    for a, e in sorted(ranges):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], e)
        else:
            out.append([a, e])
    return [(a, e) for a, e in out]


def _runs(clusters) -> list[tuple[int, int]]:
    out: list[list[int]] = []
    for c in sorted(clusters):
        if out and c == out[-1][1]:
            out[-1][1] += 1
        else:
            out.append([c, c + 1])
    return [(a, e) for a, e in out]


def _fmt_runs(runs: list[tuple[int, int]]) -> str:
    parts = [f"{a}" if e == a + 1 else f"{a}-{e - 1}" for a, e in runs[:MAX_REPORTED_RUNS]]
    if len(runs) > MAX_REPORTED_RUNS:
        parts.append(f"... ({len(runs) - MAX_REPORTED_RUNS} more runs)")
    return ", ".join(parts)


def _mask_runs(mask: int, base: int) -> list[tuple[int, int]]:
    """Runs of set bits of ``mask`` as absolute (start, end) clusters."""
    out = []
    pos = 0
    while mask:
        low = (mask & -mask).bit_length() - 1
        mask >>= low
        pos += low
        inv = ~mask
        run = (inv & -inv).bit_length() - 1
        out.append((base + pos, base + pos + run))
        mask >>= run
        pos += run
    return out


def _valid_name(name: bytes) -> bool:
    return (0 < len(name) <= F.MAX_NAME and b"/" not in name and b"\0" not in name
            and name not in (b".", b".."))


class _RepairAlloc:
    """Allocator for repairs: hands out clusters that nothing claims, the
    bitmaps call free and no local window holds."""

    def __init__(self, checker: "Checker"):
        self.c = checker
        self.forbidden: dict[int, int] | None = None
        self.pending: list = []

    def _build(self, strict: bool) -> dict[int, int]:
        c = self.c
        masks = c.claimed_masks()
        for g, gd in enumerate(c.groups):
            if strict and gd is not None:
                masks[g] = masks.get(g, 0) | int.from_bytes(gd.bitmap, "little")
        for start, n in c.window_ranges():
            c.or_range(masks, start, n)
        for cl in c.repair_allocated:
            c.or_range(masks, cl, 1)
        return masks

    def alloc(self, want: int, goal: int | None = None) -> tuple[int, int]:
        c = self.c
        sb = c.sb
        for strict in (True, False):
            masks = self._build(strict)
            for g in range(sb.group_count):
                nbits = min(sb.cpg, sb.total_clusters - g * sb.cpg)
                m = masks.get(g, 0)
                free = ~m & ((1 << nbits) - 1)
                if not free:
                    continue
                bit = (free & -free).bit_length() - 1
                cl = g * sb.cpg + bit
                c.repair_allocated.add(cl)
                return cl, 1
        raise OSError(28, "no free cluster left for the repair")

    def free(self, start: int, n: int) -> None:
        pass          # the bitmaps are rebuilt from the final tree

    def release_window(self) -> None:
        pass


# ------------------------------------------------------------------ checker

class Checker:
    def __init__(self, dev, *, repair: bool, answer, out, verbose: bool = False,
                 force: bool = False, mounted: str | None = None, err=None):
        self.base = dev
        self.err = err or out or (lambda *_: None)
        self.repair = repair
        self.answer = answer           # async (question) -> bool
        self.out = out or (lambda *_: None)
        self.verbose = verbose
        self.force = force
        self.mounted = mounted
        self.res = Result()
        self.sb: F.Superblock | None = None
        self.view: OverlayDevice | None = None
        self.modified = False
        self.repair_allocated: set[int] = set()
        self.groups: list[F.GroupDesc | None] = []
        self.locals: dict[int, F.LocalAlloc | None] = {}
        self.nodes: dict[int, Node] = {}
        self.slots_in_use: list = []
        self.pending_checksums: list = []
        self._replayed_in_memory = False
        self.lf_offered: int | None = None   # unattached lost+found offered back to the root

    # -------------------------------------------------- reporting

    def say(self, msg: str) -> None:
        self.out(msg)

    def info(self, msg: str) -> None:
        if self.verbose:
            self.out(msg)

    async def problem(self, msg: str, question: str | None = None) -> bool:
        """Report an error; ask whether to fix it.  True means fix it now."""
        self.res.errors_found += 1
        self.res.problems.append(msg)
        if question is None:
            self.say(msg)
            return False
        self.say(msg)
        yes = await self.answer(question)
        if yes:
            self.res.errors_fixed += 1
        return yes

    # -------------------------------------------------- geometry helpers

    @property
    def bs(self) -> int:
        return self.sb.block_size

    @property
    def shift(self) -> int:
        return self.sb.cluster_bits - self.sb.block_bits

    def or_range(self, masks: dict[int, int], start: int, n: int) -> None:
        cpg = self.sb.cpg
        end = min(start + n, self.sb.total_clusters)
        while start < end:
            g, bit = divmod(start, cpg)
            k = min(end - start, cpg - bit)
            masks[g] = masks.get(g, 0) | (((1 << k) - 1) << bit)
            start += k

    def window_ranges(self) -> list[tuple[int, int]]:
        return [(la.start, la.length) for la in self.locals.values()
                if la is not None and la.length]

    def metadata_claims(self) -> list[tuple[int, int, str]]:
        sb = self.sb
        bpc = sb.bpc
        out = [(0, sb.reserved_clusters, "reserved area")]
        for g in range(1, sb.group_count):
            out.append((g * sb.cpg, 1, f"group {g} descriptor"))
        for blk in F.backup_sb_blknos(sb.block_size, sb.total_blocks):
            out.append((blk // bpc, 1, "backup superblock"))
        for i, s in enumerate(sb.slots):
            out.append((s.journal_start // bpc, -(-s.journal_blocks // bpc), f"journal of slot {i}"))
            out.append((s.localalloc_blk // bpc, 1, f"local allocation block of slot {i}"))
        out.append((sb.slotmap_blk // bpc, 1, "slot map"))
        return out

    def node_claims(self, node: Node) -> list[tuple[int, int, str]]:
        """(first cluster, count, what) for everything an inode owns."""
        if not node.ok:
            return []
        shift = self.shift
        out = [(node.ino >> shift, 1, "inode")]
        for blk in node.leaf_blks:
            out.append((blk >> shift, 1, "extent leaf"))
        for l, p, n in node.exts:
            # an extent reaching past the volume claims nothing: pass 1
            # drops it (claiming up to the end of the volume left no room
            # for repairs: found by fuzzing)
            if 0 < n and 0 <= p and p + n <= self.sb.total_clusters:
                out.append((p, n, f"logical cluster {l}"))
        if node.inode.xattr_blk and node.xattr_error is None:
            out.append((node.inode.xattr_blk >> shift, 1, "xattr block"))
        return out

    def claimed_masks(self) -> dict[int, int]:
        masks: dict[int, int] = {}
        for start, n, _ in self.metadata_claims():
            self.or_range(masks, start, n)
        for node in self.nodes.values():
            for start, n, _ in self.node_claims(node):
                self.or_range(masks, start, n)
        return masks

    # -------------------------------------------------- block decoding

    def decode(self, decoder, sig: bytes, raw: bytes, blkno: int):
        """Decode a metadata block.  Returns (object, error, fixed image):
        a block whose only fault is its checksum decodes from a resealed
        copy, returned as the fixed image."""
        try:
            return decoder(raw, self.sb.volid, blkno), None, None
        except _DECODE_ERRORS as e:
            err = str(e) or type(e).__name__
        if len(raw) != self.bs or raw[:8] != sig:
            return None, err, None
        _, crc, vol, blk, _ = F.HDR.unpack_from(raw, 0)
        if vol != self.sb.volid or blk != blkno or crc == F.block_crc(raw):
            return None, err, None
        fixed = bytearray(raw)
        struct.pack_into("<I", fixed, 8, F.block_crc(fixed))
        try:
            return decoder(bytes(fixed), self.sb.volid, blkno), err, bytes(fixed)
        except _DECODE_ERRORS:
            return None, err, None

    async def fix_checksum(self, what: str, blkno: int, fixed: bytes) -> bool:
        if await self.problem(f"{what} (block {blkno}) has a bad checksum.",
                              "Recompute the checksum"):
            await self.view.write(blkno * self.bs, fixed)
            self.modified = True
            return True
        return False

    # -------------------------------------------------- editing

    @asynccontextmanager
    async def edit(self):
        """A private cache + the core's extent and directory code for a
        repair; dirty blocks are written home (to the overlay) at the end."""
        cache = MetaCache(self.view, self.sb, check=False)
        alloc = _RepairAlloc(self)
        ext = ExtentMaps(cache, alloc, self.sb)
        dirs = Directories(cache, alloc, ext, self.sb)
        yield cache, ext, dirs
        images, _ = cache.take_transaction()
        for blk in sorted(images):
            await self.view.write(blk * self.bs, images[blk])
        if images:
            self.modified = True

    async def put(self, blkno: int, obj) -> None:
        if isinstance(obj, F.GroupDesc):
            img = obj.encode(self.bs, self.sb.volid, blkno)
        else:
            img = obj.encode(self.bs, self.sb.volid)
        await self.view.write(blkno * self.bs, img)
        self.modified = True

    # ================================================== pass 0

    async def find_superblock(self) -> F.Superblock:
        dev = self.base
        primary_err = "no replfs signature"
        for bs in F.BLOCK_SIZES:
            raw = await dev.read(F.SB_OFFSET, bs)
            if len(raw) < bs or raw[:8] != F.SIG_SUPER:
                continue
            try:
                sb = F.Superblock.decode(raw, F.sb_blkno(bs))
            except _DECODE_ERRORS as e:
                primary_err = str(e)
                continue
            if sb.block_size != bs:
                continue
            why = self.superblock_insane(sb)
            if why is None:
                return sb
            primary_err = why
        # The primary is unusable: look for a backup.
        for off in F.BACKUP_SB_OFFSETS:
            for bs in F.BLOCK_SIZES:
                if off + bs > dev.size:
                    continue
                raw = await dev.read(off, bs)
                if raw[:8] != F.SIG_SUPER:
                    continue
                try:
                    sb = F.Superblock.decode(raw, off // bs)
                except _DECODE_ERRORS:
                    continue
                if sb.block_size != bs or self.superblock_insane(sb):
                    continue
                self.sb = sb
                self.view = OverlayDevice(dev, bs)
                if await self.problem(
                        f"Primary superblock is damaged ({primary_err}); "
                        f"using the backup superblock at byte {off}.",
                        "Restore the primary superblock from the backup"):
                    await self.view.write(F.SB_OFFSET, sb.encode(F.sb_blkno(bs)))
                    self.modified = True
                return sb
        raise FsckError(f"no usable replfs superblock ({primary_err}) and no backup "
                        f"superblock found (not formatted with mkfs.replfs?)")

    def superblock_insane(self, sb: F.Superblock) -> str | None:
        return F.superblock_problem(sb, self.base.size)

    async def pass0(self) -> None:
        self.say("Pass 0: Checking superblock and journals")
        if self.sb is None:
            self.sb = await self.find_superblock()
        sb = self.sb
        if self.view is None:
            self.view = OverlayDevice(self.base, sb.block_size)
        self.res.label = sb.label
        self.res.total_clusters = sb.total_clusters
        self.info(f"  block size {sb.block_size}, cluster size {sb.cluster_size}, "
                  f"{sb.total_clusters} clusters in {sb.group_count} groups, "
                  f"{sb.slot_count} slots")
        await self.check_cluster_name()
        # Backups must match the superblock in use.
        want = sb.encode(0)[F.HDR_SIZE:]
        for blk in F.backup_sb_blknos(sb.block_size, sb.total_blocks):
            raw = await self.view.read(blk * self.bs, self.bs)
            try:
                F.Superblock.decode(raw, blk)
                same = raw[F.HDR_SIZE:] == want
                why = "is out of date"
            except _DECODE_ERRORS as e:
                same, why = False, f"is damaged ({e})"
            if not same and await self.problem(
                    f"Backup superblock at block {blk} {why}.", "Rewrite it"):
                await self.view.write(blk * self.bs, sb.encode(blk))
                self.modified = True
        # The journals first: a replay rewrites metadata, the slot map
        # among it, which must be checked as replayed (found by fuzzing:
        # a damaged slot map image in the journal was replayed after the
        # slot map had been found fine).
        await self.check_journals()
        await self.check_slotmap()

    async def check_cluster_name(self) -> None:
        """The o2cb cluster name: a stored name must be a valid one.  A
        damaged name is cleared (the volume then has no cluster name)
        rather than guessed; the superblock and its backups are rewritten."""
        sb = self.sb
        if not sb.feat_compat & F.FEATURE_COMPAT_CLUSTER_NAME:
            self.info("  cluster: none")
            return
        try:
            F.check_cluster_name(sb.cluster_name)
        except ValueError as e:
            if await self.problem(f"Superblock cluster name is damaged ({e}).",
                                  "Clear the cluster name"):
                sb.cluster_name = ""
                sb.feat_compat &= ~F.FEATURE_COMPAT_CLUSTER_NAME
                await self.write_superblocks()
            return
        self.info(f"  cluster: {sb.cluster_name}")

    async def check_slotmap(self) -> None:
        sb = self.sb
        raw = await self.view.read(sb.slotmap_blk * self.bs, self.bs)
        sm, err, fixed = self.decode(F.SlotMap.decode, F.SIG_SLOTMAP, raw, sb.slotmap_blk)
        if fixed is not None:
            await self.fix_checksum("Slot map", sb.slotmap_blk, fixed)
        ok = sm is not None and len(sm.slots) == sb.slot_count and \
            all(st in (F.SLOT_FREE, F.SLOT_IN_USE) for st, _, _ in sm.slots)
        if not ok:
            if await self.problem(f"Slot map (block {sb.slotmap_blk}) is damaged"
                                  f"{': ' + err if err else ''}.", "Rewrite it with every slot free"):
                await self.put(sb.slotmap_blk, F.SlotMap(sb.slotmap_blk,
                                                         [(F.SLOT_FREE, 0, 0)] * sb.slot_count))
            return
        in_use = [(i, node) for i, (st, node, _) in enumerate(sm.slots) if st == F.SLOT_IN_USE]
        self.slots_in_use = in_use
        if in_use:
            who = ", ".join(f"slot {i} (node {n})" for i, n in in_use)
            self.say(f"WARNING: the slot map shows the volume in use: {who}.")
            if self.repair:
                if await self.problem("Slot map entries left by nodes that are not running "
                                      "(checked with -f).", "Mark those slots free"):
                    sm.slots = [(F.SLOT_FREE, 0, gen) for _, _, gen in sm.slots]
                    await self.put(sm.blkno, sm)

    async def check_journals(self) -> None:
        sb = self.sb
        for slot, info in enumerate(sb.slots):
            raw = await self.view.read(info.journal_start * self.bs, self.bs)
            js, err, fixed = self.decode(F.JournalSuper.decode, F.SIG_JSUPER, raw,
                                         info.journal_start)
            if fixed is not None and not await self.fix_checksum(
                    f"Journal superblock of slot {slot}", info.journal_start, fixed) \
                    and not self.repair:
                # checked as if fixed, in memory only, as the replay below
                # (which reads the journal superblock again)
                await self.view.write(info.journal_start * self.bs, fixed)
            if js is None or js.nblocks != info.journal_blocks or js.first_seq >= J.MAX_SEQ:
                why = err or (f"says {js.nblocks} blocks, the superblock {info.journal_blocks}"
                              if js.nblocks != info.journal_blocks
                              else f"sequence {js.first_seq} out of range")
                if await self.problem(f"Journal superblock of slot {slot} is damaged ({why}).",
                                      "Reset the journal (its contents are lost)"):
                    seq = await self._max_journal_seq(slot) + 1
                    if seq >= J.MAX_SEQ:
                        seq = 1
                    await self.put(info.journal_start, F.JournalSuper(
                        info.journal_start, 0, seq, info.journal_blocks))
                continue
            if not js.flags & F.JSB_DIRTY:
                continue
            try:
                _, txns, _, _ = await J.read_transactions(self.view, sb, slot)
            except OSError as e:
                await self.problem(f"Journal of slot {slot} cannot be read ({e}); it is "
                                   f"not replayed.")
                continue
            msg = (f"Journal of slot {slot} needs recovery "
                   f"({len(txns)} committed transaction(s)).")
            if self.repair:
                fixed_it = await self.problem(msg, "Replay it")
            else:
                self.say(msg)
                self.res.errors_found += 1
                self.res.problems.append(msg)
                fixed_it = False
                self.say(f"  Replaying it in memory only (nothing is written); "
                         f"checking the replayed view.")
            # Either way the rest of the check looks at the replayed view;
            # without -y it stays in memory.
            await J.replay(self.view, sb, slot)
            self.res.journals_replayed += 1
            self.modified = self.modified or fixed_it
            if not fixed_it:
                self._replayed_in_memory = True

    async def _max_journal_seq(self, slot: int) -> int:
        info = self.sb.slots[slot]
        blks = range(info.journal_start + 1, info.journal_start + info.journal_blocks)
        raws = await read_blocks(self.view, self.bs, blks, maxrun=1024)
        best = 0
        for blk, raw in raws.items():
            if raw[:8] in (F.SIG_JDESC, F.SIG_JREVOKE, F.SIG_JCOMMIT):
                best = max(best, struct.unpack_from("<Q", raw, F.HDR_SIZE)[0])
        return best

    # ================================================== scanning

    async def load_allocators(self) -> None:
        sb = self.sb
        blks = [F.group_desc_blkno(sb, g) for g in range(sb.group_count)]
        raws = await read_blocks(self.view, self.bs, blks)
        self.groups = []
        self.group_errors: dict[int, str] = {}
        for g, blk in enumerate(blks):
            gd, err, fixed = self.decode(F.GroupDesc.decode, F.SIG_GROUP, raws[blk], blk)
            nbits = min(sb.cpg, sb.total_clusters - g * sb.cpg)
            if gd is not None and (gd.group != g or gd.nbits != nbits):
                gd, err = None, f"describes group {gd.group} of {gd.nbits} clusters"
            if fixed is not None and gd is not None:
                self.pending_checksums.append((f"Group descriptor {g}", blk, fixed))
            if gd is None:
                self.group_errors[g] = err
            self.groups.append(gd)
        self.locals = {}
        self.local_errors: dict[int, str] = {}
        for slot, info in enumerate(sb.slots):
            raw = await self.view.read(info.localalloc_blk * self.bs, self.bs)
            la, err, fixed = self.decode(F.LocalAlloc.decode, F.SIG_LOCALALLOC, raw,
                                         info.localalloc_blk)
            if fixed is not None and la is not None:
                self.pending_checksums.append((f"Local allocation block of slot {slot}",
                                               info.localalloc_blk, fixed))
            if la is not None and la.length and (
                    la.start < sb.reserved_clusters or la.start + la.length > sb.total_clusters):
                la, err = None, f"window {la.start}+{la.length} outside the volume"
            if la is None:
                self.local_errors[slot] = err
            self.locals[slot] = la
        # Windows must not overlap each other.
        seen: list[tuple[int, int, int]] = []
        for slot, la in sorted(self.locals.items()):
            if la is None or not la.length:
                continue
            for s2, a, e in seen:
                if la.start < e and a < la.start + la.length:
                    self.local_errors[slot] = f"window overlaps the window of slot {s2}"
                    self.locals[slot] = None
                    break
            else:
                seen.append((slot, la.start, la.start + la.length))

    def inode_insane(self, ino: F.Inode) -> str | None:
        if not ino.flags & F.INODE_FLAG_VALID:
            return "not in use"
        if ino.mode & F.S_IFMT not in _VALID_TYPES:
            return f"bad file type {ino.mode & F.S_IFMT:o}"
        if ino.ext_depth not in (0, 1):
            return f"bad extent tree depth {ino.ext_depth}"
        if len(ino.root) > F.inode_root_capacity(self.bs):
            return "too many extent records"
        return None

    async def scan(self, anchors: list[int], *, unattached: bool = False) -> None:
        """Walk the tree from ``anchors``, adding nodes to self.nodes."""
        sb = self.sb
        bs, shift = self.bs, self.shift
        wave = [a for a in anchors if a not in self.nodes]
        while wave:
            wave = sorted(set(wave))
            raws = await read_blocks(self.view, bs, [i for i in wave if self.plausible_ino(i)])
            fresh: list[Node] = []
            for ino in wave:
                node = Node(ino, unattached=unattached)
                self.nodes[ino] = node
                if ino not in raws:
                    node.error = "not an inode location"
                    continue
                inode, err, fixed = self.decode(F.Inode.decode, F.SIG_INODE, raws[ino], ino)
                if inode is not None:
                    why = self.inode_insane(inode)
                    if why is not None:
                        node.inode, node.error = inode, why
                        continue
                    if fixed is not None:
                        self.pending_checksums.append((f"Inode {ino}", ino, fixed))
                    node.inode = inode
                    fresh.append(node)
                else:
                    node.error = err
            # Extent leaves.
            leafs = {}
            for node in fresh:
                if node.inode.ext_depth == 1:
                    for first, blk, n in node.inode.root:
                        if 0 < blk < sb.total_blocks and blk % sb.bpc == 0:
                            leafs[blk] = node
                        else:
                            node.tree_errors.append(f"extent leaf pointer {blk} is invalid")
            lraws = await read_blocks(self.view, bs, leafs)
            for node in fresh:
                inode = node.inode
                if inode.ext_depth == 0:
                    node.exts = [tuple(r) for r in inode.root]
                    continue
                for first, blk, n in inode.root:
                    if blk not in lraws:
                        continue
                    leaf, err, fixed = self.decode(F.ExtentLeaf.decode, F.SIG_EXTENT,
                                                   lraws[blk], blk)
                    if leaf is None:
                        node.tree_errors.append(f"extent leaf {blk}: {err}")
                        continue
                    if fixed is not None:
                        self.pending_checksums.append((f"Extent leaf of inode {node.ino}", blk,
                                                       fixed))
                    node.leaf_blks.append(blk)
                    if len(leaf.recs) != n or not leaf.recs or leaf.recs[0][0] != first:
                        node.tree_errors.append(f"extent leaf {blk} does not match its "
                                                f"index record")
                    node.exts.extend(tuple(r) for r in leaf.recs)
            for node in fresh:
                # The core finds extents by bisection: out of order, they
                # map the wrong clusters even where none overlap (found by
                # fuzzing).  A rewrite stores them sorted.
                starts = [l for l, _, _ in node.exts]
                if starts != sorted(starts):
                    node.tree_errors.append("extents out of order")
            # Xattr blocks.
            xblks = {}
            for node in fresh:
                xb = node.inode.xattr_blk
                if xb:
                    if 0 < xb < sb.total_blocks and xb % sb.bpc == 0:
                        xblks[xb] = node
                    else:
                        node.xattr_error = f"xattr block pointer {xb} is invalid"
            xraws = await read_blocks(self.view, bs, xblks)
            for xb, node in xblks.items():
                x, err, fixed = self.decode(F.XattrBlock.decode, F.SIG_XATTR, xraws[xb], xb)
                if x is None:
                    node.xattr_error = f"xattr block {xb}: {err}"
                    continue
                if fixed is not None:
                    self.pending_checksums.append((f"Xattr block of inode {node.ino}", xb, fixed))
                # also when only its checksum was bad: pass 1 acts on this,
                # a rescan after it would free the block the inode still
                # points at (found by fuzzing)
                if any(not k for k in x.attrs):
                    node.xattr_error = f"xattr block {xb} holds an empty name"
            # Directory blocks and symlink targets.
            want: dict[int, tuple[Node, str, int]] = {}
            for node in fresh:
                if node.inode.is_dir:
                    self.plan_dir(node, want)
                elif stat.S_ISLNK(node.inode.mode):
                    self.plan_symlink(node, want)
            draws = await read_blocks(self.view, bs, want)
            nxt = set()
            for node in fresh:
                if node.inode.is_dir:
                    self.parse_dir(node, draws)
                    for e in node.entries:
                        self.early_refs.setdefault(e.ino, []).append(e)
                        if e.ino not in self.nodes:
                            nxt.add(e.ino)
                elif stat.S_ISLNK(node.inode.mode):
                    self.parse_symlink(node, draws)
                    # judged here, not only in pass 1: a rescan after repairs
                    # (which finds the link unattached once its entry is
                    # cleared) must not take it for a good inode and leave
                    # its cluster allocated (found by fuzzing)
                    bad = self.symlink_problem(node)
                    if bad is not None:
                        node.error = f"symbolic link with {bad}"
            # Each entry becomes a ref of its target once the target is a node.
            for ino in [i for i in self.early_refs if i in self.nodes]:
                self.nodes[ino].refs.extend(self.early_refs.pop(ino))
            wave = sorted(nxt)
            if not wave:
                break
            # Targets of the next wave get their refs when they are created.

    def plausible_ino(self, ino: int) -> bool:
        return 0 < ino < self.sb.total_blocks and ino % self.sb.bpc == 0

    def map_lblk(self, node: Node, lblk: int) -> int | None:
        shift = self.shift
        lcl = lblk >> shift
        for l, p, n in node.exts:
            if l <= lcl < l + n:
                if not 0 <= p + (lcl - l) < self.sb.total_clusters:
                    return None
                return ((p + lcl - l) << shift) + (lblk & ((1 << shift) - 1))
        return None

    def plan_dir(self, node: Node, want) -> None:
        d = node.inode
        if d.dir_depth > F.MAX_DIR_DEPTH:
            node.dir_errors.append(f"hash table depth {d.dir_depth} too large")
            return
        mapped = sum(n for _, _, n in node.exts) * self.sb.bpc
        if d.dir_leaves < 1 or d.dir_leaves > mapped:
            node.dir_errors.append(f"leaf count {d.dir_leaves} impossible")
            return
        tblocks = -(-(1 << d.dir_depth) // F.dirtable_slots(self.bs))
        for i in range(tblocks):
            blk = self.map_lblk(node, F.DIR_TABLE_LBLK + i)
            if blk is None:
                node.dir_errors.append(f"hash table block {i} unmapped")
            else:
                want[blk] = (node, "table", i)
        for i in range(d.dir_leaves):
            blk = self.map_lblk(node, i)
            if blk is None:
                node.dir_errors.append(f"leaf {i} unmapped")
            else:
                want[blk] = (node, "leaf", i)
        node._plan = {v[1:]: k for k, v in want.items() if v[0] is node}

    def parse_dir(self, node: Node, raws) -> None:
        d = node.inode
        plan = getattr(node, "_plan", None)
        node.entries = []
        if plan is None:
            return
        seed = self.sb.uuid
        tables: dict[int, F.DirTable] = {}
        leaves: dict[int, F.DirLeaf] = {}
        for (kind, i), blk in plan.items():
            if kind == "table":
                t, err, fixed = self.decode(F.DirTable.decode, F.SIG_DIRTABLE, raws[blk], blk)
                if t is None:
                    node.dir_errors.append(f"hash table block {i}: {err}")
                    continue
                if fixed is not None:
                    self.pending_checksums.append((f"Hash table of directory {node.ino}", blk, fixed))
                if t.index != i:
                    node.dir_errors.append(f"hash table block {i} says it is block {t.index}")
                tables[i] = t
            else:
                lf, err, fixed = self.decode(F.DirLeaf.decode, F.SIG_DIRLEAF, raws[blk], blk)
                if lf is None:
                    node.dir_errors.append(f"leaf {i}: {err}")
                    continue
                if fixed is not None:
                    self.pending_checksums.append((f"Leaf of directory {node.ino}", blk, fixed))
                if lf.index != i:
                    node.dir_errors.append(f"leaf {i} says it is leaf {lf.index}")
                if lf.depth > d.dir_depth:
                    node.dir_errors.append(f"leaf {i} deeper than the table")
                leaves[i] = lf
        # Entries: everything decodable (a rebuild keeps them all).
        seen: set[bytes] = set()
        for i in sorted(leaves):
            lf = leaves[i]
            keys = [e.key for e in lf.entries]
            if keys != sorted(keys):
                node.dir_errors.append(f"leaf {i} is not sorted")
            for e in lf.entries:
                ent = Ent(node.ino, e.name, e.ino, e.ftype, e.key, lf.blkno)
                if not _valid_name(e.name):
                    node._bad_names = getattr(node, "_bad_names", []) + [ent]
                    continue
                if e.name in seen:
                    node._dups = getattr(node, "_dups", []) + [ent]
                    continue
                seen.add(e.name)
                if e.key != F.name_key(seed, e.name):
                    node.dir_errors.append(f"entry '{e.name.decode(errors='replace')}' "
                                           f"has a wrong hash")
                node.entries.append(ent)
        if node.dir_errors or len(tables) * F.dirtable_slots(self.bs) < (1 << d.dir_depth):
            return
        # Table <-> leaves: each leaf of local depth k owns one aligned
        # run of 2**(D-k) slots, and its keys carry that prefix.
        D = d.dir_depth
        ts = F.dirtable_slots(self.bs)
        slots_of: dict[int, list[int]] = {}
        for s in range(1 << D):
            p = tables[s // ts].ptrs[s % ts]
            if p not in leaves:
                node.dir_errors.append(f"table slot {s} points at leaf {p}, which does not exist")
                return
            slots_of.setdefault(p, []).append(s)
        for i, lf in leaves.items():
            sl = slots_of.get(i)
            if not sl:
                node.dir_errors.append(f"leaf {i} is not in the hash table")
                continue
            span = 1 << (D - lf.depth)
            if len(sl) != span or sl[0] % span or sl[-1] != sl[0] + span - 1:
                node.dir_errors.append(f"leaf {i} (depth {lf.depth}) owns the wrong table slots")
                continue
            prefix = sl[0] >> (D - lf.depth)
            for e in lf.entries:
                if lf.depth and e.key >> (F.KEY_BITS - lf.depth) != prefix:
                    node.dir_errors.append(f"entry '{e.name.decode(errors='replace')}' is in "
                                           f"the wrong leaf")
                    break

    @staticmethod
    def symlink_problem(node: Node) -> str | None:
        """What is wrong with a symbolic link's target as read, or None."""
        size = node.inode.size
        if not 0 < size <= MAX_SYMLINK:
            return f"bad target length {size}"
        if node.target is None or len(node.target) != size:
            return "target not stored in its clusters"
        if b"\0" in node.target:
            return "target contains a NUL byte"
        return None

    def plan_symlink(self, node: Node, want) -> None:
        size = node.inode.size
        if not 0 < size <= MAX_SYMLINK:
            return
        for off in range(0, size, self.bs):
            blk = self.map_lblk(node, off // self.bs)
            if blk is None:
                return
            want[blk] = (node, "symlink", off)

    def parse_symlink(self, node: Node, raws) -> None:
        size = node.inode.size
        if not 0 < size <= MAX_SYMLINK:
            return
        data = b""
        for off in range(0, size, self.bs):
            blk = self.map_lblk(node, off // self.bs)
            if blk is None or blk not in raws:
                return
            data += raws[blk]
        node.target = data[:size]

    async def probe_unattached(self) -> list[int]:
        """Inodes in clusters the bitmaps call used that nothing walked
        claims."""
        sb = self.sb
        masks = self.claimed_masks()
        used: dict[int, int] = {}
        for g, gd in enumerate(self.groups):
            if gd is not None:
                used[g] = int.from_bytes(gd.bitmap, "little") & ((1 << gd.nbits) - 1)
        win: dict[int, int] = {}
        for start, n in self.window_ranges():
            self.or_range(win, start, n)
        for la in self.locals.values():
            if la is None or not la.length:
                continue
            for i in range(la.length):
                if la.test(i):
                    self.or_range(used, la.start + i, 1)
        cands = []
        for g in range(sb.group_count):
            m = used.get(g, 0) & ~masks.get(g, 0)
            for a, e in _mask_runs(m, g * sb.cpg):
                cands.extend(range(a, e))
        blks = [cl << self.shift for cl in cands]
        raws = await read_blocks(self.view, self.bs, blks)
        found = []
        for blk, raw in raws.items():
            if raw[:8] != F.SIG_INODE:
                continue
            inode, err, fixed = self.decode(F.Inode.decode, F.SIG_INODE, raw, blk)
            if inode is None or self.inode_insane(inode) is not None:
                continue
            if inode.flags & F.INODE_FLAG_SYSTEM:
                continue
            found.append(blk)
        return sorted(found)

    async def full_scan(self) -> None:
        sb = self.sb
        self.nodes = {}
        self.early_refs: dict[int, list[Ent]] = {}
        self.pending_checksums: list[tuple[str, int, bytes]] = []
        await self.load_allocators()
        anchors = [sb.root_ino] + [s.orphan_ino for s in sb.slots]
        await self.scan(anchors)
        found = await self.probe_unattached()
        self.unattached_roots: list[int] = []
        if found:
            await self.scan(found, unattached=True)
            self.unattached_roots = [i for i in found if not self.nodes[i].refs]
        for ino, refs in self.early_refs.items():
            if ino in self.nodes:
                self.nodes[ino].refs.extend(refs)
        self.early_refs = {}
        self.modified = False

    # ================================================== pass 1

    async def pass1(self) -> None:
        self.say("Pass 1: Checking inodes, extent trees and allocation")
        for what, blk, fixed in self.pending_checksums:
            await self.fix_checksum(what, blk, fixed)
        self.pending_checksums = []
        for g, err in sorted(self.group_errors.items()):
            self.info(f"  group descriptor {g} is damaged ({err}); see pass 5")
        sb = self.sb
        cs = sb.cluster_size
        special = (F.INODE_FLAG_VALID | F.INODE_FLAG_ORPHAN | F.INODE_FLAG_SYSTEM)
        wide = bool(sb.feat_incompat & F.FEATURE_INCOMPAT_WIDE_TIME)
        if wide:
            special |= F.INODE_FLAG_WIDE_TIME
        tmin, tmax = F.time_range(sb.feat_incompat)
        await self.check_system_dirs()
        # Per-inode structure.
        bad_exts: dict[int, set] = {}
        for ino in sorted(self.nodes):
            node = self.nodes[ino]
            if not node.ok:
                continue
            inode = node.inode
            drop = set()
            prev_end = -1
            for rec in sorted(node.exts):
                l, p, n = rec
                if n <= 0 or p < sb.reserved_clusters or p + n > sb.total_clusters or l < 0 \
                        or (l + n) * cs > MAX_FILE_SIZE:
                    drop.add(rec)
                elif l < prev_end:
                    drop.add(rec)
                else:
                    prev_end = l + n
            if drop:
                bad_exts[ino] = drop
            if inode.flags & F.INODE_FLAG_WIDE_TIME and not wide:
                # seconds + nanoseconds on a volume whose readers expect
                # nanoseconds: keep the times, clamped to what it stores
                if await self.problem(f"Inode {ino} has wide timestamps, but the volume "
                                      f"lacks the wide-time feature.", "Convert them"):
                    await self.patch_inode(
                        ino, flags=inode.flags & ~F.INODE_FLAG_WIDE_TIME,
                        **{k: min(max(getattr(inode, k), tmin), tmax)
                           for k in ("atime_ns", "mtime_ns", "ctime_ns")})
            if inode.flags & ~special & ~F.INODE_FLAG_WIDE_TIME:
                if await self.problem(f"Inode {ino} has unknown flags {inode.flags:#x}.",
                                      "Clear them"):
                    await self.patch_inode(ino, flags=inode.flags & special)
        # Ownership: every cluster has at most one owner (passes 1B-1D).
        lost_xattr = await self.resolve_multiply_claimed(bad_exts)
        # Apply extent and xattr repairs, check sizes.
        for ino in sorted(self.nodes):
            node = self.nodes[ino]
            if not node.ok:
                continue
            inode = node.inode
            drop = bad_exts.get(ino)
            if drop or node.tree_errors:
                why = "; ".join(node.tree_errors + [
                    f"bad or shared extent (logical {l}, physical {p}, {n} clusters)"
                    for l, p, n in sorted(drop or ())])
                if await self.problem(f"Inode {ino} has a damaged extent map: {why}.",
                                      "Remove the bad extents"):
                    keep = sorted(r for r in node.exts if r not in (drop or ()))
                    # before the rewrite: it may allocate extent leaves, and
                    # must not count the dropped extents as taken
                    node.exts = keep
                    await self.store_extents(ino, keep, reset=bool(node.tree_errors))
            if node.xattr_error or ino in lost_xattr:
                why = node.xattr_error or "xattr block shared with another owner"
                if await self.problem(f"Inode {ino}: {why}.", "Drop its extended attributes"):
                    await self.patch_inode(ino, xattr_blk=0)
            total = sum(n for _, _, n in node.exts)
            if total != inode.clusters and not drop and not node.tree_errors:
                if await self.problem(f"Inode {ino} counts {inode.clusters} clusters, its "
                                      f"extents hold {total}.", "Fix the count"):
                    await self.patch_inode(ino, clusters=total)
            mode = inode.mode & F.S_IFMT
            end = max((l + n for l, _, n in node.exts), default=0)
            if mode == stat.S_IFREG:
                if end > -(-inode.size // cs):
                    if await self.problem(f"Inode {ino}: size {inode.size} but clusters "
                                          f"mapped up to {end * cs}.", "Set the size to cover them"):
                        await self.patch_inode(ino, size=end * cs)
            elif mode == stat.S_IFLNK:
                bad = self.symlink_problem(node)
                if bad is None and end > -(-inode.size // cs):
                    bad = "clusters mapped past the target"
                if bad:
                    node.error = f"symbolic link with {bad}"
            elif mode != stat.S_IFDIR:
                if node.exts or inode.size:
                    if await self.problem(f"Inode {ino} (a special file) has size {inode.size} "
                                          f"and {len(node.exts)} extents.", "Clear them"):
                        await self.store_extents(ino, [], reset=False)
                        await self.patch_inode(ino, size=0)
                        node.exts = []

    async def check_system_dirs(self) -> None:
        """The root and the orphan directories must be directories; an
        inode there that is something else is cleared (as e2fsck clears a
        root inode that is not a directory) and pass 3 recreates them."""
        sb = self.sb
        sysdirs = [(sb.root_ino, "Root inode")] + [
            (s.orphan_ino, f"Orphan directory of slot {i}") for i, s in enumerate(sb.slots)]
        for ino, what in sysdirs:
            node = self.nodes.get(ino)
            if node is None or not node.ok or node.inode.is_dir:
                continue
            if await self.problem(f"{what} (inode {ino}) is not a directory.", "Clear"):
                await self.free_inode(node)
                node.error = "cleared"

    # -------------------------------------------------- multiply-claimed clusters

    def ownership_claims(self, bad_exts: dict[int, set]) -> list[Claim]:
        shift = self.shift
        out = [Claim(a, n, None, "meta", what) for a, n, what in self.metadata_claims()]
        for ino in sorted(self.nodes):
            node = self.nodes[ino]
            if not node.ok:
                continue
            drop = bad_exts.get(ino, ())
            out.append(Claim(ino >> shift, 1, ino, "inode", ino))
            for blk in dict.fromkeys(node.leaf_blks):
                out.append(Claim(blk >> shift, 1, ino, "leaf", blk))
            kind = "dir" if node.inode.is_dir else "data"
            for rec in node.exts:
                if rec not in drop:
                    out.append(Claim(rec[1], rec[2], ino, kind, rec))
            xb = node.inode.xattr_blk
            if xb and node.xattr_error is None:
                out.append(Claim(xb >> shift, 1, ino, "xattr", xb))
        for i, c in enumerate(out):
            c.key = (_CLAIM_PRIORITY[c.kind], -1 if c.owner is None else c.owner, i)
        return out

    @staticmethod
    def find_overlaps(claims: list[Claim]) -> list[tuple[Claim, Claim, int, int]]:
        """Every pair of claims that share clusters, with the shared run
        (first, end); overlaps between metadata claims are not reported."""
        out = []
        active: list[tuple[int, int, Claim]] = []
        for seq, c in enumerate(sorted(claims, key=lambda c: (c.start, c.key))):
            while active and active[0][0] <= c.start:
                heapq.heappop(active)
            for end, _, o in active:
                if o.owner is None and c.owner is None:
                    continue
                out.append((o, c, c.start, min(end, c.end)))
            heapq.heappush(active, (c.end, seq, c))
        return out

    def path_of(self, ino: int) -> str:
        """A path naming ``ino`` (e2fsck's style: ??? when nothing does)."""
        sb = self.sb
        orphan_dirs = {s.orphan_ino for s in sb.slots}
        parts: list[str] = []
        cur, seen = ino, set()
        while cur != sb.root_ino:
            node = self.nodes.get(cur)
            if cur in seen or node is None:
                return "???"
            seen.add(cur)
            named = [e for e in node.refs if e.dir not in orphan_dirs]
            if not named:
                head = "<deleted>" if node.refs else "???"
                return head + ("/" + "/".join(reversed(parts)) if parts else "")
            parts.append(self.nm(named[0].name))
            cur = named[0].dir
        return "/" + "/".join(reversed(parts))

    async def resolve_multiply_claimed(self, bad_exts: dict[int, set]) -> set[int]:
        """Find clusters with more than one claimant and give every
        claimant but one its own copy (e2fsck's passes 1B-1D).  Returns
        the inodes whose xattr block is to be dropped instead."""
        claims = self.ownership_claims(bad_exts)
        overlaps = self.find_overlaps(claims)
        lost_xattr: set[int] = set()
        if not overlaps:
            return lost_xattr
        shared: dict[int, list[tuple[int, int]]] = {}
        partners: dict[int, dict[tuple, None]] = {}
        for o, c, lo, hi in overlaps:
            loser = c if o.key < c.key else o
            loser.lost.append((lo, hi))
            for x, y in ((o, c), (c, o)):
                if x.owner is None:
                    continue
                shared.setdefault(x.owner, []).append((lo, hi))
                label = ("meta", y.ref) if y.owner is None else ("ino", y.owner)
                partners.setdefault(x.owner, {})[label] = None
        self.say("Running additional passes to resolve clusters claimed by more than one "
                 "owner...")
        self.say("Pass 1B: Rescanning for multiply-claimed clusters")
        for ino in sorted(shared):
            self.say(f"Multiply-claimed cluster(s) in inode {ino}: "
                     f"{_fmt_runs(_merge(shared[ino]))}")
        self.say("Pass 1C: Scanning directories for inodes with multiply-claimed clusters")
        self.say("Pass 1D: Reconciling multiply-claimed clusters")
        self.say(f"(There are {len(shared)} inodes containing multiply-claimed clusters.)")
        losing: dict[int, list[Claim]] = {}
        for c in claims:
            if c.lost and c.owner is not None:
                losing.setdefault(c.owner, []).append(c)
        for ino in sorted(shared):
            node = self.nodes[ino]
            m = sum(e - a for a, e in _merge(shared[ino]))
            others = [lab for lab in partners[ino] if lab != ("ino", ino)]
            lines = [f"File {self.path_of(ino)} (inode #{ino}) has {m} multiply-claimed "
                     f"cluster(s), shared with {len(others)} file(s):"]
            for kind, v in others:
                lines.append(f"\t<filesystem metadata: {v}>" if kind == "meta"
                             else f"\t{self.path_of(v)} (inode #{v})")
            if ("ino", ino) in partners[ino]:
                lines.append("\t<this file itself, at another offset>")
            mine = losing.get(ino, [])
            if not mine:
                self.say("\n".join(lines))
                self.say("  It keeps its clusters; the other claimants get copies.")
                continue
            for c in mine:
                if c.kind == "inode":
                    await self.problem(f"Inode {ino} lies in cluster {c.start}, which is also "
                                       f"filesystem metadata. Cannot repair this (an inode "
                                       f"cannot move); it is left as is.")
            movable = [c for c in mine if c.kind != "inode"]
            if not movable:
                continue
            if not await self.problem("\n".join(lines), "Clone multiply-claimed clusters"):
                continue
            failed, why = await self.clone_claims(node, movable)
            if not failed:
                continue
            if len(failed) == len(movable):
                # nothing cloned: the fallback repairs below count it
                self.res.errors_found -= 1
                self.res.errors_fixed -= 1
            self.say(f"  Cannot clone them ({why}); instead, as without cloning:")
            for c in failed:
                if c.kind in ("data", "dir"):
                    l, p, n = c.ref
                    bad_exts.setdefault(ino, set()).add(c.ref)
                    self.say(f"  the shared extent (logical {l}, physical {p}, {n} clusters) "
                             f"is removed from inode {ino}.")
                elif c.kind == "xattr":
                    lost_xattr.add(ino)
                    self.say(f"  inode {ino} loses its extended attributes.")
                else:
                    await self.problem(f"Inode {ino}: extent leaf {c.ref} is shared. Cannot "
                                       f"repair this; it is left as is.")
        return lost_xattr

    def take_free(self, want: int) -> list[tuple[int, int]]:
        """Runs of clusters, ``want`` in all, that nothing claims, no local
        window holds and no repair took -- free in the bitmaps if there are
        enough of those -- now taken for a repair.  ENOSPC takes nothing."""
        sb = self.sb
        if want <= 0:
            return []
        base = self.claimed_masks()
        for start, n in self.window_ranges():
            self.or_range(base, start, n)
        for cl in self.repair_allocated:
            self.or_range(base, cl, 1)
        for strict in (True, False):
            got: list[tuple[int, int]] = []
            total = 0
            for g in range(sb.group_count):
                nbits = min(sb.cpg, sb.total_clusters - g * sb.cpg)
                m = base.get(g, 0)
                gd = self.groups[g] if g < len(self.groups) else None
                if strict and gd is not None:
                    m |= int.from_bytes(gd.bitmap, "little")
                for a, e in _mask_runs(~m & ((1 << nbits) - 1), g * sb.cpg):
                    k = min(e - a, want - total)
                    got.append((a, k))
                    total += k
                    if total == want:
                        for a2, k2 in got:
                            self.repair_allocated.update(range(a2, a2 + k2))
                        return got
        raise OSError(errno.ENOSPC, "not enough free clusters")

    async def copy_clusters(self, src: int, dst: int, n: int, sigs=()) -> None:
        """Copy ``n`` clusters; metadata blocks with a signature in
        ``sigs`` that are sealed for their old place are resealed for the
        new one (everything else is copied as it is)."""
        cs, bs, bpc = self.sb.cluster_size, self.bs, self.sb.bpc
        step = max(1, (4 << 20) // cs)
        for off in range(0, n, step):
            k = min(step, n - off)
            data = await self.view.read((src + off) * cs, k * cs)
            if sigs:
                buf = bytearray(data)
                for i in range(k * bpc):
                    raw = bytes(buf[i * bs:(i + 1) * bs])
                    if raw[:8] not in sigs:
                        continue
                    sig, crc, vol, no, _ = F.HDR.unpack_from(raw, 0)
                    if vol == self.sb.volid and no == (src + off) * bpc + i \
                            and crc == F.block_crc(raw):
                        buf[i * bs:(i + 1) * bs] = F.seal(bytearray(raw), sig, vol,
                                                          (dst + off) * bpc + i)
                data = bytes(buf)
            await self.view.write((dst + off) * cs, data)
        self.modified = True

    async def clone_claims(self, node: Node, claims: list[Claim]) -> tuple[list[Claim], str]:
        """Give ``node`` fresh clusters with a copy of what it shares in
        ``claims`` and repoint its extents, extent leaves and xattr block.
        Returns (the claims it could not clone, why); nothing changes for
        those."""
        shift = self.shift
        leaves = [c for c in claims if c.kind == "leaf"]
        xattrs = [c for c in claims if c.kind == "xattr"]
        exts = {c.ref: c for c in claims if c.kind in ("data", "dir")}
        # Plan: the extent records with shared parts are split into kept
        # and copied pieces.
        cut: dict[tuple, list[tuple[int, int]]] = {}
        need = len(leaves) + len(xattrs)
        for rec, c in exts.items():
            l, p, n = rec
            runs = [(max(a, p), min(e, p + n)) for a, e in _merge(c.lost)]
            cut[rec] = [(a, e) for a, e in runs if a < e]
            need += sum(e - a for a, e in cut[rec])
        try:
            pool = self.take_free(need)
        except OSError as e:
            return claims, e.strerror or str(e)
        pool = [list(r) for r in pool]

        def take(k: int) -> list[tuple[int, int]]:
            out = []
            while k:
                a, avail = pool[0]
                t = min(k, avail)
                out.append((a, t))
                k -= t
                if t == avail:
                    pool.pop(0)
                else:
                    pool[0] = [a + t, avail - t]
            return out

        copies: list[tuple[int, int, int, tuple]] = []
        leaf_map = {}
        for c in leaves:
            (cl, _), = take(1)
            leaf_map[c.ref] = cl << shift
            copies.append((c.ref >> shift, cl, 1, (F.SIG_EXTENT,)))
        new_xattr = None
        for c in xattrs:
            (cl, _), = take(1)
            new_xattr = cl << shift
            copies.append((c.ref >> shift, cl, 1, (F.SIG_XATTR,)))
        sigs = (F.SIG_DIRLEAF, F.SIG_DIRTABLE) if node.inode.is_dir else ()
        moved: dict[int, int] = {}             # old cluster -> new, for directory entries
        new_exts = []
        for rec in node.exts:
            if rec not in cut:
                new_exts.append(rec)
                continue
            l, p, n = rec
            pieces: list[list[int]] = []

            def add(lcl: int, pcl: int, k: int) -> None:
                if pieces and pieces[-1][0] + pieces[-1][2] == lcl \
                        and pieces[-1][1] + pieces[-1][2] == pcl:
                    pieces[-1][2] += k
                else:
                    pieces.append([lcl, pcl, k])
            pos = p
            for a, e in cut[rec] + [(p + n, p + n)]:
                if pos < a:
                    add(l + pos - p, pos, a - pos)
                src = a
                for dst, k in take(e - a):
                    add(l + src - p, dst, k)
                    copies.append((src, dst, k, sigs))
                    for i in range(k):
                        moved[src + i] = dst + i
                    src += k
                pos = e
            new_exts.extend(tuple(x) for x in pieces)
        ext_limit = F.inode_root_capacity(self.bs) * F.extent_leaf_capacity(self.bs)
        if len(new_exts) > ext_limit:
            return claims, "the file would have too many extents"
        for src, dst, k, sg in copies:
            await self.copy_clusters(src, dst, k, sg)
        try:
            async with self.edit() as (cache, ext, dirs):
                inode = await cache.get(node.ino, "inode", node.ino)
                if leaf_map and inode.ext_depth == 1:
                    inode.root = [(f, leaf_map.get(b, b), k) for f, b, k in inode.root]
                if new_xattr is not None:
                    inode.xattr_blk = new_xattr
                if cut:
                    clusters = inode.clusters
                    if node.tree_errors:
                        inode.root, inode.ext_depth = [], 0
                    await ext.store(inode, new_exts)
                    inode.clusters = clusters     # a wrong count is pass 1's to report
                cache.mark(node.ino, inode)
        except OSError as e:
            return claims, e.strerror or str(e)
        node.inode.root, node.inode.ext_depth = inode.root, inode.ext_depth
        node.inode.xattr_blk = inode.xattr_blk
        node.leaf_blks = [b for _, b, _ in inode.root] if inode.ext_depth == 1 else []
        if cut:
            node.exts = new_exts
        if moved:
            mask = (1 << shift) - 1
            for ent in node.entries + getattr(node, "_bad_names", []) + \
                    getattr(node, "_dups", []):
                cl = ent.leaf_blk >> shift
                if cl in moved:
                    ent.leaf_blk = (moved[cl] << shift) | (ent.leaf_blk & mask)
        return [], ""

    async def patch_inode(self, ino: int, **fields) -> None:
        async with self.edit() as (cache, ext, dirs):
            inode = await cache.get(ino, "inode", ino)
            for k, v in fields.items():
                setattr(inode, k, v)
            cache.mark(ino, inode)
        node = self.nodes.get(ino)
        if node is not None and node.inode is not None:
            for k, v in fields.items():
                setattr(node.inode, k, v)

    async def store_extents(self, ino: int, exts, *, reset: bool) -> None:
        async with self.edit() as (cache, ext, dirs):
            inode = await cache.get(ino, "inode", ino)
            if reset:
                inode.root, inode.ext_depth = [], 0
            await ext.store(inode, list(exts))

    # ================================================== pass 2

    async def pass2(self) -> None:
        self.say("Pass 2: Checking directory structure")
        sb = self.sb
        system = {s.orphan_ino for s in sb.slots} | {sb.root_ino}
        for ino in sorted(self.nodes):
            d = self.nodes[ino]
            if not d.is_dir:
                continue
            removed: list[Ent] = []
            for ent in getattr(d, "_bad_names", []):
                if await self.problem(f"Directory {ino} has an entry with an invalid name "
                                      f"{ent.name!r}.", "Remove it"):
                    removed.append(ent)
            for ent in getattr(d, "_dups", []):
                if await self.problem(f"Directory {ino} has a second entry named "
                                      f"'{self.nm(ent.name)}'.", "Remove it"):
                    removed.append(ent)
            for ent in list(d.entries):
                t = self.nodes.get(ent.ino)
                where = f"Entry '{self.nm(ent.name)}' in directory {ino}"
                if t is None or not t.ok:
                    why = "an invalid inode" if t is None else f"inode {ent.ino} ({t.error})"
                    if await self.problem(f"{where} points to {why}.", "Clear the entry"):
                        removed.append(ent)
                    continue
                if ent.ino in system:
                    if await self.problem(f"{where} points to system directory {ent.ino}.",
                                          "Clear the entry"):
                        removed.append(ent)
                    continue
                ft = F.ftype_of(t.inode.mode)
                if ent.ftype != ft:
                    if await self.problem(f"{where} has file type {ent.ftype}, the inode "
                                          f"is type {ft}.", "Fix the type"):
                        await self.set_entry_type(ent, ft)
                        ent.ftype = ft
            if removed:
                await self.remove_entries(removed)
            if d.dir_errors and d.ok:
                if await self.problem(f"Directory {ino} is damaged: "
                                      f"{'; '.join(d.dir_errors[:4])}.",
                                      "Rebuild its hash table and leaves"):
                    await self.rebuild_dir(d)
        # Directories with more than one name.
        for ino in sorted(self.nodes):
            t = self.nodes[ino]
            if not t.is_dir:
                continue
            live = [e for e in t.refs if e in self.nodes[e.dir].entries]
            if len(live) <= 1:
                continue
            keep = next((e for e in live if e.dir == t.inode.parent), live[0])
            extra = [e for e in live if e is not keep]
            for e in extra:
                if await self.problem(f"Directory {ino} also appears as '{self.nm(e.name)}' "
                                      f"in directory {e.dir} (directories have one name).",
                                      "Remove that entry"):
                    await self.remove_entries([e])

    @staticmethod
    def nm(name: bytes) -> str:
        return name.decode(errors="backslashreplace")

    async def remove_entries(self, ents: list[Ent]) -> None:
        async with self.edit() as (cache, ext, dirs):
            for ent in ents:
                lf = await cache.get(ent.leaf_blk, "dirleaf", ent.dir)
                for i, e in enumerate(lf.entries):
                    if e.key == ent.key and e.name == ent.name and e.ino == ent.ino:
                        del lf.entries[i]
                        cache.mark(lf.blkno, lf)
                        break
        for ent in ents:
            d = self.nodes.get(ent.dir)
            if d is not None and ent in d.entries:
                d.entries.remove(ent)
            t = self.nodes.get(ent.ino)
            if t is not None and ent in t.refs:
                t.refs.remove(ent)

    async def set_entry_type(self, ent: Ent, ft: int) -> None:
        async with self.edit() as (cache, ext, dirs):
            lf = await cache.get(ent.leaf_blk, "dirleaf", ent.dir)
            for e in lf.entries:
                if e.key == ent.key and e.name == ent.name:
                    e.ftype = ft
                    cache.mark(lf.blkno, lf)

    async def rebuild_dir(self, d: Node) -> None:
        async with self.edit() as (cache, ext, dirs):
            inode = await cache.get(d.ino, "inode", d.ino)
            inode.root, inode.ext_depth, inode.clusters = [], 0, 0
            await dirs.init(inode)
            for e in d.entries:
                await dirs.insert(inode, e.name, e.ino, e.ftype)
            cache.mark(d.ino, inode)
            # The entries now live in new leaves: a later repair of one
            # (pass 3 removing it from an orphan directory) must edit the
            # leaf that holds it, not the old one (found by fuzzing: the
            # removal went to a block the directory no longer used).
            where: dict[bytes, int] = {}
            async for leaf in dirs.leaves_in_order(inode):
                for e in leaf.entries:
                    where[e.name] = leaf.blkno
            for e in d.entries:
                e.leaf_blk = where.get(e.name, e.leaf_blk)
        d.dir_errors = []

    # ================================================== pass 3

    async def pass3(self) -> None:
        self.say("Pass 3: Checking directory connectivity")
        sb = self.sb
        new_root = False
        root = self.nodes.get(sb.root_ino)
        if root is None or not root.is_dir:
            if root is not None and root.ok:
                # not a directory, and pass 1 was told not to clear it
                self.say(f"  Root inode {sb.root_ino} is not a directory: without a root "
                         f"directory, nothing can be reconnected.")
            else:
                why = root.error if root is not None else "missing"
                if await self.problem(f"Root inode not allocated (inode {sb.root_ino}: {why}).",
                                      "Allocate"):
                    await self.recreate_root()
                    new_root = True
            root = self.nodes.get(sb.root_ino)
        if root is not None and root.is_dir and root.inode.parent != sb.root_ino:
            if await self.problem(f"Root directory's '..' is {root.inode.parent}, not itself.",
                                  "Fix it"):
                await self.patch_inode(sb.root_ino, parent=sb.root_ino)
        for slot, s in enumerate(sb.slots):
            od = self.nodes.get(s.orphan_ino)
            if od is not None and od.is_dir:
                continue
            if od is not None and od.ok:
                self.say(f"  Orphan directory of slot {slot} (inode {s.orphan_ino}) is not a "
                         f"directory and was not cleared; it is left as is.")
                continue
            why = od.error if od is not None else "missing"
            if await self.problem(f"Orphan directory of slot {slot} (inode {s.orphan_ino}) is "
                                  f"unusable ({why}).", "Recreate it"):
                await self.recreate_orphan_dir(slot)
        # '..' of each directory names the directory holding it.
        for ino in sorted(self.nodes):
            t = self.nodes[ino]
            if not t.is_dir or ino == sb.root_ino or t.unattached:
                continue
            live = [e for e in t.refs if e in self.nodes[e.dir].entries]
            if len(live) == 1 and t.inode.parent != live[0].dir:
                if await self.problem(f"Directory {ino}: '..' is {t.inode.parent}, should be "
                                      f"{live[0].dir}.", "Fix it"):
                    await self.patch_inode(ino, parent=live[0].dir)
        # Orphans: legitimately unreachable, freed when nothing holds them
        # open -- and nothing does on an unmounted volume.
        orphan_dirs = {s.orphan_ino for s in sb.slots}
        for od_ino in sorted(orphan_dirs):
            od = self.nodes.get(od_ino)
            if od is None or not od.is_dir:
                continue
            for ent in list(od.entries):
                t = self.nodes.get(ent.ino)
                if t is None or not t.ok:
                    continue
                others = [e for e in t.refs if e.dir not in orphan_dirs]
                if others:
                    msg = (f"Inode {ent.ino} is listed as an orphan but still has a name.")
                    if await self.problem(msg, "Remove it from the orphan directory"):
                        await self.remove_entries([ent])
                        if t.inode.flags & F.INODE_FLAG_ORPHAN:
                            await self.patch_inode(ent.ino, flags=t.inode.flags & ~F.INODE_FLAG_ORPHAN)
                    continue
                if await self.problem(f"Orphan inode {ent.ino} (deleted while open) still "
                                      f"holds {t.inode.clusters} clusters.", "Free it"):
                    await self.remove_entries([ent])
                    await self.free_inode(t)
        # Unattached inodes: a file without links was deleted (an orphan
        # whose orphan directory was lost, say) and is freed; the others
        # go to lost+found.
        link: list[int] = []
        for ino in self.unattached_roots:
            t = self.nodes[ino]
            if not t.ok:
                continue
            if not t.is_dir and t.inode.nlink == 0:
                kind = "orphan inode" if t.inode.flags & F.INODE_FLAG_ORPHAN else "inode"
                if await self.problem(f"Unattached {kind} {ino} has link count 0 (deleted, "
                                      f"{t.inode.clusters} clusters).", "Free it"):
                    await self.free_inode(t)
                continue
            link.append(ino)
        if not link and not new_root:
            return
        lf = await self.lost_and_found()
        for ino in link:
            if ino in (lf, self.lf_offered):
                continue
            t = self.nodes[ino]
            kind = "directory" if t.is_dir else "inode"
            if not await self.problem(f"Unattached {kind} {ino} (nlink {t.inode.nlink}).",
                                      "Connect it to /lost+found"):
                continue
            if lf is None:
                self.res.errors_fixed -= 1
                self.say("  No usable /lost+found; cannot reconnect.")
                continue
            name = b"#%d" % ino
            async with self.edit() as (cache, ext, dirs):
                d = await cache.get(lf, "inode", lf)
                if await dirs.lookup(d, name) is not None:
                    name = b"#%d.%d" % (ino, time.time_ns())
                await dirs.insert(d, name, ino, F.ftype_of(t.inode.mode))
                if t.is_dir:
                    child = await cache.get(ino, "inode", ino)
                    child.parent = lf
                    cache.mark(ino, child)
                    d.nlink += 1
                cache.mark(lf, d)

    def new_dir_inode(self, ino: int, *, mode: int, parent: int,
                      flags: int = F.INODE_FLAG_VALID) -> F.Inode:
        """A directory inode as mkfs makes one (wide times when the volume
        has them)."""
        if self.sb.feat_incompat & F.FEATURE_INCOMPAT_WIDE_TIME:
            flags |= F.INODE_FLAG_WIDE_TIME
        now = time.time_ns()
        return F.Inode(ino, mode=stat.S_IFDIR | mode, nlink=2, flags=flags,
                       generation=random.getrandbits(32), atime_ns=now, mtime_ns=now,
                       ctime_ns=now, parent=parent)

    def spot_free(self, ino: int) -> bool:
        """Whether inode location ``ino`` can take a recreated directory:
        a cluster start past the reserved area that nothing claims, no
        local window holds and no repair took."""
        if not self.plausible_ino(ino):
            return False
        cl = ino >> self.shift
        if cl < self.sb.reserved_clusters or cl in self.repair_allocated:
            return False
        masks = self.claimed_masks()
        for start, n in self.window_ranges():
            self.or_range(masks, start, n)
        g, bit = divmod(cl, self.sb.cpg)
        return not masks.get(g, 0) >> bit & 1

    async def make_system_dir(self, want: int, *, mode: int, flags: int) -> F.Inode:
        """An empty directory that is its own parent, at inode ``want`` if
        that place is free, else wherever there is room."""
        async with self.edit() as (cache, ext, dirs):
            if self.spot_free(want):
                ino = want
                self.repair_allocated.add(want >> self.shift)
            else:
                cl, _ = ext.alloc.alloc(1)
                ino = cl << self.shift
            d = self.new_dir_inode(ino, mode=mode, parent=ino, flags=flags)
            cache.new(ino, d, ino)
            await dirs.init(d)
        self.nodes[ino] = Node(ino, inode=d)
        return d

    async def write_superblocks(self) -> None:
        """The superblock in use, to the primary place and every backup."""
        sb = self.sb
        await self.view.write(F.SB_OFFSET, sb.encode(F.sb_blkno(self.bs)))
        for blk in F.backup_sb_blknos(self.bs, sb.total_blocks):
            await self.view.write(blk * self.bs, sb.encode(blk))
        self.modified = True

    async def recreate_root(self) -> None:
        sb = self.sb
        try:
            d = await self.make_system_dir(sb.root_ino, mode=0o755, flags=F.INODE_FLAG_VALID)
        except OSError:
            raise FsckError("no free cluster to recreate the root directory in") from None
        if d.ino != sb.root_ino:
            self.say(f"  Inode {sb.root_ino} cannot be reused: the root directory is now "
                     f"inode {d.ino} (superblock and backups updated).")
            sb.root_ino = d.ino
            await self.write_superblocks()

    async def recreate_orphan_dir(self, slot: int) -> None:
        sb = self.sb
        info = sb.slots[slot]
        try:
            d = await self.make_system_dir(info.orphan_ino, mode=0o700,
                                           flags=F.INODE_FLAG_VALID | F.INODE_FLAG_SYSTEM)
        except OSError:
            self.res.errors_fixed -= 1
            self.say("  No free cluster to recreate it in.")
            return
        if d.ino != info.orphan_ino:
            self.say(f"  Inode {info.orphan_ino} cannot be reused: the orphan directory of "
                     f"slot {slot} is now inode {d.ino} (superblock and backups updated).")
            info.orphan_ino = d.ino
            await self.write_superblocks()

    async def lost_and_found(self) -> int | None:
        sb = self.sb
        root = self.nodes.get(sb.root_ino)
        if root is None or not root.is_dir:
            return None

        def usable(ino) -> bool:
            n = self.nodes.get(ino)
            return (n is not None and n.is_dir and not n.dir_errors and ino != sb.root_ino
                    and not n.inode.flags & F.INODE_FLAG_SYSTEM)
        named = next((e.ino for e in root.entries if e.name == b"lost+found"), None)
        if named is not None and usable(named):
            return named
        cand = sb.lostfound_ino
        if usable(cand) and not self.nodes[cand].refs:
            # intact, but no longer named anywhere (a lost root, say)
            self.lf_offered = cand
            if not await self.problem(f"/lost+found (inode {cand}) is not connected to the "
                                      f"root directory.", "Reconnect it"):
                return None
            async with self.edit() as (cache, ext, dirs):
                r = await cache.get(sb.root_ino, "inode", sb.root_ino)
                if await dirs.lookup(r, b"lost+found") is not None:
                    await dirs.remove(r, b"lost+found")
                await dirs.insert(r, b"lost+found", cand, F.FT_DIR)
                r.nlink += 1
                cache.mark(r.ino, r)
                lf = await cache.get(cand, "inode", cand)
                lf.parent = sb.root_ino
                cache.mark(cand, lf)
            return cand
        if not await self.problem("/lost+found is missing.", "Create it"):
            return None
        try:
            async with self.edit() as (cache, ext, dirs):
                r = await cache.get(sb.root_ino, "inode", sb.root_ino)
                if await dirs.lookup(r, b"lost+found") is not None:
                    await dirs.remove(r, b"lost+found")
                cl, _ = ext.alloc.alloc(1)
                lf = self.new_dir_inode(cl << self.shift, mode=0o700, parent=sb.root_ino)
                cache.new(lf.ino, lf, lf.ino)
                await dirs.init(lf)
                await dirs.insert(r, b"lost+found", lf.ino, F.FT_DIR)
                r.nlink += 1
                cache.mark(r.ino, r)
        except OSError as e:
            self.res.errors_fixed -= 1
            self.say(f"  Cannot create it: {e.strerror or e}.")
            return None
        sb.lostfound_ino = lf.ino
        await self.write_superblocks()
        return lf.ino

    async def free_inode(self, t: Node) -> None:
        """Mark an inode unused; its clusters are freed by pass 5."""
        await self.patch_inode(t.ino, flags=0, nlink=0)

    # ================================================== pass 4

    async def pass4(self) -> None:
        self.say("Pass 4: Checking reference counts")
        sb = self.sb
        orphan_dirs = {s.orphan_ino for s in sb.slots}
        files = dirs = 0
        for ino in sorted(self.nodes):
            t = self.nodes[ino]
            if not t.ok:
                continue
            if t.unattached and not t.refs:
                continue                 # reported in pass 3, left where it was
            named = [e for e in t.refs if e.dir not in orphan_dirs]
            if t.is_dir:
                subdirs = sum(1 for e in t.entries
                              if (c := self.nodes.get(e.ino)) is not None and c.is_dir
                              and c.inode.parent == ino)
                want = 2 + subdirs if ino not in orphan_dirs else t.inode.nlink
                if ino not in orphan_dirs:
                    dirs += 1
            else:
                want = len(named)
                if not named:
                    continue             # an orphan: its count is 0 or pass 3 frees it
                files += 1
            if t.inode.nlink != want:
                if await self.problem(f"Inode {ino} has link count {t.inode.nlink}, "
                                      f"should be {want}.", "Fix it"):
                    await self.patch_inode(ino, nlink=want)
            if t.inode.flags & F.INODE_FLAG_ORPHAN and named:
                if await self.problem(f"Inode {ino} is flagged orphan but has a name.",
                                      "Clear the flag"):
                    await self.patch_inode(ino, flags=t.inode.flags & ~F.INODE_FLAG_ORPHAN)
        self.res.files, self.res.directories = files, dirs

    # ================================================== pass 5

    async def pass5(self) -> None:
        self.say("Pass 5: Checking cluster allocation bitmaps")
        sb = self.sb
        claimed = self.claimed_masks()
        # Windows that are damaged are dropped: their clusters go back to
        # the global bitmap.
        for slot, err in sorted(self.local_errors.items()):
            if await self.problem(f"Local allocation block of slot {slot} is damaged ({err}).",
                                  "Reset it to an empty window"):
                blk = sb.slots[slot].localalloc_blk
                await self.put(blk, F.LocalAlloc(blk))
                self.locals[slot] = F.LocalAlloc(blk)
        expect = dict(claimed)
        for start, n in self.window_ranges():
            self.or_range(expect, start, n)
        # Clusters the repairs took (copies, recreated directories) count as
        # allocated when they were taken, as e2fsck's allocations do: the
        # bitmaps get them without a report of bitmap differences.
        touched: set[int] = set()
        for cl in sorted(self.repair_allocated):
            g, bit = divmod(cl, sb.cpg)
            gd = self.groups[g]
            if gd is None or not claimed.get(g, 0) >> bit & 1 or gd.test(bit):
                continue
            gd.set(bit)
            gd.free -= 1
            touched.add(g)
        for g in sorted(touched):
            await self.put(F.group_desc_blkno(sb, g), self.groups[g])
        used = 0
        for g in range(sb.group_count):
            used += claimed.get(g, 0).bit_count()
        self.res.clusters_used = used
        for g in range(sb.group_count):
            nbits = min(sb.cpg, sb.total_clusters - g * sb.cpg)
            want = expect.get(g, 0) & ((1 << nbits) - 1)
            gd = self.groups[g]
            blk = F.group_desc_blkno(sb, g)
            if gd is None:
                if await self.problem(f"Group descriptor {g} (block {blk}) is damaged "
                                      f"({self.group_errors.get(g)}).", "Rebuild it"):
                    await self.write_group(g, nbits, want)
                continue
            have = int.from_bytes(gd.bitmap, "little")
            if have != want:
                missing = _mask_runs(want & ~have, g * sb.cpg)
                extra = _mask_runs(have & ~want, g * sb.cpg)
                msgs = []
                if missing:
                    msgs.append(f"in use but marked free: {_fmt_runs(missing)}")
                if extra:
                    msgs.append(f"marked in use but free: {_fmt_runs(extra)}")
                if have >> nbits:
                    msgs.append("bits set past the end of the group")
                if await self.problem(f"Cluster bitmap differences in group {g}: "
                                      f"{'; '.join(msgs)}.", "Fix the bitmap"):
                    await self.write_group(g, nbits, want)
                    continue
            free = nbits - (have & ((1 << nbits) - 1)).bit_count()
            if gd.free != free:
                if await self.problem(f"Group {g} counts {gd.free} free clusters, its bitmap "
                                      f"{free}.", "Fix the count"):
                    await self.write_group(g, nbits, have & ((1 << nbits) - 1))
        for slot, la in sorted(self.locals.items()):
            if la is None or not la.length:
                continue
            want = 0
            for i in range(la.length):
                cl = la.start + i
                g, bit = divmod(cl, sb.cpg)
                if claimed.get(g, 0) >> bit & 1:
                    want |= 1 << i
            have = int.from_bytes(la.bitmap, "little") & ((1 << la.length) - 1)
            if have != want:
                missing = _mask_runs(want & ~have, la.start)
                extra = _mask_runs(have & ~want, la.start)
                msgs = []
                if missing:
                    msgs.append(f"in use but marked free: {_fmt_runs(missing)}")
                if extra:
                    msgs.append(f"marked in use but free: {_fmt_runs(extra)}")
                if await self.problem(f"Local allocation window of slot {slot} differs: "
                                      f"{'; '.join(msgs)}.", "Fix the window bitmap"):
                    la.bitmap = bytearray(want.to_bytes((la.length + 7) // 8, "little"))
                    await self.put(la.blkno, la)
            else:
                raw = await self.view.read(la.blkno * self.bs, self.bs)
                count = F.LOCAL_HDR.unpack_from(raw, F.HDR_SIZE)[2]
                if count != have.bit_count():
                    if await self.problem(f"Local allocation window of slot {slot} counts "
                                          f"{count} used, its bitmap {have.bit_count()}.",
                                          "Fix the count"):
                        await self.put(la.blkno, la)

    async def write_group(self, g: int, nbits: int, bits: int) -> None:
        bm = bytearray(bits.to_bytes((nbits + 7) // 8, "little"))
        gd = F.GroupDesc(g, nbits, nbits - bits.bit_count(), bm)
        self.groups[g] = gd
        await self.put(F.group_desc_blkno(self.sb, g), gd)

    # ================================================== driver

    async def run(self) -> Result:
        res = self.res
        t0 = time.monotonic()
        try:
            await self.pass0()
            await self.full_scan()
            await self.pass1()
            if self.modified:
                # Pass 1 may have changed extent maps (bad extents dropped,
                # clusters cloned): directory entries read through the old
                # maps may no longer be in the directory, and pass 2 would
                # repair them in blocks it no longer owns (found by fuzzing).
                self.info("  (re-reading the repaired tree)")
                await self.full_scan()
            await self.pass2()
            if self.modified:
                # Entries pass 2 removed may leave inodes unattached: pass 3
                # must see them to reconnect them (a fuzzing seed left four
                # for the next fsck to find).
                self.info("  (re-reading the repaired tree)")
                await self.full_scan()
            await self.pass3()
            if self.modified:
                self.info("  (re-reading the repaired tree)")
                await self.full_scan()
            await self.pass4()
            if self.modified:
                await self.full_scan()
            await self.pass5()
        except FsckError as e:
            res.operational_error = str(e)
            self.err(f"{PROG}: {e}")
        except Cancelled:
            res.cancelled = True
            self.err(f"{PROG}: cancelled.")
        if self.view is not None and self.repair and self.view.blocks \
                and res.operational_error is None:
            n = await self.view.commit()
            self.info(f"  wrote {n} block(s)")
        if self.sb is not None and res.operational_error is None and not res.cancelled:
            label = self.sb.label or "replfs"
            self.say(f"{label}: {res.files} files, {res.directories} directories, "
                     f"{res.clusters_used}/{res.total_clusters} clusters used")
            if res.errors_fixed:
                self.say(f"\n***** FILE SYSTEM WAS MODIFIED ({res.errors_fixed} "
                         f"error(s) corrected) *****")
            if res.errors_left:
                self.say(f"\n***** {res.errors_left} ERROR(S) LEFT UNCORRECTED *****")
        self.info(f"  checked in {time.monotonic() - t0:.2f}s")
        return res


# ------------------------------------------------------------------ library API

def _answerer(mode: str, out):
    async def yes(q):
        out(f"{q}? yes")
        return True

    async def no(q):
        out(f"{q}? no")
        return False

    state = {"all": False}

    async def ask(q):
        if state["all"]:
            out(f"{q}? yes")
            return True
        while True:
            try:
                a = await trio.to_thread.run_sync(input, f"{q} (y/n/a=yes to all/q=quit)? ")
            except EOFError:
                raise Cancelled() from None
            a = a.strip().lower()
            if a in ("y", "yes"):
                return True
            if a in ("n", "no"):
                return False
            if a in ("a", "all"):
                state["all"] = True
                return True
            if a in ("q", "quit"):
                raise Cancelled()

    return {"yes": yes, "no": no, "ask": ask}[mode]


async def check(dev, *, repair: bool = False, out=print, answer: str | None = None,
                verbose: bool = False, force: bool = False,
                mounted: str | None = None, err=None) -> Result:
    """Check (and with ``repair`` fix) the replfs volume on BlockDevice
    ``dev``.  Nothing is written unless ``repair``."""
    say = out or (lambda *_: None)
    mode = answer or ("yes" if repair else "no")
    c = Checker(dev, repair=repair and mode != "no", answer=_answerer(mode, say), out=say,
                verbose=verbose, force=force, mounted=mounted, err=err)
    return await c.run()


def check_image(path: str, *, repair: bool = False, out=None) -> Result:
    """Synchronous check of an image file (for tests: an fsck oracle)."""
    from replfs.blockdev import FileBlockDevice

    async def go():
        dev = FileBlockDevice(path, readonly=not repair)
        try:
            return await check(dev, repair=repair, out=out)
        finally:
            await dev.close()
    return trio.run(go)


def assert_clean(path: str) -> Result:
    """Raise AssertionError listing the problems when the image is not clean."""
    lines: list[str] = []
    res = check_image(path, out=lines.append)
    if not res.clean:
        raise AssertionError(f"fsck.replfs found problems in {path} (exit {res.exit_code}):\n"
                             + "\n".join(lines))
    return res


# ------------------------------------------------------------------ command line

def _version() -> str:
    try:
        from importlib.metadata import version
        return version("replfs")
    except Exception:
        return "0.1.0"


USAGE = f"usage: {PROG} [-n|-y|-p] [-f] [-v] [-c CONF] [--node NAME] [--rundir DIR] TARGET"

HELP = f"""{USAGE}

Check and repair a replfs filesystem (offline: the volume must not be mounted).

TARGET is an image file or device, or a resource name of replfs.conf
(opened through replfsd; the node must be Primary to repair).

options:
  -n, --no           open read-only and answer 'no' to every question
  -y, --yes          answer 'yes' to every question (repair everything)
  -p, -a             the same as -y (as fsck(8) passes them)
  -f, --force        check even if the volume looks mounted (slot map in use)
  -v, --verbose      say more
  -c, --config FILE  resource configuration (default $REPLFS_CONF, else
                     /etc/replfs/replfs.conf)
  --node NAME        this node's name (default $REPLFS_NODE, else uname -n)
  --rundir DIR       replfsd's socket directory (default $REPLFS_RUNDIR, else
                     /run/replfs)
  -h, --help         show this help and exit
  --version          print the version and exit

Without -n or -y, questions are asked on the terminal; with no terminal
fsck.replfs answers 'no' to everything, as with -n.

Exit status (bits, as e2fsck): 0 no errors, 1 errors corrected, 4 errors
left uncorrected, 8 operational error, 16 usage error, 32 cancelled.
"""


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise _UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, add_help=False)
    p.add_argument("-n", "--no", action="store_true")
    p.add_argument("-y", "--yes", action="store_true")
    p.add_argument("-p", "-a", dest="preen", action="store_true")
    p.add_argument("-f", "--force", action="store_true")
    p.add_argument("-v", "--verbose", action="store_true")
    p.add_argument("-h", "--help", action="store_true")
    p.add_argument("--version", action="store_true")
    p.add_argument("-c", "--config")
    p.add_argument("--node")
    p.add_argument("--rundir")
    p.add_argument("target", nargs="?")
    return p


def _mounted_where(target: str) -> str | None:
    try:
        from .mkfs import mounted_source
    except ImportError:
        return None
    return mounted_source(target)


async def _open_and_check(args, mode: str, out, err) -> Result:
    target = args.target
    readonly = mode == "no"
    if os.path.exists(target):
        from replfs.blockdev import FileBlockDevice
        where = _mounted_where(target)
        if where is not None:
            if not readonly and not args.force:
                raise FsckError(f"{target} is mounted on {where}; cannot repair a mounted "
                                f"volume (unmount it first)")
            err(f"WARNING: {target} is mounted on {where}; results may be inconsistent.")
        try:
            dev = FileBlockDevice(target, readonly=readonly)
        except OSError as e:
            raise FsckError(f"{target}: {e.strerror or e}") from None
        try:
            return await _check_refusing_in_use(dev, args, mode, out, err)
        finally:
            await dev.close()
    conf_path = args.config or os.environ.get("REPLFS_CONF") or "/etc/replfs/replfs.conf"
    try:
        from replfs.blockrepl import conf
        cfg = conf.load(conf_path)
    except Exception as e:
        raise FsckError(f"{target}: no such file or device, and {conf_path} cannot be "
                        f"read ({e})") from None
    if target not in cfg.resources:
        raise FsckError(f"{target}: no such file or device, and no resource of that name "
                        f"in {conf_path}")
    from replfs.errors import ReplfsError
    from replfs.ipc.client import DaemonBlockDevice, rundir_from_env
    failure: BaseException | None = None
    result = None
    # Errors are carried out of the nursery so that they are not wrapped
    # in an ExceptionGroup.
    async with trio.open_nursery() as nursery:
        try:
            dev = await DaemonBlockDevice.open(nursery, target, write=not readonly,
                                               rundir=rundir_from_env(args.rundir))
        except (ReplfsError, OSError) as e:
            failure = FsckError(f"cannot open resource {target}: {e}")
        else:
            try:
                result = await _check_refusing_in_use(dev, args, mode, out, err)
            except (FsckError, OSError, ReplfsError) as e:
                failure = e if not isinstance(e, ReplfsError) else FsckError(str(e))
            finally:
                with trio.CancelScope(shield=True):
                    await dev.close()
        nursery.cancel_scope.cancel()
    if failure is not None:
        raise failure
    return result


async def _check_refusing_in_use(dev, args, mode, out, err) -> Result:
    if mode != "no" and not args.force:
        # Peek at the slot map before changing anything.
        probe = Checker(dev, repair=False, answer=_answerer("no", lambda *_: None),
                        out=None)
        try:
            probe.sb = await probe.find_superblock()
            probe.view = OverlayDevice(dev, probe.sb.block_size)
            await probe.check_slotmap()
        except FsckError:
            pass
        if probe.slots_in_use:
            who = ", ".join(f"slot {i} (node {n})" for i, n in probe.slots_in_use)
            raise FsckError(f"{args.target} is in use ({who} in the slot map); refusing to "
                            f"repair a mounted volume. Unmount it everywhere, or use -f if "
                            f"the nodes are known to be down.")
    return await check(dev, repair=mode != "no", out=out, answer=mode,
                       verbose=args.verbose, force=args.force, err=err)


def main(argv=None) -> int:
    out = print

    def err(msg):
        print(msg, file=sys.stderr)

    try:
        args = build_parser().parse_args(argv)
    except _UsageError as e:
        err(f"{PROG}: {e}\n{USAGE}")
        return EXIT_USAGE
    if args.help:
        out(HELP)
        return EXIT_OK
    if args.version:
        out(f"{PROG} {_version()}")
        return EXIT_OK
    if not args.target:
        err(f"{PROG}: no TARGET given\n{USAGE}")
        return EXIT_USAGE
    yes = args.yes or args.preen
    if args.no and yes:
        err(f"{PROG}: -n and -y/-p are mutually exclusive\n{USAGE}")
        return EXIT_USAGE
    if args.no:
        mode = "no"
    elif yes:
        mode = "yes"
    elif sys.stdin.isatty() and sys.stdout.isatty():
        mode = "ask"
    else:
        mode = "no"
        err(f"{PROG}: no terminal to ask questions on; answering 'no' to all (as -n).")
    out(f"{PROG} {_version()}")
    out(f"Checking {args.target}" + (" (read-only)" if mode == "no" else ""))
    try:
        res = trio.run(_open_and_check, args, mode, out, err)
    except FsckError as e:
        err(f"{PROG}: {e}")
        return EXIT_OPERATIONAL
    except KeyboardInterrupt:
        err(f"{PROG}: interrupted")
        return EXIT_CANCELLED
    except OSError as e:
        err(f"{PROG}: I/O error: {e}")
        return EXIT_OPERATIONAL
    return res.exit_code


if __name__ == "__main__":
    sys.exit(main())
