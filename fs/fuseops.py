"""The FUSE face of a replfs volume: replfs.fuse operations over ``Filesystem``.

This class only translates.  It maps FUSE inode numbers to on-disk inode
numbers (the root is FUSE inode 1, ``fs.root_ino`` on disk; every other
inode keeps its on-disk number, so ``st_ino`` is persistent), turns core
``Attr``/``StatFs`` into replfs.fuse structures, and maps every failure to an
errno in one place (``_call``):

* ``OSError`` keeps its errno (BlockDeviceError is an OSError);
* ``FilesystemFailed`` (the core's read-only latch after an I/O error in
  the middle of an update) answers EROFS to changes and EIO to reads;
* an operation that does not finish within ``op_timeout`` seconds (the
  node daemon hangs) or that runs after the daemon connection was lost
  answers EIO instead of blocking the caller forever;
* anything else is a bug: logged with its traceback, answered EIO, and the
  FUSE loop keeps serving.

Attribute and entry timeouts are short (1 s by default) on a mount of
one node, and 0 on a shared mount (``shared``: both nodes mount the
volume), where the kernel caches nothing past one call and every lookup
and stat comes to the filesystem under the inode's cluster lock.  When an
inode's lock goes to NL for another node, the kernel's cached pages of
it are dropped first (``_lock_given_up``), so a file kept open here reads
what the other node wrote.
"""
from __future__ import annotations

import errno
import logging
import os
import stat

import trio

from replfs import fuse

from .core import Attr, FilesystemFailed

log = logging.getLogger(__name__)

ROOT = fuse.ROOT_INODE

# readdir cookies: "." and ".." take 1 and 2; entries use the core's name
# keys, which are 63-bit hashes in [1, 2**63) (a key of 1 or 2 has a
# probability of 2**-62 per name; such an entry would be listed twice).
_DOT_COOKIE = 1
_DOTDOT_COOKIE = 2
_READDIR_BATCH = 256
_LOOKUP_TRIES = 3        # a lookup that races the other node's unlink and reuse


