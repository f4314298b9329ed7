"""Disk + network heartbeat and the o2quo quorum rule, sans IO.

Disk heartbeat.  Every node owns one fixed-size slot (indexed by its node
number) in a heartbeat area on the shared device and rewrites it every
two seconds with a growing sequence number.  The driver reads all slots
and feeds each one to ``HeartbeatMonitor.observe_slot(number, record, now)``;
it also calls ``check(now)`` now and then so deaths are noticed even when
a read shows nothing new.

* A node comes up (NodeUp) the first time its slot is seen to change
  while we watch: a record that is merely present may be left over from a
  node that died before we started.
* A node goes down (NodeDown) when its slot has not changed for
  ``(O2CB_HEARTBEAT_THRESHOLD - 1) * 2`` seconds, o2hb's dead time.
* A new generation in a slot means the node restarted: its old life ends
  (NodeDown) and the new one begins (NodeUp) at once, so lock recovery
  runs for the old incarnation.

Network heartbeat.  ``observe_ping(number, now)`` records any message or
keepalive from a node.  A node silent for O2CB_IDLE_TIMEOUT_MS is
reported NetDown, and NetUp when it is heard again.  The daemon sends
keepalives every O2CB_KEEPALIVE_DELAY_MS; that is the driver's business.

Quorum (o2quo).  When the network to a node that still heartbeats on disk
is lost, each side decides with ``quorum_decision`` whether it may go on
or must fence itself (reboot / stop all I/O) so the other side can
recover its locks and journal safely.

Slot record layout (SLOT_SIZE bytes, big endian, zero padded):

    magic "RPHB" | u8 version | u8 node | u16 0 | u64 generation |
    u64 sequence | u64 writer time (ms, informational) | u32 dead_ms |
    u32 CRC-32 of all preceding bytes of the record

An all-zero slot has never been written and reads as None.
"""
from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from typing import Iterable, Literal, Optional, Union

SLOT_SIZE = 512                       # one sector per node, as o2hb does
MAGIC = b"RPHB"
VERSION = 1
_RECORD = struct.Struct(">4sBBHQQQI")
_CRC = struct.Struct(">I")
RECORD_LEN = _RECORD.size + _CRC.size


class HeartbeatFormatError(ValueError):
    """A slot holds bytes that are not a valid heartbeat record."""


@dataclass(frozen=True)
class SlotRecord:
    node: int
    generation: int
    sequence: int
    time_ms: int = 0
    dead_ms: int = 60000

    def encode(self) -> bytes:
        if not 0 <= self.node <= 254:
            raise ValueError(f"node number {self.node} out of range 0..254")
        body = _RECORD.pack(MAGIC, VERSION, self.node, 0, self.generation,
                            self.sequence, self.time_ms, self.dead_ms)
        record = body + _CRC.pack(zlib.crc32(body))
        return record + bytes(SLOT_SIZE - len(record))

    @classmethod
    def decode(cls, slot: bytes) -> Optional["SlotRecord"]:
        if len(slot) != SLOT_SIZE:
            raise HeartbeatFormatError(f"a slot is {SLOT_SIZE} bytes, got {len(slot)}")
        if not any(slot):
            return None
        body = slot[:_RECORD.size]
        (crc,) = _CRC.unpack_from(slot, _RECORD.size)
        if zlib.crc32(body) != crc:
            raise HeartbeatFormatError("heartbeat slot checksum mismatch")
        magic, version, node, pad, gen, seq, time_ms, dead_ms = _RECORD.unpack(body)
        if magic != MAGIC or version != VERSION or pad != 0:
            raise HeartbeatFormatError("not a replfs heartbeat record")
        if any(slot[RECORD_LEN:]):
            raise HeartbeatFormatError("heartbeat slot padding is not zero")
        return cls(node, gen, seq, time_ms, dead_ms)


# ----------------------------------------------------------------- events

@dataclass(frozen=True)
class NodeUp:
    node: int
    generation: int


@dataclass(frozen=True)
class NodeDown:
    node: int
    reason: str


@dataclass(frozen=True)
class NetUp:
    node: int


@dataclass(frozen=True)
class NetDown:
    node: int


Event = Union[NodeUp, NodeDown, NetUp, NetDown]


@dataclass
class _SlotState:
    last: Optional[SlotRecord] = None
    changed_at: float = 0.0
    alive: bool = False


