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
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import msgspec
import platformdirs

MAX_WORKERS = 256
# The environment variable that carries a worker process's resolved Config.
WORKER_CONFIG = "BRIDGE_WORKER_CONFIG"


@dataclass(frozen=True, kw_only=True)
class Config:
    """Everything a running bridge needs to know, validated."""

    host: str = "127.0.0.1"
    port: int = 8765
    data_dir: Path = Path(platformdirs.user_data_dir("graphiti-bridge"))
    valkey_url: str | None = None
    project: str = "default"
    cache_prefix: str = "gb:"
    cache_ttl: int = 300
    miss_budget_ms: float = 250.0
    recall_limit: int = 6
    context_chars: int = 2000
    max_frame: int = 1 << 20
    max_inflight: int = 256
    max_connections: int = 1000
    rate_limit: float = 2000.0
    rate_burst: int = 4000
    max_text: int = 65_536
    max_path: int = 4_096
    max_name: int = 256
    token: str | None = field(default=None, repr=False)
    allowed_origins: tuple[str, ...] = ()
    shutdown_deadline: float = 8.0  # the whole shutdown's, within a container's 10 s
    store_timeout_ms: float = 2000.0
    memory: str = "sqlite"
    graph_url: str | None = field(default=None, repr=False)
    graphiti_queue_size: int = 1000
    llm: str = "auto"
    llm_api_key: str | None = field(default=None, repr=False)
    llm_base_url: str | None = None
    llm_model: str | None = None
    llm_small_model: str | None = None
    embedding_model: str = "text-embedding-3-small"
    embedding_dim: int = 1024
    memory_script: Path = Path("/root/.opencode/graphiti/memory_manager.py")
    memory_script_python: str = "python3"
    memory_script_timeout: float = 10.0
    memory_script_concurrency: int = 4
    statsd_host: str = "localhost"
    statsd_port: int = 8125
    log_level: str = "info"
    workers: int = 1
    worker: int = 0  # which worker this process is (1..workers); 0: the only process

    @property
    def loopback_only(self) -> bool:
        """True when the listening address is reachable from this machine alone."""
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    @property
    def memory_path(self) -> Path:
        """The embedded memory store's database file."""
        return self.data_dir / "memory.sqlite3"

    def describe_memory(self) -> str:
        """Which memory backend, and where, without secrets (for the start-up line)."""
        if self.memory == "sqlite":
            return f"sqlite at {self.memory_path}"
        if self.memory == "script":
            return f"script {self.memory_script}"
        graph = redact_url(self.graph_url) if self.graph_url else "a private FalkorDB"
        return f"graphiti on {graph}, {'with' if self.uses_llm else 'without'} an LLM"

    @property
    def uses_llm(self) -> bool:
        """Whether the graphiti backend extracts entities and facts with an LLM."""
        return self.llm == "on" or (self.llm == "auto" and self.llm_api_key is not None)

    @property
    def outbox_path(self) -> Path:
        """Where acknowledged episodes wait while memory cannot take them: one file per
        worker (``outbox-<worker>.sqlite3``), so a restarted worker takes over its own."""
        if self.worker:
            return self.data_dir / f"outbox-{self.worker}.sqlite3"
        return self.data_dir / "outbox.sqlite3"


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port number 0-65535, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
    return value


METAVARS: dict[object, str] = {
    _port: "PORT",
    _positive_int: "N",
    _positive_float: "X",
    Path: "PATH",
}

