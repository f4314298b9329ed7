"""Waiting for a node's state through ``replfsadm events2`` instead of
polling ``status`` in a loop.

``Events(node)`` runs ``replfsadm events2 --json --timestamps`` on the node
(as an admin or an HA agent would) and keeps, per resource, the state its
lines describe, flattened to one dict::

    role, suspended                           (the resource)
    connection, peer_role                     (the connection)
    disk, minor                               (the device)
    replication, peer_disk, resync_suspended  (the peer device)

``wait(pred)`` returns that dict as soon as ``pred(dict)`` holds: at once
if the current state (the ``exists`` lines events2 starts with, or the
last change) already does -- so a state reached before the watcher
started is not missed -- else at the first change that makes it hold, even
a short-lived one.  ``wait(pred, since=mark)`` counts only states reached
by a change after ``mark()`` (for a state the pair may already be in
before the action, e.g. "in sync" before ``invalidate``).  A timeout fails
with the events seen so far.

The lines of one change (a resource's objects changed in one step share
one timestamp) are judged together: a state is looked at only once the
next line has another time, or no line has come for ``SETTLE`` seconds.

``PairEvents(pair)`` keeps one watcher per node (started again after that
node's replfsd was restarted); ``up_fresh`` and ``wait_synced`` are
LocalPair's, waiting on events.
"""
from __future__ import annotations

import json
import threading
import time

from replfs.localpair import LocalPair, Node, PairError

SETTLE = 0.03       # seconds without a line after which a change is complete

# (events2 object, field) -> key of the flat state
FLAT = {("resource", "role"): "role", ("resource", "suspended"): "suspended",
        ("connection", "connection"): "connection", ("connection", "role"): "peer_role",
        ("device", "disk"): "disk", ("device", "minor"): "minor",
        ("peer-device", "replication"): "replication",
        ("peer-device", "peer-disk"): "peer_disk",
        ("peer-device", "resync-suspended"): "resync_suspended"}


def synced(st: dict) -> bool:
    """Connected, no resync running, both disks UpToDate."""
    return (st.get("connection") == "Connected" and st.get("replication") == "Established"
            and st.get("disk") == "UpToDate" and st.get("peer_disk") == "UpToDate")


def connected(st: dict) -> bool:
    """status's cstate Connected: connected and no resync running."""
    return st.get("connection") == "Connected" and st.get("replication") == "Established"


def _line(ev: dict) -> str:
    fields = " ".join(f"{k}:{v}" for k, v in ev.get("fields", {}).items())
    return f"{ev.get('time', '')} {ev['kind']} {ev['object']} name:{ev.get('name', '')} " \
           f"{fields}".strip()


