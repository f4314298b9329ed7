"""replfsadm: drbdadm's verbs for replfs resources.

One table (VERBS) drives argument parsing, --help, dispatch and dry-run.
The command line follows drbdadm's:

    replfsadm [-c FILE] [--node NAME] [--rundir DIR] [-d] [--] [VERB-OPTIONS] VERB RESOURCE|all

Verb options may stand before the verb (after ``--``, the DRBD 8 way:
``replfsadm -- --overwrite-data-of-peer primary r0``) or after it
(``replfsadm primary --force r0``, ``replfsadm primary r1 -o``).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

from replfs.errors import EXIT_CONFIG, EXIT_EXEC, EXIT_TIMEOUT, EXIT_USAGE, ReplfsError
from replfs.filemode import check_secret_file
from replfs.ipc.client import DaemonNotRunning, SyncClient, rundir_from_env, socket_path

from . import render

VERSION = "0.1.0"


@dataclass
class Ctx:
    config_path: str
    node: str
    rundir: str
    dry_run: bool
    opts: dict
    out: Callable[[str], None]
    err: Callable[[str], None]
    write: Callable[[str], None] | None = None   # output without a newline (progress dots)
    stdin: object = None                          # where the boot wait reads 'yes'
    _config: object = None

    def config(self):
        if self._config is None:
            from replfs.blockrepl import conf as confmod
            if not os.path.exists(self.config_path):
                raise ReplfsError(f"Can not open '{self.config_path}': No such file or directory",
                                  EXIT_CONFIG)
            self._config = confmod.load(self.config_path)
            for w in self._config.warnings:
                self.err(w)
            for path in self._config.secret_files:
                w = check_secret_file(path, "it holds a shared-secret and",
                                      "anyone who reads it can pose as a peer")
                if w:
                    self.err(f"warning: {w}")
        return self._config

    def client(self) -> SyncClient:
        return SyncClient(socket_path(self.rundir))


@dataclass(frozen=True)
class Verb:
    name: str
    handler: Callable[[Ctx, str | None], None]
    needs_res: bool = True          # takes RESOURCE|all
    res_optional: bool = False
    summary: str = ""
    options: tuple[str, ...] = ()   # verb options it accepts
    group: str = "resource"


# ------------------------------------------------------------------ helpers
def _resources(ctx: Ctx, arg: str | None) -> list[str]:
    from replfs.blockrepl import conf as confmod
    config = ctx.config()
    if arg == "all":
        return [r.name for r in confmod.for_node(config, ctx.node)]
    if arg not in config.resources:
        raise ReplfsError(f"'{arg}' not defined in your config (for this host).", EXIT_CONFIG)
    confmod.check_node(config, config.resources[arg], ctx.node)
    return [arg]


def _daemon_call(ctx: Ctx, op: str, res: str | None = None, *, wait: bool = False,
                 **args) -> dict:
    """One request to replfsd; ``wait``: it may take any time (no socket
    timeout), for the verbs that wait for the peer."""
    if ctx.dry_run:
        extra = " ".join(f"--{k.replace('_', '-')}" for k, v in args.items() if v is True)
        ctx.out(f"replfsd {op}{' ' + extra if extra else ''}{' ' + res if res else ''}")
        return {}
    with (SyncClient(socket_path(ctx.rundir), timeout=None) if wait else ctx.client()) as c:
        reply, _ = c.call(op, res=res, conf=os.path.abspath(ctx.config_path), **args)
        return reply


def start_daemon(node: str, rundir: str, config: str | None, *, dry_run: bool = False,
                 out=print) -> None:
    """Start replfsd for ``node`` if none answers on ``rundir`` yet (used
    by ``up`` and by ``cluster load``)."""
    def ping() -> None:
        with SyncClient(socket_path(rundir), timeout=5) as c:
            c.call("ping")
    try:
        ping()
        return
    except DaemonNotRunning:
        pass
    cmd = [sys.executable, "-m", "replfs.daemon.main", "--node", node, "--rundir", rundir]
    if config:
        cmd += ["-c", os.path.abspath(config)]
    if dry_run:
        out(" ".join(["replfsd"] + cmd[3:]))
        return
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise ReplfsError(f"could not start replfsd: {proc.stderr.strip()}", EXIT_EXEC)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            ping()
            return
        except (DaemonNotRunning, OSError):
            time.sleep(0.05)
    raise ReplfsError(f"replfsd did not come up (see {rundir}/replfsd.log)", EXIT_EXEC)


def _start_daemon(ctx: Ctx) -> None:
    start_daemon(ctx.node, ctx.rundir, ctx.config_path, dry_run=ctx.dry_run, out=ctx.out)


def _status(ctx: Ctx, res: str | None = None) -> list[dict]:
    try:
        with ctx.client() as c:
            reply, _ = c.call("status", res=res)
            return reply["resources"]
    except DaemonNotRunning:
        return []


def _one_status(ctx: Ctx, res: str) -> dict | None:
    for st in _status(ctx):
        if st["name"] == res:
            return st
    return None


def _for_each(fn):
    """Make a per-resource handler accept RESOURCE|all."""
    def run(ctx: Ctx, arg: str | None) -> None:
        for res in _resources(ctx, arg):
            fn(ctx, res)
    run.__doc__ = fn.__doc__
    return run


# ------------------------------------------------------------------ verbs
@_for_each
def v_create_md(ctx: Ctx, res: str) -> None:
    from replfs.blockrepl.driver.disk import create_md
    st = _one_status(ctx, res)
    if st and st["dstate"] != "Diskless":
        raise ReplfsError(f"{res}: device is attached; 'replfsadm down {res}' first", EXIT_EXEC)
    rconf = ctx.config().resources[res]
    host = rconf.host(ctx.node)
    if ctx.dry_run:
        ctx.out(f"create-md {res} on {host.disk}")
        return
    for line in create_md(host, force=bool(ctx.opts.get("force")), al_extents=rconf.al_extents):
        ctx.out(line)


@_for_each
def v_dump_md(ctx: Ctx, res: str) -> None:
    from replfs.blockrepl.driver.disk import layout_for, read_superblock
    from replfs.blockrepl.meta import format as md
    st = _one_status(ctx, res)
    if st and st["dstate"] != "Diskless":
        raise ReplfsError(f"{res}: device is attached; 'replfsadm down {res}' before dump-md",
                          EXIT_EXEC)
    host = ctx.config().resources[res].host(ctx.node)
    try:
        sb = read_superblock(host)
    except md.MetaDataError as e:
        raise ReplfsError(f"{res}: {e}", EXIT_EXEC) from None
    path, _now = layout_for(host)
    lay = sb.layout         # (where the superblock says: a grown disk may differ)
    with open(path, "rb") as f:
        f.seek(lay.bm_offset)
        bits = f.read(lay.bm_bytes)
    from replfs.blockrepl.core.bitmap import Bitmap
    bm = Bitmap(lay.nblocks, bits)
    ctx.out(render.dump_md(res, host, sb, lay, bm))


def _cluster_node_names(ctx: Ctx) -> dict[int, str]:
    """Cluster node numbers -> names, from this node's cluster stack if it
    is online (a slot map records node numbers); {} otherwise."""
    try:
        with SyncClient(socket_path(ctx.rundir), timeout=5) as c:
            reply, _ = c.call("cluster-nodes")
        return {n["number"]: n["name"] for n in reply.get("nodes", [])}
    except (ReplfsError, OSError):
        return {}


def _read_volume(disk: str):
    """(superblock, slot map entries) of the replfs volume on a backing
    disk, (None, None) if there is none; OSError / FormatError as raised."""
    from replfs.fs import format as F
    with open(disk, "rb") as f:
        for bs in F.BLOCK_SIZES:
            f.seek(F.SB_OFFSET)
            raw = f.read(bs)
            if raw[:8] == F.SIG_SUPER and len(raw) == bs:
                try:
                    sb = F.Superblock.decode(raw, F.sb_blkno(bs))
                except F.FormatError:
                    continue
                if sb.block_size == bs:
                    f.seek(sb.slotmap_blk * sb.block_size)
                    slots = F.SlotMap.decode(f.read(sb.block_size), sb.volid,
                                             sb.slotmap_blk).slots
                    return sb, slots
    return None, None


def _slot_holders(slots, names: dict[int, str]) -> list[str]:
    from replfs.fs import format as F
    return [f"{names.get(node, f'node {node}')} (slot {i})"
            for i, (state, node, _gen) in enumerate(slots) if state == F.SLOT_IN_USE]


def v_mounted(ctx: Ctx, arg: str | None) -> None:
    """Like mounted.ocfs2: read each resource's local backing disk (no
    daemon needed, works on a Secondary) and show the replfs volumes on it
    and which node holds which slot."""
    from replfs.fs import format as F
    full = ctx.opts.get("full", False)
    names = _resources(ctx, arg or "all")
    node_names = _cluster_node_names(ctx) if full else {}
    rows = []
    for res in names:
        host = ctx.config().resources[res].host(ctx.node)
        try:
            sb, slots = _read_volume(host.disk)
        except OSError as e:
            rows.append((res, host.disk, "?", f"cannot read: {e.strerror}", "", ""))
            continue
        except F.FormatError as e:
            rows.append((res, host.disk, "replfs", f"damaged: {e}", "", ""))
            continue
        if sb is None:
            rows.append((res, host.disk, "-", "", "", ""))
            continue
        used = _slot_holders(slots, node_names)
        rows.append((res, host.disk, "replfs", ", ".join(used) or "Not mounted",
                     sb.uuid.hex().upper(), sb.label))
    if full:
        ctx.out(f"{'Device':<24} {'FS':<7} Nodes")
        for res, disk, fs, nodes, _u, _l in rows:
            ctx.out(f"{res:<24} {fs:<7} {nodes}")
    else:
        ctx.out(f"{'Device':<24} {'FS':<7} {'UUID':<33} Label")
        for res, disk, fs, nodes, uuid, label in rows:
            ctx.out(f"{res:<24} {fs:<7} {uuid or nodes:<33} {label}".rstrip())


@_for_each
def v_show_gi(ctx: Ctx, res: str) -> None:
    ctx.out(render.show_gi(res, _gi(ctx, res)))


@_for_each
def v_get_gi(ctx: Ctx, res: str) -> None:
    u, flags = _gi(ctx, res)
    ctx.out(f"{u}:{flags}")


def _gi(ctx: Ctx, res: str) -> tuple[str, str]:
    st = _one_status(ctx, res)
    if st and "uuids" in st:
        return st["uuids"], st["dstate"]
    from replfs.blockrepl.driver.disk import read_superblock
    from replfs.blockrepl.meta import format as md
    try:
        sb = read_superblock(ctx.config().resources[res].host(ctx.node))
    except md.MetaDataError as e:
        raise ReplfsError(f"{res}: {e}", EXIT_EXEC) from None
    state = ("Inconsistent" if not sb.has(md.F_CONSISTENT) else
             "Outdated" if sb.has(md.F_OUTDATED) else "UpToDate")
    return sb.uuids.show(), state


def v_up(ctx: Ctx, arg: str | None) -> None:
    """Bring resources up; with --wait, then wait for their peers as the
    boot script does (wait-con-int)."""
    names = _resources(ctx, arg)
    for res in names:
        _start_daemon(ctx)
        _daemon_call(ctx, "up", res)
    if ctx.opts.get("wait"):
        _boot_wait(ctx, names)


@_for_each
def v_down(ctx: Ctx, res: str) -> None:
    try:
        _daemon_call(ctx, "down", res)
    except DaemonNotRunning:
        pass
    except ReplfsError as e:
        if "no such resource is up" not in e.message:
            raise


def _simple(op: str, **fixed):
    @_for_each
    def handler(ctx: Ctx, res: str) -> None:
        args = {k: ctx.opts.get(v, False) for k, v in fixed.items()}
        if op in ("attach", "connect", "adjust"):
            _start_daemon(ctx)
        _daemon_call(ctx, op, res, **args)
    return handler


def v_primary(ctx: Ctx, arg: str | None) -> None:
    for res in _resources(ctx, arg):
        _daemon_call(ctx, "primary", res, force=bool(ctx.opts.get("force")))


def _size_option(text: str) -> int:
    """--size: bytes, or with a K/M/G/T suffix (powers of 1024), as mkfs.replfs."""
    from replfs.fs.mkfs import MkfsError, parse_size
    try:
        return parse_size(str(text))
    except MkfsError as e:
        raise ReplfsError(f"--size: {e}", EXIT_USAGE) from None


def v_resize(ctx: Ctx, arg: str | None) -> None:
    size = _size_option(ctx.opts["size"]) if ctx.opts.get("size") else 0
    for res in _resources(ctx, arg):
        reply = _daemon_call(ctx, "resize", res, wait=True,
                             assume_clean=bool(ctx.opts.get("assume_clean")), size=size)
        if reply and reply.get("size") == reply.get("old"):
            ctx.out(f"{res}: nothing to do: the device already has the size both backing "
                    f"disks allow ({reply['size'] // 1024} KiB)")


def v_connect(ctx: Ctx, arg: str | None) -> None:
    for res in _resources(ctx, arg):
        _start_daemon(ctx)
        _daemon_call(ctx, "connect", res, discard_my_data=bool(ctx.opts.get("discard_my_data")))


def _state_field(fn):
    @_for_each
    def handler(ctx: Ctx, res: str) -> None:
        st = _one_status(ctx, res)
        ctx.out(fn(st))
    return handler


v_role = _state_field(lambda st: f"{st['role']}/{st['peer_role']}" if st else "Unconfigured")
v_cstate = _state_field(lambda st: st["cstate"] if st else "Unconfigured")
v_dstate = _state_field(lambda st: f"{st['dstate']}/{st['pdsk']}" if st else "Unconfigured")


def v_status(ctx: Ctx, arg: str | None) -> None:
    names = _resources(ctx, arg or "all")
    sts = {st["name"]: st for st in _status(ctx)}
    if ctx.opts.get("json"):
        ctx.out(json.dumps([render.status_json(sts.get(n), n) for n in names], indent=2))
        return
    for n in names:
        ctx.out(render.status_text(sts.get(n), n, verbose=bool(ctx.opts.get("verbose"))))


def v_overview(ctx: Ctx, arg: str | None) -> None:
    names = _resources(ctx, arg or "all")
    sts = {st["name"]: st for st in _status(ctx)}
    ctx.out(render.overview([(n, sts.get(n), ctx.config().resources[n]) for n in names],
                            ctx.node, slots=_overview_slots(ctx, names)))


def _overview_slots(ctx: Ctx, names: list[str]) -> dict[str, str]:
    """For each resource whose replfs volume has slots in use (read from
    the local backing disk, as mounted.ocfs2 does): "alpha (slot 0), beta
    (slot 1)" -- the nodes that have it mounted."""
    from replfs.fs import format as F
    out: dict[str, str] = {}
    node_names = None
    for res in names:
        host = ctx.config().resources[res].host(ctx.node)
        if host is None:
            continue
        try:
            sb, slots = _read_volume(host.disk)
        except (OSError, F.FormatError):
            continue
        if sb is None:
            continue
        if node_names is None:
            node_names = _cluster_node_names(ctx)
        used = _slot_holders(slots, node_names)
        if used:
            out[res] = ", ".join(used)
    return out


