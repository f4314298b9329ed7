"""NFS-Ganesha in front of a replfs mount: the configuration, and the
server's start, stop, reload and status.

What it is for: ``replfsadm nfs`` (replfs/cli/nfs.py) and the HA agents
serve a mounted replfs volume over NFSv3 and NFSv4.x with NFS-Ganesha's
VFS backend, one Ganesha process per exported resource on a node, bound to
the export's address (the floating address in an active/passive pair).

What makes it safe to fail over:

* File handles are the same bytes on both nodes and across remounts.  A
  Ganesha VFS handle holds the export id, the filesystem id and the
  kernel's handle of the file.  The kernel handle is replfs's own (inode
  number and generation from the volume); the export id is fixed here;
  the filesystem id is derived from the volume's UUID and given to
  Ganesha by the preload library (fsid_preload.c), because on FUSE
  Ganesha would otherwise take the mount's anonymous device number.
  ``start`` checks that the root handle Ganesha hands out carries it.
* NFSv4 state lives on the shared volume (``.nfs-ganesha/ADDRESS``), so
  the node that takes over an address finds the clients of the node that
  had it and gives them a grace period to reclaim.  A server bound to
  every address has one of its own per node (``.nfs-ganesha/node-NAME``):
  two servers must never share one, or each would count the other's
  clients as its own.  The directory is mode 0700, root's: with
  root_squash no client can enter it (NFS has no way to leave a name of
  the exported tree out, so clients do see the name).
* No delegations and no NLM: locks are not shared between the two
  servers, so the supported mode is one active server per address.

Pure functions (``render_config``, ``derive_ids``) are unit-tested; the
rest runs Ganesha and is tested with real servers in
tests/integration/test_nfs_export.py.
"""
from __future__ import annotations

import ipaddress
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field

from replfs.errors import EXIT_CONFIG, EXIT_EXEC, EXIT_USAGE, ReplfsError

GANESHA = "ganesha.nfsd"
SHIM_NAME = "libreplfs-fsid.so"
SHIM_SOURCE = os.path.join(os.path.dirname(__file__), "fsid_preload.c")
RECOVERY_DIR = ".nfs-ganesha"


@dataclass
class ExportSpec:
    """One resource's export on one node."""
    resource: str
    mountpoint: str
    uuid: str                      # the volume's UUID, 32 hex digits
    address: str = ""              # "" = every address of the node
    port: int = 2049
    mount_port: int = 20048
    export_id: int | None = None   # None: derived from the UUID
    pseudo: str = ""               # "" = /RESOURCE
    access: str = "RW"             # RW or RO
    clients: list[str] = field(default_factory=lambda: ["*"])
    protocols: tuple[str, ...] = ("3", "4")
    grace: int = 90
    lease: int = 60
    squash: str = "root_squash"
    log_level: str = "NIV_EVENT"
    node: str = ""                 # this node's name: the recovery directory
                                   # of a server without an address


def derive_ids(uuid_hex: str) -> tuple[int, int, int]:
    """(fsid high word, fsid low word, export id) from a volume UUID: the
    same on every node and at every mount of the volume."""
    if not re.fullmatch(r"[0-9a-fA-F]{32}", uuid_hex or ""):
        raise ReplfsError(f"not a volume UUID: {uuid_hex!r}", EXIT_CONFIG)
    v = int(uuid_hex, 16)
    hi, lo = (v >> 96) & 0xFFFFFFFF, (v >> 64) & 0xFFFFFFFF
    if hi == lo == 0:
        lo = 1                      # 0.0 would mean "no fsid" to Ganesha
    export_id = 1 + (v % 65534)     # 1..65534 (0 is the pseudo root)
    return hi, lo, export_id


def recovery_root(spec: ExportSpec) -> str:
    """Where Ganesha keeps the NFSv4 clients of this export's address: on
    the shared volume, so the node that takes the address over finds them.
    Without an address (every address of the node) there is nothing to
    take over: the node's own directory, never one two servers share."""
    if spec.address:
        return os.path.join(spec.mountpoint, RECOVERY_DIR, spec.address)
    if not spec.node:
        raise ReplfsError("a server without --address needs the node's name for its NFSv4 "
                          "recovery directory (--node)", EXIT_USAGE)
    return os.path.join(spec.mountpoint, RECOVERY_DIR, f"node-{spec.node}")


