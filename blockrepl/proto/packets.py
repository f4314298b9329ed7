"""Replication packets and their byte encoding.  No I/O here.

Every packet travels in a frame:

    magic u16 = 0x5246 ("RF")   type u8   reserved u8   length u32   payload

Payloads are fixed little-endian fields, then for some types a trailing
byte string (block data, bitmap chunk, names).  ``Decoder`` takes bytes
as they arrive, in any split, and yields whole packets; anything that is
not a well-formed packet raises RemoteProtocolError so the driver can drop
that connection (the daemon itself never dies of a bad packet).
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, fields
from typing import ClassVar

PROTOCOL_VERSION = 6     # 2: Params carries data-integrity-alg; 3: and verify-alg;
                         # 4: AttachReply (a disk attached under a live connection), CurrentUuid
                         # 5: ResizeRequest/Reply, ResizeCommit/Done (online grow)
                         # 6: the Auth answer names its sender (proto/handshake.py)
MAGIC = 0x5246
HEADER = struct.Struct("<HBBI")
MAX_PAYLOAD = 16 * 1024 * 1024 + 64


class RemoteProtocolError(Exception):
    """The peer sent something that is not a valid packet."""


class LocalProtocolError(Exception):
    """We tried to encode something invalid (a bug on our side)."""


_REGISTRY: dict[int, type["Packet"]] = {}


@dataclass(frozen=True)
class Packet:
    TYPE: ClassVar[int] = 0
    FIXED: ClassVar[str] = ""          # struct format of the fixed fields
    TAIL: ClassVar[str | None] = None  # name of a trailing bytes field, if any

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        if cls.TYPE in _REGISTRY:
            raise LocalProtocolError(f"duplicate packet type {cls.TYPE}")
        _REGISTRY[cls.TYPE] = cls
        cls._fixed = struct.Struct("<" + cls.FIXED)

    def payload(self) -> bytes:
        names = [f.name for f in fields(self)]
        fixed_names = [n for n in names if n != self.TAIL]
        try:
            out = self._fixed.pack(*(getattr(self, n) for n in fixed_names))
        except struct.error as e:
            raise LocalProtocolError(f"cannot encode {type(self).__name__}: {e}") from None
        if self.TAIL:
            out += bytes(getattr(self, self.TAIL))
        return out

    @classmethod
    def from_payload(cls, data: bytes) -> "Packet":
        fx = cls._fixed
        if len(data) < fx.size or (not cls.TAIL and len(data) != fx.size):
            raise RemoteProtocolError(f"{cls.__name__}: payload of {len(data)} bytes, "
                                      f"expected {'at least ' if cls.TAIL else ''}{fx.size}")
        values = list(fx.unpack_from(data))
        if cls.TAIL:
            values.append(bytes(data[fx.size:]))
        return cls._make(values)

    @classmethod
    def from_chunks(cls, chunks: list) -> "Packet":
        """``from_payload`` of the chunks' concatenation (at least the
        fixed fields long), the trailing field copied once from them."""
        fx = cls._fixed
        first = chunks[0]
        if not cls.TAIL or len(first) < fx.size:
            return cls.from_payload(b"".join(chunks))
        values = list(fx.unpack_from(first))
        values.append(b"".join([memoryview(first)[fx.size:], *chunks[1:]]))
        return cls._make(values)

    @classmethod
    def _make(cls, values: list) -> "Packet":
        try:
            return cls(*values)
        except (TypeError, ValueError) as e:
            raise RemoteProtocolError(f"{cls.__name__}: {e}") from None


def encode(pkt: Packet) -> bytes:
    body = pkt.payload()
    if len(body) > MAX_PAYLOAD:
        raise LocalProtocolError(f"packet payload too large ({len(body)} bytes)")
    return HEADER.pack(MAGIC, pkt.TYPE, 0, len(body)) + body


_FIXED_NAMES: dict[type, tuple[str, ...]] = {}


def encode_parts(pkt: Packet) -> tuple[bytes, bytes]:
    """``encode(pkt)`` as (head, tail) for a vectored send: the frame
    header and the fixed fields, then the trailing bytes field as it is
    (not copied; b"" for a packet without one)."""
    cls = type(pkt)
    names = _FIXED_NAMES.get(cls)
    if names is None:
        names = _FIXED_NAMES[cls] = tuple(f.name for f in fields(cls) if f.name != cls.TAIL)
    try:
        fixed = cls._fixed.pack(*(getattr(pkt, n) for n in names))
    except struct.error as e:
        raise LocalProtocolError(f"cannot encode {cls.__name__}: {e}") from None
    tail = getattr(pkt, cls.TAIL) if cls.TAIL else b""
    if not isinstance(tail, (bytes, bytearray, memoryview)):
        tail = bytes(tail)
    n = len(fixed) + len(tail)
    if n > MAX_PAYLOAD:
        raise LocalProtocolError(f"packet payload too large ({n} bytes)")
    return HEADER.pack(MAGIC, cls.TYPE, 0, n) + fixed, tail


class Decoder:
    """Incremental frame decoder: feed bytes, take packets.

    Bytes wait in one buffer read from ``_pos`` (compacted now and then,
    not after every packet).  A large packet (``_BIG`` bytes or more) that
    has not all arrived is kept as the list of the chunks it came in and
    joined once into its data field when complete: memory is slow to copy
    here (about 250 us per MiB), and appending, slicing and trimming one
    buffer copied a 1 MiB Data packet five times."""

    _BIG = 64 * 1024

    def __init__(self) -> None:
        self._buf = bytearray()
        self._pos = 0
        self._closed = False
        self._big: tuple | None = None      # (class, payload length)
        self._chunks: list = []             # ... and what of it arrived
        self._got = 0

    def receive_data(self, data) -> None:
        if not data:
            self._closed = True
            return
        if self._big is not None:
            want = self._big[1] - self._got
            if len(data) <= want:
                self._chunks.append(data)
                self._got += len(data)
                return
            self._chunks.append(memoryview(data)[:want])
            self._got += want
            data = memoryview(data)[want:]
        self._buf += data

    def next_packet(self) -> Packet | None:
        """The next whole packet, or None if more bytes are needed."""
        if self._big is not None:
            cls, length = self._big
            if self._got < length:
                if self._closed:
                    raise RemoteProtocolError("connection closed inside a packet")
                return None
            chunks, self._big, self._chunks, self._got = self._chunks, None, [], 0
            return cls.from_chunks(chunks)
        buf, pos = self._buf, self._pos
        have = len(buf) - pos
        if have < HEADER.size:
            if self._closed and have:
                raise RemoteProtocolError("connection closed inside a packet header")
            return None
        magic, ptype, _res, length = HEADER.unpack_from(buf, pos)
        if magic != MAGIC:
            raise RemoteProtocolError(f"bad packet magic 0x{magic:04x}")
        if length > MAX_PAYLOAD:
            raise RemoteProtocolError(f"packet length {length} exceeds limit")
        cls = _REGISTRY.get(ptype)
        if cls is None:
            raise RemoteProtocolError(f"unknown packet type {ptype}")
        start = pos + HEADER.size
        end = start + length
        if len(buf) < end:
            if self._closed:
                raise RemoteProtocolError("connection closed inside a packet")
            if length >= self._BIG:
                # gather the rest as it comes, in the chunks it comes in
                self._big = (cls, length)
                self._chunks = [bytes(buf[start:])]
                self._got = len(self._chunks[0])
                buf.clear()
                self._pos = 0
            return None
        pkt = cls.from_payload(buf[start:end])
        if end == len(buf):
            buf.clear()
            self._pos = 0
        elif end > self._BIG and end * 2 > len(buf):
            del buf[:end]
            self._pos = 0
        else:
            self._pos = end
        return pkt

    @property
    def buffered(self) -> int:
        return len(self._buf) - self._pos + self._got


# ---------------------------------------------------------------- handshake
@dataclass(frozen=True)
class Hello(Packet):
    """First packet both ways: who am I, which resource, a challenge nonce."""
    TYPE = 1
    FIXED = "I16s"
    TAIL = "names"
    version: int
    nonce: bytes
    names: bytes      # b"resource\0node"

    @staticmethod
    def make(version: int, nonce: bytes, resource: str, node: str) -> "Hello":
        return Hello(version, nonce, resource.encode() + b"\0" + node.encode())

    def split_names(self) -> tuple[str, str]:
        try:
            res, node = self.names.decode().split("\0")
        except (UnicodeDecodeError, ValueError):
            raise RemoteProtocolError("malformed names in Hello") from None
        return res, node


@dataclass(frozen=True)
class Auth(Packet):
    """HMAC-SHA256 of the peer's nonce with the shared secret (or zeros)."""
    TYPE = 2
    FIXED = "32s"
    mac: bytes


