"""Shared pieces of the decoder fuzzers (test_fuzz_conf, test_fuzz_ondisk,
test_fuzz_volume): mutations that start from a valid encoding, and the
two ways of driving them.

Text mutations (configuration files) work on characters, numbers, bare
words and lines; byte mutations (on-disk blocks) flip bits, overwrite
fields with the values that break decoders (0, all ones, the block size
and its neighbours, 2**31, 2**32 - 1, ...), truncate, extend and splice.
The caller may re-seal a mutated block (recompute its checksum) so that
the mutation reaches the decoder behind the CRC.

A mutator takes a ``Draws``: the choices it makes come either from
hypothesis (``HypDraws``, in ``make test``: shrinking, a failing input
printed small) or from a seeded ``random.Random`` (``RandDraws``, in
``make soak``: a million inputs per decoder take minutes, not hours; a
failure names the seed and the input, and REPLFS_FUZZ_SEED replays it).

Sizes: ``HYP`` hypothesis inputs plus ``RANDOM`` seeded-random ones per
decoder in ``make test``; ``SOAK`` seeded-random ones (and, for the
on-disk decoders, ``HYP_SOAK`` hypothesis ones) under ``make soak``
(``make soak-smoke`` and ``make test`` run the soak variants once, at
their smallest size).
"""
from __future__ import annotations

import os
import random
import re
import struct
import time

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from tests import soak

HYP = 200                          # hypothesis inputs per decoder, make test
HYP_SOAK = soak.size(5000, 20)     # the same under make soak (about 4 ms each)
RANDOM = 5000                      # seeded-random inputs per decoder, make test
SOAK = soak.size(1_000_000, 200)   # seeded-random inputs per decoder, make soak

# The seeded-random run of a decoder, as a parameter: RANDOM inputs in
# make test, SOAK under make soak.
SIZES = [pytest.param(RANDOM, id="random"),
         pytest.param(SOAK, id="soak", marks=pytest.mark.soak)]


def fuzz_settings(n: int):
    """Settings of every hypothesis fuzzer here: ``n`` inputs, no
    deadline, no example database (a failure prints its input; keep it
    as a regression example next to the test)."""
    return settings(max_examples=n, deadline=None, database=None,
                    suppress_health_check=list(HealthCheck), print_blob=True)


# ---------------------------------------------------------------- choices

class HypDraws:
    """Choices made by hypothesis (inside a @st.composite)."""

    def __init__(self, draw):
        self.draw = draw

    def int(self, lo: int, hi: int) -> int:
        return self.draw(st.integers(lo, hi))

    def pick(self, seq):
        return self.draw(st.sampled_from(seq))

    def coin(self) -> bool:
        return self.draw(st.booleans())

    def binary(self, lo: int, hi: int) -> bytes:
        return self.draw(st.binary(min_size=lo, max_size=hi))

    def text(self, hi: int) -> str:
        return self.draw(st.text(max_size=hi))


# Characters for RandDraws.text: ASCII, the specials of both grammars,
# line breaks str.splitlines() knows, digits int() refuses, and some
# other non-ASCII.
_ALPHABET = ([chr(c) for c in range(32, 127)] * 3 + list("\n\t\r\x00\x0b\x0c\x1c\x85")
             + ["\u2028", "\u2029", "\u00a0", "\ufeff", "é", "²", "١", "①", "\U0001f600"])


class RandDraws:
    """Choices made by a seeded random.Random (the soak runs)."""

    def __init__(self, rng: random.Random):
        self.rng = rng

    def int(self, lo: int, hi: int) -> int:
        # small values more often, as hypothesis does
        if hi - lo > 16 and self.rng.random() < 0.25:
            return lo + self.rng.randint(0, 16)
        return self.rng.randint(lo, hi)

    def pick(self, seq):
        return self.rng.choice(seq)

    def coin(self) -> bool:
        return self.rng.random() < 0.5

    def binary(self, lo: int, hi: int) -> bytes:
        return self.rng.randbytes(self.rng.randint(lo, hi))

    def text(self, hi: int) -> str:
        return "".join(self.rng.choice(_ALPHABET) for _ in range(self.rng.randint(0, hi)))


def hyp(mutator, *args):
    """A hypothesis strategy of ``mutator(draws, *args)``."""
    @st.composite
    def strategy(draw):
        return mutator(HypDraws(draw), *args)
    return strategy()


def soak_run(n: int, mutator, args: tuple, check) -> float:
    """Run ``check`` on ``n`` inputs of ``mutator(RandDraws, *args)``;
    returns inputs per second.  The seed comes from REPLFS_FUZZ_SEED or
    the clock, and a failure names it together with the input."""
    seed = int(os.environ.get("REPLFS_FUZZ_SEED") or time.time_ns() % (1 << 32))
    rng = random.Random(seed)
    draws = RandDraws(rng)
    t0 = time.monotonic()
    for i in range(n):
        x = mutator(draws, *args)
        try:
            check(x)
        except BaseException as e:
            raise AssertionError(f"input {i} of REPLFS_FUZZ_SEED={seed} failed "
                                 f"({type(e).__name__}: {e}); the input was {x!r}") from e
    return n / max(time.monotonic() - t0, 1e-9)


