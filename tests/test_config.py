"""Configuration: flags over environment over defaults, checked once."""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import pytest

from bridge.config import (
    WORKER_CONFIG,
    Config,
    ConfigError,
    MetricsConfig,
    parse_serve,
    with_changes,
    worker_config,
    worker_environment,
)
from bridge.wire.protocol import Codec, Limits


def test_defaults_are_loopback_8765_and_the_embedded_parts() -> None:
    config = parse_serve([], {})
    assert (config.server.host, config.server.port) == ("127.0.0.1", 8765)
    assert (config.cache.valkey_url, config.memory.backend) == (None, "sqlite")
    assert config.data_dir == Config().data_dir
    assert config.metrics.host == "localhost" and config.metrics.port == 8125


def test_flags_win_over_the_environment_which_wins_over_defaults(tmp_path: Path) -> None:
    env = {
        "BRIDGE_PORT": "9001",
        "BRIDGE_CACHE_TTL": "60",
        "BRIDGE_DATA_DIR": str(tmp_path / "env"),
        "BRIDGE_VALKEY_URL": "redis://localhost:6380",
        "DD_AGENT_HOST": "agent",
        "DD_DOGSTATSD_PORT": "9125",
    }
    config = parse_serve(["--port", "9002", "--data-dir", str(tmp_path / "flag")], env)
    assert config.server.port == 9002
    assert config.data_dir == tmp_path / "flag"
    assert config.cache.ttl == 60
    assert config.cache.valkey_url == "redis://localhost:6380"
    assert (config.metrics.host, config.metrics.port) == ("agent", 9125)


