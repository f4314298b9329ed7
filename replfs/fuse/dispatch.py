"""Request -> Operations method mapping and the single error funnel.

Every request that gets a reply passes through ``run_request``: it calls
the opcode's adapter (decode-side arguments -> ``Operations`` method ->
reply payload) and turns whatever escapes into exactly one reply:

* ``FUSEError(e)`` and ``OSError(e)`` answer errno ``e``;
* ``KernelProtocolError`` (the kernel's bytes did not parse) and
  ``FuseUsageError`` (a handler returned something the protocol cannot
  carry) are logged and answer EIO;
* anything else is a bug in the filesystem: logged with its traceback,
  answered EIO, and the reader goes on serving;
* ``trio.Cancelled`` passes through: the session answers EINTR (an
  INTERRUPT cancelled the request) or EIO (the session is shutting down).

The adapters are the one place that knows which request calls which
method with which arguments; ``HANDLERS`` is the table.
"""
from __future__ import annotations

import contextvars
import errno
import logging
import os
import time

import trio

from . import proto
from .api import EntryAttributes, FileInfo, FileLock, ReaddirToken, RequestContext, SetattrFields
from .errors import FUSEError
from .locks import Kind
from .proto import FuseUsageError, KernelProtocolError, Opcode

log = logging.getLogger("replfs.fuse")

# The request whose handler is running (for notify ordering, see session).
CURRENT_REQUEST: contextvars.ContextVar = contextvars.ContextVar("replfs_fuse_request",
                                                                 default=None)


class Request:
    """One request that is owed a reply."""

    __slots__ = ("header", "opcode", "unique", "nodeid", "args", "ctx", "counted", "replied",
                 "notifies", "received")

    def __init__(self, header: proto.InHeader, args, session):
        self.header = header
        self.opcode = header.opcode
        self.unique = header.unique
        self.nodeid = header.nodeid
        self.args = args
        self.ctx = RequestContext(header.uid, header.gid, header.pid, 0, session, header.nodeid)
        self.counted: list[int] = []     # lookup references the reply hands to the kernel
        self.replied = False
        self.notifies: list | None = None
        self.received = time.monotonic()


def _entry(req: Request, a: EntryAttributes) -> bytes:
    if not isinstance(a, EntryAttributes):
        raise FuseUsageError(f"expected EntryAttributes, got {type(a).__name__}")
    payload = proto.entry_out(a)
    if a.st_ino:
        req.counted.append(a.st_ino)
    return payload


def _open_payload(fi, s=None) -> bytes:
    """open_out for ``fi``; ``s``: the session of a file open, which
    counts its direct_io handles (their sync writes, see ``_write``)."""
    if isinstance(fi, int):
        return proto.open_out(fi, 0)
    if not isinstance(fi, FileInfo):
        raise FuseUsageError(f"expected FileInfo or a handle, got {type(fi).__name__}")
    if s is not None and fi.direct_io:
        s.direct_handles[fi.fh] += 1
    return proto.open_out(fi.fh, fi.open_flags())


def _sized(data: bytes, size: int) -> bytes:
    """getxattr/listxattr: size 0 asks for the length, too small is ERANGE."""
    if size == 0:
        return proto.getxattr_out(len(data))
    if len(data) > size:
        raise FUSEError(errno.ERANGE)
    return data


async def _lookup(s, r):
    return _entry(r, await s.ops.lookup(r.nodeid, r.args.name, r.ctx))


async def _getattr(s, r):
    if r.args.has_fh:
        r.ctx.fh = r.args.fh
    return proto.attr_out(await s.ops.getattr(r.nodeid, r.ctx))


async def _setattr(s, r):
    a = r.args
    v = a.valid
    attr = EntryAttributes(st_ino=r.nodeid)
    f = SetattrFields()
    if v & proto.FATTR_MODE:
        f.update_mode, attr.st_mode = True, a.mode
    if v & proto.FATTR_UID:
        f.update_uid, attr.st_uid = True, a.uid
    if v & proto.FATTR_GID:
        f.update_gid, attr.st_gid = True, a.gid
    if v & proto.FATTR_SIZE:
        f.update_size, attr.st_size = True, a.size
    now = None
    if v & proto.FATTR_ATIME:
        f.update_atime = True
        if v & proto.FATTR_ATIME_NOW:
            f.atime_now = True
            now = attr.st_atime_ns = time.time_ns()
        else:
            attr.st_atime_ns = a.atime * 1_000_000_000 + a.atimensec
    if v & proto.FATTR_MTIME:
        f.update_mtime = True
        if v & proto.FATTR_MTIME_NOW:
            f.mtime_now = True
            attr.st_mtime_ns = now if now is not None else time.time_ns()
        else:
            attr.st_mtime_ns = a.mtime * 1_000_000_000 + a.mtimensec
    if v & proto.FATTR_CTIME:
        f.update_ctime, attr.st_ctime_ns = True, a.ctime * 1_000_000_000 + a.ctimensec
    if v & proto.FATTR_KILL_SUIDGID:
        f.kill_suidgid = True
    if v & proto.FATTR_LOCKOWNER:
        r.ctx.lock_owner = a.lock_owner
    fh = a.fh if v & proto.FATTR_FH else None
    return proto.attr_out(await s.ops.setattr(r.nodeid, attr, f, fh, r.ctx))


