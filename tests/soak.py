"""How big a soak test runs.

Soak tests (``@pytest.mark.soak``) run at full size under ``make soak``.
``make soak-smoke`` (pytest ``--soak-smoke``, or REPLFS_SOAK_SMOKE=1 in
the environment) runs each of them once at its smallest size, so CI sees
a soak test that no longer works on the next submission rather than on
the next full soak.  Every soak test takes its sizes from here:

* ``seeds(range(...))`` for its seed parameter: one seed in smoke mode
  (tests/conftest.py also keeps only the first parameter set of every
  soak test, so a test that forgets still runs once);
* ``size(full, smoke)`` for counts (operations, steps, entries, cuts).
"""
from __future__ import annotations

import os

ENV = "REPLFS_SOAK_SMOKE"


def smoke() -> bool:
    return os.environ.get(ENV, "") not in ("", "0")


def size(full, smallest):
    """``full`` under make soak, ``smallest`` under make soak-smoke."""
    return smallest if smoke() else full


def seeds(full) -> list:
    full = list(full)
    return full[:1] if smoke() else full