@dataclass(frozen=True)
class Params(Packet):
    """Everything the sync decision and the compatibility checks need."""
    TYPE = 3
    FIXED = "cBBBBBQQQQQQQ16s16s"
    protocol: bytes          # b"A" / b"B" / b"C"
    two_primaries: int
    discard_my_data: int
    role: int                # index into ROLE_CODES
    disk: int                # index into DISK_CODES
    flags: int               # PF_* below
    data_size: int
    device_uuid: int
    current: int
    bitmap: int
    history1: int
    history2: int
    oos_blocks: int          # bits set in my bitmap
    integrity_alg: bytes = b""   # data-integrity-alg (NUL-padded); both must agree
    verify_alg: bytes = b""      # verify-alg (NUL-padded); both must agree

    def __post_init__(self):
        object.__setattr__(self, "integrity_alg", bytes(self.integrity_alg).rstrip(b"\0"))
        object.__setattr__(self, "verify_alg", bytes(self.verify_alg).rstrip(b"\0"))


PF_INCONSISTENT = 1
PF_CRASHED_PRIMARY = 2
PF_FULL_IF_TARGET = 4      # this disk failed under its node: as SyncTarget, a full sync


@dataclass(frozen=True)
class StateUpdate(Packet):
    """A change of my role or disk state, for the peer's status display."""
    TYPE = 4
    FIXED = "BB"
    role: int
    disk: int