class Events:
    """A running ``replfsadm events2 --json --timestamps [RES]`` on ``node``."""

    def __init__(self, node: Node, res: str | None = None):
        self.node = node
        self.daemon = node.proc             # the replfsd it watches
        self.proc = node.events2("--json", "--timestamps", *([res] if res else []))
        self._cond = threading.Condition()
        self._state: dict[str, dict] = {}
        # (event or None for the initial state, time, arrival, snapshot of every resource)
        self._history: list[tuple] = []
        self.seen: list[str] = []
        self.ended = False
        self._reader = threading.Thread(target=self._read, daemon=True,
                                        name=f"events2-{node.name}")
        self._reader.start()

    # ------------------------------------------------------------ reading
    def _read(self) -> None:
        try:
            for text in self.proc.stdout:
                try:
                    ev = json.loads(text)
                except ValueError:
                    with self._cond:
                        self.seen.append("(not JSON) " + text.rstrip("\n"))
                    continue
                with self._cond:
                    self._apply(ev)
                    self._cond.notify_all()
        finally:
            with self._cond:
                self.ended = True
                self._cond.notify_all()

    def _apply(self, ev: dict) -> None:
        obj, name = ev.get("object"), ev.get("name", "")
        if ev["kind"] == "exists" and obj == "-":
            self.seen.append("exists -")
            self._history.append((None, None, time.monotonic(), self._snapshot()))
            return
        self.seen.append(_line(ev))
        if ev["kind"] == "destroy":
            if obj == "resource":
                self._state.pop(name, None)
        else:
            st = self._state.setdefault(name, {})
            for k, v in ev.get("fields", {}).items():
                key = FLAT.get((obj, k))
                if key is not None:
                    st[key] = v
        if self._history:          # (the exists lines are one state, at "exists -")
            self._history.append((ev, ev.get("time"), time.monotonic(), self._snapshot()))

    def _snapshot(self) -> dict:
        return {name: dict(st) for name, st in self._state.items()}

    # ------------------------------------------------------------ waiting
    def mark(self) -> int:
        """A point in the event stream for ``wait(since=...)``: states
        reached by changes after it.  Waits until the watcher has printed
        the state it started with (so that a change made after ``mark``
        returns is after it)."""
        with self._cond:
            self._wait_ready(time.monotonic() + 30)
            return len(self._history)

    def _wait_ready(self, deadline: float) -> None:
        while not self._history:
            self._check_alive("its first state")
            left = deadline - time.monotonic()
            if left <= 0:
                raise PairError(f"{self.node.name}: events2 printed no state in time\n"
                                + self._tail())
            self._cond.wait(left)

    def _complete(self, j: int, now: float) -> float:
        """0 when history entry ``j`` is a whole change, else the seconds
        to wait before it counts as one."""
        ev, t, arrived, _ = self._history[j]
        if ev is None:
            return 0
        if j + 1 < len(self._history):
            return 0 if self._history[j + 1][1] != t else -1     # -1: part of a change
        return max(0.0, SETTLE - (now - arrived))

    def wait(self, pred, timeout: float = 30, what: str = "condition", res: str = "r0",
             since: int | None = None) -> dict:
        """The state of ``res`` (a dict, empty while it is not up) once
        ``pred`` holds for it; see the module's docstring."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self._wait_ready(deadline)
            j = len(self._history) - 1 if since is None else since
            while True:
                now = time.monotonic()
                pause = None
                while j < len(self._history):
                    left = self._complete(j, now)
                    if left < 0:
                        j += 1
                        continue
                    if left > 0:
                        pause = left
                        break
                    st = dict(self._history[j][3].get(res, {}))
                    if pred(st):
                        return st
                    j += 1
                self._check_alive(what)
                left = deadline - now
                if left <= 0:
                    raise PairError(f"{self.node.name}: timed out after {timeout} s waiting "
                                    f"for {what}; {res} is {self._state.get(res)}\n"
                                    + self._tail())
                self._cond.wait(min(left, pause) if pause is not None else left)

    def _check_alive(self, what: str) -> None:
        if self.ended:
            err = self.proc.stderr.read() if self.proc.poll() is not None else ""
            raise PairError(f"{self.node.name}: events2 ended (exit {self.proc.poll()}) "
                            f"while waiting for {what}: {err.strip()}\n" + self._tail())

    def _tail(self, n: int = 40) -> str:
        return "events seen:\n  " + "\n  ".join(self.seen[-n:] or ["(none)"])

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            self.proc.wait(10)
        except Exception:           # noqa: BLE001 -- a watcher that will not stop
            self.proc.kill()
            self.proc.wait(10)
        self._reader.join(10)
        for f in (self.proc.stdout, self.proc.stderr):
            f.close()

    def __enter__(self) -> Events:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class PairEvents:
    """One ``Events`` per node of a LocalPair, started on first use and
    again when the node's replfsd is another one (restarted) or the
    previous watcher ended."""

    def __init__(self, pair: LocalPair):
        self.pair = pair
        self._watchers: dict[str, Events] = {}

    def __getitem__(self, node: Node) -> Events:
        w = self._watchers.get(node.name)
        if w is None or w.ended or w.daemon is not node.proc:
            if w is not None:
                w.close()
            w = self._watchers[node.name] = Events(node)
        return w

    def start(self) -> None:
        """Start both nodes' watchers (at once, before an action)."""
        for n in self.pair.nodes:
            self[n]

    def wait(self, node: Node, pred, **kw) -> dict:
        return self[node].wait(pred, **kw)

    def mark(self) -> dict[str, int]:
        """``Events.mark`` of both nodes (for ``wait_synced(since=...)``)."""
        self.start()
        return {n.name: self[n].mark() for n in self.pair.nodes}

    def wait_synced(self, timeout: float = 60, since: dict[str, int] | None = None) -> None:
        """LocalPair.wait_synced on events: both nodes Connected, both disks
        UpToDate (with ``since`` from ``mark()``: reached after it)."""
        self.start()
        for n in self.pair.nodes:
            self[n].wait(synced, timeout=timeout, what="both disks UpToDate",
                         since=None if since is None else since[n.name])

    def up_fresh(self) -> None:
        """LocalPair.up_fresh on events: create-md, start both daemons, up,
        force alpha Primary, wait for the sync."""
        pair = self.pair
        pair.both(lambda n: n.adm("create-md", "r0"))
        pair.start_both()
        self.start()
        pair.both(lambda n: n.adm("up", "r0"))
        self[pair.alpha].wait(lambda s: s.get("connection") == "Connected",
                              what="connection")
        pair.alpha.adm("primary", "--force", "r0")
        self.wait_synced()

    def close(self) -> None:
        for w in self._watchers.values():
            w.close()
        self._watchers.clear()

    def __enter__(self) -> PairEvents:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
