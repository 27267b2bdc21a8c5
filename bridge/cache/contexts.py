"""The Valkey context cache: keys, path tags, invalidation and outage handling.

Layout in Valkey, under a configurable prefix (``gb:`` by default)::

    {prefix}ctx:{{project id}}:{sha256(project, query)}  the context ("" = memory had none)
    {prefix}tag:{{project id}}:{path}                    SET of ctx keys naming path
    {prefix}all:{{project id}}                           ZSET of the project's ctx keys
    {prefix}epoch:{{project id}}                         bumped by every invalidation

The project id is a hash of the project and of the memory behind the cache (its
``namespace``: which backend and which store), so bridges on different stores never share
contexts, and it is the keys' hash tag: every key of a project lies in one cluster slot.

A context is stored only if the project's epoch has not moved since the lookup that missed,
so a memory query that raced a file write can never cache what the write made stale.
Invalidation runs as one Lua script in Valkey, so it holds for every bridge process that
shares the Valkey. Forgetting drops every context of the project at once, through the set
of all of them; a store trims that set's expired members, so it holds live contexts only.
The scripts touch several keys, all of one project, so they run on a Valkey Cluster too
(see ``bridge.cache.valkey`` for the kinds of Valkey and how a cluster is recognised).

Memory stays bounded without ever serving a stale context: a context naming more than
MAX_TAGS paths is not cached, and Valkey must not evict (the private one runs with
``maxmemory`` and ``noeviction``): evicting a tag set while its contexts stay would leave
them beyond invalidation. When Valkey is full a store is refused as a whole, so nothing is
cached until contexts expire, while invalidation still runs: its first write is a DEL,
which a full Valkey allows, and a script that has written is let finish.

At most ``pool_size`` operations use Valkey at once; more wait for a connection (within
their deadline), and a wait that runs out is reported as the pool being busy, not as
Valkey being unreachable.

Hits are served from an in-process copy (see ``bridge.cache.tracking``) that Valkey keeps honest
by pushing every change to a context key; only copies not yet made go over the network.

When Valkey cannot be reached, every call raises CacheUnavailable at once (no waiting on a
dead server) until a backoff schedule allows one probe; invalidations that could not be
applied are replayed before the next lookup is served. Any other refusal (MOVED, CROSSSLOT,
a script error, a failure of the client itself) is a cache failure too: logged, counted,
and reported by ``problem`` for FAILING_FOR seconds after the last one.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import sys
import time
import unicodedata
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Final, TypeVar, cast

import msgspec
from redis.backoff import AbstractBackoff, ExponentialWithJitterBackoff
from redis.exceptions import (
    AskError,
    ClusterDownError,
    MaxConnectionsError,
    MovedError,
    OutOfMemoryError,
    RedisClusterException,
    RedisError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from bridge.background import cancel_and_wait
from bridge.cache.coalesce import Coalescer
from bridge.cache.following import Follower
from bridge.cache.paths import path_suffixes
from bridge.cache.tracking import LocalContexts, is_missing
from bridge.cache.valkey import Valkey, ValkeyUrlError, detect, open_valkey
from bridge.errors import CacheUnavailable
from bridge.retry import Retry

log = logging.getLogger(__name__)
T = TypeVar("T")

# Failures that mean Valkey (or part of a cluster) cannot be reached right now.
_TRANSIENT: Final = (
    RedisConnectionError,
    RedisTimeoutError,
    OSError,
    ClusterDownError,
    RedisClusterException,
)
DEFAULT_PREFIX: Final = "gb:"  # of every key
DEFAULT_TTL: Final = 300  # seconds a cached context lives
MAX_PENDING_PATHS: Final = 10_000
# A context naming more paths than this is not cached: its tags would cost more than it saves.
MAX_TAGS: Final = 64
# Bytes of queries kept with their digests, so a repeated query skips NFKC and SHA-256.
DIGEST_MEMO_BYTES: Final = 4 << 20
STRAIN_LOG_INTERVAL: Final = 60.0
FAILING_FOR: Final = 10.0  # seconds a failed operation keeps the cache reported degraded
PROJECT_IDS: Final = 4096  # project ids kept computed (the hash tag of every key)
# Asking a Valkey given by URL what kind it is (server or cluster), until it answers.
DETECTION_RETRY: Final = Retry(
    retry_on=(TimeoutError, RedisError, OSError),
    backoff=ExponentialWithJitterBackoff(cap=5.0, base=0.05),
    logger=log,
)

# KEYS: epoch, ctx, all, tag... ; ARGV: expected epoch, value, ttl. The project's set of
# contexts is scored by expiry (Valkey's clock), so each store trims the expired ones.
_PUT: Final = """
local current = redis.call('GET', KEYS[1]) or '0'
if current ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[2], ARGV[2], 'EX', ARGV[3])
local ttl = tonumber(ARGV[3])
local now = tonumber(redis.call('TIME')[1])
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
redis.call('ZADD', KEYS[3], now + ttl, KEYS[2])
if redis.call('TTL', KEYS[3]) < ttl then redis.call('EXPIRE', KEYS[3], ttl) end
for i = 4, #KEYS do
  redis.call('SADD', KEYS[i], KEYS[2])
  redis.call('EXPIRE', KEYS[i], ARGV[3])
