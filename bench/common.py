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
            "p99_9_us": pct(samples_s, 99.9) * 1e6,
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


# ---------------------------------------------------------------- reports
#
# Every layer reports the same way: one table of absolute numbers per
# section (rows: workloads; columns: the targets, baselines included), the
# candidate's speed ratio to each baseline, and the same data as JSON with
# PNG charts beside it (bench/charts.py).  A ratio is a *speed* ratio for
# every unit: above 1 the candidate is faster (more MB/s, fewer µs).

FAILED = "FAILED"


def speed_ratio(value, base, higher_is_better: bool):
    if not isinstance(value, (int, float)) or not isinstance(base, (int, float)):
        return None
    if not value or not base:
        return None
    return value / base if higher_is_better else base / value


class Section:
    """One table: ``targets`` in column order, the ``candidate`` compared
    with each of ``baselines``."""

    def __init__(self, name: str, title: str, targets: list[str], candidate: str,
                 baselines: list[str], note: str = ""):
        self.name, self.title, self.note = name, title, note
        self.targets, self.candidate, self.baselines = list(targets), candidate, list(baselines)
        self.rows: list[dict] = []
        self.target_errors: dict[str, str] = {}

    def add(self, workload: str, unit: str, values: dict, *, higher_is_better: bool = True,
            errors: dict | None = None, baseline: str | None = None) -> dict:
        """A row; ``values`` {target: number}; ``errors`` {target: message}
        for a workload that failed on a target; ``baseline``: compare this row
        with that target instead of the section's baselines."""
        row = {"workload": workload, "unit": unit, "higher_is_better": higher_is_better,
               "values": {t: v for t, v in values.items() if v is not None},
               "errors": dict(errors or {})}
        if baseline:
            row["baseline"] = baseline
        self.rows.append(row)
        return row

    def fail_target(self, target: str, error: str) -> None:
        self.target_errors[target] = error

    def ratios(self, row: dict) -> dict:
        out = {}
        for b in ([row["baseline"]] if row.get("baseline") else self.baselines):
            out[b] = speed_ratio(row["values"].get(self.candidate), row["values"].get(b),
                                 row["higher_is_better"])
        return out

    def to_json(self) -> dict:
        return {"name": self.name, "title": self.title, "note": self.note,
                "targets": self.targets, "candidate": self.candidate,
                "baselines": self.baselines, "target_errors": self.target_errors,
                "rows": [{**r, "ratios": self.ratios(r)} for r in self.rows]}


def _fmt(v) -> str:
    if isinstance(v, float):
        if v != v:
            return "nan"
        a = abs(v)
        return "%.0f" % v if a >= 1000 else "%.1f" % v if a >= 10 else "%.3g" % v
    return str(v)


def render_section(sec: dict) -> str:
    """The table of one section (as found in the JSON)."""
    headers = ["workload", "unit"] + sec["targets"]
    bases = []
    for r in sec["rows"]:
        for b in r["ratios"]:
            if b not in bases:
                bases.append(b)
    headers += [f"{sec['candidate']} / {b}" for b in bases]
    rows = []
    for r in sec["rows"]:
        line = [r["workload"], r["unit"]]
        for t in sec["targets"]:
            if t in sec["target_errors"] or t in r["errors"]:
                line.append(FAILED)
            elif t in r["values"]:
                line.append(_fmt(float(r["values"][t])))
            else:
                line.append("-")
        for b in bases:
            x = r["ratios"].get(b)
            line.append("%.2fx" % x if x is not None else "-")
        rows.append(line)
    out = [f"== {sec['title']}", table(rows, headers)]
    failed = {**sec["target_errors"]}
    for r in sec["rows"]:
        for t, e in r["errors"].items():
            failed.setdefault(f"{t}: {r['workload']}", e)
    for what, e in failed.items():
        out.append(f"FAILED {what}: {e}")
    if sec.get("note"):
        out.append(sec["note"])
    return "\n".join(out)


