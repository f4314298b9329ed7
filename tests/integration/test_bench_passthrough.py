"""The FUSE baseline of the benchmarks (bench/passthrough.py) on a real mount.

A baseline that dies makes every ratio against it a lie, so it runs what
the filesystem benchmarks run on it: `tar x` of a tree with symlinks, hard
links, a fifo and set timestamps, `du`, `rm -rf`, plus rename and the
ownership/mode/time calls tar makes.  The server must still be alive
after each step.
"""
from __future__ import annotations

import os
import stat
import subprocess
import sys
import time

import pytest

from tests.harness.fusewatch import REPO, fuse_unusable_reason

pytestmark = [pytest.mark.fuse,
              pytest.mark.skipif(fuse_unusable_reason() is not None,
                                 reason=str(fuse_unusable_reason()))]


def _mounted(path: str) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == path for line in f)


@pytest.fixture
def mount(tmp_path):
    src, mnt = tmp_path / "src", tmp_path / "mnt"
    src.mkdir()
    mnt.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "bench.passthrough", str(src), str(mnt)],
                            cwd=REPO, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 10
    while not _mounted(str(mnt)):
        assert proc.poll() is None, f"passthrough exited: {proc.stderr.read()}"
        assert time.monotonic() < deadline, "passthrough did not mount"
        time.sleep(0.02)
    try:
        yield proc, str(src), str(mnt)
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)
        if _mounted(str(mnt)):
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def _make_tree(root: str) -> None:
    """A small source tree: nested directories, files, relative and dangling
    symlinks, a symlink to a directory, a hard link, a fifo, old mtimes."""
    for d in ("pkg/sub/deeper", "docs", "empty"):
        os.makedirs(os.path.join(root, d))
    for i in range(40):
        with open(os.path.join(root, "pkg", f"mod{i:02d}.py"), "w") as f:
            f.write(f"# module {i}\n" + "x = 1\n" * (i * 50))
    with open(os.path.join(root, "pkg/sub/deeper/big.bin"), "wb") as f:
        f.write(os.urandom(300_000))
    with open(os.path.join(root, "docs/README"), "w") as f:
        f.write("read me\n")
    os.chmod(os.path.join(root, "docs/README"), 0o600)
    os.symlink("../docs/README", os.path.join(root, "pkg/README"))
    os.symlink("sub/deeper", os.path.join(root, "pkg/deeper-link"))
    os.symlink("does-not-exist", os.path.join(root, "dangling"))
    os.link(os.path.join(root, "pkg/mod01.py"), os.path.join(root, "pkg/hard01.py"))
    os.mkfifo(os.path.join(root, "docs/fifo"))
    for dirpath, dirnames, filenames in os.walk(root):
        for n in filenames + dirnames:
            os.utime(os.path.join(dirpath, n), ns=(1_000_000_000, 1_500_000_000_000_000_000),
                     follow_symlinks=False)


def _snapshot(root: str) -> dict:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in sorted(filenames + dirnames):
            p = os.path.join(dirpath, n)
            st = os.lstat(p)
            rel = os.path.relpath(p, root)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.readlink(p), st.st_mtime_ns)
            elif stat.S_ISREG(st.st_mode):
                with open(p, "rb") as f:
                    out[rel] = ("file", stat.S_IMODE(st.st_mode), f.read(), st.st_mtime_ns)
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", stat.S_IMODE(st.st_mode))
            else:
                out[rel] = ("other", stat.S_IFMT(st.st_mode))
    return out


def test_tar_du_rm_on_the_passthrough(mount, tmp_path):
    proc, src, mnt = mount
    tree = tmp_path / "tree"
    tree.mkdir()
    _make_tree(str(tree))
    tarball = tmp_path / "tree.tar"
    subprocess.run(["tar", "cf", str(tarball), "-C", str(tree), "."], check=True)

    r = subprocess.run(["tar", "xf", str(tarball), "-C", mnt], capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 0, r.stderr
    assert proc.poll() is None, "the passthrough died during tar x"
    want, got = _snapshot(str(tree)), _snapshot(mnt)
    assert got == want
    # what the mount shows is what landed below it
    assert _snapshot(src) == want
    assert os.lstat(os.path.join(mnt, "pkg/hard01.py")).st_nlink == 2
    with open(os.path.join(mnt, "pkg/README")) as f:     # through the symlink
        assert f.read() == "read me\n"

    # du sees every byte (st_blocks), and the same as below the mount
    du_mnt = subprocess.run(["du", "-s", "--block-size=1", mnt], capture_output=True, text=True,
                            check=True, timeout=30).stdout.split()[0]
    du_src = subprocess.run(["du", "-s", "--block-size=1", src], capture_output=True, text=True,
                            check=True, timeout=30).stdout.split()[0]
    assert int(du_mnt) == int(du_src) > 300_000

    # rename of a directory: names below it follow
    os.rename(os.path.join(mnt, "pkg/sub"), os.path.join(mnt, "pkg/sub2"))
    assert os.path.getsize(os.path.join(mnt, "pkg/sub2/deeper/big.bin")) == 300_000
    # one name of a hard link goes, the other still opens
    os.unlink(os.path.join(mnt, "pkg/mod01.py"))
    with open(os.path.join(mnt, "pkg/hard01.py")) as f:
        assert f.read().startswith("# module 1\n")
    # truncate through an open file, then by path
    with open(os.path.join(mnt, "pkg/mod02.py"), "r+") as f:
        f.truncate(3)
    os.truncate(os.path.join(mnt, "pkg/mod03.py"), 5)
    assert os.path.getsize(os.path.join(src, "pkg/mod02.py")) == 3
    assert os.path.getsize(os.path.join(src, "pkg/mod03.py")) == 5

    r = subprocess.run(["rm", "-rf", os.path.join(mnt, "pkg"), os.path.join(mnt, "docs"),
                        os.path.join(mnt, "empty"), os.path.join(mnt, "dangling")],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert os.listdir(mnt) == [] and os.listdir(src) == []
    assert proc.poll() is None, "the passthrough died"


def test_help_and_usage_errors():
    r = subprocess.run([sys.executable, "-m", "bench.passthrough", "--help"], cwd=REPO,
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and "SOURCE_DIR MOUNTPOINT" in r.stdout
    r = subprocess.run([sys.executable, "-m", "bench.passthrough", "/nonexistent-src", "/x"],
                       cwd=REPO, capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "not a directory" in r.stderr
