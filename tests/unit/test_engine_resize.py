"""Online grow (replfsadm resize) in the mirror engine, driven by hand: two
engines wired back to back, disks and meta-data as Python objects.

Checked: the size both nodes agree on (the smaller backing disk, --size),
the meta-data move (GrowMeta's layout, bitmap and superblock), the new
area marked and resynced from the right node (or not, --assume-clean),
and the refusals (not Connected, a resync running, shrinking, a disk
that grew too little to move its meta-data)."""
import pytest

from replfs.errors import EXIT_CONFIG, EXIT_NO_UPTODATE, EXIT_STATE, ReplfsError
from replfs.blockrepl.core.bitmap import BLOCK, Bitmap
from replfs.blockrepl.core.states import ConnState, DiskState, Role, StateChangeRefused
from replfs.blockrepl.core.uuids import Uuids
from replfs.blockrepl.engine import actions as A
from replfs.blockrepl.engine.engine import Engine, EngineConfig
from replfs.blockrepl.meta import format as md

MIB = 1024 * 1024


class Node:
    """One engine and what its driver would hold: the data, the on-disk
    superblock and bitmap, the backing disk's size."""

    def __init__(self, name: str, peer: str, disk_size: int):
        cfg = EngineConfig(name="r0", node=name, peer=peer, c_plan_ahead=0)
        self.e = Engine(cfg, new_uuid=iter(range(2 << 20, 3 << 20, 2)).__next__)
        self.disk_size = disk_size
        lay = md.internal_layout(disk_size)
        self.sb = md.Superblock(lay.data_size, Uuids(0x1000, 0, (0, 0)),
                                md.F_CONSISTENT | md.F_WAS_UP_TO_DATE, 0x2, 61, lay)
        self.data = bytearray(lay.data_size)
        self.grows: list[A.GrowMeta] = []
        self.results: dict = {}
        self.session = 0
        self.peer: "Node" | None = None
        self.fail_grow = 0
        self.fill = name[:1].encode()      # what the grown part of its disk holds


