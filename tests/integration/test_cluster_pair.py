"""Cluster stack on two real replfsd daemons (alpha 127.0.0.1, beta 127.0.0.2)."""
from __future__ import annotations

import struct

import pytest
import trio

from replfs.ipc.client import AsyncClient, SyncClient, socket_path
from replfs.blockdev import BlockDeviceError
from replfs.localpair import Node, cluster_conf, free_port

TIMEOUTS = "O2CB_HEARTBEAT_THRESHOLD=3\nO2CB_IDLE_TIMEOUT_MS=1500\nO2CB_KEEPALIVE_DELAY_MS=300\nO2CB_RECONNECT_DELAY_MS=200\n"


@pytest.fixture
def cluster(tmp_path):
    cdir = tmp_path / "etc"
    cdir.mkdir()
    (cdir / "cluster.conf").write_text(cluster_conf("tc", free_port("127.0.0.1"),
                                                          free_port("127.0.0.2")))
    (cdir / "o2cb").write_text(TIMEOUTS)
    (cdir / "key").write_text("test-cluster-key\n")
    nodes = []
    for name, addr in (("alpha", "127.0.0.1"), ("beta", "127.0.0.2")):
        n = Node(name, addr, str(tmp_path / name), conf=str(tmp_path / "replfs.conf"))
        n.start()
        nodes.append(n)
    for n in nodes:
        with SyncClient(socket_path(n.rundir), timeout=10) as c:
            c.call("cluster-online", cluster="tc", conf=str(cdir / "cluster.conf"))
    try:
        yield nodes
    finally:
        for n in nodes:
            n.kill9()


async def clients(nursery, nodes):
    out = [await AsyncClient.connect(socket_path(n.rundir), nursery) for n in nodes]
    with trio.fail_after(10):
        while True:
            st = [(await c.call("cluster-status"))[0] for c in out]
            if all(s["connected"] for s in st):
                break
            await trio.sleep(0.05)
    for c in out:
        await c.call("dlm-join", domain="d1")
    return out


async def test_counter_under_ex_exact_from_both_nodes(cluster, nursery):
    cs = await clients(nursery, cluster)
    n = 30

    async def worker(c):
        for _ in range(n):
            rep, lvb = await c.call("dlm-lock", domain="d1", name="counter", mode="EX")
            v = struct.unpack_from(">Q", lvb)[0] if rep["lvb_valid"] and lvb else 0
            await c.call("dlm-unlock", struct.pack(">Q", v + 1).ljust(len(lvb), b"\0"),
                         handle=rep["handle"])

    with trio.fail_after(30):
        async with trio.open_nursery() as n2:
            for c in cs:
                n2.start_soon(worker, c)
        rep, lvb = await cs[1].call("dlm-lock", domain="d1", name="counter", mode="PR")
    assert struct.unpack_from(">Q", lvb)[0] == 2 * n


async def test_bast_pushed_and_downconvert_unblocks(cluster, nursery):
    a, b = await clients(nursery, cluster)
    with trio.fail_after(15):
        rep, _ = await a.call("dlm-lock", domain="d1", name="r", mode="EX")
        with pytest.raises(BlockDeviceError) as e:
            await b.call("dlm-lock", domain="d1", name="r", mode="PR", noqueue=True)
        assert e.value.errno == 11  # EAGAIN
        got = []

        async def want():
            got.append(await b.call("dlm-lock", domain="d1", name="r", mode="PR"))
        nursery.start_soon(want)
        header, _ = await a.events.receive()
        assert header["event"] == "bast" and header["blocked"] == "PR"
        await a.call("dlm-convert", handle=rep["handle"], mode="PR")
        while not got:
            await trio.sleep(0.02)
    assert got[0][0]["mode"] == "PR"


async def test_kill9_peer_survivor_gets_locks(cluster, nursery):
    a, b = await clients(nursery, cluster)
    with trio.fail_after(15):
        await b.call("dlm-lock", domain="d1", name="x", mode="EX")
        cluster[1].kill9()
        t0 = trio.current_time()
        rep, _ = await a.call("dlm-lock", domain="d1", name="x", mode="EX")
    assert rep["mode"] == "EX"
    assert trio.current_time() - t0 < 3  # within the 1.5 s idle timeout (+ slack)
    st, _ = await a.call("cluster-status")
    assert st["connected"] == [] and not st["fenced"]


