"""What keeps ``python -m bridge`` from starting is one line on stderr and exit status 2:
bad environment values, a port in use, a data folder that is a file or that another
bridge holds, a missing memory script. Every case runs the real command line."""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from pathlib import Path

import pytest

from bridge.runtime.datadir import DataDirBusy, DataDirLock
from bridge.runtime.embedded import EmbeddedValkey
from tests.conftest import StatsdCollector
from tests.test_cli import LISTENING, bridge_process


async def bridge_cli(*args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    """Run ``python -m bridge ARGS`` to completion with stdin closed: its exit status and
    its stderr."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bridge", *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **(env or {})},
    )  # fmt: skip
    try:
        _, err = await asyncio.wait_for(process.communicate(), 60)
    finally:
        if process.returncode is None:  # it started when it should not have
            process.kill()
            await process.wait()
    assert process.returncode is not None
    return process.returncode, err.decode(errors="replace")


async def refused(*args: str, env: dict[str, str] | None = None) -> str:
    """The one-line reason ``python -m bridge ARGS`` gives for not running (exit status 2)."""
    status, err = await bridge_cli(*args, env=env)
    assert "Traceback" not in err, err
    assert status == 2, err
    last = err.rstrip("\n").splitlines()[-1]
    assert last.startswith("graphiti-bridge: "), err
    return last


@pytest.mark.parametrize(
    ("var", "value", "says"),
    [
        ("BRIDGE_MEMORY", "nonsense", "invalid choice 'nonsense'"),
        ("BRIDGE_LLM", "maybe", "invalid choice 'maybe'"),
        ("BRIDGE_LOG_LEVEL", "verbose", "invalid choice 'verbose'"),
        ("BRIDGE_PORT", "abc", "must be a port number"),
    ],
)
async def test_a_bad_environment_value_is_one_line_naming_it(
    tmp_path: Path, valkey: EmbeddedValkey, var: str, value: str, says: str
) -> None:
    env = {
        "BRIDGE_DATA_DIR": str(tmp_path / "data"),
        "BRIDGE_VALKEY_URL": valkey.url,
        "BRIDGE_PORT": "0",
        var: value,
    }
    line = await refused("serve", env=env)
    assert line.startswith(f"graphiti-bridge: {var}: {says}")


async def test_help_names_values_and_lists_the_environment() -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bridge", "serve", "--help", stdout=asyncio.subprocess.PIPE
    )
    out, _ = await asyncio.wait_for(process.communicate(), 60)
    text = out.decode()
    assert process.returncode == 0
    assert "--port PORT" in text and "--cache-ttl N" in text and "--data-dir PATH" in text
    assert "_port" not in text and "_positive" not in text
    for var in ["BRIDGE_TOKEN", "OPENAI_API_KEY", "OPENAI_BASE_URL", "DD_AGENT_HOST",
                "DD_DOGSTATSD_PORT", "BRIDGE_<FLAG>"]:  # fmt: skip
        assert f"\n  {var} " in text, f"{var} missing from --help"


async def test_a_port_in_use_is_one_line(
    tmp_path: Path, valkey: EmbeddedValkey, statsd: StatsdCollector
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        args = ["--port", str(port), "--data-dir", str(tmp_path / "data")]
        line = await refused(
            "serve", *args, "--valkey-url", valkey.url,
            env={"DD_DOGSTATSD_PORT": str(statsd.port)},
        )  # fmt: skip
    assert line == f"graphiti-bridge: cannot listen on 127.0.0.1:{port}: Address already in use"


@pytest.mark.parametrize("command", ["serve", "export", "import"])
async def test_a_data_dir_that_is_a_file_is_one_line(
    tmp_path: Path, valkey: EmbeddedValkey, command: str
) -> None:
    data = tmp_path / "data"
    data.write_text("not a folder")
    line = await refused(command, "--port", "0", "--data-dir", str(data),
                         "--valkey-url", valkey.url)  # fmt: skip
    assert line == f"graphiti-bridge: the data folder {data} exists and is not a folder"


async def test_a_missing_memory_script_is_one_line(tmp_path: Path, valkey: EmbeddedValkey) -> None:
    script = tmp_path / "memory_manager.py"
    line = await refused(
        "serve", "--port", "0", "--data-dir", str(tmp_path / "data"), "--valkey-url",
        valkey.url, "--memory", "script", "--memory-script", str(script),
    )  # fmt: skip
    assert (
        line
        == f"graphiti-bridge: the script memory cannot start: memory script {script} is not a file"
    )


async def test_a_second_bridge_on_the_same_data_dir_is_refused(
    tmp_path: Path, valkey: EmbeddedValkey, statsd: StatsdCollector
) -> None:
    data = tmp_path / "data"
    env = {"DD_DOGSTATSD_PORT": str(statsd.port)}
    args = ["--data-dir", str(data), "--valkey-url", valkey.url]
    async with bridge_process(*args, env=env) as first:
        busy = (
            f"another bridge (pid {first.process.pid}) holds the data folder {data}; "
            "stop it first or give this one another --data-dir"
        )
        assert await refused("serve", "--port", "0", *args, env=env) == f"graphiti-bridge: {busy}"
        backup = tmp_path / "backup.jsonl"
        backup.write_text("an earlier export\n")
        assert await refused("export", *args, "--out", str(backup), env=env) == (
            f"graphiti-bridge: {busy}"
        )
        assert backup.read_text() == "an earlier export\n", "a refused export truncated it"
        assert await refused("import", *args, env=env) == f"graphiti-bridge: {busy}"
    status, _ = await bridge_cli("export", *args, env=env)
    assert status == 0, "the lock outlived the bridge that held it"


async def test_two_bridges_starting_at_once_on_a_fresh_data_dir(
    tmp_path: Path, valkey: EmbeddedValkey, statsd: StatsdCollector
) -> None:
    """One serves; the other says why it does not (it used to fail creating the tables)."""
    args = [
        "serve",
        "--port",
        "0",
        "--data-dir",
        str(tmp_path / "data"),
        "--valkey-url",
        valkey.url,
    ]
    env = {**os.environ, "DD_DOGSTATSD_PORT": str(statsd.port)}
    pipe = asyncio.subprocess.PIPE
    processes = [
        await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bridge", *args, stdout=pipe, stderr=pipe, env=env
        )
        for _ in range(2)
    ]
    try:
        firsts = [await asyncio.wait_for(p.stdout.readline(), 60) for p in processes if p.stdout]
        assert sorted(bool(LISTENING.search(line)) for line in firsts) == [False, True]
        loser = processes[[bool(LISTENING.search(line)) for line in firsts].index(False)]
        assert loser.stderr is not None
        err = (await asyncio.wait_for(loser.stderr.read(), 60)).decode()
        assert await loser.wait() == 2
        assert "Traceback" not in err and "already exists" not in err, err
        assert "holds the data folder" in err.splitlines()[-1]
    finally:
        for process in processes:
            if process.returncode is None:
                process.terminate()
            await process.wait()


def test_the_data_dir_lock_is_exclusive_until_released(tmp_path: Path) -> None:
    first = DataDirLock(tmp_path / "data")
    second = DataDirLock(tmp_path / "data")
    with first:
        assert (tmp_path / "data" / "bridge.lock").read_text() == f"{os.getpid()}\n"
        with pytest.raises(DataDirBusy, match=f"pid {os.getpid()}"):
            second.acquire()
    with second, pytest.raises(DataDirBusy):
        first.acquire()
    first.acquire()
    first.release()
