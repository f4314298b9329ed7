"""``replfsadm nfs start`` waits for a dead peer's state before Ganesha's
grace period can start, and ``replfsadm nfs stop`` works once replfsd and
the mount are gone: the daemon's answers come from stand-ins here (a real
peer death is in tests/integration/test_nfs_export.py, where the window
is too short to hit on purpose)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import pytest

from replfs.cli import nfs as cli
from replfs.errors import EXIT_TIMEOUT, ReplfsError

UUID = "6d9b8709f2e0416eb2aa9b3d79a119d9"


def rec(mnt="/srv/r0", recovering=(), shared=True) -> dict:
    m = {"resource": "r0", "mountpoint": str(mnt), "uuid": UUID, "slot": 0}
    if shared:
        m.update(node="alpha", recovering=list(recovering))
    return m


def status(connected=(1,), dead=(), fenced=None, online=True) -> dict:
    return {"online": online, "number": 0, "members": [0, 1], "connected": list(connected),
            "dead": list(dead), "fenced": fenced}


def members(*nodes):
    asked = []

    def of(uuid):
        asked.append(uuid)
        return list(nodes)
    of.asked = asked
    return of


def test_what_start_waits_for():
    P = cli.pending_recovery
    # both nodes up, nothing recovering
    assert P(rec(), status(), members(0, 1)) == []
    # the peer dropped off and the cluster stack has not declared it dead
    # yet (it still is in the volume's lock domain): its slot and locks are
    # not even being recovered
    of = members(0, 1)
    why = P(rec(), status(connected=()), of)
    assert len(why) == 1 and "node(s) 1 unreachable but not yet declared dead" in why[0]
    assert of.asked == [UUID]
    # declared dead: the mount recovers its slot
    why = P(rec(recovering=[1]), status(connected=(), dead=(1,)), members(0))
    assert len(why) == 1 and "recovering the journal slots of dead node(s) 1" in why[0]
    # recovered
    assert P(rec(), status(connected=(), dead=(1,)), members(0)) == []
    # never up since this node joined, or left cleanly: not in the domain
    assert P(rec(), status(connected=()), members(0)) == []
    # not a shared mount: nobody else writes, the cluster is not asked
    of = members(0, 1)
    assert P(rec(shared=False), None, of) == [] and of.asked == []
    # the domain is asked only when a node is unreachable
    of = members(0, 1)
    assert P(rec(), status(), of) == [] and of.asked == []
    with pytest.raises(ReplfsError, match="this node is fenced"):
        P(rec(), status(fenced="lost quorum"), members(0, 1))


class Daemon:
    """replfsd's answers over (fake) time: ``script`` is a list of
    (from time, mount record, cluster status, lock domain members)."""

    def __init__(self, script):
        self.script = script
        self.now = 0.0
        self.asked = 0

    def _at(self):
        return [s for s in self.script if s[0] <= self.now][-1]

    def mount(self, arg):
        self.asked += 1
        return self._at()[1]

    def cluster_status(self):
        return self._at()[2]

    def domain_members(self, uuid):
        return self._at()[3]

    def sleep(self, dt):
        self.now += dt


def test_start_waits_through_the_declaration_and_the_recovery():
    d = Daemon([(0.0, rec(), status(connected=()), [0, 1]),              # undeclared
                (1.3, rec(recovering=[1]), status(connected=(), dead=(1,)), [0]),
                (2.0, rec(), status(connected=(), dead=(1,)), [0])])       # recovered
    said = []
    m = cli.wait_recovered(d, "/srv/r0", 30, said.append, clock=lambda: d.now, sleep=d.sleep)
    assert m["recovering"] == [] and 2.0 <= d.now < 2.5
    assert len(said) == 2, said                       # said once per state, not per poll
    assert "not yet declared dead" in said[0] and "recovering the journal" in said[1]


def test_start_refuses_when_the_wait_runs_out():
    d = Daemon([(0.0, rec(), status(connected=()), [0, 1])])
    with pytest.raises(ReplfsError) as e:
        cli.wait_recovered(d, "/srv/r0", 5, lambda s: None, clock=lambda: d.now,
                           sleep=d.sleep)
    assert e.value.exit_code == EXIT_TIMEOUT and 5 <= d.now < 5.5
    assert "not starting the NFS server" in e.value.message
    assert "--wait-recovery" in e.value.message
    # --wait-recovery 0: one look, no wait
    d = Daemon([(0.0, rec(recovering=[1]), status(connected=(), dead=(1,)), [0])])
    with pytest.raises(ReplfsError):
        cli.wait_recovered(d, "/srv/r0", 0, lambda s: None, clock=lambda: d.now,
                           sleep=d.sleep)
    assert d.asked == 1


def run_cli(*argv):
    out, err = [], []
    code = cli.main(list(argv), out=out.append, err=err.append)
    return code, "\n".join(out), "\n".join(err)


def test_cli_start_fails_loudly_and_starts_no_server(tmp_path, monkeypatch):
    from replfs.nfs import ganesha as G

    def call(g, op, **args):
        return {"mounts": {"mounts": [rec(tmp_path)]},
                "cluster-status": status(connected=()),
                "dlm-locks": {"locks": {}, "mastered": {UUID: {"members": [0, 1]}}}}[op]
    monkeypatch.setattr(cli, "_call", call)
    monkeypatch.setattr(G, "start", lambda *a, **k: pytest.fail("started a server"))
    code, out, err = run_cli("--rundir", str(tmp_path), "nfs", "start", str(tmp_path),
                             "--wait-recovery", "0.3")
    assert code == EXIT_TIMEOUT, (code, out, err)
    assert "waiting before the NFS server starts" in out
    assert "not yet declared dead" in err and "Traceback" not in err
    code, _, err = run_cli("nfs", "start", str(tmp_path), "--wait-recovery", "soon")
    assert code == 1 and "--wait-recovery: 'soon'" in err
    code, _, err = run_cli("nfs", "reload", "r0", "--wait-recovery", "3")
    assert code == 1 and "does not take --wait-recovery" in err


@pytest.mark.parametrize("option", [("--grace", "20"), ("--lease", "5"), ("--protocols", "4"),
                                    ("--log-level", "NIV_DEBUG"), ("--port", "1")])
def test_reload_refuses_what_ganesha_does_not_reread(tmp_path, monkeypatch, option):
    monkeypatch.setattr(cli, "_call", lambda g, op, **a: {"mounts": [rec(tmp_path)]})
    d = tmp_path / "nfs"
    d.mkdir()
    (d / "export").write_text(export_file(tmp_path))
    code, _, err = run_cli("nfs", "reload", "r0", "--dir", str(d), *option)
    assert code == 1 and "needs a restart" in err, (code, err)


def export_file(mnt) -> str:
    """The export file start writes in the server's directory."""
    from replfs.nfs import ganesha as G
    return G._spec_text(G.ExportSpec(resource="r0", mountpoint=str(mnt), uuid=UUID,
                                     node="alpha"))


