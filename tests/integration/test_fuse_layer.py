"""replfs.fuse through real mounts: an in-memory filesystem served by our layer.

Every test runs the server (tests/harness/memfs.py) in a subprocess under a
FuseWatch: a hard deadline that aborts the FUSE connections on a hang,
and a cleanup that unmounts and kills whatever the test started.
"""
from __future__ import annotations

import errno
import fcntl
import os
import select
import signal
import subprocess
import sys
import textwrap
import time
import uuid

import pytest

from replfs.fuse import mount as fmount
from tests.harness.fusewatch import REPO, FuseWatch, MemfsServer, fuse_unusable_reason

pytestmark = [pytest.mark.fuse,
              pytest.mark.skipif(fuse_unusable_reason() is not None,
                                 reason=str(fuse_unusable_reason()))]


@pytest.fixture
def watch():
    with FuseWatch(timeout=25) as w:
        yield w
    assert w.leftovers() == []


@pytest.fixture
def mnt(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    return str(a), str(b)


def sh(cmd: str, timeout: float = 10) -> str:
    r = subprocess.run(["sh", "-ec", cmd], capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, (cmd, r.stdout, r.stderr)
    return r.stdout


class Py:
    """A child Python process on a script; talks by lines on stdout."""

    def __init__(self, watch: FuseWatch, code: str, *args: str):
        self.proc = watch.add_proc(subprocess.Popen(
            [sys.executable, "-u", "-c", textwrap.dedent(code), *args], cwd=REPO,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))

    def line(self, timeout: float = 10) -> str:
        r, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not r:
            return ""
        return self.proc.stdout.readline().strip()

    def expect(self, want: str, timeout: float = 10) -> None:
        got = self.line(timeout)
        if got != want and self.proc.poll() is not None:
            got += " / " + self.proc.stderr.read()
        assert got == want

    def silent_for(self, seconds: float) -> bool:
        r, _, _ = select.select([self.proc.stdout], [], [], seconds)
        return not r

    def finish(self, timeout: float = 10) -> int:
        return self.proc.wait(timeout)


# ------------------------------------------------------------------ basics

def test_basic_file_operations_through_the_mount(watch, mnt):
    a, _ = mnt
    srv = MemfsServer(watch, [a])
    out = sh(f"""
        cd {a}
        echo hello > f
        cat f
        mkdir d
        ln -s f l
        readlink l
        ln f hard
        mv f g
        stat -c '%s %h' g
        truncate -s 3 g
        cat g; echo
        ls
        rm g hard l
        rmdir d
        ls -A | wc -l
    """)
    assert out == "hello\nf\n6 2\nhel\nd\ng\nhard\nl\n0\n"
    # os-level calls: xattrs, rename flags, O_TRUNC, a directory bigger than one readdir reply
    p = os.path.join(a, "x")
    with open(p, "w") as f:
        f.write("12345")
    os.setxattr(p, "user.k", b"v")
    assert os.getxattr(p, "user.k") == b"v" and os.listxattr(p) == ["user.k"]
    with pytest.raises(OSError) as exc:
        os.getxattr(p, "user.none")
    assert exc.value.errno == errno.ENODATA
    fd = os.open(p, os.O_WRONLY | os.O_TRUNC)
    os.close(fd)
    assert os.stat(p).st_size == 0
    names = {f"n{i:04d}-" + "x" * 40 for i in range(400)}
    for n in names:
        os.close(os.open(os.path.join(a, n), os.O_CREAT | os.O_WRONLY))
    assert set(os.listdir(a)) == names | {"x"}
    for n in names:
        os.unlink(os.path.join(a, n))
    os.unlink(p)
    assert os.listdir(a) == []
    srv.stop()
    srv.assert_clean()
    ops = srv.stats[a]["ops"]
    assert ops["READDIRPLUS"] >= 3        # 400 long names need several replies
    assert fmount.find_mount(a) is None


def test_two_mounts_served_by_one_process_at_once(watch, mnt):
    a, b = mnt
    srv = MemfsServer(watch, [a, b])
    with open(os.path.join(a, "shared"), "w") as f:
        f.write("from a")
    with open(os.path.join(b, "shared")) as f:
        assert f.read() == "from a"
    # both mounts busy at the same time, from separate shells
    loop = "i=0; while [ $i -lt 150 ]; do echo $i > {m}/w{t}$i; cat {m}/w{t}$i >/dev/null; " \
           "rm {m}/w{t}$i; i=$((i+1)); done; echo done"
    procs = [watch.add_proc(subprocess.Popen(["sh", "-c", loop.format(m=m, t=t)],
                                             stdout=subprocess.PIPE, text=True))
             for t, m in (("a", a), ("b", b))]
    for p in procs:
        out, _ = p.communicate(timeout=20)
        assert out.strip() == "done" and p.returncode == 0
    stats = srv.stop()
    srv.assert_clean()
    assert stats[a]["ops"]["CREATE"] >= 150 and stats[b]["ops"]["CREATE"] >= 150


# ------------------------------------------------------------------ space

def test_fallocate_modes(watch, mnt):
    a, _ = mnt
    srv = MemfsServer(watch, [a])
    p = os.path.join(a, "f")
    fd = os.open(p, os.O_CREAT | os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, 65536)                # mode 0: allocates and extends
        st = os.fstat(fd)
        assert st.st_size == 65536 and st.st_blocks == 128
        os.pwrite(fd, b"\xff" * 65536, 0)
    finally:
        os.close(fd)
    sh(f"fallocate --keep-size -o 65536 -l 8192 {p}")    # KEEP_SIZE: blocks, same size
    st = os.stat(p)
    assert st.st_size == 65536 and st.st_blocks == 144
    sh(f"fallocate -l 131072 {p}")                       # the command, mode 0
    assert os.stat(p).st_size == 131072
    sh(f"fallocate --punch-hole -o 4096 -l 8192 {p}")    # PUNCH_HOLE|KEEP_SIZE
    with open(p, "rb") as f:
        data = f.read()
    assert data[:4096] == b"\xff" * 4096 and data[4096:12288] == bytes(8192)
    assert data[12288:65536] == b"\xff" * (65536 - 12288)
    assert os.stat(p).st_size == 131072
    sh(f"fallocate --zero-range -o 16384 -l 4096 {p}")   # ZERO_RANGE
    with open(p, "rb") as f:
        f.seek(16384)
        assert f.read(4096) == bytes(4096)
    r = subprocess.run(["fallocate", "--collapse-range", "-o", "0", "-l", "4096", p],
                       capture_output=True, text=True, timeout=10)
    assert r.returncode != 0 and "not supported" in r.stderr.lower()
    srv.stop()
    srv.assert_clean()
    assert srv.stats[a]["ops"]["FALLOCATE"] >= 5


def test_seek_data_and_hole(watch, mnt):
    a, _ = mnt
    srv = MemfsServer(watch, [a])
    fd = os.open(os.path.join(a, "sparse"), os.O_CREAT | os.O_RDWR)
    try:
        os.pwrite(fd, b"x" * 10, 3 * 4096 + 5)               # data in block 3
        os.posix_fallocate(fd, 8 * 4096, 4096)               # allocated block 8
        os.ftruncate(fd, 12 * 4096)
        assert os.lseek(fd, 0, os.SEEK_DATA) == 3 * 4096
        assert os.lseek(fd, 0, os.SEEK_HOLE) == 0
        assert os.lseek(fd, 3 * 4096, os.SEEK_HOLE) == 4 * 4096
        assert os.lseek(fd, 4 * 4096, os.SEEK_DATA) == 8 * 4096
        assert os.lseek(fd, 9 * 4096, os.SEEK_HOLE) == 9 * 4096
        with pytest.raises(OSError) as exc:
            os.lseek(fd, 9 * 4096, os.SEEK_DATA)
        assert exc.value.errno == errno.ENXIO
        with pytest.raises(OSError) as exc:
            os.lseek(fd, 12 * 4096, os.SEEK_HOLE)
        assert exc.value.errno == errno.ENXIO
    finally:
        os.close(fd)
    srv.stop()
    srv.assert_clean()
    assert srv.stats[a]["ops"]["LSEEK"] >= 6


def test_copy_file_range(watch, mnt):
    a, _ = mnt
    srv = MemfsServer(watch, [a])
    src = os.open(os.path.join(a, "src"), os.O_CREAT | os.O_RDWR)
    dst = os.open(os.path.join(a, "dst"), os.O_CREAT | os.O_RDWR)
    try:
        payload = os.urandom(200_000)
        os.pwrite(src, payload, 0)
        n = os.copy_file_range(src, dst, 150_000, 1000, 50)
        assert n == 150_000
        assert os.pread(dst, 150_100, 0) == bytes(50) + payload[1000:151_000]
    finally:
        os.close(src)
        os.close(dst)
    srv.stop()
    srv.assert_clean()
    assert srv.stats[a]["ops"]["COPY_FILE_RANGE"] >= 1


# ------------------------------------------------------------------ locks

LOCKER = """
    import errno, fcntl, os, signal, sys, time
    path, mode = sys.argv[1], sys.argv[2]
    fd = os.open(path, os.O_RDWR)
    class Alarm(Exception):
        pass
    def raising(sig, frame):
        raise Alarm()
    interrupted = []
    def quiet(sig, frame):
        interrupted.append(1)
    if mode == "nonblock":
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 10, 0)
            print("granted")
        except OSError as e:
            print(errno.errorcode[e.errno])
    elif mode == "getlk":
        import struct
        fmt = "hhqqi"
        got = fcntl.fcntl(fd, fcntl.F_GETLK, struct.pack(fmt, fcntl.F_WRLCK, 0, 5, 1, 0))
        typ, _, start, length, pid = struct.unpack(fmt, got)
        print(typ, start, length, pid)
    elif mode == "block":
        print("waiting")
        fcntl.lockf(fd, fcntl.LOCK_EX, 10, 0)
        print("granted")
        sys.stdin.readline()
    elif mode == "interrupt":
        signal.signal(signal.SIGALRM, raising)
        signal.setitimer(signal.ITIMER_REAL, 0.3)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX, 10, 0)
            print("granted")
        except Alarm:
            print("interrupted")
    elif mode == "retry":
        signal.signal(signal.SIGALRM, quiet)
        signal.setitimer(signal.ITIMER_REAL, 0.2)
        print("waiting")
        fcntl.lockf(fd, fcntl.LOCK_EX, 10, 0)     # EINTR is retried (PEP 475)
        print("granted after", len(interrupted), "signal")
    elif mode.startswith("deadlock"):
        mine, other = (0, 1) if mode == "deadlock1" else (1, 0)
        fcntl.lockf(fd, fcntl.LOCK_EX, 1, mine)
        print("holding")
        sys.stdin.readline()
        print("waiting")
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX, 1, other)
            print("granted")
        except OSError as e:
            print("EDEADLK" if e.errno == errno.EDEADLK else errno.errorcode[e.errno])
        sys.stdin.readline()
"""


def _locker_stdin(watch, path, mode):
    proc = watch.add_proc(subprocess.Popen(
        [sys.executable, "-u", "-c", textwrap.dedent(LOCKER), path, mode], cwd=REPO,
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    p = Py.__new__(Py)
    p.proc = proc
    return p


def test_posix_locks_between_processes_and_mounts(watch, mnt):
    a, b = mnt
    srv = MemfsServer(watch, [a, b])
    pa, pb = os.path.join(a, "lk"), os.path.join(b, "lk")
    with open(pa, "w") as f:
        f.write("x" * 100)
    holder = os.open(pa, os.O_RDWR)
    other_fd = os.open(pa, os.O_RDONLY)
    try:
        fcntl.lockf(holder, fcntl.LOCK_EX, 10, 0)       # [0, 9] held by this process via A
        # non-blocking from another process through the other mount: EAGAIN
        c = Py(watch, LOCKER, pb, "nonblock")
        c.expect("EAGAIN")
        c.finish()
        # GETLK reports the holder
        c = Py(watch, LOCKER, pb, "getlk")
        assert c.line() == f"{fcntl.F_WRLCK} 0 10 {os.getpid()}"
        c.finish()
        # blocking: waits, then is granted when we unlock
        c = _locker_stdin(watch, pb, "block")
        c.expect("waiting")
        assert c.silent_for(0.3)
        fcntl.lockf(holder, fcntl.LOCK_UN, 10, 0)
        c.expect("granted")
        c.proc.stdin.write("\n")
        c.proc.stdin.flush()
        assert c.finish() == 0                            # exit closes: released on close
        # released on close: closing ANY descriptor of the file drops our locks
        fcntl.lockf(holder, fcntl.LOCK_EX, 10, 0)
        c = _locker_stdin(watch, pb, "block")
        c.expect("waiting")
        assert c.silent_for(0.3)
        os.close(other_fd)
        other_fd = -1
        c.expect("granted")
        c.proc.stdin.write("\n")
        c.proc.stdin.flush()
        c.finish()
    finally:
        os.close(holder)
        if other_fd >= 0:
            os.close(other_fd)
    stats = srv.stop()
    srv.assert_clean()
    assert stats[a]["locks"]["waits"] >= 2


def test_lock_wait_interrupted_by_a_signal(watch, mnt):
    a, b = mnt
    srv = MemfsServer(watch, [a, b])
    pa, pb = os.path.join(a, "lk"), os.path.join(b, "lk")
    with open(pa, "w") as f:
        f.write("x" * 100)
    holder = os.open(pa, os.O_RDWR)
    try:
        fcntl.lockf(holder, fcntl.LOCK_EX, 10, 0)
        # a handler that raises: the syscall fails with EINTR, Python raises
        c = Py(watch, LOCKER, pb, "interrupt")
        c.expect("interrupted")
        assert c.finish() == 0
        # a handler that returns: Python retries (a fresh SETLKW), granted later
        c = Py(watch, LOCKER, pb, "retry")
        c.expect("waiting")
        assert c.silent_for(0.5)
        fcntl.lockf(holder, fcntl.LOCK_UN, 10, 0)
        c.expect("granted after 1 signal")
        c.finish()
    finally:
        os.close(holder)
    stats = srv.stop()
    srv.assert_clean()
    assert stats[b]["stats"].get("interrupted", 0) >= 2
    assert stats[b]["locks"]["interrupted"] >= 2


def test_edeadlk_for_crossing_lock_waits(watch, mnt):
    a, b = mnt
    srv = MemfsServer(watch, [a, b])
    with open(os.path.join(a, "lk"), "w") as f:
        f.write("xx")
    p1 = _locker_stdin(watch, os.path.join(a, "lk"), "deadlock1")
    p2 = _locker_stdin(watch, os.path.join(b, "lk"), "deadlock2")
    p1.expect("holding")
    p2.expect("holding")
    p1.proc.stdin.write("\n")
    p1.proc.stdin.flush()
    p1.expect("waiting")
    assert p1.silent_for(0.3)            # p1 now waits for p2's byte
    p2.proc.stdin.write("\n")
    p2.proc.stdin.flush()
    p2.expect("waiting")
    p2.expect("EDEADLK")                 # p2 waiting for p1 would close the cycle
    p2.proc.stdin.write("\n")
    p2.proc.stdin.flush()
    assert p2.finish() == 0              # p2 exits: its lock goes, p1 proceeds
    p1.expect("granted")
    p1.proc.stdin.write("\n")
    p1.proc.stdin.flush()
    p1.finish()
    stats = srv.stop()
    srv.assert_clean()
    assert stats[a]["locks"]["deadlocks"] == 1


def test_flock_across_two_mounts(watch, mnt):
    a, b = mnt
    srv = MemfsServer(watch, [a, b])
    sh(f"touch {a}/fl")
    holder = watch.add_proc(subprocess.Popen(
        ["flock", f"{a}/fl", "-c", "echo locked; read x"], stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, text=True))
    assert holder.stdout.readline().strip() == "locked"
    r = subprocess.run(["flock", "-n", f"{b}/fl", "-c", "true"], timeout=10)
    assert r.returncode == 1                                  # busy
    t0 = time.monotonic()
    waiter = watch.add_proc(subprocess.Popen(["flock", "-w", "10", f"{b}/fl", "-c", "echo got"],
                                             stdout=subprocess.PIPE, text=True))
    r, _, _ = select.select([waiter.stdout], [], [], 0.4)
    assert not r                                              # still blocked
    holder.stdin.write("\n")
    holder.stdin.flush()
    holder.wait(10)                                           # release on close (RELEASE)
    assert waiter.stdout.readline().strip() == "got"
    assert waiter.wait(10) == 0 and time.monotonic() - t0 >= 0.4
    # shared locks coexist
    r = subprocess.run(["flock", "-s", f"{a}/fl", "flock", "-s", "-n", f"{b}/fl", "true"],
                       timeout=10)
    assert r.returncode == 0
    stats = srv.stop()
    srv.assert_clean()
    assert stats[b]["ops"]["SETLKW"] >= 1 and stats[b]["ops"]["SETLK"] >= 1


# ------------------------------------------------------------------ notify

@pytest.mark.parametrize("notify", [True, False])
def test_invalidation_reaches_the_other_mount(watch, mnt, notify):
    a, b = mnt
    srv = MemfsServer(watch, [a, b], notify=notify, attr_timeout=60, keep_cache=True)
    with open(os.path.join(a, "f"), "w") as f:
        f.write("first")
    with open(os.path.join(b, "f")) as f:
        assert f.read() == "first"                           # B caches pages...
    assert os.stat(os.path.join(b, "f")).st_size == 5        # ...and attributes, for 60 s
    with open(os.path.join(a, "f"), "w") as f:
        f.write("second-version")
    # (a read invalidates the reader's cached atime, so the size seen by
    # stat is the honest probe of B's attribute cache, not read())
    deadline = time.monotonic() + (2 if notify else 0.5)
    while True:
        size = os.stat(os.path.join(b, "f")).st_size
        if size == 14 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    with open(os.path.join(b, "f")) as f:
        seen = f.read()
    stats = srv.stop()
    srv.assert_clean()
    if notify:
        assert size == 14 and seen == "second-version"
        assert stats[b]["stats"].get("notify_ok", 0) >= 1
    else:
        assert size == 5                 # the control: long timeouts keep B stale


# ------------------------------------------------------------------ death

def test_kill_9_of_the_server_fails_callers_and_stale_mounts_are_cleaned(watch, mnt):
    a, b = mnt
    subtype = "replfs-test-" + uuid.uuid4().hex[:8]
    srv = MemfsServer(watch, [a, b], subtype=subtype)
    with open(os.path.join(a, "f"), "w") as f:
        f.write("data")
    fd = os.open(os.path.join(a, "f"), os.O_RDONLY)
    os.kill(srv.pid, signal.SIGKILL)
    srv.proc.wait(10)
    for call in (lambda: os.listdir(a), lambda: os.listdir(b), lambda: os.pread(fd, 4, 0),
                 lambda: open(os.path.join(a, "new"), "w")):
        with pytest.raises(OSError) as exc:
            call()
        assert exc.value.errno in (errno.ENOTCONN, errno.EIO)
    try:
        os.close(fd)
    except OSError as exc:
        assert exc.errno == errno.ENOTCONN     # the FLUSH of close cannot be sent
    assert {m.mountpoint for m in fmount.mounts() if m.fstype == f"fuse.{subtype}"} == {a, b}
    cleaned = fmount.clean_stale_mounts(subtype)
    assert sorted(cleaned) == sorted([a, b])
    assert not [m for m in fmount.mounts() if m.fstype == f"fuse.{subtype}"]
    os.listdir(a)                         # the plain directory again


def test_unmount_while_busy_detaches_and_ends_the_session(watch, mnt):
    a, _ = mnt
    srv = MemfsServer(watch, [a])
    f = open(os.path.join(a, "open"), "w")
    try:
        f.write("x")
        f.flush()
        stats = srv.stop()                # umount -> EBUSY -> lazy detach, then close
    finally:
        try:
            f.close()
        except OSError:
            pass                          # the connection is gone: ENOTCONN on close is fine
    assert fmount.find_mount(a) is None
    assert stats[a]["violations"] == []


def test_watchdog_aborts_a_hung_mount(mnt):
    """A server that never answers: the watch aborts it and the caller gets
    ENOTCONN instead of hanging the suite."""
    a, _ = mnt
    code = f"""
        import os, time
        from replfs.fuse import mount as m
        fd = m.open_device()
        m.mount_fuse(fd, {a!r}, subtype="replfs-test-hang", fsname="hang")
        print("READY", flush=True)
        time.sleep(60)                    # never reads /dev/fuse: every request hangs
    """
    with pytest.raises(AssertionError, match="deadline"):
        with FuseWatch(timeout=1.5) as w:
            p = Py(w, code)
            p.expect("READY")
            w.add_mount(a)
            t0 = time.monotonic()
            with pytest.raises(OSError) as exc:
                os.stat(os.path.join(a, "x"))
            assert exc.value.errno == errno.ENOTCONN and time.monotonic() - t0 < 10
    assert w.leftovers() == []
