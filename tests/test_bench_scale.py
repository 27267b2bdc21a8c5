"""The scale benchmark (bench/scale.py): its workload generator and helpers without a
server, and one short run through a real SQLite bridge."""

from __future__ import annotations

import asyncio
import itertools
import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from bench import scale
from bench.process import BenchError
from bench.recall import Commit
from bench.scale import (
    ERROR_SHARE,
    Workload,
    cycle_prefix,
    latency_figures,
    load_commits,
    merge_rows,
    parse_sizes,
    plan,
    ranked_tree,
    zipf_cumulative,
)
from bridge.episode import new_episode
from bridge.memory.durable import EpisodeQueue
from tests.waiting import eventually


def commit(n: int, subject: str, files: list[str], body: str = "") -> Commit:
    """A synthetic commit ``n``."""
    return Commit(f"{n:040x}", 1_700_000_000.0 + n, subject, body, tuple(files))


def synthetic(count: int = 60, tree: int = 200) -> list[Commit]:
    """``count`` commits over a tree of ``tree`` files (src/mN.py), each naming 1-3 files."""
    return [
        commit(
            n,
            f"fix parser case {n} in module {n % 7}",
            [f"src/m{(n * k) % tree}.py" for k in range(1, 2 + n % 3)],
            body=f"Handle case {n}." if n % 2 else "",
        )
        for n in range(count)
    ]


def test_the_workload_is_deterministic_for_a_seed() -> None:
    commits = synthetic()
    a, b = Workload(commits, seed=3), Workload(commits, seed=3)
    assert [a.task(i) for i in range(300)] == [b.task(i) for i in range(300)]
    assert a.task(250) == Workload(commits, seed=3).task(250)  # any index, any order
    other = Workload(commits, seed=4)
    assert [a.task(i).files for i in range(50)] != [other.task(i).files for i in range(50)]


def test_a_task_is_a_chat_start_writes_maybe_an_error_and_a_completion() -> None:
    w = Workload(synthetic())
    for i in range(500):
        task = w.task(i)
        messages = task.messages("p")
        kinds = [m["type"] for m in messages]
        assert kinds[0] == "chat:start" and kinds[-1] == "completion"
        writes = kinds[1:-1]
        if task.error is not None:
            assert writes[-1] == "error"
            writes = writes[:-1]
        assert set(writes) == {"file:write"} and 1 <= len(writes) <= 6
        assert len(set(task.files)) == len(task.files) == len(writes)
        assert {m["session"] for m in messages} == {task.id}
        assert {m["project"] for m in messages} == {"p"}
        assert messages[0]["query"] == task.query == messages[-1]["task"]
        stored = messages[1:]
        assert len(stored) == task.episodes
        assert len({m["episode_id"] for m in stored}) == len(stored)
        ats = [m["at"] for m in stored]
        assert ats == sorted(ats)
        if task.error is not None:
            assert "Traceback" in task.error
            assert any(f'File "{f}"' in task.error for f in task.files)


def test_the_mix_has_its_shape() -> None:
    w = Workload(synthetic())
    tasks = [w.task(i) for i in range(3000)]
    errors = sum(t.error is not None for t in tasks) / len(tasks)
    assert ERROR_SHARE - 0.05 < errors < ERROR_SHARE + 0.05
    counts = Counter(len(t.files) for t in tasks)
    assert set(counts) == {1, 2, 3, 4, 5, 6}
    assert counts[1] > counts[6]
    assert any(t.summary is None for t in tasks) and any(t.summary for t in tasks)
    assert len({t.id for t in tasks}) == len(tasks)


