"""create-md, dump-md, show-gi through replfsadm, without daemons."""
import subprocess

import pytest

from replfs.localpair import LocalPair


@pytest.fixture
def pair(tmp_path):
    p = LocalPair(tmp_path)
    yield p
    p.teardown()


def test_create_md_writes_meta_data_and_refuses_to_overwrite(pair):
    a = pair.alpha
    out = a.adm("create-md", "r0").stdout
    assert "New replfs meta data block successfully created." in out
    cp = a.adm("create-md", "r0", check=False)
    assert cp.returncode == 20
    assert "valid replfs meta-data found" in cp.stderr and "--force" in cp.stderr
    a.adm("create-md", "--force", "r0")
    md = a.adm("dump-md", "r0").stdout
    assert "current   0x0000000000000004;" in md     # fresh: UUID_JUST_CREATED
    assert "bits-set 0;" in md
    gi = a.adm("get-gi", "r0").stdout.strip()
    assert gi.startswith("0000000000000004:0000000000000000:") and gi.endswith(":Inconsistent")


def test_create_md_refuses_a_disk_holding_a_filesystem(pair):
    a = pair.alpha
    subprocess.run(["mkfs.ext4", "-q", "-F", a.disk], check=True, capture_output=True)
    cp = a.adm("create-md", "r0", check=False)
    assert cp.returncode == 20
    assert "holds a ext2/ext3/ext4 filesystem" in cp.stderr
    assert "--force" in cp.stderr
    # Nothing was written: the filesystem is intact.
    fsck = subprocess.run(["e2fsck", "-fn", a.disk], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr


def test_verbs_on_a_node_not_in_the_resource_are_config_errors(pair):
    a = pair.alpha
    cp = a.adm("--node", "gamma", "create-md", "r0", check=False)
    assert cp.returncode == 10
    assert "no 'on gamma' section" in cp.stderr or "gamma" in cp.stderr


def test_dump_prints_a_config_that_parses_to_the_same(pair, tmp_path):
    from replfs.blockrepl import conf
    a = pair.alpha
    text = a.adm("dump").stdout
    again = conf.parse_text(text, str(tmp_path / "dumped.conf"))
    orig = conf.load(a.conf)
    assert again.resources == orig.resources
    assert again.resources["r0"].host("beta").address == "127.0.0.2"
