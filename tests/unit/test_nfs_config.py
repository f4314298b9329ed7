"""The NFS export's pure parts: ids derived from the volume UUID, the
Ganesha configuration, the checks on export options, replfsadm nfs's
usage errors, and the NFSv3 client's reply decoding."""
from __future__ import annotations

import struct

import pytest

from replfs.cli import nfs as cli
from replfs.errors import EXIT_USAGE, ReplfsError
from replfs.nfs import ganesha as G
from replfs.nfs import rpc

UUID = "6d9b8709f2e0416eb2aa9b3d79a119d9"


def spec(**kw) -> G.ExportSpec:
    return G.ExportSpec(resource="r0", mountpoint="/srv/r0", uuid=UUID, **kw)


def test_ids_come_from_the_uuid_and_differ_between_volumes():
    hi, lo, eid = G.derive_ids(UUID)
    assert (hi, lo) == (0x6d9b8709, 0xf2e0416e)
    assert 1 <= eid <= 65534
    assert G.derive_ids(UUID) == (hi, lo, eid)                 # stable
    other = G.derive_ids("0" * 31 + "1")
    assert other[:2] == (0, 1)                                 # never 0.0
    assert other != (hi, lo, eid)
    for bad in ("", "xyz", UUID[:-1], UUID + "0"):
        with pytest.raises(ReplfsError):
            G.derive_ids(bad)


def test_config_has_what_failover_needs():
    text = G.render_config(spec(address="10.0.0.9", grace=20, lease=10))
    hi, lo, eid = G.derive_ids(UUID)
    for line in (f"Export_Id = {eid};", "Path = /srv/r0;", "Pseudo = /r0;",
                 f"Filesystem_Id = {hi}.{lo};", "Bind_addr = 10.0.0.9;",
                 "Attr_Expiration_Time = 0;", "Delegations = false;", "Enable_NLM = false;",
                 "RecoveryRoot = /srv/r0/.nfs-ganesha/10.0.0.9;", "Grace_Period = 20;",
                 "Lease_Lifetime = 10;", "mount_path_pseudo = true;", "Clustered = false;",
                 "Squash = root_squash;", "Access_Type = RW;", "Name = VFS;"):
        assert line in text, line
    assert text.count("{") == text.count("}")
    # every node renders the same export for the same volume
    assert G.render_config(spec(address="10.0.0.9", grace=20, lease=10)) == text


def test_config_options():
    text = G.render_config(spec(export_id=7, pseudo="/exports/home", access="RO",
                                clients=["192.168.1.0/24", "host1"], protocols=("4",),
                                node="alpha"))
    assert "Export_Id = 7;" in text and "Pseudo = /exports/home;" in text
    assert "Access_Type = RO;" in text and "Clients = 192.168.1.0/24, host1;" in text
    assert "Protocols = 4;" in text and "Bind_addr" not in text
    # no address: the node's own NFSv4 recovery directory, never a shared one
    assert "RecoveryRoot = /srv/r0/.nfs-ganesha/node-alpha;" in text
    assert "node-beta;" in G.render_config(spec(node="beta"))
    with pytest.raises(ReplfsError, match="needs the node's name"):
        G.render_config(spec())


@pytest.mark.parametrize("kw", [
    {"address": "not-an-ip"}, {"port": 0}, {"mount_port": 70000}, {"export_id": 0},
    {"export_id": 65536}, {"pseudo": "relative"}, {"pseudo": "/"}, {"pseudo": "/a b"},
    {"pseudo": "/a;b"}, {"access": "RX"}, {"clients": ["a b"]}, {"clients": [""]},
    {"protocols": ("2",)}, {"protocols": ()}, {"lease": 121}, {"grace": 5, "lease": 10},
    {"grace": 181}, {"squash": "maybe"},
])
def test_bad_options_are_refused_with_their_name(kw):
    with pytest.raises(ReplfsError) as e:
        G.render_config(spec(**kw))
    assert e.value.exit_code == EXIT_USAGE
    name = next(iter(kw)).replace("_", "-")
    assert f"--{name}" in e.value.message or (name == "lease" and "--grace" in e.value.message)


def test_a_mountpoint_ganesha_cannot_name_is_refused():
    with pytest.raises(ReplfsError):
        G.render_config(G.ExportSpec(resource="r0", mountpoint="/srv/my r0", uuid=UUID))


def test_fsid_bytes_match_a_ganesha_vfs_handle():
    # type byte (TWO_UINT32), then the two words in host order, then the
    # kernel handle: what start() looks for in the root handle
    hi, lo, _ = G.derive_ids(UUID)
    handle = b"\x43\x00\x2f\x00\x16" + bytes([5]) + struct.pack("=II", hi, lo) + b"\x81" * 12
    assert G.fsid_bytes(hi, lo) in handle


def run_cli(*argv):
    out, err = [], []
    code = cli.main(list(argv), out=out.append, err=err.append)
    return code, "\n".join(out), "\n".join(err)


@pytest.mark.parametrize("argv,needle", [
    ((), "USAGE"),
    (("nfs", "frobnicate"), "Unknown nfs command 'frobnicate'"),
    (("nfs", "start"), "USAGE: replfsadm nfs start"),
    (("nfs", "config", "/a", "/b"), "USAGE: replfsadm nfs config"),
    (("nfs", "stop", "r0", "--address", "1.2.3.4"), "does not take --address"),
    (("nfs", "start", "/mnt", "--bogus"), "unknown option '--bogus'"),
    (("nfs", "start", "/mnt", "--port"), "option --port needs a value"),
])
def test_cli_usage_errors(argv, needle):
    code, out, err = run_cli(*argv)
    assert code == EXIT_USAGE and needle in err, (code, out, err)


def test_cli_help_and_status_without_daemon(tmp_path):
    code, out, _ = run_cli("nfs", "--help")
    assert code == 0 and "replfsadm-nfs(8)" in out
    code, out, _ = run_cli("--rundir", str(tmp_path), "nfs", "status")
    assert code == cli.EXIT_NOT_RUNNING and "no NFS exports" in out
    code, _, err = run_cli("--rundir", str(tmp_path), "nfs", "start", str(tmp_path))
    assert code == 20 and "replfsd is not running" in err


def test_rpc_reply_decoding_refuses_truncated_and_huge_fields():
    u = rpc._Unpacker(struct.pack(">I", 8) + b"abc")
    with pytest.raises(rpc.RPCError):
        u.opaque()
    u = rpc._Unpacker(struct.pack(">I", 100))
    with pytest.raises(rpc.RPCError):
        u.opaque(64)
    p = rpc._Packer()
    p.opaque(b"abcde")
    assert p.bytes() == struct.pack(">I", 5) + b"abcde\0\0\0"
    assert rpc._Unpacker(p.bytes()).opaque() == b"abcde"
    e = rpc.NFSError(70, "GETATTR")
    assert e.status == 70 and "NFS3ERR_STALE" in str(e)
