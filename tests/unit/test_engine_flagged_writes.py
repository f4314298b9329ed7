"""PREFLUSH/FUA writes in the mirror engine, driven by hand: a journal
commit is one request, and its three parts go to the peer back to back --
Flush, Data, Flush -- without waiting for an answer in between (one
network round trip, where flush, write, flush took three).  The peer
handles them in order: its disk is flushed before the write lands and
again after it, and the write completes only once both disks have it
durably."""
import pytest

from replfs.blockrepl.core.bitmap import BLOCK
from replfs.blockrepl.core.uuids import Uuids
from replfs.blockrepl.engine import actions as A
from replfs.blockrepl.engine.engine import WRITE_FUA, WRITE_PREFLUSH, Engine, EngineConfig
from replfs.blockrepl.meta import format as md

from engine_pair import bring_up  # (tests/unit is on sys.path)
from replfs.blockrepl.proto import packets as P

NBLOCKS = 64


class Node:
    def __init__(self, name, peer, protocol):
        cfg = EngineConfig(name="r0", node=name, peer=peer, c_plan_ahead=0,
                           protocol=protocol)
        self.e = Engine(cfg, now=0.0, new_uuid=iter(range(2 << 20, 3 << 20, 2)).__next__)
        self.sb = md.Superblock(NBLOCKS * BLOCK, Uuids(0x1000, 0, (0, 0)),
                                md.F_CONSISTENT | md.F_WAS_UP_TO_DATE, 0x2, 61)
        self.session = 0
        self.disk_log: list[str] = []     # the disk requests, in issue order
        self.done: dict = {}              # req -> Complete


class Pair:
    """Two engines; ``hold`` keeps alpha's packets from beta (the link's
    latency, as long as the test likes)."""

    def __init__(self, protocol="C"):
        self.a, self.b = Node("alpha", "beta", protocol), Node("beta", "alpha", protocol)
        self.a.peer, self.b.peer = self.b, self.a
        self.queue = []
        self.hold = False
        self.held: list = []
        bring_up(self, NBLOCKS)
        for n in (self.a, self.b):
            n.disk_log.clear()

    def feed(self, node, actions):
        self.queue += [(node, a) for a in actions]

    def deliver(self, node, pkt):
        peer = node.peer
        if peer.e.live:
            self.feed(peer, peer.e.receive(peer.session, pkt))

    def settle(self):
        while self.queue:
            node, a = self.queue.pop(0)
            t = type(a)
            if t is A.Send:
                if a.session == node.session and node.e.live:
                    if self.hold and node is self.a:
                        self.held.append(a.pkt)
                    else:
                        self.deliver(node, a.pkt)
            elif t is A.DiskRead:
                self.feed(node, node.e.done(a.token, bytes(a.length)))
            elif t in (A.DiskWrite, A.DiskFlush, A.PersistMeta, A.RunHandler):
                if t is A.DiskWrite:
                    node.disk_log.append(f"write {a.offset}")
                elif t is A.DiskFlush:
                    node.disk_log.append("flush")
                self.feed(node, node.e.done(a.token, 0))
            elif t is A.Complete:
                node.done[a.req] = a

    def release(self):
        self.hold = False
        held, self.held = self.held, []
        for pkt in held:
            self.deliver(self.a, pkt)
        self.settle()


def app_packets(pkts):
    return [type(p).__name__ for p in pkts if isinstance(p, (P.Flush, P.Data))]


def test_a_commit_write_sends_flush_data_flush_without_waiting():
    p = Pair()
    p.hold = True
    p.feed(p.a, p.a.e.write("w", 4 * BLOCK, b"c" * BLOCK, WRITE_PREFLUSH | WRITE_FUA))
    p.settle()
    # all three went out with no answer from beta, and the write waits
    assert app_packets(p.held) == ["Flush", "Data", "Flush"]
    assert "w" not in p.a.done
    # alpha: flushed before the write was issued, and again after it
    assert p.a.disk_log == ["flush", f"write {4 * BLOCK}", "flush"]
    p.release()
    assert p.a.done["w"].error == 0
    # beta: the same order (earlier writes durable before this one lands;
    # this one durable before its Flush is answered)
    assert p.b.disk_log == ["flush", f"write {4 * BLOCK}", "flush"]


@pytest.mark.parametrize("flags, want", [
    (WRITE_PREFLUSH, ["Flush", "Data"]),
    (WRITE_FUA, ["Data", "Flush"]),
    (0, ["Data"]),
])
def test_each_flag_alone(flags, want):
    p = Pair()
    p.hold = True
    p.feed(p.a, p.a.e.write("w", 0, b"d" * BLOCK, flags))
    p.settle()
    assert app_packets(p.held) == want
    p.release()
    assert p.a.done["w"].error == 0


def test_the_fua_write_waits_for_the_peers_flush():
    """Data acknowledged, its Flush not yet answered: not complete."""
    p = Pair()
    p.hold = True
    p.feed(p.a, p.a.e.write("w", 0, b"f" * BLOCK, WRITE_FUA))
    p.settle()
    data, flush = p.held
    p.held = []
    p.hold = False
    p.deliver(p.a, data)          # beta writes and acks; its WriteAck comes back
    p.settle()
    assert "w" not in p.a.done, "completed before the peer made it durable"
    p.deliver(p.a, flush)
    p.settle()
    assert p.a.done["w"].error == 0


def test_protocol_a_flushes_only_the_local_disk():
    p = Pair("A")
    p.hold = True
    p.feed(p.a, p.a.e.write("w", 0, b"a" * BLOCK, WRITE_PREFLUSH | WRITE_FUA))
    p.settle()
    assert app_packets(p.held) == ["Data"]
    assert p.a.done["w"].error == 0
    assert p.a.disk_log == ["flush", "write 0", "flush"]


def test_unknown_flags_are_refused():
    p = Pair()
    with pytest.raises(ValueError):
        p.a.e.write("w", 0, b"x" * BLOCK, 4)
