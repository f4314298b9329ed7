"""mkfs.replfs: the function, the geometries it accepts, the command line;
the cluster name in the superblock and its default from replfsd."""
from __future__ import annotations

import os
import shutil
import socket
import stat
import struct
import tempfile

import pytest
import trio

from replfs.blockdev import FileBlockDevice
from replfs.fs import format as F
from replfs.fs import mkfs
from replfs.fs.core import Filesystem, read_superblock
from replfs.fs.mkfs import (MkfsError, detect_signature, main, make_filesystem,
                            mounted_source, parse_size)

from replfs.ipc import frames

from .conftest import check_image, make_image


async def test_output_and_superblock(tmp_path):
    path = make_image(tmp_path / "v.img", 64 << 20)
    lines = []
    dev = FileBlockDevice(path)
    sb = await make_filesystem(dev, slots=3, label="data", out=lines.append)
    await dev.close()
    text = "\n".join(lines)
    for want in ("Label: data", "Block size: 4096", "Cluster size: 4096", "Volume size: ",
                 "Cluster groups: ", "Journal size: ", "Node slots: 3",
                 "Creating bitmaps: done", "Initializing superblock: done",
                 "Writing system files: done", "Writing superblock: done",
                 "Writing backup superblock: 0 block(s)", "Formatting Journals: done",
                 "Writing lost+found: done", "mkfs.replfs successful"):
        assert want in text, want
    order = [text.index(x) for x in ("Creating bitmaps", "Initializing superblock",
                                     "Writing system files", "Writing superblock:",
                                     "Writing backup", "Formatting Journals",
                                     "Writing lost+found", "successful")]
    assert order == sorted(order)
    dev = FileBlockDevice(path)
    got = await read_superblock(dev)
    await dev.close()
    assert got.label == "data" and got.slot_count == 3 and got.uuid == sb.uuid
    assert got.lostfound_ino and got.root_ino
    assert not await check_image(path)


@pytest.mark.parametrize("bs,cs,size", [(512, 4096, 40 << 20), (1024, 1024, 40 << 20),
                                        (2048, 65536, 64 << 20), (8192, 8192, 64 << 20),
                                        (4096, 1 << 20, 256 << 20)])
