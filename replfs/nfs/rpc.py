"""A small NFSv3 client over ONC RPC (RFC 5531, RFC 1813), in pure Python.

What it is for: the NFS export's readiness probe (``replfsadm nfs start``
waits for an answer to the NFS NULL procedure) and the tests that need to
hold a file handle the way a kernel client does -- get it from one server,
keep it across a failover or a remount, present it, byte for byte, to the
other node's server, and see exactly what the server answers (ESTALE for
a deleted file, a changed write verifier after a restart).  libnfs's tools
cannot do that: they look every path up again.

Only what those uses need: TCP with record marking, AUTH_SYS, MOUNT3 MNT,
and the NFSv3 procedures NULL, GETATTR, LOOKUP, READ, WRITE, CREATE,
REMOVE, COMMIT.  Every reply is decoded with bounds checks; a malformed
one raises RPCError, an NFS status other than NFS3_OK raises NFSError.
"""
from __future__ import annotations

import os
import random
import socket
import struct
from dataclasses import dataclass

NFS_PROGRAM = 100003
MOUNT_PROGRAM = 100005

# NFSv3 status codes a caller may want to test for (RFC 1813 2.6)
NFS3_OK = 0
NFS3ERR_NOENT = 2
NFS3ERR_IO = 5
NFS3ERR_ACCES = 13
NFS3ERR_EXIST = 17
NFS3ERR_STALE = 70
NFS3ERR_BADHANDLE = 10001
NFS3ERR_JUKEBOX = 10008
_NAMES = {2: "NOENT", 5: "IO", 13: "ACCES", 17: "EXIST", 28: "NOSPC", 30: "ROFS",
          70: "STALE", 10001: "BADHANDLE", 10008: "JUKEBOX", 1: "PERM", 20: "NOTDIR",
          21: "ISDIR", 22: "INVAL"}

UNSTABLE, DATA_SYNC, FILE_SYNC = 0, 1, 2
MAX_RECORD = 4 << 20          # a reply larger than this is refused, not buffered


class RPCError(OSError):
    """The server could not be reached, or answered something that is not
    a well-formed successful RPC reply."""


class NFSError(OSError):
    """The server answered the call with an NFS error status."""

    def __init__(self, status: int, what: str):
        self.status = status
        super().__init__(f"{what}: NFS3ERR_{_NAMES.get(status, status)}")


class _Packer:
    def __init__(self):
        self.parts: list[bytes] = []

    def u32(self, v: int):
        self.parts.append(struct.pack(">I", v & 0xFFFFFFFF))

    def u64(self, v: int):
        self.parts.append(struct.pack(">Q", v))

    def opaque(self, b: bytes):
        self.u32(len(b))
        self.parts.append(b + b"\0" * (-len(b) % 4))

    def string(self, s: str):
        self.opaque(s.encode())

    def bytes(self) -> bytes:
        return b"".join(self.parts)


class _Unpacker:
    def __init__(self, data: bytes):
        self.data = data
        self.pos = 0

    def _take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise RPCError("truncated RPC reply")
        b = self.data[self.pos:self.pos + n]
        self.pos += n
        return b

    def u32(self) -> int:
        return struct.unpack(">I", self._take(4))[0]

    def u64(self) -> int:
        return struct.unpack(">Q", self._take(8))[0]

    def opaque(self, limit: int = MAX_RECORD) -> bytes:
        n = self.u32()
        if n > limit:
            raise RPCError(f"RPC reply field of {n} bytes (at most {limit})")
        b = self._take(n)
        self._take(-n % 4)
        return b

    def fixed(self, n: int) -> bytes:
        return self._take(n)


@dataclass(frozen=True)
class Attr:
    type: int
    mode: int
    nlink: int
    uid: int
    gid: int
    size: int
    fsid: int
    fileid: int
    mtime: tuple[int, int]


def _fattr3(u: _Unpacker) -> Attr:
    ftype, mode, nlink, uid, gid = (u.u32() for _ in range(5))
    size, _used = u.u64(), u.u64()
    u.u64()                               # rdev
    fsid, fileid = u.u64(), u.u64()
    u.u64()                               # atime
    mtime = (u.u32(), u.u32())
    u.u64()                               # ctime
    return Attr(ftype, mode, nlink, uid, gid, size, fsid, fileid, mtime)


def _post_op_attr(u: _Unpacker) -> Attr | None:
    return _fattr3(u) if u.u32() else None


def _wcc(u: _Unpacker) -> Attr | None:
    if u.u32():                           # pre_op_attr: size, mtime, ctime
        u.fixed(24)
    return _post_op_attr(u)


