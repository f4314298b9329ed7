"""The block-device interface shared by every layer above the mirror.

The filesystem, the single-file device export, the disk heartbeat, the
benchmarks and the tests all talk to storage through this small async
interface.  Implementations: FileBlockDevice (a plain file or a block
device node, used for images and tests) and the daemon client for a
replicated resource (replfs.ipc client), which gives the resource's
protocol semantics: a write returns when the protocol counts it complete.

Offsets and lengths are bytes.  Reads past the end return what exists
up to the end (short read), writes past the end raise BlockDeviceError.

A write may carry PREFLUSH/FUA flags (replfs.blockflags): a device that
takes them in one request says so with ``write_flags = True``; for the
others (a plain file: nothing to gain) ``write_flagged`` does flush,
write, flush.
"""
from __future__ import annotations

import errno
import os
import queue
import threading
from typing import Protocol, runtime_checkable

import trio


from outcome import Value as _Value

from replfs.errors import BlockDeviceError  # noqa: E402,F401  (defined there, named here)


def frozen(data):
    """``data`` as something that cannot change while a write holds it:
    bytes, or a view of bytes (a FUSE WRITE's data is a view of its own
    request), as they are -- a MiB copy costs about 250 us here; any other
    buffer (a bytearray the caller may reuse) copied."""
    if isinstance(data, bytes) or (isinstance(data, memoryview) and isinstance(data.obj, bytes)):
        return data
    return bytes(data)


@runtime_checkable
class BlockDevice(Protocol):
    @property
    def size(self) -> int:
        """Usable size in bytes."""

    async def read(self, offset: int, length: int) -> bytes: ...

    async def write(self, offset: int, data: bytes) -> None: ...

    async def flush(self) -> None:
        """Make every completed write durable (fdatasync semantics)."""

    async def discard(self, offset: int, length: int) -> None: ...

    async def close(self) -> None: ...


class _SyncThread:
    """One thread that runs a device's fdatasync calls, one after another.

    A flush is on the path of every synchronous write, and a call through
    trio.to_thread costs about as much CPU as the fdatasync itself here
    (a limiter, a context copy, naming the thread twice): a job here is a
    queue put, the call, and a wake-up of trio's loop with the result."""

    def __init__(self, name: str):
        self._name = name
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def submit(self, job) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
            self._thread.start()
        self._jobs.put(job)

    def stop(self) -> None:
        if self._thread is not None:
            self._jobs.put(None)
            self._thread = None

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            job()


