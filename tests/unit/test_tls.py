"""TLS for the links: replfsadm tls-keygen's files, the handshake and its
refusals (in-memory and loopback streams), the config options that turn
it on (replfs.conf's net section, cluster.conf's cluster stanza), and the
cluster link (o2net) over real loopback TCP."""
from __future__ import annotations

import logging
import os
import stat

import pytest
import trio
from trio.testing import memory_stream_pair

from replfs import tls
from replfs.blockrepl import conf as confmod
from replfs.cli.main import main as adm
from replfs.errors import ReplfsError
from replfs.localpair import LocalPair
from replfs.locking import cluster_conf as cc
from replfs.locking.net.driver import O2Net

from test_locking_net import FAST, Recorder, make_nodes  # (rootdir-relative: tests/unit is on sys.path)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A pair CA with alpha, beta and gamma; and another CA with its own beta."""
    root = tmp_path_factory.mktemp("pki")
    good, other = str(root / "good"), str(root / "other")
    tls.keygen(good, ["alpha", "beta", "gamma"])
    tls.keygen(other, ["beta"])
    return good, other


def ctx(directory: str, node: str) -> tls.Contexts:
    return tls.load(tls.TLSFiles.in_dir(directory, node))


async def _pair(client: tls.Contexts, server: tls.Contexts, *, client_expects="beta",
                server_expects=("alpha",)) -> dict:
    """Both ends of a handshake over an in-memory stream: each end's peer
    name or its TLSError text, and what the client read."""
    c, s = memory_stream_pair()
    out: dict = {}

    async def end(name, stream, ctxs, server_side, expected):
        try:
            secured, peer = await tls.handshake(stream, ctxs, server_side=server_side,
                                                expected=expected, where=name)
            out[name] = peer
            if server_side:
                await secured.send_all(b"over tls")
            else:
                out["data"] = await secured.receive_some(100)
        except (tls.TLSError, trio.BrokenResourceError) as e:
            out.setdefault(name, f"error: {e}")
            await stream.aclose()

    with trio.fail_after(10):
        async with trio.open_nursery() as n:
            n.start_soon(end, "client", c, client, False, client_expects)
            n.start_soon(end, "server", s, server, True, set(server_expects))
    return out


# ------------------------------------------------------------ the files

def test_keygen_writes_keys_private_and_certificates_named_for_their_nodes(tmp_path):
    d = str(tmp_path / "tls")
    written = tls.keygen(d, ["alpha", "beta"])
    names = sorted(os.path.basename(p) for p, _ in written)
    assert names == ["alpha.crt", "alpha.key", "beta.crt", "beta.key", "ca.crt", "ca.key"]
    for name in names:
        mode = stat.S_IMODE(os.stat(os.path.join(d, name)).st_mode)
        assert mode == (0o600 if name.endswith(".key") else 0o644), (name, oct(mode))
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o700
    from cryptography import x509
    with open(os.path.join(d, "beta.crt"), "rb") as f:
        cert = x509.load_pem_x509_certificate(f.read())
    assert cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value == "beta"
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["beta"]
    # a second run makes only what is missing, with the same CA
    with open(os.path.join(d, "ca.crt"), "rb") as f:
        ca = f.read()
    assert tls.keygen(d, ["alpha", "beta"]) == []
    more = tls.keygen(d, ["alpha", "beta", "gamma"])
    assert sorted(os.path.basename(p) for p, _ in more) == ["gamma.crt", "gamma.key"]
    with open(os.path.join(d, "ca.crt"), "rb") as f:
        assert f.read() == ca


async def test_keygen_force_makes_a_new_ca_that_the_old_certificates_fail(tmp_path):
    d = str(tmp_path / "tls")
    tls.keygen(d, ["alpha", "beta"])
    old_alpha = str(tmp_path / "old")
    os.makedirs(old_alpha)
    for name in ("alpha.crt", "alpha.key", "ca.crt"):
        os.link(os.path.join(d, name), os.path.join(old_alpha, name))
    tls.keygen(d, ["alpha", "beta"], force=True)
    out = await _pair(ctx(old_alpha, "alpha"), ctx(d, "beta"))
    assert out["client"].startswith("error: TLS handshake with client failed: "
                                    "CERTIFICATE_VERIFY_FAILED")


