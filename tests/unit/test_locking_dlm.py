"""Unit tests of the dlm-lite core: matrix, queues, conversions, callbacks,
NOQUEUE, cancel, timeouts, LVB and recovery, on tiny scripted clusters."""
from collections import deque

import pytest

from replfs.locking.dlm.core import Bast, DlmNode, Grant, Refuse, SendMessage, master_of
from replfs.locking.dlm.messages import LVB_LEN, LocalProtocolError, decode, encode
from replfs.locking.dlm.modes import CR, CW, EX, NL, PR, PW, Mode, compatible, covers


class Net:
    """Nodes joined by one global FIFO (which is FIFO per pair too)."""

    def __init__(self, ids):
        self.nodes = {i: DlmNode(i, ids) for i in ids}
        self.queue = deque()
        self.events = {i: [] for i in ids}

    def run(self, node, actions):
        for a in actions:
            if isinstance(a, SendMessage):
                self.queue.append((node, a.to, a.msg))
            else:
                self.events[node].append(a)

    def __call__(self, node, method, *args, **kw):
        self.run(node, getattr(self.nodes[node], method)(*args, **kw))
        return self

    def settle(self, limit=10_000):
        while self.queue and limit:
            limit -= 1
            src, dst, msg = self.queue.popleft()
            if dst in self.nodes:
                self.run(dst, self.nodes[dst].receive(src, decode(encode(msg))))
        return self

    def take(self, node):
        out, self.events[node] = self.events[node], []
        return out

    def kill(self, victim):
        del self.nodes[victim]
        self.queue = deque(m for m in self.queue if victim not in m[:2])
        for n in sorted(self.nodes):
            self(n, "node_down", victim)
        return self


def named(master, members, prefix="r"):
    for i in range(1000):
        if master_of(f"{prefix}{i}", members) == master:
            return f"{prefix}{i}"
    raise AssertionError


def lvb(n):
    return n.to_bytes(8, "big") + bytes(LVB_LEN - 8)


# ---------------------------------------------------------------- modes

EXPECTED = """
   NL CR CW PR PW EX
NL  1  1  1  1  1  1
CR  1  1  1  1  1  0
CW  1  1  1  0  0  0
PR  1  1  0  1  0  0
PW  1  1  0  0  0  0
EX  1  0  0  0  0  0
"""


def test_compatibility_matrix_matches_the_vms_table():
    rows = [line.split() for line in EXPECTED.strip().splitlines()]
    cols = [Mode[c] for c in rows[0]]
    for row in rows[1:]:
        held = Mode[row[0]]
        for wanted, bit in zip(cols, row[1:]):
            assert compatible(held, wanted) == (bit == "1"), (held, wanted)
            assert compatible(held, wanted) == compatible(wanted, held)


def test_covers_is_the_downconversion_order():
    assert all(covers(EX, m) for m in Mode)
    assert all(covers(m, NL) for m in Mode)
    assert not covers(PR, CW) and not covers(CW, PR)
    assert covers(PW, PR) and covers(PW, CW) and not covers(CR, PR)


# ---------------------------------------------------------------- one node

def test_single_node_grant_bast_and_release():
    n = DlmNode(1, [1])
    assert n.lock(1, "a", EX) == [Grant(1, EX, bytes(LVB_LEN), False)]
    acts = n.lock(2, "a", PR)
    assert acts == [Bast(1, PR)]
    assert n.lock(3, "a", CR) == [Bast(1, CR)]   # one BAST per blocked mode
    assert n.lock(4, "a", PR) == []              # PR was already reported
    acts = n.unlock(1)
    assert [type(a) for a in acts] == [Grant, Grant, Grant]
    assert [(a.lockid, a.mode) for a in acts] == [(2, PR), (3, CR), (4, PR)]