class HeartbeatMonitor:
    """Turns slot reads and pings into membership events.

    ``now`` is in seconds on any monotonic scale the driver likes.  The
    local node is watched like the others (a node that cannot see its own
    writes land should learn it), but never declared up or down by us.
    """

    def __init__(self, my_number: int, numbers: Iterable[int], *,
                 heartbeat_threshold: int = 31, idle_timeout_ms: int = 30000):
        if heartbeat_threshold < 2:
            raise ValueError("heartbeat threshold must be at least 2")
        self.my_number = my_number
        self.dead_after = (heartbeat_threshold - 1) * 2.0
        self.idle_timeout = idle_timeout_ms / 1000.0
        self.slots = {n: _SlotState() for n in numbers if n != my_number}
        self.last_ping: dict[int, float] = {}
        self.connected: set[int] = set()

    @classmethod
    def from_timeouts(cls, my_number: int, numbers: Iterable[int], timeouts) -> "HeartbeatMonitor":
        """Build from a cluster_conf.Timeouts (anything with its two fields)."""
        return cls(my_number, numbers, heartbeat_threshold=timeouts.heartbeat_threshold,
                   idle_timeout_ms=timeouts.idle_timeout_ms)

    @property
    def live(self) -> frozenset[int]:
        """Nodes whose disk heartbeat is alive, this node included."""
        return frozenset(n for n, s in self.slots.items() if s.alive) | {self.my_number}

    def observe_slot(self, number: int, record: Optional[SlotRecord],
                     now: float) -> list[Event]:
        st = self.slots.get(number)
        if st is None:
            return []
        events: list[Event] = []
        if record is not None and record.node != number:
            record = None  # a record in the wrong slot counts as no heartbeat
        if record != st.last and record is not None:
            restarted = (st.last is not None and st.alive
                         and record.generation != st.last.generation)
            first_sight = st.last is None
            st.last = record
            st.changed_at = now
            if restarted:
                events.append(NodeDown(number, "restarted with a new generation"))
                events.append(NodeUp(number, record.generation))
            elif not st.alive and not first_sight:
                st.alive = True
                events.append(NodeUp(number, record.generation))
            elif not st.alive:
                st.changed_at = now  # baseline only; wait for the next change
        return events + self.check(now)

    def observe_ping(self, number: int, now: float) -> list[Event]:
        if number not in self.slots:
            return []
        self.last_ping[number] = now
        if number not in self.connected:
            self.connected.add(number)
            return [NetUp(number)] + self.check(now)
        return self.check(now)

    def check(self, now: float) -> list[Event]:
        events: list[Event] = []
        for number in sorted(self.slots):
            st = self.slots[number]
            if st.alive and now - st.changed_at >= self.dead_after:
                st.alive = False
                events.append(NodeDown(number, f"no disk heartbeat for "
                                                f"{now - st.changed_at:.0f} s"))
        for number in sorted(self.connected):
            if now - self.last_ping[number] >= self.idle_timeout:
                self.connected.discard(number)
                events.append(NetDown(number))
        return events

    def decide(self) -> Literal["survive", "fence"]:
        """o2quo's verdict from the current view (see quorum_decision)."""
        live = self.live
        reach = (self.connected & live) | {self.my_number}
        return quorum_decision(self.my_number, reach, live)


def quorum_decision(my_number: int, live_numbers: Iterable[int],
                    all_numbers: Iterable[int]) -> Literal["survive", "fence"]:
    """Decide, as o2quo does, whether this node may keep running.

    ``all_numbers``: the nodes still heartbeating on disk (this node too).
    ``live_numbers``: the ones among them this node can still talk to over
    the network, itself included.

    * More than half reachable: survive.
    * Fewer than half: fence.
    * Exactly half (only possible with an even count, e.g. a two-node
      cluster whose link broke): the half that holds the lowest
      heartbeating node number survives; the other half fences.

    So in a two-node cluster, node 0 keeps running and node 1 fences
    when they lose each other but both still write their disk heartbeat.
    Once the peer's disk heartbeat stops too it is simply dead, it leaves
    ``all_numbers``, and the survivor has a majority of one.
    """
    everyone = set(all_numbers) | {my_number}
    reach = (set(live_numbers) & everyone) | {my_number}
    if 2 * len(reach) > len(everyone):
        return "survive"
    if 2 * len(reach) < len(everyone):
        return "fence"
    return "survive" if min(everyone) in reach else "fence"
