"""The DLM wire codec: round trips, frames split anywhere, garbage in."""
import ast
import pathlib
import random

import pytest
from hypothesis import given, settings, strategies as st

from replfs.locking.dlm import messages as m
from replfs.locking.dlm.modes import Mode

modes = st.sampled_from(list(Mode))
lvbs = st.binary(min_size=m.LVB_LEN, max_size=m.LVB_LEN)
u64 = st.integers(0, 2**64 - 1)
names = st.text(max_size=40)

MESSAGES = st.one_of(
    st.builds(m.LockRequest, u64, names, u64, modes, st.integers(0, 255)),
    st.builds(m.ConvertRequest, u64, names, u64, modes, st.integers(0, 255),
              st.none() | lvbs, u64),
    st.builds(m.UnlockRequest, u64, names, u64, st.none() | lvbs, u64),
    st.builds(m.CancelRequest, u64, names, u64),
    st.builds(m.GrantMsg, u64, names, u64, modes, lvbs, u64, st.booleans()),
    st.builds(m.BastMsg, u64, names, u64, modes),
    st.builds(m.RefuseMsg, u64, names, u64, st.integers(0, 255)),
    st.builds(m.LockReport, u64, names, u64, st.none() | modes, st.none() | modes,
              st.integers(0, 255), lvbs, u64, st.booleans()),
    st.builds(m.LvbReport, u64, names, lvbs, u64, st.booleans(), st.booleans()),
    st.builds(m.RecoveryDone, u64, st.booleans()),
)


@given(MESSAGES)
def test_round_trip(msg):
    assert m.decode(m.encode(msg)) == msg


@settings(max_examples=60)
@given(st.lists(MESSAGES, min_size=1, max_size=4))
def test_stream_split_at_every_point(msgs):
    stream = b"".join(m.encode(x) for x in msgs)
    for cut in range(len(stream) + 1):
        dec = m.FrameDecoder()
        got = dec.feed(stream[:cut]) + dec.feed(stream[cut:])
        assert got == msgs
        assert dec.pending == 0


def test_byte_at_a_time():
    msgs = [m.LockRequest(1, "inode:42", 7, Mode.EX), m.RecoveryDone(3, False)]
    dec = m.FrameDecoder()
    got = []
    for b in b"".join(m.encode(x) for x in msgs):
        got += dec.feed(bytes([b]))
    assert got == msgs


def _feed_all(data: bytes):
    dec = m.FrameDecoder()
    try:
        dec.feed(data)
    except m.RemoteProtocolError:
        return "error"
    return "ok"


@settings(max_examples=500)
@given(st.binary(max_size=300))
def test_random_bytes_only_raise_remote_protocol_error(data):
    _feed_all(data)


def test_mutated_frames_only_raise_remote_protocol_error():
    rng = random.Random(7)
    base = [m.encode(x) for x in (
        m.GrantMsg(5, "r", 1, Mode.PR, bytes(64), 9, True),
        m.LockReport(5, "rés", 2, None, Mode.EX, 1, bytes(64), 0, False),
        m.ConvertRequest(1, "x", 3, Mode.NL, 0, None, 0))]
    outcomes = set()
    for _ in range(3000):
        frame = bytearray(rng.choice(base))
        for _ in range(rng.randint(1, 3)):
            frame[rng.randrange(len(frame))] = rng.randrange(256)
        outcomes.add(_feed_all(bytes(frame)))
    assert outcomes == {"ok", "error"}


@pytest.mark.parametrize("frame, why", [
    (b"\x00\x00\x00\x00", "length 0"),
    (b"\xff\xff\xff\xff", "outside"),
    (b"\x00\x00\x00\x01\x63", "unknown message type"),
    (b"\x00\x00\x00\x0a\x0a" + bytes(8) + b"\x05", "boolean"),
    (b"\x00\x00\x00\x0b\x0a" + bytes(9) + b"\x00", "stray"),
    (b"\x00\x00\x00\x08\x0a" + bytes(7), "middle of a field"),
])
def test_specific_garbage(frame, why):
    with pytest.raises(m.RemoteProtocolError, match=why):
        m.FrameDecoder().feed(frame)


def test_bad_mode_and_bad_utf8():
    good = bytearray(m.encode(m.BastMsg(1, "ab", 2, Mode.EX)))
    bad_mode = bytes(good[:-1]) + b"\x06"
    with pytest.raises(m.RemoteProtocolError, match="mode"):
        m.decode(bad_mode)
    name_at = 4 + 1 + 8 + 2
    bad_name = bytes(good[:name_at]) + b"\xff\xfe" + bytes(good[name_at + 2:])
    with pytest.raises(m.RemoteProtocolError, match="UTF-8"):
        m.decode(bad_name)


def test_decoder_stays_failed():
    dec = m.FrameDecoder()
    with pytest.raises(m.RemoteProtocolError):
        dec.feed(b"\x00\x00\x00\x00")
    with pytest.raises(m.RemoteProtocolError):
        dec.feed(m.encode(m.RecoveryDone(1)))


def test_encoding_checks_local_misuse():
    with pytest.raises(m.LocalProtocolError):
        m.encode(m.GrantMsg(1, "r", 1, Mode.EX, b"short", 0, True))
    with pytest.raises(m.LocalProtocolError):
        m.encode("not a message")


# ------------------------------------------------------------ purity

FORBIDDEN = {"trio", "socket", "time", "os", "random", "asyncio", "threading",
             "select", "selectors", "subprocess", "datetime"}
PURE = sorted((pathlib.Path(m.__file__).parent).glob("*.py")) + [
    pathlib.Path(m.__file__).parent.parent / "heartbeat" / "core.py"]


@pytest.mark.parametrize("path", PURE, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_pure_cores_import_no_io(path):
    tree = ast.parse(path.read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            imported.add(node.module.split(".")[0])
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("__import__", "open"):
            imported.add(f"call:{node.func.id}")
    bad = imported & (FORBIDDEN | {"call:__import__", "call:open"})
    assert not bad, f"{path} imports {sorted(bad)}"


def test_purity_check_can_fail(tmp_path):
    p = tmp_path / "x.py"
    p.write_text("import time\nfrom os import path\n")
    with pytest.raises(AssertionError):
        test_pure_cores_import_no_io(p)
