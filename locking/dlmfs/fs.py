"""A FUSE filesystem with ocfs2_dlmfs semantics, for shell scripts.

    mkdir /dlm/DOMAIN          join the lock domain
    open  /dlm/DOMAIN/NAME     takes the lock (every name exists; lock names
                               are cluster-wide):
                               O_RDONLY -> PR, O_WRONLY/O_RDWR -> EX,
                               O_NONBLOCK -> trylock, failing with ETXTBSY;
                               per node, as in ocfs2_dlmfs: opens here share
                               one cluster lock
    read                       the lock value block (trailing NULs stripped)
    write                      sets the LVB (its first 64 bytes), written back
                               when the EX lock drops
    close                      drops the lock (the last close on this node)
    rm NAME / rmdir DOMAIN     forget the file / leave the domain

One mount per process; run as ``python -m replfs.locking.dlmfs
MOUNTPOINT [--rundir DIR]``.  Every open is one lock held through the local
replfsd (locking/client.py), so a dying mount process drops its locks.
"""
from __future__ import annotations

import argparse
import errno
import logging
import os
import signal
import stat
import sys

from replfs import fuse
import trio

from replfs.blockdev import BlockDeviceError
from replfs.errors import ReplfsError

from ..client import DlmClient
from ..dlm.messages import LVB_LEN
from ..dlm.modes import Mode

log = logging.getLogger("replfs.locking.dlmfs")
ROOT = fuse.ROOT_INODE


class DlmfsOps(fuse.Operations):
    # opens wait for locks and everything asks the daemon: all in workers
    task_opcodes = fuse.ALL_TASKS

    def __init__(self, dlm: DlmClient):
        super().__init__()
        self.dlm = dlm
        self.names: dict[int, tuple[str, str | None]] = {}   # inode -> (domain, lock or None)
        self.inodes: dict[tuple[str, str | None], int] = {}
        self.children: dict[str, set[str]] = {}
        self.next_inode = ROOT + 1
        self.handles: dict[int, tuple[tuple[str, str], bool]] = {}   # fh -> (key, writer)
        self.held: dict[tuple[str, str], "_Held"] = {}
        self._guards: dict[tuple[str, str], trio.Lock] = {}
        self.next_fh = 1

    def _ino(self, key) -> int:
        ino = self.inodes.get(key)
        if ino is None:
            ino = self.inodes[key] = self.next_inode
            self.names[ino] = key
            self.next_inode += 1
        return ino

    def _attr(self, ino: int) -> fuse.EntryAttributes:
        a = fuse.EntryAttributes()
        a.st_ino = ino
        key = self.names.get(ino)
        if ino == ROOT or (key and key[1] is None):
            a.st_mode = stat.S_IFDIR | 0o755
            a.st_nlink = 2
        else:
            a.st_mode = stat.S_IFREG | 0o600
            a.st_nlink = 1
        a.st_size = 0
        a.entry_timeout = a.attr_timeout = 0
        return a

    def _key(self, ino):
        key = self.names.get(ino)
        if key is None:
            raise fuse.FUSEError(errno.ENOENT)
        return key

    async def getattr(self, inode, ctx=None):
        if inode != ROOT:
            self._key(inode)
        return self._attr(inode)

    async def setattr(self, inode, attr, fields, fh, ctx):
        return await self.getattr(inode)

    async def lookup(self, parent, name, ctx=None):
        name = os.fsdecode(name)
        if parent == ROOT:
            if name not in self.children:
                raise fuse.FUSEError(errno.ENOENT)
            return self._attr(self._ino((name, None)))
        domain, lock = self._key(parent)
        if lock is not None:
            raise fuse.FUSEError(errno.ENOTDIR)
        # Lock names are cluster-wide: a name another node created exists
        # here too, so every name in a joined domain resolves.
        self.children[domain].add(name)
        return self._attr(self._ino((domain, name)))

    async def mkdir(self, parent, name, mode, ctx):
        if parent != ROOT:
            raise fuse.FUSEError(errno.EPERM)
        name = os.fsdecode(name)
        if name in self.children:
            raise fuse.FUSEError(errno.EEXIST)
        await self._call(self.dlm.join(name))
        self.children[name] = set()
        return self._attr(self._ino((name, None)))

    async def rmdir(self, parent, name, ctx):
        name = os.fsdecode(name)
        if parent != ROOT or name not in self.children:
            raise fuse.FUSEError(errno.ENOENT)
        if self.children[name]:
            raise fuse.FUSEError(errno.ENOTEMPTY)
        await self._call(self.dlm.leave(name))
        del self.children[name]

    async def unlink(self, parent, name, ctx):
        domain, _ = self._key(parent)
        name = os.fsdecode(name)
        if name not in self.children.get(domain, ()):
            raise fuse.FUSEError(errno.ENOENT)
        self.children[domain].discard(name)

    async def opendir(self, inode, ctx):
        return inode

    async def readdir(self, fh, start_id, token):
        if fh == ROOT:
            entries = [(n, self._ino((n, None))) for n in sorted(self.children)]
        else:
            domain, _ = self._key(fh)
            entries = [(n, self._ino((domain, n))) for n in sorted(self.children.get(domain, ()))]
        for i, (n, ino) in enumerate(entries[start_id:], start=start_id + 1):
            if not fuse.readdir_reply(token, os.fsencode(n), self._attr(ino), i):
                break

    async def create(self, parent, name, mode, flags, ctx):
        domain, lock = self._key(parent)
        if lock is not None:
            raise fuse.FUSEError(errno.ENOTDIR)
        self.children[domain].add(os.fsdecode(name))
        ino = self._ino((domain, os.fsdecode(name)))
        fi = await self.open(ino, flags, ctx)
        return fi, self._attr(ino)

    async def _call(self, coro):
        try:
            return await coro
        except BlockDeviceError as e:
            raise fuse.FUSEError(e.errno or errno.EIO) from None
        except ReplfsError as e:
            log.warning("%s", e)
            raise fuse.FUSEError(errno.EIO) from None

    async def open(self, inode, flags, ctx):
        """Take the lock file's lock.  As in ocfs2_dlmfs, a lock is held per
        node: opens on this node share one cluster lock (two exclusive opens
        here both succeed), raised from PR to EX when a writer comes; a
        trylock (O_NONBLOCK) that fails gives ETXTBSY."""
        domain, name = self._key(inode)
        if name is None:
            raise fuse.FUSEError(errno.EISDIR)
        self._check_fenced()
        write = (flags & os.O_ACCMODE) != os.O_RDONLY
        want = Mode.EX if write else Mode.PR
        nonblock = bool(flags & os.O_NONBLOCK)
        key = (domain, name)
        guard = self._guards.setdefault(key, trio.Lock())
        async with guard:
            e = self.held.get(key)
            try:
                if e is None:
                    lk = await self._call(self.dlm.lock(domain, name, want, noqueue=nonblock))
                    e = self.held[key] = _Held(lk, want)
                elif want is Mode.EX and e.mode is not Mode.EX:
                    await self._call(e.lk.convert(Mode.EX, noqueue=nonblock))
                    e.mode = Mode.EX
            except fuse.FUSEError as err:
                if nonblock and err.errno == errno.EAGAIN:
                    raise fuse.FUSEError(errno.ETXTBSY) from None
                raise
            e.count += 1
        fh = self.next_fh
        self.next_fh += 1
        self.handles[fh] = (key, write)
        return fuse.FileInfo(fh=fh, direct_io=True)

    def _check_fenced(self) -> None:
        """A fenced node's (or a dead daemon's) locks are void: what an open
        lock file says is no longer protected by anything."""
        if self.dlm.fenced is not None:
            raise fuse.FUSEError(errno.EIO)

    async def flush(self, fh):
        # close(2) reports this: a lock lost to a fence is an error
        self._check_fenced()

    async def read(self, fh, off, size):
        self._check_fenced()
        key, _write = self.handles[fh]
        e = self.held[key]
        if e.lvb is not None:
            data = bytes(e.lvb)             # written here under EX
        elif e.lk.lvb_valid:
            data = e.lk.lvb
        else:
            data = b""
        return data.rstrip(b"\0")[off:off + size]

    async def write(self, fh, off, buf):
        """Set the lock value block (written back when the lock drops).  It
        is LVB_LEN bytes: as in ocfs2_dlmfs a longer write writes the first
        bytes that fit and returns that count."""
        self._check_fenced()
        key, write = self.handles[fh]
        if not write:
            raise fuse.FUSEError(errno.EBADF)
        e = self.held[key]
        if e.lvb is None:
            e.lvb = bytearray(e.lk.lvb if e.lk.lvb_valid else b"").ljust(LVB_LEN, b"\0")
        if off >= LVB_LEN:
            return 0
        n = min(len(buf), LVB_LEN - off)
        e.lvb[off:off + n] = buf[:n]
        return n

    async def release(self, fh):
        key, _write = self.handles.pop(fh)
        guard = self._guards.setdefault(key, trio.Lock())
        async with guard:
            e = self.held[key]
            e.count -= 1
            if e.count:
                return
            del self.held[key]
            lvb = bytes(e.lvb) if e.lvb is not None and e.mode is Mode.EX else None
            await self._call(e.lk.unlock(lvb=lvb))


