"""On-disk format of a replfs volume: pure encoders and decoders.

Every metadata block starts with the same 32-byte header (signature,
CRC32, volume id, block number) so that a block read from the wrong
place, from an older filesystem, or torn on disk is recognised.  The
layout is described in docs/fs-format.md; this module is the single
place that knows byte offsets.  No I/O here.
"""
from __future__ import annotations

import hashlib
import struct
import zlib
from dataclasses import dataclass, field

VERSION_MAJOR = 0
VERSION_MINOR = 1
SB_OFFSET = 8192                 # byte offset of the primary superblock
BACKUP_SB_OFFSETS = [1 << 30, 4 << 30, 16 << 30, 64 << 30, 256 << 30, 1 << 40]
BLOCK_SIZES = (512, 1024, 2048, 4096, 8192)
MAX_CLUSTER_BITS = 20            # clusters of 1 MiB at most (mkfs.replfs)
MIN_JOURNAL_BLOCKS = 1024        # the smallest journal mkfs.replfs makes
MAX_SLOTS = 64
MAX_NAME = 255

SIG_SUPER = b"REPLFSSB"
SIG_INODE = b"RFSINODE"
SIG_EXTENT = b"RFSEXTLF"
SIG_GROUP = b"RFSGROUP"
SIG_DIRLEAF = b"RFSDIRLF"
SIG_DIRTABLE = b"RFSDIRTB"
SIG_LOCALALLOC = b"RFSLOCAL"
SIG_SLOTMAP = b"RFSSLOTS"
SIG_XATTR = b"RFSXATTR"
SIG_JSUPER = b"RFSJRNSB"
SIG_JDESC = b"RFSJDESC"
SIG_JREVOKE = b"RFSJRVOK"
SIG_JCOMMIT = b"RFSJCOMT"

HDR = struct.Struct("<8sIIQQ")   # signature, crc32, volume id, blkno, reserved
HDR_SIZE = HDR.size              # 32


class FormatError(Exception):
    """A block does not decode: wrong signature, checksum or location, or
    contents no block of its kind can have (a count or length beyond
    what the block holds, a geometry no volume has)."""


def block_crc(buf: bytes | bytearray) -> int:
    return zlib.crc32(memoryview(buf)[12:], zlib.crc32(bytes(buf[:8]) + b"\0\0\0\0"))


def seal(buf: bytearray, sig: bytes, volid: int, blkno: int) -> bytes:
    HDR.pack_into(buf, 0, sig, 0, volid, blkno, 0)
    struct.pack_into("<I", buf, 8, block_crc(buf))
    return bytes(buf)


def unseal(buf: bytes, sig: bytes, volid: int | None, blkno: int) -> None:
    # Every metadata block is one block long (one of BLOCK_SIZES, which
    # all hold the largest fixed part of any block): the decoders rely on
    # it, and a short read (the end of the device) ends up here.
    if len(buf) not in BLOCK_SIZES:
        raise FormatError(f"block {blkno}: {len(buf)} bytes, not a block")
    got_sig, crc, got_vol, got_blk, _ = HDR.unpack_from(buf, 0)
    if got_sig != sig:
        raise FormatError(f"block {blkno}: signature {got_sig!r}, expected {sig!r}")
    if crc != block_crc(buf):
        raise FormatError(f"block {blkno}: checksum mismatch")
    if volid is not None and got_vol != volid:
        raise FormatError(f"block {blkno}: belongs to another volume")
    if got_blk != blkno:
        raise FormatError(f"block {blkno}: header says block {got_blk}")


def signature_of(buf: bytes) -> bytes:
    return bytes(buf[:8])


# ---------------------------------------------------------------- superblock

# body after the header
SB_BODY = struct.Struct("<HHBB2x16s64sQQHHIIIIIQQQIIQ")
SB_SLOT = struct.Struct("<QQQQ")  # journal start blk, journal blocks, localalloc blk, orphan dir ino

FEATURE_INCOMPAT_EXTENT_TREE = 1
FEATURE_INCOMPAT_HASHED_DIRS = 2
# Inode times as signed 64-bit seconds plus a 32-bit nanosecond field
# (every time utimensat(2) can pass), instead of signed 64-bit nanoseconds
# (1677-09-21 .. 2262-04-11).  Incompatible: an older reader would take
# the seconds for nanoseconds.  Volumes made before it keep the narrow
# encoding and clamp to its range.
FEATURE_INCOMPAT_WIDE_TIME = 4
FEATURE_INCOMPAT_KNOWN = (FEATURE_INCOMPAT_EXTENT_TREE | FEATURE_INCOMPAT_HASHED_DIRS
                          | FEATURE_INCOMPAT_WIDE_TIME)

