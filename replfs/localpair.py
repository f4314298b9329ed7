"""Two replfs nodes on one machine: alpha on 127.0.0.1, beta on 127.0.0.2.

Used by `make demo`, the benchmarks and the integration tests.  Each node
gets its own directory with a backing file, a config, and a run directory
for its replfsd; replfsadm is run as a subprocess exactly as an admin
would run it.  Optionally alpha reaches beta through a fault proxy.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field

from replfs.ipc.client import SyncClient, socket_path

PY = sys.executable


class PairError(AssertionError):
    """A node of the local pair did not do what was asked."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


SIZE = 32 * 1024 * 1024


ADDRS = ("127.0.0.1", "127.0.0.2")


def cluster_conf(name: str, p0: int, p1: int, addrs: tuple[str, str] = ADDRS) -> str:
    """An o2cb cluster.conf for the two local nodes: alpha (number 0) on
    addrs[0]:p0 (127.0.0.1) and beta (number 1) on addrs[1]:p1 (127.0.0.2)."""
    nodes = "".join(f"node:\n\tip_port = {port}\n\tip_address = {addr}\n\tnumber = {num}\n"
                    f"\tname = {node}\n\tcluster = {name}\n\n"
                    for num, (node, addr, port) in enumerate((("alpha", addrs[0], p0),
                                                               ("beta", addrs[1], p1))))
    return f"cluster:\n\tnode_count = 2\n\tname = {name}\n\n" + nodes.rstrip("\n") + "\n"


CONF = """\
common {{
	net {{
		connect-int 1;
		ping-int 1;
		ping-timeout 20;
		timeout 30;{extra_net}
	}}
}}
resource r0 {{
	protocol {protocol};{extra_res}
	on alpha {{
		device    {alpha_dev} minor 0;
		disk      {alpha_disk};
		address   {alpha_addr};
		meta-disk internal;
	}}
	on beta {{
		device    {beta_dev} minor 0;
		disk      {beta_disk};
		address   {beta_addr};
		meta-disk internal;
	}}
}}
"""


# The seed's step 9: a second resource both nodes make Primary, for the
# shared filesystem (protocol C, allow-two-primaries, as the seed has it;
# with no fencing options the shared mounts fence through the cluster
# stack).
R1 = """\
resource r1 {{
	protocol C;
	net {{
		allow-two-primaries;
	}}
	on alpha {{
		device    {alpha_dev1} minor 1;
		disk      {alpha_disk1};
		address   {alpha_addr1};
		meta-disk internal;
	}}
	on beta {{
		device    {beta_dev1} minor 1;
		disk      {beta_disk1};
		address   {beta_addr1};
		meta-disk internal;
	}}
}}
"""


