"""The guard that keeps a replfs volume mounted on one node at a time
until the filesystem has cluster locks (issue 7's first step).

Before it, a mount on a node whose peer was also Primary (allow-two-
primaries) picked a free slot with node-local locks only, and files
vanished once both nodes had written.  Now: a mount is refused while the
peer is Primary (by the mount program, and again atomically by the
daemon when the device is opened), and while a node has the volume
mounted the peer's `primary` is refused.
"""
from __future__ import annotations

import os
import time

import pytest
import trio

from replfs.errors import ReplfsError
from replfs.localpair import LocalPair

from .test_fs_mount import ENV, VENV_BIN, force_unmount, fuse_usable, mounted, run

pytestmark = [pytest.mark.fuse,
              pytest.mark.skipif(not fuse_usable(), reason="needs /dev/fuse and root")]


def _wait_closed(node, timeout=20.0):
    deadline = time.monotonic() + timeout
    while node.status()["open_count"]:
        assert time.monotonic() < deadline, "the mount process did not close the resource"
        time.sleep(0.05)


def test_second_node_mount_and_peer_promotion_are_refused(tmp_path):
    pair = LocalPair(tmp_path, extra_net="allow-two-primaries;")
    a, b = pair.alpha, pair.beta
    mnt_a, mnt_b = tmp_path / "a", tmp_path / "b"
    mnt_a.mkdir()
    mnt_b.mkdir()
    aopts = f"conf={a.conf},node=alpha,rundir={a.rundir}"
    bopts = f"conf={b.conf},node=beta,rundir={b.rundir}"
    try:
        pair.up_fresh()
        run(os.path.join(VENV_BIN, "mkfs.replfs"), "-q", "-N", "2", "-c", a.conf, "--rundir",
            a.rundir, "r0", env=dict(ENV, REPLFS_NODE="alpha"))
        # Both Primary (the configuration allows it): neither may mount.
        b.adm("primary", "r0")
        for mnt, opts in ((mnt_a, aopts), (mnt_b, bopts)):
            cp = run("mount", "-t", "fuse.replfs", "r0", mnt, "-o", opts, check=False)
            assert cp.returncode == 32, cp.stderr
            assert "the peer is Primary too" in cp.stderr and "secondary" in cp.stderr
            assert not mounted(mnt)

        # The daemon's own check, which has no window between check and open.
        async def open_single_node():
            from replfs.ipc.client import DaemonBlockDevice
            async with trio.open_nursery() as n:
                try:
                    dev = await DaemonBlockDevice.open(n, "r0", rundir=a.rundir,
                                                       single_node=True)
                except ReplfsError as e:
                    return e.message
                finally:
                    n.cancel_scope.cancel()
                await dev.close()
        assert "the peer is Primary too" in (trio.run(open_single_node) or "opened")

        # One node mounts; the peer may not become Primary while it does.
        b.adm("secondary", "r0")
        a.wait(lambda s: s["peer_role"] == "Secondary", what="beta Secondary")
        run("mount", "-t", "fuse.replfs", "r0", mnt_a, "-o", aopts)
        with open(mnt_a / "f", "w") as f:
            f.write("alpha's")
        cp = b.adm("primary", "r0", check=False)
        assert cp.returncode == 11, cp.stdout + cp.stderr
        assert "(-12)" in cp.stderr and "mounted there" in cp.stderr, cp.stderr
        assert b.status()["role"] == "Secondary"
        assert a.status()["single_node_opens"] == 1

        # After the unmount the peer is free to take over.
        run("umount", mnt_a)
        _wait_closed(a)
        assert a.status()["single_node_opens"] == 0
        a.adm("secondary", "r0")
        b.adm("primary", "r0")
        run("mount", "-t", "fuse.replfs", "r0", mnt_b, "-o", bopts)
        assert (mnt_b / "f").read_text() == "alpha's"
        run("umount", mnt_b)
        _wait_closed(b)
    finally:
        force_unmount(mnt_a)
        force_unmount(mnt_b)
        pair.teardown()
