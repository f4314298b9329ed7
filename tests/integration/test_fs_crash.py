"""Crash and replay: kill -9 at a random moment of a workload, then mount
again (which replays the journal) and check that every file whose fsync
returned is there byte for byte, and that fsck.replfs finds no error.

Two ways to die:
* the mount process (`replfs`) of an image;
* the node daemon under a mount of a protocol C resource, after which the
  peer is promoted and mounts the volume (a failover).

The workload runs in its own process and prints a line for each file once
its fsync has returned; only those files are checked.  The seed is in the
test id, so a failure replays with the same kill moment and operations.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

import pytest

from tests import soak
from tests.integration.test_fs_mount import (ENV, VENV_BIN, force_unmount, fsck_ok, fuse_usable,
                                             mkfs, mounted, run, wait_unmounted_process)

pytestmark = pytest.mark.skipif(not fuse_usable(), reason="needs /dev/fuse, root and mount.fuse3")

WORKLOAD = r"""
import os, random, sys
root, seed = sys.argv[1], int(sys.argv[2])
rng = random.Random(seed)
live = []
for k in range(7):
    os.makedirs(os.path.join(root, f"d{k}"), exist_ok=True)
i = 0
while True:
    i += 1
    d = os.path.join(root, f"d{i % 7}")
    r = rng.random()
    if r < 0.55:
        name = os.path.join(d, f"f{i}")
        n = rng.choice([0, 1, 4096, 5000, 70000, 300000])
        data = random.Random(i).randbytes(n)
        with open(name, "wb") as f:
            f.write(data)
            if rng.random() < 0.7:
                f.flush()
                os.fsync(f.fileno())
                print(f"synced {name} {n} {i}", flush=True)
                continue
        live.append(name)
    elif r < 0.75 and live:
        os.unlink(live.pop(rng.randrange(len(live))))
    elif r < 0.9 and live:
        src = live.pop(rng.randrange(len(live)))
        dst = os.path.join(root, f"d{rng.randrange(7)}", f"r{i}")
        os.rename(src, dst)
        live.append(dst)
    else:
        sub = os.path.join(d, f"sub{i}")
        os.mkdir(sub)
        with open(os.path.join(sub, "x"), "w") as f:
            f.write("x" * rng.randrange(100))