async def test_geometries_mount_and_work(tmp_path, bs, cs, size):
    path = make_image(tmp_path / "v.img", size)
    dev = FileBlockDevice(path)
    await make_filesystem(dev, block_size=bs, cluster_size=cs, slots=2, out=None)
    fs = await Filesystem.mount(dev)
    d = await fs.mkdir(fs.root_ino, "d")
    data = os.urandom(3 * cs + 17)
    n = 300 if cs <= 65536 else 60        # an inode takes a whole cluster
    for i in range(n):
        fh, a = await fs.create(d.ino, f"f{i}")
        if i % 50 == 0:
            await fs.write(fh, 0, data)
        await fs.release(fh)
    await fs.setxattr(d.ino, "user.x", b"v" * (bs // 4))
    await fs.symlink(fs.root_ino, "l", "d/f0")
    await fs.unmount()
    fs = await Filesystem.mount(dev)
    a = await fs.lookup(d.ino, "f50")
    fh = await fs.open(a.ino)
    assert await fs.read(fh, 0, len(data)) == data
    await fs.release(fh)
    assert len(await fs.readdir(d.ino)) == n
    await fs.unmount()
    await dev.close()
    assert not await check_image(path)


async def test_backup_superblocks(tmp_path):
    path = make_image(tmp_path / "v.img", (1 << 30) + (64 << 20))
    lines = []
    dev = FileBlockDevice(path)
    sb = await make_filesystem(dev, out=lines.append)
    assert "Writing backup superblock: 1 block(s)" in lines
    raw = await dev.read(1 << 30, 4096)
    assert F.Superblock.decode(raw, (1 << 30) // 4096).uuid == sb.uuid
    await dev.close()
    assert not await check_image(path)


async def test_bad_parameters(tmp_path):
    path = make_image(tmp_path / "v.img", 64 << 20)
    dev = FileBlockDevice(path)
    for kw in (dict(block_size=3000), dict(cluster_size=2048), dict(cluster_size=3 << 12),
               dict(slots=0), dict(slots=1000), dict(label="x" * 65),
               dict(journal_size=4096), dict(journal_size=1 << 30)):
        with pytest.raises(MkfsError):
            await make_filesystem(dev, out=None, **kw)
    await dev.close()
    small = make_image(tmp_path / "s.img", 4 << 20)
    dev = FileBlockDevice(small)
    with pytest.raises(MkfsError, match="too small"):
        await make_filesystem(dev, out=None)
    await dev.close()


def test_parse_size():
    assert parse_size("4096") == 4096
    assert parse_size("4k") == 4096
    assert parse_size("16M") == 16 << 20
    assert parse_size("2G") == 2 << 30
    assert parse_size("1MB") == 1 << 20
    for bad in ("", "x", "-1", "0", "1.5M"):
        with pytest.raises(MkfsError):
            parse_size(bad)


def test_signatures():
    def probe_of(buf):
        return lambda o, n: buf[o:o + n]
    blank = bytearray(70000)
    assert detect_signature(bytes(blank), probe_of(blank)) is None
    ext = bytearray(blank)
    ext[1080:1082] = b"\x53\xef"
    assert "ext" in detect_signature(bytes(ext), probe_of(ext))
    xfs = bytearray(blank)
    xfs[:4] = b"XFSB"
    assert "XFS" in detect_signature(bytes(xfs), probe_of(xfs))
    btr = bytearray(blank)
    btr[0x10040:0x10048] = b"_BHRfS_M"
    assert "btrfs" in detect_signature(bytes(btr), probe_of(btr))
    ocfs = bytearray(blank)
    ocfs[8192:8198] = b"OCFSV2"
    assert "OCFS2" in detect_signature(bytes(ocfs), probe_of(ocfs))


def test_mounted_source(tmp_path):
    info = tmp_path / "mountinfo"
    info.write_text("36 35 98:0 / /mnt/a rw,noatime shared:1 - ext4 /dev/vdz9 rw\n"
                    "37 35 98:0 / /mnt/with\\040space rw - fuse.replfs r0 rw\n")
    assert mounted_source("/dev/vdz9", str(info)) == "/mnt/a"
    assert mounted_source("r0", str(info)) == "/mnt/with space"
    assert mounted_source("/dev/other", str(info)) is None


def test_cli(tmp_path, capsys):
    path = make_image(tmp_path / "v.img", 64 << 20)
    assert main(["-L", "x", "-N", "2", "-b", "1K", "-C", "4K", "-J", "size=2M", path]) == 0
    out = capsys.readouterr().out
    assert "Block size: 1024" in out and "Node slots: 2" in out and "successful" in out
    # a second run refuses: the target holds a replfs filesystem
    assert main([path]) == 1
    err = capsys.readouterr().err
    assert "replfs filesystem" in err and "-F" in err
    assert main(["-F", "-q", path]) == 0
    assert capsys.readouterr().out == ""
    ext = make_image(tmp_path / "ext.img", 64 << 20)
    with open(ext, "r+b") as f:
        f.seek(1080)
        f.write(b"\x53\xef")
    assert main([ext]) == 1
    assert "ext2/ext3/ext4" in capsys.readouterr().err
    assert main(["-b", "3000", path]) == 1
    assert "invalid block size" in capsys.readouterr().err
    assert main(["-J", "bogus=1", "-F", path]) == 1
    assert main(["--no-such-option", path]) == 1
    assert main([]) == 1
    conf = tmp_path / "replfs.conf"
    conf.write_text("")
    assert main(["-c", str(conf), "no-such-resource"]) == 1
    assert "no resource" in capsys.readouterr().err
    assert main(["--version"]) == 0
    assert main(["--help"]) == 0
    assert "mkfs.replfs" in capsys.readouterr().out
    assert stat.S_ISREG(os.stat(path).st_mode)


# ------------------------------------------------------------------ the cluster name

def _sb(slots: int = 2, bs: int = 4096, **kw) -> F.Superblock:
    return F.Superblock(uuid=b"u" * 16, label="l", block_bits=bs.bit_length() - 1,
                        cluster_bits=12, total_blocks=1 << 20, total_clusters=1 << 20,
                        slot_count=slots, cpg=1000, group_count=1, root_ino=9,
                        slotmap_blk=8, reserved_clusters=3, created_ns=1,
                        slots=[F.SlotInfo(100 + i, 1024, 50 + i, 60 + i) for i in range(slots)],
                        volid=7, lostfound_ino=11, **kw)


def test_superblock_cluster_name_round_trip():
    raw = _sb(cluster_name="ocfs2").encode(2)
    off = F.HDR_SIZE + F.SB_BODY.size + 2 * F.SB_SLOT.size
    assert F.cluster_name_offset(2) == off
    assert raw[off:off + 16] == b"ocfs2" + bytes(11)
    got = F.Superblock.decode(raw, 2)
    assert got.cluster_name == "ocfs2"
    assert got.feat_compat == F.FEATURE_COMPAT_CLUSTER_NAME
    assert got == _sb(cluster_name="ocfs2", feat_compat=F.FEATURE_COMPAT_CLUSTER_NAME)
    full = F.Superblock.decode(_sb(cluster_name="a" * 16).encode(2), 2)
    assert full.cluster_name == "a" * 16
    # no name: no bit and nothing stored; another compat bit is kept
    raw = _sb(feat_compat=F.FEATURE_COMPAT_CLUSTER_NAME | 2).encode(2)
    assert raw[off:off + 16] == bytes(16)
    got = F.Superblock.decode(raw, 2)
    assert got.cluster_name == "" and got.feat_compat == 2


def test_superblock_without_the_bit_has_no_cluster_name():
    """A volume made before the feature: whatever lies after the slot table
    is not read as a name unless the compat bit says it is one."""
    buf = bytearray(_sb(cluster_name="ocfs2").encode(2))
    struct.pack_into("<I", buf, 140, 0)               # feat_compat, see docs/fs-format.md
    struct.pack_into("<I", buf, 8, F.block_crc(buf))
    got = F.Superblock.decode(bytes(buf), 2)
    assert got.feat_compat == 0 and got.cluster_name == ""
    assert F.Superblock.decode(_sb().encode(2), 2).cluster_name == ""


def test_max_slots_leave_room_for_the_cluster_name():
    for bs in range(256, 9000, 8):
        n = F.max_slots_for(bs)
        assert F.cluster_name_offset(n) + F.CLUSTER_NAME_LEN <= bs, bs
    for bs in F.BLOCK_SIZES:
        n = F.max_slots_for(bs)
        sb = _sb(slots=n, bs=bs, cluster_name="z" * 16)
        got = F.Superblock.decode(sb.encode(2), 2)
        assert got.cluster_name == "z" * 16 and len(got.slots) == n, bs
        assert got.slots[-1] == sb.slots[-1]


def test_check_cluster_name():
    for good in ("ocfs2", "a", "A-b_9", "x" * 16):
        assert F.check_cluster_name(good) == good
    for bad, why in (("", "empty"), ("x" * 17, "17 characters"), ("my cluster", "' '"),
                     ("a.b", "'.'"), ("clüster", "'ü'"), ("a\0", "'\\x00'")):
        with pytest.raises(ValueError, match="cluster name") as ei:
            F.check_cluster_name(bad)
        assert why in str(ei.value), (bad, str(ei.value))


async def test_make_filesystem_records_the_cluster_name(tmp_path):
    path = make_image(tmp_path / "v.img", 64 << 20)
    lines = []
    dev = FileBlockDevice(path)
    await make_filesystem(dev, slots=2, cluster_name="ocfs2", out=lines.append)
    got = await read_superblock(dev)
    assert got.cluster_name == "ocfs2" and got.feat_compat & F.FEATURE_COMPAT_CLUSTER_NAME
    assert lines[1] == "Cluster stack: o2cb (cluster ocfs2)"
    fs = await Filesystem.mount(dev)
    assert fs.sb.cluster_name == "ocfs2"
    await fs.unmount()
    lines.clear()
    await make_filesystem(dev, slots=2, out=lines.append)
    got = await read_superblock(dev)
    assert got.cluster_name == "" and not got.feat_compat & F.FEATURE_COMPAT_CLUSTER_NAME
    assert ("Cluster stack: o2cb (no cluster name: any cluster may mount it on both nodes)"
            in lines)
    with pytest.raises(MkfsError, match="only ASCII letters"):
        await make_filesystem(dev, cluster_name="no way", out=None)
    await dev.close()
    assert not await check_image(path)


def test_cli_cluster_name(tmp_path, capsys):
    path = make_image(tmp_path / "v.img", 64 << 20)
    for bad, why in (("bad name", "only ASCII letters"), ("x" * 17, "at most 16"),
                     ("", "empty")):
        assert main(["--cluster-name", bad, path]) == 1, bad
        cap = capsys.readouterr()
        assert cap.err.startswith("mkfs.replfs: ") and why in cap.err, cap.err
        assert "Traceback" not in cap.err and cap.out == ""
    with open(path, "rb") as f:                       # nothing was written
        assert not any(f.read(1 << 20))
    assert main(["-N", "2", "--cluster-name", "ocfs2", path]) == 0
    assert "Cluster stack: o2cb (cluster ocfs2)" in capsys.readouterr().out
    assert F.Superblock.decode(open(path, "rb").read(F.SB_OFFSET + 4096)[F.SB_OFFSET:],
                               F.sb_blkno(4096)).cluster_name == "ocfs2"
    # an image gets no default name, whatever the daemon would say
    assert main(["-F", "--rundir", str(tmp_path / "nowhere"), path]) == 0
    assert "Cluster stack: o2cb (no cluster name" in capsys.readouterr().out


# A stand-in for replfsd serving one resource from a file, enough for mkfs.

async def _fake_replfsd(path: str, image: str, status: dict, *, task_status):
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.bind(path)
    sock.listen()

    async def serve(stream):
        dec = frames.FrameDecoder()
        fd = os.open(image, os.O_RDWR)
        try:
            while data := await stream.receive_some(1 << 20):
                dec.receive_data(data)
                while (fr := dec.next_frame()) is not None:
                    req, body = fr
                    reply, out = {"id": req["id"], "ok": True}, b""
                    op = req["op"]
                    if op == "cluster-status":
                        reply.update(status)
                    elif op == "open":
                        reply.update(size=os.fstat(fd).st_size, handle=1)
                    elif op == "read":
                        out = os.pread(fd, req["len"], req["off"])
                    elif op == "write":
                        os.pwrite(fd, body, req["off"])
                    await stream.send_all(frames.encode(reply, out))
        except trio.BrokenResourceError:
            pass
        finally:
            os.close(fd)
    await trio.serve_listeners(serve, [trio.SocketListener(sock)], task_status=task_status)


@pytest.mark.parametrize("status,want", [
    ({"online": True, "cluster": "ocfs2"}, "Cluster stack: o2cb (cluster ocfs2)"),
    ({"online": False}, "Cluster stack: o2cb (no cluster name"),
    (None, "Cluster stack: o2cb (no cluster name"),                 # the daemon has no cluster service
])
async def test_resource_defaults_to_the_online_cluster(tmp_path, monkeypatch, status, want):
    image = make_image(tmp_path / "r0.img", 32 << 20)
    rundir = tempfile.mkdtemp(prefix="rfs")          # a short socket path
    monkeypatch.setattr(mkfs, "_resource_exists", lambda name, conf: (True, "conf"))
    lines: list[str] = []
    try:
        async with trio.open_nursery() as nursery:
            served = status if status is not None else {"ok": False, "error": "unknown op"}
            await nursery.start(_fake_replfsd, os.path.join(rundir, "replfsd.sock"), image,
                                served)
            for argv in (["--rundir", rundir, "-N", "2", "r0"],
                         ["-F", "--cluster-name", "other", "--rundir", rundir, "-N", "2", "r0"]):
                args = mkfs.build_parser().parse_args(argv)
                lines.clear()
                with trio.fail_after(30):
                    await mkfs._run(args, mkfs.make_options(args, lines.append))
                dev = FileBlockDevice(image, readonly=True)
                got = await read_superblock(dev)
                await dev.close()
                if "--cluster-name" in argv:          # the option wins over the daemon
                    assert got.cluster_name == "other"
                    assert "Cluster stack: o2cb (cluster other)" in lines
                else:
                    assert want in lines[1], lines
                    assert got.cluster_name == (status or {}).get("cluster", "")
            nursery.cancel_scope.cancel()
    finally:
        shutil.rmtree(rundir)


async def test_resource_refuses_an_online_cluster_name_it_cannot_store(tmp_path, monkeypatch):
    image = make_image(tmp_path / "r0.img", 32 << 20)
    rundir = tempfile.mkdtemp(prefix="rfs")
    monkeypatch.setattr(mkfs, "_resource_exists", lambda name, conf: (True, "conf"))
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(_fake_replfsd, os.path.join(rundir, "replfsd.sock"), image,
                                {"online": True, "cluster": "a-cluster-name-too-long"})
            args = mkfs.build_parser().parse_args(["--rundir", rundir, "r0"])
            with pytest.raises(MkfsError, match="cannot record the cluster online"):
                with trio.fail_after(30):
                    await mkfs._run(args, mkfs.make_options(args, None))
            nursery.cancel_scope.cancel()
    finally:
        shutil.rmtree(rundir)
    with open(image, "rb") as f:
        assert not any(f.read(1 << 20))
