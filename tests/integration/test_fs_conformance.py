"""POSIX conformance of a replfs mount, in the manner of pjdfstest: errno
values and their precedence, permissions of an unprivileged user
(default_permissions), set-id bits, timestamps, link counts, rename
variants, open flags, special files, symlinks and odd names.

Each scenario runs twice, on a fresh directory of the replfs mount and on
a fresh directory of a local Linux filesystem (ext4 or tmpfs under /tmp),
and the two outcomes must agree: the test encodes what Linux does, not
what we guess POSIX means.  Where the answer is known a priori the test
asserts it as well, so a wrong local filesystem cannot hide a bug.

Known, accepted differences from a local filesystem are named in the
tests that allow them:

* atime: updated on reads at most once per atime_quantum (60 s by
  default, as OCFS2); no scenario depends on it.
* fallocate(2) with FALLOC_FL_KEEP_SIZE (and every mode but 0) answers
  EOPNOTSUPP: the format keeps no clusters past the end of a file.  Mode 0
  (posix_fallocate) reaches the filesystem.
* EMLINK (65000 links) is not driven through the mount: it would take
  65000 FUSE round trips; tests/fs covers the limit on the core.

One mount serves the module; fsck.replfs -n checks the image afterwards.
"""
from __future__ import annotations

import ctypes
import errno
import json
import os
import pathlib
import shutil
import stat
import struct
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
OTHER_GID = 4321          # a group nobody is not a member of
OTHER_UID = 4321

_libc = ctypes.CDLL(None, use_errno=True)
AT_FDCWD = -100
AT_SYMLINK_NOFOLLOW = 0x100
RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2
UTIME_NOW, UTIME_OMIT = (1 << 30) - 1, (1 << 30) - 2
FALLOC_FL_KEEP_SIZE = 1
SYS_RENAMEAT2 = 316       # x86_64


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def _check(r: int, path) -> None:
    if r != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), path)


def renameat2(old, new, flags: int) -> None:
    _check(_libc.syscall(SYS_RENAMEAT2, AT_FDCWD, os.fsencode(old), AT_FDCWD,
                         os.fsencode(new), flags), old)


def utimensat(path, atime: tuple[int, int], mtime: tuple[int, int], flags: int = 0) -> None:
    ts = (_Timespec * 2)(_Timespec(*atime), _Timespec(*mtime))
    _check(_libc.utimensat(AT_FDCWD, os.fsencode(path), ts, flags), path)


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    _check(_libc.fallocate(fd, mode, ctypes.c_long(offset), ctypes.c_long(length)), fd)


def code(f, *args, **kw) -> str:
    """'ok' or the errno name of calling f."""
    try:
        f(*args, **kw)
        return "ok"
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e.errno))


def touch(path, data: bytes = b"", mode: int = 0o644) -> str:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    return path


def read(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


# ---------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def volume():
    # Not under pytest's tmp_path (mode 0700): the unprivileged user must
    # reach both the mount and the local reference directory.
    root = pathlib.Path(tempfile.mkdtemp(prefix="replfs-conf-"))
    root.chmod(0o755)
    img = mkfs(root / "vol.img", 128 << 20)
    mnt = root / "mnt"
    mnt.mkdir()
    local = root / "local"
    local.mkdir()
    logf = str(root / "mount.log")
    old_umask = os.umask(0o022)
    replfs_mount(img, str(mnt), logfile=logf)
    try:
        yield {"img": img, "mnt": str(mnt), "local": str(local), "log": logf}
    finally:
        os.umask(old_umask)
        run("umount", mnt, check=False)
        force_unmount(mnt)
        wait_unmounted_process(img)
    fsck_ok(img)
    assert_clean_log(logf)
    if not mounted(mnt):
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def pair(volume, request):
    """(replfs dir, local dir), fresh and empty, mode 0755, for one test."""
    name = request.node.name[:100]
    out = []
    for base in (volume["mnt"], volume["local"]):
        p = os.path.join(base, name)
        os.mkdir(p, 0o755)
        out.append(p)
    return tuple(out)


def same_as_linux(scenario, pair, *args):
    """Run scenario(base, *args) on both directories; they must agree.
    Returns the (common) result."""
    got = scenario(pair[0], *args)
    want = scenario(pair[1], *args)
    if got != want:
        if isinstance(got, dict):
            diff = {k: (got.get(k), want.get(k)) for k in sorted(set(got) | set(want))
                    if got.get(k) != want.get(k)}
            raise AssertionError(f"replfs differs from Linux (replfs, linux): {diff}")
        raise AssertionError(f"replfs: {got!r}\nlinux:  {want!r}")
    return got


# The prelude of every unprivileged probe: code() and a result dict that
# is printed as JSON at the end.
_PRELUDE = r"""
import ctypes, errno, json, os, sys
NOBODY = 65534
b = sys.argv[1]
P = lambda *n: os.path.join(b, *n)
out = {}
def code(f, *a, **kw):
    try:
        f(*a, **kw)
        return "ok"
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e.errno))
def touch(p, data=b""):
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.write(fd, data)
    os.close(fd)
"""


def as_nobody(probe: str, base: str, groups=()) -> dict:
    """Run a probe as uid/gid 65534 in ``base``; returns its ``out``."""
    python = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
    cp = subprocess.run([python, "-c", _PRELUDE + probe + "\nprint(json.dumps(out))", base],
                        user=NOBODY, group=NOBODY, extra_groups=list(groups),
                        capture_output=True, text=True, env=ENV, timeout=60)
    assert cp.returncode == 0, cp.stderr
    return json.loads(cp.stdout)


# ---------------------------------------------------------------- errno values

def sc_names_and_components(b):
    out = {}
    n255, n256 = "x" * 255, "y" * 256
    f = touch(os.path.join(b, "file"))
    os.mkdir(os.path.join(b, "dir"))
    out["create 255"] = code(touch, os.path.join(b, n255))
    out["stat 255"] = code(os.stat, os.path.join(b, n255))
    out["mkdir 255"] = code(os.mkdir, os.path.join(b, "dir", n255))
    out["symlink name 255"] = code(os.symlink, "t", os.path.join(b, "dir", "s" * 255))
    for what, fn in [
        ("create", lambda p: touch(p)),
        ("open", lambda p: os.open(p, os.O_RDONLY)),
        ("stat", os.stat), ("lstat", os.lstat),
        ("mkdir", os.mkdir), ("rmdir", os.rmdir), ("unlink", os.unlink),
        ("mkfifo", os.mkfifo),
        ("symlink", lambda p: os.symlink("target", p)),
        ("link", lambda p: os.link(f, p)),
        ("rename to", lambda p: os.rename(f, p)),
        ("rename from", lambda p: os.rename(p, f + "2")),
        ("chmod", lambda p: os.chmod(p, 0o600)),
        ("chown", lambda p: os.chown(p, 0, 0)),
        ("truncate", lambda p: os.truncate(p, 0)),
        ("utime", lambda p: os.utime(p, None)),
        ("readlink", os.readlink),
    ]:
        out[f"{what} 256"] = code(fn, os.path.join(b, n256))
        out[f"{what} missing component"] = code(fn, os.path.join(b, "nodir", "x"))
        out[f"{what} file as component"] = code(fn, os.path.join(f, "x"))
    out["symlink target 256-byte component"] = code(os.symlink, n256, os.path.join(b, "s256"))
    out["stat through it"] = code(os.stat, os.path.join(b, "s256"))
    out["open file/ "] = code(os.open, f + "/", os.O_RDONLY)
    out["open file/ O_CREAT"] = code(os.open, f + "/", os.O_RDONLY | os.O_CREAT)
    out["mkdir dir/"] = code(os.mkdir, os.path.join(b, "newdir") + "/")
    out["rmdir file"] = code(os.rmdir, f)
    out["unlink dir/"] = code(os.unlink, os.path.join(b, "dir") + "/")
    out["dir after"] = os.path.isdir(os.path.join(b, "dir"))
    return out


def test_errno_names_and_path_components(pair):
    r = same_as_linux(sc_names_and_components, pair)
    assert r["create 255"] == r["stat 255"] == r["mkdir 255"] == "ok"
    assert r["create 256"] == r["mkdir 256"] == r["rename to 256"] == "ENAMETOOLONG"
    assert r["stat missing component"] == "ENOENT"
    assert r["stat file as component"] == r["rmdir file"] == "ENOTDIR"


def sc_eisdir_eloop_eexist(b):
    out = {}
    d = os.path.join(b, "dir")
    os.mkdir(d)
    f = touch(os.path.join(b, "file"), b"data")
    dangling = os.path.join(b, "dangling")
    os.symlink("nowhere", dangling)
    a, c = os.path.join(b, "loop_a"), os.path.join(b, "loop_c")
    os.symlink("loop_c", a)
    os.symlink("loop_a", c)
    sl = os.path.join(b, "slink")
    os.symlink("file", sl)
    dl = os.path.join(b, "dlink")
    os.symlink("dir", dl)
    out["open dir O_WRONLY"] = code(os.open, d, os.O_WRONLY)
    out["open dir O_RDWR"] = code(os.open, d, os.O_RDWR)
    out["open dir O_CREAT"] = code(os.open, d, os.O_RDONLY | os.O_CREAT)
    out["open dir O_RDONLY|O_TRUNC"] = code(os.open, d, os.O_RDONLY | os.O_TRUNC)
    out["unlink dir"] = code(os.unlink, d)
    out["truncate dir"] = code(os.truncate, d, 0)
    out["rmdir symlink to dir"] = code(os.rmdir, dl)
    out["unlink symlink to dir"] = code(os.unlink, dl)
    out["dir survives"] = os.path.isdir(d)
    out["stat loop"] = code(os.stat, a)
    out["open loop"] = code(os.open, a, os.O_RDONLY)
    out["create through loop"] = code(os.open, a, os.O_WRONLY | os.O_CREAT, 0o644)
    out["O_NOFOLLOW symlink"] = code(os.open, sl, os.O_RDONLY | os.O_NOFOLLOW)
    out["O_NOFOLLOW|O_CREAT symlink"] = code(os.open, sl, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW)
    out["O_NOFOLLOW dangling"] = code(os.open, dangling, os.O_RDONLY | os.O_NOFOLLOW)
    out["O_NOFOLLOW regular"] = code(lambda: os.close(os.open(f, os.O_RDONLY | os.O_NOFOLLOW)))
    out["lstat loop"] = code(os.lstat, a)
    for what, fn in [
        ("mkdir", os.mkdir), ("mkfifo", os.mkfifo),
        ("mknod", lambda p: os.mknod(p, stat.S_IFREG | 0o644)),
        ("symlink", lambda p: os.symlink("t", p)),
        ("link", lambda p: os.link(f, p)),
        ("O_CREAT|O_EXCL", lambda p: os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)),
    ]:
        out[f"{what} onto file"] = code(fn, f)
        out[f"{what} onto dir"] = code(fn, d)
        out[f"{what} onto dangling symlink"] = code(fn, dangling)
        out[f"{what} onto ."] = code(fn, os.path.join(d, "."))
    out["dangling is still a symlink"] = os.path.islink(dangling)
    # O_CREAT without O_EXCL follows a dangling symlink and creates its target.
    out["O_CREAT through dangling"] = code(lambda: os.close(os.open(dangling, os.O_WRONLY | os.O_CREAT, 0o600)))
    out["target created"] = os.path.isfile(os.path.join(b, "nowhere"))
    out["file data intact"] = read(f) == b"data"
    return out


