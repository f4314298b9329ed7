"""Regression tests through a real mount for the defects third-party
suites found (issue 12): times out of the old on-disk range, every
on-disk field at its boundary, mmap of an O_DIRECT file, remount ro/rw,
the atime options, RENAME_WHITEOUT, an explicit subtype, and the mount
log staying free of WARNING lines for ordinary conditions.
"""
from __future__ import annotations

import ctypes
import errno
import mmap
import os
import subprocess

import pytest

from .test_fs_mount import (assert_clean_log, fsck_ok, log_of, mkfs, mount_entry, run,
                            umount, wait_unmounted_process, force_unmount)

pytestmark = pytest.mark.fuse
NS = 10 ** 9


@pytest.fixture
def vol(tmp_path):
    img = mkfs(tmp_path / "vol.img")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    logf = str(tmp_path / "mount.log")
    yield img, str(mnt), logf
    force_unmount(mnt)
    wait_unmounted_process(img)


def mount(img, mnt, logf, *opts):
    run("mount", "-t", "fuse.replfs", img, mnt, "-o", ",".join([f"logfile={logf}", *opts]))


def remount(img, mnt, logf, *opts):
    umount(mnt, img)
    mount(img, mnt, logf, *opts)


def test_times_out_of_the_old_range_survive_commit_and_remount(vol):
    img, mnt, logf = vol
    mount(img, mnt, logf, "commit=1")
    before = os.path.join(mnt, "written-before")
    with open(before, "wb") as f:
        f.write(b"must not be lost")
    cases = {"y2300": 10413792000 * NS + 123456789, "y1600": -11676096000 * NS,
             "max": ((1 << 63) - 1) * NS, "min": -(1 << 63) * NS}
    for name, t in cases.items():
        p = os.path.join(mnt, name)
        open(p, "w").close()
        os.utime(p, ns=(t, t))
        st = os.stat(p)
        assert (st.st_atime_ns, st.st_mtime_ns) == (t, t), name
    subprocess.run(["touch", "-d", "2300-01-01", os.path.join(mnt, "touched")], check=True)
    os.sync()
    # the commit goes on working: more creates, fsync, ls of the root
    with open(os.path.join(mnt, "after"), "wb") as f:
        f.write(b"x")
        os.fsync(f.fileno())
    assert sorted(os.listdir(mnt)) == sorted([*cases, "written-before", "touched", "after",
                                              "lost+found"])
    remount(img, mnt, logf)
    for name, t in cases.items():
        st = os.stat(os.path.join(mnt, name))
        assert (st.st_atime_ns, st.st_mtime_ns) == (t, t), name
    assert os.stat(os.path.join(mnt, "touched")).st_mtime > 10413700000
    assert open(before, "rb").read() == b"must not be lost"
    umount(mnt, img)
    assert_clean_log(logf)
    fsck_ok(img)


def test_every_on_disk_field_at_its_boundary(vol):
    img, mnt, logf = vol
    mount(img, mnt, logf)
    f = os.path.join(mnt, "f")
    open(f, "w").close()
    os.chown(f, 4294967294, 4294967294)                      # the largest valid ids
    assert (os.stat(f).st_uid, os.stat(f).st_gid) == (4294967294, 4294967294)
    dev = os.makedev(4095, 1048575)                           # the largest Linux dev_t
    os.mknod(os.path.join(mnt, "dev"), 0o20600, dev)
    assert os.stat(os.path.join(mnt, "dev")).st_rdev == dev
    os.truncate(f, 1 << 60)
    assert os.stat(f).st_size == 1 << 60
    with pytest.raises(OSError) as ei:
        os.truncate(f, (1 << 60) + 1)
    assert ei.value.errno == errno.EFBIG
    os.truncate(f, 0)
    long = "n" * 255
    open(os.path.join(mnt, long), "w").close()
    with pytest.raises(OSError) as ei:
        open(os.path.join(mnt, long + "n"), "w")
    assert ei.value.errno == errno.ENAMETOOLONG
    os.symlink("t" * 4095, os.path.join(mnt, "sl"))
    assert len(os.readlink(os.path.join(mnt, "sl"))) == 4095
    with pytest.raises(OSError) as ei:
        os.symlink("t" * 4096, os.path.join(mnt, "sl2"))
    assert ei.value.errno == errno.ENAMETOOLONG
    os.setxattr(f, "user." + "x" * 250, b"v")                 # 255-byte name
    with pytest.raises(OSError) as ei:
        os.setxattr(f, "user." + "x" * 251, b"v")
    assert ei.value.errno == errno.ERANGE
    with pytest.raises(OSError) as ei:                        # more than a block holds
        os.setxattr(f, "user.big", b"v" * 8192)
    assert ei.value.errno == errno.ENOSPC
    with pytest.raises(OSError) as ei:                        # more than XATTR_SIZE_MAX
        os.setxattr(f, "user.huge", b"v" * 70000)
    assert ei.value.errno == errno.E2BIG
    for i in range(50):
        os.link(f, os.path.join(mnt, f"l{i}"))
    assert os.stat(f).st_nlink == 51
    umount(mnt, img)
    assert_clean_log(logf)
    fsck_ok(img)