def check_spec(spec: ExportSpec) -> None:
    """Refuse what Ganesha would refuse later, or misread, with the option's name."""
    if spec.node and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", spec.node):
        raise ReplfsError(f"--node: '{spec.node}' is not a node name (letters, digits, "
                          f"'.', '_', '-')", EXIT_USAGE)
    if spec.address:
        try:
            ipaddress.ip_address(spec.address)
        except ValueError:
            raise ReplfsError(f"--address: '{spec.address}' is not an IP address",
                              EXIT_USAGE) from None
    for name in ("port", "mount_port"):
        if not 1 <= getattr(spec, name) <= 65535:
            raise ReplfsError(f"--{name.replace('_', '-')}: {getattr(spec, name)} is not "
                              f"a port number", EXIT_USAGE)
    if spec.export_id is not None and not 1 <= spec.export_id <= 65535:
        raise ReplfsError(f"--export-id: {spec.export_id} is out of range (1-65535)",
                          EXIT_USAGE)
    if spec.pseudo and (not spec.pseudo.startswith("/") or spec.pseudo == "/"
                        or re.search(r"[\s;{}\"]", spec.pseudo)):
        raise ReplfsError(f"--pseudo: '{spec.pseudo}' must be an absolute path other than "
                          f"/, without spaces, quotes, braces or ';'", EXIT_USAGE)
    if spec.access not in ("RW", "RO"):
        raise ReplfsError(f"--access: '{spec.access}' (rw or ro)", EXIT_USAGE)
    for c in spec.clients:
        if not c or re.search(r"[\s;{}\",]", c):
            raise ReplfsError(f"--clients: '{c}' is not a host, network or '*'", EXIT_USAGE)
    if not spec.protocols or any(p not in ("3", "4") for p in spec.protocols):
        raise ReplfsError(f"--protocols: '{','.join(spec.protocols)}' (3, 4 or 3,4)",
                          EXIT_USAGE)
    if not 0 <= spec.lease <= 120:
        raise ReplfsError(f"--lease: {spec.lease} is out of range (0-120 seconds)", EXIT_USAGE)
    if not spec.lease <= spec.grace <= 180:
        raise ReplfsError(f"--grace: {spec.grace} must be from the lease ({spec.lease}) to "
                          f"180 seconds", EXIT_USAGE)
    if spec.squash not in ("root_squash", "no_root_squash", "all_squash"):
        raise ReplfsError(f"--squash: '{spec.squash}' (root_squash, no_root_squash or "
                          f"all_squash)", EXIT_USAGE)
    if re.search(r"[\s;{}\"]", spec.mountpoint):
        raise ReplfsError(f"{spec.mountpoint}: Ganesha's configuration cannot name a "
                          f"path with spaces, quotes, braces or ';'", EXIT_USAGE)


def render_config(spec: ExportSpec) -> str:
    """The Ganesha configuration serving ``spec``."""
    check_spec(spec)
    hi, lo, derived = derive_ids(spec.uuid)
    export_id = spec.export_id or derived
    pseudo = spec.pseudo or f"/{spec.resource}"
    protocols = ", ".join(spec.protocols)
    bind = f"\tBind_addr = {spec.address};\n" if spec.address else ""
    return f"""\
# NFS-Ganesha configuration for replfs resource {spec.resource}, written by
# replfsadm nfs.  Volume {spec.uuid}; filesystem id {hi:#x}.{lo:#x} is given to
# Ganesha by {SHIM_NAME} (LD_PRELOAD), see replfsadm-nfs(8).
NFS_CORE_PARAM {{
{bind}\tNFS_Port = {spec.port};
\tMNT_Port = {spec.mount_port};
\tProtocols = {protocols};
\tmount_path_pseudo = true;
\t# locks are not shared between the two nodes' servers: no NLM (NFSv3
\t# locks), NFSv4 locks only on the one server that holds the address
\tEnable_NLM = false;
\tEnable_RQUOTA = false;
\tEnable_UDP = false;
\tClustered = false;
}}
NFSV4 {{
\tRecoveryBackend = fs;
\tRecoveryRoot = {recovery_root(spec)};
\tGrace_Period = {spec.grace};
\tLease_Lifetime = {spec.lease};
\tDelegations = false;
}}
EXPORT_DEFAULTS {{
\tAccess_Type = None;
}}
EXPORT {{
\tExport_Id = {export_id};
\tPath = {spec.mountpoint};
\tPseudo = {pseudo};
\tProtocols = {protocols};
\tTransports = TCP;
\tSecType = sys;
\tFilesystem_Id = {hi}.{lo};
\t# the other node changes files under this server: take attributes from
\t# the mount (whose cluster locks keep them current) at every call
\tAttr_Expiration_Time = 0;
\tCLIENT {{
\t\tClients = {", ".join(spec.clients)};
\t\tAccess_Type = {spec.access};
\t\tSquash = {spec.squash};
\t}}
\tFSAL {{
\t\tName = VFS;
\t}}
}}
"""