@dataclass
class Node:
    name: str
    addr: str
    root: str
    conf: str = ""
    disk: str = ""
    proc: subprocess.Popen | None = None
    env: dict = field(default_factory=dict)
    # argv prefix replfsd is started with, e.g. nsenter into a network
    # namespace (tests/harness/netns.py); the admin commands need none
    launcher: list = field(default_factory=list)

    @property
    def rundir(self) -> str:
        return os.path.join(self.root, "run")

    def adm(self, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        cmd = [PY, "-m", "replfs.cli.main", "-c", self.conf, "--node", self.name,
               "--rundir", self.rundir, *args]
        cp = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=self.env)
        if check and cp.returncode != 0:
            raise PairError(f"replfsadm {' '.join(args)} on {self.name} failed "
                                 f"({cp.returncode}):\n{cp.stdout}{cp.stderr}")
        return cp

    def events2(self, *args: str) -> subprocess.Popen:
        """``replfsadm events2 ARGS`` on this node, left running: its lines
        on the Popen's stdout (text, line-buffered), its errors on stderr.
        The caller stops it (terminate, wait)."""
        cmd = [PY, "-u", "-m", "replfs.cli.main", "-c", self.conf, "--node", self.name,
               "--rundir", self.rundir, "events2", *args]
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, bufsize=1, env=self.env)

    def start(self) -> None:
        """Start replfsd in the foreground as a child (so kill9 can reach it)."""
        self.spawn()
        self.wait_ready()

    def spawn(self) -> None:
        """Start replfsd without waiting for it (see wait_ready)."""
        os.makedirs(self.rundir, exist_ok=True)
        log = open(os.path.join(self.root, "replfsd.out"), "ab")
        self.proc = subprocess.Popen(
            [*self.launcher, PY, "-m", "replfs.daemon.main", "-f", "--node", self.name,
             "--rundir", self.rundir, "-c", self.conf], stdout=log, stderr=log, env=self.env)
        log.close()

    def wait_ready(self) -> None:
        """Wait until the replfsd spawned answers on its socket."""
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise PairError(f"replfsd {self.name} exited: {self.log()}")
            try:
                with SyncClient(socket_path(self.rundir), timeout=2) as c:
                    c.call("ping")
                return
            except Exception:
                time.sleep(0.05)
        raise PairError(f"replfsd {self.name} did not start")

    def kill9(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill9()
        self.proc = None

    def client(self) -> SyncClient:
        return SyncClient(socket_path(self.rundir))

    def status(self, res: str = "r0") -> dict:
        with self.client() as c:
            reply, _ = c.call("status", res=res)
            return reply["resources"][0]

    def wait(self, pred, timeout: float = 30, what: str = "condition",
             res: str = "r0") -> dict:
        deadline = time.monotonic() + timeout
        st = None
        while time.monotonic() < deadline:
            try:
                st = self.status(res)
                if pred(st):
                    return st
            except Exception:
                pass
            time.sleep(0.05)
        raise PairError(f"{self.name}: timed out waiting for {what}; last status {st}")

    def log(self) -> str:
        text = ""
        for name in ("run/replfsd.log", "replfsd.out"):
            try:
                with open(os.path.join(self.root, name)) as f:
                    text += f.read()
            except OSError:
                pass
        return text


class LocalPair:
    def __init__(self, root, protocol="C", extra_net="", proxy_port=None, size=SIZE,
                 extra_res="", dual: bool = False, addrs: tuple[str, str] = ADDRS,
                 launchers: tuple[list, list] = ([], [])):
        """``extra_net``: lines for the common net section; ``extra_res``:
        for the resource (disk/handlers sections, as text).  ``dual``: a
        second resource r1 as the seed's step 9 has it (protocol C,
        allow-two-primaries).  ``addrs``: alpha's and beta's replication
        addresses; ``launchers``: the argv prefix each node's replfsd is
        started with (both for nodes in network namespaces)."""
        self.root = str(root)
        port = free_port("127.0.0.1")
        self.port = port
        self.alpha = Node("alpha", addrs[0], os.path.join(self.root, "alpha"),
                          launcher=list(launchers[0]))
        self.beta = Node("beta", addrs[1], os.path.join(self.root, "beta"),
                         launcher=list(launchers[1]))
        env = dict(os.environ)
        env.pop("REPLFS_NODE", None)
        # the backing disks' last-known sizes (resize), kept with the pair
        env.setdefault("REPLFS_STATEDIR", os.path.join(self.root, "state"))
        for n in self.nodes:
            os.makedirs(n.root, exist_ok=True)
            n.env = env
            n.disk = os.path.join(n.root, "disk.img")
            with open(n.disk, "wb") as f:
                f.truncate(size)
        if dual:
            port1 = free_port("127.0.0.1")
            for n in self.nodes:
                with open(os.path.join(n.root, "disk1.img"), "wb") as f:
                    f.truncate(size)
        fields = dict(protocol=protocol, extra_net=extra_net,
                      extra_res=("\n" + extra_res.strip("\n")) if extra_res else "",
                      alpha_dev=os.path.join(self.alpha.root, "drbd0"),
                      beta_dev=os.path.join(self.beta.root, "drbd0"),
                      alpha_disk=self.alpha.disk, beta_disk=self.beta.disk,
                      alpha_addr=f"{addrs[0]}:{port}", beta_addr=f"{addrs[1]}:{port}")
        if dual:
            fields.update(alpha_dev1=os.path.join(self.alpha.root, "drbd1"),
                          beta_dev1=os.path.join(self.beta.root, "drbd1"),
                          alpha_disk1=os.path.join(self.alpha.root, "disk1.img"),
                          beta_disk1=os.path.join(self.beta.root, "disk1.img"),
                          alpha_addr1=f"127.0.0.1:{port1}", beta_addr1=f"127.0.0.2:{port1}")
        for n in self.nodes:
            f = dict(fields)
            if proxy_port and n is self.alpha:
                # alpha connects to beta through the proxy.
                f["beta_addr"] = f"127.0.0.3:{proxy_port}"
            n.conf = os.path.join(n.root, "replfs.conf")
            with open(n.conf, "w") as fh:
                fh.write(CONF.format(**f))
                if dual:
                    fh.write(R1.format(**f))

    @property
    def nodes(self):
        return (self.alpha, self.beta)

    def both(self, fn) -> None:
        """``fn(node)`` for both nodes at once (each in a thread); the first
        failure is raised once both are done."""
        import threading
        errors: list[BaseException] = []

        def one(n):
            try:
                fn(n)
            except BaseException as e:      # noqa: BLE001 -- re-raised below
                errors.append(e)
        threads = [threading.Thread(target=one, args=(n,)) for n in self.nodes]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]

    def start_both(self) -> None:
        """Start both daemons at once and wait until both answer."""
        for n in self.nodes:
            n.spawn()
        for n in self.nodes:
            n.wait_ready()

    def up_fresh(self):
        """create-md, start daemons, up, force alpha Primary, wait for sync."""
        self.both(lambda n: n.adm("create-md", "r0"))
        self.start_both()
        self.both(lambda n: n.adm("up", "r0"))
        self.alpha.wait(lambda s: s["cstate"] == "Connected", what="connection")
        self.alpha.adm("primary", "--force", "r0")
        self.wait_synced()

    def wait_synced(self, timeout=60):
        for n in self.nodes:
            n.wait(lambda s: s["cstate"] == "Connected" and s["dstate"] == "UpToDate"
                   and s["pdsk"] == "UpToDate", timeout, what="both disks UpToDate")

    def teardown(self):
        for n in self.nodes:        # (SIGTERM both first: they go down together)
            if n.proc is not None and n.proc.poll() is None:
                n.proc.send_signal(signal.SIGTERM)
        for n in self.nodes:
            n.stop()
        # A replfsd killed with -9 leaves its FUSE mounts (device files,
        # filesystems) dead until unmounted; a restarted one would detach
        # them, a test that ends does it here.
        from replfs.fuse import mount as fmount
        for m in fmount.mounts():
            if m.fstype.startswith("fuse.replfs") and \
                    m.mountpoint.startswith(os.path.join(self.root, "")):
                try:
                    fmount.sys_umount2(m.mountpoint, fmount.MNT_DETACH)
                except OSError:
                    pass




def read_data(path: str, size: int) -> bytes:
    with open(path, "rb") as f:
        return f.read(size)
