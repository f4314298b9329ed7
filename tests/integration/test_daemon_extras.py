"""More of the block mirror through real daemons: a partition through the
proxy process, external meta-data, the socket's mode, fio on the device
file, adjust."""
import errno
import os
import shutil
import stat
import subprocess

import pytest

from replfs.ipc.client import SyncClient, socket_path
from replfs.localpair import LocalPair, free_port, read_data
from tests.harness.proxy import spawn_proxy

from .test_device_file import fuse_usable, wait_mounted


def test_partition_between_daemons_then_heal(tmp_path):
    pport = free_port("127.0.0.3")
    pair = LocalPair(tmp_path, proxy_port=pport)
    proc, ctl, _ = spawn_proxy(f"127.0.0.3:{pport}", f"127.0.0.2:{pair.port}",
                               str(tmp_path / "proxy.sock"))
    try:
        pair.up_fresh()
        a, b = pair.alpha, pair.beta
        ctl.partition("both")
        # Protocol C writes on alpha complete once the peer is declared dead.
        with SyncClient(socket_path(a.rundir)) as c:
            for i in range(5):
                c.call("write", bytes([i + 1]) * 4096, res="r0", off=i * 1024 * 1024)
        st = a.wait(lambda s: s["cstate"] in ("WFConnection", "Unconnected", "Timeout",
                                              "NetworkFailure", "BrokenPipe"),
                    what="alpha to notice the partition")
        assert st["counters"]["oos"] == 5 * 4
        ctl.heal("both")
        pair.wait_synced()
        size = a.status()["size"]
        assert read_data(a.disk, size) == read_data(b.disk, size)
    finally:
        proc.kill()
        proc.wait()
        pair.teardown()


def test_external_meta_disk(tmp_path):
    pair = LocalPair(tmp_path)
    try:
        for n in pair.nodes:
            with open(os.path.join(n.root, "meta.img"), "wb") as f:
                f.truncate(8 * 1024 * 1024)
        for n in pair.nodes:
            # Each host section names its own external meta-data file.
            head, tail = open(n.conf).read().split("on beta")
            head = head.replace("meta-disk internal;",
                                f"meta-disk {os.path.join(pair.alpha.root, 'meta.img')};")
            tail = tail.replace("meta-disk internal;",
                                f"meta-disk {os.path.join(pair.beta.root, 'meta.img')};")
            open(n.conf, "w").write(head + "on beta" + tail)
        pair.up_fresh()
        st = pair.alpha.status()
        # External meta-data: the whole backing file is usable.
        assert st["size"] == os.path.getsize(pair.alpha.disk)
        pair.alpha.adm("down", "r0")
        md = pair.alpha.adm("dump-md", "r0").stdout
        assert "meta-disk " + os.path.join(pair.alpha.root, "meta.img") in md
    finally:
        pair.teardown()


def test_socket_is_private_and_adjust_brings_a_resource_back(cluster):
    cluster.up_fresh()
    a = cluster.alpha
    mode = stat.S_IMODE(os.stat(socket_path(a.rundir)).st_mode)
    assert mode == 0o600
    a.adm("disconnect", "r0")
    a.adm("detach", "r0", check=False)   # refused or done: a Primary with a peer may detach
    a.adm("adjust", "r0")
    cluster.wait_synced()
    assert a.adm("cstate", "r0").stdout.strip() == "Connected"


@pytest.mark.skipif(not fuse_usable() or shutil.which("fio") is None,
                    reason="needs FUSE, root and fio")
def test_fio_verified_writes_on_the_device_file(cluster):
    cluster.up_fresh()
    a, b = cluster.alpha, cluster.beta
    dev = os.path.join(a.root, "drbd0")
    wait_mounted(dev)
    cp = subprocess.run(["fio", "--name=v", f"--filename={dev}", "--rw=randwrite",
                         "--bs=4k", "--size=8M", "--direct=1", "--ioengine=psync",
                         "--verify=crc32c", "--do_verify=1", "--verify_state_save=0",
                         "--output-format=terse"],
                        capture_output=True, text=True, timeout=300, cwd=a.root)
    assert cp.returncode == 0, cp.stdout + cp.stderr
    size = a.status()["size"]
    assert read_data(a.disk, size) == read_data(b.disk, size)


def test_a_preflush_fua_write_through_the_admin_socket(tmp_path):
    """The IPC write takes PREFLUSH|FUA (replfs.blockflags) as one request;
    unknown flags are refused with EINVAL and write nothing."""
    from replfs.blockflags import FUA, PREFLUSH
    from replfs.errors import BlockDeviceError
    pair = LocalPair(tmp_path)
    try:
        pair.up_fresh()
        a, b = pair.alpha, pair.beta
        with SyncClient(socket_path(a.rundir)) as c:
            c.call("write", b"J" * 8192, res="r0", off=1 << 20, flags=PREFLUSH | FUA)
            with pytest.raises(BlockDeviceError) as e:
                c.call("write", b"X" * 4096, res="r0", off=0, flags=8)
            assert e.value.errno == errno.EINVAL
            assert c.call("read", res="r0", off=0, len=4096)[1] == bytes(4096)
        # protocol C: the peer's disk has it once the write completed
        with open(b.disk, "rb") as f:
            f.seek(1 << 20)
            assert f.read(8192) == b"J" * 8192
        assert a.status()["counters"]["oos"] == 0
    finally:
        pair.teardown()