def test_mmap_of_a_file_opened_with_o_direct(vol):
    img, mnt, logf = vol
    mount(img, mnt, logf)
    p = os.path.join(mnt, "f")
    with open(p, "wb") as f:
        f.write(b"a" * 8192)
    fd = os.open(p, os.O_RDWR | os.O_DIRECT)
    try:
        with mmap.mmap(fd, 8192) as m:
            assert m[:4] == b"aaaa"
            m[:4] = b"bbbb"
            m.flush()
    finally:
        os.close(fd)
    assert open(p, "rb").read(4) == b"bbbb"
    umount(mnt, img)
    fsck_ok(img)


def test_remount_read_only_and_back(vol):
    img, mnt, logf = vol
    mount(img, mnt, logf)
    open(os.path.join(mnt, "a"), "w").write("before")
    keep = open(os.path.join(mnt, "open-unlinked"), "w+")
    keep.write("still open")
    keep.flush()
    os.unlink(os.path.join(mnt, "open-unlinked"))
    # busy while a file is open for writing, as on ext4
    cp = run("mount", "-o", "remount,ro", mnt, check=False)
    assert cp.returncode == 32 and "busy" in cp.stderr
    assert "rw" in mount_entry(mnt)["options"].split(",")
    keep.close()
    run("mount", "-o", "remount,ro", mnt)
    assert "ro" in mount_entry(mnt)["options"].split(",")
    with pytest.raises(OSError) as ei:
        open(os.path.join(mnt, "b"), "w")
    assert ei.value.errno == errno.EROFS
    assert open(os.path.join(mnt, "a")).read() == "before"
    # read-only: the journal is clean and the slot given back (a crash now
    # needs no recovery); fsck of the image sees a clean volume
    fsck_ok(img)
    run("mount", "-o", "remount,rw", mnt)
    assert "rw" in mount_entry(mnt)["options"].split(",")
    open(os.path.join(mnt, "b"), "w").write("after")
    # options that cannot change are refused with a clear message
    cp = run("mount", "-o", "remount,slot=3", mnt, check=False)
    assert cp.returncode != 0 and "cannot be changed by a remount" in cp.stderr
    umount(mnt, img)
    assert "remounted (read-only" in log_of(logf)
    assert_clean_log(logf)
    fsck_ok(img)
    mount(img, mnt, logf)
    assert open(os.path.join(mnt, "b")).read() == "after"
    umount(mnt, img)


@pytest.mark.parametrize("opt", ["relatime", "strictatime", "nodiratime", "atime", "noatime",
                                 "lazytime"])
def test_atime_options_mount(vol, opt):
    img, mnt, logf = vol
    mount(img, mnt, logf, opt)
    open(os.path.join(mnt, "f"), "w").write("x")
    assert open(os.path.join(mnt, "f")).read() == "x"
    umount(mnt, img)
    assert_clean_log(logf)


def test_strictatime_with_quantum_zero_updates_atime_and_noatime_does_not(vol):
    img, mnt, logf = vol
    mount(img, mnt, logf, "strictatime", "atime_quantum=0")
    p = os.path.join(mnt, "f")
    open(p, "w").write("x")
    os.utime(p, ns=(NS, NS))
    open(p).read()
    assert os.stat(p).st_atime_ns > NS
    run("mount", "-o", "remount,noatime", mnt)
    os.utime(p, ns=(NS, NS))
    open(p).read()
    assert os.stat(p).st_atime_ns == NS
    umount(mnt, img)
    fsck_ok(img)


def test_relatime_updates_once_after_a_change(vol):
    img, mnt, logf = vol
    mount(img, mnt, logf, "relatime", "atime_quantum=0")
    p = os.path.join(mnt, "f")
    open(p, "w").write("x")
    os.utime(p, ns=(NS, 2 * NS))            # atime older than mtime: due
    open(p).read()
    first = os.stat(p).st_atime_ns
    assert first > 2 * NS
    open(p).read()                          # now newer than mtime: not due
    assert os.stat(p).st_atime_ns == first
    umount(mnt, img)


