"""Candidates read through the graph's task structure (see ``graph_tasks``), on FalkorDB.

- **Tasks and files by text.** FalkorDB's full-text index finds the task and file
  documents holding any term of the query and ranks them by its own TF-IDF, whose IDF
  comes in whole steps; the best few times as many as wanted are then ranked by BM25,
  as SQLite's FTS5 does and with the same stemmer, from their documents, each term's
  document frequency (counted by the same index) and the average document length kept by
  the ``BridgeTasks`` node. The best tasks are then read with their files, through their
  ``TOUCHED`` edges in write order, their errors and outcome.
- **Recent work.** The files of the project's last ``WINDOW_TASKS`` tasks. A reader keeps
  them (``RecentWork``) and asks the graph only for the tasks whose files changed since
  its last read (an index range scan on ``Task.changed``), so a miss does not carry
  hundreds of tasks' paths over the wire.

The first four reads run concurrently, the fifth (the best tasks' details) after them;
each pushes its limit into the database, and each checks ``group_id`` as well as reading
the project's own graph.
"""

from __future__ import annotations

import asyncio
import math
from collections import Counter
from typing import Any, Final

from bridge.errors import MemoryUnavailable
from bridge.memory.graph_tasks import Run
from bridge.memory.terms import terms
from bridge.recall import (
    FILE_CANDIDATES,
    TASK_CANDIDATES,
    WINDOW_TASKS,
    Candidates,
    RecentTask,
    TaskHit,
)

TASK_POOL: Final = 3  # documents ranked by BM25 per candidate wanted (files: longer ones)
FILE_POOL: Final = 2
MAX_TERMS: Final = 32
K1: Final = 1.2  # BM25's parameters, as FTS5's bm25()
B: Final = 0.75

STATE: Final = """MATCH (c:BridgeTasks {group_id: $group_id})
OPTIONAL MATCH (t:Task)
WHERE t.changed > $since AND t.seq > c.tasks - $window AND t.group_id = $group_id
RETURN c.uuid AS id, c.changes AS changes, c.tasks AS latest, c.task_words AS task_words,
  c.files AS files, c.file_words AS file_words, collect([t.seq, t.paths]) AS changed"""
# The pools come back as few values: the client decodes results a value at a time, in
# Python, so 180 documents joined into one string cost a 180th of 180 strings. A task's
# line is its uuid, ordinal and document (terms and uuids hold no space or newline).
# Each pool also says whether its index is whole: FalkorDB rebuilds full-text indexes in
# the background after a restart, and a search meanwhile finds nothing or a part.
TASK_DOCS: Final = """CALL db.idx.fulltext.queryNodes('Task', $match) YIELD node, score
WITH node AS t, score WHERE t.group_id = $group_id
WITH t, score ORDER BY score DESC, t.seq DESC LIMIT $limit
WITH collect(t.uuid) AS ids, collect(t.seq) AS seqs, collect(t.doc) AS docs
CALL db.indexes() YIELD label, status WHERE label = 'Task'
RETURN ids, seqs, docs, status"""
FILE_DOCS: Final = """CALL db.idx.fulltext.queryNodes('File', $match) YIELD node, score
WITH node AS f, score WHERE f.group_id = $group_id
WITH f, score ORDER BY score DESC LIMIT $limit
WITH collect(f.name) AS paths, collect(f.doc) AS docs
CALL db.indexes() YIELD label, status WHERE label = 'File'
RETURN paths, docs, status"""
READY: Final = "OPERATIONAL"
FREQUENCIES: Final = """UNWIND $terms AS term
CALL db.idx.fulltext.queryNodes('Task', term) YIELD node
RETURN 'task' AS index, term, count(node) AS n
UNION ALL
UNWIND $terms AS term
CALL db.idx.fulltext.queryNodes('File', term) YIELD node
RETURN 'file' AS index, term, count(node) AS n"""
TASKS: Final = """UNWIND $ids AS id
MATCH (t:Task {uuid: id}) WHERE t.group_id = $group_id
OPTIONAL MATCH (t)-[r:RELATES_TO]->(f:File)
WITH t, r, f ORDER BY r.n
WITH t, collect(CASE WHEN r.name = 'TOUCHED' THEN f.name END) AS files
RETURN t.task AS uuid, t.seq AS seq, t.query AS query, t.task_summary AS summary,
  t.outcome AS outcome, t.at AS at, t.errors AS errors, files"""


