"""Device files: the user-visible /dev/drbdN of each attached resource.

For every attached resource with a ``device`` path, replfsd itself serves
a single-file FUSE mount over that path (replfs.fuse, in this process, as
it serves the resource's filesystem mounts): reads and writes are calls
into the resource, so its protocol applies, and every open(2) of the file
is an opener of the resource: a Secondary refuses it with EMEDIUMTYPE
("Wrong medium type"), as DRBD 8 does, and `secondary` is refused while
the file is held open.

If replfsd dies, the kernel aborts the mount with it (users get ENOTCONN)
and the next replfsd detaches it before it exports the file again.  Set
REPLFS_NO_DEVFILE=1 in replfsd's environment to export no device files
(machines without FUSE; the mirror works without them).
"""
from __future__ import annotations

import errno
import logging
import os

import trio

from replfs import fuse
from replfs.blockdev import BlockDeviceError
from replfs.devfile import FSNAME, DeviceFileOps, serve_device_file
from replfs.errors import ReplfsError

log = logging.getLogger("replfs.daemon")


class ResourceIO:
    """A resource's data as a BlockDevice (no open accounting: the device
    file counts its opens itself)."""

    def __init__(self, res):
        self.res = res

    @property
    def size(self) -> int:
        return self.res.size

    async def _io(self, coro):
        try:
            return await coro
        except ReplfsError as e:
            raise BlockDeviceError(errno.EIO, e.message) from None

    async def read(self, offset: int, length: int) -> bytes:
        return await self._io(self.res.read(offset, length))

    write_flags = True      # PREFLUSH/FUA go to the resource as one request

    async def write(self, offset: int, data: bytes, flags: int = 0) -> None:
        await self._io(self.res.write(offset, data, flags))

    async def flush(self) -> None:
        await self._io(self.res.flush())

    async def discard(self, offset: int, length: int) -> None:
        await self._io(self.res.discard(offset, length))

    async def close(self) -> None:
        pass


class ResourceDeviceOps(DeviceFileOps):
    """DeviceFileOps whose opens are openers of the resource."""

    def __init__(self, res, **kw):
        super().__init__(ResourceIO(res), **kw)
        self.res = res
        self._handles: set[int] = set()
        self._next_fh = 1
        self._session = None

    def init(self, session) -> None:
        super().init(session)
        self._session = session
        self.res.resize_hooks.append(self._size_changed)

    def _size_changed(self, size: int) -> None:
        """An online grow: the kernel cached the file's attributes (its
        size) for a while; tell it they changed."""
        if self._session is not None:
            self._session.invalidate_inode(fuse.ROOT_INODE)

    async def open(self, inode, flags, ctx):
        self._check_inode(inode)
        try:
            self.res._require_io(write=(flags & os.O_ACCMODE) != os.O_RDONLY)
        except BlockDeviceError as e:
            raise fuse.FUSEError(e.errno or errno.EIO) from None
        fh = self._next_fh
        self._next_fh += 1
        self._handles.add(fh)
        self.res.open_count += 1
        return fuse.FileInfo(fh=fh, direct_io=self.direct_io, keep_cache=False)

    def _close(self, fh) -> None:
        if fh in self._handles:
            self._handles.discard(fh)
            self.res.open_count = max(0, self.res.open_count - 1)

    async def release(self, fh):
        self._close(fh)

    async def destroy(self, session):
        # the mount went away with files still open: they are not openers
        for fh in list(self._handles):
            self._close(fh)
        if self._size_changed in self.res.resize_hooks:
            self.res.resize_hooks.remove(self._size_changed)
        self._session = None
        await super().destroy(session)


class DeviceFiles:
    def __init__(self, rundir: str):
        self.rundir = rundir
        self._scopes: dict[str, trio.CancelScope] = {}
        self._ended: dict[str, trio.Event] = {}

    def running(self, resource: str) -> bool:
        return resource in self._scopes

    async def start(self, nursery: trio.Nursery, res, path: str) -> None:
        resource = res.conf.name
        if self.running(resource):
            return
        if not path or os.environ.get("REPLFS_NO_DEVFILE"):
            return
        # a dead export left by a replfsd that was killed
        await trio.to_thread.run_sync(fuse.clean_stale_mounts, FSNAME)
        try:
            await nursery.start(self._serve, res, path)
        except (OSError, fuse.FuseUsageError, fuse.UnsupportedKernel) as e:
            log.error("%s: device file %s did not come up: %s", resource, path, e)
            return
        log.info("%s: device file %s exported", resource, path)

    async def _serve(self, res, path: str, *, task_status) -> None:
        name = res.conf.name
        ended = trio.Event()
        try:
            with trio.CancelScope() as scope:
                self._scopes[name] = scope
                self._ended[name] = ended
                await serve_device_file(ResourceIO(res), path, ops=ResourceDeviceOps(res),
                                        allow_other=True, task_status=task_status)
        finally:
            if self._scopes.get(name) is scope:
                del self._scopes[name]
                del self._ended[name]
            ended.set()

    async def stop(self, resource: str) -> None:
        scope = self._scopes.get(resource)
        if scope is None:
            return
        ended = self._ended[resource]
        scope.cancel()
        with trio.CancelScope(shield=True):
            with trio.move_on_after(10):
                await ended.wait()

    async def stop_all(self) -> None:
        for name in list(self._scopes):
            await self.stop(name)
