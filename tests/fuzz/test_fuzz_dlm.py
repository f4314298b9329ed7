"""Fuzzing the DLM message codec (locking/dlm/messages.py).

Peers' DLM frames arrive inside o2net MSG payloads; ``decode``,
``decode_body`` and ``FrameDecoder.feed`` raise only RemoteProtocolError,
and a FrameDecoder that raised refuses everything after (the stream
position is lost).  The encoding is canonical: whatever decodes encodes
back to the same bytes.
"""
from __future__ import annotations

import time

import pytest
from hypothesis import example, given, strategies as st

from replfs.locking.dlm import messages as M
from replfs.locking.dlm.modes import Mode
from tests import soak
from tests.fuzz import fuzzlib as F

ERR = (M.RemoteProtocolError,)

modes = st.sampled_from(list(Mode))
lvbs = st.binary(min_size=M.LVB_LEN, max_size=M.LVB_LEN)
u64 = st.integers(0, 2 ** 64 - 1)
u8 = st.integers(0, 255)
names = st.text(max_size=40) | st.text(min_size=M.MAX_RESOURCE_NAME // 4,
                                       max_size=M.MAX_RESOURCE_NAME // 4)

MESSAGES = st.one_of(
    st.builds(M.LockRequest, u64, names, u64, modes, u8),
    st.builds(M.ConvertRequest, u64, names, u64, modes, u8, st.none() | lvbs, u64),
    st.builds(M.UnlockRequest, u64, names, u64, st.none() | lvbs, u64),
    st.builds(M.CancelRequest, u64, names, u64),
    st.builds(M.GrantMsg, u64, names, u64, modes, lvbs, u64, st.booleans()),
    st.builds(M.BastMsg, u64, names, u64, modes),
    st.builds(M.RefuseMsg, u64, names, u64, u8),
    st.builds(M.LockReport, u64, names, u64, st.none() | modes, st.none() | modes, u8, lvbs,
              u64, st.booleans()),
    st.builds(M.LvbReport, u64, names, lvbs, u64, st.booleans(), st.booleans()),
    st.builds(M.RecoveryDone, u64, st.booleans()),
)
FRAMES = MESSAGES.map(M.encode)


def _reframe(body: bytes) -> bytes:
    return M._U32.pack(len(body)) + body


def _mutated_body(src, frame: bytes) -> bytes:
    """A correct length prefix before a mutated body (reaches decode_body)."""
    return _reframe(F.mutate(src, frame[4:]))


STREAM_SHAPES = [F.encoded(FRAMES), F.Shape(FRAMES, _mutated_body),
                 F.encoded(st.lists(FRAMES, min_size=1, max_size=4).map(b"".join)),
                 F.raw_bytes(64)]
BODY_SHAPES = [F.encoded(FRAMES.map(lambda f: f[4:])), F.raw_bytes(80)]


def _feed(chunks):
    dec = M.FrameDecoder()
    got = []
    for c in chunks:
        out = F.expect(ERR, dec.feed, c)
        if isinstance(out, BaseException):
            # It stays failed: the stream position is lost.
            with pytest.raises(M.RemoteProtocolError):
                dec.feed(b"")
            return got, out
        got += out
    return got, None


def _frame_pieces(data: bytes) -> list[bytes]:
    out, pos = [], 0
    while pos + 4 <= len(data):
        end = pos + 4 + M._U32.unpack_from(data, pos)[0]
        out.append(data[pos:end])
        pos = end
    return out + [data[pos:]]


def check_stream(chunks: list[bytes]) -> None:
    with F.time_limit():
        data = b"".join(chunks)
        # The reference: fed one frame at a time (as the prefixes cut it),
        # every frame comes out by itself, before any error after it.
        ref, ref_err = _feed(_frame_pieces(data))
        got, err = _feed(chunks)
        assert (err is None) == (ref_err is None), (err, ref_err)
        assert got == (ref if err is None else ref[:len(got)])
        pos = 0
        for msg in ref:
            frame = M.encode(msg)                   # canonical encoding
            assert data[pos:pos + len(frame)] == frame
            pos += len(frame)
        # decode() of the same bytes: one whole frame or the error
        one = F.expect(ERR, M.decode, data)
        if not isinstance(one, BaseException):
            assert M.encode(one) == data


FUZZ = F.Fuzzer("DLM frames (FrameDecoder, decode)", STREAM_SHAPES, check_stream, pieces=True)


@F.quick()
@given(FUZZ.strategy)
@example([b"\x00\x00\x00\x00"])
@example([b"\xff\xff\xff\xff"])
@example([_reframe(b"\x01" + bytes(8) + b"\x00\x03\xed\xa0\x80" + bytes(10))])  # a surrogate
@example([_reframe(b"\x0a" + bytes(8) + b"\x02")])                       # bool 2
def test_fuzz_dlm_stream(chunks):
    check_stream(chunks)


def test_fuzz_dlm_stream_batched():
    FUZZ.run(F.QUICK_BATCHED)


@pytest.mark.soak
def test_soak_fuzz_dlm_stream(report):
    FUZZ.run(soak.size(F.SOAK_INPUTS, 200), report)


def check_body(body: bytes) -> None:
    with F.time_limit():
        msg = F.expect(ERR, M.decode_body, body)
        if not isinstance(msg, BaseException):
            assert M.encode(msg) == _reframe(body)


BODY = F.Fuzzer("DLM message bodies (decode_body)", BODY_SHAPES, check_body)


@F.quick()
@given(BODY.strategy)
@example(b"")
@example(b"\x63")
@example(b"\x08" + bytes(8) + b"\x00\x00" + bytes(8) + b"\x06\xff\x00" + bytes(64 + 8) + b"\x01")
def test_fuzz_dlm_body(body):
    check_body(body)


def test_fuzz_dlm_body_batched():
    BODY.run(F.QUICK_BATCHED)


@pytest.mark.soak
def test_soak_fuzz_dlm_body(report):
    BODY.run(soak.size(F.SOAK_INPUTS, 200), report)


# ------------------------------------------------------------------ round trips

@F.quick(300)
@given(MESSAGES)
def test_round_trip(msg):
    assert M.decode(M.encode(msg)) == msg


@F.quick(150)
@given(st.lists(MESSAGES, min_size=1, max_size=5), st.data())
def test_round_trip_any_split(msgs, data):
    stream = b"".join(M.encode(m) for m in msgs)
    got, err = _feed(data.draw(F.chunked(st.just(stream))))
    assert err is None and got == msgs


# ------------------------------------------------------------------ lengths

def test_huge_length_refused_from_the_prefix_alone():
    for n in (M.MAX_FRAME + 1, 2 ** 31, 2 ** 32 - 1):
        with pytest.raises(M.RemoteProtocolError):
            M.FrameDecoder().feed(M._U32.pack(n))


@F.quick(300)
@given(st.integers(0, 2 ** 32 - 1) | st.sampled_from([M.MAX_FRAME, M.MAX_FRAME + 1]),
       st.binary(max_size=4096))
def test_length_claims_allocate_only_what_arrived(n, body):
    data = M._U32.pack(n) + body
    with F.time_limit():
        _, peak = F.peak_alloc(lambda: F.expect(ERR, M.FrameDecoder().feed, data))
    assert peak <= 6 * len(data) + 64 * 1024, f"{peak} bytes for {len(data)} received"


def test_many_frames_and_tiny_pieces_take_linear_time():
    def many(n):
        raw = M.encode(M.RecoveryDone(1)) * n
        t0 = time.perf_counter()
        assert len(M.FrameDecoder().feed(raw)) == n
        return time.perf_counter() - t0

    def tiny(n):
        raw = M.encode(M.LockRequest(1, "r" * (n // 16), 2, Mode.EX)) * 16
        dec = M.FrameDecoder()
        t0 = time.perf_counter()
        got = []
        for i in range(0, len(raw), 2):
            got += dec.feed(raw[i:i + 2])
        assert len(got) == 16
        return time.perf_counter() - t0
    F.assert_linear(many, 4000)
    F.assert_linear(tiny, 1000, k=8)