async def _readlink(s, r):
    target = await s.ops.readlink(r.nodeid, r.ctx)
    return bytes(target)


async def _symlink(s, r):
    return _entry(r, await s.ops.symlink(r.nodeid, r.args.name, r.args.target, r.ctx))


async def _mknod(s, r):
    r.ctx.umask = r.args.umask
    return _entry(r, await s.ops.mknod(r.nodeid, r.args.name, r.args.mode, r.args.rdev, r.ctx))


async def _mkdir(s, r):
    r.ctx.umask = r.args.umask
    return _entry(r, await s.ops.mkdir(r.nodeid, r.args.name, r.args.mode, r.ctx))


async def _unlink(s, r):
    await s.ops.unlink(r.nodeid, r.args.name, r.ctx)


async def _rmdir(s, r):
    await s.ops.rmdir(r.nodeid, r.args.name, r.ctx)


async def _rename(s, r):
    a = r.args
    await s.ops.rename(r.nodeid, a.old, a.newdir, a.new, a.flags, r.ctx)


async def _link(s, r):
    return _entry(r, await s.ops.link(r.args.oldnodeid, r.nodeid, r.args.newname, r.ctx))


async def _open(s, r):
    if r.args.open_flags & proto.OPEN_KILL_SUIDGID and s.ops.handle_killpriv_v2:
        r.ctx.kill_suidgid = True
    return _open_payload(await s.ops.open(r.nodeid, r.args.flags, r.ctx), s)


async def _read(s, r):
    data = await s.ops.read(r.args.fh, r.args.offset, r.args.size)
    if len(data) > r.args.size:
        raise FuseUsageError(f"read returned {len(data)} bytes for a read of {r.args.size}")
    return data


_O_SYNC_ONLY = os.O_SYNC & ~os.O_DSYNC     # __O_SYNC: O_SYNC sets both bits
_KILL = {"kill_suidgid": True}


async def _write(s, r):
    a = r.args
    # The kernel syncs a cached handle's O_DSYNC write with an FSYNC of its
    # own; a direct_io handle's write only carries the flag.
    # (HANDLE_KILLPRIV_V2: the writer lacks CAP_FSETID, set-id bits go)
    kw = _KILL if a.write_flags & proto.WRITE_KILL_SUIDGID and s.ops.handle_killpriv_v2 else {}
    if a.flags & os.O_DSYNC and s.direct_handles.get(a.fh):
        n = await s.ops.write_sync(a.fh, a.offset, a.data, not a.flags & _O_SYNC_ONLY, **kw)
    else:
        n = await s.ops.write(a.fh, a.offset, a.data, **kw)
    return proto.write_out(n)


async def _statfs(s, r):
    st = await s.ops.statfs(r.ctx)
    return proto.statfs_out(st.f_blocks, st.f_bfree, st.f_bavail, st.f_files, st.f_ffree,
                            st.f_bsize, st.f_namemax, st.f_frsize)


async def _release(s, r):
    a = r.args
    try:
        if a.release_flags & proto.RELEASE_FLOCK_UNLOCK:
            r.ctx.lock_owner = a.lock_owner
            await s.ops.release_locks(r.nodeid, Kind.FLOCK, a.lock_owner, r.ctx)
    finally:
        _forget_handle(s, a.fh)
        await s.ops.release(a.fh)


def _forget_handle(s, fh: int) -> None:
    left = s.direct_handles.get(fh, 0) - 1
    if left > 0:
        s.direct_handles[fh] = left
    else:
        s.direct_handles.pop(fh, None)


async def _fsync(s, r):
    await s.ops.fsync(r.args.fh, r.args.datasync)


_XATTR_CREATE = 1
_XATTR_REPLACE = 2