class ReplfsOperations(fuse.LocalLocks, fuse.Operations):
    supports_dot_lookup = True
    enable_writeback_cache = False
    enable_acl = False
    # set-id bits and file capabilities are cleared here, on write, truncate
    # and chown (Filesystem._kill_caps, _kill_setid): the kernel stops asking GETXATTR
    # security.capability before every write
    handle_killpriv_v2 = True
    # Nearly every handler awaits device I/O: all of them run in workers.
    task_opcodes = fuse.ALL_TASKS

    def __init__(self, fs, *, readonly: bool = False, entry_timeout: float = 1.0,
                 attr_timeout: float = 1.0, op_timeout: float | None = None,
                 lock_service: fuse.LockService | None = None, shared: bool = False):
        super().__init__()
        self.fs = fs
        self.session = None                  # the FUSE session (set by whoever mounts)
        self.shared = shared
        if shared:
            # Both nodes mount the volume: the kernel may cache nothing
            # past one call (OCFS2 revalidates every dentry and takes the
            # inode lock for every stat); the lock cache keeps that cheap.
            entry_timeout = attr_timeout = 0.0
            fs.kernel_hook = self._lock_given_up
        # POSIX and flock locks, node-local for now: every mount of this
        # volume served by one process shares ``lock_service``.  (The
        # dual-primary work makes them cluster-wide through the DLM.)
        self.lock_service = lock_service or fuse.LockService()
        self.readonly = readonly
        self.entry_timeout = entry_timeout
        self.attr_timeout = attr_timeout
        self.op_timeout = op_timeout
        self.lookup_counts: dict[int, int] = {}
        self._dirs: dict[int, int] = {}      # directory handle (a core handle) -> FUSE inode
        self.dead: str | None = None         # set when the block device went away
        self.counters = {"ops": 0, "errors": 0, "timeouts": 0}

    # ---------------------------------------------------------------- mapping

    def _disk(self, ino: int) -> int:
        """FUSE inode -> on-disk inode."""
        return self.fs.root_ino if ino == ROOT else ino

    def _fuse(self, ino: int) -> int:
        """On-disk inode -> FUSE inode."""
        if ino == self.fs.root_ino:
            return ROOT
        if ino == ROOT:
            # Block 1 lies in front of the superblock and never holds an
            # inode; seeing it means the volume is damaged.
            raise OSError(errno.EIO, "on-disk inode 1 collides with the FUSE root")
        return ino

    def _entry(self, a: Attr) -> fuse.EntryAttributes:
        e = fuse.EntryAttributes()
        e.st_ino = self._fuse(a.ino)
        e.generation = a.generation
        e.entry_timeout = self.entry_timeout
        e.attr_timeout = self.attr_timeout
        e.st_mode = a.mode
        e.st_nlink = a.nlink
        e.st_uid = a.uid
        e.st_gid = a.gid
        e.st_rdev = a.rdev
        e.st_size = a.size
        e.st_blksize = a.blksize
        e.st_blocks = a.blocks
        e.st_atime_ns = a.atime_ns
        e.st_mtime_ns = a.mtime_ns
        e.st_ctime_ns = a.ctime_ns
        return e

    async def _looked_up(self, e: fuse.EntryAttributes) -> fuse.EntryAttributes:
        # The kernel now holds a reference until it forgets the inode; the
        # core keeps an unlinked inode (as an orphan) while one is held,
        # so fstat of an O_PATH descriptor or stat of a removed current
        # directory sees nlink 0 rather than ESTALE.  On a shared mount the
        # first reference also pins the inode's open lock (OCFS2 takes it
        # at iget), so the other node does not free it meanwhile either;
        # and every reply's generation is checked with the pin in place
        # (a lookup that read the inode while another's pin was still on
        # its way could otherwise hand out a freed and reused number).
        n = self.lookup_counts.get(e.st_ino, 0)
        if n == 0 and e.st_ino != ROOT:
            self.fs.hold(e.st_ino)
        self.lookup_counts[e.st_ino] = n + 1
        if self.shared and e.st_ino != ROOT:
            try:
                await self._call("lookup", self.fs.pin_open, e.st_ino, e.generation)
            except BaseException:
                # no reply will carry this reference: take it back
                with trio.CancelScope(shield=True):
                    await self.forget([(e.st_ino, 1)])
                raise
        return e

    # How long a lock hand-over waits for the kernel to drop an inode's
    # pages.  The kernel may first write dirty mmap pages back through
    # WRITE requests that wait for this very lock: the wait is bounded,
    # and such pages are then written under the next grant (shared
    # writable mappings are coherent at msync/munmap only).
    INVALIDATE_WAIT = 2.0

    async def _lock_given_up(self, ino: int) -> None:
        """Another node is about to change disk inode ``ino``: drop what
        the kernel caches of it (pages and attributes), so the next read
        here comes to the filesystem, under the lock again."""
        fino = self._fuse(ino)
        if self.session is None or (fino not in self.lookup_counts and fino != ROOT):
            return          # the kernel does not know the inode
        if not await self.session.invalidate_inode_wait(fino, self.INVALIDATE_WAIT):
            log.warning("the kernel did not drop the cached pages of inode %d within %.0f s "
                        "(dirty shared mappings?); handing the lock over anyway", ino,
                        self.INVALIDATE_WAIT)

    # ---------------------------------------------------------------- errors

    async def _call(self, what: str, func, *args, changes: bool = False, **kw):
        """Run one core operation; every failure becomes a FUSEError."""
        self.counters["ops"] += 1
        if changes and self.readonly:
            raise fuse.FUSEError(errno.EROFS)
        if self.dead is not None:
            raise fuse.FUSEError(errno.EIO)
        try:
            if self.op_timeout:
                with trio.move_on_after(self.op_timeout) as scope:
                    return await func(*args, **kw)
                self.counters["timeouts"] += 1
                log.error("%s did not finish within %.0f s (is replfsd hanging?); "
                          "answering EIO", what, self.op_timeout)
                raise fuse.FUSEError(errno.EIO)
            return await func(*args, **kw)
        except fuse.FUSEError:
            raise
        except FilesystemFailed as exc:
            self.counters["errors"] += 1
            log.debug("%s refused: %s", what, exc)
            raise fuse.FUSEError(errno.EROFS if changes else errno.EIO) from None
        except OSError as exc:
            code = exc.errno or errno.EIO
            if code == errno.EIO:
                # the one an operator must act on (a failing disk or peer)
                self.counters["errors"] += 1
                log.warning("%s failed: %s", what, exc)
            else:
                # ordinary answers: ESTALE for an NFS handle of a deleted
                # file, ENOSPC of a full volume or xattr block, ENOENT ...
                log.debug("%s: %s", what, exc)
            raise fuse.FUSEError(code) from None
        except Exception:
            self.counters["errors"] += 1
            log.exception("unexpected error in %s; answering EIO", what)
            raise fuse.FUSEError(errno.EIO) from None

    def device_lost(self, why: str) -> None:
        """The block device is gone for good (replfsd died): fail fast."""
        if self.dead is None:
            self.dead = why
            log.error("block device lost: %s; every operation now fails with EIO", why)

    # ---------------------------------------------------------------- names

    async def lookup(self, parent_inode, name, ctx=None):
        for attempt in range(_LOOKUP_TRIES):
            a = await self._call("lookup", self.fs.lookup, self._disk(parent_inode), name)
            try:
                return await self._looked_up(self._entry(a))
            except fuse.FUSEError as exc:
                # ESTALE here: the other node freed (and perhaps reused)
                # the inode between the lookup and the pin of its open
                # lock; the name may now lead elsewhere or nowhere: ask again
                if exc.errno != errno.ESTALE or attempt == _LOOKUP_TRIES - 1:
                    raise

    async def forget(self, inode_list):
        for ino, n in inode_list:
            left = self.lookup_counts.get(ino, 0) - n
            if left > 0:
                self.lookup_counts[ino] = left
                continue
            if self.lookup_counts.pop(ino, None) is None or ino == ROOT:
                continue
            # forget has no reply: a failure here is only logged.
            try:
                await self._call("forget", self.fs.unhold, ino)
            except fuse.FUSEError:
                pass

    async def getattr(self, inode, ctx=None):
        return self._entry(await self._call("getattr", self.fs.getattr, self._disk(inode)))

    async def _new_owner(self, parent: int, ctx) -> tuple[int, int, bool]:
        """uid, gid of a new inode, and whether the parent is setgid (BSD
        group semantics for setgid directories, as ext4 does)."""
        pa = await self._call("getattr", self.fs.getattr, parent)
        if pa.mode & stat.S_ISGID:
            return ctx.uid, pa.gid, True
        return ctx.uid, ctx.gid, False

    async def mknod(self, parent_inode, name, mode, rdev, ctx):
        parent = self._disk(parent_inode)
        uid, gid, _ = await self._new_owner(parent, ctx)
        a = await self._call("mknod", self.fs.mknod, parent, name, mode, rdev, uid, gid,
                             changes=True)
        return await self._looked_up(self._entry(a))

    async def mkdir(self, parent_inode, name, mode, ctx):
        parent = self._disk(parent_inode)
        uid, gid, sgid = await self._new_owner(parent, ctx)
        if sgid:
            mode |= stat.S_ISGID
        a = await self._call("mkdir", self.fs.mkdir, parent, name, mode, uid, gid,
                             changes=True)
        return await self._looked_up(self._entry(a))

    async def symlink(self, parent_inode, name, target, ctx):
        parent = self._disk(parent_inode)
        uid, gid, _ = await self._new_owner(parent, ctx)
        a = await self._call("symlink", self.fs.symlink, parent, name, target, uid, gid,
                             changes=True)
        return await self._looked_up(self._entry(a))

    async def readlink(self, inode, ctx):
        return await self._call("readlink", self.fs.readlink, self._disk(inode))

    async def link(self, inode, new_parent_inode, new_name, ctx):
        a = await self._call("link", self.fs.link, self._disk(inode),
                             self._disk(new_parent_inode), new_name, changes=True)
        return await self._looked_up(self._entry(a))

    async def unlink(self, parent_inode, name, ctx):
        await self._call("unlink", self.fs.unlink, self._disk(parent_inode), name,
                         changes=True)

    async def rmdir(self, parent_inode, name, ctx):
        await self._call("rmdir", self.fs.rmdir, self._disk(parent_inode), name,
                         changes=True)

    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new,
                     flags, ctx):
        await self._call("rename", self.fs.rename, self._disk(parent_inode_old), name_old,
                         self._disk(parent_inode_new), name_new, flags, ctx.uid, ctx.gid,
                         changes=True)

    # ---------------------------------------------------------------- attributes

    async def setattr(self, inode, attr, fields, fh, ctx):
        kw = {}
        if fields.update_mode:
            kw["mode"] = attr.st_mode
        if fields.update_uid:
            kw["uid"] = attr.st_uid
        if fields.update_gid:
            kw["gid"] = attr.st_gid
        if fields.update_size:
            kw["size"] = attr.st_size
        if fields.update_atime:
            kw["atime_ns"] = attr.st_atime_ns
        if fields.update_mtime:
            kw["mtime_ns"] = attr.st_mtime_ns
        if fields.update_ctime:
            kw["ctime_ns"] = attr.st_ctime_ns
        if fields.kill_suidgid or not kw:
            # (an empty SETATTR is a chown(f, -1, -1): Linux clears the
            # set-id bits of a file then, and under HANDLE_KILLPRIV_V2 the
            # kernel leaves that to us without a flag)
            kw["kill_suidgid"] = True
        a = await self._call("setattr", self.fs.setattr, self._disk(inode), changes=True, **kw)
        return self._entry(a)

    async def statfs(self, ctx):
        s = await self._call("statfs", self.fs.statfs)
        out = fuse.StatvfsData()
        out.f_bsize = s.bsize
        out.f_frsize = s.frsize
        out.f_blocks = s.blocks
        out.f_bfree = s.bfree
        out.f_bavail = s.bavail
        out.f_files = s.files
        out.f_ffree = s.ffree
        out.f_favail = s.ffree
        out.f_namemax = s.namemax
        return out

    # ---------------------------------------------------------------- files

    def _file_info(self, fh: int, flags: int) -> fuse.FileInfo:
        # keep_cache=False: every open drops the kernel's cached pages of
        # the file, so an open after another node wrote sees the new data.
        # No direct_io for O_DIRECT opens: the kernel already serves their
        # reads and writes uncached, and direct_io would make mmap of such
        # a file fail with ENODEV (ext4 allows it).
        # On a shared mount an O_APPEND handle is direct_io: the kernel picks
        # an append's offset from its cached size, which the other node may
        # have moved; the filesystem appends at the size it reads under the
        # inode's lock instead, and no page-cache copy at the kernel's
        # offset is left behind.
        return fuse.FileInfo(fh=fh, direct_io=self.shared and bool(flags & os.O_APPEND),
                             keep_cache=False)

    async def open(self, inode, flags, ctx):
        changes = (flags & os.O_ACCMODE) != os.O_RDONLY or bool(flags & os.O_TRUNC)
        core_flags = flags & ~os.O_DIRECT
        fh = await self._call("open", self.fs.open, self._disk(inode), core_flags,
                              kill_suidgid=getattr(ctx, "kill_suidgid", False), changes=changes)
        return self._file_info(fh, flags)

    async def create(self, parent_inode, name, mode, flags, ctx):
        parent = self._disk(parent_inode)
        uid, gid, _ = await self._new_owner(parent, ctx)
        fh, a = await self._call("create", self.fs.create, parent, name, mode,
                                 flags & ~(os.O_DIRECT | os.O_CREAT | os.O_EXCL | os.O_TRUNC),
                                 uid, gid, changes=True)
        return self._file_info(fh, flags), await self._looked_up(self._entry(a))

    async def read(self, fh, off, size):
        return await self._call("read", self.fs.read, fh, off, size)

    async def write(self, fh, off, buf, kill_suidgid=False):
        return await self._call("write", self.fs.write, fh, off, buf, changes=True,
                                kill_suidgid=kill_suidgid)

    async def flush(self, fh):
        # close(2): nothing to do; data is written through and metadata
        # commits on fsync or from the commit loop.
        pass

    async def fallocate(self, fh, off, length, mode):
        # Mode 0 (posix_fallocate, NFSv4.2 ALLOCATE); KEEP_SIZE, PUNCH_HOLE
        # and ZERO_RANGE answer EOPNOTSUPP (the core cannot honour them yet).
        await self._call("fallocate", self.fs.fallocate, fh, off, length, mode, changes=True)

    async def lseek(self, fh, off, whence):
        # The kernel asks only for SEEK_DATA and SEEK_HOLE.
        return await self._call("lseek", self.fs.lseek, fh, off, whence)

    async def copy_file_range(self, fh_in, off_in, fh_out, off_out, length, flags):
        if flags:
            raise fuse.FUSEError(errno.EINVAL)
        return await self._call("copy_file_range", self.fs.copy_file_range, fh_in, off_in,
                                fh_out, off_out, length, changes=True)

    async def fsync(self, fh, datasync):
        await self._call("fsync", self.fs.fsync, fh, bool(datasync))

    async def release(self, fh):
        # Not "changes": a read-only mount still has to drop the handle.
        await self._call("release", self.fs.release, fh)

    # ---------------------------------------------------------------- directories

    async def opendir(self, inode, ctx):
        a = await self._call("opendir", self.fs.getattr, self._disk(inode))
        if not stat.S_ISDIR(a.mode):
            raise fuse.FUSEError(errno.ENOTDIR)
        # A core handle: a directory removed while open lives (nlink 0,
        # empty) until releasedir, as on a local filesystem, instead of
        # answering ESTALE to fstat/fchdir'd callers.
        fh = await self._call("opendir", self.fs.open, self._disk(inode),
                              os.O_RDONLY | os.O_DIRECTORY)
        self._dirs[fh] = inode
        return fh

    async def readdir(self, fh, start_id, token):
        inode = self._dirs.get(fh)
        if inode is None:
            raise fuse.FUSEError(errno.EBADF)
        ino = self._disk(inode)
        if start_id < _DOT_COOKIE:
            a = await self._call("readdir", self.fs.getattr, ino)
            if not fuse.readdir_reply(token, b".", self._entry(a), _DOT_COOKIE):
                return
            start_id = _DOT_COOKIE
        if start_id < _DOTDOT_COOKIE:
            a = await self._call("readdir", self.fs.lookup, ino, b"..")
            if not fuse.readdir_reply(token, b"..", self._entry(a), _DOTDOT_COOKIE):
                return
            start_id = _DOTDOT_COOKIE
        cookie = 0 if start_id == _DOTDOT_COOKIE else start_id
        # About as many entries as the reply holds (names of ~20 bytes):
        # what does not fit would be read again by the next READDIR.
        size = (fuse.proto.direntplus_size if token.plus else fuse.proto.dirent_size)(b"x" * 20)
        want = max(8, min(_READDIR_BATCH, token.size // size + 1))
        while True:
            batch = await self._call("readdir", self.fs.readdir, ino, cookie, want)
            await self._call("readdir", self.fs.prefetch_inodes, [c for _, c, _ in batch])
            # every entry's attributes in one operation
            attrs = await self._call("readdir", self.fs.getattr_many, [c for _, c, _ in batch])
            for (name, child, key), a in zip(batch, attrs):
                if a is None:
                    continue            # removed since the batch was read
                entry = self._entry(a)
                if not fuse.readdir_reply(token, name, entry, key):
                    return
                if token.plus:          # (only READDIRPLUS entries are references)
                    await self._looked_up(entry)
                cookie = key
            if len(batch) < want:
                return

    async def releasedir(self, fh):
        if self._dirs.pop(fh, None) is not None:
            await self._call("releasedir", self.fs.release, fh)

    async def fsyncdir(self, fh, datasync):
        await self._call("fsyncdir", self.fs.fsync, None, bool(datasync))

    # ---------------------------------------------------------------- xattrs

    _XATTR_NAMESPACES = (b"user.", b"trusted.", b"security.")

    @classmethod
    def _no_acl(cls, name) -> None:
        # Without FUSE's POSIX ACL support the kernel hands ACLs over as
        # plain xattrs.  Storing them would make cp -a, tar and setfacl
        # believe permissions were set while the mode stays unchanged;
        # EOPNOTSUPP makes them fall back to chmod.  Names outside the
        # namespaces a local filesystem knows are refused the same way
        # (the kernel passes any prefix through to FUSE).
        if not bytes(name).startswith(cls._XATTR_NAMESPACES):
            raise fuse.FUSEError(errno.EOPNOTSUPP)

    async def setxattr(self, inode, name, value, ctx):
        self._no_acl(name)
        await self._call("setxattr", self.fs.setxattr, self._disk(inode), name, value,
                         changes=True)

    async def getxattr(self, inode, name, ctx):
        self._no_acl(name)
        return await self._call("getxattr", self.fs.getxattr, self._disk(inode), name)

    async def listxattr(self, inode, ctx):
        return await self._call("listxattr", self.fs.listxattr, self._disk(inode))

    async def removexattr(self, inode, name, ctx):
        await self._call("removexattr", self.fs.removexattr, self._disk(inode), name,
                         changes=True)

    async def access(self, inode, mode, ctx):
        # Only called without default_permissions; the core keeps no ACLs.
        await self._call("access", self.fs.getattr, self._disk(inode))
        return True


class SharedReplfsOperations(ReplfsOperations):
    """A mount of a volume both nodes mount.  No READDIRPLUS: with entry
    and attribute timeouts of 0 the attributes it carries would expire at
    once, and each entry would be a lookup reference that pins the open
    lock of every inode listed (a DLM request per entry)."""

    enable_readdirplus = False
