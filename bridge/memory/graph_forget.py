"""Forgetting in a graph, and listing what it holds, for the graphiti backend.

A forget deletes the selected ``Episodic`` nodes and then makes each task they belonged to
again what its remaining episodes make it, as the embedded store does: the same fold
(``sqlite_tasks.fold``) gives the task's query, summary, outcome, errors and files, its
node gets them, its ``TOUCHED`` edges to files it no longer holds go, and a task with no
episode left goes with its edges. A file node nothing links to any more goes too. Facts
that Graphiti extracted (LLM mode) lose the forgotten episodes from their ``episodes``; a
fact supported by forgotten episodes alone goes, and so does an extracted entity that only
forgotten episodes mention.

Which episodes a selector names is read from each episode's metadata (the last line of its
``source_description``), so a forget works on graphs without the task structure (Neo4j)
too: ``path`` selects the file writes of that path; ``session`` the episodes sent in that
session and every episode of the tasks it opened; ``task`` every episode of the task.

Last, the graph's ``BridgeTasks`` counter gets a new uuid: every process keeping a recall
index of the graph (``graph_recall``) loads it again on its next query, so another bridge
on the same graph recalls nothing that was forgotten either.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from typing import Any, Final

import msgspec

from bridge.episode import Episode
from bridge.memory import sqlite_tasks
from bridge.memory.base import PROJECTS_LISTED
from bridge.memory.graph_recall import TASK, task_of
from bridge.memory.graph_tasks import MAX_NAME, Run
from bridge.memory.recall import TaskHit

Read = Callable[[list[str]], Awaitable[list[Episode]]]  # episodes by uuid, in that order
SELECTED_KEY: Final = {"path": "path", "session": "session", "task": "task"}

BY_UUID: Final = """MATCH (e:Episodic) WHERE e.uuid = $value AND e.group_id = $group
RETURN e.uuid AS uuid"""
# Candidates for a metadata value: the compact JSON of ``"key":value`` in the description.
BY_METADATA: Final = """MATCH (e:Episodic) WHERE e.group_id = $group
AND e.source_description CONTAINS $needle RETURN e.uuid AS uuid"""
EPISODES_OF_TASKS: Final = """MATCH (e:Episodic)-[:MENTIONS]->(t:Task)
WHERE t.uuid IN $tasks RETURN e.uuid AS uuid"""
TASKS_WHERE: Final = {
    "session": "MATCH (t:Task) WHERE t.session = $value RETURN t.uuid AS uuid",
    "task": "MATCH (t:Task) WHERE t.task = $value RETURN t.uuid AS uuid",
}
TASKS_OF: Final = """MATCH (e:Episodic)-[:MENTIONS]->(t:Task) WHERE e.uuid IN $uuids
RETURN DISTINCT t.uuid AS uuid"""
FILES_OF: Final = """MATCH (e:Episodic)-[:MENTIONS]->(f:File) WHERE e.uuid IN $uuids
RETURN DISTINCT f.uuid AS uuid"""
# Graphiti's facts and entities (LLM mode): the task model's own edges and nodes aside.
DROP_FACTS: Final = """MATCH ()-[r:RELATES_TO]->() WHERE r.name <> 'TOUCHED'
AND any(u IN r.episodes WHERE u IN $uuids)
AND all(u IN r.episodes WHERE u IN $uuids)
DELETE r"""
TRIM_FACTS: Final = """MATCH ()-[r:RELATES_TO]->() WHERE r.name <> 'TOUCHED'
AND any(u IN r.episodes WHERE u IN $uuids)
SET r.episodes = [u IN r.episodes WHERE NOT u IN $uuids]"""
DROP_ENTITIES: Final = """MATCH (e:Episodic)-[:MENTIONS]->(n:Entity)
WHERE e.uuid IN $uuids AND NOT n:Task AND NOT n:File
WITH DISTINCT n
OPTIONAL MATCH (o:Episodic)-[:MENTIONS]->(n) WHERE NOT o.uuid IN $uuids
WITH n, count(o) AS others WHERE others = 0
DETACH DELETE n"""
DELETE_EPISODES: Final = "MATCH (e:Episodic) WHERE e.uuid IN $uuids DETACH DELETE e"
REMAINING: Final = """MATCH (e:Episodic)-[:MENTIONS]->(t:Task {uuid: $task})
RETURN e.uuid AS uuid, e.valid_at AS at ORDER BY e.valid_at, e.created_at"""
DROP_TASK: Final = "MATCH (t:Task {uuid: $task}) DETACH DELETE t"
SET_TASK: Final = """MATCH (t:Task {uuid: $task})
SET t.query = $query, t.name = $name, t.task_summary = $summary, t.summary = $summary,
  t.outcome = $outcome, t.errors = $errors, t.paths = $paths, t.at = $at"""
UNTOUCH: Final = """MATCH (t:Task {uuid: $task})-[r:RELATES_TO]->(f:File)
WHERE r.name = 'TOUCHED' AND NOT f.name IN $paths DELETE r"""
TRIM_TOUCHES: Final = """MATCH (t:Task {uuid: $task})-[r:RELATES_TO]->(:File)
WHERE r.name = 'TOUCHED' SET r.episodes = [u IN r.episodes WHERE NOT u IN $uuids]"""
DROP_LONE_FILES: Final = """MATCH (f:File) WHERE f.uuid IN $files
OPTIONAL MATCH (f)-[r]-()
WITH f, count(r) AS links WHERE links = 0
DELETE f"""
NEW_COUNTER: Final = "MATCH (c:BridgeTasks) SET c.uuid = $counter"
NEWEST: Final = f"""MATCH (t:Task) WHERE t.seq < $before
RETURN {TASK} AS task ORDER BY t.seq DESC LIMIT $limit"""
LATEST: Final = "MATCH (t:Task) RETURN max(t.at) AS at, count(t) AS tasks"
MAX_SEQ: Final = 2**62

_encode = msgspec.json.Encoder().encode


async def forget(run: Run, read: Read, group: str, kind: str, value: str) -> list[str]:
    """Forget what ``kind`` and ``value`` select in the graph of ``group`` (see the module
    docstring); return the uuids of the episodes that went."""
    doomed = await _selected(run, read, group, kind, value)
    tasks = await _uuids(run, TASKS_OF, uuids=doomed)
    if kind in TASKS_WHERE:
        tasks |= await _uuids(run, TASKS_WHERE[kind], value=value)
    files = await _uuids(run, FILES_OF, uuids=doomed)
    # The episodes go last but for the files they leave alone: a forget cut short is
    # finished by the same forget again, which finds them still there.
    for task in sorted(tasks):
        await _rebuild(run, read, task, doomed)
    if doomed:
        for statement in (DROP_FACTS, TRIM_FACTS, DROP_ENTITIES, DELETE_EPISODES):
            await run(statement, uuids=doomed)
    if files:
        await run(DROP_LONE_FILES, files=sorted(files))
    await run(NEW_COUNTER, counter=str(uuid.uuid4()))
    return doomed


async def _selected(run: Run, read: Read, group: str, kind: str, value: str) -> list[str]:
    """The uuids of the episodes a selector names."""
    if kind == "episode":
        return sorted(await _uuids(run, BY_UUID, value=value, group=group))
    key = SELECTED_KEY[kind]
    needle = f'"{key}":{_encode(value).decode()}'
    candidates = await _uuids(run, BY_METADATA, group=group, needle=needle)
    chosen = {e.uuid for e in await read(sorted(candidates)) if _selects(e, kind, value)}
    if kind == "task":
        chosen |= {e.uuid for e in await read([value]) if "task" not in e.metadata}
    if kind in TASKS_WHERE:  # every episode of the session's or the task's tasks
        tasks = await _uuids(run, TASKS_WHERE[kind], value=value)
        chosen |= await _uuids(run, EPISODES_OF_TASKS, tasks=sorted(tasks))
    return sorted(chosen)


def _selects(episode: Episode, kind: str, value: str) -> bool:
    meta = episode.metadata
    if kind == "path":
        return meta.get("type") == "file_edit" and meta.get("path") == value
    return meta.get(SELECTED_KEY[kind]) == value


async def _rebuild(run: Run, read: Read, task: str, doomed: list[str]) -> None:
    """Make a task node what its episodes but the doomed make it, or remove it."""
    rows = await run(REMAINING, task=task)
    gone = set(doomed)
    kept = [row["uuid"] for row in rows if row["uuid"] not in gone]
    folded = sqlite_tasks.fold(await read(kept))
    if folded is None:
        await run(DROP_TASK, task=task)
        return
    await run(SET_TASK, task=task, **_attributes(folded))
    await run(UNTOUCH, task=task, paths=folded.files)
    if doomed:
        await run(TRIM_TOUCHES, task=task, uuids=doomed)


def _attributes(task: TaskHit) -> dict[str, Any]:
    """A task node's attributes for a folded task, as the task model writes them."""
    return {
        "query": task.query,
        "name": task.query[:MAX_NAME] or f"task {task.uuid}",
        "summary": task.summary,
        "outcome": task.outcome,
        "errors": task.errors,
        "paths": task.files,
        "at": task.at,
    }


