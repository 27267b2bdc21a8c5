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


class Kind(NamedTuple):
    """What every episode event of one type stores alike."""

    type: str  # the metadata's type, and the stored-episode metric's tag
    prefix: str  # the body is the prefix, then the event's text
    source: str
    task: bool = True  # linked to the session's task; else a task of its own
    alert: bool = False  # the stored text also goes out as an OpenCode Error event


KINDS: Final[dict[type[EpisodeEvent], Kind]] = {
    FileWrite: Kind("file_edit", "Modified: ", "OpenCode file write"),
    ErrorEvent: Kind("error", "Error: ", "OpenCode error", alert=True),
    Completion: Kind("success", "Completed: ", "OpenCode task completion"),
    # a note neither ends nor is ended by the session's turn
    Note: Kind("note", "Note: ", "OpenCode note", task=False),
}


class Described(NamedTuple):
    """One episode event, as the common path needs it: its type's ``kind``, and its own."""

    kind: Kind
    name: str
    text: str
    fields: dict[str, Any]  # metadata after its type, before the links
    stale: list[str] | None  # paths whose cached contexts go once stored; None: all of them
    tokens: int = 0  # tokens the event reports used


def mentioned(text: str) -> list[str]:
    """The paths a text names whose cached contexts a new episode with it makes stale."""
    return sorted(paths_in(text))[:MAX_MENTIONS]


def describe(message: EpisodeEvent, max_text: int) -> Described:
    """The episode ``message`` stores (``max_text`` clips a completion's summary)."""
    match message:  # (a decoder with other limits gives subclasses: matched, not looked up)
        case FileWrite(path=path):
            return Described(KINDS[FileWrite], f"file:write {path}", path, {"path": path}, [path])
        case ErrorEvent(message=text):
            return Described(
                KINDS[ErrorEvent], "error", text, {"severity": "high"}, mentioned(text)
            )
        case Completion(task=text, summary=summary, tokens=tokens):
            fields = {
                "duration": message.duration_ms,
                "tokens": tokens,
                **({"summary": summary[:max_text]} if summary else {}),
            }
            return Described(KINDS[Completion], "completion", text, fields, mentioned(text), tokens)
        case Note(text=text):
            # saved on purpose, so the next chat recalls it: every cached context goes
            return Described(KINDS[Note], "note", text, {}, stale=None)
    assert_never(message)
