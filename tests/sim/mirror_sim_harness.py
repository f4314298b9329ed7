"""A deterministic two-node simulation of the mirror engine.

Two ``Engine``s (blockrepl/engine) run against simulated parts, every step
picked by one seeded random.Random:

* disks: each node's backing file is a durable image plus a volatile cache
  (written, not yet flushed).  Writes, reads, flushes and meta-data writes
  are in flight until a random step completes them, in any order.  A
  *process* crash (kill -9) keeps the cache (it is the kernel's page
  cache); a *power* crash loses it, and in-flight writes land or not.
* failing disks: a node's disk starts answering EIO to everything
  (data and meta-data); the engine must detach it (on-io-error detach),
  and what its volatile cache held lands or not when it does.  Later the
  disk works again and the admin attaches it, while the pair may be
  connected (it then joins as SyncTarget on the live connection).  As an
  admin would, the cluster manager does not promote that node until it has
  resynced (if the node restarted meanwhile, nothing on it remembers that
  its disk failed: the disk could not record it).
* network: one connection at a time, a byte stream each way carrying the
  real packet encoding, delivered in random-sized chunks (so packets
  arrive split anywhere).  A cut loses what is in flight; each side hears
  of it at its own later step.  A close delivers what was sent, then EOF.
* a cluster manager: promotes a node only as a careful admin (or
  Pacemaker) would -- when the other node is Secondary or down --, answers
  fence-peer as o2cb's quorum rule does (the lower node wins a split; a
  dead peer is fenced), and "unmounts" a fenced node's filesystem.
* resync options, per seed: csums-alg on none, one or both nodes, a
  data-integrity-alg (then, rarely, a bit of a Data/ResyncData packet is
  flipped on the wire, which the receiver must catch), a fixed or planned
  resync rate, a c-min-rate throttle; an admin pauses and resumes sync on
  either node at random steps (resumed before the end).
* a workload: Primaries write tagged blocks (each write's content names
  it), flush, and read; in dual-primary runs each node writes its own
  half of the device, as a cluster filesystem's locks would make it.

Checked after every step: no application request completes twice or with
a result that contradicts the engine's own rules (a read returns a value
the block may hold); and at the end, after every fault is healed and the
pair has settled: both nodes Connected and UpToDate, no split brain, both
disks identical, and every block holds its last *required* write or a
write issued after it.  A write is required once it is acknowledged, and
stays required through power failures only once a flush that began after
its acknowledgement has completed.  Some writes carry PREFLUSH and/or FUA
(a journal commit): a FUA write is required through power failures once
it completes, and a PREFLUSH write that completes counts as a flush begun
when it was issued.
"""
from __future__ import annotations

import dataclasses
import errno
import os
import random
from collections import deque
from dataclasses import dataclass, field

from replfs.blockrepl.core.bitmap import BLOCK, Bitmap
from replfs.blockrepl.core.states import ConnState, DiskState, Role
from replfs.blockrepl.core.uuids import Uuids
from replfs.blockrepl.engine import actions as A
from replfs.blockrepl.engine.engine import WRITE_FUA, WRITE_PREFLUSH, Engine, EngineConfig
from replfs.blockrepl.meta import format as md
from replfs.blockrepl.proto import packets as P

NBLOCKS = 48
SIZE = NBLOCKS * BLOCK


class InvariantError(AssertionError):
    pass


