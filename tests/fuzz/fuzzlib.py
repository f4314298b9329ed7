"""Shared machinery of the decoder fuzzers (tests/fuzz/).

Every decoder that reads bytes from outside the process is fuzzed against
one contract:

* it raises nothing but its documented error type(s) -- an IndexError,
  struct.error, UnicodeDecodeError, RecursionError, ... escaping is a bug
  (``expect`` returns the documented error and lets anything else fail
  the test);
* it never hangs: each input runs under ``time_limit`` (an interval timer
  that raises ``DecoderHang`` in the test);
* it never allocates by what a length field claims: ``peak_alloc``
  measures the peak of Python allocations (tracemalloc) while decoding,
  and the tests bound it by the bytes actually given to the decoder;
* what decodes re-encodes (where an encoder exists) and valid encodings
  round-trip.

Inputs start from valid encodings drawn by hypothesis and are mutated
(``mutate``): bit flips, "interesting" byte and integer overwrites in
both byte orders (so length fields claim 0, 2^31, 4 GiB ...),
truncations, deletions, insertions of random bytes and of long runs of
one byte (deep nesting, huge digit strings), splices of the input into
itself.  A ``Shape`` pairs a hypothesis strategy of valid values with how
to turn one into a fuzz input (encode it, mutate part of it, put back a
correct length prefix or checksum so the fuzzer gets past it).  Stream
decoders get the input cut into arbitrary pieces (``split``).

The mutations are written once against a ``Source`` of choices:

* ``Fuzzer.strategy``: every choice is a hypothesis draw, so a failure
  shrinks to a small input, to be kept as an ``@example``;
* ``Fuzzer.run``: hypothesis draws the valid value and a seed, and
  ``BATCH`` inputs are mutated from it with ``random.Random`` (a
  hypothesis example costs more than ten decodes, and one hypothesis run
  keeps every choice it made: about a gigabyte at a million inputs).
  Runs of ``CHUNK`` inputs each get their own hypothesis seed; a failure
  names the failing input itself and the seed.  REPLFS_FUZZ_SEED fixes
  the seeds (default: random, printed with the inputs/s).

``make test`` runs QUICK shrinkable examples and QUICK_BATCHED batched
inputs per decoder; ``make soak`` runs ``soak.size(SOAK_INPUTS, ...)``
batched inputs per decoder (``@pytest.mark.soak``) and prints inputs/s.
"""
from __future__ import annotations

import contextlib
import math
import os
import random
import signal
import struct
import time
import tracemalloc
from dataclasses import dataclass
from typing import Any, Callable

import hypothesis
from hypothesis import HealthCheck, settings, strategies as st

# ------------------------------------------------------------------ settings

#: inputs per decoder in ``make test``: shrinkable hypothesis examples,
#: then random batches (``Fuzzer.run``)
QUICK = 500
QUICK_BATCHED = 3000
#: inputs per decoder under ``make soak``
SOAK_INPUTS = 1_000_000
#: soak inputs mutated from one hypothesis example
BATCH = 32
#: soak inputs of one hypothesis run
CHUNK = 64_000
#: per-input hard time limit (s): a decoder that needs this long for one
#: small input is stuck (hypothesis' own deadline is off: a loaded CI
#: machine must not fail a test for a slow but finite run)
HANG_LIMIT = 5.0

_SUPPRESS = [HealthCheck.too_slow, HealthCheck.data_too_large,
             HealthCheck.filter_too_much, HealthCheck.large_base_example]


def quick(n: int = QUICK) -> settings:
    """hypothesis settings of a fuzz test in ``make test``."""
    return settings(max_examples=n, deadline=None, database=None,
                    suppress_health_check=_SUPPRESS)


# ------------------------------------------------------------------ guards

class DecoderHang(Exception):
    """One input took longer than HANG_LIMIT seconds to decode."""


@contextlib.contextmanager
def time_limit(seconds: float = HANG_LIMIT):
    """Raise DecoderHang in this (main) thread if the block runs too long."""
    def alarm(signum, frame):
        raise DecoderHang(f"decoding one input took more than {seconds} s")
    old = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def peak_alloc(fn, *args):
    """(result, peak bytes allocated by Python while running fn(*args))."""
    was_tracing = tracemalloc.is_tracing()
    if not was_tracing:
        tracemalloc.start()
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    try:
        result = fn(*args)
    finally:
        peak = tracemalloc.get_traced_memory()[1] - base
        if not was_tracing:
            tracemalloc.stop()
    return result, peak