class Pair:
    def __init__(self, size_a: int, size_b: int):
        self.a = Node("alpha", "beta", size_a)
        self.b = Node("beta", "alpha", size_b)
        self.a.peer, self.b.peer = self.b, self.a
        self.queue: list = []
        self.link = True
        for n in (self.a, self.b):
            self.feed(n, n.e.attach("attach", n.sb, Bitmap(n.sb.data_size // BLOCK), []))
            self.feed(n, n.e.connect())
        for n in (self.a, self.b):
            n.session, actions = n.e.connected()
            self.feed(n, actions)
        self.settle()
        assert self.a.e.cstate is ConnState.Connected
        assert self.a.e.dstate is DiskState.UpToDate and self.a.e.pdsk is DiskState.UpToDate

    def feed(self, node: Node, actions) -> None:
        self.queue += [(node, a) for a in actions]

    def settle(self) -> None:
        while self.queue:
            node, a = self.queue.pop(0)
            e, t = node.e, type(a)
            if t is A.Send:
                if self.link and a.session == node.session:
                    peer = node.peer
                    self.feed(peer, peer.e.receive(peer.session, a.pkt))
            elif t is A.DiskWrite:
                node.data[a.offset:a.offset + len(a.data)] = a.data
                self.feed(node, e.done(a.token, 0))
            elif t is A.DiskRead:
                self.feed(node, e.done(a.token, bytes(node.data[a.offset:a.offset + a.length])))
            elif t in (A.DiskFlush, A.PersistMeta, A.RunHandler):
                if t is A.PersistMeta and a.superblock is not None:
                    node.sb = a.superblock
                self.feed(node, e.done(a.token, 0))
            elif t is A.ProbeDisk:
                self.feed(node, e.done(a.token, node.disk_size))
            elif t is A.GrowMeta:
                node.grows.append(a)
                if node.fail_grow:
                    self.feed(node, e.done(a.token, node.fail_grow))
                    continue
                node.sb = a.superblock
                node.data.extend(node.fill * (a.superblock.data_size - len(node.data)))
                self.feed(node, e.done(a.token, 0))
            elif t in (A.Complete, A.OpDone):
                node.results[getattr(a, "req", getattr(a, "op", None))] = a
            elif t is A.CloseConnection:
                self.link = False

    def run(self, node: Node, actions) -> None:
        self.feed(node, actions)
        self.settle()
        # let the resync's pacing go on (ticks)
        for _ in range(200):
            if not (self.a.e.cstate.is_syncing or self.b.e.cstate.is_syncing):
                break
            for n in (self.a, self.b):
                self.feed(n, n.e.tick(n.e.now + 0.1))
            self.settle()

    def resize(self, node: Node, **kw):
        self.run(node, node.e.resize("rz", **kw))
        return node.results.pop("rz")


def test_grows_to_the_smaller_disk_and_resyncs_the_new_area_from_the_primary():
    p = Pair(4 * MIB, 4 * MIB)
    old = p.a.e.size
    p.run(p.b, p.b.e.primary("pri"))
    assert p.b.e.role is Role.Primary
    p.b.data[:BLOCK] = b"p" * BLOCK           # (differs, but is not marked)
    p.a.disk_size, p.b.disk_size = 9 * MIB, 8 * MIB
    done = p.resize(p.a)                       # started on the Secondary
    assert done.error is None
    want = md.max_grown_size(md.internal_layout(4 * MIB), 8 * MIB)[0]
    assert want > old
    assert p.a.e.size == p.b.e.size == want
    for n in (p.a, p.b):
        (g,) = n.grows
        assert g.superblock.data_size == want
        assert g.layout.sb_offset == n.disk_size - md.SUPERBLOCK_SIZE
        assert g.layout.bm_offset >= md.internal_layout(4 * MIB).total_size
        bits = Bitmap(want // BLOCK, g.bitmap)
        assert bits.count == (want - old) // BLOCK       # the new area, marked
        assert not any(bits.test(i) for i in range(old // BLOCK))
        assert n.sb.data_size == want
    # The new area came from the Primary (beta) although alpha started it.
    assert p.a.e.cstate is ConnState.Connected and p.a.e.dstate is DiskState.UpToDate
    assert p.b.e.disk.bitmap.count == 0 and p.a.e.disk.bitmap.count == 0
    assert p.a.data[old:want] == p.b.data[old:want] == b"b" * (want - old)
    assert p.a.data[:BLOCK] == bytes(BLOCK)     # (the old area was not resynced)
    assert p.a.sb.has(md.F_CONSISTENT) and p.a.sb.uuids.current == p.b.sb.uuids.current


def test_the_primary_initiator_is_the_sync_source_and_new_writes_reach_the_peer():
    p = Pair(4 * MIB, 4 * MIB)
    old = p.a.e.size
    p.run(p.a, p.a.e.primary("pri"))
    p.a.disk_size = p.b.disk_size = 6 * MIB
    done = p.resize(p.a)
    assert done.error is None
    new = p.a.e.size
    assert new > old and p.b.e.size == new
    assert p.b.data[old:new] == p.a.data[old:new] == b"a" * (new - old)
    # a write into the grown area now works and is mirrored
    p.run(p.a, p.a.e.write("w", new - BLOCK, b"z" * BLOCK))
    assert p.a.results["w"].error == 0
    assert p.b.data[new - BLOCK:new] == b"z" * BLOCK
    assert p.a.e.last_event.startswith("resized from")


def test_assume_clean_marks_nothing_and_resyncs_nothing():
    p = Pair(4 * MIB, 4 * MIB)
    p.a.disk_size = p.b.disk_size = 6 * MIB
    done = p.resize(p.a, assume_clean=True)
    assert done.error is None
    for n in (p.a, p.b):
        (g,) = n.grows
        assert Bitmap(g.superblock.data_size // BLOCK, g.bitmap).count == 0
        assert n.e.disk.bitmap.count == 0
    new = p.a.e.size
    assert p.a.data[-BLOCK:] == b"a" * BLOCK and p.b.data[-BLOCK:] == b"b" * BLOCK
    assert len(p.a.data) == len(p.b.data) == new


def test_size_limits_the_growth_and_a_smaller_size_is_a_refused_shrink():
    p = Pair(4 * MIB, 4 * MIB)
    old = p.a.e.size
    p.a.disk_size = p.b.disk_size = 16 * MIB
    done = p.resize(p.a, limit=old + MIB + 100)
    assert done.error is None
    assert p.a.e.size == p.b.e.size == old + MIB
    # the meta-data still sits at the end of the disk
    assert p.a.sb.layout.sb_offset == 16 * MIB - md.SUPERBLOCK_SIZE
    done = p.resize(p.a, limit=old)
    assert isinstance(done.error, ReplfsError) and done.error.exit_code == EXIT_CONFIG
    assert "shrinking" in str(done.error) and "(170)" in str(done.error)
    assert p.a.e.size == old + MIB


def test_nothing_grew_is_nothing_to_do():
    p = Pair(4 * MIB, 4 * MIB)
    old = p.a.e.size
    p.a.disk_size = 8 * MIB              # the peer's disk did not grow
    done = p.resize(p.a)
    assert done.error is None
    assert p.a.e.size == old and not p.a.grows and not p.b.grows
    assert "nothing to do" in p.a.e.last_event


def test_a_shrunk_backing_disk_is_refused():
    p = Pair(8 * MIB, 8 * MIB)
    old = p.a.e.size
    p.b.disk_size = 6 * MIB
    done = p.resize(p.a)
    assert isinstance(done.error, ReplfsError) and "shrinking" in str(done.error)
    assert p.a.e.size == old and not p.a.grows


def test_a_disk_grown_by_less_than_its_meta_data_is_refused_clearly():
    p = Pair(4 * MIB, 4 * MIB)
    p.a.disk_size = p.b.disk_size = 4 * MIB + 8 * BLOCK
    done = p.resize(p.a)
    assert isinstance(done.error, ReplfsError) and done.error.exit_code == EXIT_CONFIG
    assert "(112)" in str(done.error) and "grow it by at least" in str(done.error)
    assert not p.a.grows and not p.b.grows


def test_refused_without_a_connection():
    p = Pair(4 * MIB, 4 * MIB)
    p.run(p.a, p.a.e.disconnect("dis"))
    p.a.disk_size = 8 * MIB
    done = p.resize(p.a)
    assert isinstance(done.error, StateChangeRefused) and done.error.code == -15
    assert done.error.exit_code == EXIT_STATE
    assert not p.a.grows


def test_refused_while_a_resync_runs_and_on_the_peer_when_it_is_not_uptodate():
    p = Pair(4 * MIB, 4 * MIB)
    p.a.e.cstate = ConnState.SyncSource        # (as if a resync ran)
    done = p.resize(p.a)
    assert isinstance(done.error, ReplfsError) and "(130)" in str(done.error)
    p.a.e.cstate = ConnState.Connected
    p.a.e.pdsk = DiskState.Outdated
    done = p.resize(p.a)
    assert isinstance(done.error, StateChangeRefused) and done.error.code == -2
    assert done.error.exit_code == EXIT_NO_UPTODATE


def test_the_peer_refuses_when_it_is_resizing_itself():
    p = Pair(4 * MIB, 4 * MIB)
    p.a.disk_size = p.b.disk_size = 8 * MIB
    p.b.e._resizing = True                      # its own resize under way
    done = p.resize(p.a)
    assert isinstance(done.error, ReplfsError) and "(-19)" in str(done.error)
    assert not p.a.grows


def test_a_failed_meta_data_move_changes_nothing():
    p = Pair(4 * MIB, 4 * MIB)
    old = p.a.e.size
    p.a.disk_size = p.b.disk_size = 8 * MIB
    p.a.fail_grow = 5
    done = p.resize(p.a)
    assert done.error is not None
    assert p.a.e.size == old and p.b.e.size == old and not p.b.grows
    # (on-io-error detach: the disk whose meta-data write failed is gone)
    assert p.a.e.disk is None and p.a.e.dstate is DiskState.Diskless


def test_meta_format_grown_layout_never_overlaps_the_old_meta_data():
    old = md.internal_layout(4 * MIB)
    for grow in (1, 36, 40, 41, 64, 1000):
        size, why = md.max_grown_size(old, old.total_size + grow * BLOCK)
        if size == old.data_size:
            assert why
            continue
        lay = md.grown_layout(old, old.total_size + grow * BLOCK, size)
        assert lay.bm_offset >= old.total_size and lay.data_size <= lay.bm_offset
        assert lay.sb_offset + md.SUPERBLOCK_SIZE == old.total_size + grow * BLOCK
        sb = md.Superblock(size, Uuids(1, 0, (0, 0)), 0, 2, 61, lay)
        back = md.decode_superblock(md.encode_superblock(sb))
        assert back.layout == lay
    with pytest.raises(md.MetaDataError):
        md.grown_layout(old, old.total_size + BLOCK, old.data_size + BLOCK)


def test_a_grow_interrupted_between_the_nodes_is_finished_at_the_next_handshake():
    """The link goes after the initiator grew, before the peer heard the
    ResizeCommit (as a crash of the peer would): at the next handshake
    the smaller node grows too, both reconnect, and the new area is
    resynced by bitmap."""
    p = Pair(4 * MIB, 4 * MIB)
    old = p.a.e.size
    p.run(p.a, p.a.e.primary("pri"))
    p.a.disk_size = p.b.disk_size = 6 * MIB
    real_feed = p.feed

    def feed(node, actions):       # the link breaks at the ResizeCommit
        for a in actions:
            if type(a) is A.Send and type(a.pkt).__name__ == "ResizeCommit":
                p.link = False
        real_feed(node, actions)
    p.feed = feed
    p.run(p.a, p.a.e.resize("rz"))
    p.feed = real_feed
    assert "rz" not in p.a.results            # waiting for the peer's ResizeDone
    for n in (p.a, p.b):
        p.feed(n, n.e.connection_lost(n.session))
    p.settle()
    done = p.a.results.pop("rz")
    assert done.error is not None and "did not confirm" in str(done.error)
    new = p.a.e.size
    assert new > old and p.b.e.size == old
    for attempt in range(3):
        for n in (p.a, p.b):
            if n.e.live:
                p.feed(n, n.e.connection_lost(n.session))
        p.settle()
        p.link = True
        for n in (p.a, p.b):
            n.session, actions = n.e.connected()
            p.feed(n, actions)
        p.run(p.a, [])
        if p.a.e.cstate is ConnState.Connected and p.b.e.cstate is ConnState.Connected:
            break
    assert attempt == 1                        # one handshake to grow, one to resync
    assert p.b.e.size == new and len(p.b.grows) == 1
    assert p.a.e.dstate is DiskState.UpToDate and p.b.e.dstate is DiskState.UpToDate
    assert p.b.data[old:new] == p.a.data[old:new] == b"a" * (new - old)


def test_a_peer_that_cannot_grow_to_the_other_size_is_refused_for_good():
    p = Pair(4 * MIB, 4 * MIB)
    p.a.disk_size = p.b.disk_size = 6 * MIB
    p.link = True
    # alpha grew alone earlier; beta's disk did not grow after all
    p.b.disk_size = 4 * MIB
    p.run(p.a, p.a.e.disconnect("d"))
    lay = md.grown_layout(p.a.sb.layout, 6 * MIB, 5 * MIB)
    p.a.e.disk.sb = md.Superblock(5 * MIB, p.a.sb.uuids, p.a.sb.flags, 2, 61, lay)
    p.a.e.size = 5 * MIB
    p.a.e.disk.bitmap.grow(5 * MIB // BLOCK, set_new=True)
    p.run(p.a, p.a.e.connect("c"))
    p.link = True
    for n in (p.a, p.b):
        if n.e.live:
            p.feed(n, n.e.connection_lost(n.session))
    p.settle()
    for n in (p.a, p.b):
        n.session, actions = n.e.connected()
        p.feed(n, actions)
    p.settle()
    assert p.b.e.cstate is ConnState.StandAlone and "cannot grow" in p.b.e.last_event
    assert p.a.e.cstate is not ConnState.Connected


def test_a_commit_beyond_what_the_disk_allows_is_answered_with_an_error():
    p = Pair(4 * MIB, 4 * MIB)
    old = p.a.e.size
    p.a.disk_size, p.b.disk_size = 8 * MIB, 6 * MIB
    from replfs.blockrepl.proto import packets as P
    p.run(p.b, p.b.e.receive(p.b.session, P.ResizeCommit(99, 7 * MIB, 0)))
    assert p.b.e.size == old and not p.b.grows
    assert p.b.e.cstate is ConnState.Connected      # (an error answer, not a drop)
