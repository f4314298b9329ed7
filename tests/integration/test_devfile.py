"""The device file (replfs.devfile): real FUSE mounts in a helper process.

The export runs as ``python -m replfs.devfile`` (pyfuse3 serves one mount
per process) over a sparse 64 MiB backing file; the backing file is the
oracle.  Every test unmounts in a finally, lazily if it has to.
"""
from __future__ import annotations

import errno
import hashlib
import json
import mmap
import os
import pathlib
import selectors
import shutil
import subprocess
import sys

from replfs import fuse as fusel
import pytest
import trio

ROOT = pathlib.Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:          # `tests` is not an installed package
    sys.path.insert(0, str(ROOT))

from replfs.blockdev import BlockDeviceError, FileBlockDevice  # noqa: E402
from replfs.devfile import DeviceFileOps  # noqa: E402
from tests.harness.nodes import kill9, lazy_umount, mounted, wait_mounted  # noqa: E402

SIZE = 64 << 20
MiB = 1 << 20
TIMEOUT = 30


def _fuse_unusable() -> str | None:
    if shutil.which("fusermount3") is None:
        return "fusermount3 is not installed"
    try:
        fd = os.open("/dev/fuse", os.O_RDWR)
    except OSError as exc:
        return f"/dev/fuse is unusable: {exc}"
    os.close(fd)
    if os.geteuid() != 0:
        return "FUSE device-file tests need root (mounting over a file, mkfs, losetup)"
    return None


