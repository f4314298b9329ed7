"""The kernel FUSE wire protocol, pinned at 7.36: structs, decoding, reply builders.

Pure code (no trio, os or sockets): bytes from /dev/fuse in, frozen request
records out; reply and notify messages are built as bytes.  The session
driver (``session.py``) does all the I/O.

Why 7.36: it is the newest minor whose request and reply layouts we need
and can test everywhere we deploy (FUSE_INIT_EXT/flags2 exists, nothing we
use changes after it).  We answer INIT with ``min(kernel minor, 36)`` so a
newer kernel talks 7.36 to us and adapts its struct sizes accordingly, and
we refuse kernels older than 7.31 (Linux 5.4): below that, setattr's
KILL_SUIDGID and the write flags we rely on do not exist.

Layouts and constants are facts of ``linux/fuse.h``; all integers use the
host's byte order (the kernel writes native structs).  Two error classes,
as in h11: ``KernelProtocolError`` when the kernel's bytes are malformed,
``FuseUsageError`` when we asked for something the protocol cannot say.
"""
from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import Callable

# --------------------------------------------------------------------- version

KERNEL_MAJOR = 7
OUR_MINOR = 36          # the highest minor we speak
MIN_MINOR = 31          # the oldest kernel minor we accept (Linux 5.4)
ROOT_ID = 1
MIN_READ_BUFFER = 8192  # the kernel refuses reads into smaller buffers

OFFSET_MAX = 0x7FFFFFFFFFFFFFFF   # "to end of file" in lock ranges


class KernelProtocolError(Exception):
    """The kernel sent bytes we cannot parse (or an unsupported version)."""


class UnsupportedKernel(KernelProtocolError):
    """The kernel's protocol is older than the oldest minor we accept."""


class FuseUsageError(Exception):
    """We tried to build a message the protocol cannot express."""


# --------------------------------------------------------------------- opcodes

class Opcode(enum.IntEnum):
    LOOKUP = 1
    FORGET = 2
    GETATTR = 3
    SETATTR = 4
    READLINK = 5
    SYMLINK = 6
    MKNOD = 8
    MKDIR = 9
    UNLINK = 10
    RMDIR = 11
    RENAME = 12
    LINK = 13
    OPEN = 14
    READ = 15
    WRITE = 16
    STATFS = 17
    RELEASE = 18
    FSYNC = 20
    SETXATTR = 21
    GETXATTR = 22
    LISTXATTR = 23
    REMOVEXATTR = 24
    FLUSH = 25
    INIT = 26
    OPENDIR = 27
    READDIR = 28
    RELEASEDIR = 29
    FSYNCDIR = 30
    GETLK = 31
    SETLK = 32
    SETLKW = 33
    ACCESS = 34
    CREATE = 35
    INTERRUPT = 36
    BMAP = 37
    DESTROY = 38
    IOCTL = 39
    POLL = 40
    NOTIFY_REPLY = 41
    BATCH_FORGET = 42
    FALLOCATE = 43
    READDIRPLUS = 44
    RENAME2 = 45
    LSEEK = 46
    COPY_FILE_RANGE = 47
    SETUPMAPPING = 48
    REMOVEMAPPING = 49
    SYNCFS = 50
    TMPFILE = 51


class NotifyCode(enum.IntEnum):
    POLL = 1
    INVAL_INODE = 2
    INVAL_ENTRY = 3
    STORE = 4
    RETRIEVE = 5
    DELETE = 6


# --------------------------------------------------------------------- flags

# INIT flags (fuse_init_in.flags / fuse_init_out.flags)
ASYNC_READ = 1 << 0
POSIX_LOCKS = 1 << 1
FILE_OPS = 1 << 2
ATOMIC_O_TRUNC = 1 << 3
EXPORT_SUPPORT = 1 << 4
BIG_WRITES = 1 << 5
DONT_MASK = 1 << 6
SPLICE_WRITE = 1 << 7
SPLICE_MOVE = 1 << 8
SPLICE_READ = 1 << 9
FLOCK_LOCKS = 1 << 10
HAS_IOCTL_DIR = 1 << 11
AUTO_INVAL_DATA = 1 << 12
DO_READDIRPLUS = 1 << 13
READDIRPLUS_AUTO = 1 << 14
ASYNC_DIO = 1 << 15
WRITEBACK_CACHE = 1 << 16
NO_OPEN_SUPPORT = 1 << 17
PARALLEL_DIROPS = 1 << 18
HANDLE_KILLPRIV = 1 << 19
POSIX_ACL = 1 << 20
ABORT_ERROR = 1 << 21
MAX_PAGES = 1 << 22
CACHE_SYMLINKS = 1 << 23
NO_OPENDIR_SUPPORT = 1 << 24
EXPLICIT_INVAL_DATA = 1 << 25
MAP_ALIGNMENT = 1 << 26
SUBMOUNTS = 1 << 27
HANDLE_KILLPRIV_V2 = 1 << 28
SETXATTR_EXT = 1 << 29
INIT_EXT = 1 << 30

