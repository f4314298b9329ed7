"""Two nodes in two network namespaces joined by a veth pair, and the
network faults a Jepsen-style test puts between them.

``NetnsPair`` makes ``replfs-<token>-a`` and ``replfs-<token>-b`` (a
random token per pair, so parallel runs never collide), a veth pair
``rf<token>a``/``rf<token>b`` between them with 10.77.0.1/24 and
10.77.0.2/24, and in each namespace an nftables table ``replfs_fault``
with empty input and output chains.  Nothing outside these namespaces is
touched: the addresses exist only inside them.  ``destroy()`` (also run
at interpreter exit for a pair not yet destroyed) kills whatever still
runs in the namespaces and deletes them, which deletes the veth pair.

A node's replfsd runs in its namespace through ``launchers[i]``:
``nsenter --net=/run/netns/NAME --``.  Not ``ip netns exec``: that also
unshares the mount namespace and makes the whole tree a slave of the
host's (so that it can remount /sys), and a FUSE mount the daemon then
makes would exist only in its private mount namespace -- invisible to the
test process, to mount(8) and umount(8).  nsenter --net switches only
the network namespace, so the daemon's mounts land in the one mount
namespace the test uses.  The admin socket is a path in the filesystem,
which reaches the daemon from any network namespace; the test process
itself never talks to 10.77.0.x.

Faults (``cut``, ``link``, ``heal``):

* ``cut("both")``: every packet between the nodes is dropped, silently
  (a symmetric partition);
* ``cut("a->b")`` / ``cut("b->a")``: only the packets from alpha to beta
  (from beta to alpha) are dropped: a one-way partition, where TCP's data
  gets through one way and its acknowledgements do not;
* ``link(False)``: the veth is set down (sends fail with no route);
* ``heal()``: all of these undone.

nftables needs /usr/sbin/nft (scripts/setup.sh installs it).  Without it
``cut`` falls back to setting the link down, and says so in ``events``.
"""
from __future__ import annotations

import atexit
import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time

NFT = "/usr/sbin/nft"
TABLE = "replfs_fault"
SUBNET = "10.77.0"


def _ip() -> str | None:
    return shutil.which("ip") or next((p for p in ("/usr/sbin/ip", "/sbin/ip")
                                       if os.path.exists(p)), None)


def _run(argv, check=True, timeout=30) -> subprocess.CompletedProcess:
    cp = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if check and cp.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {cp.returncode}: {cp.stderr.strip()}")
    return cp


def have_nft() -> bool:
    return os.access(NFT, os.X_OK)


