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
Small pieces are gathered into one buffer as they come (a peer sending a
frame a byte or two at a time costs its bytes, not an object per piece),
and frames are cut from the front by an offset, never by copying the rest
(many small frames in one read take linear time).  Anything malformed,
JSON nested too deep or with integers too long included, raises
FrameError.
"""
from __future__ import annotations

import json
import struct
from collections import deque

HEAD = struct.Struct("<II")
MAX_HEADER = 1024 * 1024
MAX_BODY = 64 * 1024 * 1024
_SMALL = 64 * 1024      # pieces shorter than this are gathered into one buffer


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
        # bytes (as received, never copied) or bytearray (small pieces
        # gathered); _pos bytes of the first one are already consumed.
        self._chunks: deque[bytes | bytearray] = deque()
        self._pos = 0
        self._size = 0

    def receive_data(self, data: bytes) -> None:
        if not data:
            return
        chunks = self._chunks
        if len(data) >= _SMALL:
            chunks.append(bytes(data))
        elif chunks and type(chunks[-1]) is bytearray and len(chunks[-1]) < _SMALL:
            chunks[-1] += data
        else:
            chunks.append(bytearray(data))
        self._size += len(data)

    def _peek(self, n: int) -> bytes:
        """The first n buffered bytes (n is small)."""
        out = b""
        pos = self._pos
        for chunk in self._chunks:
            out += chunk[pos:pos + n - len(out)]
            pos = 0
            if len(out) == n:
                break
        return out

    def _take(self, n: int) -> bytes:
        if n == 0:
            return b""
        chunks = self._chunks
        first = chunks[0]
        if self._pos == 0 and len(first) == n and type(first) is bytes:
            chunks.popleft()                # a whole received chunk: no copy
            self._size -= n
            return first
        pieces = []
        need = n
        while need:
            chunk = chunks[0]
            pos = self._pos
            take = min(len(chunk) - pos, need)
            pieces.append(memoryview(chunk)[pos:pos + take])
            need -= take
            if pos + take == len(chunk):
                chunks.popleft()
                self._pos = 0
            else:
                self._pos = pos + take
        self._size -= n
        out = pieces[0].tobytes() if len(pieces) == 1 else b"".join(pieces)
        for p in pieces:
            p.release()                     # a gathered bytearray may grow again
        return out

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
        except (ValueError, RecursionError) as e:
            # JSONDecodeError and UnicodeDecodeError are ValueErrors, and so
            # is an integer past sys.get_int_max_str_digits(); RecursionError:
            # arrays or objects nested deeper than the interpreter's stack.
            raise FrameError(f"bad frame header: {type(e).__name__}: {e}") from None
        if not isinstance(header, dict):
            raise FrameError("frame header is not a JSON object")
        body = self._take(blen) if blen else b""
        return header, body
