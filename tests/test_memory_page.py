"""The memory page: its HTTP API on a real bridge, and the page itself in a real headless
Chromium (Debian's package) driven over the DevTools protocol."""

from __future__ import annotations

import asyncio
import http.client
import sys
import zipfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from websockets.asyncio.client import connect

from bridge.memory.script import ScriptMemory
from bridge.runtime.app import App
from bridge.runtime.embedded import EmbeddedValkey
from tests.chromium import chromium
from tests.conftest import StatsdCollector, bridge_config, ws_url
from tests.test_forget import backend_settings, context, stored, two_sessions
from tests.test_memory_script import MEMORY_MANAGER
from tests.wire import exported

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "page-token-7Hq2xW9vLm4kR8tZ"
PAGE = {"X-Memory-Page": "1"}


class Answer(msgspec.Struct):
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return msgspec.json.decode(self.body)


async def over_http(
    app: App,
    method: str,
    target: str,
    headers: dict[str, str] | list[tuple[str, str]] | None = None,
) -> Answer:
    """One plain HTTP request to the bridge's port (http.client, on a thread)."""
    assert app.server is not None
    port = app.server.port
    pairs = list(headers.items()) if isinstance(headers, dict) else headers or []

    def call() -> Answer:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        try:
            connection.putrequest(method, target, skip_host=any(n == "Host" for n, _ in pairs))
            for name, value in pairs:
                connection.putheader(name, value)
            connection.endheaders()
            response = connection.getresponse()
            return Answer(response.status, dict(response.getheaders()), response.read())
        finally:
            connection.close()

    return await asyncio.to_thread(call)


@pytest.fixture(params=["sqlite", "graphiti"])
async def shop(
    request: pytest.FixtureRequest, tmp_path: Path, valkey: EmbeddedValkey, statsd: StatsdCollector
) -> AsyncIterator[App]:
    """A bridge on each backend whose default project is "shop"."""
    async with (
        backend_settings(request.param) as settings,
        App(bridge_config(tmp_path, valkey, statsd.port, project="shop", **settings)) as app,
    ):
        yield app


async def test_the_page_and_its_files_are_served_without_a_token(app: App) -> None:
    page = await over_http(app, "GET", "/memory")
    assert page.status == 200 and page.headers["Content-Type"].startswith("text/html")
    assert b'<script src="/memory/memory.js"' in page.body
    assert "script-src 'self'" in page.headers["Content-Security-Policy"]
    script = await over_http(app, "GET", "/memory/memory.js")
    assert script.status == 200 and b"Authorization" in script.body
    assert (await over_http(app, "GET", "/memory/memory.css")).status == 200
    missing = await over_http(app, "GET", "/memory/secrets")
    assert missing.status == 404 and missing.json() == {"error": "no such page: /memory/secrets"}
    assert (await over_http(app, "POST", "/memory")).status == 405
    assert (await over_http(app, "GET", "/healthz")).status == 200


async def test_the_api_answers_only_the_page_on_loopback(app: App) -> None:
    bare = await over_http(app, "GET", "/memory/api/projects")
    assert bare.status == 403 and "X-Memory-Page: 1" in bare.json()["error"]
    rebound = await over_http(app, "GET", "/memory/api/projects", {**PAGE, "Host": "evil.example"})
    assert rebound.status == 403 and "loopback hosts only" in rebound.json()["error"]
    for host in ("localhost:8765", "[::1]:8765", "127.0.0.1"):
        allowed = await over_http(app, "GET", "/memory/api/projects", {**PAGE, "Host": host})
        assert allowed.status == 200, host
    foreign = await over_http(
        app, "POST", "/memory/api/forget?task=t", {**PAGE, "Origin": "http://evil.example"}
    )
    assert foreign.status == 403 and "another origin" in foreign.json()["error"]
    assert (await over_http(app, "GET", "/memory/api/forget?task=t", PAGE)).status == 405
    assert (await over_http(app, "POST", "/memory/api/tasks", PAGE)).status == 405


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("/memory/api/tasks?limit=0", "`limit` must be an integer from 1 to 200, got '0'"),
        ("/memory/api/tasks?before=soon", "`before` must be an integer"),
        ("/memory/api/tasks?project=" + "p" * 300, "`project` is longer than 256"),
        ("/memory/api/search?q=a&q=b", "`q` given more than once"),
        ("/memory/api/forget", "exactly one of `episode`, `path`, `session` or `task`; got none"),
        ("/memory/api/forget?task=a&session=b", "got `session` and `task`"),
        ("/memory/api/forget?task=a&everything=1", "unknown parameter `everything`"),
        ("/memory/api/forget?path=", "`$.path`"),
    ],
)
async def test_bad_api_calls_say_what_was_wrong(app: App, target: str, expected: str) -> None:
    method = "POST" if "/forget" in target else "GET"
    answer = await over_http(app, method, target, PAGE)
    assert answer.status == 400
    assert expected in answer.json()["error"], answer.json()