def test_fifo_newcomer_waits_behind_a_blocked_request():
    n = DlmNode(1, [1])
    n.lock(1, "a", EX)
    n.lock(2, "a", PR)
    n.lock(3, "a", EX)
    n.lock(4, "a", PR)    # compatible with 2 but queued behind 3
    acts = n.unlock(1)
    granted = [a.lockid for a in acts if isinstance(a, Grant)]
    assert granted == [2]
    assert Bast(2, EX) in acts
    acts = n.unlock(2)
    assert [a.lockid for a in acts if isinstance(a, Grant)] == [3]
    acts = n.unlock(3)
    assert [a.lockid for a in acts if isinstance(a, Grant)] == [4]


def test_conversion_goes_ahead_of_waiting_requests():
    n = DlmNode(1, [1])
    n.lock(1, "a", PR)
    n.lock(2, "a", PR)
    n.lock(3, "a", EX)                 # waits for both readers
    assert n.convert(1, EX) == []     # both readers were already asked to give way to EX
    acts = n.unlock(2)
    assert [(a.lockid, a.mode) for a in acts if isinstance(a, Grant)] == [(1, EX)]
    assert n.held_mode(3) is None
    acts = n.unlock(1)
    assert [(a.lockid, a.mode) for a in acts if isinstance(a, Grant)] == [(3, EX)]


def test_downconversion_is_immediate_and_lets_others_in():
    n = DlmNode(1, [1])
    n.lock(1, "a", EX)
    n.lock(2, "a", PR)
    acts = n.convert(1, PR)
    assert acts[0] == Grant(1, PR, bytes(LVB_LEN), False)
    assert Grant(2, PR, bytes(LVB_LEN), False) in acts


def test_noqueue_refuses_at_once_without_bast():
    n = DlmNode(1, [1])
    n.lock(1, "a", PR)
    assert n.lock(2, "a", EX, noqueue=True) == [Refuse(2, "EAGAIN")]
    assert 2 not in n.locks
    assert n.lock(3, "a", CR, noqueue=True)[0].mode == CR
    n.lock(4, "a", NL)
    assert n.convert(4, EX, noqueue=True) == [Refuse(4, "EAGAIN")]
    assert n.held_mode(4) == NL
    assert n.locks[4].requested is None


def test_cancel_waiting_and_converting():
    n = DlmNode(1, [1])
    n.lock(1, "a", EX)
    n.lock(2, "a", PR)
    assert n.cancel(2) == [Refuse(2, "CANCELLED")]
    assert 2 not in n.locks
    n.lock(3, "a", NL)
    n.convert(3, PR)
    assert n.cancel(3) == [Refuse(3, "CANCELLED")]
    assert n.held_mode(3) == NL
    with pytest.raises(LocalProtocolError):
        n.cancel(3)


def test_cancel_loses_the_race_against_an_inflight_grant():
    net = Net([1, 2])
    res = named(2, [1, 2])
    net(2, "lock", 10, res, EX).settle()
    net(1, "lock", 1, res, EX).settle()
    net(2, "unlock", 10)          # the grant to node 1 is now on its way
    net(1, "cancel", 1).settle()
    evs = net.take(1)
    assert [type(e) for e in evs] == [Grant]
    assert net.nodes[1].held_mode(1) == EX


def test_timeout_cancels_a_pending_request():
    n = DlmNode(1, [1])
    n.tick(100.0)
    n.lock(1, "a", EX)
    n.lock(2, "a", EX, timeout=5.0)
    assert n.tick(104.0) == []
    assert n.tick(105.0) == [Refuse(2, "ETIMEDOUT")]


def test_local_misuse_is_a_local_protocol_error():
    n = DlmNode(1, [1])
    n.lock(1, "a", EX)
    n.lock(2, "a", EX)
    with pytest.raises(LocalProtocolError):
        n.lock(1, "b", NL)
    with pytest.raises(LocalProtocolError):
        n.unlock(2)               # still waiting
    with pytest.raises(LocalProtocolError):
        n.convert(99, NL)
    with pytest.raises(LocalProtocolError):
        n.unlock(1, lvb=b"short")


# ---------------------------------------------------------------- LVB

