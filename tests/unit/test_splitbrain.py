"""After-split-brain policies (core/splitbrain.py, pure): DRBD 8.4's rules,
and the property both nodes rely on -- they reach mirror-image outcomes."""
from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings, strategies as st

from replfs.blockrepl.conf import options as opts
from replfs.blockrepl.core import splitbrain as SB
from replfs.blockrepl.core.splitbrain import (AUTO_LINE, MANUAL_LINE, SOURCE, TARGET,
                                              UNRESOLVED, UNRESOLVED_LINE, Policies, resolve)
from replfs.blockrepl.core.uuids import PRIMARY_BIT, Side, Uuids, compare, Decision
from tests import soak


def quick_and_soak(quick: int, full: int, *strategies):
    """The property as two tests: ``quick`` examples in every run, and a
    soak twin (name ending in _soak) with ``full`` examples under make
    soak, a handful under its smoke run."""
    def wrap(fn):
        fast = settings(max_examples=quick)(given(*strategies)(fn))
        slow = settings(max_examples=soak.size(full, 20))(given(*strategies)(fn))
        slow.__name__ = fn.__name__ + "_soak"
        globals()[slow.__name__] = pytest.mark.soak(slow)
        return fast
    return wrap

COMMON = 0x5000            # the generation both had when the link broke
A_NOW, B_NOW = 0x7000, 0x9000


def node(name, *, primary=False, was_primary=False, changes=1, cur=None):
    """A node in a split brain: moved on from COMMON with ``changes``
    out-of-sync blocks; ``was_primary``: it was Primary at the split."""
    bitmap = COMMON | (PRIMARY_BIT if was_primary else 0)
    return Side(Uuids(cur or (A_NOW if name == "alpha" else B_NOW), bitmap, (0, 0)),
                primary=primary, oos_blocks=changes, name=name)


def pol(p0="disconnect", p1="disconnect", p2="disconnect"):
    return Policies(p0, p1, p2)


# --- the inputs really are a split brain ------------------------------

def test_the_fixture_is_a_split_brain_whatever_the_flags():
    for wa, wb in itertools.product((False, True), repeat=2):
        a, b = node("alpha", was_primary=wa), node("beta", was_primary=wb)
        assert compare(a, b) is Decision.SPLIT_BRAIN


def test_policy_names_are_the_ones_the_config_accepts():
    assert SB.POLICIES_0PRI == opts.AFTER_SB["after-sb-0pri"]
    assert SB.POLICIES_1PRI == opts.AFTER_SB["after-sb-1pri"]
    assert SB.POLICIES_2PRI == opts.AFTER_SB["after-sb-2pri"]


# --- properties over every input ----------------------------------------

names = st.sampled_from(["alpha", "beta", "gamma", "a", "z"])


@st.composite
def pairs(draw):
    n1 = draw(names)
    n2 = draw(names.filter(lambda n: n != n1))

    def one(name, cur):
        bitmap = COMMON | (PRIMARY_BIT if draw(st.booleans()) else 0)
        return Side(Uuids(cur, bitmap, (0, 0)), primary=draw(st.booleans()),
                    oos_blocks=draw(st.sampled_from([0, 0, 1, 2, 7, 1 << 20])), name=name)
    return one(n1, A_NOW), one(n2, B_NOW)


zero_pri = st.sampled_from(SB.POLICIES_0PRI + ("discard-node-alpha", "discard-node-beta",
                                                "discard-node-nobody"))
policies = st.builds(Policies, zero_pri, st.sampled_from(SB.POLICIES_1PRI),
                     st.sampled_from(SB.POLICIES_2PRI))

OTHER = {"this": "peer", "peer": "this"}


def mirrored_line(line: str) -> str:
    for word, other in OTHER.items():
        if line.endswith(f"Sync from {word} node"):
            return line[: -len(f"{word} node")] + f"{other} node"
    return line


@quick_and_soak(600, 30000, pairs(), policies, st.booleans(), st.booleans())
def test_both_nodes_reach_mirror_image_outcomes(pair, p, dm_a, dm_b):
    a, b = pair
    ra = resolve(a, b, p, discard_mine=dm_a, discard_peer=dm_b)
    rb = resolve(b, a, p.mirrored(), discard_mine=dm_b, discard_peer=dm_a)
    assert ra.decision in (SOURCE, TARGET, UNRESOLVED)
    assert rb.decision is ra.decision.mirrored()
    assert ra.primaries == rb.primaries == a.primary + b.primary
    assert ra.manual == rb.manual
    assert rb.line == mirrored_line(ra.line)
    assert not (ra.pri_lost and rb.pri_lost)
    # the Primary that must give up its role is the one that loses
    for r, me in ((ra, a), (rb, b)):
        if r.pri_lost:
            assert me.primary and r.decision is TARGET


