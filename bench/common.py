"""Shared helpers for the benchmarks: timing, percentiles, JSON output."""
from __future__ import annotations

import json
import os
import platform
import statistics
import time

RESULTS = os.path.join(os.path.dirname(__file__), "results")


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    k = min(len(s) - 1, max(0, int(round(p / 100 * (len(s) - 1)))))
    return s[k]


def lat_summary(samples_s: list[float]) -> dict:
    return {"p50_us": pct(samples_s, 50) * 1e6, "p99_us": pct(samples_s, 99) * 1e6,
            "mean_us": statistics.fmean(samples_s) * 1e6 if samples_s else float("nan"),
            "ops": len(samples_s)}


class Timer:
    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.elapsed = time.perf_counter() - self.t0


def write_json(name: str, data: dict) -> str:
    os.makedirs(RESULTS, exist_ok=True)
    data = {"benchmark": name, "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                        "kernel": platform.release()}, **data}
    path = os.path.join(RESULTS, f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.json")
    with open(path, "w") as f:
        json.dump(data, f, indent=2)
    return path


def table(rows: list[list], headers: list[str]) -> str:
    cols = [headers] + [[("%.1f" % c) if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cols) for i in range(len(headers))]
    out = []
    for j, r in enumerate(cols):
        out.append("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))))
        if j == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)