def v_proc(ctx: Ctx, arg: str | None) -> None:
    sts = _status(ctx)
    # resources of this node's config that are down show as DRBD shows an
    # unconfigured minor
    down = []
    try:
        from replfs.blockrepl import conf as confmod
        up = {st["name"] for st in sts}
        for r in confmod.for_node(ctx.config(), ctx.node):
            host = r.host(ctx.node)
            if r.name not in up and host is not None:
                down.append(host.minor)
    except ReplfsError:
        pass            # no readable config: the daemon's view only
    ctx.out(render.proc_drbd(sts, unconfigured=down))


def _seconds(value, what: str) -> int:
    try:
        n = int(str(value), 10)
    except ValueError:
        n = -1
    if n < 0:
        raise ReplfsError(f"{what} expects a whole number of seconds (0: for ever), "
                          f"not '{value}'", EXIT_USAGE)
    return n


def _startup_timeouts(ctx: Ctx, res: str) -> dict:
    """wfc/degr/outdated seconds for res: the verb's options, else the
    resource's ``startup`` section, as drbdadm passes them to drbdsetup
    (a degr or outdated timeout left unset is None).  Notes about values
    the rules cut are printed once."""
    from replfs.blockrepl.core import startup
    section = ctx.config().resources[res].startup
    out: dict = {}
    for key, opt, option in (("wfc", "timeout", startup.WFC),
                             ("degr", "degr_timeout", startup.DEGR),
                             ("outdated", "outdated_timeout", startup.OUTDATED)):
        value = ctx.opts.get(opt)
        if value is None:
            value = section.get(option)
        out[key] = None if value is None else _seconds(value, option)
    out["wfc"] = out["wfc"] or 0
    for note in startup.effective(out["wfc"], out["degr"], out["outdated"])[1]:
        ctx.err(f"{res}: {note}")
    return out


