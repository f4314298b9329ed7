"""Both nodes mount one volume (issue 7): real replfsd daemons (alpha on
127.0.0.1, beta on 127.0.0.2), real cluster stack over o2net, a dual-
primary protocol C resource, real FUSE mounts through mount(8).

What a user does and sees: both mounts at once with their own slots;
what one node's call changed is what the other node's next call sees
(data, names, sizes, a file kept open); one node's daemon killed -9 --
the other is told by the cluster stack, fences the peer through
replfs-fence-peer, replays the dead slot's journal and goes on with
everything the dead node had fsync'd; fsck clean at the end.
"""
from __future__ import annotations

import contextlib
import errno
import os
import struct
import time

import pytest

from replfs.ipc.client import SyncClient, socket_path
from tests import soak
from replfs.localpair import LocalPair, cluster_conf, free_port

from .test_fs_mount import ENV, VENV_BIN, force_unmount, fuse_usable, mounted, run

pytestmark = [pytest.mark.fuse,
              pytest.mark.skipif(not fuse_usable(), reason="needs /dev/fuse and root")]

# o2cb timeouts short enough for a test: a silent node is dead after 1.5 s
TIMEOUTS = ("O2CB_HEARTBEAT_THRESHOLD=3\nO2CB_IDLE_TIMEOUT_MS=1500\n"
            "O2CB_KEEPALIVE_DELAY_MS=300\nO2CB_RECONNECT_DELAY_MS=200\n")
FENCING = f"""	disk {{ fencing resource-and-stonith; }}
	handlers {{ fence-peer "{VENV_BIN}/replfs-fence-peer"; }}"""


def call(node, op, **args):
    with SyncClient(socket_path(node.rundir), timeout=30) as c:
        return c.call(op, **args)[0]


def online(pair, cdir, via=None) -> None:
    """Both nodes' cluster stacks online; ``via``: {node name: "host:port"}
    for alpha to reach a node through (a fault proxy)."""
    for n in pair.nodes:
        extra = {"connect_via": via} if via and n is pair.alpha else {}
        call(n, "cluster-online", cluster="tc", conf=os.path.join(cdir, "cluster.conf"),
             **extra)
    deadline = time.monotonic() + 15
    while not all(call(n, "cluster-status")["connected"] for n in pair.nodes):
        assert time.monotonic() < deadline, "the cluster nodes did not connect"
        time.sleep(0.05)


def opts(n) -> str:
    return f"conf={n.conf},node={n.name},rundir={n.rundir}"


def wait_closed(node, timeout=20.0) -> None:
    deadline = time.monotonic() + timeout
    while node.status()["open_count"]:
        assert time.monotonic() < deadline, f"{node.name}: the mount did not close r0"
        time.sleep(0.05)


@contextlib.contextmanager
def shared_pair(tmp_path, *, extra_res: str = "", cluster: bool = True, slots: int = 2,
                proxy_port: int | None = None, before_up=None, netns=None,
                cluster_extra: str = ""):
    """Two nodes, r0 Primary on both (allow-two-primaries; the seed's r1
    has no fencing options: the default ``extra_res``), a volume made on
    alpha; the cluster stack online on both unless ``cluster`` is False.
    ``netns``: a tests.harness.netns.NetnsPair whose namespaces the two
    replfsd run in, talking over its veth addresses.
    ``cluster_extra``: lines for cluster.conf's cluster stanza.
    Yields (pair, alpha's mount dir, beta's mount dir, cdir)."""
    if netns is None:
        pair = LocalPair(tmp_path, extra_net="allow-two-primaries;", extra_res=extra_res,
                         proxy_port=proxy_port)
        pair.cluster_ports = (free_port("127.0.0.1"), free_port("127.0.0.2"))
        addrs = ("127.0.0.1", "127.0.0.2")
    else:
        addrs = netns.addrs
        pair = LocalPair(tmp_path, extra_net="allow-two-primaries;", extra_res=extra_res,
                         addrs=addrs, launchers=netns.launchers)
        pair.cluster_ports = (netns.O2NET_PORT, netns.O2NET_PORT)   # a namespace each
    cdir = str(tmp_path / "etc")
    os.makedirs(cdir)
    with open(os.path.join(cdir, "cluster.conf"), "w") as f:
        text = cluster_conf("tc", *pair.cluster_ports, addrs=addrs)
        f.write(text.replace("\tname = tc\n", "\tname = tc\n" + cluster_extra, 1))
    with open(os.path.join(cdir, "o2cb"), "w") as f:
        f.write(TIMEOUTS)
    ma, mb = tmp_path / "ma", tmp_path / "mb"
    ma.mkdir()
    mb.mkdir()
    try:
        if before_up is not None:
            before_up(pair)
        pair.up_fresh()
        if cluster:
            online(pair, cdir)
        run(os.path.join(VENV_BIN, "mkfs.replfs"), "-q", "-N", str(slots), "-c",
            pair.alpha.conf, "--rundir", pair.alpha.rundir, "r0",
            env=dict(ENV, REPLFS_NODE="alpha"))
        pair.beta.adm("primary", "r0")
        yield pair, ma, mb, cdir
    finally:
        force_unmount(ma)
        force_unmount(mb)
        pair.teardown()