class FileBlockDevice:
    """A BlockDevice over a regular file or device node, using pread/pwrite.

    Blocking system calls run in worker threads so the trio loop keeps
    serving; a CapacityLimiter bounds the number of threads per device.
    ``size`` may be given to expose only a prefix of the file (the rest
    holding internal meta-data, for example).
    """

    # Reads and writes up to this size are done inline on the event loop: a
    # page-cache copy of a few KiB takes microseconds, a hop to a worker
    # thread and back costs far more.  Larger transfers and every fdatasync
    # go to a thread so the loop keeps serving.
    INLINE_MAX = 64 * 1024

    def __init__(self, path: str, size: int | None = None, *, readonly: bool = False,
                 threads: int = 4):
        flags = os.O_RDONLY if readonly else os.O_RDWR
        self.path = path
        self._fd = os.open(path, flags | os.O_CLOEXEC)
        real = os.lseek(self._fd, 0, os.SEEK_END)
        self._size = real if size is None else min(size, real)
        self.readonly = readonly
        self._limiter = trio.CapacityLimiter(threads)
        self._sync = _SyncThread(f"fdatasync {os.path.basename(path)}"[:15])
        self._closing = False
        # preadv2(RWF_NOWAIT) for large reads, until the file refuses it
        self._nowait = hasattr(os, "RWF_NOWAIT") and hasattr(os, "preadv")

    @property
    def size(self) -> int:
        return self._size

    def set_size(self, size: int | None = None) -> None:
        """Expose ``size`` bytes (all of the file: None), measured anew:
        the file may have grown since it was opened (an online resize)."""
        real = os.lseek(self._fd, 0, os.SEEK_END)
        self._size = real if size is None else min(size, real)

    def _check(self, offset: int, length: int, *, write: bool) -> None:
        if offset < 0 or length < 0:
            raise BlockDeviceError(errno.EINVAL, "negative offset or length")
        if write and offset + length > self._size:
            raise BlockDeviceError(errno.ENOSPC, f"write beyond end of device "
                                   f"({offset}+{length} > {self._size})")

    async def read(self, offset: int, length: int) -> bytes:
        if length <= self.INLINE_MAX:
            await trio.lowlevel.checkpoint()
            return self.read_now(offset, length)
        if self._nowait:
            # What the page cache holds is copied at once (RWF_NOWAIT: no
            # wait for the disk); only the rest needs a worker thread.
            await trio.lowlevel.checkpoint()
            data = self._read_cached(offset, length)
            if data is not None:
                return data
        return await trio.to_thread.run_sync(self.read_now, offset, length,
                                             limiter=self._limiter)

    def _read_cached(self, offset: int, length: int) -> bytes | None:
        """All of a read from the page cache, or None if any of it would
        wait for the disk (then nothing is lost: the caller reads it all
        in a thread)."""
        self._check(offset, length, write=False)
        length = max(0, min(length, self._size - offset))
        buf = bytearray(length)
        view = memoryview(buf)
        got = 0
        try:
            while got < length:
                n = os.preadv(self._fd, [view[got:]], offset + got, os.RWF_NOWAIT)
                if n <= 0:
                    break
                got += n
        except BlockingIOError:
            return None
        except OSError as e:
            if e.errno in (errno.EOPNOTSUPP, errno.EINVAL):
                self._nowait = False        # this file cannot: threads from now on
                return None
            raise
        return buf if got == length else None

    def read_now(self, offset: int, length: int) -> bytes:
        """read() done at once (no await): for up to INLINE_MAX bytes, or
        in a worker thread."""
        self._check(offset, length, write=False)
        length = max(0, min(length, self._size - offset))
        return os.pread(self._fd, length, offset) if length else b""

    def write_now(self, offset: int, data: bytes) -> None:
        """write() done at once (no await): for up to INLINE_MAX bytes, or
        in a worker thread."""
        if self.readonly:
            raise BlockDeviceError(errno.EROFS, "device is read-only")
        self._check(offset, len(data), write=True)
        view = memoryview(data)
        pos = offset
        while view:
            n = os.pwrite(self._fd, view, pos)
            view = view[n:]
            pos += n

    async def write(self, offset: int, data: bytes) -> None:
        if len(data) <= self.INLINE_MAX:
            await trio.lowlevel.checkpoint()
            self.write_now(offset, data)
            return
        await trio.to_thread.run_sync(self.write_now, offset, data, limiter=self._limiter)

    def flush_soon(self, callback) -> None:
        """Start an fdatasync and return: ``callback(err)`` (0, or the
        errno) runs later in trio's thread, from no task (the mirror's
        driver needs none).  Flushes run one after another, in order."""
        token = trio.lowlevel.current_trio_token()
        fd = self._fd
        if self._closing:
            # (the descriptor may be closed, and its number reused, before
            # a flush queued now would run)
            token.run_sync_soon(callback, errno.EBADF)
            return

        def job():
            try:
                os.fdatasync(fd)
                err = 0
            except OSError as e:
                err = e.errno or errno.EIO
            try:
                token.run_sync_soon(callback, err)
            except trio.RunFinishedError:
                pass
        self._sync.submit(job)

    async def flush(self) -> None:
        task = trio.lowlevel.current_task()
        self.flush_soon(lambda err: trio.lowlevel.reschedule(task, _Value(err)))
        # (not cancellable: an fdatasync under way is waited for, as
        # trio.to_thread waits for it)
        err = await trio.lowlevel.wait_task_rescheduled(lambda _: trio.lowlevel.Abort.FAILED)
        if err:
            raise OSError(err, os.strerror(err))

    async def discard(self, offset: int, length: int) -> None:
        # Zeroing keeps the contract "discarded blocks read back as zeros"
        # without depending on the backing filesystem's hole punching.
        self._check(offset, length, write=True)
        await self.write(offset, bytes(length))

    async def close(self) -> None:
        if self._fd >= 0:
            self._closing = True
            if self._sync._thread is not None:
                # the flushes queued before go first: the descriptor must
                # not close (and be reused) under them
                task = trio.lowlevel.current_task()
                token = trio.lowlevel.current_trio_token()
                self._sync.submit(lambda: token.run_sync_soon(
                    trio.lowlevel.reschedule, task, _Value(None)))
                await trio.lowlevel.wait_task_rescheduled(
                    lambda _: trio.lowlevel.Abort.FAILED)
                self._sync.stop()
            os.close(self._fd)
            self._fd = -1
