"""What each episode event stores, and which cached contexts it makes stale.

Every event that becomes an episode (file:write, error, completion, note) takes one path
in the handlers: build the episode, store it, count it, drop the contexts it makes stale,
acknowledge. What differs from one event to another is the data ``describe`` returns.
"""

from __future__ import annotations

from typing import Any, Final, NamedTuple, assert_never

from bridge.cache.paths import paths_in
from bridge.wire.protocol import Completion, ErrorEvent, FileWrite, Note

EpisodeEvent = FileWrite | ErrorEvent | Completion | Note
MAX_MENTIONS: Final = 16  # paths in one error or task whose cached contexts are dropped


class Described(NamedTuple):
    """One episode event, as the common path needs it."""

    kind: str  # the metadata's type, and the stored-episode metric's tag
    name: str
    prefix: str  # the body is the prefix, then the event's text
    text: str
    source: str
    fields: dict[str, Any]  # metadata after its type, before the links
    stale: list[str] | None  # paths whose cached contexts go once stored; None: all of them
    task: bool = True  # linked to the session's task; else a task of its own
    tokens: int = 0  # tokens the event reports used
    alert: bool = False  # the stored text also goes out as an OpenCode Error event


def mentioned(text: str) -> list[str]:
    """The paths a text names whose cached contexts a new episode with it makes stale."""
    return sorted(paths_in(text))[:MAX_MENTIONS]


def describe(message: EpisodeEvent, max_text: int) -> Described:
    """The episode ``message`` stores (``max_text`` clips a completion's summary)."""
    match message:
        case FileWrite(path=path):
            return Described(
                kind="file_edit",
                name=f"file:write {path}",
                prefix="Modified: ",
                text=path,
                source="OpenCode file write",
                fields={"path": path},
                stale=[path],
            )
        case ErrorEvent(message=text):
            return Described(
                kind="error",
                name="error",
                prefix="Error: ",
                text=text,
                source="OpenCode error",
                fields={"severity": "high"},
                stale=mentioned(text),
                alert=True,
            )
        case Completion(task=text, summary=summary):
            return Described(
                kind="success",
                name="completion",
                prefix="Completed: ",
                text=text,
                source="OpenCode task completion",
                fields={
                    "duration": message.duration_ms,
                    "tokens": message.tokens,
                    **({"summary": summary[:max_text]} if summary else {}),
                },
                stale=mentioned(text),
                tokens=message.tokens,
            )
        case Note(text=text):
            return Described(
                kind="note",
                name="note",
                prefix="Note: ",
                text=text,
                source="OpenCode note",
                fields={},
                stale=None,  # saved on purpose, so the next chat recalls it: every context goes
                task=False,  # a note neither ends nor is ended by the session's turn
            )
    assert_never(message)
