"""What the bridge never stores, taken out of every text before it becomes memory.

Three rules, applied in this order by :func:`scrub`:

1. **Private spans.** Text between ``<private>`` and ``</private>`` (any letter case;
   nested spans count) is dropped with its tags. An unclosed ``<private>`` hides everything
   to the end of the text; a stray ``</private>`` is dropped.
2. **The bridge's own context.** A context the bridge injected (it opens with
   :data:`~bridge.memory.recall.CONTEXT_FIRST_LINE` and closes with the line
   :data:`~bridge.memory.recall.CONTEXT_LAST_LINE`) that comes back inside a prompt, a task or a
   summary is cut out, its end line with it, so memory never remembers itself. A context
   without its end line (cut short, or written before there was one) is cut from its first
   line through the lines that follow it in a context's shape (``Files likely involved:``,
   ``Related past tasks…``, ``- …``).
3. **Secrets.** Well-known secret shapes become ``[redacted:<kind>]``
   (:mod:`bridge.memory.redact`).

Plain code, no I/O: the handlers apply :func:`scrub_episode` to every episode built from a
client's event, and ``import`` to every episode it reads.
"""

from __future__ import annotations

import re
from typing import Any, Final

import msgspec

from bridge.episode import Episode
from bridge.memory.recall import CONTEXT_FIRST_LINE, CONTEXT_HEADER, CONTEXT_LAST_LINE
from bridge.memory.redact import redact_secrets

_PRIVATE_TAG: Final = re.compile(r"<(/?)private(?:\s[^<>]*)?>", re.IGNORECASE)

# Where an injected context starts: its first line anywhere, or (as the original plugin
# wrote it) the bare header alone on its line.
_CONTEXT_START: Final = re.compile(
    rf"{re.escape(CONTEXT_FIRST_LINE)}|^[ \t]*{re.escape(CONTEXT_HEADER)}[ \t]*\r?$", re.MULTILINE
)
_CONTEXT_END: Final = re.compile(rf"^{re.escape(CONTEXT_LAST_LINE)}[ \t\r]*(?:\n|\Z)", re.MULTILINE)
# A context without its end line: the rest of its first line, then the lines shaped like
# the ones render() writes.
_CONTEXT_BODY: Final = re.compile(
    r"[^\n]*(?:\n(?:- |Files likely involved: |Related past tasks)[^\n]*)*\n?"
)


def drop_private(text: str) -> str:
    """``text`` without its ``<private>…</private>`` spans (see the module docstring)."""
    if "<" not in text:
        return text
    kept: list[str] = []
    depth = 0
    position = 0
    for tag in _PRIVATE_TAG.finditer(text):
        if depth == 0:
            kept.append(text[position : tag.start()])
        depth = max(0, depth - 1) if tag.group(1) else depth + 1
        position = tag.end()
    if depth == 0:
        kept.append(text[position:])
    return "".join(kept)


def cut_contexts(text: str) -> str:
    """``text`` without the memory contexts the bridge injected into it."""
    if CONTEXT_HEADER not in text:
        return text
    kept: list[str] = []
    position = 0
    start = _CONTEXT_START.search(text)
    end = _CONTEXT_END.search(text, start.end()) if start else None
    while start is not None:
        kept.append(text[position : start.start()])
        following = _CONTEXT_START.search(text, start.end())
        if end is not None and (following is None or end.start() < following.start()):
            position = end.end()
            if following is not None and following.start() < position:
                following = _CONTEXT_START.search(text, position)
            end = _CONTEXT_END.search(text, position) if following else None
        else:  # no end line before the next context: this one lost its end
            body = _CONTEXT_BODY.match(text, start.end())
            position = body.end() if body else start.end()
            if following is not None and following.start() < position:
                following = _CONTEXT_START.search(text, position)
        start = following
    kept.append(text[position:])
    return "".join(kept)


def scrub(text: str) -> str:
    """``text`` as memory may keep it: private spans, injected contexts and secrets out.

    Cutting can join what was apart into a new tag or context start (``<priv`` + a private
    span + ``ate>``), so the cuts repeat until nothing changes; each one shortens the text.
    """
    while (cut := cut_contexts(drop_private(text))) != text:
        text = cut
    return redact_secrets(text)


def _scrub_value(value: Any) -> Any:
    if isinstance(value, str):
        return scrub(value)
    if isinstance(value, list):
        return [_scrub_value(item) for item in value]
    if isinstance(value, dict):
        return {key: _scrub_value(item) for key, item in value.items()}
    return value


def scrub_episode(episode: Episode) -> Episode:
    """The episode with every text it holds scrubbed: name, body, source and metadata."""
    return msgspec.structs.replace(
        episode,
        name=scrub(episode.name),
        body=scrub(episode.body),
        source_description=scrub(episode.source_description),
        metadata=_scrub_value(episode.metadata),
    )
