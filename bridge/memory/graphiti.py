"""The graphiti memory backend: graphiti-core in-process, on FalkorDB or Neo4j.

Every episode becomes a Graphiti episodic node in the project's ``group_id``, with the
episode's uuid as node uuid (so storing twice is a no-op). On FalkorDB the same write
links it into the task model, as graph structure (``graph_tasks``: task and file entities,
MENTIONS and TOUCHED edges); writes are group-committed, the episodes that arrive while a
batch is written going together into the next statement (``group_commit``), and
``candidates`` answers in both modes from a recall index kept in step with that structure
(``graph_recall``). On Neo4j episodes are stored
alone and candidates are the recalled episodes, each a task of its own.

Graphiti persists no free-form metadata on episodic nodes, so the bridge keeps it in the
field made for describing the source: ``source_description`` is the episode's description,
a newline, then the metadata as compact JSON. JSON has no raw newline, so the last line is
always the metadata.

Two modes:

- Without an LLM, ``store`` saves the node and its links; ``recall`` (the ``query``
  message) is Graphiti's episode full-text search, the one search method that needs
  neither an embedder nor a cross-encoder.
  Graphiti gets clients that refuse every call, so nothing can leave the machine.
- With an OpenAI-compatible LLM and embedder (OpenAI, Ollama, vLLM, ...), ``store`` appends
  the episode to a durable queue under ``state_dir`` (``bridge.memory.durable``), saves the node
  so it is recalled at once, and returns. A worker per group runs Graphiti's full
  ``add_episode`` (entity and fact extraction) on queued episodes in order and removes each
  when done; what is still queued when the process stops is ingested on the next start.
  When processes share the graph (``serve --workers N``, or bridges on one Valkey), a
  group is ingested by one of them at a time: its worker holds the group's lease in
  Valkey (``bridge.memory.lease``) while it has episodes to ingest, so Graphiti's ordered
  ingestion holds. Each process keeps its own queue file.
  ``recall`` adds Graphiti's hybrid search (BM25 + cosine, RRF) over facts, and
  ``candidates`` adds the best facts to the tasks and files.

FalkorDB keeps each group in its own graph (graphiti's layout), Neo4j in one database.
Graphiti accepts only ``[A-Za-z0-9_-]`` in a group id: see ``graph_group``. Searches on
FalkorDB are scoped by the graph alone: Graphiti's full-text group filter quotes the group
id, which never matches a group id with ``-`` in it (the index splits it into words).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import functools
import logging
import os
import re
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

import msgspec
from redis.backoff import ExponentialWithJitterBackoff

from bridge.background import cancel_all_and_wait
from bridge.episode import Episode
from bridge.errors import MemoryUnavailable, Overloaded
from bridge.memory import falkor, graph_forget, graph_tasks
from bridge.memory.base import Recall, Selector, Unsupported, candidates_from_recall
from bridge.memory.durable import EpisodeQueue
from bridge.memory.graph_recall import GraphRecall
from bridge.memory.graph_settings import INGEST_QUEUE_SIZE
from bridge.memory.graph_settings import LlmSettings as LlmSettings  # the backend's settings
from bridge.memory.group_commit import GroupCommit
from bridge.memory.queue_files import take_over
from bridge.memory.recall import TASK_CANDIDATES, Candidates, TaskHit
from bridge.retry import Retry

if TYPE_CHECKING:
    from bridge.memory.lease import Leases

try:
    from falkordb.asyncio import FalkorDB
    from graphiti_core import Graphiti
    from graphiti_core.cross_encoder.client import CrossEncoderClient
    from graphiti_core.driver.driver import GraphDriver
    from graphiti_core.driver.falkordb_driver import FalkorDriver
    from graphiti_core.driver.neo4j_driver import Neo4jDriver
    from graphiti_core.embedder.client import EmbedderClient
    from graphiti_core.embedder.openai import OpenAIEmbedder, OpenAIEmbedderConfig
    from graphiti_core.llm_client.client import LLMClient
    from graphiti_core.llm_client.config import LLMConfig
    from graphiti_core.llm_client.openai_generic_client import OpenAIGenericClient
    from graphiti_core.models.nodes.node_db_queries import EPISODIC_NODE_RETURN
    from graphiti_core.nodes import EpisodeType, EpisodicNode, get_episodic_node_from_record
    from graphiti_core.search.search_config import (
        EdgeReranker,
        EdgeSearchConfig,
        EdgeSearchMethod,
        EpisodeReranker,
        EpisodeSearchConfig,
        EpisodeSearchMethod,
        SearchConfig,
    )
    from openai import AsyncOpenAI
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        f"the graphiti memory backend needs the graphiti extra "
        f"(pip install 'graphiti-bridge[graphiti]'): {e}"
    ) from e

log = logging.getLogger(__name__)

SAFE_GROUP = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")
WORD = re.compile(r"\w+")
GRAPH_CONNECT_TIMEOUT_S = 5.0  # connecting to FalkorDB (and closing a connection)
GRAPH_REPLY_TIMEOUT_S = 60.0  # one FalkorDB reply (a migration of a large graph is one)
INDEX_BUILD_WAIT_S = 30.0  # how long opening a group waits for FalkorDB's index build
INDEX_BUILD_POLL_S = 0.02
WORKERS_STOP_S = 5.0  # close waits this long for ingestion stopped mid-call to end
MAX_QUERY_WORDS = 32  # FalkorDB's full-text query gives up past 128 terms
FACTS = 3  # extracted facts among a chat's candidates (LLM mode)
RECALLED_FACTS = 20
MAX_ATTEMPTS = 6  # extraction tries per episode before it is kept without extraction
# Ingestion retries what graphiti, its database or its LLM failed with (all translated
# into MemoryUnavailable by _call); waits from about a second, doubling up to a minute.
SAVE_RETRY = Retry(
    retry_on=(MemoryUnavailable,),
    backoff=ExponentialWithJitterBackoff(cap=60.0, base=0.5),
    logger=log,
)
EXTRACT_RETRY = Retry(
    retry_on=(MemoryUnavailable,),
    backoff=ExponentialWithJitterBackoff(cap=60.0, base=0.5),
    logger=log,
    attempts=MAX_ATTEMPTS,
)
EMBED_TIMEOUT_S = 10.0  # recall embeds the query: a hung embedder must not hold it long
NO_LLM = "graphiti memory runs without an LLM: this call is not allowed"
EXPORT = f"""MATCH (e:Episodic) WHERE e.group_id = $group_id
AND ($after IS NULL OR e.valid_at > $after OR (e.valid_at = $after AND e.uuid > $uuid))
RETURN {EPISODIC_NODE_RETURN} ORDER BY e.valid_at, e.uuid LIMIT $limit"""

_encode = msgspec.json.Encoder().encode
_decode_metadata = msgspec.json.Decoder(dict[str, Any]).decode


@functools.lru_cache(maxsize=1024)
def graph_group(project: str) -> str:
    """The Graphiti group id of a project: itself if Graphiti accepts it, else ``_x`` + hex.

    Injective: accepted names start with a letter or digit, mapped ones with ``_``.
    """
    return project if SAFE_GROUP.fullmatch(project) else "_x" + project.encode().hex()


def graph_driver(url: str) -> GraphDriver:
    """Graphiti's driver for a ``falkor://`` (``falkordb://``, ``redis://``) or ``bolt://``,
    ``neo4j://`` (``+s``, ``+ssc``) URL; credentials in the URL, a Neo4j database as path."""
    parts = urlsplit(url)
    user = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password else None
    host = parts.hostname or "localhost"
    if parts.scheme in ("falkor", "falkordb", "redis"):
        # Bounded waits: a graph that stops answering fails a call (retried, or reported as
        # memory unavailable) instead of holding its caller, or a shutdown, forever.
        client = FalkorDB(
            host=host,
            port=parts.port or 6379,
            username=user,
            password=password,
            socket_timeout=GRAPH_REPLY_TIMEOUT_S,
            socket_connect_timeout=GRAPH_CONNECT_TIMEOUT_S,
        )
        return FalkorDriver(falkor_db=client)
    if parts.scheme.split("+")[0] in ("bolt", "neo4j"):
        netloc = f"{host}:{parts.port}" if parts.port else host
        bare = parts._replace(netloc=netloc, path="").geturl()
        return Neo4jDriver(bare, user, password, database=parts.path.strip("/") or "neo4j")
    raise ValueError(f"unsupported graph URL scheme {parts.scheme!r} (falkor:// or bolt://)")


