"""DLM messages between nodes and their binary codec.

Every message is a frozen dataclass.  On the wire a message is one frame:

    u32 length (big endian, of what follows) | u8 type | fields...

Fields, by kind: ``u8``/``u64`` big-endian integers; ``str`` = u16 length
+ UTF-8; ``mode`` = u8 0..5; ``optmode`` = u8 0..5 or 0xFF for "none";
``lvb`` = exactly 64 bytes; ``optlvb`` = u8 presence flag (0/1) then 64
bytes when present; ``bool`` = u8 0/1.  Every frame carries the sender's
membership epoch first so stale traffic from before a membership change
can be told apart (see core.py).

Decoding never trusts its input: an unknown type, a short or over-long
body, a bad mode, bad UTF-8 or a frame bigger than MAX_FRAME raises
RemoteProtocolError and nothing else.  The driver drops that connection.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, fields
from typing import Optional, Union

from .modes import Mode

LVB_LEN = 64
MAX_FRAME = 64 * 1024
MAX_RESOURCE_NAME = 1024
NO_MODE = 0xFF


class RemoteProtocolError(Exception):
    """The peer sent bytes that are not a valid DLM frame."""


class LocalProtocolError(Exception):
    """The local caller used the DLM API wrongly (a bug in the caller)."""


# Lock request flags.
FLAG_NOQUEUE = 0x01

# Refusal reasons (RefuseMsg.reason and the Refuse action).
REASON_WOULD_BLOCK = 1   # NOQUEUE request that could not be granted at once (EAGAIN)
REASON_CANCELLED = 2     # the request was cancelled before it was granted
REASON_TIMEOUT = 3       # cancelled because the caller's timeout passed (local only)
REASON_DEADLOCK = 4      # conversion refused to break a conversion deadlock
REASON_NAMES = {REASON_WOULD_BLOCK: "EAGAIN", REASON_CANCELLED: "CANCELLED",
                REASON_TIMEOUT: "ETIMEDOUT", REASON_DEADLOCK: "EDEADLK"}


@dataclass(frozen=True)
class LockRequest:
    """Owner -> master: a new lock on ``resource``."""
    epoch: int
    resource: str
    lockid: int
    mode: Mode
    flags: int = 0


@dataclass(frozen=True)
class ConvertRequest:
    """Owner -> master: change the mode of a granted lock.  ``lvb`` is the
    holder's new value block when it leaves PW/EX, else None."""
    epoch: int
    resource: str
    lockid: int
    mode: Mode
    flags: int = 0
    lvb: Optional[bytes] = None
    lvb_seq: int = 0


@dataclass(frozen=True)
class UnlockRequest:
    """Owner -> master: drop a granted lock, maybe writing the LVB."""
    epoch: int
    resource: str
    lockid: int
    lvb: Optional[bytes] = None
    lvb_seq: int = 0


@dataclass(frozen=True)
class CancelRequest:
    """Owner -> master: withdraw a queued (waiting or converting) request."""
    epoch: int
    resource: str
    lockid: int


@dataclass(frozen=True)
class GrantMsg:
    """Master -> owner: the request is granted (the AST), with the LVB."""
    epoch: int
    resource: str
    lockid: int
    mode: Mode
    lvb: bytes
    lvb_seq: int
    lvb_valid: bool


@dataclass(frozen=True)
class BastMsg:
    """Master -> owner: your granted lock blocks a request for ``blocked_mode``."""
    epoch: int
    resource: str
    lockid: int
    blocked_mode: Mode


@dataclass(frozen=True)
class RefuseMsg:
    """Master -> owner: the request is not granted and is gone (see REASON_*)."""
    epoch: int
    resource: str
    lockid: int
    reason: int


@dataclass(frozen=True)
class LockReport:
    """Owner -> new master during recovery: one of my locks as I see it."""
    epoch: int
    resource: str
    lockid: int
    granted: Optional[Mode]
    requested: Optional[Mode]
    flags: int
    lvb: bytes
    lvb_seq: int
    lvb_valid: bool


@dataclass(frozen=True)
class LvbReport:
    """To the new master during recovery: an LVB value I know of.  The old
    master sends its copy (from_master=True, valid already accounting for
    dead writers); owners send the last value they wrote."""
    epoch: int
    resource: str
    lvb: bytes
    lvb_seq: int
    lvb_valid: bool
    from_master: bool


@dataclass(frozen=True)
class RecoveryDone:
    """To every live node: all my reports for ``epoch`` have been sent.
    ``complete`` is False when the sender's previous recovery was cut short,
    so its silence about a resource it mastered proves nothing."""
    epoch: int
    complete: bool = True


Message = Union[LockRequest, ConvertRequest, UnlockRequest, CancelRequest, GrantMsg,
                BastMsg, RefuseMsg, LockReport, LvbReport, RecoveryDone]

# type code -> (class, field kinds in declaration order)
_SCHEMA = {
    1: (LockRequest, ("u64", "str", "u64", "mode", "u8")),
    2: (ConvertRequest, ("u64", "str", "u64", "mode", "u8", "optlvb", "u64")),
    3: (UnlockRequest, ("u64", "str", "u64", "optlvb", "u64")),
    4: (CancelRequest, ("u64", "str", "u64")),
    5: (GrantMsg, ("u64", "str", "u64", "mode", "lvb", "u64", "bool")),
    6: (BastMsg, ("u64", "str", "u64", "mode")),
    7: (RefuseMsg, ("u64", "str", "u64", "u8")),
    8: (LockReport, ("u64", "str", "u64", "optmode", "optmode", "u8", "lvb", "u64", "bool")),
    9: (LvbReport, ("u64", "str", "lvb", "u64", "bool", "bool")),
    10: (RecoveryDone, ("u64", "bool")),
}
_TYPE_OF = {cls: code for code, (cls, _) in _SCHEMA.items()}
for _code, (_cls, _kinds) in _SCHEMA.items():
    assert len(fields(_cls)) == len(_kinds), _cls

