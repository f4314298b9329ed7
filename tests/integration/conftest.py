"""Fixtures: two real replfsd daemons on 127.0.0.1 and 127.0.0.2 (see
replfs/localpair.py), torn down after each test."""
import os
import shutil
import subprocess
import time

import pytest

from replfs.localpair import LocalPair, read_data  # noqa: F401  (re-exported for tests)


@pytest.fixture
def cluster(tmp_path):
    c = LocalPair(tmp_path)
    yield c
    c.teardown()


@pytest.fixture(scope="module")
def rpcbind():
    """Ganesha registers with rpcbind; start one if this machine runs none
    (and stop it again after).  Does nothing where rpcbind is not installed:
    the tests that need it skip there."""
    from replfs.nfs import ganesha as G
    exe = shutil.which("rpcbind") or "/usr/sbin/rpcbind"
    if G._rpcbind_running() or not os.path.exists(exe):
        yield
        return
    subprocess.run([exe, "-w"], check=True)
    deadline = time.monotonic() + 10
    while not G._rpcbind_running():
        assert time.monotonic() < deadline, "rpcbind did not start"
        time.sleep(0.05)
    try:
        yield
    finally:
        subprocess.run(["pkill", "-x", "rpcbind"], check=False)