INIT_FLAG_NAMES = {v: k for k, v in dict(
    ASYNC_READ=ASYNC_READ, POSIX_LOCKS=POSIX_LOCKS, FILE_OPS=FILE_OPS,
    ATOMIC_O_TRUNC=ATOMIC_O_TRUNC, EXPORT_SUPPORT=EXPORT_SUPPORT, BIG_WRITES=BIG_WRITES,
    DONT_MASK=DONT_MASK, SPLICE_WRITE=SPLICE_WRITE, SPLICE_MOVE=SPLICE_MOVE,
    SPLICE_READ=SPLICE_READ, FLOCK_LOCKS=FLOCK_LOCKS, HAS_IOCTL_DIR=HAS_IOCTL_DIR,
    AUTO_INVAL_DATA=AUTO_INVAL_DATA, DO_READDIRPLUS=DO_READDIRPLUS,
    READDIRPLUS_AUTO=READDIRPLUS_AUTO, ASYNC_DIO=ASYNC_DIO, WRITEBACK_CACHE=WRITEBACK_CACHE,
    NO_OPEN_SUPPORT=NO_OPEN_SUPPORT, PARALLEL_DIROPS=PARALLEL_DIROPS,
    HANDLE_KILLPRIV=HANDLE_KILLPRIV, POSIX_ACL=POSIX_ACL, ABORT_ERROR=ABORT_ERROR,
    MAX_PAGES=MAX_PAGES, CACHE_SYMLINKS=CACHE_SYMLINKS, NO_OPENDIR_SUPPORT=NO_OPENDIR_SUPPORT,
    EXPLICIT_INVAL_DATA=EXPLICIT_INVAL_DATA, MAP_ALIGNMENT=MAP_ALIGNMENT, SUBMOUNTS=SUBMOUNTS,
    HANDLE_KILLPRIV_V2=HANDLE_KILLPRIV_V2, SETXATTR_EXT=SETXATTR_EXT, INIT_EXT=INIT_EXT,
).items()}

# setattr valid bits
FATTR_MODE = 1 << 0
FATTR_UID = 1 << 1
FATTR_GID = 1 << 2
FATTR_SIZE = 1 << 3
FATTR_ATIME = 1 << 4
FATTR_MTIME = 1 << 5
FATTR_FH = 1 << 6
FATTR_ATIME_NOW = 1 << 7
FATTR_MTIME_NOW = 1 << 8
FATTR_LOCKOWNER = 1 << 9
FATTR_CTIME = 1 << 10
FATTR_KILL_SUIDGID = 1 << 11

# open_out.open_flags
FOPEN_DIRECT_IO = 1 << 0
FOPEN_KEEP_CACHE = 1 << 1
FOPEN_NONSEEKABLE = 1 << 2
FOPEN_CACHE_DIR = 1 << 3
FOPEN_STREAM = 1 << 4
FOPEN_NOFLUSH = 1 << 5

RELEASE_FLUSH = 1 << 0
RELEASE_FLOCK_UNLOCK = 1 << 1
GETATTR_FH = 1 << 0
LK_FLOCK = 1 << 0
WRITE_CACHE = 1 << 0
WRITE_LOCKOWNER = 1 << 1
WRITE_KILL_SUIDGID = 1 << 2
READ_LOCKOWNER = 1 << 1
FSYNC_FDATASYNC = 1 << 0
OPEN_KILL_SUIDGID = 1 << 0

# --------------------------------------------------------------------- structs
# '=' is native byte order with standard sizes and no implicit alignment:
# every pad field of the C structs is spelled out, so sizes match exactly.

IN_HEADER = struct.Struct("=IIQQIIIHH")          # fuse_in_header, 40
OUT_HEADER = struct.Struct("=IiQ")               # fuse_out_header, 16
ATTR = struct.Struct("=QQQqqqIIIIIIIIII")         # fuse_attr, 88 (times are s64 in the kernel)
KSTATFS = struct.Struct("=QQQQQIIII24x")          # fuse_kstatfs, 80
FILE_LOCK = struct.Struct("=QQII")                # fuse_file_lock, 24
ENTRY_OUT_HEAD = struct.Struct("=QQQQII")        # fuse_entry_out minus attr, 40
ENTRY_OUT_SIZE = ENTRY_OUT_HEAD.size + ATTR.size  # 128
ATTR_OUT_HEAD = struct.Struct("=QII")             # fuse_attr_out minus attr, 16
ATTR_OUT_SIZE = ATTR_OUT_HEAD.size + ATTR.size    # 104
FORGET_IN = struct.Struct("=Q")
FORGET_ONE = struct.Struct("=QQ")
BATCH_FORGET_IN = struct.Struct("=II")
GETATTR_IN = struct.Struct("=IIQ")
MKNOD_IN = struct.Struct("=IIII")
MKDIR_IN = struct.Struct("=II")
RENAME_IN = struct.Struct("=Q")
RENAME2_IN = struct.Struct("=QII")
LINK_IN = struct.Struct("=Q")
SETATTR_IN = struct.Struct("=IIQQQqqqIIIIIIII")   # 88; times signed (before 1970)
OPEN_IN = struct.Struct("=II")
CREATE_IN = struct.Struct("=IIII")
OPEN_OUT = struct.Struct("=QII")
RELEASE_IN = struct.Struct("=QIIQ")
FLUSH_IN = struct.Struct("=QIIQ")
READ_IN = struct.Struct("=QQIIQII")               # 40
WRITE_IN = struct.Struct("=QQIIQII")              # 40
WRITE_OUT = struct.Struct("=II")
STATFS_OUT = KSTATFS
FSYNC_IN = struct.Struct("=QII")
SETXATTR_IN_COMPAT = struct.Struct("=II")         # without FUSE_SETXATTR_EXT
SETXATTR_IN = struct.Struct("=IIII")              # with it (not negotiated)
GETXATTR_IN = struct.Struct("=II")
GETXATTR_OUT = struct.Struct("=II")
LK_IN = struct.Struct("=QQQQIIII")                # 48
LK_OUT = FILE_LOCK
ACCESS_IN = struct.Struct("=II")
INIT_IN_COMPAT = struct.Struct("=IIII")           # before 7.36: 16 bytes
INIT_IN = struct.Struct("=IIIII44x")              # 7.36+: 64 bytes
INIT_OUT = struct.Struct("=IIIIHHIIHHI28x")       # 64
INTERRUPT_IN = struct.Struct("=Q")
FALLOCATE_IN = struct.Struct("=QQQII")
LSEEK_IN = struct.Struct("=QQII")
LSEEK_OUT = struct.Struct("=Q")
COPY_FILE_RANGE_IN = struct.Struct("=QQQQQQQ")   # 56
DIRENT_HEAD = struct.Struct("=QQII")              # fuse_dirent minus name, 24
NOTIFY_INVAL_INODE = struct.Struct("=Qqq")
NOTIFY_INVAL_ENTRY = struct.Struct("=QII")
NOTIFY_DELETE = struct.Struct("=QQII")

