"""The recall index (bridge/memory/index.py): plain code, tested without a store."""

from __future__ import annotations

import math
import random
import threading
import uuid
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.memory.index import K1, B, Bm25Index, ProjectIndex, RecallIndexes
from bridge.memory.recall import (
    TASK_CANDIDATES,
    WINDOW_TASKS,
    Candidates,
    TaskHit,
    Window,
    continuity_of,
    rank,
)
from bridge.memory.terms import PathWords

VOCABULARY = [f"w{n}" for n in range(30)]


def brute_force(docs: dict[str, list[str]], query: list[str]) -> dict[str, float]:
    """BM25 of every document, term by term, as the textbook writes it."""
    n = len(docs)
    average = sum(len(d) for d in docs.values()) / n
    scores: dict[str, float] = {}
    for key, doc in docs.items():
        counts = Counter(doc)
        score = 0.0
        for term in dict.fromkeys(query):
            df = sum(1 for d in docs.values() if term in d)
            if not counts[term]:
                continue
            idf = math.log(1 + (n - df + 0.5) / (df + 0.5))
            tf = counts[term]
            score += idf * tf * (K1 + 1) / (tf + K1 * (1 - B + B * len(doc) / average))
        if score:
            scores[key] = score
    return scores


# Zipf-like words: a few common ones in most documents, many rare ones, as in real text.
words = st.sampled_from(VOCABULARY[:3]) | st.sampled_from(VOCABULARY)
documents = st.dictionaries(
    st.integers(0, 200), st.lists(words, min_size=1, max_size=12), min_size=1
)


# Where scoring moves from Python to vectors: never, always, and part way.
vector_from = st.sampled_from([10**9, 1, 3])


@settings(max_examples=300, deadline=None)
@given(documents, st.lists(words, min_size=1, max_size=6), st.integers(1, 12), vector_from)
def test_top_k_is_the_exact_top_k_of_bm25(
    docs: dict[str, list[str]], query: list[str], k: int, vectors_from: int
) -> None:
    index = Bm25Index(vector_from=vectors_from)
    for key, doc in docs.items():
        index.put(key, doc)
    expected = brute_force(docs, query)
    found = index.top(query, k)
    assert len(found) == min(k, len(expected))
    for key, score in found:
        assert math.isclose(score, expected[key], rel_tol=1e-9)
    # the k-th best score found is at least every score left out (ties may go either way)
    if found:
        left_out = [s for key, s in expected.items() if key not in dict(found)]
        assert all(s <= found[-1][1] + 1e-9 for s in left_out)


def test_replacing_and_removing_documents_keeps_the_statistics_right() -> None:
    index = Bm25Index()
    docs = {f"d{n}": [random.Random(n).choice(VOCABULARY) for _ in range(5)] for n in range(50)}
    for key, doc in docs.items():
        index.put(key, ["junk", *doc])
    for key, doc in docs.items():  # replace every document, then drop a third
        index.put(key, doc)
    for key in list(docs)[::3]:
        index.remove(key)
        del docs[key]
    index.remove("never-there")
    assert len(index) == len(docs) and index.top(["junk"], 5) == []
    found = brute_force(docs, ["w1", "w7"])
    for key, score in index.top(["w1", "w7"], 100):
        assert math.isclose(score, found[key], rel_tol=1e-9)


operations = st.lists(
    st.tuples(
        st.sampled_from(["put", "remove", "top"]),
        st.integers(0, 20),
        st.lists(words, min_size=1, max_size=8),
    ),
    min_size=1,
    max_size=60,
)


@settings(max_examples=200, deadline=None)
@given(operations, vector_from)
def test_queries_between_changes_see_every_change(
    steps: list[tuple[str, int, list[str]]], vectors_from: int
) -> None:
    """Postings compiled for one query are recompiled after a change to their term, and a
    removed document's slot, reused by the next, keeps nothing of the old one."""
    index = Bm25Index(vector_from=vectors_from)
    docs: dict[str, list[str]] = {}
    for action, number, terms in steps:
        key = f"d{number}"
        if action == "put":
            index.put(key, terms)
            docs[key] = terms
        elif action == "remove":
            index.remove(key)
            docs.pop(key, None)
        else:
            expected = brute_force(docs, terms) if docs else {}
            found = index.top(terms, 5)
            assert len(found) == min(5, len(expected))
            for found_key, score in found:
                assert math.isclose(score, expected[found_key], rel_tol=1e-9)
    assert len(index) == len(docs)