@dataclass(frozen=True)
class AttachReply(Packet):
    """The answer to a Params sent on an established connection: the peer
    attached a disk and asks to join as SyncTarget without a new handshake.
    ``result`` 1: yes, a resync follows (``full``: of every block; else the
    two bitmaps are exchanged first); 0: no, reconnect for a full handshake.
    The text says why."""
    TYPE = 6
    FIXED = "BB"
    TAIL = "reason"
    result: int
    full: int
    reason: bytes = b""


@dataclass(frozen=True)
class CurrentUuid(Packet):
    """My disk's data generation moved on (a new current UUID) while we are
    connected: a Primary without a disk serving my data keeps track of it
    (DRBD's ed_uuid)."""
    TYPE = 7
    FIXED = "Q"
    uuid: int


@dataclass(frozen=True)
class Refuse(Packet):
    """Connection refused; the text says why (logged by the receiver)."""
    TYPE = 5
    FIXED = ""
    TAIL = "reason"
    reason: bytes


# ---------------------------------------------------------------- replication
@dataclass(frozen=True)
class Data(Packet):
    """An application write.  ``epoch`` orders writes across the link: a
    write issued after another one completed carries a higher epoch, and
    the receiver starts no write of epoch e before every write of earlier
    epochs is done (DRBD's write barriers)."""
    TYPE = 10
    FIXED = "QQQ"
    TAIL = "data"
    seq: int
    epoch: int
    offset: int
    data: bytes


