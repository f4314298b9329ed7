"""The shared NFS export (issue 9): real NFS-Ganesha servers, one per node,
in front of the two nodes' mounts of one dual-primary volume; real NFS
clients: libnfs's tools (nfs-cp, nfs-cat, nfs-ls) over NFSv3 and NFSv4,
and replfs.nfs.rpc, an NFSv3 client that keeps raw file handles the way a
kernel client does.

What a user does and sees: ``replfsadm nfs start`` on each node; a file
written through one node's export is read through the other's at once;
both servers hand out the same handle bytes for the same file; a client
keeps its handles (NFSv3 and NFSv4) across a remount and across a
failover of the floating address to the other node after the first one
died, resends the UNSTABLE writes the dead server never committed when
the new server's verifier differs, and reclaims its NFSv4.1 open in the
new server's grace period, which starts only after the dead node's slot
is recovered; the dead node's server is stopped after its mount died; a
handle of a file deleted on the other node answers ESTALE; fsck clean
after.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time

import pytest

from replfs.localpair import free_port
from replfs.nfs import ganesha as G
from replfs.nfs import rpc

from .test_fs_handles import drop_caches
from .test_fs_mount import ENV, VENV_BIN, force_unmount, fuse_usable, run
from .test_fs_shared import FENCING, call, fsck_clean, mount, shared_pair, wait_closed

_missing = [t for t in ("ganesha.nfsd", "nfs-cp", "nfs-cat", "rpcbind")
            if shutil.which(t) is None and not os.path.exists(f"/usr/sbin/{t}")]
pytestmark = [
    pytest.mark.fuse,
    pytest.mark.skipif(not fuse_usable(), reason="needs /dev/fuse and root"),
    pytest.mark.skipif(bool(_missing), reason=f"NFS-Ganesha or libnfs is not installed "
                       f"(missing {', '.join(_missing)}; scripts/setup.sh installs them)"),
]

FLOATING = "127.0.0.10"


def adm_nfs(node, *args, check=True):
    cp = subprocess.run([os.path.join(VENV_BIN, "replfsadm"), "--rundir", node.rundir,
                         "nfs", *args], capture_output=True, text=True, timeout=120,
                        env=dict(ENV, REPLFS_NODE=node.name))
    if check:
        assert cp.returncode == 0, f"replfsadm nfs {' '.join(args)}: {cp.stdout}{cp.stderr}"
    return cp


def url(addr, port, mport, path, version):
    q = f"version={version}&nfsport={port}"
    if version == 3:
        q += f"&mountport={mport}"
    return f"nfs://{addr}{path}?{q}"


def nfs_put(local: str, target: str) -> None:
    cp = subprocess.run(["nfs-cp", local, target], capture_output=True, text=True, timeout=60)
    assert cp.returncode == 0, f"nfs-cp {target}: {cp.stdout}{cp.stderr}"


def nfs_cat(source: str) -> bytes:
    cp = subprocess.run(["nfs-cat", source], capture_output=True, timeout=60)
    assert cp.returncode == 0, f"nfs-cat {source}: {cp.stdout!r}{cp.stderr!r}"
    return cp.stdout


class Server:
    """One node's export, as a client addresses it."""

    def __init__(self, node, mnt, addr, *, bind=True):
        self.node, self.mnt, self.addr = node, mnt, addr
        self.bind = bind                # False: every address of the node
        self.port, self.mport = free_port(addr), free_port(addr)

    def start(self, *extra, check=True):
        where = ("--address", self.addr) if self.bind else ()
        return adm_nfs(self.node, "start", str(self.mnt), *where,
                       "--port", str(self.port), "--mount-port", str(self.mport),
                       "--grace", "3", "--lease", "3", "--squash", "no_root_squash", *extra,
                       check=check)

    def stop(self):
        return adm_nfs(self.node, "stop", "r0", "--timeout", "20")

    def url(self, path, version):
        return url(self.addr, self.port, self.mport, "/r0" + path, version)

    def v3(self):
        return rpc.NFS3Client(self.addr, self.port)

    def root(self) -> bytes:
        with rpc.MountClient(self.addr, self.mport) as m:
            return m.mnt("/r0")


