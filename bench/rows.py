"""One measured series as a report row: its percentiles, throughput and ratios to a floor.

A row is typed (``Row``) and frozen; ``Row.to_json`` gives the dict the JSON files have
always held (``p99.9_us`` and all). ``row_of`` reads a histogram into a row, its p50 and
p99 given as multiples of a floor row's (a floor row is its own reference).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Final, Literal

from hdrh.histogram import HdrHistogram  # type: ignore[import-untyped]

from bench.common import Series

Panel = Literal["fast", "slow"]
FAST: Final[Panel] = "fast"  # plot panel of sub-millisecond series
SLOW: Final[Panel] = "slow"  # plot panel of series that reach memory
OPTIONAL: Final = ("panel", "hdr", "throughput_over_one_worker")  # left out when None


@dataclass(frozen=True, kw_only=True)
class Row:
    """The figures of one histogram, in microseconds, with ratios to a floor."""

    series: str
    n: int
    min_us: int
    mean_us: float
    stddev_us: float
    max_us: int
    throughput_rps: float | None
    cpu_us_per_request: float | None
    p50_us: int
    p90_us: int
    p99_us: int
    p99_9_us: int
    floor: str
    p50_over_floor: float
    p99_over_floor: float
    panel: Panel | None = None
    hdr: str | None = None
    throughput_over_one_worker: float | None = None

    def to_json(self) -> dict[str, Any]:
        """The row as the JSON files hold it."""
        return {
            ("p99.9_us" if k == "p99_9_us" else k): v
            for k, v in asdict(self).items()
            if not (k in OPTIONAL and v is None)
        }


def row_of(
    name: str,
    histogram: HdrHistogram,
    *,
    throughput: float | None = None,
    cpu_us: float | None = None,
    floor: Row | None = None,
    panel: Panel | None = None,
    keep_histogram: bool = False,
) -> Row:
    """The row of ``histogram``; ratios to ``floor`` (None: this row is the floor), the
    encoded histogram kept in ``hdr`` if asked."""
    p50, p90, p99, p99_9 = (int(histogram.get_value_at_percentile(p)) for p in (50, 90, 99, 99.9))
    reference, ref50, ref99 = (name, p50, p99) if floor is None else (
        floor.series, floor.p50_us, floor.p99_us
    )  # fmt: skip
    return Row(
        series=name,
        n=int(histogram.get_total_count()),
        min_us=int(histogram.get_min_value()),
        mean_us=round(float(histogram.get_mean_value()), 1),
        stddev_us=round(float(histogram.get_stddev()), 1),
        max_us=int(histogram.get_max_value()),
        throughput_rps=None if throughput is None else round(throughput, 1),
        cpu_us_per_request=None if cpu_us is None else round(cpu_us, 1),
        p50_us=p50,
        p90_us=p90,
        p99_us=p99,
        p99_9_us=p99_9,
        floor=reference,
        p50_over_floor=round(p50 / max(ref50, 1), 2),
        p99_over_floor=round(p99 / max(ref99, 1), 2),
        panel=panel,
        hdr=histogram.encode().decode() if keep_histogram else None,
    )


def series_row(series: Series, floor: Row | None = None, panel: Panel | None = None) -> Row:
    """``row_of`` a measured series, with its throughput and CPU per request."""
    return row_of(
        series.name,
        series.histogram,
        throughput=series.throughput,
        cpu_us=series.cpu_us,
        floor=floor,
        panel=panel,
    )


def markdown_table(rows: list[Row]) -> str:
    """The rows as a Markdown table with max and CPU columns (bench.hits' layout)."""
    header = (
        "| series | n | p50 µs | p90 µs | p99 µs | p99.9 µs | max µs "
        "| p50/floor | p99/floor | req/s | CPU µs/req |"
    )
    lines = [header, "|" + "---|" * header.count(" | ") + "---|"]
    for r in rows:
        rps = "-" if r.throughput_rps is None else f"{r.throughput_rps:,.0f}"
        cpu = "-" if r.cpu_us_per_request is None else f"{r.cpu_us_per_request:.0f}"
        lines.append(
            f"| {r.series} | {r.n} | {r.p50_us} | {r.p90_us} | {r.p99_us} "
            f"| {r.p99_9_us} | {r.max_us} | {r.p50_over_floor:.2f} "
            f"| {r.p99_over_floor:.2f} | {rps} | {cpu} |"
        )
    return "\n".join(lines)
