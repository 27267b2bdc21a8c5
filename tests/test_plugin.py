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
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import connect

from tests.openai_standin import OpenAIStandin, Step, ToolCall, user_texts
from tests.ports import free_port
from tests.test_cli import bridge_process
from tests.wire import ask, exported

PLUGIN_DIR = Path(__file__).resolve().parent.parent / "plugin"
BIN = PLUGIN_DIR / "node_modules" / ".bin"

# plugin/test/*.test.ts: keep in step with the number of tests there.
EXPECTED_BUN_TESTS = 40


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
@pytest.mark.slow
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

MEMORY = "[Memory Context]"


def is_memory(message: dict[str, Any]) -> bool:
    """A user message that is the plugin's memory context and nothing else."""
    texts = user_texts(message)
    return message.get("role") == "user" and bool(texts) and texts[0].startswith(MEMORY)


def memory_after(request: dict[str, Any], anchor: Callable[[dict[str, Any]], bool]) -> str:
    """The memory context of a model request: exactly one, in a user message of its own right
    after the message ``anchor`` picks."""
    messages = request.get("messages") or []
    memories = [i for i, m in enumerate(messages) if is_memory(m)]
    assert len(memories) == 1, messages
    at = memories[0]
    assert at > 0 and anchor(messages[at - 1]), messages
    (text,) = user_texts(messages[at])
    return text


def says(prompt: str) -> Callable[[dict[str, Any]], bool]:
    """Picks the user message of ``prompt`` (OpenCode's ``run`` may quote it)."""
    return lambda m: (
        m.get("role") == "user" and any(text.strip().strip('"') == prompt for text in user_texts(m))
    )


def no_memory(request: dict[str, Any]) -> bool:
    return not any(MEMORY in text for m in request.get("messages") or [] for text in user_texts(m))


def chat_for(standin: OpenAIStandin, prompt: str) -> dict[str, Any]:
    """The first chat request of the turn for ``prompt``."""
    for chat in standin.chats():
        users = [m for m in chat.get("messages") or [] if m.get("role") == "user"]
        if users and says(prompt)([m for m in users if not is_memory(m)][-1]):
            return chat
    raise AssertionError(f"no chat request for {prompt!r} reached the stand-in model")


def toolless(standin: OpenAIStandin) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """OpenCode's model requests that offer no tools: (title requests, the others)."""
    with standin._lock:
        bodies = [
            r.body
            for r in standin.requests
            if r.path.endswith("/chat/completions") and not r.body.get("tools")
        ]
    titles = [
        body
        for body in bodies
        if any(
            "Generate a title for this conversation" in text
            for m in body.get("messages") or []
            for text in user_texts(m)
        )
    ]
    return titles, [body for body in bodies if body not in titles]


async def bridge_ask(url: str, message: dict[str, Any]) -> Any:
    async with connect(url) as ws:
        return await ask(ws, message, binary=True)


async def bridge_export(url: str, project: str) -> list[dict[str, Any]]:
    async with connect(url) as ws:
        return await exported(ws, binary=True, project=project)


@dataclass
class Scratch:
    """A scratch home (HOME and the XDG folders) and a git project configured for OpenCode
    with this plugin, the way the README shows, and the stand-in model."""

    home: Path
    project: Path
    env: dict[str, str]

    @property
    def queue_files(self) -> list[Path]:
        """The plugin's queue files (under the XDG state folder)."""
        return sorted((self.home / "state").glob("opencode-graphiti-memory/*/*.jsonl"))


async def scratch(
    tmp_path: Path, name: str, model: OpenAIStandin, bridge_url: str, **stub: Any
) -> Scratch:
    """A scratch OpenCode project ``name``; ``stub`` adds to the stand-in model's entry."""
    home = tmp_path / "home"
    xdg = {name: home / name.lower() for name in ("CONFIG", "DATA", "CACHE", "STATE")}
    for folder in xdg.values():
        folder.mkdir(parents=True)
    project = tmp_path / name
    project.mkdir()
    git = await asyncio.create_subprocess_exec("git", "init", "-q", str(project))
    assert await asyncio.wait_for(git.wait(), 30) == 0
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
                "models": {"stub": {"name": "stub", **stub}},
            }
        },
    }
    (project / "opencode.json").write_text(json.dumps(config, indent=2))
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("OPENCODE", "GRAPHITI"))},
        "HOME": str(home),
        "PWD": str(project),  # OpenCode takes its directory from $PWD over the cwd
        **{f"XDG_{name}_HOME": str(path) for name, path in xdg.items()},
        "GRAPHITI_BRIDGE_URL": bridge_url,
        "GRAPHITI_BRIDGE_DEADLINE_MS": "3000",
    }
    return Scratch(home, project, env)