def write_until(server, fh, data, *, refused: bool, timeout: float = 20):
    """Write through ``server`` until the write is refused (returns the
    NFSError) or, with refused=False, until it is accepted: a reload takes
    effect a moment after the signal."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with server.v3() as c:
                c.write(fh, 0, data)
            if not refused:
                return None
        except rpc.NFSError as e:
            if refused:
                return e
        assert time.monotonic() < deadline, f"the reload had no effect ({data!r})"
        time.sleep(0.2)


def stop_all(*servers):
    for s in servers:
        adm_nfs(s.node, "stop", "r0", "--timeout", "20", check=False)


@contextlib.contextmanager
def two_servers(tmp_path):
    """Both nodes mount the volume and serve it, alpha on every address (its
    clients use 127.0.0.1) and beta on 127.0.0.2.  Yields (pair, ma, mb,
    sa, sb); afterwards both servers are stopped, both mounts unmounted,
    and fsck must find the volume clean."""
    with shared_pair(tmp_path) as (pair, ma, mb, _):
        a, b = pair.alpha, pair.beta
        mount(a, ma)
        mount(b, mb)
        sa, sb = Server(a, ma, "127.0.0.1", bind=False), Server(b, mb, "127.0.0.2")
        try:
            out = sa.start().stdout
            assert "NFS-Ganesha pid" in out and "fsid 0x" in out, out
            sb.start()
            yield pair, ma, mb, sa, sb
        finally:
            stop_all(sa, sb)
        run("umount", ma)
        run("umount", mb)
        wait_closed(a)
        wait_closed(b)
        fsck_clean(a)


def test_both_nodes_export_one_volume(tmp_path, rpcbind):
    with two_servers(tmp_path) as (pair, ma, mb, sa, sb):
        a = pair.alpha
        st = adm_nfs(a, "status", "r0")
        assert "running" in st.stdout and st.returncode == 0, st.stdout
        # each server its own NFSv4 recovery directory: alpha's, bound to
        # every address, is its node's; no client can enter them (0700,
        # root's; the clients' root is squashed by default)
        top = ma / ".nfs-ganesha"
        assert sorted(os.listdir(top)) == ["127.0.0.2", "node-alpha"]
        assert os.stat(top).st_mode & 0o777 == 0o700

        # both directions through libnfs: written over NFSv3 through one
        # node's server, read over NFSv3 and NFSv4 through the other's
        # (libnfs 4.0's NFSv4 writes fail against Ganesha 4.3 even on a
        # local directory: NFSv4 is read here)
        src = tmp_path / "src"
        for w, r in ((sa, sb), (sb, sa)):
            data = os.urandom(200_000)
            src.write_bytes(data)
            name = f"/v3-from-{w.node.name}"
            nfs_put(str(src), w.url(name, 3))
            for version in (3, 4):
                assert nfs_cat(r.url(name, version)) == data, (version, w.node.name)
            assert (ma / name[1:]).read_bytes() == data       # and in both mounts
            assert (mb / name[1:]).read_bytes() == data
        # NFSv4.1 with state (sessions, OPEN, WRITE, CLOSE), both ways
        for w, r in ((sa, sb), (sb, sa)):
            data = os.urandom(100_000)
            cw = rpc.NFS41Client(w.addr, w.port)
            cr = rpc.NFS41Client(r.addr, r.port)
            try:
                cw.establish()
                cr.establish()
                name = f"v41-from-{w.node.name}"
                f = cw.open("/r0", name, create=True)
                for off in range(0, len(data), 32768):
                    cw.write(f, off, data[off:off + 32768], rpc.UNSTABLE)
                # visible to the other node's server at once, committed
                # or not: the mounts are coherent (COMMIT is durability)
                cw.close_file(f)
                g = cr.open("/r0", name)
                got = b""
                while True:
                    chunk, eof = cr.read(g, len(got), 65536)
                    got += chunk
                    if eof or not chunk:
                        break
                cr.close_file(g)
                assert got == data and g.fh == f.fh, (w.node.name, len(got))
            finally:
                for c in (cw, cr):
                    c.destroy()
                    c.close()
        listing = subprocess.run(["nfs-ls", sb.url("", 3)], capture_output=True,
                                 text=True).stdout
        assert "v3-from-alpha" in listing and "v3-from-beta" in listing, listing

        # the two servers hand out the same handle bytes for the same
        # file, and each server reads with the other's handle
        ra, rb = sa.root(), sb.root()
        assert ra == rb
        hi, lo, _ = G.derive_ids(call_uuid(a))
        assert G.fsid_bytes(hi, lo) in ra
        with sa.v3() as ca, sb.v3() as cb:
            fa = ca.lookup(ra, "v3-from-alpha")
            assert cb.lookup(rb, "v3-from-alpha") == fa
            data, _ = cb.read(fa, 0, 4096)
            assert data == (ma / "v3-from-alpha").read_bytes()[:4096]
            # a write through beta's server with alpha's handle is what
            # alpha's server and both mounts read next
            cb.write(fa, 0, b"through beta", rpc.FILE_SYNC)
            assert ca.read(fa, 0, 12)[0] == b"through beta"
            assert (ma / "v3-from-alpha").read_bytes()[:12] == b"through beta"
            assert ca.getattr(fa).size == cb.getattr(fa).size == 200_000
            # changes made through a mount are what both servers report
            # next (no attribute caching in Ganesha: Attr_Expiration_Time 0)
            with open(mb / "v3-from-alpha", "ab") as f:
                f.write(b"appended on beta")
            assert ca.getattr(fa).size == 200_016
            assert ca.read(fa, 200_000, 100)[0] == b"appended on beta"
            os.truncate(ma / "v3-from-alpha", 1000)
            assert cb.getattr(fa).size == 1000
            # deleted through one server while the other still has it
            # open: each server answers with the file's last bytes (an
            # open-unlinked file, kept until its last user lets go) or
            # ESTALE -- never with the bytes of a file made since, even
            # one that reuses the inode number
            fh = ca.create(ra, "doomed")
            ca.write(fh, 0, b"x" * 100)
            assert cb.getattr(fh).size == 100
            cb.remove(rb, "doomed")
            for i in range(20):
                (mb / f"new{i}").write_bytes(b"n" * 100)
            for c in (ca, cb):
                try:
                    assert c.read(fh, 0, 100)[0] == b"x" * 100
                    assert c.getattr(fh).nlink == 0
                except rpc.NFSError as e:
                    assert e.status == rpc.NFS3ERR_STALE, e
        # a second start is refused; reload applies export options to
        # the running server: read-only now, then read-write again
        again = sa.start(check=False)
        assert again.returncode == 20 and "already running" in again.stderr, again
        cfg = adm_nfs(a, "config", str(ma), "--port", str(sa.port), "--mount-port", str(sa.mport), "--grace", "3",
                      "--lease", "3", "--squash", "no_root_squash").stdout
        with open(os.path.join(a.rundir, "nfs", "r0", "ganesha.conf")) as f:
            assert f.read().strip() == cfg.strip()
        pid = G.read_pid(G.Paths(os.path.join(a.rundir, "nfs", "r0")))
        refused = adm_nfs(a, "reload", "r0", "--port", "1", check=False)
        assert refused.returncode == 1 and "needs a restart" in refused.stderr
        adm_nfs(a, "reload", "r0", "--access", "ro")
        refusal = write_until(sa, fa, b"must not land", refused=True)
        assert refusal.status in (rpc.NFS3ERR_ACCES, 30), refusal       # ACCES or ROFS
        adm_nfs(a, "reload", "r0", "--access", "rw")
        write_until(sa, fa, b"through beta", refused=False)
        assert G.read_pid(G.Paths(os.path.join(a.rundir, "nfs", "r0"))) == pid
        # once the servers and both kernels let go of it, ESTALE
        stop_all(sa, sb)
        drop_caches()
        time.sleep(0.5)
        sa.start()
        sb.start()
        for s in (sa, sb):
            with s.v3() as c:
                with pytest.raises(rpc.NFSError) as e:
                    c.getattr(fh)
                assert e.value.status == rpc.NFS3ERR_STALE, (s.node.name, e.value)
                assert c.read(fa, 0, 12)[0] == b"through beta"   # handles kept
        stop_all(sa, sb)
        st = adm_nfs(a, "status", "r0", check=False)
        assert st.returncode == 3 and "not running" in st.stdout, st.stdout


def call_uuid(node) -> str:
    return call(node, "mounts")["mounts"][0]["uuid"]


@contextlib.contextmanager
def floating(tmp_path):
    """Active/passive on one floating address: both nodes mount the volume
    (fencing resource-and-stonith), and two Servers, beta's and alpha's,
    share the address and ports; beta's serves first.  Afterwards the
    servers are stopped, alpha's mount unmounted, fsck must be clean."""
    with shared_pair(tmp_path, extra_res=FENCING) as (pair, ma, mb, _):
        a, b = pair.alpha, pair.beta
        mount(a, ma)
        mount(b, mb)
        sb = Server(b, mb, FLOATING)
        sa = Server(a, ma, FLOATING)
        sa.port, sa.mport = sb.port, sb.mport          # the same address and ports
        try:
            yield pair, ma, mb, sa, sb
        finally:
            stop_all(sa, sb)
        run("umount", ma)
        wait_closed(a)
        fsck_clean(a)


