"""The mirror engine driven by hand (no simulator): a Primary whose link
ended in the middle of a handshake -- never Connected, so no fence-peer
ran when the link went, and the peer's Params said it was UpToDate --
must have its peer fenced before it writes what the peer will lack, as DRBD suspends a disconnected Primary whose peer is not
known to be Outdated.  Without it the peer could be promoted later on data
that misses those writes (a split brain)."""
from replfs.blockrepl.core.bitmap import BLOCK, Bitmap
from replfs.blockrepl.core.states import ConnState, DiskState, Role
from replfs.blockrepl.core.uuids import Uuids
from replfs.blockrepl.engine import actions as A
from replfs.blockrepl.engine.engine import Engine, EngineConfig
from replfs.blockrepl.meta import format as md
from replfs.blockrepl.proto import packets as P

NBLOCKS = 16


class Host:
    """Carries out an engine's actions at once; fence-peer answers the
    codes in ``fence``, one per run."""

    def __init__(self, engine: Engine, fence: list[int]):
        self.e, self.fence = engine, list(fence)
        self.log: list = []
        self.results: dict = {}

    def run(self, actions) -> None:
        todo = list(actions)
        while todo:
            a = todo.pop(0)
            self.log.append(a)
            t = type(a)
            if t in (A.DiskWrite, A.DiskFlush, A.PersistMeta):
                todo += self.e.done(a.token, 0)
            elif t is A.DiskRead:
                todo += self.e.done(a.token, bytes(a.length))
            elif t is A.RunHandler:
                todo += self.e.done(a.token, self.fence.pop(0) if a.name == "fence-peer"
                                    else 0)
            elif t in (A.Complete, A.OpDone):
                self.results[getattr(a, "req", getattr(a, "op", None))] = a


def primary_alone(fence: int) -> Host:
    """Primary (its promotion fenced the peer: 7), then a handshake that
    ends before Connected; ``fence`` answers the next fence-peer run."""
    cfg = EngineConfig(name="r0", node="alpha", peer="beta",
                       fencing="resource-and-stonith", handlers=frozenset({"fence-peer"}))
    e = Engine(cfg, new_uuid=iter(range(2 << 20, 3 << 20, 2)).__next__)
    h = Host(e, [7, fence])
    sb = md.Superblock(NBLOCKS * BLOCK, Uuids(0x1000, 0, (0, 0)),
                       md.F_CONSISTENT | md.F_WAS_UP_TO_DATE | md.F_PEER_OUTDATED, 0x2, 61)
    h.run(e.attach("attach", sb, Bitmap(NBLOCKS), []))
    h.run(e.primary("promote"))
    assert e.role is Role.Primary and e.dstate is DiskState.UpToDate
    h.run(e.connect())
    session, actions = e.connected()
    h.run(actions)
    assert e.cstate is ConnState.WFReportParams
    # The peer's Params say it is UpToDate (its fence is a constraint it
    # does not know of) and has moved on: this Primary would have to be
    # its SyncTarget, so the handshake ends (StandAlone) before Connected.
    peer = P.Params(b"C", 0, 0, P.ROLE_CODES.index("Secondary"),
                    P.DISK_CODES.index("UpToDate"), 0, NBLOCKS * BLOCK, 0x2,
                    0x3000, 0x1000, 0, 0, 0)
    h.run(e.receive(session, peer))
    assert e.cstate is ConnState.StandAlone and not e.live
    assert e.pdsk is DiskState.DUnknown
    h.log.clear()
    return h


def first(log, kind):
    return next((i for i, a in enumerate(log) if kind(a)), None)


def test_a_write_without_the_peer_fences_it_first():
    h = primary_alone(fence=7)
    h.run(h.e.write("w", 0, b"x" * BLOCK))
    fence = first(h.log, lambda a: type(a) is A.RunHandler and a.name == "fence-peer")
    new_gen = first(h.log, lambda a: type(a) is A.PersistMeta and a.superblock is not None
                    and a.superblock.uuids.current != 0x1000)
    assert fence is not None and new_gen is not None and fence < new_gen
    assert h.results["w"].error == 0
    assert h.e.pdsk is DiskState.Outdated


def test_the_fence_loser_writes_nothing():
    h = primary_alone(fence=6)
    h.run(h.e.write("w", 0, b"x" * BLOCK))
    assert h.results["w"].error != 0
    assert not any(type(a) is A.DiskWrite for a in h.log)
    assert h.e.fence_lost and h.e.dstate is DiskState.Outdated


def test_primary_force_still_runs_fence_peer_and_says_what_it_risks():
    cfg = EngineConfig(name="r0", node="alpha", peer="beta",
                       fencing="resource-and-stonith", handlers=frozenset({"fence-peer"}))
    e = Engine(cfg, new_uuid=iter(range(2 << 20, 3 << 20, 2)).__next__)
    h = Host(e, [1])
    sb = md.Superblock(NBLOCKS * BLOCK, Uuids(0x1000, 0, (0, 0)),
                       md.F_CONSISTENT | md.F_OUTDATED, 0x2, 61)
    h.run(e.attach("attach", sb, Bitmap(NBLOCKS), []))
    h.run(e.primary("promote", force=True))
    assert h.results["promote"].error is None
    assert any(type(a) is A.RunHandler and a.name == "fence-peer" for a in h.log)
    assert any(type(a) is A.Log and "Forced into split brain situation!" in a.text
               for a in h.log)
    assert e.role is Role.Primary and e.dstate is DiskState.UpToDate