@quick_and_soak(400, 15000, pairs(), policies, st.booleans(), st.booleans())
def test_disconnect_never_resolves_by_policy(pair, p, dm_a, dm_b):
    a, b = pair
    applicable = (p.after_sb_0pri, p.after_sb_1pri, p.after_sb_2pri)[a.primary + b.primary]
    r = resolve(a, b, p, discard_mine=dm_a, discard_peer=dm_b)
    if applicable == "disconnect":
        assert not r.resolved or r.manual
        assert r.resolved == (dm_a != dm_b)
        assert not r.pri_lost


@quick_and_soak(400, 15000, pairs(), policies)
def test_a_primarys_data_is_discarded_only_where_the_policy_says_it_may(pair, p):
    a, b = pair
    r = resolve(a, b, p)
    if r.decision is TARGET and a.primary:
        applicable = p.after_sb_1pri if not b.primary else p.after_sb_2pri
        assert applicable in ("violently-as0p", "call-pri-lost-after-sb")
        assert r.pri_lost == (applicable == "call-pri-lost-after-sb")
    if r.pri_lost:
        assert a.primary and r.decision is TARGET
        assert (p.after_sb_1pri if not b.primary else p.after_sb_2pri) == \
            "call-pri-lost-after-sb"


@given(pairs(), policies)
def test_discard_my_data_decides_only_what_the_policy_leaves_open(pair, p):
    a, b = pair
    auto = resolve(a, b, p)
    manual = resolve(a, b, p, discard_mine=True)
    if auto.resolved:
        assert manual == auto
    else:
        assert manual.decision is TARGET and manual.manual
        assert manual.line == "Split-Brain detected, manually solved. Sync from peer node"
    both = resolve(a, b, p, discard_mine=True, discard_peer=True)
    assert both.resolved == auto.resolved


# --- after-sb-0pri, case by case -----------------------------------------

def outcome(me, peer, p0, p1="disconnect", p2="disconnect"):
    return resolve(me, peer, pol(p0, p1, p2)).decision


def test_0pri_disconnect():
    assert outcome(node("alpha", changes=0), node("beta"), "disconnect") is UNRESOLVED
    r = resolve(node("alpha"), node("beta"), pol())
    assert r.line == "Split-Brain detected but unresolved, dropping connection!"
    assert r.line == UNRESOLVED_LINE and not r.resolved and r.primaries == 0


def test_0pri_discard_younger_primary_keeps_the_node_that_was_primary_at_the_split():
    older = node("beta", was_primary=True, changes=100)
    younger = node("alpha", was_primary=False, changes=1)
    assert outcome(younger, older, "discard-younger-primary") is TARGET
    assert outcome(older, younger, "discard-younger-primary") is SOURCE
    r = resolve(older, younger, pol("discard-younger-primary"))
    assert r.line == "Split-Brain detected, 0 primaries, automatically solved. Sync from this node"
    assert r.notes == ()


def test_0pri_discard_older_primary_keeps_the_node_promoted_during_the_split():
    older = node("beta", was_primary=True, changes=1)
    younger = node("alpha", was_primary=False, changes=100)
    assert outcome(younger, older, "discard-older-primary") is SOURCE
    assert outcome(older, younger, "discard-older-primary") is TARGET


@pytest.mark.parametrize("policy", ["discard-younger-primary", "discard-older-primary"])
@pytest.mark.parametrize("flags", [(False, False), (True, True)])
def test_0pri_younger_older_undecided_falls_back_to_least_changes(policy, flags):
    a = node("alpha", was_primary=flags[0], changes=5)
    b = node("beta", was_primary=flags[1], changes=3)
    r = resolve(a, b, pol(policy))
    assert r.decision is SOURCE and SB.FALLBACK_NOTE in r.notes
    assert outcome(b, a, policy) is TARGET
    # equal changes: the tie-break (the name that sorts first keeps its data)
    a, b = node("alpha", changes=4), node("beta", changes=4)
    assert outcome(a, b, policy) is SOURCE and outcome(b, a, policy) is TARGET