def assert_linear(feed: Callable[[int], float], n: int, k: int = 16) -> None:
    """``feed(m)`` decodes an input of size m and returns the seconds it
    took: k times the input must take about k times as long (3k allowed;
    a decoder quadratic in the input, e.g. one copying what is left of its
    buffer per frame, takes k*k times as long)."""
    small = min(feed(n) for _ in range(3))
    big = min(feed(k * n) for _ in range(2))
    assert big < 3 * k * small + 0.05, (
        f"{big:.3f} s for {k} times the input that took {small:.4f} s")


def expect(errors: tuple[type[BaseException], ...], fn, *args):
    """fn(*args), or the documented error it raised (returned, not raised).

    Anything else propagates and fails the test with its traceback."""
    try:
        return fn(*args)
    except errors as e:
        return e


def uints(fmt: str) -> st.SearchStrategy[int]:
    """Any value of one struct integer format character."""
    size = struct.calcsize("=" + fmt)
    if fmt.islower():
        return st.integers(-(1 << (8 * size - 1)), (1 << (8 * size - 1)) - 1)
    return st.integers(0, (1 << (8 * size)) - 1)


# ------------------------------------------------------------------ sources of choices

class HypothesisSource:
    """Every choice a hypothesis draw (shrinkable)."""

    def __init__(self, draw):
        self._draw = draw

    def integer(self, lo: int, hi: int) -> int:
        return self._draw(st.integers(lo, hi))

    def choice(self, seq):
        return self._draw(st.sampled_from(seq))

    def boolean(self) -> bool:
        return self._draw(st.booleans())

    def binary(self, lo: int, hi: int) -> bytes:
        return self._draw(st.binary(min_size=lo, max_size=hi))


class RandomSource:
    """Every choice from random.Random (fast; the soak's batches)."""

    def __init__(self, rng: random.Random):
        self._rng = rng

    def integer(self, lo: int, hi: int) -> int:
        return self._rng.randint(lo, hi)

    def choice(self, seq):
        return seq[self._rng.randrange(len(seq))]

    def boolean(self) -> bool:
        return self._rng.random() < 0.5

    def binary(self, lo: int, hi: int) -> bytes:
        return self._rng.randbytes(self._rng.randint(lo, hi))


# ------------------------------------------------------------------ mutations

INTERESTING_8 = (0, 1, 0x7F, 0x80, 0xFE, 0xFF)
INTERESTING_INTS = (0, 1, 2, 7, 8, 0x7F, 0x80, 0xFF, 0x100, 0x3FF, 0x400, 0x401,
                    0x7FFF, 0x8000, 0xFFFF, 0x10000, 0x10001, 0x7FFFFFFF, 0x80000000,
                    0xFFFFFFFE, 0xFFFFFFFF, 0x100000000, 0x7FFFFFFFFFFFFFFF,
                    0x8000000000000000, 0xFFFFFFFFFFFFFFFF)
#: lengths of inserted runs of one byte: enough for nested JSON past the
#: recursion limit and integers past int_max_str_digits
RUN_LENGTHS = (2, 3, 16, 255, 256, 1025, 4400, 5000, 20000)
#: bytes that mean something to some codec (NUL, JSON brackets, digits, ...)
SPECIAL_BYTES = b"\x00\x01\xff\x7f\x80[{\"0123456789\\-.eE \xc0\xed\xf4"
OPS = ("flip", "byte", "int", "truncate", "delete", "insert", "run", "splice", "append")


def mutate(src, data: bytes, max_mutations: int = 4) -> bytes:
    """``data`` with up to ``max_mutations`` edits (none is allowed: the
    unmutated input is tested too)."""
    data = bytearray(data)
    for _ in range(src.integer(0, max_mutations)):
        op = src.choice(OPS)
        n = len(data)
        pos = src.integer(0, max(0, n - 1))
        if op == "flip" and n:
            data[pos] ^= 1 << src.integer(0, 7)
        elif op == "byte" and n:
            data[pos] = src.choice(INTERESTING_8) if src.boolean() else src.integer(0, 255)
        elif op == "int" and n:
            width = src.choice((1, 2, 4, 8))
            kind = src.choice(("interesting", "small", "any"))
            if kind == "interesting":
                v = src.choice(INTERESTING_INTS)
            elif kind == "small":               # near the input's own size
                v = src.integer(0, 2 * n + 16)
            else:
                v = src.integer(0, 2 ** 64 - 1)
            v = (v + src.choice((-1, 0, 0, 1))) % (1 << (8 * width))
            data[pos:pos + width] = v.to_bytes(width, src.choice(("little", "big")))
        elif op == "truncate":
            del data[src.integer(0, n):]
        elif op == "delete" and n:
            del data[pos:pos + src.integer(1, max(1, min(n - pos, 64)))]
        elif op == "insert":
            data[pos:pos] = src.binary(1, 16)
        elif op == "run":
            b = data[src.integer(0, n - 1)] if n and src.boolean() else src.choice(SPECIAL_BYTES)
            data[pos:pos] = bytes([b]) * src.choice(RUN_LENGTHS)
        elif op == "splice" and n:
            a = src.integer(0, n - 1)
            piece = bytes(data[a:a + src.integer(1, 64)])
            data[src.integer(0, n):src.integer(0, n)] = piece
        elif op == "append":
            data += src.binary(1, 64)
    return bytes(data)