@pytest.mark.parametrize(
    ("argv", "env"),
    [
        (["--port", "70000"], {}),
        (["--cache-ttl", "0"], {}),
        (["--port", "abc"], {}),
        (["--memory", "mongo"], {}),
    ],
)
def test_bad_values_are_refused_with_the_flag_named(
    argv: list[str], env: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        parse_serve(argv, env)
    err = capsys.readouterr().err
    assert "error: argument --" in err
    assert "_port" not in err and "_positive" not in err, "a type's function name leaked"


@pytest.mark.parametrize(
    ("var", "value", "says"),
    [
        ("BRIDGE_MEMORY", "nonsense", "invalid choice 'nonsense' (choose from sqlite,"),
        ("BRIDGE_LLM", "maybe", "invalid choice 'maybe' (choose from auto, on, off)"),
        ("BRIDGE_LOG_LEVEL", "verbose", "invalid choice 'verbose' (choose from debug,"),
        ("BRIDGE_PORT", "abc", "must be a port number 0-65535, got 'abc'"),
        ("BRIDGE_CACHE_TTL", "0", "must be a positive integer, got '0'"),
        ("BRIDGE_MISS_BUDGET_MS", "-5", "must be a positive number, got '-5'"),
        ("BRIDGE_RATE_LIMIT", "nan", "must be a positive number, got 'nan'"),
        ("DD_DOGSTATSD_PORT", "nope", "must be a port number 0-65535, got 'nope'"),
    ],
)
def test_environment_values_are_checked_like_flags_and_named(
    var: str, value: str, says: str
) -> None:
    with pytest.raises(ConfigError) as refused:
        parse_serve([], {var: value})
    assert str(refused.value).startswith(f"{var}: {says}")


def test_a_flag_overrides_a_bad_environment_value_and_empty_means_unset() -> None:
    env = {"BRIDGE_MEMORY": "nonsense", "BRIDGE_PORT": "abc", "BRIDGE_LLM": ""}
    config = parse_serve(["--memory", "script", "--port", "9003"], env)
    assert config.server.port == 9003
    assert (config.memory.backend, config.memory.llm.mode) == ("script", "auto")


def test_good_environment_values_are_converted_like_flags(tmp_path: Path) -> None:
    env = {
        "BRIDGE_MEMORY": "graphiti",
        "BRIDGE_LLM": "off",
        "BRIDGE_LOG_LEVEL": "debug",
        "BRIDGE_RATE_LIMIT": "12.5",
        "BRIDGE_MEMORY_SCRIPT": str(tmp_path / "m.py"),
    }
    config = parse_serve([], env)
    memory = config.memory
    assert (memory.backend, memory.llm.mode) == ("graphiti", "off")
    assert config.server.log_level == "debug"
    assert config.limits.rate_limit == 12.5 and memory.script.path == tmp_path / "m.py"


def test_llm_mode_follows_the_api_key_unless_forced() -> None:
    assert not parse_serve(["--memory", "graphiti"], {}).memory.llm.enabled
    assert parse_serve(["--memory", "graphiti"], {"OPENAI_API_KEY": "k"}).memory.llm.enabled
    assert not parse_serve(["--llm", "off"], {"OPENAI_API_KEY": "k"}).memory.llm.enabled
    with pytest.raises(ConfigError, match="OPENAI_API_KEY"):
        parse_serve(["--llm", "on"], {})
    key = parse_serve([], {"OPENAI_API_KEY": "sk-secret"})
    assert "sk-secret" not in repr(key)


def test_a_bad_statsd_port_in_the_environment_is_named() -> None:
    with pytest.raises(ConfigError, match="DD_DOGSTATSD_PORT"):
        parse_serve([], {"DD_DOGSTATSD_PORT": "nope"})


# Every serve flag: a value, where it lands in the nested Config, and what it becomes there.
FLAGS: list[tuple[str, str, str, object]] = [
    ("--data-dir", "/srv/bridge", "data_dir", Path("/srv/bridge")),
    ("--project", "shop", "project", "shop"),
    ("--host", "::1", "server.host", "::1"),
    ("--port", "9100", "server.port", 9100),
    (
        "--allowed-origins",
        "https://a.example, https://b.example",
        "server.allowed_origins",
        ("https://a.example", "https://b.example"),
    ),
    ("--workers", "3", "server.workers", 3),
    ("--shutdown-deadline", "4.5", "server.shutdown_deadline", 4.5),
    ("--log-level", "warning", "server.log_level", "warning"),
    ("--max-frame", "2048", "limits.max_frame", 2048),
    ("--max-text", "100", "limits.max_text", 100),
    ("--max-path", "50", "limits.max_path", 50),
    ("--max-name", "20", "limits.max_name", 20),
    ("--max-inflight", "8", "limits.max_inflight", 8),
    ("--max-connections", "9", "limits.max_connections", 9),
    ("--rate-limit", "12.5", "limits.rate_limit", 12.5),
    ("--rate-burst", "30", "limits.rate_burst", 30),
    ("--valkey-url", "redis://cache:6380", "cache.valkey_url", "redis://cache:6380"),
    ("--cache-prefix", "x:", "cache.prefix", "x:"),
    ("--cache-ttl", "60", "cache.ttl", 60),
    ("--recall-limit", "3", "recall.limit", 3),
    ("--context-chars", "500", "recall.context_chars", 500),
    ("--miss-budget-ms", "100", "recall.miss_budget_ms", 100.0),
    ("--memory", "script", "memory.backend", "script"),
    ("--store-timeout-ms", "50", "memory.store_timeout_ms", 50.0),
    ("--graph-url", "falkor://graph:6379", "memory.graph_url", "falkor://graph:6379"),
    ("--graphiti-queue-size", "10", "memory.graphiti_queue_size", 10),
    ("--llm", "off", "memory.llm.mode", "off"),
    ("--llm-base-url", "http://127.0.0.1:1/v1", "memory.llm.base_url", "http://127.0.0.1:1/v1"),
    ("--llm-model", "big", "memory.llm.model", "big"),
    ("--llm-small-model", "small", "memory.llm.small_model", "small"),
    ("--embedding-model", "embed", "memory.llm.embedding_model", "embed"),
    ("--embedding-dim", "64", "memory.llm.embedding_dim", 64),
    ("--memory-script", "/opt/m.py", "memory.script.path", Path("/opt/m.py")),
    ("--memory-script-python", "/usr/bin/python3", "memory.script.python", "/usr/bin/python3"),
    ("--memory-script-timeout", "2.5", "memory.script.timeout", 2.5),
    ("--memory-script-concurrency", "2", "memory.script.concurrency", 2),
]
# Fields set from no flag of FLAGS: the token (BRIDGE_TOKEN or --token-file), the API key
# (OPENAI_API_KEY), DogStatsD (DD_AGENT_HOST, DD_DOGSTATSD_PORT), and the worker number
# (given to worker processes only).
NOT_FLAGS = {"server.token", "server.worker", "memory.llm.api_key", "metrics.host", "metrics.port"}


def setting(config: object, path: str) -> object:
    """The value at a dotted ``path`` of a Config, e.g. ``memory.llm.mode``."""
    return functools.reduce(getattr, path.split("."), config)


def change_at(path: str, value: object) -> dict[str, object]:
    """The changes (``bridge.config.with_changes``) that set ``path`` to ``value``."""
    *sections, name = path.split(".")
    change: dict[str, object] = {name: value}
    for section in reversed(sections):
        change = {section: change}
    return change


def leaf_fields(settings: object, prefix: str = "") -> set[str]:
    """The dotted path of every field of a Config that is not itself a section."""
    paths: set[str] = set()
    for f in dataclasses.fields(settings):  # type: ignore[arg-type]
        value = getattr(settings, f.name)
        if dataclasses.is_dataclass(value):
            paths |= leaf_fields(value, f"{prefix}{f.name}.")
        else:
            paths.add(prefix + f.name)
    return paths


def env_var(flag: str) -> str:
    return "BRIDGE_" + flag.removeprefix("--").replace("-", "_").upper()


def test_every_field_is_set_by_a_flag_or_a_named_variable() -> None:
    assert {path for _, _, path, _ in FLAGS} | NOT_FLAGS == leaf_fields(Config())
    assert len({path for _, _, path, _ in FLAGS}) == len(FLAGS)


@pytest.mark.parametrize(("flag", "text", "path", "expected"), FLAGS)
def test_each_flag_and_its_variable_land_in_their_section(
    flag: str, text: str, path: str, expected: object
) -> None:
    from_flag = parse_serve([flag, text], {})
    from_env = parse_serve([], {env_var(flag): text})
    assert setting(from_flag, path) == expected
    assert setting(from_env, path) == expected
    assert from_env == from_flag
    default = parse_serve([], {})
    assert setting(default, path) == setting(Config(), path) != expected
    assert from_flag == with_changes(default, **change_at(path, expected)), "more changed"


def test_the_named_variables_land_in_their_sections(tmp_path: Path) -> None:
    env = {
        "BRIDGE_TOKEN": "t0ken",
        "OPENAI_API_KEY": "sk-key",
        "OPENAI_BASE_URL": "http://127.0.0.1:2/v1",
        "DD_AGENT_HOST": "agent",
        "DD_DOGSTATSD_PORT": "9125",
    }
    config = parse_serve([], env)
    assert config.server.token == "t0ken"
    assert (config.memory.llm.api_key, config.memory.llm.base_url) == (
        "sk-key",
        "http://127.0.0.1:2/v1",
    )
    assert (config.metrics.host, config.metrics.port) == ("agent", 9125)
    given = parse_serve(["--llm-base-url", "http://127.0.0.1:3/v1"], env)
    assert given.memory.llm.base_url == "http://127.0.0.1:3/v1", "the flag wins"
    token_file = tmp_path / "token"
    token_file.write_text("from-the-file\n")
    assert parse_serve(["--token-file", str(token_file)], env).server.token == "from-the-file"


# A bad value for each kind of flag, and what the error says about it.
BAD_VALUES = [
    ("--port", "-1", "must be a port number 0-65535, got '-1'"),
    ("--workers", "0", "must be a positive integer, got '0'"),
    ("--max-frame", "1.5", "must be a positive integer, got '1.5'"),
    ("--shutdown-deadline", "0", "must be a positive number, got '0'"),
    ("--memory-script-timeout", "soon", "must be a positive number, got 'soon'"),
    ("--embedding-dim", "-64", "must be a positive integer, got '-64'"),
    ("--log-level", "loud", "invalid choice"),
    ("--llm", "yes", "invalid choice"),
    ("--memory", "redis", "invalid choice"),
]


@pytest.mark.parametrize(("flag", "text", "says"), BAD_VALUES)
def test_a_bad_flag_value_is_refused_naming_the_flag(
    flag: str, text: str, says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as refused:
        parse_serve([flag, text], {})
    assert refused.value.code == 2
    assert f"error: argument {flag}: {says}" in capsys.readouterr().err


@pytest.mark.parametrize(("flag", "text", "says"), BAD_VALUES)
def test_a_bad_variable_value_is_refused_naming_the_variable(
    flag: str, text: str, says: str
) -> None:
    with pytest.raises(ConfigError) as refused:
        parse_serve([], {env_var(flag): text})
    assert str(refused.value).startswith(f"{env_var(flag)}: {says}")


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--cache-prefix", "gb{x}:"], "--cache-prefix 'gb{x}:' must not contain { or }"),
        (["--workers", "257"], "--workers 257 is more than 256"),
        (["--llm", "on"], "--llm on needs OPENAI_API_KEY"),
        (["--host", "0.0.0.0"], "refusing to listen on 0.0.0.0 without a token"),
    ],
)
def test_settings_that_cannot_work_together_are_refused_naming_the_flag(
    argv: list[str], says: str
) -> None:
    with pytest.raises(ConfigError) as refused:
        parse_serve(argv, {})
    assert str(refused.value).startswith(says)