end
return 1
"""

# KEYS: epoch, tag... ; returns the context keys dropped. Deletes come first: a full
# Valkey refuses a script whose first write may grow memory (INCR), but once a script has
# written it is let finish, so the epoch is bumped even when Valkey is at maxmemory.
_INVALIDATE: Final = """
local dropped = {}
for i = 2, #KEYS do
  for _, key in ipairs(redis.call('SMEMBERS', KEYS[i])) do
    if redis.call('DEL', key) == 1 then table.insert(dropped, key) end
  end
  redis.call('DEL', KEYS[i])
end
redis.call('INCR', KEYS[1])
return dropped
"""

# KEYS: epoch, all ; every context of the project, deletes first as above.
_INVALIDATE_ALL: Final = """
local dropped = {}
for _, key in ipairs(redis.call('ZRANGE', KEYS[2], 0, -1)) do
  if redis.call('DEL', key) == 1 then table.insert(dropped, key) end
end
redis.call('DEL', KEYS[2])
redis.call('INCR', KEYS[1])
return dropped
"""


class Lookup(msgspec.Struct, frozen=True):
    """Result of a cache lookup. ``epoch`` is what a later ``put`` must present."""

    hit: bool
    inject: str | None
    epoch: bytes


class DigestMemo:
    """Digests of recent (project, query) pairs, least recently used first out, bounded by
    the bytes of the strings it keeps: hits repeat queries verbatim, so they skip NFKC and
    SHA-256, and long queries cannot make the memo large."""

    def __init__(self, max_bytes: int = DIGEST_MEMO_BYTES) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self._digests: OrderedDict[tuple[str, str], str] = OrderedDict()

    def digest(self, project: str, query: str) -> str:
        """SHA-256 of the project and the normalised query, as hex."""
        key = (project, query)
        found = self._digests.get(key)
        if found is not None:
            self._digests.move_to_end(key)
            return found
        digest = hashlib.sha256(f"{project}\0{normalise_query(query)}".encode()).hexdigest()
        size = _size(key)
        if size <= self.max_bytes // 16:  # a huge query would push out many others
            self._digests[key] = digest
            self.bytes += size
            while self.bytes > self.max_bytes:
                self.bytes -= _size(self._digests.popitem(last=False)[0])
        return digest


def _size(key: tuple[str, str]) -> int:
    return sys.getsizeof(key[0]) + sys.getsizeof(key[1])


_digests: Final = DigestMemo()


def normalise_query(query: str) -> str:
    """The form of a query that decides cache identity: NFKC, case-folded, single-spaced."""
    return " ".join(unicodedata.normalize("NFKC", query).casefold().split())


class Outage:
    """Whether Valkey is reachable: fail fast while it is not, probe on a backoff schedule.

    ``clock`` gives the time in seconds (``time.monotonic`` unless a test drives it)."""

    def __init__(
        self, backoff: AbstractBackoff, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._backoff = backoff
        self._clock = clock
        self.down_since: float | None = None
        self.failures = 0
        self._retry_at = 0.0

    def allows_attempt(self) -> bool:
        """True when Valkey is up, or when it is down and the next probe is due."""
        return self.down_since is None or self._clock() >= self._retry_at

    def failed(self) -> bool:
        """Record a failure; True if it starts an outage."""
        now = self._clock()
        self.failures += 1
        self._retry_at = now + self._backoff.compute(self.failures)
        if self.down_since is None:
            self.down_since = now
            return True
        return False

    def succeeded(self) -> int | None:
        """Record a success; if it ends an outage, how many operations failed during it."""
        if self.down_since is None:
            return None
        failed, self.failures, self.down_since = self.failures, 0, None
        self._backoff.reset()  # type: ignore[no-untyped-call]
        return failed


class ContextCache:
    """Memory contexts cached in Valkey, tagged by the file paths they mention."""

    def __init__(
        self,
        valkey: Valkey,
        *,
        prefix: str = DEFAULT_PREFIX,
        ttl: int = DEFAULT_TTL,
        outage_backoff: AbstractBackoff | None = None,
        clock: Callable[[], float] = time.monotonic,
        timeout: float = 0.5,
        on_unavailable: Callable[[], None] = lambda: None,
        local: LocalContexts | None = None,
        namespace: str = "",
    ) -> None:
        self.timeout = timeout
        self._prefix = prefix
        self.namespace = namespace
        self.ttl = ttl
        backoff = outage_backoff or ExponentialWithJitterBackoff(cap=5.0, base=0.05)
        self.outage = Outage(backoff, clock)
        self._on_unavailable = on_unavailable
        self._pending: dict[str, set[str]] = {}
        self._pending_overflow = False
        self._pending_projects: set[str] = set()  # every context of these to drop
        self._replay_lock = asyncio.Lock()
        self._invalidations: Coalescer[str, str, int] = Coalescer(self._invalidate_batch)
        self.pool_size = valkey.pool_size
        self._slots = asyncio.Semaphore(self.pool_size)  # one per pooled connection
        self._strain_logged: dict[str, float] = {}  # when each kind of strain was last logged
        self._failing: tuple[float, str] | None = None  # when and why one last failed
        self._project_ids: dict[str, str] = {}
        self.local = local
        self.follower: Follower | None = None
        self._url: str | None = None  # set while what kind of Valkey it is is not known
        self._detecting: asyncio.Task[None] | None = None
        self._attach(valkey)

    def _attach(self, valkey: Valkey) -> None:
        """Use ``valkey`` from now on: its client, its scripts, its primaries to follow."""
        self.valkey = valkey
        self._client = valkey.client
        self._put = valkey.client.register_script(_PUT)
        self._invalidate = valkey.client.register_script(_INVALIDATE)
        self._invalidate_all = valkey.client.register_script(_INVALIDATE_ALL)
        if self.local is None:
            return
        if valkey.tls:
            log.warning("no local context cache over TLS: every hit asks Valkey")
            self.local = None
            return
        following = valkey.topology() or valkey.discover
        self.follower = Follower(self.local, self._prefix, valkey.credentials(), following)

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        timeout: float = 0.5,
        local_entries: int = 10_000,
        pool_size: int = 256,
        **kwargs: Any,
    ) -> ContextCache:
        """A cache on a new client for ``url`` (redis://, rediss://, unix:// or
        redis+sentinel://), without asking the server anything: ``connect`` also finds out
        whether it is a cluster.

        The client retries once on a broken connection (a pooled socket that died with a
        restarted server); an operation that takes longer than ``timeout`` fails (one
        deadline per operation, not one per socket read: that costs a task per command).
        ``local_entries`` bounds the in-process copy of contexts (0 turns it off);
        ``pool_size`` how many operations use Valkey at once (more wait for a connection).
        Raises ValkeyUrlError (a ValueError) for a URL that cannot be used.
        """
        valkey = open_valkey(url, timeout=timeout, pool_size=pool_size)
        if local_entries:
            kwargs["local"] = LocalContexts(local_entries, max_age=kwargs.get("ttl", DEFAULT_TTL))
        return cls(valkey, timeout=timeout, **kwargs)

    @classmethod
    async def connect(cls, url: str, *, timeout: float = 0.5, **kwargs: Any) -> ContextCache:
        """A cache for ``url`` as ``from_url`` makes it, with a cluster client when the server
        is a cluster node. When the server does not answer, ``start`` keeps asking."""
        cache = cls.from_url(url, timeout=timeout, **kwargs)
        cache._url = url
        try:
            async with asyncio.timeout(timeout * 4):
                await cache._detect()
        except (TimeoutError, RedisError, OSError) as e:
            log.warning("Valkey did not say what it is (%s); asking again in the background", e)
        else:
            cache._url = None
        return cache

    async def _detect(self) -> bool:
        """Ask the server whether it is a cluster node; True if the client was replaced."""
        assert self._url is not None
        found = await detect(self._url, self.valkey, timeout=self.timeout, pool_size=self.pool_size)
        if found is self.valkey:
            return False
        log.info("Valkey is a cluster: using the cluster client")
        old = self.follower
        self._attach(found)
        if old is not None:
            await old.stop()
        return True

    async def _detect_until_known(self) -> None:
        """Ask what kind of Valkey this is until it answers (then follow its primaries)."""

        async def detect() -> bool:
            async with asyncio.timeout(self.timeout * 4):
                return await self._detect()

        try:
            switched = await DETECTION_RETRY.call(detect, "asking Valkey what kind it is")
        except ValkeyUrlError as e:
            self._url = None
            log.error("%s: the cache stays degraded until the URL is fixed", e)
            self._failed(str(e))
            return
        self._url = None
        if switched and self.follower is not None:
            self.follower.start()

    async def start(self, wait: float = 1.0) -> None:
        """Start following Valkey's invalidations; wait up to ``wait`` s for the stream."""
        if self._url is not None and self.valkey.kind == "server":
            self._detecting = asyncio.create_task(self._detect_until_known(), name="valkey-kind")
        if self.follower is not None:
            self.follower.start()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.follower.connected.wait(), wait)

    async def problem(self) -> str | None:
        """Why Valkey cannot serve the cache right now, or None when it works: Valkey is
        asked (every primary, on a cluster), and no operation may have failed in the last
        FAILING_FOR seconds."""
        try:
            async with asyncio.timeout(self.timeout):
                async with self._slots:
                    found = await self.valkey.problem()
        except TimeoutError:
            if self._slots.locked():
                return f"all {self.pool_size} connections busy"
            return "unreachable"
        except MaxConnectionsError:
            return f"all {self.pool_size} connections busy"
        except (RedisError, OSError) as e:
            return f"unreachable ({type(e).__name__}: {e})"
        return found or self.failing

    @property
    def failing(self) -> str | None:
        """Why the last failed operation failed, if that was less than FAILING_FOR seconds
        ago (others may have succeeded since: a cluster may fail for some slots only)."""
        if self._failing is None:
            return None
        when, why = self._failing
        age = time.monotonic() - when
        return None if age > FAILING_FOR else f"{why}, {age:.0f} s ago"

    def _failed(self, why: str) -> None:
        self._failing = (time.monotonic(), why)

    def local_problem(self) -> str | None:
        """Why the in-process copy is not serving hits (it follows not every primary), or
        None: when it serves, or when it is off by configuration."""
        if self.local is None or self.follower is None:
            return None
        return self.follower.problem()

    async def close(self) -> None:
        """Stop the invalidation stream, close the client and its connections."""
        await cancel_and_wait(self._detecting)
        if self.follower is not None:
            await self.follower.stop()
        await self.valkey.aclose()

    # -- keys -----------------------------------------------------------------------------

    def _project_id(self, project: str) -> str:
        """The hash tag of every key of ``project`` in this cache's memory (one slot)."""
        found = self._project_ids.get(project)
        if found is None:
            if len(self._project_ids) >= PROJECT_IDS:
                self._project_ids.clear()
            named = f"{self.namespace}\0{project}".encode()
            found = self._project_ids[project] = hashlib.sha256(named).hexdigest()[:32]
        return found

    def context_key(self, project: str, query: str) -> str:
        """Full-length hash of project and normalised query: no prefix collisions."""
        digest = _digests.digest(project, query)
        return f"{self._prefix}ctx:{{{self._project_id(project)}}}:{digest}"

    def tag_key(self, project: str, path: str) -> str:
        """The set of context keys that mention ``path`` (already normalised)."""
        return f"{self._prefix}tag:{{{self._project_id(project)}}}:{path}"

    def project_key(self, project: str) -> str:
        """The project's contexts, scored by when they expire."""
        return f"{self._prefix}all:{{{self._project_id(project)}}}"

    def epoch_key(self, project: str) -> str:
        """The project's invalidation counter."""
        return f"{self._prefix}epoch:{{{self._project_id(project)}}}"

    # -- operations -----------------------------------------------------------------------

    def lookup_local(self, project: str, query: str) -> Lookup | None:
        """The context from the in-process copy, or None if it is not there (no I/O)."""
        return self._local(self.context_key(project, query))

    def _local(self, key: str) -> Lookup | None:
        if self.local is None or self._behind:
            return None
        inject = self.local.get(key)
        return None if is_missing(inject) else Lookup(hit=True, inject=inject, epoch=b"")

    async def lookup(self, project: str, query: str) -> Lookup:
        """The cached context for a query, with the epoch a later ``put`` must present."""
        key = self.context_key(project, query)
        if (local := self._local(key)) is not None:
            return local

        async def run() -> Lookup:
            generation = self.local.generation if self.local is not None else 0
            found = await self._client.execute_command("MGET", key, self.epoch_key(project))
            value, epoch = cast(list[bytes | None], found)
            if value is None:
                return Lookup(hit=False, inject=None, epoch=epoch or b"0")
            inject = value.decode() or None
            if self.local is not None and self._may_copy():
                self.local.put(key, inject, generation)
            return Lookup(hit=True, inject=inject, epoch=epoch or b"0")

        return await self._call(run)

    def _may_copy(self) -> bool:
        """Whether a value just read may be copied in: every primary the client knows (it
        may have read from any) is followed. If not, the follower looks again at once."""
        primaries = self.valkey.known_primaries()
        if not primaries or self.follower is None or self.follower.follows(primaries):
            return True
        self.follower.refresh()
        return False

    async def put(
        self, project: str, query: str, inject: str | None, paths: Iterable[str], epoch: bytes
    ) -> bool:
        """Cache a context tagged with ``paths``; False if an invalidation got there first,
        or if it names more than MAX_TAGS paths (too costly to keep honest)."""
        tags = sorted({self.tag_key(project, p) for p in paths})
        if len(tags) > MAX_TAGS:
            return False
        keys = [
            self.epoch_key(project),
            self.context_key(project, query),
            self.project_key(project),
            *tags,
        ]

        async def run() -> bool:
            return bool(await self._put(keys=keys, args=[epoch, inject or "", self.ttl]))

        return await self._call(run)

    async def invalidate_path(self, project: str, path: str) -> int:
        """Drop every cached context of ``project`` that mentions ``path``.

        A context mentioning any trailing part of the path (``a.py`` or ``src/a.py`` for
        ``/repo/src/a.py``) counts as mentioning it. Returns how many contexts were dropped
        (invalidations asked for while one is on its way to Valkey share the next round
        trip, and its count). If Valkey is unreachable the invalidation is kept and
        replayed before the next lookup is served, and CacheUnavailable is raised.
        """
        return await self._invalidations.submit(project, path)

    async def _invalidate_batch(self, project: str, paths: set[str]) -> int:
        """One round trip for the paths whose invalidations queued up meanwhile."""
        try:
            return await self._call(lambda: self._apply_invalidation(project, paths))
        except CacheUnavailable:
            for path in paths:
                self._remember_pending(project, path)
            raise

    async def _apply_invalidation(self, project: str, paths: Iterable[str]) -> int:
        tags = {self.tag_key(project, s) for p in paths for s in path_suffixes(p)}
        if not tags:
            return 0  # no context is tagged with an empty path
        dropped = await self._invalidate(keys=[self.epoch_key(project), *sorted(tags)])
        if self.local is not None:
            # Valkey will say so too, but this process must not wait for it (read-your-writes).
            self.local.invalidate(dropped)
        return len(dropped)

    async def invalidate_project(self, project: str) -> int:
        """Drop every cached context of ``project`` (memory forgot part of it) and move its
        epoch, so no fill begun before can cache what memory no longer holds. Returns how
        many contexts were dropped. If Valkey is unreachable the invalidation is kept and
        replayed before the next lookup is served, and CacheUnavailable is raised."""
        try:
            return await self._call(lambda: self._drop_project(project))
        except CacheUnavailable:
            self._pending_projects.add(project)
            raise

    async def _drop_project(self, project: str) -> int:
        keys = [self.epoch_key(project), self.project_key(project)]
        dropped = await self._invalidate_all(keys=keys)
        if self.local is not None:
            self.local.invalidate(dropped)  # at once, as for a path
        return len(dropped)

    @property
    def _behind(self) -> bool:
        """True while invalidations missed during an outage wait to be replayed."""
        return bool(self._pending or self._pending_overflow or self._pending_projects)

    def _remember_pending(self, project: str, path: str) -> None:
        pending = self._pending.setdefault(project, set())
        if sum(len(p) for p in self._pending.values()) >= MAX_PENDING_PATHS:
            self._pending_overflow = True
        else:
            pending.add(path)

    async def _replay_pending(self) -> None:
        """Apply invalidations that failed during an outage (all contexts, on overflow)."""
        async with self._replay_lock:  # concurrent callers wait, then find nothing to do
            if not self._behind:
                return
            if self.local is not None:
                self.local.invalidate(None)
            if self._pending_overflow:
                async for key in self._client.scan_iter(match=f"{self._prefix}ctx:*", count=1000):
                    await self._client.delete(key)
                self._pending_overflow = False
            while self._pending_projects:
                project = self._pending_projects.pop()
                try:
                    await self._drop_project(project)
                except BaseException:
                    self._pending_projects.add(project)
                    raise
            while self._pending:
                project, paths = self._pending.popitem()
                try:
                    await self._apply_invalidation(project, paths)
                except BaseException:
                    self._pending.setdefault(project, set()).update(paths)
                    raise
            log.info("replayed invalidations missed while Valkey was unreachable")

    async def _call(self, operation: Callable[[], Awaitable[T]]) -> T:
        """Run one cache operation, translating transport failures into CacheUnavailable."""
        if not self.outage.allows_attempt():
            self._on_unavailable()
            raise CacheUnavailable("Valkey is unreachable; retrying on a backoff schedule")
        slot = False
        try:
            if self._slots.locked():  # wait for a connection, within the deadline
                async with asyncio.timeout(self.timeout):
                    await self._slots.acquire()
            else:  # one is free: taking it never waits, so it needs no deadline
                await self._slots.acquire()
            slot = True
            if self._behind:
                async with asyncio.timeout(self.timeout * 10):
                    await self._replay_pending()
            async with asyncio.timeout(self.timeout):
                result = await operation()
        except (TimeoutError, MaxConnectionsError) as e:
            if slot and not isinstance(e, MaxConnectionsError):
                raise self._unreachable(e) from e
            raise self._strain(f"all {self.pool_size} Valkey connections are busy") from e
        except _TRANSIENT as e:
            raise self._unreachable(e) from e
        except OutOfMemoryError as e:
            raise self._strain("Valkey is full (maxmemory): nothing more is cached") from e
        except RedisError as e:  # MOVED, ASK, CROSSSLOT, a script error: the cache is degraded
            raise self._strain(refusal(e), kind=type(e).__name__) from e
        except Exception as e:  # the client itself failed: still only the cache is degraded
            log.exception("Valkey client error")
            why = f"Valkey client error ({type(e).__name__}: {e}); chat:start answers from memory"
            raise self._strain(why, kind=type(e).__name__) from e
        finally:
            if slot:
                self._slots.release()
        if (failed := self.outage.succeeded()) is not None:
            log.warning("Valkey reachable again after %d failed operations", failed)
        return result

    def _unreachable(self, error: Exception) -> CacheUnavailable:
        self._on_unavailable()
        why = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
        self._failed(f"unreachable ({why})")
        if self.outage.failed():
            log.warning("Valkey unreachable, serving from memory without cache: %s", why)
        return CacheUnavailable(f"Valkey is unreachable: {why}")

    def _strain(self, why: str, kind: str | None = None) -> CacheUnavailable:
        """Valkey answers but cannot take this operation now: not an outage; logged at most
        once a minute for each kind of reason."""
        self._on_unavailable()
        self._failed(why)
        now = time.monotonic()
        kind = kind or why
        if now - self._strain_logged.get(kind, -STRAIN_LOG_INTERVAL) >= STRAIN_LOG_INTERVAL:
            log.warning("%s", why)
            self._strain_logged[kind] = now
        return CacheUnavailable(why)


def refusal(error: RedisError) -> str:
    """What a Valkey error reply means for the cache, naming the reply (MOVED, ASK, ...)."""
    if isinstance(error, MovedError):
        what = f"MOVED {error.slot_id} {error.host}:{error.port}"
    elif isinstance(error, AskError):
        what = f"ASK {error.slot_id} {error.host}:{error.port}"
    else:
        what = f"{type(error).__name__}: {error}"
    return f"Valkey refused an operation ({what}); chat:start answers from memory, uncached"
