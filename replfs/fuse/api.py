"""What a filesystem implements to be served: ``Operations`` and its value types.

The shapes mirror pyfuse3's on purpose, so a pyfuse3 filesystem ports by
changing its imports: the same method names and argument orders, an
``EntryAttributes`` with the same ``st_*``/timeout fields, ``FileInfo``
(fh, direct_io, keep_cache, nonseekable), ``SetattrFields.update_*``,
``StatvfsData.f_*``, ``readdir_reply(token, name, attr, next_id)`` and
``FUSEError(errno)``.  Beyond pyfuse3: fallocate, lseek (SEEK_DATA/HOLE),
copy_file_range, getlk/setlk/setlkw/flock plus ``release_locks``, and the
``init``/``destroy`` hooks that bind an Operations object to its session.

Defaults answer ENOSYS, except where ENOSYS would change the kernel's
behaviour for the rest of the mount (forget has no reply; flush, release
and releasedir are no-ops because an ENOSYS flush makes the kernel stop
sending FLUSH, and FLUSH is where POSIX locks are released on close).

INIT flags follow the class: POSIX_LOCKS when getlk/setlk/setlkw are
overridden, FLOCK_LOCKS when flock is, EXPORT_SUPPORT with
``supports_dot_lookup``, and so on (see ``Operations.init_flags``).

Lookup counts are the filesystem's job, as with pyfuse3: every successful
lookup, mknod, mkdir, symlink, link and create, and every entry except
"." and ".." that ``readdir_reply`` accepted in READDIRPLUS mode, is one
reference the kernel later returns through ``forget``.  When a reply that
carried such references cannot be delivered (the caller was killed), the
session calls ``forget`` for them itself, so the counts stay exact.
"""
from __future__ import annotations

import errno
from dataclasses import dataclass
from typing import Any

from . import proto
from .errors import FUSEError
from .lockops import LockService
from .locks import F_UNLCK, Kind, Owner

ROOT_INODE = proto.ROOT_ID


class EntryAttributes:
    """Attributes of an inode, plus the kernel's cache timeouts (seconds)."""

    __slots__ = ("st_ino", "generation", "entry_timeout", "attr_timeout", "st_mode",
                 "st_nlink", "st_uid", "st_gid", "st_rdev", "st_size", "st_blksize",
                 "st_blocks", "st_atime_ns", "st_mtime_ns", "st_ctime_ns", "st_birthtime_ns")

    def __init__(self, **kw):
        self.st_ino = 0
        self.generation = 0
        self.entry_timeout = 300.0      # pyfuse3's defaults
        self.attr_timeout = 300.0
        self.st_mode = 0
        self.st_nlink = 0
        self.st_uid = 0
        self.st_gid = 0
        self.st_rdev = 0
        self.st_size = 0
        self.st_blksize = 4096
        self.st_blocks = 0
        self.st_atime_ns = 0
        self.st_mtime_ns = 0
        self.st_ctime_ns = 0
        self.st_birthtime_ns = 0
        for k, v in kw.items():
            setattr(self, k, v)

    def copy(self) -> "EntryAttributes":
        return EntryAttributes(**{k: getattr(self, k) for k in self.__slots__})

    def __repr__(self) -> str:
        return (f"EntryAttributes(ino={self.st_ino}, mode={self.st_mode:o}, "
                f"size={self.st_size}, nlink={self.st_nlink})")


@dataclass(slots=True)
class FileInfo:
    """What open/create/opendir answer: the handle and page-cache policy."""
    fh: int = 0
    direct_io: bool = False
    keep_cache: bool = False
    nonseekable: bool = False
    cache_dir: bool = False

    def open_flags(self) -> int:
        return ((proto.FOPEN_DIRECT_IO if self.direct_io else 0)
                | (proto.FOPEN_KEEP_CACHE if self.keep_cache else 0)
                | (proto.FOPEN_NONSEEKABLE if self.nonseekable else 0)
                | (proto.FOPEN_CACHE_DIR if self.cache_dir else 0))


@dataclass(slots=True)
class SetattrFields:
    update_mode: bool = False
    update_uid: bool = False
    update_gid: bool = False
    update_size: bool = False
    update_atime: bool = False
    update_mtime: bool = False
    update_ctime: bool = False
    # Beyond pyfuse3: the kernel asks the filesystem to clear setuid/setgid
    # (only with HANDLE_KILLPRIV), and whether the times were "now".
    kill_suidgid: bool = False
    atime_now: bool = False
    mtime_now: bool = False