def _search_config(
    limit: int, fact_methods: list[EdgeSearchMethod], *, episodes: bool = True
) -> SearchConfig:
    """Episodes by BM25 (no embedder needed) and facts by ``fact_methods``, RRF-ranked."""
    by_text = EpisodeSearchConfig(
        search_methods=[EpisodeSearchMethod.bm25], reranker=EpisodeReranker.rrf
    )
    facts = EdgeSearchConfig(search_methods=fact_methods, reranker=EdgeReranker.rrf)
    return SearchConfig(
        episode_config=by_text if episodes else None,
        edge_config=facts if fact_methods else None,
        limit=limit,
    )


def _runner(driver: GraphDriver) -> graph_tasks.Run:
    """Run Cypher on a driver: its records, failures as MemoryUnavailable."""

    async def run(statement: str, **params: Any) -> list[dict[str, Any]]:
        result = await _call(driver.execute_query, statement, **params)
        return list(result[0]) if result else []  # None: an index that already exists

    return run


def _description(episode: Episode) -> str:
    """The node's ``source_description``: the episode's, a newline, its metadata."""
    return f"{episode.source_description}\n{_encode(episode.metadata).decode()}"


def _node(episode: Episode) -> EpisodicNode:
    """The Graphiti episodic node of an episode; MemoryUnavailable if it cannot be one."""
    try:
        return EpisodicNode(
            uuid=episode.uuid,
            name=episode.name,
            group_id=graph_group(episode.group_id),
            source=EpisodeType.text,
            source_description=_description(episode),
            content=episode.body,
            valid_at=dt.datetime.fromtimestamp(episode.reference_time, dt.UTC),
        )
    except (ValueError, OverflowError, TypeError, msgspec.EncodeError) as e:
        raise MemoryUnavailable(f"cannot store episode {episode.uuid}: {e}") from e


