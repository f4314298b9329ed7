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
    size = u.u64()
    u.u64()                               # space used
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


# ---------------------------------------------------------------- NFSv4.1
# Enough of RFC 8881 for a client that holds state the way a kernel client
# does: a client id and a session, OPEN/READ/WRITE/CLOSE with stateids,
# and the reclaim of its opens after the server restarted or failed over
# (CLAIM_PREVIOUS during the grace period, then RECLAIM_COMPLETE).

NFS4_OK = 0
NFS4ERR_NOENT = 2
NFS4ERR_STALE = 70
NFS4ERR_STALE_CLIENTID = 10022
NFS4ERR_GRACE = 10013
NFS4ERR_NO_GRACE = 10033
NFS4ERR_BADSESSION = 10052
NFS4ERR_DEADSESSION = 10078
_NAMES4 = {2: "NOENT", 70: "STALE", 10013: "GRACE", 10022: "STALE_CLIENTID",
           10033: "NO_GRACE", 10052: "BADSESSION", 10078: "DEADSESSION", 10008: "DELAY",
           10011: "EXPIRED", 10023: "STALE_STATEID", 10025: "BAD_STATEID", 10036: "BADXDR",
           10045: "RECLAIM_BAD", 10034: "RECLAIM_BAD"}

OP_CLOSE, OP_COMMIT, OP_GETATTR, OP_GETFH, OP_LOOKUP, OP_OPEN = 4, 5, 9, 10, 15, 18
OP_PUTFH, OP_PUTROOTFH, OP_READ, OP_WRITE = 22, 24, 25, 38
OP_EXCHANGE_ID, OP_CREATE_SESSION, OP_DESTROY_SESSION = 42, 43, 44
OP_SEQUENCE, OP_DESTROY_CLIENTID, OP_RECLAIM_COMPLETE = 53, 57, 58
OP_ALLOCATE = 59


class NFS4Error(OSError):
    def __init__(self, status: int, op: int, what: str = ""):
        self.status, self.op = status, op
        super().__init__(f"NFSv4 op {op}{' ' + what if what else ''}: "
                         f"NFS4ERR_{_NAMES4.get(status, status)}")


@dataclass
class Open4:
    fh: bytes
    stateid: bytes            # 16 bytes: seqid + other
    name: str


def _channel_attrs(p: _Packer) -> None:
    for v in (0, 1 << 20, 1 << 20, 8192, 16, 4):   # pad, maxreq, maxresp, cached, ops, reqs
        p.u32(v)
    p.u32(0)                                          # no rdma_ird


def _skip_channel_attrs(u: _Unpacker) -> None:
    for _ in range(6):
        u.u32()
    for _ in range(u.u32()):
        u.u32()


