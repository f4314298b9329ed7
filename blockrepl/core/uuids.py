"""Generation UUIDs and the sync decision made from them.

Each node keeps, in its meta-data, the generation identifiers of its data:

* current  — the generation the data is at now;
* bitmap   — the generation the on-disk bitmap counts changes from
             (0 when the bitmap is not tracking anything);
* history  — two older generations, newest first.

A new generation starts whenever a Primary writes while it cannot
replicate (peer gone): bitmap := current, current := fresh.  When a
resync finishes, the target takes the source's current generation and the
source retires its bitmap generation into history.

When two nodes connect, comparing the two sets tells what happened while
they were apart — nothing, one side moved on (bitmap resync), one side
moved on so far that the bitmap no longer covers it (full sync), both
moved on from a common point (split brain), or the data never had a
common ancestor (unrelated).  ``compare`` is that decision, pure.

UUIDs are 64-bit integers.  The lowest bit (``PRIMARY_BIT``) is a flag,
not part of the generation: as in DRBD, the bitmap UUID carries it when
the node was Primary at the moment its generation ended (the split; see
``with_new_current``), which after-sb's discard-younger-primary and
discard-older-primary read (core/splitbrain.py).  Comparisons mask it off.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

JUST_CREATED = 4          # current UUID of fresh meta-data, never a real generation
PRIMARY_BIT = 1
MASK = ~PRIMARY_BIT & 0xFFFF_FFFF_FFFF_FFFF
HISTORY_LEN = 2


@dataclass(frozen=True)
class Uuids:
    current: int = JUST_CREATED
    bitmap: int = 0
    history: tuple[int, ...] = field(default=(0,) * HISTORY_LEN)

    def __post_init__(self):
        if len(self.history) != HISTORY_LEN:
            raise ValueError("history must have exactly %d entries" % HISTORY_LEN)

    def with_new_current(self, fresh: int, *, was_primary: bool = False) -> "Uuids":
        """Start a new generation, tracking changes since the old one.

        ``was_primary``: this node was Primary when the old generation
        ended (when it lost its peer); recorded in the lowest bit of the
        bitmap UUID, as DRBD does.

        If the bitmap already tracks an older generation, keep that (and
        its flag): the bitmap then covers both generations' changes, which
        is what a later resync against the old peer needs.
        """
        fresh &= MASK
        if self.bitmap:
            return Uuids(fresh, self.bitmap, self.history)
        return Uuids(fresh, (self.current & MASK) | (PRIMARY_BIT if was_primary else 0),
                     self.history)

    def retire_bitmap(self) -> "Uuids":
        """After a completed resync as source: the bitmap generation is history."""
        if not self.bitmap:
            return self
        return Uuids(self.current, 0, (self.bitmap,) + self.history[:-1])

    def adopt(self, source_current: int) -> "Uuids":
        """After a completed resync as target: take the source's generation."""
        if (self.current & MASK) == (source_current & MASK):
            return Uuids(self.current, 0, self.history)
        hist = self.history
        if self.current != JUST_CREATED:
            hist = (self.current,) + self.history[:-1]
        return Uuids(source_current, 0, hist)

    def show(self) -> str:
        """The show-gi / dump-md spelling: current:bitmap:history1:history2."""
        return ":".join("%016X" % u for u in (self.current, self.bitmap) + self.history)


class Decision(enum.Enum):
    NO_SYNC = "no-sync"
    BITMAP_SOURCE = "bitmap-sync-source"      # I push the blocks my bitmap marks
    BITMAP_TARGET = "bitmap-sync-target"
    FULL_SOURCE = "full-sync-source"
    FULL_TARGET = "full-sync-target"
    SPLIT_BRAIN = "split-brain"
    UNRELATED = "unrelated-data"
    BOTH_FRESH = "both-just-created"          # nothing to sync; both Inconsistent

    @property
    def i_am_source(self) -> bool:
        return self in (Decision.BITMAP_SOURCE, Decision.FULL_SOURCE)

    @property
    def i_am_target(self) -> bool:
        return self in (Decision.BITMAP_TARGET, Decision.FULL_TARGET)

    @property
    def full(self) -> bool:
        return self in (Decision.FULL_SOURCE, Decision.FULL_TARGET)

    def mirrored(self) -> "Decision":
        """The same decision seen from the peer's side."""
        return _MIRROR[self]