STRUCT_SIZES = {
    # name in linux/fuse.h -> our size; the unit test compares with gcc's sizeof
    "fuse_in_header": IN_HEADER.size, "fuse_out_header": OUT_HEADER.size,
    "fuse_attr": ATTR.size, "fuse_kstatfs": KSTATFS.size, "fuse_file_lock": FILE_LOCK.size,
    "fuse_entry_out": ENTRY_OUT_SIZE, "fuse_attr_out": ATTR_OUT_SIZE,
    "fuse_forget_in": FORGET_IN.size, "fuse_forget_one": FORGET_ONE.size,
    "fuse_batch_forget_in": BATCH_FORGET_IN.size, "fuse_getattr_in": GETATTR_IN.size,
    "fuse_mknod_in": MKNOD_IN.size, "fuse_mkdir_in": MKDIR_IN.size,
    "fuse_rename_in": RENAME_IN.size, "fuse_rename2_in": RENAME2_IN.size,
    "fuse_link_in": LINK_IN.size, "fuse_setattr_in": SETATTR_IN.size,
    "fuse_open_in": OPEN_IN.size, "fuse_create_in": CREATE_IN.size,
    "fuse_open_out": OPEN_OUT.size, "fuse_release_in": RELEASE_IN.size,
    "fuse_flush_in": FLUSH_IN.size, "fuse_read_in": READ_IN.size,
    "fuse_write_in": WRITE_IN.size, "fuse_write_out": WRITE_OUT.size,
    "fuse_statfs_out": STATFS_OUT.size, "fuse_fsync_in": FSYNC_IN.size,
    "fuse_setxattr_in": SETXATTR_IN.size, "fuse_getxattr_in": GETXATTR_IN.size,
    "fuse_getxattr_out": GETXATTR_OUT.size, "fuse_lk_in": LK_IN.size,
    "fuse_lk_out": LK_OUT.size, "fuse_access_in": ACCESS_IN.size,
    "fuse_init_in": INIT_IN.size, "fuse_init_out": INIT_OUT.size,
    "fuse_interrupt_in": INTERRUPT_IN.size, "fuse_fallocate_in": FALLOCATE_IN.size,
    "fuse_lseek_in": LSEEK_IN.size, "fuse_lseek_out": LSEEK_OUT.size,
    "fuse_copy_file_range_in": COPY_FILE_RANGE_IN.size, "fuse_dirent": DIRENT_HEAD.size,
    "fuse_notify_inval_inode_out": NOTIFY_INVAL_INODE.size,
    "fuse_notify_inval_entry_out": NOTIFY_INVAL_ENTRY.size,
    "fuse_notify_delete_out": NOTIFY_DELETE.size,
}
# Sizes the C header states as macros (compat sizes of older minors).
COMPAT_SIZES = {"FUSE_COMPAT_SETXATTR_IN_SIZE": SETXATTR_IN_COMPAT.size,
                "FUSE_COMPAT_ENTRY_OUT_SIZE": 120, "FUSE_COMPAT_ATTR_OUT_SIZE": 96}


def align8(n: int) -> int:
    return (n + 7) & ~7


# --------------------------------------------------------------------- requests

@dataclass(frozen=True, slots=True)
class InHeader:
    length: int
    opcode: int
    unique: int
    nodeid: int
    uid: int
    gid: int
    pid: int
    total_extlen: int


def decode_header(buf, n: int | None = None) -> InHeader:
    """Parse the header of one request read from /dev/fuse (``n`` bytes)."""
    n = len(buf) if n is None else n
    if n < IN_HEADER.size:
        raise KernelProtocolError(f"request of {n} bytes is shorter than its header")
    h = InHeader(*IN_HEADER.unpack_from(buf)[:8])
    if h.length != n:
        raise KernelProtocolError(
            f"request {h.unique} (opcode {h.opcode}) says {h.length} bytes, read {n}")
    return h


def _cstr(body, pos: int, what: str) -> tuple[bytes, int]:
    """One NUL-terminated string at ``pos``: (string, position after the NUL)."""
    if not isinstance(body, bytes):
        body = bytes(body)      # a memoryview of the read buffer: names are short
    end = body.find(b"\0", pos)
    if end < 0:
        raise KernelProtocolError(f"{what}: string not NUL-terminated")
    return body[pos:end], end + 1