def beta_dies(pair, mb) -> float:
    """beta's Ganesha and replfsd (with its mount) killed -9; returns when."""
    pid = G.read_pid(G.Paths(os.path.join(pair.beta.rundir, "nfs", "r0")))
    t0 = time.monotonic()
    os.kill(pid, 9)
    pair.beta.kill9()
    force_unmount(mb)
    return t0


def test_client_keeps_its_handles_across_remount_and_failover(tmp_path, rpcbind):
    """Active/passive with a floating address: beta serves it and dies (its
    replfsd and its Ganesha killed -9) while a client has UNSTABLE writes
    it has not committed; alpha takes the address over with the same
    handles; the client's COMMIT gets a new write verifier, so it sends
    those writes again, and the file is what the client wrote.  Then
    alpha's mount is remounted under an NFSv3 and an NFSv4.1 client that
    keep their handles.  (beta dies, not alpha: with network heartbeat
    only, the quorum rule of a two-node cluster keeps node 0 -- see
    docs/nfs-pair.md.)"""
    with floating(tmp_path) as (pair, ma, mb, sa, sb):
        a = pair.alpha
        sb.start()
        root = sb.root()
        c = sb.v3()
        fh = c.create(root, "kept")
        synced = os.urandom(64 * 1024)
        c.write(fh, 0, synced, rpc.FILE_SYNC)
        # an UNSTABLE write, committed: the verifier tells the client
        # whether the server kept it
        _, how, verf1 = c.write(fh, len(synced), b"unstable tail", rpc.UNSTABLE)
        assert c.commit(fh) == verf1
        attr = c.getattr(fh)
        # UNSTABLE writes that are never committed before the server dies:
        # a real client keeps them until a COMMIT answers with the
        # verifier they were written under
        uncommitted = [(4096, os.urandom(4096)), (len(synced) + 13, os.urandom(8192))]
        for off, data in uncommitted:
            assert c.write(fh, off, data, rpc.UNSTABLE)[2] == verf1
        c.close()
        want = bytearray(synced + b"unstable tail")
        for off, data in uncommitted:
            want[off:off + len(data)] = data
        want = bytes(want)

        t0 = beta_dies(pair, mb)
        # the HA stack on alpha moves the address and starts the server at
        # once: replfsadm nfs start itself waits until the cluster stack
        # declared beta dead and the mount recovered its slot (the grace
        # period must not run out before)
        launched = time.time()
        out = sa.start().stdout
        recovered = logged_at(a.log(), "recovered the slot(s) 1 of dead node 1")
        assert recovered <= started_at(sa) + 0.02, "Ganesha started before the recovery"
        waited = "waiting before the NFS server starts" in out
        # (the command asks replfsd within 0.1 s of its launch on a quiet
        # machine -- over a second when make test's shards load both
        # cores; the stack declares beta dead 1.3 s after the death, and
        # recovers it then: without a wait, the recovery came first.  The
        # order itself is the assertion above.)
        assert waited or recovered < launched + 5.0, out
        first = None
        while first is None:
            try:
                with sa.v3() as ca:
                    first = ca.read(fh, 0, 4096)[0]
            except (rpc.RPCError, rpc.NFSError):
                assert time.monotonic() - t0 < 60, "no I/O through alpha within 60 s"
                time.sleep(0.1)
        failover = time.monotonic() - t0
        assert first == synced[:4096]
        print(f"failover: beta killed -> first read through alpha's server: "
              f"{failover:.2f} s (start waited for the recovery: {waited})")
        with sa.v3() as ca:
            assert ca.getattr(fh).fileid == attr.fileid
            assert ca.read(fh, len(synced), 13)[0] == b"unstable tail"     # committed
            # the client's COMMIT: a new server instance, a new verifier,
            # so the client sends its uncommitted writes again
            verf2 = ca.commit(fh)
            assert verf2 != verf1
            before = read_all(ca, fh)
            for off, data in uncommitted:
                assert ca.write(fh, off, data, rpc.UNSTABLE)[2] == verf2
            assert ca.commit(fh) == verf2
            assert read_all(ca, fh) == want
        print(f"uncommitted UNSTABLE writes {'survived' if before == want else 'were lost in'}"
              f" beta's death; resent after the verifier changed")
        assert (ma / "kept").read_bytes() == want
        # the NFSv4 handle of the same file, through alpha's server
        c4 = rpc.NFS41Client(FLOATING, sa.port)
        c4.establish()
        fh4 = c4.lookup("/r0/kept")
        c4.destroy()
        c4.close()

        # remount under the clients: stop the server, umount, mount, start
        sa.stop()
        run("umount", ma)
        wait_closed(a)
        mount(a, ma)
        sa.start()
        assert (ma / "kept").read_bytes() == want               # the new mount
        with sa.v3() as ca:
            assert read_all(ca, fh) == want
            assert sa.root() == root
        c4 = rpc.NFS41Client(FLOATING, sa.port)
        c4.establish()
        f4 = rpc.NFS41Client.stateless(fh4, "kept")
        assert c4.getattr_size(f4) == len(want)
        assert v4_read_in_grace(c4, f4, 8192) == want[:8192]
        c4.destroy()
        c4.close()
        # deleted through the mount: once no server holds it, the kept
        # handles are stale, over NFSv3 and NFSv4
        os.unlink(ma / "kept")
        sa.stop()
        drop_caches()
        time.sleep(0.5)
        sa.start()
        with sa.v3() as ca:
            with pytest.raises(rpc.NFSError) as e:
                ca.getattr(fh)
            assert e.value.status == rpc.NFS3ERR_STALE
        c4 = rpc.NFS41Client(FLOATING, sa.port)
        c4.establish()
        with pytest.raises(rpc.NFS4Error) as e4:
            c4.getattr_size(f4)
        assert e4.value.status == rpc.NFS4ERR_STALE, e4.value
        c4.destroy()
        c4.close()


