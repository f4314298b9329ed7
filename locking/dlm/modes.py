"""Lock modes and the VMS/DLM compatibility matrix.

    NL  null             holds a place, blocks nobody
    CR  concurrent read  others may do anything but take EX
    CW  concurrent write others may read/write concurrently, no PR/PW/EX
    PR  protected read   shared readers, no writers
    PW  protected write  one writer, concurrent CR readers allowed
    EX  exclusive        nobody else but NL

The integer order is the conventional "strength" order; it is not a
lattice (CW and PR are incomparable), so code must use ``compatible``
and ``covers`` rather than ``<`` to reason about conflicts.
"""
from __future__ import annotations

from enum import IntEnum


class Mode(IntEnum):
    NL = 0
    CR = 1
    CW = 2
    PR = 3
    PW = 4
    EX = 5


NL, CR, CW, PR, PW, EX = Mode.NL, Mode.CR, Mode.CW, Mode.PR, Mode.PW, Mode.EX

# Row = mode held, column = mode requested; True = may be granted together.
_MATRIX = {
    NL: {NL: 1, CR: 1, CW: 1, PR: 1, PW: 1, EX: 1},
    CR: {NL: 1, CR: 1, CW: 1, PR: 1, PW: 1, EX: 0},
    CW: {NL: 1, CR: 1, CW: 1, PR: 0, PW: 0, EX: 0},
    PR: {NL: 1, CR: 1, CW: 0, PR: 1, PW: 0, EX: 0},
    PW: {NL: 1, CR: 1, CW: 0, PR: 0, PW: 0, EX: 0},
    EX: {NL: 1, CR: 0, CW: 0, PR: 0, PW: 0, EX: 0},
}

# Modes whose holder may write the lock value block on release.
LVB_WRITER_MODES = frozenset({PW, EX})


def compatible(held: Mode, wanted: Mode) -> bool:
    return bool(_MATRIX[held][wanted])


def covers(stronger: Mode, weaker: Mode) -> bool:
    """True when every mode compatible with ``stronger`` is compatible with
    ``weaker``: converting from ``stronger`` to ``weaker`` can never block."""
    return all(compatible(m, weaker) for m in Mode if compatible(m, stronger))


def meet(a: Mode, b: Mode) -> Mode:
    """The strongest mode that both ``a`` and ``b`` cover (CR for CW and PR).

    A conversion between incomparable modes passes through it: the holder
    gives up what the new mode does not allow before it asks, so nobody
    can be granted something that conflicts with the old mode while the
    grant of the new one is still on its way.
    """
    common = [m for m in Mode if covers(a, m) and covers(b, m)]
    return next(m for m in common if all(covers(m, o) for o in common))