_MIRROR = {
    Decision.NO_SYNC: Decision.NO_SYNC,
    Decision.BITMAP_SOURCE: Decision.BITMAP_TARGET,
    Decision.BITMAP_TARGET: Decision.BITMAP_SOURCE,
    Decision.FULL_SOURCE: Decision.FULL_TARGET,
    Decision.FULL_TARGET: Decision.FULL_SOURCE,
    Decision.SPLIT_BRAIN: Decision.SPLIT_BRAIN,
    Decision.UNRELATED: Decision.UNRELATED,
    Decision.BOTH_FRESH: Decision.BOTH_FRESH,
}


@dataclass(frozen=True)
class Side:
    """One node's inputs to the decision."""
    uuids: Uuids
    inconsistent: bool = False     # disk is Inconsistent (sync interrupted or fresh)
    crashed_primary: bool = False  # was Primary when it went down uncleanly
    primary: bool = False          # is Primary now
    oos_blocks: int = 0            # bits set in its bitmap
    name: str = ""                 # node name, the last tie-breaker
    outdated: bool = False         # disk is Outdated (it lost a fence-peer decision)
    failed: bool = False           # disk failed under its node since it was last in sync


def compare(me: Side, peer: Side) -> Decision:
    """Decide what must happen when ``me`` connects to ``peer``.

    The rules are checked in order; the first that matches wins.  They are
    symmetric: compare(a, b) == compare(b, a).mirrored().
    """
    mine, theirs = me.uuids, peer.uuids
    mc, pc = mine.current & MASK, theirs.current & MASK

    if mc == JUST_CREATED and pc == JUST_CREATED:
        return Decision.BOTH_FRESH
    if mc == JUST_CREATED:
        return Decision.FULL_TARGET
    if pc == JUST_CREATED:
        return Decision.FULL_SOURCE

    if mc == pc:
        # Same generation.  An interrupted resync leaves the target
        # Inconsistent with its bitmap marking what is still missing.
        if me.inconsistent and not peer.inconsistent:
            return Decision.BITMAP_TARGET
        if peer.inconsistent and not me.inconsistent:
            return Decision.BITMAP_SOURCE
        if me.failed != peer.failed:
            # A disk that failed under its node lost what its cache held and
            # could not record it: the other one has all it had, or more.
            return Decision.BITMAP_TARGET if me.failed else Decision.BITMAP_SOURCE
        # Blocks may differ although the generation is the same: a Primary
        # crashed with writes in flight (its activity-log extents), or online
        # verify found differences.  A node that is Primary now wins (its
        # view is what applications saw), then the crashed Primary, then
        # the lower node name.
        if me.crashed_primary or peer.crashed_primary or me.oos_blocks or peer.oos_blocks:
            # An Outdated disk never wins: it was fenced (its writes since
            # then failed), whatever its role or history.
            if me.outdated != peer.outdated:
                return Decision.BITMAP_TARGET if me.outdated else Decision.BITMAP_SOURCE
            if me.primary != peer.primary:
                return Decision.BITMAP_SOURCE if me.primary else Decision.BITMAP_TARGET
            if me.crashed_primary != peer.crashed_primary:
                return Decision.BITMAP_SOURCE if me.crashed_primary else Decision.BITMAP_TARGET
            return Decision.BITMAP_SOURCE if me.name < peer.name else Decision.BITMAP_TARGET
        return Decision.NO_SYNC

    mb, pb = mine.bitmap & MASK, theirs.bitmap & MASK
    ahead, behind = bool(mb and mb == pc), bool(pb and pb == mc)
    if ahead and behind:
        # Each claims to have moved on from the other's current data: a
        # history no real pair can produce.  Touch nothing.
        return Decision.SPLIT_BRAIN
    if ahead:
        return Decision.BITMAP_SOURCE
    if behind:
        return Decision.BITMAP_TARGET
    if mb and pb and mb == pb:
        return Decision.SPLIT_BRAIN

    mh = {h & MASK for h in mine.history if h}
    ph = {h & MASK for h in theirs.history if h}
    ahead, behind = pc in mh, mc in ph
    if ahead and behind:
        return Decision.SPLIT_BRAIN
    if ahead:
        return Decision.FULL_SOURCE
    if behind:
        return Decision.FULL_TARGET
    # A shared ancestor anywhere means both sides moved on from it.
    mine_all = mh | ({mb} if mb else set())
    theirs_all = ph | ({pb} if pb else set())
    if mine_all & theirs_all:
        return Decision.SPLIT_BRAIN
    return Decision.UNRELATED