@settings(max_examples=200, deadline=None)
@given(documents, st.lists(words, min_size=1, max_size=6), st.integers(1, 12))
def test_scores_do_not_depend_on_which_terms_are_vectorised(
    docs: dict[str, list[str]], query: list[str], k: int
) -> None:
    """Python, numpy, or both in one query: the same scores to the last bit, so the same
    ranking and ties."""
    answers = []
    for vectors_from in (10**9, 1, 2, 4):
        index = Bm25Index(vector_from=vectors_from)
        for key, doc in docs.items():
            index.put(str(key), doc)
        answers.append(index.top(query, k))
    assert all(answer == answers[0] for answer in answers)


def task(seq: int, query: str, files: list[str], **fields: object) -> TaskHit:
    return TaskHit(uuid=f"t{seq}", seq=seq, query=query, files=files, **fields)  # type: ignore[arg-type]


def test_a_project_index_finds_tasks_and_files_by_their_words() -> None:
    index = ProjectIndex()
    index.put(task(1, "fix the websocket ping", ["src/ws.py"], errors=["TimeoutError in ping"]))
    index.put(task(2, "add a config flag", ["src/config.py", "docs/settings.md"]))
    index.put(task(3, "refactor", ["src/parsing/headers.py"], summary="moved header parsing"))
    found = index.candidates("websocket pings time out")
    assert [t.uuid for t in found.tasks] == ["t1"]
    assert found.tasks[0].relevance > 0 and found.tasks[0].errors == ["TimeoutError in ping"]
    assert index.candidates("headers").tasks[0].uuid == "t3"  # path words and summary
    assert "docs/settings.md" in index.candidates("config").files  # a file's own document
    assert set(index.candidates("settings").files) == {"docs/settings.md"}
    assert found.latest_seq == 3 and [r.seq for r in found.recent] == [1, 2, 3]


def test_a_query_finds_the_path_words_it_names_only_in_part() -> None:
    index = ProjectIndex()
    index.put(task(1, "switch the file watcher", ["uvicorn/supervisors/watchgodreload.py"]))
    index.put(task(2, "ping frames", ["tests/test_websocket.py"]))
    index.put(task(3, "unrelated", ["docs/index.md"]))
    found = index.candidates("Fix watchgod deprecation warning")  # the start of a path word
    assert [t.uuid for t in found.tasks] == ["t1"]
    assert set(found.files) == {"uvicorn/supervisors/watchgodreload.py"}
    assert set(index.candidates("base reload").files) == {"uvicorn/supervisors/watchgodreload.py"}
    found = index.candidates("WebSocket close codes")  # two words the path writes as one
    assert [t.uuid for t in found.tasks] == ["t2"]
    assert set(found.files) == {"tests/test_websocket.py"}


def test_path_words_are_found_by_their_parts_until_their_last_file_leaves() -> None:
    compounds = PathWords()
    compounds.add("uvicorn/supervisors/watchgodreload.py")
    compounds.add("old/watchgodreload.py")
    assert compounds.expand(["watchgod"], []) == ["watchgodreload"]
    assert compounds.expand(["reload"], []) == ["watchgodreload"]  # its end too
    assert compounds.expand(["watchgodreload"], []) == []  # the query names it whole
    assert compounds.expand(["supervis"], []) == []  # "or" would be the rest: too short
    assert compounds.expand(["wat"], []) == []  # too short a part to mean anything
    assert compounds.expand([], ["watchgod", "reload"]) == ["watchgodreload"]
    compounds.remove("old/watchgodreload.py")
    assert compounds.expand(["watchgod"], []) == ["watchgodreload"]  # one file still has it
    compounds.remove("uvicorn/supervisors/watchgodreload.py")
    assert compounds.expand(["watchgod"], []) == []
    assert compounds.expand([], ["watchgod", "reload"]) == []


