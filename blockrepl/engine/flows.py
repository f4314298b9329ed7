"""Flows: the mirror engine's cooperative tasks, with no I/O and no clock.

The engine's rules read best as sequences ("write locally and send to the
peer, wait for both, then complete"), so each sequence is a generator, a
*flow*, that yields what it waits for:

    token = self._issue(DiskWrite(...))   (an int from ``FlowSet.token()``)
    result = yield token                  wait for complete(token, result)
    yield Wait(pred)                      wait until pred() is true
    yield Wait(pred, until=t)             ... or until the clock reaches t
    yield Wait(until=t)                   sleep

``FlowSet.run()`` resumes every flow that can go on, in creation order,
until none can: the engine calls it after every event, so the result of
an event is the same on every run (the simulator relies on that).

Cancellation is ``close()``: the generator gets GeneratorExit at its
``yield``, runs its ``finally`` blocks (which must not yield) and is gone,
as a cancelled trio task would be.  A flow cancelled while an I/O it
issued is in flight is closed only when that I/O completes: what it holds
across the I/O (a range lock, the one meta-data write at a time) must not
be released while the I/O can still land.  Flows belong to a *group* (the
connection session they serve); a session's end closes its group.

An exception escaping a flow goes to the ``on_error`` callback given to
``FlowSet``; the engine turns it into a dropped connection or a failed
request.  Predicates are re-evaluated on each pass: they must be cheap
and free of side effects.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Generator


@dataclass(frozen=True)
class Wait:
    pred: Callable[[], bool] | None = None
    until: float = math.inf


_PENDING = object()     # a token whose result has not arrived yet


class Flow:
    __slots__ = ("gen", "group", "name", "waiting", "value", "done", "cancelled")

    def __init__(self, gen: Generator, group: Any, name: str):
        self.gen = gen
        self.group = group
        self.name = name
        self.waiting: Any = None     # None (ready), int (token) or Wait
        self.value: Any = None       # sent into the generator on resume
        self.done = False
        self.cancelled = False       # closed when its I/O in flight completes

    def __repr__(self) -> str:
        return f"<flow {self.name} waiting={self.waiting!r}>"


class FlowSet:
    def __init__(self, clock: Callable[[], float],
                 on_error: Callable[[Flow, BaseException], None]):
        self._clock = clock
        self._on_error = on_error
        self._flows: list[Flow] = []
        self._results: dict[int, Any] = {}     # token -> result (or _PENDING)
        self._next_token = 0
        self.running = False

    # ------------------------------------------------------------ tokens
    def token(self) -> int:
        """A fresh token for something the driver will complete."""
        self._next_token += 1
        self._results[self._next_token] = _PENDING
        return self._next_token

    def complete(self, token: int, result: Any = None) -> bool:
        """The driver finished ``token``; False if nobody knows it (stale)."""
        if self._results.get(token, None) is not _PENDING:
            return False
        self._results[token] = result
        return True

    def forget(self, token: int) -> None:
        self._results.pop(token, None)

    def outstanding(self) -> int:
        return sum(1 for v in self._results.values() if v is _PENDING)

    # ------------------------------------------------------------ flows
    def start(self, gen: Generator, *, group: Any = None, name: str = "") -> Flow:
        flow = Flow(gen, group, name or getattr(gen, "__name__", "flow"))
        self._flows.append(flow)
        return flow

    def cancel(self, flow: Flow) -> None:
        if flow.done or flow.cancelled:
            return
        if type(flow.waiting) is int and self._results.get(flow.waiting) is _PENDING:
            flow.cancelled = True       # closed by _run once the I/O is done
            return
        flow.done = True
        if type(flow.waiting) is int:
            self._results.pop(flow.waiting, None)   # its result is of no use now
        flow.gen.close()

    def cancel_group(self, group: Any) -> None:
        for flow in list(self._flows):
            if flow.group == group:
                self.cancel(flow)
        self._flows = [f for f in self._flows if not f.done]

    def count(self, group: Any = None) -> int:
        return sum(1 for f in self._flows if not f.done and (group is None or f.group == group))

    def _ready(self, flow: Flow) -> bool:
        w = flow.waiting
        if w is None:
            return True
        if type(w) is int:
            result = self._results.get(w, _PENDING)
            if result is _PENDING:
                return False
            del self._results[w]
            flow.value = result
            return True
        if w.pred is not None and w.pred():
            flow.value = None
            return True
        if self._clock() >= w.until:
            flow.value = None
            return True
        return False

    def run(self) -> None:
        """Resume every flow that can go on until none can."""
        self.running = True
        try:
            self._run()
        finally:
            self.running = False

    def _run(self) -> None:
        progress = True
        while progress:
            progress = False
            for flow in list(self._flows):
                if flow.done or not self._ready(flow):
                    continue
                progress = True
                value, flow.value = flow.value, None
                if flow.cancelled:
                    flow.done = True
                    flow.gen.close()
                    continue
                try:
                    flow.waiting = flow.gen.send(value)
                except StopIteration:
                    flow.done = True
                except BaseException as exc:      # handed to the engine
                    flow.done = True
                    self._on_error(flow, exc)
                else:
                    w = flow.waiting
                    if not (type(w) is int or isinstance(w, Wait)):
                        flow.done = True
                        flow.gen.close()
                        raise TypeError(f"flow {flow.name} yielded {w!r}")
            if progress:
                self._flows = [f for f in self._flows if not f.done]

    def next_deadline(self) -> float:
        """The earliest time a sleeping flow wants to run (inf: none)."""
        best = math.inf
        for flow in self._flows:
            w = flow.waiting
            if isinstance(w, Wait) and w.until < best:
                best = w.until
        return best

    def describe(self) -> list[str]:
        return [repr(f) for f in self._flows if not f.done]
