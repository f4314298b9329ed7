"""replfs.fuse.locks (pure table) and lockops (trio waits): POSIX/flock semantics."""
from __future__ import annotations

import errno

import pytest
import trio
import trio.testing
from hypothesis import given, settings, strategies as st

from replfs.fuse.errors import FUSEError
from replfs.fuse.lockops import LockService
from replfs.fuse.locks import (F_RDLCK, F_UNLCK, F_WRLCK, OFFSET_MAX, Conflict, Kind, LockError,
                               LockTable, Owner, Range)

P = Kind.POSIX
A, B, C = Owner("m1", 1), Owner("m1", 2), Owner("m2", 1)


def test_merge_adjacent_and_overlapping_same_type():
    t = LockTable()
    assert t.set("k", P, A, F_WRLCK, 0, 9, 100) is None
    assert t.set("k", P, A, F_WRLCK, 10, 19, 100) is None       # adjacent
    assert t.held("k", P, A) == [Range(0, 19, F_WRLCK, 100)]
    t.set("k", P, A, F_WRLCK, 15, 30, 100)                       # overlapping
    assert t.held("k", P, A) == [Range(0, 30, F_WRLCK, 100)]
    t.set("k", P, A, F_RDLCK, 32, 40, 100)                       # gap: stays separate
    assert len(t.held("k", P, A)) == 2


def test_unlock_in_the_middle_splits():
    t = LockTable()
    t.set("k", P, A, F_WRLCK, 0, 99, 7)
    t.set("k", P, A, F_UNLCK, 40, 59, 7)
    assert t.held("k", P, A) == [Range(0, 39, F_WRLCK, 7), Range(60, 99, F_WRLCK, 7)]
    # now B can lock the hole, not the rest
    assert t.set("k", P, B, F_WRLCK, 40, 59, 8) is None
    assert t.set("k", P, B, F_RDLCK, 39, 39, 8) == Conflict(A, 0, 39, F_WRLCK, 7)


def test_convert_type_of_a_subrange_splits_and_remerges():
    t = LockTable()
    t.set("k", P, A, F_RDLCK, 0, 99, 1)
    t.set("k", P, A, F_WRLCK, 10, 19, 1)
    assert t.held("k", P, A) == [Range(0, 9, F_RDLCK, 1), Range(10, 19, F_WRLCK, 1),
                                 Range(20, 99, F_RDLCK, 1)]
    t.set("k", P, A, F_RDLCK, 10, 19, 1)
    assert t.held("k", P, A) == [Range(0, 99, F_RDLCK, 1)]


def test_conflict_rules():
    t = LockTable()
    t.set("k", P, A, F_RDLCK, 0, 9, 1)
    assert t.set("k", P, B, F_RDLCK, 5, 15, 2) is None          # shared
    assert t.test("k", P, C, F_WRLCK, 8, 8) == Conflict(A, 0, 9, F_RDLCK, 1)   # first by start
    assert t.test("k", P, A, F_WRLCK, 0, 9) == Conflict(B, 5, 15, F_RDLCK, 2)  # not with itself
    assert t.test("k", P, C, F_UNLCK, 0, OFFSET_MAX) is None     # unlock never conflicts
    assert t.test("other", P, C, F_WRLCK, 0, 9) is None
    # B cannot upgrade while A shares the range; nothing changes on refusal
    assert t.set("k", P, B, F_WRLCK, 5, 15, 2) == Conflict(A, 0, 9, F_RDLCK, 1)
    assert t.held("k", P, B) == [Range(5, 15, F_RDLCK, 2)]


def test_posix_and_flock_are_separate_namespaces():
    t = LockTable()
    t.set("k", Kind.FLOCK, A, F_WRLCK, 0, OFFSET_MAX, 1)
    assert t.test("k", P, B, F_WRLCK, 0, OFFSET_MAX) is None
    assert t.test("k", Kind.FLOCK, B, F_RDLCK, 0, OFFSET_MAX).owner == A


