"""PNG charts of a benchmark result (matplotlib, Agg backend: no display).

From the ``report`` a layer writes into its JSON (bench/common.py Report):

* PREFIX-SECTION.png   one panel per workload: a bar per target, the
                       candidate in its own colour, its speed ratio to the
                       baselines in the panel title;
* PREFIX-latency.png   p50 / p99 / p99.9 per target, one panel per latency
                       measurement, log scale;
* PREFIX-histogram.png the latency histograms (the 4 KiB sync writes),
                       one panel per measurement, a line per target.

PREFIX is the JSON's path without ".json", so the charts sit next to it.

    python -m bench.charts RESULT.json [...]     (draw again from a JSON)
"""
from __future__ import annotations

import argparse
import json
import math
import sys

BASE_COLOURS = ["#9e9e9e", "#6baed6", "#74c476", "#fdae6b", "#bcbddc", "#d9d9d9"]
CANDIDATE = "#d62728"


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _slug(s: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in s).strip("-").lower() or "section"


def _colours(targets: list[str], candidate: str) -> dict:
    out, i = {}, 0
    for t in targets:
        if t == candidate:
            out[t] = CANDIDATE
        else:
            out[t] = BASE_COLOURS[i % len(BASE_COLOURS)]
            i += 1
    return out


def _label(v: float) -> str:
    return f"{v:,.0f}" if v >= 100 else f"{v:.3g}"


def _grid(n: int, ncols: int = 3) -> tuple[int, int]:
    ncols = max(1, min(ncols, n))
    return math.ceil(n / ncols), ncols


def draw_section(sec: dict, path: str, subtitle: str = "") -> str | None:
    rows = sec["rows"]
    if not rows:
        return None
    plt = _plt()
    nr, nc = _grid(len(rows))
    fig, axes = plt.subplots(nr, nc, figsize=(4.6 * nc, 2.9 * nr + 0.8), squeeze=False)
    colours = _colours(sec["targets"], sec["candidate"])
    for ax, row in zip(axes.flat, rows):
        names, vals, cols, failed = [], [], [], []
        for t in sec["targets"]:
            names.append(t)
            bad = t in sec.get("target_errors", {}) or t in row.get("errors", {})
            v = row["values"].get(t)
            vals.append(0 if bad or v is None else float(v))
            cols.append(colours[t])
            failed.append(bad)
        y = range(len(names))
        ax.barh(list(y), vals, color=cols)
        ax.set_yticks(list(y))
        ax.set_yticklabels(names, fontsize=8)
        ax.invert_yaxis()
        top = max(vals) if any(vals) else 1
        for i, (v, bad) in enumerate(zip(vals, failed)):
            label = "FAILED" if bad else ("-" if row["values"].get(names[i]) is None
                                          else _label(v))
            ax.text(v + top * 0.01, i, label, va="center", fontsize=7,
                    color="red" if bad else "black")
        ax.set_xlim(0, top * 1.25)
        better = "higher is better" if row["higher_is_better"] else "lower is better"
        ratios = ", ".join(f"{r:.2f}x {b}" for b, r in row.get("ratios", {}).items()
                           if r is not None)
        ax.set_title(f"{row['workload']}\n{row['unit']} ({better})"
                     + (f"\n{sec['candidate']}: {ratios}" if ratios else ""), fontsize=8)
        ax.tick_params(axis="x", labelsize=7)
        ax.set_xlabel(row["unit"], fontsize=7)
    for ax in list(axes.flat)[len(rows):]:
        ax.axis("off")
    fig.suptitle(f"{sec['title']}{(' - ' + subtitle) if subtitle else ''}\n"
                 f"red: {sec['candidate']}; ratios are speed ratios (>1: candidate faster)",
                 fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.75 / fig.get_figheight()))
    fig.savefig(path, dpi=72)
    plt.close(fig)
    return path