def mount(node, mnt, check=True):
    return run("mount", "-t", "fuse.replfs", "r0", mnt, "-o", opts(node), check=check)


def wait_log(node, text: str, timeout: float = 30.0) -> str:
    """Wait until ``text`` is in the node's daemon log; returns the log."""
    deadline = time.monotonic() + timeout
    while text not in (log := node.log()):
        assert time.monotonic() < deadline, f"{node.name}: no {text!r}\n{log[-3000:]}"
        time.sleep(0.1)
    return log


def no_concurrent_writes(pair) -> None:
    """The mirror saw no overlapping writes from the two Primaries: the
    filesystem's locks kept them apart (any one is a locking bug)."""
    for n in pair.nodes:
        st = n.status()
        assert st["concurrent_writes"] == 0, (n.name, st["concurrent_writes"])


def fsck_clean(node) -> None:
    cp = run(os.path.join(VENV_BIN, "fsck.replfs"), "-n", "r0", check=False,
             env=dict(ENV, REPLFS_CONF=node.conf, REPLFS_NODE=node.name,
                      REPLFS_RUNDIR=node.rundir))
    assert cp.returncode == 0, cp.stdout + cp.stderr


def test_both_nodes_mount_and_see_each_others_changes(tmp_path):
    with shared_pair(tmp_path) as (pair, ma, mb, _):
        a, b = pair.alpha, pair.beta
        mount(a, ma)
        mount(b, mb)
        slots = {call(n, "mounts")["mounts"][0]["slot"] for n in pair.nodes}
        assert slots == {0, 1}
        assert all(call(n, "mounts")["mounts"][0]["shared"] for n in pair.nodes)
        # mounted.ocfs2 -f's view: both nodes, by their cluster names
        shown = b.adm("mounted", "-f", "r0").stdout
        assert "alpha (slot " in shown and "beta (slot " in shown, shown
        shown = a.adm("overview").stdout
        assert "Primary/Primary" in shown and "slots: " in shown, shown
        assert "alpha (slot " in shown and "beta (slot " in shown, shown

        # alpha writes, beta reads at once; beta renames, alpha sees it
        (ma / "hello").write_text("from alpha\n")
        assert (mb / "hello").read_text() == "from alpha\n"
        os.rename(mb / "hello", mb / "hello2")
        assert sorted(os.listdir(ma)) == ["hello2", "lost+found"]
        assert not (ma / "hello").exists()

        # a file kept open on beta reads what alpha appends and truncates
        with open(mb / "hello2", "rb") as kept:
            assert kept.read() == b"from alpha\n"
            with open(ma / "hello2", "ab") as f:
                f.write(b"more from alpha\n")
            kept.seek(0)
            assert kept.read() == b"from alpha\nmore from alpha\n"
            os.truncate(ma / "hello2", 4)
            kept.seek(0)
            assert kept.read() == b"from"
            assert os.fstat(kept.fileno()).st_size == 4

        # sizes, modes and link counts follow at once
        os.mkdir(mb / "d")
        os.chmod(ma / "d", 0o700)
        assert os.stat(mb / "d").st_mode & 0o777 == 0o700
        os.link(ma / "hello2", ma / "d" / "link")
        assert os.stat(mb / "hello2").st_nlink == 2
        data = os.urandom(300_000)
        (mb / "d" / "big").write_bytes(data)
        assert (ma / "d" / "big").read_bytes() == data

        # unlinked on alpha while beta's kernel only knows it (an O_PATH
        # descriptor: a lookup reference, no open): beta still sees the
        # inode, with no link left, rather than ESTALE
        from tests.integration.test_fs_handles import drop_caches
        (ma / "known").write_bytes(b"k")
        opath = os.open(mb / "known", os.O_PATH)
        try:
            os.unlink(ma / "known")
            drop_caches()       # alpha's kernel forgets it: only beta knows it now
            time.sleep(0.5)
            assert os.fstat(opath).st_nlink == 0
        finally:
            os.close(opath)
        drop_caches()           # beta forgets it too: the last user frees it
        time.sleep(0.5)

        # unlinked on alpha while open on beta: beta keeps its bytes
        with open(mb / "d" / "big", "rb") as kept:
            os.unlink(ma / "d" / "big")
            assert not (mb / "d" / "big").exists()
            assert kept.read() == data

        # two nodes append to one log through descriptors kept open: every
        # record lands, none overwrites another (the kernel's cached size
        # is not used for O_APPEND on a shared mount)
        fa = os.open(ma / "log", os.O_CREAT | os.O_RDWR | os.O_APPEND, 0o644)
        fb = os.open(mb / "log", os.O_CREAT | os.O_RDWR | os.O_APPEND, 0o644)
        want = []
        for i in range(12):
            for fd, who in ((fa, "a"), (fb, "b")):
                # whole pages: a write-through page the kernel put at its
                # stale idea of the end would stay cached as up to date
                rec = f"{who}{i:03d}\n".encode().ljust(4096, b".")
                assert os.write(fd, rec) == len(rec)
                want.append(rec)
        # read back through the appenders' own descriptors: no page-cache
        # copy written at the kernel's idea of the end
        for fd in (fa, fb):
            got = os.pread(fd, 1 << 17, 0)
            assert [got[i:i + 4] for i in range(0, len(got), 4096)] == \
                [r[:4] for r in want], ("fa" if fd == fa else "fb")
        os.close(fa)
        os.close(fb)
        assert (mb / "log").read_bytes() == b"".join(want)

        # file capabilities set on beta go when alpha writes the file, though
        # alpha's kernel saw it without them (and stopped checking): the
        # filesystem drops them itself on every write
        caps = struct.pack("<5I", 0x02000001, 1 << 10, 0, 0, 0)
        with open(ma / "capfile", "wb") as f:
            f.write(b"one")
            f.flush()
            os.setxattr(mb / "capfile", "security.capability", caps)
            assert os.getxattr(ma / "capfile", "security.capability") == caps
            f.write(b"two")
            f.flush()
        for m in (ma, mb):
            with pytest.raises(OSError) as e:
                os.getxattr(m / "capfile", "security.capability")
            assert e.value.errno == errno.ENODATA

        # beta remounts read-only (its slot given back, journal clean) and
        # still reads what alpha changes; then read-write again
        run("mount", "-o", "remount,ro", mb)
        with pytest.raises(OSError) as e:
            (mb / "ro-write").write_bytes(b"no")
        assert e.value.errno == 30          # EROFS
        (ma / "while-ro").write_bytes(b"alpha wrote this")
        assert (mb / "while-ro").read_bytes() == b"alpha wrote this"
        run("mount", "-o", "remount,rw", mb)
        (mb / "after-rw").write_bytes(b"beta again")
        assert (ma / "after-rw").read_bytes() == b"beta again"

        # the same name created on both nodes at once: one file
        for i in range(20):
            fa = os.open(ma / f"same{i}", os.O_CREAT | os.O_WRONLY, 0o644)
            fb = os.open(mb / f"same{i}", os.O_CREAT | os.O_WRONLY, 0o644)
            os.close(fa)
            os.close(fb)
        assert len([n for n in os.listdir(ma) if n.startswith("same")]) == 20
        assert os.stat(ma / "same7").st_ino == os.stat(mb / "same7").st_ino

        no_concurrent_writes(pair)
        run("umount", ma)
        run("umount", mb)
        wait_closed(a)
        wait_closed(b)
        fsck_clean(a)


