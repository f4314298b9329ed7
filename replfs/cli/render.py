"""Human and machine renderings of resource status.  Pure functions.

Every view (status, status --json, overview, proc) is made from the same
status dictionaries that replfsd returns, so they never disagree.
"""
from __future__ import annotations

import os

VERSION = "0.1.0"

_SYNC_STATES = {"SyncSource", "SyncTarget", "PausedSyncS", "PausedSyncT"}


def status_json(st: dict | None, name: str) -> dict:
    if st is None:
        return {"name": name, "state": "Unconfigured"}
    out = {
        "name": name,
        "role": st["role"],
        "minor": st["minor"],
        "device": st["device"],
        "disk-state": st["dstate"],
        "size": st["size"],
        "connection": {
            "peer": st["peer"],
            "connection-state": st["cstate"],
            "peer-role": st["peer_role"],
            "peer-disk-state": st["pdsk"],
            "protocol": st["protocol"],
        },
        "out-of-sync": st["counters"]["oos"],
        "counters": st["counters"],
        "uuids": st.get("uuids"),
    }
    if "sync" in st:
        out["connection"]["percent-in-sync"] = st["sync"]["percent"]
    out["connection"]["resync-suspended"] = _resync_suspended(st) or "no"
    return out


def status_text(st: dict | None, name: str, verbose: bool = False) -> str:
    if st is None:
        return f"{name}: not defined on this node's replfsd (Unconfigured)"
    lines = [f"{name} role:{st['role']}"]
    disk = f"  disk:{st['dstate']}"
    if verbose:
        disk += f" size:{st['size'] // 1024} read:{st['counters']['dr']} written:{st['counters']['dw']}"
    lines.append(disk)
    conn = f"  {st['peer']} connection:{st['cstate']} role:{st['peer_role']}"
    if verbose and st.get("tls_configured"):
        conn += f" tls:{(st.get('tls') or 'yes').replace(' ', ',')}"
    lines.append(conn)
    peer = f"    peer-disk:{st['pdsk']}"
    if st["cstate"] in _SYNC_STATES and "sync" in st:
        peer = f"    replication:{st['cstate']} peer-disk:{st['pdsk']} done:{st['sync']['percent']:.2f}"
        why = _resync_suspended(st)
        if why and st["cstate"] in ("PausedSyncS", "PausedSyncT"):
            peer += f" resync-suspended:{why}"
    elif st["counters"]["oos"]:
        peer += f" out-of-sync:{st['counters']['oos']}"
    if verbose:
        peer += f" sent:{st['counters']['ns']} received:{st['counters']['nr']} pending:{st['counters']['pe']}"
    lines.append(peer)
    if st.get("last_event") and (st["cstate"] == "StandAlone" or (
            verbose and st["cstate"] in ("WFConnection", "Connecting", "Unconnected"))):
        lines.append(f"  last event: {st['last_event']}")
    return "\n".join(lines) + "\n"


def _flags(st: dict) -> str:
    """DRBD 8.4's six flag letters: s/r (application I/O suspended or
    running), a (resync-after dependency: never in replfs), p (the peer
    paused sync), u (this node paused sync), then congestion and
    activity-log suspension (never set in replfs)."""
    return ("s" if st.get("io_suspended") else "r") + "-" \
        + ("p" if st.get("peer_isp") else "-") + ("u" if st.get("user_isp") else "-") + "--"


def _resync_suspended(st: dict) -> str | None:
    """Why a resync is paused, as drbdsetup status says it ("user": this
    node's pause-sync, "peer": the peer's), or None."""
    why = [w for w, flag in (("user", "user_isp"), ("peer", "peer_isp")) if st.get(flag)]
    return ",".join(why) or None


def proc_drbd(statuses: list[dict], unconfigured: list[int] = ()) -> str:
    """/proc/drbd: every resource that is up, and ``unconfigured`` minors
    (configured for this node but down) as ``cs:Unconfigured``."""
    lines = [f"version: replfs {VERSION} (api:1/proto:1)"]
    rows = [(st["minor"], st) for st in statuses] + [(m, None) for m in unconfigured]
    for minor, st in sorted(rows, key=lambda r: r[0]):
        if st is None:
            lines.append(f"{minor:2d}: cs:Unconfigured")
            continue
        c = st["counters"]
        lines.append(f"{st['minor']:2d}: cs:{st['cstate']} ro:{st['role']}/{st['peer_role']} "
                     f"ds:{st['dstate']}/{st['pdsk']} {st['protocol']} {_flags(st)}")
        lines.append(f"    ns:{c['ns']} nr:{c['nr']} dw:{c['dw']} dr:{c['dr']} al:{c['al']} "
                     f"bm:{c['bm']} lo:{c['lo']} pe:{c['pe']} ua:{c['ua']} ap:{c['ap']} "
                     f"ep:{c['ep']} wo:{c['wo']} oos:{c['oos']}")
        if "sync" in st and st["cstate"] in ("SyncSource", "SyncTarget"):
            # (as DRBD 8.4: no progress lines while the resync is paused)
            for part in st["sync"]["line"].split("\n"):
                lines.append("\t" + part.lstrip("\t"))
        elif "line" in (st.get("verify") or {}):
            for part in st["verify"]["line"].split("\n"):
                lines.append("\t" + part.lstrip("\t"))
    return "\n".join(lines)


