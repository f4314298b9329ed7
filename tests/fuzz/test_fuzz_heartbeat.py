"""Fuzzing the disk heartbeat slot records (locking/heartbeat/core.py).

Every node reads every other node's slot from the shared heartbeat
region: whatever a slot holds, ``SlotRecord.decode`` returns a record,
None (never written) or raises HeartbeatFormatError (the driver counts
that slot as no heartbeat).  A CRC-32 guards the record, so half of the
mutated slots get their CRC recomputed to reach the checks behind it.
"""
from __future__ import annotations

import zlib

import pytest
from hypothesis import example, given, strategies as st

from replfs.locking.heartbeat import core as H
from tests import soak
from tests.fuzz import fuzzlib as F

ERR = (H.HeartbeatFormatError,)
_BODY = H._RECORD.size

RECORDS = st.builds(H.SlotRecord, st.integers(0, 254), F.uints("Q"), F.uints("Q"),
                    F.uints("Q"), F.uints("I"))
SLOTS = RECORDS.map(H.SlotRecord.encode)


def _fix_crc(slot: bytes) -> bytes:
    if len(slot) < H.RECORD_LEN:
        return slot
    return slot[:_BODY] + H._CRC.pack(zlib.crc32(slot[:_BODY])) + slot[H.RECORD_LEN:]


def _to_size(slot: bytes) -> bytes:
    return slot[:H.SLOT_SIZE].ljust(H.SLOT_SIZE, b"\0")


def _flip_in_record(src, slot: bytes) -> bytes:
    """One bit of the record itself (the slot is mostly zero padding)."""
    pos = src.integer(0, H.RECORD_LEN - 1)
    return slot[:pos] + bytes([slot[pos] ^ (1 << src.integer(0, 7))]) + slot[pos + 1:]


SHAPES = [
    F.encoded(SLOTS),                                                   # CRC as it falls
    F.Shape(SLOTS, lambda src, s: _fix_crc(_to_size(F.mutate(src, s)))),  # right size, CRC fixed
    F.Shape(SLOTS, lambda src, s: _fix_crc(F.mutate(src, s))),
    F.Shape(SLOTS, _flip_in_record),
    F.Shape(SLOTS, lambda src, s: _fix_crc(_flip_in_record(src, s))),
    F.Shape(SLOTS, lambda src, s: _fix_crc(_to_size(src.binary(0, H.RECORD_LEN)))),
    F.raw_bytes(H.SLOT_SIZE + 8),
]


def check_slot(slot: bytes) -> None:
    with F.time_limit():
        rec = F.expect(ERR, H.SlotRecord.decode, slot)
        if rec is None:
            assert not any(slot) and len(slot) == H.SLOT_SIZE
        elif not isinstance(rec, BaseException):
            assert 0 <= rec.node <= 255
            if rec.node <= 254:             # encode() refuses 255 (never ours)
                assert rec.encode() == slot
            # the monitor takes any decoded record
            mon = H.HeartbeatMonitor(0, [0, 1, rec.node])
            mon.observe_slot(rec.node, rec, 0.0)
            mon.observe_slot(rec.node, rec, 1.0)


FUZZ = F.Fuzzer("heartbeat slots (SlotRecord.decode)", SHAPES, check_slot)


@F.quick()
@given(FUZZ.strategy)
@example(bytes(H.SLOT_SIZE))
@example(b"")
@example(_fix_crc(b"RPHB\x01\xff" + bytes(H.SLOT_SIZE - 6)))
@example(_fix_crc(b"RPHB\x02\x00" + bytes(H.SLOT_SIZE - 6)))
@example(_fix_crc(H.SlotRecord(1, 2, 3).encode()[:-1] + b"\x01"))
def test_fuzz_heartbeat_slot(slot):
    check_slot(slot)


def test_fuzz_heartbeat_slot_batched():
    FUZZ.run(F.QUICK_BATCHED)


@pytest.mark.soak
def test_soak_fuzz_heartbeat_slot(report):
    FUZZ.run(soak.size(F.SOAK_INPUTS, 200), report)


@given(RECORDS)
def test_round_trip(rec):
    raw = rec.encode()
    assert len(raw) == H.SLOT_SIZE and H.SlotRecord.decode(raw) == rec


@F.quick(300)
@given(st.binary(min_size=0, max_size=3 * H.SLOT_SIZE))
def test_any_size_refused_quickly(raw):
    """A slot read of the wrong size is refused, and costs no more than its bytes."""
    with F.time_limit():
        out, peak = F.peak_alloc(lambda: F.expect(ERR, H.SlotRecord.decode, raw))
    if len(raw) != H.SLOT_SIZE:
        assert isinstance(out, H.HeartbeatFormatError)
    assert peak <= 2 * len(raw) + 16 * 1024
