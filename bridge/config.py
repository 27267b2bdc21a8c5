"""The bridge's configuration: resolved once from flags, then environment, then defaults.

This is the only module that reads ``os.environ``. Every ``serve`` flag has an environment
variable ``BRIDGE_<FLAG>``, checked exactly like the flag (same type, same choices) when
no flag overrides it; the DogStatsD address uses Datadog's standard variables.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeGuard, TypeVar, get_args
from urllib.parse import urlsplit, urlunsplit

import msgspec
import platformdirs

from bridge.bounds import MAX_FRAME, MAX_NAME, MAX_PATH, MAX_TEXT
from bridge.cache.contexts import DEFAULT_PREFIX, DEFAULT_TTL
from bridge.cache.loader import MISS_BUDGET
from bridge.memory.delivery import STORE_TIMEOUT
from bridge.memory.graph_settings import EMBEDDING_DIM, EMBEDDING_MODEL, INGEST_QUEUE_SIZE
from bridge.memory.recall import DEFAULT_BUDGET, TASKS_SHOWN
from bridge.memory.script import CALL_TIMEOUT, CONCURRENCY

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

MAX_WORKERS = 256
# The environment variable that carries a worker process's resolved Config.
WORKER_CONFIG = "BRIDGE_WORKER_CONFIG"

Backend = Literal["sqlite", "graphiti", "script"]
LlmMode = Literal["auto", "on", "off"]
LogLevel = Literal["debug", "info", "warning", "error"]
S = TypeVar("S", bound="DataclassInstance")
N = TypeVar("N", int, float)


@dataclass(frozen=True, kw_only=True)
class ServerConfig:
    """Where the bridge listens, who may connect, and how its processes run and stop."""

    host: str = "127.0.0.1"
    port: int = 8765
    token: str | None = field(default=None, repr=False)
    allowed_origins: tuple[str, ...] = ()
    workers: int = 1
    worker: int = 0  # which worker this process is (1..workers); 0: the only process
    shutdown_deadline: float = 8.0  # the whole shutdown's, within a container's 10 s
    log_level: LogLevel = "info"

    @property
    def loopback_only(self) -> bool:
        """True when the listening address is reachable from this machine alone."""
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False


@dataclass(frozen=True, kw_only=True)
class LimitsConfig:
    """What a client may send: sizes of frames and fields, requests at once, rates."""

    max_frame: int = MAX_FRAME  # bytes
    max_text: int = MAX_TEXT  # characters of a query, message or task
    max_path: int = MAX_PATH  # characters of a file path
    max_name: int = MAX_NAME  # characters of an id, project or session
    max_inflight: int = 256  # requests per connection
    max_connections: int = 1000
    rate_limit: float = 2000.0  # messages per second per connection
    rate_burst: int = 4000


@dataclass(frozen=True, kw_only=True)
class CacheConfig:
    """The Valkey context cache."""

    valkey_url: str | None = None  # None: a private valkey-server
    prefix: str = DEFAULT_PREFIX
    ttl: int = DEFAULT_TTL  # seconds


@dataclass(frozen=True, kw_only=True)
class RecallConfig:
    """The memory context a chat:start gets: how much, and how long it is waited for."""

    limit: int = TASKS_SHOWN  # past tasks shown
    context_chars: int = DEFAULT_BUDGET
    miss_budget_ms: float = MISS_BUDGET * 1000


@dataclass(frozen=True, kw_only=True)
class LlmConfig:
    """The graphiti backend's OpenAI-compatible LLM and embedder."""

    mode: LlmMode = "auto"
    api_key: str | None = field(default=None, repr=False)
    base_url: str | None = None  # None: OpenAI itself
    model: str | None = None  # None: graphiti's default
    small_model: str | None = None
    embedding_model: str = EMBEDDING_MODEL
    embedding_dim: int = EMBEDDING_DIM

    @property
    def enabled(self) -> bool:
        """Whether the graphiti backend extracts entities and facts with the LLM."""
        return self.mode == "on" or (self.mode == "auto" and self.api_key is not None)


@dataclass(frozen=True, kw_only=True)
class ScriptConfig:
    """The script backend's ``memory_manager.py`` and how it is run."""

    path: Path = Path("/root/.opencode/graphiti/memory_manager.py")
    python: str = "python3"
    timeout: float = CALL_TIMEOUT  # seconds per call
    concurrency: int = CONCURRENCY