def _human(n: float) -> str:
    for unit in ("", "K", "M", "G", "T", "P"):
        if n < 1024 or unit == "P":
            if unit == "":
                return f"{int(n)}"
            return f"{n:.1f}{unit}" if n < 10 else f"{n:.0f}{unit}"
        n /= 1024
    return str(n)


def find_mount(device: str, resource: str) -> tuple[str, str, os.statvfs_result] | None:
    """(mount point, fs type, statvfs) of a mount of the resource, if any.

    Matches a mount whose source is the device file, the resource name
    (mount -t fuse.replfs RES), or a loop device backed by the device file.
    """
    try:
        with open("/proc/self/mounts") as f:
            mounts = [line.split() for line in f]
    except OSError:
        return None
    for fields in mounts:
        if len(fields) < 3:
            continue
        src, mnt, fstype = fields[0], fields[1].replace("\\040", " "), fields[2]
        match = src in (device, resource) or src.endswith(":" + resource)
        if not match and src.startswith("/dev/loop"):
            try:
                with open(f"/sys/block/{os.path.basename(src)}/loop/backing_file") as b:
                    match = b.read().strip() == device
            except OSError:
                pass
        if match and mnt != device:
            try:
                return mnt, fstype.replace("fuse.", ""), os.statvfs(mnt)
            except OSError:
                return mnt, fstype, None
    return None


def overview(rows: list[tuple[str, dict | None, object]], node: str,
             slots: dict[str, str] | None = None) -> str:
    """drbd-overview's lines; ``slots``: per resource, the nodes holding a
    slot of its replfs volume (appended as "slots: ...")."""
    out = []
    for name, st, rconf in rows:
        host = rconf.host(node)
        minor = host.minor if host else 0
        if st is None:
            out.append(f"{minor:3d}:{name:<18} Unconfigured . . . .")
            continue
        line = (f"{minor:3d}:{name:<18} {st['cstate']:<12} {st['role'] + '/' + st['peer_role']:<19} "
                f"{st['dstate'] + '/' + st['pdsk']:<21} {st['protocol']} {_flags(st)[:4]}")
        if "sync" in st and st["cstate"] in _SYNC_STATES:
            line += f" {st['sync']['line'].splitlines()[0]}"
        m = find_mount(st["device"], name)
        if m is not None:
            mnt, fstype, sv = m
            if sv is not None and sv.f_blocks:
                size = sv.f_blocks * sv.f_frsize
                avail = sv.f_bavail * sv.f_frsize
                used = (sv.f_blocks - sv.f_bfree) * sv.f_frsize
                pct = int(round(100 * used / max(used + avail, 1)))
                line += f" {mnt:<12} {fstype:<6} {_human(size)} {_human(used)} {_human(avail)} {pct}%"
            else:
                line += f" {mnt} {fstype}"
        if slots and slots.get(name):
            line += f" slots: {slots[name]}"
        out.append(line)
    return "\n".join(out)


def show_gi(res: str, gi: tuple[str, str]) -> str:
    uuids, dstate = gi
    return "\n".join([
        "",
        "       +--<  Current data generation UUID  >-",
        "       |               +--<  Bitmap's base data generation UUID  >-",
        "       |               |                +--<  younger history UUID  >-",
        "       |               |                |               +-<  older history  >-",
        "       V               V                V               V",
        uuids,
        "",
        f"{res}: disk {dstate}. A bitmap UUID of 0 means the bitmap tracks nothing;",
        "otherwise it is the generation the peer was at when replication stopped.",
        "",
    ])


def dump_md(res: str, host, sb, lay, bm) -> str:
    from replfs.blockrepl.meta import format as md
    names = [(md.F_CONSISTENT, "consistent"), (md.F_WAS_UP_TO_DATE, "was-up-to-date"),
             (md.F_PRIMARY, "primary"), (md.F_OUTDATED, "outdated"),
             (md.F_FULL_SYNC, "full-sync"), (md.F_PEER_OUTDATED, "peer-outdated")]
    flags = " ".join(n for f, n in names if sb.flags & f) or "none"
    u = sb.uuids
    lines = [
        f"# replfs meta-data of resource {res} on {host.disk}",
        f"version \"v{md.VERSION}\";",
        f"meta-disk {'internal' if lay.internal else host.meta_disk.path};",
        f"uuid {{",
        f"    current   0x{u.current:016X};",
        f"    bitmap    0x{u.bitmap:016X};",
        f"    history   0x{u.history[0]:016X} 0x{u.history[1]:016X};",
        f"    flags     {flags};",
        f"}}",
        f"device-uuid 0x{sb.device_uuid:016X};",
        f"la-size-sect {sb.data_size // 512};  # usable size {sb.data_size} bytes",
        f"bm-offset {lay.bm_offset}; bm-bytes {lay.bm_bytes};",
        f"al-offset {lay.al_offset}; al-extents {sb.al_extents};",
        f"bm-blocks {lay.nblocks}; bits-set {bm.count};  # {bm.count * 4} KiB out of sync",
    ]
    runs = list(bm.runs())
    if runs:
        shown = ", ".join(f"{a}+{n}" for a, n in runs[:16])
        more = f" ... ({len(runs) - 16} more runs)" if len(runs) > 16 else ""
        lines.append(f"# out-of-sync 4k blocks (first+count): {shown}{more}")
    return "\n".join(lines)
