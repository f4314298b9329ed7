"""Per-slot metadata journal: write-ahead log of full block images.

A transaction is written as descriptor blocks (each followed by the
images of the blocks it lists), revoke blocks (block ranges freed by the
transaction, so that older images of them are never replayed over data),
and a commit block carrying the transaction's sequence number and a CRC
over every block before it.  The device is flushed after the commit
block; only then are the images written to their home locations.

The log is linear: it starts right after the journal superblock and is
reset (checkpointed) when the next transaction would not fit.  A
checkpoint flushes the device, so every home write made so far is
durable, then bumps ``first_seq`` in the journal superblock; records left
from before carry older sequence numbers and stop a replay.
"""
from __future__ import annotations

import errno
import zlib

from replfs.blockflags import FUA, PREFLUSH, write_flagged

from . import format as F


# Sequence numbers are 64-bit on disk; a journal superblock starting near
# the end of that range is damaged (the next commit could not be encoded).
MAX_SEQ = 1 << 63


def _super(raw: bytes, sb: F.Superblock, slot: int) -> F.JournalSuper:
    """The journal superblock of ``slot`` read as ``raw``; a corrupt one is
    an OSError (EIO) to the mount, not a FormatError or a struct.error at
    the next commit (found by fuzzing)."""
    start = sb.slots[slot].journal_start
    try:
        js = F.JournalSuper.decode(raw, sb.volid, start)
    except F.FormatError as e:
        raise OSError(errno.EIO, f"journal of slot {slot} is corrupt ({e}); "
                      "run fsck.replfs") from None
    if js.first_seq >= MAX_SEQ:
        raise OSError(errno.EIO, f"journal of slot {slot} is corrupt (sequence "
                      f"{js.first_seq}); run fsck.replfs")
    return js