class Report:
    """Everything one layer reports: sections (tables), latency percentiles
    and latency histograms, written as JSON plus charts."""

    def __init__(self, layer: str, title: str):
        self.layer, self.title = layer, title
        self.sections: list[Section] = []
        self.latency: list[dict] = []
        self.histograms: list[dict] = []

    def section(self, *args, **kw) -> Section:
        s = Section(*args, **kw)
        self.sections.append(s)
        return s

    def add_latency(self, label: str, target: str, *, p50_us, p99_us, p99_9_us) -> None:
        """Percentiles of one latency measurement (µs) for the percentile chart."""
        self.latency.append({"label": label, "target": target, "p50_us": p50_us,
                             "p99_us": p99_us, "p99_9_us": p99_9_us})

    def add_latency_samples(self, label: str, target: str, samples_s: list[float],
                            histogram: bool = False) -> None:
        if not samples_s:
            return
        self.add_latency(label, target, p50_us=pct(samples_s, 50) * 1e6,
                         p99_us=pct(samples_s, 99) * 1e6, p99_9_us=pct(samples_s, 99.9) * 1e6)
        if histogram:
            self.add_histogram(label, target, *histogram_from_samples(
                [s * 1e6 for s in samples_s]))

    def add_histogram(self, label: str, target: str, edges_us: list[float],
                      counts: list[int]) -> None:
        """A latency histogram: ``counts[i]`` samples in [edges[i], edges[i+1])."""
        self.histograms.append({"label": label, "target": target, "edges_us": edges_us,
                                "counts": counts})

    def to_json(self) -> dict:
        return {"layer": self.layer, "title": self.title,
                "sections": [s.to_json() for s in self.sections],
                "latency": self.latency, "histograms": self.histograms}

    def finish(self, extra: dict | None = None, *, json_out: bool = True,
               charts: bool = True, name: str | None = None) -> str | None:
        """Print the tables; write the JSON (``extra`` merged in) and the
        charts next to it; return the JSON's path."""
        rep = self.to_json()
        print()
        print("\n\n".join(render_section(s) for s in rep["sections"]))
        print("(ratios are speed ratios: above 1.00x the candidate is faster, "
              "for latencies and times too)")
        if not json_out:
            return None
        path = write_json(name or self.layer, {**(extra or {}), "report": rep})
        print(f"JSON: {path}")
        if charts:
            from . import charts as C
            try:
                for png in C.draw_report(rep, path[:-len(".json")]):
                    print(f"chart: {png}")
            except ImportError as e:
                print(f"no charts: {e} (scripts/setup.sh installs matplotlib)")
        return path


def histogram_from_samples(samples_us: list[float], bins: int = 40) -> tuple[list, list]:
    """Log-spaced bins from the smallest to the largest sample."""
    import math
    pos = [s for s in samples_us if s > 0]
    if not pos:
        return [0.0, 1.0], [len(samples_us)]
    lo, hi = min(pos), max(pos)
    if hi <= lo:
        hi = lo * 1.01
    step = (math.log10(hi) - math.log10(lo)) / bins
    edges = [10 ** (math.log10(lo) + i * step) for i in range(bins + 1)]
    counts = [0] * bins
    for s in pos:
        i = min(bins - 1, int((math.log10(s) - math.log10(lo)) / step))
        counts[i] += 1
    return edges, counts


def histogram_from_fio_bins(bins_ns: dict, nbins: int = 40) -> tuple[list, list]:
    """fio's json+ ``clat_ns.bins`` ({latency ns: count}) as log-spaced bins in µs."""
    import math
    pts = sorted((int(k) / 1000, c) for k, c in bins_ns.items() if int(k) > 0)
    if not pts:
        return [0.0, 1.0], [0]
    lo, hi = pts[0][0], pts[-1][0]
    if hi <= lo:
        hi = lo * 1.01
    step = (math.log10(hi) - math.log10(lo)) / nbins
    edges = [10 ** (math.log10(lo) + i * step) for i in range(nbins + 1)]
    counts = [0] * nbins
    for v, c in pts:
        counts[min(nbins - 1, int((math.log10(v) - math.log10(lo)) / step))] += c
    return edges, counts


def add_cli_common(ap) -> None:
    """The options every layer's command line has."""
    ap.add_argument("--no-json", action="store_true", help="print the table only: no JSON, no charts")
    ap.add_argument("--no-charts", action="store_true", help="write the JSON but draw no charts")
