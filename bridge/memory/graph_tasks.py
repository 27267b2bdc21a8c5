"""The task model as graph structure on FalkorDB: how stored episodes become linked
tasks and files in the graph (``graph_recall`` reads them back).

The same model as ``sqlite_tasks`` (see bridge.recall), in graphiti's own schema so that
Graphiti and other tools read it like anything else in the graph:

- every episode is a graphiti ``Episodic`` node, as before;
- a task is an ``EntityNode`` labelled ``Entity:Task`` named by its opening query; its
  ordinal (``seq``), query, summary, outcome, errors, files (``paths``, in write order) and
  full-text document are node attributes;
- a file is an ``EntityNode`` labelled ``Entity:File`` named by its path;
- every episode ``MENTIONS`` (graphiti's ``EpisodicEdge``) its task, and a file write also
  the file it wrote;
- a task that wrote a file is linked to it by an ``EntityEdge`` (``RELATES_TO``) named
  ``TOUCHED``, whose fact says so and whose ``n`` is the write's order in the task;
- one ``BridgeTasks`` node per graph counts the tasks (the newest ``seq``), the files and
  the words of their documents (for BM25), and the changes to tasks' files: a task keeps
  the count at its last new file (``changed``), so a reader can fetch only what changed.

Each episode is written by one Cypher statement rather than by graphiti's ``save()``
methods: the episodic node and all of its links commit together (FalkorDB runs one write
query at a time), the statement creates the node only if its uuid is new so an episode is
linked exactly once, and a store costs one round trip instead of six.

Two FalkorDB full-text indexes hold the documents, with stemming off: a task's document
is the stemmed words (``terms``) of its query, summary, errors and paths; a file's, those
of its path and of the queries of the last tasks that touched it (gathered through the
``TOUCHED`` edges).

Episodic nodes written before this structure existed (or by other Graphiti tools) are
folded in by ``backfill`` the first time their graph is opened, oldest first.

A client's session is an attribute of its tasks, not a node: nothing recalls by session.
With an LLM, Graphiti's extraction adds its own entities and facts beside this structure,
linked to the same episodes; it may also resolve an entity it extracts to a task or file
node and save that node back, attributes included (it never removes the labels or the
edges above).
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, Final

from bridge.episode import Episode
from bridge.memory.terms import terms

Run = Callable[..., Awaitable[list[dict[str, Any]]]]  # (cypher, **params) -> records

FILE_DOC_TASKS: Final = 32  # a file's document holds the queries of its last tasks
MAX_ERRORS: Final = 8  # errors kept per task
MAX_TASK_TEXT: Final = 2000  # characters of a query, summary or error kept
MAX_NAME: Final = 200  # characters of a task's query used as its entity name
TOUCHED: Final = "TOUCHED"
OUTCOME: Final = {"success": "completed", "error": "failed", "note": "note"}
BACKFILL_BATCH: Final = 500

_INDEX: Final = "{{label: '{}', stopwords: []}}, {{field: 'doc', nostem: true}}"
SCHEMA: Final = (
    "CREATE INDEX FOR (t:Task) ON (t.uuid, t.seq, t.changed)",
    "CREATE INDEX FOR (f:File) ON (f.uuid)",
    *(f"CALL db.idx.fulltext.createNodeIndex({_INDEX.format(x)})" for x in ("Task", "File")),
)


def _terms(text: str) -> str:
    """A text's terms as stored: each followed by one space, so documents are joined by
    concatenation and a document's length is its count of spaces (no list functions:
    FalkorDB's ``reduce`` crashed the server under load)."""
    return "".join(f"{term} " for term in terms(text))


# -- the statement that stores and links an episode -----------------------------------------

