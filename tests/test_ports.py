"""The port helper of the test fixtures: a port it returns is never returned again, so
the servers one test starts (a cluster's client and bus ports) cannot collide."""

from __future__ import annotations

import socket

from tests.ports import PORTS, free_port


def test_free_port_never_hands_out_a_port_twice() -> None:
    ports = [free_port() for _ in range(300)]
    assert len(set(ports)) == len(ports)
    assert all(port in PORTS for port in ports)


def test_a_handed_out_port_is_bindable() -> None:
    port = free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
        assert s.getsockname()[1] == port