def test_a_query_names_the_share_of_a_path_its_words_hold() -> None:
    words = PathWords()
    for path in ["src/proxy_headers.py", "src/headers.py", "src/config.py", "docs/config.md"]:
        words.add(path)
    everywhere = {"src/proxy_headers.py", "src/headers.py", "src/config.py", "docs/config.md"}
    named = words.match(["header", "proxi"], everywhere)  # the stems of the query's words
    assert named["src/proxy_headers.py"] > named["src/headers.py"] > 0  # more of it named
    assert set(named) == {"src/proxy_headers.py", "src/headers.py"}
    assert all(0 < share <= 1 for share in named.values())
    assert words.match(["header"], {"src/headers.py"}).keys() == {"src/headers.py"}  # among
    assert words.match(["py"], everywhere) == {}  # in most paths: names none of them
    words.remove("src/headers.py")
    assert words.match(["header"], everywhere).keys() == {"src/proxy_headers.py"}


def test_equally_relevant_tasks_are_kept_newest_first_whatever_their_ids() -> None:
    """Task ids are random (uuid4): tasks that match a query equally well are taken newest
    first, so which of them make the candidates does not depend on the ids drawn."""
    chosen = []
    for _ in range(2):
        index = ProjectIndex()
        for seq in range(1, 81):  # more than TASK_CANDIDATES, all with the same text
            drawn = uuid.uuid4().hex
            index.put(TaskHit(uuid=drawn, seq=seq, query="fix the parser", files=["p.py"]))
        found = index.candidates("parser")
        assert len(found.tasks) == TASK_CANDIDATES
        chosen.append([t.seq for t in found.tasks])
    assert chosen[0] == chosen[1] == list(range(80, 80 - TASK_CANDIDATES, -1))


def test_a_task_put_again_is_replaced_not_duplicated() -> None:
    index = ProjectIndex()
    index.put(task(1, "parse dates", ["a.py"]))
    index.put(task(1, "parse dates", ["a.py", "b.py"], summary="done", outcome="completed"))
    found = index.candidates("dates")
    assert len(found.tasks) == 1 and found.tasks[0].files == ["a.py", "b.py"]
    assert found.tasks[0].outcome == "completed" and len(index) == 1
    assert set(index.candidates("dates").files) == {"a.py", "b.py"}


def test_a_task_that_loses_a_file_leaves_that_file_s_document() -> None:
    index = ProjectIndex(horizon=3)
    index.put(task(1, "tune the cache", ["cache.py", "notes.md"]))
    index.put(task(1, "tune the cache", ["cache.py"]))  # its write of notes.md was forgotten
    assert "notes.md" not in index.candidates("notes").files
    assert "cache.py" in index.candidates("cache").files
    for seq in range(2, 6):  # task 1 leaves the horizon: nothing of it is left behind
        index.put(task(seq, f"other work {seq}", ["other.py"]))
    assert not index.candidates("tune cache").tasks and not index.candidates("cache").files


def test_tasks_past_the_horizon_leave_with_their_files() -> None:
    index = ProjectIndex(horizon=10)
    for seq in range(1, 31):
        index.put(task(seq, f"work on module{seq}", [f"m{seq}.py", "common.py"]))
    assert len(index) == 10
    assert not index.candidates("module5").tasks and "m5.py" not in index.candidates("m5").files
    assert index.candidates("module25").tasks[0].seq == 25
    assert index.candidates("common").files.keys() == {"common.py"}
    index.put(task(3, "late arrival of an old task", ["old.py"]))  # older than all kept
    assert len(index) == 10 and not index.candidates("arrival").tasks


def test_an_out_of_order_task_takes_its_place_by_ordinal() -> None:
    index = ProjectIndex()
    index.put(task(1, "one", ["a.py"]))
    index.put(task(3, "three", ["c.py"]))
    index.put(task(2, "two", ["b.py"]))
    assert [r.seq for r in index.candidates("x").recent] == [1, 2, 3]
    assert index.latest_seq == 3


