"""replfsd's run directory (the admin socket's home) belongs to its user
and nobody else may write to it (replfs/daemon/main.py secure_rundir)."""
import os
import stat

from replfs.daemon.main import secure_rundir


def test_a_loose_run_directory_is_tightened(tmp_path):
    d = tmp_path / "run"
    d.mkdir()
    os.chmod(d, 0o1777)
    assert secure_rundir(str(d)) is None
    assert stat.S_IMODE(os.stat(d).st_mode) & 0o077 == 0


def test_a_private_run_directory_is_left_alone(tmp_path):
    d = tmp_path / "run"
    d.mkdir(mode=0o700)
    assert secure_rundir(str(d)) is None
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o700


def test_a_run_directory_of_another_user_is_refused(tmp_path):
    d = tmp_path / "run"
    d.mkdir(mode=0o700)
    os.chown(d, 4242, 4242)
    why = secure_rundir(str(d))
    assert why and "belongs to uid 4242" in why