def test_release_owner_and_drop_mount():
    t = LockTable()
    t.set("k", P, A, F_WRLCK, 0, 9, 1)
    t.set("j", P, A, F_WRLCK, 0, 9, 1)
    t.set("k", P, C, F_WRLCK, 20, 29, 3)
    assert t.release_owner("k", P, A) and not t.release_owner("k", P, A)
    assert t.held("j", P, A)
    assert t.drop_mount("m1") == {"j"}
    assert t.held("j", P, A) == [] and t.held("k", P, C) == [Range(20, 29, F_WRLCK, 3)]
    assert t.keys() == {"k"}


def test_deadlock_detection_two_and_three_owners():
    t = LockTable()
    assert not t.would_deadlock(A, {B})
    tok = t.start_wait(A, {B})          # A waits for B
    assert t.would_deadlock(B, {A})     # B waiting for A closes the cycle
    assert not t.would_deadlock(C, {A})
    t2 = t.start_wait(B, {C})           # chain A -> B -> C
    assert t.would_deadlock(C, {A})
    t.end_wait(A, tok)
    t.end_wait(B, t2)
    assert not t.would_deadlock(C, {A}) and t.waiting() == {}


def test_bad_arguments_are_our_bug():
    t = LockTable()
    with pytest.raises(LockError):
        t.set("k", P, A, 7, 0, 1)
    with pytest.raises(LockError):
        t.set("k", P, A, F_RDLCK, 5, 4)
    with pytest.raises(LockError):
        t.set("k", P, A, F_RDLCK, 0, OFFSET_MAX + 1)


def test_remote_conflict_source_is_consulted():
    class Remote:
        def conflicts(self, key, kind, owner, type_, start, end):
            return [Conflict(Owner("node2", 9), 0, 0, F_WRLCK, 4242)] if start == 0 else []
    t = LockTable(remote=Remote())
    assert t.set("k", P, A, F_RDLCK, 0, 5, 1).pid == 4242
    assert t.set("k", P, A, F_RDLCK, 1, 5, 1) is None


# ----------------------------------------------------------------- model check

N = 24          # bytes modelled; byte N-1 stands for "N-1 .. OFFSET_MAX"
owners = st.sampled_from([A, B, C])
types = st.sampled_from([F_RDLCK, F_WRLCK, F_UNLCK])


@st.composite
def ranges(draw):
    start = draw(st.integers(0, N - 2))
    if draw(st.booleans()):
        return start, OFFSET_MAX
    return start, draw(st.integers(start, N - 2))


ops = st.one_of(
    st.tuples(st.just("set"), owners, types, ranges()),
    st.tuples(st.just("release"), owners, st.just(None), st.just(None)),
    st.tuples(st.just("drop"), st.sampled_from(["m1", "m2"]), st.just(None), st.just(None)),
)


def _bytes(start, end):
    return range(start, (N - 1 if end == OFFSET_MAX else end) + 1)


