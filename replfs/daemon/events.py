"""State-change events of this node's resources, as ``drbdsetup events2``
reports them: one record per change of a resource, its connection, its
device or its peer device, kept in order with a sequence number so that
``replfsadm events2`` (and the HA agents, and tests) wait for changes
instead of polling, and never miss a short-lived state.

Each resource is seen as four objects, named as in DRBD 9's events2:

    resource     role, suspended
    connection   connection (StandAlone, Connecting, Connected, ...), role (the peer's)
    device       disk, minor
    peer-device  replication (Off, Established, SyncSource, ...), peer-disk,
                 resync-suspended

``project`` turns a resource into those objects' fields; ``diff`` gives the
events between two projections (pure, unit-tested).  ``EventLog`` keeps
the last events and wakes the waiters; the resource calls ``observe``
after every change of its engine's state, and only a changed projection
makes an event.
"""
from __future__ import annotations

import collections
import time

import trio

OBJECTS = ("resource", "connection", "device", "peer-device")

# DRBD 8.4 connection states -> DRBD 9's connection and replication states
_CONNECTING = {"Unconnected", "WFConnection", "WFReportParams", "Timeout", "BrokenPipe",
               "NetworkFailure", "ProtocolError", "TearDown"}


def connection_state(cstate: str) -> str:
    if cstate in ("StandAlone", "Disconnecting"):
        return cstate
    if cstate in _CONNECTING:
        return "Connecting"
    return "Connected"


def replication_state(cstate: str) -> str:
    if connection_state(cstate) != "Connected":
        return "Off"
    if cstate in ("Connected",):
        return "Established"
    return cstate           # SyncSource, PausedSyncT, VerifyS, Ahead, WFBitMapS, ...


def project(res) -> dict[str, dict[str, str]]:
    """The events2 objects of a resource (a blockrepl Resource, or anything
    with its state attributes)."""
    cstate = res.cstate.value
    user, peer = getattr(res.engine, "user_isp", False), getattr(res.engine, "peer_isp", False)
    resync_susp = ("user" if user else "peer" if peer else "no")
    return {
        "resource": {"role": res.role.value,
                     "suspended": "fencing" if res.io_suspended else "no"},
        "connection": {"peer-node": res.peer.name, "connection": connection_state(cstate),
                       "role": res.peer_role.value if connection_state(cstate) == "Connected"
                       else "Unknown"},
        "device": {"volume": "0", "minor": str(res.me.minor), "disk": res.dstate.value},
        "peer-device": {"peer-node": res.peer.name, "volume": "0",
                        "replication": replication_state(cstate),
                        "peer-disk": res.pdsk.value, "resync-suspended": resync_susp},
    }


# the fields that name an object (always printed), not its state
_KEYS = {"resource": (), "connection": ("peer-node",), "device": ("volume", "minor"),
         "peer-device": ("peer-node", "volume")}


def diff(name: str, old: dict | None, new: dict | None) -> list[dict]:
    """The events that take ``old`` to ``new`` (either may be None: the
    resource appeared or went away).  An event: kind (create, change,
    destroy), object, name, fields (for change: the key fields and only
    the fields that changed)."""
    out = []
    if old is None and new is None:
        return out
    if old is None:
        for obj in OBJECTS:
            out.append({"kind": "create", "object": obj, "name": name, "fields": dict(new[obj])})
        return out
    if new is None:
        for obj in reversed(OBJECTS):
            keys = {k: old[obj][k] for k in _KEYS[obj]}
            out.append({"kind": "destroy", "object": obj, "name": name, "fields": keys})
        return out
    for obj in OBJECTS:
        changed = {k: v for k, v in new[obj].items()
                   if old[obj].get(k) != v and k not in _KEYS[obj]}
        if changed:
            fields = {k: new[obj][k] for k in _KEYS[obj]}
            fields.update(changed)
            out.append({"kind": "change", "object": obj, "name": name, "fields": fields})
    return out


def exists(name: str, proj: dict) -> list[dict]:
    """The ``exists`` records of one resource (events2 --now)."""
    return [{"kind": "exists", "object": obj, "name": name, "fields": dict(proj[obj])}
            for obj in OBJECTS]


def format_event(ev: dict, *, timestamps: bool = False) -> str:
    """One events2 line: ``[TIME ]KIND OBJECT name:NAME key:value ...``."""
    if ev["kind"] == "exists" and ev.get("object") == "-":
        head = "exists -"
    else:
        fields = " ".join(f"{k}:{v}" for k, v in ev["fields"].items())
        head = f"{ev['kind']} {ev['object']} name:{ev['name']}" + (f" {fields}" if fields else "")
    if timestamps:
        t = ev.get("time", time.time())
        lt = time.localtime(t)
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", lt) + f".{int(t % 1 * 1e6):06d}" + \
            time.strftime("%z", lt)
        stamp = stamp[:-2] + ":" + stamp[-2:]
        return f"{stamp} {head}"
    return head


class EventLog:
    """The node's last events, in order, and a way to wait for the next."""

    def __init__(self, keep: int = 4096):
        self.seq = 0
        self._events: collections.deque = collections.deque(maxlen=keep)
        self._last: dict[str, dict] = {}
        self._keys: dict[str, tuple] = {}
        self._changed = trio.Event()

    def observe(self, name: str, res) -> None:
        """Called after every change of a resource's engine state (several
        times per write): records what differs.  The common case -- nothing
        events2 shows changed -- costs one tuple comparison."""
        try:
            eng = res.engine
            key = (res.role, res.cstate, res.dstate, res.pdsk, res.peer_role,
                   res.io_suspended, eng.user_isp, eng.peer_isp)
            if self._keys.get(name) == key:
                return
            proj = project(res)
        except AttributeError:
            return              # not fully set up yet
        self._keys[name] = key
        self._record(name, self._last.get(name), proj)

    def gone(self, name: str) -> None:
        self._keys.pop(name, None)
        self._record(name, self._last.get(name), None)

    def _record(self, name: str, old, new) -> None:
        evs = diff(name, old, new)
        if new is None:
            self._last.pop(name, None)
        else:
            self._last[name] = new
        if not evs:
            return
        now = time.time()
        for ev in evs:
            self.seq += 1
            ev["seq"] = self.seq
            ev["time"] = now
            self._events.append(ev)
        self._changed.set()
        self._changed = trio.Event()

    def snapshot(self, only: str | None = None) -> tuple[int, list[dict]]:
        """(the current sequence number, the exists records of every resource)."""
        out = []
        for name in sorted(self._last):
            if only is None or name == only:
                out += exists(name, self._last[name])
        return self.seq, out

    def since(self, seq: int, only: str | None = None) -> tuple[list[dict], bool]:
        """Events after ``seq`` (and whether some were dropped: the log keeps
        only the last ones)."""
        lost = bool(self._events) and self._events[0]["seq"] > seq + 1
        evs = [e for e in self._events if e["seq"] > seq and (only is None or e["name"] == only)]
        return evs, lost

    async def wait(self, seq: int) -> None:
        """Return once there is an event after ``seq``."""
        while self.seq <= seq:
            await self._changed.wait()
