"""The suite's output: Markdown tables, a JSON dump, and a latency plot.

Latencies are shown in µs below a millisecond and in ms above. Every row gives its p50
and p99 as multiples of a floor measured in the same run; targets are printed next to
what was measured and never asserted.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Any, Final

from hdrh.histogram import HdrHistogram  # type: ignore[import-untyped]

from bench.common import fmt_ratio, fmt_us, machine_line
from bench.suite import FAST, Section

log = logging.getLogger("bench.report")

MB: Final = 1024  # kB per MB (VmRSS is in kB)


def latency_table(rows: Iterable[dict[str, Any]]) -> str:
    """Rows as: series | n | p50 | p90 | p99 | p99.9 | vs floor (p50 / p99) | throughput."""
    lines = [
        "| series | n | p50 | p90 | p99 | p99.9 | vs floor (p50 / p99) | throughput |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        rps = r.get("throughput_rps")
        lines.append(
            f"| {r['series']} | {r['n']:,} | {fmt_us(r['p50_us'])} | {fmt_us(r['p90_us'])} "
            f"| {fmt_us(r['p99_us'])} | {fmt_us(r['p99.9_us'])} "
            f"| {fmt_ratio(r['p50_over_floor'])} / {fmt_ratio(r['p99_over_floor'])} "
            f"| {'-' if rps is None else f'{rps:,.0f}/s'} |"
        )
    return "\n".join(lines)


def targets(sections: dict[str, Section]) -> list[dict[str, Any]]:
    """Each target with what was measured and whether it was met (None: not measured)."""
    found: list[dict[str, Any]] = []

    def add(target: str, measured: str, met: bool | None) -> None:
        found.append({"target": target, "measured": measured, "met": met})

    hits = sections.get("hits")
    if hits is not None:
        f = hits.figures
        add("hit p50 <= 1.3x floor p50 (closed loop)", fmt_ratio(f["hit_p50_over_floor"]),
            f["hit_p50_over_floor"] <= 1.3)  # fmt: skip
        add("hit p99 <= 1.5x floor p99 (closed loop)", fmt_ratio(f["hit_p99_over_floor"]),
            f["hit_p99_over_floor"] <= 1.5)  # fmt: skip
        add(f">= 20,000 hits/s with {f['window']} in flight on one connection",
            f"{f['pipelined_rps']:,.0f}/s", f["pipelined_rps"] >= 20_000)  # fmt: skip
    misses = sections.get("misses")
    if misses is not None and "sqlite_p99_us" in misses.figures:
        p99 = misses.figures["sqlite_p99_us"]
        add("SQLite miss p99 < 2 ms", fmt_us(p99), p99 < 2000)
    original = sections.get("original")
    if original is not None and "over_sqlite_miss" in original.figures:
        over = original.figures["over_sqlite_miss"]
        add("original plugin's miss >= 100x the bridge's SQLite miss (p50 / p99)",
            f"{fmt_ratio(over['p50'])} / {fmt_ratio(over['p99'])}",
            over["p50"] >= 100 and over["p99"] >= 100)  # fmt: skip
        heavy = original.figures["graphiti_import_over_sqlite_miss_p50"]
        add("same, if the seed's script imported graphiti-core (p50 of the import alone)",
            fmt_ratio(heavy), heavy >= 100)  # fmt: skip
    hol = sections.get("head_of_line")
    if hol is not None:
        f = hol.figures
        add(f"no hit waits for a slow miss (slowest hit < the {fmt_us(f['delay_us'])} delay); "
            "hit p50 / p99 with misses in flight over alone",
            f"slowest {fmt_us(f['max_with_us'])}; {fmt_ratio(f['p50_with_over_alone'])} / "
            f"{fmt_ratio(f['p99_with_over_alone'])}", f["max_with_us"] < f["delay_us"])  # fmt: skip
        g = f["script"]
        add(f"same, script backend as deployed (slowest hit < {fmt_us(f['delay_us'])})",
            f"slowest {fmt_us(g['max_with_us'])}; {fmt_ratio(g['p50_with_over_alone'])} / "
            f"{fmt_ratio(g['p99_with_over_alone'])}", g["max_with_us"] < f["delay_us"])  # fmt: skip
    rss = sections.get("rss")
    if rss is not None:
        f = rss.figures
        add(f"server RSS with {f['connections']:,} idle connections < 150 MB",
            f"{f['rss_after_kb'] / MB:.1f} MB", f["rss_after_kb"] < 150 * MB)  # fmt: skip
    return found


def targets_table(found: list[dict[str, Any]]) -> str:
    """The targets as a Markdown table."""
    lines = ["| target (not asserted) | measured | met |", "|---|---|---|"]
    for t in found:
        met = "n/a" if t["met"] is None else ("yes" if t["met"] else "**no**")
        lines.append(f"| {t['target']} | {t['measured']} | {met} |")
    return "\n".join(lines)


def rss_table(f: dict[str, Any]) -> str:
    """The idle-connection memory figures as a Markdown table."""
    lines = [
        "| measure | value |",
        "|---|---:|",
        f"| server RSS, listening, no connection | {f['rss_before_kb'] / MB:.1f} MB |",
        f"| server RSS, {f['connections']:,} idle connections | {f['rss_after_kb'] / MB:.1f} MB |",
        f"| server peak RSS (VmHWM) | {f['hwm_kb'] / MB:.1f} MB |",
        f"| per connection | {f['per_connection_kb']:.1f} KB |",
        f"| opening them (handshake + one ping each) | {f['open_seconds']:.1f} s |",
    ]
    for name, kb in f["children_rss_kb"].items():
        lines.append(f"| child process {name} | {kb / MB:.1f} MB |")
    return "\n".join(lines)


def markdown(results: dict[str, Any], sections: list[Section]) -> str:
    """The whole report."""
    m, p = results["machine"], results["params"]
    mode = "`python -m bench --quick`" if results["quick"] else "`python -m bench`"
    load = ", ".join(f"{x:.2f}" for x in m["load_average"] or [])
    parts = [
        "# graphiti-bridge benchmarks",
        machine_line(m),
        f"Run: {mode}, started {results['started']}, took {results['duration_s']:.0f} s; "
        f"load average at start {load} (the machine is shared: compare ratios across "
        f"runs, not microseconds). Warm-up: {p['warmup']} requests per hit series, fewer "
        "for slower ones.",
        "Latency is the round trip seen by the client (µs, or ms above 1 ms), recorded in "
        "HdrHistograms. `vs floor` divides a row's p50 and p99 by those of the floor named "
        "in its section: a bare `websockets` echo server answering the same frames under "
        "the same load shape, in the same process and run. Targets are printed, never "
        "asserted.",
        "## Targets",
        targets_table(results["targets"]),
    ]
    for number, section in enumerate(sections, 1):
        parts += [f"## {number}. {section.title}", section.intro]
        if section.rows:
            parts.append(latency_table(section.rows))
        if section.key == "rss":
            parts.append(rss_table(section.figures))
        if section.notes:
            parts.append("\n".join(f"- {note}" for note in section.notes))
    parts.append("Plot: `latency.png` (percentile of requests against latency, log scales).")
    return "\n\n".join(parts) + "\n"


def write_json(path: Path, results: dict[str, Any], sections: list[Section]) -> None:
    """Everything, with each row's HdrHistogram encoded (``hdr``), as JSON."""
    data = dict(results, sections=[asdict(s) for s in sections])
    path.write_text(json.dumps(data, indent=2) + "\n")