def _fixed(st: struct.Struct, body, what: str) -> tuple:
    if len(body) < st.size:
        raise KernelProtocolError(f"{what}: {len(body)} bytes, need {st.size}")
    return st.unpack_from(body)


@dataclass(frozen=True, slots=True)
class Name:
    name: bytes


@dataclass(frozen=True, slots=True)
class Forget:
    nlookup: int


@dataclass(frozen=True, slots=True)
class BatchForget:
    items: tuple[tuple[int, int], ...]      # (nodeid, nlookup)


@dataclass(frozen=True, slots=True)
class Getattr:
    flags: int
    fh: int

    @property
    def has_fh(self) -> bool:
        return bool(self.flags & GETATTR_FH)


@dataclass(frozen=True, slots=True)
class Setattr:
    valid: int
    fh: int
    size: int
    lock_owner: int
    atime: int
    mtime: int
    ctime: int
    atimensec: int
    mtimensec: int
    ctimensec: int
    mode: int
    uid: int
    gid: int


@dataclass(frozen=True, slots=True)
class Symlink:
    name: bytes
    target: bytes


@dataclass(frozen=True, slots=True)
class Mknod:
    mode: int
    rdev: int
    umask: int
    name: bytes


@dataclass(frozen=True, slots=True)
class Mkdir:
    mode: int
    umask: int
    name: bytes


@dataclass(frozen=True, slots=True)
class Rename:
    newdir: int
    flags: int
    old: bytes
    new: bytes


@dataclass(frozen=True, slots=True)
class Link:
    oldnodeid: int
    newname: bytes


@dataclass(frozen=True, slots=True)
class Open:
    flags: int
    open_flags: int


@dataclass(frozen=True, slots=True)
class Create:
    flags: int
    mode: int
    umask: int
    open_flags: int
    name: bytes


@dataclass(frozen=True, slots=True)
class Read:
    fh: int
    offset: int
    size: int
    read_flags: int
    lock_owner: int
    flags: int


@dataclass(frozen=True, slots=True)
class Write:
    fh: int
    offset: int
    size: int
    write_flags: int
    lock_owner: int
    flags: int
    data: bytes | memoryview      # a view of a task's own request body


@dataclass(frozen=True, slots=True)
class Release:
    fh: int
    flags: int
    release_flags: int
    lock_owner: int


@dataclass(frozen=True, slots=True)
class Flush:
    fh: int
    lock_owner: int


@dataclass(frozen=True, slots=True)
class Fsync:
    fh: int
    fsync_flags: int

    @property
    def datasync(self) -> bool:
        return bool(self.fsync_flags & FSYNC_FDATASYNC)


@dataclass(frozen=True, slots=True)
class Setxattr:
    flags: int
    name: bytes
    value: bytes


@dataclass(frozen=True, slots=True)
class Getxattr:
    size: int
    name: bytes


@dataclass(frozen=True, slots=True)
class Listxattr:
    size: int


@dataclass(frozen=True, slots=True)
class Init:
    major: int
    minor: int
    max_readahead: int
    flags: int
    flags2: int


@dataclass(frozen=True, slots=True)
class Lk:
    fh: int
    owner: int
    start: int
    end: int
    type: int
    pid: int
    lk_flags: int

    @property
    def is_flock(self) -> bool:
        return bool(self.lk_flags & LK_FLOCK)


@dataclass(frozen=True, slots=True)
class Access:
    mask: int


@dataclass(frozen=True, slots=True)
class Interrupt:
    unique: int


@dataclass(frozen=True, slots=True)
class Fallocate:
    fh: int
    offset: int
    length: int
    mode: int


@dataclass(frozen=True, slots=True)
class Lseek:
    fh: int
    offset: int
    whence: int


@dataclass(frozen=True, slots=True)
class CopyFileRange:
    fh_in: int
    off_in: int
    nodeid_out: int
    fh_out: int
    off_out: int
    length: int
    flags: int


@dataclass(frozen=True, slots=True)
class Empty:
    pass


_EMPTY = Empty()


def _d_name(body):
    return Name(_cstr(body, 0, "name")[0])


def _d_two_names(body, pos: int, what: str) -> tuple[bytes, bytes]:
    a, pos = _cstr(body, pos, what)
    b, _ = _cstr(body, pos, what)
    return a, b


def _d_forget(body):
    return Forget(*_fixed(FORGET_IN, body, "forget"))


def _d_batch_forget(body):
    count, _ = _fixed(BATCH_FORGET_IN, body, "batch_forget")
    need = BATCH_FORGET_IN.size + count * FORGET_ONE.size
    if len(body) < need:
        raise KernelProtocolError(f"batch_forget: {count} entries need {need} bytes, got {len(body)}")
    items = tuple(FORGET_ONE.unpack_from(body, BATCH_FORGET_IN.size + i * FORGET_ONE.size)
                  for i in range(count))
    return BatchForget(items)


def _d_getattr(body):
    flags, _, fh = _fixed(GETATTR_IN, body, "getattr")
    return Getattr(flags, fh)


def _d_setattr(body):
    (valid, _, fh, size, lock_owner, atime, mtime, ctime, atimensec, mtimensec, ctimensec,
     mode, _u4, uid, gid, _u5) = _fixed(SETATTR_IN, body, "setattr")
    return Setattr(valid, fh, size, lock_owner, atime, mtime, ctime, atimensec, mtimensec,
                   ctimensec, mode, uid, gid)


def _d_symlink(body):
    # The kernel sends the new name first, then the link target.
    return Symlink(*_d_two_names(body, 0, "symlink"))