def v_wait_connect(ctx: Ctx, arg: str | None) -> None:
    """Wait for the connection, as long as drbdsetup wait-connect would:
    wfc-timeout, or degr-wfc-timeout on a node that went down as a
    Primary without its peer, or outdated-wfc-timeout when the peer is
    Outdated; -t and the other verb options override the config."""
    for res in _resources(ctx, arg):
        _daemon_call(ctx, "wait-connect", res, wait=True, **_startup_timeouts(ctx, res))


def v_wait_sync(ctx: Ctx, arg: str | None) -> None:
    for res in _resources(ctx, arg):
        _daemon_call(ctx, "wait-sync", res, wait=True,
                     timeout=_seconds(ctx.opts.get("timeout") or 0, "--timeout"))


def v_wait_con_int(ctx: Ctx, arg: str | None) -> None:
    """drbdadm's wait-con-int: wait for the peers of all of this node's
    resources at once, as the boot script does."""
    from replfs.blockrepl import conf as confmod
    _boot_wait(ctx, [r.name for r in confmod.for_node(ctx.config(), ctx.node)])


# The boot wait prints a dot a second this long before it explains itself
# and offers to stop (drbdadm: 10 seconds).
QUIET_SECONDS = 10


def _boot_wait(ctx: Ctx, names: list[str]) -> None:
    """Wait for every resource in names to connect, each with its own
    startup timeout, in parallel, as the DRBD init script does with
    ``drbdadm wait-con-int``: dots first, then what it waits for and a
    prompt -- typing 'yes' stops waiting.  A timeout or a 'yes' is no
    error (booting goes on; exit 0); a resource that is not up, or a
    daemon that is not there, is."""
    import threading
    from replfs.blockrepl.core import startup
    waits = {res: _startup_timeouts(ctx, res) for res in names}
    if ctx.dry_run:
        for res in names:
            ctx.out(f"replfsd wait-connect {res}")
        return
    results: dict[str, ReplfsError | None] = {}
    clients: list[SyncClient] = []

    def wait_one(res: str) -> None:
        try:
            c = SyncClient(socket_path(ctx.rundir), timeout=None)
            clients.append(c)
            with c:
                c.call("wait-connect", res=res, conf=os.path.abspath(ctx.config_path),
                       **waits[res])
            results[res] = None
        except ReplfsError as e:
            results[res] = e
        except OSError as e:
            results[res] = ReplfsError(f"{res}: {e.strerror or e}", EXIT_EXEC)

    threads = [threading.Thread(target=wait_one, args=(r,), daemon=True) for r in names]
    for t in threads:
        t.start()

    def pending() -> list[str]:
        return [r for r, t in zip(names, threads) if t.is_alive()]

    write = ctx.write or ctx.out
    start = time.monotonic()
    dots = False
    stopped: set[str] = set()
    for _ in range(QUIET_SECONDS):
        _join(threads, 1.0)
        if not pending():
            break
        write(".")
        dots = True
    if pending():
        kinds = {}
        for res in pending():
            try:
                kinds[res] = _daemon_call(ctx, "timeout-type", res).get("kind", startup.WFC)
            except (ReplfsError, OSError):
                kinds[res] = startup.WFC
        ctx.out(_boot_banner(waits, kinds, dots))
        if _prompt_until_done(ctx, threads, pending, start):
            stopped = set(pending())
            for c in list(clients):
                c.abort()
    elif dots:
        ctx.out("")
    failed = []
    for res in names:
        e = results.get(res)
        if res in stopped:
            ctx.err(f"{res}: stopped waiting for the connection")
        elif e is None:
            continue
        elif e.exit_code == EXIT_TIMEOUT:
            ctx.err(e.message)
        else:
            failed.append(e)
    for e in failed:
        ctx.err(e.message)
    if failed:
        raise ReplfsError(f"could not wait for {len(failed)} resource(s)", failed[0].exit_code)


