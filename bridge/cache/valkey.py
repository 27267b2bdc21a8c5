"""Connecting to Valkey: one server, a primary watched by Sentinel, or a Valkey Cluster.

``--valkey-url`` names one of them:

- ``redis://``, ``rediss://`` or ``unix://``: one server. Whether it is a cluster node is
  asked, never configured (``INFO cluster``: ``cluster_enabled:1``); a cluster gets
  redis-py's cluster client, which follows MOVED and ASK redirections and fail-overs.
- ``redis+sentinel://[[user]:password@]host:port[,host:port...]/service[/db]`` (or
  ``rediss+sentinel://`` for TLS to the data servers): the primary the Sentinels name for
  ``service``; redis-py's Sentinel client moves to the new primary after a fail-over. The
  password is the data servers'; ``?sentinel_password=`` gives the Sentinels' own.

Each kind says which primaries the in-process copy must follow (``bridge.cache.following``)
and how healthy it is (``problem``). The cache knows nothing else about the kinds.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass
from typing import Any, Final, TypeAlias
from urllib.parse import parse_qs, unquote

import redis.asyncio as redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import NoBackoff
from redis.exceptions import RedisClusterException, RedisError

from bridge.cache.following import Topology

Client: TypeAlias = redis.Redis | RedisCluster
SENTINEL_SCHEMES: Final = ("redis+sentinel", "rediss+sentinel")
DEFAULT_SENTINEL_PORT: Final = 26379


class ValkeyUrlError(ValueError):
    """A --valkey-url that cannot be used; the message says which part and why."""


class ClusterNotReady(RedisError):
    """A cluster node that is not part of a formed cluster yet."""


@dataclass(frozen=True)
class SentinelUrl:
    """The parts of a ``redis+sentinel://`` URL."""

    sentinels: tuple[tuple[str, int], ...]
    service: str
    db: int = 0
    username: str | None = None
    password: str | None = None
    sentinel_password: str | None = None
    tls: bool = False


