"""The recall benchmark (bench/recall.py): its pure parts on a tiny synthetic history, and
one short replay through a real bridge."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from bench import recall
from bench.recall import (
    Case,
    Commit,
    Outcome,
    Turn,
    bm25_files,
    cases,
    comparison,
    first_distinct,
    is_version_bump,
    path_tokens,
    predicted_paths,
    recent_files,
    replay_window,
    row_key,
    said_nothing,
    score,
    summarise,
    usable,
    words,
)
from tests.conftest import ws_url

if TYPE_CHECKING:
    from bridge.runtime.app import App


def commit(n: int, subject: str, files: list[str], body: str = "") -> Commit:
    """A synthetic commit ``n`` (its sha and time follow from ``n``)."""
    return Commit(f"{n:040x}", 1_700_000_000.0 + 60 * n, subject, body, tuple(files))


HISTORY: list[Commit] = [
    commit(1, "Initial parser and lexer", ["src/parser.py", "src/lexer.py", "app.py"]),
    commit(2, "Add README", ["README.md"]),
    commit(3, "Fix parser crash on empty tokens", ["src/parser.py", "tests/test_parser.py"]),
    commit(4, "Merge branch 'main' into dev", ["src/parser.py"]),
    commit(5, "Version 0.2.0", ["pyproject.toml"]),
    commit(6, "Lexer handles unicode identifiers", ["src/lexer.py", "tests/test_lexer.py"]),
    commit(7, "Document the parser API", ["docs/parser.md", "README.md"]),
    commit(8, "Configuration loader reads TOML", ["src/config.py", "tests/test_config.py"]),
    commit(9, "Parser error messages name the token", ["src/parser.py", "src/errors.py"]),
    commit(10, "Too big to be one task", [f"src/gen/m{i}.py" for i in range(13)]),
    commit(11, "Config: default port is 8080", ["src/config.py", "docs/config.md"]),
    commit(12, "Lexer speed-up for long identifiers", ["src/lexer.py"]),
    commit(
        13, "Parser recovers after an unexpected token", ["src/parser.py", "tests/test_parser.py"]
    ),
    commit(14, "App entry point reads the config", ["app.py", "src/config.py"]),
    commit(
        15,
        "Fix lexer crash on empty input",
        ["src/lexer.py", "tests/test_lexer.py"],
        body="The lexer indexed past the end of an empty string.",
    ),
    commit(16, "Parser handles nested tokens", ["src/parser.py", "src/lexer.py"]),
    commit(17, "Config reload on SIGHUP", ["src/config.py", "app.py"]),
    commit(18, "Document the lexer", ["docs/lexer.md", "src/lexer.py"]),
]


def write_history(path: Path, commits: list[Commit]) -> Path:
    """A history file of JSON lines, as the bench reads them."""
    with path.open("w") as f:
        for c in commits:
            line = {"sha": c.sha, "at": c.at, "subject": c.subject, "body": c.body}
            f.write(json.dumps({**line, "files": list(c.files)}) + "\n")
    return path


# -- which commits are tasks --------------------------------------------------------------


@pytest.mark.parametrize(
    "subject",
    [
        "Bump version to 8.3.dev",
        "bump to 2.7.2",
        "Bump to dev version",
        "Release 1.2.3",
        "release version 8.4.1",
        "Version 1.2.3",
        "Version 0.35.0 (#2654)",
        "version 3.3.5, fixed a regression",
        "v1.2.3",
        "1.2.3",
        "v4.2.0-rc1 (#2005)",
        "Prepare release 2.0",
        "Preparation for release 6.2.0",
        "start version 8.1.0.dev0",
        "version bump!",
        "chore(release): 1.4.0",
    ],
)
def test_version_bumps_are_recognised(subject: str) -> None:
    assert is_version_bump(subject)


@pytest.mark.parametrize(
    "subject",
    [
        "Bump pytest from 7.0 to 8.0",
        "Fix version string",
        "prepare for the future",
        "release already acquired connections",
        "Add --version option",
        "Drop Python 3.8",
    ],
)
def test_ordinary_subjects_are_tasks(subject: str) -> None:
    assert not is_version_bump(subject)


def test_usable_commits_skip_merges_bumps_empty_and_large() -> None:
    skipped = {c.subject for c in HISTORY if not usable(c)}
    assert skipped == {"Merge branch 'main' into dev", "Version 0.2.0", "Too big to be one task"}
    assert not usable(commit(99, "No files", []))
    assert usable(commit(99, "Twelve files", [f"f{i}.py" for i in range(12)]))
    assert not usable(commit(99, "  ", ["a.py"]))


def test_replay_window_is_the_last_usable_commits() -> None:
    window, first = replay_window(HISTORY, scored=5, warmup=4)
    assert [c.subject for c in window] == [c.subject for c in HISTORY if usable(c)][-9:]
    assert first == 4
    whole, first = replay_window(HISTORY, scored=300, warmup=100)
    assert len(whole) == 15 and first == 0  # a short history: everything is scored


def test_replay_window_before_the_end_is_an_earlier_era() -> None:
    kept = [c.subject for c in HISTORY if usable(c)]
    window, first = replay_window(HISTORY, scored=5, warmup=4, before=3)
    assert [c.subject for c in window] == kept[-12:-3] and first == 4
    early, first = replay_window(HISTORY, scored=5, warmup=4, before=12)
    assert [c.subject for c in early] == kept[:3] and first == 0
    assert replay_window(HISTORY, scored=5, warmup=4, before=100) == ([], 0)


def test_history_file_round_trip(tmp_path: Path) -> None:
    path = write_history(tmp_path / "tiny-history.jsonl", HISTORY)
    assert recall.load_history(path) == HISTORY
    assert recall.history_name(path) == "tiny"
    sparse = recall.parse_commit('{"sha": "abc", "subject": "s", "files": ["a", "a", "b"]}')
    assert sparse == Commit("abc", None, "s", "", ("a", "b"))


# -- paths in a context -------------------------------------------------------------------


def test_path_tokens_are_whole_tokens() -> None:
    text = "- Modified: uvicorn/app.py (2024-01-01 10:00 UTC)\nsee [1] app.py, `b.py`; 'c.py'."
    assert path_tokens(text) == [
        "-", "Modified", "uvicorn/app.py", "2024-01-01", "10:00", "UTC", "see", "1", "app.py",
        "b.py", "c.py",
    ]  # fmt: skip
    assert path_tokens('x="src/a.py":') == ["x=", "src/a.py"]


def test_a_path_inside_a_longer_path_does_not_count() -> None:
    seen = {"app.py", "uvicorn/app.py"}
    assert predicted_paths("Modified: uvicorn/app.py.", seen) == ["uvicorn/app.py"]
    assert predicted_paths("Modified: app.py:", seen) == ["app.py"]
    assert predicted_paths("Modified: old/app.py", seen) == []


def test_only_seen_paths_count() -> None:
    seen = {"src/parser.py"}
    assert predicted_paths("src/lexer.py src/parser.py src/new.py", seen) == ["src/parser.py"]
    assert predicted_paths(None, seen) == []
    assert predicted_paths("", seen) == []


def test_first_eight_distinct_in_order_of_appearance() -> None:
    paths = [f"p{i}.py" for i in range(10)]
    text = " ".join(["p3.py", "p3.py", *paths, "p9.py"])
    assert predicted_paths(text, set(paths)) == ["p3.py", "p0.py", "p1.py", "p2.py", "p4.py",
                                                 "p5.py", "p6.py", "p7.py"]  # fmt: skip
    assert first_distinct(["a", "b", "a", "c"], 2) == ["a", "b"]


def test_only_the_first_2000_characters_are_read() -> None:
    seen = {"early.py", "late.py", "edge.py"}
    text = "early.py " + "x" * (2000 - 9 - 4) + " edge.py " + "late.py"
    assert text.index("edge.py") < 2000 < text.index("edge.py") + len("edge.py")
    assert predicted_paths(text, seen) == ["early.py"]  # edge.py is cut: "edg" is not a path
    assert predicted_paths(text, seen, cut=len(text)) == ["early.py", "edge.py", "late.py"]


def test_score_is_file_recall() -> None:
    assert score(["a", "b", "x"], ["a", "b", "c", "d"]) == 0.5
    assert score([], ["a"]) == 0.0
    assert score(["a"], []) == 0.0


# -- references ---------------------------------------------------------------------------


def test_recent_files_most_recent_first() -> None:
    past = [commit(1, "one", ["a", "b"]), commit(2, "two", ["c", "a"]), commit(3, "three", ["d"])]
    assert recent_files(past) == ["d", "a", "c", "b"]
    assert recent_files(past, top=2) == ["d", "a"]
    assert recent_files([]) == []


def test_words_split_paths_and_camel_case() -> None:
    assert words("src/http_server/HTTPServer-v2.py") == ["src", "http", "server", "http",
                                                        "server", "v2", "py"]  # fmt: skip
    assert words("parseJSONBody, fix!") == ["parse", "json", "body", "fix"]


def test_bm25_ranks_tasks_and_lists_their_files() -> None:
    past = [
        commit(1, "Add lexer", ["src/lexer.py"]),
        commit(2, "Fix parser crash", ["src/parser.py", "tests/test_parser.py"]),
        commit(3, "Docs", ["docs/index.md"]),
        commit(4, "Parser speed", ["src/parser.py", "src/fast.py"]),
    ]
    found = bm25_files(past, "parser crash on empty input")
    assert found[:2] == ["src/parser.py", "tests/test_parser.py"]  # task 2 matches best
    assert "src/fast.py" in found  # task 4 matches "parser" too
    assert "docs/index.md" not in found and "src/lexer.py" not in found  # no shared word
    assert bm25_files(past, "unrelated words") == []
    assert bm25_files([], "parser") == []
    # the words of a task's paths count: "lexer" is only in task 1's subject and path
    assert bm25_files(past, "lexer")[0] == "src/lexer.py"
    # ties go to the more recent task
    twins = [commit(1, "Cache", ["old.py"]), commit(2, "Cache", ["new.py"])]
    assert bm25_files(twins, "cache") == ["new.py", "old.py"]


def test_cases_score_seen_files_only() -> None:
    window, first = replay_window(HISTORY, scored=6, warmup=3)
    found = cases(window, first)
    assert found, "some commits of the window have seen files"
    for case in found:
        assert case.index >= first
        earlier = {f for c in window[: case.index] for f in c.files}
        assert case.seen == earlier
        assert set(case.target) == set(window[case.index].files) & earlier
        assert case.target and len(case.recent) <= 8 and len(case.bm25) <= 8
        assert set(case.recent) <= earlier and set(case.bm25) <= earlier
        assert list(case.recent) == recent_files(window[: case.index])
    # a commit whose files were never written before is not scored
    fresh = [commit(1, "a", ["a.py"]), commit(2, "b", ["b.py"]), commit(3, "a again", ["a.py"])]
    assert [c.index for c in cases(fresh, 0)] == [2]


def test_prompts_that_say_nothing_replace_the_same_commits_every_time() -> None:
    many = [commit(n, f"Subject {n}", [f"m{n % 7}.py"], body=f"body {n}") for n in range(400)]
    assert said_nothing(many, 0.0) == (many, frozenset())
    asked, shas = said_nothing(many, 0.25)
    assert (asked, shas) == said_nothing(many, 0.25)  # follows from the shas alone
    assert 60 <= len(shas) <= 140  # about a quarter of 400
    for before, after in zip(many, asked, strict=True):
        assert (after.sha, after.at, after.files) == (before.sha, before.at, before.files)
        if after.sha in shas:
            assert after.subject in recall.GENERIC_PROMPTS and after.body == ""
        else:
            assert after == before
    assert {c.subject for c in asked if c.sha in shas} == set(recall.GENERIC_PROMPTS)
    assert shas <= said_nothing(many, 0.5)[1]  # a larger share asks these and more
    everything, all_shas = said_nothing(many, 1.0)
    assert all_shas == {c.sha for c in many}
    assert all(c.subject in recall.GENERIC_PROMPTS for c in everything)
    window, first = replay_window(HISTORY, scored=6, warmup=3)
    window, shas = said_nothing(window, 0.5)
    found = cases(window, first, generic=shas)
    assert {c.sha for c in found if c.generic} == shas & {c.sha for c in found}


def test_summary_row() -> None:
    case = Case(0, "s", "q", frozenset({"a", "b"}), ("a", "b"), ("a",), ())
    outcomes = [
        Outcome(
            case,
            Turn("s", "a", False, 2000, 1500),
            {"memory": ["a"], "recent": ["a"], "bm25": []},
            {"memory": 0.5, "recent": 0.5, "bm25": 0.0},
        ),
        Outcome(
            case,
            Turn("s", None, True, 100, 50),
            {"memory": [], "recent": ["a"], "bm25": []},
            {"memory": 0.0, "recent": 0.5, "bm25": 0.0},
        ),
    ]
    row = summarise("h", "summary", "sqlite", 5, outcomes)
    assert row["scored"] == 2 and row["replayed"] == 5
    assert row["memory_recall"] == 0.25 and row["memory_hit_rate"] == 0.5
    assert row["recent_recall"] == 0.5 and row["bm25_recall"] == 0.0
    assert row["ratio"] == 0.5
    assert row["context_chars_median"] == 0.5 and row["empty_contexts"] == 1
    assert row["cache_hits"] == 1 and row["misses"] == 1
    assert row["miss_rtt_p50_ms"] == 2.0 and row["miss_server_p99_ms"] == 1.5
    assert "generic_scored" not in row and recall.generic_table([row]) is None
    assert "| h | summary | sqlite | 2 | 0.250 | 0.500 |" in recall.table([row])
    asked = [
        Outcome(replace(o.case, generic=True), o.turn, o.predicted, o.recall) for o in outcomes
    ]
    generic = summarise("h", "summary", "sqlite", 5, [asked[1], outcomes[0]])
    assert generic["generic_scored"] == 1 and generic["generic_recent_recall"] == 0.5
    assert generic["generic_memory_recall"] == 0.0 and generic["generic_bm25_recall"] == 0.0
    assert "| h | summary | sqlite | 1 | 0.000 | 0.500 | 0.000 |" in str(
        recall.generic_table([generic])
    )
    later = {**row, "memory_recall": 0.75}
    text = comparison({"started": "then", "rows": [row]}, [later])
    assert text is not None and "0.250 → 0.750" in text


# -- through a real bridge ----------------------------------------------------------------


async def test_replay_through_a_bridge(app: App, tmp_path: Path) -> None:
    path = write_history(tmp_path / "tiny-history.jsonl", HISTORY)
    history = recall.prepare(path, scored=10, warmup=5)
    assert len(history.window) == 15 and history.first_scored == 5
    rows: list[dict[str, Any]] = []
    for mode in recall.MODES:
        rows.append(
            await recall.measure(ws_url(app), history, mode, "sqlite", save=tmp_path / "ctx")
        )
    for row, mode in zip(rows, recall.MODES, strict=True):
        assert row["history"] == "tiny" and row["mode"] == mode and row["backend"] == "sqlite"
        assert row["replayed"] == 15 and row["scored"] == len(history.cases) > 0
        for key in ("memory_recall", "recent_recall", "bm25_recall", "memory_hit_rate"):
            assert 0.0 <= row[key] <= 1.0
        assert row["cache_hits"] + row["misses"] == row["scored"]
        assert row["context_chars_median"] is not None
        folder = tmp_path / "ctx" / "sqlite" / f"tiny-{mode}"
        records = [json.loads(line) for line in (folder / "commits.jsonl").read_text().splitlines()]
        assert len(records) == 15 and sum(r["scored"] for r in records) == row["scored"]
        named = [r for r in records if r["scored"] and r["predicted"]["memory"]]
        assert named, "the memory's contexts name at least one seen file"
        for r in named:
            context = (folder / r["context"]).read_text()
            assert all(p in context for p in r["predicted"]["memory"])


def test_command_line_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``python -m bench recall`` on a bridge process of its own, compared with a baseline."""
    path = write_history(tmp_path / "tiny-history.jsonl", HISTORY)
    out = tmp_path / "out"
    out.mkdir()
    earlier = {"backend": "sqlite", "scored": 3, "memory_recall": 0.1, "memory_hit_rate": 0.2}
    baseline = {"started": "earlier", "rows": [{"history": "tiny", "mode": "summary", **earlier}]}
    (out / "recall.json").write_text(json.dumps(baseline))
    argv = ["--history", str(path), "--limit", "5", "--mode", "summary", "--out", str(out)]
    assert recall.main([*argv, "--before", "2"]) == 0  # an earlier era: two commits early
    text = (out / "recall.md").read_text()
    assert capsys.readouterr().out.strip() == text.strip()
    assert "| tiny | summary | sqlite |" in text
    assert "each history ended 2 usable commits early" in text
    assert "## Before and after" in text and "0.100 → " in text
    results = json.loads((out / "recall.json").read_text())
    assert [row_key(r) for r in results["rows"]] == [("tiny", "summary", "sqlite")]
    assert results["histories"]["tiny"]["replayed"] == 13
    assert results["params"]["scored"] == 5 and results["params"]["before"] == 2
    assert "## Prompts that say nothing" not in text


def test_command_line_run_with_prompts_that_say_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--generic 1`` asks every commit by a prompt that says nothing, through a real
    bridge, and scores those commits apart."""
    path = write_history(tmp_path / "tiny-history.jsonl", HISTORY)
    out = tmp_path / "out"
    argv = ["--history", str(path), "--limit", "5", "--mode", "summary", "--out", str(out)]
    assert recall.main([*argv, "--generic", "1"]) == 0
    text = capsys.readouterr().out
    assert "## Prompts that say nothing" in text and '"continue"' in text
    results = json.loads((out / "recall.json").read_text())
    (row,) = results["rows"]
    assert results["params"]["generic"] == 1.0
    assert row["generic_scored"] == row["scored"] > 0
    assert row["generic_memory_recall"] == row["memory_recall"]
    assert row["generic_recent_recall"] == row["recent_recall"]


@pytest.mark.parametrize("share", ["-0.1", "1.5"])
def test_generic_share_out_of_range_is_refused(
    share: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        recall.parse_args(["--generic", share])
    assert "--generic must be a share from 0 to 1" in capsys.readouterr().err