def test_errno_eisdir_eloop_eexist(pair):
    r = same_as_linux(sc_eisdir_eloop_eexist, pair)
    assert r["open dir O_WRONLY"] == r["unlink dir"] == "EISDIR"
    assert r["stat loop"] == r["O_NOFOLLOW symlink"] == "ELOOP"
    assert r["mkdir onto dangling symlink"] == r["O_CREAT|O_EXCL onto dangling symlink"] == "EEXIST"
    assert r["target created"]


def sc_rmdir_rename_errors(b):
    out = {}
    p = lambda *n: os.path.join(b, *n)       # noqa: E731
    for n in ("a", "a/sub", "a/sub/deep", "full", "empty", "other"):
        os.mkdir(p(n))
    touch(p("full", "f"))
    touch(p("file"))
    out["rmdir non-empty"] = code(os.rmdir, p("full"))
    out["rmdir ."] = code(os.rmdir, p("a", "."))
    out["rmdir .."] = code(os.rmdir, p("a", "sub", ".."))
    out["rmdir missing"] = code(os.rmdir, p("missing"))
    out["rename dir onto non-empty"] = code(os.rename, p("empty"), p("full"))
    out["rename dir into itself"] = code(os.rename, p("a"), p("a", "x"))
    out["rename dir into its subtree"] = code(os.rename, p("a"), p("a", "sub", "deep", "x"))
    out["rename dir onto its subdir"] = code(os.rename, p("a"), p("a", "sub"))
    out["rename subdir onto ancestor"] = code(os.rename, p("a", "sub", "deep"), p("a"))
    out["rename file onto dir"] = code(os.rename, p("file"), p("other"))
    out["rename dir onto file"] = code(os.rename, p("other"), p("file"))
    out["rename missing"] = code(os.rename, p("missing"), p("x"))
    out["rename into missing dir"] = code(os.rename, p("file"), p("missing", "x"))
    out["rename into file"] = code(os.rename, p("file"), p("file", "x"))
    out["rename ."] = code(os.rename, p("a", "."), p("moved"))
    out["rename onto ."] = code(os.rename, p("other"), p("a", "."))
    out["rename onto .."] = code(os.rename, p("other"), p("a", ".."))
    out["hard link to dir"] = code(os.link, p("a"), p("alink"))
    out["truncate -1"] = code(os.truncate, p("file"), -1)
    fd = os.open(p("file"), os.O_RDWR)
    try:
        out["ftruncate -1"] = code(os.ftruncate, fd, -1)
    finally:
        os.close(fd)
    fd = os.open(p("file"), os.O_RDONLY)
    try:
        out["ftruncate read-only fd"] = code(os.ftruncate, fd, 0)
        out["write read-only fd"] = code(os.write, fd, b"x")
    finally:
        os.close(fd)
    out["tree intact"] = sorted(os.listdir(b))
    return out


def test_errno_rmdir_and_rename(pair):
    r = same_as_linux(sc_rmdir_rename_errors, pair)
    assert r["rmdir non-empty"] == r["rename dir onto non-empty"] == "ENOTEMPTY"
    assert r["rmdir ."] == r["rename dir into its subtree"] == "EINVAL"
    assert r["rename file onto dir"] == "EISDIR" and r["rename dir onto file"] == "ENOTDIR"
    assert r["hard link to dir"] == "EPERM" and r["truncate -1"] == "EINVAL"


def sc_big_sizes(b):
    out = {}
    f = touch(os.path.join(b, "f"))
    for size in (999999999999999999, 2 ** 62, 2 ** 63 - 1):
        r = code(os.truncate, f, size)
        out[f"truncate {size}"] = r if r != "ok" else os.stat(f).st_size == size
    # Not compared with Linux: ext4 caps files at 16 TiB, replfs at 2**60.
    return out