@dataclass(slots=True)
class StatvfsData:
    f_bsize: int = 4096
    f_frsize: int = 4096
    f_blocks: int = 0
    f_bfree: int = 0
    f_bavail: int = 0
    f_files: int = 0
    f_ffree: int = 0
    f_favail: int = 0
    f_namemax: int = 255


@dataclass(slots=True)
class RequestContext:
    """Who asked: pyfuse3's ctx fields plus what some requests carry."""
    uid: int
    gid: int
    pid: int
    umask: int = 0
    session: Any = None          # the Session (one per mount) the request came from
    nodeid: int = 0
    fh: int | None = None        # GETATTR with FUSE_GETATTR_FH
    lock_owner: int | None = None
    # OPEN with O_TRUNC by a caller without CAP_FSETID (HANDLE_KILLPRIV_V2):
    # the truncation clears setuid/setgid as a truncate(2) would
    kill_suidgid: bool = False


@dataclass(frozen=True, slots=True)
class FileLock:
    """A byte-range lock as GETLK/SETLK see it (end inclusive)."""
    type: int
    start: int
    end: int
    pid: int


class ReaddirToken:
    """Collects one READDIR(PLUS) reply; pass to ``readdir_reply``."""

    __slots__ = ("size", "plus", "chunks", "used", "counted")

    def __init__(self, size: int, plus: bool):
        self.size = size
        self.plus = plus
        self.chunks: list[bytes] = []
        self.used = 0
        self.counted: list[int] = []     # inodes whose lookup count this reply carries

    def payload(self) -> bytes:
        return b"".join(self.chunks)


def readdir_reply(token: ReaddirToken, name: bytes, attr: EntryAttributes, next_id: int) -> bool:
    """Add one entry; False when the reply is full (stop, and do not count
    this entry).  ``next_id`` is the cookie readdir will get to continue
    *after* this entry.  In READDIRPLUS mode an accepted entry other than
    "." and ".." is a lookup reference the kernel will forget later."""
    name = bytes(name)
    if token.plus:
        need = proto.direntplus_size(name)
        if token.used + need > token.size:
            return False
        token.chunks.append(proto.direntplus(attr, next_id, name))
        if attr.st_ino and name not in (b".", b".."):
            token.counted.append(attr.st_ino)
    else:
        need = proto.dirent_size(name)
        if token.used + need > token.size:
            return False
        token.chunks.append(proto.dirent(attr.st_ino, next_id, proto.dirent_type(attr.st_mode),
                                         name))
    token.used += need
    return True


def _enosys():
    raise FUSEError(errno.ENOSYS)