def test_lvb_written_by_ex_read_on_grant():
    n = DlmNode(1, [1])
    first = n.lock(1, "a", EX)[0]
    assert first.lvb_valid is False          # never written yet
    n.lock(2, "a", PR)
    acts = n.unlock(1, lvb=lvb(7))
    assert acts == [Grant(2, PR, lvb(7), True)]
    with pytest.raises(LocalProtocolError):
        n.unlock(2, lvb=lvb(8))              # a reader may not write


def test_lvb_written_on_downconversion_from_pw():
    n = DlmNode(1, [1])
    n.lock(1, "a", PW)
    assert n.convert(1, CR, lvb=lvb(3)) == [Grant(1, CR, lvb(3), True)]
    n.lock(2, "a", EX)
    n.unlock(1)
    assert n.locks[2].lvb == lvb(3) and n.locks[2].lvb_valid


def test_lvb_travels_between_nodes():
    net = Net([1, 2])
    res = named(1, [1, 2])
    net(2, "lock", 1, res, EX).settle()
    net(2, "unlock", 1, lvb=lvb(41)).settle()
    net(1, "lock", 5, res, PR).settle()
    assert net.take(1) == [Grant(5, PR, lvb(41), True)]


# ---------------------------------------------------------------- two+ nodes

def test_remote_master_grant_and_bast():
    net = Net([1, 2])
    res = named(2, [1, 2])
    net(1, "lock", 1, res, EX).settle()
    assert [type(e) for e in net.take(1)] == [Grant]
    net(2, "lock", 2, res, PR).settle()
    assert net.take(1) == [Bast(1, PR)]
    assert net.take(2) == []
    net(1, "convert", 1, NL).settle()
    assert [(e.lockid, e.mode) for e in net.take(2)] == [(2, PR)]


def test_rendezvous_mastery_only_moves_the_dead_nodes_resources():
    names = [f"res{i}" for i in range(300)]
    before = {r: master_of(r, [1, 2, 3]) for r in names}
    after = {r: master_of(r, [1, 3]) for r in names}
    for r in names:
        if before[r] != 2:
            assert after[r] == before[r]
    assert {before[r] for r in names} == {1, 2, 3}


def test_master_death_regrants_from_survivor_reports():
    net = Net([1, 2, 3])
    res = named(3, [1, 2, 3])
    net(1, "lock", 1, res, PR).settle()
    net(2, "lock", 2, res, EX).settle()       # waits for node 1
    net.take(1), net.take(2)
    net.kill(3).settle()
    assert net.nodes[1].held_mode(1) == PR
    net(1, "unlock", 1).settle()
    assert [(e.lockid, e.mode) for e in net.take(2)] == [(2, EX)]
    new_master = master_of(res, [1, 2])
    assert not net.nodes[new_master].recovering


def test_dead_ex_holder_invalidates_lvb_and_frees_the_lock():
    net = Net([1, 2, 3])
    res = named(1, [1, 2, 3])
    net(2, "lock", 1, res, EX).settle()
    net(2, "unlock", 1, lvb=lvb(5)).settle()
    net(3, "lock", 2, res, EX).settle()
    net(1, "lock", 3, res, PR).settle()       # blocked by node 3's EX
    assert [type(e) for e in net.take(1)] == []
    net.kill(3).settle()
    evs = net.take(1)
    assert len(evs) == 1 and evs[0].mode == PR and evs[0].lvb_valid is False


def test_dead_reader_keeps_lvb_valid():
    net = Net([1, 2, 3])
    res = named(1, [1, 2, 3])
    net(2, "lock", 1, res, EX).settle()
    net(2, "unlock", 1, lvb=lvb(5)).settle()
    net(3, "lock", 2, res, PR).settle()
    net.kill(3).settle()
    net(2, "lock", 3, res, EX).settle()
    assert net.take(2)[-1] == Grant(3, EX, lvb(5), True)


def test_lost_master_without_proof_marks_lvb_invalid():
    net = Net([1, 2])
    res = named(2, [1, 2])
    net(1, "lock", 1, res, EX).settle()
    net(1, "unlock", 1, lvb=lvb(9)).settle()
    net(2, "lock", 2, res, EX).settle()
    net(2, "unlock", 2, lvb=lvb(10)).settle()   # newest value lives only on node 2
    net.kill(2).settle()
    net(1, "lock", 3, res, EX).settle()
    g = net.take(1)[-1]
    assert g.lockid == 3 and g.lvb_valid is False


