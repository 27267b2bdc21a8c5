"""Fusion and rendering of recalled tasks and files: plain code, no store needed."""

from __future__ import annotations

import itertools
import re
from typing import Any

import msgspec

from bridge.memory.index import ProjectIndex
from bridge.memory.recall import (
    CONTEXT_HEADER,
    CONTEXT_LAST_LINE,
    Candidates,
    Ranked,
    RecentTask,
    TaskHit,
    Window,
    asked_before,
    context,
    rank,
    render,
    words,
)


def task(seq: int, query: str, files: list[str], relevance: float = 1.0, **kw: Any) -> TaskHit:
    return TaskHit(
        uuid=f"t{seq}", seq=seq, query=query, files=files, relevance=relevance, at=1.7e9, **kw
    )


def test_words_split_identifiers_and_paths_and_drop_stopwords() -> None:
    assert words("Fix the ConnectionPool in redis/asyncio/test_h11_impl.py") == [
        "fix",
        "connection",
        "pool",
        "redis",
        "asyncio",
        "test",
        "h11",
        "impl",
        "py",
    ]


def test_files_of_relevant_tasks_beat_files_that_are_only_recent() -> None:
    found = Candidates(
        tasks=[task(5, "fix parser crash", ["src/parser.py", "tests/test_parser.py"], 9.0)],
        recent=[RecentTask(9, ["docs/index.md"]), RecentTask(10, ["README.md"])],
        latest_seq=10,
    )
    ranked = rank(found)
    assert ranked.files[:2] == ["src/parser.py", "tests/test_parser.py"]
    assert set(ranked.files) == {
        "src/parser.py",
        "tests/test_parser.py",
        "README.md",
        "docs/index.md",
    }


def test_the_files_of_a_big_similar_task_each_weigh_only_a_little_less() -> None:
    big = task(5, "rework the parser", [f"src/parser/{n}.py" for n in range(5)], 10.0)
    small = task(6, "parser docs", ["docs/parser.md"], 7.0)  # less similar, one file
    ranked = rank(Candidates(tasks=[big, small], latest_seq=6))
    assert ranked.files[:5] == big.files  # 10 / 5 ** 0.2 = 7.2: more than 7
    assert ranked.files[5] == "docs/parser.md"


def test_files_that_change_together_with_the_best_ones_are_pulled_in() -> None:
    together = [RecentTask(n, ["src/core.py", "tests/test_core.py"]) for n in range(1, 6)]
    unrelated = [RecentTask(n, [f"misc/{n}.txt"]) for n in range(6, 15)]
    recent = [*together, *unrelated, RecentTask(15, ["src/core.py"])]  # last: the one asked for
    found = Candidates(files={"src/core.py": 3.0}, recent=recent, latest_seq=15)
    assert rank(found, files=2).files == ["src/core.py", "tests/test_core.py"]


def test_the_files_of_the_last_task_come_before_files_only_often_changed() -> None:
    often = [RecentTask(n, ["src/busy.py"]) for n in range(1, 10)]
    last = [RecentTask(10, ["src/just_written.py", "src/just_written.py"])]
    window = Window([*often, *last], 10)
    assert window.last == ["src/just_written.py"]  # each file once
    assert window.continuity == 8 / 9  # busy.py written again after 8 of its 9 tasks
    assert rank(Candidates(recent=[*often, *last], latest_seq=10)).files == [
        "src/just_written.py",
        "src/busy.py",
    ]


def test_the_last_task_weighs_as_much_as_the_project_goes_on_where_it_was() -> None:
    # busy.py is written by every other task: never by two tasks in a row.
    def own(n: int) -> list[str]:
        return [f"src/{n}.py"]

    apart = [RecentTask(n, ["src/busy.py", *own(n)] if n % 2 else own(n)) for n in range(1, 10)]
    last = RecentTask(10, ["src/new.py"])
    assert Window([*apart, last], 10).continuity == 0.0
    assert rank(Candidates(recent=[*apart, last], latest_seq=10)).files[:2] == [
        "src/busy.py",  # the prior: written most, lately
        "src/new.py",  # the newest: next by the prior, and no more
    ]
    # The same, but busy.py is written by every task: the project goes on where it was.
    along = [RecentTask(n, ["src/busy.py", *own(n)]) for n in range(1, 10)]
    assert Window([*along, last], 10).continuity == 8 / 18
    assert rank(Candidates(recent=[*along, last], latest_seq=10)).files[:2] == [
        "src/new.py",
        "src/busy.py",
    ]
    assert Window([], 0).last == [] and Window([], 0).continuity == 0.0


