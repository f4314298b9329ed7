"""ko-count in the mirror engine, driven by hand: beta's disk stops
completing writes but beta still answers pings.  alpha drops the peer
after ko-count x timeout (after timeout when ko-count is not given), and
never with ko-count 0; pings alone keep the link up meanwhile."""
import pytest

from replfs.blockrepl.core.bitmap import BLOCK
from replfs.blockrepl.core.states import ConnState
from replfs.blockrepl.core.uuids import Uuids
from replfs.blockrepl.engine import actions as A
from replfs.blockrepl.engine.engine import Engine, EngineConfig
from replfs.blockrepl.meta import format as md

from engine_pair import bring_up  # (tests/unit is on sys.path)

NBLOCKS = 64


class Node:
    def __init__(self, name, peer, ko):
        cfg = EngineConfig(name="r0", node=name, peer=peer, c_plan_ahead=0, ping_int=1.0,
                           ping_timeout=0.5, timeout=2.0, ko_count=ko)
        self.e = Engine(cfg, now=0.0, new_uuid=iter(range(2 << 20, 3 << 20, 2)).__next__)
        self.sb = md.Superblock(NBLOCKS * BLOCK, Uuids(0x1000, 0, (0, 0)),
                                md.F_CONSISTENT | md.F_WAS_UP_TO_DATE, 0x2, 61)
        self.session = 0
        self.hung: list = []            # DiskWrites the disk never completes
        self.disk_hangs = False
        self.logs: list[str] = []


class Pair:
    def __init__(self, ko):
        self.a, self.b = Node("alpha", "beta", ko), Node("beta", "alpha", ko)
        self.a.peer, self.b.peer = self.b, self.a
        self.queue = []
        bring_up(self, NBLOCKS)

    def feed(self, node, actions):
        self.queue += [(node, a) for a in actions]

    def settle(self):
        while self.queue:
            node, a = self.queue.pop(0)
            t = type(a)
            if t is A.Send:
                if a.session == node.session and node.e.live:
                    peer = node.peer
                    if peer.e.live:
                        self.feed(peer, peer.e.receive(peer.session, a.pkt))
            elif t is A.DiskWrite and node.disk_hangs:
                node.hung.append(a)
            elif t is A.DiskRead:
                self.feed(node, node.e.done(a.token, bytes(a.length)))
            elif t in (A.DiskWrite, A.DiskFlush, A.PersistMeta, A.RunHandler):
                self.feed(node, node.e.done(a.token, 0))
            elif t is A.Log:
                node.logs.append(a.text)

    def advance(self, until: float, step: float = 0.25):
        t = self.a.e.now
        while t < until:
            t += step
            for n in (self.a, self.b):
                self.feed(n, n.e.tick(t))
            self.settle()


@pytest.mark.parametrize("ko, drop_after", [(None, 2.0), (3, 6.0), (0, None)])
def test_a_peer_whose_disk_hangs_is_dropped_after_ko_count_timeouts(ko, drop_after):
    p = Pair(ko)
    p.b.disk_hangs = True
    p.feed(p.a, p.a.e.write("w", 0, b"x" * BLOCK))
    p.settle()
    assert p.b.hung, "beta's disk never saw the write"
    t0 = p.a.e.now
    horizon = 20.0
    # (the pinger checks once a second at most)
    if drop_after is not None:
        p.advance(t0 + drop_after - 0.6)
        assert p.a.e.cstate is ConnState.Connected, "dropped before ko-count x timeout"
        p.advance(t0 + drop_after + 1.5)
        assert p.a.e.cstate is not ConnState.Connected
        text = "\n".join(p.a.logs)
        if ko is None:
            assert "peer did not acknowledge writes in time" in text
        else:
            assert (f"Remote failed to finish a request within {drop_after * 1000:.0f}ms > "
                    f"ko-count ({ko}) * timeout (20 * 0.1s)") in text
    else:
        p.advance(t0 + horizon)
        assert p.a.e.cstate is ConnState.Connected, "ko-count 0 dropped the peer"