def curve(histogram: HdrHistogram, points: int = 80) -> tuple[list[float], list[float]]:
    """(latency µs, fraction of requests at or below it) from 1% up to the last sample."""
    n = int(histogram.get_total_count())
    if n < 2:
        return [], []
    top = 1.0 - 1.0 / n
    low, high = math.log(0.01 / 0.99), math.log(top / (1.0 - top))
    xs: list[float] = []
    ys: list[float] = []
    for k in range(points):
        logit = low + (high - low) * k / (points - 1)
        fraction = 1.0 / (1.0 + math.exp(-logit))
        xs.append(float(histogram.get_value_at_percentile(100.0 * fraction)))
        ys.append(fraction)
    return xs, ys


def plot(path: Path, sections: list[Section], histograms: dict[str, HdrHistogram]) -> bool:
    """Latency CDFs, one line per series, hits and the rest in two panels; False if
    matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FixedLocator, FuncFormatter
    except ImportError:
        log.warning("matplotlib is not installed: no plot (pip install -e '.[bench]')")
        return False
    rows = [r for s in sections for r in s.rows if r["series"] in histograms]
    fig, axes = plt.subplots(1, 2, figsize=(16, 9), constrained_layout=True)
    colours = plt.get_cmap("tab20").colors
    titles = {FAST: "Cache hits and their floors", "slow": "Requests that reach memory"}
    for ax, panel in zip(axes, (FAST, "slow"), strict=True):
        n, after_floor = -1, False
        for r in (r for r in rows if r["panel"] == panel):
            floor = r["series"].startswith("floor")
            if not after_floor:  # a bridge row shares its floor's colour
                n += 1
            after_floor = floor
            xs, ys = curve(histograms[r["series"]])
            if xs:
                ax.plot(xs, ys, "--" if floor else "-", color=colours[(2 * n) % 20 + n // 10 % 2],
                        linewidth=1.6, label=f"{r['series']} (n={r['n']:,})")  # fmt: skip
        ax.set_xscale("log")
        ax.set_yscale("logit")
        ticks = [0.01, 0.1, 0.5, 0.9, 0.99, 0.999, 0.9999]
        ax.yaxis.set_major_locator(FixedLocator(ticks))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{100 * v:g}%"))
        ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
        ax.set_ylim(0.008, 0.99995)
        ax.set_xlabel("round-trip latency (µs, log scale)")
        ax.set_ylabel("requests at or below (percentile)")
        ax.set_title(titles[panel])
        ax.grid(True, which="major", alpha=0.4)
        ax.grid(True, which="minor", axis="x", alpha=0.15)
        if ax.lines:
            ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.09), ncol=1)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
