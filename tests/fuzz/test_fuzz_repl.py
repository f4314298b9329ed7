"""Fuzzing the replication packet codec (blockrepl/proto/packets.py).

The peer's bytes reach ``Decoder`` in whatever pieces TCP delivers; its
only error is RemoteProtocolError (the driver drops the connection on
it).  ``Hello.split_names`` parses the peer's names and raises the same.
"""
from __future__ import annotations

import re
import time

import pytest
from hypothesis import example, given, strategies as st

from replfs.blockrepl.proto import packets as P
from tests import soak
from tests.fuzz import fuzzlib as F

ERR = (P.RemoteProtocolError,)
TYPES = sorted(P._REGISTRY.values(), key=lambda c: c.TYPE)


def _field_strategies(cls):
    out = []
    for count, code in re.findall(r"(\d*)([a-zA-Z?])", cls.FIXED):
        if code == "s":
            out.append(st.binary(min_size=int(count or 1), max_size=int(count or 1)))
        elif code == "c":
            out.extend([st.binary(min_size=1, max_size=1)] * int(count or 1))
        else:
            out.extend([F.uints(code)] * int(count or 1))
    if cls.TAIL:
        out.append(st.binary(max_size=300))
    return out


PACKETS = st.one_of([st.builds(c, *_field_strategies(c)) for c in TYPES])
FRAMES = PACKETS.map(P.encode)


def _mutated_payload(src, pkt) -> bytes:
    """A mutated payload under a correct header (reaches from_payload)."""
    body = F.mutate(src, pkt.payload())
    return P.HEADER.pack(P.MAGIC, pkt.TYPE, 0, len(body)) + body


SHAPES = [F.encoded(FRAMES), F.Shape(PACKETS, _mutated_payload),
          F.encoded(st.lists(FRAMES, min_size=1, max_size=4).map(b"".join)),
          F.raw_bytes(64)]


def _decode_all(chunks: list[bytes], close: bool = False):
    """(packets with the bytes each came from, error or None)."""
    dec = P.Decoder()
    got = []
    # b"" is the end of the stream to this decoder: only at the end.
    for c in [c for c in chunks if c] + ([b""] if close else []):
        dec.receive_data(c)
        while True:
            before = dec.buffered
            pkt = F.expect(ERR, dec.next_packet)
            if pkt is None:
                break
            if isinstance(pkt, BaseException):
                return got, pkt
            assert dec.buffered < before, "a packet out of nothing"
            got.append(pkt)
    return got, None


def check_stream(chunks: list[bytes]) -> None:
    with F.time_limit():
        data = b"".join(chunks)
        whole, err = _decode_all([data])
        split, err2 = _decode_all(chunks)
        # Where the stream is cut changes nothing.
        assert split == whole
        assert (err is None) == (err2 is None), (err, err2)
        # What decodes re-encodes to the same frames (the reserved byte aside).
        pos = 0
        for pkt in whole:
            frame = P.encode(pkt)
            sent = bytearray(data[pos:pos + len(frame)])
            sent[3] = 0
            assert bytes(sent) == frame
            pos += len(frame)
            if isinstance(pkt, P.Hello):
                F.expect(ERR, pkt.split_names)
        # The connection closing leaves a whole stream or an error, no hang.
        closed, err3 = _decode_all(chunks, close=True)
        assert closed == whole
        if err is not None or pos != len(data):
            assert isinstance(err3, P.RemoteProtocolError)
        else:
            assert err3 is None


FUZZ = F.Fuzzer("replication packets (Decoder, Hello.split_names)", SHAPES, check_stream,
                pieces=True)


@F.quick()
@given(FUZZ.strategy)
@example([P.HEADER.pack(P.MAGIC, P.Data.TYPE, 0, 0xFFFFFFFF)])
@example([P.HEADER.pack(P.MAGIC, P.Params.TYPE, 0, 8) + b"\0" * 8])
@example([P.encode(P.Hello(1, b"n" * 16, b"a\0b\0c"))])
@example([P.encode(P.Hello(1, b"n" * 16, b"\xff\0b"))])
def test_fuzz_packet_stream(chunks):
    check_stream(chunks)


