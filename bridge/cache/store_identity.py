"""Which memory stands behind a bridge's cache: the namespace of its cache keys.

Bridges share cached contexts exactly when they share a Valkey and the memory behind it,
so a context one bridge cached is never another store's answer. The identity is:

- ``sqlite`` (and ``graphiti`` on its private FalkorDB, which lives in the data folder):
  the data folder's absolute path and a random id kept in it (``store-id``, made once),
  so two machines with the same path are still two stores;
- ``graphiti --graph-url``: the graph database, without credentials (falkor or neo4j,
  host, port, Neo4j database); a loopback host is qualified with this machine's name;
- ``script``: the script's absolute path on this machine (it keeps its store where it
  likes, so only bridges of one machine running the same script share contexts).
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import socket
from pathlib import Path
from typing import Final
from urllib.parse import urlsplit

from bridge.config import Config

STORE_ID_FILE: Final = "store-id"
DEFAULT_GRAPH_PORTS: Final = {"falkor": 6379, "neo4j": 7687}


def memory_identity(config: Config) -> str:
    """The identity of the configured memory (raises OSError if the data folder cannot
    keep its store id)."""
    memory = config.memory
    if memory.backend == "script":
        return f"script:{socket.gethostname()}:{memory.script.path.resolve()}"
    if memory.backend == "graphiti" and memory.graph_url:
        return f"graphiti:{graph_identity(memory.graph_url)}"
    folder = config.data_dir.resolve()
    return f"{memory.backend}:{folder}:{store_id(folder)}"


def graph_identity(url: str) -> str:
    """A graph database's URL reduced to what names the database itself."""
    parts = urlsplit(url)
    family = "neo4j" if parts.scheme.split("+")[0] in ("bolt", "neo4j") else "falkor"
    host = (parts.hostname or "localhost").lower()
    if _is_loopback(host):
        host = f"{host}@{socket.gethostname()}"
    port = parts.port or DEFAULT_GRAPH_PORTS[family]
    database = (parts.path.strip("/") or "neo4j") if family == "neo4j" else ""
    return f"{family}://{host}:{port}/{database}"


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def store_id(folder: Path) -> str:
    """The random id kept in ``folder``, made on first use: written whole, and by one
    process only when several start at once (the others read it)."""
    path = folder / STORE_ID_FILE
    try:
        found = path.read_text().strip()
    except FileNotFoundError:
        found = ""
    if found:
        return found
    temporary = folder / f".{STORE_ID_FILE}.{os.getpid()}"
    temporary.write_text(secrets.token_hex(16) + "\n")
    try:
        os.link(temporary, path)  # fails if another process made it first
    except FileExistsError:
        pass
    finally:
        temporary.unlink(missing_ok=True)
    return path.read_text().strip()


def cache_blind_to_other_writers(config: Config) -> bool:
    """True when other bridges may write to this bridge's memory while its cache is a
    private Valkey that never hears of their writes (graphiti on a shared graph)."""
    memory = config.memory
    return (
        config.cache.valkey_url is None and memory.backend == "graphiti" and bool(memory.graph_url)
    )
