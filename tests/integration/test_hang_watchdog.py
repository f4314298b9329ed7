"""The suite's hang watchdog (tests/conftest.py): a test whose FUSE mount
stops answering fails with ENOTCONN after REPLFS_TEST_HANG_LIMIT seconds
instead of hanging the run (and CI).  Checked by running a small inner
test session whose FUSE server is stopped with SIGSTOP."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from tests.harness.fusewatch import fuse_unusable_reason

pytestmark = [pytest.mark.fuse,
              pytest.mark.skipif(fuse_unusable_reason() is not None,
                                 reason=str(fuse_unusable_reason()))]

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

INNER = textwrap.dedent('''
    import errno, os, signal
    import pytest
    from tests.harness.fusewatch import FuseWatch, MemfsServer

    def test_a_stuck_mount_fails_instead_of_hanging(tmp_path):
        mnt = tmp_path / "m"
        mnt.mkdir()
        with FuseWatch(timeout=120) as watch:
            srv = MemfsServer(watch, [str(mnt)])
            os.kill(srv.pid, signal.SIGSTOP)
            try:
                with pytest.raises(OSError) as ei:
                    os.listdir(mnt / "x")          # never answered
                assert ei.value.errno in (errno.ENOTCONN, errno.ECONNABORTED)
            finally:
                os.kill(srv.pid, signal.SIGCONT)
''')


def test_a_hung_fuse_request_is_aborted(tmp_path):
    inner = tmp_path / "inner"
    inner.mkdir()
    (inner / "test_inner_hang.py").write_text(INNER)
    env = dict(os.environ, REPLFS_TEST_HANG_LIMIT="3", PYTHONPATH=REPO)
    # the suite's conftest, loaded as a plugin: the inner file lives outside tests/
    cp = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                         "-s", "-p", "tests.conftest", "--rootdir", REPO,
                         "-c", os.path.join(REPO, "pyproject.toml"),
                         str(inner / "test_inner_hang.py")],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    out = cp.stdout + cp.stderr
    assert "aborting the FUSE connection" in out, out
    assert cp.returncode == 0, out
