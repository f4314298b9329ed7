"""A POSIX battery through a real replfs FUSE mount, with os.* calls:
permissions as an unprivileged user (default_permissions), attributes,
rename variants, links, sparse files, a large directory, O_APPEND,
truncate, xattrs, statvfs, a 20 MB checksum and cp -a / diff -r.

One mount serves the whole module; fsck.replfs -n checks the image after
it is unmounted.
"""
from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import pathlib
import shutil
import stat
import subprocess
import sys
import tempfile
import time

import pytest

from tests.integration.test_fs_mount import (ENV, assert_clean_log, force_unmount, fsck_ok,
                                             fuse_usable, mkfs, mounted, replfs_mount, run,
                                             wait_unmounted_process)

pytestmark = pytest.mark.skipif(not fuse_usable(), reason="needs /dev/fuse, root and mount.fuse3")

NOBODY = 65534


@pytest.fixture(scope="module")
def volume():
    # Not under pytest's tmp_path (mode 0700): the unprivileged user of the
    # permission test must reach the mount point.
    root = pathlib.Path(tempfile.mkdtemp(prefix="replfs-posix-"))
    root.chmod(0o755)
    img = mkfs(root / "vol.img", 256 << 20)
    mnt = root / "mnt"
    mnt.mkdir()
    logf = str(root / "mount.log")
    replfs_mount(img, str(mnt), logfile=logf)
    try:
        yield {"img": img, "mnt": str(mnt), "root": str(root), "log": logf}
    finally:
        run("umount", mnt, check=False)
        force_unmount(mnt)
        wait_unmounted_process(img)
    fsck_ok(img)
    assert_clean_log(logf)
    if not mounted(mnt):
        shutil.rmtree(root, ignore_errors=True)


def commit(path) -> None:
    """fsync through the mount: commits the running transaction (frees of
    deleted files become visible in statvfs)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@pytest.fixture
def d(volume, request):
    """A fresh directory of the mount for one test."""
    path = os.path.join(volume["mnt"], request.node.name[:100])
    os.mkdir(path)
    return path


def as_nobody(code: str, *args) -> subprocess.CompletedProcess:
    """Run Python ``code`` as uid/gid 65534 (args in sys.argv[1:])."""
    # The system interpreter: the venv may not be readable by that user.
    python = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
    return subprocess.run([python, "-c", code, *map(str, args)], user=NOBODY,
                          group=NOBODY, extra_groups=[], capture_output=True, text=True,
                          env=ENV, timeout=60)


# ---------------------------------------------------------------- permissions

PERM_PROBE = r"""
import errno, os, sys
d = sys.argv[1]
def code(f):
    try:
        f()
        return "ok"
    except OSError as e:
        return errno.errorcode[e.errno]
