"""trio driver of the disk heartbeat (o2hb): one slot per node in a region.

Every ``interval`` seconds (2 s, as o2hb) this node writes its SlotRecord
(a random generation per start, a growing sequence) into slot
``number * SLOT_SIZE`` of the region, reads every slot back and feeds
them to HeartbeatMonitor.  The region is a plain file here (shared by the
nodes of one machine, or on shared storage); a slot that does not decode
counts as no heartbeat, with one log line.
"""
from __future__ import annotations

import logging
import os
import secrets

import trio

from .core import SLOT_SIZE, HeartbeatFormatError, HeartbeatMonitor, NodeDown, NodeUp, SlotRecord

log = logging.getLogger("replfs.locking.heartbeat")


class DiskHeartbeat:
    def __init__(self, path: str, me: int, numbers, timeouts, *, interval: float = 2.0):
        self.path = path
        self.me = me
        self.numbers = sorted(set(numbers) | {me})
        self.monitor = HeartbeatMonitor.from_timeouts(me, self.numbers, timeouts)
        self.interval = interval
        self.generation = secrets.randbits(63)
        self.sequence = 0
        self.changed = trio.Event()
        self._bad: set[int] = set()
        # A fenced node stops beating: to the others its silence is what
        # tells them it stopped (o2hb stops the region on a fence).
        self.stopped = False

    def _io(self, record: bytes) -> bytes:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            os.pwrite(fd, record, self.me * SLOT_SIZE)
            os.fsync(fd)
            return os.pread(fd, (max(self.numbers) + 1) * SLOT_SIZE, 0)
        finally:
            os.close(fd)

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        first = True
        while not self.stopped:
            self.sequence += 1
            rec = SlotRecord(self.me, self.generation, self.sequence,
                             int(trio.current_time() * 1000),
                             int(self.monitor.dead_after * 1000)).encode()
            try:
                region = await trio.to_thread.run_sync(self._io, rec)
            except OSError as e:
                log.error("disk heartbeat: cannot write %s: %s", self.path, e)
                region = b""
            now = trio.current_time()
            events = []
            for n in self.numbers:
                if n == self.me:
                    continue
                slot = region[n * SLOT_SIZE:(n + 1) * SLOT_SIZE]
                try:
                    r = SlotRecord.decode(slot) if len(slot) == SLOT_SIZE else None
                except HeartbeatFormatError as e:
                    if n not in self._bad:
                        log.warning("disk heartbeat: slot %d of %s: %s", n, self.path, e)
                        self._bad.add(n)
                    r = None
                events += self.monitor.observe_slot(n, r, now)
            for ev in events:
                if isinstance(ev, NodeUp):
                    log.info("disk heartbeat: node %d is up", ev.node)
                elif isinstance(ev, NodeDown):
                    log.warning("disk heartbeat: node %d is down: %s", ev.node, ev.reason)
            if events:
                self.changed.set()
                self.changed = trio.Event()
            if first:
                first = False
                task_status.started()
            await trio.sleep(self.interval)
        if first:
            task_status.started()
        log.warning("disk heartbeat: stopped (this node is fenced)")
