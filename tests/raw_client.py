"""A WebSocket client on a bare socket, for tests that must control every byte: it sends
requests and then reads nothing at all, with a tiny receive buffer, like a stuck client."""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import struct
from typing import Any

import msgspec


def client_frame(payload: bytes, *, text: bool = True) -> bytes:
    """One masked, final client frame carrying ``payload``."""
    head = bytes([0x81 if text else 0x82])
    size = len(payload)
    if size < 126:
        head += bytes([0x80 | size])
    elif size < 1 << 16:
        head += bytes([0x80 | 126]) + struct.pack("!H", size)
    else:
        head += bytes([0x80 | 127]) + struct.pack("!Q", size)
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return head + mask + masked


class StuckClient:
    """A connected WebSocket client that reads nothing after the handshake."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, port: int, path: str = "/", receive_buffer: int = 4096) -> StuckClient:
        """Open the connection with a small kernel receive buffer and do the handshake."""
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
        reader, writer = await asyncio.open_connection(sock=sock, limit=1 << 16)
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write(
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 101"), head
        return cls(reader, writer)

    async def send(self, message: dict[str, Any]) -> None:
        """Send one JSON message in a text frame."""
        self.writer.write(client_frame(msgspec.json.encode(message)))
        await self.writer.drain()

    def close(self) -> None:
        """Drop the connection (no close handshake: the client is stuck)."""
        self.writer.transport.abort()