def _join(threads, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))


def _boot_banner(waits: dict, kinds: dict[str, str], after_dots: bool) -> str:
    from replfs.blockrepl.core import startup
    why = {startup.WFC: "its peer was there before",
           startup.DEGR: "it went down as a Primary without its peer",
           startup.OUTDATED: "its peer is Outdated"}
    lines = ["" if after_dots else None,
             "*" * 63,
             " replfs is waiting for the peer nodes of this node's resources.",
             " How long depends on how each resource went down:"]
    for res, kind in kinds.items():
        values, _ = startup.effective(waits[res]["wfc"], waits[res]["degr"],
                                      waits[res]["outdated"])
        secs = values[kind]
        lines.append(f"   {res}: {'for ever' if secs == 0 else f'{secs} seconds'} "
                     f"[{kind}] -- {why[kind]}")
    lines.append(" (startup section of replfs.conf; 0 seconds waits for ever)")
    return "\n".join(x for x in lines if x is not None)


def _prompt_until_done(ctx: Ctx, threads, pending, start: float) -> bool:
    """Offer to stop waiting until every wait has ended; True if the
    admin typed 'yes'."""
    import select
    stdin = ctx.stdin if ctx.stdin is not None else sys.stdin
    write = ctx.write or ctx.out
    live = (ctx.write is not None and hasattr(sys.stdout, "isatty") and sys.stdout.isatty())
    try:
        fd = stdin.fileno()
    except (AttributeError, OSError, ValueError):
        fd = None
    prompt = " To stop waiting, enter 'yes'"
    write(f"{prompt} [{0:4d}]: " if live else f"{prompt}: ")
    while pending():
        if live:
            write(f"\r{prompt} [{int(time.monotonic() - start):4d}]: ")
        if fd is None:
            _join(threads, 1.0)
            continue
        try:
            ready, _, _ = select.select([fd], [], [], 1.0)
        except (OSError, ValueError):
            fd = None
            continue
        if not ready:
            continue
        line = stdin.readline()
        if not line:            # end of input: just wait
            fd = None
            continue
        if line.strip() == "yes":
            write("\n")
            return True
        write(f"{prompt}: ")
    write("\n")
    return False