def test_the_limits_default_to_the_protocols_own() -> None:
    limits = parse_serve([], {}).limits
    assert limits.max_frame == Codec().max_frame
    assert Limits(text=limits.max_text, path=limits.max_path, name=limits.max_name) == Limits()


def test_a_config_and_its_sections_are_frozen() -> None:
    config = parse_serve([], {})
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.server.port = 1  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.memory = config.memory  # type: ignore[misc]


def test_a_worker_gets_the_whole_resolved_config_secrets_included(tmp_path: Path) -> None:
    argv = ["--workers", "3", "--data-dir", str(tmp_path), "--memory", "graphiti"]
    argv += ["--graph-url", "falkor://:pw@graph:6379", "--memory-script", str(tmp_path / "m.py")]
    parent = parse_serve(argv, {"BRIDGE_TOKEN": "t0ken", "OPENAI_API_KEY": "sk-key"})
    env = worker_environment(parent, 2)
    assert "t0ken" in env[WORKER_CONFIG] and "sk-key" in env[WORKER_CONFIG]
    worker = worker_config(env)
    assert worker == with_changes(parent, server={"worker": 2})
    assert isinstance(worker.data_dir, Path) and isinstance(worker.memory.script.path, Path)


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("", "not a worker's configuration"),
        ('{"memory": {"backend": "redis"}}', "not a worker's configuration"),
        ('{"server": {"workers": 2, "worker": 3}}', "worker 3 of 2"),
        ('{"server": {"workers": 2}}', "worker 0 of 2"),
    ],
)
def test_a_worker_refuses_a_configuration_that_is_not_one(text: str, says: str) -> None:
    with pytest.raises(ConfigError) as refused:
        worker_config({WORKER_CONFIG: text})
    assert str(refused.value).startswith(f"{WORKER_CONFIG}: {says}")


def test_with_changes_changes_only_the_fields_named() -> None:
    config = Config()
    changed = with_changes(config, project="shop", memory={"script": {"timeout": 2.0}})
    assert changed.project == "shop" and changed.memory.script.timeout == 2.0
    assert changed.memory.script.path == config.memory.script.path
    assert (changed.server, changed.memory.llm) == (config.server, config.memory.llm)
    whole = with_changes(config, metrics=MetricsConfig(port=9))
    assert whole.metrics == MetricsConfig(port=9)
    with pytest.raises(TypeError, match="rate_limit"):
        with_changes(config, rate_limit=1.0)
