"""A small in-memory filesystem on replfs.fuse, for tests of the FUSE layer.

Several mounts of one process share one ``MemStore`` (and one lock
service), the way two mounts of one volume would: a lock taken through one
mount conflicts with the other, and with ``--notify`` a change made through
one mount invalidates the other mount's kernel caches.

It keeps pyfuse3-tmpfs habits: explicit lookup counts per mount, an
unlinked inode lives until every mount forgot it and every handle closed,
readdir resumes from stable per-entry cookies.  Data are bytearrays with a
set of allocated 4 KiB blocks, so fallocate (0, KEEP_SIZE, PUNCH_HOLE,
ZERO_RANGE) and SEEK_DATA/SEEK_HOLE have something real to report.

    python -m tests.harness.memfs MNT [MNT ...] [--notify] [--attr-timeout S]

prints ``READY`` once every mount answers, serves until SIGTERM/SIGINT,
unmounts, and prints ``STATS {json}`` (per-session counters and protocol
violations) before it exits.
"""
from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import signal
import stat
import sys
import time

import trio

from replfs import fuse
from replfs.fuse import (EntryAttributes, FileInfo, FUSEError, LocalLocks, LockService,
                         Operations, StatvfsData, readdir_reply)

BLOCK = 4096
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
SEEK_DATA = 3
SEEK_HOLE = 4
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2


class Inode:
    __slots__ = ("ino", "mode", "nlink", "uid", "gid", "rdev", "data", "blocks", "atime_ns",
                 "mtime_ns", "ctime_ns", "xattrs", "children", "target", "parent", "next_cookie",
                 "opens")

    def __init__(self, ino, mode, uid, gid, rdev=0):
        now = time.time_ns()
        self.ino = ino
        self.mode = mode
        self.nlink = 2 if stat.S_ISDIR(mode) else 1
        self.uid, self.gid, self.rdev = uid, gid, rdev
        self.data = bytearray()
        self.blocks: set[int] = set()
        self.atime_ns = self.mtime_ns = self.ctime_ns = now
        self.xattrs: dict[bytes, bytes] = {}
        self.children: dict[bytes, tuple[int, int]] = {}    # name -> (ino, cookie)
        self.target = b""
        self.parent = ino
        self.next_cookie = 3        # 1 and 2 are "." and ".."
        self.opens = 0


class MemStore:
    """The shared state of every mount of one in-memory volume."""

    def __init__(self, notify: bool = False):
        self.inodes: dict[int, Inode] = {}
        self.next_ino = 2
        root = Inode(fuse.ROOT_INODE, stat.S_IFDIR | 0o777, 0, 0)
        self.inodes[root.ino] = root
        self.mounts: list["MemOps"] = []
        self.locks = LockService()
        self.notify = notify

    def new(self, mode, uid, gid, rdev=0) -> Inode:
        ino = self.next_ino
        self.next_ino += 1
        node = Inode(ino, mode, uid, gid, rdev)
        self.inodes[ino] = node
        return node

    def maybe_free(self, ino: int) -> None:
        node = self.inodes.get(ino)
        if node is None or ino == fuse.ROOT_INODE or node.nlink > 0 or node.opens:
            return
        if any(m.lookups.get(ino) for m in self.mounts):
            return
        del self.inodes[ino]

    def changed(self, origin: "MemOps", ino: int) -> None:
        if self.notify:
            for m in self.mounts:
                if m is not origin and m.session is not None and m.lookups.get(ino):
                    m.session.invalidate_inode(ino, 0, 0)

    def entry_changed(self, origin: "MemOps", parent: int, name: bytes) -> None:
        if self.notify:
            for m in self.mounts:
                if m is not origin and m.session is not None:
                    m.session.invalidate_entry(parent, name)