@dataclass(frozen=True)
class RecvAck(Packet):      # protocol B: the peer has received it
    TYPE = 11
    FIXED = "Q"
    seq: int


@dataclass(frozen=True)
class WriteAck(Packet):     # protocol C: the peer's disk has it
    TYPE = 12
    FIXED = "Q"
    seq: int


@dataclass(frozen=True)
class NegAck(Packet):       # the peer failed to write it
    TYPE = 13
    FIXED = "Qi"
    seq: int
    errno: int


@dataclass(frozen=True)
class Flush(Packet):        # peer: make everything received so far durable
    TYPE = 14
    FIXED = "Q"
    seq: int


@dataclass(frozen=True)
class FlushAck(Packet):
    TYPE = 15
    FIXED = "Q"
    seq: int


@dataclass(frozen=True)
class Discard(Packet):
    TYPE = 16
    FIXED = "QQQ"
    seq: int
    offset: int
    length: int


@dataclass(frozen=True)
class ReadRequest(Packet):
    """A Diskless Primary (or a SyncTarget for an out-of-sync block) reads
    through the peer."""
    TYPE = 17
    FIXED = "QQQ"
    seq: int
    offset: int
    length: int


@dataclass(frozen=True)
class ReadReply(Packet):
    TYPE = 18
    FIXED = "Q"
    TAIL = "data"
    seq: int
    data: bytes


@dataclass(frozen=True)
class OutOfSync(Packet):
    """The sender's copy of this range is bad (a local I/O error): the
    receiver must remember to resync it."""
    TYPE = 19
    FIXED = "QQ"
    offset: int
    length: int


@dataclass(frozen=True)
class DataDigest(Packet):
    """data-integrity-alg: the digest of the data of the very next packet
    (Data, ResyncData or ReadReply), computed by the sender before it
    went on the wire; the receiver checks it before using the data."""
    TYPE = 22
    FIXED = ""
    TAIL = "digest"
    digest: bytes


@dataclass(frozen=True)
class Congestion(Packet):
    """on-congestion pull-ahead: the sender goes Ahead (1: its writes now
    reach this node only as OutOfSync marks, to be resynced) -- the
    receiver is Behind until that resync starts."""
    TYPE = 23
    FIXED = "B"
    ahead: int


@dataclass(frozen=True)
class Ping(Packet):
    TYPE = 20
    FIXED = "Q"
    token: int


@dataclass(frozen=True)
class PingAck(Packet):
    TYPE = 21
    FIXED = "Q"
    token: int


# ---------------------------------------------------------------- role changes
@dataclass(frozen=True)
class RoleRequest(Packet):
    """Ask the peer before becoming Primary (it may already be Primary)."""
    TYPE = 25
    FIXED = "QB"
    token: int
    role: int


@dataclass(frozen=True)
class RoleReply(Packet):
    TYPE = 26
    FIXED = "Qi"
    token: int
    result: int          # 0 ok, else a negative DRBD state-change code


# ---------------------------------------------------------------- online grow
@dataclass(frozen=True)
class ResizeRequest(Packet):
    """The initiator of ``resize`` asks how far the peer's disk can grow."""
    TYPE = 45
    FIXED = "Q"
    token: int


@dataclass(frozen=True)
class ResizeReply(Packet):
    """``max_size``: the usable size the peer's backing disk allows now;
    ``result`` 0, or a refusal (a DRBD state-change or failure code) whose
    words are ``reason`` (the peer is resyncing, its disk cannot grow...)."""
    TYPE = 46
    FIXED = "QQi"
    TAIL = "reason"
    token: int
    max_size: int
    result: int
    reason: bytes = b""


RZ_ASSUME_CLEAN = 1       # no resync of the new area
RZ_YOU_ARE_SOURCE = 2     # the receiver resyncs the new area to the sender


@dataclass(frozen=True)
class ResizeCommit(Packet):
    """Grow to ``new_size`` (the sender has grown already)."""
    TYPE = 47
    FIXED = "QQB"
    token: int
    new_size: int
    flags: int


