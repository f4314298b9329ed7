"""mkfs.replfs and replfsadm mounted on a resource of a real replfsd pair:
refusals come as one-line messages (never a traceback), and mounted shows
the slot a mount holds, on both nodes."""
from __future__ import annotations

import os

import pytest

from tests.integration.test_fs_mount import ENV, VENV_BIN, force_unmount, fuse_usable, run

pytestmark = pytest.mark.skipif(not fuse_usable(), reason="needs /dev/fuse, root and mount.fuse3")


def test_mkfs_refusals_and_mounted_on_a_pair(tmp_path):
    from replfs.localpair import LocalPair
    pair = LocalPair(str(tmp_path))          # 32 MiB disks
    a, b = pair.alpha, pair.beta
    mkfs = os.path.join(VENV_BIN, "mkfs.replfs")
    mnt = str(tmp_path / "mnt")
    os.mkdir(mnt)
    aenv = dict(ENV, REPLFS_CONF=a.conf, REPLFS_NODE="alpha", REPLFS_RUNDIR=a.rundir)
    benv = dict(ENV, REPLFS_CONF=b.conf, REPLFS_NODE="beta", REPLFS_RUNDIR=b.rundir)
    try:
        pair.up_fresh()
        cp = run(mkfs, "-q", "r0", env=benv, check=False)       # beta is Secondary
        assert cp.returncode == 1 and "Traceback" not in cp.stderr, cp.stderr
        assert cp.stderr.startswith("mkfs.replfs: ") and "Primary" in cp.stderr, cp.stderr
        cp = run(mkfs, "-q", "-N", "4", "r0", env=aenv, check=False)   # too small for 4 journals
        assert cp.returncode == 1 and "Traceback" not in cp.stderr, cp.stderr
        assert "too small" in cp.stderr, cp.stderr
        run(mkfs, "-q", "-N", "2", "-L", "pairvol", "r0", env=aenv)
        cp = run(mkfs, "-q", "-N", "2", "r0", env=aenv, check=False)
        assert cp.returncode == 1 and "-F" in cp.stderr and "Traceback" not in cp.stderr
        for n in (a, b):
            out = n.adm("mounted").stdout
            assert "pairvol" in out and "replfs" in out, out
            assert "Not mounted" in n.adm("mounted", "-f", "r0").stdout
        run("mount", "-t", "fuse.replfs", "-o",
            f"conf={a.conf},node=alpha,rundir={a.rundir},commit=3600", "r0", mnt)
        with open(os.path.join(mnt, "f"), "wb") as f:
            f.write(b"x")
            os.fsync(f.fileno())
        # beta reads its own replica of the slot map: protocol C put it there
        held = b.adm("mounted", "-f", "r0").stdout
        assert "(slot 0)" in held, held
        # the walkthrough's switchover, typed as one step: the mount process
        # is still closing when umount(8) returns, and secondary waits for it
        for i in range(300):                  # a transaction left for umount
            os.mkdir(os.path.join(mnt, f"d{i}"))
        run("umount", mnt)
        a.adm("secondary", "r0")
        b.adm("primary", "r0")
        assert "Not mounted" in b.adm("mounted", "-f", "r0").stdout
    finally:
        force_unmount(mnt)
        pair.teardown()