@contextlib.contextmanager
def standin_model() -> Iterator[OpenAIStandin]:
    model = OpenAIStandin()
    model.start()
    try:
        yield model
    finally:
        model.stop()


async def opencode_run(opencode: Path, where: Scratch, prompt: str) -> tuple[str, str]:
    """``opencode run`` of one prompt in a new session: the session's id and the output
    (with OpenCode's log, the plugin's lines included, down to info)."""
    process = await asyncio.create_subprocess_exec(
        str(opencode), "run", "--print-logs", "--log-level", "INFO", "--format", "json", prompt,
        cwd=where.project, env=where.env, stdin=subprocess.DEVNULL,
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
@pytest.mark.slow
async def test_opencode_sessions_leave_tasks_that_the_next_session_remembers(
    tmp_path: Path,
) -> None:
    """The real OpenCode CLI (opencode-ai from plugin/node_modules), headless, with the plugin
    configured the way the README shows, a real bridge, and the stand-in model server of
    tests/openai_standin.py in place of the remote model API.

    Session 1 asks for a change: the model writes a file and, in the same step, edits another
    with an oldString it does not hold (the edit tool fails), then answers. Its chat requests
    carry the memory the bridge had (a seeded error) once, right after the prompt; OpenCode's
    title request does not. Session 2 asks about it (a question: no tool call); the context
    it gets names session 1's prompt, its file and its error. The bridge holds session 1's
    episodes under its session id, one completion with the model's final answer as its
    summary, and nothing of session 2.
    """
    opencode = node_binary("opencode")
    seeded = "TypeError: flux capacitor overheated in warpdrive.ts"
    first = "note why the flux capacitor in warpdrive.ts overheats"
    answer = "Noted it in notes/capacitor.txt; warpdrive.ts has no overheat flag to clear."
    second = "what did we find out about the flux capacitor and warpdrive.ts?"
    edit_error = "Could not find oldString in the file"

    with standin_model() as model:
        async with bridge_process("--data-dir", str(tmp_path / "data")) as bridge:
            where = await scratch(tmp_path, "shop", model, bridge.url)
            warpdrive = where.project / "warpdrive.ts"
            warpdrive.write_text("export const capacitor = { flux: 1 }\n")
            written = where.project / "notes" / "capacitor.txt"
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
            seed = {"type": "error", "id": 1, "project": "shop", "message": seeded}
            assert (await bridge_ask(bridge.url, seed))["ok"]

            # Session 1: both its chat requests carried the context the bridge had (the
            # seed), once, after the prompt; the title request carried none.
            session1, log1 = await opencode_run(opencode, where, first)
            steps = [c for c in model.chats() if any(says(first)(m) for m in c["messages"])]
            assert len(steps) == 2, model.chats()
            memory1 = memory_after(steps[0], says(first))
            assert seeded in memory1, memory1
            assert memory_after(steps[1], says(first)) == memory1
            titles, others = toolless(model)
            assert titles and others == [], (titles, others)
            assert all(no_memory(title) for title in titles), titles
            assert any(says(first)(m) for m in titles[0]["messages"]), titles[0]
            assert written.read_text() == "remember me\n", log1
            assert "overheat" not in warpdrive.read_text(), "the edit failed"

            # Session 2, a new chat: its context names session 1's prompt, file and error.
            session2, _ = await opencode_run(opencode, where, second)
            assert session2 != session1
            memory2 = memory_after(chat_for(model, second), says(second))
            assert first in memory2, memory2
            assert str(written) in memory2, memory2
            assert edit_error in memory2, memory2
            assert str(warpdrive) in memory2, memory2
            assert all(no_memory(title) for title in toolless(model)[0])

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


@pytest.mark.timeout(300)
@pytest.mark.slow
async def test_opencode_compacts_a_session_without_memory_and_the_chat_after_it_has_memory_again(
    tmp_path: Path,
) -> None:
    """The stand-in model reports more tokens than the stub model's context holds, so the
    real OpenCode compacts the session after the first answer and goes on by itself. The
    compaction request (the history for the model to summarise) carries no memory; the chat
    request after it carries it again, once, right after the first message past the
    compaction; neither title nor compaction request carries it. Real bridge, real OpenCode,
    the stand-in model of tests/openai_standin.py."""
    opencode = node_binary("opencode")
    seeded = "ValueError: hyperdrive coupling misaligned in engine.ts"
    prompt = "realign the hyperdrive coupling in engine.ts"
    with standin_model() as model:
        async with bridge_process("--data-dir", str(tmp_path / "data")) as bridge:
            where = await scratch(
                tmp_path, "ship", model, bridge.url, limit={"context": 100_000, "output": 4_000}
            )
            seed = {"type": "error", "id": 1, "project": "ship", "message": seeded}
            assert (await bridge_ask(bridge.url, seed))["ok"]
            huge = {"prompt_tokens": 200_000, "completion_tokens": 10, "total_tokens": 200_010}
            model.script(prompt, Step(text="Looked at the coupling.", usage=huge))

            _, log = await opencode_run(opencode, where, prompt)

    chats = model.chats()
    before = memory_after(chats[0], says(prompt))
    assert seeded in before, before
    titles, compactions = toolless(model)
    assert titles and compactions, (titles, compactions, log)
    assert all(no_memory(request) for request in titles + compactions)
    # The compaction request holds the history it summarises: the prompt, not the memory.
    assert any(prompt in json.dumps(request) for request in compactions), compactions
    # OpenCode went on after the compaction: that chat request starts with the compaction
    # marker ("What did we do so far?") and its summary, and carries the memory again.
    after = [c for c in chats if "What did we do so far?" in json.dumps(c["messages"])]
    assert after, (chats, log)
    for request in after:
        users = [m for m in request["messages"] if m.get("role") == "user"]
        assert not says(prompt)(users[0]) and prompt not in json.dumps(users[0]), request
        again = memory_after(request, lambda m: m.get("role") == "user" and not is_memory(m))
        assert again == before


@pytest.mark.timeout(300)
@pytest.mark.slow
async def test_opencode_events_outlive_opencode_while_the_bridge_is_down(tmp_path: Path) -> None:
    """The bridge is down while OpenCode runs: the chat goes on without memory at once (the
    plugin logs its fast-fail) and the session's events (two files written, the task done)
    wait in the plugin's queue file. OpenCode stops; the bridge starts; OpenCode runs again:
    the events go out first, each stored once, in order, under session 1; the new session's
    chat recalls them. The queue file put back (as a crash that lost the acks would leave
    it) and OpenCode run a third time: still each once. Real bridge, real OpenCode, the
    stand-in model of tests/openai_standin.py."""
    opencode = node_binary("opencode")
    port = free_port()
    url = f"ws://127.0.0.1:{port}"
    first = "write the docking checklist for bay 7"
    second = "what is on the docking checklist?"
    third = "anything else about bay 7?"
    answer = "Wrote the checklist and its index."
    with standin_model() as model:
        where = await scratch(tmp_path, "station", model, url)
        where.env["GRAPHITI_BRIDGE_DEADLINE_MS"] = "60000"  # a wait would show as one
        checklist = where.project / "docs" / "docking-bay-7.md"
        index = where.project / "docs" / "index.md"
        model.script(
            first,
            Step(
                calls=(
                    ToolCall("write", {"filePath": str(checklist), "content": "- clamps\n"}),
                    ToolCall("write", {"filePath": str(index), "content": "- bay 7\n"}),
                )
            ),
            Step(text=answer),
        )

        session1, log1 = await opencode_run(opencode, where, first)
        assert "fast-fail" in log1, log1
        assert no_memory(chat_for(model, first))
        assert checklist.exists() and index.exists()
        (queue,) = where.queue_files
        queued = [json.loads(line)["event"] for line in queue.read_text().splitlines()]
        # The two writes ran side by side: either may come first.
        assert [e["type"] for e in queued] == ["file:write", "file:write", "completion"], queued
        assert {e["path"] for e in queued[:2]} == {str(checklist), str(index)}, queued
        kept = queue.read_bytes()

        async with bridge_process("--data-dir", str(tmp_path / "data"), "--port", str(port)):
            _, log2 = await opencode_run(opencode, where, second)
            assert "recovered 3 unacknowledged events" in log2, log2
            memory2 = memory_after(chat_for(model, second), says(second))
            assert str(checklist) in memory2, memory2
            episodes = await bridge_export(url, "station")
            assert where.queue_files == [], "nothing is left to send"

            queue.write_bytes(kept)
            _, log3 = await opencode_run(opencode, where, third)
            assert "recovered 3 unacknowledged events" in log3, log3
            again = await bridge_export(url, "station")

    def of_session1(episodes: list[dict[str, Any]]) -> list[tuple[str, str, float]]:
        return [
            (e["metadata"]["type"], e["body"], e["reference_time"])
            for e in episodes
            if e["metadata"].get("session") == session1
        ]

    stored = of_session1(episodes)
    assert [(kind, body) for kind, body, _ in stored[:2]] == [
        ("file_edit", f"Modified: {e['path']}") for e in queued[:2]
    ], episodes
    assert [kind for kind, _, _ in stored[2:]] == ["success"] and first in stored[2][1], episodes
    # Each stored under the time it happened, not when it arrived.
    assert [at for _, _, at in stored] == [e["at"] for e in queued]
    assert of_session1(again) == stored, again


def last_tool_output(request: dict[str, Any]) -> str:
    """The text of the last tool result a model request carries (what the tool returned)."""
    results = [m for m in request.get("messages") or [] if m.get("role") == "tool"]
    assert results, request
    content = results[-1].get("content")
    if isinstance(content, str):
        return content
    return "".join(str(part.get("text", "")) for part in content or [])


@pytest.mark.timeout(300)
@pytest.mark.slow
async def test_opencode_model_searches_saves_and_forgets_with_the_memory_tool(
    tmp_path: Path,
) -> None:
    """The model calls the plugin's ``memory`` tool in the real OpenCode, one call a step:
    a search (its result, the memory context for the query with the matching episodes, is in
    the next request the stand-in model gets), a save of a note, a forget of a file's path,
    and a forget without a selector (its error text reaches the model; no error is stored).
    The next session's chat recalls the note and no longer names the forgotten file. Real
    bridge, real OpenCode, the stand-in model of tests/openai_standin.py."""
    opencode = node_binary("opencode")
    first = "tidy up what memory knows about the coolant pump"
    second = "how do I prime the coolant pump?"
    note = "Prime the coolant pump with the intake valve half open."
    with standin_model() as model:
        async with bridge_process("--data-dir", str(tmp_path / "data")) as bridge:
            where = await scratch(tmp_path, "plant", model, bridge.url)
            old = str(where.project / "src" / "legacy" / "oldpump.py")
            kept = str(where.project / "src" / "pump" / "prime.py")
            seed = {"project": "plant", "session": "seed"}
            for i, message in enumerate(
                [
                    {"type": "chat:start", "query": "prime the coolant pump"},
                    {"type": "file:write", "path": old},
                    {"type": "file:write", "path": kept},
                    {"type": "completion", "task": "prime the coolant pump", "summary": "Done."},
                ]
            ):
                reply = await bridge_ask(bridge.url, {**message, **seed, "id": i})
                assert reply["type"] == "context" or reply["ok"], reply
            model.script(
                first,
                Step(calls=(ToolCall("memory", {"action": "search", "query": "coolant pump"}),)),
                Step(calls=(ToolCall("memory", {"action": "save", "text": note}),)),
                Step(calls=(ToolCall("memory", {"action": "forget", "path": old}),)),
                Step(calls=(ToolCall("memory", {"action": "forget"}),)),
                Step(text="Saved how to prime it and forgot the old pump file."),
            )
            model.script(second, Step(text="With the intake valve half open."))

            session1, log1 = await opencode_run(opencode, where, first)
            steps = [c for c in model.chats() if any(says(first)(m) for m in c["messages"])]
            assert len(steps) == 5, (model.chats(), log1)
            found = last_tool_output(steps[1])
            assert found.startswith(MEMORY), found
            assert old in found and kept in found, found
            assert "Matching episodes, best first" in found, found
            assert last_tool_output(steps[2]).startswith("Saved to memory as episode "), steps[2]
            assert last_tool_output(steps[3]) == (
                f"Forgot 1 episode of path {old}; no later search or chat recalls it."
            )
            refused = last_tool_output(steps[4])
            assert "forget needs exactly one of `episode`" in refused, refused

            await opencode_run(opencode, where, second)
            memory2 = memory_after(chat_for(model, second), says(second))
            assert note in memory2, memory2
            assert kept in memory2, memory2
            assert old not in memory2 and "oldpump" not in memory2, memory2
            episodes = await bridge_export(bridge.url, "plant")

    notes = [e for e in episodes if e["metadata"]["type"] == "note"]
    assert [(e["body"], e["metadata"].get("session")) for e in notes] == [
        (f"Note: {note}", session1)
    ], episodes
    assert not any(old in json.dumps(e) for e in episodes), episodes
    # The tool's own refusal is the model's to read, not an error episode.
    assert not any(e["metadata"]["type"] == "error" for e in episodes), episodes