def test_missing_files_are_named(tmp_path):
    with pytest.raises(tls.TLSError, match=r"certificate .*alpha\.crt does not exist .*"
                                           r"replfsadm tls-keygen"):
        ctx(str(tmp_path), "alpha")


def test_a_key_readable_by_others_is_warned_about(tmp_path):
    d = str(tmp_path / "tls")
    tls.keygen(d, ["alpha"])
    assert ctx(d, "alpha").warnings == ()
    os.chmod(os.path.join(d, "alpha.key"), 0o644)
    (warning,) = ctx(d, "alpha").warnings
    assert "alpha.key: the TLS private key is readable by group or others" in warning


# ------------------------------------------------------------ handshakes

async def test_handshake_between_the_pair_carries_data(pki):
    good, _ = pki
    out = await _pair(ctx(good, "alpha"), ctx(good, "beta"))
    assert out == {"client": "beta", "server": "alpha", "data": b"over tls"}


async def test_a_certificate_from_another_ca_is_refused(pki):
    good, other = pki
    out = await _pair(ctx(good, "alpha"), ctx(other, "beta"))
    assert "CERTIFICATE_VERIFY_FAILED" in out["client"]
    assert "keyring" in out["client"]
    assert "data" not in out
    # and the other way round: the accepting side refuses the client's
    # (a client that trusts the server, with a certificate from elsewhere)
    stranger = tls.load(tls.TLSFiles(certificate=os.path.join(other, "beta.crt"),
                                     privkey=os.path.join(other, "beta.key"),
                                     keyring=os.path.join(good, "ca.crt")))
    out = await _pair(stranger, ctx(good, "alpha"), client_expects="alpha",
                      server_expects=("beta",))
    assert "CERTIFICATE_VERIFY_FAILED" in out["server"]
    assert "data" not in out


async def test_a_certificate_for_another_node_is_refused(pki):
    good, _ = pki
    out = await _pair(ctx(good, "alpha"), ctx(good, "gamma"))
    assert out["client"] == ("error: TLS: the peer at client presented a certificate for "
                             "'gamma', expected 'beta'")
    out = await _pair(ctx(good, "gamma"), ctx(good, "beta"))
    assert "presented a certificate for 'gamma', expected 'alpha'" in out["server"]


async def test_a_plain_text_peer_is_refused_with_a_hint(pki):
    good, _ = pki
    c, s = memory_stream_pair()
    await c.send_all(b"\x00" * 64)     # what a peer without TLS sends first
    with trio.fail_after(5), pytest.raises(tls.TLSError, match="does it have TLS enabled"):
        await tls.handshake(s, ctx(good, "beta"), server_side=True, expected="alpha",
                            where="127.0.0.1:7789")


# ------------------------------------------------------------ configuration

def _conf(tmp_path, net: str) -> str:
    pair = LocalPair(tmp_path, extra_net=net)
    return pair.alpha.conf


def test_net_tls_options_and_their_defaults(tmp_path):
    path = _conf(tmp_path, "\n\t\ttls yes;\n\t\ttls-keyring trust/ca.pem;")
    res = confmod.load(path).resources["r0"]
    assert res.tls
    files = tls.resource_files(res.net, "alpha", path)
    base = os.path.dirname(path)
    assert files == tls.TLSFiles(certificate=os.path.join(base, "tls", "alpha.crt"),
                                 privkey=os.path.join(base, "tls", "alpha.key"),
                                 keyring=os.path.join(base, "trust", "ca.pem"))


def test_tls_files_without_tls_are_warned_about(tmp_path):
    path = _conf(tmp_path, "\n\t\ttls-certificate /x.crt;")
    config = confmod.load(path)
    assert not config.resources["r0"].tls
    assert any("'tls-certificate' has no effect in resource r0" in w for w in config.warnings)


