"""The suite of ``python -m bench`` (bench/registry.py, bench/suite.py, bench/report.py):
the sections found through the registry, the report built from their typed results, and
one short run of a section against a real bridge."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from hdrh.histogram import HdrHistogram  # type: ignore[import-untyped]

from bench import registry
from bench.__main__ import main
from bench.common import machine, new_histogram
from bench.harness import Run
from bench.params import QUICK
from bench.report import Report, markdown
from bench.rows import row_of
from bench.rss import IdleMemory
from bench.section import Section, Target
from bench.sections.original import Original
from bench.sections.rss import Rss

SECTIONS = ["hits", "misses", "writes", "original", "head_of_line", "cluster", "workers", "rss"]


def test_every_section_is_registered_once_in_run_order() -> None:
    entries = registry.sections()
    assert [e.key for e in entries] == SECTIONS
    assert [e.key for e in entries if e.measures_floor] == ["hits"]
    assert all(e.summary for e in entries)


def test_a_key_or_an_order_taken_twice_is_refused() -> None:
    async def other(run: Run) -> Section:
        return Section(title="other", intro="")

    registry.sections()  # every section registered, whichever test ran first
    with pytest.raises(ValueError, match="two sections are registered as 'hits'"):
        registry.section("hits", order=999)(other)
    with pytest.raises(ValueError, match="'other' and 'hits' both have order 10"):
        registry.section("other", order=10)(other)
    assert registry.keys() == SECTIONS


def test_the_command_line_lists_the_sections_and_refuses_an_unknown_one(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    listed = re.findall(r"^  (\w+) +\S", capsys.readouterr().out, re.MULTILINE)
    assert listed == SECTIONS
    with pytest.raises(SystemExit) as refused:
        main(["--only", "hits,nope"])
    assert refused.value.code == 2
    assert f"--only takes some of {', '.join(SECTIONS)}; got 'hits,nope'" in (
        capsys.readouterr().err
    )


def test_a_row_keeps_the_json_names_and_its_ratios_to_the_floor() -> None:
    floor, measured = new_histogram(), new_histogram()
    for us in (10, 20, 30):
        floor.record_value(us)
        measured.record_value(2 * us)
    floor_row = row_of("floor", floor)
    row = row_of("bridge", measured, floor=floor_row, panel="fast", keep_histogram=True)
    data = row.to_json()
    assert (data["floor"], data["p50_over_floor"], data["p99_over_floor"]) == ("floor", 2.0, 2.0)
    assert data["p99.9_us"] == row.p99_9_us and "p99_9_us" not in data
    assert HdrHistogram.decode(data["hdr"]).get_total_count() == 3
    assert "hdr" not in floor_row.to_json() and "panel" not in floor_row.to_json()


def test_the_report_reads_each_section_s_targets_tables_and_figures() -> None:
    memory = IdleMemory(
        connections=1000,
        open_seconds=0.5,
        rss_before_kb=50 * 1024,
        rss_after_kb=200 * 1024,
        hwm_kb=210 * 1024,
        per_connection_kb=153.6,
        children_rss_kb={"valkey-server (7)": 6 * 1024},
        nofile_limit=4096,
    )
    report = Report(
        machine=machine(None),
        quick=True,
        params=QUICK,
        started="2026-11-24 10:00 UTC",
        duration_s=1.0,
        sections={
            "original": Original(title="Original", intro="no misses section ran"),
            "rss": Rss(title="Memory", intro="idle", memory=memory),
        },
    )
    assert report.targets() == [
        Target("server RSS with 1,000 idle connections < 150 MB", "200.0 MB", False)
    ]
    text = markdown(report)
    assert "| server RSS with 1,000 idle connections < 150 MB | 200.0 MB | **no** |" in text
    assert "## 1. Original\n\nno misses section ran\n\n## 2. Memory" in text
    assert "| child process valkey-server (7) | 6.0 MB |" in text
    original, rss = report.to_json()["sections"]
    assert (original["key"], original["figures"]) == ("original", {})  # nothing measured
    assert rss["figures"]["rss_after_kb"] == 200 * 1024


def test_a_quick_run_of_one_section_writes_its_typed_result(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``writes`` alone, against a real bridge: no hits section ran, so the suite
    measured the closed-loop floor itself."""
    assert main(["--quick", "--only", "writes", "--out", str(tmp_path)]) == 0
    text = (tmp_path / "latest.md").read_text()
    assert "## 1. file:write acks and a mixed trace (default backend: SQLite)" in text
    assert capsys.readouterr().out.strip() == text.strip()
    data = json.loads((tmp_path / "latest.json").read_text())
    assert data["targets"] == [] and data["params"]["writes"] == QUICK.writes
    (section,) = data["sections"]
    assert section["key"] == "writes"
    assert sum(section["figures"]["mixed_counts"].values()) == QUICK.mixed
    ack = section["rows"][0]
    assert ack["series"] == "file:write ack (SQLite commit + invalidation)"
    assert ack["n"] == QUICK.writes
    assert ack["floor"] == "floor: echo, closed loop, 1 connection"
    assert HdrHistogram.decode(ack["hdr"]).get_total_count() == QUICK.writes
