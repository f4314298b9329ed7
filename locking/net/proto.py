"""o2net-style node-to-node wire format, sans-IO.

A frame is ``magic u16, type u8, reserved u8, length u32, payload``.  A
connection starts with HELLO both ways (version, node number, cluster name,
a fresh nonce), then AUTH both ways: HMAC-SHA256 over the *peer's* nonce
keyed with the shared cluster key (an empty key when none is configured,
so a stranger still has to speak the protocol and name the cluster).
After that: PING/PONG keepalives and MSG frames carrying opaque payloads
(DLM messages, heartbeat pings) for the layers above.

No sockets, clocks or randomness here: the driver passes nonces in.
"""
from __future__ import annotations

import hashlib
import hmac
import struct
from dataclasses import dataclass

MAGIC = 0x4F32  # "O2"
VERSION = 1
HEADER = struct.Struct(">HBBI")
MAX_PAYLOAD = 1 << 20
NONCE_LEN = 16
MAC_LEN = 32

HELLO, AUTH, PING, PONG, MSG = 1, 2, 3, 4, 5
_TYPES = {HELLO, AUTH, PING, PONG, MSG}


class RemoteProtocolError(Exception):
    """The peer sent something that is not our protocol: drop the connection."""


@dataclass(frozen=True)
class Hello:
    version: int
    node: int
    cluster: str
    nonce: bytes


def frame(ftype: int, payload: bytes = b"") -> bytes:
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"payload of {len(payload)} bytes exceeds {MAX_PAYLOAD}")
    return HEADER.pack(MAGIC, ftype, 0, len(payload)) + payload


def encode_hello(h: Hello) -> bytes:
    name = h.cluster.encode()
    return frame(HELLO, struct.pack(">BBB", h.version, h.node, len(name)) + name + h.nonce)


def decode_hello(payload: bytes) -> Hello:
    if len(payload) < 3:
        raise RemoteProtocolError("short HELLO")
    version, node, n = struct.unpack_from(">BBB", payload)
    if len(payload) != 3 + n + NONCE_LEN:
        raise RemoteProtocolError("HELLO of wrong length")
    try:
        cluster = payload[3:3 + n].decode()
    except UnicodeDecodeError:
        raise RemoteProtocolError("HELLO cluster name is not UTF-8") from None
    return Hello(version, node, cluster, payload[3 + n:])


def auth_mac(key: bytes, nonce: bytes, cluster: str, sender: int) -> bytes:
    """What ``sender`` proves with: it knows ``key`` and saw ``nonce``."""
    msg = b"replfs-o2net\0" + cluster.encode() + b"\0" + bytes([sender]) + nonce
    return hmac.new(key, msg, hashlib.sha256).digest()


def check_hello(h: Hello, *, cluster: str, expected: set[int]) -> str | None:
    """Why this HELLO is refused, or None."""
    if h.version != VERSION:
        return f"protocol version {h.version}, we speak {VERSION}"
    if h.cluster != cluster:
        return f"cluster {h.cluster!r} is not ours ({cluster!r})"
    if h.node not in expected:
        return f"node number {h.node} is not a node we accept connections from"
    return None


class FrameDecoder:
    """Incremental: feed bytes, get (type, payload) tuples."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        self._buf += data
        out = []
        while len(self._buf) >= HEADER.size:
            magic, ftype, reserved, length = HEADER.unpack_from(self._buf)
            if magic != MAGIC:
                raise RemoteProtocolError(f"bad magic 0x{magic:04x}")
            if ftype not in _TYPES or reserved != 0:
                raise RemoteProtocolError(f"unknown frame type {ftype}")
            if length > MAX_PAYLOAD:
                raise RemoteProtocolError(f"frame of {length} bytes exceeds {MAX_PAYLOAD}")
            if len(self._buf) < HEADER.size + length:
                break
            out.append((ftype, bytes(self._buf[HEADER.size:HEADER.size + length])))
            del self._buf[:HEADER.size + length]
        return out