async def test_client_disconnect_drops_its_locks(cluster, nursery):
    a, b = await clients(nursery, cluster)
    with trio.fail_after(15):
        await a.call("dlm-lock", domain="d1", name="y", mode="EX")
        await a.aclose()
        rep, _ = await b.call("dlm-lock", domain="d1", name="y", mode="EX")
    assert rep["mode"] == "EX"


def run_cli(*argv):
    from replfs.cli.cluster import main
    out, err = [], []
    rc = main(list(argv), out=out.append, err=err.append)
    return rc, "\n".join(out), "\n".join(err)


def test_cli_verbs(cluster, tmp_path):
    alpha = cluster[0]
    conf = str(tmp_path / "etc" / "cluster.conf")
    g = ["--node", "alpha", "--rundir", alpha.rundir, "cluster", "-C", conf]
    rc, out, _ = run_cli(*g, "status")
    assert rc == 0 and "Cluster tc: Online" in out
    rc, out, _ = run_cli(*g, "list-nodes")
    assert rc == 0 and "alpha" in out and "beta" in out
    rc, out, _ = run_cli(*g, "online", "tc")
    assert rc == 0 and "already online" in out
    rc, out, err = run_cli(*g, "online", "nosuch")
    assert rc == 10 and "not configured" in err
    rc, out, _ = run_cli(*g, "status")
    assert "Heartbeat: network (o2net keepalives) only" in out and "idle 1500 ms" in out
    import time
    deadline = time.monotonic() + 10
    while "Connected peers: 1" not in run_cli(*g, "status")[1]:
        assert time.monotonic() < deadline, "beta did not connect"
        time.sleep(0.05)
    rc, out, _ = run_cli(*g, "heartbeat")
    assert rc == 0 and "Heartbeat mode: network" in out
    assert [ln.split()[:2] for ln in out.splitlines()[2:]] == [["0", "self"], ["1", "up"]], out
    rc, out, _ = run_cli(*g, "offline", "tc")
    assert rc == 0 and "Stopping O2CB cluster tc: OK" in out
    # offline: the node table comes from cluster.conf
    rc, out, err = run_cli(*g, "list-nodes")
    assert rc == 0 and "alpha" in out and "beta" in out and "offline" in out, (out, err)
    rc, out, err = run_cli("--rundir", str(tmp_path / "no-daemon"), "cluster", "-C", conf,
                           "list-nodes")
    assert rc == 0 and "127.0.0.2" in out, (out, err)
    rc, out, _ = run_cli(*g, "check")
    assert rc == 0 and "cluster tc: 2 node(s)" in out and "idle 1500 ms" in out
    bad = tmp_path / "bad.conf"
    bad.write_text("cluster:\n\tnode_count = two\n\tname = x\n")
    rc, out, err = run_cli("cluster", "-C", str(bad), "check")
    assert rc == 10 and f"{bad}:2" in err, err
    rc, out, _ = run_cli(*g, "online-status", "tc")
    assert rc == 1 and "offline" in out
    rc, out, _ = run_cli(*g, "start")             # the only cluster in cluster.conf
    assert rc == 0 and "Starting O2CB cluster tc: OK" in out, out
    rc, out, _ = run_cli(*g, "online-status")
    assert rc == 0 and "Cluster tc online" in out
    rc, out, err = run_cli(*g, "unload")
    assert rc == 11 and "online" in err
    rc, out, _ = run_cli(*g, "stop")
    assert rc == 0 and "Stopping O2CB cluster tc: OK" in out and "Unloading" in out, out
    rc, out, _ = run_cli(*g, "-H", str(tmp_path / "hb"), "online", "tc")
    assert rc == 0 and "Starting O2CB cluster tc: OK" in out
    rc, out, _ = run_cli(*g, "status")
    assert "Heartbeat: disk region" in out
    rc, out, _ = run_cli(*g, "heartbeat")
    assert "Heartbeat mode: disk region" in out
    rc, out, _ = run_cli(*g, "force-offline")
    assert rc == 0 and "Stopping O2CB cluster tc: OK" in out
    rc, out, _ = run_cli(*g, "bogus")
    assert rc == 1
    rc, out, _ = run_cli("cluster", "--help")
    assert rc == 0 and "list-nodes" in out


