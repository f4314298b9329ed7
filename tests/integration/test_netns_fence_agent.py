"""The cluster stack with a fence agent, in the network-only heartbeat
topology a real two-machine pair has (no disk both nodes can see; the
namespaced nodes have no heartbeat region).

Without an agent, o2quo's two-node rule keeps node 0 and fences node 1 --
also when node 0 simply died, since node 1 cannot tell a crash from a
partition (test_netns_faults.py checks that).  With cluster.conf's
``fence_agent`` (locking/fence.py) the survivor is confirmed: here the
agent is STONITH for a namespaced node, killing every process in the
node's network namespace (its replfsd, and with it the mounts it
serves).  The tests check that:

* alpha (node 0) dies: beta waits fence_delay, switches alpha off, and
  goes on -- not fenced, its mount writing, alpha's fsync'd file there;
* a symmetric partition: alpha switches beta off at once; beta, which
  waits fence_delay first, is dead before it can shoot; alpha goes on;
* an agent that fails: nothing confirms the peer stopped, so both nodes
  fence themselves (safe, not available) and say why.

Then the cluster is healed as an admin does and both nodes mount again.
"""
from __future__ import annotations

import os
import time

import pytest

from .test_fs_mount import force_unmount, mounted
from .test_netns_faults import HANG_BOUND, netns_cluster, wait_until
from .test_netns_faults import pytestmark  # noqa: F401 (the same FUSE/netns skips)

DELAY = 3


def agent_conf(tmp_path, fail: bool = False):
    """cluster_extra for netns_cluster: a fence agent that kills a node's
    namespace (or one that always fails), logging what it was asked."""
    record = tmp_path / "fence-calls.log"

    def extra(ns) -> str:
        script = tmp_path / "fence-ns.sh"
        if fail:
            body = 'echo "no fence device reachable" >&2\nexit 1\n'
        else:
            body = (f'case "$REPLFS_FENCE_NODE" in alpha) ns={ns.ns[0]} ;; beta) ns={ns.ns[1]} ;;\n'
                    '  *) echo "unknown node $REPLFS_FENCE_NODE" >&2; exit 1 ;; esac\n'
                    'for i in $(seq 100); do\n'
                    '  pids=$(ip netns pids "$ns")\n'
                    '  [ -z "$pids" ] && { echo "$REPLFS_FENCE_NODE is off"; exit 0; }\n'
                    '  kill -9 $pids 2>/dev/null; sleep 0.1\n'
                    'done\nexit 1\n')
        script.write_text("#!/bin/sh\n"
                          f'printf "%s %s\\n" "$REPLFS_FENCE_NODE" "$(cat)" >> {record}\n'
                          + body)
        script.chmod(0o755)
        return f"\tfence_agent = {script}\n\tfence_delay = {DELAY}\n\tfence_timeout = 20\n"
    return extra, record


def _fsynced(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def test_beta_survives_alphas_death_confirmed_by_the_agent(tmp_path):
    extra, record = agent_conf(tmp_path)
    with netns_cluster(tmp_path, cluster_extra=extra) as c:
        a, b = c.node["alpha"], c.node["beta"]
        _fsynced(os.path.join(c.mnt["alpha"], "a", "before"), b"alpha's")
        t0 = time.monotonic()
        c.kill9("alpha")
        force_unmount(c.mnt["alpha"])
        wait_until(lambda: 0 in c.cluster_status("beta").get("dead", []), HANG_BOUND + DELAY,
                   "beta to declare alpha dead")
        took = time.monotonic() - t0
        cs = c.cluster_status("beta")
        assert not cs.get("fenced"), cs
        assert took >= DELAY, f"beta did not wait fence_delay ({took:.1f} s)"
        assert "node 0 (alpha) is off: the fence agent confirmed it" in b.log()
        # beta's mount goes on: alpha's fsync'd file, and new writes
        wait_until(lambda: b.status().get("io_suspended") is False, HANG_BOUND, "beta's I/O")
        with open(os.path.join(c.mnt["beta"], "a", "before"), "rb") as f:
            assert f.read() == b"alpha's"
        _fsynced(os.path.join(c.mnt["beta"], "b", "after"), b"beta goes on")
        assert record.read_text().startswith("alpha action=off")
        # alpha comes back: up, resync from beta, both mounted again
        c.restore(restart_first=True, log=print, timeout=40)
        with open(os.path.join(c.mnt["alpha"], "b", "after"), "rb") as f:
            assert f.read() == b"beta goes on"


def test_a_partition_ends_with_the_agent_switching_beta_off(tmp_path):
    extra, record = agent_conf(tmp_path)
    with netns_cluster(tmp_path, cluster_extra=extra) as c:
        a = c.node["alpha"]
        c.ns.cut("both")
        wait_until(lambda: not c.alive("beta"), HANG_BOUND, "the agent to switch beta off")
        wait_until(lambda: 1 in c.cluster_status("alpha").get("dead", []), HANG_BOUND,
                   "alpha to declare beta dead")
        assert not c.cluster_status("alpha").get("fenced")
        assert "node 1 (beta) is off: the fence agent confirmed it" in a.log()
        # beta waited fence_delay and was off before it could shoot
        assert record.read_text().splitlines()[0].startswith("beta action=off")
        assert "alpha" not in record.read_text()
        wait_until(lambda: a.status().get("io_suspended") is False, HANG_BOUND, "alpha's I/O")
        _fsynced(os.path.join(c.mnt["alpha"], "a", "during"), b"alone")
        c.ns.heal()
        force_unmount(c.mnt["beta"])
        c.restore(restart_first=True, log=print, timeout=40)
        with open(os.path.join(c.mnt["beta"], "a", "during"), "rb") as f:
            assert f.read() == b"alone"


def test_a_failing_agent_fences_both_nodes(tmp_path):
    extra, record = agent_conf(tmp_path, fail=True)
    with netns_cluster(tmp_path, cluster_extra=extra) as c:
        c.ns.cut("both")
        for name in ("alpha", "beta"):
            cs = wait_until(lambda: c.cluster_status(name).get("fenced"),
                            HANG_BOUND + DELAY + 5, f"{name} to fence itself")
            assert "could not switch it off" in str(c.cluster_status(name)["fenced"]), cs
            assert "no fence device reachable" in c.node[name].log()
        for name in ("alpha", "beta"):
            with pytest.raises(OSError):
                _fsynced(os.path.join(c.mnt[name], "s", f"x-{name}"), b"must fail")
        c.ns.heal()
        c.restore(restart_first=False, log=print, timeout=40)
        assert all(mounted(c.mnt[n]) for n in ("alpha", "beta"))
