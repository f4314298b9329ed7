"""The fence agent (locking/fence.py): how it is run and what its answer
means, and cluster.conf's fence_agent / fence_delay / fence_timeout keys.
The cluster stack's use of it runs in tests/integration/test_netns_fence_agent.py."""
from __future__ import annotations

import pytest
import trio

from replfs.errors import ReplfsError
from replfs.locking import cluster_conf as cc
from replfs.locking.cluster_conf import Node
from replfs.locking.fence import FenceAgent

BETA = Node("beta", 1, "10.0.0.2", 7777, "c1")


async def test_the_agent_gets_the_node_on_stdin_and_in_its_environment(tmp_path):
    out = tmp_path / "seen"
    agent = FenceAgent(f'cat > {out}; echo "$REPLFS_FENCE_ACTION $REPLFS_FENCE_NODE '
                       f'$REPLFS_FENCE_NODE_NUMBER $REPLFS_FENCE_ADDRESS $REPLFS_CLUSTER" >> {out};'
                       f' echo switched off', "c1")
    ok, text = await agent.off(BETA)
    assert ok and text == "switched off"
    assert out.read_text() == ("action=off\nport=beta\nplug=beta\nnodename=beta\n"
                               "off beta 1 10.0.0.2 c1\n")


async def test_a_failing_or_hanging_agent_is_no_confirmation():
    ok, why = await FenceAgent("echo device unreachable >&2; exit 3", "c1").off(BETA)
    assert not ok and why == "the fence agent failed (exit status 3): device unreachable"
    with trio.fail_after(10):
        ok, why = await FenceAgent("sleep 30", "c1", timeout=0.5).off(BETA)
    assert not ok and why == "the fence agent did not finish within 0.5 s"


CONF = ("cluster:\n\tnode_count = 1\n\tname = c1\n{extra}\n"
        "node:\n\tip_port = 7777\n\tip_address = 127.0.0.1\n\tnumber = 0\n"
        "\tname = alpha\n\tcluster = c1\n")


def test_cluster_conf_fence_keys():
    conf = cc.parse(CONF.format(extra="\tfence_agent = /usr/sbin/fence-ns -x\n"
                                      "\tfence_delay = 7\n\tfence_timeout = 30"), "cluster.conf")
    c = conf.cluster("c1")
    assert (c.fence_agent, c.fence_delay, c.fence_timeout) == ("/usr/sbin/fence-ns -x", 7, 30)
    assert cc.parse(cc.dump(conf)) == conf
    with pytest.raises(ReplfsError, match=r"cluster\.conf:4: fence_delay has no effect "
                                          r"without fence_agent"):
        cc.parse(CONF.format(extra="\tfence_delay = 7"), "cluster.conf")
    with pytest.raises(ReplfsError, match=r"cluster\.conf:5: fence_delay 900 out of range 0\.\.600"):
        cc.parse(CONF.format(extra="\tfence_agent = x\n\tfence_delay = 900"), "cluster.conf")
