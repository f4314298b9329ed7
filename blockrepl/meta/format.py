"""On-disk meta-data: layout, superblock and activity-log records.

Pure encode/decode and arithmetic; the driver does the reads and writes.

Internal meta-data sits at the end of the backing disk, like DRBD's:

    | data (usable size) | bitmap | activity log (32 KiB) | superblock (4 KiB) |

External meta-data (``meta-disk PATH [INDEX]``) puts the same three areas,
superblock first, in a 128 MiB slot of another file or device.

The superblock holds the generation UUIDs, flags, sizes and area offsets,
and a CRC32 over itself.  The activity log area holds two alternating
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
