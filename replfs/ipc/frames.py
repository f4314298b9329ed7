"""Local IPC framing between replfsd and its clients.  No I/O here.

A frame is a JSON header and an optional binary body:

    header_len u32   body_len u32   header (UTF-8 JSON object)   body

Requests carry an integer ``id`` and an ``op``; the reply to a request
carries the same ``id`` and ``ok`` (true/false).  A client may send many
requests before reading replies; the server answers each as soon as it
is done, so replies can come back in another order.  Block data (reads,
writes) travels in the body, never inside JSON.  Frames without an ``id``
and with an ``event`` are unsolicited notifications from the daemon.

Bodies are often 1 MiB; the decoder keeps incoming chunks in a list and
joins them once per frame, so a body is copied once, not once per chunk.
"""
from __future__ import annotations

import json
import struct

HEAD = struct.Struct("<II")
MAX_HEADER = 1024 * 1024
MAX_BODY = 64 * 1024 * 1024


class FrameError(Exception):
    """The other side sent bytes that are not a valid frame."""


def encode_parts(header: dict, body: bytes = b"") -> tuple[bytes, bytes]:
    """(prefix, body): send both, in order; the body is not copied."""
    h = json.dumps(header, separators=(",", ":")).encode()
    return HEAD.pack(len(h), len(body)) + h, body


def encode(header: dict, body: bytes = b"") -> bytes:
    prefix, body = encode_parts(header, body)
    return prefix + body


class FrameDecoder:
    def __init__(self) -> None:
        self._chunks: list[bytes] = []
        self._size = 0

    def receive_data(self, data: bytes) -> None:
        if data:
            self._chunks.append(bytes(data))
            self._size += len(data)

    def _peek(self, n: int) -> bytes:
        """The first n buffered bytes (joining chunks only as needed)."""
        if len(self._chunks[0]) < n:
            joined = b"".join(self._chunks)
            self._chunks = [joined]
        return self._chunks[0][:n]

    def _take(self, n: int) -> bytes:
        out = []
        need = n
        while need:
            chunk = self._chunks[0]
            if len(chunk) <= need:
                out.append(chunk)
                self._chunks.pop(0)
                need -= len(chunk)
            else:
                out.append(chunk[:need])
                self._chunks[0] = chunk[need:]
                need = 0
        self._size -= n
        return out[0] if len(out) == 1 else b"".join(out)

    def next_frame(self) -> tuple[dict, bytes] | None:
        if self._size < HEAD.size:
            return None
        hlen, blen = HEAD.unpack(self._peek(HEAD.size))
        if hlen > MAX_HEADER or blen > MAX_BODY:
            raise FrameError(f"frame too large (header {hlen}, body {blen})")
        if self._size < HEAD.size + hlen + blen:
            return None
        self._take(HEAD.size)
        raw = self._take(hlen)
        try:
            header = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise FrameError(f"bad frame header: {e}") from None
        if not isinstance(header, dict):
            raise FrameError("frame header is not a JSON object")
        body = self._take(blen) if blen else b""
        return header, body
