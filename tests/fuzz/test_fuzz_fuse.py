"""Fuzzing the FUSE request parsers (replfs/fuse/proto.py).

Each read of /dev/fuse is one request; the session runs
``decode_header(view, n)``, ``body_of(view, header)`` and
``decode_args(opcode, body)`` on it (the body as a memoryview of the read
buffer, or as bytes for requests handled in their own task), and INIT's
arguments go to ``negotiate``.  Their only error is KernelProtocolError
(UnsupportedKernel is one); ``decode_args`` returns None for an opcode we
do not know.  Whatever decodes re-encodes (``encode_request``, the fake
kernel's encoder) to a request that decodes to the same arguments.
"""
from __future__ import annotations

import sys

import pytest
from hypothesis import example, given, strategies as st

from replfs.fuse import proto as FP
from replfs.fuse.proto import Opcode
from tests import soak
from tests.fuzz import fuzzlib as F

ERR = (FP.KernelProtocolError,)

u32, u64, s64 = F.uints("I"), F.uints("Q"), F.uints("q")
name = st.binary(min_size=1, max_size=40).map(lambda b: b.replace(b"\0", b"_"))
value = st.binary(max_size=200)


def _ops(ops, args):
    return st.tuples(st.sampled_from(ops), args)


ARGS = st.one_of(
    _ops([Opcode.LOOKUP, Opcode.UNLINK, Opcode.RMDIR, Opcode.REMOVEXATTR], st.builds(FP.Name, name)),
    _ops([Opcode.FORGET], st.builds(FP.Forget, u64)),
    _ops([Opcode.BATCH_FORGET], st.lists(st.tuples(u64, u64), max_size=8).map(
        lambda items: FP.BatchForget(tuple(items)))),
    _ops([Opcode.GETATTR], st.builds(FP.Getattr, u32, u64)),
    _ops([Opcode.SETATTR], st.builds(FP.Setattr, u32, u64, u64, u64, s64, s64, s64,
                                     u32, u32, u32, u32, u32, u32)),
    _ops([Opcode.READLINK, Opcode.STATFS, Opcode.DESTROY, Opcode.SYNCFS], st.just(FP.Empty())),
    _ops([Opcode.SYMLINK], st.builds(FP.Symlink, name, name)),
    _ops([Opcode.MKNOD], st.builds(FP.Mknod, u32, u32, u32, name)),
    _ops([Opcode.MKDIR], st.builds(FP.Mkdir, u32, u32, name)),
    _ops([Opcode.RENAME], st.builds(FP.Rename, u64, st.just(0), name, name)),
    _ops([Opcode.RENAME2], st.builds(FP.Rename, u64, u32, name, name)),
    _ops([Opcode.LINK], st.builds(FP.Link, u64, name)),
    _ops([Opcode.OPEN, Opcode.OPENDIR], st.builds(FP.Open, u32, u32)),
    _ops([Opcode.CREATE], st.builds(FP.Create, u32, u32, u32, u32, name)),
    _ops([Opcode.READ, Opcode.READDIR, Opcode.READDIRPLUS],
         st.builds(FP.Read, u64, u64, u32, u32, u64, u32)),
    _ops([Opcode.WRITE], st.builds(lambda fh, off, wf, lo, f, d: FP.Write(fh, off, len(d), wf, lo,
                                                                         f, d),
                                   u64, u64, u32, u64, u32, value)),
    _ops([Opcode.RELEASE, Opcode.RELEASEDIR], st.builds(FP.Release, u64, u32, u32, u64)),
    _ops([Opcode.FLUSH], st.builds(FP.Flush, u64, u64)),
    _ops([Opcode.FSYNC, Opcode.FSYNCDIR], st.builds(FP.Fsync, u64, u32)),
    _ops([Opcode.SETXATTR], st.builds(FP.Setxattr, u32, name, value)),
    _ops([Opcode.GETXATTR], st.builds(FP.Getxattr, u32, name)),
    _ops([Opcode.LISTXATTR], st.builds(FP.Listxattr, u32)),
    _ops([Opcode.INIT], st.builds(FP.Init, st.sampled_from([7, 7, 7, 6, 8]) | u32,
                                  st.integers(0, 40) | u32, u32, u32, u32)),
    _ops([Opcode.GETLK, Opcode.SETLK, Opcode.SETLKW],
         st.builds(FP.Lk, u64, u64, u64, u64, u32, u32, u32)),
    _ops([Opcode.ACCESS], st.builds(FP.Access, u32)),
    _ops([Opcode.INTERRUPT], st.builds(FP.Interrupt, u64)),
    _ops([Opcode.FALLOCATE], st.builds(FP.Fallocate, u64, u64, u64, u32)),
    _ops([Opcode.LSEEK], st.builds(FP.Lseek, u64, u64, u32)),
    _ops([Opcode.COPY_FILE_RANGE], st.builds(FP.CopyFileRange, u64, u64, u64, u64, u64, u64, u64)),
)
assert {op for op in FP.DECODERS} <= {op for op in Opcode}

