"""A minimal FUSE passthrough of a local directory, the FUSE baseline.

It forwards every request to the directory below with plain os calls on
pyfuse3 + trio ("what a user would write"), so the ratio of replfs to this
mount is the cost of replfs itself and the ratio of this mount to the
plain directory is the cost of FUSE and Python.  It runs real trees: files,
directories, symlinks, hard links, fifos and device nodes, renames,
timestamps (never following a symlink), so `tar x` of a source tree, `du`
and `rm -rf` work on it (tests/integration/test_bench_passthrough.py).

usage: python -m bench.passthrough SOURCE_DIR MOUNTPOINT      (foreground)
"""
from __future__ import annotations

import errno
import os
import stat
import sys

import pyfuse3
import trio


class Passthrough(pyfuse3.Operations):
    enable_writeback_cache = False

    def __init__(self, source: str):
        super().__init__()
        self.paths: dict[int, str] = {pyfuse3.ROOT_INODE: source}
        self.lookups: dict[int, int] = {}
        self.dirs: dict[int, tuple[str, list[str]]] = {}
        self._next_dir = 0

    def _path(self, ino: int) -> str:
        try:
            return self.paths[ino]
        except KeyError:
            raise pyfuse3.FUSEError(errno.ESTALE) from None

    def _attr(self, st: os.stat_result, ino: int | None = None) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = ino if ino is not None else st.st_ino
        for name in ("st_mode", "st_nlink", "st_uid", "st_gid", "st_rdev", "st_size",
                     "st_atime_ns", "st_mtime_ns", "st_ctime_ns", "st_blocks"):
            setattr(a, name, getattr(st, name))
        a.st_blksize = 4096
        a.attr_timeout = a.entry_timeout = 1.0
        return a

    def _remember(self, path: str, st: os.stat_result) -> pyfuse3.EntryAttributes:
        """One more lookup of ``path``'s inode (LOOKUP, CREATE, MKDIR,
        SYMLINK, LINK, MKNOD and each READDIRPLUS entry count one)."""
        if st.st_ino == pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(errno.EIO)   # would collide with our root
        self.paths[st.st_ino] = path
        self.lookups[st.st_ino] = self.lookups.get(st.st_ino, 0) + 1
        return self._attr(st)

    @staticmethod
    def _own(where, ctx) -> None:
        """Give a new entry to the caller, as a kernel filesystem does
        (possible only when the server runs as root)."""
        try:
            if isinstance(where, int):
                os.fchown(where, ctx.uid, ctx.gid)
            else:
                os.lchown(where, ctx.uid, ctx.gid)
        except OSError:
            pass

    def _child(self, parent: int, name: bytes) -> str:
        return os.path.join(self._path(parent), os.fsdecode(name))

    @staticmethod
    def _os(fn, *args):
        """Call ``fn``; an OSError becomes the FUSE error with its errno."""
        try:
            return fn(*args)
        except OSError as e:
            raise pyfuse3.FUSEError(e.errno) from None

    async def lookup(self, parent, name, ctx=None):
        path = os.path.join(self._path(parent), os.fsdecode(name))
        return self._remember(path, self._os(os.lstat, path))

    async def forget(self, inode_list):
        for ino, n in inode_list:
            left = self.lookups.get(ino, 0) - n
            if left <= 0:
                self.lookups.pop(ino, None)
                if ino != pyfuse3.ROOT_INODE:
                    self.paths.pop(ino, None)
            else:
                self.lookups[ino] = left

    async def getattr(self, ino, ctx=None):
        st = self._os(os.lstat, self._path(ino))
        return self._attr(st, ino if ino == pyfuse3.ROOT_INODE else None)

    async def setattr(self, ino, attr, fields, fh, ctx):
        path = self._path(ino)
        if fields.update_size:
            if fh is not None:
                self._os(os.ftruncate, fh, attr.st_size)
            else:
                self._os(os.truncate, path, attr.st_size)
        if fields.update_mode:
            # Linux has no lchmod: a symlink's mode is never changed.
            if not stat.S_ISLNK(self._os(os.lstat, path).st_mode):
                self._os(os.chmod, path, stat.S_IMODE(attr.st_mode))
        if fields.update_uid or fields.update_gid:
            self._os(os.lchown, path, attr.st_uid if fields.update_uid else -1,
                     attr.st_gid if fields.update_gid else -1)
        if fields.update_atime or fields.update_mtime:
            st = self._os(os.lstat, path)
            ns = (attr.st_atime_ns if fields.update_atime else st.st_atime_ns,
                  attr.st_mtime_ns if fields.update_mtime else st.st_mtime_ns)
            self._os(lambda: os.utime(path, ns=ns, follow_symlinks=False))
        return await self.getattr(ino)

    async def readlink(self, ino, ctx):
        return os.fsencode(self._os(os.readlink, self._path(ino)))

    async def symlink(self, parent, name, target, ctx):
        path = self._child(parent, name)
        self._os(os.symlink, os.fsdecode(target), path)
        self._own(path, ctx)
        return self._remember(path, self._os(os.lstat, path))

    async def link(self, ino, new_parent, new_name, ctx):
        path = self._child(new_parent, new_name)
        self._os(lambda: os.link(self._path(ino), path, follow_symlinks=False))
        return self._remember(path, self._os(os.lstat, path))

    async def mknod(self, parent, name, mode, rdev, ctx):
        path = self._child(parent, name)
        self._os(os.mknod, path, mode, rdev)
        self._own(path, ctx)
        return self._remember(path, self._os(os.lstat, path))

    async def opendir(self, ino, ctx):
        # One listing per open directory, so that a big directory read in
        # many batches is listed once, not once per batch.
        self._next_dir += 1
        path = self._path(ino)
        self.dirs[self._next_dir] = (path, sorted(self._os(os.listdir, path)))
        return self._next_dir

    async def readdir(self, fh, start_id, token):
        path, names = self.dirs[fh]
        for i in range(start_id, len(names)):
            child = os.path.join(path, names[i])
            try:
                st = os.lstat(child)
            except OSError:
                continue                 # removed since opendir (rm -rf does that)
            if st.st_ino == pyfuse3.ROOT_INODE:
                continue
            if not pyfuse3.readdir_reply(token, os.fsencode(names[i]), self._attr(st), i + 1):
                break
            # READDIRPLUS: the kernel now holds a reference to the entry
            self._remember(child, st)

    async def releasedir(self, fh):
        self.dirs.pop(fh, None)

    async def mkdir(self, parent, name, mode, ctx):
        path = self._child(parent, name)
        self._os(os.mkdir, path, mode)
        self._own(path, ctx)
        return self._remember(path, self._os(os.lstat, path))

    async def rmdir(self, parent, name, ctx):
        self._os(os.rmdir, self._child(parent, name))

    async def unlink(self, parent, name, ctx):
        path = self._child(parent, name)
        st = self._os(os.lstat, path)
        self._os(os.unlink, path)
        if st.st_nlink > 1 and self.paths.get(st.st_ino) == path:
            # a hard link goes: the inode stays reachable by another name
            self._relink(st)

    def _relink(self, st: os.stat_result) -> None:
        """Point a hard-linked inode at a name it still has (a scan of the
        directories we know; the baseline need not be fast at this)."""
        for d in set(os.path.dirname(p) for p in self.paths.values()):
            try:
                with os.scandir(d) as it:
                    for e in it:
                        if e.inode() == st.st_ino:
                            self.paths[st.st_ino] = e.path
                            return
            except OSError:
                pass

    async def rename(self, p_old, n_old, p_new, n_new, flags, ctx):
        if flags:
            raise pyfuse3.FUSEError(errno.EINVAL)
        old, new = self._child(p_old, n_old), self._child(p_new, n_new)
        self._os(os.rename, old, new)
        # every inode we know under the old name now lives under the new one
        prefix = old + os.sep
        for ino, p in list(self.paths.items()):
            if p == old:
                self.paths[ino] = new
            elif p.startswith(prefix):
                self.paths[ino] = new + p[len(old):]

    async def open(self, ino, flags, ctx):
        fd = self._os(os.open, self._path(ino), flags & ~os.O_CREAT)
        return pyfuse3.FileInfo(fh=fd)

    async def create(self, parent, name, mode, flags, ctx):
        path = self._child(parent, name)
        fd = self._os(os.open, path, flags | os.O_CREAT | os.O_TRUNC, mode)
        self._own(fd, ctx)
        return pyfuse3.FileInfo(fh=fd), self._remember(path, self._os(os.fstat, fd))

    async def read(self, fh, off, size):
        return self._os(os.pread, fh, size, off)

    async def write(self, fh, off, buf):
        return self._os(os.pwrite, fh, buf, off)

    async def fsync(self, fh, datasync):
        self._os(os.fdatasync if datasync else os.fsync, fh)

    async def release(self, fh):
        os.close(fh)

    async def statfs(self, ctx):
        st = os.statvfs(self.paths[pyfuse3.ROOT_INODE])
        out = pyfuse3.StatvfsData()
        for name in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files",
                     "f_ffree", "f_favail", "f_namemax"):
            setattr(out, name, getattr(st, name))
        return out


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        print("bench.passthrough: error: expected SOURCE_DIR MOUNTPOINT", file=sys.stderr)
        return 2
    source, mnt = argv
    for what, d in (("source", source), ("mountpoint", mnt)):
        if not os.path.isdir(d):
            print(f"bench.passthrough: error: {what} {d} is not a directory", file=sys.stderr)
            return 2
    ops = Passthrough(os.path.abspath(source))
    opts = set(pyfuse3.default_options) | {"fsname=passthrough", "default_permissions"}
    try:
        pyfuse3.init(ops, mnt, opts)
    except RuntimeError as e:
        print(f"bench.passthrough: cannot mount {mnt}: {e}", file=sys.stderr)
        return 1
    try:
        trio.run(pyfuse3.main)
    except KeyboardInterrupt:
        pass
    finally:
        pyfuse3.close(unmount=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
