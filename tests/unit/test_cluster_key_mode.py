"""The shared cluster key: a key readable by others is warned about."""
import logging
import os

from replfs.locking.net.driver import load_key


def test_key_readable_by_others_is_warned_about(tmp_path, caplog):
    conf = tmp_path / "cluster.conf"
    conf.write_text("")
    key = tmp_path / "key"
    key.write_text("secret\n")
    os.chmod(key, 0o600)
    with caplog.at_level(logging.WARNING):
        assert load_key(str(conf)) == b"secret"
    assert "readable" not in caplog.text
    os.chmod(key, 0o644)
    with caplog.at_level(logging.WARNING):
        assert load_key(str(conf)) == b"secret"
    assert "readable by group or others (mode 0644)" in caplog.text
    assert load_key(str(tmp_path / "elsewhere" / "cluster.conf")) == b""