class Operations:
    """Base class of a served filesystem; override what you support."""

    # --- negotiation knobs (class attributes, as in pyfuse3) -------------
    supports_dot_lookup = True       # EXPORT_SUPPORT: lookup of "." and ".." works
    enable_writeback_cache = False   # WRITEBACK_CACHE
    enable_acl = False               # POSIX_ACL is never negotiated (see docs)
    enable_readdirplus = True        # DO_READDIRPLUS (always plus, never AUTO)
    handle_killpriv = False          # HANDLE_KILLPRIV: we clear suid/sgid on write/chown/truncate
    # HANDLE_KILLPRIV_V2: the filesystem clears setuid/setgid (and file
    # capabilities) on write, truncate and chown itself, told per request
    # (write(..., kill_suidgid=True), SetattrFields.kill_suidgid,
    # ctx.kill_suidgid at open).  The kernel then no longer asks GETXATTR
    # security.capability before every WRITE: one request per write, not two.
    handle_killpriv_v2 = False
    atomic_o_trunc = True            # ATOMIC_O_TRUNC: open() gets O_TRUNC and truncates
    # DONT_MASK: the kernel passes modes without applying the umask (FUSE
    # mounts are SB_POSIXACL, so the VFS does not apply it either) and the
    # filesystem applies ctx.umask itself.  Off: modes arrive masked, as
    # with pyfuse3's defaults.
    dont_mask = False
    # Opcodes served by a task of their own (may block); None = session default.
    task_opcodes: frozenset[int] | None = None

    # --- lifecycle --------------------------------------------------------
    def init(self, session) -> None:
        """Called once the session is mounted, before the first request."""

    async def destroy(self, session) -> None:
        """Called when the session ends (unmount, abort, DESTROY)."""

    # --- names and attributes ---------------------------------------------
    async def lookup(self, parent_inode: int, name: bytes, ctx: RequestContext) -> EntryAttributes:
        _enosys()

    async def forget(self, inode_list: list[tuple[int, int]]) -> None:
        pass

    async def getattr(self, inode: int, ctx: RequestContext) -> EntryAttributes:
        _enosys()

    async def setattr(self, inode: int, attr: EntryAttributes, fields: SetattrFields,
                      fh: int | None, ctx: RequestContext) -> EntryAttributes:
        _enosys()

    async def readlink(self, inode: int, ctx: RequestContext) -> bytes:
        _enosys()

    async def mknod(self, parent_inode, name, mode, rdev, ctx) -> EntryAttributes:
        _enosys()

    async def mkdir(self, parent_inode, name, mode, ctx) -> EntryAttributes:
        _enosys()

    async def unlink(self, parent_inode, name, ctx) -> None:
        _enosys()

    async def rmdir(self, parent_inode, name, ctx) -> None:
        _enosys()

    async def symlink(self, parent_inode, name, target, ctx) -> EntryAttributes:
        _enosys()

    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags,
                     ctx) -> None:
        _enosys()

    async def link(self, inode, new_parent_inode, new_name, ctx) -> EntryAttributes:
        _enosys()

    async def statfs(self, ctx) -> StatvfsData:
        _enosys()

    async def access(self, inode, mode, ctx) -> bool:
        _enosys()

    # --- files --------------------------------------------------------------
    async def open(self, inode, flags, ctx) -> FileInfo:
        _enosys()

    async def create(self, parent_inode, name, mode, flags, ctx) -> tuple[FileInfo, EntryAttributes]:
        _enosys()

    async def read(self, fh, off, size) -> bytes:
        _enosys()

    async def write(self, fh, off, buf) -> int:
        """``buf`` is bytes-like: bytes, or a read-only memoryview of the
        request's own immutable body (a WRITE handled in a task; no copy
        is made).  Keep it as long as needed; it never changes.  With
        ``handle_killpriv_v2`` a write by a caller without CAP_FSETID comes
        as ``write(fh, off, buf, kill_suidgid=True)``."""
        _enosys()

    async def write_sync(self, fh, off, buf, datasync, **kw) -> int:
        """A write with O_DSYNC or O_SYNC (the open's flags or pwritev2's
        RWF_DSYNC/RWF_SYNC) to a ``direct_io`` handle.  The kernel sends
        no FSYNC after such a write (it does after a cached one), so it
        must be durable when answered.  The default writes, then fsyncs
        the handle; a device that can do both in one request overrides
        it.  ``datasync``: O_DSYNC only (no metadata beyond the size)."""
        n = await self.write(fh, off, buf, **kw)
        await self.fsync(fh, datasync)
        return n

    async def flush(self, fh) -> None:
        pass

    async def release(self, fh) -> None:
        pass

    async def fsync(self, fh, datasync) -> None:
        _enosys()

    async def fallocate(self, fh, off, length, mode) -> None:
        _enosys()

    async def lseek(self, fh, off, whence) -> int:
        """Only SEEK_DATA and SEEK_HOLE reach the filesystem."""
        _enosys()

    async def copy_file_range(self, fh_in, off_in, fh_out, off_out, length, flags) -> int:
        _enosys()

    # --- directories ----------------------------------------------------------
    async def opendir(self, inode, ctx) -> int | FileInfo:
        _enosys()

    async def readdir(self, fh, start_id, token: ReaddirToken) -> None:
        _enosys()

    async def releasedir(self, fh) -> None:
        pass

    async def fsyncdir(self, fh, datasync) -> None:
        _enosys()

    # --- xattrs -----------------------------------------------------------------
    async def setxattr(self, inode, name, value, ctx) -> None:
        _enosys()

    async def getxattr(self, inode, name, ctx) -> bytes:
        _enosys()

    async def listxattr(self, inode, ctx) -> list[bytes]:
        _enosys()

    async def removexattr(self, inode, name, ctx) -> None:
        _enosys()

    # --- locks --------------------------------------------------------------------
    async def getlk(self, inode, fh, owner: int, lock: FileLock, ctx) -> FileLock:
        """The first conflicting lock, or a lock of type F_UNLCK."""
        _enosys()

    async def setlk(self, inode, fh, owner: int, lock: FileLock, ctx) -> None:
        """Non-blocking POSIX lock or unlock; EAGAIN on conflict."""
        _enosys()

    async def setlkw(self, inode, fh, owner: int, lock: FileLock, ctx) -> None:
        """Blocking POSIX lock (or an unlock); cancelled on interrupt."""
        _enosys()

    async def flock(self, inode, fh, owner: int, type: int, wait: bool, ctx) -> None:
        _enosys()

    async def release_locks(self, inode, kind: Kind, owner: int, ctx) -> None:
        """Drop ``owner``'s locks of ``kind`` on ``inode``: POSIX on every
        FLUSH (close), FLOCK on the last RELEASE of an flock'ed file."""

    # --- negotiation --------------------------------------------------------------
    @classmethod
    def _overrides(cls, name: str) -> bool:
        return getattr(cls, name) is not getattr(Operations, name)

    @classmethod
    def init_flags(cls) -> int:
        """The INIT flags this filesystem wants (the kernel may offer fewer)."""
        if cls.enable_acl:
            raise proto.FuseUsageError("POSIX ACLs are not supported by replfs.fuse")
        flags = (proto.ASYNC_READ | proto.BIG_WRITES | proto.AUTO_INVAL_DATA
                 | proto.PARALLEL_DIROPS | proto.MAX_PAGES)
        if cls.dont_mask:
            flags |= proto.DONT_MASK
        if cls.atomic_o_trunc:
            flags |= proto.ATOMIC_O_TRUNC
        if cls.supports_dot_lookup:
            flags |= proto.EXPORT_SUPPORT
        if cls.enable_writeback_cache:
            flags |= proto.WRITEBACK_CACHE
        if cls.enable_readdirplus:
            flags |= proto.DO_READDIRPLUS
        if cls.handle_killpriv:
            flags |= proto.HANDLE_KILLPRIV
        if cls.handle_killpriv_v2:
            flags |= proto.HANDLE_KILLPRIV_V2
        if all(cls._overrides(n) for n in ("getlk", "setlk", "setlkw")):
            flags |= proto.POSIX_LOCKS
        if cls._overrides("flock"):
            flags |= proto.FLOCK_LOCKS
        return flags