# ------------------------------------------------------------ the preload
def shim_path() -> str:
    """The preload library, built from fsid_preload.c when missing or older
    than its source (setup builds it; a C compiler is needed only then)."""
    candidates = [os.path.join(os.path.dirname(__file__), SHIM_NAME),
                  os.path.join("/var/lib/replfs", SHIM_NAME)]
    for path in candidates:
        if os.path.exists(path) and os.path.getmtime(path) >= os.path.getmtime(SHIM_SOURCE):
            return path
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise ReplfsError(f"{SHIM_NAME} is not built and there is no C compiler to build "
                          f"it from {SHIM_SOURCE} (install gcc, or run scripts/setup.sh)",
                          EXIT_EXEC)
    errors = []
    for path in candidates:
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.{os.getpid()}.tmp"
            r = subprocess.run([cc, "-shared", "-fPIC", "-O2", "-Wall", "-o", tmp,
                                SHIM_SOURCE, "-ldl"], capture_output=True, text=True)
            if r.returncode:
                raise ReplfsError(f"building {SHIM_NAME} failed:\n{r.stderr.strip()}",
                                  EXIT_EXEC)
            os.chmod(tmp, 0o755)
            os.replace(tmp, path)
            return path
        except OSError as e:
            errors.append(f"{path}: {e.strerror or e}")
    raise ReplfsError(f"cannot build {SHIM_NAME}: {'; '.join(errors)}", EXIT_EXEC)


# ------------------------------------------------------------ the server
@dataclass
class Paths:
    dir: str

    @property
    def conf(self):
        return os.path.join(self.dir, "ganesha.conf")

    @property
    def pid(self):
        return os.path.join(self.dir, "ganesha.pid")

    @property
    def log(self):
        return os.path.join(self.dir, "ganesha.log")

    @property
    def fsids(self):
        return os.path.join(self.dir, "fsids")

    @property
    def spec(self):
        return os.path.join(self.dir, "export")


def read_pid(paths: Paths) -> int | None:
    """The running Ganesha's pid, or None (no pid file, or a dead one)."""
    try:
        with open(paths.pid) as f:
            pid = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    try:
        with open(f"/proc/{pid}/comm") as f:
            if not f.read().strip().startswith("ganesha"):
                return None
    except OSError:
        return None
    return pid


def _pid_written(paths: Paths) -> int | None:
    """The pid in the pid file, once Ganesha wrote it (it creates the file
    first), whether or not that process still runs."""
    try:
        with open(paths.pid) as f:
            text = f.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def is_replfs_mount(path: str) -> bool:
    real = os.path.realpath(path)
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) > 2 and parts[1].replace("\\040", " ") == real \
                        and parts[2] == "fuse.replfs":
                    return True
    except OSError:
        pass
    return False


def _rpcbind_running() -> bool:
    if os.path.exists("/run/rpcbind.sock"):
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.settimeout(1)
                s.connect("/run/rpcbind.sock")
                return True
        except OSError:
            pass
    try:
        with socket.create_connection(("127.0.0.1", 111), timeout=1):
            return True
    except OSError:
        return False


def _probe_host(spec: ExportSpec) -> str:
    return spec.address or "127.0.0.1"