class PathWorker:
    """One writer of a two-node workload on real mounts: every step runs
    through one of the two mount points picked at random, on names only
    this worker uses; ``live`` is what its own calls returned, so the tree
    both mounts must show at the end is the union of the workers'."""

    def __init__(self, wid: int, seed: int, roots):
        import random
        self.wid, self.rng, self.roots = wid, random.Random(seed), roots
        self.live: dict[str, tuple[str, bytes]] = {}
        self.n = 0
        self.error = None

    def run(self, steps: int) -> None:
        try:
            self._run(steps)
        except BaseException as e:      # noqa: BLE001  (reported by the test)
            self.error = e

    def _run(self, steps: int) -> None:
        rng, mine = self.rng, f"p{self.wid}"
        for _ in range(steps):
            root = rng.choice(self.roots)
            r = rng.random()
            if r < 0.35 or not self.live:
                self.n += 1
                name = f"w{self.wid}-{self.n}"
                where = rng.choice([mine, "s1", "s2"])
                data = rng.randbytes(rng.choice([0, 300, 5000, 40000]))
                (root / where / name).write_bytes(data)
                self.live[name] = (where, data)
                continue
            name = rng.choice(sorted(self.live))
            where, data = self.live[name]
            if r < 0.5:
                extra = rng.randbytes(rng.choice([10, 4096, 9000]))
                with open(root / where / name, "ab") as f:
                    f.write(extra)
                self.live[name] = (where, data + extra)
            elif r < 0.6:
                os.unlink(root / where / name)
                del self.live[name]
            elif r < 0.75:
                to = rng.choice([mine, "s1", "s2"])
                os.rename(root / where / name, root / to / name)
                self.live[name] = (to, data)
            elif r < 0.85:
                os.chmod(root / where / name, rng.choice([0o600, 0o644, 0o640]))
            else:
                got = (root / where / name).read_bytes()
                assert got == data, (self.wid, name, len(got), len(data))


def test_both_nodes_run_a_workload_in_shared_and_private_directories(tmp_path):
    two_node_workload(tmp_path, 1000, 60)


@pytest.mark.soak(twin="test_both_nodes_run_a_workload_in_shared_and_private_directories")
@pytest.mark.parametrize("seed", soak.seeds(range(2000, 2010)))
def test_two_node_workload_soak(tmp_path, seed):
    two_node_workload(tmp_path, seed * 10, soak.size(600, 30))


