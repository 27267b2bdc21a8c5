"""The OpenCode plugin (plugin/graphiti-memory.ts): its own tests, its types, and the real
OpenCode running it against a real bridge.

Node packages come from plugin/package-lock.json: run ``npm install --no-save`` in plugin/
first (that is where the pinned bun, opencode, tsc and prettier binaries come from; see
plugin/README.md for why not ``npm ci``). Without them these tests fail rather than skip, so
a missing install never passes for a green run.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import msgspec
import pytest
from websockets.asyncio.client import connect

from tests.openai_standin import OpenAIStandin, Step, ToolCall, user_texts
from tests.test_cli import bridge_process

PLUGIN_DIR = Path(__file__).resolve().parent.parent / "plugin"
BIN = PLUGIN_DIR / "node_modules" / ".bin"

# plugin/test/*.test.ts: keep in step with the number of tests there.
EXPECTED_BUN_TESTS = 33


def node_binary(name: str) -> Path:
    """A binary the plugin's node packages install; fails loudly when it is missing."""
    path = BIN / name
    if not path.exists():
        pytest.fail(
            f"{path} is missing: run `npm install --no-save` in {PLUGIN_DIR} to install the "
            "plugin's node packages from its package-lock.json",
            pytrace=False,
        )
    return path


def run_in_plugin(*argv: str, timeout: float, env: dict[str, str] | None = None) -> str:
    """Run a command in plugin/ (bounded); its stdout and stderr, interleaved."""
    try:
        done = subprocess.run(
            argv,
            cwd=PLUGIN_DIR,
            env={**os.environ, **(env or {})},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{argv} did not finish in {timeout} s:\n{e.output!r}")
    output = done.stdout.decode(errors="replace")
    assert done.returncode == 0, f"{argv} exited with {done.returncode}:\n{output}"
    return output


@pytest.mark.timeout(300)
def test_plugin_unit_tests_pass_against_the_real_bridge() -> None:
    """``bun test`` in plugin/: the hooks against real bridge processes it starts itself."""
    bun = node_binary("bun")
    output = run_in_plugin(
        str(bun), "test", timeout=240, env={"BRIDGE_PYTHON": sys.executable, "NO_COLOR": "1"}
    )
    ran = re.search(r"Ran (\d+) tests? across", output)
    passed = re.search(r"^\s*(\d+) pass$", output, re.M)
    failed = re.search(r"^\s*(\d+) fail$", output, re.M)
    assert ran and passed and failed, f"no bun test summary in:\n{output}"
    assert int(failed.group(1)) == 0, output
    assert int(ran.group(1)) == int(passed.group(1)) == EXPECTED_BUN_TESTS, output


@pytest.mark.timeout(120)
def test_plugin_type_checks_and_is_formatted() -> None:
    """``tsc --noEmit`` over the plugin and its tests, against the pinned OpenCode types, and
    ``prettier --check`` (the TypeScript side of ``ruff format --check``)."""
    run_in_plugin(str(node_binary("tsc")), "--noEmit", "-p", ".", timeout=100)
    run_in_plugin(str(node_binary("prettier")), "--check", ".", timeout=100)


# -- the real OpenCode ---------------------------------------------------------------------


def memory_and_prompt(chat: dict[str, Any], prompt: str) -> tuple[str, str]:
    """The injected memory context and the prompt in the last user message of a chat request
    (OpenCode's ``run`` may quote the prompt); the context must come first."""
    user = [m for m in chat.get("messages") or [] if m.get("role") == "user"][-1]
    texts = user_texts(user)
    memory = [text for text in texts if text.startswith("[Memory Context]")]
    assert len(memory) == 1, texts
    asked = next(text for text in texts if text.strip().strip('"') == prompt)
    assert texts.index(memory[0]) < texts.index(asked), "the context comes before the prompt"
    return memory[0], asked


def chat_for(standin: OpenAIStandin, prompt: str) -> dict[str, Any]:
    """The first chat request of the turn for ``prompt``."""
    for chat in standin.chats():
        user = [m for m in chat.get("messages") or [] if m.get("role") == "user"][-1]
        if any(text.strip().strip('"') == prompt for text in user_texts(user)):
            return chat
    raise AssertionError(f"no chat request for {prompt!r} reached the stand-in model")


async def bridge_ask(url: str, message: dict[str, Any]) -> Any:
    async with connect(url) as ws:
        await ws.send(msgspec.msgpack.encode(message))
        return msgspec.msgpack.decode(await asyncio.wait_for(ws.recv(), 10))


async def bridge_export(url: str, project: str) -> list[dict[str, Any]]:
    episodes: list[dict[str, Any]] = []
    async with connect(url) as ws:
        await ws.send(msgspec.msgpack.encode({"type": "export", "id": 1, "project": project}))
        for _ in range(1000):
            reply = msgspec.msgpack.decode(await asyncio.wait_for(ws.recv(), 10))
            if reply["type"] == "export:end":
                return episodes
            episodes.extend(reply.get("episodes") or [])
    raise AssertionError("no export:end from the bridge")


async def opencode_run(
    opencode: Path, project: Path, env: dict[str, str], prompt: str
) -> tuple[str, str]:
    """``opencode run`` of one prompt in a new session: the session's id and the output."""
    process = await asyncio.create_subprocess_exec(
        str(opencode), "run", "--print-logs", "--format", "json", prompt,
        cwd=project, env=env, stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
    )  # fmt: skip
    try:
        out, err = await asyncio.wait_for(process.communicate(), 180)
    except TimeoutError:
        os.killpg(process.pid, signal.SIGKILL)
        await process.wait()
        pytest.fail(f"opencode run {prompt!r} did not finish in 180 s")
    log = f"stdout:\n{out.decode(errors='replace')}\nstderr:\n{err.decode(errors='replace')}"
    assert process.returncode == 0, log
    assert "Memory plugin error" not in log, log
    # --format json prints one event per line, each naming its session.
    sessions = {
        event["sessionID"]
        for line in out.decode(errors="replace").splitlines()
        if line.startswith("{") and "sessionID" in (event := json.loads(line))
    }
    assert len(sessions) == 1, log
    return sessions.pop(), log


@pytest.mark.timeout(300)
async def test_opencode_sessions_leave_tasks_that_the_next_session_remembers(
    tmp_path: Path,
) -> None:
    """The real OpenCode CLI (opencode-ai from plugin/node_modules), headless, with the plugin
    configured the way the README shows, a real bridge, and the stand-in model server of
    tests/openai_standin.py in place of the remote model API.

    Session 1 asks for a change: the model writes a file and, in the same step, edits another
    with an oldString it does not hold (the edit tool fails), then answers. Session 2 asks
    about it (a question: no tool call); the context it gets names session 1's prompt, its
    file and its error. The bridge holds session 1's episodes under its session id, one
    completion with the model's final answer as its summary, and nothing of session 2.
    """
    opencode = node_binary("opencode")
    home = tmp_path / "home"
    xdg = {name: home / name.lower() for name in ("CONFIG", "DATA", "CACHE", "STATE")}
    for folder in xdg.values():
        folder.mkdir(parents=True)
    project = tmp_path / "shop"
    project.mkdir()
    git = await asyncio.create_subprocess_exec("git", "init", "-q", str(project))
    assert await asyncio.wait_for(git.wait(), 30) == 0
    warpdrive = project / "warpdrive.ts"
    warpdrive.write_text("export const capacitor = { flux: 1 }\n")
    written = project / "notes" / "capacitor.txt"
    seeded = "TypeError: flux capacitor overheated in warpdrive.ts"
    first = "note why the flux capacitor in warpdrive.ts overheats"
    answer = "Noted it in notes/capacitor.txt; warpdrive.ts has no overheat flag to clear."
    second = "what did we find out about the flux capacitor and warpdrive.ts?"
    edit_error = "Could not find oldString in the file"

    with contextlib.ExitStack() as stack:
        model = OpenAIStandin()
        model.start()
        stack.callback(model.stop)
        model.script(
            first,
            Step(
                calls=(
                    ToolCall("write", {"filePath": str(written), "content": "remember me\n"}),
                    ToolCall(
                        "edit",
                        {
                            "filePath": str(warpdrive),
                            "oldString": "overheat: true",
                            "newString": "overheat: false",
                        },
                    ),
                ),
                usage={"prompt_tokens": 40, "completion_tokens": 9, "total_tokens": 49},
            ),
            Step(text=answer),
        )
        model.script(second, Step(text="It overheats; see notes/capacitor.txt."))
        config = {
            "$schema": "https://opencode.ai/config.json",
            "model": "local/stub",
            "autoupdate": False,
            "share": "disabled",
            "plugin": [(PLUGIN_DIR / "graphiti-memory.ts").as_uri()],
            "provider": {
                "local": {
                    "npm": "@ai-sdk/openai-compatible",
                    "options": {"baseURL": model.base_url, "apiKey": "x"},
                    "models": {"stub": {"name": "stub"}},
                }
            },
        }
        (project / "opencode.json").write_text(json.dumps(config, indent=2))

        async with bridge_process("--data-dir", str(tmp_path / "data")) as bridge:
            seed = {"type": "error", "id": 1, "project": "shop", "message": seeded}
            assert (await bridge_ask(bridge.url, seed))["ok"]
            env = {
                **{k: v for k, v in os.environ.items() if not k.startswith("OPENCODE")},
                "HOME": str(home),
                "PWD": str(project),  # OpenCode takes its directory from $PWD over the cwd
                **{f"XDG_{name}_HOME": str(path) for name, path in xdg.items()},
                "GRAPHITI_BRIDGE_URL": bridge.url,
                "GRAPHITI_BRIDGE_DEADLINE_MS": "3000",
            }

            # Session 1: its chat request carried the context the bridge had (the seed).
            session1, log1 = await opencode_run(opencode, project, env, first)
            memory1, _ = memory_and_prompt(chat_for(model, first), first)
            assert seeded in memory1, memory1
            assert written.read_text() == "remember me\n", log1
            assert "overheat" not in warpdrive.read_text(), "the edit failed"

            # Session 2, a new chat: its context names session 1's prompt, file and error.
            session2, _ = await opencode_run(opencode, project, env, second)
            assert session2 != session1
            memory2, _ = memory_and_prompt(chat_for(model, second), second)
            assert first in memory2, memory2
            assert str(written) in memory2, memory2
            assert edit_error in memory2, memory2
            assert str(warpdrive) in memory2, memory2

            episodes = await bridge_export(bridge.url, "shop")

    def of(session: str) -> list[tuple[str, str]]:
        return [
            (e["metadata"]["type"], e["body"])
            for e in episodes
            if e["metadata"].get("session") == session
        ]

    # Session 1's episodes, all under its session id: the file and the failed edit (naming
    # the tool, the file and the error; the two ran side by side), then the task.
    kinds = [kind for kind, _ in of(session1)]
    assert sorted(kinds[:2]) == ["error", "file_edit"] and kinds[2:] == ["success"], episodes
    bodies = dict(of(session1))
    assert bodies["file_edit"] == f"Modified: {written}"
    assert bodies["error"].startswith(f"Error: Tool edit failed on {warpdrive}: {edit_error}")
    assert first in bodies["success"], bodies
    # Session 2 answered a question: no tool call, nothing changed, so no task and no episode.
    assert of(session2) == [], episodes
    completions = [e for e in episodes if e["metadata"]["type"] == "success"]
    assert len(completions) == 1, episodes
    done = completions[0]["metadata"]
    # The task is the prompt; the summary the model's final answer; tokens the stand-in's
    # usage summed over the turn's two steps (49 + 34).
    assert first in completions[0]["body"] and answer not in completions[0]["body"]
    assert done["summary"] == answer
    assert done["tokens"] == 83
    assert done["duration"] > 0
