"""File handles of a replfs mount outlive the kernel's caches and a
remount, as an NFS server needs: name_to_handle_at(2) gives a handle,
open_by_handle_at(2) opens the file from it later (the kernel then asks
the filesystem to look up "." and ".." by inode number).

A handle of a deleted file must fail with ESTALE, never open another file.
"""
from __future__ import annotations

import ctypes
import errno
import os
import shutil
import tempfile

import pytest

from tests.integration.test_fs_mount import (force_unmount, fsck_ok, fuse_usable, mkfs,
                                             replfs_mount, run, wait_unmounted_process)

pytestmark = pytest.mark.skipif(not fuse_usable(), reason="needs /dev/fuse, root and mount.fuse3")

libc = ctypes.CDLL(None, use_errno=True)
MAX_HANDLE_SZ = 128
AT_FDCWD = -100


class FileHandle(ctypes.Structure):
    _fields_ = [("handle_bytes", ctypes.c_uint), ("handle_type", ctypes.c_int),
                ("f_handle", ctypes.c_ubyte * MAX_HANDLE_SZ)]


def name_to_handle(path: str) -> bytes:
    fh = FileHandle(MAX_HANDLE_SZ, 0)
    mount_id = ctypes.c_int()
    if libc.name_to_handle_at(AT_FDCWD, os.fsencode(path), ctypes.byref(fh),
                              ctypes.byref(mount_id), 0) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), path)
    return bytes(fh)


def open_by_handle(mnt: str, raw: bytes, flags: int = os.O_RDONLY) -> int:
    fh = FileHandle.from_buffer_copy(raw)
    mfd = os.open(mnt, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fd = libc.open_by_handle_at(mfd, ctypes.byref(fh), flags)
        if fd < 0:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e))
        return fd
    finally:
        os.close(mfd)


def drop_caches() -> None:
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("2\n")        # dentries and inodes: the kernel forgets our nodes
    except OSError:
        pass


def test_handles_survive_cache_eviction_and_remount():
    root = tempfile.mkdtemp(prefix="replfs-fh-")
    img = mkfs(os.path.join(root, "vol.img"), 64 << 20)
    mnt = os.path.join(root, "mnt")
    os.mkdir(mnt)
    replfs_mount(img, mnt)
    try:
        os.makedirs(os.path.join(mnt, "a/b/c"))
        path = os.path.join(mnt, "a/b/c/file")
        with open(path, "wb") as f:
            f.write(b"exported")
        gone = os.path.join(mnt, "a/gone")
        with open(gone, "wb") as f:
            f.write(b"deleted later")
        h_file = name_to_handle(path)
        h_dir = name_to_handle(os.path.join(mnt, "a/b"))
        h_gone = name_to_handle(gone)
        os.unlink(gone)
        os.sync()

        drop_caches()
        fd = open_by_handle(mnt, h_file)
        try:
            assert os.read(fd, 100) == b"exported"
        finally:
            os.close(fd)

        run("umount", mnt)
        wait_unmounted_process(img)
        replfs_mount(img, mnt)
        fd = open_by_handle(mnt, h_file)
        try:
            assert os.read(fd, 100) == b"exported"
        finally:
            os.close(fd)
        dfd = open_by_handle(mnt, h_dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            assert os.listdir(dfd) == ["c"]
            # a directory's dentry is reconnected to the tree through ".."
            # lookups by inode number (a file's may stay disconnected)
            assert os.readlink(f"/proc/self/fd/{dfd}") == os.path.join(mnt, "a/b")
        finally:
            os.close(dfd)
        with pytest.raises(OSError) as e:
            os.close(open_by_handle(mnt, h_gone))
        assert e.value.errno == errno.ESTALE
    finally:
        run("umount", mnt, check=False)
        force_unmount(mnt)
        wait_unmounted_process(img)
    fsck_ok(img)
    shutil.rmtree(root, ignore_errors=True)