RENAME_WHITEOUT = 4


def test_rename_whiteout(vol):
    img, mnt, logf = vol
    mount(img, mnt, logf)
    open(os.path.join(mnt, "a"), "w").write("data")
    libc = ctypes.CDLL(None, use_errno=True)
    AT_FDCWD = -100
    r = libc.renameat2(AT_FDCWD, os.path.join(mnt, "a").encode(), AT_FDCWD,
                       os.path.join(mnt, "b").encode(), RENAME_WHITEOUT)
    assert r == 0, os.strerror(ctypes.get_errno())
    st = os.lstat(os.path.join(mnt, "a"))
    assert os.major(st.st_rdev) == 0 and os.minor(st.st_rdev) == 0
    import stat as S
    assert S.S_ISCHR(st.st_mode)
    assert open(os.path.join(mnt, "b")).read() == "data"
    umount(mnt, img)
    fsck_ok(img)


def test_explicit_subtype_is_accepted(vol):
    img, mnt, logf = vol
    mount(img, mnt, logf, "subtype=replfs")
    assert mount_entry(mnt)["fstype"] == "fuse.replfs"
    umount(mnt, img)


def test_ordinary_conditions_log_no_warnings(vol):
    img, mnt, logf = vol
    mount(img, mnt, logf)
    p = os.path.join(mnt, "f")
    open(p, "w").close()
    for i in range(20):                     # a full xattr block: ENOSPC each time
        try:
            os.setxattr(p, f"user.a{i}", b"v" * 1500)
        except OSError as e:
            assert e.errno == errno.ENOSPC
    h, mount_id = _name_to_handle(p)
    os.unlink(p)                            # a stale handle: ESTALE
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("2")
    with pytest.raises(OSError) as ei:
        _open_by_handle(mnt, h)
    assert ei.value.errno == errno.ESTALE
    umount(mnt, img)
    text = log_of(logf)
    assert " WARNING " not in text, text


class _FileHandle(ctypes.Structure):
    _fields_ = [("handle_bytes", ctypes.c_uint), ("handle_type", ctypes.c_int),
                ("f_handle", ctypes.c_ubyte * 128)]


def _name_to_handle(path):
    libc = ctypes.CDLL(None, use_errno=True)
    fh = _FileHandle(128, 0)
    mid = ctypes.c_int()
    if libc.name_to_handle_at(-100, path.encode(), ctypes.byref(fh), ctypes.byref(mid), 0):
        raise OSError(ctypes.get_errno(), "name_to_handle_at")
    return fh, mid.value


def _open_by_handle(mnt, fh):
    libc = ctypes.CDLL(None, use_errno=True)
    mfd = os.open(mnt, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fd = libc.open_by_handle_at(mfd, ctypes.byref(fh), os.O_RDONLY)
        if fd < 0:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e))
        os.close(fd)
    finally:
        os.close(mfd)


def _readahead_kb(mnt):
    e = mount_entry(mnt)
    with open(f"/sys/class/bdi/{e['dev']}/read_ahead_kb") as f:
        return int(f.read())


def test_readahead_option_sets_the_mounts_window_and_a_remount_changes_it(vol):
    """readahead= reaches the kernel (the mount's read_ahead_kb), 1 MiB by
    default; a sequential read over the larger window still reads right."""
    img, mnt, logf = vol
    mount(img, mnt, logf)
    assert _readahead_kb(mnt) == 1024
    data = os.urandom(3 << 20)
    p = os.path.join(mnt, "big")
    with open(p, "wb") as f:
        f.write(data)
    run("mount", "-o", "remount,readahead=256", mnt)
    assert _readahead_kb(mnt) == 256
    with open(p, "rb") as f:
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        assert f.read() == data
    cp = run("mount", "-o", "remount,readahead=70000", mnt, check=False)
    assert cp.returncode != 0 and "at most 65536" in cp.stderr
    assert _readahead_kb(mnt) == 256
    umount(mnt, img)
    mount(img, mnt, logf, "readahead=0")
    assert _readahead_kb(mnt) == 0
    with open(p, "rb") as f:
        assert f.read() == data
    umount(mnt, img)
    assert "remounted (readahead=256)" in log_of(logf)
    assert_clean_log(logf)