def test_the_window_is_the_last_tasks_and_ranks_as_if_computed_afresh() -> None:
    index = ProjectIndex()
    rng = random.Random(7)
    paths = [f"src/f{n}.py" for n in range(40)]
    for seq in range(1, WINDOW_TASKS + 60):
        index.put(task(seq, f"change {rng.choice(VOCABULARY)}", rng.sample(paths, 3)))
    found = index.candidates("change w3 w4")
    assert len(found.recent) == WINDOW_TASKS and found.window is not None
    assert found.recent[0].seq == index.latest_seq - WINDOW_TASKS + 1
    fresh = Candidates(
        tasks=found.tasks, files=found.files, recent=found.recent, latest_seq=found.latest_seq
    )
    assert rank(found) == rank(fresh)  # the kept window says what a new one would
    assert found.window == Window(found.recent, found.latest_seq)
    assert found.window.continuity == continuity_of(found.recent) > 0


def test_the_continuity_kept_pair_by_pair_is_the_one_counted_afresh() -> None:
    index = ProjectIndex(horizon=WINDOW_TASKS + 20)
    rng = random.Random(11)
    paths = [f"src/f{n}.py" for n in range(12)]

    def counted_afresh() -> float:
        window = index.window()
        assert window.continuity == continuity_of(window.recent)
        return window.continuity

    for seq in range(1, WINDOW_TASKS + 40):  # the window moves on; the horizon evicts
        index.put(task(seq, "work", rng.sample(paths, rng.randint(1, 3))))
        if seq % 50 == 0:
            counted_afresh()
    newest = index.latest_seq
    recent = index.window().recent
    # The newest task changes: first it writes none of the files of the one before it,
    # then all of them; so does a task amid the window.
    for seq, previous in [(newest, recent[-2]), (newest - 5, recent[-7])]:
        index.put(task(seq, "work", ["src/elsewhere.py"]))
        apart = counted_afresh()
        index.put(task(seq, "work", previous.files))
        assert counted_afresh() > apart
    index.put(task(newest + 1, "only asked", []))  # wrote nothing: the chain holds
    counted_afresh()
    assert index.window().last == recent[-2].files  # what task newest wrote, in the loop
    index.put(task(newest - 410, "work", ["src/old.py"]))  # kept, but before the window
    before = counted_afresh()
    index.put(task(newest + 2, "work", ["src/f0.py"]))
    assert counted_afresh() != before


def test_changes_committed_while_a_project_loads_are_not_lost() -> None:
    indexes = RecallIndexes()
    assert indexes.candidates("p", "x") is None and not indexes.wants("p")
    indexes.begin_load("p")
    assert indexes.wants("p")
    snapshot = [task(1, "old work", ["a.py"])]  # read from the store before task 2 committed
    indexes.apply("p", [task(2, "new work", ["b.py"])])
    indexes.finish_load("p", snapshot)
    found = indexes.candidates("p", "work")
    assert found is not None and {t.uuid for t in found.tasks} == {"t1", "t2"}
    indexes.apply("p", [task(3, "later work", ["c.py"])])
    found = indexes.candidates("p", "later")
    assert found is not None and found.tasks[0].uuid == "t3"


def test_an_index_discarded_while_loading_is_not_installed() -> None:
    indexes = RecallIndexes()
    indexes.begin_load("p")
    indexes.discard("p")  # a change could not be read back: the load may miss it
    indexes.finish_load("p", [task(1, "work", ["a.py"])])
    assert indexes.candidates("p", "work") is None and not indexes.wants("p")
    indexes.begin_load("p")
    indexes.finish_load("p", [task(1, "work", ["a.py"])])
    assert indexes.candidates("p", "work") is not None