async def _setxattr(s, r):
    # setxattr has no flags argument (as in pyfuse3); XATTR_CREATE and
    # XATTR_REPLACE are checked with a getxattr first, as pyfuse3 does.
    flags = r.args.flags
    if flags & ~(_XATTR_CREATE | _XATTR_REPLACE):
        raise FUSEError(errno.EINVAL)
    if flags & _XATTR_CREATE:
        try:
            await s.ops.getxattr(r.nodeid, r.args.name, r.ctx)
        except FUSEError as exc:
            if exc.errno != errno.ENODATA:
                raise
        else:
            raise FUSEError(errno.EEXIST)
    elif flags & _XATTR_REPLACE:
        await s.ops.getxattr(r.nodeid, r.args.name, r.ctx)
    await s.ops.setxattr(r.nodeid, r.args.name, r.args.value, r.ctx)


async def _getxattr(s, r):
    return _sized(bytes(await s.ops.getxattr(r.nodeid, r.args.name, r.ctx)), r.args.size)


async def _listxattr(s, r):
    names = await s.ops.listxattr(r.nodeid, r.ctx)
    return _sized(b"".join(bytes(n) + b"\0" for n in names), r.args.size)


async def _removexattr(s, r):
    await s.ops.removexattr(r.nodeid, r.args.name, r.ctx)


async def _flush(s, r):
    r.ctx.lock_owner = r.args.lock_owner
    if s.negotiated.has(proto.POSIX_LOCKS):
        # close(2) of any descriptor drops the process's POSIX locks on the file.
        await s.ops.release_locks(r.nodeid, Kind.POSIX, r.args.lock_owner, r.ctx)
    try:
        await s.ops.flush(r.args.fh)
    except FUSEError as exc:
        # ENOSYS would make the kernel stop sending FLUSH (and lock releases).
        if exc.errno != errno.ENOSYS:
            raise


async def _opendir(s, r):
    return _open_payload(await s.ops.opendir(r.nodeid, r.ctx))


async def _readdir(s, r):
    token = ReaddirToken(r.args.size, r.opcode == Opcode.READDIRPLUS)
    try:
        await s.ops.readdir(r.args.fh, r.args.offset, token)
    finally:
        # References of entries already accepted are the filesystem's
        # count even if readdir failed later: the funnel forgets them
        # when the reply does not carry them.
        r.counted.extend(token.counted)
    return token.payload()


async def _releasedir(s, r):
    await s.ops.releasedir(r.args.fh)


async def _fsyncdir(s, r):
    await s.ops.fsyncdir(r.args.fh, r.args.datasync)


def _lock(a: proto.Lk) -> FileLock:
    return FileLock(a.type, a.start, a.end, a.pid)


async def _getlk(s, r):
    a = r.args
    got = await s.ops.getlk(r.nodeid, a.fh, a.owner, _lock(a), r.ctx)
    return proto.lk_out(got.start, got.end, got.type, got.pid)


async def _setlk(s, r):
    a = r.args
    wait = r.opcode == Opcode.SETLKW
    r.ctx.lock_owner = a.owner
    if a.is_flock:
        await s.ops.flock(r.nodeid, a.fh, a.owner, a.type, wait, r.ctx)
    elif wait:
        await s.ops.setlkw(r.nodeid, a.fh, a.owner, _lock(a), r.ctx)
    else:
        await s.ops.setlk(r.nodeid, a.fh, a.owner, _lock(a), r.ctx)


async def _access(s, r):
    if not await s.ops.access(r.nodeid, r.args.mask, r.ctx):
        raise FUSEError(errno.EACCES)


async def _create(s, r):
    a = r.args
    r.ctx.umask = a.umask
    fi, entry = await s.ops.create(r.nodeid, a.name, a.mode, a.flags, r.ctx)
    # entry_out first, then open_out: one reply, two structs.
    return _entry(r, entry) + _open_payload(fi, s)


async def _destroy(s, r):
    s.destroy_received = True


async def _fallocate(s, r):
    a = r.args
    await s.ops.fallocate(a.fh, a.offset, a.length, a.mode)


async def _lseek(s, r):
    a = r.args
    return proto.lseek_out(await s.ops.lseek(a.fh, a.offset, a.whence))


async def _copy_file_range(s, r):
    a = r.args
    n = await s.ops.copy_file_range(a.fh_in, a.off_in, a.fh_out, a.off_out, a.length, a.flags)
    return proto.write_out(n)


