"""The task model as graph structure on FalkorDB: how stored episodes become linked
tasks and files in the graph (``graph_recall`` reads them back).

The same model as ``sqlite_tasks`` (see bridge.memory.recall), in graphiti's own schema so that
Graphiti and other tools read it like anything else in the graph:

- every episode is a graphiti ``Episodic`` node, as before;
- a task is an ``EntityNode`` labelled ``Entity:Task`` named by its opening query; its
  ordinal (``seq``), query, summary, outcome, errors and files (``paths``, in write order)
  are node attributes;
- a file is an ``EntityNode`` labelled ``Entity:File`` named by its path;
- every episode ``MENTIONS`` (graphiti's ``EpisodicEdge``) its task, and a file write also
  the file it wrote;
- a task that wrote a file is linked to it by an ``EntityEdge`` (``RELATES_TO``) named
  ``TOUCHED``, whose fact says so and whose ``n`` is the write's order in the task;
- one ``BridgeTasks`` node per graph counts the tasks (the newest ``seq``) and the changes
  made to them: a task that a write folds new episodes into is one change, and it keeps
  the number of its last one (``changed``, range-indexed), so a reader that has seen the
  graph up to change N reads back only the tasks changed since.

Episodes are written in batches, each batch by one Cypher statement rather than by
graphiti's ``save()`` methods (``link_batch``): the episodic nodes and all of their links
commit together; a node is created only if its uuid is new, so an episode is linked
exactly once; and the statement returns the new state of every task it changed, so the
writer can bring its recall index up to date without reading the graph again. One
statement for many episodes is also what keeps ingest fast as the graph grows: FalkorDB
spends time that grows with the graph on every query that creates relationships, and
fsyncs its append-only file once per query.

Within a batch, the statement folds each task's new episodes in the order given, with the
same outcome as folding them one at a time: a task's query is the first one given, its
files are added in write order (each once), its errors are the first ``MAX_ERRORS``, an
error fails an unfinished task and a completion or note sets the outcome and summary.
Python groups a batch by task beforehand, because FalkorDB applies the changes of one
clause to all of its rows at once: a row does not see what an earlier row of the same
clause set.

Episodic nodes written before this structure existed (or by other Graphiti tools) are
folded in by ``backfill`` the first time their graph is opened, oldest first. Graphs of
the release that searched tasks and files with FalkorDB full-text indexes are migrated by
``migrate``: the recall index in memory replaced those indexes, their documents and their
word counts.

A client's session is an attribute of its tasks, not a node: nothing recalls by session.
With an LLM, Graphiti's extraction adds its own entities and facts beside this structure,
linked to the same episodes; it may also resolve an entity it extracts to a task or file
node and save that node back, attributes included (it never removes the labels or the
edges above).
"""

from __future__ import annotations

import datetime as dt
import functools
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final

from bridge.episode import Episode

Run = Callable[..., Awaitable[list[dict[str, Any]]]]  # (cypher, **params) -> records
Statement = tuple[str, dict[str, Any]]

MAX_ERRORS: Final = 8  # errors kept per task
MAX_TASK_TEXT: Final = 2000  # characters of a query, summary or error kept
MAX_NAME: Final = 200  # characters of a task's query used as its entity name
TOUCHED: Final = "TOUCHED"
OUTCOME: Final = {"success": "completed", "error": "failed", "note": "note"}
BACKFILL_BATCH: Final = 200
MIGRATE_BATCH: Final = 5000
NODE_FIELDS: Final = ("name", "source_description", "source", "content")

SCHEMA: Final = (
    "CREATE INDEX FOR (t:Task) ON (t.uuid, t.seq, t.changed)",
    "CREATE INDEX FOR (f:File) ON (f.uuid)",
)


# -- the statement that stores and links a batch of episodes --------------------------------

