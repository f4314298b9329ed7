"""Fuzzing the cluster messaging codec (o2net, locking/net/proto.py) and the
cluster service's payload unpacking (``_unpack`` in locking/service.py).

o2net's ``FrameDecoder.feed`` and ``decode_hello`` raise only
RemoteProtocolError (the driver drops the connection); ``_unpack`` raises
only ValueError (UnicodeDecodeError is one), which the service's message
handler catches to drop the connection.
"""
from __future__ import annotations

import time

import pytest
from hypothesis import example, given, strategies as st

from replfs.locking import service
from replfs.locking.net import proto as N
from tests import soak
from tests.fuzz import fuzzlib as F

ERR = (N.RemoteProtocolError,)
UNPACK_ERR = (ValueError,)

# ------------------------------------------------------------------ strategies

_cluster_names = st.text(max_size=40).filter(lambda s: len(s.encode()) <= 255)
HELLOS = st.builds(N.Hello, st.integers(0, 255), st.integers(0, 255), _cluster_names,
                   st.binary(min_size=N.NONCE_LEN, max_size=N.NONCE_LEN))
_domains = st.text(max_size=30).filter(lambda s: len(s.encode()) <= 255)
CLUSTER_PAYLOADS = st.builds(service._pack, st.integers(0, 255), _domains,
                             st.binary(max_size=200))
FRAMES = st.one_of(
    HELLOS.map(N.encode_hello),
    st.binary(min_size=N.MAC_LEN, max_size=N.MAC_LEN).map(lambda m: N.frame(N.AUTH, m)),
    st.sampled_from([N.PING, N.PONG]).map(N.frame),
    CLUSTER_PAYLOADS.map(lambda p: N.frame(N.MSG, p)),
)


def _mutated_payload(src, raw: bytes) -> bytes:
    """A correct header around a mutated payload (reaches the payload parsers)."""
    return N.frame(raw[2], F.mutate(src, raw[N.HEADER.size:]))


SHAPES = [F.encoded(FRAMES), F.Shape(FRAMES, _mutated_payload),
          F.encoded(st.lists(FRAMES, min_size=1, max_size=4).map(b"".join)),
          F.raw_bytes(64)]


# ------------------------------------------------------------------ o2net frames

def _feed(chunks):
    dec = N.FrameDecoder()
    got = []
    for c in chunks:
        out = F.expect(ERR, dec.feed, c)
        if isinstance(out, BaseException):
            return got, out
        got += out
    return got, None


def _frame_pieces(data: bytes) -> list[bytes]:
    out, pos = [], 0
    while pos + N.HEADER.size <= len(data):
        end = pos + N.HEADER.size + N.HEADER.unpack_from(data, pos)[3]
        out.append(data[pos:end])
        pos = end
    return out + [data[pos:]]


def _check_payload(ftype: int, payload: bytes) -> None:
    if ftype == N.HELLO:
        h = F.expect(ERR, N.decode_hello, payload)
        if not isinstance(h, BaseException):
            assert N.encode_hello(h) == N.frame(N.HELLO, payload)
            N.check_hello(h, cluster="c", expected={0, 1})
    elif ftype == N.MSG:
        check_unpack(payload)


def check_stream(chunks: list[bytes]) -> None:
    with F.time_limit():
        data = b"".join(chunks)
        # The reference: fed one frame at a time (as the headers cut it),
        # every frame comes out by itself, before any error after it.
        ref, ref_err = _feed(_frame_pieces(data))
        got, err = _feed(chunks)
        assert (err is None) == (ref_err is None), (err, ref_err)
        if err is None:
            assert got == ref
        else:
            # frames decoded in the same feed() as the error are not returned
            assert got == ref[:len(got)]
        pos = 0
        for ftype, payload in ref:
            assert N.frame(ftype, payload) == data[pos:pos + N.HEADER.size + len(payload)]
            pos += N.HEADER.size + len(payload)
            _check_payload(ftype, payload)


FUZZ = F.Fuzzer("o2net frames (FrameDecoder, decode_hello, _unpack)", SHAPES, check_stream,
                pieces=True)


