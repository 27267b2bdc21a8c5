"""A real headless Chromium (Debian's ``chromium`` package, installed by .ci/run) driven
over the Chrome DevTools Protocol with the ``websockets`` client: one page, JavaScript
evaluated in it, its network requests recorded. Every wait is bounded."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import re
import shutil
import signal
import tempfile
from collections.abc import AsyncIterator
from typing import Any

import msgspec
from websockets.asyncio.client import ClientConnection, connect

from tests.waiting import eventually

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
LISTENING = re.compile(rb"DevTools listening on (ws://\S+)")


class Chromium:
    """One headless browser with one page, attached over DevTools."""

    def __init__(self, process: asyncio.subprocess.Process, ws: ClientConnection) -> None:
        self.process = process
        self.ws = ws
        self.session = ""
        self.requests: list[dict[str, Any]] = []  # Network.requestWillBeSent's request
        self.console: list[str] = []
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[Any]] = {}
        self._loaded = asyncio.Event()
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for raw in self.ws:
            message = msgspec.json.decode(raw)
            if "id" in message:
                waiting = self._waiting.pop(message["id"], None)
                if waiting is not None and not waiting.done():
                    waiting.set_result(message)
            elif message.get("method") == "Network.requestWillBeSent":
                self.requests.append(message["params"]["request"])
            elif message.get("method") == "Page.loadEventFired":
                self._loaded.set()
            elif message.get("method") == "Runtime.consoleAPICalled":
                args = message["params"]["args"]
                self.console.append(" ".join(str(a.get("value", "")) for a in args))

    async def call(self, method: str, params: dict[str, Any] | None = None, **kw: Any) -> Any:
        """Send one DevTools command (to the page, once attached); its result."""
        number = next(self._ids)
        message: dict[str, Any] = {"id": number, "method": method, "params": params or {}}
        if self.session and not kw.get("browser"):
            message["sessionId"] = self.session
        answer = asyncio.get_running_loop().create_future()
        self._waiting[number] = answer
        await self.ws.send(msgspec.json.encode(message).decode())
        reply = await asyncio.wait_for(answer, 30)
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return reply["result"]

    async def open_page(self) -> None:
        """Create the page and attach to it; record its network requests."""
        target = await self.call("Target.createTarget", {"url": "about:blank"})
        attached = await self.call(
            "Target.attachToTarget", {"targetId": target["targetId"], "flatten": True}
        )
        self.session = attached["sessionId"]
        for domain in ("Page", "Runtime", "Network"):
            await self.call(f"{domain}.enable")

    async def goto(self, url: str) -> None:
        """Navigate the page and wait for its load event."""
        self._loaded.clear()
        await self.call("Page.navigate", {"url": url})
        await asyncio.wait_for(self._loaded.wait(), 30)

    async def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (promises awaited)."""
        result = await self.call(
            "Runtime.evaluate",
            {"expression": expression, "awaitPromise": True, "returnByValue": True},
        )
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def wait_for(self, expression: str, timeout: float = 20.0) -> Any:
        """Poll ``expression`` until it is truthy (bounded); its value."""
        try:
            return await eventually(
                lambda: self.evaluate(expression), expression, timeout=timeout, every=0.05
            )
        except AssertionError as e:
            raise AssertionError(f"{e}; console: {self.console}") from None

    async def close(self) -> None:
        """Close the browser and wait for its process (killed if it lingers)."""
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.call("Browser.close", browser=True), 5)
        with contextlib.suppress(Exception):
            await self.ws.close()
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._reader
        try:
            await asyncio.wait_for(self.process.wait(), 10)
        except TimeoutError:
            _kill(self.process)
            await self.process.wait()


@contextlib.asynccontextmanager
async def chromium() -> AsyncIterator[Chromium]:
    """A headless Chromium with one page open; closed afterwards."""
    assert CHROMIUM, "chromium comes from Debian's package (see .ci/run)"
    with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
        process = await asyncio.create_subprocess_exec(
            CHROMIUM,
            "--headless=new",
            "--no-sandbox",  # tests run as root in CI containers
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--no-default-browser-check",
            "--remote-debugging-address=127.0.0.1",
            "--remote-debugging-port=0",
            f"--user-data-dir={profile}",
            "about:blank",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,  # its helper processes in its own group, killed with it
        )
        assert process.stderr is not None
        try:
            url = await asyncio.wait_for(_devtools_url(process.stderr), 60)
            ws = await connect(url, max_size=None, open_timeout=30)
        except BaseException:
            _kill(process)
            await process.wait()
            raise
        drain = asyncio.create_task(_drain(process.stderr))
        browser = Chromium(process, ws)
        try:
            await browser.open_page()
            yield browser
        finally:
            await browser.close()
            drain.cancel()


def _kill(process: asyncio.subprocess.Process) -> None:
    """SIGKILL chromium's process group (the browser and its helpers)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)


async def _devtools_url(stderr: asyncio.StreamReader) -> str:
    for _ in range(10_000):
        line = await stderr.readline()
        if not line:
            raise RuntimeError("chromium exited before it listened")
        if found := LISTENING.search(line):
            return found.group(1).decode()
    raise RuntimeError("chromium never said where it listens")


async def _drain(stderr: asyncio.StreamReader) -> None:
    """Keep reading chromium's stderr, so it never blocks on a full pipe."""
    while await stderr.read(65536):
        pass