def split(src, raw: bytes, max_pieces: int = 12) -> list[bytes]:
    """``raw`` cut at arbitrary points (at times a run of one-byte pieces;
    at times with empty pieces, which stream decoders must take too)."""
    cuts = {src.integer(0, len(raw)) for _ in range(src.integer(0, max_pieces))}
    if raw and src.boolean():
        a = src.integer(0, len(raw))
        cuts |= set(range(a, min(len(raw), a + 16)))
    out, prev = [], 0
    for c in sorted(cuts) + [len(raw)]:
        out.append(raw[prev:c])
        prev = c
    return out if src.boolean() else [c for c in out if c]


@st.composite
def chunked(draw, data: st.SearchStrategy[bytes], max_pieces: int = 12) -> list[bytes]:
    """A hypothesis strategy: bytes from ``data`` cut into pieces."""
    return split(HypothesisSource(draw), draw(data), max_pieces)


# ------------------------------------------------------------------ fuzzers

@dataclass(frozen=True)
class Shape:
    """Valid values, and how one becomes a fuzz input given a Source."""
    valid: st.SearchStrategy
    make: Callable[[Any, Any], bytes]


def encoded(valid: st.SearchStrategy[bytes], max_mutations: int = 4) -> Shape:
    """The plain shape: a valid encoding, mutated."""
    return Shape(valid, lambda src, raw: mutate(src, raw, max_mutations))


def raw_bytes(max_size: int) -> Shape:
    """Random bytes, no structure at all."""
    return Shape(st.none(), lambda src, _: src.binary(0, max_size))


class Fuzzer:
    """One decoder's fuzz inputs: ``strategy`` for make test, ``soak`` for
    make soak.  ``pieces``: the input is a list of pieces of a stream."""

    def __init__(self, name: str, shapes: list[Shape], check: Callable, *,
                 pieces: bool = False):
        self.name, self.shapes, self.check, self.pieces = name, shapes, check, pieces

        @st.composite
        def one(draw, shape):
            src = HypothesisSource(draw)
            return self._finish(src, shape.make(src, draw(shape.valid)))

        self.strategy = st.one_of([one(s) for s in shapes])

    def _finish(self, src, raw: bytes):
        return split(src, raw) if self.pieces else raw

    def run(self, total: int, report=None) -> float:
        """Check ``total`` inputs mutated in batches (see the module
        docstring); report and return inputs/s."""
        base_seed = soak_seed()
        count = 0
        examples = st.one_of([st.tuples(st.just(i), s.valid) for i, s in enumerate(self.shapes)])

        def body(example, seed):
            nonlocal count
            i, valid = example
            src = RandomSource(random.Random(seed))
            for _ in range(BATCH):
                x = self._finish(src, self.shapes[i].make(src, valid))
                count += 1
                try:
                    self.check(x)
                except BaseException as e:
                    if hasattr(e, "add_note"):
                        e.add_note(f"{self.name}: failing input {x!r}")
                    raise

        runs = max(1, math.ceil(total / CHUNK))
        per_run = max(1, math.ceil(total / runs / BATCH))
        t0 = time.perf_counter()
        for r in range(runs):
            test = hypothesis.given(examples, st.integers(0, 2 ** 64 - 1))(body)
            test = settings(max_examples=per_run, deadline=None, database=None,
                            suppress_health_check=_SUPPRESS)(test)
            test = hypothesis.seed(base_seed + r)(test)
            try:
                test()
            except BaseException as e:
                if hasattr(e, "add_note"):
                    e.add_note(f"{self.name}: run {r} of {runs}, hypothesis seed "
                               f"{base_seed + r} (REPLFS_FUZZ_SEED={base_seed} replays it)")
                raise
        dt = time.perf_counter() - t0
        rate = count / dt if dt else float("inf")
        if report is not None:
            report(f"fuzz {self.name}: {count:,} inputs in {dt:.1f} s = {rate:,.0f} inputs/s "
                   f"(REPLFS_FUZZ_SEED={base_seed})")
        return rate


def soak_seed() -> int:
    env = os.environ.get("REPLFS_FUZZ_SEED")
    return int(env) if env else random.SystemRandom().randrange(1 << 30)
