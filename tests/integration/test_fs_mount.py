"""The replfs mount program through real FUSE mounts: mount(8) with
-t fuse.replfs and an fstab line, the program run directly, umount and
fusermount3 -u, ro, refusals with their messages, crash safety of fsync
(kill -9 of the mount process), persistent inode numbers, and a resource
of a real replfsd pair.

The helpers here are shared with test_fs_posix.py.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

VENV_BIN = os.path.dirname(sys.executable)
ENV = dict(os.environ, PATH=f"{VENV_BIN}:{os.environ.get('PATH', '/usr/bin:/bin')}")
ENV.pop("REPLFS_NODE", None)


def fuse_usable() -> bool:
    return (os.path.exists("/dev/fuse") and os.geteuid() == 0
            and shutil.which("mount.fuse3") is not None)


pytestmark = pytest.mark.skipif(not fuse_usable(), reason="needs /dev/fuse, root and mount.fuse3")


def run(*cmd, check=True, timeout=60, env=None) -> subprocess.CompletedProcess:
    cp = subprocess.run([str(c) for c in cmd], capture_output=True, text=True,
                        env=env or ENV, timeout=timeout)
    if check and cp.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} exited {cp.returncode}:\n"
                             f"{cp.stdout}{cp.stderr}")
    return cp


def mount_entry(path) -> dict | None:
    path = os.path.realpath(str(path))
    found = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields, rest = left.split(), right.split()
            if fields[4] == path:
                found = {"fstype": rest[0], "source": rest[1], "options": fields[5],
                         "dev": fields[2],
                         "super": rest[2] if len(rest) > 2 else ""}
    return found


def mounted(path) -> bool:
    return mount_entry(path) is not None


def wait_unmounted_process(img, timeout=20.0) -> None:
    """Wait until no mount process holds the image (it writes its journal
    after umount(8) has returned)."""
    import fcntl
    fd = os.open(str(img), os.O_RDONLY)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                fcntl.flock(fd, fcntl.LOCK_UN)
                return
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise AssertionError(f"a mount process still holds {img}")
                time.sleep(0.02)
    finally:
        os.close(fd)


def force_unmount(mnt) -> None:
    """Best effort, for finally blocks: never leave a mount behind."""
    for cmd in (["umount", str(mnt)], ["umount", "-l", str(mnt)],
                ["fusermount3", "-u", "-z", str(mnt)]):
        if not mounted(mnt):
            return
        subprocess.run(cmd, capture_output=True, timeout=30)


def mkfs(img, size=64 << 20, *args) -> str:
    with open(img, "wb") as f:
        f.truncate(size)
    run(os.path.join(VENV_BIN, "mkfs.replfs"), "-q", *args, img)
    return str(img)


def fsck_ok(img) -> None:
    fsck = os.path.join(VENV_BIN, "fsck.replfs")
    if not os.path.exists(fsck):
        return
    cp = run(fsck, "-n", img, check=False)
    assert cp.returncode == 0, f"fsck.replfs -n {img} exited {cp.returncode}:\n{cp.stdout}{cp.stderr}"


def replfs_mount(img, mnt, *opts, logfile=None) -> None:
    o = ",".join([*opts, f"logfile={logfile}"] if logfile else list(opts))
    run(os.path.join(VENV_BIN, "replfs"), img, mnt, *(["-o", o] if o else []))
    assert mounted(mnt)


def umount(mnt, img=None) -> None:
    run("umount", mnt)
    if img is not None:
        wait_unmounted_process(img)


@contextlib.contextmanager
def mounted_image(img, mnt, *opts, logfile=None):
    os.makedirs(mnt, exist_ok=True)
    replfs_mount(img, mnt, *opts, logfile=logfile)
    try:
        yield str(mnt)
    finally:
        force_unmount(mnt)
        wait_unmounted_process(img)


def log_of(path) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def assert_clean_log(path) -> None:
    text = log_of(path)
    bad = [ln for ln in text.splitlines() if " ERROR " in ln or "Traceback" in ln]
    assert not bad, f"errors in the mount log {path}:\n{text}"


@pytest.fixture
def image(tmp_path):
    img = mkfs(tmp_path / "vol.img")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    yield img, str(mnt), str(tmp_path / "mount.log")
    force_unmount(mnt)
    wait_unmounted_process(img)


# ---------------------------------------------------------------- the ways in

def test_mount_t_fuse_replfs_then_umount_and_remount_directly(image):
    img, mnt, logf = image
    cp = run("mount", "-t", "fuse.replfs", img, mnt, "-o",
             f"noatime,commit=1,logfile={logf}")
    assert cp.stderr == ""
    ent = mount_entry(mnt)
    assert ent["fstype"] == "fuse.replfs" and ent["source"] == img, ent
    assert "default_permissions" in ent["super"] and "allow_other" in ent["super"], ent
    with open(os.path.join(mnt, "hello"), "w") as f:
        f.write("world\n")
    os.mkdir(os.path.join(mnt, "dir"))
    inos = {n: os.lstat(os.path.join(mnt, n)).st_ino for n in ("hello", "dir", "lost+found")}
    assert os.stat(mnt).st_ino == 1
    umount(mnt, img)
    assert not mounted(mnt)
    fsck_ok(img)

    replfs_mount(img, mnt, logfile=logf)
    with open(os.path.join(mnt, "hello")) as f:
        assert f.read() == "world\n"
    # Inode numbers are the on-disk ones: stable across mounts.
    assert {n: os.lstat(os.path.join(mnt, n)).st_ino for n in inos} == inos
    run("fusermount3", "-u", mnt)
    wait_unmounted_process(img)
    assert not mounted(mnt)
    fsck_ok(img)
    assert "unmounted cleanly" in log_of(logf)
    assert_clean_log(logf)


def test_fstab_line_with_netdev_and_defaults(image, tmp_path):
    img, mnt, logf = image
    fstab = tmp_path / "fstab"
    fstab.write_text(f"# test fstab\n{img} {mnt} fuse.replfs "
                     f"defaults,_netdev,nofail,x-systemd.requires=replfsd.service,"
                     f"commit=2,cache_size=16,logfile={logf} 0 0\n")
    run("mount", "-T", str(fstab), mnt)
    assert mount_entry(mnt)["fstype"] == "fuse.replfs"
    os.mkdir(os.path.join(mnt, "x"))
    umount(mnt, img)
    # The same options straight on the command line (mount(8) would have
    # dropped the mount(8)-only ones): they are ignored, not refused.
    replfs_mount(img, mnt, "defaults", "_netdev", "auto", "users", "x-foo=bar", logfile=logf)
    assert os.path.isdir(os.path.join(mnt, "x"))
    umount(mnt, img)
    assert_clean_log(logf)


def test_read_only_mount_refuses_changes(image):
    img, mnt, logf = image
    with mounted_image(img, mnt, logfile=logf):
        with open(os.path.join(mnt, "f"), "w") as f:
            f.write("data")
    with mounted_image(img, mnt, "ro", logfile=logf):
        assert "ro" in mount_entry(mnt)["options"].split(",")
        with open(os.path.join(mnt, "f")) as f:
            assert f.read() == "data"
        for attempt in (lambda: open(os.path.join(mnt, "f"), "w"),
                        lambda: open(os.path.join(mnt, "new"), "w"),
                        lambda: os.mkdir(os.path.join(mnt, "d")),
                        lambda: os.unlink(os.path.join(mnt, "f")),
                        lambda: os.chmod(os.path.join(mnt, "f"), 0o600),
                        lambda: os.setxattr(os.path.join(mnt, "f"), "user.a", b"1")):
            with pytest.raises(OSError) as e:
                attempt()
            assert e.value.errno == errno.EROFS
    fsck_ok(img)


def test_refusals_have_clear_messages_and_exit_codes(tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    replfs = os.path.join(VENV_BIN, "replfs")
    blank = tmp_path / "blank.img"
    with open(blank, "wb") as f:
        f.truncate(16 << 20)
    try:
        cp = run("mount", "-t", "fuse.replfs", blank, mnt, check=False)
        assert cp.returncode != 0
        assert "not a replfs volume" in cp.stderr, cp.stderr
        assert not mounted(mnt)

        cp = run(replfs, blank, mnt, check=False)
        assert cp.returncode == 32 and "no replfs superblock" in cp.stderr, cp.stderr

        img = mkfs(tmp_path / "vol.img", 32 << 20)
        cp = run(replfs, img, mnt, "-o", "frobnicate", check=False)
        assert cp.returncode == 1 and "unknown mount option 'frobnicate'" in cp.stderr
        cp = run(replfs, img, mnt, "-o", "commit=soon", check=False)
        assert cp.returncode == 1 and "commit" in cp.stderr
        cp = run(replfs, img, mnt, "-o", "slot=9", check=False)
        assert cp.returncode == 1 and "out of range" in cp.stderr
        cp = run(replfs, img, tmp_path / "nowhere", check=False)
        assert cp.returncode == 32 and "does not exist" in cp.stderr
        cp = run(replfs, "no-such-resource", mnt, "-o",
                 f"conf={tmp_path}/none.conf", check=False)
        assert cp.returncode == 32 and "not found" in cp.stderr
        cp = run(replfs, img, check=False)
        assert cp.returncode == 1 and "usage:" in cp.stderr
        assert not mounted(mnt)
        cp = run(replfs, "--help")
        assert "MOUNTPOINT" in cp.stdout and "commit=SECONDS" in cp.stdout
        assert run(replfs, "--version").stdout.startswith("replfs ")
    finally:
        force_unmount(mnt)


def test_kill9_after_fsync_keeps_the_data(image):
    img, mnt, logf = image
    proc = subprocess.Popen([os.path.join(VENV_BIN, "replfs"), img, mnt, "-f", "-o",
                             f"commit=3600,logfile={logf}"], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while not mounted(mnt):
            assert proc.poll() is None, log_of(logf)
            assert time.monotonic() < deadline, "mount did not appear"
            time.sleep(0.02)
        payload = os.urandom(300_000)
        os.mkdir(os.path.join(mnt, "d"))
        fd = os.open(os.path.join(mnt, "d", "synced"), os.O_CREAT | os.O_WRONLY, 0o640)
        os.write(fd, payload)
        os.fsync(fd)
        os.close(fd)
        ino = os.stat(os.path.join(mnt, "d", "synced")).st_ino
        with open(os.path.join(mnt, "unsynced"), "wb") as f:
            f.write(b"maybe")
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        force_unmount(mnt)
    assert not mounted(mnt)
    # The next mount replays the journal of the dead mount's slot.
    with mounted_image(img, mnt, logfile=logf):
        st = os.stat(os.path.join(mnt, "d", "synced"))
        assert st.st_ino == ino and st.st_size == len(payload) and st.st_mode & 0o777 == 0o640
        with open(os.path.join(mnt, "d", "synced"), "rb") as f:
            assert f.read() == payload
        names = set(os.listdir(mnt))
        assert {"d", "lost+found"} <= names <= {"d", "lost+found", "unsynced"}
    fsck_ok(img)


def test_sigterm_unmounts_cleanly(image):
    img, mnt, logf = image
    proc = subprocess.Popen([os.path.join(VENV_BIN, "replfs"), img, mnt, "-f", "-o",
                             f"logfile={logf}"], env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        while not mounted(mnt):
            assert proc.poll() is None and time.monotonic() < deadline, log_of(logf)
            time.sleep(0.02)
        with open(os.path.join(mnt, "f"), "w") as f:
            f.write("x" * 10000)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        force_unmount(mnt)
    assert not mounted(mnt)
    assert "unmounted cleanly" in log_of(logf)
    fsck_ok(img)
    with mounted_image(img, mnt):
        assert os.path.getsize(os.path.join(mnt, "f")) == 10000


def test_second_mount_of_an_image_is_refused(image, tmp_path, monkeypatch):
    img, mnt, logf = image
    mnt2 = tmp_path / "mnt2"
    mnt2.mkdir()
    with mounted_image(img, mnt, logfile=logf):
        env = dict(ENV)
        cp = subprocess.run([sys.executable, "-c",
                             "import sys; from replfs.fs import mount; mount.LOCK_WAIT = 0.2; "
                             "sys.exit(mount.main(sys.argv[1:]))", img, str(mnt2)],
                            capture_output=True, text=True, env=env, timeout=30)
        assert cp.returncode == 32, cp.stderr
        assert "in use by another replfs mount" in cp.stderr
        assert not mounted(mnt2)


# ---------------------------------------------------------------- a resource

def test_resource_of_a_replfsd_pair(tmp_path):
    from replfs.localpair import LocalPair
    pair = LocalPair(tmp_path)
    a, b = pair.alpha, pair.beta
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    replfs = os.path.join(VENV_BIN, "replfs")
    try:
        pair.up_fresh()
        aopts = f"conf={a.conf},node=alpha,rundir={a.rundir},timeout=5"
        bopts = f"conf={b.conf},node=beta,rundir={b.rundir}"
        # beta is Secondary: refused before anything is started.
        cp = run(replfs, "r0", mnt, "-o", bopts, check=False)
        assert cp.returncode == 32 and "Secondary, not Primary" in cp.stderr, cp.stderr
        # Not formatted yet.
        cp = run(replfs, "r0", mnt, "-o", aopts, check=False)
        assert cp.returncode == 32 and "not a replfs volume" in cp.stderr, cp.stderr
        run(os.path.join(VENV_BIN, "mkfs.replfs"), "-q", "-N", "2", "-c", a.conf, "--rundir",
            a.rundir, "r0", env=dict(ENV, REPLFS_NODE="alpha"))
        # Through mount(8): the environment is not passed on, options are.
        run("mount", "-t", "fuse.replfs", "r0", mnt, "-o", aopts)
        ent = mount_entry(mnt)
        assert ent["source"] == "r0" and ent["fstype"] == "fuse.replfs", ent
        data = os.urandom(1 << 20)
        with open(os.path.join(mnt, "blob"), "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        assert os.path.exists(os.path.join(a.rundir, "mount-r0.log"))
        run("umount", mnt)
        deadline = time.monotonic() + 20
        while a.status()["open_count"]:
            assert time.monotonic() < deadline, "mount process did not close the resource"
            time.sleep(0.05)
        # Fail over: beta Primary sees the file.
        a.adm("secondary", "r0")
        b.adm("primary", "r0")
        run("mount", "-t", "fuse.replfs", "r0", mnt, "-o", bopts)
        with open(os.path.join(mnt, "blob"), "rb") as f:
            assert hashlib.sha256(f.read()).digest() == hashlib.sha256(data).digest()
        # replfsd serves the mount itself: the mount is listed by it, and
        # its opener is the daemon's own.
        with b.client() as c:
            listed = [m["mountpoint"] for m in c.call("mounts")[0]["mounts"]]
        assert listed == [os.path.realpath(mnt)]
        # A second mount of the resource on this node would share its slot.
        mnt2 = tmp_path / "mnt2"
        mnt2.mkdir()
        cp = run("mount", "-t", "fuse.replfs", "r0", mnt2, "-o", bopts, check=False)
        assert cp.returncode == 32 and "already mounted on" in cp.stderr, cp.stderr
        assert not mounted(mnt2)
        # The daemon dies under the mount: the kernel aborts the connection,
        # every operation fails at once (ENOTCONN), nothing can be written.
        b.kill9()
        t0 = time.monotonic()
        with pytest.raises(OSError) as e:
            with open(os.path.join(mnt, "blob"), "rb") as f:
                f.read()
        assert e.value.errno in (errno.ENOTCONN, errno.ECONNABORTED, errno.EIO)
        with pytest.raises(OSError) as e:
            os.mkdir(os.path.join(mnt, "newdir"))
        assert e.value.errno in (errno.ENOTCONN, errno.ECONNABORTED, errno.EIO)
        assert time.monotonic() - t0 < 15
        # The next replfsd detaches the dead mount.
        b.start()
        deadline = time.monotonic() + 20
        while mounted(mnt):
            assert time.monotonic() < deadline, "the restarted replfsd left the dead mount"
            time.sleep(0.1)
    finally:
        force_unmount(mnt)
        pair.teardown()