# Compat features: a reader that does not know one may ignore it.
# The o2cb cluster the volume was made for (mkfs.ocfs2 --cluster-name):
# CLUSTER_NAME_LEN bytes, NUL padded, right after the slot table.  The bit
# is set iff a name is stored; volumes without it have no name.
FEATURE_COMPAT_CLUSTER_NAME = 1
CLUSTER_NAME_LEN = 16            # OCFS2_CLUSTER_NAME_LEN
_CLUSTER_NAME_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
                                "0123456789_-")


def check_cluster_name(name: str) -> str:
    """``name`` if it is a cluster name a superblock can hold: 1 to 16
    ASCII letters, digits, '_' or '-'.  Raises ValueError saying what is
    wrong.  (cluster.conf itself checks no more than that a name is there.)"""
    if not name:
        raise ValueError("the cluster name is empty")
    bad = sorted({c for c in name if c not in _CLUSTER_NAME_CHARS})
    if bad:
        raise ValueError(f"cluster name {name!r} contains {''.join(bad)!r}; only ASCII "
                         f"letters, digits, '_' and '-' are allowed")
    if len(name) > CLUSTER_NAME_LEN:
        raise ValueError(f"cluster name {name!r} is {len(name)} characters long; "
                         f"at most {CLUSTER_NAME_LEN} are allowed")
    return name


NS = 1_000_000_000
S64_MIN, S64_MAX = -(1 << 63), (1 << 63) - 1
U32_MAX = (1 << 32) - 1
U64_MAX = (1 << 64) - 1
# The time range each inode time encoding stores, in nanoseconds.
NARROW_TIME_RANGE = (S64_MIN, S64_MAX)
WIDE_TIME_RANGE = (S64_MIN * NS, S64_MAX * NS + NS - 1)


def time_range(feat_incompat: int) -> tuple[int, int]:
    """(min, max) inode time in ns that a volume with these features stores."""
    return WIDE_TIME_RANGE if feat_incompat & FEATURE_INCOMPAT_WIDE_TIME else NARROW_TIME_RANGE


@dataclass
class SlotInfo:
    journal_start: int
    journal_blocks: int
    localalloc_blk: int
    orphan_ino: int


@dataclass
class Superblock:
    uuid: bytes
    label: str
    block_bits: int
    cluster_bits: int
    total_blocks: int
    total_clusters: int
    slot_count: int
    cpg: int                         # clusters per allocation group
    group_count: int
    root_ino: int
    slotmap_blk: int
    reserved_clusters: int           # clusters at the start never handed out
    created_ns: int
    slots: list[SlotInfo] = field(default_factory=list)
    version_major: int = VERSION_MAJOR
    version_minor: int = VERSION_MINOR
    feat_compat: int = 0
    feat_incompat: int = FEATURE_INCOMPAT_KNOWN
    feat_ro_compat: int = 0
    volid: int = 0                   # copied into every block header
    lostfound_ino: int = 0
    # The o2cb cluster the volume was made for; "" for none.  encode and
    # decode carry whatever bytes are stored (latin-1, one char a byte),
    # so that fsck can show and clear a damaged name; check_cluster_name
    # is the rule for a good one.
    cluster_name: str = ""

    @property
    def block_size(self) -> int:
        return 1 << self.block_bits

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def bpc(self) -> int:
        return 1 << (self.cluster_bits - self.block_bits)

    def encode(self, blkno: int) -> bytes:
        buf = bytearray(self.block_size)
        name = self.cluster_name.encode("latin-1")
        if len(name) > CLUSTER_NAME_LEN:
            raise ValueError(f"cluster name {self.cluster_name!r} longer than "
                             f"{CLUSTER_NAME_LEN} bytes")
        compat = self.feat_compat & ~FEATURE_COMPAT_CLUSTER_NAME
        if name:
            compat |= FEATURE_COMPAT_CLUSTER_NAME
        SB_BODY.pack_into(
            buf, HDR_SIZE, self.version_major, self.version_minor, self.block_bits,
            self.cluster_bits, self.uuid, self.label.encode()[:64], self.total_blocks,
            self.total_clusters, self.slot_count, 0, compat,
            self.feat_incompat, self.feat_ro_compat, self.cpg, self.group_count,
            self.root_ino, self.slotmap_blk, self.lostfound_ino,
            self.reserved_clusters, 0, self.created_ns)
        off = HDR_SIZE + SB_BODY.size
        for s in self.slots:
            SB_SLOT.pack_into(buf, off, s.journal_start, s.journal_blocks,
                              s.localalloc_blk, s.orphan_ino)
            off += SB_SLOT.size
        if name:
            buf[off:off + CLUSTER_NAME_LEN] = name.ljust(CLUSTER_NAME_LEN, b"\0")
        return seal(buf, SIG_SUPER, self.volid, blkno)

    @classmethod
    def decode(cls, buf: bytes, blkno: int) -> "Superblock":
        unseal(buf, SIG_SUPER, None, blkno)
        volid = HDR.unpack_from(buf, 0)[2]
        (vmaj, vmin, bbits, cbits, uuid, label, tblocks, tclusters, nslots, _,
         fc, fi, fr, cpg, ngroups, root, slotmap, lf, resv, _, created) = \
            SB_BODY.unpack_from(buf, HDR_SIZE)
        # The block size everything else is computed from (a block of
        # 2**200 bytes would be allocated by the first encode); the rest
        # of the geometry is superblock_problem's to judge.
        if 1 << bbits != len(buf):
            raise FormatError(f"block {blkno}: block size 2^{bbits} in a block of "
                              f"{len(buf)} bytes")
        if nslots > (len(buf) - HDR_SIZE - SB_BODY.size) // SB_SLOT.size:
            raise FormatError(f"block {blkno}: {nslots} slots do not fit in the block")
        sb = cls(uuid=uuid, label=label.rstrip(b"\0").decode(errors="replace"),
                 block_bits=bbits, cluster_bits=cbits, total_blocks=tblocks,
                 total_clusters=tclusters, slot_count=nslots, cpg=cpg,
                 group_count=ngroups, root_ino=root, slotmap_blk=slotmap,
                 reserved_clusters=resv, created_ns=created, version_major=vmaj,
                 version_minor=vmin, feat_compat=fc, feat_incompat=fi,
                 feat_ro_compat=fr, volid=volid, lostfound_ino=lf)
        off = HDR_SIZE + SB_BODY.size
        for _ in range(nslots):
            sb.slots.append(SlotInfo(*SB_SLOT.unpack_from(buf, off)))
            off += SB_SLOT.size
        if fc & FEATURE_COMPAT_CLUSTER_NAME:
            if off + CLUSTER_NAME_LEN > len(buf):
                raise FormatError(f"block {blkno}: cluster name overruns the block")
            raw = bytes(buf[off:off + CLUSTER_NAME_LEN])
            sb.cluster_name = raw.rstrip(b"\0").decode("latin-1")
        return sb