def logged_at(log: str, text: str) -> float:
    """When replfsd logged the line with ``text`` (its timestamp, ms)."""
    import datetime
    line = next((x for x in log.splitlines() if text in x), None)
    assert line is not None, f"no {text!r} in the log"
    return datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()


def started_at(server) -> float:
    """When the server's Ganesha process started (wall clock; 10 ms ticks)."""
    pid = G.read_pid(G.Paths(os.path.join(server.node.rundir, "nfs", "r0")))
    with open(f"/proc/{pid}/stat") as f:
        ticks = int(f.read().rsplit(")", 1)[1].split()[19])      # field 22, starttime
    age = time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")
    return time.time() - age


def read_all(c, fh) -> bytes:
    got = b""
    while True:
        chunk, eof = c.read(fh, len(got), 65536)
        got += chunk
        if eof or not chunk:
            return got


def v4_read_in_grace(c, f, count, timeout=15.0) -> bytes:
    """READ with the anonymous stateid: refused with NFS4ERR_GRACE while the
    new server's grace period lasts, then served."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return c.read(f, 0, count)[0]
        except rpc.NFS4Error as e:
            assert e.status == rpc.NFS4ERR_GRACE and time.monotonic() < deadline, e
            time.sleep(0.2)


class NFSWorker:
    """One client of a workload through both nodes' exports: each step goes
    to alpha's or beta's server at random, on names only this worker uses,
    in the volume's root directory that all workers share.  ``live`` is
    what the worker's own acknowledged calls say the files hold."""

    def __init__(self, wid: int, seed: int, servers):
        import random
        self.wid, self.rng = wid, random.Random(seed)
        self.clients = [s.v3() for s in servers]
        self.roots = [s.root() for s in servers]
        self.live: dict[str, bytes] = {}
        self.n = 0
        self.error = None
        self.ops = 0

    def run(self, steps: int) -> None:
        try:
            for _ in range(steps):
                self.step()
                self.ops += 1
        except BaseException as e:      # noqa: BLE001  (reported by the test)
            self.error = e
        finally:
            for c in self.clients:
                c.close()

    def step(self) -> None:
        rng = self.rng
        i = rng.randrange(2)
        c, root = self.clients[i], self.roots[i]
        r = rng.random()
        if r < 0.35 or not self.live:
            self.n += 1
            name = f"n{self.wid}-{self.n}"
            data = rng.randbytes(rng.choice([0, 300, 5000, 40000]))
            fh = c.create(root, name)
            for off in range(0, len(data), 32768):
                c.write(fh, off, data[off:off + 32768], rpc.FILE_SYNC)
            self.live[name] = data
            return
        name = rng.choice(sorted(self.live))
        data = self.live[name]
        fh = c.lookup(root, name)
        if r < 0.55:
            extra = rng.randbytes(rng.choice([10, 4096, 9000]))
            # UNSTABLE, then COMMIT under the same verifier: durable
            _, _, verf = c.write(fh, len(data), extra, rpc.UNSTABLE)
            assert c.commit(fh) == verf
            self.live[name] = data + extra
        elif r < 0.65:
            c.remove(root, name)
            del self.live[name]
        else:
            got = b""
            while len(got) < len(data) + 1:
                chunk, eof = c.read(fh, len(got), 65536)
                got += chunk
                if eof or not chunk:
                    break
            assert got == data, (self.wid, name, len(got), len(data))


