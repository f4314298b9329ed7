"""DlmNode: one node's whole DLM state machine, sans IO.

Every method takes one event and returns the list of actions it causes:

    local calls   lock / convert / unlock / cancel (caller picks the lockid)
    network       receive(src, msg)
    membership    node_down(node) / node_up(node)
    time          tick(now)

    actions       SendMessage(to, msg)    carry msg to node ``to``
                  Grant(lockid, mode, lvb, lvb_valid)     the AST
                  Bast(lockid, blocked_mode)              please give way
                  Refuse(lockid, reason)  "EAGAIN" | "CANCELLED" | "ETIMEDOUT"

Messages a node addresses to itself never leave it: they are handled
inline, so a one-node cluster works without a network.

Mastery.  Each resource has one master, found without asking anyone: the
live member list is sorted and every member gets a score
``fnv1a64(name + NUL + member)``; the member with the highest score (ties
to the higher number) masters the resource.  This rendezvous hash needs no
directory lookups, is the same on every node that has the same member list,
and only moves the dead node's resources when a node dies.

Owner view.  The owner of a lock is the authority on what it holds: a
lock counts as held from the moment its Grant arrives; an unlock and a
down-conversion take effect on the owner at the moment of the call (the
caller has already stopped using the stronger mode), and the master
catches up when the message arrives.  Owners therefore never believe they
hold more than the master granted.

Recovery.  Every membership change starts a new epoch (a counter every
node advances on each node_down/node_up; the membership layer must
deliver the same changes in the same order everywhere).  Messages carry
their epoch: older ones are dropped, newer ones are kept until this node
catches up.  On a new epoch every node:

1. as a former master, sends each resource's LVB to its new master
   (marked invalid when a node that just died held it in PW or EX), and
   forgets all master state;
2. as an owner, resolves its pending cancels locally, then reports every
   lock (granted mode, requested mode, its LVB copy) and the last LVB it
   wrote on each resource to that resource's master;
3. sends RecoveryDone to every live node, saying whether its previous
   recovery had finished (if not, its silence about a resource proves
   nothing and the LVBs it mastered count as lost).

A master serves nothing until it has RecoveryDone from every live node;
then it rebuilds each resource from the reports (the LVB with the highest
sequence wins; if the old master died and no survivor holds a mode that
excludes writers, the LVB is marked invalid), grants what it can and
serves requests that arrived meanwhile.  Requests lost with the old epoch
are not resent: their owners reported them as still pending.

Driver contract (what a trio host must provide):

* Between two live members every message arrives, once and in order
  (one TCP connection per pair).  If a connection breaks and cannot be
  resumed without loss, the membership layer must declare one side dead
  (heartbeat + quorum, see heartbeat/core.py); the core never retries.
* Every node sees the same membership changes in the same order; a node
  that joins is built with the epoch the others reach on its node_up and
  then calls ``join()``.
* Messages from one connection go through one messages.FrameDecoder; a
  RemoteProtocolError means: drop that connection (and so, that peer).
* Actions are carried out in the order returned.

Known limits: masters keep every resource they ever saw (no purge yet),
owners remember the last LVB they wrote on every resource, and recovery
rebuilds every resource on every membership change, which is fine for
the two- to four-node clusters replfs targets.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional, Union

from .lockres import Blocking, Granted, LockResource, ZERO_LVB
from .messages import (
    FLAG_NOQUEUE, LVB_LEN, REASON_CANCELLED, REASON_NAMES, REASON_TIMEOUT,
    BastMsg, CancelRequest, ConvertRequest, GrantMsg, LocalProtocolError, LockReport,
    LockRequest, LvbReport, Message, RecoveryDone, RefuseMsg, UnlockRequest,
)
from .modes import CW, EX, LVB_WRITER_MODES, PR, PW, Mode, covers, meet


# ------------------------------------------------------------------ actions

@dataclass(frozen=True)
class SendMessage:
    to: int
    msg: Message


@dataclass(frozen=True)
class Grant:
    lockid: int
    mode: Mode
    lvb: bytes
    lvb_valid: bool


@dataclass(frozen=True)
class Bast:
    lockid: int
    blocked_mode: Mode


@dataclass(frozen=True)
class Refuse:
    lockid: int
    reason: str


Action = Union[SendMessage, Grant, Bast, Refuse]

# A survivor holding one of these proves no dead node held PW or EX.
_EXCLUDES_WRITERS = frozenset({CW, PR, PW, EX})

_FNV_OFFSET = 0xCBF29CE484222325
_FNV_PRIME = 0x100000001B3


def _fnv1a64(data: bytes) -> int:
    h = _FNV_OFFSET
    for b in data:
        h = ((h ^ b) * _FNV_PRIME) & 0xFFFFFFFFFFFFFFFF
    return h


def master_of(resource: str, members: Iterable[int]) -> int:
    """The master of ``resource`` among the live ``members`` (see module doc)."""
    ordered = sorted(members)
    if not ordered:
        raise LocalProtocolError("no live members")
    name = resource.encode("utf-8")
    return max(ordered, key=lambda m: (_fnv1a64(name + b"\0" + str(m).encode()), m))


@dataclass
class OwnedLock:
    lockid: int
    resource: str
    granted: Optional[Mode] = None
    requested: Optional[Mode] = None
    flags: int = 0
    lvb: bytes = ZERO_LVB
    lvb_seq: int = 0
    lvb_valid: bool = True
    deadline: Optional[float] = None
    cancel_reason: Optional[int] = None


@dataclass
class _Rebuild:
    locks: list            # (owner, LockReport)
    lvbs: list             # LvbReport


_MASTER_BOUND = (LockRequest, ConvertRequest, UnlockRequest, CancelRequest)


class DlmNode:
    def __init__(self, node_id: int, members: Iterable[int], epoch: int = 0):
        self.node_id = node_id
        self.members: frozenset[int] = frozenset(members) | {node_id}
        self.prev_members = self.members
        self.epoch = epoch
        self.locks: dict[int, OwnedLock] = {}
        self.mastered: dict[str, LockResource] = {}
        self._last_write: dict[str, tuple[int, bytes]] = {}
        self._now = 0.0
        self._out: list[Action] = []
        self._future: list[tuple[int, Message]] = []
        self.recovering = False
        self._held: list[tuple[int, Message]] = []
        self._rebuild: dict[str, _Rebuild] = {}
        self._done_from: set[int] = set()
        self._incomplete_from: set[int] = set()
        self.dropped_stale = 0
        self._master_cache: dict[str, int] = {}

    # ============================================================ local API
    def master_of(self, resource: str) -> int:
        m = self._master_cache.get(resource)
        if m is None:
            m = self._master_cache[resource] = master_of(resource, self.members)
        return m

    def lock(self, lockid: int, resource: str, mode: Mode, *, noqueue: bool = False,
             timeout: Optional[float] = None) -> list[Action]:
        """Ask for a new lock; answered later by Grant or Refuse for lockid.
        ``timeout`` counts from the last tick(now) seen."""
        if lockid in self.locks:
            raise LocalProtocolError(f"lock id {lockid} is already in use")
        mode = Mode(mode)
        flags = FLAG_NOQUEUE if noqueue else 0
        lk = OwnedLock(lockid, resource, None, mode, flags)
        if timeout is not None:
            lk.deadline = self._now + timeout
        self.locks[lockid] = lk
        self._to_master(resource, LockRequest(self.epoch, resource, lockid, mode, flags))
        return self._flush()

    def convert(self, lockid: int, mode: Mode, *, noqueue: bool = False,
                lvb: Optional[bytes] = None, timeout: Optional[float] = None) -> list[Action]:
        """Change a granted lock's mode.  A down-conversion is granted at
        once (a Grant comes back in the returned actions); ``lvb`` may be
        given only when leaving PW/EX for a weaker mode.  Between CW and PR,
        which do not cover each other, the lock drops to CR at once and
        stays there if the conversion is refused or cancelled."""
        lk = self._idle_lock(lockid, "convert")
        mode = Mode(mode)
        flags = FLAG_NOQUEUE if noqueue else 0
        down = covers(lk.granted, mode)
        seq = self._write_local_lvb(lk, lvb, allowed=down)
        msg = ConvertRequest(self.epoch, lk.resource, lockid, mode, flags, lvb, seq)
        if down:
            lk.granted = mode
            self._out.append(Grant(lockid, mode, lk.lvb, lk.lvb_valid))
        else:
            if not covers(mode, lk.granted):
                lk.granted = meet(lk.granted, mode)
            lk.requested = mode
            lk.flags = flags
            if timeout is not None:
                lk.deadline = self._now + timeout
        self._to_master(lk.resource, msg)
        return self._flush()

    def unlock(self, lockid: int, lvb: Optional[bytes] = None) -> list[Action]:
        """Release a granted lock, writing ``lvb`` if held in PW/EX.
        Refused locally while a request on the lock is pending (cancel first)."""
        lk = self._idle_lock(lockid, "unlock")
        seq = self._write_local_lvb(lk, lvb, allowed=True)
        del self.locks[lockid]
        self._to_master(lk.resource, UnlockRequest(self.epoch, lk.resource, lockid, lvb, seq))
        return self._flush()

    def cancel(self, lockid: int) -> list[Action]:
        """Withdraw a pending lock or up-conversion.  If the grant wins the
        race, the caller gets Grant instead of Refuse("CANCELLED")."""
        lk = self.locks.get(lockid)
        if lk is None or lk.requested is None:
            raise LocalProtocolError(f"lock id {lockid} has no pending request to cancel")
        self._send_cancel(lk, REASON_CANCELLED)
        return self._flush()

    def tick(self, now: float) -> list[Action]:
        """Advance time; pending requests past their deadline get cancelled."""
        self._now = now
        for lk in list(self.locks.values()):
            if (lk.requested is not None and lk.deadline is not None
                    and lk.deadline <= now and lk.cancel_reason is None):
                self._send_cancel(lk, REASON_TIMEOUT)
        return self._flush()

    def held_mode(self, lockid: int) -> Optional[Mode]:
        lk = self.locks.get(lockid)
        return None if lk is None else lk.granted

    # ============================================================ network
    def receive(self, src: int, msg: Message) -> list[Action]:
        if msg.epoch > self.epoch:
            self._future.append((src, msg))
        elif msg.epoch < self.epoch or src not in self.members:
            self.dropped_stale += 1
        else:
            self._dispatch(src, msg)
        return self._flush()

    # ============================================================ membership
    def join(self) -> list[Action]:
        """Call once on a node built with the epoch the others reach when they
        process node_up for it: it takes part in that epoch's recovery (it
        has nothing to report, but masters wait for its RecoveryDone)."""
        self.prev_members = self.members - {self.node_id}
        self.recovering = True
        self._done_from = set()
        self._incomplete_from = set()
        for m in sorted(self.members):
            self._send(m, RecoveryDone(self.epoch))
        return self._flush()

    def node_down(self, node: int) -> list[Action]:
        if node == self.node_id:
            raise LocalProtocolError("a node cannot see itself go down")
        if node in self.members:
            self._new_epoch(self.members - {node})
        return self._flush()

    def node_up(self, node: int) -> list[Action]:
        if node not in self.members:
            self._new_epoch(self.members | {node})
        return self._flush()

    # ============================================================ internals
    def _flush(self) -> list[Action]:
        out, self._out = self._out, []
        return out

    def _send(self, to: int, msg: Message) -> None:
        if to == self.node_id:
            self._dispatch(self.node_id, msg)
        else:
            self._out.append(SendMessage(to, msg))

    def _to_master(self, resource: str, msg: Message) -> None:
        self._send(self.master_of(resource), msg)

    def _idle_lock(self, lockid: int, verb: str) -> OwnedLock:
        lk = self.locks.get(lockid)
        if lk is None or lk.granted is None:
            raise LocalProtocolError(f"cannot {verb} lock id {lockid}: it is not granted")
        if lk.requested is not None:
            raise LocalProtocolError(
                f"cannot {verb} lock id {lockid}: a request on it is pending (cancel it first)")
        return lk

    def _write_local_lvb(self, lk: OwnedLock, lvb: Optional[bytes], allowed: bool) -> int:
        if lvb is None:
            return 0
        if len(lvb) != LVB_LEN:
            raise LocalProtocolError(f"an LVB is {LVB_LEN} bytes, got {len(lvb)}")
        if lk.granted not in LVB_WRITER_MODES or not allowed:
            raise LocalProtocolError(
                "the LVB can only be written when giving up a PW or EX lock")
        seq = lk.lvb_seq + 1
        lk.lvb, lk.lvb_seq, lk.lvb_valid = lvb, seq, True
        self._last_write[lk.resource] = (seq, lvb)
        return seq

    def _send_cancel(self, lk: OwnedLock, reason: int) -> None:
        lk.cancel_reason = reason
        self._to_master(lk.resource, CancelRequest(self.epoch, lk.resource, lk.lockid))

    def _dispatch(self, src: int, msg: Message) -> None:
        if isinstance(msg, _MASTER_BOUND):
            if self.recovering:
                self._held.append((src, msg))
            else:
                self._serve(src, msg)
        elif isinstance(msg, GrantMsg):
            self._on_grant(msg)
        elif isinstance(msg, BastMsg):
            lk = self.locks.get(msg.lockid)
            if lk is not None and lk.granted is not None and lk.resource == msg.resource:
                self._out.append(Bast(msg.lockid, msg.blocked_mode))
        elif isinstance(msg, RefuseMsg):
            self._on_refuse(msg)
        elif isinstance(msg, LockReport):
            self._rebuild_for(msg.resource).locks.append((src, msg))
        elif isinstance(msg, LvbReport):
            self._rebuild_for(msg.resource).lvbs.append(msg)
        elif isinstance(msg, RecoveryDone):
            self._done_from.add(src)
            if not msg.complete:
                self._incomplete_from.add(src)
            self._maybe_finish_recovery()

    # ------------------------------------------------------------ owner side
    def _on_grant(self, msg: GrantMsg) -> None:
        lk = self.locks.get(msg.lockid)
        if lk is None or lk.requested is None or lk.resource != msg.resource:
            return
        lk.granted, lk.requested = msg.mode, None
        lk.lvb, lk.lvb_seq, lk.lvb_valid = msg.lvb, msg.lvb_seq, msg.lvb_valid
        lk.deadline = lk.cancel_reason = None
        self._out.append(Grant(lk.lockid, msg.mode, msg.lvb, msg.lvb_valid))

    def _on_refuse(self, msg: RefuseMsg) -> None:
        lk = self.locks.get(msg.lockid)
        if lk is None or lk.requested is None or lk.resource != msg.resource:
            return
        reason = msg.reason
        if reason == REASON_CANCELLED and lk.cancel_reason == REASON_TIMEOUT:
            reason = REASON_TIMEOUT
        self._forget_request(lk)
        self._out.append(Refuse(lk.lockid, REASON_NAMES.get(reason, str(reason))))

    def _forget_request(self, lk: OwnedLock) -> None:
        if lk.granted is None:
            del self.locks[lk.lockid]
        else:
            lk.requested = None
            lk.deadline = lk.cancel_reason = None

    # ------------------------------------------------------------ master side
    def _resource(self, name: str) -> LockResource:
        res = self.mastered.get(name)
        if res is None:
            res = self.mastered[name] = LockResource(name)
            # Never written as far as we know; start its sequence in this
            # epoch so that no write from an earlier era can look newer.
            res.lvb_seq = self.epoch << 32
        return res

    def _serve(self, src: int, msg: Message) -> None:
        if self.master_of(msg.resource) != self.node_id:
            self.dropped_stale += 1  # cannot happen between nodes in the same epoch
            return
        res = self._resource(msg.resource)
        if isinstance(msg, LockRequest):
            results = res.request(src, msg.lockid, msg.mode, msg.flags)
        elif isinstance(msg, ConvertRequest):
            results = res.convert(src, msg.lockid, msg.mode, msg.flags, msg.lvb, msg.lvb_seq)
        elif isinstance(msg, UnlockRequest):
            results = res.unlock(src, msg.lockid, msg.lvb, msg.lvb_seq)
        else:
            results = res.cancel(src, msg.lockid)
        self._emit(res, results)

    def _emit(self, res: LockResource, results: list) -> None:
        for r in results:
            lock = r.lock
            if isinstance(r, Granted):
                m = GrantMsg(self.epoch, res.name, lock.lockid, r.mode,
                             res.lvb, res.lvb_seq, res.lvb_valid)
            elif isinstance(r, Blocking):
                m = BastMsg(self.epoch, res.name, lock.lockid, r.blocked_mode)
            else:
                m = RefuseMsg(self.epoch, res.name, lock.lockid, r.reason)
            self._send(lock.owner, m)

    # ------------------------------------------------------------ recovery
    def _rebuild_for(self, name: str) -> _Rebuild:
        rb = self._rebuild.get(name)
        if rb is None:
            rb = self._rebuild[name] = _Rebuild([], [])
        return rb

    def _new_epoch(self, members: frozenset) -> None:
        complete = not self.recovering
        if self.recovering:
            # A second change before the first recovery ended.  The reports
            # heard so far are incomplete, so no lock state may come of them
            # (a grant from half a picture could break exclusion); only the
            # newest LVB heard is kept, marked invalid, to pass on below.
            for name, rb in self._rebuild.items():
                res = self._resource(name)
                self._settle_lvb(res, rb, trust_lvb=False)
            self.recovering = False
        self.prev_members, self.members = self.members, frozenset(members)
        self._master_cache = {}
        self.epoch += 1
        self.recovering = True
        self._held = []
        self._rebuild = {}
        self._done_from = set()
        self._incomplete_from = set()
        dead = self.prev_members - self.members

        old_mastered, self.mastered = self.mastered, {}
        for name, res in old_mastered.items():
            dead_writer = any(l.owner in dead and l.granted in LVB_WRITER_MODES
                              for l in res.locks.values())
            self._to_master(name, LvbReport(self.epoch, name, res.lvb, res.lvb_seq,
                                            res.lvb_valid and not dead_writer, True))
        for lk in list(self.locks.values()):
            if lk.requested is not None and lk.cancel_reason is not None:
                reason = lk.cancel_reason
                self._forget_request(lk)
                self._out.append(Refuse(lk.lockid, REASON_NAMES[reason]))
                if lk.granted is None:
                    continue
            self._to_master(lk.resource, LockReport(
                self.epoch, lk.resource, lk.lockid, lk.granted, lk.requested, lk.flags,
                lk.lvb, lk.lvb_seq, lk.lvb_valid))
        for name, (seq, lvb) in self._last_write.items():
            self._to_master(name, LvbReport(self.epoch, name, lvb, seq, True, False))
        for m in sorted(self.members):
            self._send(m, RecoveryDone(self.epoch, complete))
        future, self._future = self._future, []
        for src, msg in future:
            if msg.epoch == self.epoch:
                self._dispatch(src, msg)
            elif msg.epoch > self.epoch:
                self._future.append((src, msg))

    def _maybe_finish_recovery(self) -> None:
        if not self.recovering or not self.members <= self._done_from:
            return
        self._finish_rebuild()
        held, self._held = self._held, []
        for src, msg in held:
            self._serve(src, msg)

    def _finish_rebuild(self) -> None:
        self.recovering = False
        rebuild, self._rebuild = self._rebuild, {}
        for name, rb in rebuild.items():
            res = self._resource(name)
            for owner, rep in rb.locks:
                if owner in self.members:
                    res.add_recovered(owner, rep.lockid, rep.granted, rep.requested, rep.flags)
            self._settle_lvb(res, rb, trust_lvb=True)
            self._emit(res, res.refuse_blocked_noqueue() + res.process())

    def _settle_lvb(self, res: LockResource, rb: _Rebuild, trust_lvb: bool) -> None:
        cands = [(r.lvb_seq, r.lvb, r.lvb_valid) for r in rb.lvbs]
        cands += [(rep.lvb_seq, rep.lvb, rep.lvb_valid) for _, rep in rb.locks
                  if rep.granted is not None]
        heard_master = any(r.from_master for r in rb.lvbs)
        old_master = master_of(res.name, self.prev_members)
        old_master_alive = old_master in self.members and old_master not in self._incomplete_from
        if cands:
            seq = max(c[0] for c in cands)
            best = [c for c in cands if c[0] == seq]
            lvb, valid = best[0][1], all(c[2] for c in best)
        else:
            seq, lvb, valid = 0, ZERO_LVB, False   # never written
        if not (heard_master or old_master_alive):
            # The old master died with the LVB: only a surviving holder whose
            # mode shuts out writers proves the newest copy we have is current.
            valid = valid and any(rep.granted in _EXCLUDES_WRITERS for _, rep in rb.locks)
        if not trust_lvb:
            valid = False
        if not valid:
            # The real newest value may be lost together with its sequence
            # number, so jump the sequence past anything written in earlier
            # epochs: an old write a survivor reports later must not pass
            # for a newer one.  (Epoch in the high 32 bits, writes below.)
            seq = max(seq, self.epoch << 32)
        res.lvb, res.lvb_seq, res.lvb_valid = lvb, seq, valid