def test_some_files_are_hot() -> None:
    w = Workload(synthetic(count=1000, tree=200))
    writes = Counter(f for i in range(1000) for f in w.task(i).files)  # the first cycle
    total = sum(writes.values())
    ranked = [n for _, n in writes.most_common()]
    top = max(1, len(ranked) // 20)  # the hottest 5% of the files written
    assert sum(ranked[:top]) / total > 0.25
    assert ranked[0] > 10 * ranked[len(ranked) // 2]


def test_later_cycles_live_under_their_package() -> None:
    commits = synthetic(count=40)
    w = Workload(commits)
    first, later = w.task(5), w.task(2 * 40 + 5)
    assert cycle_prefix(0) == "" and cycle_prefix(2) == "pkg2/"
    assert not any(f.startswith("pkg") for f in first.files)
    assert all(f.startswith("pkg2/") for f in later.files)
    assert commits[5].subject in later.query and "pkg2" in later.query
    assert later.id != first.id and later.at > first.at


def test_the_tree_is_ranked_by_popularity_and_zipf_weights_fall() -> None:
    commits = [commit(0, "a", ["x", "y"]), commit(1, "b", ["y", "z"]), commit(2, "c", ["y"])]
    assert ranked_tree(commits) == ["y", "x", "z"]
    cum = zipf_cumulative(4, 1.0)
    steps = [cum[0]] + [b - a for a, b in itertools.pairwise(cum)]
    assert steps == pytest.approx([1, 1 / 2, 1 / 3, 1 / 4])


def test_miss_queries_are_distinct_and_never_repeat_across_runs() -> None:
    w = Workload(synthetic())
    qs = w.miss_queries(50, 100, "a1")
    assert len(set(qs)) == 50
    assert not set(qs) & set(w.miss_queries(50, 100, "b2"))


def write_histories(folder: Path) -> list[Path]:
    """Two small history files whose commits interleave in time (the bench's input shape)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for h, name in enumerate(("alpha", "beta")):
        rows = [
            {"sha": f"{name}{n}", "at": 1_600_000_000 + 10 * n + h, "subject": f"fix {name} {n}",
             "body": "", "files": [f"{name}/m{n % 5}.py", f"tests/test_{name}.py"]}
            for n in range(150)
        ]  # fmt: skip
        path = folder / f"{name}-history.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        paths.append(path)
    return paths


def test_histories_load_merged_in_time_order(tmp_path: Path) -> None:
    paths = write_histories(tmp_path)
    assert scale.history_paths(tmp_path) == paths
    commits = load_commits(paths)
    assert len(commits) == 300
    ats = [c.at for c in commits if c.at is not None]
    assert ats == sorted(ats)
    assert {c.sha[:4] for c in commits[:2]} == {"alph", "beta"}, "the files interleave"


def test_helpers() -> None:
    assert parse_sizes("1000, 10k,1M,1000") == [1000, 10_000, 1_000_000]
    with pytest.raises(ValueError):
        parse_sizes("0")
    assert plan([1000, 10_000, 100_000], 0) == ([1000, 10_000, 100_000], [])
    assert plan([1000, 10_000, 100_000], 10_003) == ([10_000, 100_000], [1000])
    assert plan([1000, 10_000], 200_000) == ([10_000], [1000])
    figures = latency_figures("x", [1000.0, 2000.0, 3000.0])
    assert figures == {"x_p50_ms": 2.0, "x_p99_ms": 3.0, "x_max_ms": 3.0}
    assert latency_figures("x", [])["x_p50_ms"] is None
    old = [{"backend": "sqlite", "size": 1, "v": 1}, {"backend": "sqlite", "size": 2, "v": 1}]
    new = [{"backend": "sqlite", "size": 1, "skipped": "yes"}, {"backend": "sqlite", "size": 2}]
    assert merge_rows(old, new) == [old[0], new[1]]


async def test_a_load_ends_once_the_outbox_is_empty(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = tmp_path / "data"
    assert scale.outbox_pending(data) == 0  # no outbox yet
    outbox = EpisodeQueue(data / scale.OUTBOX)  # the bridge's own outbox file
    await outbox.open()
    try:
        queued = [new_episode("p", "error", f"Error: {n}", "test", {}) for n in range(3)]
        for item in queued:
            await outbox.append(item)
        assert scale.outbox_pending(data) == 3
        with pytest.raises(BenchError, match="3 acknowledged episodes still in the outbox"):
            await scale.drain(data, timeout=0.2)
        seen: list[int] = []  # what the drain found at each look at the outbox
        count = scale.outbox_pending

        def counted(data_dir: Path) -> int:
            seen.append(count(data_dir))
            return seen[-1]

        async def drain_sees(left: int) -> None:
            await eventually(lambda: left in seen, f"the drain to see {left} episodes left")

        monkeypatch.setattr(scale, "outbox_pending", counted)
        waiting = asyncio.create_task(scale.drain(data, timeout=60))
        for n, item in enumerate(queued):  # delivered to memory one by one
            await drain_sees(len(queued) - n)
            assert not waiting.done()
            await outbox.remove(item.uuid)
        assert await waiting > 0  # the seconds it waited
        assert scale.outbox_pending(data) == 0
    finally:
        await outbox.close()


def short_run(tmp_path: Path, backend: str) -> list[dict[str, Any]]:
    """A 200- then 400-episode run through a real bridge of ``backend``: its rows, checked."""
    out, store = tmp_path / "out", tmp_path / "store"
    argv = ["--backend", backend, "--sizes", "200,400", "--misses", "20", "--warmup", "2"]
    argv += ["--store-dir", str(store), "--out", str(out), "--no-uvloop"]
    argv += ["--history", *map(str, write_histories(tmp_path / "histories"))]
    assert scale.main(argv) == 0
    results = json.loads((out / "scale.json").read_text())
    rows: list[dict[str, Any]] = results["rows"]
    assert [(r["backend"], r["size"]) for r in rows] == [(backend, 200), (backend, 400)]
    for r in rows:
        assert r["episodes"] >= r["size"] and r["tasks"] > 0
        assert r["ingest_eps"] > 0 and r["loaded_episodes"] > 0
        assert r["drain_s"] >= 0 and r["window"] == scale.WINDOW[backend]
        assert r["misses"] == 20 and r["cache_hits"] == 0
        assert r["miss_rtt_p50_ms"] > 0 and r["miss_rtt_p99_ms"] >= r["miss_rtt_p50_ms"]
        assert r["miss_server_p50_ms"] > 0
        assert 0 <= r["empty_misses"] <= r["misses"]
        assert r["disk_mb"] > 0 and r["bridge_rss_mb"] > 0 and r["valkey_rss_mb"] > 0
    assert rows[1]["episodes"] > rows[0]["episodes"]
    # A new bridge on the same store: its index rebuilt from the store, memory answers.
    assert "restart_listen_s" not in rows[0]
    assert rows[1]["restart_listen_s"] > 0 and rows[1]["restart_first_miss_ms"] > 0
    assert rows[1]["restart_context_s"] >= rows[1]["restart_listen_s"]
    report = (out / "scale.md").read_text()
    assert "then a new bridge on the same store listened in" in report
    assert report.count(f"| {backend} |") == 2
    assert (out / "scale.png").stat().st_size > 0
    state = json.loads((store / scale.META).read_text())
    assert state["episodes"] == rows[1]["episodes"]
    assert scale.outbox_pending(store / "data") == 0  # every episode was in memory
    return rows


def test_a_short_run_through_a_real_sqlite_bridge(tmp_path: Path) -> None:
    rows = short_run(tmp_path, "sqlite")
    assert all(r["falkordb_rss_mb"] is None for r in rows)


def test_a_short_run_through_a_real_graphiti_bridge(tmp_path: Path) -> None:
    rows = short_run(tmp_path, "graphiti")  # --llm off, on its own FalkorDB
    assert all(r["falkordb_rss_mb"] > 0 and r["retried_events"] == 0 for r in rows)
