"""A backing disk that can start answering EIO: a single-file FUSE mount.

    python -m tests.harness.faultydisk IMAGE FILE

mounts, on the regular file FILE, a file with IMAGE's bytes (reads and
writes go to IMAGE with pread/pwrite, fsync to fdatasync; the kernel is
told not to cache: every I/O reaches this process).  SIGUSR1 makes every
read, write and fsync answer EIO from then on, SIGUSR2 makes them work
again, SIGTERM unmounts and exits.  Prints ``READY pid`` once mounted.

For tests of a node whose disk fails under it (no device mapper or
dm-error needed): give the node FILE as its ``disk``.
"""
from __future__ import annotations

import errno
import os
import signal
import stat
import sys
import time

import trio

from replfs import fuse
from replfs.fuse import EntryAttributes, FileInfo, FUSEError, Operations, StatvfsData


class FaultyDisk(Operations):
    def __init__(self, image: str):
        self.fd = os.open(image, os.O_RDWR | os.O_CLOEXEC)
        self.failing = False
        self.errors = 0

    def _attr(self) -> EntryAttributes:
        st = os.fstat(self.fd)
        return EntryAttributes(st_ino=1, st_mode=stat.S_IFREG | 0o600, st_nlink=1,
                               st_size=st.st_size, st_blocks=st.st_blocks,
                               st_mtime_ns=st.st_mtime_ns, st_ctime_ns=st.st_ctime_ns,
                               st_atime_ns=st.st_atime_ns, attr_timeout=0.0,
                               entry_timeout=0.0)

    def _fail(self) -> None:
        if self.failing:
            self.errors += 1
            raise FUSEError(errno.EIO)

    async def getattr(self, inode, ctx):
        return self._attr()

    async def open(self, inode, flags, ctx):
        return FileInfo(fh=1, direct_io=True)

    async def read(self, fh, off, size):
        self._fail()
        return os.pread(self.fd, size, off)

    async def write(self, fh, off, buf):
        self._fail()
        return os.pwrite(self.fd, buf, off)

    async def fsync(self, fh, datasync):
        self._fail()
        os.fdatasync(self.fd)

    async def flush(self, fh):
        pass

    async def release(self, fh):
        pass

    async def statfs(self, ctx):
        return StatvfsData()


async def main_async(image: str, target: str) -> int:
    ops = FaultyDisk(image)
    session = fuse.Session(ops, target, subtype="faultydisk", fsname="faultydisk",
                           options=["allow_other"], rootmode=stat.S_IFREG)
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGUSR1,
                                   signal.SIGUSR2) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(session.run)
            print("READY", os.getpid(), flush=True)
            async for sig in signals:
                if sig == signal.SIGUSR1:
                    ops.failing = True
                    print(f"{time.time():.3f} failing", file=sys.stderr, flush=True)
                elif sig == signal.SIGUSR2:
                    ops.failing = False
                    print(f"{time.time():.3f} working ({ops.errors} errors answered)",
                          file=sys.stderr, flush=True)
                else:
                    break
            try:
                await session.unmount(grace=2)
            except OSError as exc:
                print(f"unmount {target}: {exc}", file=sys.stderr, flush=True)
                session.stop()
            nursery.cancel_scope.cancel()
    return 0


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print(__doc__, file=sys.stderr)
        return 1
    return trio.run(main_async, *args)


if __name__ == "__main__":
    sys.exit(main())
