"""The device file (/dev/drbdN analogue) of a resource, through real daemons:
mkfs, e2fsck and a loop mount on it, failover, and DRBD's open rules."""
import errno
import os
import subprocess
import time

import pytest

from replfs.localpair import LocalPair


def fuse_usable() -> bool:
    return os.path.exists("/dev/fuse") and os.geteuid() == 0


pytestmark = pytest.mark.skipif(not fuse_usable(), reason="needs /dev/fuse and root")


def mounted(path: str) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == path for line in f)


def wait_mounted(path: str, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if mounted(path):
            return
        time.sleep(0.05)
    raise AssertionError(f"{path} was not mounted")


def loop_works() -> bool:
    return subprocess.run(["losetup", "-f"], capture_output=True).returncode == 0


@pytest.fixture
def pair(tmp_path):
    p = LocalPair(tmp_path)
    p.up_fresh()
    yield p
    for n in p.nodes:
        dev = os.path.join(n.root, "drbd0")
        subprocess.run(["umount", "-l", os.path.join(n.root, "mnt")], capture_output=True)
    p.teardown()
    for n in p.nodes:
        dev = os.path.join(n.root, "drbd0")
        if mounted(dev):
            subprocess.run(["fusermount3", "-u", "-z", dev], capture_output=True)


def test_device_file_mkfs_failover_fsck(pair):
    a, b = pair.alpha, pair.beta
    adev, bdev = (os.path.join(n.root, "drbd0") for n in (a, b))
    wait_mounted(adev)
    wait_mounted(bdev)
    assert os.stat(adev).st_size == a.status()["size"]
    # A Secondary's device cannot be opened (DRBD 8: Wrong medium type).
    with pytest.raises(OSError) as e:
        open(bdev, "rb")
    assert e.value.errno == errno.EMEDIUMTYPE
    subprocess.run(["mkfs.ext4", "-q", "-F", adev], check=True, capture_output=True)
    if loop_works():
        mnt = os.path.join(a.root, "mnt")
        os.makedirs(mnt, exist_ok=True)
        subprocess.run(["mount", "-o", "loop", adev, mnt], check=True, capture_output=True)
        try:
            with open(os.path.join(mnt, "hello.txt"), "w") as f:
                f.write("written on alpha\n")
            ov = a.adm("overview").stdout
            assert mnt in ov and "ext4" in ov, ov
        finally:
            subprocess.run(["umount", mnt], check=True, capture_output=True)
    # Held open: demotion refused.
    fd = os.open(adev, os.O_RDONLY)
    try:
        cp = a.adm("secondary", "r0", check=False)
        assert cp.returncode == 11 and "held open" in cp.stderr
    finally:
        os.close(fd)
    # Fail over and check the filesystem on beta.
    a.adm("secondary", "r0")
    b.adm("primary", "r0")
    fsck = subprocess.run(["e2fsck", "-fn", bdev], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    if loop_works():
        mnt = os.path.join(b.root, "mnt")
        os.makedirs(mnt, exist_ok=True)
        subprocess.run(["mount", "-o", "loop,ro", bdev, mnt], check=True, capture_output=True)
        try:
            assert open(os.path.join(mnt, "hello.txt")).read() == "written on alpha\n"
        finally:
            subprocess.run(["umount", mnt], check=True, capture_output=True)


def test_device_file_goes_away_with_the_resource(pair):
    a = pair.alpha
    adev = os.path.join(a.root, "drbd0")
    wait_mounted(adev)
    a.adm("down", "r0")
    assert not mounted(adev)


def test_device_file_dies_with_replfsd_and_comes_back(pair):
    """replfsd serves the device file itself: kill -9 of the daemon takes
    it down at once (ENOTCONN, nothing more written), and the restarted
    daemon detaches the dead mount and exports the file again."""
    a = pair.alpha
    adev = os.path.join(a.root, "drbd0")
    wait_mounted(adev)
    fd = os.open(adev, os.O_RDWR)
    os.pwrite(fd, b"before the kill", 0)
    os.fsync(fd)
    a.kill9()
    with pytest.raises(OSError) as e:
        os.pread(fd, 16, 0)
    assert e.value.errno in (errno.ENOTCONN, errno.ECONNABORTED, errno.EIO)
    try:
        os.close(fd)        # the release cannot reach a dead server either
    except OSError as e:
        assert e.errno == errno.ENOTCONN
    a.start()
    a.adm("up", "r0")
    a.adm("primary", "r0")
    deadline = time.monotonic() + 20
    while True:
        try:
            with open(adev, "rb") as f:
                assert f.read(15) == b"before the kill"
            break
        except OSError:
            assert time.monotonic() < deadline, "the device file did not come back"
            time.sleep(0.1)
