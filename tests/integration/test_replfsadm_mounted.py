"""replfsadm mounted: the mounted.ocfs2 view, read from the backing disk."""
from __future__ import annotations

from replfs.blockdev import FileBlockDevice
from replfs.cli.main import main as adm
from replfs.fs.core import Filesystem
from replfs.fs.mkfs import make_filesystem

CONF = """\
resource r0 {{
  protocol C;
  on alpha {{ device {tmp}/drbd0 minor 0; disk {tmp}/alpha.img; address 127.0.0.1:7789; meta-disk internal; }}
  on beta  {{ device {tmp}/drbd0b minor 0; disk {tmp}/beta.img; address 127.0.0.2:7789; meta-disk internal; }}
}}
resource r1 {{
  protocol C;
  on alpha {{ device {tmp}/drbd1 minor 1; disk {tmp}/alpha1.img; address 127.0.0.1:7790; meta-disk internal; }}
  on beta  {{ device {tmp}/drbd1b minor 1; disk {tmp}/beta1.img; address 127.0.0.2:7790; meta-disk internal; }}
}}
"""


def _run(conf, *args):
    out, err = [], []
    rc = adm(["-c", conf, "--node", "alpha", *args], out=out.append, err=err.append)
    return rc, "\n".join(out), "\n".join(err)


async def test_mounted_lists_volumes_and_slot_holders(tmp_path):
    conf = tmp_path / "replfs.conf"
    conf.write_text(CONF.format(tmp=tmp_path))
    for name in ("alpha.img", "alpha1.img"):
        with open(tmp_path / name, "wb") as f:
            f.truncate(256 << 20)
    dev = FileBlockDevice(str(tmp_path / "alpha.img"))
    sb = await make_filesystem(dev, slots=2, label="shared", out=None)

    rc, out, _ = _run(str(conf), "mounted")
    assert rc == 0
    lines = out.splitlines()
    assert lines[1].split()[:4] == ["r0", "replfs", sb.uuid.hex().upper(), "shared"]
    assert lines[2].split() == ["r1", "-"]

    rc, out, _ = _run(str(conf), "mounted", "-f", "r0")
    assert rc == 0 and "Not mounted" in out

    fs = await Filesystem.mount(dev, 1, node=7)
    try:
        rc, out, _ = _run(str(conf), "mounted", "--full", "r0")
        assert "node 7 (slot 1)" in out
    finally:
        await fs.unmount()
    rc, out, _ = _run(str(conf), "mounted", "-f", "r0")
    assert "Not mounted" in out
    await dev.close()
