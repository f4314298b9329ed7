"""The replicated device as one file: replfs's answer to /dev/drbd0.

A FUSE filesystem whose root inode is a regular file can be mounted over a
regular file.  ``serve_device_file`` does that: the file at ``path`` then
*is* the device, ``dev.size`` bytes long, and every read and write goes
straight to the BlockDevice behind it (the daemon's replicated resource,
or a FileBlockDevice in tests).  Tools that want a block device (mkfs,
fsck, dd, a loop device) use this file.

Semantics follow a block device node rather than a file:

* the size is fixed: a truncate to another size fails with EINVAL (what
  ftruncate says for a block device), O_TRUNC on open is ignored, a write
  that starts at or past the end fails with ENOSPC and one that crosses
  the end is cut short there;
* fsync/fdatasync reach ``dev.flush()``; close does not (as for a device);
* errors of the device (BlockDeviceError, any OSError) reach the caller
  with their errno, so a Secondary's refusal shows as EROFS or EIO,
  whichever its BlockDevice chose; anything unexpected becomes EIO and a
  log line, never the end of the FUSE loop;
* the file is opened with FUSE direct_io by default: no page cache, so a
  read always sees the device (which another node may write in
  dual-primary mode) and O_DIRECT works.

replfsd serves each resource's device file in its own process
(replfs/daemon/devices.py); ``python -m replfs.devfile`` below exports a
plain backing file the same way, for tests and benchmarks.
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import json
import logging
import os
import signal
import stat
import subprocess
import sys
import time

import trio

from replfs import fuse

from replfs.blockdev import BlockDevice, BlockDeviceError, FileBlockDevice
from replfs.blockflags import FUA, write_flagged

log = logging.getLogger(__name__)

FSNAME = "replfs-dev"
_BLOCK = 4096
# The size never changes under us, so the kernel may cache attributes.
_ATTR_TIMEOUT = 60.0


class DeviceFileOps(fuse.Operations):
    """FUSE operations for a single regular file backed by a BlockDevice.

    Only translates: bounds and argument checks here, the I/O in ``dev``,
    errors mapped to errno in ``_device_call``.
    """

    # reads and writes await the device (a daemon round trip): workers
    task_opcodes = fuse.ALL_TASKS

    def __init__(self, dev: BlockDevice, *, readonly: bool = False,
                 direct_io: bool = True, mode: int = 0o600, uid: int = 0, gid: int = 0):
        super().__init__()
        self.dev = dev
        self.readonly = readonly
        self.direct_io = direct_io
        self.mode = mode & 0o7777
        self.uid = uid
        self.gid = gid
        now = time.time_ns()
        self.atime_ns = self.mtime_ns = self.ctime_ns = now
        self.counters = {"reads": 0, "writes": 0, "sync_writes": 0, "bytes_read": 0,
                         "bytes_written": 0, "flushes": 0, "errors": 0}

    # -- helpers -------------------------------------------------------------

    def _attributes(self) -> fuse.EntryAttributes:
        attr = fuse.EntryAttributes()
        attr.st_ino = fuse.ROOT_INODE
        attr.generation = 0
        attr.entry_timeout = _ATTR_TIMEOUT
        attr.attr_timeout = _ATTR_TIMEOUT
        attr.st_mode = stat.S_IFREG | self.mode
        attr.st_nlink = 1
        attr.st_uid = self.uid
        attr.st_gid = self.gid
        attr.st_rdev = 0
        attr.st_size = self.dev.size
        attr.st_blksize = _BLOCK
        attr.st_blocks = (self.dev.size + 511) // 512
        attr.st_atime_ns = self.atime_ns
        attr.st_mtime_ns = self.mtime_ns
        attr.st_ctime_ns = self.ctime_ns
        return attr

    @staticmethod
    def _check_inode(inode: int) -> None:
        if inode != fuse.ROOT_INODE:
            raise fuse.FUSEError(errno.ENOENT)

    async def _device_call(self, what: str, func, *args):
        """Run one device operation; every failure becomes a FUSEError."""
        try:
            return await func(*args)
        except fuse.FUSEError:
            raise
        except OSError as exc:          # BlockDeviceError is an OSError
            self.counters["errors"] += 1
            code = exc.errno or errno.EIO
            log.debug("%s failed with %s: %s", what, errno.errorcode.get(code, code), exc)
            raise fuse.FUSEError(code) from None
        except Exception:
            self.counters["errors"] += 1
            log.exception("unexpected error in device %s; answering EIO", what)
            raise fuse.FUSEError(errno.EIO) from None

    # -- attributes ----------------------------------------------------------

    async def getattr(self, inode, ctx=None):
        self._check_inode(inode)
        return self._attributes()

    async def lookup(self, parent_inode, name, ctx=None):
        # The root is a file: there is nothing to look up inside it.
        raise fuse.FUSEError(errno.ENOTDIR)

    async def setattr(self, inode, attr, fields, fh, ctx):
        self._check_inode(inode)
        if fields.update_size and attr.st_size != self.dev.size:
            raise fuse.FUSEError(errno.EINVAL)
        now = time.time_ns()
        if fields.update_mode:
            self.mode = attr.st_mode & 0o7777
        if fields.update_uid:
            self.uid = attr.st_uid
        if fields.update_gid:
            self.gid = attr.st_gid
        if fields.update_atime:
            self.atime_ns = attr.st_atime_ns
        if fields.update_mtime:
            self.mtime_ns = attr.st_mtime_ns
        self.ctime_ns = now
        return self._attributes()

    async def statfs(self, ctx):
        result = fuse.StatvfsData()
        result.f_bsize = _BLOCK
        result.f_frsize = _BLOCK
        result.f_blocks = self.dev.size // _BLOCK
        result.f_bfree = 0
        result.f_bavail = 0
        result.f_files = 1
        result.f_ffree = 0
        result.f_favail = 0
        result.f_namemax = 255
        return result

    # -- file I/O ------------------------------------------------------------

    async def open(self, inode, flags, ctx):
        self._check_inode(inode)
        if self.readonly and (flags & os.O_ACCMODE) != os.O_RDONLY:
            raise fuse.FUSEError(errno.EROFS)
        # O_TRUNC is ignored, as it is for a block device node.
        return fuse.FileInfo(fh=inode, direct_io=self.direct_io, keep_cache=False)

    async def read(self, fh, off, size):
        if off >= self.dev.size or size <= 0:
            return b""
        size = min(size, self.dev.size - off)
        data = await self._device_call("read", self.dev.read, off, size)
        self.counters["reads"] += 1
        self.counters["bytes_read"] += len(data)
        return data

    async def write(self, fh, off, buf):
        return await self._write(off, buf, 0)

    async def write_sync(self, fh, off, buf, datasync):
        # O_DSYNC/O_SYNC: the write is durable when it completes -- a FUA
        # write (a block device has no metadata for O_SYNC to add), one
        # request where the device takes flags: on a replicated resource
        # one round trip to the peer, not a write and then a flush.
        n = await self._write(off, buf, FUA)
        self.counters["sync_writes"] += 1
        return n

    async def _write(self, off, buf, flags: int) -> int:
        if self.readonly:
            raise fuse.FUSEError(errno.EROFS)
        if off >= self.dev.size:
            raise fuse.FUSEError(errno.ENOSPC)
        if off + len(buf) > self.dev.size:
            buf = buf[:self.dev.size - off]     # short write up to the end
        if flags:
            await self._device_call("write", write_flagged, self.dev, off, bytes(buf), flags)
        else:
            await self._device_call("write", self.dev.write, off, bytes(buf))
        self.counters["writes"] += 1
        self.counters["bytes_written"] += len(buf)
        self.mtime_ns = time.time_ns()
        return len(buf)

    async def fsync(self, fh, datasync):
        await self._device_call("flush", self.dev.flush)
        self.counters["flushes"] += 1

    async def flush(self, fh):
        # close() of a device does not force a cache flush; fsync does.
        pass

    async def release(self, fh):
        pass


def _prepare_mountpoint(path: str) -> None:
    """Make ``path`` a regular file we can mount over.

    A FUSE server killed with SIGKILL leaves its mount behind ("Transport
    endpoint is not connected"); detach such a stale mount first.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        st = None
    except OSError as exc:
        if exc.errno != errno.ENOTCONN:
            raise
        log.warning("%s: detaching a stale FUSE mount left by a dead server", path)
        subprocess.run(["fusermount3", "-u", "-z", path], check=False,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        st = os.stat(path)
    if st is None:
        parent = os.path.dirname(os.path.abspath(path))
        os.makedirs(parent, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        os.close(fd)
    elif not stat.S_ISREG(st.st_mode):
        raise BlockDeviceError(errno.EINVAL, f"{path}: the device file must be a regular "
                               f"file (mount point), not mode {stat.filemode(st.st_mode)}")


async def serve_device_file(dev: BlockDevice, path: str, *, readonly: bool = False,
                            direct_io: bool = True, allow_other: bool = False,
                            debug: bool = False, max_tasks: int = 16,
                            ops: DeviceFileOps | None = None,
                            task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Export ``dev`` as the regular file ``path`` until cancelled.

    Creates ``path`` (and its parents) if missing, mounts, reports
    readiness through ``task_status.started()`` once the mount exists, and
    unmounts when cancelled or when the mount is taken away.  One call per
    process.
    """
    _prepare_mountpoint(path)
    if ops is None:
        ops = DeviceFileOps(dev, readonly=readonly, direct_io=direct_io)
    options = ["default_permissions", "ro" if readonly else "rw"]
    if allow_other:
        options.append("allow_other")
    if debug:
        logging.getLogger("replfs.fuse").setLevel(logging.DEBUG)
    session = fuse.Session(ops, path, subtype=FSNAME, fsname=FSNAME, options=options,
                           rootmode=stat.S_IFREG, max_tasks=max_tasks)
    async with trio.open_nursery() as nursery:
        await nursery.start(session.run)
        task_status.started()
        # Ends when the mount is taken away; a cancellation ends the
        # session, which detaches its mount.
        await session.wait_ended()


async def _export_main(args: argparse.Namespace) -> dict[str, int]:
    dev = FileBlockDevice(args.backing, args.size, readonly=args.readonly)
    ops = DeviceFileOps(dev, readonly=args.readonly, direct_io=not args.page_cache)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(lambda task_status: serve_device_file(
                dev, args.path, readonly=args.readonly, allow_other=args.allow_other,
                debug=args.debug, ops=ops, task_status=task_status))
            print(f"READY {args.path} {dev.size}", flush=True)

            async def stop_on_signal() -> None:
                with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT,
                                               signal.SIGHUP) as signals:
                    async for signum in signals:
                        log.info("signal %d: unmounting %s", signum, args.path)
                        nursery.cancel_scope.cancel()
                        return

            nursery.start_soon(stop_on_signal)
    finally:
        with trio.CancelScope(shield=True):
            await dev.close()
    return ops.counters


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m replfs.devfile",
        description="Export a backing file as a replfs device file (FUSE single-file "
                    "mount) until SIGTERM/SIGINT.")
    parser.add_argument("--backing", required=True,
                        help="backing file or block device (created sparse if missing "
                             "and --size is given)")
    parser.add_argument("--path", required=True, help="the device file to mount over")
    parser.add_argument("--size", type=int,
                        help="bytes to export (default: the whole backing file)")
    parser.add_argument("--readonly", action="store_true")
    parser.add_argument("--page-cache", action="store_true",
                        help="use the kernel page cache instead of direct_io")
    parser.add_argument("--allow-other", action="store_true")
    parser.add_argument("--debug", action="store_true", help="log every FUSE request")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")

    if not os.path.exists(args.backing):
        if args.size is None:
            parser.error(f"{args.backing} does not exist; give --size to create it")
        with open(args.backing, "xb") as f:
            f.truncate(args.size)
    elif args.size is not None:
        with open(args.backing, "rb") as f:
            real = f.seek(0, os.SEEK_END)
        if real < args.size:
            print(f"replfs.devfile: {args.backing} holds {real} bytes, fewer than "
                  f"--size {args.size}", file=sys.stderr)
            return 10
    try:
        counters = trio.run(_export_main, args)
    except (OSError, RuntimeError) as exc:
        print(f"replfs.devfile: cannot export {args.backing} at {args.path}: {exc}",
              file=sys.stderr)
        return 20
    print("STATS " + json.dumps(counters), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