def test_a_bad_tls_value_is_a_config_error_with_file_and_line(tmp_path):
    path = _conf(tmp_path, "\n\t\ttls maybe;")
    with pytest.raises(ReplfsError, match=r"replfs\.conf:\d+: invalid value 'maybe' for "
                                          r"option 'tls'"):
        confmod.load(path)


def test_cluster_conf_tls_key(tmp_path):
    text = ("cluster:\n\tnode_count = 1\n\tname = c1\n\ttls = yes\n\n"
            "node:\n\tip_port = 7777\n\tip_address = 127.0.0.1\n\tnumber = 0\n"
            "\tname = alpha\n\tcluster = c1\n")
    conf = cc.parse(text, "cluster.conf")
    assert conf.cluster("c1").tls == "yes"
    assert "\ttls = yes" in cc.dump(conf)
    assert cc.parse(cc.dump(conf)) == conf
    with pytest.raises(ReplfsError, match=r"cluster\.conf:4: tls must be yes or no"):
        cc.parse(text.replace("tls = yes", "tls = on"), "cluster.conf")


def test_replfsadm_tls_keygen(tmp_path, capsys):
    path = _conf(tmp_path, "")
    out: list[str] = []
    assert adm(["-c", path, "--node", "alpha", "tls-keygen"], out=out.append,
               err=out.append) == 0
    d = os.path.join(os.path.dirname(path), "tls")
    assert sorted(os.listdir(d)) == ["alpha.crt", "alpha.key", "beta.crt", "beta.key",
                                     "ca.crt", "ca.key"]
    assert any("Each node needs ca.crt and its own" in line for line in out)
    out.clear()
    assert adm(["-c", path, "--node", "alpha", "tls-keygen"], out=out.append,
               err=out.append) == 0
    assert "nothing to do" in out[-1]
    out.clear()
    assert adm(["-c", path, "tls-keygen", "--days", "0"], out=out.append,
               err=out.append) == 1
    assert out == ["--days needs a whole number from 1 to 100000, not '0'"]


# ------------------------------------------------------------ the cluster link

def _net(me, nodes, rec, ctxs):
    return O2Net(me=me, nodes=nodes, cluster="c1", timeouts=FAST, key=b"k",
                 on_message=rec.on_message, on_up=rec.on_up, on_down=rec.on_down, tls=ctxs)


async def test_cluster_link_over_tls(nursery, pki):
    good, _ = pki
    nodes = make_nodes()
    ra, rb = Recorder(), Recorder()
    a, b = _net(nodes[0], nodes, ra, ctx(good, "alpha")), _net(nodes[1], nodes, rb,
                                                              ctx(good, "beta"))
    await nursery.start(b.run)
    await nursery.start(a.run)
    await ra.wait(lambda: ("up", 1) in ra.events)
    assert await a.send(1, b"hello beta")
    await rb.wait(lambda: rb.msgs == [(0, b"hello beta")])
    assert isinstance(b.conns[0].stream, trio.SSLStream)


@pytest.mark.parametrize("case", ["other-ca", "other-node", "plain"])
async def test_cluster_link_refuses_a_wrong_certificate(nursery, pki, caplog, case):
    caplog.set_level(logging.WARNING, "replfs.locking.net")
    good, other = pki
    nodes = make_nodes()
    ra, rb = Recorder(), Recorder()
    alpha = {"other-ca": ctx(good, "alpha"), "other-node": ctx(good, "gamma"),
             "plain": None}[case]
    beta = ctx(other, "beta") if case == "other-ca" else ctx(good, "beta")
    await nursery.start(_net(nodes[1], nodes, rb, beta).run)
    await nursery.start(_net(nodes[0], nodes, ra, alpha).run)
    want = {"other-ca": "CERTIFICATE_VERIFY_FAILED",
            "other-node": "presented a certificate for 'gamma', expected 'alpha'",
            "plain": "does it have TLS enabled"}[case]
    with trio.fail_after(5):
        while want not in caplog.text:
            await trio.sleep(0.02)
    assert "refusing connection" in caplog.text
    assert ra.events == [] and rb.events == []