def fake_ganesha(tmp_path):
    """A process whose name is ganesha.nfsd (a copy of sleep)."""
    exe = tmp_path / "ganesha.nfsd"
    shutil.copy(shutil.which("sleep"), exe)
    p = subprocess.Popen([str(exe), "60"])
    deadline = time.monotonic() + 10
    while open(f"/proc/{p.pid}/comm").read().strip() != "ganesha.nfsd":     # exec'd yet?
        assert time.monotonic() < deadline
        time.sleep(0.01)
    return p


def test_stop_without_replfsd_or_the_mount(tmp_path):
    """The HA stop path: the mount (or replfsd) died; stop still reaches
    the server, with --dir and without it."""
    rundir = tmp_path / "run"
    d = rundir / "nfs" / "r0"
    d.mkdir(parents=True)
    mnt = tmp_path / "gone"                      # not mounted, not even there
    (d / "export").write_text(export_file(mnt))
    for extra in ((), ("--dir", str(d))):
        p = fake_ganesha(tmp_path)
        try:
            (d / "ganesha.pid").write_text(f"{p.pid}\n")
            code, out, err = run_cli("--rundir", str(rundir), "nfs", "stop", str(mnt),
                                     "--timeout", "5", *extra)
            assert code == 0 and f"r0: NFS-Ganesha pid {p.pid} stopped" in out, (code, err)
            assert p.wait(timeout=5) == -15                   # SIGTERM
        finally:
            p.kill()
            p.wait()
    code, out, _ = run_cli("--rundir", str(rundir), "nfs", "stop", str(mnt))
    assert code == 0 and "r0: NFS-Ganesha is not running" in out
    # a path no export serves: the daemon's answer, and what else to give
    code, _, err = run_cli("--rundir", str(rundir), "nfs", "stop", str(tmp_path / "other"))
    assert code == 20 and "replfsd is not running" in err and "--dir" in err


if __name__ == "__main__":
    sys.exit(pytest.main([os.path.abspath(__file__), "-q"]))