class RecentWork:
    """One project's recent work as last read from the graph, brought up to date by
    ``candidates``: the files of each recent task, by ordinal."""

    def __init__(self) -> None:
        self.counter: str | None = None  # the BridgeTasks node this was read from
        self.changes = 0
        self.files: dict[int, list[str]] = {}

    def update(self, state: dict[str, Any], since: int) -> list[RecentTask] | None:
        """Fold in the tasks changed after ``since`` (as read with it); the tasks of the
        window, or None when the graph is not the one read before and must be read whole.
        An answer older than the last one folded in (concurrent reads) only adds files."""
        if state["id"] != self.counter:  # another graph (its counter is new): start over
            self.counter, self.changes, self.files = state["id"], 0, {}
            if since > 0:
                return None
        for seq, paths in state["changed"]:
            if seq is not None and len(paths) >= len(self.files.get(seq, ())):
                self.files[seq] = list(paths)  # files are only ever added to a task
        self.changes = max(self.changes, int(state["changes"]))
        oldest = int(state["latest"]) - WINDOW_TASKS
        self.files = {seq: paths for seq, paths in self.files.items() if seq > oldest}
        return [RecentTask(seq, paths) for seq, paths in self.files.items()]


def _quoted(found: list[str]) -> list[str]:
    """Terms as exact full-text terms: letters and digits in quotes, so nothing is read as
    query syntax and the index does not stem them again."""
    return [f'"{term}"' for term in found]


async def candidates(run: Run, group: str, query: str, recent: RecentWork) -> Candidates:
    """Past tasks and files of ``group`` matching ``query``, and its recent work."""
    words = list(dict.fromkeys(terms(query)))[:MAX_TERMS]
    found = _quoted(words)
    since = recent.changes
    reads = [run(STATE, group_id=group, since=since, window=WINDOW_TASKS)]
    if found:
        match = {"match": "|".join(found), "group_id": group}
        reads.append(run(TASK_DOCS, **match, limit=TASK_POOL * TASK_CANDIDATES))
        reads.append(run(FILE_DOCS, **match, limit=FILE_POOL * FILE_CANDIDATES))
        reads.append(run(FREQUENCIES, terms=found))
    rows, *text = await asyncio.gather(*reads)
    if not rows:
        return Candidates()
    state = rows[0]
    window = recent.update(state, since)
    if window is None:
        rows = await run(STATE, group_id=group, since=0, window=WINDOW_TASKS)
        if not rows:
            return Candidates()
        state = rows[0]
        window = recent.update(state, 0) or []
    latest = int(state["latest"])
    if not text:
        return Candidates(recent=window, latest_seq=latest)
    (task_pool,), (file_pool,), counts = text  # an aggregation: one row, even when empty
    for pool in (task_pool, file_pool):
        if pool["status"] != READY:
            raise MemoryUnavailable(f"the full-text indexes of {group} are being rebuilt")
    frequency = {(r["index"], r["term"].strip('"')): int(r["n"]) for r in counts}
    # Lists, not one joined string: FalkorDB's string.join was seen to drop an element.
    lines = list(zip(task_pool["ids"], task_pool["seqs"], task_pool["docs"], strict=True))
    task_scores = _bm25(
        [doc for *_, doc in lines], words, "task", frequency, latest, int(state["task_words"])
    )
    best = sorted(
        ((score, int(seq), id) for score, (id, seq, _) in zip(task_scores, lines, strict=True)),
        reverse=True,
    )
    del best[TASK_CANDIDATES:]
    docs, paths = file_pool["docs"], file_pool["paths"]
    file_words = int(state["file_words"])
    file_scores = _bm25(docs, words, "file", frequency, int(state["files"]), file_words)
    files = sorted(zip(file_scores, paths, strict=True), reverse=True)
    relevance = {seq: score for score, seq, _ in best}
    details = await run(TASKS, ids=[id for *_, id in best], group_id=group) if best else []
    hits = sorted(
        (_task_hit(row, relevance[int(row["seq"])]) for row in details),
        key=lambda hit: (-hit.relevance, -hit.seq),
    )
    return Candidates(
        tasks=hits,
        files={path: score for score, path in files[:FILE_CANDIDATES]},
        recent=window,
        latest_seq=latest,
    )


def _bm25(
    docs: list[str],
    words: list[str],
    index: str,
    frequency: dict[tuple[str, str], int],
    count: int,
    total: int,
) -> list[float]:
    """Okapi BM25 of each document for ``words``, as FTS5 computes it: ``frequency`` says
    how many of the index's ``count`` documents hold each word, ``total`` their length."""
    average = total / count if count > 0 and total > 0 else 1.0
    idf = {}
    for word in words:
        n = frequency.get((index, word), 0)
        idf[word] = max(math.log((count - n + 0.5) / (n + 0.5)), 1e-6) if count > n else 1e-6
    scores = []
    for doc in docs:
        tokens = doc.split()
        tf = Counter(tokens)
        norm = K1 * (1 - B + B * len(tokens) / average)
        scores.append(sum(idf[w] * tf[w] * (K1 + 1) / (tf[w] + norm) for w in words if tf[w]))
    return scores


def _task_hit(row: dict[str, Any], relevance: float) -> TaskHit:
    return TaskHit(
        uuid=row["uuid"],
        seq=int(row["seq"]),
        query=row["query"],
        summary=row["summary"],
        outcome=row["outcome"],
        at=float(row["at"]),
        files=list(row["files"]),
        errors=list(row["errors"]),
        relevance=relevance,
    )