def test_truncate_huge_is_efbig_or_works(pair):
    r = sc_big_sizes(pair[0])
    for k, v in r.items():
        assert v in (True, "EFBIG", "EINVAL"), (k, v)
    os.truncate(os.path.join(pair[0], "f"), 0)


# ---------------------------------------------------------------- permissions

def _perm_setup(b):
    p = lambda *n: os.path.join(b, *n)       # noqa: E731
    os.mkdir(p("noexec"))
    os.chmod(p("noexec"), 0o776)             # readable, writable, not searchable by others
    touch(p("noexec", "f"))
    os.mkdir(p("ro"), 0o755)                 # searchable, not writable
    touch(p("ro", "f"))
    os.mkdir(p("ro", "sub"))
    os.mkdir(p("rw"))
    os.chmod(p("rw"), 0o777)
    touch(p("rw", "rootfile"))
    os.mkdir(p("rw", "rootdir"), 0o755)      # a directory nobody cannot write
    touch(p("w_only"), mode=0o222)
    os.chmod(p("w_only"), 0o222)
    touch(p("r_only"), b"data")
    os.chmod(p("r_only"), 0o444)
    touch(p("writable"), b"data")
    os.chmod(p("writable"), 0o666)
    touch(p("owned"))
    os.chown(p("owned"), NOBODY, NOBODY)
    os.symlink("owned", p("owned_link"))
    os.lchown(p("owned_link"), NOBODY, NOBODY)
    # sticky: root's, nobody's and another user's files and dirs
    os.mkdir(p("sticky"))
    os.chmod(p("sticky"), 0o1777)
    touch(p("sticky", "root"))
    os.chmod(p("sticky", "root"), 0o666)
    touch(p("sticky", "other"))
    os.chown(p("sticky", "other"), OTHER_UID, OTHER_UID)
    os.chmod(p("sticky", "other"), 0o666)
    touch(p("sticky", "mine"))
    os.chown(p("sticky", "mine"), NOBODY, NOBODY)
    os.mkdir(p("sticky", "rootdir"))
    os.chmod(p("sticky", "rootdir"), 0o777)
    # a sticky directory nobody owns: its owner may remove anything in it
    os.mkdir(p("sticky", "nobodys"))
    os.chown(p("sticky", "nobodys"), NOBODY, NOBODY)
    os.chmod(p("sticky", "nobodys"), 0o1777)
    touch(p("sticky", "nobodys", "root"))


_PERM_PROBE = r"""
out["stat in unsearchable dir"] = code(os.stat, P("noexec", "f"))
out["create in unsearchable dir"] = code(touch, P("noexec", "g"))
out["list unsearchable dir"] = code(os.listdir, P("noexec"))
out["create in ro dir"] = code(touch, P("ro", "g"))
out["mkdir in ro dir"] = code(os.mkdir, P("ro", "g"))
out["mkfifo in ro dir"] = code(os.mkfifo, P("ro", "g"))
out["symlink in ro dir"] = code(os.symlink, "t", P("ro", "g"))
out["link into ro dir"] = code(os.link, P("owned"), P("ro", "g"))
out["unlink in ro dir"] = code(os.unlink, P("ro", "f"))
out["rmdir in ro dir"] = code(os.rmdir, P("ro", "sub"))
out["rename out of ro dir"] = code(os.rename, P("ro", "f"), P("rw", "g"))
out["rename into ro dir"] = code(os.rename, P("rw", "rootfile"), P("ro", "g"))
out["rename existing onto ro dir entry"] = code(os.rename, P("owned"), P("ro", "f"))
out["open O_CREAT existing in ro dir"] = code(lambda: os.close(os.open(P("ro", "f"), os.O_RDONLY | os.O_CREAT)))
out["unlink root file in 0777 dir"] = code(os.unlink, P("rw", "rootfile"))
out["move root dir across parents"] = code(os.rename, P("rw", "rootdir"), P("sticky", "rootdir2"))
touch(P("rw", "mine"))
out["rename in 0777 dir"] = code(os.rename, P("rw", "mine"), P("rw", "mine2"))
out["read w-only"] = code(open, P("w_only"), "rb")
out["write r-only"] = code(os.open, P("r_only"), os.O_WRONLY)
out["truncate r-only"] = code(os.truncate, P("r_only"), 0)
out["O_TRUNC r-only"] = code(os.open, P("r_only"), os.O_RDONLY | os.O_TRUNC)
out["truncate writable"] = code(os.truncate, P("writable"), 2)
out["chmod not owner"] = code(os.chmod, P("writable"), 0o777)
out["chown not owner"] = code(os.chown, P("writable"), NOBODY, -1)
out["chown own to other uid"] = code(os.chown, P("owned"), 4321, -1)
out["chown own to same uid"] = code(os.chown, P("owned"), NOBODY, -1)
out["chgrp own to own group"] = code(os.chown, P("owned"), -1, NOBODY)
out["chgrp own to other group"] = code(os.chown, P("owned"), -1, 4321)
out["chmod own"] = code(os.chmod, P("owned"), 0o640)
out["lchown own symlink"] = code(os.lchown, P("owned_link"), -1, NOBODY)
out["utime now not owner writable"] = code(os.utime, P("writable"), None)
out["utime now not owner not writable"] = code(os.utime, P("r_only"), None)
out["utime set not owner writable"] = code(os.utime, P("writable"), (1, 1))
out["utime set own"] = code(os.utime, P("owned"), (1, 1))
out["setxattr not owner"] = code(os.setxattr, P("r_only"), "user.x", b"1")
# sticky
out["sticky unlink root's"] = code(os.unlink, P("sticky", "root"))
out["sticky unlink other's"] = code(os.unlink, P("sticky", "other"))
out["sticky rename root's"] = code(os.rename, P("sticky", "root"), P("sticky", "x"))
touch(P("sticky", "new"))
out["sticky rename own over root's"] = code(os.rename, P("sticky", "new"), P("sticky", "root"))
out["sticky rename own"] = code(os.rename, P("sticky", "new"), P("sticky", "new2"))
out["sticky rmdir root's dir"] = code(os.rmdir, P("sticky", "rootdir"))
out["sticky unlink own"] = code(os.unlink, P("sticky", "mine"))
out["sticky dir owner unlinks root's"] = code(os.unlink, P("sticky", "nobodys", "root"))
out["listing"] = sorted(os.listdir(b))
out["sticky listing"] = sorted(os.listdir(P("sticky")))
"""


def _perm_result(b):
    _perm_setup(b)
    r = as_nobody(_PERM_PROBE, b)
    st = os.stat(os.path.join(b, "owned"))
    r["owned after"] = [st.st_uid, st.st_gid, oct(st.st_mode)]
    return r


def test_permissions_of_an_unprivileged_user(pair):
    r = same_as_linux(_perm_result, pair)
    assert r["stat in unsearchable dir"] == r["create in ro dir"] == "EACCES"
    assert r["unlink in ro dir"] == r["rename into ro dir"] == "EACCES"
    assert r["chmod not owner"] == r["chown own to other uid"] == "EPERM"
    assert r["chgrp own to own group"] == "ok"
    assert r["sticky unlink root's"] == r["sticky rename own over root's"] == "EPERM"
    assert r["sticky unlink own"] == r["sticky dir owner unlinks root's"] == "ok"


# ---------------------------------------------------------------- set-id bits