def _d_mknod(body):
    mode, rdev, umask, _ = _fixed(MKNOD_IN, body, "mknod")
    return Mknod(mode, rdev, umask, _cstr(body, MKNOD_IN.size, "mknod")[0])


def _d_mkdir(body):
    mode, umask = _fixed(MKDIR_IN, body, "mkdir")
    return Mkdir(mode, umask, _cstr(body, MKDIR_IN.size, "mkdir")[0])


def _d_rename(body):
    (newdir,) = _fixed(RENAME_IN, body, "rename")
    return Rename(newdir, 0, *_d_two_names(body, RENAME_IN.size, "rename"))


def _d_rename2(body):
    newdir, flags, _ = _fixed(RENAME2_IN, body, "rename2")
    return Rename(newdir, flags, *_d_two_names(body, RENAME2_IN.size, "rename2"))


def _d_link(body):
    (old,) = _fixed(LINK_IN, body, "link")
    return Link(old, _cstr(body, LINK_IN.size, "link")[0])


def _d_open(body):
    return Open(*_fixed(OPEN_IN, body, "open"))


def _d_create(body):
    flags, mode, umask, open_flags = _fixed(CREATE_IN, body, "create")
    return Create(flags, mode, umask, open_flags, _cstr(body, CREATE_IN.size, "create")[0])


def _d_read(body):
    fh, off, size, read_flags, lock_owner, flags, _ = _fixed(READ_IN, body, "read")
    return Read(fh, off, size, read_flags, lock_owner, flags)


def _d_write(body):
    fh, off, size, write_flags, lock_owner, flags, _ = _fixed(WRITE_IN, body, "write")
    if isinstance(body, bytes):
        # a request body of its own (a task's): its data is a view of it,
        # not a copy -- a MiB copy costs about 250 us here
        data = memoryview(body)[WRITE_IN.size:WRITE_IN.size + size]
    else:
        # a view of the reader's buffer, which the next request overwrites
        data = bytes(body[WRITE_IN.size:WRITE_IN.size + size])
    if len(data) != size:
        raise KernelProtocolError(f"write: header says {size} bytes of data, got {len(data)}")
    return Write(fh, off, size, write_flags, lock_owner, flags, data)


def _d_release(body):
    return Release(*_fixed(RELEASE_IN, body, "release"))


def _d_flush(body):
    fh, _, _, lock_owner = _fixed(FLUSH_IN, body, "flush")
    return Flush(fh, lock_owner)


def _d_fsync(body):
    fh, flags, _ = _fixed(FSYNC_IN, body, "fsync")
    return Fsync(fh, flags)


def _d_setxattr(body):
    # Without FUSE_SETXATTR_EXT (we never ask for it) the header is 8 bytes.
    size, flags = _fixed(SETXATTR_IN_COMPAT, body, "setxattr")
    name, pos = _cstr(body, SETXATTR_IN_COMPAT.size, "setxattr")
    value = bytes(body[pos:pos + size])
    if len(value) != size:
        raise KernelProtocolError(f"setxattr: value of {size} bytes, got {len(value)}")
    return Setxattr(flags, name, value)


def _d_getxattr(body):
    size, _ = _fixed(GETXATTR_IN, body, "getxattr")
    return Getxattr(size, _cstr(body, GETXATTR_IN.size, "getxattr")[0])


def _d_listxattr(body):
    size, _ = _fixed(GETXATTR_IN, body, "listxattr")
    return Listxattr(size)


def _d_init(body):
    if len(body) >= INIT_IN.size:
        return Init(*INIT_IN.unpack_from(body))
    major, minor, ra, flags = _fixed(INIT_IN_COMPAT, body, "init")
    return Init(major, minor, ra, flags, 0)


def _d_lk(body):
    fh, owner, start, end, typ, pid, lk_flags, _ = _fixed(LK_IN, body, "lk")
    return Lk(fh, owner, start, end, typ, pid, lk_flags)


def _d_access(body):
    return Access(_fixed(ACCESS_IN, body, "access")[0])


def _d_interrupt(body):
    return Interrupt(_fixed(INTERRUPT_IN, body, "interrupt")[0])


def _d_fallocate(body):
    fh, off, length, mode, _ = _fixed(FALLOCATE_IN, body, "fallocate")
    return Fallocate(fh, off, length, mode)


def _d_lseek(body):
    fh, off, whence, _ = _fixed(LSEEK_IN, body, "lseek")
    return Lseek(fh, off, whence)


def _d_copy_file_range(body):
    return CopyFileRange(*_fixed(COPY_FILE_RANGE_IN, body, "copy_file_range"))


def _d_empty(body):
    return _EMPTY