def test_cli_add_remove_node(tmp_path):
    conf = str(tmp_path / "cluster.conf")
    g = ["cluster", "-C", conf]
    assert run_cli(*g, "add-node", "n0", "0", "10.0.0.1", "7777", "ocfs2")[0] == 0
    assert run_cli(*g, "add-node", "n1", "1", "10.0.0.2", "7777")[0] == 0
    from replfs.locking import cluster_conf as cc
    c = cc.load(conf)
    assert [n.name for n in c.nodes] == ["n0", "n1"] and c.clusters[0].node_count == 2
    rc, _, err = run_cli(*g, "add-node", "n2", "1", "10.0.0.3", "7777")
    assert rc != 0 and err
    assert run_cli(*g, "remove-node", "n1")[0] == 0
    assert [n.name for n in cc.load(conf).nodes] == ["n0"]


async def test_dlm_client_api(cluster, nursery):
    from replfs.locking.client import DlmClient
    from replfs.locking.dlm.modes import Mode
    from replfs.blockdev import BlockDeviceError as BDE
    async with DlmClient.connect(nursery, cluster[0].rundir) as a, \
            DlmClient.connect(nursery, cluster[1].rundir) as b:
        with trio.fail_after(15):
            while not (await a.ipc.call("cluster-status"))[0]["connected"]:
                await trio.sleep(0.05)
            await a.join("fs")
            await b.join("fs")
            basts = []

            async def on_bast(lk, blocked):
                basts.append(blocked)
                await lk.convert(Mode.NL, lvb=b"v1".ljust(len(lk.lvb), b"\0"))

            lk = await a.lock("fs", "inode-1", Mode.PR, on_bast=on_bast)
            await lk.convert(Mode.EX)
            with pytest.raises(BDE):
                await b.lock("fs", "inode-1", Mode.EX, noqueue=True)
            async with b.locked("fs", "inode-1", Mode.EX) as lb:
                assert lb.mode == Mode.EX and lb.lvb.startswith(b"v1")
            assert basts == [Mode.EX] and lk.mode == Mode.NL
            dump = await a.lockdump("fs")
            assert dump["fs"][0]["resource"] == "inode-1"


@pytest.fixture
def offline_pair(tmp_path):
    """Two daemons with cluster.conf written but the cluster not online."""
    cdir = tmp_path / "etc"
    cdir.mkdir()
    p0, p1 = free_port("127.0.0.1"), free_port("127.0.0.2")
    (cdir / "cluster.conf").write_text(cluster_conf("tc", p0, p1))
    (cdir / "o2cb").write_text(TIMEOUTS)
    nodes = []
    for name, addr in (("alpha", "127.0.0.1"), ("beta", "127.0.0.2")):
        n = Node(name, addr, str(tmp_path / name), conf=str(tmp_path / "replfs.conf"))
        n.start()
        nodes.append(n)
    try:
        yield nodes, str(cdir / "cluster.conf"), p1
    finally:
        for n in nodes:
            n.kill9()


async def test_partition_lower_node_survives_other_fences(offline_pair, nursery):
    from tests.harness.proxy import FaultProxy
    nodes, conf, beta_port = offline_pair
    proxy = await nursery.start(FaultProxy(listen=("127.0.0.3", 0),
                                           target=("127.0.0.2", beta_port)).run)
    host, port = proxy.listen_address
    a = await AsyncClient.connect(socket_path(nodes[0].rundir), nursery)
    b = await AsyncClient.connect(socket_path(nodes[1].rundir), nursery)
    await b.call("cluster-online", cluster="tc", conf=conf)
    await a.call("cluster-online", cluster="tc", conf=conf, connect_via={"beta": f"{host}:{port}"})
    with trio.fail_after(10):
        while not (await a.call("cluster-status"))[0]["connected"]:
            await trio.sleep(0.05)
    for c in (a, b):
        await c.call("dlm-join", domain="d1")
    await b.call("dlm-lock", domain="d1", name="p", mode="EX")
    proxy.partition("both")
    t0 = trio.current_time()
    with trio.fail_after(10):
        rep, _ = await a.call("dlm-lock", domain="d1", name="p", mode="EX")
    assert rep["mode"] == "EX" and trio.current_time() - t0 < 5
    with trio.fail_after(10):
        while not (await b.call("cluster-status"))[0]["fenced"]:
            await trio.sleep(0.05)
    with pytest.raises(BlockDeviceError) as e:
        await b.call("dlm-lock", domain="d1", name="q", mode="PR")
    assert e.value.errno == 1  # EPERM: fenced
    assert "FENCING" in nodes[1].log()
    st, _ = await a.call("cluster-status")
    assert not st["fenced"]


