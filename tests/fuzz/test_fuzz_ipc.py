"""Fuzzing the local IPC frames (replfs/ipc/frames.py).

Clients of replfsd's socket (and the daemon, to its clients) send
``header_len u32 | body_len u32 | JSON header | body`` in any pieces;
``FrameDecoder.next_frame`` returns (dict, bytes) or None, and raises
only FrameError (the server drops that client).  Lengths past
MAX_HEADER/MAX_BODY are refused from the 8-byte prefix alone, and what
the decoder holds while a frame is incomplete costs about the bytes it
was given, in whatever pieces they came.
"""
from __future__ import annotations

import json
import time

import pytest
from hypothesis import example, given, strategies as st

from replfs.ipc import frames as IPC
from tests import soak
from tests.fuzz import fuzzlib as F

ERR = (IPC.FrameError,)

_scalars = (st.none() | st.booleans() | st.integers(-2 ** 70, 2 ** 70)
            | st.floats(allow_nan=False) | st.text(max_size=12))
JSON = st.recursive(_scalars, lambda kids: st.lists(kids, max_size=3)
                    | st.dictionaries(st.text(max_size=6), kids, max_size=3), max_leaves=6)
HEADERS = st.dictionaries(st.text(max_size=8), JSON, max_size=3) | st.fixed_dictionaries(
    {"id": st.integers(0, 2 ** 31), "op": st.sampled_from(["write", "read", "dlm-lock"]),
     "off": st.integers(0, 2 ** 63)})
BODIES = st.binary(max_size=300)
FRAMES = st.builds(IPC.encode, HEADERS, BODIES)


def _frame(header: bytes, body: bytes = b"") -> bytes:
    return IPC.HEAD.pack(len(header), len(body)) + header + body


def _mutated_json(src, hb) -> bytes:
    """A mutated JSON header under a correct prefix (reaches json.loads)."""
    header, body = hb
    return _frame(F.mutate(src, json.dumps(header, separators=(",", ":")).encode()), body)


SHAPES = [F.encoded(FRAMES), F.Shape(st.tuples(HEADERS, BODIES), _mutated_json),
          F.encoded(st.lists(FRAMES, min_size=1, max_size=3).map(b"".join)),
          F.raw_bytes(64)]


def _decode(chunks):
    dec = IPC.FrameDecoder()
    got = []
    for c in chunks:
        dec.receive_data(c)
        while True:
            fr = F.expect(ERR, dec.next_frame)
            if fr is None:
                break
            if isinstance(fr, BaseException):
                return got, fr
            got.append(fr)
    return got, None


def _canon(frames):
    return [(json.dumps(h, sort_keys=True), b) for h, b in frames]


def check_stream(chunks: list[bytes]) -> None:
    with F.time_limit():
        whole, err = _decode([b"".join(chunks)])
        split, err2 = _decode(chunks)
        assert (err is None) == (err2 is None), (err, err2)
        assert _canon(split) == _canon(whole)
        for header, body in whole:
            assert isinstance(header, dict) and type(body) is bytes
            # what decoded re-encodes and decodes to the same
            again, err3 = _decode([IPC.encode(header, body)])
            assert err3 is None and _canon(again) == _canon([(header, body)])


FUZZ = F.Fuzzer("local IPC frames (FrameDecoder)", SHAPES, check_stream, pieces=True)


@F.quick()
@given(FUZZ.strategy)
@example([IPC.HEAD.pack(IPC.MAX_HEADER + 1, 0)])
@example([IPC.HEAD.pack(2, IPC.MAX_BODY + 1)])
@example([_frame(b"[]")])
@example([_frame(b"\xff\xfe{}")])
# Found by this fuzzer (as it shrank them): json.loads raised RecursionError
# (arrays nested past the recursion limit) and ValueError (an integer past
# sys.get_int_max_str_digits()) out of next_frame.
@example([IPC.HEAD.pack(4402, 0) + b"[" * 4400 + b"{}"])
@example([IPC.HEAD.pack(4402, 0) + b"1" * 4400 + b"{}"])
@example([_frame(b'{"a":' + b"[" * 5000 + b"}")])
def test_fuzz_ipc_stream(chunks):
    check_stream(chunks)