CREATE_EPISODE: Final = """OPTIONAL MATCH (known:Episodic {uuid: $uuid})
WITH count(known) AS known WHERE known = 0
CREATE (e:Episodic {uuid: $uuid, name: $name, group_id: $group_id,
  source_description: $source_description, source: $source, content: $content,
  entity_edges: [], created_at: $created_at, valid_at: $valid_at})
WITH e
"""
UNLINKED_EPISODE: Final = """MATCH (e:Episodic {uuid: $uuid})
WHERE NOT (e)-[:MENTIONS]->(:Task)
WITH e
"""
TASK: Final = """MERGE (c:BridgeTasks {group_id: $group_id})
ON CREATE SET c.uuid = $counter_uuid, c.tasks = 0, c.task_words = 0, c.files = 0,
  c.file_words = 0, c.changes = 0
WITH e, c
MERGE (t:Entity:Task {uuid: $task_uuid})
ON CREATE SET t.seq = c.tasks + 1, t.task = $task, t.group_id = $group_id, t.name = $task_name,
  t.summary = '', t.created_at = $created_at, t.session = $session, t.query = '',
  t.task_summary = '', t.outcome = 'unfinished', t.at = $at, t.errors = [], t.paths = [],
  t.query_terms = '', t.summary_terms = '', t.error_terms = '', t.path_terms = '',
  t.doc = '', t.doc_len = 0, t.changed = 0
SET c.tasks = CASE WHEN t.seq > c.tasks THEN t.seq ELSE c.tasks END
WITH e, c, t, t.query = '' AND $query <> '' AS asked
SET t.at = CASE WHEN $at > t.at THEN $at ELSE t.at END,
  t.query = CASE WHEN asked THEN $query ELSE t.query END,
  t.query_terms = CASE WHEN asked THEN $query_terms ELSE t.query_terms END,
  t.name = CASE WHEN asked THEN $task_name ELSE t.name END
MERGE (e)-[m:MENTIONS {uuid: $mentions_task}]->(t)
ON CREATE SET m.group_id = $group_id, m.created_at = $created_at
WITH e, c, t
"""
# A task->file edge is new when its ordinal is the task's count of files. The file's
# document is rebuilt from its tasks only then; Task->File edges of other names (facts
# Graphiti extracted) are left out of it. (FalkorDB evaluates two SET clauses in a row
# against the values before both: a value one SET needs from another passes by WITH.)
FILE: Final = """MERGE (f:Entity:File {uuid: $file_uuid})
ON CREATE SET f.name = $path, f.group_id = $group_id, f.summary = '', f.created_at = $created_at,
  f.path_terms = $path_terms, f.doc = '', f.doc_len = -1
MERGE (e)-[m2:MENTIONS {uuid: $mentions_file}]->(f)
ON CREATE SET m2.group_id = $group_id, m2.created_at = $created_at
MERGE (t)-[r:RELATES_TO {uuid: $edge_uuid}]->(f)
ON CREATE SET r.name = 'TOUCHED', r.fact = $fact, r.group_id = $group_id, r.n = size(t.paths),
  r.episodes = [$uuid], r.created_at = $created_at, r.valid_at = $valid_at
WITH e, c, t, f, r.n = size(t.paths) AS added, c.changes + 1 AS change
SET t.paths = CASE WHEN added THEN t.paths + [$path] ELSE t.paths END,
  t.path_terms = CASE WHEN added THEN t.path_terms + $path_terms ELSE t.path_terms END,
  t.changed = CASE WHEN added THEN change ELSE t.changed END,
  c.changes = CASE WHEN added THEN change ELSE c.changes END
WITH e, c, t, f, added
OPTIONAL MATCH (f)<-[r2:RELATES_TO]-(o:Task) WHERE added
WITH e, c, t, f, added, o, r2 ORDER BY o.seq DESC
WITH e, c, t, f, added,
  collect(CASE WHEN r2.name = 'TOUCHED' THEN o.query_terms END)[0..$file_doc_tasks] AS asked
WITH e, c, t, f, added, f.path_terms + string.join(asked, '') AS doc
WITH e, c, t, f, added, doc, size(split(doc, ' ')) - 1 AS n
SET c.files = c.files + CASE WHEN added AND f.doc_len < 0 THEN 1 ELSE 0 END,
  c.file_words = CASE WHEN NOT added THEN c.file_words WHEN f.doc_len < 0 THEN c.file_words + n
    ELSE c.file_words - f.doc_len + n END,
  f.doc = CASE WHEN added THEN doc ELSE f.doc END,
  f.doc_len = CASE WHEN added THEN n ELSE f.doc_len END
WITH e, c, t
"""
ERROR: Final = """WITH e, c, t, size(t.errors) < $max_errors AS room
SET t.errors = CASE WHEN room THEN t.errors + [$error] ELSE t.errors END,
  t.error_terms = CASE WHEN room THEN t.error_terms + $error_terms ELSE t.error_terms END,
  t.outcome = CASE WHEN t.outcome = 'unfinished' THEN 'failed' ELSE t.outcome END
WITH e, c, t
"""
OUTCOME_SET: Final = """SET t.outcome = $outcome, t.task_summary = $summary,
  t.summary = $summary, t.summary_terms = $summary_terms
WITH e, c, t
"""
DOC: Final = """WITH e, c, t, t.query_terms + t.summary_terms + t.error_terms + t.path_terms AS doc
WITH e, c, t, doc, size(split(doc, ' ')) - 1 AS n
SET c.task_words = c.task_words - t.doc_len + n, t.doc = doc, t.doc_len = n
RETURN t.seq AS seq"""
PARTS: Final = {"file_edit": FILE, "error": ERROR, "success": OUTCOME_SET, "note": OUTCOME_SET}


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _id(*parts: str) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, "graphiti-bridge:" + ":".join(parts)))