"""


def start_workload(mnt: str, seed: int):
    proc = subprocess.Popen([sys.executable, "-c", WORKLOAD, mnt, str(seed)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    synced: list[tuple[str, int, int]] = []

    def reader():
        for line in proc.stdout:
            parts = line.split()
            if len(parts) == 4 and parts[0] == "synced":
                synced.append((parts[1], int(parts[2]), int(parts[3])))

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    return proc, synced, t


def wait_first_fsync(proc, synced, timeout: float = 60) -> None:
    """The kill comes a random time after the workload's first fsync, not
    after its start: on a loaded machine the interpreter alone may take
    longer than the shortest delay, and a run with nothing fsync'd checks
    nothing."""
    deadline = time.monotonic() + timeout
    while not synced:
        assert proc.poll() is None, f"the workload exited with {proc.returncode}"
        assert time.monotonic() < deadline, "the workload got no fsync through in 60 s"
        time.sleep(0.01)


def stop_workload(proc, t) -> None:
    try:
        proc.wait(30)     # it dies of its own errors once the mount is gone
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
    t.join(10)


def check_synced(old_mnt: str, new_mnt: str, synced) -> None:
    assert synced, "the workload never got an fsync through before the kill"
    for path, n, i in synced:
        path = new_mnt + path[len(old_mnt):]
        with open(path, "rb") as f:
            got = f.read()
        want = random.Random(i).randbytes(n)
        assert len(got) == n and hashlib.sha256(got).digest() == hashlib.sha256(want).digest(), \
            f"{path}: fsync'd content lost or changed ({len(got)} bytes, want {n})"


def wait_mounted(mnt, proc, timeout=20) -> None:
    deadline = time.monotonic() + timeout
    while not mounted(mnt):
        assert proc.poll() is None, f"mount process exited with {proc.returncode}"
        assert time.monotonic() < deadline, "mount did not appear"
        time.sleep(0.02)


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(10)


def crash_image(seed: int) -> None:
    rng = random.Random(seed)
    root = tempfile.mkdtemp(prefix="replfs-crash-")
    img = mkfs(os.path.join(root, "vol.img"), 256 << 20, "-N", "2")
    mnt = os.path.join(root, "mnt")
    os.mkdir(mnt)
    # Each step registers how to undo it; on the way out (passed or failed)
    # the undo steps run newest first, every one of them even if another
    # fails: workload, mount process, mount, then no process holds the image.
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(wait_unmounted_process, img)
        cleanup.callback(force_unmount, mnt)
        mproc = subprocess.Popen([os.path.join(VENV_BIN, "replfs"), img, mnt, "-f", "-o",
                                  f"commit={rng.choice([1, 5, 60])},logfile={root}/mount.log"],
                                 env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        cleanup.callback(_kill, mproc)
        wait_mounted(mnt, mproc)
        wproc, synced, t = start_workload(mnt, seed)
        cleanup.callback(stop_workload, wproc, t)
        wait_first_fsync(wproc, synced)
        time.sleep(rng.uniform(0.5, 3.0))
        mproc.send_signal(signal.SIGKILL)
        mproc.wait(10)
        stop_workload(wproc, t)
        force_unmount(mnt)
        run(os.path.join(VENV_BIN, "replfs"), img, mnt)
        check_synced(mnt, mnt, synced)
        run("umount", mnt, check=False)
    fsck_ok(img)
    shutil.rmtree(root, ignore_errors=True)


@pytest.mark.parametrize("seed", [11, 12, 13])
def test_kill9_of_the_mount_process_mid_workload(seed):
    crash_image(seed)


@pytest.mark.soak(twin="test_kill9_of_the_mount_process_mid_workload")
@pytest.mark.parametrize("seed", soak.seeds(range(1000, 1030)))
def test_kill9_of_the_mount_process_soak(seed):
    crash_image(seed)


def crash_daemon_failover(seed: int, tmp_path) -> None:
    from replfs.localpair import LocalPair
    rng = random.Random(seed)
    pair = LocalPair(str(tmp_path), size=128 << 20)
    a, b = pair.alpha, pair.beta
    amnt, bmnt = str(tmp_path / "amnt"), str(tmp_path / "bmnt")
    os.mkdir(amnt)
    os.mkdir(bmnt)
    aopts = f"conf={a.conf},node=alpha,rundir={a.rundir},timeout=5"
    bopts = f"conf={b.conf},node=beta,rundir={b.rundir}"
    benv = dict(ENV, REPLFS_CONF=b.conf, REPLFS_NODE="beta", REPLFS_RUNDIR=b.rundir)
    # Undo steps run newest first, all of them, passed or failed (see
    # crash_image); the daemons go last, after every mount of theirs.
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(pair.teardown)
        cleanup.callback(force_unmount, amnt)
        cleanup.callback(force_unmount, bmnt)
        pair.up_fresh()
        run(os.path.join(VENV_BIN, "mkfs.replfs"), "-q", "-N", "2", "r0",
            env=dict(ENV, REPLFS_CONF=a.conf, REPLFS_NODE="alpha", REPLFS_RUNDIR=a.rundir))
        mproc = subprocess.Popen([os.path.join(VENV_BIN, "replfs"), "r0", amnt, "-f", "-o",
                                  f"{aopts},commit={rng.choice([1, 5])}"], env=ENV,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        cleanup.callback(_kill, mproc)
        wait_mounted(amnt, mproc)
        wproc, synced, t = start_workload(amnt, seed)
        cleanup.callback(stop_workload, wproc, t)
        wait_first_fsync(wproc, synced)
        time.sleep(rng.uniform(0.8, 3.0))
        a.kill9()                           # the node daemon dies under the mount
        stop_workload(wproc, t)
        mproc.kill()
        mproc.wait(10)
        force_unmount(amnt)
        # Beta must have noticed alpha is gone (a mount is refused while the
        # peer may still be Primary with the volume mounted).
        b.wait(lambda s: s["peer_role"] != "Primary", what="alpha's death noticed")
        b.adm("primary", "r0")
        run("mount", "-t", "fuse.replfs", "r0", bmnt, "-o", bopts)
        check_synced(amnt, bmnt, synced)
        run("umount", bmnt, check=False)
        force_unmount(bmnt)
        deadline = time.monotonic() + 20
        while b.status()["open_count"]:
            assert time.monotonic() < deadline, "beta's mount process did not close r0"
            time.sleep(0.05)
        cp = run(os.path.join(VENV_BIN, "fsck.replfs"), "-n", "r0", check=False, env=benv)
        assert cp.returncode == 0, cp.stdout + cp.stderr


@pytest.mark.parametrize("seed", [21])
def test_kill9_of_the_node_daemon_then_failover(seed, tmp_path):
    crash_daemon_failover(seed, tmp_path)


@pytest.mark.soak(twin="test_kill9_of_the_node_daemon_then_failover")
@pytest.mark.parametrize("seed", soak.seeds(range(2000, 2010)))
def test_kill9_of_the_node_daemon_then_failover_soak(seed, tmp_path):
    crash_daemon_failover(seed, tmp_path)
