"""The workers benchmark (bench/workers.py): one short run of ``python -m bench workers``
against real ``serve --workers N`` process trees, loaded by real client processes."""

from __future__ import annotations

import re

import pytest

from bench.workers import main

pytestmark = pytest.mark.slow

ROW = re.compile(r"\| (\d+) \| (hits|misses) \| ([\d,]+) \| ([\d.]+)x \| [\d.]+ ms \| [\d.]+ ms \|")


def test_a_quick_run_reports_hits_and_misses_per_worker_count(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["--quick", "--workers", "2"]) == 0
    rows = ROW.findall(capsys.readouterr().out)
    assert sorted((int(n), kind) for n, kind, _, _ in rows) == [
        (1, "hits"), (1, "misses"), (2, "hits"), (2, "misses")
    ]  # fmt: skip
    for workers, _, per_second, ratio in rows:
        assert int(per_second.replace(",", "")) > 0
        assert workers != "1" or ratio == "1.00"