def test_fuzz_ipc_stream_batched():
    FUZZ.run(F.QUICK_BATCHED)


@pytest.mark.soak
def test_soak_fuzz_ipc_stream(report):
    FUZZ.run(soak.size(F.SOAK_INPUTS, 200), report)


@F.quick(150)
@given(st.lists(st.tuples(HEADERS, BODIES), min_size=1, max_size=4), st.data())
def test_round_trip_any_split(frames, data):
    stream = b"".join(IPC.encode(h, b) for h, b in frames)
    got, err = _decode(data.draw(F.chunked(st.just(stream), max_pieces=40)))
    assert err is None and _canon(got) == _canon(frames)


# ------------------------------------------------------------------ lengths

def test_huge_lengths_refused_from_the_prefix_alone():
    for hlen, blen in ((IPC.MAX_HEADER + 1, 0), (0, IPC.MAX_BODY + 1),
                       (2 ** 32 - 1, 2 ** 32 - 1), (2, 2 ** 32 - 1)):
        dec = IPC.FrameDecoder()
        dec.receive_data(IPC.HEAD.pack(hlen, blen))
        with pytest.raises(IPC.FrameError):
            dec.next_frame()


@st.composite
def _claims(draw):
    """A prefix claiming lengths up to (and past) the limits, then some of
    the bytes, in arbitrary pieces (one byte each at worst)."""
    hlen = draw(st.integers(0, IPC.MAX_HEADER) | st.sampled_from(
        [IPC.MAX_HEADER, IPC.MAX_HEADER + 1, 2 ** 32 - 1]))
    blen = draw(st.integers(0, IPC.MAX_BODY) | st.sampled_from(
        [IPC.MAX_BODY, IPC.MAX_BODY + 1, 2 ** 32 - 1]))
    n = draw(st.integers(0, 20000))
    raw = IPC.HEAD.pack(hlen, blen) + draw(st.sampled_from([b"x", b"[", b"ab"])) * n
    return _pieces(raw, draw(st.sampled_from([1, 2, 3, 7, 100, 4096])))


def _pieces(raw: bytes, size: int) -> list[bytes]:
    return [raw[i:i + size] for i in range(0, len(raw), size)]


@F.quick(200)
@given(_claims())
# Found by this test: every piece was kept as its own bytes object (about
# 40 bytes of overhead each, 91 times the bytes received in one-byte
# pieces), and every frame cut from the front copied the rest of its chunk
# (quadratic: see test_small_pieces_take_linear_time).
@example(_pieces(IPC.HEAD.pack(2, 1 << 20) + b"{}" + b"ab" * 20000, 2))
@example(_pieces(IPC.HEAD.pack(IPC.MAX_HEADER, IPC.MAX_BODY) + b"[" * 20000, 1))
def test_incomplete_frames_cost_what_arrived(chunks):
    fed = sum(map(len, chunks))

    def run():
        dec = IPC.FrameDecoder()
        for c in chunks:
            dec.receive_data(c)
            fr = F.expect(ERR, dec.next_frame)
            if fr is not None:
                return fr
        return None

    with F.time_limit():
        _, peak = F.peak_alloc(run)
    assert peak <= 3 * fed + 256 * 1024, f"{peak} bytes held for {fed} received in {len(chunks)} pieces"


def test_small_pieces_take_linear_time():
    """A client sending a big write in tiny pieces must not stall the daemon."""
    def feed(n):
        raw = IPC.encode({"op": "write"}, b"x" * n)
        dec = IPC.FrameDecoder()
        t0 = time.perf_counter()
        for i in range(0, len(raw), 2):
            dec.receive_data(raw[i:i + 2])
            fr = dec.next_frame()
        assert fr is not None and len(fr[1]) == n
        return time.perf_counter() - t0
    F.assert_linear(feed, 1 << 15)


def test_many_frames_in_one_read_take_linear_time():
    """A client pipelining many small requests must not stall the daemon."""
    def feed(n):
        raw = IPC.encode({}) * n
        dec = IPC.FrameDecoder()
        t0 = time.perf_counter()
        dec.receive_data(raw)
        got = 0
        while dec.next_frame() is not None:
            got += 1
        assert got == n
        return time.perf_counter() - t0
    F.assert_linear(feed, 4000)