print(code(lambda: open(os.path.join(d, "secret")).read()))
print(code(lambda: open(os.path.join(d, "public")).read()))
print(code(lambda: open(os.path.join(d, "public"), "a").write("x")))
print(code(lambda: os.mkdir(os.path.join(d, "closed", "sub"))))
print(code(lambda: os.listdir(os.path.join(d, "closed"))))
print(code(lambda: os.chmod(os.path.join(d, "public"), 0o777)))
print(code(lambda: os.chown(os.path.join(d, "public"), 65534, 65534)))
print(code(lambda: os.unlink(os.path.join(d, "sticky", "rootfile"))))
mine = os.path.join(d, "sticky", "mine")
print(code(lambda: open(mine, "w").write("mine")))
st = os.stat(mine)
print(st.st_uid, st.st_gid)
print(code(lambda: os.chmod(mine, 0o600)))
print(code(lambda: os.utime(mine, None)))
print(code(lambda: os.utime(os.path.join(d, "public"), None)))
print(code(lambda: os.unlink(mine)))
"""


def test_permissions_as_an_unprivileged_user(d):
    with open(os.path.join(d, "secret"), "w") as f:
        f.write("root only")
    os.chmod(os.path.join(d, "secret"), 0o600)
    with open(os.path.join(d, "public"), "w") as f:
        f.write("everyone reads")
    os.chmod(os.path.join(d, "public"), 0o644)
    os.mkdir(os.path.join(d, "closed"), 0o700)
    os.mkdir(os.path.join(d, "sticky"))
    os.chmod(os.path.join(d, "sticky"), 0o1777)
    with open(os.path.join(d, "sticky", "rootfile"), "w") as f:
        f.write("r")
    cp = as_nobody(PERM_PROBE, d)
    assert cp.returncode == 0, cp.stderr
    assert cp.stdout.split("\n")[:-1] == [
        "EACCES",          # read a 0600 root file
        "ok",              # read a 0644 file
        "EACCES",          # append to it
        "EACCES",          # mkdir in a 0700 root directory
        "EACCES",          # list it
        "EPERM",           # chmod someone else's file
        "EPERM",           # chown
        "EPERM",           # unlink root's file in a sticky directory
        "ok",              # create in a 1777 directory
        f"{NOBODY} {NOBODY}",
        "ok", "ok",        # chmod / touch one's own file
        "EACCES",          # utime(NOW) needs write access or ownership
        "ok",
    ]


def test_chmod_chown_utime(d):
    p = os.path.join(d, "f")
    with open(p, "w") as f:
        f.write("x")
    os.chmod(p, 0o4751)
    assert stat.S_IMODE(os.stat(p).st_mode) == 0o4751
    os.chown(p, 1234, 5678)
    st = os.stat(p)
    assert (st.st_uid, st.st_gid) == (1234, 5678)
    os.chown(p, -1, 42)
    st = os.stat(p)
    assert (st.st_uid, st.st_gid) == (1234, 42)
    os.utime(p, ns=(1_000_000_123, 2_000_000_456))
    st = os.stat(p)
    assert (st.st_atime_ns, st.st_mtime_ns) == (1_000_000_123, 2_000_000_456)
    before = time.time_ns()
    os.utime(p, None)                                  # UTIME_NOW for both
    st = os.stat(p)
    assert st.st_mtime_ns >= before - 10_000_000 and st.st_atime_ns >= before - 10_000_000
    ctime = st.st_ctime_ns
    time.sleep(0.01)
    os.chmod(p, 0o600)
    assert os.stat(p).st_ctime_ns > ctime
    # setgid directory: new entries take its group, subdirectories inherit it.
    g = os.path.join(d, "g")
    os.mkdir(g)
    os.chown(g, 0, 777)
    os.chmod(g, 0o2775)
    open(os.path.join(g, "child"), "w").close()
    os.mkdir(os.path.join(g, "sub"))
    assert os.stat(os.path.join(g, "child")).st_gid == 777
    assert os.stat(os.path.join(g, "sub")).st_gid == 777
    assert os.stat(os.path.join(g, "sub")).st_mode & stat.S_ISGID


# ---------------------------------------------------------------- names

_libc = ctypes.CDLL(None, use_errno=True)
AT_FDCWD = -100
RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2


def renameat2(old: str, new: str, flags: int) -> None:
    r = _libc.syscall(316, AT_FDCWD, os.fsencode(old), AT_FDCWD, os.fsencode(new), flags)
    if r != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), old)


def _write(path, data):
    with open(path, "w") as f:
        f.write(data)


def _read(path):
    with open(path) as f:
        return f.read()


def test_rename_cases(d):
    a, b = os.path.join(d, "a"), os.path.join(d, "b")
    _write(a, "A")
    _write(b, "B")
    ino_a = os.stat(a).st_ino
    os.rename(a, b)                                    # replace
    assert not os.path.exists(a) and _read(b) == "A" and os.stat(b).st_ino == ino_a
    _write(a, "A2")
    with pytest.raises(OSError) as e:
        renameat2(a, b, RENAME_NOREPLACE)
    assert e.value.errno == errno.EEXIST
    renameat2(a, os.path.join(d, "c"), RENAME_NOREPLACE)
    assert _read(os.path.join(d, "c")) == "A2"
    os.mkdir(os.path.join(d, "dir"))
    _write(os.path.join(d, "dir", "inside"), "in")
    renameat2(b, os.path.join(d, "dir"), RENAME_EXCHANGE)  # file <-> directory
    assert _read(os.path.join(d, "dir")) == "A"
    assert _read(os.path.join(d, "b", "inside")) == "in"
    with pytest.raises(OSError) as e:
        renameat2(os.path.join(d, "c"), os.path.join(d, "nothing"), RENAME_EXCHANGE)
    assert e.value.errno == errno.ENOENT
    # Directories across parents, '..' follows; nlink of both parents.
    os.mkdir(os.path.join(d, "p1"))
    os.mkdir(os.path.join(d, "p2"))
    os.mkdir(os.path.join(d, "p1", "kid"))
    assert os.stat(os.path.join(d, "p1")).st_nlink == 3
    os.rename(os.path.join(d, "p1", "kid"), os.path.join(d, "p2", "kid"))
    assert os.stat(os.path.join(d, "p1")).st_nlink == 2
    assert os.stat(os.path.join(d, "p2")).st_nlink == 3
    assert (os.stat(os.path.join(d, "p2", "kid", "..")).st_ino
            == os.stat(os.path.join(d, "p2")).st_ino)
    with pytest.raises(OSError) as e:
        os.rename(os.path.join(d, "p2"), os.path.join(d, "p2", "kid", "loop"))
    assert e.value.errno == errno.EINVAL
    os.mkdir(os.path.join(d, "full"))
    _write(os.path.join(d, "full", "x"), "")
    with pytest.raises(OSError) as e:
        os.rename(os.path.join(d, "p1"), os.path.join(d, "full"))
    assert e.value.errno == errno.ENOTEMPTY
    with pytest.raises(OSError) as e:
        os.rename(os.path.join(d, "c"), os.path.join(d, "p1"))
    assert e.value.errno == errno.EISDIR
    os.rename(os.path.join(d, "p1"), os.path.join(d, "p2", "kid"))  # empty dir replaced
    assert sorted(os.listdir(d)) == ["b", "c", "dir", "full", "p2"]


def test_hard_links_and_nlink(d):
    p = os.path.join(d, "f")
    _write(p, "linked")
    for i in range(3):
        os.link(p, os.path.join(d, f"l{i}"))
    assert os.stat(p).st_nlink == 4
    assert len({os.stat(os.path.join(d, n)).st_ino for n in os.listdir(d)}) == 1
    os.unlink(p)
    assert os.stat(os.path.join(d, "l0")).st_nlink == 3
    with pytest.raises(OSError) as e:
        os.link(d, os.path.join(d, "dirlink"))
    assert e.value.errno == errno.EPERM
    with pytest.raises(FileExistsError):
        os.link(os.path.join(d, "l0"), os.path.join(d, "l1"))
    os.mkdir(os.path.join(d, "sub"))
    assert os.stat(d).st_nlink == 3
    os.rmdir(os.path.join(d, "sub"))
    assert os.stat(d).st_nlink == 2


def test_symlinks(d):
    os.symlink("target/does/not/exist", os.path.join(d, "dangling"))
    assert os.readlink(os.path.join(d, "dangling")) == "target/does/not/exist"
    assert stat.S_ISLNK(os.lstat(os.path.join(d, "dangling")).st_mode)
    with pytest.raises(FileNotFoundError):
        os.stat(os.path.join(d, "dangling"))
    _write(os.path.join(d, "real"), "through the link")
    os.symlink("real", os.path.join(d, "ln"))
    assert _read(os.path.join(d, "ln")) == "through the link"
    long_target = "x" * 4000
    os.symlink(long_target, os.path.join(d, "long"))
    assert os.readlink(os.path.join(d, "long")) == long_target
    assert os.lstat(os.path.join(d, "long")).st_size == 4000
    with pytest.raises(OSError) as e:
        os.readlink(os.path.join(d, "real"))
    assert e.value.errno == errno.EINVAL


def test_special_files_and_name_errors(d):
    os.mkfifo(os.path.join(d, "fifo"), 0o640)
    assert stat.S_ISFIFO(os.stat(os.path.join(d, "fifo")).st_mode)
    os.mknod(os.path.join(d, "chr"), stat.S_IFCHR | 0o600, os.makedev(1, 3))
    st = os.stat(os.path.join(d, "chr"))
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(1, 3)
    with pytest.raises(OSError) as e:
        open(os.path.join(d, "n" * 256), "w")
    assert e.value.errno == errno.ENAMETOOLONG
    _write(os.path.join(d, "n" * 255), "max")
    with pytest.raises(FileExistsError):
        os.mkdir(os.path.join(d, "fifo"))
    os.mkdir(os.path.join(d, "ne"))
    _write(os.path.join(d, "ne", "f"), "")
    with pytest.raises(OSError) as e:
        os.rmdir(os.path.join(d, "ne"))
    assert e.value.errno == errno.ENOTEMPTY
    with pytest.raises(NotADirectoryError):
        os.rmdir(os.path.join(d, "fifo"))
    with pytest.raises(IsADirectoryError):
        os.unlink(os.path.join(d, "ne"))
    with pytest.raises(NotADirectoryError):
        os.listdir(os.path.join(d, "fifo"))


def test_unlinked_open_file_lives_until_closed(volume, d):
    p = os.path.join(d, "tmp")
    fd = os.open(p, os.O_CREAT | os.O_RDWR, 0o600)
    try:
        os.write(fd, b"still here" * 1000)
        free_before = os.statvfs(volume["mnt"]).f_bfree
        os.unlink(p)
        assert not os.path.exists(p)
        assert os.pread(fd, 10, 0) == b"still here"
        os.write(fd, b"more")
        assert os.fstat(fd).st_nlink == 0
    finally:
        os.close(fd)
    commit(d)
    deadline = time.monotonic() + 5
    while os.statvfs(volume["mnt"]).f_bfree <= free_before:
        assert time.monotonic() < deadline, "space of the unlinked file was not freed"
        time.sleep(0.05)


# ---------------------------------------------------------------- data

def test_sparse_file(d):
    p = os.path.join(d, "sparse")
    with open(p, "wb") as f:
        f.seek(100 << 20)
        f.write(b"end")
    st = os.stat(p)
    assert st.st_size == (100 << 20) + 3
    assert st.st_blocks * 512 <= 64 * 1024
    assert st.st_blksize >= 512
    with open(p, "rb") as f:
        f.seek(50 << 20)
        assert f.read(4096) == bytes(4096)
        f.seek(100 << 20)
        assert f.read() == b"end"


def test_o_append_from_two_fds(d):
    p = os.path.join(d, "log")
    fd1 = os.open(p, os.O_CREAT | os.O_WRONLY | os.O_APPEND, 0o644)
    fd2 = os.open(p, os.O_WRONLY | os.O_APPEND)
    try:
        for i in range(50):
            os.write(fd1, b"one:%03d\n" % i)
            os.write(fd2, b"two:%03d\n" % i)
    finally:
        os.close(fd1)
        os.close(fd2)
    lines = _read(p).splitlines()
    assert len(lines) == 100
    assert lines[::2] == ["one:%03d" % i for i in range(50)]
    assert lines[1::2] == ["two:%03d" % i for i in range(50)]


def test_truncate(d):
    p = os.path.join(d, "t")
    data = os.urandom(50_000)
    with open(p, "wb") as f:
        f.write(data)
    os.truncate(p, 10_001)
    assert os.path.getsize(p) == 10_001
    os.truncate(p, 30_000)                             # grows with zeros
    with open(p, "rb") as f:
        got = f.read()
    assert got == data[:10_001] + bytes(30_000 - 10_001)
    with open(p, "r+b") as f:
        f.truncate(5)
        f.seek(0)
        assert f.read() == data[:5]
    with open(p, "wb") as f:                           # O_TRUNC
        pass
    assert os.path.getsize(p) == 0
    assert os.stat(p).st_blocks == 0
    with pytest.raises(IsADirectoryError):
        os.truncate(d, 0)


def test_o_direct_and_copy_file_range(d):
    import mmap
    p = os.path.join(d, "direct")
    buf = mmap.mmap(-1, 8192)                          # page-aligned for O_DIRECT
    buf.write(b"D" * 8192)
    fd = os.open(p, os.O_CREAT | os.O_RDWR | os.O_DIRECT, 0o644)
    try:
        assert os.pwrite(fd, buf, 4096) == 8192
        back = mmap.mmap(-1, 12288)
        assert os.preadv(fd, [back], 0) == 12288
        assert back[:] == bytes(4096) + b"D" * 8192
    finally:
        os.close(fd)
    src = os.open(p, os.O_RDONLY)
    dst = os.open(os.path.join(d, "copy"), os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        done = 0
        while done < 12288:
            n = os.copy_file_range(src, dst, 12288 - done)
            assert n > 0
            done += n
    finally:
        os.close(src)
        os.close(dst)
    with open(os.path.join(d, "copy"), "rb") as f:
        assert f.read() == bytes(4096) + b"D" * 8192


def test_large_file_checksum(d):
    p = os.path.join(d, "big")
    h = hashlib.sha256()
    chunk = os.urandom(1 << 20)
    with open(p, "wb") as f:
        for i in range(20):
            block = bytes([i]) + chunk[1:]
            h.update(block)
            f.write(block)
    with open(p, "rb") as f:
        r = hashlib.sha256()
        while buf := f.read(1 << 20):
            r.update(buf)
    assert r.hexdigest() == h.hexdigest()
    assert os.stat(p).st_blocks * 512 >= 20 << 20


def test_large_directory_readdir_exactly_once(d):
    n = 5000
    for i in range(n):
        os.mknod(os.path.join(d, f"entry-{i:05d}"), stat.S_IFREG | 0o644)
    names = os.listdir(d)
    assert len(names) == n and set(names) == {f"entry-{i:05d}" for i in range(n)}
    # Deleting while listing: nothing is listed twice, nothing that stays
    # is skipped.
    seen = []
    victims = set()
    with os.scandir(d) as it:
        for k, entry in enumerate(it):
            seen.append(entry.name)
            if k % 5 == 0:
                # Remove one entry not seen yet and the one just seen.
                other = f"entry-{(int(entry.name[6:]) * 7919) % n:05d}"
                for victim in (entry.name, other):
                    if victim not in victims:
                        victims.add(victim)
                        os.unlink(os.path.join(d, victim))
    assert len(seen) == len(set(seen)), "an entry was listed twice"
    survivors = {f"entry-{i:05d}" for i in range(n)} - victims
    assert survivors <= set(seen)
    assert set(os.listdir(d)) == survivors
    # telldir/seekdir style restart: a second listing pass is complete too.
    assert sorted(os.listdir(d)) == sorted(survivors)


def test_xattrs(d):
    p = os.path.join(d, "x")
    _write(p, "")
    os.setxattr(p, "user.one", b"1")
    os.setxattr(p, "user.two", b"\x00binary\xff" * 10)
    assert sorted(os.listxattr(p)) == ["user.one", "user.two"]
    assert os.getxattr(p, "user.two") == b"\x00binary\xff" * 10
    with pytest.raises(OSError) as e:
        os.setxattr(p, "user.one", b"again", os.XATTR_CREATE)
    assert e.value.errno == errno.EEXIST
    with pytest.raises(OSError) as e:
        os.setxattr(p, "user.none", b"x", os.XATTR_REPLACE)
    assert e.value.errno == errno.ENODATA
    os.setxattr(p, "user.one", b"replaced", os.XATTR_REPLACE)
    assert os.getxattr(p, "user.one") == b"replaced"
    with pytest.raises(OSError) as e:
        os.getxattr(p, "user.none")
    assert e.value.errno == errno.ENODATA
    os.removexattr(p, "user.one")
    assert os.listxattr(p) == ["user.two"]
    with pytest.raises(OSError) as e:
        os.removexattr(p, "user.one")
    assert e.value.errno == errno.ENODATA
    os.mkdir(os.path.join(d, "dx"))
    os.setxattr(os.path.join(d, "dx"), "user.dir", b"ok")
    assert os.getxattr(os.path.join(d, "dx"), "user.dir") == b"ok"
    # ERANGE from a buffer too small (getxattr(2) with size 1).
    buf = ctypes.create_string_buffer(1)
    r = _libc.getxattr(os.fsencode(p), b"user.two", buf, ctypes.c_size_t(1))
    assert r == -1 and ctypes.get_errno() == errno.ERANGE


def test_statvfs_tracks_usage(volume, d):
    commit(d)
    before = os.statvfs(volume["mnt"])
    assert before.f_bsize >= 512 and before.f_blocks > 0
    assert before.f_namemax == 255
    assert 0 < before.f_bavail <= before.f_blocks
    with open(os.path.join(d, "fill"), "wb") as f:
        f.write(bytes(4 << 20))
    commit(d)
    after = os.statvfs(volume["mnt"])
    used = (before.f_bfree - after.f_bfree) * after.f_frsize
    assert used >= 4 << 20


def test_cp_a_tree_and_diff(volume, d, tmp_path):
    src = tmp_path / "tree"
    for i in range(4):
        sub = src / f"dir{i}" / "deeper"
        sub.mkdir(parents=True)
        for j in range(6):
            (sub / f"file{j}.bin").write_bytes(os.urandom(j * 3000 + i))
            (src / f"dir{i}" / f"note{j}.txt").write_text(f"{i}/{j}\n" * j)
    os.symlink("dir0/note1.txt", src / "link")
    os.link(src / "dir1" / "note2.txt", src / "hardlink")
    os.chmod(src / "dir2", 0o750)
    os.setxattr(src / "dir3" / "note3.txt", "user.tag", b"copied")
    dst = os.path.join(d, "tree")
    run("cp", "-a", src, dst)
    cp = run("diff", "-r", "--no-dereference", src, dst, check=False)
    assert cp.returncode == 0, cp.stdout + cp.stderr
    assert os.readlink(os.path.join(dst, "link")) == "dir0/note1.txt"
    assert (os.stat(os.path.join(dst, "hardlink")).st_ino
            == os.stat(os.path.join(dst, "dir1", "note2.txt")).st_ino)
    assert stat.S_IMODE(os.stat(os.path.join(dst, "dir2")).st_mode) == 0o750
    assert os.getxattr(os.path.join(dst, "dir3", "note3.txt"), "user.tag") == b"copied"
    s, t = os.stat(src / "dir0" / "note5.txt"), os.stat(os.path.join(dst, "dir0", "note5.txt"))
    assert s.st_mtime_ns == t.st_mtime_ns
    run("rm", "-rf", dst)
    assert os.listdir(d) == []


def test_dot_and_dotdot(volume, d):
    os.mkdir(os.path.join(d, "a"))
    os.mkdir(os.path.join(d, "a", "b"))
    assert os.stat(os.path.join(d, "a", "b", "..", "..")).st_ino == os.stat(d).st_ino
    assert os.stat(os.path.join(d, "a", ".")).st_ino == os.stat(os.path.join(d, "a")).st_ino
    fd = os.open(os.path.join(d, "a", "b"), os.O_RDONLY | os.O_DIRECTORY)
    try:
        # getdents sees . and .. with the right inode numbers.
        out = subprocess.run(["ls", "-ai", "."], cwd=fd and os.path.join(d, "a", "b"),
                             capture_output=True, text=True).stdout.split()
        pairs = dict(zip(out[1::2], map(int, out[::2])))
        assert pairs["."] == os.stat(os.path.join(d, "a", "b")).st_ino
        assert pairs[".."] == os.stat(os.path.join(d, "a")).st_ino
        os.fsync(fd)                                   # fsyncdir
    finally:
        os.close(fd)
    assert os.stat(volume["mnt"]).st_ino == 1
