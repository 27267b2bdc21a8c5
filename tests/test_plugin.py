"""The OpenCode plugin (plugin/graphiti-memory.ts): its own tests, its types, and the real
OpenCode running it against a real bridge.

Node packages come from plugin/package-lock.json: run ``npm install --no-save`` in plugin/
first (that is where the pinned bun, opencode, tsc and prettier binaries come from; see
plugin/README.md for why not ``npm ci``). Without them these tests fail rather than skip, so
a missing install never passes for a green run.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import msgspec
import pytest
from websockets.asyncio.client import connect

from tests.test_cli import bridge_process

PLUGIN_DIR = Path(__file__).resolve().parent.parent / "plugin"
BIN = PLUGIN_DIR / "node_modules" / ".bin"

# plugin/test/plugin.test.ts: keep in step with the number of tests there.
EXPECTED_BUN_TESTS = 22


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


class StandInModel:
    """A stand-in for the remote model API, which this machine cannot reach: an
    OpenAI-compatible server on loopback that records every request body it receives.

    It answers ``GET /v1/models`` and streaming ``POST /v1/chat/completions`` (server-sent
    events). To a chat turn that offers tools and ends with the user's message it answers
    with one call of OpenCode's ``write`` tool (creating ``write_path``), so OpenCode edits a
    file; to anything else, a short text.
    """

    def __init__(self, write_path: Path) -> None:
        self.write_path = write_path
        self.bodies: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        model = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                if self.path.rstrip("/").endswith("/models"):
                    self._json({"object": "list", "data": [{"id": "stub", "object": "model"}]})
                else:
                    self._json({"error": {"message": "not found"}}, 404)

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
                with model.lock:
                    model.bodies.append(body)
                delta, finish, usage = model.answer(body)
                if not body.get("stream"):
                    message = {"role": "assistant", **delta}
                    self._json(
                        {
                            "id": "stub-1",
                            "object": "chat.completion",
                            "model": "stub",
                            "choices": [{"index": 0, "message": message, "finish_reason": finish}],
                            "usage": usage,
                        }
                    )
                    return
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Cache-Control", "no-cache")
                self.send_header("Connection", "close")
                self.end_headers()
                chunk = {"id": "stub-1", "object": "chat.completion.chunk", "model": "stub"}
                for choice, extra in (
                    ({"index": 0, "delta": {"role": "assistant", **delta}}, {}),
                    ({"index": 0, "delta": {}, "finish_reason": finish}, {"usage": usage}),
                ):
                    event = {**chunk, "created": int(time.time()), "choices": [choice], **extra}
                    self.wfile.write(b"data: " + json.dumps(event).encode() + b"\n\n")
                self.wfile.write(b"data: [DONE]\n\n")
                self.wfile.flush()
                self.close_connection = True

            def _json(self, payload: dict[str, Any], status: int = 200) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = int(self.server.server_address[1])
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def answer(self, body: dict[str, Any]) -> tuple[dict[str, Any], str, dict[str, int]]:
        """The reply's delta, finish reason and usage for one request."""
        messages = body.get("messages") or []
        tools = [tool["function"]["name"] for tool in body.get("tools") or []]
        if "write" in tools and messages and messages[-1].get("role") == "user":
            arguments = json.dumps({"filePath": str(self.write_path), "content": "remember me\n"})
            call = {"index": 0, "id": "call_1", "type": "function"}
            call["function"] = {"name": "write", "arguments": arguments}
            usage = {"prompt_tokens": 40, "completion_tokens": 9, "total_tokens": 49}
            return {"tool_calls": [call]}, "tool_calls", usage
        usage = {"prompt_tokens": 30, "completion_tokens": 4, "total_tokens": 34}
        return {"content": "Noted."}, "stop", usage

    def recorded(self) -> list[dict[str, Any]]:
        with self.lock:
            return list(self.bodies)

    def __enter__(self) -> StandInModel:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)


def user_texts(body: dict[str, Any]) -> list[str]:
    """The text parts of the user messages in a chat-completions request body."""
    texts: list[str] = []
    for message in body.get("messages") or []:
        if message.get("role") != "user":
            continue
        content = message.get("content")
        if isinstance(content, str):
            texts.append(content)
        else:
            texts.extend(p["text"] for p in content or [] if p.get("type") == "text")
    return texts


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


@pytest.mark.timeout(300)
async def test_opencode_injects_the_bridges_memory_into_the_model_request(tmp_path: Path) -> None:
    """The real OpenCode CLI (opencode-ai from plugin/node_modules), headless, with the plugin
    configured the way the README shows, a real bridge, and the stand-in model server above
    in place of the remote model API.
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
    written = project / "notes" / "capacitor.txt"
    seeded = "TypeError: flux capacitor overheated in warpdrive.ts"
    prompt = "why does the flux capacitor in warpdrive.ts overheat?"

    with StandInModel(written) as model:
        config = {
            "$schema": "https://opencode.ai/config.json",
            "model": "local/stub",
            "autoupdate": False,
            "share": "disabled",
            "plugin": [(PLUGIN_DIR / "graphiti-memory.ts").as_uri()],
            "provider": {
                "local": {
                    "npm": "@ai-sdk/openai-compatible",
                    "options": {"baseURL": f"http://127.0.0.1:{model.port}/v1", "apiKey": "x"},
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
            process = await asyncio.create_subprocess_exec(
                str(opencode), "run", "--print-logs", prompt,
                cwd=project, env=env, stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
            )  # fmt: skip
            try:
                out, err = await asyncio.wait_for(process.communicate(), 180)
            except TimeoutError:
                os.killpg(process.pid, signal.SIGKILL)
                await process.wait()
                pytest.fail("opencode run did not finish in 180 s")
            log = (
                f"stdout:\n{out.decode(errors='replace')}\nstderr:\n{err.decode(errors='replace')}"
            )
            assert process.returncode == 0, log
            assert "Memory plugin error" not in log, log

            # The chat request carried the context the bridge produced for this prompt.
            bodies = model.recorded()
            chats = [body for body in bodies if body.get("tools")]
            assert chats, f"no chat request reached the stand-in model; got {bodies}\n{log}"
            texts = user_texts(chats[0])
            memory = [text for text in texts if text.startswith("[Memory Context]")]
            assert len(memory) == 1, texts
            assert seeded in memory[0]
            asked = next(text for text in texts if not text.startswith("[Memory Context]"))
            assert "flux capacitor" in asked, texts
            assert texts.index(memory[0]) < texts.index(asked), "context comes before the prompt"

            # The write the model asked for became a file:write, and the task a completion.
            assert written.read_text() == "remember me\n", log
            episodes = await bridge_export(bridge.url, "shop")
            bodies_of = [episode["body"] for episode in episodes]
            # Every line injected is one of the bridge's episodes (the context it produced;
            # asking again now would include this session's own new episodes too).
            for line in memory[0].splitlines()[1:]:
                assert any(line.startswith(f"- {body} (") for body in bodies_of), line
            assert f"Modified: {written}" in bodies_of, bodies_of
            completions = [e for e in episodes if e["metadata"]["type"] == "success"]
            assert len(completions) == 1, bodies_of
            assert "flux capacitor" in completions[0]["body"]
            # Its tokens: the stand-in's usage summed over the task's two steps (49 + 34).
            assert completions[0]["metadata"]["tokens"] == 83
            assert completions[0]["metadata"]["duration"] > 0