def two_node_workload(tmp_path, seed: int, steps: int) -> None:
    """Workers on both mounts at once create, append, rename, unlink, chmod
    and read in two shared directories and their own; every call is
    checked against the worker's model as it returns, and at the end
    both mounts show exactly the union of the models, byte for byte."""
    import threading
    with shared_pair(tmp_path) as (pair, ma, mb, _):
        a, b = pair.alpha, pair.beta
        mount(a, ma)
        mount(b, mb)
        workers = [PathWorker(i, seed + i, [ma, mb]) for i in range(4)]
        for d in ["s1", "s2"] + [f"p{w.wid}" for w in workers]:
            os.mkdir(ma / d)
        threads = [threading.Thread(target=w.run, args=(steps,)) for w in workers]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        for w in workers:
            assert w.error is None, repr(w.error)
        want = {}
        for w in workers:
            for name, (where, data) in w.live.items():
                want[f"{where}/{name}"] = data
        for root in (ma, mb):
            have = {}
            for d in ["s1", "s2"] + [f"p{w.wid}" for w in workers]:
                for name in os.listdir(root / d):
                    have[f"{d}/{name}"] = (root / d / name).read_bytes()
            assert sorted(have) == sorted(want), (root, sorted(set(have) ^ set(want)))
            for k, data in want.items():
                assert have[k] == data, (root, k)
        no_concurrent_writes(pair)
        run("umount", ma)
        run("umount", mb)
        wait_closed(a)
        wait_closed(b)
        fsck_clean(a)


def test_read_after_write_across_nodes_is_never_stale(tmp_path):
    read_after_write(tmp_path, 200)


@pytest.mark.soak(twin="test_read_after_write_across_nodes_is_never_stale")
def test_read_after_write_soak(tmp_path):
    read_after_write(tmp_path, soak.size(5000, 100))


