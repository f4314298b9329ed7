import random

import pytest
from hypothesis import given, strategies as st

from replfs.ipc import frames


def test_frames_round_trip_through_any_split():
    msgs = [({"id": 1, "op": "write", "off": 4096}, b"x" * 70000),
            ({"id": 2, "op": "ping"}, b""),
            ({"event": "bast", "lock": "a"}, b"lvb")]
    stream = b"".join(frames.encode(h, b) for h, b in msgs)
    rnd = random.Random(7)
    for _ in range(30):
        dec, got, pos = frames.FrameDecoder(), [], 0
        while pos < len(stream):
            n = rnd.randint(1, 5000)
            dec.receive_data(stream[pos:pos + n])
            pos += n
            while (fr := dec.next_frame()) is not None:
                got.append(fr)
        assert got == msgs


def test_encode_parts_is_encode():
    prefix, body = frames.encode_parts({"a": 1}, b"body")
    assert prefix + body == frames.encode({"a": 1}, b"body")


@pytest.mark.parametrize("bad", [
    frames.HEAD.pack(frames.MAX_HEADER + 1, 0),
    frames.HEAD.pack(2, 0) + b"{x",
    frames.HEAD.pack(2, 0) + b"[]",
])
def test_malformed_frames_raise_frame_error(bad):
    dec = frames.FrameDecoder()
    dec.receive_data(bad)
    with pytest.raises(frames.FrameError):
        dec.next_frame()


@given(st.binary(max_size=300))
def test_fuzz_never_crashes(data):
    dec = frames.FrameDecoder()
    dec.receive_data(data)
    try:
        while dec.next_frame() is not None:
            pass
    except frames.FrameError:
        pass