async def _uuids(run: Run, statement: str, **params: Any) -> set[str]:
    """The ``uuid`` column of a statement's rows (none asked for an empty list)."""
    if any(isinstance(v, list) and not v for v in params.values()):
        return set()
    return {row["uuid"] for row in await run(statement, **params) if row["uuid"] is not None}


async def newest_tasks(run: Run, limit: int, before_seq: int | None = None) -> list[TaskHit]:
    """Up to ``limit`` tasks of a graph, newest first, older than ``before_seq`` if given."""
    before = MAX_SEQ if before_seq is None else before_seq
    rows = await run(NEWEST, before=before, limit=limit)
    return [task_of(row["task"])[1] for row in rows]


async def projects(client: Any, limit: int = PROJECTS_LISTED) -> list[str]:
    """The projects whose graphs on a FalkorDB (``client``: the falkordb client) hold
    tasks, most recently active first."""
    active = []
    for name in await client.list_graphs():
        try:
            found = await client.select_graph(name).ro_query(LATEST)
        except Exception:  # a graph of another tool, or one that cannot be read now
            continue
        ((at, tasks),) = found.result_set or [(None, 0)]
        if tasks:
            active.append((-float(at), project_of(name)))
    return [project for _, project in sorted(active)[:limit]]


def project_of(group: str) -> str:
    """The project of a Graphiti group id (the inverse of ``graphiti.graph_group``)."""
    if group.startswith("_x"):
        try:
            return bytes.fromhex(group[2:]).decode()
        except ValueError:
            return group
    return group