def test_a_failed_load_leaves_nothing_behind_and_two_loads_install_one() -> None:
    indexes = RecallIndexes()
    indexes.begin_load("p")
    indexes.abandon_load("p")
    assert not indexes.wants("p")
    indexes.begin_load("p")
    indexes.begin_load("p")
    indexes.finish_load("p", [task(1, "first", ["a.py"])])
    indexes.apply("p", [task(2, "second", ["b.py"])])
    indexes.finish_load("p", [task(1, "first", ["a.py"])])  # late: the installed one stays
    found = indexes.candidates("p", "second")
    assert found is not None and found.tasks[0].uuid == "t2"


def test_the_least_recently_used_projects_leave_memory() -> None:
    indexes = RecallIndexes(projects=3)
    for name in "abcd":
        indexes.begin_load(name)
        indexes.finish_load(name, [task(1, "work", ["a.py"])])
        indexes.candidates("a", "work")  # a stays in use
    assert indexes.candidates("b", "work") is None
    assert all(indexes.candidates(name, "work") is not None for name in "acd")


def test_threads_applying_and_querying_at_once_see_a_consistent_index() -> None:
    indexes = RecallIndexes()
    indexes.begin_load("p")
    indexes.finish_load("p", [])
    errors: list[BaseException] = []

    def write() -> None:
        for seq in range(1, 3001):
            indexes.apply("p", [task(seq, f"task about topic{seq % 50}", [f"f{seq % 80}.py"])])

    def read() -> None:
        try:
            for n in range(2000):
                found = indexes.candidates("p", f"topic{n % 50}")
                assert found is not None
                assert all(t.files for t in found.tasks)
                assert [r.seq for r in found.recent] == sorted(r.seq for r in found.recent)
        except BaseException as e:  # reported below, in the test's thread
            errors.append(e)

    threads = [threading.Thread(target=write), threading.Thread(target=read)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors and not any(t.is_alive() for t in threads)
    found = indexes.candidates("p", "topic7")
    assert found is not None and found.latest_seq == 3000 and len(found.tasks) > 0


def a_file(rng: random.Random) -> str:
    """A file named with a word of its own, or with words joined as file names join them."""
    return rng.choice([f"f{rng.randrange(30)}.py", f"{rng.choice(COMPOUNDS)}{rng.randrange(3)}.py"])


COMPOUNDS = ["watchgodreload", "basereload", "statreload", "watchgod", "reloader"]


@pytest.mark.parametrize("seed", range(40))
def test_an_index_kept_up_to_date_answers_as_one_built_afresh(seed: int) -> None:
    """Whatever order of new tasks, added files, changed queries, summaries and
    evictions, the index kept current answers exactly as one built from what it holds."""
    rng = random.Random(seed)
    horizon = rng.randrange(5, 40)
    index = ProjectIndex(horizon=horizon)
    held: dict[int, TaskHit] = {}
    for _ in range(150):
        if held and rng.random() < 0.4:  # a change to a task: more files, a new query...
            seq = rng.choice(list(held))
            old = held[seq]
            roll = rng.random()
            if roll < 0.4:
                files = [*old.files, a_file(rng)]
            elif roll < 0.55 and len(old.files) > 1:  # a forget took one away
                files = old.files[1:]
            else:
                files = old.files
            query = f"{old.query} {rng.choice(VOCABULARY)}" if rng.random() < 0.3 else old.query
            new = TaskHit(
                uuid=old.uuid,
                seq=seq,
                query=query,
                files=list(dict.fromkeys(files)),
                summary=rng.choice(["", "done", "w3 fixed"]),
            )
        else:
            seq = max(held, default=0) + 1
            new = task(seq, " ".join(rng.sample(VOCABULARY, 2)), [a_file(rng)])
        index.put(new)
        held[seq] = new
        held = dict(sorted(held.items())[-horizon:])
    fresh = ProjectIndex(horizon=horizon)
    for kept in held.values():
        fresh.put(kept)
    loaded = ProjectIndex(horizon=horizon)
    loaded.load(held.values())
    for query in ["w1", "w2 w5", "f3", "f7 w9 done", "fixed", "watchgod", "base reload"]:
        assert index.candidates(query) == fresh.candidates(query) == loaded.candidates(query)