def test_0pri_discard_zero_changes():
    idle, busy = node("alpha", changes=0), node("beta", changes=9)
    assert outcome(idle, busy, "discard-zero-changes") is TARGET
    assert outcome(busy, idle, "discard-zero-changes") is SOURCE
    # both changed something: no decision, whoever changed less
    assert outcome(node("alpha", changes=1), node("beta", changes=9),
                   "discard-zero-changes") is UNRESOLVED
    # neither changed anything: a resync of nothing, by the tie-break
    assert outcome(node("alpha", changes=0), node("beta", changes=0),
                   "discard-zero-changes") is SOURCE
    assert outcome(node("beta", changes=0), node("alpha", changes=0),
                   "discard-zero-changes") is TARGET


def test_0pri_discard_least_changes():
    few, many = node("beta", changes=2), node("alpha", changes=3)
    assert outcome(few, many, "discard-least-changes") is TARGET
    assert outcome(many, few, "discard-least-changes") is SOURCE
    assert outcome(node("alpha", changes=3), node("beta", changes=3),
                   "discard-least-changes") is SOURCE


def test_0pri_discard_local_and_remote_whatever_the_changes():
    a, b = node("alpha", changes=0), node("beta", changes=100)
    assert outcome(a, b, "discard-local") is TARGET
    assert outcome(b, a, "discard-local") is TARGET    # (so the peer must say discard-remote)
    assert outcome(a, b, "discard-remote") is SOURCE
    assert pol("discard-local").mirrored() == pol("discard-remote")
    assert pol("discard-remote").mirrored() == pol("discard-local")
    assert pol("discard-zero-changes", "consensus").mirrored() == \
        pol("discard-zero-changes", "consensus")


def test_0pri_discard_node_name():
    a, b = node("alpha"), node("beta")
    assert outcome(a, b, "discard-node-alpha") is TARGET
    assert outcome(b, a, "discard-node-alpha") is SOURCE
    assert outcome(a, b, "discard-node-gamma") is UNRESOLVED


# --- after-sb-1pri ---------------------------------------------------------

PRI_LOSES = dict(p0="discard-least-changes")   # with the changes below


def one_primary(primary_changes, secondary_changes):
    return (node("alpha", primary=True, changes=primary_changes),
            node("beta", changes=secondary_changes))


def test_1pri_disconnect():
    p, s = one_primary(1, 9)
    assert outcome(p, s, "discard-least-changes", "disconnect") is UNRESOLVED


def test_1pri_consensus_only_when_the_secondary_loses():
    p, s = one_primary(9, 1)     # the secondary has fewer changes: it loses
    assert outcome(p, s, "discard-least-changes", "consensus") is SOURCE
    assert outcome(s, p, "discard-least-changes", "consensus") is TARGET
    r = resolve(p, s, pol("discard-least-changes", "consensus"))
    assert r.line == "Split-Brain detected, 1 primaries, automatically solved. Sync from this node"
    p, s = one_primary(1, 9)     # the 0pri rule would discard the Primary: no
    assert outcome(p, s, "discard-least-changes", "consensus") is UNRESOLVED
    assert outcome(s, p, "discard-least-changes", "consensus") is UNRESOLVED
    assert outcome(p, s, "disconnect", "consensus") is UNRESOLVED


def test_1pri_violently_takes_the_0pri_decision_even_against_the_primary():
    p, s = one_primary(1, 9)
    r = resolve(p, s, pol("discard-least-changes", "violently-as0p"))
    assert r.decision is TARGET and not r.pri_lost
    assert outcome(s, p, "discard-least-changes", "violently-as0p") is SOURCE
    assert outcome(p, s, "disconnect", "violently-as0p") is UNRESOLVED


def test_1pri_discard_secondary_always_keeps_the_primary():
    for pc, sc in ((1, 9), (9, 1), (0, 0)):
        p, s = one_primary(pc, sc)
        for p0 in SB.POLICIES_0PRI:
            if p0 in ("discard-local", "discard-remote"):
                continue
            assert outcome(p, s, p0, "discard-secondary") is SOURCE
            assert outcome(s, p, p0, "discard-secondary") is TARGET