_U64 = struct.Struct(">Q")
_U32 = struct.Struct(">I")
_U16 = struct.Struct(">H")


def _put(kind: str, value, out: bytearray) -> None:
    if kind == "u64":
        out += _U64.pack(value)
    elif kind in ("u8", "mode"):
        out.append(int(value))
    elif kind == "bool":
        out.append(1 if value else 0)
    elif kind == "optmode":
        out.append(NO_MODE if value is None else int(value))
    elif kind == "str":
        raw = value.encode("utf-8")
        if len(raw) > MAX_RESOURCE_NAME:
            raise LocalProtocolError(f"resource name longer than {MAX_RESOURCE_NAME} bytes")
        out += _U16.pack(len(raw)) + raw
    elif kind == "lvb":
        if len(value) != LVB_LEN:
            raise LocalProtocolError(f"LVB must be {LVB_LEN} bytes, got {len(value)}")
        out += value
    elif kind == "optlvb":
        if value is None:
            out.append(0)
        else:
            out.append(1)
            _put("lvb", value, out)
    else:  # pragma: no cover - schema typo
        raise AssertionError(kind)


def encode(msg: Message) -> bytes:
    """One length-prefixed frame for ``msg``."""
    code = _TYPE_OF.get(type(msg))
    if code is None:
        raise LocalProtocolError(f"not a DLM message: {msg!r}")
    body = bytearray([code])
    for f, kind in zip(fields(msg), _SCHEMA[code][1]):
        _put(kind, getattr(msg, f.name), body)
    return _U32.pack(len(body)) + bytes(body)


class _Reader:
    def __init__(self, data: bytes):
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise RemoteProtocolError("frame body ends in the middle of a field")
        chunk = self.data[self.pos:self.pos + n]
        self.pos += n
        return chunk

    def byte(self) -> int:
        return self.take(1)[0]

    def get(self, kind: str):
        if kind == "u64":
            return _U64.unpack(self.take(8))[0]
        if kind == "u8":
            return self.byte()
        if kind == "bool":
            b = self.byte()
            if b > 1:
                raise RemoteProtocolError(f"bad boolean byte {b}")
            return bool(b)
        if kind == "mode":
            b = self.byte()
            if b > Mode.EX:
                raise RemoteProtocolError(f"bad lock mode {b}")
            return Mode(b)
        if kind == "optmode":
            b = self.byte()
            if b == NO_MODE:
                return None
            if b > Mode.EX:
                raise RemoteProtocolError(f"bad lock mode {b}")
            return Mode(b)
        if kind == "str":
            n = _U16.unpack(self.take(2))[0]
            if n > MAX_RESOURCE_NAME:
                raise RemoteProtocolError(f"resource name of {n} bytes is too long")
            try:
                return self.take(n).decode("utf-8")
            except UnicodeDecodeError:
                raise RemoteProtocolError("resource name is not UTF-8") from None
        if kind == "lvb":
            return bytes(self.take(LVB_LEN))
        if kind == "optlvb":
            flag = self.byte()
            if flag == 0:
                return None
            if flag != 1:
                raise RemoteProtocolError(f"bad LVB presence byte {flag}")
            return bytes(self.take(LVB_LEN))
        raise AssertionError(kind)  # pragma: no cover


def decode_body(body: bytes) -> Message:
    """Decode one frame body (the bytes after the length prefix)."""
    if not body:
        raise RemoteProtocolError("empty frame")
    entry = _SCHEMA.get(body[0])
    if entry is None:
        raise RemoteProtocolError(f"unknown message type {body[0]}")
    cls, kinds = entry
    reader = _Reader(body)
    reader.pos = 1
    values = [reader.get(k) for k in kinds]
    if reader.pos != len(body):
        raise RemoteProtocolError(
            f"{len(body) - reader.pos} stray byte(s) after a {cls.__name__}")
    return cls(*values)


def decode(frame: bytes) -> Message:
    """Decode exactly one whole frame (length prefix included)."""
    dec = FrameDecoder()
    msgs = dec.feed(frame)
    if len(msgs) != 1 or dec.pending:
        raise RemoteProtocolError("expected exactly one whole frame")
    return msgs[0]


class FrameDecoder:
    """Reassembles frames from a byte stream split anywhere.

    After a RemoteProtocolError the stream position is lost, so the
    decoder refuses further input: the driver must drop the connection.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._broken: Optional[str] = None

    @property
    def pending(self) -> int:
        """Bytes held that do not yet make a whole frame."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[Message]:
        if self._broken:
            raise RemoteProtocolError(f"stream already failed: {self._broken}")
        self._buf += data
        out: list[Message] = []
        try:
            while len(self._buf) >= 4:
                n = _U32.unpack_from(self._buf)[0]
                if n == 0 or n > MAX_FRAME:
                    raise RemoteProtocolError(f"frame length {n} outside 1..{MAX_FRAME}")
                if len(self._buf) < 4 + n:
                    break
                body = bytes(self._buf[4:4 + n])
                del self._buf[:4 + n]
                out.append(decode_body(body))
        except RemoteProtocolError as e:
            self._broken = str(e)
            raise
        return out