class LocalLocks:
    """Operations mixin: node-local POSIX and flock locks via a LockService.

    Put it before ``Operations`` in the bases and set ``self.lock_service``
    (shared by every mount that must see the same locks).  ``lock_key``
    maps a FUSE inode to the identity locks are kept under; override it
    when FUSE inode numbers differ between mounts of one volume.
    """

    lock_service: LockService

    def lock_key(self, inode: int):
        return inode

    @staticmethod
    def _owner(ctx, owner: int) -> Owner:
        return Owner(ctx.session, owner)

    async def getlk(self, inode, fh, owner, lock, ctx):
        c = self.lock_service.getlk(self.lock_key(inode), Kind.POSIX, self._owner(ctx, owner),
                                    lock.type, lock.start, lock.end)
        if c is None:
            return FileLock(F_UNLCK, lock.start, lock.end, 0)
        return FileLock(c.type, c.start, c.end, c.pid)

    async def setlk(self, inode, fh, owner, lock, ctx):
        self.lock_service.setlk(self.lock_key(inode), Kind.POSIX, self._owner(ctx, owner),
                                lock.type, lock.start, lock.end, lock.pid)

    async def setlkw(self, inode, fh, owner, lock, ctx):
        await self.lock_service.setlkw(self.lock_key(inode), Kind.POSIX,
                                       self._owner(ctx, owner), lock.type, lock.start,
                                       lock.end, lock.pid)

    async def flock(self, inode, fh, owner, type, wait, ctx):
        args = (self.lock_key(inode), Kind.FLOCK, self._owner(ctx, owner), type, 0,
                proto.OFFSET_MAX, ctx.pid)
        if wait:
            await self.lock_service.setlkw(*args)
        else:
            self.lock_service.setlk(*args)

    async def release_locks(self, inode, kind, owner, ctx):
        self.lock_service.release_owner(self.lock_key(inode), kind, self._owner(ctx, owner))

    async def destroy(self, session):
        # A dead or unmounted mount holds no locks any more.
        self.lock_service.drop_mount(session)
        await super().destroy(session)