def v_dump(ctx: Ctx, arg: str | None) -> None:
    from replfs.blockrepl import conf as confmod
    config = ctx.config()
    if arg and arg != "all":
        if arg not in config.resources:
            raise ReplfsError(f"'{arg}' not defined in your config.", EXIT_CONFIG)
        ctx.out(confmod.dump(config, arg).rstrip("\n"))
    else:
        ctx.out(confmod.dump(config).rstrip("\n"))


def v_shutdown(ctx: Ctx, arg: str | None) -> None:
    try:
        _daemon_call(ctx, "shutdown")
    except DaemonNotRunning:
        return
    # Wait for the daemon to finish taking resources down and exit.
    deadline = time.monotonic() + 40
    while time.monotonic() < deadline and os.path.exists(socket_path(ctx.rundir)):
        time.sleep(0.05)


def v_tls_keygen(ctx: Ctx, arg: str | None) -> None:
    """Make the pair's TLS CA and a key and certificate for each node of
    the resource(s), and of cluster.conf next to the config if there is
    one (for the cluster link's ``tls = yes``)."""
    from replfs import tls
    config = ctx.config()
    names = [arg] if arg and arg != "all" else sorted(config.resources)
    nodes: list[str] = []
    for name in names:
        if name not in config.resources:
            raise ReplfsError(f"'{name}' not defined in your config.", EXIT_CONFIG)
        for h in config.resources[name].hosts:
            if h.name not in nodes:
                nodes.append(h.name)
    cluster_conf = os.path.join(os.path.dirname(os.path.abspath(ctx.config_path)),
                                "cluster.conf")
    if os.path.exists(cluster_conf):
        from replfs.locking import cluster_conf as cc
        try:
            with open(cluster_conf) as f:
                for n in cc.parse(f.read(), cluster_conf).nodes:
                    if n.name not in nodes:
                        nodes.append(n.name)
        except (OSError, ReplfsError, ValueError) as e:
            ctx.err(f"warning: {cluster_conf}: not read ({e}); certificates only for the "
                    f"resources' nodes")
    directory = ctx.opts.get("dir") or tls.default_dir(ctx.config_path)
    days = _whole_option(ctx, "days", tls.DEFAULT_DAYS)
    if ctx.dry_run:
        ctx.out(f"would make in {directory}: the CA (if missing) and certificates for "
                f"{', '.join(nodes)}, valid {days} days")
        return
    try:
        written = tls.keygen(directory, nodes, days=days, force=bool(ctx.opts.get("force")))
    except tls.TLSError as e:
        raise ReplfsError(str(e), EXIT_CONFIG) from None
    except OSError as e:
        raise ReplfsError(f"{directory}: {e.strerror or e}", EXIT_CONFIG) from None
    if not written:
        ctx.out(f"{directory}: the CA and the certificates of {', '.join(nodes)} are there "
                f"already; nothing to do (--force makes new ones)")
        return
    for path, what in written:
        ctx.out(f"wrote {path} ({what})")
    ctx.out(f"Each node needs ca.crt and its own NODE.crt and NODE.key in {directory} "
            f"(copy them, keys with mode 600); keep ca.key off the nodes if you can, it "
            f"makes certificates every node trusts.")


