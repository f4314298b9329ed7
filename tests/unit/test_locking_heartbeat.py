import itertools

import pytest

from replfs.locking.heartbeat.core import (
    SLOT_SIZE, HeartbeatFormatError, HeartbeatMonitor, NetDown, NetUp, NodeDown, NodeUp,
    SlotRecord, quorum_decision,
)


def test_slot_round_trip_and_fixed_size():
    rec = SlotRecord(node=3, generation=0xDEADBEEF, sequence=42, time_ms=1000, dead_ms=60000)
    raw = rec.encode()
    assert len(raw) == SLOT_SIZE
    assert SlotRecord.decode(raw) == rec
    assert SlotRecord.decode(bytes(SLOT_SIZE)) is None


def test_slot_corruption_is_detected_at_every_byte():
    raw = SlotRecord(1, 7, 9).encode()
    for i in range(SLOT_SIZE):
        bad = bytearray(raw)
        bad[i] ^= 0x40
        with pytest.raises(HeartbeatFormatError):
            SlotRecord.decode(bytes(bad))
    with pytest.raises(HeartbeatFormatError):
        SlotRecord.decode(raw[:-1])


def beat(mon, node, gen, seq, now):
    return mon.observe_slot(node, SlotRecord(node, gen, seq), now)


def test_node_up_needs_a_change_and_down_after_threshold():
    mon = HeartbeatMonitor(0, [0, 1], heartbeat_threshold=31)
    assert beat(mon, 1, 5, 100, 0.0) == []            # stale record: not proof of life
    assert beat(mon, 1, 5, 100, 2.0) == []
    assert beat(mon, 1, 5, 101, 4.0) == [NodeUp(1, 5)]
    assert mon.live == {0, 1}
    assert mon.check(4.0 + 59.9) == []
    events = mon.check(4.0 + 60.0)                    # (31 - 1) * 2 = 60 s
    assert [type(e) for e in events] == [NodeDown] and events[0].node == 1
    assert mon.live == {0}
    assert beat(mon, 1, 5, 102, 70.0) == [NodeUp(1, 5)]


def test_generation_change_is_a_restart():
    mon = HeartbeatMonitor(0, [0, 1])
    beat(mon, 1, 5, 1, 0.0)
    beat(mon, 1, 5, 2, 2.0)
    events = beat(mon, 1, 6, 1, 4.0)
    assert [type(e) for e in events] == [NodeDown, NodeUp]
    assert events[1] == NodeUp(1, 6)


def test_wrong_slot_owner_is_ignored():
    mon = HeartbeatMonitor(0, [0, 1])
    mon.observe_slot(1, SlotRecord(2, 1, 1), 0.0)
    assert mon.observe_slot(1, SlotRecord(2, 1, 2), 2.0) == []


def test_network_idle_timeout():
    mon = HeartbeatMonitor(0, [0, 1], idle_timeout_ms=30000)
    assert mon.observe_ping(1, 0.0) == [NetUp(1)]
    assert mon.observe_ping(1, 10.0) == []
    assert mon.check(39.9) == []
    assert mon.check(40.0) == [NetDown(1)]
    assert mon.observe_ping(1, 41.0) == [NetUp(1)]


def test_quorum_two_nodes_lowest_number_survives():
    assert quorum_decision(0, {0}, {0, 1}) == "survive"
    assert quorum_decision(1, {1}, {0, 1}) == "fence"
    assert quorum_decision(1, {0, 1}, {0, 1}) == "survive"
    assert quorum_decision(1, {1}, {1}) == "survive"       # peer is dead on disk too


def test_quorum_majority_rules():
    assert quorum_decision(2, {2, 3}, {1, 2, 3}) == "survive"
    assert quorum_decision(1, {1}, {1, 2, 3}) == "fence"
    assert quorum_decision(3, {3, 4}, {1, 2, 3, 4}) == "fence"
    assert quorum_decision(1, {1, 2}, {1, 2, 3, 4}) == "survive"


def test_quorum_split_never_leaves_two_survivors_or_none():
    nodes = [0, 1, 2, 3]
    for r in range(1, len(nodes)):
        for side in itertools.combinations(nodes, r):
            a, b = set(side), set(nodes) - set(side)
            verdict_a = {quorum_decision(n, a, nodes) for n in a}
            verdict_b = {quorum_decision(n, b, nodes) for n in b}
            assert len(verdict_a) == 1 and len(verdict_b) == 1
            assert sorted(verdict_a | verdict_b) == ["fence", "survive"]


def test_monitor_decides_with_o2quo():
    mon = HeartbeatMonitor(1, [0, 1])
    beat(mon, 0, 1, 1, 0.0)
    beat(mon, 0, 1, 2, 2.0)
    mon.observe_ping(0, 2.0)
    assert mon.decide() == "survive"
    beat(mon, 0, 1, 3, 33.0)
    mon.check(33.0)                   # network silent 31 s, disk still beating
    assert 0 not in mon.connected
    assert mon.decide() == "fence"


def test_monitor_from_o2cb_timeouts():
    from replfs.locking.cluster_conf import Timeouts
    mon = HeartbeatMonitor.from_timeouts(0, [0, 1], Timeouts(heartbeat_threshold=11,
                                                             idle_timeout_ms=5000))
    assert mon.dead_after == 20.0 and mon.idle_timeout == 5.0