def test_a_task_that_wrote_nothing_neither_is_the_last_task_nor_breaks_the_chain() -> None:
    along = [RecentTask(n, ["src/busy.py", f"src/{n}.py"]) for n in range(1, 10)]
    asked = RecentTask(10, [])  # a turn that only asked, or only failed
    window = Window([*along, asked], 10)
    assert window.last == ["src/busy.py", "src/9.py"]
    assert window.continuity == Window(along, 9).continuity == 8 / 16
    chain = [along[0], RecentTask(2, []), along[1]]  # busy.py again, a turn later
    assert Window(chain, 3).continuity == 1 / 2


def test_files_the_query_names_come_first_in_the_order_it_names_them() -> None:
    index = ProjectIndex()
    for seq in range(1, 6):  # much evidence for the parser, none for the server by text
        index.put(TaskHit(uuid=f"p{seq}", seq=seq, query="parser crash", files=["src/parser.py"]))
    index.put(TaskHit(uuid="s", seq=6, query="tidy", files=["uvicorn/server.py", "src/config.py"]))
    index.put(TaskHit(uuid="o", seq=7, query="tidy", files=["other/server.py"]))
    found = index.candidates("parser crash in `server.py` since src/config.py changed.")
    assert found.named == ["uvicorn/server.py", "other/server.py", "src/config.py"]
    assert rank(found).files[:4] == [*found.named, "src/parser.py"]
    assert index.candidates("the server crashed").named == []  # a word is not a file name
    assert index.candidates("see ./other/server.py").named == ["other/server.py"]


def test_a_prompt_asked_before_about_unrelated_files_says_little() -> None:
    """ "continue" was asked three times, each time about other files: those askings weigh
    nothing and the project's recent work leads. "update the changelog" was asked three
    times about CHANGES.md: its askings keep their weight."""
    index = ProjectIndex()
    seq = itertools.count(1)
    for n in range(3):
        for query, files in (
            ("continue", [f"src/elsewhere{n}.py"]),
            ("update the changelog", ["CHANGES.md", f"docs/page{n}.md"]),
            ("handle the websocket ping", ["src/ws.py", f"tests/test_ws{n}.py"]),
        ):
            number = next(seq)
            index.put(TaskHit(uuid=f"t{number}", seq=number, query=query, files=files))
    found = index.candidates("Continue!")  # the same words, whatever the case and marks
    assert [found.tasks[i].query for i in found.repeats] == ["continue"] * 3
    assert asked_before(found.tasks, found.repeats, found.recent) == (0.0, 1.0)  # none agree
    elsewhere = {f"src/elsewhere{n}.py" for n in range(3)}
    assert rank(found).files[:2] == ["src/ws.py", "CHANGES.md"]
    # Taken at their word, the earlier askings' files would come first.
    assert set(rank(msgspec.structs.replace(found, repeats=[])).files[:3]) == elsewhere
    changelog = index.candidates("Update the changelog")
    assert asked_before(changelog.tasks, changelog.repeats, changelog.recent) == (1.0, 1.0)
    assert rank(changelog).files[0] == "CHANGES.md"
    assert index.candidates("continue the websocket work").repeats == []  # other words
    assert index.candidates("the").repeats == []  # no words: nothing to compare
    # A task in other words that match too keeps its weight: its file comes first (the
    # askings' files still have their own text, the word "continue", weighed down).
    number = next(seq)
    index.put(
        TaskHit(uuid="p", seq=number, query="continue after a parser error", files=["parser.py"])
    )
    found = index.candidates("continue")
    assert len(found.repeats) == 3 and len(found.tasks) == 4
    assert rank(found).files[0] == "parser.py"  # before the askings' files, unlike at their word


