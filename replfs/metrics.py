"""Latency histograms cheap enough for the I/O path, shared by the parts
that measure (the resources' reads, writes and flushes; the FUSE requests
of the mounts; the DLM's lock waits) and the Prometheus endpoint that
reports them (replfs/daemon/metrics.py).

``Histogram.observe`` is a bisect and three additions: no locks, no
allocation, nothing a trio task could be interrupted in.  Bucket bounds
are Prometheus's ``le`` (upper, inclusive) bounds in seconds.
"""
from __future__ import annotations

import bisect

# 50 µs .. 10 s: block and FUSE requests here take from tens of µs to seconds
BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
           0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def _le(bound: float) -> str:
    """A bucket bound as Prometheus writes it (0.0001, not 1e-04)."""
    text = f"{bound:.6f}".rstrip("0")
    return text + "0" if text.endswith(".") else text


class Histogram:
    __slots__ = ("bounds", "counts", "sum", "count")

    def __init__(self, bounds: tuple[float, ...] = BUCKETS):
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)    # the last one: above every bound
        self.sum = 0.0
        self.count = 0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, seconds)] += 1
        self.sum += seconds
        self.count += 1

    def cumulative(self) -> list[tuple[str, int]]:
        """[(le, cumulative count)], ending with ("+Inf", count)."""
        out, total = [], 0
        for bound, n in zip(self.bounds, self.counts):
            total += n
            out.append((_le(bound), total))
        out.append(("+Inf", self.count))
        return out


class HistogramSet(dict):
    """Histograms by a label value (an operation's name), made on first use."""

    def observe(self, key: str, seconds: float) -> None:
        h = self.get(key)
        if h is None:
            h = self[key] = Histogram()
        h.observe(seconds)
