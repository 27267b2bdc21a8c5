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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from hdrh.histogram import HdrHistogram  # type: ignore[import-untyped]

from bench.common import fmt_ratio, fmt_us, machine_line
from bench.params import Params
from bench.rows import FAST, SLOW, Row
from bench.section import Section, Target

log = logging.getLogger("bench.report")


@dataclass(frozen=True)
class Report:
    """A finished run: where and how it ran, and each section's result by key, in order."""

    machine: dict[str, Any]
    quick: bool
    params: Params
    started: str
    duration_s: float
    sections: dict[str, Section]

    def targets(self) -> list[Target]:
        """Every section's targets, in section order."""
        return [t for section in self.sections.values() for t in section.targets()]

    def to_json(self) -> dict[str, Any]:
        """Everything, each row with its HdrHistogram encoded (``hdr``)."""
        return {
            "machine": self.machine,
            "quick": self.quick,
            "params": asdict(self.params),
            "started": self.started,
            "duration_s": self.duration_s,
            "targets": [asdict(t) for t in self.targets()],
            "sections": [s.to_json(key) for key, s in self.sections.items()],
        }


def latency_table(rows: Iterable[Row]) -> str:
    """Rows as: series | n | p50 | p90 | p99 | p99.9 | vs floor (p50 / p99) | throughput."""
    lines = [
        "| series | n | p50 | p90 | p99 | p99.9 | vs floor (p50 / p99) | throughput |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        rps = r.throughput_rps
        lines.append(
            f"| {r.series} | {r.n:,} | {fmt_us(r.p50_us)} | {fmt_us(r.p90_us)} "
            f"| {fmt_us(r.p99_us)} | {fmt_us(r.p99_9_us)} "
            f"| {fmt_ratio(r.p50_over_floor)} / {fmt_ratio(r.p99_over_floor)} "
            f"| {'-' if rps is None else f'{rps:,.0f}/s'} |"
        )
    return "\n".join(lines)


def targets_table(found: list[Target]) -> str:
    """The targets as a Markdown table."""
    lines = ["| target (not asserted) | measured | met |", "|---|---|---|"]
    for t in found:
        met = "n/a" if t.met is None else ("yes" if t.met else "**no**")
        lines.append(f"| {t.target} | {t.measured} | {met} |")
    return "\n".join(lines)


def markdown(report: Report) -> str:
    """The whole report."""
    m, p = report.machine, report.params
    mode = "`python -m bench --quick`" if report.quick else "`python -m bench`"
    load = ", ".join(f"{x:.2f}" for x in m["load_average"] or [])
    parts = [
        "# graphiti-bridge benchmarks",
        machine_line(m),
        f"Run: {mode}, started {report.started}, took {report.duration_s:.0f} s; "
        f"load average at start {load} (the machine is shared: compare ratios across "
        f"runs, not microseconds). Warm-up: {p.warmup} requests per hit series, fewer "
        "for slower ones.",
        "Latency is the round trip seen by the client (µs, or ms above 1 ms), recorded in "
        "HdrHistograms. `vs floor` divides a row's p50 and p99 by those of the floor named "
        "in its section: a bare `websockets` echo server answering the same frames under "
        "the same load shape, in the same process and run. Targets are printed, never "
        "asserted.",
        "## Targets",
        targets_table(report.targets()),
    ]
    for number, section in enumerate(report.sections.values(), 1):
        parts += [f"## {number}. {section.title}", section.intro]
        if section.rows:
            parts.append(latency_table(section.rows))
        parts += section.tables()
        if section.notes:
            parts.append("\n".join(f"- {note}" for note in section.notes))
    parts.append("Plot: `latency.png` (percentile of requests against latency, log scales).")
    return "\n\n".join(parts) + "\n"


def write(out: Path, report: Report, histograms: dict[str, HdrHistogram]) -> tuple[str, list[Path]]:
    """Write ``latest.md``, ``latest.json`` and (with matplotlib) ``latency.png`` under
    ``out``; the Markdown and the files written."""
    out.mkdir(parents=True, exist_ok=True)
    text = markdown(report)
    (out / "latest.md").write_text(text)
    (out / "latest.json").write_text(json.dumps(report.to_json(), indent=2) + "\n")
    wrote = [out / "latest.md", out / "latest.json"]
    if plot(out / "latency.png", list(report.sections.values()), histograms):
        wrote.append(out / "latency.png")
    return text, wrote


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
    rows = [r for s in sections for r in s.rows if r.series in histograms]
    fig, axes = plt.subplots(1, 2, figsize=(16, 9), constrained_layout=True)
    colours = plt.get_cmap("tab20")  # 20 colours, called by index
    titles = {FAST: "Cache hits and their floors", SLOW: "Requests that reach memory"}
    for ax, panel in zip(axes, (FAST, SLOW), strict=True):
        n, after_floor = -1, False
        for r in (r for r in rows if r.panel == panel):
            floor = r.series.startswith("floor")
            if not after_floor:  # a bridge row shares its floor's colour
                n += 1
            after_floor = floor
            xs, ys = curve(histograms[r.series])
            if xs:
                ax.plot(xs, ys, "--" if floor else "-", color=colours((2 * n) % 20 + n // 10 % 2),
                        linewidth=1.6, label=f"{r.series} (n={r.n:,})")  # fmt: skip
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