async def test_disk_heartbeat_kill9_of_lowest_node_survivor_recovers(offline_pair, nursery, tmp_path):
    """With a disk heartbeat the survivor of node 0's crash is node 1: node 0's
    slot stops changing, so it is dead rather than partitioned (no fencing)."""
    nodes, conf, _ = offline_pair
    region = str(tmp_path / "hb-region")
    a = await AsyncClient.connect(socket_path(nodes[0].rundir), nursery)
    b = await AsyncClient.connect(socket_path(nodes[1].rundir), nursery)
    for c in (a, b):
        await c.call("cluster-online", cluster="tc", conf=conf, heartbeat=region,
                     heartbeat_interval=0.25)
    with trio.fail_after(10):
        while (await b.call("cluster-status"))[0]["heartbeat"]["live"] != [0, 1]:
            await trio.sleep(0.05)
        while not (await a.call("cluster-status"))[0]["connected"]:
            await trio.sleep(0.05)
    for c in (a, b):
        await c.call("dlm-join", domain="d1")
    await a.call("dlm-lock", domain="d1", name="z", mode="EX")
    nodes[0].kill9()
    t0 = trio.current_time()
    with trio.fail_after(15):
        rep, _ = await b.call("dlm-lock", domain="d1", name="z", mode="EX")
    elapsed = trio.current_time() - t0
    # (O2CB_HEARTBEAT_THRESHOLD 3 - 1) * 2 s = 4 s dead time, plus two beats of slack
    assert rep["mode"] == "EX" and 3 < elapsed < 6, elapsed
    st, _ = await b.call("cluster-status")
    assert not st["fenced"] and st["heartbeat"]["live"] == [1]


async def test_fenced_node_stops_its_disk_heartbeat(offline_pair, nursery, tmp_path):
    """A network partition with a disk heartbeat: beta (node 1) is still
    beating, so o2quo decides and beta fences itself -- and then stops
    beating, so that its silence on the disk tells the others it stopped
    (it used to keep beating for ever)."""
    from tests.harness.proxy import FaultProxy
    nodes, conf, beta_port = offline_pair
    region = str(tmp_path / "hb-region")
    proxy = await nursery.start(FaultProxy(listen=("127.0.0.3", 0),
                                           target=("127.0.0.2", beta_port)).run)
    host, port = proxy.listen_address
    a = await AsyncClient.connect(socket_path(nodes[0].rundir), nursery)
    b = await AsyncClient.connect(socket_path(nodes[1].rundir), nursery)
    await b.call("cluster-online", cluster="tc", conf=conf, heartbeat=region,
                 heartbeat_interval=0.25)
    await a.call("cluster-online", cluster="tc", conf=conf, heartbeat=region,
                 heartbeat_interval=0.25, connect_via={"beta": f"{host}:{port}"})
    with trio.fail_after(10):
        while (await a.call("cluster-status"))[0]["heartbeat"]["live"] != [0, 1]:
            await trio.sleep(0.05)
        while not (await a.call("cluster-status"))[0]["connected"]:
            await trio.sleep(0.05)
    proxy.partition("both")
    with trio.fail_after(20):
        while not (await b.call("cluster-status"))[0]["fenced"]:
            await trio.sleep(0.1)
        while (await a.call("cluster-status"))[0]["heartbeat"]["live"] != [0]:
            await trio.sleep(0.1)
    st, _ = await a.call("cluster-status")
    assert not st["fenced"], st
    assert "disk heartbeat: stopped" in nodes[1].log()


