"""Cypher to one FalkorDB graph with its parameters written once, for the task model's
writes and reads (``graph_tasks``, ``graph_recall``).

FalkorDB takes parameters as Cypher literals in a ``CYPHER name=value ...`` header before
the query. graphiti's driver first copies every parameter twice (times to strings, NUL
characters out), and the falkordb client then writes the header value by value; for a
batch of episodes (nested lists and maps of a few hundred values) that cost as much as
the statement itself. Here the header is written in one pass, and NUL characters, which
can only be inside string values, are taken out of the whole command at once. Times are
passed as strings already (as graphiti stores them on FalkorDB).
"""

from __future__ import annotations

from typing import Any

from bridge.errors import MemoryUnavailable
from bridge.memory.graph_tasks import Run


def literal(value: Any) -> str:
    """A parameter value as a Cypher literal: strings quoted (backslash and double quote
    escaped, as the falkordb client does), lists, maps with backticked keys, numbers,
    booleans and null."""
    kind = type(value)
    if kind is str:
        text: str = value
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if kind is bool:
        return "true" if value else "false"
    if kind is int or kind is float:
        return repr(value)
    if value is None:
        return "null"
    if kind is list or kind is tuple:
        return "[" + ",".join(map(literal, value)) + "]"
    if kind is dict:
        return "{" + ",".join(f"`{key}`:{literal(item)}" for key, item in value.items()) + "}"
    raise TypeError(f"a Cypher parameter cannot be a {kind.__name__}")


def command(statement: str, params: dict[str, Any]) -> str:
    """The query FalkorDB runs: the parameters' header, then ``statement``."""
    if not params:
        return statement
    header = " ".join(f"{name}={literal(value)}" for name, value in params.items())
    return f"CYPHER {header} {statement}".replace("\x00", "")


def runner(graph: Any) -> Run:
    """Run Cypher on a falkordb ``AsyncGraph``: its records as dicts, failures (of the
    connection, the server or the statement) as MemoryUnavailable."""

    async def run(statement: str, **params: Any) -> list[dict[str, Any]]:
        try:
            result = await graph.query(command(statement, params))
        except Exception as e:
            raise MemoryUnavailable(f"graphiti: {type(e).__name__}: {e}") from e
        header = [column[1] for column in result.header]
        return [dict(zip(header, row, strict=True)) for row in result.result_set]

    return run
