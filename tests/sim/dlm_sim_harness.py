"""A deterministic multi-node simulation of dlm-lite.

N DlmNode cores exchange real encoded frames through per-direction byte
streams (TCP gives FIFO per connection, so each ordered pair of nodes is
one FIFO stream).  A seeded random.Random picks every step: deliver a
random-sized chunk of some stream (so frames arrive split anywhere), let
a client on some node lock / convert / unlock / cancel, advance time,
crash a node (its streams vanish, survivors get node_down at once) or
bring a crashed node back as a fresh member.

After every step the invariants are checked:
* mutual exclusion: no two incompatible modes held on one resource,
  across all live nodes, as the owners see it (and as masters see it);
* the clients' view built from actions equals the cores' view;
* LVB: a counter kept in the LVB and bumped under EX reads exactly the
  number of bumps on every EX grant whenever it is marked valid, and is
  never invalid while no node has died once it has been written.
At the end all clients stop, release what they hold, and all traffic is
delivered: every request of a live node must have been granted or refused.
"""
from __future__ import annotations

import random
import struct
from collections import deque
from dataclasses import dataclass, field

from replfs.locking.dlm.core import Bast, DlmNode, Grant, Refuse, SendMessage
from replfs.locking.dlm.messages import LVB_LEN, FrameDecoder, encode
from replfs.locking.dlm.modes import CR, CW, EX, NL, PR, PW, Mode, compatible, covers, meet


def short(msg) -> str:
    """A message for the step log, with LVBs shown as their counter."""
    parts = []
    for k, v in vars(msg).items():
        if isinstance(v, bytes) and len(v) == LVB_LEN:
            v = f"#{lvb_counter(v)}"
        elif isinstance(v, Mode):
            v = v.name
        parts.append(f"{k}={v}")
    return f"{type(msg).__name__}({', '.join(parts)})"


class InvariantError(AssertionError):
    pass


def lvb_counter(lvb: bytes) -> int:
    return struct.unpack_from(">Q", lvb)[0]


def make_lvb(n: int) -> bytes:
    return struct.pack(">Q", n) + bytes(LVB_LEN - 8)


@dataclass
class ClientLock:
    resource: str
    held: Mode | None = None
    pending: Mode | None = None        # requested mode (new lock or up-conversion)
    counter_seen: int | None = None    # LVB counter read at the last EX grant
    asked_to_release: bool = False


@dataclass
class Stream:
    data: bytearray = field(default_factory=bytearray)
    decoder: FrameDecoder = field(default_factory=FrameDecoder)


MODES_WEIGHTED = [EX] * 5 + [PR] * 3 + [PW, CW, CR, NL]