@dataclass(frozen=True)
class ResizeDone(Packet):
    """The receiver of ResizeCommit has grown (``result`` 0) or failed."""
    TYPE = 48
    FIXED = "Qi"
    TAIL = "reason"
    token: int
    result: int
    reason: bytes = b""


# ---------------------------------------------------------------- resync
@dataclass(frozen=True)
class BitmapChunk(Packet):
    """Part of the sender's out-of-sync bitmap (zlib-compressed bytes)."""
    TYPE = 30
    FIXED = "QB"
    TAIL = "data"
    offset: int          # byte offset into the bitmap
    last: int
    data: bytes


@dataclass(frozen=True)
class SyncStart(Packet):
    """Source -> target: resync begins; the target becomes Inconsistent."""
    TYPE = 31
    FIXED = "QQB"
    sync_uuid: int
    total_blocks: int
    full: int


@dataclass(frozen=True)
class ResyncData(Packet):
    TYPE = 32
    FIXED = "Q"
    TAIL = "data"
    offset: int
    data: bytes


@dataclass(frozen=True)
class ResyncAck(Packet):
    TYPE = 33
    FIXED = "QQ"
    offset: int
    length: int


@dataclass(frozen=True)
class SyncDone(Packet):
    TYPE = 34
    FIXED = "Q"
    source_current: int


@dataclass(frozen=True)
class SyncDoneAck(Packet):
    TYPE = 35
    FIXED = ""


@dataclass(frozen=True)
class SyncPause(Packet):
    """The sender's sync-pause flag changed (pause-sync / resume-sync): the
    receiver shows PausedSyncS/T while either side has it set, and a
    SyncSource sends no resync data meanwhile (DRBD's peer_isp)."""
    TYPE = 36
    FIXED = "B"
    paused: int


@dataclass(frozen=True)
class ResyncCsum(Packet):
    """csums-alg: instead of the data, the SyncSource sends the digest of
    each 4 KiB block of a range it is to resync, computed with ``alg``
    (a hashlib name, NUL-padded); the target answers ResyncCsumReply."""
    TYPE = 37
    FIXED = "QQ16s"
    TAIL = "digests"
    offset: int
    length: int
    alg: bytes
    digests: bytes

    def __post_init__(self):
        object.__setattr__(self, "alg", bytes(self.alg).rstrip(b"\0"))


@dataclass(frozen=True)
class ResyncCsumReply(Packet):
    """Which blocks of a ResyncCsum range the target still needs (one bit
    per 4 KiB block, set = its copy differs); the others are in sync."""
    TYPE = 38
    FIXED = "QQ"
    TAIL = "mismatch"
    offset: int
    length: int
    mismatch: bytes


@dataclass(frozen=True)
class VerifyRequest(Packet):
    """Online verify: per-4 KiB digests of a range, to compare with the peer's."""
    TYPE = 40
    FIXED = "QQ"
    TAIL = "digests"
    offset: int
    length: int
    digests: bytes       # 16 bytes per 4 KiB block


@dataclass(frozen=True)
class VerifyReply(Packet):
    TYPE = 41
    FIXED = "QQ"
    TAIL = "mismatch"
    offset: int
    length: int
    mismatch: bytes      # one bit per 4 KiB block of the range, set = differs


@dataclass(frozen=True)
class VerifyDone(Packet):
    TYPE = 42
    FIXED = "Q"
    oos_blocks: int


@dataclass(frozen=True)
class Goodbye(Packet):
    """Orderly disconnect (drbdadm disconnect/down on the peer)."""
    TYPE = 50
    FIXED = ""


ROLE_CODES = ("Unknown", "Primary", "Secondary")
DISK_CODES = ("Diskless", "Attaching", "Failed", "Negotiating", "Inconsistent",
              "Outdated", "DUnknown", "Consistent", "UpToDate")
