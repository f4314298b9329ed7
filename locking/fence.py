"""The cluster stack's fence agent: STONITH that confirms a lost node is off.

Without one, a two-node cluster that loses its link follows o2quo's rule
alone: node 0 survives and, after the timing rule's grace, recovers node
1's locks on the assumption that node 1 fenced itself; node 1 fences
itself -- also when node 0 simply died, since without a disk both can
see it cannot tell a crash from a partition.  With ``fence_agent`` in
cluster.conf's cluster stanza, a node that loses a peer runs the agent to
switch the peer off, and survives only if the agent says it did:

* the node the quorum rule keeps runs the agent at once;
* a node the rule would fence waits ``fence_delay`` seconds first (the
  other one, if it is alive, switches it off meanwhile), then runs it: so
  node 1 survives node 0's death, confirmed;
* a node whose agent fails fences itself (nothing confirms the peer
  stopped, and the peer may be about to shoot).

The agent is a shell command, run as fence agents are: with
``action=off``, ``port=NODE``, ``plug=NODE`` and ``nodename=NODE`` lines on
its standard input, and the same facts in REPLFS_FENCE_* variables.
Exit status 0 means the node is off (an agent asked to switch off a node
that is already off answers 0).
"""
from __future__ import annotations

import logging
import os
import signal
from dataclasses import dataclass

import trio

from .cluster_conf import Node

log = logging.getLogger("replfs.locking")

DEFAULT_DELAY = 5
DEFAULT_TIMEOUT = 60


async def _kill_group(proc) -> None:
    """A cancelled agent goes with everything it started."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@dataclass(frozen=True)
class FenceAgent:
    command: str
    cluster: str
    delay: float = DEFAULT_DELAY
    timeout: float = DEFAULT_TIMEOUT

    def env(self, node: Node) -> dict[str, str]:
        return dict(os.environ, REPLFS_FENCE_ACTION="off", REPLFS_FENCE_NODE=node.name,
                    REPLFS_FENCE_NODE_NUMBER=str(node.number),
                    REPLFS_FENCE_ADDRESS=node.ip_address, REPLFS_CLUSTER=self.cluster)

    async def off(self, node: Node) -> tuple[bool, str]:
        """Switch ``node`` off: (True, output) once the agent confirms it,
        else (False, why)."""
        stdin = (f"action=off\nport={node.name}\nplug={node.name}\n"
                 f"nodename={node.name}\n").encode()
        log.warning("fencing node %d (%s): running the fence agent", node.number, node.name)
        cp = None
        try:
            with trio.move_on_after(self.timeout):
                cp = await trio.run_process(["/bin/sh", "-c", self.command], stdin=stdin,
                                            capture_stdout=True, capture_stderr=True,
                                            env=self.env(node), check=False,
                                            start_new_session=True,
                                            deliver_cancel=_kill_group)
        except OSError as e:
            return False, f"cannot run the fence agent: {e.strerror or e}"
        if cp is None:
            return False, f"the fence agent did not finish within {self.timeout:g} s"
        out = (cp.stdout + cp.stderr).decode(errors="replace").strip()
        if len(out) > 500:
            out = "..." + out[-500:]
        if cp.returncode == 0:
            return True, out
        return False, f"the fence agent failed (exit status {cp.returncode})" + \
            (f": {out}" if out else "")