async def test_connection_back_within_the_dead_time_is_not_trusted(offline_pair, nursery,
                                                                   tmp_path):
    """With a disk heartbeat, a cluster link that drops and comes back
    before the dead time used to leave both nodes going on, with the DLM
    messages of the gap lost (a lock request could wait for ever).  Now
    the higher-numbered node fences itself, and the lower one recovers its
    locks once its heartbeat stops: node 0 then gets a lock node 1 held."""
    from tests.harness.proxy import FaultProxy
    nodes, conf, beta_port = offline_pair
    region = str(tmp_path / "hb-region")
    proxy = await nursery.start(FaultProxy(listen=("127.0.0.3", 0),
                                           target=("127.0.0.2", beta_port)).run)
    host, port = proxy.listen_address
    a = await AsyncClient.connect(socket_path(nodes[0].rundir), nursery)
    b = await AsyncClient.connect(socket_path(nodes[1].rundir), nursery)
    await b.call("cluster-online", cluster="tc", conf=conf, heartbeat=region,
                 heartbeat_interval=0.25)
    await a.call("cluster-online", cluster="tc", conf=conf, heartbeat=region,
                 heartbeat_interval=0.25, connect_via={"beta": f"{host}:{port}"})
    with trio.fail_after(10):
        while not (await a.call("cluster-status"))[0]["connected"]:
            await trio.sleep(0.05)
    for c in (a, b):
        await c.call("dlm-join", domain="d1")
    await b.call("dlm-lock", domain="d1", name="held", mode="EX")
    proxy.partition("both")
    with trio.fail_after(10):
        while (await a.call("cluster-status"))[0]["connected"]:
            await trio.sleep(0.05)
    proxy.heal()                      # back well within the 4 s dead time
    with trio.fail_after(30):
        while not (await b.call("cluster-status"))[0]["fenced"]:
            await trio.sleep(0.1)
        rep, _ = await a.call("dlm-lock", domain="d1", name="held", mode="EX")
    assert rep["mode"] == "EX"
    st, _ = await a.call("cluster-status")
    assert not st["fenced"], st


def test_dlmfs_from_shell(cluster, tmp_path):
    import errno
    import subprocess
    a, b = cluster
    mnts = []
    try:
        for n in cluster:
            mnt = str(tmp_path / f"dlm-{n.name}")
            rc, out, err = run_cli("--rundir", n.rundir, "cluster", "dlmfs", mnt)
            assert rc == 0, err
            mnts.append(mnt)
        ma, mb = mnts
        script = f"""
set -e
mkdir {ma}/dom
mkdir {mb}/dom
exec 3<>{ma}/dom/lk
echo -n 42 >&3
if (exec 4<>{mb}/dom/lk) 2>/dev/null; then echo "unexpected"; fi
exec 3>&-
exec 4<{mb}/dom/lk
cat <&4; echo
exec 4<&-
ls {ma}/dom
"""
        # the middle open must fail fast: use O_NONBLOCK via python for the trylock
        cp = subprocess.run(["bash", "-c", script.replace(
            f"if (exec 4<>{mb}/dom/lk) 2>/dev/null; then echo \"unexpected\"; fi",
            f"python3 -c \"import os,errno\ntry:\n os.open('{mb}/dom/lk', os.O_RDWR|os.O_NONBLOCK)\n"
            f" print('unexpected')\nexcept OSError as e:\n print(errno.errorcode[e.errno])\"")],
            capture_output=True, text=True, timeout=30)
        assert cp.returncode == 0, cp.stderr
        assert cp.stdout.split() == ["ETXTBSY", "42", "lk"], cp.stdout
        # ocfs2_dlmfs semantics: locks are per node (two exclusive opens on
        # one node both succeed) and a write longer than the 64-byte LVB
        # writes its first 64 bytes
        import os
        f1 = os.open(f"{ma}/dom/lk2", os.O_RDWR)
        f2 = os.open(f"{ma}/dom/lk2", os.O_RDWR | os.O_NONBLOCK)
        assert os.write(f2, b"x" * 100) == 64
        assert os.pread(f1, 200, 0) == b"x" * 64
        os.close(f1)
        with pytest.raises(OSError) as e:      # beta still cannot have it
            os.open(f"{mb}/dom/lk2", os.O_RDONLY | os.O_NONBLOCK)
        assert e.value.errno == errno.ETXTBSY
        os.close(f2)
        fb = os.open(f"{mb}/dom/lk2", os.O_RDONLY)    # the last close let it go
        assert os.read(fb, 100) == b"x" * 64
        os.close(fb)
    finally:
        for m in mnts:
            subprocess.run(["umount", "-l", m], capture_output=True)