DECODERS: dict[int, Callable] = {
    Opcode.LOOKUP: _d_name, Opcode.FORGET: _d_forget, Opcode.GETATTR: _d_getattr,
    Opcode.SETATTR: _d_setattr, Opcode.READLINK: _d_empty, Opcode.SYMLINK: _d_symlink,
    Opcode.MKNOD: _d_mknod, Opcode.MKDIR: _d_mkdir, Opcode.UNLINK: _d_name,
    Opcode.RMDIR: _d_name, Opcode.RENAME: _d_rename, Opcode.LINK: _d_link,
    Opcode.OPEN: _d_open, Opcode.READ: _d_read, Opcode.WRITE: _d_write,
    Opcode.STATFS: _d_empty, Opcode.RELEASE: _d_release, Opcode.FSYNC: _d_fsync,
    Opcode.SETXATTR: _d_setxattr, Opcode.GETXATTR: _d_getxattr,
    Opcode.LISTXATTR: _d_listxattr, Opcode.REMOVEXATTR: _d_name, Opcode.FLUSH: _d_flush,
    Opcode.INIT: _d_init, Opcode.OPENDIR: _d_open, Opcode.READDIR: _d_read,
    Opcode.RELEASEDIR: _d_release, Opcode.FSYNCDIR: _d_fsync, Opcode.GETLK: _d_lk,
    Opcode.SETLK: _d_lk, Opcode.SETLKW: _d_lk, Opcode.ACCESS: _d_access,
    Opcode.CREATE: _d_create, Opcode.INTERRUPT: _d_interrupt, Opcode.DESTROY: _d_empty,
    Opcode.BATCH_FORGET: _d_batch_forget, Opcode.FALLOCATE: _d_fallocate,
    Opcode.READDIRPLUS: _d_read, Opcode.RENAME2: _d_rename2, Opcode.LSEEK: _d_lseek,
    Opcode.COPY_FILE_RANGE: _d_copy_file_range, Opcode.SYNCFS: _d_empty,
}


def body_of(buf, header: InHeader):
    """The request's argument bytes: after the header, before any extensions."""
    end = header.length - header.total_extlen * 8
    if end < IN_HEADER.size:
        raise KernelProtocolError(f"request {header.unique}: extensions longer than the request")
    return buf[IN_HEADER.size:end]


def decode_args(opcode: int, body):
    """Decode a request body; ``None`` for opcodes we do not know (ENOSYS)."""
    dec = DECODERS.get(opcode)
    if dec is None:
        return None
    try:
        return dec(body)
    except struct.error as exc:     # defensive: _fixed checks lengths first
        raise KernelProtocolError(f"opcode {opcode}: {exc}") from None


# --------------------------------------------------------------------- INIT

@dataclass(frozen=True, slots=True)
class Negotiated:
    minor: int
    flags: int              # what we answered (a subset of what the kernel offered)
    max_write: int
    max_readahead: int
    max_background: int
    congestion_threshold: int
    max_pages: int
    time_gran: int
    kernel_minor: int
    kernel_flags: int

    def has(self, flag: int) -> bool:
        return bool(self.flags & flag)


PAGE_SIZE = 4096