def v_events2(ctx: Ctx, arg: str | None) -> None:
    """drbdsetup events2: the state of every resource (``exists`` lines, then
    ``exists -``), then one line per change as it happens; --now stops after
    the ``exists`` lines."""
    from replfs.daemon import events as ev
    only = None if arg in (None, "all") else arg
    if only is not None:
        _resources(ctx, only)          # a resource the config names (or: exit 10)
    as_json = bool(ctx.opts.get("json"))
    stamps = bool(ctx.opts.get("timestamps"))

    def emit(record: dict) -> None:
        if as_json:
            d = {k: v for k, v in record.items() if k != "seq"}
            if not stamps:
                d.pop("time", None)
            ctx.out(json.dumps(d, sort_keys=True))
        else:
            ctx.out(ev.format_event(record, timestamps=stamps))
        if ctx.write is not None:
            sys.stdout.flush()

    try:
        with SyncClient(socket_path(ctx.rundir), timeout=None) as c:
            reply, _ = c.call("events", res=only)
            for record in reply["events"]:
                emit(record)
            emit({"kind": "exists", "object": "-", "name": "", "fields": {},
                  "time": time.time()})
            if ctx.opts.get("now"):
                return
            seq = reply["seq"]
            while True:
                reply, _ = c.call("events", res=only, since=seq, timeout=60)
                if reply.get("lost"):
                    ctx.err("replfsadm events2: events were lost (the daemon keeps the last "
                            "4096); go on from the next one")
                for record in reply["events"]:
                    emit(record)
                seq = reply["seq"]
    except DaemonNotRunning:
        raise ReplfsError(f"replfsd is not running on this node ({ctx.rundir})",
                          EXIT_EXEC) from None
    except ConnectionError:
        raise ReplfsError("replfsd went away", EXIT_EXEC) from None


def _whole_option(ctx: Ctx, name: str, default: int) -> int:
    value = ctx.opts.get(name)
    if value is None:
        return default
    if not str(value).isdigit() or not 0 < int(value) <= 100000:
        raise ReplfsError(f"--{name} needs a whole number from 1 to 100000, not '{value}'",
                          EXIT_USAGE)
    return int(value)


VERBS: dict[str, Verb] = {v.name: v for v in [
    Verb("create-md", v_create_md, summary="write fresh meta-data on the backing disk",
         options=("force",)),
    Verb("dump-md", v_dump_md, summary="print the on-disk meta-data (resource must be down)"),
    Verb("mounted", v_mounted, res_optional=True, options=("full",),
         summary="list replfs volumes on the resources and the nodes that mount them"),
    Verb("show-gi", v_show_gi, summary="show the generation identifiers, explained"),
    Verb("get-gi", v_get_gi, summary="print the generation identifiers on one line"),
    Verb("up", v_up, summary="start replfsd if needed, attach and connect (--wait: as at boot)",
         options=("wait", "timeout", "degr-wfc-timeout", "outdated-wfc-timeout")),
    Verb("down", v_down, summary="demote, disconnect and detach"),
    Verb("attach", _simple("attach"), summary="attach the backing disk and its meta-data"),
    Verb("detach", _simple("detach"), summary="detach the backing disk (becomes Diskless)"),
    Verb("connect", v_connect, summary="connect to the peer",
         options=("discard-my-data",)),
    Verb("disconnect", _simple("disconnect"), summary="drop the connection (StandAlone)"),
    Verb("primary", v_primary, summary="promote this node to Primary",
         options=("force",)),
    Verb("secondary", _simple("secondary"), summary="demote this node to Secondary"),
    Verb("invalidate", _simple("invalidate"),
         summary="discard local data, full sync from the peer"),
    Verb("invalidate-remote", _simple("invalidate-remote"),
         summary="discard the peer's data, full sync to the peer"),
    Verb("outdate", _simple("outdate"), summary="mark local data as outdated"),
    Verb("new-current-uuid", _simple("new-current-uuid"),
         summary="start a new data generation"),
    Verb("verify", _simple("verify"), summary="online verify against the peer"),
    Verb("resize", v_resize, options=("assume-clean", "size"),
         summary="grow the device online to what both (grown) backing disks allow"),
    Verb("resume-io", _simple("resume-io"),
         summary="resume application I/O suspended by fencing"),
    Verb("pause-sync", _simple("pause-sync"),
         summary="pause resynchronisation (PausedSyncS/T on both nodes)"),
    Verb("resume-sync", _simple("resume-sync"),
         summary="resume resynchronisation paused by pause-sync"),
    Verb("adjust", _simple("adjust"),
         summary="bring the running resource in line with the config"),
    Verb("role", v_role, summary="print local/peer role"),
    Verb("state", v_role, summary="print local/peer role (drbdadm 8.4's older name for role)"),
    Verb("cstate", v_cstate, summary="print the connection state"),
    Verb("dstate", v_dstate, summary="print local/peer disk states"),
    Verb("status", v_status, res_optional=True, summary="show resource status",
         options=("json", "verbose")),
    Verb("overview", v_overview, res_optional=True,
         summary="one line per resource, like drbd-overview"),
    Verb("proc", v_proc, needs_res=False, summary="print status in the /proc/drbd format"),
    Verb("wait-connect", v_wait_connect,
         summary="wait until connected (startup's wfc-timeouts; then exit 5)",
         options=("timeout", "degr-wfc-timeout", "outdated-wfc-timeout")),
    Verb("wait-con-int", v_wait_con_int, needs_res=False,
         summary="boot-time wait for all resources' peers; 'yes' stops it",
         options=("timeout", "degr-wfc-timeout", "outdated-wfc-timeout")),
    Verb("wait-sync", v_wait_sync, summary="wait until connected and both disks UpToDate",
         options=("timeout",)),
    Verb("dump", v_dump, res_optional=True, summary="print the configuration, canonical form"),
    Verb("shutdown", v_shutdown, needs_res=False, summary="stop replfsd (downs every resource)"),
    Verb("events2", v_events2, res_optional=True, options=("now", "timestamps", "json"),
         summary="print state changes as they happen, as drbdsetup events2 (--now: state, exit)"),
    Verb("tls-keygen", v_tls_keygen, res_optional=True, options=("dir", "days", "force"),
         summary="make the pair's TLS CA, keys and certificates (net { tls yes; })"),
]}

