"""On-disk meta-data: layout, superblock and activity-log records.

Pure encode/decode and arithmetic; the driver does the reads and writes.

Internal meta-data sits at the end of the backing disk, like DRBD's:

    | data (usable size) | bitmap | activity log (32 KiB) | superblock (4 KiB) |

External meta-data (``meta-disk PATH [INDEX]``) puts the same three areas,
superblock first, in a 128 MiB slot of another file or device.

The superblock holds the generation UUIDs, flags, sizes and area offsets,
and a CRC32 over itself.  The offsets it records are the truth: after an
online grow (``grown_layout``) internal meta-data sits at the end of the
*grown* disk and the usable size may be less than the disk allows.  The activity log area holds two alternating
records (each a sequence number, the hot extent list and a CRC), so a torn
write of one leaves the other readable.
"""
from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, field, replace

from ..core.uuids import HISTORY_LEN, Uuids

MAGIC = b"RPLFSMD1"
VERSION = 1
BLOCK = 4096
SUPERBLOCK_SIZE = 4096
AL_AREA = 32 * 1024
AL_RECORD = AL_AREA // 2
EXTERNAL_SLOT = 128 * 1024 * 1024

# Flags, persistent across restarts.
F_CONSISTENT = 1 << 0        # data is consistent (not mid-resync as target, not fresh)
F_WAS_UP_TO_DATE = 1 << 1    # data was UpToDate when last known
F_PRIMARY = 1 << 2           # node is Primary; found set at attach = crashed primary
F_OUTDATED = 1 << 3          # data is known to be older than the peer's
F_FULL_SYNC = 1 << 4         # the next connection must do a full sync
F_PEER_OUTDATED = 1 << 5

_HEAD = struct.Struct("<8sIIQQQQ" + "Q" * HISTORY_LEN + "QQQIQ")
# magic, version, flags, data_size(bytes), device_uuid, current, bitmap,
# history..., bm_offset, al_offset, sb_offset, al_extents, total_size


class MetaDataError(Exception):
    pass


@dataclass(frozen=True)
class Layout:
    """Where everything lives, in bytes from the start of the disk."""
    total_size: int       # size of the backing disk (internal) or data disk
    data_size: int        # usable size exposed to users
    bm_offset: int
    bm_bytes: int
    al_offset: int
    sb_offset: int
    internal: bool = True

    @property
    def nblocks(self) -> int:
        return self.data_size // BLOCK

    @property
    def md_size(self) -> int:
        return self.bm_bytes + AL_AREA + SUPERBLOCK_SIZE