# The episodes the batch adds: those whose node is new (or, linking nodes stored before,
# those not linked to a task yet).
NEW_NODES: Final = """CALL {
  UNWIND $episodes AS x
  OPTIONAL MATCH (known:Episodic {uuid: x.uuid})
  WITH x, known WHERE known IS NULL
  RETURN collect(x.uuid) AS new
}
"""
UNLINKED_NODES: Final = """CALL {
  UNWIND $episodes AS x
  MATCH (e:Episodic {uuid: x.uuid}) WHERE NOT (e)-[:MENTIONS]->(:Task)
  RETURN collect(x.uuid) AS new
}
"""
# Tasks with a new episode, in order; the new ones get the next ordinals. Then the files,
# and the TOUCHED edges of the paths a task did not hold yet (its ``paths`` are its edges).
TASKS: Final = """MERGE (c:BridgeTasks {group_id: $group_id})
ON CREATE SET c.uuid = $counter_uuid, c.tasks = 0, c.changes = 0
WITH c, new, [row IN $tasks WHERE size([u IN row.episodes WHERE u IN new]) > 0] AS rows
CALL {
  WITH rows
  UNWIND rows AS row
  OPTIONAL MATCH (t:Task {uuid: row.uuid})
  WITH row, t WHERE t IS NULL
  RETURN collect(row) AS missing
}
CALL {
  WITH c, missing
  UNWIND range(0, size(missing) - 1) AS i
  WITH c, missing[i] AS row, i
  CREATE (:Entity:Task {uuid: row.uuid, seq: c.tasks + 1 + i, task: row.task,
    group_id: $group_id, name: row.name, summary: '', created_at: $created_at,
    session: row.session, query: row.query, task_summary: '', outcome: 'unfinished',
    at: row.at, errors: [], paths: [], changed: 0})
}
SET c.tasks = c.tasks + size(missing)
WITH c, new, rows
CALL {
  UNWIND $files AS x
  OPTIONAL MATCH (known:File {uuid: x.uuid})
  WITH x, known WHERE known IS NULL
  CREATE (:Entity:File {uuid: x.uuid, name: x.path, group_id: $group_id, summary: '',
    created_at: $created_at})
}
CALL {
  WITH new
  UNWIND $touches AS x
  WITH x WHERE x.episode IN new
  MATCH (t:Task {uuid: x.task}) WHERE NOT x.path IN t.paths
  MATCH (f:File {uuid: x.file})
  CREATE (t)-[:RELATES_TO {uuid: x.edge, name: 'TOUCHED', fact: x.fact, group_id: $group_id,
    n: size(t.paths) + size([p IN x.before WHERE NOT p IN t.paths]), episodes: [x.episode],
    created_at: $created_at, valid_at: x.valid_at}]->(f)
}
"""
# Each task folds in its new episodes: one change each, numbered from the counter's.
# (FalkorDB evaluates the SET clauses of one step against the values before them: what a
# step needs from another passes by WITH.)
FOLD: Final = """CALL {
  WITH c, new, rows
  UNWIND range(0, size(rows) - 1) AS i
  WITH new, rows[i] AS row, c.changes + 1 + i AS change
  MATCH (t:Task {uuid: row.uuid})
  WITH t, row, change, [p IN row.paths WHERE NOT p IN t.paths] AS added,
    [x IN row.errors WHERE x[0] IN new | x[1]] AS errors,
    [x IN row.outcomes WHERE x[0] IN new] AS outcomes
  SET t.paths = t.paths + added, t.errors = (t.errors + errors)[0..$max_errors],
    t.outcome = CASE WHEN size(outcomes) > 0 THEN outcomes[-1][1]
      WHEN size(errors) > 0 AND t.outcome = 'unfinished' THEN 'failed' ELSE t.outcome END,
    t.changed = change
  FOREACH (_ IN CASE WHEN size(outcomes) > 0 THEN [1] ELSE [] END |
    SET t.task_summary = outcomes[-1][2], t.summary = outcomes[-1][2])
  FOREACH (_ IN CASE WHEN t.query = '' AND row.query <> '' THEN [1] ELSE [] END |
    SET t.query = row.query, t.name = row.name)
  FOREACH (_ IN CASE WHEN row.at > t.at THEN [1] ELSE [] END | SET t.at = row.at)
  WITH t ORDER BY t.changed
  RETURN collect([t.changed, t.task, t.seq, t.query, t.task_summary, t.outcome, t.at,
    t.errors, t.paths]) AS tasks
}
SET c.changes = c.changes + size(rows)
WITH c, new, tasks
"""
# Then the episodes' nodes, each mentioning its task and the file it wrote. (Nothing
# filters rows after a CREATE: FalkorDB drops what a row created when a later clause of
# the same query filters that row out.)
MENTIONS: Final = """CALL {
  WITH new
  UNWIND $episodes AS x
  WITH x WHERE x.uuid IN new
  MATCH (t:Task {uuid: x.task}){known}
  OPTIONAL MATCH (f:File {uuid: x.file}){created}
  CREATE (e)-[:MENTIONS {uuid: x.mentions_task, group_id: $group_id,
    created_at: $created_at}]->(t)
  FOREACH (_ IN CASE WHEN f IS NULL THEN [] ELSE [1] END |
    CREATE (e)-[:MENTIONS {uuid: x.mentions_file, group_id: $group_id,
      created_at: $created_at}]->(f))
}
RETURN c.uuid AS counter, new, tasks"""
CREATE_NODE: Final = """CREATE (e:Episodic {uuid: x.uuid, name: x.name, group_id: $group_id,
    source_description: x.source_description, source: x.source, content: x.content,
    entity_edges: [], created_at: $created_at, valid_at: x.valid_at})"""