class NFS41Client(RPCClient):
    """One NFSv4.1 client (one client owner) on one server connection."""

    def __init__(self, host: str, port: int = 2049, *, owner: bytes | None = None,
                 minor: int = 1, **kw):
        super().__init__(host, port, NFS_PROGRAM, 4, **kw)
        self.minor = minor                    # 1, or 2 for ALLOCATE (NFSv4.2)
        self.owner = owner or os.urandom(12)
        self.verifier = os.urandom(8)       # a new one = this client rebooted
        self.clientid = 0
        self.sessionid = b""
        self.seq = 0
        self.create_seq = 0

    # ------------------------------------------------------------ framing
    def compound(self, ops: list[tuple[int, bytes]], *, sequence: bool = True):
        """Run ops (opcode, packed args); returns [(opcode, unpacker)] of the
        results, raising NFS4Error at the first op that failed."""
        p = _Packer()
        p.string("replfs")
        p.u32(self.minor)
        body = []
        if sequence:
            self.seq += 1
            s = _Packer()
            s.parts.append(self.sessionid)
            s.u32(self.seq)
            s.u32(0)                          # slot
            s.u32(0)                          # highest slot
            s.u32(0)                          # don't cache
            body.append((OP_SEQUENCE, s.bytes()))
        body += ops
        p.u32(len(body))
        for op, args in body:
            p.u32(op)
            p.parts.append(args)
        u = self.call(1, p.bytes())
        status = u.u32()
        u.opaque(1024)                        # tag
        n = u.u32()
        out = []
        for _ in range(n):
            op = u.u32()
            st = u.u32()
            if st != NFS4_OK:
                raise NFS4Error(st, op)
            if op == OP_SEQUENCE:
                u.fixed(16)
                for _ in range(5):
                    u.u32()
                continue
            out.append((op, u))
            # every result we use is parsed by the caller in order; ops
            # whose results carry data must be last or parsed at once
            self._parse_inline(op, u)
        if status != NFS4_OK:
            raise NFS4Error(status, body[-1][0] if body else 0)
        return out

    def _parse_inline(self, op: int, u: _Unpacker) -> None:
        """Consume the result bodies of the ops callers never look into, so
        the next op's result can be read."""
        if op in (OP_PUTFH, OP_PUTROOTFH, OP_LOOKUP, OP_RECLAIM_COMPLETE,
                  OP_DESTROY_SESSION, OP_DESTROY_CLIENTID, OP_ALLOCATE):
            return
        if op == OP_GETFH:
            self._last_fh = u.opaque(128)
        elif op == OP_OPEN:
            stateid = u.fixed(16)
            u.u32()                           # cinfo.atomic
            u.u64()
            u.u64()
            u.u32()                           # rflags
            for _ in range(u.u32()):          # attrset bitmap
                u.u32()
            dtype = u.u32()
            if dtype == 3:                    # OPEN_DELEGATE_NONE_EXT
                why = u.u32()
                if why in (2, 3):             # WND4_CONTENTION / RESOURCE
                    u.u32()
            elif dtype != 0:
                raise RPCError(f"unexpected delegation type {dtype} (delegations are off)")
            self._last_stateid = stateid
        elif op == OP_WRITE:
            self._last_write = (u.u32(), u.u32(), u.fixed(8))
        elif op == OP_READ:
            eof = bool(u.u32())
            self._last_read = (u.opaque(), eof)
        elif op == OP_CLOSE:
            u.fixed(16)
        elif op == OP_COMMIT:
            self._last_commit = u.fixed(8)
        elif op == OP_GETATTR:
            for _ in range(u.u32()):
                u.u32()
            self._last_attrs = u.opaque()

    # ------------------------------------------------------------ client id, session
    def establish(self, *, reclaim_complete: bool = True) -> None:
        """EXCHANGE_ID + CREATE_SESSION (+ RECLAIM_COMPLETE: nothing to
        reclaim, as a fresh client says)."""
        p = _Packer()
        p.parts.append(self.verifier)
        p.opaque(self.owner)
        p.u32(0)                              # flags
        p.u32(0)                              # SP4_NONE
        p.u32(0)                              # no impl id
        u = self.compound([(OP_EXCHANGE_ID, p.bytes())], sequence=False)[0][1]
        self.clientid = u.u64()
        self.create_seq = u.u32()
        u.u32()                               # flags
        u.u32()                               # spr_how (NONE)
        u.u64()                               # server owner minor id
        u.opaque()                            # major id
        u.opaque()                            # scope
        for _ in range(u.u32()):              # impl ids
            u.opaque()
            u.opaque()
            u.u64()
            u.u32()
        p = _Packer()
        p.u64(self.clientid)
        p.u32(self.create_seq)
        p.u32(0)                              # flags: no persistence, no back channel
        _channel_attrs(p)
        _channel_attrs(p)
        p.u32(0x40000000)                     # callback program (unused)
        p.u32(1)                              # one sec parm: AUTH_NONE
        p.u32(0)
        u = self.compound([(OP_CREATE_SESSION, p.bytes())], sequence=False)[0][1]
        self.sessionid = u.fixed(16)
        u.u32()
        u.u32()
        _skip_channel_attrs(u)
        _skip_channel_attrs(u)
        self.seq = 0
        if reclaim_complete:
            self.reclaim_complete()

    def reclaim_complete(self) -> None:
        p = _Packer()
        p.u32(0)                              # rca_one_fs: false (all of them)
        self.compound([(OP_RECLAIM_COMPLETE, p.bytes())])

    def destroy(self) -> None:
        try:
            self.compound([(OP_DESTROY_SESSION, self.sessionid)], sequence=False)
            p = _Packer()
            p.u64(self.clientid)
            self.compound([(OP_DESTROY_CLIENTID, p.bytes())], sequence=False)
        except (NFS4Error, RPCError):
            pass

    # ------------------------------------------------------------ files
    @staticmethod
    def _name(name: str) -> bytes:
        p = _Packer()
        p.string(name)
        return p.bytes()

    def _path_ops(self, path: str) -> list[tuple[int, bytes]]:
        ops = [(OP_PUTROOTFH, b"")]
        for part in [x for x in path.split("/") if x]:
            ops.append((OP_LOOKUP, self._name(part)))
        return ops

    def _owner(self, p: _Packer) -> None:
        p.u64(self.clientid)
        p.opaque(b"open-owner-" + self.owner)

    def open(self, directory: str, name: str, *, create: bool = False) -> Open4:
        """OPEN (read and write) ``name`` in the directory at ``directory``
        (a path in the server's pseudo filesystem)."""
        p = _Packer()
        p.u32(0)                              # seqid (unused in 4.1)
        p.u32(3)                              # share access both
        p.u32(0)                              # deny none
        self._owner(p)
        if create:
            p.u32(1)                          # OPEN4_CREATE
            p.u32(0)                          # UNCHECKED4
            p.u32(2)                          # fattr4: bitmap of 2 words
            p.u32(0)
            p.u32(1 << (33 - 32))             # FATTR4_MODE (33)
            mode = _Packer()
            mode.u32(0o644)
            p.opaque(mode.bytes())
        else:
            p.u32(0)                          # OPEN4_NOCREATE
        p.u32(0)                              # CLAIM_NULL
        p.string(name)
        self.compound(self._path_ops(directory) + [(OP_OPEN, p.bytes()), (OP_GETFH, b"")])
        return Open4(self._last_fh, self._last_stateid, name)

    def lookup(self, path: str) -> bytes:
        """The file handle of ``path`` in the server's pseudo filesystem
        (PUTROOTFH, LOOKUP..., GETFH: no state, allowed in grace)."""
        self.compound(self._path_ops(path) + [(OP_GETFH, b"")])
        return self._last_fh

    @staticmethod
    def stateless(fh: bytes, name: str = "") -> Open4:
        """A handle with the anonymous stateid (all zeros): READ and GETATTR
        without an OPEN, as a client does with a handle it kept."""
        return Open4(fh, bytes(16), name)

    def reclaim(self, fh: bytes, name: str = "") -> Open4:
        """OPEN with CLAIM_PREVIOUS: take back an open the old server granted."""
        p = _Packer()
        p.u32(0)
        p.u32(3)
        p.u32(0)
        self._owner(p)
        p.u32(0)                              # NOCREATE
        p.u32(1)                              # CLAIM_PREVIOUS
        p.u32(0)                              # delegate type: none
        putfh = _Packer()
        putfh.opaque(fh)
        self.compound([(OP_PUTFH, putfh.bytes()), (OP_OPEN, p.bytes()), (OP_GETFH, b"")])
        return Open4(self._last_fh, self._last_stateid, name)

    def _on(self, fh: bytes, op: int, args: bytes = b"") -> None:
        """One operation on one file: PUTFH, then ``op``."""
        putfh = _Packer()
        putfh.opaque(fh)
        self.compound([(OP_PUTFH, putfh.bytes()), (op, args)])

    def write(self, f: Open4, offset: int, data: bytes, stable: int = FILE_SYNC):
        p = _Packer()
        p.parts.append(f.stateid)
        p.u64(offset)
        p.u32(stable)
        p.opaque(data)
        self._on(f.fh, OP_WRITE, p.bytes())
        return self._last_write

    def read(self, f: Open4, offset: int, count: int) -> tuple[bytes, bool]:
        p = _Packer()
        p.parts.append(f.stateid)
        p.u64(offset)
        p.u32(count)
        self._on(f.fh, OP_READ, p.bytes())
        return self._last_read

    def allocate(self, f: Open4, offset: int, length: int) -> None:
        """NFSv4.2 ALLOCATE (posix_fallocate on the server's file); needs a
        client made with minor=2."""
        p = _Packer()
        p.parts.append(f.stateid)
        p.u64(offset)
        p.u64(length)
        self._on(f.fh, OP_ALLOCATE, p.bytes())

    def getattr_size(self, f: Open4) -> int:
        """The file's size attribute (FATTR4_SIZE)."""
        p = _Packer()
        p.u32(1)
        p.u32(1 << 4)                         # FATTR4_SIZE (4)
        self._on(f.fh, OP_GETATTR, p.bytes())
        return struct.unpack(">Q", self._last_attrs[:8])[0]

    def close_file(self, f: Open4) -> None:
        p = _Packer()
        p.u32(0)
        p.parts.append(f.stateid)
        self._on(f.fh, OP_CLOSE, p.bytes())
