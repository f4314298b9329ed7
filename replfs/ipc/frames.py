"""Local IPC framing between replfsd and its clients.  No I/O here.

A frame is a JSON header and an optional binary body:

    header_len u32   body_len u32   header (UTF-8 JSON object)   body

Requests carry an integer ``id`` and an ``op``; the reply to a request
carries the same ``id`` and ``ok`` (true/false).  A client may send many
requests before reading replies; the server answers each as soon as it
is done, so replies can come back in another order.  Block data (reads,
writes) travels in the body, never inside JSON.
"""
from __future__ import annotations

import json
import struct

HEAD = struct.Struct("<II")
MAX_HEADER = 1024 * 1024
MAX_BODY = 64 * 1024 * 1024


class FrameError(Exception):
    """The other side sent bytes that are not a valid frame."""


def encode(header: dict, body: bytes = b"") -> bytes:
    h = json.dumps(header, separators=(",", ":")).encode()
    return HEAD.pack(len(h), len(body)) + h + body


class FrameDecoder:
    def __init__(self) -> None:
        self._buf = bytearray()

    def receive_data(self, data: bytes) -> None:
        self._buf += data

    def next_frame(self) -> tuple[dict, bytes] | None:
        buf = self._buf
        if len(buf) < HEAD.size:
            return None
        hlen, blen = HEAD.unpack_from(buf)
        if hlen > MAX_HEADER or blen > MAX_BODY:
            raise FrameError(f"frame too large (header {hlen}, body {blen})")
        end = HEAD.size + hlen + blen
        if len(buf) < end:
            return None
        try:
            header = json.loads(bytes(buf[HEAD.size:HEAD.size + hlen]))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise FrameError(f"bad frame header: {e}") from None
        if not isinstance(header, dict):
            raise FrameError("frame header is not a JSON object")
        body = bytes(buf[HEAD.size + hlen:end])
        del buf[:end]
        return header, body