def tag_block(tag: int) -> bytes:
    return tag.to_bytes(8, "little") * (BLOCK // 8)


def tag_of(block: bytes) -> int:
    return int.from_bytes(block[:8], "little")


# ---------------------------------------------------------------- disk
class SimDisk:
    """One node's backing file and meta-data, with a volatile cache."""

    def __init__(self):
        self.durable: dict[int, bytes] = {}
        self.cache: dict[int, bytes] = {}
        self.sb = md.Superblock(SIZE, Uuids(), 0, 0x5EED << 1, 61, None)
        self.bitmap = bytearray((NBLOCKS + 7) // 8)
        self.al: list[int] = []

    def block(self, b: int) -> bytes:
        return self.cache.get(b, self.durable.get(b, bytes(BLOCK)))

    def write(self, offset: int, data: bytes) -> None:
        assert offset % BLOCK == 0 and len(data) % BLOCK == 0, (offset, len(data))
        for i in range(len(data) // BLOCK):
            self.cache[offset // BLOCK + i] = bytes(data[i * BLOCK:(i + 1) * BLOCK])

    def read(self, offset: int, length: int) -> bytes:
        out = bytearray()
        pos = offset
        while pos < offset + length:
            b, within = divmod(pos, BLOCK)
            n = min(BLOCK - within, offset + length - pos)
            out += self.block(b)[within:within + n]
            pos += n
        return bytes(out)

    def flush(self) -> None:
        self.durable.update(self.cache)
        self.cache.clear()

    def persist(self, act: A.PersistMeta, rng=None) -> None:
        """Apply a meta-data write: all of it, or (a crash in the middle,
        ``rng`` given) the bitmap pages in any subset, then -- only if all
        of them landed -- maybe the activity log, then maybe the
        superblock: each part is durable before the next is written."""
        landed = True
        for index, page in act.bitmap_pages:
            if rng is None or rng.random() < 0.5:
                start = index * BLOCK
                self.bitmap[start:start + len(page)] = page[:len(self.bitmap) - start]
            else:
                landed = False
        if not landed:
            return
        if act.al_extents is not None:
            if rng is not None and rng.random() < 0.5:
                return
            self.al = list(act.al_extents)
        if act.superblock is not None and (rng is None or rng.random() < 0.5):
            self.sb = act.superblock

    def image(self) -> list[bytes]:
        return [self.block(b) for b in range(NBLOCKS)]


# ---------------------------------------------------------------- network
@dataclass
class Conn:
    ends: dict            # node index -> session at that node
    buf: dict = field(default_factory=lambda: {0: bytearray(), 1: bytearray()})  # to node
    dec: dict = field(default_factory=lambda: {0: P.Decoder(), 1: P.Decoder()})
    cut: bool = False
    closed_by: int | None = None
    told: set = field(default_factory=set)   # nodes that heard of its end


# ---------------------------------------------------------------- records
@dataclass
class WriteRec:
    node: int
    tag: int
    blocks: range
    issued: int           # step
    state: str = "in-flight"     # in-flight | acked | failed
    acked_at: int = -1
    flushed: bool = False        # a flush begun after its ack has completed
    flags: int = 0               # WRITE_PREFLUSH | WRITE_FUA


@dataclass
class Node:
    idx: int
    name: str
    disk: SimDisk = field(default_factory=SimDisk)
    engine: Engine | None = None
    io: dict = field(default_factory=dict)        # token -> action in flight
    reqs: dict = field(default_factory=dict)      # req -> ("write", rec) / ("read", ...) ...
    ops: dict = field(default_factory=dict)       # op -> name
    mounted: bool = False                         # dual-primary: fs mounted here
    logs: deque = field(default_factory=lambda: deque(maxlen=30))
    released: bool = False
    failing: bool = False                         # the disk answers EIO


class Sim:
    def __init__(self, seed: int, *, steps: int = 400, dual: bool | None = None,
                 power: bool | None = None, protocol: str | None = None,
                 crash_rate: float = 0.01,
                 cut_rate: float = 0.02, max_faults: int = 4,
                 csums: str | None = None, integrity: str | None = None,
                 pause_rate: float = 0.01, corrupt_rate: float = 0.01,
                 plan_ahead: float | None = None, min_rate: int | None = None,
                 congestion: str | None = None, disk_fail_rate: float = 0.004,
                 flagged_writes: bool = True):
        self.seed = seed
        self.flagged_writes = flagged_writes
        self.rng = random.Random(seed)
        # (the write flags from a stream of their own: a seed's schedule
        # stays what it was before writes had flags)
        self.flag_rng = random.Random(seed * 7919 + 17)
        self.steps = steps
        self.dual = self.rng.random() < 0.35 if dual is None else dual
        if protocol not in (None, "C"):
            self.dual = False       # two Primaries need protocol C (as DRBD)
        self.power = self.rng.random() < 0.5 if power is None else power
        # Protocol C mostly; A and B (single Primary: DRBD requires C for two)
        # promise less -- acknowledged writes may be lost with a failover --
        # but the same write order, identical disks, and no split brain.
        if protocol is None:
            protocol = "C" if self.dual else self.rng.choice("CCCCAB")
        self.protocol = protocol
        self.crash_rate = crash_rate
        self.cut_rate = cut_rate
        self.max_faults = max_faults
        self.corrupt_rate = corrupt_rate
        self.disk_fail_rate = disk_fail_rate
        self.faults = 0
        self.now = 0.0
        self.step_no = 0
        self.next_id = 1
        self.nodes = [Node(0, "alpha"), Node(1, "beta")]
        self.conn: Conn | None = None
        self.writes: list[WriteRec] = []
        self.by_tag: dict[int, WriteRec] = {}
        self.power_crashes: list[int] = []       # steps
        # nodes that may not be promoted -> the connection count then
        self.constrained: dict[int, int] = {}
        # nodes whose disk failed: not promoted until resynced -> connection count
        self.disk_failed: dict[int, int] = {}
        self.connections = 0
        self.fence_answers: dict = {}
        self.flushes: dict = {}                  # (node, req) -> step issued
        self.trace: deque = deque(maxlen=int(os.environ.get("REPLFS_SIM_TRACE", "1500")))
        self.stats = {"writes": 0, "acked": 0, "failed": 0, "reads": 0, "flushes": 0,
                      "crashes": 0, "cuts": 0, "resyncs": 0, "packets": 0, "failovers": 0,
                      "fence6": 0, "steps": 0, "pauses": 0, "corrupted": 0,
                      "csum_equal": 0, "paused_syncs": 0,
                      "integrity_failed": 0, "disk_failures": 0, "reattached": 0}
        # Resync options, from a stream of their own (the schedule's stays
        # as it was): csums-alg per node (the SyncSource's is used), one
        # data-integrity-alg for both (they must agree), fixed or planned
        # rate, and whether application I/O throttles resync.
        opt = random.Random(seed ^ 0x5EED5)
        integrity = opt.choice((None, None, "sha1", "md5")) if integrity is None \
            else integrity or None
        self.integrity = integrity
        self.csums = {n.idx: (opt.choice((None, "md5", "sha256", "blake2b"))
                              if csums is None else csums or None) for n in self.nodes}
        plan = opt.choice((0.0, 2.0, 2.0)) if plan_ahead is None else plan_ahead
        min_rate = opt.choice((0, 64 * 1024, 1024 * 1024)) if min_rate is None else min_rate
        self.pause_rate = pause_rate
        self.cfg = {n.idx: EngineConfig(
            name="r0", node=n.name, peer=self.nodes[1 - n.idx].name, protocol=protocol,
            two_primaries=self.dual,
            fencing="resource-and-stonith",
            ping_int=1.0, ping_timeout=0.5, timeout=2.0,
            resync_rate=4 * 1024 * 1024, c_plan_ahead=plan, c_min_rate=min_rate,
            c_fill_target=opt.choice((100 * 512, 64 * 1024)),
            csums_alg=self.csums[n.idx], integrity_alg=integrity,
            al_extents=4, al_extent_size=4 * BLOCK,
            handlers=frozenset({"fence-peer"}))
            for n in self.nodes}
        # on-congestion (protocol A only): go Ahead, or drop the link, when
        # more than a few blocks are in flight.
        self.congestion = opt.choice(("block", "pull-ahead", "pull-ahead", "disconnect")) \
            if protocol == "A" else "block"
        if congestion is not None:
            self.congestion = congestion
        fill = opt.choice((2, 3, 6)) * BLOCK
        for idx, cfg in self.cfg.items():
            self.cfg[idx] = dataclasses.replace(cfg, on_congestion=self.congestion,
                                                congestion_fill=fill, congestion_extents=5)

    # ---------------------------------------------------------- plumbing
    def fail(self, what: str) -> None:
        lines = [f"seed {self.seed} (dual={self.dual}, power={self.power}, "
                 f"protocol {self.protocol}) step "
                 f"{self.step_no}: {what}", "last steps:"]
        lines += ["  " + t for t in self.trace]
        for n in self.nodes:
            e = n.engine
            state = ("down" if e is None else
                     f"{e.role.value} {e.cstate.value} {e.dstate.value}/{e.pdsk.value} "
                     f"susp={e.susp} lost={e.fence_lost} io={sorted(n.io)} "
                     f"flows={e.flows.describe()[:6]}")
            lines.append(f"{n.name}: {state}")
            lines += ["    " + x for x in n.logs]
        raise InvariantError("\n".join(lines))

    def new_id(self) -> int:
        self.next_id += 1
        return self.next_id

    def note(self, text: str) -> None:
        self.trace.append(f"[{self.step_no}] {text}")

    def handle(self, node: Node, actions: list) -> None:
        for act in actions:
            t = type(act)
            if t is A.Send:
                c = self.conn
                if c is not None and not c.cut and c.closed_by is None \
                        and c.ends.get(node.idx) == act.session:
                    pkt = act.pkt
                    if self.integrity and type(pkt) in (P.Data, P.ResyncData) and pkt.data \
                            and self.faults < self.max_faults \
                            and self.rng.random() < self.corrupt_rate:
                        # a bit flipped on the wire (a bad NIC): the
                        # receiver's data-integrity check must catch it
                        self.faults += 1
                        self.stats["corrupted"] += 1
                        bad = bytearray(pkt.data)
                        bad[self.rng.randrange(len(bad))] ^= 1 << self.rng.randrange(8)
                        pkt = dataclasses.replace(pkt, data=bytes(bad))
                        self.note(f"{node.name} -> corrupted {type(pkt).__name__}")
                    c.buf[1 - node.idx] += P.encode(pkt)
            elif t in (A.DiskWrite, A.DiskRead, A.DiskFlush, A.PersistMeta, A.RunHandler):
                node.io[act.token] = act
                if t is A.RunHandler and act.name == "split-brain":
                    self.fail(f"{node.name}: a split brain was detected")
                if t is A.RunHandler:
                    self.note(f"{node.name} runs handler {act.name}")
                    if act.name == "fence-peer":
                        # the cluster acts when the handler starts
                        self.fence_answers[(node.idx, act.token)] = self.fence_decision(node)
            elif t is A.Complete:
                self.on_complete(node, act)
            elif t is A.OpDone:
                name = node.ops.pop(act.op, None)
                if name is None:
                    self.fail(f"{node.name}: OpDone for unknown op {act.op}")
                self.note(f"{node.name} {name} -> {act.error or 'ok'}")
            elif t is A.CloseConnection:
                c = self.conn
                if c is not None and c.ends.get(node.idx) == act.session:
                    if not c.cut and c.closed_by is None:
                        c.closed_by = node.idx
                    c.told.add(node.idx)
                    c.buf[node.idx].clear()
            elif t is A.PriLost:
                self.note(f"{node.name}: pri-lost: {act.why}")
            elif t is A.ReleaseDisk:
                node.released = True
                if node.failing and (node.disk.cache or self.protocol != "C"):
                    # the disk was given up after an error: what its cache
                    # held when it failed lands or not (for the checker, as
                    # a power failure: unflushed writes are not required).
                    # Under protocols A and B the Primary's failed disk may
                    # also have had the only copy of writes still on their
                    # way to the peer: as a failover, they may be lost.
                    self.power_crashes.append(self.step_no)
                    self.lose_cache(node.disk, 0.5)
            elif t is A.Log:
                node.logs.append(act.text)
                self.note(f"{node.name}: {act.text}")
                if "had equal checksums" in act.text:
                    self.stats["csum_equal"] += 1
                if "-> PausedSync" in act.text:
                    self.stats["paused_syncs"] += 1
                if "Digest integrity check FAILED" in act.text:
                    self.stats["integrity_failed"] += 1
                    if self.stats["integrity_failed"] > self.stats["corrupted"]:
                        self.fail(f"{node.name}: an integrity check failed, but nothing "
                                  f"was corrupted")
                if "Split-Brain detected" in act.text and "solved" not in act.text:
                    self.fail(f"{node.name}: {act.text}")
            else:
                self.fail(f"unknown action {act!r}")

    def call(self, node: Node, method: str, *args, **kw):
        e = node.engine
        out = getattr(e, method)(*args, **kw)
        if method == "connected":
            session, out = out
            self.handle(node, out)
            return session
        self.handle(node, out)
        return None

    def op(self, node: Node, name: str, *args, **kw) -> None:
        op = self.new_id()
        node.ops[op] = name
        self.call(node, name, op, *args, **kw)

    # ---------------------------------------------------------- workload
    def on_complete(self, node: Node, act: A.Complete) -> None:
        kind = node.reqs.pop(act.req, None)
        if kind is None:
            self.fail(f"{node.name}: Complete for unknown request {act.req}")
        if kind[0] == "write":
            rec: WriteRec = kind[1]
            if act.error:
                rec.state = "failed"
                self.stats["failed"] += 1
            else:
                rec.state = "acked"
                rec.acked_at = self.step_no
                self.stats["acked"] += 1
                if rec.flags & WRITE_FUA:
                    rec.flushed = True          # durable once it completed
                if rec.flags & WRITE_PREFLUSH:
                    self.flushed_before(node, rec.issued)
        elif kind[0] == "read":
            _, first, count, issued = kind
            if act.error or self.protocol != "C":
                return      # (A and B may lose acknowledged writes to a failover)
            if len(act.data) != count * BLOCK:
                self.fail(f"{node.name}: read returned {len(act.data)} bytes, "
                          f"wanted {count * BLOCK}")
            for i in range(count):
                block = act.data[i * BLOCK:(i + 1) * BLOCK]
                got = tag_of(block)
                if block != tag_block(got):
                    self.fail(f"{node.name}: read of block {first + i} returned damaged "
                              f"data (tag {got})")
                allowed = self.allowed(first + i, issued)
                if got not in allowed:
                    self.fail(f"{node.name}: read of block {first + i} returned tag {got}, "
                              f"allowed {sorted(allowed)}")
        elif kind[0] == "flush":
            if not act.error:
                self.flushed_before(node, kind[1])

    def flushed_before(self, node: Node, issued: int) -> None:
        """A flush (or a PREFLUSH write) issued at step ``issued`` has
        completed: the node's writes acknowledged before it are durable
        (those a power failure had not already taken)."""
        for rec in self.writes:
            if rec.node == node.idx and rec.state == "acked" \
                    and rec.acked_at < issued and not any(
                        rec.acked_at < s <= issued for s in self.power_crashes):
                rec.flushed = True

    def required(self, rec: WriteRec) -> bool:
        if rec.state != "acked":
            return False
        if rec.flushed:
            return True
        return not any(s > rec.acked_at for s in self.power_crashes)

    def allowed(self, block: int, read_issued: int | None = None) -> set[int]:
        """Tags block ``block`` may hold: its last required write (or zero)
        and every write to it issued after that one."""
        history = [w for w in self.writes if block in w.blocks]
        last = -1
        for i, w in enumerate(history):
            if self.required(w) and (read_issued is None or w.acked_at < read_issued):
                last = i
        tags = {history[last].tag} if last >= 0 else {0}
        tags |= {w.tag for w in history[last + 1:]}
        return tags

    def my_blocks(self, node: Node) -> range:
        if not self.dual:
            return range(NBLOCKS)
        half = NBLOCKS // 2
        return range(0, half) if node.idx == 0 else range(half, NBLOCKS)

    def do_write(self, node: Node) -> None:
        area = self.my_blocks(node)
        count = self.rng.choice((1, 1, 1, 2, 3))
        first = self.rng.randrange(area.start, area.stop - count + 1)
        # A Primary does not write a block it is still writing (the page
        # cache and the filesystem serialise that); two writes to the same
        # block in flight at once have no defined order.
        busy = {b for w in self.writes if w.state == "in-flight" for b in w.blocks}
        if any(b in busy for b in range(first, first + count)):
            return
        tag = self.new_id()
        # some writes are journal commits: PREFLUSH and/or FUA
        flags = self.flag_rng.choice((0, 0, 0, 0, 0, WRITE_FUA, WRITE_PREFLUSH,
                                      WRITE_PREFLUSH | WRITE_FUA)) \
            if self.flagged_writes else 0
        rec = WriteRec(node.idx, tag, range(first, first + count), self.step_no, flags=flags)
        self.writes.append(rec)
        self.by_tag[tag] = rec
        req = self.new_id()
        node.reqs[req] = ("write", rec)
        self.stats["writes"] += 1
        self.note(f"{node.name} write blocks {first}+{count} tag {tag} flags {flags}")
        self.call(node, "write", req, first * BLOCK, tag_block(tag) * count, flags)

    def do_read(self, node: Node) -> None:
        # (in dual-primary runs only its own half: nothing orders a read
        # against the other node's writes there, as a lock would)
        area = self.my_blocks(node)
        count = self.rng.choice((1, 2))
        first = self.rng.randrange(area.start, area.stop - count + 1)
        busy = {b for w in self.writes if w.state == "in-flight" for b in w.blocks}
        if any(b in busy for b in range(first, first + count)):
            return
        req = self.new_id()
        node.reqs[req] = ("read", first, count, self.step_no)
        self.stats["reads"] += 1
        self.call(node, "read", req, first * BLOCK, count * BLOCK)

    def do_flush(self, node: Node) -> None:
        req = self.new_id()
        node.reqs[req] = ("flush", self.step_no)
        self.stats["flushes"] += 1
        self.note(f"{node.name} flush")
        self.call(node, "flush", req)

    # ---------------------------------------------------------- disk I/O
    def complete_io(self, node: Node, token: int) -> None:
        act = node.io.pop(token)
        t = type(act)
        d = node.disk
        if node.failing and t is not A.RunHandler:
            self.note(f"{node.name} {t.__name__} -> EIO (failing disk)")
            self.call(node, "done", token, errno.EIO)
            return
        if t is A.DiskWrite:
            d.write(act.offset, act.data)
            result = 0
        elif t is A.DiskRead:
            result = d.read(act.offset, act.length)
        elif t is A.DiskFlush:
            d.flush()
            result = 0
        elif t is A.PersistMeta:
            d.flush()           # REQ_PREFLUSH
            d.persist(act)
            result = 0
        else:
            result = self.fence_answers.pop((node.idx, token), 0) \
                if act.name == "fence-peer" else 0
            self.note(f"{node.name} handler {act.name} -> {result}")
        self.call(node, "done", token, result)

    def fence_decision(self, node: Node) -> int:
        """What a careful cluster answers fence-peer: a node the cluster
        fenced earlier (and that has not resynced since) fences nobody (1);
        a dead peer is fenced (7); one Primary: a constraint keeps the peer
        from being promoted (4, as crm-fence-peer); two Primaries: o2cb's
        quorum rule, the lower node survives the split (7 / 6).  The fenced
        node stays constrained until it has resynced."""
        peer = self.nodes[1 - node.idx]
        if node.idx in self.constrained:
            return 6 if peer.engine is not None and self.dual else 1
        if peer.engine is None:
            self.constrained[peer.idx] = self.connections
            return 7
        if not self.dual:
            self.constrained[peer.idx] = self.connections
            return 4
        if node.idx < peer.idx:
            self.constrained[peer.idx] = self.connections
            return 7
        self.stats["fence6"] += 1
        self.constrained[node.idx] = self.connections
        return 6

    # ---------------------------------------------------------- nodes
    def boot(self, node: Node) -> None:
        cfg = self.cfg[node.idx]
        node.engine = Engine(cfg, new_uuid=lambda: self.rng.getrandbits(62) << 1, now=self.now)
        node.io.clear()
        node.reqs.clear()
        node.ops.clear()
        node.released = False
        node.mounted = False
        d = node.disk
        self.op(node, "attach", d.sb, Bitmap(NBLOCKS, bytes(d.bitmap)), list(d.al))
        self.call(node, "connect")

    def lose_cache(self, d: SimDisk, p: float) -> None:
        """The volatile cache is gone: each block in it landed with
        probability ``p``."""
        for b in list(d.cache):
            if self.rng.random() < p:
                d.durable[b] = d.cache[b]
        d.cache.clear()

    def disk_fault_open(self) -> bool:
        """One disk fault at a time: a disk fails only once the other has
        been repaired, reattached and resynced (with both disks failing
        and their meta-data unwritable, nothing can record what either
        missed)."""
        for n in self.nodes:
            e = n.engine
            if n.failing or n.released or (e is not None and e.dstate is not DiskState.UpToDate):
                return True
        return False

    def other_disk_current(self, node: Node) -> bool:
        """Does the other disk hold everything ``node``'s does?  (Tags grow
        with every write: no block of ``node``'s disk may carry a newer one
        than the other disk's.)  A disk fails only then: losing the only
        disk with the newest data is a double failure no engine recovers
        from on its own (DRBD neither: the admin forces a Primary).  The
        engines' own view is not enough: a disk says UpToDate until a
        handshake tells it that the other node wrote on alone."""
        mine, other = node.disk, self.nodes[1 - node.idx].disk
        return all(tag_of(mine.block(b)) <= tag_of(other.block(b)) for b in range(NBLOCKS))

    def fail_disk(self, node: Node) -> None:
        self.faults += 1
        self.stats["disk_failures"] += 1
        node.failing = True
        self.disk_failed[node.idx] = self.connections
        self.note(f"{node.name}'s disk starts failing (EIO)")

    def repair_disk(self, node: Node) -> None:
        """The failing disk works again; once the engine has given it up,
        the admin attaches it."""
        node.failing = False
        e = node.engine
        if node.released and e is not None and e.disk is None and not node.ops \
                and e.role is Role.Primary and not (
                    e.cstate is ConnState.Connected and e.pdsk is DiskState.UpToDate):
            # (a Primary without a disk may attach one only while connected
            # to an UpToDate peer: the admin demotes it first, unmounting)
            if self.rng.random() < 0.5:
                return
            if node.mounted:
                node.mounted = False
                self.call(node, "closed", "shared")
                self.call(node, "closed", "any")
            self.note(f"{node.name}'s disk repaired: demote to attach it")
            self.op(node, "secondary")
            return
        if node.released and e is not None and e.disk is None and not node.ops:
            self.note(f"{node.name}'s disk repaired: attach")
            self.stats["reattached"] += 1
            node.released = False
            d = node.disk
            self.op(node, "attach", d.sb, Bitmap(NBLOCKS, bytes(d.bitmap)), list(d.al))
        else:
            self.note(f"{node.name}'s disk works again")

    def crash(self, node: Node, power: bool) -> None:
        self.stats["crashes"] += 1
        self.faults += 1
        self.note(f"{node.name} {'POWER' if power else 'process'} crash")
        d = node.disk
        for act in node.io.values():
            # what was in flight lands or not (nothing on a failing disk)
            if node.failing:
                break
            if type(act) is A.DiskWrite and self.rng.random() < 0.5:
                d.write(act.offset, act.data)
            elif type(act) is A.PersistMeta and self.rng.random() < 0.5:
                d.flush()       # the preflush was done, some of the rest landed
                d.persist(act, self.rng)
        if power:
            self.power_crashes.append(self.step_no)
            self.lose_cache(d, 0.3)
        for rec in self.writes:
            if rec.node == node.idx and rec.state == "in-flight":
                rec.state = "failed"       # its caller died with it: outcome unknown
        node.engine = None
        node.io.clear()
        node.reqs.clear()
        c = self.conn
        if c is not None and node.idx in c.ends:
            c.cut = True
            c.told.add(node.idx)

    # ---------------------------------------------------------- network
    def deliver(self, to: int, nbytes: int) -> None:
        c = self.conn
        node = self.nodes[to]
        buf = c.buf[to]
        chunk = bytes(buf[:nbytes])
        del buf[:nbytes]
        dec = c.dec[to]
        dec.receive_data(chunk)
        while True:
            try:
                pkt = dec.next_packet()
            except P.RemoteProtocolError as e:
                self.fail(f"packet decoding failed: {e}")
            if pkt is None:
                break
            self.stats["packets"] += 1
            if node.engine is not None:
                self.call(node, "receive", c.ends[to], pkt)
            if self.conn is not c or c.cut:
                break

    def tell_lost(self, idx: int) -> None:
        c = self.conn
        c.told.add(idx)
        node = self.nodes[idx]
        if node.engine is not None:
            self.note(f"{node.name} hears the connection is gone")
            self.call(node, "connection_lost", c.ends[idx], ConnState.NetworkFailure,
                      "connection lost (simulated)")

    def net_step(self) -> bool:
        """Advance the network by one random event; False if nothing to do."""
        c = self.conn
        if c is None:
            a, b = self.nodes
            if a.engine and b.engine and a.engine.can_connect and b.engine.can_connect:
                # (a session number is the engine's count of connections)
                self.conn = Conn({0: a.engine.session + 1, 1: b.engine.session + 1})
                self.connections += 1
                if (self.call(a, "connected"), self.call(b, "connected")) != \
                        (self.conn.ends[0], self.conn.ends[1]):
                    self.fail("session numbers are not consecutive")
                self.note("connected")
                return True
            return False
        choices = []
        for to in (0, 1):
            if c.buf[to] and not c.cut:
                choices.append(("deliver", to))
        for idx in (0, 1):
            if idx in c.told:
                continue
            if c.cut:
                choices.append(("lost", idx))
            elif c.closed_by is not None and idx != c.closed_by and not c.buf[idx]:
                choices.append(("lost", idx))
        if c.told >= {0, 1} or (c.cut and not choices):
            self.conn = None
            return True
        if not choices:
            return False
        kind, idx = self.rng.choice(choices)
        if kind == "deliver":
            self.deliver(idx, self.rng.choice((7, 64, 1000, 5000, 1 << 20)))
        else:
            self.tell_lost(idx)
        return True

    # ---------------------------------------------------------- the cluster manager
    def manage(self) -> None:
        """Promote / demote / mount as a careful cluster manager would."""
        for node in self.nodes:
            e = node.engine
            if e is None or node.ops:
                continue
            peer = self.nodes[1 - node.idx]
            pe = peer.engine
            if e.cstate is ConnState.Connected and e.dstate is DiskState.UpToDate \
                    and e.pdsk is DiskState.UpToDate \
                    and self.constrained.get(node.idx, self.connections) < self.connections:
                del self.constrained[node.idx]     # resynced since: crm-unfence-peer
            if e.cstate is ConnState.Connected and e.dstate is DiskState.UpToDate \
                    and e.pdsk is DiskState.UpToDate and not node.failing \
                    and self.disk_failed.get(node.idx, self.connections) < self.connections:
                del self.disk_failed[node.idx]
            if self.dual:
                if e.fence_lost and node.mounted:
                    node.mounted = False        # the fenced fs latched and was unmounted
                    self.call(node, "closed", "shared")
                    self.call(node, "closed", "any")
                    self.note(f"{node.name} unmounts (fenced)")
                elif e.role is Role.Primary and not node.mounted and not e.fence_lost:
                    node.mounted = True
                    self.call(node, "opened", "shared")
                    self.call(node, "opened", "any")
                elif e.role is Role.Secondary and e.dstate in (
                        DiskState.UpToDate, DiskState.Consistent) \
                        and node.idx not in self.constrained and not e.fence_lost \
                        and node.idx not in self.disk_failed and (
                            (e.cstate is ConnState.Connected and e.pdsk is DiskState.UpToDate)
                            or pe is None and self.rng.random() < 0.5):
                    self.op(node, "primary")
            else:
                if e.role is Role.Secondary and e.dstate in (
                        DiskState.UpToDate, DiskState.Consistent) and (
                        pe is None or pe.role is Role.Secondary) and \
                        node.idx not in self.constrained and node.idx not in self.disk_failed and \
                        self.rng.random() < (0.5 if pe is None else 0.02) and \
                        not (pe is not None and not e.cstate.is_connected):
                    if pe is None:
                        self.stats["failovers"] += 1
                    self.op(node, "primary")
                elif e.role is Role.Primary and pe is not None and not node.reqs \
                        and e.cstate is ConnState.Connected and self.rng.random() < 0.01:
                    self.op(node, "secondary")

    # ---------------------------------------------------------- the run
    def setup(self) -> None:
        for node in self.nodes:
            self.boot(node)
        self.settle(200)
        a = self.nodes[0]
        self.op(a, "primary", force=True)
        self.settle(400)

    def settle(self, limit: int) -> None:
        """Run I/O and network only (no workload, no faults)."""
        for _ in range(limit):
            if not self.background_step():
                break

    def background_step(self) -> bool:
        moves = []
        for node in self.nodes:
            if node.io:
                moves.append(("io", node))
        if self.conn is not None or all(n.engine and n.engine.can_connect for n in self.nodes):
            moves.append(("net", None))
        if not moves:
            return self.advance_time()
        kind, node = self.rng.choice(moves)
        if kind == "io":
            self.complete_io(node, self.rng.choice(list(node.io)))
            return True
        if self.net_step():
            return True
        # (time jumps to the next deadline only when nothing else can happen)
        if any(n.io for n in self.nodes):
            node = self.rng.choice([n for n in self.nodes if n.io])
            self.complete_io(node, self.rng.choice(list(node.io)))
            return True
        return self.advance_time()

    def advance_time(self, dt: float | None = None) -> bool:
        deadlines = [n.engine.deadline for n in self.nodes if n.engine]
        if dt is None:
            soonest = min(deadlines, default=float("inf"))
            if soonest == float("inf"):
                return False
            self.now = max(self.now, soonest)
        else:
            self.now += dt
        for node in self.nodes:
            if node.engine is not None:
                self.call(node, "tick", self.now)
        return True

    def step(self) -> None:
        self.step_no += 1
        r = self.rng.random()
        alive = [n for n in self.nodes if n.engine is not None]
        primaries = [n for n in alive if n.engine.role is Role.Primary]
        if r < 0.35:
            self.background_step()
        elif r < 0.55 and primaries:
            self.do_write(self.rng.choice(primaries))
        elif r < 0.58 and primaries:
            self.do_flush(self.rng.choice(primaries))
        elif r < 0.62 and primaries:
            self.do_read(self.rng.choice(primaries))
        elif r < 0.70:
            self.advance_time(self.rng.choice((0.001, 0.01, 0.05, 0.3)))
        elif r < 0.74:
            self.manage()
        elif r < 0.74 + self.cut_rate and self.conn is not None \
                and self.faults < self.max_faults:
            self.faults += 1
            self.stats["cuts"] += 1
            self.note("network cut")
            self.conn.cut = True
        elif r < 0.80 and self.faults < self.max_faults and alive \
                and self.rng.random() < self.crash_rate * 10:
            node = self.rng.choice(alive)
            self.crash(node, power=self.power and self.rng.random() < 0.5)
        elif r < 0.84:
            for node in self.nodes:
                if node.engine is None and self.rng.random() < 0.3:
                    self.note(f"{node.name} restarts")
                    self.boot(node)
        elif r < 0.845 and alive and self.pause_rate \
                and self.rng.random() < self.pause_rate * 67:
            # an admin pauses or resumes resync (either node, syncing or not)
            node = self.rng.choice(alive)
            name = "resume_sync" if node.engine.user_isp else "pause_sync"
            self.stats["pauses"] += name == "pause_sync"
            self.op(node, name)
        elif r < 0.85 and self.disk_fail_rate and self.rng.random() < self.disk_fail_rate * 200:
            node = self.rng.choice(self.nodes)
            if node.failing:
                if node.released or node.engine is None or self.rng.random() < 0.2:
                    self.repair_disk(node)
            elif node.engine is not None and node.engine.disk is not None \
                    and self.faults < self.max_faults and not self.disk_fault_open() \
                    and self.other_disk_current(node):
                self.fail_disk(node)
            elif node.released and node.engine is not None and node.engine.disk is None \
                    and not node.ops:
                self.repair_disk(node)      # (an attach that failed earlier)
        elif r < 0.86:
            # background writeback of one cached block
            node = self.rng.choice(self.nodes)
            if node.disk.cache:
                b = self.rng.choice(list(node.disk.cache))
                node.disk.durable[b] = node.disk.cache.pop(b)
        else:
            self.background_step()

    def heal(self) -> None:
        """Stop the faults and let the pair settle: the end state."""
        for node in self.nodes:
            if node.engine is None:
                self.note(f"{node.name} restarts (heal)")
                self.boot(node)
        for _ in range(20000):
            self.step_no += 1
            for node in self.nodes:
                e = node.engine
                if (node.failing or (node.released and e.disk is None)) and not node.ops:
                    self.repair_disk(node)
                if e.fence_lost and node.mounted:
                    node.mounted = False
                    self.call(node, "closed", "shared")
                    self.call(node, "closed", "any")
                if not e.want_connect and e.cstate is ConnState.StandAlone \
                        and not e.split_brain and not node.ops:
                    self.call(node, "connect")
                if e.user_isp and not node.ops:
                    self.op(node, "resume_sync")
            if self.settled():
                return
            if not self.background_step():
                self.advance_time(0.5)
        self.fail("the pair did not settle (Connected, UpToDate/UpToDate, no I/O)")

    def settled(self) -> bool:
        for node in self.nodes:
            e = node.engine
            if e is None or node.io or node.reqs or node.ops:
                return False
            if e.cstate is not ConnState.Connected or e.dstate is not DiskState.UpToDate \
                    or e.pdsk is not DiskState.UpToDate:
                return False
        return self.conn is not None and not any(self.conn.buf.values())

    def check_end(self) -> None:
        a, b = self.nodes
        ia, ib = a.disk.image(), b.disk.image()
        final = [tag_of(x) for x in ia]
        for blk in range(NBLOCKS):
            allowed = self.allowed(blk) if self.protocol == "C" else None
            ta, tb = tag_of(ia[blk]), tag_of(ib[blk])
            for node, content in ((a, ia[blk]), (b, ib[blk])):
                if content != tag_block(tag_of(content)):
                    # (every byte counts: a bit flipped past a block's
                    # first eight bytes leaves its tag as it was)
                    self.fail(f"block {blk} on {node.name} is damaged: not the whole of "
                              f"any write (tag {tag_of(content)})")
            if ta != tb:
                self.fail(f"UpToDate/UpToDate but block {blk} differs: {a.name} has tag "
                          f"{ta}, {b.name} has tag {tb} (allowed {sorted(allowed or ())}; "
                          f"writes {[ (w.tag, w.node, w.state, w.acked_at, w.flushed) for w in self.writes if blk in w.blocks][-4:]})")
            if allowed is not None and ta not in allowed:
                self.fail(f"block {blk} holds tag {ta}; it must hold one of "
                          f"{sorted(allowed)} (an acknowledged write was lost)")
        if not self.power_crashes:
            self.check_order(final)
        for node in self.nodes:
            if node.engine.split_brain:
                self.fail(f"{node.name} saw a split brain")

    def check_order(self, final: list[int]) -> None:
        """Write order: a write issued after another one completed may
        depend on it, so if the later one is on disk the earlier one must
        be too (or something written over it later).  Tags grow with the
        order of issue.  (Not after a power failure: an unflushed cache
        keeps no order.)"""
        present = {t for t in final if t}
        acked = [w for w in self.writes if w.state == "acked"]
        for w2 in self.writes:
            if w2.tag not in present:
                continue
            for w1 in acked:
                if w1.node != w2.node or w1.acked_at >= w2.issued:
                    continue
                for blk in w1.blocks:
                    if final[blk] < w1.tag:
                        self.fail(f"write order: tag {w2.tag} (issued at step {w2.issued}) "
                                  f"is on disk, but block {blk} of tag {w1.tag} (completed "
                                  f"at step {w1.acked_at}, before it) holds {final[blk]}")

    def run(self) -> dict:
        self.setup()
        for _ in range(self.steps):
            self.step()
        self.heal()
        self.check_end()
        self.stats["steps"] = self.step_no
        return self.stats
