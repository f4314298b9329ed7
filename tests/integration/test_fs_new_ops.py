"""What a replfs mount does now that it runs on replfs.fuse instead of
pyfuse3 (issue 13): fallocate reaches the filesystem, SEEK_DATA and
SEEK_HOLE answer from the extent map, and POSIX (fcntl) and flock locks
are the filesystem's, seen by every process through the mount (node-local
until the dual-primary work makes them cluster-wide).
"""
from __future__ import annotations

import errno
import fcntl
import os
import subprocess
import sys
import time

import pytest

from .test_fs_mount import fsck_ok, mkfs, run, umount, wait_unmounted_process, force_unmount

pytestmark = pytest.mark.fuse

FALLOC_FL_KEEP_SIZE = 1


@pytest.fixture
def mnt(tmp_path):
    img = mkfs(tmp_path / "vol.img")
    m = tmp_path / "mnt"
    m.mkdir()
    run("mount", "-t", "fuse.replfs", img, m, "-o", f"logfile={tmp_path / 'log'}")
    yield str(m)
    try:
        umount(m, img)
    finally:
        force_unmount(m)
        wait_unmounted_process(img)
    fsck_ok(img)


def test_fallocate_reaches_the_filesystem(mnt):
    p = os.path.join(mnt, "f")
    fd = os.open(p, os.O_CREAT | os.O_RDWR)
    try:
        os.write(fd, b"abc")
        os.posix_fallocate(fd, 0, 3 << 20)
        st = os.fstat(fd)
        assert st.st_size == 3 << 20 and st.st_blocks * 512 >= 3 << 20
        assert os.pread(fd, 4, 0) == b"abc\0"
    finally:
        os.close(fd)
    cp = subprocess.run(["fallocate", "-n", "-l", "1M", p], capture_output=True, text=True)
    assert cp.returncode != 0 and "unsupported" in cp.stderr.lower()


def test_seek_data_and_hole(mnt):
    fd = os.open(os.path.join(mnt, "sparse"), os.O_CREAT | os.O_RDWR)
    try:
        os.pwrite(fd, b"x" * 4096, 1 << 20)
        os.ftruncate(fd, 3 << 20)
        assert os.lseek(fd, 0, os.SEEK_DATA) == 1 << 20
        assert os.lseek(fd, 0, os.SEEK_HOLE) == 0
        assert os.lseek(fd, 1 << 20, os.SEEK_HOLE) == (1 << 20) + 4096
        assert os.lseek(fd, (1 << 20) + 4096, os.SEEK_HOLE) == (1 << 20) + 4096
        with pytest.raises(OSError) as ei:
            os.lseek(fd, (1 << 20) + 8192, os.SEEK_DATA)
        assert ei.value.errno == errno.ENXIO
        with pytest.raises(OSError) as ei:
            os.lseek(fd, 3 << 20, os.SEEK_HOLE)
        assert ei.value.errno == errno.ENXIO
    finally:
        os.close(fd)


HOLDER = r"""
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR)
if sys.argv[2] == "posix":
    fcntl.lockf(fd, fcntl.LOCK_EX, 100, 0)
else:
    fcntl.flock(fd, fcntl.LOCK_EX)
print("held", flush=True)
sys.stdin.readline()
os.close(fd)
print("released", flush=True)
sys.stdin.readline()
"""


@pytest.mark.parametrize("kind", ["posix", "flock"])
def test_locks_between_processes(mnt, kind):
    p = os.path.join(mnt, "lockme")
    with open(p, "wb") as f:
        f.write(b"\0" * 200)
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, p, kind], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        fd = os.open(p, os.O_RDWR)
        try:
            if kind == "posix":
                with pytest.raises(OSError) as ei:
                    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 10, 50)
                assert ei.value.errno in (errno.EAGAIN, errno.EACCES)
                # outside the held range: granted
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 10, 150)
                fcntl.lockf(fd, fcntl.LOCK_UN, 10, 150)
            else:
                with pytest.raises(OSError) as ei:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                assert ei.value.errno in (errno.EAGAIN, errno.EWOULDBLOCK)
            # a blocking wait is granted once the holder closes its file
            holder.stdin.write("\n")
            holder.stdin.flush()
            t0 = time.monotonic()
            if kind == "posix":
                fcntl.lockf(fd, fcntl.LOCK_EX, 100, 0)
            else:
                fcntl.flock(fd, fcntl.LOCK_EX)
            assert time.monotonic() - t0 < 10
            assert holder.stdout.readline().strip() == "released"
        finally:
            os.close(fd)
    finally:
        holder.stdin.close()
        holder.wait(10)