class MemOps(LocalLocks, Operations):
    """One mount's view of a MemStore."""

    task_opcodes = fuse.ALL_INLINE      # nothing here blocks except lock waits

    def __init__(self, store: MemStore, *, attr_timeout: float = 1.0,
                 entry_timeout: float = 1.0, keep_cache: bool = False):
        self.store = store
        self.lock_service = store.locks
        self.attr_timeout = attr_timeout
        self.entry_timeout = entry_timeout
        self.keep_cache = keep_cache
        self.lookups: dict[int, int] = {}
        self.handles: dict[int, int] = {}       # fh -> ino
        self.next_fh = 1
        self.session = None
        store.mounts.append(self)

    # ------------------------------------------------------------- helpers

    def init(self, session):
        self.session = session

    async def destroy(self, session):
        await super().destroy(session)
        self.session = None
        for ino in list(self.lookups):
            self.lookups.pop(ino)
            self.store.maybe_free(ino)

    def _node(self, ino: int) -> Inode:
        node = self.store.inodes.get(ino)
        if node is None:
            raise FUSEError(errno.ESTALE)
        return node

    def _dir(self, ino: int) -> Inode:
        node = self._node(ino)
        if not stat.S_ISDIR(node.mode):
            raise FUSEError(errno.ENOTDIR)
        return node

    def _attr(self, node: Inode) -> EntryAttributes:
        size = len(node.target) if stat.S_ISLNK(node.mode) else len(node.data)
        return EntryAttributes(
            st_ino=node.ino, generation=0, entry_timeout=self.entry_timeout,
            attr_timeout=self.attr_timeout, st_mode=node.mode, st_nlink=node.nlink,
            st_uid=node.uid, st_gid=node.gid, st_rdev=node.rdev, st_size=size,
            st_blksize=BLOCK, st_blocks=len(node.blocks) * (BLOCK // 512),
            st_atime_ns=node.atime_ns, st_mtime_ns=node.mtime_ns, st_ctime_ns=node.ctime_ns)

    def _ref(self, node: Inode) -> EntryAttributes:
        self.lookups[node.ino] = self.lookups.get(node.ino, 0) + 1
        return self._attr(node)

    def _touch(self, node: Inode, *, data: bool = True) -> None:
        now = time.time_ns()
        node.ctime_ns = now
        if data:
            node.mtime_ns = now
        self.store.changed(self, node.ino)

    def _add_child(self, parent: Inode, name: bytes, node: Inode) -> None:
        parent.children[name] = (node.ino, parent.next_cookie)
        parent.next_cookie += 1
        if stat.S_ISDIR(node.mode):
            node.parent = parent.ino
            parent.nlink += 1
        self._touch(parent)
        self.store.entry_changed(self, parent.ino, name)

    def _new_child(self, parent_ino, name, mode, ctx, rdev=0) -> Inode:
        parent = self._dir(parent_ino)
        if name in parent.children:
            raise FUSEError(errno.EEXIST)
        if len(name) > 255:
            raise FUSEError(errno.ENAMETOOLONG)
        gid = parent.gid if parent.mode & stat.S_ISGID else ctx.gid
        node = self.store.new(mode, ctx.uid, gid, rdev)
        self._add_child(parent, name, node)
        return node

    # ------------------------------------------------------------- names

    async def lookup(self, parent_inode, name, ctx):
        parent = self._dir(parent_inode)
        if name == b".":
            return self._ref(parent)
        if name == b"..":
            return self._ref(self._node(parent.parent))
        child = parent.children.get(name)
        if child is None:
            raise FUSEError(errno.ENOENT)
        return self._ref(self._node(child[0]))

    async def forget(self, inode_list):
        for ino, n in inode_list:
            left = self.lookups.get(ino, 0) - n
            if left > 0:
                self.lookups[ino] = left
            else:
                self.lookups.pop(ino, None)
                self.store.maybe_free(ino)

    async def getattr(self, inode, ctx):
        return self._attr(self._node(inode))

    async def setattr(self, inode, attr, fields, fh, ctx):
        node = self._node(inode)
        if fields.update_size:
            self._truncate(node, attr.st_size)
        if fields.update_mode:
            node.mode = (node.mode & stat.S_IFMT) | (attr.st_mode & 0o7777)
        if fields.update_uid:
            node.uid = attr.st_uid
        if fields.update_gid:
            node.gid = attr.st_gid
        if fields.update_atime:
            node.atime_ns = attr.st_atime_ns
        if fields.update_mtime:
            node.mtime_ns = attr.st_mtime_ns
        node.ctime_ns = attr.st_ctime_ns if fields.update_ctime else time.time_ns()
        self.store.changed(self, node.ino)
        return self._attr(node)

    def _truncate(self, node: Inode, size: int) -> None:
        if stat.S_ISDIR(node.mode):
            raise FUSEError(errno.EISDIR)
        if size < len(node.data):
            del node.data[size:]
            node.blocks = {b for b in node.blocks if b * BLOCK < size}
        else:
            node.data.extend(bytes(size - len(node.data)))
        self._touch(node)

    async def readlink(self, inode, ctx):
        node = self._node(inode)
        if not stat.S_ISLNK(node.mode):
            raise FUSEError(errno.EINVAL)
        return node.target

    async def mknod(self, parent_inode, name, mode, rdev, ctx):
        return self._ref(self._new_child(parent_inode, name, mode, ctx, rdev))

    async def mkdir(self, parent_inode, name, mode, ctx):
        return self._ref(self._new_child(parent_inode, name, stat.S_IFDIR | (mode & 0o7777), ctx))

    async def symlink(self, parent_inode, name, target, ctx):
        node = self._new_child(parent_inode, name, stat.S_IFLNK | 0o777, ctx)
        node.target = bytes(target)
        return self._ref(node)

    async def link(self, inode, new_parent_inode, new_name, ctx):
        node = self._node(inode)
        if stat.S_ISDIR(node.mode):
            raise FUSEError(errno.EPERM)
        parent = self._dir(new_parent_inode)
        if new_name in parent.children:
            raise FUSEError(errno.EEXIST)
        node.nlink += 1
        self._add_child(parent, new_name, node)
        self._touch(node, data=False)
        return self._ref(node)

    def _remove(self, parent: Inode, name: bytes, want_dir: bool) -> Inode:
        child = parent.children.get(name)
        if child is None:
            raise FUSEError(errno.ENOENT)
        node = self._node(child[0])
        if want_dir:
            if not stat.S_ISDIR(node.mode):
                raise FUSEError(errno.ENOTDIR)
            if node.children:
                raise FUSEError(errno.ENOTEMPTY)
        elif stat.S_ISDIR(node.mode):
            raise FUSEError(errno.EISDIR)
        del parent.children[name]
        if stat.S_ISDIR(node.mode):
            parent.nlink -= 1
            node.nlink = 0
        else:
            node.nlink -= 1
        self._touch(parent)
        self._touch(node, data=False)
        self.store.entry_changed(self, parent.ino, name)
        self.store.maybe_free(node.ino)
        return node

    async def unlink(self, parent_inode, name, ctx):
        self._remove(self._dir(parent_inode), name, False)

    async def rmdir(self, parent_inode, name, ctx):
        self._remove(self._dir(parent_inode), name, True)

    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        old_dir = self._dir(parent_inode_old)
        new_dir = self._dir(parent_inode_new)
        if name_old not in old_dir.children:
            raise FUSEError(errno.ENOENT)
        src = self._node(old_dir.children[name_old][0])
        dst = new_dir.children.get(name_new)
        if flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE):
            raise FUSEError(errno.EINVAL)
        if flags & RENAME_NOREPLACE and dst is not None:
            raise FUSEError(errno.EEXIST)
        if flags & RENAME_EXCHANGE:
            if dst is None:
                raise FUSEError(errno.ENOENT)
            other = self._node(dst[0])
            old_dir.children[name_old] = (other.ino, old_dir.children[name_old][1])
            new_dir.children[name_new] = (src.ino, dst[1])
            for node, d in ((src, new_dir), (other, old_dir)):
                if stat.S_ISDIR(node.mode):
                    node.parent = d.ino
            self._touch(old_dir)
            self._touch(new_dir)
            return
        if dst is not None:
            if dst[0] == src.ino:
                return
            self._remove(new_dir, name_new, stat.S_ISDIR(src.mode))
        del old_dir.children[name_old]
        if stat.S_ISDIR(src.mode):
            old_dir.nlink -= 1
        self.store.entry_changed(self, old_dir.ino, name_old)
        self._add_child(new_dir, name_new, src)
        self._touch(old_dir)
        self._touch(src, data=False)

    async def statfs(self, ctx):
        used = sum(len(n.blocks) for n in self.store.inodes.values())
        total = 1 << 20
        return StatvfsData(f_bsize=BLOCK, f_frsize=BLOCK, f_blocks=total, f_bfree=total - used,
                           f_bavail=total - used, f_files=1 << 20,
                           f_ffree=(1 << 20) - len(self.store.inodes),
                           f_favail=(1 << 20) - len(self.store.inodes), f_namemax=255)

    # ------------------------------------------------------------- files

    def _handle(self, node: Inode) -> int:
        fh = self.next_fh
        self.next_fh += 1
        self.handles[fh] = node.ino
        node.opens += 1
        return fh

    def _fnode(self, fh: int) -> Inode:
        ino = self.handles.get(fh)
        if ino is None:
            raise FUSEError(errno.EBADF)
        return self._node(ino)

    async def open(self, inode, flags, ctx):
        node = self._node(inode)
        if stat.S_ISDIR(node.mode):
            raise FUSEError(errno.EISDIR)
        if flags & os.O_TRUNC and (flags & os.O_ACCMODE) != os.O_RDONLY:
            self._truncate(node, 0)
        return FileInfo(fh=self._handle(node), keep_cache=self.keep_cache,
                        direct_io=bool(flags & os.O_DIRECT))

    async def create(self, parent_inode, name, mode, flags, ctx):
        node = self._new_child(parent_inode, name, stat.S_IFREG | (mode & 0o7777), ctx)
        return (FileInfo(fh=self._handle(node), keep_cache=self.keep_cache),
                self._ref(node))

    async def read(self, fh, off, size):
        node = self._fnode(fh)
        return bytes(node.data[off:off + size])

    def _mark(self, node: Inode, off: int, length: int) -> None:
        if length > 0:
            node.blocks.update(range(off // BLOCK, (off + length - 1) // BLOCK + 1))

    async def write(self, fh, off, buf):
        node = self._fnode(fh)
        end = off + len(buf)
        if end > len(node.data):
            node.data.extend(bytes(end - len(node.data)))
        node.data[off:end] = buf
        self._mark(node, off, len(buf))
        self._touch(node)
        return len(buf)

    async def release(self, fh):
        node = self._fnode(fh)
        del self.handles[fh]
        node.opens -= 1
        self.store.maybe_free(node.ino)

    async def fsync(self, fh, datasync):
        self._fnode(fh)

    async def fallocate(self, fh, off, length, mode):
        node = self._fnode(fh)
        end = off + length
        if mode & ~(FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE):
            raise FUSEError(errno.EOPNOTSUPP)
        if mode & FALLOC_FL_PUNCH_HOLE:
            if not mode & FALLOC_FL_KEEP_SIZE or mode & FALLOC_FL_ZERO_RANGE:
                raise FUSEError(errno.EOPNOTSUPP)
            stop = min(end, len(node.data))
            if stop > off:
                node.data[off:stop] = bytes(stop - off)
            first = (off + BLOCK - 1) // BLOCK
            last = end // BLOCK            # exclusive: only whole blocks are freed
            node.blocks.difference_update(range(first, last))
            self._touch(node)
            return
        if mode & FALLOC_FL_ZERO_RANGE:
            stop = min(end, len(node.data))
            if stop > off:
                node.data[off:stop] = bytes(stop - off)
        if end > len(node.data) and not mode & FALLOC_FL_KEEP_SIZE:
            node.data.extend(bytes(end - len(node.data)))
        self._mark(node, off, length)
        self._touch(node)

    async def lseek(self, fh, off, whence):
        node = self._fnode(fh)
        size = len(node.data)
        if off >= size:
            raise FUSEError(errno.ENXIO)
        if whence == SEEK_DATA:
            b = off // BLOCK
            while b * BLOCK < size:
                if b in node.blocks:
                    return max(off, b * BLOCK)
                b += 1
            raise FUSEError(errno.ENXIO)
        if whence == SEEK_HOLE:
            b = off // BLOCK
            while b * BLOCK < size:
                if b not in node.blocks:
                    return max(off, b * BLOCK)
                b += 1
            return size
        raise FUSEError(errno.EINVAL)

    async def copy_file_range(self, fh_in, off_in, fh_out, off_out, length, flags):
        src = self._fnode(fh_in)
        data = bytes(src.data[off_in:off_in + length])
        return await self.write(fh_out, off_out, data)

    # ------------------------------------------------------------- directories

    async def opendir(self, inode, ctx):
        node = self._dir(inode)
        return self._handle(node)

    async def readdir(self, fh, start_id, token):
        node = self._fnode(fh)
        if start_id < 1:
            if not readdir_reply(token, b".", self._attr(node), 1):
                return
        if start_id < 2:
            if not readdir_reply(token, b"..", self._attr(self._node(node.parent)), 2):
                return
        for name, (ino, cookie) in sorted(node.children.items(), key=lambda kv: kv[1][1]):
            if cookie <= start_id:
                continue
            child = self.store.inodes.get(ino)
            if child is None:
                continue
            if not readdir_reply(token, name, self._attr(child), cookie):
                return
            if token.plus:
                self.lookups[ino] = self.lookups.get(ino, 0) + 1

    async def releasedir(self, fh):
        await self.release(fh)

    async def fsyncdir(self, fh, datasync):
        self._fnode(fh)

    # ------------------------------------------------------------- xattrs

    async def setxattr(self, inode, name, value, ctx):
        node = self._node(inode)
        node.xattrs[bytes(name)] = bytes(value)
        self._touch(node, data=False)

    async def getxattr(self, inode, name, ctx):
        try:
            return self._node(inode).xattrs[bytes(name)]
        except KeyError:
            raise FUSEError(errno.ENODATA) from None

    async def listxattr(self, inode, ctx):
        return list(self._node(inode).xattrs)

    async def removexattr(self, inode, name, ctx):
        node = self._node(inode)
        if node.xattrs.pop(bytes(name), None) is None:
            raise FUSEError(errno.ENODATA)
        self._touch(node, data=False)


# --------------------------------------------------------------------- server

async def main_async(args) -> int:
    store = MemStore(notify=args.notify)
    sessions = []
    rc = 0
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            for mp in args.mountpoints:
                ops = MemOps(store, attr_timeout=args.attr_timeout,
                             entry_timeout=args.attr_timeout, keep_cache=args.keep_cache)
                s = fuse.Session(ops, mp, subtype=args.subtype, fsname="memfs",
                                 options=["default_permissions", "allow_other"],
                                 debug=True)
                await nursery.start(s.run)
                sessions.append(s)
            print("READY", os.getpid(), flush=True)
            async for _sig in signals:
                break
            for s in sessions:
                try:
                    await s.unmount(grace=2)
                except OSError as exc:
                    print(f"unmount {s.mountpoint}: {exc}", file=sys.stderr, flush=True)
                    s.stop()
                    rc = 1
            nursery.cancel_scope.cancel()
    stats = {s.mountpoint: {"stats": dict(s.stats),
                            "ops": {fuse.proto.Opcode(k).name if k in fuse.proto.Opcode._value2member_map_
                                    else str(k): v for k, v in s.op_counts.items()},
                            "violations": s.violations,
                            "locks": dict(store.locks.counters)} for s in sessions}
    print("STATS", json.dumps(stats), flush=True)
    return rc


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("mountpoints", nargs="+")
    p.add_argument("--notify", action="store_true")
    p.add_argument("--attr-timeout", type=float, default=1.0)
    p.add_argument("--keep-cache", action="store_true")
    p.add_argument("--subtype", default="replfs-test")
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="memfs %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    return trio.run(main_async, args)


if __name__ == "__main__":
    sys.exit(main())