def test_concurrent_workload_through_both_exports(tmp_path, rpcbind):
    """Four clients, each sending every step to either node's server, in one
    shared directory: every acknowledged write is what both servers and
    both mounts show at the end, byte for byte; fsck clean."""
    import threading
    with two_servers(tmp_path) as (pair, ma, mb, sa, sb):
        workers = [NFSWorker(w, 900 + w, (sa, sb)) for w in range(4)]
        threads = [threading.Thread(target=w.run, args=(60,)) for w in workers]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        for w in workers:
            assert w.error is None, (w.wid, w.ops, repr(w.error))
        want = {}
        for w in workers:
            want.update(w.live)
        names = {n for n in os.listdir(ma) if n.startswith("n")}
        assert names == set(want) == {n for n in os.listdir(mb) if n.startswith("n")}
        for name, data in want.items():
            assert (ma / name).read_bytes() == data, name
            assert (mb / name).read_bytes() == data, name
        with sa.v3() as ca, sb.v3() as cb:
            for name, data in list(want.items())[:40]:
                for c, root in ((ca, sa.root()), (cb, sb.root())):
                    fh = c.lookup(root, name)
                    assert c.getattr(fh).size == len(data)
        print(f"NFS workload: {sum(w.ops for w in workers)} operations through two "
              f"servers, {len(want)} files checked")


