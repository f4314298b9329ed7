"""What to do when two nodes meet after a split brain: DRBD 8.4's after-sb policies.

``uuids.compare`` says *that* both nodes changed the data while apart.
This module says what happens next, from the ``net`` options
``after-sb-0pri``, ``after-sb-1pri`` and ``after-sb-2pri`` (the one that
applies depends on how many of the two nodes are Primary now) and from
``--discard-my-data`` on either side:

* a policy that decides makes one node SyncSource and the other
  SyncTarget (a bitmap resync: the target's changes since the split are
  overwritten);
* otherwise ``--discard-my-data`` on exactly one node decides (manual
  recovery);
* otherwise the split brain stays unresolved and the connection is dropped.

The rules are DRBD 8.4's (drbd.conf(5), drbd_asb_recover_0p/1p/2p in
drbd_receiver.c), restated:

after-sb-0pri (also the "0pri decision" the other two may consult)
  disconnect               no decision.
  discard-younger-primary  keep the data of the node that was Primary when
                           the split happened; discard the one promoted
                           during it.  Undecided (both or neither were
                           Primary then) -> discard-least-changes.
  discard-older-primary    the opposite; the same fallback.
  discard-zero-changes     a node that changed nothing loses to one that
                           did; both changed nothing -> the tie-break;
                           both changed something -> no decision.
  discard-least-changes    the node with fewer out-of-sync blocks loses;
                           equal counts -> the tie-break.
  discard-local            this node loses (the peer's configuration must
  discard-remote           say the opposite: see Policies.mirrored).
  discard-node-NAME        (DRBD 8.3) the named node loses.
after-sb-1pri
  disconnect               no decision.
  consensus                the 0pri decision, only if it discards the
                           Secondary's data.
  violently-as0p           the 0pri decision, whoever loses.
  discard-secondary        the Secondary loses, always.
  call-pri-lost-after-sb   the 0pri decision; if it discards the Primary's
                           data, that Primary must give up its role
                           (``Resolution.pri_lost``) and runs the
                           ``pri-lost-after-sb`` handler if it cannot.
after-sb-2pri
  disconnect               no decision.
  violently-as0p           the 0pri decision.
  call-pri-lost-after-sb   the 0pri decision; the losing Primary as above.

"Was Primary when the split happened" is the lowest bit of a node's
bitmap UUID (the generation the split ended), as in DRBD: the driver sets
it when it starts a new generation (``uuids.PRIMARY_BIT``).

Where DRBD breaks a tie with its RESOLVE_CONFLICTS flag (set on one of
the two nodes when the connection is made), replfs uses the node names:
the node whose name sorts first keeps its data -- the same tie-break as
``uuids.compare``.  Both nodes know both names, so they agree.

``resolve`` is pure and symmetric: resolve(a, b, p, x, y) is the mirror
image of resolve(b, a, p.mirrored(), y, x) -- one node SyncSource and the
other SyncTarget, or both unresolved -- which the tests check for every
input.  (A Primary told to give up its role may fail to -- the device is
in use -- and then drops the connection: see ``Resolution.pri_lost``.)
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from .uuids import PRIMARY_BIT, Decision, Side

SOURCE = Decision.BITMAP_SOURCE        # sync from this node
TARGET = Decision.BITMAP_TARGET        # sync from the peer node
UNRESOLVED = Decision.SPLIT_BRAIN

AUTO_LINE = "Split-Brain detected, %d primaries, automatically solved. Sync from %s node"
MANUAL_LINE = "Split-Brain detected, manually solved. Sync from %s node"
UNRESOLVED_LINE = "Split-Brain detected but unresolved, dropping connection!"
FALLBACK_NOTE = ("Discard younger/older primary did not find a decision; "
                 "using discard-least-changes instead")

# The values each option takes (conf/options.py AFTER_SB has the same;
# a test keeps them equal).  discard-node-NAME is DRBD 8.3's spelling.
POLICIES_0PRI = ("disconnect", "discard-younger-primary", "discard-older-primary",
                 "discard-zero-changes", "discard-least-changes", "discard-local",
                 "discard-remote")
POLICIES_1PRI = ("disconnect", "consensus", "violently-as0p", "discard-secondary",
                 "call-pri-lost-after-sb")
POLICIES_2PRI = ("disconnect", "violently-as0p", "call-pri-lost-after-sb")
DISCARD_NODE = "discard-node-"


@dataclass(frozen=True)
class Policies:
    """This node's after-sb options (DRBD's defaults: disconnect)."""
    after_sb_0pri: str = "disconnect"
    after_sb_1pri: str = "disconnect"
    after_sb_2pri: str = "disconnect"

    def mirrored(self) -> "Policies":
        """The peer's options that agree with these: the same, except that
        discard-local on one node goes with discard-remote on the other
        (DRBD refuses any other pairing of those two)."""
        swap = {"discard-local": "discard-remote", "discard-remote": "discard-local"}
        return replace(self, after_sb_0pri=swap.get(self.after_sb_0pri, self.after_sb_0pri))


@dataclass(frozen=True)
class Resolution:
    """The outcome of a split brain, seen from one node."""
    decision: Decision      # SOURCE, TARGET, or UNRESOLVED (drop the connection)
    primaries: int          # how many of the two nodes are Primary (0, 1, 2)
    line: str               # DRBD's log line for the outcome
    manual: bool = False    # decided by --discard-my-data, not by a policy
    # This node is Primary and call-pri-lost-after-sb discards its data:
    # it must become Secondary before it is SyncTarget; if it cannot (the
    # device is in use), it runs the pri-lost-after-sb handler, stops its
    # users, and the split brain stays unresolved (``refused()``).
    pri_lost: bool = False
    notes: tuple[str, ...] = ()   # other things worth a warning in the log

    @property
    def resolved(self) -> bool:
        return self.decision is not UNRESOLVED

    def refused(self) -> "Resolution":
        """The outcome when this losing Primary cannot give up its role."""
        return Resolution(UNRESOLVED, self.primaries, UNRESOLVED_LINE, pri_lost=self.pri_lost,
                          notes=self.notes)


def was_primary_at_split(side: Side) -> bool:
    """Whether this node was Primary when the split happened (the flag
    its bitmap UUID carries; 0 when it has no bitmap UUID)."""
    return bool(side.uuids.bitmap & PRIMARY_BIT)


def _tie(me: Side, peer: Side) -> int:
    """The tie-break: the node whose name sorts first keeps its data."""
    if me.name == peer.name:
        return 0            # (two nodes never share a name; no way to agree)
    return 1 if me.name < peer.name else -1


def _least_changes(me: Side, peer: Side) -> int:
    if me.oos_blocks != peer.oos_blocks:
        return -1 if me.oos_blocks < peer.oos_blocks else 1
    return _tie(me, peer)


def _zero_changes(me: Side, peer: Side) -> int:
    if me.oos_blocks == 0 and peer.oos_blocks == 0:
        return _tie(me, peer)           # a resync of nothing
    if peer.oos_blocks == 0:
        return 1
    if me.oos_blocks == 0:
        return -1
    return 0


def decide_0pri(me: Side, peer: Side, policy: str) -> tuple[int, tuple[str, ...]]:
    """The after-sb-0pri decision: 1 keep mine (sync from me), -1 discard
    mine (sync from peer), 0 none; and notes for the log."""
    if policy in ("discard-younger-primary", "discard-older-primary"):
        mine, theirs = was_primary_at_split(me), was_primary_at_split(peer)
        if mine != theirs:
            older_wins = policy == "discard-younger-primary"
            return (1 if mine == older_wins else -1), ()
        return _least_changes(me, peer), (FALLBACK_NOTE,)
    if policy == "discard-zero-changes":
        return _zero_changes(me, peer), ()
    if policy == "discard-least-changes":
        return _least_changes(me, peer), ()
    if policy == "discard-local":
        return -1, ()
    if policy == "discard-remote":
        return 1, ()
    if policy.startswith(DISCARD_NODE):
        victim = policy[len(DISCARD_NODE):]
        if victim == me.name != peer.name:
            return -1, ()
        if victim == peer.name != me.name:
            return 1, ()
        return 0, ()
    if policy != "disconnect":
        return 0, (f"Configuration error: after-sb-0pri {policy}",)
    return 0, ()


def _decide_1pri(me: Side, peer: Side, pol: Policies) -> tuple[int, bool, tuple[str, ...]]:
    policy = pol.after_sb_1pri
    if policy == "disconnect":
        return 0, False, ()
    if policy == "discard-secondary":
        return (1 if me.primary else -1), False, ()
    if policy not in ("consensus", "violently-as0p", "call-pri-lost-after-sb"):
        return 0, False, (f"Configuration error: after-sb-1pri {policy}",)
    hg, notes = decide_0pri(me, peer, pol.after_sb_0pri)
    if policy == "consensus":
        # only if the 0pri decision discards the Secondary's data
        discards_secondary = (hg == -1 and not me.primary) or (hg == 1 and me.primary)
        return (hg if discards_secondary else 0), False, notes
    if policy == "call-pri-lost-after-sb":
        return hg, hg == -1 and me.primary, notes
    return hg, False, notes                     # violently-as0p


def _decide_2pri(me: Side, peer: Side, pol: Policies) -> tuple[int, bool, tuple[str, ...]]:
    policy = pol.after_sb_2pri
    if policy == "disconnect":
        return 0, False, ()
    if policy not in ("violently-as0p", "call-pri-lost-after-sb"):
        return 0, False, (f"Configuration error: after-sb-2pri {policy}",)
    hg, notes = decide_0pri(me, peer, pol.after_sb_0pri)
    return hg, policy == "call-pri-lost-after-sb" and hg == -1, notes


def resolve(me: Side, peer: Side, policies: Policies, *,
            discard_mine: bool = False, discard_peer: bool = False) -> Resolution:
    """The outcome of a split brain between ``me`` and ``peer`` (both as
    they were told to each other in the handshake), under this node's
    ``policies``, with ``--discard-my-data`` given here (``discard_mine``)
    and on the peer (``discard_peer``).

    As in DRBD, a policy that decides wins; --discard-my-data decides only
    what the policies leave open (on exactly one node; on both it does not).
    """
    primaries = int(me.primary) + int(peer.primary)
    if primaries == 0:
        hg, notes = decide_0pri(me, peer, policies.after_sb_0pri)
        pri_lost = False
    elif primaries == 1:
        hg, pri_lost, notes = _decide_1pri(me, peer, policies)
    else:
        hg, pri_lost, notes = _decide_2pri(me, peer, policies)
    if hg:
        return Resolution(SOURCE if hg > 0 else TARGET, primaries,
                          AUTO_LINE % (primaries, "this" if hg > 0 else "peer"),
                          pri_lost=pri_lost, notes=notes)
    if discard_mine and not discard_peer:
        return Resolution(TARGET, primaries, MANUAL_LINE % "peer", manual=True, notes=notes)
    if discard_peer and not discard_mine:
        return Resolution(SOURCE, primaries, MANUAL_LINE % "this", manual=True, notes=notes)
    return Resolution(UNRESOLVED, primaries, UNRESOLVED_LINE, notes=notes)
