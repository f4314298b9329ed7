"""The sync decision from generation UUIDs (pure)."""
import itertools

from hypothesis import given, strategies as st

from replfs.blockrepl.core.uuids import (JUST_CREATED, Decision, Side, Uuids, compare)

A, B, C, D, E = (0x1000 * i for i in range(1, 6))


def side(cur, bm=0, h=(0, 0), **kw):
    return Side(Uuids(cur, bm, h), **kw)


def test_both_fresh_and_one_fresh():
    assert compare(side(JUST_CREATED), side(JUST_CREATED)) is Decision.BOTH_FRESH
    assert compare(side(A), side(JUST_CREATED)) is Decision.FULL_SOURCE
    assert compare(side(JUST_CREATED), side(A)) is Decision.FULL_TARGET


def test_same_generation_is_no_sync():
    assert compare(side(A, h=(B, 0)), side(A, h=(B, 0))) is Decision.NO_SYNC


def test_primary_moved_on_while_peer_was_away_gives_bitmap_sync():
    # The Primary wrote while disconnected: bitmap := A, current := B.
    primary = side(B, A)
    secondary = side(A)
    assert compare(primary, secondary) is Decision.BITMAP_SOURCE
    assert compare(secondary, primary) is Decision.BITMAP_TARGET


def test_both_moved_on_from_same_point_is_split_brain():
    assert compare(side(B, A), side(C, A)) is Decision.SPLIT_BRAIN


def test_history_match_forces_full_sync():
    # The peer is at a generation this node retired long ago.
    assert compare(side(C, 0, (B, A)), side(A)) is Decision.FULL_SOURCE
    assert compare(side(A), side(C, 0, (B, A))) is Decision.FULL_TARGET


def test_shared_history_only_is_split_brain_and_nothing_shared_is_unrelated():
    assert compare(side(C, 0, (A, 0)), side(D, 0, (A, 0))) is Decision.SPLIT_BRAIN
    assert compare(side(C, 0, (A, 0)), side(D, 0, (B, 0))) is Decision.UNRELATED


def test_interrupted_sync_resumes_toward_the_inconsistent_side():
    assert compare(side(A, inconsistent=True), side(A)) is Decision.BITMAP_TARGET


def test_crashed_primary_resyncs_its_activity_log_unless_peer_is_primary_now():
    crashed = side(A, crashed_primary=True, oos_blocks=10, name="alpha")
    other = side(A, name="beta")
    assert compare(crashed, other) is Decision.BITMAP_SOURCE
    promoted = side(A, primary=True, name="beta")
    assert compare(crashed, promoted) is Decision.BITMAP_TARGET


def test_an_outdated_disk_never_wins_within_a_generation():
    # The loser of a fence-peer decision (Outdated, still Primary until its
    # mounts are gone) with the writes it held marked out of sync meets the
    # winner, which never moved on: the winner is the source all the same.
    loser = side(A, primary=True, oos_blocks=3, outdated=True, name="beta")
    winner = side(A, name="alpha")
    assert compare(loser, winner) is Decision.BITMAP_TARGET
    assert compare(winner, loser) is Decision.BITMAP_SOURCE
    crashed = side(A, crashed_primary=True, name="alpha")
    assert compare(loser, crashed) is Decision.BITMAP_TARGET


def test_lowest_bit_is_ignored():
    assert compare(side(A | 1), side(A)) is Decision.NO_SYNC


def test_uuid_transitions_round_trip():
    u = Uuids(A)
    moved = u.with_new_current(B)
    assert (moved.current, moved.bitmap) == (B, A)
    # A second new generation keeps the older bitmap base.
    assert moved.with_new_current(C).bitmap == A
    retired = moved.retire_bitmap()
    assert retired.bitmap == 0 and retired.history[0] == A
    adopted = Uuids(A).adopt(B)
    assert adopted.current == B and adopted.history[0] == A


uuid_values = st.sampled_from([0, JUST_CREATED, A, B, C, D, E])


@st.composite
def sides(draw):
    return Side(Uuids(draw(st.sampled_from([JUST_CREATED, A, B, C, D, E])), draw(uuid_values),
                      (draw(uuid_values), draw(uuid_values))),
                inconsistent=draw(st.booleans()), crashed_primary=draw(st.booleans()),
                primary=draw(st.booleans()), oos_blocks=draw(st.integers(0, 3)),
                name=draw(st.sampled_from(["alpha", "beta"])))


@given(sides(), sides())
def test_decision_is_symmetric(a, b):
    if a.name == b.name:
        b = Side(b.uuids, b.inconsistent, b.crashed_primary, b.primary, b.oos_blocks,
                 "beta" if a.name == "alpha" else "alpha")
    assert compare(a, b) is compare(b, a).mirrored()