def _dlmfs_lock_file(node, tmp_path):
    """dlmfs mounted on ``node``, a lock file opened read-write (EX) with
    a value written: (mount point, fd)."""
    import os
    mnt = str(tmp_path / f"dlm-{node.name}")
    rc, out, err = run_cli("--rundir", node.rundir, "cluster", "dlmfs", mnt)
    assert rc == 0, err
    os.mkdir(f"{mnt}/dom")
    fd = os.open(f"{mnt}/dom/lk", os.O_RDWR | os.O_CREAT, 0o600)
    os.write(fd, b"7")
    assert os.pread(fd, 10, 0) == b"7"
    return mnt, fd


def _void(fd) -> None:
    """A lock file whose lock is void: reads, writes and close fail (EIO)."""
    import errno
    import os
    for call in (lambda: os.pread(fd, 10, 0), lambda: os.write(fd, b"8")):
        with pytest.raises(OSError) as e:
            call()
        assert e.value.errno == errno.EIO
    with pytest.raises(OSError) as e:
        os.close(fd)
    assert e.value.errno == errno.EIO


async def test_dlmfs_holders_are_told_when_the_node_is_fenced(offline_pair, nursery, tmp_path):
    """An open dlmfs lock file on a node that gets fenced: its lock is gone
    (the survivor may hold it EX now), so reads, writes and close fail
    instead of going on as if nothing happened."""
    import subprocess
    from tests.harness.proxy import FaultProxy
    nodes, conf, beta_port = offline_pair
    proxy = await nursery.start(FaultProxy(listen=("127.0.0.3", 0),
                                           target=("127.0.0.2", beta_port)).run)
    host, port = proxy.listen_address
    a = await AsyncClient.connect(socket_path(nodes[0].rundir), nursery)
    b = await AsyncClient.connect(socket_path(nodes[1].rundir), nursery)
    await b.call("cluster-online", cluster="tc", conf=conf)
    await a.call("cluster-online", cluster="tc", conf=conf, connect_via={"beta": f"{host}:{port}"})
    with trio.fail_after(10):
        while not (await a.call("cluster-status"))[0]["connected"]:
            await trio.sleep(0.05)
    mnt, fd = await trio.to_thread.run_sync(_dlmfs_lock_file, nodes[1], tmp_path)
    try:
        proxy.partition("both")
        with trio.fail_after(10):
            while not (await b.call("cluster-status"))[0]["fenced"]:
                await trio.sleep(0.05)
        await trio.sleep(0.5)
        await trio.to_thread.run_sync(_void, fd)
    finally:
        subprocess.run(["umount", "-l", mnt], capture_output=True)


def test_dlmfs_holders_are_told_when_replfsd_dies(cluster, tmp_path):
    import subprocess
    a, b = cluster
    mnt, fd = _dlmfs_lock_file(b, tmp_path)
    try:
        b.kill9()
        import time
        time.sleep(0.5)
        _void(fd)
    finally:
        subprocess.run(["umount", "-l", mnt], capture_output=True)


async def test_cancelled_lock_wait_leaves_the_queue_at_once(cluster, nursery):
    """A lock request cancelled on the client side (a FUSE request
    interrupted by a signal, a timeout) is withdrawn from the daemon's
    queue at once: once the holder unlocks, another client gets the lock,
    while the cancelled client stays connected (it used to be granted to
    nobody until that client disconnected)."""
    a, b = await clients(nursery, cluster)
    with trio.fail_after(15):
        rep, _ = await a.call("dlm-lock", domain="d1", name="c", mode="EX")
        with trio.move_on_after(0.5) as waited:
            await b.call("dlm-lock", domain="d1", name="c", mode="EX")
        assert waited.cancelled_caught
        await trio.sleep(0.3)
        await a.call("dlm-unlock", handle=rep["handle"])
        rep2, _ = await a.call("dlm-lock", domain="d1", name="c", mode="EX", noqueue=True)
    assert rep2["mode"] == "EX"
    assert not b._closed


