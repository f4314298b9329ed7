"""The guard that keeps a replfs volume from being mounted by two nodes
without cluster locks (issue 7's first step, kept since).

Before it, a mount on a node whose peer was also Primary (allow-two-
primaries) picked a free slot with node-local locks only, and files
vanished once both nodes had written.  Now a resource both nodes may make
Primary is mounted only with cluster locks (tests/integration/
test_fs_shared.py), so without the cluster stack its mount is refused on
either node, whatever the peer's role; the daemon's single-node open
(the block device a one-node mount uses) is refused while the peer is
Primary; and a resource without allow-two-primaries is mounted by its one
Primary, whose peer cannot be promoted meanwhile.
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


def test_dual_primary_volume_is_never_mounted_without_cluster_locks(tmp_path):
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
        # Both Primary, no cluster stack: neither may mount.
        b.adm("primary", "r0")
        for mnt, opts in ((mnt_a, aopts), (mnt_b, bopts)):
            cp = run("mount", "-t", "fuse.replfs", "r0", mnt, "-o", opts, check=False)
            assert cp.returncode == 32, cp.stderr
            assert "cluster locks" in cp.stderr and "cluster online" in cp.stderr, cp.stderr
            assert not mounted(mnt)

        # The daemon's single-node open, which has no window between check
        # and open, refuses while the peer is Primary.
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

        # The peer Secondary changes nothing: the resource still allows
        # two primaries, so it is mounted with cluster locks or not at all.
        b.adm("secondary", "r0")
        a.wait(lambda s: s["peer_role"] == "Secondary", what="beta Secondary")
        cp = run("mount", "-t", "fuse.replfs", "r0", mnt_a, "-o", aopts, check=False)
        assert cp.returncode == 32 and "cluster locks" in cp.stderr, cp.stderr
        assert not mounted(mnt_a)
        assert a.status()["open_count"] == 0
    finally:
        force_unmount(mnt_a)
        force_unmount(mnt_b)
        pair.teardown()


def test_one_node_volume_blocks_the_peers_promotion(tmp_path):
    pair = LocalPair(tmp_path)
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
        run("mount", "-t", "fuse.replfs", "r0", mnt_a, "-o", aopts)
        with open(mnt_a / "f", "w") as f:
            f.write("alpha's")
        cp = b.adm("primary", "r0", check=False)
        assert cp.returncode == 11, cp.stdout + cp.stderr
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