def link_statement(
    episode: Episode, group: str, node: dict[str, str] | None = None
) -> tuple[str, dict[str, Any]]:
    """The Cypher statement and parameters that fold ``episode`` into its task in ``group``.

    With ``node`` (the episodic node's ``name``, ``source_description``, ``source`` and
    ``content``) the statement also creates the node, and does nothing at all if a node
    with its uuid exists; without, it links an existing node not yet linked. It returns one
    row when it linked the episode, none otherwise.
    """
    meta = episode.metadata
    kind = _text(meta.get("type"))
    task = _text(meta.get("task")) or episode.uuid
    task_uuid = _id("task", group, task)
    query = _text(meta.get("task_query"))[:MAX_TASK_TEXT]
    if not query and kind in ("success", "note"):
        query = episode.body.removeprefix("Completed: ")[:MAX_TASK_TEXT]
    params: dict[str, Any] = {
        "uuid": episode.uuid,
        "group_id": group,
        "created_at": dt.datetime.now(dt.UTC),
        "valid_at": dt.datetime.fromtimestamp(episode.reference_time, dt.UTC),
        "at": episode.reference_time,
        "task": task,
        "task_uuid": task_uuid,
        "task_name": query[:MAX_NAME] or f"task {task}",
        "session": _text(meta.get("session")),
        "query": query,
        "query_terms": _terms(query),
        "mentions_task": _id("mentions", episode.uuid, task_uuid),
        "counter_uuid": str(uuid.uuid4()),
    }
    path = _text(meta.get("path"))
    part = PARTS.get(kind, "") if kind != "file_edit" or path else ""
    if part is FILE:
        file_uuid = _id("file", group, path)
        params |= {
            "path": path,
            "path_terms": _terms(path),
            "file_uuid": file_uuid,
            "mentions_file": _id("mentions", episode.uuid, file_uuid),
            "edge_uuid": _id("touched", task_uuid, file_uuid),
            "fact": f"{query[:MAX_NAME] or 'A task'} touched {path}",
            "file_doc_tasks": FILE_DOC_TASKS,
        }
    elif part is ERROR:
        error = episode.body.removeprefix("Error: ")[:MAX_TASK_TEXT]
        params |= {"error": error, "error_terms": _terms(error), "max_errors": MAX_ERRORS}
    elif part is OUTCOME_SET:
        summary = _text(meta.get("summary")) or (
            "" if kind == "success" else episode.body.removeprefix("Note: ")
        )
        summary = summary[:MAX_TASK_TEXT]
        params |= {"outcome": OUTCOME[kind], "summary": summary, "summary_terms": _terms(summary)}
    if node is None:
        return UNLINKED_EPISODE + TASK + part + DOC, params
    return CREATE_EPISODE + TASK + part + DOC, params | node


UNLINKED: Final = """MATCH (e:Episodic) WHERE NOT (e)-[:MENTIONS]->(:Task)
RETURN e.uuid AS uuid ORDER BY e.valid_at, e.uuid LIMIT $limit"""


async def backfill(
    run: Run, group: str, read: Callable[[list[str]], Awaitable[list[Episode]]]
) -> int:
    """Link every episodic node of the graph not linked yet, oldest first; return how
    many. ``read`` loads episodes by uuid."""
    linked = 0
    while True:
        rows = await run(UNLINKED, limit=BACKFILL_BATCH)
        before = linked
        for episode in await read([row["uuid"] for row in rows]):
            statement, params = link_statement(episode, group)
            linked += len(await run(statement, **params))
        if linked == before:  # nothing left, or nothing more that can be read
            return linked