def unusable_reason() -> str | None:
    """Why two namespaces cannot be made here, or None if they can (a
    probe namespace is created and deleted to find out)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if _ip() is None:
        return "no ip(8) (iproute2)"
    if shutil.which("nsenter") is None:
        return "no nsenter(1) (util-linux)"
    name = f"replfs-probe-{secrets.token_hex(4)}"
    cp = _run([_ip(), "netns", "add", name], check=False)
    if cp.returncode != 0:
        return f"ip netns add failed: {cp.stderr.strip()}"
    _run([_ip(), "netns", "del", name], check=False)
    return None


_live: set["NetnsPair"] = set()


@atexit.register
def _destroy_all() -> None:
    for pair in list(_live):
        pair.destroy()


class NetnsPair:
    O2NET_PORT = 7777             # the same in both namespaces: nothing else listens there

    def __init__(self) -> None:
        token = secrets.token_hex(4)
        self.ns = (f"replfs-{token}-a", f"replfs-{token}-b")
        self.veth = (f"rf{token}a", f"rf{token}b")
        self.addrs = (f"{SUBNET}.1", f"{SUBNET}.2")
        self.launchers = tuple(["nsenter", f"--net=/run/netns/{ns}", "--"] for ns in self.ns)
        self.nft = have_nft()
        self.events: list[str] = []      # what was done, with times (for failure reports)
        self._t0 = time.monotonic()
        self._made: list[str] = []

    # -- life ------------------------------------------------------------------

    def create(self) -> "NetnsPair":
        ip = _ip()
        _live.add(self)
        try:
            for ns in self.ns:
                _run([ip, "netns", "add", ns])
                self._made.append(ns)
                _run([ip, "-n", ns, "link", "set", "lo", "up"])
            _run([ip, "link", "add", self.veth[0], "type", "veth", "peer", "name",
                  self.veth[1]])
            for i, ns in enumerate(self.ns):
                # (moved into the namespace at once: the veth never has an
                # address outside it; a failure here leaves it in the host,
                # where destroy() deletes it)
                _run([ip, "link", "set", self.veth[i], "netns", ns])
                _run([ip, "-n", ns, "addr", "add", f"{self.addrs[i]}/24", "dev", self.veth[i]])
                _run([ip, "-n", ns, "link", "set", self.veth[i], "up"])
                if self.nft:
                    self._nft(i, f"add table inet {TABLE}")
                    for chain, hook in (("input", "input"), ("output", "output")):
                        self._nft(i, f"add chain inet {TABLE} {chain} "
                                     f"{{ type filter hook {hook} priority 0; policy accept; }}")
            self.wait_link()
        except BaseException:
            self.destroy()
            raise
        return self

    def destroy(self) -> None:
        """Kill what still runs in the namespaces, delete them (and the veth)."""
        ip = _ip()
        for ns in list(self._made):
            cp = _run([ip, "netns", "pids", ns], check=False)
            for pid in cp.stdout.split():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGCONT)
                    os.kill(int(pid), signal.SIGKILL)
        deadline = time.monotonic() + 10
        for ns in list(self._made):
            while _run([ip, "netns", "pids", ns], check=False).stdout.split() and \
                    time.monotonic() < deadline:
                time.sleep(0.05)
            _run([ip, "netns", "del", ns], check=False)
            self._made.remove(ns)
        # a veth that was never moved into a namespace
        if _run([ip, "link", "show", self.veth[0]], check=False).returncode == 0:
            _run([ip, "link", "del", self.veth[0]], check=False)
        _live.discard(self)

    def __enter__(self) -> "NetnsPair":
        return self.create()

    def __exit__(self, *exc) -> None:
        self.destroy()

    def exists(self) -> bool:
        return any(os.path.exists(f"/run/netns/{ns}") for ns in self.ns)

    # -- commands in a namespace -----------------------------------------------

    def run(self, i: int, *argv: str, check: bool = True) -> subprocess.CompletedProcess:
        return _run([*self.launchers[i], *argv], check=check)

    def _nft(self, i: int, rule: str) -> None:
        _run([_ip(), "netns", "exec", self.ns[i], NFT, rule])

    def wait_link(self, timeout: float = 10.0) -> None:
        """Until alpha's namespace can reach beta's address (a TCP SYN answered
        by a refusal or an accept is enough)."""
        probe = ("import socket,sys\n"
                 "s=socket.socket(); s.settimeout(0.5)\n"
                 "try: s.connect((sys.argv[1], 9))\n"
                 "except ConnectionRefusedError: pass\n")
        deadline = time.monotonic() + timeout
        while True:
            cp = self.run(0, sys.executable, "-c", probe, self.addrs[1], check=False)
            if cp.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.ns[0]} cannot reach {self.addrs[1]}: {cp.stderr}")
            time.sleep(0.05)

    # -- faults ----------------------------------------------------------------

    def note(self, what: str) -> None:
        self.events.append(f"{time.monotonic() - self._t0:7.2f}s {what}")

    def cut(self, direction: str = "both") -> str:
        """Drop packets between the nodes: "both", "a->b" or "b->a".  Returns
        what was done ("link down" when nft is missing)."""
        if direction not in ("both", "a->b", "b->a"):
            raise ValueError(direction)
        if not self.nft:
            self.link(False)
            self.note(f"cut {direction}: no nft, link down instead")
            return "link down"
        if direction in ("both", "a->b"):
            self._nft(0, f"add rule inet {TABLE} output ip daddr {self.addrs[1]} drop")
            self._nft(1, f"add rule inet {TABLE} input ip saddr {self.addrs[0]} drop")
        if direction in ("both", "b->a"):
            self._nft(1, f"add rule inet {TABLE} output ip daddr {self.addrs[0]} drop")
            self._nft(0, f"add rule inet {TABLE} input ip saddr {self.addrs[1]} drop")
        self.note(f"cut {direction}")
        return f"cut {direction}"

    def link(self, up: bool) -> None:
        for i, ns in enumerate(self.ns):
            _run([_ip(), "-n", ns, "link", "set", self.veth[i], "up" if up else "down"])
        self.note(f"link {'up' if up else 'down'}")

    def heal(self) -> None:
        if self.nft:
            for i in range(2):
                for chain in ("input", "output"):
                    self._nft(i, f"flush chain inet {TABLE} {chain}")
        self.link(True)
        self.note("healed")

    def rules(self) -> str:
        if not self.nft:
            return "(no nft)"
        return "\n".join(_run([_ip(), "netns", "exec", ns, NFT, "list", "ruleset"],
                              check=False).stdout for ns in self.ns)