async def test_waiting_client_disconnect_does_not_leak_lock(cluster, nursery):
    a, b = await clients(nursery, cluster)
    b2 = await AsyncClient.connect(socket_path(cluster[1].rundir), nursery)
    with trio.fail_after(15):
        rep, _ = await a.call("dlm-lock", domain="d1", name="w", mode="EX")
        async def doomed():
            with pytest.raises(BlockDeviceError):
                await b2.call("dlm-lock", domain="d1", name="w", mode="EX")
        nursery.start_soon(doomed)
        await trio.sleep(0.3)  # b2's request is queued behind a's EX
        await b2.aclose()
        await trio.sleep(0.3)
        await a.call("dlm-unlock", handle=rep["handle"])
        # the abandoned request must not keep the lock: b gets it
        rep2, _ = await b.call("dlm-lock", domain="d1", name="w", mode="EX", timeout=5)
    assert rep2["mode"] == "EX"


def test_cluster_verbs_through_replfsadm(cluster, tmp_path):
    """`replfsadm [-c F --node N --rundir D] cluster -C FILE VERB` reaches the
    cluster verbs with their own options (global options come first)."""
    conf = str(tmp_path / "etc" / "cluster.conf")
    a = cluster[0]
    st = a.adm("cluster", "-C", conf, "status")
    assert "Cluster tc: Online" in st.stdout
    assert "Node: alpha (number 0)" in st.stdout
    nodes = a.adm("cluster", "-C", conf, "list-nodes").stdout.splitlines()
    assert [ln.split()[1] for ln in nodes[1:]] == ["alpha", "beta"]
    bad = a.adm("cluster", "-C", conf, "no-such-verb", check=False)
    assert bad.returncode != 0 and "no-such-verb" in bad.stderr
    helped = a.adm("cluster", "--help")
    assert helped.returncode == 0 and "USAGE: replfsadm" in helped.stdout


def test_clean_offline_of_node_0_fences_nobody(cluster):
    """Node 0 goes offline cleanly (no locks held): node 1 must not fence
    itself (without the leave message it could not tell that from node 0
    being cut off, and o2quo's two-node rule fences node 1 then)."""
    import time
    alpha, beta = cluster
    with SyncClient(socket_path(alpha.rundir), timeout=10) as c:
        deadline = time.monotonic() + 10
        while not c.call("cluster-status")[0]["connected"]:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        c.call("cluster-offline", cluster="tc")
    time.sleep(1.5 + 2.0)       # past the idle timeout and the survivor's grace
    with SyncClient(socket_path(beta.rundir), timeout=10) as c:
        st = c.call("cluster-status")[0]
    assert st["online"] and st["fenced"] is None, st
    assert st["connected"] == [], st
    assert "left the cluster" in beta.log()


def test_cluster_load_starts_replfsd_if_needed(tmp_path):
    """o2cb's load brings the stack up; here the stack lives in replfsd, so
    `replfsadm cluster load` starts this node's replfsd when none runs."""
    rundir = str(tmp_path / "run")
    cdir = tmp_path / "etc"
    cdir.mkdir()
    (cdir / "cluster.conf").write_text(cluster_conf("tc", free_port("127.0.0.1"),
                                                    free_port("127.0.0.2")))
    rc, out, err = run_cli("--node", "alpha", "--rundir", rundir, "cluster", "-C",
                           str(cdir / "cluster.conf"), "load")
    try:
        assert rc == 0 and "Loading replfs cluster stack: OK" in out, (out, err)
        with SyncClient(socket_path(rundir), timeout=10) as c:
            assert c.call("ping")[0]["ok"]
    finally:
        try:
            with SyncClient(socket_path(rundir), timeout=10) as c:
                c.call("shutdown")
        except Exception:
            pass