def parse_sentinel_url(url: str) -> SentinelUrl:
    """Split a ``redis+sentinel://`` URL (raises ValkeyUrlError naming what is wrong)."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in SENTINEL_SCHEMES:
        raise ValkeyUrlError(f"not a Sentinel URL (redis+sentinel://...): {scheme or url!r}")
    rest, _, query = rest.partition("?")
    netloc, _, path = rest.partition("/")
    userinfo, at, hosts = netloc.rpartition("@")
    username = password = None
    if at:
        user, colon, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon else None
    sentinels = tuple(_host_port(h, url) for h in hosts.split(",") if h)
    if not sentinels:
        raise ValkeyUrlError("a Sentinel URL names no Sentinel: redis+sentinel://host:port/...")
    parts = [p for p in path.split("/") if p]
    if not parts or len(parts) > 2:
        raise ValkeyUrlError(
            f"a Sentinel URL's path is /service_name or /service_name/db, got /{path}"
        )
    db = 0
    if len(parts) == 2:
        if not parts[1].isdigit():
            raise ValkeyUrlError(f"the database in a Sentinel URL is a number, got {parts[1]!r}")
        db = int(parts[1])
    options = parse_qs(query)
    unknown = set(options) - {"sentinel_password"}
    if unknown:
        raise ValkeyUrlError(f"unknown Sentinel URL option {sorted(unknown)[0]!r}")
    return SentinelUrl(
        sentinels=sentinels,
        service=unquote(parts[0]),
        db=db,
        username=username,
        password=password,
        sentinel_password=options.get("sentinel_password", [None])[0],
        tls=scheme.startswith("rediss"),
    )


def _host_port(text: str, url: str) -> tuple[str, int]:
    host, colon, port = text.rpartition(":") if not text.endswith("]") else (text, "", "")
    if not colon:
        host, port = text, str(DEFAULT_SENTINEL_PORT)
    host = host.strip("[]")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValkeyUrlError(f"bad Sentinel address {text!r} (host:port) in the Valkey URL")
    return host, int(port)


def client_settings(timeout: float, pool_size: int) -> dict[str, Any]:
    """Connection settings every kind shares: no per-read socket timeout (the cache puts
    one deadline on each operation), one retry on a broken connection, ``pool_size``
    connections (per server, for a cluster)."""
    return {
        "socket_timeout": None,
        "socket_connect_timeout": timeout,
        "retry": Retry(NoBackoff(), 1),
        "health_check_interval": 0,
        "max_connections": pool_size,
    }


class Valkey:
    """A client of one Valkey server (the base of the other kinds)."""

    kind = "server"
    label = "one server"

    def __init__(self, client: Client, pool_size: int) -> None:
        self.client = client
        self.pool_size = pool_size

    @property
    def tls(self) -> bool:
        """Whether the data connections use TLS (the in-process copy then stays off)."""
        assert isinstance(self.client, redis.Redis)
        return self.client.connection_pool.connection_class.__name__.startswith(
            ("SSL", "SentinelManagedSSL")
        )

    def credentials(self) -> dict[str, Any]:
        """What a tracking connection needs to log in."""
        kwargs = self.client.get_connection_kwargs()
        return {k: kwargs[k] for k in ("username", "password") if kwargs.get(k)}

    def topology(self) -> Topology | None:
        """The primaries to follow when they never change (None: ``discover`` them)."""
        kwargs = self.client.get_connection_kwargs()
        if kwargs.get("path"):
            return Topology(frozenset({f"unix:{kwargs['path']}"}))
        address = f"{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}"
        return Topology(frozenset({address}))

    async def discover(self) -> Topology:
        """The primaries to follow now (for kinds whose primaries change)."""
        topology = self.topology()
        assert topology is not None
        return topology

    def known_primaries(self) -> list[str]:
        """Primaries the client may have read from (all must be followed to copy a value)."""
        return []

    async def problem(self) -> str | None:
        """Why this Valkey cannot serve now, or None (one PING; the caller bounds it)."""
        await self.client.ping()
        return None

    async def is_cluster(self) -> bool:
        """Whether the server is a Valkey Cluster node (``INFO cluster``). A node that
        serves no slot yet (a cluster being formed) raises ClusterNotReady: what it will
        be part of cannot be known yet."""
        info = await self.client.info("cluster")
        if int(info.get("cluster_enabled", 0)) != 1:
            return False
        state = await self.client.execute_command("CLUSTER INFO")
        if cluster_info(state, "cluster_slots_assigned") in ("0", ""):
            raise ClusterNotReady("the Valkey Cluster node serves no slot yet")
        return True

    async def aclose(self) -> None:
        """Close the client and its connections."""
        await self.client.aclose()


class SentinelPrimary(Valkey):
    """The primary a set of Sentinels names for a service."""

    kind = "sentinel"
    label = "the primary Sentinel names"

    def __init__(self, target: SentinelUrl, timeout: float, pool_size: int) -> None:
        settings = client_settings(timeout, pool_size)
        sentinel_settings: dict[str, Any] = {
            "socket_timeout": timeout,
            "socket_connect_timeout": timeout,
        }
        if target.sentinel_password:
            sentinel_settings["password"] = target.sentinel_password
        self.sentinel = Sentinel(  # type: ignore[no-untyped-call]
            list(target.sentinels),
            sentinel_kwargs=sentinel_settings,
            username=target.username,
            password=target.password,
            db=target.db,
            ssl=target.tls,
        )
        self.service = target.service
        super().__init__(self.sentinel.master_for(target.service, **settings), pool_size)

    def topology(self) -> Topology | None:
        return None

    async def discover(self) -> Topology:
        """The primary the Sentinels name now. The client's pool is pointed at it too: its
        idle connections to a former primary close, and busy ones close when released
        (redis-py only asks again when it opens a connection)."""
        assert isinstance(self.client, redis.Redis)
        pool = self.client.connection_pool
        assert isinstance(pool, SentinelConnectionPool)
        host, port = await pool.get_master_address()  # type: ignore[no-untyped-call]
        return Topology(frozenset({f"{host}:{port}"}))

    async def aclose(self) -> None:
        await self.client.aclose()
        await self.sentinel.aclose()


class Cluster(Valkey):
    """A Valkey Cluster through redis-py's cluster client."""

    kind = "cluster"
    label = "a Valkey Cluster"
    client: RedisCluster

    @property
    def tls(self) -> bool:
        connection_class = self.client.get_connection_kwargs().get("connection_class")
        return connection_class is not None and connection_class.__name__.startswith("SSL")

    def topology(self) -> Topology | None:
        return None

    async def discover(self) -> Topology:
        """Every primary (serving slots or not, so a node that takes slots over is followed
        before it has any) as the first node that answers CLUSTER NODES sees them."""
        await self.client.initialize()
        nodes = self.client.get_primaries() + self.client.get_replicas()
        random.shuffle(nodes)
        error: Exception = RedisClusterException("no Valkey Cluster node is known")
        for node in nodes:
            try:
                view = await self.client.execute_command("CLUSTER NODES", target_nodes=node)
            except (RedisError, OSError) as e:
                error = e
                continue
            return cluster_topology(view)
        raise error

    def known_primaries(self) -> list[str]:
        return [node.name for node in self.client.get_primaries()]

    async def problem(self) -> str | None:
        """Each known primary is asked CLUSTER INFO; the first that is unreachable or not
        ``cluster_state:ok`` is the problem."""
        await self.client.initialize()
        primaries = self.client.get_primaries()
        answers = await asyncio.gather(
            *(_cluster_state(self.client, node) for node in primaries), return_exceptions=True
        )
        for node, answer in zip(primaries, answers, strict=True):
            if isinstance(answer, BaseException):
                why = f"{type(answer).__name__}: {answer}" if str(answer) else type(answer).__name__
                return f"cluster primary {node.name} unreachable ({why})"
            if answer != "ok":
                return f"cluster primary {node.name} says cluster_state:{answer}"
        return None