@F.quick()
@given(FUZZ.strategy)
@example([N.HEADER.pack(N.MAGIC, N.MSG, 0, 0xFFFFFFFF)])
@example([N.frame(N.HELLO, b"\x01\x00\x02\xff\xfe" + b"n" * 16)])
@example([N.frame(N.MSG, b"\x00\xff")])
def test_fuzz_o2net_stream(chunks):
    check_stream(chunks)


def test_fuzz_o2net_stream_batched():
    FUZZ.run(F.QUICK_BATCHED)


@pytest.mark.soak
def test_soak_fuzz_o2net_stream(report):
    FUZZ.run(soak.size(F.SOAK_INPUTS, 200), report)


# ------------------------------------------------------------------ _unpack

def check_unpack(payload: bytes) -> None:
    with F.time_limit():
        out = F.expect(UNPACK_ERR, service._unpack, payload)
        if not isinstance(out, BaseException):
            kind, name, data = out
            assert isinstance(name, str) and isinstance(data, bytes)
            assert service._pack(kind, name, data) == payload


UNPACK = F.Fuzzer("cluster payloads (_unpack)", [F.encoded(CLUSTER_PAYLOADS), F.raw_bytes(64)],
                  check_unpack)


@F.quick()
@given(UNPACK.strategy)
@example(b"")
@example(b"\x00")
@example(b"\x00\x05ab")
@example(b"\x00\x02\xc3\x28")
def test_fuzz_cluster_payload_unpack(payload):
    check_unpack(payload)


def test_fuzz_cluster_payload_unpack_batched():
    UNPACK.run(F.QUICK_BATCHED)


@pytest.mark.soak
def test_soak_fuzz_cluster_payload_unpack(report):
    UNPACK.run(soak.size(F.SOAK_INPUTS, 200), report)


@given(st.integers(0, 255), _domains, st.binary(max_size=300))
def test_cluster_payload_round_trip(kind, domain, data):
    assert service._unpack(service._pack(kind, domain, data)) == (kind, domain, data)


@given(HELLOS)
def test_hello_round_trip(h):
    raw = N.encode_hello(h)
    [(ftype, payload)] = N.FrameDecoder().feed(raw)
    assert ftype == N.HELLO and N.decode_hello(payload) == h


@F.quick(200)
@given(st.lists(FRAMES, min_size=1, max_size=5), st.data())
def test_frames_round_trip_any_split(frames, data):
    stream = b"".join(frames)
    got, err = _feed(data.draw(F.chunked(st.just(stream))))
    assert err is None
    assert [N.frame(t, p) for t, p in got] == frames


# ------------------------------------------------------------------ lengths

def test_huge_length_refused_from_the_header_alone():
    for length in (N.MAX_PAYLOAD + 1, 2 ** 31, 2 ** 32 - 1):
        with pytest.raises(N.RemoteProtocolError):
            N.FrameDecoder().feed(N.HEADER.pack(N.MAGIC, N.MSG, 0, length))


@F.quick(300)
@given(st.sampled_from([N.HELLO, N.AUTH, N.MSG, 9]),
       st.integers(0, N.MAX_PAYLOAD) | st.sampled_from([N.MAX_PAYLOAD + 1, 2 ** 32 - 1]),
       st.binary(max_size=4096))
def test_length_claims_allocate_only_what_arrived(ftype, length, body):
    data = N.HEADER.pack(N.MAGIC, ftype, 0, length) + body
    with F.time_limit():
        _, peak = F.peak_alloc(lambda: F.expect(ERR, N.FrameDecoder().feed, data))
    assert peak <= 6 * len(data) + 64 * 1024, f"{peak} bytes for {len(data)} received"


def test_many_frames_and_tiny_pieces_take_linear_time():
    def many(n):
        raw = N.frame(N.PING) * n
        t0 = time.perf_counter()
        assert len(N.FrameDecoder().feed(raw)) == n
        return time.perf_counter() - t0

    def tiny(n):
        raw = N.frame(N.MSG, b"x" * n)
        dec = N.FrameDecoder()
        t0 = time.perf_counter()
        got = []
        for i in range(0, len(raw), 2):
            got += dec.feed(raw[i:i + 2])
        assert len(got) == 1
        return time.perf_counter() - t0
    F.assert_linear(many, 4000)
    F.assert_linear(tiny, 8000)