def test_stale_epoch_messages_are_dropped_and_future_ones_kept():
    net = Net([1, 2, 3])
    res = named(2, [1, 2, 3])
    net(1, "lock", 1, res, EX)
    stale = net.queue.popleft()
    net(1, "node_down", 3)
    before = net.nodes[2].dropped_stale
    # node 2 has not seen the change yet: node 1's new-epoch traffic waits
    net.settle()
    assert net.nodes[2].epoch == 0 and net.nodes[2]._future
    net(2, "node_down", 3).settle()
    net.run(2, net.nodes[2].receive(*stale[:1], stale[2]))
    assert net.nodes[2].dropped_stale == before + 1
    net.settle()
    assert [type(e) for e in net.take(1)] == [Grant]     # from the report, not the stale request


def test_rejoined_node_takes_part_in_recovery():
    net = Net([1, 2])
    res = named(1, [1, 2])
    net(1, "lock", 1, res, EX).settle()
    net.take(1)
    net.nodes[3] = DlmNode(3, [1, 2, 3], epoch=1)
    net.events[3] = []
    net(1, "node_up", 3)(2, "node_up", 3)(3, "join").settle()
    assert all(not n.recovering for n in net.nodes.values())
    res3 = named(3, [1, 2, 3])
    net(3, "lock", 7, res3, EX).settle()
    assert [e.lockid for e in net.take(3)] == [7]
    net(2, "lock", 8, res, PR).settle()
    assert net.take(1) == [Bast(1, PR)]


def test_conversion_deadlock_refuses_the_later_converter():
    n = DlmNode(1, [1])
    n.lock(1, "a", PR)
    n.lock(2, "a", PR)
    assert n.convert(1, EX) == [Bast(2, EX)]
    acts = n.convert(2, EX)          # would wait behind 1 while 1 waits for it
    assert Refuse(2, "EDEADLK") in acts
    assert n.held_mode(2) == PR and n.locks[2].requested is None
    acts = n.unlock(2)               # the owner gives way, as the BAST asked
    assert Grant(1, EX, bytes(LVB_LEN), False) in acts


def test_no_deadlock_refusal_while_a_plain_holder_blocks():
    n = DlmNode(1, [1])
    n.lock(1, "a", PR)
    n.lock(2, "a", PR)
    n.lock(3, "a", CR)
    n.convert(1, EX)                 # blocked by 2 (PR) and 3 (CR)
    n.convert(3, PR)                 # queued behind 1; 2 may still let go
    assert n.locks[1].requested == EX and n.locks[3].requested == PR
    acts = n.unlock(2)               # now only the converter 3 blocks 1
    assert Refuse(3, "EDEADLK") in acts
    assert n.held_mode(3) == CR and n.locks[1].requested == EX


def test_meet_of_modes():
    from replfs.locking.dlm.modes import meet
    assert meet(CW, PR) == CR and meet(PR, CW) == CR
    assert meet(EX, PR) == PR and meet(NL, EX) == NL and meet(PW, CW) == CW


def test_sideways_conversion_steps_down_to_cr_first():
    net = Net([1, 2])
    res = named(2, [1, 2])
    net(1, "lock", 1, res, CW).settle()
    net.take(1)
    net(1, "convert", 1, PR)
    assert net.nodes[1].held_mode(1) == CR      # CW protection is gone at once
    # node 2 masters res: its PR request is served before node 1's convert
    # arrives, so it waits for the CW the master still sees, then both get PR.
    net(2, "lock", 2, res, PR).settle()
    assert [(e.lockid, e.mode) for e in net.take(2)] == [(2, PR)]
    evs = net.take(1)
    assert evs[0] == Bast(1, PR)
    assert [(type(e), e.lockid, e.mode) for e in evs[1:]] == [(Grant, 1, PR)]