def _setid_setup(b):
    p = lambda *n: os.path.join(b, *n)       # noqa: E731
    for name, mode in (("w_suid", 0o4777), ("w_sgid_x", 0o2777), ("w_sgid_nox", 0o2767),
                       ("w_both", 0o6777), ("t_both", 0o6777), ("ft_both", 0o6777),
                       ("root_w", 0o6777), ("root_t", 0o6777)):
        touch(p(name), b"0123456789")
        os.chown(p(name), NOBODY, NOBODY)
        os.chmod(p(name), mode)
    touch(p("chmod_sgid"))
    os.chown(p("chmod_sgid"), NOBODY, OTHER_GID)
    os.mkdir(p("sgid_dir"))
    os.chown(p("sgid_dir"), 0, OTHER_GID)
    os.chmod(p("sgid_dir"), 0o2777)


_SETID_PROBE = r"""
def w(name):
    fd = os.open(P(name), os.O_WRONLY)
    os.write(fd, b"x")
    os.close(fd)
for name in ("w_suid", "w_sgid_x", "w_sgid_nox", "w_both"):
    out["write " + name] = code(w, name)
out["truncate t_both"] = code(os.truncate, P("t_both"), 3)
def ft(name):
    fd = os.open(P(name), os.O_WRONLY)
    os.ftruncate(fd, 4)
    os.close(fd)
out["ftruncate ft_both"] = code(ft, "ft_both")
out["chmod g+s, not in group"] = code(os.chmod, P("chmod_sgid"), 0o2755)
out["create in sgid dir"] = code(touch, P("sgid_dir", "f"))
out["create sgid file in sgid dir"] = code(lambda: os.close(os.open(P("sgid_dir", "g"), os.O_CREAT | os.O_WRONLY, 0o2755)))
out["mkdir in sgid dir"] = code(os.mkdir, P("sgid_dir", "d"), 0o755)
out["mkdir in sub"] = code(os.mkdir, P("sgid_dir", "d", "e"), 0o755)
"""


def _setid_result(b):
    _setid_setup(b)
    r = as_nobody(_SETID_PROBE, b)
    p = lambda *n: os.path.join(b, *n)       # noqa: E731
    # root writes and truncates: CAP_FSETID keeps the bits
    with open(p("root_w"), "r+b") as f:
        f.write(b"y")
    os.truncate(p("root_t"), 2)
    # chown by root clears them on regular files, and not on directories
    for name in ("chown_file", "chown_same", "chown_noop"):
        touch(p(name))
        os.chmod(p(name), 0o6755)
    os.mkdir(p("chown_dir"))
    os.chmod(p("chown_dir"), 0o3755)
    os.chown(p("chown_file"), NOBODY, NOBODY)
    os.chown(p("chown_same"), 0, 0)
    os.chown(p("chown_noop"), -1, -1)
    os.chown(p("chown_dir"), NOBODY, NOBODY)
    for name in sorted(os.listdir(b)) + ["sgid_dir/f", "sgid_dir/g", "sgid_dir/d",
                                         "sgid_dir/d/e"]:
        try:
            st = os.lstat(p(name))
        except OSError:
            r[name] = "missing"
            continue
        # (a directory's st_size is the fs's business: ext4 says 4096)
        r[name] = [oct(st.st_mode), st.st_uid, st.st_gid,
                   None if stat.S_ISDIR(st.st_mode) else st.st_size]
    return r


def test_setid_bits(pair):
    r = same_as_linux(_setid_result, pair)
    assert int(r["w_suid"][0], 8) & 0o7777 == 0o777
    assert int(r["w_sgid_nox"][0], 8) & 0o7777 == 0o2767
    assert int(r["root_w"][0], 8) & 0o7777 == 0o6777
    assert int(r["chown_file"][0], 8) & 0o7777 == 0o755
    assert r["sgid_dir/f"][2] == OTHER_GID
    assert int(r["sgid_dir/d/e"][0], 8) & stat.S_ISGID


# A file capability set (VFS_CAP_REVISION_2, effective; CAP_NET_BIND_SERVICE
# permitted): what setcap writes.
_CAPS = struct.pack("<5I", 0x02000001, 1 << 10, 0, 0, 0)

_KILLPRIV_PROBE = r"""
fd = os.open(P("otrunc_both"), os.O_WRONLY | os.O_TRUNC)
os.close(fd)
def w(name):
    fd = os.open(P(name), os.O_WRONLY)
    os.pwrite(fd, b"x", 0)
    os.close(fd)
w("nobody_caps_w")
"""


def _killpriv_result(b):
    """What a write, truncate, O_TRUNC open and chown leave of set-id bits
    and file capabilities (replfs clears them itself: HANDLE_KILLPRIV_V2)."""
    p = lambda *n: os.path.join(b, *n)       # noqa: E731
    touch(p("otrunc_both"), b"0123")
    os.chown(p("otrunc_both"), NOBODY, NOBODY)
    os.chmod(p("otrunc_both"), 0o6777)
    names = ("caps_w", "caps_t", "caps_otrunc", "caps_chown", "caps_read", "caps_chmod",
             "nobody_caps_w", "caps_keep_other")
    for name in names:
        touch(p(name), b"0123456789")
        os.setxattr(p(name), "security.capability", _CAPS)
    os.setxattr(p("caps_keep_other"), "user.other", b"v")
    os.chmod(p("nobody_caps_w"), 0o666)
    with open(p("caps_w"), "r+b") as f:
        f.write(b"y")
    with open(p("caps_keep_other"), "r+b") as f:
        f.write(b"y")
    os.truncate(p("caps_t"), 3)
    os.close(os.open(p("caps_otrunc"), os.O_WRONLY | os.O_TRUNC))
    os.chown(p("caps_chown"), NOBODY, NOBODY)
    read(p("caps_read"))
    os.chmod(p("caps_chmod"), 0o600)
    r = as_nobody(_KILLPRIV_PROBE, b)
    for name in names + ("otrunc_both",):
        st = os.lstat(p(name))
        try:
            caps = os.getxattr(p(name), "security.capability") == _CAPS
        except OSError as e:
            caps = errno.errorcode[e.errno]
        others = sorted(x for x in os.listxattr(p(name)) if x != "security.capability")
        r[name] = [oct(st.st_mode), st.st_size, caps, others]
    return r


def test_writes_truncates_and_chown_kill_privileges_as_linux(pair):
    r = same_as_linux(_killpriv_result, pair)
    for name in ("caps_w", "caps_t", "caps_otrunc", "caps_chown", "nobody_caps_w"):
        assert r[name][2] == "ENODATA", name
    assert r["caps_read"][2] is True and r["caps_chmod"][2] is True
    assert r["caps_keep_other"][2:] == ["ENODATA", ["user.other"]]
    assert int(r["otrunc_both"][0], 8) & 0o7777 == 0o777 and r["otrunc_both"][1] == 0


# ---------------------------------------------------------------- timestamps

def _changes(before, after) -> str:
    """Which of a, m, c changed between two stat results."""
    return "".join(k for k, x, y in (("a", before.st_atime_ns, after.st_atime_ns),
                                     ("m", before.st_mtime_ns, after.st_mtime_ns),
                                     ("c", before.st_ctime_ns, after.st_ctime_ns)) if x != y)


