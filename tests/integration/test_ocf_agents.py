"""The OCF resource agents (replfs/ha/ocf/) with Pacemaker's own tools:
ocf-tester runs every action of each agent against real daemons, real
mounts and a real NFS-Ganesha, and crm_resource drives the promotable
agent through a start/promote/demote/stop cycle from a CIB file, as a
cluster would.  A monitor of a frozen mount fails within its timeout
instead of hanging."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time

import pytest

from replfs.localpair import LocalPair, free_port

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


CIB = """<cib crm_feature_set="3.16.2" validate-with="pacemaker-3.9" epoch="1" num_updates="0"
     admin_epoch="0">
 <configuration>
  <crm_config/>
  <nodes><node id="1" uname="alpha"/></nodes>
  <resources>
   <clone id="r0-clone">
    <meta_attributes id="r0-clone-meta">
     <nvpair id="r0-clone-promotable" name="promotable" value="true"/>
    </meta_attributes>
    <primitive id="r0" class="ocf" provider="replfs" type="replfs">
     <instance_attributes id="r0-params">
      <nvpair id="r0-p1" name="resource" value="r0"/>
      <nvpair id="r0-p2" name="config" value="{conf}"/>
      <nvpair id="r0-p3" name="node" value="alpha"/>
      <nvpair id="r0-p4" name="rundir" value="{rundir}"/>
      <nvpair id="r0-p5" name="replfsadm" value="{adm}"/>
     </instance_attributes>
    </primitive>
   </clone>
  </resources>
  <constraints/>
 </configuration>
 <status/>
</cib>
"""


def test_resource_agent_with_ocf_tester_and_crm_resource(tmp_path):
    pair = LocalPair(tmp_path)
    try:
        pair.up_fresh()
        a = pair.alpha
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

        if shutil.which("crm_resource") is None or \
                not os.path.exists(os.path.join(INSTALLED, "replfs")):
            pytest.skip("crm_resource or the installed agent is missing (scripts/setup.sh)")
        cib = tmp_path / "cib.xml"
        cib.write_text(CIB.format(conf=a.conf, rundir=a.rundir, adm=ADM))
        env = dict(ENV, CIB_file=str(cib))
        roles = []
        for action, rc in (("--force-check", 7), ("--force-start", 0), ("--force-check", 0),
                           ("--force-promote", 0), ("--force-check", 8),
                           ("--force-demote", 0), ("--force-stop", 0), ("--force-check", 7)):
            cp = subprocess.run(["crm_resource", "-r", "r0", action], capture_output=True,
                                text=True, env=env, timeout=300)
            assert cp.returncode == rc, (action, cp.stdout, cp.stderr)
            roles.append(a.adm("role", "r0").stdout.strip())
        assert roles == ["Unconfigured", "Secondary/Secondary", "Secondary/Secondary",
                         "Primary/Secondary", "Primary/Secondary", "Secondary/Secondary",
                         "Unconfigured", "Unconfigured"], roles
    finally:
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