ENVIRONMENT_HELP = """\
environment:
  BRIDGE_<FLAG>      every flag above, e.g. BRIDGE_PORT=9000 for --port (the flag wins)
  BRIDGE_TOKEN       shared token clients send as "Authorization: Bearer <token>"
                     (no flag, so it never shows in ps; see --token-file)
  OPENAI_API_KEY     graphiti: key of the LLM API (--llm auto extracts when it is set)
  OPENAI_BASE_URL    graphiti: OpenAI-compatible API, when --llm-base-url is not given
  DD_AGENT_HOST      DogStatsD host metrics go to (default localhost)
  DD_DOGSTATSD_PORT  DogStatsD UDP port (default 8125)
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


def add_serve_arguments(
    parser: argparse.ArgumentParser, env: Mapping[str, str], *, project_help: str | None = None
) -> None:
    """Add the ``serve`` flags, each defaulting to its environment variable, then Config.

    ``project_help`` makes ``--project`` an explicit choice with that help: no default,
    and no environment variable (``import`` moves episodes only when asked to).
    """
    d = Config()
    parser.epilog = ENVIRONMENT_HELP
    parser.formatter_class = argparse.RawDescriptionHelpFormatter

    def option(flag: str, default: object, help: str, **kw: Any) -> None:
        var = "BRIDGE_" + flag.removeprefix("--").replace("-", "_").upper()
        value = _from_environment(env, var, default, **kw)
        if "type" in kw and "choices" not in kw:
            kw.setdefault("metavar", METAVARS.get(kw["type"]))
        parser.add_argument(
            flag, default=value, help=f"{help} (env {var}; default {default})", **kw
        )

    option("--host", d.host, "interface to listen on")
    option("--port", d.port, "TCP port to listen on (0 picks a free one)", type=_port)
    option("--data-dir", d.data_dir, "folder for the embedded memory store", type=Path)
    option("--valkey-url", d.valkey_url, "existing Valkey, e.g. redis://localhost:6380; "
           "none starts a private one")  # fmt: skip
    if project_help is None:
        option("--project", d.project, "project for messages and URLs that name none")
    else:
        parser.add_argument("--project", help=project_help)
    option("--cache-prefix", d.cache_prefix, "prefix of every Valkey key")
    option("--cache-ttl", d.cache_ttl, "seconds a cached context lives", type=_positive_int)
    option("--miss-budget-ms", d.miss_budget_ms, "how long chat:start waits for memory on a "
           "cache miss", type=_positive_float)  # fmt: skip
    option("--recall-limit", d.recall_limit, "past tasks in an injected context",
           type=_positive_int)  # fmt: skip
    option("--context-chars", d.context_chars, "longest injected context (characters)",
           type=_positive_int)  # fmt: skip
    option("--max-frame", d.max_frame, "largest accepted frame in bytes", type=_positive_int)
    option("--max-inflight", d.max_inflight, "concurrent requests per connection",
           type=_positive_int)  # fmt: skip
    option("--max-connections", d.max_connections, "open WebSockets before new ones get 503",
           type=_positive_int)  # fmt: skip
    option("--rate-limit", d.rate_limit, "messages per second per connection",
           type=_positive_float)  # fmt: skip
    option("--rate-burst", d.rate_burst, "messages a connection may send at once",
           type=_positive_int)  # fmt: skip
    option("--max-text", d.max_text, "longest query, message or task (characters)",
           type=_positive_int)  # fmt: skip
    option("--max-path", d.max_path, "longest file path (characters)", type=_positive_int)
    option("--max-name", d.max_name, "longest id, project or session (characters)",
           type=_positive_int)  # fmt: skip
    option("--token-file", None, "file holding the shared token (container secrets)",
           type=Path)  # fmt: skip
    option("--allowed-origins", "", "comma-separated browser Origins allowed to connect")
    option("--shutdown-deadline", d.shutdown_deadline, "seconds the whole shutdown may take "
           "on SIGTERM; what still runs then is cut off", type=_positive_float)  # fmt: skip
    option("--store-timeout-ms", d.store_timeout_ms, "how long an episode waits for memory "
           "before it is queued in the outbox", type=_positive_float)  # fmt: skip
    option("--memory", d.memory, "memory backend", choices=["sqlite", "graphiti", "script"])
    option("--graph-url", d.graph_url, "graphiti: falkor://host:port or bolt://user:pass@host"
           "; none starts a private FalkorDB under --data-dir")  # fmt: skip
    option("--graphiti-queue-size", d.graphiti_queue_size, "graphiti: episodes waiting for "
           "extraction per project", type=_positive_int)  # fmt: skip
    option("--llm", d.llm, "graphiti: extract entities and facts with an LLM (auto: when "
           "OPENAI_API_KEY is set)", choices=["auto", "on", "off"])  # fmt: skip
    option("--llm-base-url", None, "graphiti: OpenAI-compatible API (also OPENAI_BASE_URL)")
    option("--llm-model", d.llm_model, "graphiti: model for extraction")
    option("--llm-small-model", d.llm_small_model, "graphiti: model for small prompts")
    option("--embedding-model", d.embedding_model, "graphiti: embedding model")
    option("--embedding-dim", d.embedding_dim, "graphiti: embedding size", type=_positive_int)
    option("--memory-script", d.memory_script, "script: the memory_manager.py to run",
           type=Path)  # fmt: skip
    option("--memory-script-python", d.memory_script_python, "script: interpreter to run it")
    option("--memory-script-timeout", d.memory_script_timeout, "script: seconds per call",
           type=_positive_float)  # fmt: skip
    option("--memory-script-concurrency", d.memory_script_concurrency, "script: processes "
           "at once", type=_positive_int)  # fmt: skip
    option("--log-level", d.log_level, "debug, info, warning or error",
           choices=["debug", "info", "warning", "error"])  # fmt: skip
    option("--workers", d.workers, "processes serving the port together (SO_REUSEPORT), "
           "sharing one Valkey and one store", type=_positive_int)  # fmt: skip
    parser.set_defaults(
        token=env.get("BRIDGE_TOKEN") or None,
        llm_api_key=env.get("OPENAI_API_KEY") or None,
        openai_base_url=env.get("OPENAI_BASE_URL") or None,
        statsd_host=env.get("DD_AGENT_HOST") or d.statsd_host,
        statsd_port=_from_environment(env, "DD_DOGSTATSD_PORT", d.statsd_port, type=_port),
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


def config_from_args(args: argparse.Namespace) -> Config:
    """Build and check the Config from parsed ``serve`` arguments (raises ConfigError).

    Environment values no flag overrode are checked here, each error naming its variable.
    """
    args = argparse.Namespace(
        **{
            name: value.resolve() if isinstance(value, _FromEnvironment) else value
            for name, value in vars(args).items()
        }
    )
    config = Config(
        host=args.host,
        port=args.port,
        data_dir=Path(args.data_dir).expanduser(),
        valkey_url=args.valkey_url or None,
        project=Config.project if args.project is None else args.project,
        cache_prefix=args.cache_prefix,
        cache_ttl=args.cache_ttl,
        miss_budget_ms=args.miss_budget_ms,
        recall_limit=args.recall_limit,
        context_chars=args.context_chars,
        max_frame=args.max_frame,
        max_inflight=args.max_inflight,
        max_connections=args.max_connections,
        rate_limit=args.rate_limit,
        rate_burst=args.rate_burst,
        max_text=args.max_text,
        max_path=args.max_path,
        max_name=args.max_name,
        token=_read_token(args),
        allowed_origins=tuple(o.strip() for o in args.allowed_origins.split(",") if o.strip()),
        shutdown_deadline=args.shutdown_deadline,
        store_timeout_ms=args.store_timeout_ms,
        memory=args.memory,
        graph_url=args.graph_url or None,
        graphiti_queue_size=args.graphiti_queue_size,
        llm=args.llm,
        llm_api_key=args.llm_api_key,
        llm_base_url=args.llm_base_url or args.openai_base_url,
        llm_model=args.llm_model or None,
        llm_small_model=args.llm_small_model or None,
        embedding_model=args.embedding_model,
        embedding_dim=args.embedding_dim,
        memory_script=Path(args.memory_script).expanduser(),
        memory_script_python=args.memory_script_python,
        memory_script_timeout=args.memory_script_timeout,
        memory_script_concurrency=args.memory_script_concurrency,
        statsd_host=args.statsd_host,
        statsd_port=args.statsd_port,
        log_level=args.log_level,
        workers=args.workers,
    )
    check(config)
    return config


def check(config: Config) -> None:
    """Refuse configurations that would be unsafe or cannot work (raises ConfigError)."""
    if "{" in config.cache_prefix or "}" in config.cache_prefix:
        raise ConfigError(
            f"--cache-prefix {config.cache_prefix!r} must not contain {{ or }}: each "
            "project's keys carry a {hash tag} of their own, so they share a cluster slot"
        )
    if config.workers > MAX_WORKERS:
        raise ConfigError(f"--workers {config.workers} is more than {MAX_WORKERS}")
    if config.llm == "on" and not config.llm_api_key:
        raise ConfigError("--llm on needs OPENAI_API_KEY (any value for a local server)")
    if not config.loopback_only and not config.token:
        raise ConfigError(
            f"refusing to listen on {config.host} without a token: anyone who can reach it "
            "could read and write this memory. Set BRIDGE_TOKEN or BRIDGE_TOKEN_FILE "
            "(--token-file), or listen on 127.0.0.1."
        )


def worker_environment(config: Config, worker: int) -> dict[str, str]:
    """What a worker process of ``config`` needs in its environment to be worker number
    ``worker``: its whole resolved Config, secrets included (an environment is private to
    the process, a command line is not)."""
    resolved = dataclasses.replace(config, worker=worker)
    return {WORKER_CONFIG: msgspec.json.encode(resolved, enc_hook=str).decode()}


def worker_config(env: Mapping[str, str]) -> Config:
    """The Config a worker process was started with (see ``worker_environment``)."""
    text = env.get(WORKER_CONFIG, "")
    try:
        config = msgspec.json.decode(text, type=Config, dec_hook=_decode_path)
    except msgspec.DecodeError as e:
        raise ConfigError(f"{WORKER_CONFIG}: not a worker's configuration ({e})") from e
    if not 1 <= config.worker <= config.workers:
        raise ConfigError(f"{WORKER_CONFIG}: worker {config.worker} of {config.workers}")
    return config


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