KNOWN_NODE: Final = "MATCH (e:Episodic {uuid: x.uuid})"
CREATE_BATCH: Final = (
    NEW_NODES
    + TASKS
    + FOLD
    + MENTIONS.replace("{known}", "").replace("{created}", "\n  " + CREATE_NODE)
)
LINK_BATCH: Final = (
    UNLINKED_NODES
    + TASKS
    + FOLD
    + MENTIONS.replace("{known}", "\n  " + KNOWN_NODE).replace("{created}", "")
)


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""


@functools.lru_cache(maxsize=4096)
def _id(*parts: str) -> str:
    """The uuid of a task, file or TOUCHED edge: the same in every process, so writers
    merge on it."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, "graphiti-bridge:" + ":".join(parts)))


def _time(seconds: float) -> str:
    """A time as graphiti stores it on FalkorDB: ISO 8601 in UTC."""
    return dt.datetime.fromtimestamp(seconds, dt.UTC).isoformat()


def _query(episode: Episode) -> str:
    """The query of an episode's task as the episode says it."""
    query = _text(episode.metadata.get("task_query"))[:MAX_TASK_TEXT]
    if not query and _text(episode.metadata.get("type")) in ("success", "note"):
        query = episode.body.removeprefix("Completed: ")[:MAX_TASK_TEXT]
    return query


def link_batch(
    episodes: Sequence[Episode], group: str, nodes: Sequence[dict[str, str]] | None = None
) -> Statement:
    """The Cypher statement and parameters that fold ``episodes`` (distinct uuids, in the
    order they happened) into their tasks in ``group``.

    With ``nodes`` (each episode's node fields, ``NODE_FIELDS``) the statement also creates
    the episodic nodes, and leaves out every episode whose node exists; without, it links
    existing nodes not linked yet. It returns one row: the graph's ``counter``, the uuids
    of the episodes it added (``new``), and the new state of each task they changed
    (``tasks``, as ``graph_recall.TASK`` lists them, by change).
    """
    rows: list[dict[str, Any]] = []
    tasks: dict[str, dict[str, Any]] = {}  # by task node uuid, in order of first episode
    files: dict[str, dict[str, str]] = {}
    touches: dict[tuple[str, str], dict[str, Any]] = {}
    for n, episode in enumerate(episodes):
        meta = episode.metadata
        kind = _text(meta.get("type"))
        task = _text(meta.get("task")) or episode.uuid
        task_uuid = _id("task", group, task)
        query = _query(episode)
        row = tasks.get(task_uuid)
        if row is None:
            row = tasks[task_uuid] = {
                "uuid": task_uuid,
                "task": task,
                "name": f"task {task}",
                "session": _text(meta.get("session")),
                "query": "",
                "at": episode.reference_time,
                "episodes": [],
                "errors": [],
                "outcomes": [],
                "paths": [],
            }
        row["episodes"].append(episode.uuid)
        row["at"] = max(row["at"], episode.reference_time)
        if not row["query"] and query:
            row["query"], row["name"] = query, query[:MAX_NAME]
        item: dict[str, Any] = {
            "uuid": episode.uuid,
            "task": task_uuid,
            "file": None,
            "mentions_task": str(uuid.uuid4()),  # created with its episode, never merged
            "valid_at": _time(episode.reference_time),
        }
        if nodes is not None:
            item |= {field: nodes[n][field] for field in NODE_FIELDS}
        path = _text(meta.get("path"))
        if kind == "file_edit" and path:
            file_uuid = _id("file", group, path)
            files[file_uuid] = {"uuid": file_uuid, "path": path}
            item |= {"file": file_uuid, "mentions_file": str(uuid.uuid4())}
            if (task_uuid, path) not in touches:
                touches[task_uuid, path] = {
                    "task": task_uuid,
                    "file": file_uuid,
                    "path": path,
                    "edge": _id("touched", task_uuid, file_uuid),
                    "fact": f"{query[:MAX_NAME] or 'A task'} touched {path}",
                    "before": list(row["paths"]),
                    "episode": episode.uuid,
                    "valid_at": item["valid_at"],
                }
                row["paths"].append(path)
        elif kind == "error":
            row["errors"].append(
                [episode.uuid, episode.body.removeprefix("Error: ")[:MAX_TASK_TEXT]]
            )
        elif kind in ("success", "note"):
            summary = _text(meta.get("summary")) or (
                "" if kind == "success" else episode.body.removeprefix("Note: ")
            )
            row["outcomes"].append([episode.uuid, OUTCOME[kind], summary[:MAX_TASK_TEXT]])
        rows.append(item)
    params = {
        "group_id": group,
        "created_at": dt.datetime.now(dt.UTC).isoformat(),
        "counter_uuid": str(uuid.uuid4()),
        "max_errors": MAX_ERRORS,
        "episodes": rows,
        "tasks": list(tasks.values()),
        "files": list(files.values()),
        "touches": list(touches.values()),
    }
    return (LINK_BATCH if nodes is None else CREATE_BATCH), params


