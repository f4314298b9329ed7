"""Online grow (replfsadm resize) through two real replfsd daemons: both
backing files grow, one resize, the new area resynced from the Primary,
the size kept across down/up; and the refusals (shrink, not Connected)."""
import hashlib
import os

from replfs.blockrepl.meta import format as md
from replfs.ipc.client import SyncClient, socket_path
from replfs.localpair import LocalPair, read_data

MIB = 1024 * 1024


def md5(node, size):
    return hashlib.md5(read_data(node.disk, size)).hexdigest()


def test_resize_grows_both_nodes_resyncs_the_new_area_and_persists(tmp_path):
    c = LocalPair(tmp_path, size=8 * MIB)
    c.alpha.env["REPLFS_STATEDIR"] = str(tmp_path / "state")   # (shared by both nodes)
    try:
        c.up_fresh()
        a, b = c.alpha, c.beta
        old = a.status()["size"]
        assert old == md.internal_layout(8 * MIB).data_size
        with SyncClient(socket_path(a.rundir)) as cl:
            for off in (0, old // 2, old - 4096):
                cl.call("write", b"old!" * 1024, res="r0", off=off)

        # Refusals first: a smaller --size is a shrink; nothing grew yet.
        cp = a.adm("resize", "--size=2M", "r0", check=False)
        assert cp.returncode == 10 and "(170)" in cp.stderr and "shrinking" in cp.stderr
        cp = a.adm("resize", "r0")
        assert "nothing to do" in cp.stdout
        assert a.status()["size"] == old

        # The admin grows both backing files; alpha's new space holds
        # something (as an extended LV may), beta's is zeros.
        junk = os.urandom(4 * MIB)
        for n in (a, b):
            with open(n.disk, "r+b") as f:
                f.truncate(16 * MIB)
        with open(a.disk, "r+b") as f:
            f.seek(8 * MIB)
            f.write(junk)
        dev = os.path.join(a.root, "drbd0")
        if os.path.exists(dev):
            assert os.stat(dev).st_size == old     # (now in the kernel's attribute cache)
        a.adm("resize", "r0")
        new = md.max_grown_size(md.internal_layout(8 * MIB), 16 * MIB)[0]
        assert new > 8 * MIB + 4 * MIB
        assert a.status()["size"] == new and b.status()["size"] == new
        c.wait_synced()
        assert md5(a, new) == md5(b, new)
        assert read_data(b.disk, 8 * MIB + 4 * MIB)[8 * MIB:] == junk  # came from alpha
        if os.path.exists(dev):
            assert os.stat(dev).st_size == new     # (the kernel was told)
        # The grown area takes writes, mirrored.
        with SyncClient(socket_path(a.rundir)) as cl:
            cl.call("write", b"new!" * 1024, res="r0", off=new - 4096)
        assert "resized from" in a.status()["last_event"]

        # down / up on both: the size and the data stay.
        for n in (a, b):
            n.adm("down", "r0")
        assert md5(a, new) == md5(b, new)
        for n in (a, b):
            n.adm("up", "r0")
        a.wait(lambda s: s["cstate"] == "Connected" and s["dstate"] == "UpToDate"
               and s["pdsk"] == "UpToDate", what="reconnect after down/up")
        assert a.status()["size"] == new and b.status()["size"] == new
        assert read_data(a.disk, new)[new - 4096:] == b"new!" * 1024

        # Not Connected: refused, nothing changes.
        b.adm("disconnect", "r0")
        a.wait(lambda s: s["cstate"] != "Connected", what="disconnect")
        for n in (a, b):
            with open(n.disk, "r+b") as f:
                f.truncate(20 * MIB)
        cp = a.adm("resize", "r0", check=False)
        assert cp.returncode == 11 and "(-15)" in cp.stderr
        assert a.status()["size"] == new
    finally:
        c.teardown()


def test_attach_finds_the_meta_data_of_a_disk_grown_while_down(tmp_path):
    """The disk grew while the resource was down (or a crash came before
    the new superblock was written): up still finds the superblock at
    the old end, and a resize then moves it."""
    c = LocalPair(tmp_path, size=8 * MIB)
    c.alpha.env["REPLFS_STATEDIR"] = str(tmp_path / "state")
    try:
        c.up_fresh()
        a, b = c.alpha, c.beta
        old = a.status()["size"]
        for n in (a, b):
            n.adm("down", "r0")
            with open(n.disk, "r+b") as f:
                f.truncate(12 * MIB)
        for n in (a, b):
            n.adm("up", "r0")
        a.wait(lambda s: s["cstate"] == "Connected" and s["pdsk"] == "UpToDate",
               what="reconnect")
        assert a.status()["size"] == old
        assert "grew from" in a.log()
        a.adm("resize", "--assume-clean", "r0")
        new = md.max_grown_size(md.internal_layout(8 * MIB), 12 * MIB)[0]
        assert a.status()["size"] == new == b.status()["size"]
        assert a.status()["counters"]["oos"] == 0
        for n in (a, b):
            n.adm("down", "r0")
            dump = n.adm("dump-md", "r0").stdout
            assert f"usable size {new} bytes" in dump and "bits-set 0;" in dump, dump
            with open(n.disk, "rb") as f:
                f.seek(12 * MIB - md.SUPERBLOCK_SIZE)
                sb = md.decode_superblock(f.read(md.SUPERBLOCK_SIZE))
            assert sb.data_size == new
    finally:
        c.teardown()