def draw_latency(lat: list[dict], path: str, title: str) -> str | None:
    if not lat:
        return None
    plt = _plt()
    labels = list(dict.fromkeys(x["label"] for x in lat))
    nr, nc = _grid(len(labels), 2)
    fig, axes = plt.subplots(nr, nc, figsize=(6.2 * nc, 3.4 * nr + 0.6), squeeze=False)
    pcts = [("p50_us", "p50", "#4292c6"), ("p99_us", "p99", "#fd8d3c"),
            ("p99_9_us", "p99.9", "#cb181d")]
    for ax, label in zip(axes.flat, labels):
        items = [x for x in lat if x["label"] == label]
        w = 0.8 / len(pcts)
        lowest = float("inf")
        for j, (key, name, col) in enumerate(pcts):
            xs = [i + (j - 1) * w for i in range(len(items))]
            vals = [max(float(x.get(key) or 0), 1e-3) for x in items]
            lowest = min(lowest, *vals)
            ax.bar(xs, vals, width=w, color=col, label=name)
            for x, v in zip(xs, vals):
                ax.text(x, v, _label(v), ha="center", va="bottom", fontsize=6)
        ax.set_xticks(range(len(items)))
        ax.set_xticklabels([x["target"] for x in items], fontsize=8, rotation=15)
        ax.set_yscale("log")
        ax.set_ylim(bottom=lowest / 3)
        ax.set_ylabel("latency (µs, log scale)", fontsize=8)
        ax.set_title(label, fontsize=9)
        ax.legend(fontsize=7)
        ax.grid(axis="y", which="both", alpha=0.3)
    for ax in list(axes.flat)[len(labels):]:
        ax.axis("off")
    fig.suptitle(f"{title}: latency percentiles (lower is better)", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.4 / fig.get_figheight()))
    fig.savefig(path, dpi=72)
    plt.close(fig)
    return path


def draw_histograms(hists: list[dict], path: str, title: str) -> str | None:
    if not hists:
        return None
    plt = _plt()
    labels = list(dict.fromkeys(h["label"] for h in hists))
    nr, nc = _grid(len(labels), 2)
    fig, axes = plt.subplots(nr, nc, figsize=(6.2 * nc, 3.4 * nr + 0.6), squeeze=False)
    for ax, label in zip(axes.flat, labels):
        for h in (h for h in hists if h["label"] == label):
            total = sum(h["counts"]) or 1
            share = [100 * c / total for c in h["counts"]]
            ax.stairs(share, h["edges_us"], label=f"{h['target']} ({total} ops)", linewidth=1.5)
        ax.set_xscale("log")
        ax.set_xlabel("latency (µs, log scale)", fontsize=8)
        ax.set_ylabel("% of operations", fontsize=8)
        ax.set_title(label, fontsize=9)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(labels):]:
        ax.axis("off")
    fig.suptitle(f"{title}: latency histogram", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.4 / fig.get_figheight()))
    fig.savefig(path, dpi=72)
    plt.close(fig)
    return path


def draw_report(report: dict, prefix: str) -> list[str]:
    """Every chart of one report; the PNG paths written."""
    out = []
    title = report.get("title", report.get("layer", "benchmark"))
    for sec in report.get("sections", []):
        p = draw_section(sec, f"{prefix}-{_slug(sec['name'])}.png")
        if p:
            out.append(p)
    for fn, suffix in ((draw_latency, "latency"), (draw_histograms, "histogram")):
        p = fn(report.get(suffix if suffix == "latency" else "histograms", []),
               f"{prefix}-{suffix}.png", title)
        if p:
            out.append(p)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.charts",
                                 description="Draw the PNG charts of benchmark result JSON files "
                                             "again, next to each file.")
    ap.add_argument("json", nargs="+", help="a result file from bench/results/")
    args = ap.parse_args(argv)
    rc = 0
    for path in args.json:
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, ValueError) as e:
            print(f"bench.charts: {path}: {e}", file=sys.stderr)
            rc = 1
            continue
        if "report" not in data:
            print(f"bench.charts: {path}: no 'report' (written by an older bench?)",
                  file=sys.stderr)
            rc = 1
            continue
        prefix = path[:-5] if path.endswith(".json") else path
        for png in draw_report(data["report"], prefix):
            print(png)
    return rc


if __name__ == "__main__":
    sys.exit(main())