def read_after_write(tmp_path, rounds: int) -> None:
    """Alternating rounds: a change through one node, then a read of it
    through the other -- file contents at one offset, sizes, a directory
    entry that moves, a mode.  Zero stale results."""
    with shared_pair(tmp_path) as (pair, ma, mb, _):
        a, b = pair.alpha, pair.beta
        mount(a, ma)
        mount(b, mb)
        (ma / "f").write_bytes(b"")
        fa = os.open(ma / "f", os.O_RDWR)
        fb = os.open(mb / "f", os.O_RDWR)
        try:
            for i in range(rounds):
                w, r = (fa, fb) if i % 2 == 0 else (fb, fa)
                rec = f"{i:08d}".encode()
                os.pwrite(w, rec, (i % 7) * 4096)
                assert os.pread(r, 8, (i % 7) * 4096) == rec, i
                assert os.fstat(r).st_size == max(os.fstat(w).st_size, (i % 7) * 4096 + 8)
        finally:
            os.close(fa)
            os.close(fb)
        # a read-only mapping on one node follows the other node's writes
        # (the kernel's pages are dropped when the lock goes over; a page
        # fault does not ask for attributes, so only that makes it fresh)
        import mmap
        (ma / "mapped").write_bytes(b"\0" * 8192)
        with open(mb / "mapped", "rb") as f:
            m = mmap.mmap(f.fileno(), 8192, prot=mmap.PROT_READ)
            try:
                for i in range(50):
                    rec = f"{i:08d}".encode()
                    with open(ma / "mapped", "r+b") as g:
                        g.seek((i % 2) * 4096)
                        g.write(rec)
                    assert m[(i % 2) * 4096:(i % 2) * 4096 + 8] == rec, i
            finally:
                m.close()
        name = "moving-0"
        (ma / name).write_bytes(b"x")
        for i in range(rounds // 2):
            src, dst = (ma, mb) if i % 2 == 0 else (mb, ma)
            new = f"moving-{i + 1}"
            os.rename(src / name, src / new)
            assert not (dst / name).exists(), i
            assert (dst / new).read_bytes() == b"x", i
            mode = 0o600 if i % 3 else 0o644
            os.chmod(dst / new, mode)
            assert os.stat(src / new).st_mode & 0o777 == mode, i
            name = new
        no_concurrent_writes(pair)
        run("umount", ma)
        run("umount", mb)
        wait_closed(a)
        wait_closed(b)
        fsck_clean(a)


@pytest.mark.parametrize("seed", [3])
def test_fsx_alternating_through_both_mounts(tmp_path, seed):
    dual_fsx(tmp_path, seed, 800)


@pytest.mark.soak(twin="test_fsx_alternating_through_both_mounts")
@pytest.mark.parametrize("seed", soak.seeds(range(300, 310)))
def test_fsx_alternating_soak(tmp_path, seed):
    dual_fsx(tmp_path, seed, soak.size(8000, 300))


def dual_fsx(tmp_path, seed: int, nops: int) -> None:
    """fsx's operations (writes past the end, reads, truncates up and down,
    mmap reads and msync'd mmap writes, fsync, reopen, stat) on one file,
    each through a mount picked at random, against one byte model."""
    import random
    from tests.integration.test_fs_fsx import Fsx

    class DualFsx(Fsx):
        def __init__(self, mounts, seed, log):
            super().__init__("", str(mounts[0]), seed, log)
            self.paths = [os.path.join(str(m), "fsx.dat") for m in mounts]
            self.fds = [self.fd, os.open(self.paths[1], os.O_RDWR)]
            self.pick = random.Random(seed + 1)

        def run(self, nops, remounts=0):
            ops = ([self.op_write] * 6 + [self.op_read] * 5 + [self.op_truncate] * 2
                   + [self.op_mapread, self.op_mapwrite, self.op_fsync, self.op_reopen,
                      self.op_stat])
            for _ in range(nops):
                i = self.pick.randrange(2)
                self.fd, self.path = self.fds[i], self.paths[i]
                self.note(f"on node {'ab'[i]}:")
                self.rng.choice(ops)()
                self.fds[i] = self.fd           # (reopen replaces it)
            for i in range(2):
                self.fd = self.fds[i]
                self.verify_all()
            for fd in self.fds:
                os.close(fd)

    with shared_pair(tmp_path) as (pair, ma, mb, _):
        a, b = pair.alpha, pair.beta
        mount(a, ma)
        mount(b, mb)
        DualFsx([ma, mb], seed, []).run(nops)
        no_concurrent_writes(pair)
        run("umount", ma)
        run("umount", mb)
        wait_closed(a)
        wait_closed(b)
        fsck_clean(a)


@pytest.mark.parametrize("fencing", ["handler", "implied"])
def test_node_dies_and_the_survivor_recovers_its_slot(tmp_path, fencing):
    # "handler": fencing resource-and-stonith with the replfs-fence-peer
    # command; "implied": no fencing options (as in the seed): the shared
    # mount fences through the cluster stack in process
    with shared_pair(tmp_path, extra_res=FENCING if fencing == "handler" else "") as \
            (pair, ma, mb, _):
        a, b = pair.alpha, pair.beta
        mount(a, ma)
        mount(b, mb)
        # beta makes files durable (fsync), and leaves one change only in
        # its journal's running transaction (not fsync'd: may be lost)
        synced = {}
        for i in range(8):
            data = os.urandom(5000 + 1000 * i)
            fd = os.open(mb / f"b{i}", os.O_CREAT | os.O_WRONLY, 0o644)
            os.write(fd, data)
            os.fsync(fd)
            os.close(fd)
            synced[f"b{i}"] = data
        (ma / "a0").write_bytes(b"alpha before")
        t0 = time.monotonic()
        b.kill9()                       # beta's replfsd (and both its mounts) die
        force_unmount(mb)
        # alpha goes on: the fence-peer handler waits for the cluster stack
        # to declare beta dead, I/O resumes, beta's slot is recovered
        (ma / "a1").write_bytes(b"alpha after")
        stall = time.monotonic() - t0
        for name, data in synced.items():
            assert (ma / name).read_bytes() == data, name
        assert (ma / "a0").read_bytes() == b"alpha before"
        # (a change that needed only locks alpha had cached may have gone
        # on before the recovery's last step, which runs in its own task)
        log = wait_log(a, "recovered the slot(s) 1 of dead node 1")
        assert ("fence-peer helper returned 7" in log
                and ("replfs-fence-peer" in log) == (fencing == "handler")), log[-3000:]
        st = a.status()
        assert st["role"] == "Primary" and not st["io_suspended"], st
        print(f"alpha's stall after beta's death: {stall:.2f} s")
        run("umount", ma)
        wait_closed(a)
        fsck_clean(a)


@pytest.mark.parametrize("seed", [5])
def test_node_death_under_load(tmp_path, seed):
    node_death_under_load(tmp_path, seed)


@pytest.mark.soak(twin="test_node_death_under_load")
@pytest.mark.parametrize("seed", soak.seeds(range(100, 120)))
def test_node_death_under_load_soak(tmp_path, seed):
    node_death_under_load(tmp_path, seed)


def node_death_under_load(tmp_path, seed: int) -> None:
    """Workers on both nodes (alpha's only through alpha's mount), beta
    also fsync'ing a log; beta's daemon is killed -9 at a seeded moment.
    alpha's workers go on without an error and their files are exactly
    as their models say; every record beta's fsync acknowledged is on
    alpha; fsck clean."""
    import random
    import threading
    rng = random.Random(seed)
    with shared_pair(tmp_path) as (pair, ma, mb, _):
        a, b = pair.alpha, pair.beta
        mount(a, ma)
        mount(b, mb)
        on_a = [PathWorker(i, seed * 10 + i, [ma]) for i in range(2)]
        on_b = [PathWorker(i, seed * 10 + i, [mb]) for i in range(2, 4)]
        for d in ["s1", "s2"] + [f"p{w.wid}" for w in on_a + on_b]:
            os.mkdir(ma / d)
        acked = []

        def logger():
            try:
                fd = os.open(mb / "beta-log", os.O_CREAT | os.O_WRONLY | os.O_APPEND, 0o644)
                i = 0
                while True:
                    rec = f"{i:08d}\n".encode()
                    os.write(fd, rec)
                    os.fsync(fd)
                    acked.append(rec)
                    i += 1
            except OSError:
                pass
        threads = [threading.Thread(target=w.run, args=(80,), daemon=True)
                   for w in on_a + on_b]
        threads.append(threading.Thread(target=logger, daemon=True))
        for t in threads:
            t.start()
        time.sleep(rng.uniform(0.3, 2.0))
        b.kill9()
        for t in threads[:len(on_a)]:
            t.join(300)
        for w in on_a:
            assert w.error is None, repr(w.error)
        force_unmount(mb)
        got = (ma / "beta-log").read_bytes()
        assert got.startswith(b"".join(acked)), (len(got), len(acked))
        for w in on_a:
            for name, (where, data) in w.live.items():
                assert (ma / where / name).read_bytes() == data, (w.wid, name)
            for d in ["s1", "s2", f"p{w.wid}"]:
                have = {n for n in os.listdir(ma / d) if n.startswith(f"w{w.wid}-")}
                want = {n for n, (wh, _) in w.live.items() if wh == d}
                assert have == want, (d, w.wid, sorted(have ^ want))
        run("umount", ma)
        wait_closed(a)
        fsck_clean(a)


def test_replication_link_cut_one_arbiter(tmp_path):
    """Only the replication link breaks; both nodes stay up and in the
    cluster.  Both lose their peer and run fence-peer; the cluster stack
    decides for both: beta (the higher node number) fences itself -- its
    mount stops writing and answers EIO, its disk is Outdated -- and alpha
    goes on once beta has left the cluster, after recovering beta's slot.
    Never both writing.  When the link heals beta resyncs from alpha
    without a split brain and mounts again."""
    from tests.harness.proxy import spawn_proxy
    pport = free_port("127.0.0.3")
    proxy = []

    def start_proxy(pair):
        proxy.extend(spawn_proxy(f"127.0.0.3:{pport}", f"127.0.0.2:{pair.port}",
                                 str(tmp_path / "proxy.sock"))[:2])

    with shared_pair(tmp_path, proxy_port=pport, before_up=start_proxy) as (pair, ma, mb, cdir):
        a, b = pair.alpha, pair.beta
        proc, ctl = proxy
        try:
            a.wait(lambda s: s["cstate"] == "Connected", what="connected through the proxy")
            mount(a, ma)
            mount(b, mb)
            synced = os.urandom(20000)
            fd = os.open(mb / "from-beta", os.O_CREAT | os.O_WRONLY, 0o644)
            os.write(fd, synced)
            os.fsync(fd)
            os.close(fd)
            ctl.cut(refuse=True)            # the replication link only
            (ma / "alpha-after").write_bytes(b"alpha goes on")
            assert (ma / "from-beta").read_bytes() == synced
            # beta lost: fenced by its own cluster stack, its mount stopped
            deadline = time.monotonic() + 30
            while not call(b, "cluster-status").get("fenced"):
                assert time.monotonic() < deadline, "beta was not fenced"
                time.sleep(0.1)
            assert call(a, "cluster-status")["fenced"] is None
            with pytest.raises(OSError) as e:
                os.stat(mb / "from-beta")
            assert e.value.errno == 5       # EIO
            with pytest.raises(OSError):
                (mb / "beta-after").write_bytes(b"must not happen")
            assert not (ma / "beta-after").exists()
            st = b.status()
            assert st["fence_lost"] and st["dstate"] == "Outdated", st
            assert not a.status()["io_suspended"], a.status()
            wait_log(a, "recovered the slot(s) 1 of dead node 1")
            assert "returned 6 (peer is primary, outdating myself)" in b.log()
            (ma / "alpha-while-cut").write_bytes(b"only on alpha's disk for now")

            # The link comes back: once beta's fenced mount is unmounted it
            # demotes itself and becomes a plain SyncTarget of alpha (it
            # started no generation of its own): no split brain.  It
            # rejoins with a fresh mount once its cluster stack is back.
            ctl.heal()
            ctl.refuse(False)
            run("umount", mb)
            b.wait(lambda s: s["role"] == "Secondary", what="beta demoted itself")
            b.wait(lambda s: s["cstate"] == "Connected" and s["dstate"] == "UpToDate",
                   timeout=60, what="beta resynced from alpha")
            st = b.status()
            assert not st["split_brain"] and not st["fence_lost"], st
            assert not st["io_suspended"], st
            assert "Split-Brain" not in b.log() + a.log()
            b.adm("primary", "r0")
            call(b, "cluster-offline", cluster="tc")
            online(pair, cdir)
            mount(b, mb)
            assert (mb / "alpha-while-cut").read_bytes() == b"only on alpha's disk for now"
            assert (mb / "from-beta").read_bytes() == synced
            assert not (mb / "beta-after").exists()
            (mb / "beta-rejoined").write_bytes(b"hello again")
            assert (ma / "beta-rejoined").read_bytes() == b"hello again"
            run("umount", mb)
            wait_closed(b)
            run("umount", ma)
            wait_closed(a)
            fsck_clean(a)
        finally:
            proc.kill()
            proc.wait(10)


def _log_time(text: str, needle: str) -> float:
    """The time of the first log line containing ``needle`` (seconds)."""
    import datetime
    for line in text.splitlines():
        if needle in line:
            stamp = datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
            return stamp.timestamp()
    raise AssertionError(f"no log line with {needle!r}")


def test_cluster_link_cut_loser_stops_before_the_survivor_recovers(tmp_path):
    """Only the cluster (o2net) link breaks; the mirror stays connected.
    beta (node 1) fences itself when its idle timeout expires and stops
    writing; alpha waits one keepalive interval and a second more before
    it regrants beta's locks and replays its journal.  beta keeps
    fsync'ing until its mount refuses: every fsync that returned is on
    alpha, and beta's fence comes before alpha's recovery (the bound)."""
    import threading
    from tests.harness.proxy import spawn_proxy
    with shared_pair(tmp_path, cluster=False) as (pair, ma, mb, cdir):
        a, b = pair.alpha, pair.beta
        pport = free_port("127.0.0.3")
        proc, ctl, _ = spawn_proxy(f"127.0.0.3:{pport}", f"127.0.0.2:{pair.cluster_ports[1]}",
                                   str(tmp_path / "o2net-proxy.sock"))
        try:
            online(pair, cdir, via={"beta": f"127.0.0.3:{pport}"})
            mount(a, ma)
            mount(b, mb)
            acked = []
            stop = threading.Event()

            def writer():
                fd = os.open(mb / "journal-of-beta", os.O_CREAT | os.O_WRONLY | os.O_APPEND,
                             0o644)
                try:
                    i = 0
                    while not stop.is_set():
                        rec = f"{i:08d}\n".encode()
                        os.write(fd, rec)
                        os.fsync(fd)
                        acked.append(rec)
                        i += 1
                except OSError:
                    pass
                finally:
                    os.close(fd)
            t = threading.Thread(target=writer)
            t.start()
            time.sleep(0.5)
            ctl.partition("both")           # the cluster link only
            deadline = time.monotonic() + 30
            while not call(b, "cluster-status").get("fenced"):
                assert time.monotonic() < deadline, "beta was not fenced"
                time.sleep(0.1)
            t.join(30)
            stop.set()
            assert not t.is_alive(), "beta's writer was not stopped by the fence"
            assert len(acked) > 5, acked
            (ma / "alpha-after").write_bytes(b"alpha goes on")   # waits for recovery
            got = (ma / "journal-of-beta").read_bytes()
            assert got.startswith(b"".join(acked)), (len(got), len(acked))
            alog = wait_log(a, "recovered the slot(s) 1 of dead node 1")
            blog = b.log()
            fenced_at = _log_time(blog, "*** FENCING")
            # the line after the grace (not the "... in N s" notice)
            recovery_at = _log_time("\n".join(
                line for line in alog.splitlines()
                if line.endswith("node 1 is gone; recovering its locks")), "is gone")
            assert fenced_at < recovery_at, (fenced_at, recovery_at)
            print(f"beta fenced {recovery_at - fenced_at:.2f} s before alpha recovered")
            assert "recovered the slot(s) 1 of dead node 1" in alog
            run("umount", ma)
            wait_closed(a)
            fsck_clean(a)
        finally:
            proc.kill()
            proc.wait(10)


def test_paused_node_wakes_after_it_was_declared_dead(tmp_path):
    """beta's daemon is stopped (SIGSTOP) past the dead time while it keeps
    fsync'ing: alpha declares it dead, fences it through the cluster
    stack, recovers its slot and goes on.  beta wakes (SIGCONT): it finds
    itself cut off, fences itself and acknowledges nothing more; every
    fsync it got back is on alpha; after its mount is gone it resyncs from
    alpha with no split brain."""
    import signal
    import threading
    with shared_pair(tmp_path) as (pair, ma, mb, cdir):
        a, b = pair.alpha, pair.beta
        mount(a, ma)
        mount(b, mb)
        acked = []
        errors = []

        def writer():
            try:
                fd = os.open(mb / "beta-log", os.O_CREAT | os.O_WRONLY | os.O_APPEND, 0o644)
            except OSError as e:
                errors.append(e)
                return
            try:
                i = 0
                while True:
                    rec = f"{i:08d}\n".encode()
                    os.write(fd, rec)
                    os.fsync(fd)
                    acked.append(rec)
                    i += 1
            except OSError as e:
                errors.append(e)
            finally:
                try:
                    os.close(fd)
                except OSError:
                    pass
        t = threading.Thread(target=writer, daemon=True)
        t.start()
        time.sleep(0.5)
        b.proc.send_signal(signal.SIGSTOP)
        t0 = time.monotonic()
        try:
            # alpha's next change waits for the mirror's fence-peer (the
            # cluster stack declares beta dead), then goes on
            (ma / "alpha-after").write_bytes(b"alpha goes on")
            stall = time.monotonic() - t0
            print(f"alpha's stall after beta stopped: {stall:.2f} s (o2net idle 1.5 s "
                  f"+ grace 1.3 s)")
            deadline = time.monotonic() + 60
            while "recovered the slot(s) 1 of dead node 1" not in a.log():
                assert time.monotonic() < deadline, a.log()[-3000:]
                time.sleep(0.1)
            n_acked = len(acked)
            # every fsync beta got back; at most the record in flight more
            got = (ma / "beta-log").read_bytes()
            assert got.startswith(b"".join(acked)) and len(got) <= 9 * (n_acked + 1), \
                (len(got), n_acked)
        finally:
            b.proc.send_signal(signal.SIGCONT)
        t.join(60)
        assert not t.is_alive() and errors, "beta's writer was not stopped"
        # whatever beta acknowledged -- also a reply it sent only after it
        # woke up -- was on alpha before alpha went on without it
        assert got.startswith(b"".join(acked)), (len(got), len(acked), n_acked)
        assert len(acked) <= n_acked + 1
        deadline = time.monotonic() + 30
        while not call(b, "cluster-status").get("fenced"):
            assert time.monotonic() < deadline, "beta did not fence itself"
            time.sleep(0.1)
        run("umount", mb)
        b.wait(lambda s: s["role"] == "Secondary", what="beta demoted itself")
        b.wait(lambda s: s["cstate"] == "Connected" and s["dstate"] == "UpToDate",
               timeout=60, what="beta resynced from alpha")
        assert not b.status()["split_brain"]
        assert "Split-Brain" not in b.log() + a.log()
        assert (ma / "beta-log").read_bytes() == got
        run("umount", ma)
        wait_closed(a)
        fsck_clean(a)


def test_forced_offline_under_a_shared_mount_fences_it(tmp_path):
    """`cluster force-offline` while beta's mount holds locks: beta's mount
    must stop writing before alpha, seeing beta gone, recovers its slot."""
    with shared_pair(tmp_path) as (pair, ma, mb, _):
        a, b = pair.alpha, pair.beta
        mount(a, ma)
        mount(b, mb)
        fd = os.open(mb / "before", os.O_CREAT | os.O_WRONLY, 0o644)
        os.write(fd, b"beta, durable")
        os.fsync(fd)
        os.close(fd)
        b.adm("cluster", "force-offline", "tc")
        wait_log(b, "FENCING node beta")
        with pytest.raises(OSError) as e:
            (mb / "after").write_bytes(b"must not happen")
        assert e.value.errno == 5
        wait_log(a, "recovered the slot(s) 1 of dead node 1")
        assert (ma / "before").read_bytes() == b"beta, durable"
        assert not (ma / "after").exists()
        # the replication link never went: beta's fenced resource demotes
        # itself once its mount is gone (found by a netns run's blip)
        assert b.status()["cstate"] == "Connected"
        run("umount", mb)
        b.wait(lambda s: s["role"] == "Secondary", what="beta demoted after its fence")
        assert "demoted to Secondary: this node was fenced" in b.log()
        run("umount", ma)
        wait_closed(a)
        fsck_clean(a)


def test_mount_is_refused_when_sharing_is_unsafe(tmp_path):
    # a fencing policy that lets a node go on writing after it lost its
    # peer: the mirror and the locks could pick different survivors, so
    # the shared mount is refused, saying what to set
    weak = "\tdisk { fencing resource-only; }"
    with shared_pair(tmp_path, extra_res=weak, cluster=False) as (pair, ma, mb, cdir):
        a, b = pair.alpha, pair.beta
        cp = mount(a, ma, check=False)
        assert cp.returncode == 32 and "cluster stack is not online" in cp.stderr, cp.stderr
        assert "replfsadm cluster online" in cp.stderr
        online(pair, cdir)
        cp = mount(a, ma, check=False)
        assert cp.returncode == 32 and "fencing resource-only" in cp.stderr, cp.stderr
        assert "resource-and-stonith" in cp.stderr
        assert not mounted(ma) and not mounted(mb)


def test_mount_is_refused_with_a_split_brain_policy_that_discards_a_primary(tmp_path):
    # after-sb-2pri violently-as0p would discard one Primary's acknowledged
    # writes beneath its mounted filesystem after a split brain
    policy = "\tnet { after-sb-2pri violently-as0p; }"
    with shared_pair(tmp_path, extra_res=policy, cluster=False) as (pair, ma, mb, cdir):
        online(pair, cdir)
        cp = mount(pair.alpha, ma, check=False)
        assert cp.returncode == 32 and "violently-as0p" in cp.stderr, cp.stderr
        assert "after-sb-2pri disconnect" in cp.stderr
        assert not mounted(ma)


def test_mount_is_refused_when_the_slots_run_out_or_the_cluster_differs(tmp_path):
    with shared_pair(tmp_path, slots=1) as (pair, ma, mb, _):
        a, b = pair.alpha, pair.beta
        mount(a, ma)
        cp = mount(b, mb, check=False)
        assert cp.returncode == 32 and "no node slot" in cp.stderr, cp.stderr
        assert "-N" in cp.stderr
        assert not mounted(mb)
        # the refused mount left nothing behind: beta mounts once alpha is gone
        run("umount", ma)
        wait_closed(a)
        mount(b, mb)
        run("umount", mb)
        wait_closed(b)
        # a volume made for another cluster is not mounted by this one's locks
        run(os.path.join(VENV_BIN, "mkfs.replfs"), "-q", "-F", "-N", "2", "--cluster-name",
            "other", "-c", a.conf, "--rundir", a.rundir, "r0", env=dict(ENV, REPLFS_NODE="alpha"))
        cp = mount(b, mb, check=False)
        assert cp.returncode == 32 and "made for cluster other" in cp.stderr, cp.stderr
        assert "cluster tc" in cp.stderr
        assert not mounted(mb)


def test_a_restarted_replfsd_detaches_only_its_own_dead_mounts(tmp_path):
    """Both daemons of the pair killed -9: both mounts are dead (ENOTCONN).
    beta's replfsd comes back and detaches its own dead mount -- not
    alpha's, which another replfsd on this machine owns (found by the
    fault runs: a replfsd started by a test beside them detached a
    killed node's mount under its workload); alpha's detaches its own."""
    with shared_pair(tmp_path) as (pair, ma, mb, cdir):
        mount(pair.alpha, ma)
        mount(pair.beta, mb)
        pair.alpha.kill9()
        pair.beta.kill9()
        assert mounted(ma) and mounted(mb)
        pair.beta.start()
        _wait(lambda: "detached the dead replfs mount" in pair.beta.log(), "beta's clean-up")
        assert not mounted(mb), "beta's replfsd left its own dead mount"
        assert mounted(ma), "beta's replfsd detached alpha's mount"
        pair.alpha.start()
        _wait(lambda: not mounted(ma), "alpha's clean-up")


def _wait(pred, what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