def _bitmap_bytes(data_size: int) -> int:
    nbits = data_size // BLOCK
    raw = (nbits + 7) // 8
    return max(BLOCK, (raw + BLOCK - 1) // BLOCK * BLOCK)


def internal_layout(disk_size: int) -> Layout:
    """Largest data area whose bitmap + AL + superblock fit after it."""
    disk_size -= disk_size % BLOCK
    data = disk_size - AL_AREA - SUPERBLOCK_SIZE - _bitmap_bytes(disk_size)
    data -= data % BLOCK
    while data > 0 and data + _bitmap_bytes(data) + AL_AREA + SUPERBLOCK_SIZE > disk_size:
        data -= BLOCK
    if data < 1024 * 1024:
        raise MetaDataError(f"backing disk too small ({disk_size} bytes); "
                            f"need at least 1 MiB plus meta-data")
    bm = _bitmap_bytes(data)
    sb = disk_size - SUPERBLOCK_SIZE
    al = sb - AL_AREA
    return Layout(disk_size, data, al - bm, bm, al, sb, True)


def external_layout(data_disk_size: int, index: int | None) -> Layout:
    """Layout for meta-data on another device; offsets are in that device."""
    data = data_disk_size - data_disk_size % BLOCK
    bm = _bitmap_bytes(data)
    base = (index or 0) * EXTERNAL_SLOT
    if index is not None and SUPERBLOCK_SIZE + AL_AREA + bm > EXTERNAL_SLOT:
        raise MetaDataError("data disk too large for a 128 MiB indexed meta-data slot")
    return Layout(data_disk_size, data, base + SUPERBLOCK_SIZE + AL_AREA, bm,
                  base + SUPERBLOCK_SIZE, base, False)


def max_grown_size(old: Layout, disk_size: int) -> tuple[int, str]:
    """The largest usable size an online grow can give a disk laid out as
    ``old`` whose backing disk (internal) or data disk (external) is now
    ``disk_size`` bytes, and why not more ("" when the disk is the limit).

    Internal meta-data moves to the new end of the disk, and the new area
    must not overlap the old one: the old superblock stays valid until the
    new one is durable (see grown_layout).  A disk that grew by less than
    that gives no growth.  A disk that shrank gives less than ``old``."""
    disk_size -= disk_size % BLOCK
    if old.internal:
        if disk_size < old.total_size:
            try:
                return internal_layout(disk_size).data_size, "the backing disk shrank"
            except MetaDataError:
                return 0, "the backing disk shrank"
        if disk_size == old.total_size:
            return old.data_size, ""
        data = disk_size - AL_AREA - SUPERBLOCK_SIZE - _bitmap_bytes(disk_size)
        data -= data % BLOCK
        while data > old.data_size and \
                data + _bitmap_bytes(data) + AL_AREA + SUPERBLOCK_SIZE > disk_size:
            data -= BLOCK
        md_start = disk_size - AL_AREA - SUPERBLOCK_SIZE - _bitmap_bytes(max(data, old.data_size))
        if md_start < old.total_size:
            need = old.total_size - md_start
            return old.data_size, (f"the backing disk grew by {disk_size - old.total_size} "
                                   f"bytes, too little to move the meta-data past its old "
                                   f"place: grow it by at least {need} bytes more")
        return max(data, old.data_size), ""
    limit = EXTERNAL_SLOT - SUPERBLOCK_SIZE - AL_AREA      # bitmap bytes the slot holds
    if _bitmap_bytes(disk_size) > limit:
        cap = limit * 8 * BLOCK
        return min(disk_size, cap), (f"the 128 MiB external meta-data slot holds the bitmap "
                                     f"of at most {cap} bytes")
    return disk_size, ""


def grown_layout(old: Layout, disk_size: int, data_size: int) -> Layout:
    """The layout after growing ``old`` to ``data_size`` usable bytes on a
    backing disk of ``disk_size`` bytes (data_size <= max_grown_size).

    Internal: bitmap, activity log and superblock at the new end of the
    disk, wholly past the old end (so writing them never touches the old
    meta-data).  External: the same slot, a longer bitmap (its first bytes,
    the old bits, stay where they were)."""
    disk_size -= disk_size % BLOCK
    bm = _bitmap_bytes(data_size)
    if old.internal:
        sb = disk_size - SUPERBLOCK_SIZE
        al = sb - AL_AREA
        lay = Layout(disk_size, data_size, al - bm, bm, al, sb, True)
        if lay.bm_offset < old.total_size or data_size > lay.bm_offset:
            raise MetaDataError(f"no room for {data_size} bytes and their meta-data on a "
                                f"disk of {disk_size} bytes grown from {old.total_size}")
        return lay
    if old.sb_offset + SUPERBLOCK_SIZE + AL_AREA + bm > old.sb_offset + EXTERNAL_SLOT:
        raise MetaDataError("data disk too large for a 128 MiB meta-data slot")
    return Layout(disk_size, data_size, old.bm_offset, bm, old.al_offset, old.sb_offset, False)


@dataclass(frozen=True)
class Superblock:
    data_size: int
    uuids: Uuids = field(default_factory=Uuids)
    flags: int = 0
    device_uuid: int = 0
    al_extents: int = 1237
    layout: Layout | None = None

    def with_flags(self, set_: int = 0, clear: int = 0) -> "Superblock":
        return replace(self, flags=(self.flags | set_) & ~clear)

    def has(self, flag: int) -> bool:
        return bool(self.flags & flag)


def encode_superblock(sb: Superblock) -> bytes:
    lay = sb.layout
    assert lay is not None
    head = _HEAD.pack(MAGIC, VERSION, sb.flags, sb.data_size, sb.device_uuid,
                      sb.uuids.current, sb.uuids.bitmap, *sb.uuids.history,
                      lay.bm_offset, lay.al_offset, lay.sb_offset, sb.al_extents,
                      lay.total_size)
    body = head.ljust(SUPERBLOCK_SIZE - 4, b"\0")
    return body + struct.pack("<I", zlib.crc32(body))


def decode_superblock(raw: bytes, *, internal: bool = True) -> Superblock:
    if len(raw) < SUPERBLOCK_SIZE:
        raise MetaDataError("short superblock read")
    if raw[:8] != MAGIC:
        raise MetaDataError("no replfs meta-data found (magic number not found)")
    body, (crc,) = raw[:SUPERBLOCK_SIZE - 4], struct.unpack("<I", raw[SUPERBLOCK_SIZE - 4:SUPERBLOCK_SIZE])
    if zlib.crc32(body) != crc:
        raise MetaDataError("meta-data superblock checksum mismatch")
    f = _HEAD.unpack_from(body)
    (_magic, version, flags, data_size, device_uuid, cur, bm) = f[:7]
    history = tuple(f[7:7 + HISTORY_LEN])
    bm_offset, al_offset, sb_offset, al_extents, total = f[7 + HISTORY_LEN:]
    if version != VERSION:
        raise MetaDataError(f"unsupported meta-data version {version}")
    bm_bytes = al_offset - bm_offset if internal else _bitmap_bytes(data_size)
    lay = Layout(total, data_size, bm_offset, bm_bytes, al_offset, sb_offset, internal)
    return Superblock(data_size, Uuids(cur, bm, history), flags, device_uuid, al_extents, lay)


_AL_HEAD = struct.Struct("<8sQI")  # magic, sequence, count
AL_MAGIC = b"RPLFSAL1"


AL_MAX_EXTENTS = (AL_RECORD - _AL_HEAD.size - 4) // 4   # what one record holds


def encode_al_record(seq: int, extents: list[int]) -> tuple[int, bytes]:
    """Return (offset within the AL area, record bytes) for transaction ``seq``."""
    max_ext = AL_MAX_EXTENTS
    if len(extents) > max_ext:
        raise MetaDataError(f"too many activity-log extents ({len(extents)} > {max_ext})")
    body = _AL_HEAD.pack(AL_MAGIC, seq, len(extents)) + struct.pack(f"<{len(extents)}I", *extents)
    body = body.ljust(AL_RECORD - 4, b"\0")
    return (seq % 2) * AL_RECORD, body + struct.pack("<I", zlib.crc32(body))


def decode_al_area(raw: bytes) -> tuple[int, list[int]]:
    """The newest valid record's (sequence, extents); (0, []) if none.
    A record is valid when its magic and CRC are right and its extent
    count fits in it; a torn or damaged record is skipped, never an
    error (the other one, or none, is what the disk holds)."""
    best: tuple[int, list[int]] = (0, [])
    for half in (0, 1):
        rec = raw[half * AL_RECORD:(half + 1) * AL_RECORD]
        if len(rec) < AL_RECORD or rec[:8] != AL_MAGIC:
            continue
        body, (crc,) = rec[:-4], struct.unpack("<I", rec[-4:])
        if zlib.crc32(body) != crc:
            continue
        _m, seq, count = _AL_HEAD.unpack_from(body)
        if count > AL_MAX_EXTENTS:
            continue        # no writer makes such a record: not a valid one
        extents = list(struct.unpack_from(f"<{count}I", body, _AL_HEAD.size))
        if seq >= best[0]:
            best = (seq, extents)
    return best


# Signatures of things create-md must not silently overwrite.
def filesystem_signature(head: bytes) -> str | None:
    """Name of a filesystem found in the first 64 KiB of a disk, if any."""
    if len(head) >= 1082 and head[1080:1082] == b"\x53\xef":
        return "ext2/ext3/ext4"
    if head[:4] == b"XFSB":
        return "xfs"
    if len(head) >= 65536 + 8 and head[65536 + 64:65536 + 72] == b"_BHRfS_M":
        return "btrfs"
    if head[:8] == b"RPLFS_SB" or head[:6] == b"REPLFS":
        return "replfs"
    return None
