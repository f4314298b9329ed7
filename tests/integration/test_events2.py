"""replfsadm events2 against real daemons: the state at start, then every
change as it happens (a connection, a sync, a promotion, a disconnect and
reconnect, a down), in DRBD 9's events2 vocabulary, with timestamps and as
JSON; --now prints the state and exits."""
from __future__ import annotations

import json
import queue
import subprocess
import threading
import time

from replfs.localpair import PY


class Watch:
    """A running ``replfsadm events2``: its lines as they come."""

    def __init__(self, node, *args):
        self.proc = subprocess.Popen(
            [PY, "-m", "replfs.cli.main", "-c", node.conf, "--node", node.name,
             "--rundir", node.rundir, "events2", *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=node.env)
        self.lines: queue.Queue = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))

    def expect(self, *parts: str, timeout: float = 30) -> str:
        """The next line that has every one of ``parts`` (others are kept)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no line with {parts}; saw:\n" + "\n".join(self.seen))
            self.seen.append(line)
            if all(p in line for p in parts):
                return line

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=10)


def test_events2_follows_a_resource_through_its_life(cluster):
    a, b = cluster.alpha, cluster.beta
    cluster.both(lambda n: n.adm("create-md", "r0"))
    cluster.start_both()
    w = Watch(a)
    wj = Watch(a, "r0", "--json", "--timestamps")
    try:
        w.expect("exists -")
        wj.expect('"object": "-"')          # both watching before anything happens
        a.adm("up", "r0")
        w.expect("create resource name:r0 role:Secondary suspended:no")
        w.expect("create device name:r0 volume:0 minor:0 disk:")
        b.adm("up", "r0")
        w.expect("change connection name:r0 peer-node:beta connection:Connected role:Secondary")
        a.adm("primary", "--force", "r0")
        w.expect("change resource name:r0 role:Primary")
        w.expect("change peer-device name:r0", "replication:SyncSource")
        cluster.wait_synced()
        w.expect("change peer-device name:r0", "replication:Established", "peer-disk:UpToDate")
        b.adm("disconnect", "r0")
        w.expect("change connection name:r0", "connection:Connecting")
        w.expect("change peer-device name:r0", "replication:Off")
        b.adm("connect", "r0")
        w.expect("change connection name:r0", "connection:Connected")

        # --now: the state as it is, then exit 0
        cp = a.adm("events2", "--now", "r0")
        lines = cp.stdout.splitlines()
        assert lines[0] == "exists resource name:r0 role:Primary suspended:no", lines
        assert lines[-1] == "exists -" and len(lines) == 5, lines
        assert "exists peer-device name:r0 peer-node:beta volume:0 replication:Established " \
               "peer-disk:UpToDate resync-suspended:no" in lines

        # JSON lines with times
        first = json.loads(wj.expect('"kind": "create"', '"object": "resource"'))
        assert first["name"] == "r0" and first["fields"]["role"] == "Secondary"
        assert abs(first["time"] - time.time()) < 120

        a.adm("secondary", "r0")
        a.adm("down", "r0")
        w.expect("change resource name:r0 role:Secondary")
        w.expect("destroy resource name:r0")
    finally:
        w.stop()
        wj.stop()


def test_events2_usage_and_errors(cluster):
    a = cluster.alpha
    cp = a.adm("events2", "--statistics", check=False)
    assert cp.returncode == 1 and "unknown option '--statistics'" in cp.stderr
    cp = a.adm("events2", "nosuch", check=False)
    assert cp.returncode == 10, cp.stderr
    cp = a.adm("events2", "--now", check=False)      # no daemon
    assert cp.returncode == 20 and "replfsd is not running" in cp.stderr
    a.adm("create-md", "r0")
    a.start()
    cp = a.adm("events2", "--now")
    assert cp.stdout.strip() == "exists -"


def test_the_tests_event_watcher(cluster):
    """tests/harness/events.py, which the tests wait on instead of polling:
    a state reached before the watcher started counts (the exists lines), a
    wait ``since`` a mark only counts what came after it, a change's lines
    are judged together, a timeout says what was seen, and a watcher whose
    replfsd went away says so instead of waiting out its time."""
    from replfs.localpair import PairError
    from tests.harness.events import Events, PairEvents, synced
    a, b = cluster.alpha, cluster.beta
    with PairEvents(cluster) as ev:
        ev.up_fresh()
    with Events(a) as w:
        t0 = time.monotonic()
        st = w.wait(synced, what="in sync")        # reached before: from the exists lines
        assert time.monotonic() - t0 < 5
        assert st == {"role": "Primary", "suspended": "no", "connection": "Connected",
                      "peer_role": "Secondary", "disk": "UpToDate", "minor": "0",
                      "replication": "Established", "peer_disk": "UpToDate",
                      "resync_suspended": "no"}, st
        mark = w.mark()
        try:
            w.wait(synced, since=mark, timeout=0.5, what="a change")
        except PairError as e:
            assert "timed out after 0.5 s waiting for a change" in str(e)
            assert "exists -" in str(e) and "exists resource name:r0" in str(e), e
        else:
            raise AssertionError("a wait since a mark took the state from before it")
        b.adm("disconnect", "r0")
        # one change: connection, peer role and peer disk together
        st = w.wait(lambda s: s["connection"] != "Connected", since=mark)
        assert st["peer_role"] == "Unknown" and st["peer_disk"] == "DUnknown", st
        a.kill9()
        t0 = time.monotonic()
        try:
            w.wait(lambda s: False, timeout=20, what="nothing")
        except PairError as e:
            assert "events2 ended" in str(e), e
        assert time.monotonic() - t0 < 10
