"""How fast resync (and online verify) may send: DRBD 8.4's rate rules.  Pure.

Time is cut into turns of ``STEP`` seconds (DRBD's SLEEP_TIME, 100 ms).
At each turn the controller decides how many bytes of resync may be sent
in that turn; the sender feeds it what it sent and what the peer
acknowledged, and asks before each chunk.

* Fixed rate (``c-plan-ahead 0``): ``resync-rate`` bytes per second.
* Dynamic (``c-plan-ahead`` > 0): a planning controller.  It wants a
  certain amount of resync data in flight -- ``c-fill-target`` bytes, or,
  with c-fill-target 0, what the acknowledgement rate moves in
  ``c-delay-target`` seconds -- and spreads the correction it needs (want
  minus in flight minus what it already planned) evenly over the next
  ``c-plan-ahead`` of time.  A turn sends what was acknowledged in the
  last turn plus its share of the plan, never more than ``c-max-rate``
  allows.  A resync with nothing in flight yet starts planning from
  ``resync-rate``.  (It integrates: on a fast link the rate climbs until
  the fill target is reached at the turn boundaries, or c-max-rate.)
* Application I/O competing (either mode): resync is throttled down to
  ``c-min-rate``, not below it; c-min-rate 0 switches the throttle off.

A turn's unused allowance is not saved up (no burst after an idle
spell); a chunk larger than what is left may still go, and the overdraft
is paid from the next turns, so the average rate holds.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

STEP = 0.1              # seconds per turn
MAX_CATCH_UP = 64       # turns run one by one after a long wait; older ones are skipped


@dataclass(frozen=True)
class RateConfig:
    """The disk section's resync-rate options, in bytes and seconds."""
    resync_rate: int = 250 * 1024 * 1024    # bytes/s: the fixed rate, and the start
    plan_ahead: float = 2.0                  # seconds (c-plan-ahead / 10); 0: fixed rate
    fill_target: int = 100 * 512             # bytes in flight (c-fill-target); 0: delay
    delay_target: float = 1.0                # seconds (c-delay-target / 10)
    max_rate: int = 100 * 1024 * 1024        # bytes/s (c-max-rate)
    min_rate: int = 250 * 1024               # bytes/s (c-min-rate); 0: no throttle

    @property
    def dynamic(self) -> bool:
        return self.plan_ahead > 0


class RateController:
    """One resync's (or verify's) sender pacing."""

    def __init__(self, cfg: RateConfig, now: float):
        self.cfg = cfg
        self.steps = max(1, int(round(cfg.plan_ahead / STEP))) if cfg.dynamic else 0
        self.plan = [0.0] * self.steps     # a ring: plan[head] is the next turn's part
        self._head = 0
        self.plan_total = 0.0
        self.in_flight = 0            # bytes sent and not yet acknowledged
        self._acked_since = 0         # bytes acknowledged since the last turn
        self._next = now              # when the next turn is due
        self.allowance = 0.0          # bytes this turn still allows (< 0: overdraft)
        self.last_turn_bytes = 0.0    # what the last turn allowed (its rate: / STEP)
        self.throttled = False        # the last turn was held to c-min-rate
        self.sent_total = 0
        self.acked_total = 0

    # ------------------------------------------------------------ feeding
    def sent(self, nbytes: int) -> None:
        self.in_flight += nbytes
        self.sent_total += nbytes
        self.allowance -= nbytes

    def acked(self, nbytes: int) -> None:
        nbytes = min(nbytes, self.in_flight)
        self.in_flight -= nbytes
        self._acked_since += nbytes
        self.acked_total += nbytes

    # ------------------------------------------------------------ asking
    @property
    def next_turn(self) -> float:
        return self._next

    def may_send(self, now: float, app_busy: bool) -> bool:
        """Run the turns due by ``now``; True if a chunk may go now."""
        self.advance(now, app_busy)
        return self.allowance > 0

    def advance(self, now: float, app_busy: bool) -> None:
        due = math.floor((now - self._next) / STEP) + 1 if now >= self._next else 0
        if due <= 0:
            return
        if due > MAX_CATCH_UP:
            # A long gap (the sender waited for something else): the turns
            # in it would only have found nothing to do.
            self._next += (due - MAX_CATCH_UP) * STEP
            due = MAX_CATCH_UP
        for _ in range(due):
            self._turn(app_busy)
            self._next += STEP

    def rate(self) -> float:
        """The rate the last turn allowed, bytes per second (DRBD's
        c_sync_rate, shown as 'want:')."""
        return self.last_turn_bytes / STEP

    # ------------------------------------------------------------ one turn
    def _turn(self, app_busy: bool) -> None:
        cfg = self.cfg
        sect_in, self._acked_since = self._acked_since, 0
        if cfg.dynamic:
            req = self._plan(sect_in)
        else:
            req = cfg.resync_rate * STEP
        self.throttled = False
        if app_busy and cfg.min_rate and req > cfg.min_rate * STEP:
            req = cfg.min_rate * STEP
            self.throttled = True
        self.last_turn_bytes = req
        # unused allowance is dropped, an overdraft carried
        self.allowance = min(self.allowance, 0.0) + req

    def _plan(self, sect_in: int) -> float:
        cfg = self.cfg
        steps = self.steps
        if self.in_flight + sect_in == 0:
            want = cfg.resync_rate * STEP * steps            # the start of a resync
        elif cfg.fill_target:
            want = cfg.fill_target
        else:
            want = sect_in * cfg.delay_target / STEP
        correction = want - self.in_flight - self.plan_total
        per_step = correction / steps
        plan = self.plan
        for i in range(steps):
            plan[i] += per_step
        self.plan_total += per_step * steps
        now_part = plan[self._head]
        plan[self._head] = 0.0
        self._head = (self._head + 1) % steps
        self.plan_total -= now_part
        req = sect_in + now_part
        return min(max(req, 0.0), cfg.max_rate * STEP)