@dataclass(frozen=True, kw_only=True)
class MemoryConfig:
    """Which memory backend stores episodes, and its settings."""

    backend: Backend = "sqlite"
    store_timeout_ms: float = STORE_TIMEOUT * 1000  # an episode's wait before the outbox
    graph_url: str | None = field(default=None, repr=False)  # graphiti; None: private
    graphiti_queue_size: int = INGEST_QUEUE_SIZE
    llm: LlmConfig = field(default_factory=LlmConfig)
    script: ScriptConfig = field(default_factory=ScriptConfig)


@dataclass(frozen=True, kw_only=True)
class MetricsConfig:
    """Where DogStatsD metrics go (UDP)."""

    host: str = "localhost"
    port: int = 8125


@dataclass(frozen=True, kw_only=True)
class Config:
    """Everything a running bridge needs to know, validated, one section per concern.

    ``data_dir`` holds every file the bridge keeps (the embedded store, the outboxes, the
    graphiti queue, the private FalkorDB, the lock); ``project`` is the project of
    messages and URLs that name none (and the one ``export`` writes).
    """

    data_dir: Path = Path(platformdirs.user_data_dir("graphiti-bridge"))
    project: str = "default"
    server: ServerConfig = field(default_factory=ServerConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    recall: RecallConfig = field(default_factory=RecallConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)

    @property
    def memory_path(self) -> Path:
        """The embedded memory store's database file."""
        return self.data_dir / "memory.sqlite3"

    @property
    def outbox_path(self) -> Path:
        """Where acknowledged episodes wait while memory cannot take them: one file per
        worker (``outbox-<worker>.sqlite3``), so a restarted worker takes over its own."""
        if self.server.worker:
            return self.data_dir / f"outbox-{self.server.worker}.sqlite3"
        return self.data_dir / "outbox.sqlite3"

    def describe_memory(self) -> str:
        """Which memory backend, and where, without secrets (for the start-up line)."""
        memory = self.memory
        if memory.backend == "sqlite":
            return f"sqlite at {self.memory_path}"
        if memory.backend == "script":
            return f"script {memory.script.path}"
        graph = redact_url(memory.graph_url) if memory.graph_url else "a private FalkorDB"
        return f"graphiti on {graph}, {'with' if memory.llm.enabled else 'without'} an LLM"


def _checked(
    convert: Callable[[str], N], accept: Callable[[N], bool], what: str
) -> Callable[[str], N]:
    """An argparse type: ``convert`` of the text, refused unless ``accept`` holds for it,
    the error saying it must be ``what``."""

    def parse(text: str) -> N:
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not accept(value):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
        return value

    return parse


_positive_int = _checked(int, lambda n: n > 0, "a positive integer")
_port = _checked(int, lambda n: 0 <= n <= 65535, "a port number 0-65535")
_positive_float = _checked(float, lambda x: x > 0, "a positive number")  # also refuses nan


METAVARS: dict[object, str] = {
    _port: "PORT",
    _positive_int: "N",
    _positive_float: "X",
    Path: "PATH",
}

ENVIRONMENT_HELP = f"""\
environment:
  BRIDGE_<FLAG>      every flag above, e.g. BRIDGE_PORT=9000 for --port (the flag wins)
  BRIDGE_TOKEN       shared token clients send as "Authorization: Bearer <token>"
                     (no flag, so it never shows in ps; see --token-file)
  OPENAI_API_KEY     graphiti: key of the LLM API (--llm auto extracts when it is set)
  OPENAI_BASE_URL    graphiti: OpenAI-compatible API, when --llm-base-url is not given
  DD_AGENT_HOST      DogStatsD host metrics go to (default {MetricsConfig.host})
  DD_DOGSTATSD_PORT  DogStatsD UDP port (default {MetricsConfig.port})
"""


@dataclass(frozen=True)
class _FromEnvironment:
    """An environment value standing in for a flag's default, checked like the flag once
    parsing shows that no flag overrides it (argparse checks no choices on defaults)."""

    var: str
    text: str
    type: Callable[[str], object] | None = None
    choices: Sequence[str] | None = None

    def resolve(self) -> object:
        try:
            value = self.type(self.text) if self.type is not None else self.text
        except (argparse.ArgumentTypeError, ValueError) as e:
            raise ConfigError(f"{self.var}: {e}") from e
        if self.choices is not None and value not in self.choices:
            raise ConfigError(
                f"{self.var}: invalid choice {self.text!r} (choose from {', '.join(self.choices)})"
            )
        return value


def _from_environment(env: Mapping[str, str], var: str, default: object, **kw: Any) -> object:
    """The flag default for ``var``: its value (checked later) when set and not empty."""
    text = env.get(var, "")
    return _FromEnvironment(var, text, kw.get("type"), kw.get("choices")) if text else default


class _Options:
    """Adds flags to one group of the help, each defaulting to its environment variable
    ``BRIDGE_<FLAG>``, then to the Config's default."""

    def __init__(self, group: Any, env: Mapping[str, str]) -> None:
        self.group = group  # an argparse argument group
        self.env = env

    def __call__(self, flag: str, default: object, help: str, **kw: Any) -> None:
        var = "BRIDGE_" + flag.removeprefix("--").replace("-", "_").upper()
        value = _from_environment(self.env, var, default, **kw)
        if "type" in kw and "choices" not in kw:
            kw.setdefault("metavar", METAVARS.get(kw["type"]))
        self.group.add_argument(
            flag, default=value, help=f"{help} (env {var}; default {default})", **kw
        )


def add_serve_arguments(
    parser: argparse.ArgumentParser, env: Mapping[str, str], *, project_help: str | None = None
) -> None:
    """Add the ``serve`` flags, grouped by the Config section each sets, each defaulting
    to its environment variable, then to the Config's default.

    ``project_help`` makes ``--project`` an explicit choice with that help: no default,
    and no environment variable (``import`` moves episodes only when asked to).
    """
    d = Config()
    parser.epilog = ENVIRONMENT_HELP
    parser.formatter_class = argparse.RawDescriptionHelpFormatter

    def section(title: str, description: str | None = None) -> _Options:
        return _Options(parser.add_argument_group(title, description), env)

    option = _Options(parser, env)
    option("--data-dir", d.data_dir, "folder for the embedded memory store and every file "
           "the bridge keeps", type=Path)  # fmt: skip
    if project_help is None:
        option("--project", d.project, "project for messages and URLs that name none")
    else:
        parser.add_argument("--project", help=project_help)

    option = section("server")
    option("--host", d.server.host, "interface to listen on")
    option("--port", d.server.port, "TCP port to listen on (0 picks a free one)", type=_port)
    option("--token-file", None, "file holding the shared token (container secrets)",
           type=Path)  # fmt: skip
    option("--allowed-origins", "", "comma-separated browser Origins allowed to connect")
    option("--workers", d.server.workers, "processes serving the port together "
           "(SO_REUSEPORT), sharing one Valkey and one store", type=_positive_int)  # fmt: skip
    option("--shutdown-deadline", d.server.shutdown_deadline, "seconds the whole shutdown "
           "may take on SIGTERM; what still runs then is cut off",
           type=_positive_float)  # fmt: skip
    option("--log-level", d.server.log_level, "debug, info, warning or error",
           choices=get_args(LogLevel))  # fmt: skip

    option = section("limits", "what one client may send")
    option("--max-frame", d.limits.max_frame, "largest accepted frame in bytes",
           type=_positive_int)  # fmt: skip
    option("--max-text", d.limits.max_text, "longest query, message or task (characters)",
           type=_positive_int)  # fmt: skip
    option("--max-path", d.limits.max_path, "longest file path (characters)",
           type=_positive_int)  # fmt: skip
    option("--max-name", d.limits.max_name, "longest id, project or session (characters)",
           type=_positive_int)  # fmt: skip
    option("--max-inflight", d.limits.max_inflight, "concurrent requests per connection",
           type=_positive_int)  # fmt: skip
    option("--max-connections", d.limits.max_connections, "open WebSockets before new "
           "ones get 503", type=_positive_int)  # fmt: skip
    option("--rate-limit", d.limits.rate_limit, "messages per second per connection",
           type=_positive_float)  # fmt: skip
    option("--rate-burst", d.limits.rate_burst, "messages a connection may send at once",
           type=_positive_int)  # fmt: skip

    option = section("cache")
    option("--valkey-url", d.cache.valkey_url, "existing Valkey, e.g. "
           "redis://localhost:6380; none starts a private one")  # fmt: skip
    option("--cache-prefix", d.cache.prefix, "prefix of every Valkey key")
    option("--cache-ttl", d.cache.ttl, "seconds a cached context lives", type=_positive_int)

    option = section("recall", "the memory context a chat:start gets")
    option("--recall-limit", d.recall.limit, "past tasks in an injected context",
           type=_positive_int)  # fmt: skip
    option("--context-chars", d.recall.context_chars, "longest injected context "
           "(characters)", type=_positive_int)  # fmt: skip
    option("--miss-budget-ms", d.recall.miss_budget_ms, "how long chat:start waits for "
           "memory on a cache miss", type=_positive_float)  # fmt: skip

    memory = d.memory
    option = section("memory")
    option("--memory", memory.backend, "memory backend", choices=get_args(Backend))
    option("--store-timeout-ms", memory.store_timeout_ms, "how long an episode waits for "
           "memory before it is queued in the outbox", type=_positive_float)  # fmt: skip
    option = section("memory: graphiti")
    option("--graph-url", memory.graph_url, "falkor://host:port or bolt://user:pass@host; "
           "none starts a private FalkorDB under --data-dir")  # fmt: skip
    option("--graphiti-queue-size", memory.graphiti_queue_size, "episodes waiting for "
           "extraction per project", type=_positive_int)  # fmt: skip
    option("--llm", memory.llm.mode, "extract entities and facts with an LLM (auto: when "
           "OPENAI_API_KEY is set)", choices=get_args(LlmMode))  # fmt: skip
    option("--llm-base-url", None, "OpenAI-compatible API (also OPENAI_BASE_URL)")
    option("--llm-model", memory.llm.model, "model for extraction")
    option("--llm-small-model", memory.llm.small_model, "model for small prompts")
    option("--embedding-model", memory.llm.embedding_model, "embedding model")
    option("--embedding-dim", memory.llm.embedding_dim, "embedding size", type=_positive_int)
    option = section("memory: script")
    option("--memory-script", memory.script.path, "the memory_manager.py to run", type=Path)
    option("--memory-script-python", memory.script.python, "interpreter to run it")
    option("--memory-script-timeout", memory.script.timeout, "seconds per call",
           type=_positive_float)  # fmt: skip
    option("--memory-script-concurrency", memory.script.concurrency, "processes at once",
           type=_positive_int)  # fmt: skip
    parser.set_defaults(
        token=env.get("BRIDGE_TOKEN") or None,
        llm_api_key=env.get("OPENAI_API_KEY") or None,
        openai_base_url=env.get("OPENAI_BASE_URL") or None,
        statsd_host=env.get("DD_AGENT_HOST") or d.metrics.host,
        statsd_port=_from_environment(env, "DD_DOGSTATSD_PORT", d.metrics.port, type=_port),
    )


def redact_url(url: str) -> str:
    """A URL fit for logs: any password replaced by ``***``."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


class StartupError(Exception):
    """A command cannot start or finish as asked; the message (one line) says why.

    The command line reports it as ``graphiti-bridge: <message>`` and exits with status 2.
    """


class ConfigError(StartupError):
    """The configuration cannot be used; the message says why and how to fix it."""


def _read_token(args: argparse.Namespace) -> str | None:
    if args.token_file is None:
        return str(args.token) if args.token else None
    try:
        token = Path(args.token_file).read_text().strip()
    except OSError as e:
        raise ConfigError(f"cannot read the token file {args.token_file}: {e.strerror}") from e
    if not token:
        raise ConfigError(f"the token file {args.token_file} is empty")
    return token


def _from_flags(section: type[S], a: argparse.Namespace, **given: Any) -> S:
    """A Config section: each field that has a flag of the same name takes the flag's
    value; the others are ``given`` (or keep their defaults)."""
    named = {f.name for f in dataclasses.fields(section)} - given.keys()
    return section(**{name: getattr(a, name) for name in named if hasattr(a, name)}, **given)


def config_from_args(args: argparse.Namespace) -> Config:
    """Build and check the Config from parsed ``serve`` arguments (raises ConfigError).

    Environment values no flag overrode are checked here, each error naming its variable.
    """
    a = argparse.Namespace(
        **{
            name: value.resolve() if isinstance(value, _FromEnvironment) else value
            for name, value in vars(args).items()
        }
    )
    origins = tuple(o.strip() for o in a.allowed_origins.split(",") if o.strip())
    config = Config(
        data_dir=Path(a.data_dir).expanduser(),
        project=Config.project if a.project is None else a.project,
        server=_from_flags(ServerConfig, a, token=_read_token(a), allowed_origins=origins),
        limits=_from_flags(LimitsConfig, a),
        cache=CacheConfig(valkey_url=a.valkey_url or None, prefix=a.cache_prefix, ttl=a.cache_ttl),
        recall=_from_flags(RecallConfig, a, limit=a.recall_limit),
        memory=_from_flags(
            MemoryConfig,
            a,
            backend=a.memory,
            graph_url=a.graph_url or None,
            llm=_from_flags(
                LlmConfig,
                a,
                mode=a.llm,
                api_key=a.llm_api_key,
                base_url=a.llm_base_url or a.openai_base_url,
                model=a.llm_model or None,
                small_model=a.llm_small_model or None,
            ),
            script=ScriptConfig(
                path=Path(a.memory_script).expanduser(),
                python=a.memory_script_python,
                timeout=a.memory_script_timeout,
                concurrency=a.memory_script_concurrency,
            ),
        ),
        metrics=MetricsConfig(host=a.statsd_host, port=a.statsd_port),
    )
    check(config)
    return config


def check(config: Config) -> None:
    """Refuse configurations that would be unsafe or cannot work (raises ConfigError)."""
    server, prefix = config.server, config.cache.prefix
    if "{" in prefix or "}" in prefix:
        raise ConfigError(
            f"--cache-prefix {prefix!r} must not contain {{ or }}: each "
            "project's keys carry a {hash tag} of their own, so they share a cluster slot"
        )
    if server.workers > MAX_WORKERS:
        raise ConfigError(f"--workers {server.workers} is more than {MAX_WORKERS}")
    if config.memory.llm.mode == "on" and not config.memory.llm.api_key:
        raise ConfigError("--llm on needs OPENAI_API_KEY (any value for a local server)")
    if not server.loopback_only and not server.token:
        raise ConfigError(
            f"refusing to listen on {server.host} without a token: anyone who can reach it "
            "could read and write this memory. Set BRIDGE_TOKEN or BRIDGE_TOKEN_FILE "
            "(--token-file), or listen on 127.0.0.1."
        )


def worker_environment(config: Config, worker: int) -> dict[str, str]:
    """What a worker process of ``config`` needs in its environment to be worker number
    ``worker``: its whole resolved Config, secrets included (an environment is private to
    the process, a command line is not)."""
    resolved = dataclasses.replace(config, server=dataclasses.replace(config.server, worker=worker))
    return {WORKER_CONFIG: msgspec.json.encode(resolved, enc_hook=str).decode()}


def worker_config(env: Mapping[str, str]) -> Config:
    """The Config a worker process was started with (see ``worker_environment``)."""
    text = env.get(WORKER_CONFIG, "")
    try:
        config = msgspec.json.decode(text, type=Config, dec_hook=_decode_path)
    except msgspec.DecodeError as e:
        raise ConfigError(f"{WORKER_CONFIG}: not a worker's configuration ({e})") from e
    server = config.server
    if not 1 <= server.worker <= server.workers:
        raise ConfigError(f"{WORKER_CONFIG}: worker {server.worker} of {server.workers}")
    return config


def with_changes(settings: S, /, **changes: Any) -> S:
    """``settings`` (a Config or one of its sections) with ``changes``, for building one in
    code (tests, embedding): like ``dataclasses.replace``, except that a section given as
    a mapping changes only the fields it names, e.g.
    ``with_changes(config, server={"port": 0}, memory={"script": {"timeout": 2.0}})``."""
    fields: dict[str, Any] = {}
    for name, value in changes.items():
        current = getattr(settings, name, None)
        if isinstance(value, Mapping) and _is_section(current):
            value = with_changes(current, **value)
        fields[name] = value
    return dataclasses.replace(settings, **fields)


def _is_section(value: object) -> TypeGuard[DataclassInstance]:
    return dataclasses.is_dataclass(value) and not isinstance(value, type)


def _decode_path(kind: type, value: Any) -> Any:
    if kind is Path and isinstance(value, str):
        return Path(value)
    raise NotImplementedError(kind)


def environment() -> Mapping[str, str]:
    """The process environment (the one place it is read)."""
    return os.environ


def parse_serve(argv: Sequence[str], env: Mapping[str, str]) -> Config:
    """Config from a ``serve`` argument list and an environment (for tests and embedding)."""
    parser = argparse.ArgumentParser(prog="graphiti-bridge serve")
    add_serve_arguments(parser, env)
    return config_from_args(parser.parse_args(list(argv)))