def sc_timestamps(b):
    """For each operation: which of the parent's and the object's mtime and
    ctime it changes (atime is left out: the mount is noatime)."""
    p = lambda *n: os.path.join(b, *n)       # noqa: E731
    os.mkdir(p("d"))
    os.mkdir(p("d2"))
    touch(p("d", "f"), b"12345")
    touch(p("d", "keep"), b"12345")
    os.mkdir(p("d", "sub"))
    out = {}

    def step(name, fn, *objs):
        # an object is a path, or (path before, path after) for renames
        watch = [("d", "d")] + [o if isinstance(o, tuple) else (o, o) for o in objs]
        before = [os.lstat(p(x)) for x, _ in watch]
        time.sleep(0.012)          # coarser than the local fs clock tick
        fn()
        after = [os.lstat(p(y)) for _, y in watch]
        out[name] = " ".join(_changes(x, y).replace("a", "") or "-" for x, y in zip(before, after))

    step("create", lambda: touch(p("d", "new")))
    step("mkdir", lambda: os.mkdir(p("d", "newdir")))
    step("mkfifo", lambda: os.mkfifo(p("d", "fifo")))
    step("symlink", lambda: os.symlink("f", p("d", "sl")))
    step("link", lambda: os.link(p("d", "f"), p("d", "f2")), "d/f")
    step("unlink one of two links", lambda: os.unlink(p("d", "f2")), "d/f")
    step("rename in dir", lambda: os.rename(p("d", "new"), p("d", "new2")),
         ("d/new", "d/new2"))
    step("rename out of dir", lambda: os.rename(p("d", "new2"), p("d2", "x")), "d2",
         ("d/new2", "d2/x"))
    step("rename dir across", lambda: os.rename(p("d", "newdir"), p("d2", "newdir")), "d2",
         ("d/newdir", "d2/newdir"))
    os.link(p("d", "keep"), p("keep_link"))
    step("rename over file", lambda: os.rename(p("d2", "x"), p("d", "keep")), "d2",
         ("d2/x", "d/keep"), "keep_link")
    step("rmdir", lambda: os.rmdir(p("d2", "newdir")), "d2")
    step("unlink", lambda: os.unlink(p("d", "fifo")))
    step("chmod", lambda: os.chmod(p("d", "f"), 0o600), "d/f")
    step("chown", lambda: os.chown(p("d", "f"), 1, 1), "d/f")
    step("chown no change", lambda: os.chown(p("d", "f"), -1, -1), "d/f")
    step("setxattr", lambda: os.setxattr(p("d", "f"), "user.t", b"v"), "d/f")
    step("removexattr", lambda: os.removexattr(p("d", "f"), "user.t"), "d/f")

    def wr():
        with open(p("d", "f"), "r+b") as fh:
            fh.write(b"ab")
    step("write", wr, "d/f")
    step("truncate shrink", lambda: os.truncate(p("d", "f"), 3), "d/f")
    step("truncate grow", lambda: os.truncate(p("d", "f"), 10), "d/f")
    step("truncate same size", lambda: os.truncate(p("d", "f"), 10), "d/f")

    def ftr():
        fd = os.open(p("d", "f"), os.O_WRONLY)
        try:
            os.ftruncate(fd, 10)
        finally:
            os.close(fd)
    step("ftruncate same size", ftr, "d/f")
    step("O_TRUNC", lambda: os.close(os.open(p("d", "f"), os.O_WRONLY | os.O_TRUNC)), "d/f")
    step("O_TRUNC empty", lambda: os.close(os.open(p("d", "f"), os.O_WRONLY | os.O_TRUNC)),
         "d/f")
    step("open O_CREAT existing", lambda: os.close(os.open(p("d", "f"), os.O_WRONLY | os.O_CREAT)), "d/f")
    step("utime", lambda: os.utime(p("d", "f"), (5, 5)), "d/f")
    step("utime now", lambda: os.utime(p("d", "f"), None), "d/f")
    step("read", lambda: read(p("d", "f")), "d/f")
    step("readdir", lambda: os.listdir(p("d")))
    step("symlink ctime on lchown", lambda: os.lchown(p("d", "sl"), 2, 2), "d/sl")

    def fa():
        fd = os.open(p("d", "f"), os.O_WRONLY)
        try:
            os.posix_fallocate(fd, 0, 100000)
        finally:
            os.close(fd)
    step("posix_fallocate grow", fa, "d/f")
    # failed operations change nothing
    touch(p("d", "sub", "x"))
    step("failed rmdir (ENOTEMPTY)", lambda: code(os.rmdir, p("d", "sub")), "d/sub")
    step("failed rename onto non-empty dir", lambda: code(os.rename, p("d2"), p("d", "sub")),
         "d2", "d/sub")
    step("failed link (EEXIST)", lambda: code(os.link, p("d", "f"), p("d", "sl")), "d/f")
    step("failed mkdir (EEXIST)", lambda: code(os.mkdir, p("d", "sub")), "d/sub")
    step("failed O_EXCL", lambda: code(os.open, p("d", "f"), os.O_CREAT | os.O_EXCL), "d/f")
    step("failed rename file onto dir", lambda: code(os.rename, p("d", "f"), p("d", "sub")),
         "d/f", "d/sub")
    return out


def test_timestamps(pair):
    r = same_as_linux(sc_timestamps, pair)
    assert r["create"] == r["unlink"] == "mc"
    assert r["chmod"] == "- c" and r["write"] == "- mc"
    assert r["failed rename onto non-empty dir"] == "- - -"


def sc_utimensat(b):
    f = touch(os.path.join(b, "f"))
    out = {}
    utimensat(f, (1_234_567_890, 123_456_789), (987_654_321, 999_999_999))
    st = os.stat(f)
    out["explicit"] = [st.st_atime_ns, st.st_mtime_ns]
    utimensat(f, (0, UTIME_OMIT), (5, 1))
    st = os.stat(f)
    out["omit atime"] = [st.st_atime_ns, st.st_mtime_ns]
    ctime = st.st_ctime_ns
    time.sleep(0.012)
    utimensat(f, (0, UTIME_OMIT), (0, UTIME_OMIT))
    st = os.stat(f)
    out["omit both keeps ctime"] = [st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns == ctime]
    t0 = time.time_ns()
    utimensat(f, (0, UTIME_NOW), (0, UTIME_OMIT))
    st = os.stat(f)
    out["now atime"] = [st.st_atime_ns >= t0 - 20_000_000, st.st_mtime_ns]
    utimensat(f, (-1, 500), (2 ** 33, 7))               # before 1970, after 2038
    st = os.stat(f)
    out["far times"] = [st.st_atime_ns, st.st_mtime_ns]
    out["bad nsec"] = code(utimensat, f, (0, 1_000_000_000), (0, 0))
    os.symlink("f", os.path.join(b, "sl"))
    utimensat(os.path.join(b, "sl"), (7, 7), (8, 8), AT_SYMLINK_NOFOLLOW)
    lst, st = os.lstat(os.path.join(b, "sl")), os.stat(f)
    out["symlink nofollow"] = [lst.st_mtime_ns, st.st_mtime_ns]
    return out


def test_utimensat(pair):
    r = same_as_linux(sc_utimensat, pair)
    assert r["explicit"] == [1_234_567_890_123_456_789, 987_654_321_999_999_999]
    assert r["far times"] == [-999_999_500, 2 ** 33 * 10 ** 9 + 7]


# ---------------------------------------------------------------- link counts