def test_fuzz_packet_stream_batched():
    FUZZ.run(F.QUICK_BATCHED)


@pytest.mark.soak
def test_soak_fuzz_packet_stream(report):
    FUZZ.run(soak.size(F.SOAK_INPUTS, 200), report)


# ------------------------------------------------------------------ round trips

@F.quick(200)
@given(st.lists(PACKETS, min_size=1, max_size=5), st.data())
def test_round_trip_any_split(pkts, data):
    stream = b"".join(P.encode(p) for p in pkts)
    chunks = data.draw(F.chunked(st.just(stream)))
    got, err = _decode_all(chunks, close=True)
    assert err is None and got == pkts


@F.quick(100)
@given(st.lists(st.one_of(PACKETS, st.builds(
    P.Data, st.integers(0, 2**63), st.integers(0, 2**63), st.integers(0, 2**40),
    st.integers(60_000, 300_000).map(lambda n: bytes([n % 251]) * n))), min_size=1, max_size=4),
    st.lists(st.integers(1, 200_000), min_size=1, max_size=12))
def test_round_trip_of_large_packets_in_any_pieces(pkts, cuts):
    """Large packets (gathered chunk by chunk, not in the buffer) come out
    whole, as bytes, between small ones, however the stream is cut."""
    stream = b"".join(P.encode(p) for p in pkts)
    chunks, pos, i = [], 0, 0
    while pos < len(stream):
        n = cuts[i % len(cuts)]
        chunks.append(stream[pos:pos + n])
        pos += n
        i += 1
    got, err = _decode_all(chunks, close=True)
    assert err is None and got == pkts
    assert all(type(g.data) is bytes for g in got if isinstance(g, P.Data))


@given(st.text(max_size=30).filter(lambda s: "\0" not in s),
       st.text(max_size=30).filter(lambda s: "\0" not in s))
def test_hello_names_round_trip(res, node):
    assert P.Hello.make(1, b"n" * 16, res, node).split_names() == (res, node)


# ------------------------------------------------------------------ lengths

def test_huge_length_refused_from_the_header_alone():
    for ptype in (P.Data.TYPE, P.Ping.TYPE, 250):
        for length in (P.MAX_PAYLOAD + 1, 2 ** 31, 2 ** 32 - 1):
            dec = P.Decoder()
            dec.receive_data(P.HEADER.pack(P.MAGIC, ptype, 0, length))
            with pytest.raises(P.RemoteProtocolError):
                dec.next_packet()


@F.quick(300)
@given(st.sampled_from(TYPES), st.integers(0, P.MAX_PAYLOAD) | st.sampled_from(
    [P.MAX_PAYLOAD, P.MAX_PAYLOAD + 1, 2 ** 32 - 1]), st.binary(max_size=4096))
def test_length_claims_allocate_only_what_arrived(cls, length, body):
    """A header claiming up to 4 GiB costs what was received, not what it claims."""
    data = P.HEADER.pack(P.MAGIC, cls.TYPE, 0, length) + body

    def run():
        dec = P.Decoder()
        dec.receive_data(data)
        return F.expect(ERR, dec.next_packet)

    with F.time_limit():
        _, peak = F.peak_alloc(run)
    assert peak <= 6 * len(data) + 64 * 1024, f"{peak} bytes for {len(data)} received"


def test_many_packets_and_tiny_pieces_take_linear_time():
    def many(n):
        raw = P.encode(P.Ping(1)) * n
        dec = P.Decoder()
        t0 = time.perf_counter()
        dec.receive_data(raw)
        got = 0
        while dec.next_packet() is not None:
            got += 1
        assert got == n
        return time.perf_counter() - t0

    def tiny(n):
        raw = P.encode(P.Data(1, 1, 0, b"x" * n))
        dec = P.Decoder()
        t0 = time.perf_counter()
        for i in range(0, len(raw), 2):
            dec.receive_data(raw[i:i + 2])
            pkt = dec.next_packet()
        assert pkt is not None
        return time.perf_counter() - t0
    F.assert_linear(many, 4000)
    F.assert_linear(tiny, 8000)
