import os
import random

import pytest
from hypothesis import given, strategies as st

from replfs.blockrepl.proto import packets as P

SAMPLES = [
    P.Hello.make(1, b"n" * 16, "r0", "alpha"),
    P.Auth(b"m" * 32),
    P.Params(b"C", 1, 0, 1, 8, 3, 1 << 30, 7, 11, 12, 13, 14, 15),
    P.Data(5, 2, 8192, b"x" * 5000),
    P.WriteAck(5), P.RecvAck(6), P.NegAck(7, 5), P.Flush(1), P.FlushAck(1),
    P.Ping(3), P.PingAck(3), P.BitmapChunk(0, 1, b"abc"), P.SyncStart(9, 100, 1),
    P.ResyncData(4096, b"y" * 4096), P.ResyncAck(4096, 4096), P.SyncDone(9),
    P.SyncDoneAck(), P.VerifyRequest(0, 8192, b"d" * 32), P.VerifyReply(0, 8192, b"\x02"),
    P.Goodbye(), P.Refuse(b"no"), P.ReadRequest(1, 4096, 8192), P.ReadReply(1, b"z" * 10),
    P.OutOfSync(0, 4096), P.RoleRequest(1, 1), P.RoleReply(1, -1),
    P.Params(b"C", 0, 0, 2, 8, 0, 1 << 20, 7, 11, 12, 13, 14, 0, b"sha256"),
    P.DataDigest(b"g" * 20), P.SyncPause(1), P.SyncPause(0),
    P.ResyncCsum(8192, 8192, b"md5", b"c" * 32), P.ResyncCsumReply(8192, 8192, b"\x01"),
]


def test_every_packet_round_trips_through_any_split():
    stream = b"".join(P.encode(p) for p in SAMPLES)
    rnd = random.Random(1)
    for _ in range(20):
        dec = P.Decoder()
        got = []
        pos = 0
        while pos < len(stream):
            n = rnd.randint(1, 300)
            dec.receive_data(stream[pos:pos + n])
            pos += n
            while (pkt := dec.next_packet()) is not None:
                got.append(pkt)
        assert got == SAMPLES


def test_split_at_every_point():
    data = P.encode(P.Data(1, 1, 0, b"abc")) + P.encode(P.Ping(2))
    for cut in range(len(data) + 1):
        dec = P.Decoder()
        dec.receive_data(data[:cut])
        first = dec.next_packet()
        dec.receive_data(data[cut:])
        rest = []
        while (p := dec.next_packet()) is not None:
            rest.append(p)
        assert ([first] if first else []) + rest == [P.Data(1, 1, 0, b"abc"), P.Ping(2)]


def test_malformed_input_raises_remote_protocol_error_only():
    for bad in (b"\x00\x00\x01\x00\x00\x00\x00\x00",                 # bad magic
                P.HEADER.pack(P.MAGIC, 250, 0, 0),                   # unknown type
                P.HEADER.pack(P.MAGIC, P.Ping.TYPE, 0, 3) + b"abc",  # wrong size
                P.HEADER.pack(P.MAGIC, P.Data.TYPE, 0, 2**31)):      # too large
        dec = P.Decoder()
        dec.receive_data(bad)
        with pytest.raises(P.RemoteProtocolError):
            dec.next_packet()


@given(st.binary(max_size=200))
def test_fuzz_random_bytes_never_crash(data):
    dec = P.Decoder()
    dec.receive_data(data)
    try:
        while dec.next_packet() is not None:
            pass
    except P.RemoteProtocolError:
        pass


def test_closed_mid_packet_is_an_error():
    dec = P.Decoder()
    dec.receive_data(P.encode(P.Ping(1))[:5])
    dec.receive_data(b"")
    with pytest.raises(P.RemoteProtocolError):
        dec.next_packet()


def test_pure_cores_import_no_io_modules():
    import ast
    root = os.path.join(os.path.dirname(P.__file__), "..")
    forbidden = {"trio", "socket", "time", "os", "random", "asyncio", "threading"}
    for sub in ("core", "proto"):
        folder = os.path.join(root, sub)
        for name in os.listdir(folder):
            if not name.endswith(".py"):
                continue
            tree = ast.parse(open(os.path.join(folder, name)).read())
            for node in ast.walk(tree):
                mods = []
                if isinstance(node, ast.Import):
                    mods = [a.name.split(".")[0] for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    mods = [node.module.split(".")[0]]
                assert not (set(mods) & forbidden), f"{sub}/{name} imports {mods}"