def _node_fields(episode: Episode) -> dict[str, str]:
    """What the task model's batch writes into an episode's node (as ``_node`` would),
    for an episode ``_node`` accepted."""
    return {
        "name": episode.name,
        "source_description": _description(episode),
        "source": EpisodeType.text.value,
        "content": episode.body,
    }


def _episode(node: EpisodicNode, group_id: str) -> Episode:
    """The episode of a node (one written elsewhere gets empty metadata)."""
    description, newline, tail = node.source_description.rpartition("\n")
    try:
        metadata = _decode_metadata(tail) if newline else None
    except msgspec.DecodeError:
        metadata = None
    if metadata is None:
        description, metadata = node.source_description, {}
    return Episode(
        uuid=node.uuid,
        group_id=group_id,
        name=node.name,
        body=node.content,
        source_description=description,
        reference_time=node.valid_at.timestamp(),
        metadata=metadata,
    )


class _NoLlm(LLMClient):
    async def _generate_response(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        raise MemoryUnavailable(NO_LLM)


class _NoEmbedder(EmbedderClient):
    async def create(self, input_data: Any) -> list[float]:
        raise MemoryUnavailable(NO_LLM)


class _NoReranker(CrossEncoderClient):
    async def rank(self, query: str, passages: list[str]) -> list[tuple[str, float]]:
        raise MemoryUnavailable(NO_LLM)


def _clients(llm: LlmSettings | None) -> dict[str, Any]:
    """Graphiti's LLM, embedder and cross-encoder (recall reranks with RRF: never used)."""
    if llm is None:
        return {
            "llm_client": _NoLlm(None),
            "embedder": _NoEmbedder(),
            "cross_encoder": _NoReranker(),
        }
    config = LLMConfig(llm.api_key, llm.model, llm.base_url, small_model=llm.small_model)
    embedder = OpenAIEmbedderConfig(
        api_key=llm.api_key,
        base_url=llm.base_url,
        embedding_model=llm.embedding_model,
        embedding_dim=llm.embedding_dim,
    )
    client = AsyncOpenAI(
        api_key=llm.api_key, base_url=llm.base_url, timeout=EMBED_TIMEOUT_S, max_retries=1
    )
    return {
        "llm_client": OpenAIGenericClient(config),
        "embedder": OpenAIEmbedder(embedder, client=client),
        "cross_encoder": _NoReranker(),
    }


async def _indexed(driver: GraphDriver) -> None:
    """Wait for the index build graphiti's drivers schedule when created (FalkorDB indexes
    each group's graph separately); build again if that failed."""
    task = getattr(driver, "_init_task", None)
    if task is not None:
        with contextlib.suppress(Exception):
            await task
            return
    await driver.build_indices_and_constraints()


async def _built(driver: GraphDriver) -> None:
    """Wait (bounded) until FalkorDB has built the graph's indexes: it builds them in the
    background, and a search before it is done can miss what was just stored."""
    if not isinstance(driver, FalkorDriver):
        return
    loop = asyncio.get_running_loop()
    deadline = loop.time() + INDEX_BUILD_WAIT_S
    while True:
        records, _, _ = await driver.execute_query("CALL db.indexes() YIELD status")
        building = [r["status"] for r in records if "UNDER CONSTRUCTION" in str(r["status"])]
        if not building:
            return
        if loop.time() >= deadline:
            log.warning("graph %s: indexes still being built: %s", driver._database, building)
            return
        await asyncio.sleep(INDEX_BUILD_POLL_S)


async def _call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Await a graphiti call, translating its failures into MemoryUnavailable."""
    try:
        return await fn(*args, **kwargs)
    except MemoryUnavailable:
        raise
    except Exception as e:
        raise MemoryUnavailable(f"graphiti: {type(e).__name__}: {e}") from e


class GraphitiMemory:
    """A MemoryBackend on graphiti-core; see the module docstring for the two modes."""

    name = "graphiti"

    def __init__(
        self,
        graph_url: str,
        *,
        state_dir: Path,
        llm: LlmSettings | None = None,
        queue_size: int = INGEST_QUEUE_SIZE,
        queue_path: Path | None = None,
        take_over: Sequence[Path] = (),
        leases: Leases | None = None,
    ) -> None:
        self.graph_url = graph_url
        self.queue = EpisodeQueue(queue_path or state_dir / "graphiti-queue.sqlite3")
        self._orphans = list(take_over)  # queue files of processes gone, taken over at start
        self.leases = leases  # one ingest worker per group among the processes sharing it
        self.llm = llm
        self.queue_size = queue_size  # per group
        self._driver: GraphDriver | None = None
        self._clients: dict[str, Any] = {}
        self._graphs: dict[str, Graphiti] = {}
        self.tasks = GraphRecall()  # the recall index of the task model (FalkorDB)
        self._commits: dict[str, GroupCommit[Episode, bool]] = {}  # per group (FalkorDB)
        self._task_runs: dict[str, graph_tasks.Run] = {}  # per group (FalkorDB)
        # FalkorDB crashed (SIGSEGV in its full-text index reader, IR_Read) when a full-text
        # search ran while an episode was written to the same graph, so the two never
        # overlap on one graph: writes and full-text reads (Graphiti's search) of a group
        # take turns.
        self._turns: dict[str, asyncio.Lock] = {}
        self._opening: dict[str, asyncio.Lock] = {}  # per group: opened once
        self._lanes: dict[str, asyncio.Queue[Episode]] = {}
        self._queued: dict[str, str] = {}  # uuid -> group of every episode not yet ingested
        self._workers: list[asyncio.Task[None]] = []
        self._open = False

    async def start(self) -> None:
        """Connect, build Graphiti's indices, and resume ingesting what is still queued."""
        os.environ.setdefault("GRAPHITI_TELEMETRY_ENABLED", "false")  # read by each Graphiti()
        try:
            self._clients = _clients(self.llm)
            self._driver = graph_driver(self.graph_url)
            await _indexed(self._driver)
            pending: list[Episode] = []
            if self.llm is not None or self.queue.path.exists() or self._orphans:
                await self.queue.open()
                for path in self._orphans:
                    await take_over(path, self.queue)
                pending = await self.queue.head()
            if self.llm is None:  # queued by a run with an LLM: kept, without extraction
                for episode in pending:
                    await self._save(episode)
                    await self.queue.remove(episode.uuid)
        except Exception as e:
            await self._disconnect()
            raise MemoryUnavailable(f"graphiti memory cannot start: {e}") from e
        self._open = True
        kind = type(self._driver).__name__.removesuffix("Driver")
        if self.llm is None:
            log.info("graphiti memory on %s, without an LLM: recall through its task model", kind)
            return
        model, where = self.llm.model or "(default model)", self.llm.base_url or "OpenAI"
        log.info(
            "graphiti memory on %s, with LLM %s at %s: extraction and hybrid recall; %d queued",
            *(kind, model, where, len(pending)),
        )
        for episode in pending:
            self._enqueue(episode)

    async def close(self) -> None:
        """Stop the workers (what they had not finished stays queued) and disconnect."""
        if not self._open:
            return
        self._open = False
        stuck = await cancel_all_and_wait(self._workers, WORKERS_STOP_S)
        if stuck:  # its episode stays queued, for the next start
            log.warning("%d graphiti ingestion workers still running at close", len(stuck))
        for commit in self._commits.values():  # what was sent is answered
            await commit.close()
        await self._disconnect()

    async def _disconnect(self) -> None:
        with contextlib.suppress(MemoryUnavailable):
            await self.queue.close()
        for graph in self._graphs.values():  # index builds graphiti started on group drivers
            task = getattr(graph.driver, "_init_task", None)
            if graph.driver is not self._driver and task is not None:
                await cancel_all_and_wait([task], WORKERS_STOP_S)
        if self._driver is not None:
            with contextlib.suppress(Exception):
                await self._driver.close()  # type: ignore[no-untyped-call]
        # The LLM's and the embedder's HTTP clients: left open, their connection pools are
        # closed by the garbage collector after the event loop, which logs an error.
        for part in (self._clients.get("llm_client"), self._clients.get("embedder")):
            if isinstance(client := getattr(part, "client", None), AsyncOpenAI):
                with contextlib.suppress(Exception):
                    await client.close()

    def pending(self, group_id: str | None = None) -> int:
        """Episodes acknowledged but not yet through extraction (of one project or all)."""
        if group_id is None:
            return len(self._queued)
        return sum(1 for g in self._queued.values() if g == graph_group(group_id))

    async def store(self, episode: Episode) -> bool:
        """Make the episode durable (see the module docstring); a known uuid is a no-op.

        True when it was stored, False when an episode with its uuid already was.
        """
        if not self._open:
            raise MemoryUnavailable("graphiti memory is not open")
        node = _node(episode)  # refuses what could never be saved, before queueing it
        if self.llm is None:
            return await self._save(episode)
        if episode.uuid in self._queued:
            return False
        if self.pending(episode.group_id) >= self.queue_size:
            raise Overloaded(f"graphiti ingest queue of {episode.group_id!r} is full")
        self._queued[episode.uuid] = node.group_id  # claimed: a concurrent twin returns above
        try:
            with contextlib.suppress(MemoryUnavailable):  # graph unreachable: queue it anyway
                if await self._exists(node):
                    self._queued.pop(episode.uuid, None)
                    return False
            await self.queue.append(episode)
        except BaseException:
            self._queued.pop(episode.uuid, None)
            raise
        try:
            await self._save(episode)  # recallable at once; the worker retries if this fails
        except MemoryUnavailable as e:
            log.warning("episode %s queued, not yet in the graph: %s", episode.uuid, e)
        self._enqueue(episode)
        return True

    async def recall(self, group_id: str, query: str, limit: int) -> Recall:
        """Episodes (BM25) and, with an LLM, facts (hybrid search) relevant to ``query``.

        If the hybrid search fails (the embedder is down), facts are found by BM25 alone.
        """
        text = " ".join(WORD.findall(query)[:MAX_QUERY_WORDS])
        if not text or limit < 1:
            return Recall(episodes=[])
        episodes, facts = await self._search(graph_group(group_id), text, limit, episodes=True)
        return Recall(episodes=[_episode(n, group_id) for n in episodes], facts=facts)

    async def _search(
        self, group: str, text: str, limit: int, *, episodes: bool
    ) -> tuple[list[EpisodicNode], list[str]]:
        """Episodes (if asked) and current facts, by Graphiti's search in one group."""
        graph = await self._graph(group)
        hybrid = [EdgeSearchMethod.bm25, EdgeSearchMethod.cosine_similarity] if self.llm else []
        # On FalkorDB the graph is the group (see the module docstring).
        scope = None if isinstance(graph.driver, FalkorDriver) else [group]
        try:
            config = _search_config(limit, hybrid, episodes=episodes)
            async with self._turn(group):
                results = await _call(graph.search_, text, config=config, group_ids=scope)
        except MemoryUnavailable as e:
            if not hybrid:
                raise
            log.warning("hybrid recall failed, using full-text only: %s", e)
            config = _search_config(limit, [EdgeSearchMethod.bm25], episodes=episodes)
            results = await _call(graph.search_, text, config=config, group_ids=scope)
        now = dt.datetime.now(dt.UTC)
        facts = [
            edge.fact
            for edge in results.edges
            if edge.expired_at is None
            and (edge.invalid_at is None or edge.invalid_at > now)
            and edge.name != graph_tasks.TOUCHED  # the task model's own edges
        ]
        return results.episodes, facts

    async def candidates(self, group_id: str, query: str) -> Candidates:
        """Past tasks and files matching ``query``, and the project's recent work, from the
        recall index of the graph's task structure (see ``graph_recall``); with an LLM, the
        best extracted facts first. Without that structure (Neo4j), the recalled facts and
        episodes, each a task of its own."""
        group = graph_group(group_id)
        if not self._structured:
            return candidates_from_recall(await self.recall(group_id, query, TASK_CANDIDATES))
        found = await self.tasks.candidates(await self._run(group), group, query)
        text = " ".join(WORD.findall(query)[:MAX_QUERY_WORDS])
        if self.llm is None or not text:
            return found
        _, facts = await self._search(group, text, RECALLED_FACTS, episodes=False)
        best = max((t.relevance for t in found.tasks), default=1.0)
        hits = [
            TaskHit(
                uuid=f"fact:{n}", seq=found.latest_seq, summary=fact, outcome="fact", relevance=best
            )
            for n, fact in enumerate(facts[:FACTS])
        ]
        return msgspec.structs.replace(found, tasks=hits + found.tasks)

    async def export(self, group_id: str, batch: int) -> AsyncIterator[list[Episode]]:
        """Every episode of ``group_id`` by (reference time, uuid), ``batch`` at a time."""
        group = graph_group(group_id)
        query = (await self._graph(group)).driver.execute_query
        after: Any = None
        uuid = ""
        size = max(1, batch)
        while True:
            records, _, _ = await _call(
                query, EXPORT, group_id=group, after=after, uuid=uuid, limit=size
            )
            if records:
                yield [_episode(get_episodic_node_from_record(r), group_id) for r in records]
                after, uuid = records[-1]["valid_at"], records[-1]["uuid"]
            if len(records) < size:
                return

    async def forget(self, group_id: str, selector: Selector) -> int:
        """Forget what ``selector`` names (``graph_forget``), taking turns with the group's
        writes; what waited for extraction leaves the queue, and the index reloads."""
        group = graph_group(group_id)
        driver = (await self._graph(group)).driver
        async with self._turn(group):
            read = self._reader(driver, group_id)
            gone = await graph_forget.forget(
                _runner(driver), read, group, selector.kind, selector.value
            )
        for uuid in gone:
            if self._queued.pop(uuid, None) is not None:
                await self.queue.remove(uuid)
        self.tasks.forget(group)
        return len(gone)

    async def newest_tasks(
        self, group_id: str, limit: int, before_seq: int | None = None
    ) -> list[TaskHit]:
        """The project's tasks newest first, from the graph's task nodes (FalkorDB)."""
        if not self._structured:
            raise Unsupported("graphiti on Neo4j keeps no task structure to list tasks from")
        run = await self._run(graph_group(group_id))
        return await graph_forget.newest_tasks(run, limit, before_seq)

    async def projects(self) -> list[str]:
        """The projects whose graphs hold tasks (FalkorDB), most recently active first."""
        if not self._structured:
            raise Unsupported("graphiti on Neo4j keeps no task structure to list projects by")
        projects: list[str] = await _call(graph_forget.projects, self._driver.client)  # type: ignore[union-attr]
        return projects

    async def _graph(self, group: str) -> Graphiti:
        """The Graphiti instance of one group, on that group's driver (its graph on Falkor).

        Opening a group builds its indexes and links what earlier releases stored; other
        groups do not wait for it.
        """
        graph = self._graphs.get(group)
        if graph is not None:
            return graph
        if self._driver is None:
            raise MemoryUnavailable("graphiti memory is not open")
        async with self._opening.setdefault(group, asyncio.Lock()):
            if group not in self._graphs:
                driver = self._driver.clone(database=group)
                await _call(_indexed, driver)
                if self._structured:
                    for statement in graph_tasks.SCHEMA:
                        await _runner(driver)(statement)
                await _call(_built, driver)
                if self._structured:
                    await self._open_tasks(driver, group)
                self._graphs[group] = Graphiti(graph_driver=driver, **self._clients)
            return self._graphs[group]

    async def _open_tasks(self, driver: GraphDriver, group: str) -> None:
        """Migrate what an earlier release kept, link the episodes it did not link, and
        start the group's writer (the task model is indexed by then)."""
        run = self._task_runs[group] = falkor.runner(driver.client.select_graph(group))  # type: ignore[attr-defined]
        if await graph_tasks.migrate(run):
            log.info("graph %s: full-text task search migrated to the recall index", group)
        linked = await graph_tasks.backfill(run, group, self._reader(driver, group))
        if linked:
            log.info("graph %s: %d earlier episodes linked into tasks", group, linked)

        async def send(episodes: list[Episode]) -> list[bool]:
            return await self._write(run, group, episodes)

        self._commits[group] = GroupCommit(send)

    async def _write(self, run: graph_tasks.Run, group: str, episodes: list[Episode]) -> list[bool]:
        """Store and link a batch of episodes in one statement, and apply the tasks it
        changed to the recall index; for each episode, True if it was new (a uuid given
        twice is new once at most)."""
        distinct = list({episode.uuid: episode for episode in reversed(episodes)}.values())[::-1]
        fields = [_node_fields(episode) for episode in distinct]
        statement, params = graph_tasks.link_batch(distinct, group, fields)
        async with self._turn(group):
            (row,) = await run(statement, **params)
        self.tasks.written(group, row["counter"], row["tasks"])
        new = set(row["new"])
        stored = []
        for episode in episodes:
            stored.append(episode.uuid in new)
            new.discard(episode.uuid)
        return stored

    @property
    def _structured(self) -> bool:
        """True when the task model is kept as graph structure (FalkorDB)."""
        return isinstance(self._driver, FalkorDriver)

    def _turn(self, group: str) -> asyncio.Lock:
        """The lock that keeps a group's writes and full-text reads from overlapping."""
        return self._turns.setdefault(group, asyncio.Lock())

    async def _run(self, group: str) -> graph_tasks.Run:
        """The runner of a group's task-model statements (the group opened first)."""
        await self._graph(group)
        return self._task_runs[group]

    @staticmethod
    def _reader(driver: GraphDriver, group_id: str) -> Callable[[list[str]], Any]:
        async def read(uuids: list[str]) -> list[Episode]:
            nodes = await _call(EpisodicNode.get_by_uuids, driver, uuids)
            by_uuid = {node.uuid: _episode(node, group_id) for node in nodes}
            return [by_uuid[u] for u in uuids if u in by_uuid]

        return read

    async def _exists(self, node: EpisodicNode) -> bool:
        driver = (await self._graph(node.group_id)).driver
        return bool(await _call(EpisodicNode.get_by_uuids, driver, [node.uuid]))

    async def _save(self, episode: Episode) -> bool:
        """Save the episode's node unless a node with its uuid exists, and (FalkorDB) link
        it into its task in the same query; True if it was new."""
        if self._structured:  # the episode was checked by _node when it was stored
            group = graph_group(episode.group_id)
            await self._graph(group)  # opened: its writer exists
            return await self._commits[group].write(episode)
        node = _node(episode)
        if await self._exists(node):
            return False
        await _call(node.save, (await self._graph(node.group_id)).driver)
        return True

    # -- the ingest queue (LLM mode) ------------------------------------------------------

    def _enqueue(self, episode: Episode) -> None:
        group = graph_group(episode.group_id)
        self._queued[episode.uuid] = group
        lane = self._lanes.get(group)
        if lane is None:
            lane = self._lanes[group] = asyncio.Queue()
            self._workers.append(asyncio.create_task(self._ingest_loop(group, lane)))
        lane.put_nowait(episode)

    async def _ingest_loop(self, group: str, lane: asyncio.Queue[Episode]) -> None:
        """Feed one group's queued episodes to add_episode, in order, one at a time, holding
        the group's lease (if processes share the graph) while there are any."""
        while True:
            episode = await lane.get()
            turn = self.leases.lease(group).held() if self.leases else contextlib.nullcontext()
            async with turn as held:
                while True:
                    await self._ingest_queued(episode)
                    if lane.empty() or (held is not None and held.lost.is_set()):
                        break  # the lease is let go (or lost): taken again for the next
                    episode = lane.get_nowait()

    async def _ingest_queued(self, episode: Episode) -> None:
        """Ingest one queued episode (unless forgotten while it waited) and dequeue it."""
        if episode.uuid in self._queued:
            await self._ingest(episode)
            try:
                await self.queue.remove(episode.uuid)
            except MemoryUnavailable as e:  # it will be ingested again: harmless
                log.warning("cannot dequeue episode %s: %s", episode.uuid, e)
            self._queued.pop(episode.uuid, None)

    async def _ingest(self, episode: Episode) -> None:
        """Save the node (retrying until it is), then extract (up to MAX_ATTEMPTS tries)."""
        node = _node(episode)

        async def extract() -> None:
            await _call(
                (await self._graph(node.group_id)).add_episode,
                name=node.name,
                episode_body=node.content,
                source_description=node.source_description,
                reference_time=node.valid_at,
                source=node.source,
                group_id=node.group_id,
                uuid=node.uuid,
            )

        await SAVE_RETRY.call(lambda: self._save(episode), f"saving episode {node.uuid}")
        try:
            await EXTRACT_RETRY.call(extract, f"extracting episode {node.uuid}")
        except MemoryUnavailable as e:
            log.error("episode %s kept without extraction: %s", node.uuid, e)
