"""Configuration: flags over environment over defaults, checked once."""

from __future__ import annotations

from pathlib import Path

import pytest

from bridge.config import Config, ConfigError, parse_serve


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