def start(spec: ExportSpec, paths: Paths, *, timeout: float = 30.0, log=print) -> int:
    """Write the configuration and start Ganesha; return once it answers on
    its port and its root handle carries the volume's fsid.  Returns the pid."""
    from . import rpc
    if not is_replfs_mount(spec.mountpoint):
        raise ReplfsError(f"{spec.mountpoint} is not a mounted replfs volume", EXIT_CONFIG)
    if shutil.which(GANESHA) is None:
        raise ReplfsError(f"{GANESHA} is not installed (Debian: apt-get install nfs-ganesha "
                          f"nfs-ganesha-vfs)", EXIT_EXEC)
    if read_pid(paths) is not None:
        raise ReplfsError(f"resource {spec.resource}: NFS-Ganesha is already running "
                          f"(pid {read_pid(paths)}); 'replfsadm nfs reload' applies a new "
                          f"configuration", EXIT_EXEC)
    if not _rpcbind_running():
        raise ReplfsError("rpcbind is not running; Ganesha registers NFS and MOUNT with it "
                          "(systemctl start rpcbind, or run rpcbind -w)", EXIT_EXEC)
    text = render_config(spec)
    hi, lo, _ = derive_ids(spec.uuid)
    shim = shim_path()
    os.makedirs(paths.dir, mode=0o755, exist_ok=True)
    os.makedirs(recovery_root(spec), mode=0o700, exist_ok=True)
    # the clients' records: out of reach of (root-squashed) NFS clients
    os.chmod(os.path.join(spec.mountpoint, RECOVERY_DIR), 0o700)
    _write(paths.conf, text)
    _write(paths.fsids, f"{os.path.realpath(spec.mountpoint)}\t{hi:08x}\t{lo:08x}\n")
    _write(paths.spec, _spec_text(spec))
    env = dict(os.environ, LD_PRELOAD=shim, REPLFS_NFS_FSIDS=paths.fsids)
    try:
        os.unlink(paths.pid)
    except FileNotFoundError:
        pass
    r = subprocess.run([GANESHA, "-f", paths.conf, "-L", paths.log, "-p", paths.pid,
                        "-N", spec.log_level], env=env, capture_output=True, text=True,
                       stdin=subprocess.DEVNULL, timeout=timeout)
    if r.returncode:
        raise ReplfsError(f"{GANESHA} exited {r.returncode}: {r.stderr.strip()}\n"
                          f"{_tail(paths.log)}", EXIT_EXEC)
    deadline = time.monotonic() + timeout
    last = ""
    while True:
        pid = _pid_written(paths)
        try:
            if pid is not None and not _alive(pid):
                raise ReplfsError(f"NFS-Ganesha for {spec.resource} died at start:\n"
                                  f"{_tail(paths.log)}", EXIT_EXEC)
            if pid is not None:
                rpc.probe(_probe_host(spec), spec.port)
                break
        except rpc.RPCError as e:
            last = str(e)
        if time.monotonic() > deadline:
            if pid is not None:
                _kill(pid, 5.0)
            raise ReplfsError(f"NFS-Ganesha for {spec.resource} did not answer on "
                              f"{_probe_host(spec)}:{spec.port} within {timeout:g} s "
                              f"({last or 'no pid file'}):\n{_tail(paths.log)}", EXIT_EXEC)
        time.sleep(0.1)
    if "3" in spec.protocols:
        fh = None
        while fh is None:
            try:
                with rpc.MountClient(_probe_host(spec), spec.mount_port) as m:
                    fh = m.mnt(spec.pseudo or f"/{spec.resource}")
            except (rpc.RPCError, rpc.NFSError) as e:
                if time.monotonic() > deadline:
                    _kill(pid, 5.0)
                    raise ReplfsError(f"NFS-Ganesha for {spec.resource} serves no export "
                                      f"({e}):\n{_tail(paths.log)}", EXIT_EXEC) from None
                time.sleep(0.1)
        if fsid_bytes(hi, lo) not in fh:
            _kill(pid, 5.0)
            raise ReplfsError(f"NFS-Ganesha's handles for {spec.mountpoint} do not carry "
                              f"the volume's filesystem id {hi:#x}.{lo:#x} ({SHIM_NAME} not "
                              f"loaded?): they would go stale on failover; stopped it",
                              EXIT_EXEC)
    return pid


def fsid_bytes(hi: int, lo: int) -> bytes:
    """How the fsid appears inside a Ganesha VFS handle (two host-order
    32-bit words)."""
    import struct
    return struct.pack("=II", hi, lo)


def stop(paths: Paths, *, timeout: float = 30.0) -> tuple[int | None, bool]:
    """Stop the Ganesha of ``paths``: SIGTERM, and SIGKILL if it is still
    there after ``timeout``.  Returns (pid or None if none ran, killed?)."""
    pid = read_pid(paths)
    if pid is None:
        return None, False
    killed = _kill(pid, timeout)
    try:
        os.unlink(paths.pid)
    except FileNotFoundError:
        pass
    return pid, killed


def reload(spec: ExportSpec, paths: Paths) -> int:
    """Write the new configuration and have the running Ganesha re-read its
    exports (SIGHUP).  Ganesha 4.3 re-reads only its EXPORT, EXPORT_DEFAULTS
    and LOG blocks (ganesha-config(8)): NFS_CORE_PARAM (address, ports,
    protocols) and NFSV4 (grace, lease) need a restart, and the caller
    refuses them (replfs/cli/nfs.py)."""
    pid = read_pid(paths)
    if pid is None:
        raise ReplfsError(f"resource {spec.resource}: NFS-Ganesha is not running", EXIT_EXEC)
    _write(paths.conf, render_config(spec))
    _write(paths.spec, _spec_text(spec))
    os.kill(pid, signal.SIGHUP)
    return pid


def _kill(pid: int, timeout: float) -> bool:
    """SIGTERM, wait up to timeout, then SIGKILL; True if it had to be killed."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(pid):
            return False
        time.sleep(0.05)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return False
    for _ in range(100):
        if not _alive(pid):
            break
        time.sleep(0.05)
    return True


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return False


def _write(path: str, text: str) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _tail(path: str, lines: int = 8) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:]).rstrip()
    except OSError as e:
        return f"(no log {path}: {e.strerror})"


def _spec_text(spec: ExportSpec) -> str:
    import json
    return json.dumps(spec.__dict__, sort_keys=True) + "\n"


def load_spec(paths: Paths) -> ExportSpec | None:
    import json
    try:
        with open(paths.spec) as f:
            d = json.load(f)
        d["protocols"] = tuple(d["protocols"])
        return ExportSpec(**d)
    except (OSError, ValueError, TypeError, KeyError):
        return None