# Option spellings -> (canonical name, takes a value)
OPTION_SPELLINGS = {
    "--force": ("force", False),
    "-o": ("force", False),
    "--overwrite-data-of-peer": ("force", False),
    "--discard-my-data": ("discard_my_data", False),
    "--json": ("json", False),
    "--verbose": ("verbose", False),
    "-v": ("verbose", False),
    "-t": ("timeout", True),
    "--timeout": ("timeout", True),
    "--wfc-timeout": ("timeout", True),
    "--degr-wfc-timeout": ("degr_timeout", True),
    "--outdated-wfc-timeout": ("outdated_timeout", True),
    "--wait": ("wait", False),
    "-f": ("full", False),
    "--full": ("full", False),
    "--assume-clean": ("assume_clean", False),
    "--size": ("size", True),
    "--dir": ("dir", True),
    "--days": ("days", True),
    "--now": ("now", False),
    "--timestamps": ("timestamps", False),
}
_OPT_VERB_NAME = {"force": "force", "discard_my_data": "discard-my-data", "json": "json",
                  "verbose": "verbose", "timeout": "timeout",
                  "degr_timeout": "degr-wfc-timeout", "outdated_timeout": "outdated-wfc-timeout",
                  "wait": "wait", "full": "full", "assume_clean": "assume-clean",
                  "size": "size", "dir": "dir", "days": "days", "now": "now",
                  "timestamps": "timestamps"}


def usage() -> str:
    lines = [
        "USAGE: replfsadm [OPTIONS] [--] [VERB-OPTIONS] VERB {RESOURCE|all}",
        "",
        "Drives replfs resources with drbdadm's verbs, states and messages.",
        "",
        "OPTIONS:",
        "  -c, --config FILE   resource configuration (default $REPLFS_CONF, else /etc/replfs/replfs.conf)",
        "  --node NAME         this node's name (default $REPLFS_NODE, else uname -n)",
        "  --rundir DIR        replfsd's socket directory (default $REPLFS_RUNDIR, else /run/replfs)",
        "  -d, --dry-run       print what would be done, do nothing",
        "  -h, --help          this text; 'replfsadm VERB --help' for one verb",
        "  --version           print the version",
        "",
        "VERB-OPTIONS:",
        "  --force, -o, --overwrite-data-of-peer   (primary, create-md) override the safety checks",
        "  --discard-my-data                       (connect) become SyncTarget after a split brain",
        "  --json, --verbose                       (status)",
        "  -t, --timeout, --wfc-timeout SECONDS    (wait-connect, wait-con-int, up --wait,",
        "                                          wait-sync) 0: for ever",
        "  --degr-wfc-timeout SECONDS              (wait-connect, wait-con-int, up --wait) when",
        "                                          the node went down a Primary without its peer",
        "  --outdated-wfc-timeout SECONDS          (same verbs) when the peer is Outdated",
        "  --wait                                  (up) then wait for the peers, as at boot",
        "  --assume-clean                          (resize) no resync of the new area",
        "  --size SIZE                             (resize) grow to at most SIZE (K/M/G/T)",
        "  --now, --timestamps, --json             (events2) state only; times; JSON lines",
        "  --dir DIR, --days N                     (tls-keygen) where (default: tls/ next to",
        "                                          the config), how long valid (3650)",
        "",
        "VERBS:",
    ]
    for v in VERBS.values():
        arg = "" if not v.needs_res else (" [RES]" if v.res_optional else " RES")
        lines.append(f"  {v.name + arg:<24} {v.summary}")
    lines += ["", "Cluster stack and filesystem verbs: see replfsadm(8).",
              "NFS export of a mounted volume (NFS-Ganesha): replfsadm nfs --help.",
              "Exit codes: 0 ok, 1 usage, 2 config syntax, 5 timed out, 10 config,",
              "11 state change, 16 no local disk, 17 no UpToDate disk, 20 daemon/exec."]
    return "\n".join(lines)


def _first_word(argv: list[str]) -> str | None:
    """The first word that is neither an option nor a global option's value."""
    i = 0
    while i < len(argv):
        a = argv[i]
        if a in ("-c", "--config", "--node", "--rundir"):
            i += 2
            continue
        if not a.startswith("-"):
            return a
        i += 1
    return None