class _Held:
    """The one cluster lock this node holds for a lock file."""

    def __init__(self, lk, mode: Mode):
        self.lk = lk
        self.mode = mode
        self.count = 0
        self.lvb: bytearray | None = None    # set by a write under EX


async def _main(args) -> None:
    async with trio.open_nursery() as nursery:
        async with DlmClient.connect(nursery, args.rundir) as dlm:
            ops = DlmfsOps(dlm)
            session = fuse.Session(ops, args.mountpoint, subtype="dlmfs", fsname="dlmfs",
                                   options=["default_permissions"], max_tasks=32)
            async with trio.open_nursery() as inner:
                await inner.start(session.run)
                print(f"READY {args.mountpoint}", flush=True)

                async def stop():
                    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as sigs:
                        async for _ in sigs:
                            await session.unmount()
                            return
                inner.start_soon(stop)
                await session.wait_ended()
                inner.cancel_scope.cancel()
        nursery.cancel_scope.cancel()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m replfs.locking.dlmfs",
                                 description="Mount a dlmfs (ocfs2_dlmfs semantics) until SIGTERM.")
    ap.add_argument("mountpoint")
    ap.add_argument("--rundir", help="replfsd run directory (default $REPLFS_RUNDIR)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        trio.run(_main, args)
    except ReplfsError as e:
        print(e.message, file=sys.stderr)
        return e.exit_code
    except (OSError, RuntimeError) as e:
        print(f"dlmfs: cannot mount {args.mountpoint}: {e}", file=sys.stderr)
        return 20
    return 0
