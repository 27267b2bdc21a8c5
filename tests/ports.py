"""Free loopback ports for the servers the tests start."""

from __future__ import annotations

import os
import random
import socket
from typing import Final

# Ports for the servers of these tests are drawn below the kernel's ephemeral range
# (32768-60999 on Linux): a port the kernel hands out for bind(0) may be taken, before the
# server binds it, as the source port of any outgoing connection, and cluster nodes open
# many of those to each other. A port is checked free and then released, so two draws
# must never return the same port before its server binds it: each pytest-xdist worker
# draws from a slice of the range of its own, and no port is handed out twice by one
# process (a restarted node keeps the port it was given).
PORTS: Final = range(20_000, 32_000)
_ports = random.Random()
_handed_out: set[int] = set()


def _worker_ports() -> range:
    """The slice of ``PORTS`` this pytest-xdist worker draws from (all of it without xdist)."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if not worker.startswith("gw") or count < 2:
        return PORTS
    index = int(worker[2:])
    width = len(PORTS) // count
    start = PORTS.start + index * width
    return range(start, start + width)


def free_port() -> int:
    """A TCP port on loopback, outside the ephemeral range, that nothing holds right now
    and that no other call has returned."""
    ports = _worker_ports()
    for _ in range(200):
        port = _ports.choice(ports)
        if port in _handed_out:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise OSError("no free port found below the ephemeral range")