def negotiate(init: Init, *, want: int, max_write: int = 1 << 20, max_readahead: int = 1 << 20,
              max_background: int = 64, congestion_threshold: int | None = None,
              time_gran: int = 1) -> Negotiated:
    """Decide the INIT answer; refuse kernels older than 7.MIN_MINOR.

    ``want`` is the set of INIT flags the filesystem would like; we answer
    the intersection with what the kernel offers.
    """
    if init.major != KERNEL_MAJOR:
        raise UnsupportedKernel(
            f"kernel speaks FUSE protocol {init.major}.{init.minor}; replfs speaks "
            f"{KERNEL_MAJOR}.{MIN_MINOR} to {KERNEL_MAJOR}.{OUR_MINOR}")
    if init.minor < MIN_MINOR:
        raise UnsupportedKernel(
            f"kernel FUSE protocol 7.{init.minor} is too old: replfs needs 7.{MIN_MINOR} "
            f"or newer (Linux 5.4 or later)")
    if max_write < PAGE_SIZE or max_write % PAGE_SIZE:
        raise FuseUsageError(f"max_write {max_write} is not a positive multiple of {PAGE_SIZE}")
    if not 1 <= max_background <= 0xFFFF:
        raise FuseUsageError(f"max_background {max_background} out of range")
    minor = min(init.minor, OUR_MINOR)
    flags = init.flags & want & 0xFFFFFFFF
    max_pages = max_write // PAGE_SIZE
    if max_pages > 256 or not flags & MAX_PAGES:
        # Without MAX_PAGES the kernel caps a request at 32 pages.
        max_pages = min(max_pages, 256 if flags & MAX_PAGES else 32)
        max_write = max_pages * PAGE_SIZE
    if congestion_threshold is None:
        congestion_threshold = max(1, max_background * 3 // 4)
    return Negotiated(minor=minor, flags=flags, max_write=max_write,
                      max_readahead=min(max_readahead, init.max_readahead),
                      max_background=max_background,
                      congestion_threshold=min(congestion_threshold, max_background),
                      max_pages=max_pages, time_gran=time_gran, kernel_minor=init.minor,
                      kernel_flags=init.flags)


def init_out(n: Negotiated) -> bytes:
    return INIT_OUT.pack(KERNEL_MAJOR, n.minor, n.max_readahead, n.flags, n.max_background,
                         n.congestion_threshold, n.max_write, n.time_gran,
                         n.max_pages if n.flags & MAX_PAGES else 0, 0, 0)


def flag_names(flags: int) -> str:
    return "|".join(INIT_FLAG_NAMES.get(1 << i, f"bit{i}") for i in range(32)
                    if flags & (1 << i)) or "0"


# --------------------------------------------------------------------- replies

_U64 = (1 << 64) - 1
_U32 = (1 << 32) - 1


def out_header(unique: int, error: int, payload_len: int) -> bytes:
    """The 16-byte reply header.  ``error`` is 0 or a positive errno."""
    if error < 0 or error >= 4096:
        raise FuseUsageError(f"errno {error} out of range")
    if error and payload_len:
        raise FuseUsageError("an error reply carries no payload")
    return OUT_HEADER.pack(OUT_HEADER.size + payload_len, -error, unique)


def split_time(seconds: float) -> tuple[int, int]:
    """A cache timeout in seconds as (sec, nsec); negative means 0."""
    if seconds <= 0:
        return 0, 0
    s = int(seconds)
    return s, min(999_999_999, int(round((seconds - s) * 1e9)))


def _ns(t_ns: int) -> tuple[int, int]:
    # floor division: -0.5 s is (-1 s, 500,000,000 ns), as the kernel stores it
    return divmod(int(t_ns), 1_000_000_000)


# Whole replies packed by one Struct each: the per-entry cost of a
# READDIRPLUS reply is dominated by Python calls, not by bytes.
_ENTRY_FULL = struct.Struct("=" + ENTRY_OUT_HEAD.format.lstrip("=") + ATTR.format.lstrip("="))
_ATTR_OUT_FULL = struct.Struct("=" + ATTR_OUT_HEAD.format.lstrip("=") + ATTR.format.lstrip("="))
_DIRENTPLUS_FULL = struct.Struct(_ENTRY_FULL.format + DIRENT_HEAD.format.lstrip("="))


def _attr_fields(a) -> tuple:
    at, atn = _ns(a.st_atime_ns)
    mt, mtn = _ns(a.st_mtime_ns)
    ct, ctn = _ns(a.st_ctime_ns)
    return (a.st_ino, a.st_size, a.st_blocks, at, mt, ct, atn, mtn, ctn, a.st_mode, a.st_nlink,
            a.st_uid & _U32, a.st_gid & _U32, a.st_rdev & _U32, a.st_blksize, 0)


def pack_attr(a) -> bytes:
    """fuse_attr from any object with pyfuse3-style ``st_*`` fields."""
    try:
        return ATTR.pack(*_attr_fields(a))
    except struct.error as exc:
        raise FuseUsageError(f"attributes of inode {a.st_ino!r} do not fit: {exc}") from None


def _entry_fields(a) -> tuple:
    es, en = split_time(a.entry_timeout)
    as_, an = split_time(a.attr_timeout)
    return (a.st_ino, a.generation, es, as_, en, an) + _attr_fields(a)


def entry_out(a) -> bytes:
    """fuse_entry_out: nodeid, generation, timeouts, attributes."""
    try:
        return _ENTRY_FULL.pack(*_entry_fields(a))
    except struct.error as exc:
        raise FuseUsageError(f"entry of inode {a.st_ino!r} does not fit: {exc}") from None


def attr_out(a, timeout: float | None = None) -> bytes:
    s, ns = split_time(a.attr_timeout if timeout is None else timeout)
    try:
        return _ATTR_OUT_FULL.pack(s, ns, 0, *_attr_fields(a))
    except struct.error as exc:
        raise FuseUsageError(f"attributes of inode {a.st_ino!r} do not fit: {exc}") from None


def open_out(fh: int, open_flags: int) -> bytes:
    if not 0 <= fh <= _U64:
        raise FuseUsageError(f"file handle {fh!r} is not a 64-bit unsigned integer")
    return OPEN_OUT.pack(fh, open_flags, 0)


def write_out(size: int) -> bytes:
    if not 0 <= size <= _U32:
        raise FuseUsageError(f"byte count {size!r} out of range")
    return WRITE_OUT.pack(size, 0)


def statfs_out(blocks, bfree, bavail, files, ffree, bsize, namelen, frsize) -> bytes:
    return KSTATFS.pack(blocks, bfree, bavail, files, ffree, bsize, namelen, frsize, 0)


def getxattr_out(size: int) -> bytes:
    return GETXATTR_OUT.pack(size, 0)


def lk_out(start: int, end: int, typ: int, pid: int) -> bytes:
    return LK_OUT.pack(start, end, typ, pid)


def lseek_out(offset: int) -> bytes:
    if not 0 <= offset <= OFFSET_MAX:
        raise FuseUsageError(f"lseek result {offset!r} out of range")
    return LSEEK_OUT.pack(offset)


def dirent_type(mode: int) -> int:
    """DT_* from a mode: the file type bits shifted down, as dirent wants."""
    return (mode & 0o170000) >> 12


def dirent(ino: int, off: int, typ: int, name: bytes) -> bytes:
    """One fuse_dirent, padded to 8 bytes."""
    _check_name(name)
    rec = DIRENT_HEAD.pack(ino, off, len(name), typ) + name
    return rec + b"\0" * (align8(len(rec)) - len(rec))


def dirent_size(name: bytes) -> int:
    return align8(DIRENT_HEAD.size + len(name))


def direntplus(a, off: int, name: bytes) -> bytes:
    """One fuse_direntplus (entry_out + dirent), padded to 8 bytes."""
    _check_name(name)
    try:
        rec = _DIRENTPLUS_FULL.pack(*_entry_fields(a), a.st_ino, off, len(name),
                                    (a.st_mode & 0o170000) >> 12) + name
    except struct.error as exc:
        raise FuseUsageError(f"entry of inode {a.st_ino!r} does not fit: {exc}") from None
    pad = -len(rec) & 7
    return rec + b"\0" * pad if pad else rec


def direntplus_size(name: bytes) -> int:
    return align8(ENTRY_OUT_SIZE + DIRENT_HEAD.size + len(name))


def _check_name(name: bytes) -> None:
    if not isinstance(name, (bytes, bytearray)) or not name or b"/" in name or b"\0" in name:
        raise FuseUsageError(f"bad directory entry name {name!r}")
    if len(name) > 255:
        raise FuseUsageError(f"name of {len(name)} bytes is longer than 255")


# --------------------------------------------------------------------- notify

def _notify(code: int, payload: bytes) -> bytes:
    # A notify message is an out header with unique 0 and the code in error.
    return OUT_HEADER.pack(OUT_HEADER.size + len(payload), int(code), 0) + payload


def notify_inval_inode(ino: int, offset: int = 0, length: int = 0) -> bytes:
    """Drop cached attributes of ``ino`` and (offset >= 0) its pages in
    [offset, offset+length); length 0 means to the end of the file."""
    return _notify(NotifyCode.INVAL_INODE, NOTIFY_INVAL_INODE.pack(ino, offset, length))


def notify_inval_entry(parent: int, name: bytes, flags: int = 0) -> bytes:
    _check_name(name)
    return _notify(NotifyCode.INVAL_ENTRY,
                   NOTIFY_INVAL_ENTRY.pack(parent, len(name), flags) + name + b"\0")


def notify_delete(parent: int, child: int, name: bytes) -> bytes:
    _check_name(name)
    return _notify(NotifyCode.DELETE,
                   NOTIFY_DELETE.pack(parent, child, len(name), 0) + name + b"\0")


# --------------------------------------------------------------------- encoders
# The inverse of the decoders, for tests (round trips, fuzzing) and for a
# fake kernel driving a session without /dev/fuse.

def encode_request(opcode: int, args, *, unique: int = 1, nodeid: int = ROOT_ID, uid: int = 0,
                   gid: int = 0, pid: int = 1) -> bytes:
    body = _ENCODERS[type(args)](opcode, args)
    return IN_HEADER.pack(IN_HEADER.size + len(body), opcode, unique, nodeid, uid, gid, pid,
                          0, 0) + body


def _e_rename(op, a: Rename):
    head = RENAME2_IN.pack(a.newdir, a.flags, 0) if op == Opcode.RENAME2 else RENAME_IN.pack(a.newdir)
    return head + a.old + b"\0" + a.new + b"\0"


_ENCODERS: dict[type, Callable] = {
    Name: lambda op, a: a.name + b"\0",
    Forget: lambda op, a: FORGET_IN.pack(a.nlookup),
    BatchForget: lambda op, a: BATCH_FORGET_IN.pack(len(a.items), 0)
    + b"".join(FORGET_ONE.pack(*i) for i in a.items),
    Getattr: lambda op, a: GETATTR_IN.pack(a.flags, 0, a.fh),
    Setattr: lambda op, a: SETATTR_IN.pack(a.valid, 0, a.fh, a.size, a.lock_owner, a.atime,
                                           a.mtime, a.ctime, a.atimensec, a.mtimensec,
                                           a.ctimensec, a.mode, 0, a.uid, a.gid, 0),
    Symlink: lambda op, a: a.name + b"\0" + a.target + b"\0",
    Mknod: lambda op, a: MKNOD_IN.pack(a.mode, a.rdev, a.umask, 0) + a.name + b"\0",
    Mkdir: lambda op, a: MKDIR_IN.pack(a.mode, a.umask) + a.name + b"\0",
    Rename: _e_rename,
    Link: lambda op, a: LINK_IN.pack(a.oldnodeid) + a.newname + b"\0",
    Open: lambda op, a: OPEN_IN.pack(a.flags, a.open_flags),
    Create: lambda op, a: CREATE_IN.pack(a.flags, a.mode, a.umask, a.open_flags) + a.name + b"\0",
    Read: lambda op, a: READ_IN.pack(a.fh, a.offset, a.size, a.read_flags, a.lock_owner, a.flags, 0),
    Write: lambda op, a: WRITE_IN.pack(a.fh, a.offset, a.size, a.write_flags, a.lock_owner,
                                       a.flags, 0) + a.data,
    Release: lambda op, a: RELEASE_IN.pack(a.fh, a.flags, a.release_flags, a.lock_owner),
    Flush: lambda op, a: FLUSH_IN.pack(a.fh, 0, 0, a.lock_owner),
    Fsync: lambda op, a: FSYNC_IN.pack(a.fh, a.fsync_flags, 0),
    Setxattr: lambda op, a: SETXATTR_IN_COMPAT.pack(len(a.value), a.flags) + a.name + b"\0" + a.value,
    Getxattr: lambda op, a: GETXATTR_IN.pack(a.size, 0) + a.name + b"\0",
    Listxattr: lambda op, a: GETXATTR_IN.pack(a.size, 0),
    Init: lambda op, a: INIT_IN.pack(a.major, a.minor, a.max_readahead, a.flags, a.flags2),
    Lk: lambda op, a: LK_IN.pack(a.fh, a.owner, a.start, a.end, a.type, a.pid, a.lk_flags, 0),
    Access: lambda op, a: ACCESS_IN.pack(a.mask, 0),
    Interrupt: lambda op, a: INTERRUPT_IN.pack(a.unique),
    Fallocate: lambda op, a: FALLOCATE_IN.pack(a.fh, a.offset, a.length, a.mode, 0),
    Lseek: lambda op, a: LSEEK_IN.pack(a.fh, a.offset, a.whence, 0),
    CopyFileRange: lambda op, a: COPY_FILE_RANGE_IN.pack(a.fh_in, a.off_in, a.nodeid_out,
                                                         a.fh_out, a.off_out, a.length, a.flags),
    Empty: lambda op, a: b"",
}