@settings(max_examples=400, deadline=None)
@given(st.lists(ops, max_size=30), st.lists(st.tuples(owners, types, ranges()), max_size=5))
def test_table_matches_a_per_byte_model(seq, probes):
    t = LockTable()
    model: list[dict] = [dict() for _ in range(N)]     # byte -> {owner: type}

    def model_conflict(owner, typ, start, end):
        if typ == F_UNLCK:
            return False
        return any(o != owner and (typ == F_WRLCK or ty == F_WRLCK)
                   for b in _bytes(start, end) for o, ty in model[b].items())

    for op, who, typ, rng in seq:
        if op == "set":
            start, end = rng
            expect_conflict = model_conflict(who, typ, start, end)
            got = t.set("k", P, who, typ, start, end, 1)
            assert (got is not None) == expect_conflict
            if got is not None:
                assert got.owner != who
                assert got.start <= end and got.end >= start
                assert typ == F_WRLCK or got.type == F_WRLCK
            else:
                for b in _bytes(start, end):
                    if typ == F_UNLCK:
                        model[b].pop(who, None)
                    else:
                        model[b][who] = typ
        elif op == "release":
            t.release_owner("k", P, who)
            for m in model:
                m.pop(who, None)
        else:
            t.drop_mount(who)
            for m in model:
                for o in [o for o in m if o.mount == who]:
                    del m[o]
        # canonical form and per-byte equality
        for o in (A, B, C):
            held = t.held("k", P, o)
            for r1, r2 in zip(held, held[1:]):
                assert r1.end < r2.start, "overlap"
                assert not (r1.type == r2.type and r1.end + 1 == r2.start), "unmerged neighbours"
            covered = {}
            for r in held:
                assert (r.end == OFFSET_MAX) == (r.end >= N - 1), "tail must reach OFFSET_MAX"
                for b in _bytes(r.start, r.end):
                    covered[b] = r.type
            assert covered == {b: m[o] for b, m in enumerate(model) if o in m}
    for who, typ, (start, end) in probes:
        assert (t.test("k", P, who, typ, start, end) is not None) == model_conflict(who, typ, start, end)


# ----------------------------------------------------------------- trio driver

async def test_setlkw_waits_until_unlock():
    svc = LockService()
    svc.setlk("k", P, A, F_WRLCK, 0, 9, 1)
    with pytest.raises(FUSEError) as exc:
        svc.setlk("k", P, B, F_WRLCK, 5, 5, 2)
    assert exc.value.errno == errno.EAGAIN
    got = []
    async with trio.open_nursery() as n:
        async def waiter():
            await svc.setlkw("k", P, B, F_WRLCK, 5, 5, 2)
            got.append("B")
        n.start_soon(waiter)
        await trio.testing.wait_all_tasks_blocked()
        assert got == [] and svc.table.waiting() == {B: {A}}
        await svc.setlkw("k", P, A, F_UNLCK, 0, 9, 1)      # unlock through SETLKW: never waits
    assert got == ["B"] and svc.table.waiting() == {}


async def test_cancelled_wait_leaves_nothing_behind():
    svc = LockService()
    svc.setlk("k", P, A, F_WRLCK, 0, 9, 1)
    with trio.move_on_after(0.01) as scope:
        await svc.setlkw("k", P, B, F_RDLCK, 0, 0, 2)
    assert scope.cancelled_caught
    assert svc.table.held("k", P, B) == [] and svc.table.waiting() == {}
    assert svc.counters["interrupted"] == 1


async def test_edeadlk_for_the_second_of_two_crossing_waits():
    svc = LockService()
    svc.setlk("k", P, A, F_WRLCK, 0, 0, 1)
    svc.setlk("k", P, B, F_WRLCK, 1, 1, 2)
    async with trio.open_nursery() as n:
        n.start_soon(svc.setlkw, "k", P, A, F_WRLCK, 1, 1, 1)   # A waits for B
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(FUSEError) as exc:
            await svc.setlkw("k", P, B, F_WRLCK, 0, 0, 2)        # B would wait for A
        assert exc.value.errno == errno.EDEADLK
        svc.release_owner("k", P, B)                              # B gives up: A proceeds
    assert svc.table.held("k", P, A) == [Range(0, 1, F_WRLCK, 1)]


async def test_flock_waits_are_not_deadlock_checked_and_drop_mount_wakes():
    svc = LockService()
    fl = Kind.FLOCK
    svc.setlk("k", fl, A, F_WRLCK, 0, OFFSET_MAX, 1)
    async with trio.open_nursery() as n:
        n.start_soon(svc.setlkw, "k", fl, C, F_RDLCK, 0, OFFSET_MAX, 3)
        await trio.testing.wait_all_tasks_blocked()
        svc.drop_mount("m1")            # A's mount died
    assert svc.table.held("k", fl, C) == [Range(0, OFFSET_MAX, F_RDLCK, 3)]