def superblock_problem(sb: Superblock, dev_size: int | None = None) -> str | None:
    """Why ``sb`` cannot describe a volume (mkfs.replfs never writes such a
    geometry), or None; ``dev_size``, when given, is the size in bytes of
    the device the volume must fit in.  A superblock is checksummed, so
    this is about a damaged one written back whole, or a bug: the mount
    refuses it and fsck looks for a backup."""
    bs = sb.block_size
    if sb.version_major != VERSION_MAJOR:
        return f"unknown format version {sb.version_major}.{sb.version_minor}"
    if sb.feat_incompat & ~FEATURE_INCOMPAT_KNOWN:
        return f"unknown incompatible features {sb.feat_incompat:#x}"
    if not sb.block_bits <= sb.cluster_bits <= MAX_CLUSTER_BITS:
        return f"bad cluster size 2^{sb.cluster_bits}"
    if sb.total_clusters <= 0 or sb.total_blocks != sb.total_clusters << (sb.cluster_bits - sb.block_bits):
        return "block and cluster counts disagree"
    if dev_size is not None and sb.total_blocks * bs > dev_size:
        return (f"volume of {sb.total_blocks * bs} bytes is larger than the device "
                f"({dev_size} bytes)")
    if not 0 < sb.cpg <= clusters_per_group(bs):
        return f"bad clusters per group {sb.cpg}"
    if sb.group_count != -(-sb.total_clusters // sb.cpg):
        return f"group count {sb.group_count} does not match the volume size"
    if not 1 <= sb.slot_count <= max_slots_for(bs) or len(sb.slots) != sb.slot_count:
        return f"bad slot count {sb.slot_count}"
    shift = sb.cluster_bits - sb.block_bits
    bpc = 1 << shift
    # mkfs.replfs reserves the clusters up to group 0's descriptor
    if not 0 < sb.reserved_clusters < sb.total_clusters or \
            sb.reserved_clusters != ((sb_blkno(bs) + 1) >> shift) + 1:
        return "bad reserved area"
    for blk in [sb.root_ino, sb.slotmap_blk] + [s.localalloc_blk for s in sb.slots] + \
            [s.orphan_ino for s in sb.slots]:
        if not 0 < blk < sb.total_blocks:
            return f"system block {blk} outside the volume"
    for s in sb.slots:
        if s.journal_blocks < 2 or s.journal_start + s.journal_blocks > sb.total_blocks:
            return "journal outside the volume"
    if sb.lostfound_ino >= sb.total_blocks:
        return "lost+found outside the volume"
    # Each system area has clusters of its own, as mkfs.replfs lays them
    # out: after the reserved area, on no group descriptor, none shared
    # (fuzzing: a journal moved over another area, or one too small for a
    # transaction, passed and broke the mount or the repair).
    areas = [(sb.root_ino, bpc, "root directory"), (sb.slotmap_blk, bpc, "slot map")]
    for i, s in enumerate(sb.slots):
        if s.journal_blocks < MIN_JOURNAL_BLOCKS:
            return f"journal of slot {i} smaller than {MIN_JOURNAL_BLOCKS} blocks"
        areas += [(s.journal_start, s.journal_blocks, f"journal of slot {i}"),
                  (s.localalloc_blk, bpc, f"allocation block of slot {i}"),
                  (s.orphan_ino, bpc, f"orphan directory of slot {i}")]
    end = sb.reserved_clusters << shift
    group_blocks = sb.cpg << shift
    for start, n, what in sorted(areas):
        if start % bpc or n % bpc:
            return f"{what} not on a cluster boundary"
        if start < end:
            return f"{what} overlaps the reserved area or another system area"
        g = max(1, -(-start // group_blocks))
        if g < sb.group_count and g * group_blocks < start + n:
            return f"{what} overlaps the descriptor of group {g}"
        end = start + n
    return None


def cluster_name_offset(slot_count: int) -> int:
    """Byte offset of the cluster name in a superblock block."""
    return HDR_SIZE + SB_BODY.size + slot_count * SB_SLOT.size


def max_slots_for(block_size: int) -> int:
    """Slots whose records fit in a superblock block with the cluster name."""
    return min(MAX_SLOTS, (block_size - HDR_SIZE - SB_BODY.size - CLUSTER_NAME_LEN)
               // SB_SLOT.size)


def sb_blkno(block_size: int) -> int:
    return SB_OFFSET // block_size


def backup_sb_blknos(block_size: int, total_blocks: int) -> list[int]:
    return [o // block_size for o in BACKUP_SB_OFFSETS
            if o // block_size < total_blocks]


# ---------------------------------------------------------------- geometry

GROUP_HDR = struct.Struct("<III4x")  # group number, bits in this group, free bits
GROUP_BITMAP_OFF = HDR_SIZE + GROUP_HDR.size  # 48


def clusters_per_group(block_size: int) -> int:
    return (block_size - GROUP_BITMAP_OFF) * 8


def group_desc_blkno(sb: Superblock, group: int) -> int:
    """Group 0's descriptor sits right after the primary superblock; every
    other group's descriptor is the first block of its first cluster."""
    if group == 0:
        return sb_blkno(sb.block_size) + 1
    return (group * sb.cpg) << (sb.cluster_bits - sb.block_bits)


@dataclass
class GroupDesc:
    group: int
    nbits: int
    free: int
    bitmap: bytearray

    def encode(self, bs: int, volid: int, blkno: int) -> bytes:
        buf = bytearray(bs)
        GROUP_HDR.pack_into(buf, HDR_SIZE, self.group, self.nbits, self.free)
        buf[GROUP_BITMAP_OFF:GROUP_BITMAP_OFF + len(self.bitmap)] = self.bitmap
        return seal(buf, SIG_GROUP, volid, blkno)

    @classmethod
    def decode(cls, buf: bytes, volid: int, blkno: int) -> "GroupDesc":
        unseal(buf, SIG_GROUP, volid, blkno)
        g, nbits, free = GROUP_HDR.unpack_from(buf, HDR_SIZE)
        if nbits > clusters_per_group(len(buf)):
            raise FormatError(f"block {blkno}: {nbits} bits do not fit in a group descriptor")
        return cls(g, nbits, free, bytearray(buf[GROUP_BITMAP_OFF:GROUP_BITMAP_OFF + (nbits + 7) // 8]))

    def test(self, bit: int) -> bool:
        return bool(self.bitmap[bit >> 3] & (1 << (bit & 7)))

    def set(self, bit: int) -> None:
        self.bitmap[bit >> 3] |= 1 << (bit & 7)

    def clear(self, bit: int) -> None:
        self.bitmap[bit >> 3] &= ~(1 << (bit & 7)) & 0xFF


def count_bits(bitmap: bytes | bytearray, nbits: int) -> int:
    n = int.from_bytes(bitmap, "little") & ((1 << nbits) - 1)
    return n.bit_count()


# ---------------------------------------------------------------- inodes

S_IFMT = 0o170000
S_IFDIR = 0o040000
S_IFREG = 0o100000
S_IFLNK = 0o120000

INODE_FLAG_VALID = 1
INODE_FLAG_ORPHAN = 2
INODE_FLAG_SYSTEM = 4
INODE_FLAG_WIDE_TIME = 8         # times as seconds + INODE_NSEC (needs the feature)
INODE_FLAGS_KNOWN = (INODE_FLAG_VALID | INODE_FLAG_ORPHAN | INODE_FLAG_SYSTEM
                     | INODE_FLAG_WIDE_TIME)

INODE_BODY = struct.Struct("<IIIIIIQQqqqQQQHHIII")
INODE_NSEC = struct.Struct("<III")  # at 136: atime, mtime, ctime nanoseconds (wide times)
INODE_NSEC_OFF = 136
INODE_ROOT_OFF = 160
EXT_REC = struct.Struct("<QQII")   # logical cluster, physical cluster/blkno, length, flags


def inode_root_capacity(bs: int) -> int:
    return (bs - INODE_ROOT_OFF) // EXT_REC.size


EXTLEAF_HDR = struct.Struct("<I4x")
EXTLEAF_OFF = HDR_SIZE + EXTLEAF_HDR.size  # 40


def extent_leaf_capacity(bs: int) -> int:
    return (bs - EXTLEAF_OFF) // EXT_REC.size


@dataclass
class Inode:
    ino: int
    mode: int = 0
    uid: int = 0
    gid: int = 0
    nlink: int = 0
    flags: int = INODE_FLAG_VALID
    generation: int = 0
    size: int = 0
    clusters: int = 0
    atime_ns: int = 0
    mtime_ns: int = 0
    ctime_ns: int = 0
    rdev: int = 0
    xattr_blk: int = 0
    parent: int = 0
    dir_depth: int = 0
    ext_depth: int = 0
    dir_leaves: int = 0
    # depth 0: extents (lcl, pcl, len); depth 1: (first lcl, leaf blkno, nrecs)
    root: list[tuple[int, int, int]] = field(default_factory=list)

    def encode(self, bs: int, volid: int) -> bytes:
        buf = bytearray(bs)
        times = (self.atime_ns, self.mtime_ns, self.ctime_ns)
        if self.flags & INODE_FLAG_WIDE_TIME:
            split = [divmod(t, NS) for t in times]
            times = tuple(s for s, _ in split)
            INODE_NSEC.pack_into(buf, INODE_NSEC_OFF, *(n for _, n in split))
        INODE_BODY.pack_into(
            buf, HDR_SIZE, self.mode, self.uid, self.gid, self.nlink, self.flags,
            self.generation, self.size, self.clusters, *times, self.rdev, self.xattr_blk,
            self.parent, self.dir_depth, self.ext_depth, len(self.root), self.dir_leaves, 0)
        off = INODE_ROOT_OFF
        for a, b, c in self.root:
            EXT_REC.pack_into(buf, off, a, b, c, 0)
            off += EXT_REC.size
        return seal(buf, SIG_INODE, volid, self.ino)

    @classmethod
    def decode(cls, buf: bytes, volid: int, blkno: int) -> "Inode":
        unseal(buf, SIG_INODE, volid, blkno)
        (mode, uid, gid, nlink, flags, gen, size, clusters, at, mt, ct, rdev, xb,
         parent, ddepth, edepth, nroot, dleaves, _) = INODE_BODY.unpack_from(buf, HDR_SIZE)
        if nroot > inode_root_capacity(len(buf)):
            raise FormatError(f"block {blkno}: {nroot} extent records do not fit in an inode")
        root = [EXT_REC.unpack_from(buf, INODE_ROOT_OFF + i * EXT_REC.size)[:3]
                for i in range(nroot)]
        if flags & INODE_FLAG_WIDE_TIME:
            ans, mns, cns = INODE_NSEC.unpack_from(buf, INODE_NSEC_OFF)
            if max(ans, mns, cns) >= NS:
                raise FormatError(f"block {blkno}: inode time nanoseconds out of range")
            at, mt, ct = at * NS + ans, mt * NS + mns, ct * NS + cns
        return cls(blkno, mode, uid, gid, nlink, flags, gen, size, clusters, at, mt,
                   ct, rdev, xb, parent, ddepth, edepth, dleaves, root)

    @property
    def is_dir(self) -> bool:
        return self.mode & S_IFMT == S_IFDIR


@dataclass
class ExtentLeaf:
    blkno: int
    recs: list[tuple[int, int, int]]

    def encode(self, bs: int, volid: int) -> bytes:
        buf = bytearray(bs)
        EXTLEAF_HDR.pack_into(buf, HDR_SIZE, len(self.recs))
        off = EXTLEAF_OFF
        for a, b, c in self.recs:
            EXT_REC.pack_into(buf, off, a, b, c, 0)
            off += EXT_REC.size
        return seal(buf, SIG_EXTENT, volid, self.blkno)

    @classmethod
    def decode(cls, buf: bytes, volid: int, blkno: int) -> "ExtentLeaf":
        unseal(buf, SIG_EXTENT, volid, blkno)
        (n,) = EXTLEAF_HDR.unpack_from(buf, HDR_SIZE)
        if n > extent_leaf_capacity(len(buf)):
            raise FormatError(f"block {blkno}: extent count {n} too large")
        return cls(blkno, [EXT_REC.unpack_from(buf, EXTLEAF_OFF + i * EXT_REC.size)[:3]
                           for i in range(n)])


# ---------------------------------------------------------------- directories

KEY_BITS = 63
DIR_TABLE_LBLK = 1 << 40          # logical block where a directory's hash table starts
DIRTABLE_HDR = struct.Struct("<I4x")
DIRTABLE_OFF = HDR_SIZE + DIRTABLE_HDR.size
DIRLEAF_HDR = struct.Struct("<HHI8x")   # local depth, entry count, logical leaf index
DIRLEAF_OFF = HDR_SIZE + DIRLEAF_HDR.size  # 48
DIRENT = struct.Struct("<QQBB")          # key, ino, file type, name length
MAX_DIR_DEPTH = 28


def name_key(seed: bytes, name: bytes) -> int:
    """63-bit hash of a name, keyed by the volume UUID; never 0 (0 is the
    readdir start cookie)."""
    h = int.from_bytes(hashlib.blake2b(name, digest_size=8, key=seed).digest(), "little")
    return (h >> 1) or 1


def dirtable_slots(bs: int) -> int:
    return (bs - DIRTABLE_OFF) // 4


@dataclass
class DirTable:
    blkno: int
    index: int                 # which table block of the directory this is
    ptrs: list[int]            # leaf logical indexes

    def encode(self, bs: int, volid: int) -> bytes:
        buf = bytearray(bs)
        DIRTABLE_HDR.pack_into(buf, HDR_SIZE, self.index)
        struct.pack_into(f"<{len(self.ptrs)}I", buf, DIRTABLE_OFF, *self.ptrs)
        return seal(buf, SIG_DIRTABLE, volid, self.blkno)

    @classmethod
    def decode(cls, buf: bytes, volid: int, blkno: int) -> "DirTable":
        unseal(buf, SIG_DIRTABLE, volid, blkno)
        (index,) = DIRTABLE_HDR.unpack_from(buf, HDR_SIZE)
        n = dirtable_slots(len(buf))
        return cls(blkno, index, list(struct.unpack_from(f"<{n}I", buf, DIRTABLE_OFF)))


@dataclass
class DirEntry:
    key: int
    ino: int
    ftype: int
    name: bytes

    @property
    def size(self) -> int:
        return DIRENT.size + len(self.name)


@dataclass
class DirLeaf:
    blkno: int
    index: int
    depth: int
    entries: list[DirEntry]    # sorted by key
    # Bytes in use, cached; whoever edits ``entries`` resets it to -1.
    nbytes: int = field(default=-1, repr=False, compare=False)

    def used(self) -> int:
        if self.nbytes < 0:
            self.nbytes = (DIRLEAF_OFF + DIRENT.size * len(self.entries)
                           + sum(len(e.name) for e in self.entries))
        return self.nbytes

    def encode(self, bs: int, volid: int) -> bytes:
        buf = bytearray(bs)
        DIRLEAF_HDR.pack_into(buf, HDR_SIZE, self.depth, len(self.entries), self.index)
        off = DIRLEAF_OFF
        for e in self.entries:
            DIRENT.pack_into(buf, off, e.key, e.ino, e.ftype, len(e.name))
            off += DIRENT.size
            buf[off:off + len(e.name)] = e.name
            off += len(e.name)
        return seal(buf, SIG_DIRLEAF, volid, self.blkno)

    @classmethod
    def decode(cls, buf: bytes, volid: int, blkno: int) -> "DirLeaf":
        unseal(buf, SIG_DIRLEAF, volid, blkno)
        depth, n, index = DIRLEAF_HDR.unpack_from(buf, HDR_SIZE)
        off = DIRLEAF_OFF
        entries = []
        for _ in range(n):
            if off + DIRENT.size > len(buf):
                raise FormatError(f"block {blkno}: directory entries overrun the block")
            key, ino, ft, nl = DIRENT.unpack_from(buf, off)
            off += DIRENT.size
            entries.append(DirEntry(key, ino, ft, bytes(buf[off:off + nl])))
            off += nl
        if off > len(buf):
            raise FormatError(f"block {blkno}: directory entries overrun the block")
        return cls(blkno, index, depth, entries)


# ---------------------------------------------------------------- allocators

LOCAL_HDR = struct.Struct("<QII")      # window start cluster, window length, used count
LOCAL_BITMAP_OFF = HDR_SIZE + LOCAL_HDR.size


def local_window_max(bs: int) -> int:
    return (bs - LOCAL_BITMAP_OFF) * 8


@dataclass
class LocalAlloc:
    blkno: int
    start: int = 0
    length: int = 0
    bitmap: bytearray = field(default_factory=bytearray)

    def encode(self, bs: int, volid: int) -> bytes:
        buf = bytearray(bs)
        LOCAL_HDR.pack_into(buf, HDR_SIZE, self.start, self.length,
                            count_bits(self.bitmap, self.length) if self.length else 0)
        buf[LOCAL_BITMAP_OFF:LOCAL_BITMAP_OFF + len(self.bitmap)] = self.bitmap
        return seal(buf, SIG_LOCALALLOC, volid, self.blkno)

    @classmethod
    def decode(cls, buf: bytes, volid: int, blkno: int) -> "LocalAlloc":
        unseal(buf, SIG_LOCALALLOC, volid, blkno)
        start, length, _ = LOCAL_HDR.unpack_from(buf, HDR_SIZE)
        if length > local_window_max(len(buf)):
            raise FormatError(f"block {blkno}: local window too long")
        return cls(blkno, start, length,
                   bytearray(buf[LOCAL_BITMAP_OFF:LOCAL_BITMAP_OFF + (length + 7) // 8]))

    def test(self, bit: int) -> bool:
        return bool(self.bitmap[bit >> 3] & (1 << (bit & 7)))


SLOT_REC = struct.Struct("<IIQ")   # state (0 free, 1 in use), node number, mount generation
SLOT_FREE = 0
SLOT_IN_USE = 1


@dataclass
class SlotMap:
    blkno: int
    slots: list[tuple[int, int, int]]

    def encode(self, bs: int, volid: int) -> bytes:
        buf = bytearray(bs)
        struct.pack_into("<I4x", buf, HDR_SIZE, len(self.slots))
        for i, rec in enumerate(self.slots):
            SLOT_REC.pack_into(buf, HDR_SIZE + 8 + i * SLOT_REC.size, *rec)
        return seal(buf, SIG_SLOTMAP, volid, self.blkno)

    @classmethod
    def decode(cls, buf: bytes, volid: int, blkno: int) -> "SlotMap":
        unseal(buf, SIG_SLOTMAP, volid, blkno)
        (n,) = struct.unpack_from("<I", buf, HDR_SIZE)
        if n > (len(buf) - HDR_SIZE - 8) // SLOT_REC.size:
            raise FormatError(f"block {blkno}: {n} slots do not fit in the slot map")
        return cls(blkno, [SLOT_REC.unpack_from(buf, HDR_SIZE + 8 + i * SLOT_REC.size)
                           for i in range(n)])


XATTR_ENT = struct.Struct("<BH")   # name length, value length


@dataclass
class XattrBlock:
    blkno: int
    attrs: dict[bytes, bytes]

    def used(self) -> int:
        return HDR_SIZE + 8 + sum(XATTR_ENT.size + len(k) + len(v) for k, v in self.attrs.items())

    def encode(self, bs: int, volid: int) -> bytes:
        buf = bytearray(bs)
        struct.pack_into("<I4x", buf, HDR_SIZE, len(self.attrs))
        off = HDR_SIZE + 8
        for k in sorted(self.attrs):
            v = self.attrs[k]
            XATTR_ENT.pack_into(buf, off, len(k), len(v))
            off += XATTR_ENT.size
            buf[off:off + len(k)] = k
            off += len(k)
            buf[off:off + len(v)] = v
            off += len(v)
        return seal(buf, SIG_XATTR, volid, self.blkno)

    @classmethod
    def decode(cls, buf: bytes, volid: int, blkno: int) -> "XattrBlock":
        unseal(buf, SIG_XATTR, volid, blkno)
        (n,) = struct.unpack_from("<I", buf, HDR_SIZE)
        off = HDR_SIZE + 8
        attrs = {}
        for _ in range(n):
            if off + XATTR_ENT.size > len(buf):
                raise FormatError(f"block {blkno}: xattrs overrun the block")
            kl, vl = XATTR_ENT.unpack_from(buf, off)
            off += XATTR_ENT.size
            k = bytes(buf[off:off + kl])
            off += kl
            attrs[k] = bytes(buf[off:off + vl])
            off += vl
        if off > len(buf):
            raise FormatError(f"block {blkno}: xattrs overrun the block")
        return cls(blkno, attrs)


# ---------------------------------------------------------------- journal

JSB_BODY = struct.Struct("<IIQQ")   # flags, pad, first sequence, journal blocks
JSB_DIRTY = 1
JDESC_HDR = struct.Struct("<QI4x")  # sequence, number of block numbers
JCOMMIT_BODY = struct.Struct("<QII")  # sequence, blocks in the transaction, crc over them
JREVOKE_REC = struct.Struct("<QQ")  # first block, count


def journal_desc_capacity(bs: int) -> int:
    return (bs - HDR_SIZE - JDESC_HDR.size) // 8


def journal_revoke_capacity(bs: int) -> int:
    return (bs - HDR_SIZE - JDESC_HDR.size) // JREVOKE_REC.size


@dataclass
class JournalSuper:
    blkno: int
    flags: int
    first_seq: int
    nblocks: int

    def encode(self, bs: int, volid: int) -> bytes:
        buf = bytearray(bs)
        JSB_BODY.pack_into(buf, HDR_SIZE, self.flags, 0, self.first_seq, self.nblocks)
        return seal(buf, SIG_JSUPER, volid, self.blkno)

    @classmethod
    def decode(cls, buf: bytes, volid: int, blkno: int) -> "JournalSuper":
        unseal(buf, SIG_JSUPER, volid, blkno)
        flags, _, first, n = JSB_BODY.unpack_from(buf, HDR_SIZE)
        return cls(blkno, flags, first, n)


def encode_jdesc(bs: int, volid: int, blkno: int, seq: int, targets: list[int]) -> bytes:
    buf = bytearray(bs)
    JDESC_HDR.pack_into(buf, HDR_SIZE, seq, len(targets))
    struct.pack_into(f"<{len(targets)}Q", buf, HDR_SIZE + JDESC_HDR.size, *targets)
    return seal(buf, SIG_JDESC, volid, blkno)


def decode_jdesc(buf: bytes, volid: int, blkno: int) -> tuple[int, list[int]]:
    unseal(buf, SIG_JDESC, volid, blkno)
    seq, n = JDESC_HDR.unpack_from(buf, HDR_SIZE)
    if n > journal_desc_capacity(len(buf)):
        raise FormatError("descriptor too long")
    return seq, list(struct.unpack_from(f"<{n}Q", buf, HDR_SIZE + JDESC_HDR.size))


def encode_jrevoke(bs: int, volid: int, blkno: int, seq: int,
                   ranges: list[tuple[int, int]]) -> bytes:
    buf = bytearray(bs)
    JDESC_HDR.pack_into(buf, HDR_SIZE, seq, len(ranges))
    off = HDR_SIZE + JDESC_HDR.size
    for a, n in ranges:
        JREVOKE_REC.pack_into(buf, off, a, n)
        off += JREVOKE_REC.size
    return seal(buf, SIG_JREVOKE, volid, blkno)


def decode_jrevoke(buf: bytes, volid: int, blkno: int) -> tuple[int, list[tuple[int, int]]]:
    unseal(buf, SIG_JREVOKE, volid, blkno)
    seq, n = JDESC_HDR.unpack_from(buf, HDR_SIZE)
    if n > journal_revoke_capacity(len(buf)):
        raise FormatError("revoke record too long")
    off = HDR_SIZE + JDESC_HDR.size
    return seq, [JREVOKE_REC.unpack_from(buf, off + i * JREVOKE_REC.size) for i in range(n)]


def encode_jcommit(bs: int, volid: int, blkno: int, seq: int, nblocks: int, crc: int) -> bytes:
    buf = bytearray(bs)
    JCOMMIT_BODY.pack_into(buf, HDR_SIZE, seq, nblocks, crc)
    return seal(buf, SIG_JCOMMIT, volid, blkno)


def decode_jcommit(buf: bytes, volid: int, blkno: int) -> tuple[int, int, int]:
    unseal(buf, SIG_JCOMMIT, volid, blkno)
    return JCOMMIT_BODY.unpack_from(buf, HDR_SIZE)


# ---------------------------------------------------------------- sanity

def block_problem(kind: str, obj, sb: Superblock) -> str | None:
    """What in a decoded metadata block of ``kind`` (a MetaCache kind) the
    filesystem core cannot work with on the volume of ``sb``, or None.

    A block that decodes is well formed; this is about values that are
    impossible on this volume and that the core would otherwise turn into
    an IndexError, a shift by a negative count, or a loop over 2**32
    clusters: extents and pointers outside the volume, tree and hash
    depths no volume has, an allocation window or slot map that does not
    fit the geometry.  fsck judges such blocks on its own (and repairs
    them), so only the core asks."""
    if kind == "inode":
        if not obj.flags & INODE_FLAG_VALID:
            return None                         # a tombstone: ESTALE, not EIO
        if obj.ext_depth not in (0, 1):
            return f"extent tree depth {obj.ext_depth}"
        if obj.is_dir and obj.dir_depth > MAX_DIR_DEPTH:
            return f"hash table depth {obj.dir_depth}"
        if obj.ext_depth == 0:
            return _extents_problem(obj.root, sb)
        cap = extent_leaf_capacity(sb.block_size)
        for _, blk, n in obj.root:
            if not 0 < blk < sb.total_blocks or n > cap:
                return f"extent leaf pointer {blk} ({n} records)"
        return None
    if kind == "extent":
        return _extents_problem(obj.recs, sb)
    if kind == "local":
        if obj.length and obj.start + obj.length > sb.total_clusters:
            return f"allocation window {obj.start}+{obj.length} outside the volume"
        return None
    if kind == "slotmap":
        if len(obj.slots) != sb.slot_count:
            return f"{len(obj.slots)} slots, the volume has {sb.slot_count}"
        return None
    if kind == "dirleaf":
        if obj.depth > MAX_DIR_DEPTH:
            return f"leaf depth {obj.depth}"
        return None
    return None


def _extents_problem(recs, sb: Superblock) -> str | None:
    for l, p, n in recs:
        if n == 0 or p + n > sb.total_clusters:
            return f"extent {l}+{n} at cluster {p} outside the volume"
    return None


FT_UNKNOWN, FT_REG, FT_DIR, FT_CHR, FT_BLK, FT_FIFO, FT_SOCK, FT_LNK = range(8)
_FT = {0o100000: FT_REG, 0o040000: FT_DIR, 0o020000: FT_CHR, 0o060000: FT_BLK,
       0o010000: FT_FIFO, 0o140000: FT_SOCK, 0o120000: FT_LNK}


def ftype_of(mode: int) -> int:
    return _FT.get(mode & S_IFMT, FT_UNKNOWN)
