"""The OCF resource agents (replfs/ha/ocf/) with Pacemaker's own tools:
ocf-tester runs every action of each agent against real daemons, real
mounts and a real NFS-Ganesha, and crm_resource drives the promotable
agent through a start/promote/demote/stop cycle from a CIB file, as a
cluster would: on one node, then dual-primary (promoted-max=2,
notify=true) on both, with the post-demote notification reconnecting a
StandAlone resource.  A monitor of a frozen mount, and a start against a
frozen replfsd, fail within their timeout instead of hanging."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time

import pytest

from replfs.localpair import LocalPair, free_port
from tests.harness.events import PairEvents, connected

from .test_fs_mount import ENV, VENV_BIN, fuse_usable
from .test_fs_shared import call, mount, shared_pair, wait_closed

AGENTS = os.path.join(os.path.dirname(__file__), "..", "..", "replfs", "ha", "ocf")
ADM = os.path.join(VENV_BIN, "replfsadm")
INSTALLED = "/usr/lib/ocf/resource.d/replfs"

pytestmark = [
    pytest.mark.skipif(shutil.which("ocf-tester") is None,
                       reason="ocf-tester is not installed (Debian resource-agents; "
                              "scripts/setup.sh installs it)"),
]


def run_ocf_tester(agent: str, name: str, **params) -> str:
    args = ["ocf-tester", "-n", name]
    for k, v in params.items():
        args += ["-o", f"{k}={v}"]
    cp = subprocess.run(args + [os.path.realpath(os.path.join(AGENTS, agent))],
                        capture_output=True, text=True, timeout=600, env=ENV)
    assert cp.returncode == 0 and "passed all tests" in cp.stdout, cp.stdout + cp.stderr
    return cp.stdout


def agent(agent: str, action: str, timeout_ms: int = 60000, check_level: int = 0, **params):
    env = dict(ENV, OCF_ROOT="/usr/lib/ocf", OCF_RESKEY_CRM_meta_timeout=str(timeout_ms),
               OCF_CHECK_LEVEL=str(check_level),
               **{f"OCF_RESKEY_{k}": str(v) for k, v in params.items()})
    return subprocess.run([os.path.join(AGENTS, agent), action], capture_output=True,
                          text=True, timeout=120, env=env)


def clone(rid: str, node, provider: str, meta: str = "") -> str:
    """A promotable clone of ocf:PROVIDER:replfs for resource r0 on ``node``
    (each node its own clone: crm_resource runs the agent here, with the
    primitive's parameters, so the node and its rundir are parameters)."""
    params = dict(resource="r0", config=node.conf, node=node.name, rundir=node.rundir,
                  replfsadm=ADM)
    nvpairs = "".join(f'<nvpair id="{rid}-p-{k}" name="{k}" value="{v}"/>'
                      for k, v in params.items())
    metas = "".join(f'<nvpair id="{rid}-m-{k}" name="{k}" value="{v}"/>'
                    for k, v in [("promotable", "true")] + [
                        tuple(kv.split("=")) for kv in meta.split()])
    return (f'<clone id="{rid}-clone"><meta_attributes id="{rid}-clone-meta">{metas}'
            f'</meta_attributes><primitive id="{rid}" class="ocf" provider="{provider}" '
            f'type="replfs"><instance_attributes id="{rid}-params">{nvpairs}'
            f'</instance_attributes></primitive></clone>')


CIB = """<cib crm_feature_set="3.16.2" validate-with="pacemaker-3.9" epoch="1" num_updates="0"
     admin_epoch="0">
 <configuration>
  <crm_config/>
  <nodes><node id="1" uname="alpha"/><node id="2" uname="beta"/></nodes>
  <resources>{resources}</resources>
  <constraints/>
 </configuration>
 <status/>
</cib>
"""


@pytest.fixture
def provider():
    """An OCF provider directory naming this tree's agents, so that
    crm_resource (which finds agents only under /usr/lib/ocf/resource.d)
    runs the agents under test, not whatever copy set-up installed there
    (its links may point into another checkout)."""
    base = os.path.dirname(INSTALLED)
    name = f"replfs-test-{os.getpid()}"
    link = os.path.join(base, name)
    if shutil.which("crm_resource") is None:
        pytest.skip("crm_resource is missing (Debian pacemaker-cli-utils; scripts/setup.sh)")
    try:
        os.symlink(os.path.realpath(AGENTS), link)
    except OSError as e:
        inst = os.path.join(INSTALLED, "replfs")
        if os.path.realpath(inst) == os.path.realpath(os.path.join(AGENTS, "replfs")):
            yield "replfs"
            return
        pytest.skip(f"cannot add an OCF provider in {base} ({e.strerror}) and the installed "
                    f"agents are not this tree's (scripts/setup.sh)")
    try:
        yield name
    finally:
        os.unlink(link)


def crm(cib, rid: str, action: str) -> int:
    cp = subprocess.run(["crm_resource", "-r", rid, action], capture_output=True, text=True,
                        env=dict(ENV, CIB_file=str(cib)), timeout=120)
    assert "Traceback" not in cp.stdout + cp.stderr, cp.stdout + cp.stderr
    return cp.returncode


def wait_cstate(events, node, cstate: str, timeout: float = 20):
    """``replfsadm cstate`` is ``cstate`` (Connected: and no resync), on
    the node's events2 (tests/harness/events.py)."""
    events[node].wait(connected if cstate == "Connected"
                      else lambda s: s.get("connection") == cstate,
                      timeout=timeout, what=f"cstate {cstate}")
    assert node.adm("cstate", "r0").stdout.strip() == cstate


def _role_is(role: str):
    """A predicate on events2's state for a ``replfsadm role`` answer:
    LOCAL/PEER, or Unconfigured (the resource is not up)."""
    if role == "Unconfigured":
        return lambda s: not s
    mine, peer = role.split("/")
    return lambda s: s.get("role") == mine and s.get("peer_role") == peer


def wait_roles(events, a, b, ra: str, rb: str, timeout: float = 10):
    """Both nodes' ``replfsadm role`` (each learns the other's role from a
    state message, a moment after the agent's action returns), waited for
    on each node's events2."""
    for node, role in ((a, ra), (b, rb)):
        events[node].wait(_role_is(role), timeout=timeout, what=f"role {role}")
    got = (a.adm("role", "r0").stdout.strip(), b.adm("role", "r0").stdout.strip())
    assert got == (ra, rb), got


def test_resource_agent_with_ocf_tester_and_crm_resource(tmp_path, provider):
    pair = LocalPair(tmp_path, extra_net="allow-two-primaries;")
    events = PairEvents(pair)
    try:
        events.up_fresh()
        a, b = pair.alpha, pair.beta
        a.adm("secondary", "r0")
        a.adm("down", "r0")
        params = dict(resource="r0", config=a.conf, node="alpha", rundir=a.rundir,
                      replfsadm=ADM)
        run_ocf_tester("replfs", "r0test", **params)
        # a bad configuration is OCF_ERR_CONFIGURED, a stop of it succeeds
        bad = dict(params, resource="nosuch")
        assert agent("replfs", "validate-all", **bad).returncode == 6
        assert agent("replfs", "start", **bad).returncode == 6
        assert agent("replfs", "stop", **bad).returncode == 0
        assert agent("replfs", "monitor", **bad).returncode == 7

        # a frozen replfsd: start (status, up, status: three calls) fails
        # within its timeout, all its calls sharing it
        a.proc.send_signal(signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            cp = agent("replfs", "start", timeout_ms=8000, **params)
            took = time.monotonic() - t0
        finally:
            a.proc.send_signal(signal.SIGCONT)
        assert cp.returncode == 1 and "the action's 8000 ms" in cp.stderr, cp.stderr
        assert took < 8, took
        assert "Traceback" not in cp.stderr

        # one node: start, promote, demote, stop from a CIB, as a cluster would
        cib = tmp_path / "cib.xml"
        cib.write_text(CIB.format(resources=clone("r0", a, provider)))
        roles = []
        for action, rc in (("--force-check", 7), ("--force-start", 0), ("--force-check", 0),
                           ("--force-promote", 0), ("--force-check", 8),
                           ("--force-demote", 0), ("--force-stop", 0), ("--force-check", 7)):
            assert crm(cib, "r0", action) == rc, action
            roles.append(a.adm("role", "r0").stdout.strip())
        assert roles == ["Unconfigured", "Secondary/Secondary", "Secondary/Secondary",
                         "Primary/Secondary", "Primary/Secondary", "Secondary/Secondary",
                         "Unconfigured", "Unconfigured"], roles

        # dual-primary (promoted-max=2, notify=true), both nodes: each
        # node's instance from its own clone (crm_resource runs agents here)
        b.adm("secondary", "r0", check=False)
        b.adm("down", "r0")
        meta = "promoted-max=2 promoted-node-max=1 clone-max=2 notify=true"
        cib.write_text(CIB.format(resources=clone("ra", a, provider, meta)
                                  + clone("rb", b, provider, meta)))
        assert crm(cib, "ra", "--force-start") == 0 and crm(cib, "rb", "--force-start") == 0
        wait_cstate(events, a, "Connected")
        assert crm(cib, "ra", "--force-promote") == 0
        assert crm(cib, "rb", "--force-promote") == 0
        wait_roles(events, a, b, "Primary/Primary", "Primary/Primary")
        assert crm(cib, "ra", "--force-check") == 8 and crm(cib, "rb", "--force-check") == 8
        assert crm(cib, "rb", "--force-demote") == 0
        wait_roles(events, a, b, "Primary/Secondary", "Secondary/Primary")
        assert crm(cib, "ra", "--force-demote") == 0
        wait_roles(events, a, b, "Secondary/Secondary", "Secondary/Secondary")

        # notify: alpha was left StandAlone; the post-demote notification
        # (as Pacemaker sends it to the clone's instances) reconnects it
        a.adm("disconnect", "r0")
        wait_cstate(events, a, "StandAlone")
        env = {"CRM_meta_notify": "true", "CRM_meta_notify_type": "post",
               "CRM_meta_notify_operation": "demote", "CRM_meta_notify_demote_uname": "alpha ",
               "CRM_meta_notify_active_uname": "alpha beta ",
               "CRM_meta_notify_unpromoted_uname": "alpha beta ",
               "CRM_meta_notify_promoted_uname": " ", "CRM_meta_promoted_max": "2"}
        pre = agent("replfs", "notify", **dict(params, **dict(env, CRM_meta_notify_type="pre")))
        assert pre.returncode == 0 and a.adm("cstate", "r0").stdout.strip() == "StandAlone"
        cp = agent("replfs", "notify", **params, **env)
        assert cp.returncode == 0, cp.stderr
        wait_cstate(events, a, "Connected")
        wait_cstate(events, b, "Connected")

        assert crm(cib, "rb", "--force-stop") == 0 and crm(cib, "ra", "--force-stop") == 0
        wait_roles(events, a, b, "Unconfigured", "Unconfigured")
    finally:
        events.close()
        pair.teardown()


@pytest.mark.fuse
@pytest.mark.skipif(not fuse_usable(), reason="needs /dev/fuse and root")
def test_cluster_mount_and_nfs_agents(tmp_path, rpcbind):
    from .test_nfs_export import _missing
    with shared_pair(tmp_path) as (pair, ma, mb, cdir):
        a = pair.alpha
        fs = dict(resource="r0", directory=ma, conf=a.conf, node="alpha", rundir=a.rundir)
        run_ocf_tester("replfs-fs", "fs", **fs)
        assert agent("replfs-fs", "start", **fs).returncode == 0
        cp = agent("replfs-fs", "monitor", check_level=20, **fs)     # writes and reads
        assert cp.returncode == 0, cp.stderr
        assert not [n for n in os.listdir(ma) if n.startswith(".replfs-ocf-check")]

        if not _missing:
            nfs = dict(resource="r0", directory=ma, address="127.0.0.1",
                       port=free_port("127.0.0.1"), mount_port=free_port("127.0.0.1"),
                       grace=3, lease=3, node="alpha", rundir=a.rundir, replfsadm=ADM)
            run_ocf_tester("replfs-nfs", "nfs", **nfs)
            assert agent("replfs-nfs", "monitor", **nfs).returncode == 7

        assert agent("replfs-fs", "stop", **fs).returncode == 0
        wait_closed(a)

        # the cluster stack's agent (once this node's mount is gone)
        cl = dict(cluster="tc", conf=os.path.join(cdir, "cluster.conf"), node="alpha",
                  rundir=a.rundir, replfsadm=ADM)
        run_ocf_tester("replfs-cluster", "cluster", **cl)
        assert agent("replfs-cluster", "monitor", **cl).returncode == 7
        assert agent("replfs-cluster", "start", **cl).returncode == 0
        assert agent("replfs-cluster", "monitor", **cl).returncode == 0
        deadline = time.monotonic() + 15
        while not all(call(n, "cluster-status")["connected"] for n in pair.nodes):
            assert time.monotonic() < deadline, "the cluster nodes did not reconnect"
            time.sleep(0.05)

        # a frozen mount (beta's daemon stopped): the monitor fails within
        # its timeout, never hangs
        b = pair.beta
        fsb = dict(resource="r0", directory=mb, conf=b.conf, node="beta", rundir=b.rundir)
        assert agent("replfs-fs", "start", **fsb).returncode == 0
        b.proc.send_signal(signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            cp = agent("replfs-fs", "monitor", timeout_ms=10000, **fsb)
            took = time.monotonic() - t0
        finally:
            b.proc.send_signal(signal.SIGCONT)
        assert cp.returncode == 1 and "does not answer" in cp.stderr, (cp.returncode, cp.stderr)
        assert took < 10, took


@pytest.mark.fuse
@pytest.mark.skipif(not fuse_usable(), reason="needs /dev/fuse and root")
def test_demote_refused_while_another_mount_namespace_keeps_the_mount(tmp_path):
    """umount succeeds, but a process in another mount namespace (as a
    container would) keeps the filesystem mounted there: the resource stays
    open, and the agent's demote fails at once, naming that process, until
    it is gone."""
    with shared_pair(tmp_path) as (pair, ma, mb, _):
        a = pair.alpha
        mount(pair.alpha, ma)
        holder = subprocess.Popen(["unshare", "-m", "--propagation", "private", "sleep", "600"])
        try:
            deadline = time.monotonic() + 10
            while os.readlink(f"/proc/{holder.pid}/ns/mnt") == os.readlink("/proc/self/ns/mnt"):
                assert time.monotonic() < deadline, "unshare did not make a namespace"
                time.sleep(0.02)
            subprocess.run(["umount", str(ma)], check=True)
            time.sleep(1)
            assert a.status()["open_count"] >= 1         # still mounted over there
            params = dict(resource="r0", config=a.conf, node="alpha", rundir=a.rundir,
                          replfsadm=ADM)
            t0 = time.monotonic()
            cp = agent("replfs", "demote", timeout_ms=30000, **params)
            assert cp.returncode == 1, (cp.returncode, cp.stderr)
            assert "held open" in cp.stderr and f" {holder.pid} " in cp.stderr, cp.stderr
            assert time.monotonic() - t0 < 30
        finally:
            holder.kill()
            holder.wait()
        wait_closed(a)
        assert agent("replfs", "demote", **params).returncode == 0
        assert a.adm("role", "r0").stdout.startswith("Secondary/")