fuse_required = pytest.mark.skipif(_fuse_unusable() is not None,
                                   reason=_fuse_unusable() or "")


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_range(path: str, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


class Export:
    """One running ``python -m replfs.devfile`` process."""

    def __init__(self, tmp_path: pathlib.Path, *extra: str, backing: str | None = None):
        self.backing = backing or str(tmp_path / "backing.img")
        if not os.path.exists(self.backing):
            with open(self.backing, "wb") as f:
                f.truncate(SIZE)
        self.path = str(tmp_path / "dev" / "replfs0")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "replfs.devfile", "--backing", self.backing,
             "--path", self.path, *extra],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.stats: dict | None = None
        try:
            line = self._readline(TIMEOUT)
            assert line.startswith("READY "), f"export failed: {line!r} {self._stderr()}"
            wait_mounted(self.path, TIMEOUT, proc=self.proc)
        except BaseException:
            self.cleanup()
            raise

    def _readline(self, timeout: float) -> str:
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            if not sel.select(timeout):
                raise TimeoutError("no output from the export process")
        return self.proc.stdout.readline()

    def _stderr(self) -> str:
        if self.proc.poll() is None:
            return ""
        return self.proc.stderr.read()

    def stop(self) -> dict:
        """SIGTERM, wait, and return the counters the export printed."""
        self.proc.terminate()
        out, err = self.proc.communicate(timeout=TIMEOUT)
        assert self.proc.returncode == 0, f"export exited {self.proc.returncode}: {err}"
        for line in out.splitlines():
            if line.startswith("STATS "):
                self.stats = json.loads(line[len("STATS "):])
        assert self.stats is not None, out
        assert "Traceback" not in err, err
        return self.stats

    def cleanup(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(TIMEOUT)
            except subprocess.TimeoutExpired:
                kill9(self.proc)
        lazy_umount(self.path)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream:
                stream.close()


@pytest.fixture
def export(tmp_path):
    exp = Export(tmp_path)
    try:
        yield exp
    finally:
        exp.cleanup()


# -- real mounts ----------------------------------------------------------------

@fuse_required
def test_device_file_looks_like_a_device(export):
    st = os.stat(export.path)
    assert st.st_size == SIZE
    assert st.st_mode & 0o7777 == 0o600 and st.st_uid == 0
    entry = wait_mounted(export.path)
    assert entry["fstype"] == "fuse.replfs-dev" and entry["source"] == "replfs-dev"
    with pytest.raises(OSError) as info:
        os.truncate(export.path, 4096)
    assert info.value.errno in (errno.EINVAL, errno.EPERM)
    os.truncate(export.path, SIZE)          # the same size is fine
    # O_TRUNC is ignored, as for a block device.
    with open(export.path, "r+b") as f:
        f.write(b"x")
    with open(export.path, "wb"):
        pass
    assert os.stat(export.path).st_size == SIZE
    assert read_range(export.backing, 0, 1) == b"x"


@fuse_required
def test_writes_at_various_offsets_reach_the_backing_file(export):
    pieces = [(0, os.urandom(512)), (4095, os.urandom(3)), (MiB + 17, os.urandom(200_000)),
              (7 * MiB, os.urandom(3 * MiB + 5)), (SIZE - 4096, os.urandom(4096))]
    fd = os.open(export.path, os.O_RDWR)
    try:
        for offset, data in pieces:
            assert os.pwrite(fd, data, offset) == len(data)
        os.fsync(fd)
        for offset, data in pieces:
            assert sha(os.pread(fd, len(data), offset)) == sha(data)
    finally:
        os.close(fd)
    for offset, data in pieces:
        assert sha(read_range(export.backing, offset, len(data))) == sha(data)
    # dd, the classic way to write a device.
    blob = os.urandom(256 * 1024)
    src = pathlib.Path(export.path).parent.parent / "blob"
    src.write_bytes(blob)
    subprocess.run(["dd", f"if={src}", f"of={export.path}", "bs=64k", "seek=100",
                    "conv=notrunc,fsync", "status=none"], check=True, timeout=TIMEOUT)
    assert sha(read_range(export.backing, 100 * 65536, len(blob))) == sha(blob)
    assert sha(read_range(export.path, 100 * 65536, len(blob))) == sha(blob)
    # Reads see the device, not a cache: change the backing file underneath.
    with open(export.backing, "r+b") as f:
        f.seek(0)
        f.write(b"changed underneath")
    assert read_range(export.path, 0, 18) == b"changed underneath"


@fuse_required
def test_o_direct_4k_writes(export):
    fd = os.open(export.path, os.O_RDWR | os.O_DIRECT)
    buf = mmap.mmap(-1, 4096)               # page aligned, as O_DIRECT wants
    try:
        for i, offset in enumerate((0, 4096 * 3, 32 * MiB, SIZE - 4096)):
            buf.seek(0)
            buf.write(bytes([i + 1]) * 4096)
            assert os.pwritev(fd, [buf], offset) == 4096
            assert read_range(export.backing, offset, 4096) == bytes([i + 1]) * 4096
        os.fsync(fd)
    finally:
        os.close(fd)
        buf.close()


@fuse_required
def test_write_past_end_is_enospc(export):
    fd = os.open(export.path, os.O_RDWR)
    try:
        with pytest.raises(OSError) as info:
            os.pwrite(fd, b"x" * 4096, SIZE)
        assert info.value.errno == errno.ENOSPC
        # A write across the end is cut short at the end.
        assert os.pwrite(fd, b"y" * 8192, SIZE - 100) == 100
        assert os.pread(fd, 4096, SIZE) == b""
        assert os.pread(fd, 4096, SIZE - 100) == b"y" * 100
    finally:
        os.close(fd)


@fuse_required
def test_fsync_reaches_device_flush(export):
    fd = os.open(export.path, os.O_RDWR)
    try:
        os.pwrite(fd, b"durable", 12345)
        os.fsync(fd)
        os.fdatasync(fd)
    finally:
        os.close(fd)
    stats = export.stop()
    assert stats["flushes"] >= 2
    assert stats["bytes_written"] == 7 and stats["errors"] == 0
    assert not mounted(export.path)


@fuse_required
def test_sync_writes_are_durable_writes(export):
    """O_DSYNC, O_SYNC and RWF_DSYNC writes to the (direct_io) device file
    get no FSYNC from the kernel: each must reach the device as a FUA
    write; a plain write must not."""
    buf = mmap.mmap(-1, 4096)
    buf.write(b"s" * 4096)
    try:
        for flags in (os.O_DSYNC, os.O_SYNC, os.O_DSYNC | os.O_DIRECT):
            fd = os.open(export.path, os.O_RDWR | flags)
            try:
                assert os.pwritev(fd, [buf], 8192) == 4096
            finally:
                os.close(fd)
        fd = os.open(export.path, os.O_RDWR)
        try:
            assert os.pwritev(fd, [buf], 0, os.RWF_DSYNC) == 4096
            assert os.pwritev(fd, [buf], 4096) == 4096          # not synced
        finally:
            os.close(fd)
    finally:
        buf.close()
    stats = export.stop()
    assert stats["sync_writes"] == 4 and stats["writes"] == 5, stats
    assert stats["flushes"] == 0 and stats["errors"] == 0, stats


class RecordingDevice:
    """Records the requests that reach it; ``write_flags``: takes
    PREFLUSH/FUA in the write itself."""

    def __init__(self, write_flags: bool):
        self.size = 1 << 20
        self.write_flags = write_flags
        self.log = []

    async def write(self, offset, data, flags=0):
        self.log.append(("write", offset, len(data), flags))

    async def flush(self):
        self.log.append(("flush",))


@pytest.mark.parametrize("write_flags", [True, False])
async def test_a_sync_write_is_one_fua_request(write_flags):
    from replfs.blockflags import FUA
    dev = RecordingDevice(write_flags)
    ops = DeviceFileOps(dev)
    assert await ops.write_sync(1, 4096, b"x" * 512, True) == 512
    assert await ops.write(1, 0, b"y") == 1
    if write_flags:
        want = [("write", 4096, 512, FUA), ("write", 0, 1, 0)]
    else:
        want = [("write", 4096, 512, 0), ("flush",), ("write", 0, 1, 0)]
    assert dev.log == want
    assert ops.counters["sync_writes"] == 1 and ops.counters["writes"] == 2


@fuse_required
@pytest.mark.skipif(shutil.which("mkfs.ext4") is None or shutil.which("e2fsck") is None,
                    reason="e2fsprogs (mkfs.ext4, e2fsck) not installed")
def test_mkfs_ext4_on_the_device_file_then_fsck_backing(export):
    run = subprocess.run(["mkfs.ext4", "-F", "-q", export.path], capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    export.stop()
    assert not mounted(export.path)
    check = subprocess.run(["e2fsck", "-fn", export.backing], capture_output=True,
                           text=True, timeout=120)
    assert check.returncode == 0, check.stdout + check.stderr


def _loop_usable() -> str | None:
    if shutil.which("losetup") is None:
        return "losetup is not installed"
    run = subprocess.run(["losetup", "-f"], capture_output=True, text=True)
    if run.returncode != 0 or not run.stdout.strip():
        return f"no free loop device: {run.stderr.strip()}"
    if not os.path.exists(run.stdout.strip()):
        return f"{run.stdout.strip()} does not exist (no loop driver in this kernel?)"
    return None


@fuse_required
@pytest.mark.skipif(_loop_usable() is not None, reason=_loop_usable() or "")
def test_loop_device_and_ext4_mount_over_the_device_file(export, tmp_path):
    run = subprocess.run(["mkfs.ext4", "-F", "-q", export.path], capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    attach = subprocess.run(["losetup", "--find", "--show", export.path],
                            capture_output=True, text=True, timeout=TIMEOUT)
    if attach.returncode != 0:
        pytest.skip(f"losetup cannot attach the device file: {attach.stderr.strip()}")
    loop = attach.stdout.strip()
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        mount = subprocess.run(["mount", "-t", "ext4", loop, str(mnt)],
                               capture_output=True, text=True, timeout=TIMEOUT)
        if mount.returncode != 0:
            pytest.skip(f"cannot mount ext4 from {loop}: {mount.stderr.strip()}")
        try:
            (mnt / "hello").write_bytes(b"through loop, FUSE and the backing file")
            os.sync()
        finally:
            subprocess.run(["umount", str(mnt)], check=False, timeout=TIMEOUT)
            if mounted(str(mnt)):
                subprocess.run(["umount", "-l", str(mnt)], check=False)
    finally:
        subprocess.run(["losetup", "-d", loop], check=False, timeout=TIMEOUT)
    export.stop()
    check = subprocess.run(["e2fsck", "-fn", export.backing], capture_output=True,
                           text=True, timeout=120)
    assert check.returncode == 0, check.stdout + check.stderr


@fuse_required
def test_readonly_export_refuses_writes(tmp_path):
    exp = Export(tmp_path, "--readonly")
    try:
        with pytest.raises(OSError) as info:
            os.open(exp.path, os.O_RDWR)
        assert info.value.errno == errno.EROFS
        assert read_range(exp.path, 0, 4) == bytes(4)
    finally:
        exp.cleanup()


@fuse_required
def test_unmount_on_sigterm_and_restart_after_kill9(tmp_path):
    exp = Export(tmp_path)
    try:
        with open(exp.path, "r+b") as f:
            f.write(b"first life")
        kill9(exp.proc)
        # A SIGKILLed FUSE server leaves a dead mount behind ...
        assert mounted(exp.path)
    finally:
        exp.cleanup() if exp.proc.poll() is None else None
    # ... which the next export detaches before mounting again.
    again = Export(tmp_path, backing=exp.backing)
    try:
        assert read_range(again.path, 0, 10) == b"first life"
        again.stop()
        assert not mounted(again.path)
    finally:
        again.cleanup()
        lazy_umount(exp.path)
    assert not mounted(exp.path)


# -- the operations class alone (no mount) ---------------------------------------

class RefusingDevice:
    """A device in the Secondary role: reads work, writes are refused."""

    def __init__(self, size: int, code: int):
        self.size = size
        self.code = code

    async def read(self, offset, length):
        return bytes(min(length, self.size - offset))

    async def write(self, offset, data):
        raise BlockDeviceError(self.code, "not Primary")

    async def flush(self):
        raise BlockDeviceError(errno.EIO, "disk failed")

    async def discard(self, offset, length):
        pass

    async def close(self):
        pass


@pytest.mark.parametrize("code", [errno.EROFS, errno.EIO])
async def test_device_errors_become_their_errno(code):
    ops = DeviceFileOps(RefusingDevice(1 << 20, code))
    with pytest.raises(fusel.FUSEError) as info:
        await ops.write(1, 0, b"data")
    assert info.value.errno == code
    with pytest.raises(fusel.FUSEError) as info:
        await ops.fsync(1, False)
    assert info.value.errno == errno.EIO
    assert await ops.read(1, 0, 10) == bytes(10)
    assert ops.counters["errors"] == 2


async def test_ops_bounds_and_size(tmp_path):
    backing = tmp_path / "b.img"
    backing.write_bytes(bytes(8192))
    dev = FileBlockDevice(str(backing))
    try:
        ops = DeviceFileOps(dev)
        with trio.fail_after(TIMEOUT):
            assert await ops.write(1, 8000, b"z" * 500) == 192
            with pytest.raises(fusel.FUSEError) as info:
                await ops.write(1, 8192, b"z")
            assert info.value.errno == errno.ENOSPC
            assert await ops.read(1, 8100, 1000) == b"z" * 92
            assert await ops.read(1, 7990, 20) == b"\0" * 10 + b"z" * 10
            assert await ops.read(1, 9000, 10) == b""
            attr = await ops.getattr(fusel.ROOT_INODE, None)
            assert attr.st_size == 8192
            with pytest.raises(fusel.FUSEError) as info:
                await ops.lookup(fusel.ROOT_INODE, b"x", None)
            assert info.value.errno == errno.ENOTDIR
    finally:
        await dev.close()