def test_nfsv41_client_reclaims_its_open_after_failover(tmp_path, rpcbind):
    """An NFSv4.1 client with a file open on beta's server (the floating
    address); beta dies; alpha takes the address over and starts in grace
    for beta's clients, read from the recovery directory on the volume:
    a new client's OPEN waits (NFS4ERR_GRACE) while the old client
    reclaims its open (CLAIM_PREVIOUS) and reads its data with the
    reclaimed state.  (And NFSv4.2 ALLOCATE reaches the volume.)"""
    with floating(tmp_path) as (pair, ma, mb, sa, sb):
        a = pair.alpha
        grace = ("--grace", "15", "--lease", "5")
        sb.start(*grace)
        old = rpc.NFS41Client(FLOATING, sb.port, owner=b"old-client")
        old.establish()
        f = old.open("/r0", "v41-kept", create=True)
        data = os.urandom(20000)
        old.write(f, 0, data, rpc.FILE_SYNC)
        assert old.read(f, 0, 30000)[0] == data
        recov = mb / ".nfs-ganesha" / FLOATING / "v4recov"
        assert os.listdir(recov), "beta's Ganesha recorded no NFSv4 client on the volume"
        # NFSv4.2 ALLOCATE reaches the filesystem as fallocate(2)
        c42 = rpc.NFS41Client(FLOATING, sb.port, minor=2)
        c42.establish()
        fa = c42.open("/r0", "allocated", create=True)
        c42.allocate(fa, 0, 1 << 20)
        assert c42.getattr_size(fa) == 1 << 20
        c42.close_file(fa)
        c42.destroy()
        c42.close()
        st = os.stat(ma / "allocated")
        assert st.st_size == 1 << 20 and st.st_blocks * 512 >= 1 << 20, st

        # beta's replfsd dies (and its mount with it) first; then the HA
        # stack on beta stops beta's server -- with --dir, it needs neither
        # replfsd nor the mount
        t0 = time.monotonic()
        pair.beta.kill9()
        force_unmount(mb)
        bdir = os.path.join(pair.beta.rundir, "nfs", "r0")
        st = adm_nfs(pair.beta, "stop", str(mb), "--dir", bdir, "--timeout", "10")
        assert "NFS-Ganesha pid" in st.stdout and "stopped" in st.stdout, st.stdout
        assert G.read_pid(G.Paths(bdir)) is None
        st = adm_nfs(pair.beta, "status", "--dir", bdir, check=False)
        assert st.returncode == 3 and "not running" in st.stdout, st.stdout
        old.close()
        sa.start(*grace)
        assert logged_at(a.log(), "recovered the slot(s) 1 of dead node 1") \
            <= started_at(sa) + 0.02
        log = open(os.path.join(a.rundir, "nfs", "r0", "ganesha.log")).read()
        assert "IN GRACE" in log, log[-2000:]

        # a client that held nothing waits for the grace period
        new = rpc.NFS41Client(FLOATING, sa.port, owner=b"new-client")
        new.establish()
        with pytest.raises(rpc.NFS4Error) as e:
            new.open("/r0", "v41-new", create=True)
        assert e.value.status == rpc.NFS4ERR_GRACE, e.value

        # the old client (same owner, same incarnation) reclaims its open
        again = rpc.NFS41Client(FLOATING, sa.port, owner=old.owner)
        again.verifier = old.verifier
        again.establish(reclaim_complete=False)
        g = again.reclaim(f.fh, f.name)
        again.reclaim_complete()
        assert again.read(g, 0, 30000)[0] == data
        again.write(g, len(data), b"after failover", rpc.FILE_SYNC)
        took = time.monotonic() - t0
        print(f"NFSv4.1 failover: beta killed -> open reclaimed and read through "
              f"alpha: {took:.2f} s")
        assert (ma / "v41-kept").read_bytes() == data + b"after failover"

        # after the grace period (or once every old client reclaimed),
        # new opens go through
        deadline = time.monotonic() + 30
        while True:
            try:
                h = new.open("/r0", "v41-new", create=True)
                break
            except rpc.NFS4Error as e:
                assert e.status == rpc.NFS4ERR_GRACE and time.monotonic() < deadline, e
                time.sleep(0.5)
        new.write(h, 0, b"new")
        new.close_file(h)
        again.close_file(g)
        again.destroy()
        new.destroy()
        again.close()
        new.close()