def test_1pri_call_pri_lost_after_sb():
    p, s = one_primary(1, 9)     # the 0pri rule discards the Primary
    r = resolve(p, s, pol("discard-least-changes", "call-pri-lost-after-sb"))
    assert r.decision is TARGET and r.pri_lost
    assert r.line == "Split-Brain detected, 1 primaries, automatically solved. Sync from peer node"
    refused = r.refused()
    assert refused.decision is UNRESOLVED and refused.line == UNRESOLVED_LINE
    peer_side = resolve(s, p, pol("discard-least-changes", "call-pri-lost-after-sb"))
    assert peer_side.decision is SOURCE and not peer_side.pri_lost
    p, s = one_primary(9, 1)     # the secondary loses: a plain resync
    r = resolve(p, s, pol("discard-least-changes", "call-pri-lost-after-sb"))
    assert r.decision is SOURCE and not r.pri_lost
    assert outcome(p, s, "disconnect", "call-pri-lost-after-sb") is UNRESOLVED


# --- after-sb-2pri ---------------------------------------------------------

def two_primaries(a_changes, b_changes):
    return (node("alpha", primary=True, changes=a_changes),
            node("beta", primary=True, changes=b_changes))


def test_2pri_disconnect():
    a, b = two_primaries(0, 9)
    assert outcome(a, b, "discard-zero-changes", "discard-secondary", "disconnect") \
        is UNRESOLVED


def test_2pri_violently():
    a, b = two_primaries(0, 9)
    r = resolve(a, b, pol("discard-zero-changes", p2="violently-as0p"))
    assert r.decision is TARGET and not r.pri_lost and r.primaries == 2
    assert r.line == "Split-Brain detected, 2 primaries, automatically solved. Sync from peer node"
    assert outcome(b, a, "discard-zero-changes", p2="violently-as0p") is SOURCE


def test_2pri_call_pri_lost_after_sb():
    a, b = two_primaries(0, 9)
    r = resolve(a, b, pol("discard-zero-changes", p2="call-pri-lost-after-sb"))
    assert r.decision is TARGET and r.pri_lost
    r = resolve(b, a, pol("discard-zero-changes", p2="call-pri-lost-after-sb"))
    assert r.decision is SOURCE and not r.pri_lost
    a, b = two_primaries(3, 9)   # zero-changes cannot decide
    assert outcome(a, b, "discard-zero-changes", p2="call-pri-lost-after-sb") is UNRESOLVED


def test_the_policy_for_the_number_of_primaries_is_the_one_used():
    a, b = node("alpha", changes=0), node("beta", changes=5)
    p = pol("discard-zero-changes", "disconnect", "disconnect")
    assert outcome(a, b, *p.__dict__.values()) is TARGET
    a = node("alpha", primary=True, changes=0)
    assert resolve(a, b, p).decision is UNRESOLVED


# --- manual recovery ------------------------------------------------------

def test_manual_recovery_lines():
    a, b = node("alpha"), node("beta")
    r = resolve(a, b, pol(), discard_mine=True)
    assert r.decision is TARGET and r.manual
    assert r.line == MANUAL_LINE % "peer"
    r = resolve(a, b, pol(), discard_peer=True)
    assert r.decision is SOURCE and r.line == "Split-Brain detected, manually solved. " \
                                              "Sync from this node"
    assert resolve(a, b, pol(), discard_mine=True, discard_peer=True).decision is UNRESOLVED
    assert AUTO_LINE % (2, "this") == ("Split-Brain detected, 2 primaries, automatically "
                                       "solved. Sync from this node")


# --- the "was Primary at the split" flag in the bitmap UUID ------------------

def test_new_generation_records_whether_the_node_was_primary_in_the_bitmap_uuid():
    base = Uuids(COMMON, 0, (0, 0))
    as_primary = base.with_new_current(A_NOW, was_primary=True)
    as_secondary = base.with_new_current(B_NOW)
    assert as_primary.bitmap == COMMON | PRIMARY_BIT and as_secondary.bitmap == COMMON
    assert SB.was_primary_at_split(Side(as_primary))
    assert not SB.was_primary_at_split(Side(as_secondary))
    # a second new generation keeps the bitmap, and its flag, of the first
    again = as_primary.with_new_current(0x11000, was_primary=False)
    assert again.bitmap == as_primary.bitmap
    # the flag is no part of the generation: still a split brain, and a
    # peer still at COMMON is still a plain bitmap resync target
    assert compare(Side(as_primary), Side(as_secondary)) is Decision.SPLIT_BRAIN
    assert compare(Side(as_primary), Side(base)) is Decision.BITMAP_SOURCE
    assert compare(Side(base), Side(as_primary)) is Decision.BITMAP_TARGET
    # the new current never carries it
    assert not base.with_new_current(A_NOW | PRIMARY_BIT, was_primary=True).current & 1
