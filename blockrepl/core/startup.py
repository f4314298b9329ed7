"""Which `startup` timeout a boot-time wait for the peer uses.  Pure rules.

DRBD keeps three: ``wfc-timeout`` when the pair was whole before this node
went down, ``degr-wfc-timeout`` when this node was already a degraded
cluster (it was Primary, went down while it had no peer, and so may well
not find one now), and ``outdated-wfc-timeout`` when the peer was known to
be Outdated (it cannot become Primary meanwhile, so waiting long buys
nothing).  drbdsetup asks the kernel which case applies and then waits that
long; 0 means for ever.  replfs reads the same facts from its meta-data
(see ``kind_from_metadata``).
"""
from __future__ import annotations

from dataclasses import dataclass

WFC = "wfc-timeout"
DEGR = "degr-wfc-timeout"
OUTDATED = "outdated-wfc-timeout"
OPTIONS = (WFC, DEGR, OUTDATED)


def kind_from_metadata(*, primary_flag: bool, is_primary: bool, bitmap_uuid: int,
                       peer_outdated: bool) -> str:
    """The timeout that applies to a resource, from what its meta-data says.

    ``primary_flag`` is the superblock's Primary flag: set while the node
    is Primary, cleared when it is demoted, so a node that is Secondary now
    and still finds it set went down as Primary.  ``bitmap_uuid`` is
    non-zero while the node records writes its peer does not have -- a
    Primary without its peer.  Both together are DRBD's "crashed as a
    degraded Primary" (its primary indicator set, its connected indicator
    clear).  ``peer_outdated`` (the peer disk is known to be Outdated)
    takes precedence, as in DRBD.
    """
    if peer_outdated:
        return OUTDATED
    if primary_flag and not is_primary and bitmap_uuid:
        return DEGR
    return WFC


@dataclass(frozen=True)
class Choice:
    kind: str           # which option applies (WFC, DEGR or OUTDATED)
    seconds: int        # 0: for ever
    notes: tuple[str, ...] = ()


def _longer(a: int, b: int) -> bool:
    """Is a wait of a seconds longer than one of b (0 is for ever)?"""
    if a == 0:
        return b != 0
    return b != 0 and a > b


def effective(wfc: int, degr: int | None, outdated: int | None) -> tuple[dict[str, int],
                                                                          tuple[str, ...]]:
    """The three timeouts in force, and notes about values that were cut.

    As drbdsetup does: a degraded node never waits longer than a whole
    one, and one with an Outdated peer never longer than a degraded one.
    An option that is not set simply takes the value above it (drbdsetup
    gets there by cutting its default of 0, and says so every time).
    """
    notes = []
    if degr is None:
        degr = wfc
    elif _longer(degr, wfc):
        notes.append(f"{DEGR} ({_secs(degr)}) is longer than {WFC} ({_secs(wfc)}); "
                     f"using {_secs(wfc)}")
        degr = wfc
    if outdated is None:
        outdated = degr
    elif _longer(outdated, degr):
        notes.append(f"{OUTDATED} ({_secs(outdated)}) is longer than {DEGR} ({_secs(degr)}); "
                     f"using {_secs(degr)}")
        outdated = degr
    return {WFC: wfc, DEGR: degr, OUTDATED: outdated}, tuple(notes)


def choose(kind: str, wfc: int, degr: int | None = None, outdated: int | None = None) -> Choice:
    values, notes = effective(wfc, degr, outdated)
    return Choice(kind, values[kind], notes)


def _secs(n: int) -> str:
    return "for ever" if n == 0 else f"{n}s"
