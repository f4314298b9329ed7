"""The replication link over TLS between two real replfsd daemons:
replfsadm tls-keygen, net { tls yes; }, a full sync and writes over it,
and a peer with the wrong certificate refused (then let in once its
files are fixed, without a restart)."""
from __future__ import annotations

import hashlib
import os
import shutil
import time

from replfs import tls
from replfs.localpair import LocalPair, read_data

TLS_NET = "\n\t\ttls yes;"


def _give(src_dir: str, node, names) -> None:
    dst = os.path.join(node.root, "tls")
    os.makedirs(dst, mode=0o700, exist_ok=True)
    for name in names:
        shutil.copy2(os.path.join(src_dir, name), os.path.join(dst, name))


def _md5(node, size: int) -> str:
    return hashlib.md5(read_data(node.disk, size)).hexdigest()


def _wait_log(node, text: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in node.log():
            return
        time.sleep(0.1)
    raise AssertionError(f"{node.name}: no {text!r} in the log:\n{node.log()[-3000:]}")


def test_replication_over_tls_and_a_wrong_certificate(tmp_path):
    pair = LocalPair(tmp_path, extra_net=TLS_NET)
    a, b = pair.alpha, pair.beta
    try:
        a.adm("tls-keygen")
        made = os.path.join(a.root, "tls")
        # beta first gets a certificate of its own name from another CA
        other = str(tmp_path / "other")
        tls.keygen(other, ["beta"])
        _give(made, b, ["ca.crt"])
        _give(other, b, ["beta.crt", "beta.key"])
        for n in pair.nodes:
            n.adm("create-md", "r0")
            n.start()
            n.adm("up", "r0")
        _wait_log(a, "CERTIFICATE_VERIFY_FAILED")
        time.sleep(1.5)
        for n in pair.nodes:
            assert n.status()["cstate"] in ("WFConnection", "Connecting", "Unconnected"), \
                n.status()["cstate"]
        verbose = a.adm("status", "--verbose", "r0").stdout
        assert "last event: TLS" in verbose and "CERTIFICATE_VERIFY_FAILED" in verbose

        # fixed files apply at the next try, without a restart
        _give(made, b, ["beta.crt", "beta.key"])
        a.wait(lambda s: s["cstate"] == "Connected", what="connection over TLS")
        st = a.status()
        assert st["tls"].startswith("TLSv1.3 "), st["tls"]
        assert " tls:TLSv1.3," in a.adm("status", "--verbose", "r0").stdout

        # data crosses it: a full sync, then writes through the device
        with open(a.disk, "r+b") as f:
            f.write(os.urandom(2 * 1024 * 1024))
        a.adm("primary", "--force", "r0")
        pair.wait_synced()
        with open(os.path.join(a.root, "drbd0"), "r+b", buffering=0) as dev:
            dev.seek(4 * 1024 * 1024)
            dev.write(os.urandom(1024 * 1024))
            os.fsync(dev.fileno())
        size = st["size"]
        pair.wait_synced()
        assert _md5(a, size) == _md5(b, size)
        assert "certificate" not in a.adm("status", "r0").stdout
    finally:
        pair.teardown()


def test_tls_without_its_files_fails_up_with_a_clear_message(tmp_path):
    pair = LocalPair(tmp_path, extra_net=TLS_NET)
    a = pair.alpha
    try:
        a.adm("create-md", "r0")
        a.start()
        cp = a.adm("up", "r0", check=False)
        assert cp.returncode == 10, cp
        assert "alpha.crt does not exist" in cp.stderr
        assert "replfsadm tls-keygen" in cp.stderr
        assert "Traceback" not in cp.stderr + cp.stdout
    finally:
        pair.teardown()


def test_cluster_link_over_tls_between_two_daemons(tmp_path):
    """cluster.conf's ``tls = yes``: both daemons' o2net over TLS, the
    certificates from tls/ next to cluster.conf; a node without its
    files cannot go online, with the file named."""
    from replfs.ipc.client import SyncClient, socket_path
    from replfs.localpair import Node, cluster_conf, free_port
    cdir = tmp_path / "etc"
    cdir.mkdir()
    text = cluster_conf("tc", free_port("127.0.0.1"), free_port("127.0.0.2"))
    (cdir / "cluster.conf").write_text(text.replace("\tname = tc\n", "\tname = tc\n\ttls = yes\n", 1))
    (cdir / "o2cb").write_text("O2CB_IDLE_TIMEOUT_MS=1500\nO2CB_KEEPALIVE_DELAY_MS=300\n"
                               "O2CB_RECONNECT_DELAY_MS=200\n")
    nodes = [Node(name, addr, str(tmp_path / name), conf=str(tmp_path / "replfs.conf"))
             for name, addr in (("alpha", "127.0.0.1"), ("beta", "127.0.0.2"))]
    try:
        for n in nodes:
            n.start()

        def online(n):
            with SyncClient(socket_path(n.rundir), timeout=10) as c:
                return c.call("cluster-online", cluster="tc", conf=str(cdir / "cluster.conf"))

        try:
            online(nodes[0])
        except Exception as e:      # noqa: BLE001 -- the refusal is what is checked
            assert "alpha.crt does not exist" in str(e), e
        else:
            raise AssertionError("online without TLS files was accepted")
        tls.keygen(str(cdir / "tls"), ["alpha", "beta"])
        for n in nodes:
            online(n)
        deadline = time.monotonic() + 15
        while True:
            with SyncClient(socket_path(nodes[0].rundir), timeout=10) as c:
                st, _ = c.call("cluster-status")
            if st["connected"]:
                break
            assert time.monotonic() < deadline, st
            time.sleep(0.1)
        _wait_log(nodes[0], "o2net: connected to node 1")
        assert "(beta) at 127.0.0.2" in nodes[0].log() and " over TLSv1.3 " in nodes[0].log()
    finally:
        for n in nodes:
            n.kill9()