class Journal:
    def __init__(self, dev, sb: F.Superblock, slot: int):
        self.dev = dev
        self.sb = sb
        self.bs = sb.block_size
        self.slot = slot
        info = sb.slots[slot]
        self.start = info.journal_start
        self.nblocks = info.journal_blocks
        self.head = 1            # next free journal block (relative)
        self.seq = 1             # sequence of the next transaction
        self.first_seq = 1

    async def _write_super(self, flags: int) -> None:
        js = F.JournalSuper(self.start, flags, self.first_seq, self.nblocks)
        await self.dev.write(self.start * self.bs, js.encode(self.bs, self.sb.volid))

    async def open(self) -> None:
        """Mark the journal in use (dirty); call only after replay."""
        js = await journal_state(self.dev, self.sb, self.slot)
        self.seq = self.first_seq = js.first_seq
        self.head = 1
        await self._write_super(F.JSB_DIRTY)
        await self.dev.flush()

    async def close(self) -> None:
        await self.dev.flush()
        self.first_seq = self.seq
        self.head = 1
        await self._write_super(0)
        await self.dev.flush()

    def capacity(self) -> int:
        return self.nblocks - 1

    @staticmethod
    def blocks_needed(bs: int, nimages: int, nrevokes: int) -> int:
        dcap = F.journal_desc_capacity(bs)
        rcap = F.journal_revoke_capacity(bs)
        return (nimages + (nimages + dcap - 1) // dcap + (nrevokes + rcap - 1) // rcap + 1)

    def fits(self, nimages: int, nrevokes: int) -> bool:
        """Whether a transaction of this size goes in without a checkpoint
        first (``commit`` checkpoints when the log would wrap)."""
        return self.head + self.blocks_needed(self.bs, nimages, nrevokes) <= self.nblocks

    async def checkpoint(self) -> None:
        """Make every home write durable and retire the log.  Cheap when
        nothing was logged since the last checkpoint (so it can be called
        before every cluster lock hand-over: a log that still held images
        of blocks another node then changes would write them back over the
        newer ones when this slot is recovered)."""
        if self.head == 1:
            return
        await self.dev.flush()
        self.first_seq = self.seq
        self.head = 1
        await self._write_super(F.JSB_DIRTY)
        await self.dev.flush()

    async def commit(self, images: dict[int, bytes], revokes: list[tuple[int, int]]) -> None:
        """Log one transaction and make it durable.  The caller writes the
        images home afterwards."""
        need = self.blocks_needed(self.bs, len(images), len(revokes))
        if need > self.capacity():
            raise OSError(28, f"transaction of {need} blocks exceeds the journal")
        if self.head + need > self.nblocks:
            await self.checkpoint()
        seq = self.seq
        volid = self.sb.volid
        out: list[bytes] = []
        pos = self.start + self.head
        targets = sorted(images)
        dcap = F.journal_desc_capacity(self.bs)
        for i in range(0, len(targets), dcap):
            chunk = targets[i:i + dcap]
            out.append(F.encode_jdesc(self.bs, volid, pos + len(out), seq, chunk))
            out.extend(images[t] for t in chunk)
        rcap = F.journal_revoke_capacity(self.bs)
        for i in range(0, len(revokes), rcap):
            out.append(F.encode_jrevoke(self.bs, volid, pos + len(out), seq,
                                        revokes[i:i + rcap]))
        crc = 0
        for b in out:
            crc = zlib.crc32(b, crc)
        out.append(F.encode_jcommit(self.bs, volid, pos + len(out), seq, len(out), crc))
        # Ordered mode: file data written in place, and home writes of
        # earlier transactions, must be durable before a commit that makes
        # them reachable can be (PREFLUSH: a disk may reorder writes
        # between flushes); the record is durable when the write completes
        # (FUA).  One request for the whole record: on a replicated
        # resource one network round trip, not three; the commit block's
        # CRC over everything before it makes a torn record fail replay
        # instead of replaying garbage.
        await write_flagged(self.dev, pos * self.bs, b"".join(out), PREFLUSH | FUA)
        self.head += len(out)
        self.seq += 1


async def read_transactions(dev, sb: F.Superblock, slot: int):
    """Return (journal super, list of committed transactions), each
    transaction being (seq, {blkno: image}, [revoke ranges])."""
    bs = sb.block_size
    info = sb.slots[slot]
    start, n = info.journal_start, info.journal_blocks
    raw = await dev.read(start * bs, bs)
    js = _super(raw, sb, slot)
    # Metadata lives after the primary superblock, which is never logged
    # (nor anything before it); a descriptor naming such a block, or one
    # past the volume, is corrupt even if its checksums match.
    first_home = F.sb_blkno(bs) + 1
    txns = []
    expect = js.first_seq
    pos = 1
    while pos < n:
        images: dict[int, bytes] = {}
        revokes: list[tuple[int, int]] = []
        crc = 0
        count = 0
        p = pos
        ok = False
        while p < n:
            blk = await dev.read((start + p) * bs, bs)
            sig = F.signature_of(blk)
            try:
                if sig == F.SIG_JDESC:
                    seq, targets = F.decode_jdesc(blk, sb.volid, start + p)
                    if seq != expect or p + 1 + len(targets) > n:
                        break
                    if any(not first_home <= t < sb.total_blocks for t in targets):
                        break       # no commit logs such a block: corrupt, as a bad CRC
                    crc = zlib.crc32(blk, crc)
                    data = await dev.read((start + p + 1) * bs, bs * len(targets))
                    for i, t in enumerate(targets):
                        img = data[i * bs:(i + 1) * bs]
                        crc = zlib.crc32(img, crc)
                        images[t] = img
                    count += 1 + len(targets)
                    p += 1 + len(targets)
                elif sig == F.SIG_JREVOKE:
                    seq, ranges = F.decode_jrevoke(blk, sb.volid, start + p)
                    if seq != expect:
                        break
                    if any(not 0 <= a <= a + k <= sb.total_blocks for a, k in ranges):
                        break       # corrupt (and replay would loop over 2**64 blocks)
                    crc = zlib.crc32(blk, crc)
                    revokes.extend(ranges)
                    count += 1
                    p += 1
                elif sig == F.SIG_JCOMMIT:
                    seq, nb, ccrc = F.decode_jcommit(blk, sb.volid, start + p)
                    ok = seq == expect and nb == count and ccrc == crc
                    p += 1
                    break
                else:
                    break
            except F.FormatError:
                break
        if not ok:
            break
        txns.append((expect, images, revokes))
        expect += 1
        pos = p
    return js, txns, expect, pos


async def replay(dev, sb: F.Superblock, slot: int) -> int:
    """Apply every committed transaction of a slot's journal to the home
    locations, honouring revokes, then mark the journal clean.  Returns the
    number of transactions replayed."""
    bs = sb.block_size
    js, txns, next_seq, _ = await read_transactions(dev, sb, slot)
    revoked_upto: dict[int, int] = {}
    for seq, _, revokes in txns:
        for a, cnt in revokes:
            for b in range(a, a + cnt):
                revoked_upto[b] = seq
    # An image is not replayed when a transaction at least as new revoked
    # its block: the block was freed, and after that commit it may hold
    # file data made reachable by a later transaction -- of this slot, or,
    # when the block went back to the global bitmap, of another node.
    last = txns[-1][0] if txns else None
    keep = _own_tombstones(sb, slot, txns[-1], revoked_upto) if txns else set()
    final: dict[int, bytes] = {}
    for seq, images, _ in txns:
        for blk, img in images.items():
            r = revoked_upto.get(blk, 0)
            if r >= seq and not (seq == last and blk in keep):
                continue
            final[blk] = img
    for blk in sorted(final):
        await dev.write(blk * bs, final[blk])
    await dev.flush()
    info = sb.slots[slot]
    js2 = F.JournalSuper(info.journal_start, 0, next_seq, info.journal_blocks)
    await dev.write(info.journal_start * bs, js2.encode(bs, sb.volid))
    await dev.flush()
    return len(txns)


def _own_tombstones(sb: F.Superblock, slot: int, txn, revoked_upto: dict[int, int]) -> set[int]:
    """Blocks of the newest transaction ``txn`` that it both wrote and
    revoked, and may be replayed all the same.

    That is a deleted inode's tombstone: the transaction rewrites the
    inode with flags 0 and frees its cluster.  Skipping it would bring
    the old inode back, valid, behind a stale inode number, with extents
    into freed clusters.  Writing it is safe when the cluster went back
    into this slot's own allocation window: nobody else allocates from
    that window, and a reuse by this slot becomes reachable only through
    a later commit, which does not exist (and whose leading flush would
    have made the tombstone's home write durable anyway)."""
    seq, images, _ = txn
    same = [b for b in images if revoked_upto.get(b) == seq]
    la_blk = sb.slots[slot].localalloc_blk
    if not same or la_blk not in images:
        return set()
    try:
        la = F.LocalAlloc.decode(images[la_blk], sb.volid, la_blk)
    except F.FormatError:
        return set()
    shift = sb.cluster_bits - sb.block_bits
    keep = set()
    for b in same:
        i = (b >> shift) - la.start
        if 0 <= i < la.length and not la.test(i):
            keep.add(b)
    return keep


async def journal_state(dev, sb: F.Superblock, slot: int) -> F.JournalSuper:
    info = sb.slots[slot]
    raw = await dev.read(info.journal_start * sb.block_size, sb.block_size)
    return _super(raw, sb, slot)