async def _cluster_state(client: RedisCluster, node: ClusterNode) -> str:
    reply = await client.execute_command("CLUSTER INFO", target_nodes=node)
    return cluster_info(reply, "cluster_state") or "unknown"


def cluster_info(reply: object, field: str) -> str:
    """One field of a CLUSTER INFO reply, parsed (a dict) or not (text); "" if absent."""
    if isinstance(reply, dict):
        value = reply.get(field, reply.get(field.encode(), ""))
        return value.decode() if isinstance(value, bytes) else str(value)
    text = reply.decode() if isinstance(reply, bytes) else str(reply)
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name == field:
            return value.strip()
    return ""


def cluster_topology(view: dict[str, dict[str, Any]]) -> Topology:
    """The primaries of a parsed CLUSTER NODES reply (redis-py's form: address -> flags,
    slots, migrations), leaving out failed ones and those still being met; the layout is
    which slots and migrations each has."""
    primaries = []
    layout = []
    for address, node in view.items():
        flags = set(str(node.get("flags", "")).split(","))
        if "master" not in flags or flags & {"fail", "handshake", "noaddr"}:
            continue
        if address.startswith(":"):  # a node that does not know its own address yet
            continue
        primaries.append(address)
        slots = sorted(tuple(s) if isinstance(s, list) else (s,) for s in node.get("slots", []))
        migrations = sorted(str(m) for m in node.get("migrations", []))
        layout.append((address, tuple(slots), tuple(migrations)))
    return Topology(frozenset(primaries), tuple(sorted(layout)))


def open_valkey(url: str, *, timeout: float, pool_size: int) -> Valkey:
    """A client for ``url`` without any I/O: one server, or a Sentinel-watched primary.
    A server that turns out to be a cluster node is reopened by ``as_cluster``."""
    if url.split("://", 1)[0] in SENTINEL_SCHEMES:
        return SentinelPrimary(parse_sentinel_url(url), timeout, pool_size)
    try:
        client = redis.Redis.from_url(url, **client_settings(timeout, pool_size))
    except ValueError as e:
        raise ValkeyUrlError(f"cannot use the Valkey URL: {e}") from e
    return Valkey(client, pool_size)


def as_cluster(url: str, *, timeout: float, pool_size: int) -> Cluster:
    """A cluster client for ``url``, a node of a Valkey Cluster (no I/O)."""
    if url.startswith("unix:"):
        raise ValkeyUrlError(
            "the Valkey at this unix socket is a cluster node: a cluster client needs "
            "redis:// or rediss:// URLs (host and port)"
        )
    try:
        # A partial slot map would fail the keys of the missing slots and never be read
        # again; with full coverage required, an incomplete one is read again next time.
        client = RedisCluster.from_url(
            url, require_full_coverage=True, **client_settings(timeout, pool_size)
        )
    except (RedisClusterException, ValueError) as e:
        raise ValkeyUrlError(f"cannot use the Valkey Cluster URL: {e}") from e
    return Cluster(client, pool_size)


async def detect(url: str, valkey: Valkey, *, timeout: float, pool_size: int) -> Valkey:
    """``valkey`` itself, or a cluster client in its place (closing it) when the server it
    names is a cluster node. Raises what the server raised when it does not answer."""
    if valkey.kind != "server" or not await valkey.is_cluster():
        return valkey
    cluster = as_cluster(url, timeout=timeout, pool_size=pool_size)
    await valkey.aclose()
    return cluster