def sc_link_counts(b):
    p = lambda *n: os.path.join(b, *n)       # noqa: E731
    nl = lambda *n: os.lstat(p(*n)).st_nlink  # noqa: E731
    out = {}
    os.mkdir(p("a"))
    os.mkdir(p("b"))
    out["empty dir"] = nl("a")
    for i in range(3):
        os.mkdir(p("a", f"s{i}"))
    touch(p("a", "file"))
    out["3 subdirs + file"] = nl("a")
    os.rename(p("a", "s0"), p("b", "s0"))
    out["after dir moved a->b"] = [nl("a"), nl("b"), nl("b", "s0")]
    os.rename(p("a", "s1"), p("b", "s0"))                # dir over empty dir
    out["after dir over empty dir"] = [nl("a"), nl("b"), sorted(os.listdir(p("b")))]
    os.rmdir(p("a", "s2"))
    out["after rmdir"] = nl("a")
    out["parent"] = nl()
    touch(p("f"))
    os.link(p("f"), p("f2"))
    out["file with 2 links"] = [nl("f"), nl("f2"), os.stat(p("f")).st_ino == os.stat(p("f2")).st_ino]
    os.symlink("f", p("sl"))
    os.link(p("sl"), p("sl2"), follow_symlinks=False)
    out["link to symlink"] = [nl("sl"), nl("f"), os.path.islink(p("sl2")), os.readlink(p("sl2"))]
    os.link(p("sl"), p("f3"), follow_symlinks=True)
    out["link through symlink"] = [nl("sl"), nl("f"), os.path.islink(p("f3"))]
    os.mkfifo(p("fifo"))
    os.link(p("fifo"), p("fifo2"))
    out["fifo links"] = nl("fifo")
    os.unlink(p("f"))
    out["after unlink"] = nl("f2")
    fd = os.open(p("f2"), os.O_RDONLY)
    try:
        os.unlink(p("f2"))
        os.unlink(p("f3"))
        out["open, all names gone"] = os.fstat(fd).st_nlink
    finally:
        os.close(fd)
    # exchange a file and a directory across parents
    os.mkdir(p("x"))
    os.mkdir(p("x", "dir"))
    os.mkdir(p("y"))
    touch(p("y", "file"))
    renameat2(p("x", "dir"), p("y", "file"), RENAME_EXCHANGE)
    out["after exchange"] = [nl("x"), nl("y"), os.path.isdir(p("y", "file")),
                             os.path.isfile(p("x", "dir"))]
    os.mkdir(p("y", "file", "inner"))
    out["moved dir's .."] = os.stat(p("y", "file", "..")).st_ino == os.stat(p("y")).st_ino
    return out


def test_link_counts(pair):
    r = same_as_linux(sc_link_counts, pair)
    assert r["empty dir"] == 2 and r["3 subdirs + file"] == 5
    assert r["after dir moved a->b"] == [4, 3, 2]
    assert r["link to symlink"][:3] == [2, 2, True]


# ---------------------------------------------------------------- rename

def sc_rename(b):
    p = lambda *n: os.path.join(b, *n)       # noqa: E731
    out = {}
    touch(p("a"), b"A")
    touch(p("b"), b"B")
    ino = os.stat(p("a")).st_ino
    os.rename(p("a"), p("b"))
    out["over file"] = [os.path.exists(p("a")), read(p("b")), os.stat(p("b")).st_ino == ino]
    os.rename(p("b"), p("b"))
    out["onto itself"] = [read(p("b")), os.stat(p("b")).st_nlink]
    os.link(p("b"), p("c"))
    os.rename(p("b"), p("c"))
    out["hard links of one inode"] = [sorted(os.listdir(b)), os.stat(p("c")).st_nlink]
    os.mkdir(p("d"))
    os.mkdir(p("e"))
    touch(p("d", "inside"))
    os.rename(p("d"), p("e"))
    out["dir over empty dir"] = [sorted(os.listdir(b)), os.listdir(p("e"))]
    out["dir over itself"] = code(os.rename, p("e"), p("e"))
    out["NOREPLACE existing"] = code(renameat2, p("b"), p("c"), RENAME_NOREPLACE)
    out["NOREPLACE new"] = code(renameat2, p("c"), p("n"), RENAME_NOREPLACE)
    touch(p("x"), b"X")
    os.mkdir(p("y"))
    out["EXCHANGE file and dir"] = code(renameat2, p("x"), p("y"), RENAME_EXCHANGE)
    out["after exchange"] = [os.path.isdir(p("x")), read(p("y"))]
    out["EXCHANGE missing"] = code(renameat2, p("x"), p("zz"), RENAME_EXCHANGE)
    out["EXCHANGE both flags"] = code(renameat2, p("x"), p("y"),
                                      RENAME_EXCHANGE | RENAME_NOREPLACE)
    out["EXCHANGE with a file"] = code(renameat2, p("x"), p("e", "inside"), RENAME_EXCHANGE)
    os.makedirs(p("z", "sub"))
    touch(p("z", "sub", "f"))
    out["EXCHANGE into own subtree"] = code(renameat2, p("z"), p("z", "sub", "f"),
                                            RENAME_EXCHANGE)
    out["EXCHANGE subtree with ancestor"] = code(renameat2, p("z", "sub", "f"), p("z"),
                                                 RENAME_EXCHANGE)
    os.mkdir(p("q1"))
    os.mkdir(p("q2"))
    touch(p("q1", "h"))
    os.link(p("q1", "h"), p("q2", "h2"))
    os.rename(p("q1", "h"), p("q2", "h2"))
    out["hard links in two dirs"] = [os.listdir(p("q1")), os.listdir(p("q2")),
                                     os.stat(p("q2", "h2")).st_nlink]
    os.mkdir(p("q1", "dd"))
    os.mkdir(p("q2", "dd"))
    os.mkdir(p("q2", "dd", "s"))
    renameat2(p("q1", "dd"), p("q2", "dd"), RENAME_EXCHANGE)
    out["EXCHANGE dirs across parents"] = [os.stat(p(n)).st_nlink for n in ("q1", "q2")] + [
        os.listdir(p("q1", "dd")),
        os.stat(p("q1", "dd", "s", "..", "..")).st_ino == os.stat(p("q1")).st_ino]
    out["EXCHANGE with itself"] = code(renameat2, p("x"), p("x"), RENAME_EXCHANGE)
    os.symlink("y", p("sl"))
    os.rename(p("sl"), p("sl2"))
    out["symlink renamed, not its target"] = [os.readlink(p("sl2")), read(p("y"))]
    os.mkdir(p("m"))
    os.mkdir(p("m", "n"))
    os.rename(p("m", "n"), p("nn"))
    out["moved dir's .."] = os.stat(p("nn", "..")).st_ino == os.stat(b).st_ino
    out["listing"] = sorted(os.listdir(b))
    return out


def test_rename(pair):
    r = same_as_linux(sc_rename, pair)
    assert r["over file"] == [False, b"A", True]
    assert r["hard links of one inode"] == [["b", "c"], 2]
    assert r["NOREPLACE existing"] == "EEXIST"
    assert r["EXCHANGE file and dir"] == "ok"
    assert r["EXCHANGE into own subtree"] == r["EXCHANGE subtree with ancestor"] == "EINVAL"


# ---------------------------------------------------------------- open and special files

