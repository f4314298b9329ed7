"""fsx-style random file I/O through a real replfs mount, checked byte for
byte against an in-memory copy of the file.

Each run is seeded (the seed is in the test id), so a failure replays.
Operations: write at a random offset (often past the end, leaving a
hole), read a random range, truncate up or down, mmap read and write,
fsync, close and reopen, and now and then a remount.  Every read, and the
whole file after each remount, must equal the model.  fsck.replfs -n must
find the image clean afterwards.
"""
from __future__ import annotations

import mmap
import os
import pathlib
import random
import shutil
import tempfile

import pytest

from tests import soak
from tests.integration.test_fs_mount import (force_unmount, fsck_ok, fuse_usable, mkfs,
                                             replfs_mount, run, wait_unmounted_process)

pytestmark = pytest.mark.skipif(not fuse_usable(), reason="needs /dev/fuse, root and mount.fuse3")

MAX_SIZE = 2 << 20          # the file stays below 2 MiB (fsx's default is 256 KiB)


class Fsx:
    def __init__(self, img: str, mnt: str, seed: int, log: list[str]):
        self.img, self.mnt = img, mnt
        self.rng = random.Random(seed)
        self.model = bytearray()
        self.log = log
        self.path = os.path.join(mnt, "fsx.dat")
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)

    def note(self, text: str) -> None:
        self.log.append(text)
        del self.log[:-40]        # keep the tail for the failure message

    def check_range(self, off: int, got: bytes, want: bytes) -> None:
        if got != want:
            bad = next(i for i in range(min(len(got), len(want)) + 1)
                       if i >= len(got) or i >= len(want) or got[i] != want[i])
            raise AssertionError(
                f"data mismatch at byte {off + bad}: got {len(got)} bytes, want {len(want)}\n"
                + "\n".join(self.log))

    # ---------------------------------------------------------- operations
    def op_write(self) -> None:
        size = len(self.model)
        off = self.rng.randrange(0, min(MAX_SIZE - 1, size + 256 * 1024))
        n = min(self.rng.choice([1, 17, 512, 4096, 5000, 65536, 200000]), MAX_SIZE - off)
        data = self.rng.randbytes(n)
        self.note(f"write {off}+{n} (size {size})")
        assert os.pwrite(self.fd, data, off) == n
        if off > size:
            self.model.extend(b"\0" * (off - size))
        self.model[off:off + n] = data

    def op_read(self) -> None:
        size = len(self.model)
        off = self.rng.randrange(0, size + 4096)
        n = self.rng.choice([1, 100, 4096, 70000, 300000])
        self.note(f"read {off}+{n} (size {size})")
        got = os.pread(self.fd, n, off)
        self.check_range(off, got, bytes(self.model[off:off + n]))

    def op_truncate(self) -> None:
        new = self.rng.choice([0, self.rng.randrange(0, MAX_SIZE),
                               max(0, len(self.model) - self.rng.randrange(1, 9000)),
                               len(self.model) + self.rng.randrange(1, 9000)])
        new = min(new, MAX_SIZE)
        self.note(f"truncate {len(self.model)} -> {new}")
        os.ftruncate(self.fd, new)
        if new < len(self.model):
            del self.model[new:]
        else:
            self.model.extend(b"\0" * (new - len(self.model)))

    def op_mapread(self) -> None:
        size = len(self.model)
        if size == 0:
            return
        off = self.rng.randrange(0, size)
        n = self.rng.randrange(1, min(size - off, 100000) + 1)
        self.note(f"mapread {off}+{n}")
        with mmap.mmap(self.fd, size, prot=mmap.PROT_READ) as m:
            got = m[off:off + n]
        self.check_range(off, got, bytes(self.model[off:off + n]))

    def op_mapwrite(self) -> None:
        size = len(self.model)
        if size == 0:
            return
        off = self.rng.randrange(0, size)
        n = self.rng.randrange(1, min(size - off, 50000) + 1)
        data = self.rng.randbytes(n)
        self.note(f"mapwrite {off}+{n}")
        with mmap.mmap(self.fd, size) as m:
            m[off:off + n] = data
            m.flush()
        self.model[off:off + n] = data

    def op_fsync(self) -> None:
        self.note("fsync")
        os.fsync(self.fd)

    def op_reopen(self) -> None:
        self.note("close+reopen")
        os.close(self.fd)
        self.fd = os.open(self.path, os.O_RDWR)
        assert os.fstat(self.fd).st_size == len(self.model)

    def op_stat(self) -> None:
        self.note("stat")
        st = os.fstat(self.fd)
        assert st.st_size == len(self.model), "\n".join(self.log)

    def remount(self) -> None:
        self.note("remount")
        os.fsync(self.fd)
        os.close(self.fd)
        run("umount", self.mnt)
        wait_unmounted_process(self.img)
        replfs_mount(self.img, self.mnt)
        self.fd = os.open(self.path, os.O_RDWR)
        self.verify_all()

    def verify_all(self) -> None:
        got = b""
        while len(got) < len(self.model) + 1:
            chunk = os.pread(self.fd, 1 << 20, len(got))
            if not chunk:
                break
            got += chunk
        self.check_range(0, got, bytes(self.model))

    def run(self, nops: int, remounts: int) -> None:
        ops = ([self.op_write] * 6 + [self.op_read] * 5 + [self.op_truncate] * 2
               + [self.op_mapread, self.op_mapwrite, self.op_fsync, self.op_reopen, self.op_stat])
        remount_at = set(self.rng.sample(range(1, nops), remounts)) if remounts else set()
        for i in range(nops):
            if i in remount_at:
                self.remount()
            self.rng.choice(ops)()
        self.verify_all()
        os.close(self.fd)


def _fsx(seed: int, nops: int, remounts: int) -> None:
    root = pathlib.Path(tempfile.mkdtemp(prefix="replfs-fsx-"))
    img = mkfs(root / "vol.img", 128 << 20)
    mnt = root / "mnt"
    mnt.mkdir()
    log: list[str] = []
    replfs_mount(img, str(mnt))
    try:
        Fsx(img, str(mnt), seed, log).run(nops, remounts)
    finally:
        run("umount", mnt, check=False)
        force_unmount(mnt)
        wait_unmounted_process(img)
    fsck_ok(img)
    shutil.rmtree(root, ignore_errors=True)


@pytest.mark.parametrize("seed", [1])
def test_fsx_random_io_matches_the_model(seed):
    _fsx(seed, nops=1500, remounts=2)


@pytest.mark.soak(twin="test_fsx_random_io_matches_the_model")
@pytest.mark.parametrize("seed", soak.seeds(range(100, 110)))
def test_fsx_soak(seed):
    _fsx(seed, nops=soak.size(20000, 1500), remounts=soak.size(10, 2))