UNLINKED: Final = """MATCH (e:Episodic) WHERE NOT (e)-[:MENTIONS]->(:Task)
RETURN e.uuid AS uuid ORDER BY e.valid_at, e.uuid LIMIT $limit"""


async def backfill(
    run: Run, group: str, read: Callable[[list[str]], Awaitable[list[Episode]]]
) -> int:
    """Link every episodic node of the graph not linked yet, oldest first; return how
    many. ``read`` loads episodes by uuid."""
    linked = 0
    while episodes := await read(
        [row["uuid"] for row in await run(UNLINKED, limit=BACKFILL_BATCH)]
    ):
        statement, params = link_batch(episodes, group)
        added = len((await run(statement, **params))[0]["new"])
        if not added:  # nothing more that can be linked
            break
        linked += added
    return linked


# -- the previous release's full-text search, migrated away ---------------------------------

FULLTEXT_LABELS: Final = ("Task", "File")  # the labels it indexed, each on its ``doc``
INDEXES: Final = "CALL db.indexes() YIELD label, types RETURN label, types"
DROP_INDEX: Final = "CALL db.idx.fulltext.drop('{}')"
# What it kept for them: documents, their terms and lengths, and word counts for BM25.
CLEAR: Final = {
    "Task": """MATCH (t:Task) WHERE t.doc IS NOT NULL WITH t LIMIT $limit
SET t.doc = NULL, t.doc_len = NULL, t.query_terms = NULL, t.summary_terms = NULL,
  t.error_terms = NULL, t.path_terms = NULL
RETURN count(t) AS n""",
    "File": """MATCH (f:File) WHERE f.doc IS NOT NULL WITH f LIMIT $limit
SET f.doc = NULL, f.doc_len = NULL, f.path_terms = NULL
RETURN count(f) AS n""",
}
CLEAR_COUNTS: Final = """MATCH (c:BridgeTasks)
SET c.task_words = NULL, c.files = NULL, c.file_words = NULL"""


async def migrate(run: Run) -> bool:
    """Drop what the previous release kept for full-text search (its indexes last, so an
    interrupted migration is taken up again); True if there was anything to drop."""
    indexed = [
        row["label"]
        for row in await run(INDEXES)
        if row["label"] in FULLTEXT_LABELS and "FULLTEXT" in str(row["types"].get("doc", ""))
    ]
    if not indexed:
        return False
    for label in indexed:
        while (await run(CLEAR[label], limit=MIGRATE_BATCH))[0]["n"]:
            pass
    await run(CLEAR_COUNTS)
    for label in indexed:
        await run(DROP_INDEX.format(label))
    return True