def sc_open(b):
    p = lambda *n: os.path.join(b, *n)       # noqa: E731
    out = {}
    touch(p("t"), b"some data")
    os.close(os.open(p("t"), os.O_WRONLY | os.O_TRUNC))
    out["O_TRUNC"] = os.stat(p("t")).st_size
    touch(p("t2"), b"some data")
    os.close(os.open(p("t2"), os.O_RDONLY | os.O_TRUNC))
    out["O_RDONLY|O_TRUNC"] = os.stat(p("t2")).st_size
    old = os.umask(0o027)
    try:
        os.close(os.open(p("um"), os.O_WRONLY | os.O_CREAT, 0o777))
        os.mkdir(p("umd"), 0o777)
        os.mkfifo(p("umf"), 0o666)
        os.close(os.open(p("um_sid"), os.O_WRONLY | os.O_CREAT, 0o7777))
    finally:
        os.umask(old)
    out["umask"] = [oct(os.stat(p(n)).st_mode) for n in ("um", "umd", "umf", "um_sid")]
    os.close(os.open(p("ro_create"), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o444))
    out["created 0444, opened for writing"] = oct(os.stat(p("ro_create")).st_mode)
    out["reopen 0444 for writing as root"] = code(lambda: os.close(os.open(p("ro_create"), os.O_WRONLY)))
    fd = os.open(p("ap"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.write(fd, b"abc")
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, b"def")
    os.pwrite(fd, b"ghi", 0)                  # Linux: O_APPEND wins over the offset
    os.close(fd)
    out["O_APPEND"] = read(p("ap"))
    out["O_EXCL existing"] = code(os.open, p("ap"), os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    fd = os.open(p("sparse"), os.O_RDWR | os.O_CREAT, 0o644)
    os.pwrite(fd, b"end", 70000)
    out["sparse read"] = [os.pread(fd, 5, 0), os.pread(fd, 10, 69998), os.fstat(fd).st_size]
    os.ftruncate(fd, 3)
    os.ftruncate(fd, 8)
    out["truncate then grow reads zeros"] = os.pread(fd, 10, 0)
    os.close(fd)
    # fifos
    os.mkfifo(p("fifo"), 0o644)
    out["fifo read O_NONBLOCK"] = code(lambda: os.close(os.open(p("fifo"), os.O_RDONLY | os.O_NONBLOCK)))
    out["fifo write O_NONBLOCK, no reader"] = code(os.open, p("fifo"), os.O_WRONLY | os.O_NONBLOCK)
    r = os.open(p("fifo"), os.O_RDONLY | os.O_NONBLOCK)
    w = os.open(p("fifo"), os.O_WRONLY | os.O_NONBLOCK)
    os.write(w, b"through the pipe")
    out["fifo data"] = os.read(r, 100)
    os.close(w)
    os.close(r)
    out["fifo size"] = os.stat(p("fifo")).st_size
    # device nodes and sockets
    os.mknod(p("chr"), stat.S_IFCHR | 0o620, os.makedev(1, 3))
    os.mknod(p("blk"), stat.S_IFBLK | 0o660, os.makedev(259, 65536 + 7))
    os.mknod(p("sock"), stat.S_IFSOCK | 0o755)
    os.mknod(p("reg"), stat.S_IFREG | 0o600)
    os.mknod(p("plain"))
    for n in ("chr", "blk", "sock", "reg", "plain"):
        st = os.lstat(p(n))
        out[f"mknod {n}"] = [oct(st.st_mode), os.major(st.st_rdev), os.minor(st.st_rdev),
                             st.st_size]
    out["mknod dir"] = code(os.mknod, p("mdir"), stat.S_IFDIR | 0o755)
    # fallocate
    fd = os.open(p("fa"), os.O_RDWR | os.O_CREAT, 0o644)
    os.write(fd, b"head")
    os.posix_fallocate(fd, 0, 3 * 65536 + 5)
    out["posix_fallocate"] = [os.fstat(fd).st_size, os.pread(fd, 6, 0)]
    os.posix_fallocate(fd, 0, 10)
    out["posix_fallocate inside"] = os.fstat(fd).st_size
    os.close(fd)
    out["posix_fallocate bad length"] = code(_pfa, p("fa"), 0, 0)
    out["posix_fallocate read-only fd"] = code(_pfa, p("fa"), 0, 10, os.O_RDONLY)
    return out


def _pfa(path, off, length, flags=os.O_RDWR):
    fd = os.open(path, flags)
    try:
        os.posix_fallocate(fd, off, length)
    finally:
        os.close(fd)


def test_open_and_special_files(pair):
    r = same_as_linux(sc_open, pair)
    assert r["O_TRUNC"] == 0
    assert r["umask"][:3] == [oct(0o100750), oct(0o40750), oct(0o10640)]
    assert r["O_APPEND"] == b"abcdefghi"
    assert r["fifo write O_NONBLOCK, no reader"] == "ENXIO"
    assert r["mknod blk"][1:3] == [259, 65536 + 7]


def test_fallocate_keep_size_is_eopnotsupp(pair):
    """Not compared with Linux: FALLOC_FL_KEEP_SIZE answers EOPNOTSUPP (no
    clusters past the end of a file in this format); mode 0 allocates
    through the filesystem and grows the file."""
    f = touch(os.path.join(pair[0], "f"), b"abc")
    fd = os.open(f, os.O_RDWR)
    try:
        with pytest.raises(OSError) as e:
            fallocate(fd, FALLOC_FL_KEEP_SIZE, 0, 1 << 20)
        assert e.value.errno == errno.EOPNOTSUPP
        assert os.fstat(fd).st_size == 3
        fallocate(fd, 0, 0, 1 << 20)
        st = os.fstat(fd)
        assert st.st_size == 1 << 20 and st.st_blocks * 512 >= 1 << 20
        assert os.pread(fd, 4, 0) == b"abc\0"
    finally:
        os.close(fd)


# ---------------------------------------------------------------- symlinks and names

def sc_symlinks(b):
    p = lambda *n: os.path.join(b, *n)       # noqa: E731
    out = {}
    odd = bytes(range(1, 256)).replace(b"/", b"") + b"/x/../y"
    for n, target in (("t4095", b"a/" * 2047 + b"b"), ("odd", odd), ("one", b"z")):
        out[f"symlink {n}"] = code(os.symlink, target, os.fsencode(p(n)))
        if out[f"symlink {n}"] == "ok":
            st = os.lstat(p(n))
            out[f"{n} readlink"] = os.readlink(os.fsencode(p(n))) == target
            out[f"{n} lstat"] = [oct(st.st_mode), st.st_size, len(target)]
    out["symlink 4096"] = code(os.symlink, b"c" * 4096, os.fsencode(p("t4096")))
    out["symlink empty"] = code(os.symlink, b"", os.fsencode(p("empty")))
    out["readlink a dir"] = code(os.readlink, b)
    touch(p("reg"))
    out["readlink a file"] = code(os.readlink, p("reg"))
    out["readlink missing"] = code(os.readlink, p("none"))
    os.symlink("reg", p("rel"))
    os.symlink(p("reg"), p("abs"))
    out["follow"] = [os.stat(p("rel")).st_ino == os.stat(p("reg")).st_ino,
                     os.stat(p("abs")).st_ino == os.stat(p("reg")).st_ino]
    os.symlink(".", p("self_dir"))
    out["through dot symlink"] = os.path.isfile(p("self_dir", "self_dir", "reg"))
    return out


def test_symlinks(pair):
    r = same_as_linux(sc_symlinks, pair)
    assert r["symlink t4095"] == "ok" and r["t4095 readlink"]
    assert r["t4095 lstat"] == [oct(0o120777), 4095, 4095]
    assert r["odd readlink"]


def sc_names(b):
    p = lambda *n: os.path.join(b, *n)       # noqa: E731
    out = {}
    names = [bytes([c]) for c in range(1, 256) if c not in (ord("/"), ord("."))]
    names += [b"..." , b".hidden", b"a b", b"\n\t", "żółć ☃ 日本語".encode(), b"\xff\xfe",
              "é".encode() * 127 + b"x", b"-rf", b"*?["]
    names += [b"%03d" % i + b"n" * 252 for i in range(400)]    # 255-byte names, many leaves
    bdir = os.fsencode(p("many"))
    os.mkdir(bdir)
    for n in names:
        fd = os.open(os.path.join(bdir, n), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.write(fd, n[:8])
        os.close(fd)
    listed = os.listdir(bdir)
    out["count"] = [len(listed), len(set(listed)), len(names)]
    out["exact names"] = sorted(listed) == sorted(names)
    out["contents"] = all(read(os.path.join(bdir, n)) == n[:8] for n in names[::7])
    for n in names[::2]:
        os.unlink(os.path.join(bdir, n))
    out["after removing half"] = sorted(os.listdir(bdir)) == sorted(names[1::2])
    # a 4095-byte path through nested 255-byte directories
    deep = os.fsencode(p("deep"))
    os.mkdir(deep)
    cur = deep
    while len(cur) + 256 < 4000:
        cur = os.path.join(cur, b"d" * 255)
        os.mkdir(cur)
    out["deep path"] = code(touch, os.path.join(cur, b"f"))
    long_path = os.path.join(cur, b"f" * (4096 - len(cur) - 1))
    out["path 4096 bytes"] = [len(long_path), code(touch, long_path)]
    return out


def test_names(pair):
    r = same_as_linux(sc_names, pair)
    assert r["exact names"] and r["after removing half"]
    assert r["count"][0] == r["count"][1] == r["count"][2]


# ---------------------------------------------------------------- odds and ends

def sc_misc(b):
    p = lambda *n: os.path.join(b, *n)       # noqa: E731
    out = {}
    # mkdir ignores set-id bits in the mode, keeps the sticky bit
    os.mkdir(p("m7777"), 0o7777)
    out["mkdir 07777"] = oct(os.stat(p("m7777")).st_mode)
    os.chmod(p("m7777"), 0o7777)
    os.mkdir(p("m7777", "in"), 0o7777)
    out["mkdir 07777 in a setgid dir"] = oct(os.stat(p("m7777", "in")).st_mode)
    # creating in a removed directory
    os.mkdir(p("gone"))
    fd = os.open(p("gone"), os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.rmdir(p("gone"))
        out["create in removed dir"] = code(os.open, "x", os.O_CREAT | os.O_WRONLY, 0o644,
                                            dir_fd=fd)
        out["mkdir in removed dir"] = code(os.mkdir, "x", dir_fd=fd)
        out["list removed dir"] = os.listdir(fd)
        out["removed dir nlink"] = os.fstat(fd).st_nlink
        out["fsync a directory"] = code(os.fsync, fd)
    finally:
        os.close(fd)
    # huge offsets
    f = touch(p("f"), b"x")
    fd = os.open(f, os.O_RDWR)
    try:
        out["pwrite at 2**62"] = code(os.pwrite, fd, b"y", 2 ** 62)
        out["pwrite at 2**63-2"] = code(os.pwrite, fd, b"yy", 2 ** 63 - 2)
        out["size after"] = os.fstat(fd).st_size
        out["read far past EOF"] = os.pread(fd, 10, 2 ** 40)
    finally:
        os.close(fd)
    # d_type of readdir entries (scandir answers is_dir without a stat)
    os.mkdir(p("types"))
    touch(p("types", "reg"))
    os.mkdir(p("types", "dir"))
    os.symlink("reg", p("types", "lnk"))
    os.mkfifo(p("types", "fifo"))
    os.mknod(p("types", "sock"), stat.S_IFSOCK | 0o600)
    out["d_type"] = sorted((e.name, e.is_dir(follow_symlinks=False), e.is_file(follow_symlinks=False),
                            e.is_symlink()) for e in os.scandir(p("types")))
    # xattrs
    x = touch(p("x"))
    out["getxattr missing"] = code(os.getxattr, x, "user.none")
    out["removexattr missing"] = code(os.removexattr, x, "user.none")
    out["XATTR_REPLACE missing"] = code(os.setxattr, x, "user.a", b"1", os.XATTR_REPLACE)
    out["XATTR_CREATE new"] = code(os.setxattr, x, "user.a", b"1", os.XATTR_CREATE)
    out["XATTR_CREATE existing"] = code(os.setxattr, x, "user.a", b"2", os.XATTR_CREATE)
    out["XATTR_REPLACE existing"] = code(os.setxattr, x, "user.a", b"3", os.XATTR_REPLACE)
    out["empty value"] = code(os.setxattr, x, "user.empty", b"")
    out["255-byte name"] = code(os.setxattr, x, "user." + "n" * 250, b"v")
    out["256-byte name"] = code(os.setxattr, x, "user." + "n" * 251, b"v")
    out["binary value"] = code(os.setxattr, x, "user.bin", bytes(range(256)) * 8)
    out["unknown namespace"] = code(os.setxattr, x, "bogus.a", b"v")
    out["trusted as root"] = code(os.setxattr, x, "trusted.t", b"v")
    out["values"] = [os.getxattr(x, "user.a"), os.getxattr(x, "user.empty"),
                     os.getxattr(x, "user.bin") == bytes(range(256)) * 8]
    out["list"] = sorted(os.listxattr(x))
    os.symlink("x", p("xl"))
    out["user xattr on symlink"] = code(os.setxattr, p("xl"), "user.a", b"v",
                                        follow_symlinks=False)
    out["size query"] = len(os.getxattr(x, "user.bin"))
    return out


def test_misc(pair):
    r = same_as_linux(sc_misc, pair)
    assert r["mkdir 07777"] == oct(0o41755)
    assert r["create in removed dir"] == "ENOENT"
    assert r["XATTR_CREATE existing"] == "EEXIST" and r["XATTR_REPLACE missing"] == "ENODATA"


def test_statvfs_namemax(volume):
    assert os.statvfs(volume["mnt"]).f_namemax == 255


def sc_removed_but_referenced(b):
    """Inodes the kernel still holds without an open file: a removed
    current directory, an O_PATH descriptor of an unlinked file."""
    p = lambda *n: os.path.join(b, *n)       # noqa: E731
    out = {}
    os.mkdir(p("cwd"))
    touch(p("f"), b"abc")
    here = os.getcwd()
    os.chdir(p("cwd"))
    try:
        os.rmdir(p("cwd"))
        out["stat . of removed cwd"] = code(os.stat, ".")
        out["nlink"] = os.stat(".").st_nlink if out["stat . of removed cwd"] == "ok" else None
        out["create in removed cwd"] = code(touch, "x")
    finally:
        os.chdir(here)
    fd = os.open(p("f"), os.O_PATH)
    try:
        os.unlink(p("f"))
        st = os.fstat(fd)
        out["fstat O_PATH of unlinked file"] = [st.st_nlink, st.st_size]
    finally:
        os.close(fd)
    return out


def test_removed_but_still_referenced(pair):
    r = same_as_linux(sc_removed_but_referenced, pair)
    assert r["nlink"] == 0


def test_space_of_an_unlinked_file_comes_back(volume, pair):
    """An unlinked inode the kernel still knows stays as an orphan until
    the kernel forgets it (promptly, once the last dentry goes): the
    clusters must come back without an unmount."""
    d = pair[0]
    f = touch(os.path.join(d, "big"), bytes(8 << 20))
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
        before = os.statvfs(volume["mnt"]).f_bfree
        os.unlink(f)
        deadline = time.monotonic() + 5
        while True:
            os.fsync(fd)
            freed = (os.statvfs(volume["mnt"]).f_bfree - before) * os.statvfs(volume["mnt"]).f_frsize
            if freed >= 8 << 20 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
    finally:
        os.close(fd)
    assert freed >= 8 << 20