# ---------------------------------------------------------------- text

# Tokens and characters that matter to the configuration readers: the
# punctuation of both grammars, keywords, numbers that are too big for
# int() (4300+ digits) or for anything else, digits that str.isdigit()
# accepts but int() does not, every line break str.splitlines() knows.
TEXT_TOKENS = [
    "{", "}", ";", '"', "#", "\n", "\\", " ", "\t", "=", ":", "[", "]",
    "resource", "on", "include", "skip", "global", "common", "net", "disk", "syncer",
    "startup", "handlers", "options", "device", "address", "meta-disk",
    "flexible-meta-disk", "node-id", "protocol", "minor", "internal", "ipv4", "ipv6",
    "floating", "volume", "allow-two-primaries", "ping-int", "timeout", "al-extents",
    "resync-rate", "rate", "wfc-timeout", "fencing", "after-sb-0pri",
    "A", "B", "C", "yes", "no", "0", "1", "31", "32", "255", "65535", "65536", "7789",
    "4294967296", "18446744073709551616", "9" * 5000, "1" * 400 + "G", "1" * 400 + "k",
    "-1", "0x10", "1e9", "١٢", "²", "①", "٣M",
    "127.0.0.1:7789", "[::1]:7789", "[fe80::1%eth0]:1", "1.2.3.4:", ":7789", "[::1]",
    "/dev/drbd1", "/dev/drbd٣", "/dev/drbd" + "9" * 5000, "/tmp/x[3]", "[3]",
    "[" + "9" * 5000 + "]",
    "node:", "cluster:", "heartbeat:", "ip_port", "ip_address", "number", "name",
    "node_count", "heartbeat_mode", "region", "local", "global", "DEADBEEF",
    "O2CB_HEARTBEAT_THRESHOLD", "O2CB_IDLE_TIMEOUT_MS", "O2CB_KEEPALIVE_DELAY_MS",
    "O2CB_RECONNECT_DELAY_MS", "export ", "'", '""',
    "\r", "\r\n", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029",
    "\x00", "\u00a0", "\ufeff", "é",
]

# What a number of a seed is replaced with.
NUMBER_TOKENS = ["0", "1", "2", "31", "32", "254", "255", "256", "65535", "65536",
                 "4294967295", "4294967296", "18446744073709551616", "9" * 5000,
                 "9" * 4300, "1" * 400, "0" * 5000 + "1", "00", "-1", "+1", "1.5", "1e999",
                 "0x10", "١٢", "²", "①", "٣", "", " ", "1k", "1" * 400 + "M"]

_DIGITS = re.compile(r"\d+")
_WORDS = re.compile(r"[^\s{};\"#=]+")


def _piece(d) -> str:
    return d.pick(TEXT_TOKENS) if d.int(0, 3) else d.text(12)


_HUGE_NUMBERS = ["9" * 5000, "1" * 4301, "0" * 5000 + "7", "1" * 400, "1" * 400 + "M"]


def _number(d) -> str:
    k = d.int(0, 3)
    if k == 0:
        return d.pick(_HUGE_NUMBERS)
    if k == 1:
        return d.pick(NUMBER_TOKENS)
    return str(d.int(0, 1 << 70))


def mutate_text(d, seeds: list[str]) -> str:
    """A seed text with a few edits: insert, delete, replace, duplicate,
    truncate; replace a number or a bare word; insert, delete or swap
    lines."""
    text = d.pick(seeds)
    for _ in range(d.int(1, 5)):
        op = d.pick(["insert", "delete", "replace", "dup", "truncate", "line-insert",
                     "line-delete", "line-swap", "number", "number", "number", "token",
                     "token", "token"])
        n = len(text)
        if op == "insert":
            at = d.int(0, n)
            text = text[:at] + _piece(d) + text[at:]
        elif op == "delete" and n:
            at = d.int(0, n - 1)
            text = text[:at] + text[at + d.int(1, 40):]
        elif op == "replace" and n:
            at = d.int(0, n - 1)
            text = text[:at] + _piece(d) + text[at + d.int(1, 12):]
        elif op == "dup" and n:
            a = d.int(0, n - 1)
            b = min(n, a + d.int(1, 200))
            at = d.int(0, n)
            text = text[:at] + text[a:b] + text[at:]
        elif op == "truncate":
            text = text[:d.int(0, n)]
        elif op.startswith("line"):
            lines = text.split("\n")
            i = d.int(0, len(lines) - 1)
            if op == "line-insert":
                lines.insert(i, " ".join(_piece(d) for _ in range(d.int(0, 5))))
            elif op == "line-delete" and len(lines) > 1:
                del lines[i]
            elif op == "line-swap":
                j = d.int(0, len(lines) - 1)
                lines[i], lines[j] = lines[j], lines[i]
            text = "\n".join(lines)
        else:
            # replace one number (one bare word) of the text
            spans = [m.span() for m in (_DIGITS if op == "number" else _WORDS).finditer(text)]
            if spans:
                a, b = d.pick(spans)
                text = text[:a] + (_number(d) if op == "number" else _piece(d)) + text[b:]
    return text