async def test_tasks_come_newest_first_a_page_at_a_time_on_each_backend(shop: App) -> None:
    async with connect(ws_url(shop, "/shop")) as ws:
        for n in range(5):
            await stored(ws, {"type": "note", "text": f"note number {n}"})
    seen: list[str] = []
    before = ""
    for _ in range(5):
        page = (await over_http(shop, "GET", f"/memory/api/tasks?limit=2{before}", PAGE)).json()
        seen += [task["summary"] for task in page["tasks"]]
        assert all(task["outcome"] == "note" for task in page["tasks"])
        if page["next"] is None:
            break
        before = f"&before={page['next']}"
    assert seen == [f"note number {n}" for n in range(4, -1, -1)]


async def test_search_ranks_as_a_chat_does_and_forget_takes_a_task_away(shop: App) -> None:
    async with connect(ws_url(shop, "/shop")) as ws:
        await two_sessions(ws)
        question = "why did the tokenizer crash with IndexError?"
        _, inject = await context(ws, question)
        assert (await context(ws, question))[0]
        found = (
            await over_http(shop, "GET", "/memory/api/search?q=tokenizer+IndexError", PAGE)
        ).json()
        listed = (await over_http(shop, "GET", "/memory/api/tasks", PAGE)).json()["tasks"]
        assert [t["query"] for t in listed] == [
            "round invoice totals in billing",
            "fix the tokenizer crash in the parser",
        ]
        best = found["tasks"][0]
        assert best["query"] == "fix the tokenizer crash in the parser"
        assert f"[1] {found['files'][0]}" in inject, "the files ranked differently"
        assert best["errors"] == ["IndexError in tokenizer lookahead"]
        assert best["files"] == ["src/parser.py", "src/lexer.py"]
        forgot = await over_http(shop, "POST", f"/memory/api/forget?task={best['uuid']}", PAGE)
        assert forgot.json() == {"project": "shop", "forgotten": 4}
        hit, after = await context(ws, question)
        assert not hit and "tokenizer" not in after and "IndexError" not in after
        assert len(await exported(ws)) == 2
        remaining = (await over_http(shop, "GET", "/memory/api/tasks", PAGE)).json()["tasks"]
        assert [t["query"] for t in remaining] == ["round invoice totals in billing"]


@pytest.fixture
async def guarded(
    tmp_path: Path, valkey: EmbeddedValkey, statsd: StatsdCollector
) -> AsyncIterator[App]:
    """A bridge with a token."""
    async with App(bridge_config(tmp_path, valkey, statsd.port, server={"token": TOKEN})) as app:
        yield app