def test_how_much_earlier_askings_agree_beyond_chance_and_weigh() -> None:
    tasks = [
        task(1, "fix it", ["a.py", "b.py"], relevance=3.0),
        task(2, "fix it", ["b.py"], relevance=3.0),
        task(3, "fix it", ["c.py"], relevance=3.0),
        task(4, "fix it", [], relevance=3.0),  # wrote nothing: not compared
        task(5, "fix the parser", ["parser.py"], relevance=3.0),
    ]
    askings = [0, 1, 2, 3]  # two of the three that wrote files share b.py: 2/3 agree

    def recent(*files: list[str]) -> list[RecentTask]:
        return [RecentTask(n, paths) for n, paths in enumerate(files, 1)]

    # As many of the project's recent tasks that wrote files, spread evenly over them: the
    # 1st, 2nd and 4th of five.
    apart = recent(["x.py"], [], ["y.py"], ["w.py"], ["z.py"], ["v.py"])
    assert asked_before(tasks, askings, apart) == (2 / 3, 9 / 15)  # none share by chance
    alike = recent(["x.py"], [], ["x.py", "y.py"], ["w.py"], ["z.py"], ["v.py"])
    assert asked_before(tasks, askings, alike)[0] == 0.0  # 2/3 share by chance too
    same = recent(["x.py"], ["x.py"], ["x.py"], ["x.py"])  # any two share x.py
    assert asked_before(tasks, askings, same)[0] == 0.0
    assert asked_before(tasks, [0, 1], same)[0] == 1.0  # all agree: as much as chance, kept
    assert asked_before(tasks, askings, recent(["x.py"]))[0] == 2 / 3  # too few to compare
    assert asked_before(tasks, [0, 3], apart) == (1.0, 0.0)  # one wrote files: no measure
    assert asked_before(tasks, [], apart) == (1.0, 0.0)


def test_an_old_match_weighs_less_than_an_equally_relevant_new_one() -> None:
    found = Candidates(
        tasks=[task(1, "cache bug", ["old.py"]), task(400, "cache bug", ["new.py"])],
        latest_seq=400,
    )
    assert rank(found).files == ["new.py", "old.py"]
    assert [t.uuid for t in rank(found).tasks] == ["t400", "t1"]


def test_the_context_says_it_is_memory_and_names_each_path_once() -> None:
    found = Candidates(
        tasks=[
            task(
                3,
                "speed up export",
                ["bridge/export.py", "docs/x.md"],
                5.0,
                outcome="completed",
                summary="Export streams now.",
                errors=["TimeoutError in export"],
            ),
            task(2, "export bug", ["bridge/export.py", "src/a.py"], 4.0, errors=["TimeoutError"]),
            task(1, "export bug", ["bridge/export.py", "src/a.py"], 4.0, errors=["TimeoutError"]),
        ],
        latest_seq=3,
    )
    text = context(found)
    assert text is not None
    lines = text.splitlines()
    assert lines[0].startswith(CONTEXT_HEADER) and "not the user's words" in lines[0]
    assert lines[-1] == CONTEXT_LAST_LINE
    assert lines[1] == "Files likely involved: [1] bridge/export.py, [2] src/a.py, [3] docs/x.md"
    for path in ("bridge/export.py", "src/a.py"):
        assert text.count(path) == 1, f"{path} appears more than once"
    assert len(lines) == len(set(lines)), "no line repeats"
    assert '"speed up export" → Export streams now. Files: [1], [3]. Error: TimeoutError' in text


def test_the_budget_keeps_the_most_useful_lines_first() -> None:
    tasks = [task(n, f"task number {n} " + "x" * 150, [f"src/f{n}.py"], 10.0 - n) for n in range(8)]
    found = Candidates(tasks=tasks, latest_seq=8)
    full = render(rank(found), budget=100_000)
    small = render(rank(found), budget=600)
    assert full is not None and small is not None
    assert len(small) <= 600 < len(full)
    assert small.splitlines()[:2] == full.splitlines()[:2], "header and files come first"
    assert "task number 0" in small and "task number 7" not in small
    tiny = render(rank(found), budget=150)  # the first and last lines take 105
    assert tiny is not None and len(tiny) <= 150
    assert re.search(r"\[1\] src/f0\.py", tiny)


def test_nothing_remembered_means_no_context() -> None:
    assert context(Candidates()) is None


def test_a_note_renders_its_text_once() -> None:
    note = TaskHit(
        uuid="n", seq=3, query="Note: the CI runner has 2 cores", outcome="note",
        summary="the CI runner has 2 cores", at=1_796_000_000.0,
    )  # fmt: skip
    text = render(Ranked(files=[], tasks=[note]))
    assert text is not None
    assert text.count("the CI runner has 2 cores") == 1
    assert ", note: the CI runner has 2 cores" in text