REQUESTS = st.builds(lambda oa, unique, nodeid, ids: FP.encode_request(
    oa[0], oa[1], unique=unique, nodeid=nodeid, uid=ids[0], gid=ids[1], pid=ids[2]),
    ARGS, u64, u64, st.tuples(u32, u32, u32))
# opcodes we do not decode (ENOSYS), with any body
UNKNOWN_OPS = [op for op in range(0, 60) if op not in FP.DECODERS] + [2 ** 32 - 1]


def _fix_length(raw: bytes) -> bytes:
    """Put the real size in the header's length field (reaches the body parsers)."""
    if len(raw) < 4:
        return raw
    return len(raw).to_bytes(4, sys.byteorder) + raw[4:]       # native, as the kernel's


def _unknown(src, body: bytes) -> bytes:
    op = src.choice(UNKNOWN_OPS)
    return FP.IN_HEADER.pack(FP.IN_HEADER.size + len(body), op, 1, 1, 0, 0, 1, 0, 0) + body


SHAPES = [
    F.encoded(REQUESTS),                                        # length as it falls
    F.Shape(REQUESTS, lambda src, r: _fix_length(F.mutate(src, r))),
    F.Shape(REQUESTS, lambda src, r: _fix_length(r[:FP.IN_HEADER.size]
                                                 + F.mutate(src, r[FP.IN_HEADER.size:]))),
    F.Shape(value, _unknown),
    F.raw_bytes(80),
    F.Shape(st.none(), lambda src, _: _fix_length(src.binary(0, 120))),
]


def _decode(view):
    """What the session does with one read: (header, args) or the error."""
    h = F.expect(ERR, FP.decode_header, view, len(view))
    if isinstance(h, BaseException):
        return h
    body = F.expect(ERR, FP.body_of, view, h)
    if isinstance(body, BaseException):
        return body
    args = F.expect(ERR, FP.decode_args, h.opcode, body)
    if isinstance(args, BaseException):
        return args
    # the session hands some bodies over as bytes: same result
    assert FP.decode_args(h.opcode, bytes(body)) == args
    return h, args


def _same(a, b) -> bool:
    if isinstance(a, BaseException):
        return type(a) is type(b) and str(a) == str(b)
    return a == b


def check_request(raw: bytes) -> None:
    with F.time_limit():
        out = _decode(memoryview(bytearray(raw)))       # as the session reads it
        assert _same(out, _decode(raw))
        if isinstance(out, BaseException):
            return
        h, args = out
        assert h.length == len(raw)
        if args is None:
            assert h.opcode not in FP.DECODERS
            return
        # re-encoding what decoded gives a request with the same arguments
        again = FP.encode_request(h.opcode, args, unique=h.unique, nodeid=h.nodeid,
                                  uid=h.uid, gid=h.gid, pid=h.pid)
        h2 = FP.decode_header(again)
        assert FP.decode_args(h2.opcode, FP.body_of(again, h2)) == args
        if h.opcode == Opcode.INIT:
            neg = F.expect(ERR, lambda: FP.negotiate(args, want=0xFFFFFFFF))
            if not isinstance(neg, BaseException):
                FP.init_out(neg)