async def test_with_a_token_the_api_needs_it(guarded: App) -> None:
    assert (await over_http(guarded, "GET", "/memory")).status == 200
    for headers in ({}, PAGE, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
        refused = await over_http(guarded, "GET", "/memory/api/projects", headers)
        assert refused.status == 401, headers
        assert refused.headers["WWW-Authenticate"].startswith("Bearer")
    right = ("Authorization", f"Bearer {TOKEN}")
    twice = await over_http(guarded, "GET", "/memory/api/projects", [right, right])
    assert twice.status == 400 and "more than one Authorization" in twice.json()["error"]
    answer = await over_http(guarded, "GET", "/memory/api/projects", [right])
    assert answer.json() == {"projects": [], "default": "default"}


async def test_the_script_backend_says_it_cannot_list_tasks(
    tmp_path: Path, valkey: EmbeddedValkey, statsd: StatsdCollector
) -> None:
    script = tmp_path / "script" / "memory_manager.py"
    script.parent.mkdir()
    script.write_text(MEMORY_MANAGER)
    app = App(bridge_config(tmp_path, valkey, statsd.port), memory=ScriptMemory(script))
    await app.start()
    try:
        answer = await over_http(app, "GET", "/memory/api/tasks", PAGE)
        assert answer.status == 400
        assert "script memory backend cannot list tasks" in answer.json()["error"]
    finally:
        await app.stop()


# -- in a real browser -----------------------------------------------------------------------

TASK_TEXTS = "[...document.querySelectorAll('li.task')].map(li => li.innerText)"


async def test_the_page_in_chromium_lists_searches_and_forgets(
    tmp_path: Path, valkey: EmbeddedValkey, statsd: StatsdCollector
) -> None:
    app = App(bridge_config(tmp_path, valkey, statsd.port, project="shop"))
    await app.start()
    try:
        async with connect(ws_url(app, "/blog")) as ws:
            await stored(ws, {"type": "file:write", "path": "posts/hello.md"})
        async with connect(ws_url(app, "/shop")) as ws, chromium() as browser:
            await two_sessions(ws)
            question = "why did the tokenizer crash with IndexError?"
            assert "IndexError" in (await context(ws, question))[1]
            assert (await context(ws, question))[0]
            assert app.server is not None
            await browser.goto(f"http://127.0.0.1:{app.server.port}/memory")
            await browser.wait_for("document.querySelectorAll('li.task').length === 2")
            first, second = await browser.evaluate(TASK_TEXTS)
            assert "round invoice totals in billing" in first and "src/billing.py" in first
            for shown in (
                "fix the tokenizer crash",
                "completed",
                "lookahead bounded",
                "src/parser.py",
                "src/lexer.py",
                "IndexError in tokenizer lookahead",
            ):
                assert shown in second, shown  # fmt: skip
            projects = "[...document.querySelectorAll('#project option')].map(o => o.value)"
            assert await browser.evaluate(projects) == ["shop", "blog"]
            assert not await browser.evaluate("document.getElementById('project-choice').hidden")

            await browser.evaluate(
                "document.getElementById('search').value = 'tokenizer crash';"
                "document.getElementById('search-form').requestSubmit()"
            )
            await browser.wait_for("!document.getElementById('show-all').hidden")
            found = await browser.evaluate(TASK_TEXTS)
            assert "fix the tokenizer crash" in found[0]
            assert "src/parser.py" in await browser.evaluate(
                "document.getElementById('files').textContent"
            )

            forget = "document.querySelector('li.task button.forget').click()"
            await browser.evaluate(forget)  # the first click asks to be sure
            assert (
                await browser.evaluate(
                    "document.querySelector('li.task button.forget').textContent"
                )
                == "Forget this task?"
            )
            await browser.evaluate(forget)
            await browser.wait_for(
                "document.getElementById('status').textContent.startsWith('Forgot 4 episodes')"
            )
            assert not any("tokenizer" in t for t in await browser.evaluate(TASK_TEXTS))
            hit, after = await context(ws, question)
            assert not hit and "tokenizer" not in after and "IndexError" not in after

            await browser.goto(f"http://127.0.0.1:{app.server.port}/memory")
            await browser.wait_for("document.querySelectorAll('li.task').length === 1")
            assert "billing" in (await browser.evaluate(TASK_TEXTS))[0]
            await browser.evaluate(
                "const s = document.getElementById('project'); s.value = 'blog';"
                "s.dispatchEvent(new Event('change'))"
            )
            await browser.wait_for(
                "document.querySelector('li.task')?.innerText.includes('posts/hello.md')"
            )
    finally:
        await app.stop()


async def test_the_page_in_chromium_asks_for_the_token_and_keeps_it_out_of_urls(
    guarded: App,
) -> None:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with connect(ws_url(guarded, "/default"), additional_headers=headers) as ws:
        await stored(ws, {"type": "error", "message": "KeyError in settings loader"})
    assert guarded.server is not None
    async with chromium() as browser:
        await browser.goto(f"http://127.0.0.1:{guarded.server.port}/memory")
        await browser.wait_for("!document.getElementById('token-form').hidden")
        assert await browser.evaluate("document.getElementById('memory').hidden")
        submit = (
            "document.getElementById('token').value = {!r};"
            "document.getElementById('token-form').requestSubmit()"
        )
        await browser.evaluate(submit.format("not-the-token"))
        await browser.wait_for(
            "document.getElementById('token-problem').textContent === 'missing or wrong token'"
        )
        await browser.evaluate(submit.format(TOKEN))
        await browser.wait_for("document.querySelectorAll('li.task').length === 1")
        assert "KeyError in settings loader" in (await browser.evaluate(TASK_TEXTS))[0]
        for _ in range(2):
            await browser.evaluate("document.querySelector('li.task button.forget').click()")
        await browser.wait_for(
            "document.getElementById('status').textContent.startsWith('Forgot 1 episode')"
        )
    api = [r for r in browser.requests if "/memory/api/" in r["url"]]
    assert len(api) >= 4
    assert all(TOKEN not in r["url"] for r in browser.requests), "the token went into a URL"
    sent = [r["headers"].get("Authorization") for r in api]
    assert f"Bearer {TOKEN}" in sent and sent[-1] == f"Bearer {TOKEN}"
    forgets = [r for r in api if "/forget" in r["url"]]
    assert [r["method"] for r in forgets] == ["POST"]
    async with connect(ws_url(guarded, "/default"), additional_headers=headers) as ws:
        assert await exported(ws) == []


async def test_the_wheel_carries_the_page(tmp_path: Path) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path), str(ROOT),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(process.communicate(), 300)
    assert process.returncode == 0, out.decode(errors="replace")[-2000:]
    (wheel,) = tmp_path.glob("graphiti_bridge-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for asset in ("memory.html", "memory.js", "memory.css", "page.py"):
        assert f"bridge/wire/web/{asset}" in names, asset


async def test_a_websocket_to_a_project_named_memory_is_still_a_websocket(app: App) -> None:
    async with connect(ws_url(app, "/memory")) as ws:
        await stored(ws, {"type": "error", "message": "kept in the project named memory"})
    listed = await over_http(app, "GET", "/memory/api/tasks?project=memory", PAGE)
    assert [t["errors"] for t in listed.json()["tasks"]] == [["kept in the project named memory"]]