class RPCClient:
    """One TCP connection to one RPC program on one server."""

    def __init__(self, host: str, port: int, program: int, version: int, *,
                 timeout: float = 10.0, uid: int = 0, gid: int = 0):
        self.program, self.version = program, version
        self.uid, self.gid = uid, gid
        self.xid = random.getrandbits(32)
        try:
            # an ordinary source port: Ganesha's default (PrivilegedPort
            # false) accepts it
            self.sock = socket.create_connection((host, port), timeout=timeout)
        except OSError as e:
            raise RPCError(f"cannot reach {host}:{port}: {e.strerror or e}") from None
        self.sock.settimeout(timeout)

    def close(self):
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _cred(self) -> bytes:
        p = _Packer()
        p.u32(0)                          # stamp
        p.string(os.uname().nodename[:255])
        p.u32(self.uid)
        p.u32(self.gid)
        p.u32(0)                          # no supplementary groups
        return p.bytes()

    def _recv_exact(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            try:
                chunk = self.sock.recv(n - len(buf))
            except OSError as e:
                raise RPCError(f"RPC connection: {e.strerror or e}") from None
            if not chunk:
                raise RPCError("the server closed the RPC connection")
            buf += chunk
        return bytes(buf)

    def call(self, proc: int, args: bytes = b"") -> _Unpacker:
        self.xid = (self.xid + 1) & 0xFFFFFFFF
        p = _Packer()
        for v in (self.xid, 0, 2, self.program, self.version, proc):
            p.u32(v)
        p.u32(1)                          # AUTH_SYS
        p.opaque(self._cred())
        p.u32(0)                          # verifier: AUTH_NONE
        p.u32(0)
        body = p.bytes() + args
        try:
            self.sock.sendall(struct.pack(">I", 0x80000000 | len(body)) + body)
        except OSError as e:
            raise RPCError(f"RPC connection: {e.strerror or e}") from None
        while True:
            record = b""
            last = False
            while not last:
                (mark,) = struct.unpack(">I", self._recv_exact(4))
                last, size = bool(mark & 0x80000000), mark & 0x7FFFFFFF
                if len(record) + size > MAX_RECORD:
                    raise RPCError(f"RPC reply larger than {MAX_RECORD} bytes")
                record += self._recv_exact(size)
            u = _Unpacker(record)
            if u.u32() != self.xid:
                continue                  # a late reply to an earlier call
            if u.u32() != 1:
                raise RPCError("not an RPC reply")
            if u.u32() != 0:
                raise RPCError("the server denied the RPC call (bad version or credentials)")
            u.u32()                       # verifier flavour
            u.opaque(400)
            accept = u.u32()
            if accept != 0:
                raise RPCError(f"the server did not accept the RPC call (accept_stat {accept})")
            return u


class MountClient(RPCClient):
    def __init__(self, host: str, port: int, **kw):
        super().__init__(host, port, MOUNT_PROGRAM, 3, **kw)

    def mnt(self, path: str) -> bytes:
        p = _Packer()
        p.string(path)
        u = self.call(1, p.bytes())
        status = u.u32()
        if status:
            raise NFSError(status, f"MOUNT {path}")
        return u.opaque(64)


class NFS3Client(RPCClient):
    """NFSv3 calls on raw file handles (bytes)."""

    def __init__(self, host: str, port: int = 2049, **kw):
        super().__init__(host, port, NFS_PROGRAM, 3, **kw)

    def null(self) -> None:
        self.call(0)

    @staticmethod
    def _status(u: _Unpacker, what: str) -> None:
        status = u.u32()
        if status:
            raise NFSError(status, what)

    def getattr(self, fh: bytes) -> Attr:
        p = _Packer()
        p.opaque(fh)
        u = self.call(1, p.bytes())
        self._status(u, "GETATTR")
        return _fattr3(u)

    def lookup(self, dir_fh: bytes, name: str) -> bytes:
        p = _Packer()
        p.opaque(dir_fh)
        p.string(name)
        u = self.call(3, p.bytes())
        self._status(u, f"LOOKUP {name}")
        return u.opaque(64)

    def read(self, fh: bytes, offset: int, count: int) -> tuple[bytes, bool]:
        p = _Packer()
        p.opaque(fh)
        p.u64(offset)
        p.u32(count)
        u = self.call(6, p.bytes())
        self._status(u, "READ")
        _post_op_attr(u)
        u.u32()                           # count
        eof = bool(u.u32())
        return u.opaque(), eof

    def write(self, fh: bytes, offset: int, data: bytes,
              stable: int = FILE_SYNC) -> tuple[int, int, bytes]:
        """Returns (count, how committed, the server's write verifier)."""
        p = _Packer()
        p.opaque(fh)
        p.u64(offset)
        p.u32(len(data))
        p.u32(stable)
        p.opaque(data)
        u = self.call(7, p.bytes())
        self._status(u, "WRITE")
        _wcc(u)
        count, committed = u.u32(), u.u32()
        return count, committed, u.fixed(8)

    def commit(self, fh: bytes, offset: int = 0, count: int = 0) -> bytes:
        """Returns the write verifier the data was committed under."""
        p = _Packer()
        p.opaque(fh)
        p.u64(offset)
        p.u32(count)
        u = self.call(21, p.bytes())
        self._status(u, "COMMIT")
        _wcc(u)
        return u.fixed(8)

    def create(self, dir_fh: bytes, name: str, mode: int = 0o644) -> bytes:
        p = _Packer()
        p.opaque(dir_fh)
        p.string(name)
        p.u32(0)                          # UNCHECKED
        p.u32(1)                          # set mode
        p.u32(mode)
        for _ in range(3):                # uid, gid, size: leave
            p.u32(0)
        p.u32(0)                          # atime: DONT_CHANGE
        p.u32(0)                          # mtime: DONT_CHANGE
        u = self.call(8, p.bytes())
        self._status(u, f"CREATE {name}")
        if not u.u32():
            return self.lookup(dir_fh, name)
        return u.opaque(64)

    def remove(self, dir_fh: bytes, name: str) -> None:
        p = _Packer()
        p.opaque(dir_fh)
        p.string(name)
        u = self.call(12, p.bytes())
        self._status(u, f"REMOVE {name}")


def probe(host: str, port: int, timeout: float = 2.0) -> None:
    """Raise RPCError unless an NFSv3 server answers NULL at host:port."""
    with NFS3Client(host, port, timeout=timeout) as c:
        c.null()