FUZZ = F.Fuzzer("FUSE requests (decode_header, body_of, decode_args, negotiate)", SHAPES,
                check_request)

_H = FP.IN_HEADER


@F.quick()
@given(FUZZ.strategy)
@example(b"")
@example(_H.pack(_H.size, Opcode.LOOKUP, 1, 1, 0, 0, 1, 0, 0))                # no NUL
@example(_H.pack(_H.size + 8, Opcode.BATCH_FORGET, 1, 1, 0, 0, 1, 0, 0)
         + FP.BATCH_FORGET_IN.pack(2 ** 32 - 1, 0))                            # 4 G entries
@example(_H.pack(_H.size + 40, Opcode.WRITE, 1, 1, 0, 0, 1, 0, 0)
         + FP.WRITE_IN.pack(0, 0, 2 ** 32 - 1, 0, 0, 0, 0))                    # 4 GiB of data
@example(_H.pack(_H.size, Opcode.GETATTR, 1, 1, 0, 0, 1, 0xFFFF, 0))          # extensions
@example(_H.pack(_H.size + 16, Opcode.INIT, 1, 1, 0, 0, 1, 0, 0)
         + FP.INIT_IN_COMPAT.pack(7, 30, 0, 0))                                # too old
def test_fuzz_fuse_request(raw):
    check_request(raw)


def test_fuzz_fuse_request_batched():
    FUZZ.run(F.QUICK_BATCHED)


@pytest.mark.soak
def test_soak_fuzz_fuse_request(report):
    FUZZ.run(soak.size(F.SOAK_INPUTS, 200), report)


# ------------------------------------------------------------------ round trips

@F.quick(300)
@given(ARGS, u64, u64)
def test_round_trip(op_args, unique, nodeid):
    op, args = op_args
    raw = FP.encode_request(op, args, unique=unique, nodeid=nodeid)
    view = memoryview(bytearray(raw))
    h = FP.decode_header(view, len(raw))
    assert (h.opcode, h.unique, h.nodeid, h.length) == (op, unique, nodeid, len(raw))
    assert FP.decode_args(op, FP.body_of(view, h)) == args


# ------------------------------------------------------------------ lengths

# (opcode, offset in the body of a count or size field, a valid body)
_CLAIMS = [
    (Opcode.BATCH_FORGET, 0, FP.BATCH_FORGET_IN.pack(1, 0) + FP.FORGET_ONE.pack(1, 1)),
    (Opcode.WRITE, 16, FP.WRITE_IN.pack(0, 0, 3, 0, 0, 0, 0) + b"abc"),
    (Opcode.SETXATTR, 0, FP.SETXATTR_IN_COMPAT.pack(3, 0) + b"user.a\0abc"),
    (Opcode.GETXATTR, 0, FP.GETXATTR_IN.pack(3, 0) + b"user.a\0"),
    (Opcode.READ, 16, FP.READ_IN.pack(0, 0, 4096, 0, 0, 0, 0)),
]


@F.quick(300)
@given(st.sampled_from(_CLAIMS), st.sampled_from(F.INTERESTING_INTS) | u32,
       st.binary(max_size=4096))
def test_count_and_size_claims_allocate_only_what_arrived(claim, n, extra):
    op, at, body = claim
    body = body[:at] + (n % 2 ** 32).to_bytes(4, sys.byteorder) + body[at + 4:] + extra
    raw = _H.pack(_H.size + len(body), op, 1, 1, 0, 0, 1, 0, 0) + body
    with F.time_limit():
        out, peak = F.peak_alloc(_decode, memoryview(raw))
    assert peak <= 4 * len(raw) + 64 * 1024, f"{peak} bytes for a request of {len(raw)}"