class Sim:
    def __init__(self, seed: int, n_nodes: int = 3, n_resources: int = 3,
                 steps: int = 400, crash_rate: float = 0.004, max_crashes: int = 2):
        self.seed = seed
        self.rng = random.Random(seed)
        self.n_nodes = n_nodes
        self.resources = [f"res{i}" for i in range(n_resources)]
        self.steps = steps
        self.crash_rate = crash_rate
        self.max_crashes = max_crashes
        self.nodes: dict[int, DlmNode] = {i: DlmNode(i, range(n_nodes)) for i in range(n_nodes)}
        self.alive: set[int] = set(range(n_nodes))
        self.dead: set[int] = set()
        self.epoch = 0
        self.streams: dict[tuple[int, int], Stream] = {}
        self.clients: dict[int, dict[int, ClientLock]] = {i: {} for i in range(n_nodes)}
        self.next_lockid = 1
        self.increments = {r: 0 for r in self.resources}
        self.crashes = 0
        self.now = 0.0
        self.stats = {"grants": 0, "refusals": 0, "basts": 0, "frames": 0, "ex_checks": 0,
                      "deadlocks": 0}
        self.log: deque = deque(maxlen=40)

    # ---------------------------------------------------------- plumbing
    def fail(self, what: str) -> None:
        raise InvariantError(f"seed {self.seed}: {what}\nlast steps:\n  " + "\n  ".join(self.log))

    def handle(self, node: int, actions: list) -> None:
        for act in actions:
            if isinstance(act, SendMessage):
                if act.to in self.alive and node in self.alive:
                    self.streams.setdefault((node, act.to), Stream()).data += encode(act.msg)
                    self.stats["frames"] += 1
            elif isinstance(act, Grant):
                self.on_grant(node, act)
            elif isinstance(act, Bast):
                self.stats["basts"] += 1
                cl = self.clients[node].get(act.lockid)
                if cl is None or cl.held is None:
                    self.fail(f"BAST for lock {node}/{act.lockid} that is not held")
                cl.asked_to_release = True
            elif isinstance(act, Refuse):
                self.stats["refusals"] += 1
                self.stats["deadlocks"] += act.reason == "EDEADLK"
                cl = self.clients[node].get(act.lockid)
                if cl is None or cl.pending is None:
                    self.fail(f"Refuse for lock {node}/{act.lockid} with nothing pending")
                cl.pending = None
                if cl.held is None:
                    del self.clients[node][act.lockid]
                elif act.reason == "EDEADLK":
                    cl.asked_to_release = True
            else:
                self.fail(f"unknown action {act!r}")

    def on_grant(self, node: int, act: Grant) -> None:
        self.stats["grants"] += 1
        cl = self.clients[node].get(act.lockid)
        if cl is None:
            self.fail(f"Grant for unknown lock {node}/{act.lockid}")
        if cl.pending is not None:
            if act.mode != cl.pending:
                self.fail(f"lock {node}/{act.lockid} asked {cl.pending.name} got {act.mode.name}")
            cl.pending = None
        cl.held = act.mode
        cl.asked_to_release = False
        if act.mode == EX:
            self.stats["ex_checks"] += 1
            truth = self.increments[cl.resource]
            if not act.lvb_valid:
                if self.crashes == 0 and truth > 0:
                    self.fail(f"LVB of {cl.resource} invalid though no node died")
                cl.counter_seen = truth   # the client rebuilds it from "disk"
            else:
                seen = lvb_counter(act.lvb)
                if seen != truth:
                    self.fail(f"LVB counter of {cl.resource} reads {seen}, {truth} bumps made")
                cl.counter_seen = seen

    def release_value(self, cl: ClientLock) -> bytes | None:
        """An EX holder bumps the counter when it lets go."""
        if cl.held == EX and cl.counter_seen is not None:
            self.increments[cl.resource] = cl.counter_seen + 1
            return make_lvb(cl.counter_seen + 1)
        return None

    # ---------------------------------------------------------- steps
    def deliver(self, pair=None, everything=False) -> bool:
        busy = [p for p, s in self.streams.items() if s.data]
        if not busy:
            return False
        if pair is None:
            pair = self.rng.choice(sorted(busy))
        src, dst = pair
        stream = self.streams[pair]
        n = len(stream.data) if everything else self.rng.randint(1, len(stream.data))
        chunk, stream.data[:n] = bytes(stream.data[:n]), b""
        for msg in stream.decoder.feed(chunk):
            self.log.append(f"{src}->{dst} {short(msg)}")
            self.handle(dst, self.nodes[dst].receive(src, msg))
        return True

    def client_step(self) -> None:
        node = self.rng.choice(sorted(self.alive))
        core = self.nodes[node]
        mine = self.clients[node]
        idle = [lid for lid, cl in mine.items() if cl.held is not None and cl.pending is None]
        pending = [lid for lid, cl in mine.items() if cl.pending is not None]
        r = self.rng.random()
        if (r < 0.35 or not idle) and len(mine) < 4 and r < 0.7:
            lid = self.next_lockid
            self.next_lockid += 1
            res = self.rng.choice(self.resources)
            mode = self.rng.choice(MODES_WEIGHTED)
            noqueue = self.rng.random() < 0.15
            timeout = self.rng.choice([None, None, None, 3.0])
            mine[lid] = ClientLock(res, None, mode)
            self.log.append(f"node {node} lock {lid} {res} {mode.name} nq={noqueue} t={timeout}")
            self.handle(node, core.lock(lid, res, mode, noqueue=noqueue, timeout=timeout))
        elif pending and r < 0.8 and self.rng.random() < 0.2:
            lid = self.rng.choice(sorted(pending))
            self.log.append(f"node {node} cancel {lid}")
            self.handle(node, core.cancel(lid))
        elif idle:
            # Prefer locks someone else is waiting for.
            asked = [lid for lid in idle if mine[lid].asked_to_release]
            lid = self.rng.choice(sorted(asked or idle))
            cl = mine[lid]
            choice = self.rng.random()
            upward = [m for m in Mode if not covers(cl.held, m)]
            if upward and choice < (0.5 if cl.held == NL else 0.2):
                mode = self.rng.choice(upward)
                noqueue = self.rng.random() < 0.2
                cl.pending = mode
                if not covers(mode, cl.held):
                    cl.held = meet(cl.held, mode)   # sideways: step down first
                self.log.append(f"node {node} upconvert {lid} {cl.held.name}->{mode.name} "
                                f"nq={noqueue}")
                self.handle(node, core.convert(lid, mode, noqueue=noqueue))
            elif cl.held != NL and choice < 0.35:
                lower = [m for m in Mode if m != cl.held and covers(cl.held, m)]
                mode = self.rng.choice(lower)
                lvb = self.release_value(cl)
                self.log.append(f"node {node} downconvert {lid} {cl.held.name}->{mode.name}")
                self.handle(node, core.convert(lid, mode, lvb=lvb))
            else:
                lvb = self.release_value(cl)
                self.log.append(f"node {node} unlock {lid} ({cl.held.name})")
                del mine[lid]
                self.handle(node, core.unlock(lid, lvb=lvb))

    def tick(self) -> None:
        self.now += self.rng.choice([0.5, 1.0, 2.0])
        for node in sorted(self.alive):
            self.handle(node, self.nodes[node].tick(self.now))

    def crash(self, victim: int) -> None:
        self.log.append(f"CRASH node {victim}")
        self.crashes += 1
        self.alive.discard(victim)
        self.dead.add(victim)
        self.epoch += 1
        for pair in [p for p in self.streams if victim in p]:
            del self.streams[pair]
        self.clients[victim] = {}
        del self.nodes[victim]
        for node in sorted(self.alive):
            self.handle(node, self.nodes[node].node_down(victim))

    def rejoin(self, node: int) -> None:
        self.log.append(f"REJOIN node {node}")
        self.dead.discard(node)
        self.alive.add(node)
        self.epoch += 1
        self.nodes[node] = DlmNode(node, self.alive, epoch=self.epoch)
        for other in sorted(self.alive - {node}):
            self.handle(other, self.nodes[other].node_up(node))
        self.handle(node, self.nodes[node].join())

    def step(self) -> None:
        r = self.rng.random()
        if r < self.crash_rate and len(self.alive) > 1 and self.crashes < self.max_crashes:
            self.crash(self.rng.choice(sorted(self.alive)))
        elif r < 2 * self.crash_rate and self.dead:
            self.rejoin(self.rng.choice(sorted(self.dead)))
        elif r < 0.55:
            if not self.deliver():
                self.client_step()
        elif r < 0.93:
            self.client_step()
        else:
            self.tick()

    # ---------------------------------------------------------- invariants
    def check(self) -> None:
        held: dict[str, list] = {}
        for node in sorted(self.alive):
            core = self.nodes[node]
            mine = self.clients[node]
            if set(core.locks) != set(mine):
                self.fail(f"node {node}: core locks {sorted(core.locks)} != client {sorted(mine)}")
            for lid, lk in core.locks.items():
                cl = mine[lid]
                if lk.granted != cl.held or lk.requested != cl.pending:
                    self.fail(f"node {node} lock {lid}: core {lk.granted}/{lk.requested} "
                              f"client {cl.held}/{cl.pending}")
                if lk.granted is not None:
                    held.setdefault(lk.resource, []).append((node, lid, lk.granted))
            for res in core.mastered.values():
                modes = [(l.owner, l.lockid, l.granted) for l in res.granted]
                self._exclusive(f"master {node} view of {res.name}", modes)
        for res, entries in held.items():
            self._exclusive(f"owners' view of {res}", entries)

    def _exclusive(self, where: str, entries: list) -> None:
        for i, a in enumerate(entries):
            for b in entries[i + 1:]:
                if not compatible(a[2], b[2]):
                    self.fail(f"{where}: {a[0]}/{a[1]} holds {a[2].name} while "
                              f"{b[0]}/{b[1]} holds {b[2].name}")

    # ---------------------------------------------------------- run
    def drain(self) -> None:
        for _ in range(200):
            while self.deliver():
                self.check()
            released = False
            for node in sorted(self.alive):
                mine = self.clients[node]
                for lid in sorted(mine):
                    cl = mine[lid]
                    if cl.held is not None and cl.pending is None:
                        lvb = self.release_value(cl)
                        del mine[lid]
                        self.handle(node, self.nodes[node].unlock(lid, lvb=lvb))
                        released = True
                        self.check()
            if not released and not any(s.data for s in self.streams.values()):
                break
        for node in sorted(self.alive):
            core = self.nodes[node]
            if core.recovering:
                self.fail(f"node {node} still recovering after all traffic was delivered")
            stuck = {lid: (lk.resource, lk.granted, lk.requested)
                     for lid, lk in core.locks.items() if lk.requested is not None}
            if stuck:
                self.fail(f"lost grant: node {node} still waits on {stuck}")
            if core.locks:
                self.fail(f"node {node} still holds {sorted(core.locks)} after draining")

    def run(self) -> "Sim":
        for _ in range(self.steps):
            self.step()
            self.check()
        self.drain()
        return self