HANDLERS = {
    Opcode.LOOKUP: _lookup, Opcode.GETATTR: _getattr, Opcode.SETATTR: _setattr,
    Opcode.READLINK: _readlink, Opcode.SYMLINK: _symlink, Opcode.MKNOD: _mknod,
    Opcode.MKDIR: _mkdir, Opcode.UNLINK: _unlink, Opcode.RMDIR: _rmdir,
    Opcode.RENAME: _rename, Opcode.RENAME2: _rename, Opcode.LINK: _link,
    Opcode.OPEN: _open, Opcode.READ: _read, Opcode.WRITE: _write, Opcode.STATFS: _statfs,
    Opcode.RELEASE: _release, Opcode.FSYNC: _fsync, Opcode.SETXATTR: _setxattr,
    Opcode.GETXATTR: _getxattr, Opcode.LISTXATTR: _listxattr,
    Opcode.REMOVEXATTR: _removexattr, Opcode.FLUSH: _flush, Opcode.OPENDIR: _opendir,
    Opcode.READDIR: _readdir, Opcode.READDIRPLUS: _readdir, Opcode.RELEASEDIR: _releasedir,
    Opcode.FSYNCDIR: _fsyncdir, Opcode.GETLK: _getlk, Opcode.SETLK: _setlk,
    Opcode.SETLKW: _setlk, Opcode.ACCESS: _access, Opcode.CREATE: _create,
    Opcode.DESTROY: _destroy, Opcode.FALLOCATE: _fallocate, Opcode.LSEEK: _lseek,
    Opcode.COPY_FILE_RANGE: _copy_file_range,
    # SYNCFS, BMAP, IOCTL, POLL, TMPFILE, ...: not here, so ENOSYS.
}

# Errors that are normal answers, not worth a log line above debug.
_QUIET = frozenset({errno.ENOENT, errno.EEXIST, errno.ENOTEMPTY, errno.EAGAIN, errno.ENOSYS,
                    errno.ENODATA, errno.ERANGE, errno.EACCES, errno.EPERM, errno.ENOTDIR,
                    errno.EISDIR, errno.EOPNOTSUPP, errno.EINVAL, errno.ENXIO, errno.EDEADLK,
                    errno.EXDEV, errno.ENAMETOOLONG, errno.EROFS, errno.ENOTSUP, errno.EBADF,
                    errno.ELOOP, errno.EINTR})


def _opname(op: int) -> str:
    try:
        return Opcode(op).name
    except ValueError:
        return f"opcode {op}"


# opcode -> its name in the mount's latency histograms (lookup, write, ...)
_OPNAMES = {int(op): op.name.lower() for op in Opcode}


async def run_request(s, req: Request) -> None:
    """Run one request's handler and send its one reply (the error funnel)."""
    token = CURRENT_REQUEST.set(req)
    t0 = time.perf_counter()
    try:
        handler = HANDLERS.get(req.opcode)
        if handler is None:
            s.reply_error(req, errno.ENOSYS)
            return
        try:
            payload = await handler(s, req)
        except FUSEError as exc:
            code = exc.errno
        except OSError as exc:
            code = exc.errno if isinstance(exc.errno, int) and 0 < exc.errno < 4096 else errno.EIO
            if code not in _QUIET:
                log.warning("%s %s: %s", s.name, _opname(req.opcode), exc)
        except (KernelProtocolError, FuseUsageError) as exc:
            s.stats["protocol_errors"] += 1
            log.error("%s %s (unique %d): %s; answering EIO", s.name, _opname(req.opcode),
                      req.unique, exc)
            code = errno.EIO
        except Exception:
            s.stats["handler_errors"] += 1
            log.exception("%s: unexpected error in %s (unique %d); answering EIO", s.name,
                          _opname(req.opcode), req.unique)
            code = errno.EIO
        else:
            delivered = s.reply_ok(req, payload)
            if not delivered and req.counted:
                await _give_back(s, req)
            return
        s.reply_error(req, code)
        if req.counted:
            # The filesystem counted references (e.g. readdir entries) that
            # an error reply does not hand over.
            await _give_back(s, req)
    finally:
        CURRENT_REQUEST.reset(token)
        s.latency.observe(_OPNAMES.get(req.opcode, "other"), time.perf_counter() - t0)


async def _give_back(s, req: Request) -> None:
    """Forget the lookup references of a reply the kernel never got."""
    counts: dict[int, int] = {}
    for ino in req.counted:
        counts[ino] = counts.get(ino, 0) + 1
    req.counted = []
    s.stats["forgotten_undelivered"] += sum(counts.values())
    try:
        with trio.CancelScope(shield=True):
            await s.ops.forget(list(counts.items()))
    except Exception:
        log.exception("%s: forget of undelivered references failed", s.name)
