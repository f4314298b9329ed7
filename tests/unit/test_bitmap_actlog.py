import pytest
from hypothesis import given, strategies as st

from replfs.blockrepl.core.actlog import ActivityLog, ActivityLogFull, extents_of
from replfs.blockrepl.core.bitmap import Bitmap, blocks_of


def test_set_clear_count_and_runs():
    bm = Bitmap(100)
    assert bm.set_range(3, 10) == 10
    assert bm.set_range(5, 2) == 0
    assert bm.count == 10
    bm.set_range(50, 1)
    assert list(bm.runs()) == [(3, 10), (50, 1)]
    assert bm.clear_range(3, 5) == 5
    assert list(bm.runs()) == [(8, 5), (50, 1)]
    with pytest.raises(ValueError):
        bm.set_range(99, 2)


def test_tail_bits_beyond_device_are_ignored_on_load():
    bm = Bitmap(10, b"\xff\xff")
    assert bm.count == 10


def test_merge_is_union_and_dirty_pages_tracked():
    a, b = Bitmap(70000), Bitmap(70000)
    a.set_range(0, 4)
    b.set_range(2, 4)
    b.set_range(65000, 3)
    a.take_dirty_pages()
    assert a.merge(b.to_bytes()) == 5
    assert a.count == 9
    pages = [p for p, _ in a.take_dirty_pages()]
    assert pages == [0, 1]  # 65000 bits in: second 4 KiB page of the bitmap
    assert a.take_dirty_pages() == []


@given(st.lists(st.tuples(st.booleans(), st.integers(0, 199), st.integers(0, 50)), max_size=40))
def test_bitmap_matches_a_set_model(ops):
    bm, model = Bitmap(200), set()
    for setting, first, count in ops:
        count = min(count, 200 - first)
        rng = set(range(first, first + count))
        if setting:
            assert bm.set_range(first, count) == len(rng - model)
            model |= rng
        else:
            assert bm.clear_range(first, count) == len(rng & model)
            model -= rng
        assert bm.count == len(model)
    assert {b for f, n in bm.runs() for b in range(f, f + n)} == model
    assert Bitmap(200, bm.to_bytes()).count == len(model)


def test_blocks_of():
    assert blocks_of(0, 4096) == (0, 1)
    assert blocks_of(4095, 2) == (0, 2)
    assert blocks_of(8192, 1) == (2, 1)


def test_activity_log_transactions_and_eviction():
    al = ActivityLog(2)
    assert al.begin(0, 0) is True
    assert al.begin(0, 0) is False        # hot already: no transaction
    al.end(0, 0)
    al.end(0, 0)
    assert al.begin(1, 1) is True
    assert al.begin(2, 2) is True         # evicts extent 0 (idle)
    assert sorted(al.extents) == [1, 2]
    assert al.transactions == 3
    # Both hot extents busy: no room for a third.
    with pytest.raises(ActivityLogFull):
        al.begin(3, 3)


def test_extents_of():
    assert extents_of(0, 1) == (0, 0)
    assert extents_of(4 * 1024 * 1024 - 1, 2) == (0, 1)