def parse(argv: list[str]) -> tuple[dict, str | None, str | None, dict]:
    """Split argv into (globals, verb, resource, verb options)."""
    g = {"config": None, "node": None, "rundir": None, "dry_run": False, "help": False}
    opts: dict = {}
    positional: list[str] = []
    i = 0
    while i < len(argv):
        a = argv[i]
        if a == "--":
            i += 1
            continue
        if a in ("-c", "--config", "--node", "--rundir"):
            if i + 1 >= len(argv):
                raise ReplfsError(f"option {a} needs an argument", EXIT_USAGE)
            g[{"-c": "config", "--config": "config"}.get(a, a[2:])] = argv[i + 1]
            i += 2
            continue
        if a.startswith("--config=") or a.startswith("--node=") or a.startswith("--rundir="):
            k, v = a[2:].split("=", 1)
            g[k] = v
            i += 1
            continue
        if a in ("-d", "--dry-run"):
            g["dry_run"] = True
            i += 1
            continue
        if a in ("-h", "--help"):
            g["help"] = True
            i += 1
            continue
        if a == "--version":
            g["version"] = True
            i += 1
            continue
        name = a.split("=", 1)[0]
        if name in OPTION_SPELLINGS:
            key, takes = OPTION_SPELLINGS[name]
            if takes:
                if "=" in a:
                    opts[key] = a.split("=", 1)[1]
                elif i + 1 < len(argv):
                    opts[key] = argv[i + 1]
                    i += 1
                else:
                    raise ReplfsError(f"option {a} needs a value", EXIT_USAGE)
            else:
                opts[key] = True
            i += 1
            continue
        if a.startswith("-") and a != "-":
            raise ReplfsError(f"unknown option '{a}'\n{usage()}", EXIT_USAGE)
        positional.append(a)
        i += 1
    verb = positional[0] if positional else None
    res = positional[1] if len(positional) > 1 else None
    if len(positional) > 2:
        raise ReplfsError(f"too many arguments: {' '.join(positional[2:])}", EXIT_USAGE)
    return g, verb, res, opts


def _write_stdout(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def main(argv: list[str] | None = None, *, out=None, err=None, stdin=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    custom_out = out is not None
    out = out or (lambda s: print(s))
    err = err or (lambda s: print(s, file=sys.stderr))
    try:
        if _first_word(argv) == "cluster":
            # The cluster verbs have their own options (-C, -H, ...).
            from replfs.cli import cluster
            return cluster.main(argv, out=out, err=err)
        if _first_word(argv) == "nfs":
            # The NFS export verbs act on mounts and have their own options.
            from replfs.cli import nfs
            return nfs.main(argv, out=out, err=err)
        g, verb, res, opts = parse(argv)
        if g.get("version"):
            out(f"replfsadm {VERSION}")
            return 0
        if verb == "cluster":
            from replfs.cli import cluster
            return cluster.main(argv, out=out, err=err)
        if verb is None:
            if g["help"]:
                out(usage())
                return 0
            err(usage())
            return EXIT_USAGE
        v = VERBS.get(verb)
        if v is None:
            raise ReplfsError(f"Unknown command '{verb}'\n{usage()}", EXIT_USAGE)
        if g["help"]:
            arg = "" if not v.needs_res else (" [RES|all]" if v.res_optional else " RES|all")
            o = " ".join(f"[--{x}]" for x in v.options)
            out(f"USAGE: replfsadm {v.name}{' ' + o if o else ''}{arg}\n\n{v.summary}")
            return 0
        for key in opts:
            if _OPT_VERB_NAME[key] not in v.options:
                raise ReplfsError(f"'{verb}' does not take --{_OPT_VERB_NAME[key]}", EXIT_USAGE)
        if v.needs_res and not v.res_optional and res is None:
            raise ReplfsError(f"USAGE: replfsadm {v.name} RESOURCE|all", EXIT_USAGE)
        from replfs.ipc.client import node_name
        ctx = Ctx(config_path=g["config"] or os.environ.get("REPLFS_CONF")
                  or "/etc/replfs/replfs.conf",
                  node=node_name(g["node"]), rundir=rundir_from_env(g["rundir"]),
                  dry_run=g["dry_run"], opts=opts, out=out, err=err,
                  write=None if custom_out else _write_stdout, stdin=stdin)
        v.handler(ctx, res)
        return 0
    except ReplfsError as e:
        err(e.message)
        if "State change failed" in e.message or "Failure: (" in e.message:
            err(f"Command 'replfsadm {verb} {res}' terminated with exit code {e.exit_code}")
        return e.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `replfsadm status | head`: the reader is gone; end quietly, as a
        # C tool killed by SIGPIPE would (and keep Python from complaining
        # about the flush at exit)
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except OSError:
            pass
        return 141
    except PermissionError as e:
        err(f"replfsadm: {e.filename or ''}{': ' if e.filename else ''}permission denied"
            f"{'' if os.geteuid() == 0 else ' (replfsadm needs root)'}")
        return EXIT_EXEC
    except OSError as e:
        err(f"replfsadm: {e.filename + ': ' if e.filename else ''}{e.strerror or e}")
        return EXIT_EXEC


if __name__ == "__main__":
    sys.exit(main())