def random_text(d) -> str:
    """Arbitrary text, or a soup of the tokens above."""
    if d.coin():
        return d.text(300)
    return " ".join(_piece(d) for _ in range(d.int(0, 40)))


def text_input(d, seeds: list[str]) -> str:
    """Mostly mutated seeds, sometimes arbitrary text."""
    return random_text(d) if d.int(0, 7) == 0 else mutate_text(d, seeds)


# ---------------------------------------------------------------- bytes

def interesting_values(size: int, block: int) -> list[int]:
    """Values for a ``size``-byte field that break decoders."""
    top = (1 << (8 * size)) - 1
    vals = {0, 1, 2, 3, 7, 8, 31, 32, 63, 64, 127, 128, 255, 256, 4095, 4096, 4097,
            block - 1, block, block + 1, block // 2, block * 8, block * 8 + 1,
            1 << 15, (1 << 16) - 1, 1 << 20, (1 << 31) - 1, 1 << 31, (1 << 32) - 1,
            1 << 32, (1 << 40), (1 << 63) - 1, 1 << 63, top, top - 1, top >> 1}
    return sorted({v & top for v in vals})


_INTERESTING = {(size, bs): interesting_values(size, bs)
                for size in (1, 2, 4, 8) for bs in (512, 1024, 2048, 4096, 8192, 32768)}


def struct_fields(fmt: struct.Struct, base: int) -> list[tuple[int, int]]:
    """(offset, size) of every integer field of ``fmt`` placed at ``base``."""
    out = []
    off = 0
    order = fmt.format[0] if fmt.format[0] in "<>!=@" else ""
    spec = fmt.format[len(order):]
    i = 0
    while i < len(spec):
        count = ""
        while spec[i].isdigit():
            count += spec[i]
            i += 1
        c = spec[i]
        i += 1
        k = int(count or 1)
        if c in "xs":
            off += k
            continue
        size = struct.calcsize(order + c)
        for _ in range(k):
            out.append((base + off, size))
            off += size
    return out


_SIZES = (1, 2, 4, 8)
_BYTE_OPS = ["flip", "field", "field", "field", "word", "zero", "random", "truncate",
             "extend", "splice"]


def mutate_block(d, seed: bytes, fields=(), header: int = 0) -> bytes:
    """``seed`` with one to four byte-level mutations.  ``fields`` are
    known (offset, size) integer fields (count and length fields above
    all): a field overwrite picks one of them.  Bytes below ``header``
    are left alone by everything but bit flips, truncation and the field
    overwrites, so that most inputs get past the signature check."""
    buf = bytearray(seed)
    bs = len(seed)
    for _ in range(d.int(1, 4)):
        op = d.pick(_BYTE_OPS)
        n = len(buf)
        if n == 0:
            break
        if op == "flip":
            for _ in range(d.int(1, 8)):
                at = d.int(0, n - 1)
                buf[at] ^= 1 << d.int(0, 7)
        elif op in ("field", "word"):
            if op == "field" and fields:
                off, size = d.pick(fields)
            else:
                size = d.pick(_SIZES)
                off = d.int(min(header, n - 1), n - 1)
            if off + size > n:
                continue
            if d.coin():
                vals = _INTERESTING.get((size, bs)) or interesting_values(size, bs)
                value = d.pick(vals)
            else:
                value = d.int(0, (1 << (8 * size)) - 1)
            buf[off:off + size] = value.to_bytes(size, "little")
        elif op == "zero":
            a = d.int(min(header, n - 1), n - 1)
            b = min(n, a + d.int(1, 512))
            buf[a:b] = bytes(b - a)
        elif op == "random":
            a = d.int(min(header, n - 1), n - 1)
            data = d.binary(1, 64)
            buf[a:a + len(data)] = data
            del buf[n:]
        elif op == "truncate":
            del buf[d.int(0, n):]
        elif op == "extend":
            buf += d.binary(0, 64)
        elif op == "splice":
            a = d.int(0, n - 1)
            b = min(n, a + d.int(1, 256))
            at = d.int(min(header, n - 1), n - 1)
            chunk = bytes(buf[a:b])
            buf[at:at + len(chunk)] = chunk
            del buf[n:]
    return bytes(buf)


def weight(obj, _depth: int = 0) -> int:
    """How many elements a decoded object holds (lists, dicts, bytes and
    the fields of dataclasses, recursively): a decoder that allocates
    after a count or length field rather than after what the block holds
    shows up as a weight far above the block's size."""
    if _depth > 6:
        return 0
    if isinstance(obj, (bytes, bytearray, str)):
        return len(obj)
    if isinstance(obj, dict):
        return len(obj) + sum(weight(k, _depth + 1) + weight(v, _depth + 1)
                              for k, v in obj.items())
    if isinstance(obj, (list, tuple, set, frozenset)):
        return len(obj) + sum(weight(v, _depth + 1) for v in obj)
    fields = getattr(obj, "__dataclass_fields__", None)
    if fields:
        return sum(weight(getattr(obj, f), _depth + 1) for f in fields)
    return 0
