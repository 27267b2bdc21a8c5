"""The full-text terms of a text: its meaningful words (see :func:`bridge.recall.words`),
stemmed with SQLite FTS5's Porter stemmer, so every index of every backend sees the same
terms: ``connections`` and ``connected`` are both ``connect``.
"""

from __future__ import annotations

import functools
import sqlite3
import threading
from typing import Final

from bridge.recall import words

# One in-memory FTS5 table turns one word at a time into its stem; results are cached.
_STEMMER: Final = sqlite3.connect(":memory:", check_same_thread=False)
_STEMMER.execute("CREATE VIRTUAL TABLE scratch USING fts5(word, tokenize='porter unicode61')")
_STEMMER.execute("CREATE VIRTUAL TABLE stems USING fts5vocab(scratch, 'row')")
_STEMMER_LOCK: Final = threading.Lock()


@functools.lru_cache(maxsize=1 << 16)
def stem(word: str) -> str:
    """The Porter stem of one lower-case word: ``connections`` and ``connected`` are
    ``connect``; ``updates`` and ``updated`` are ``updat``."""
    with _STEMMER_LOCK:
        _STEMMER.execute("DELETE FROM scratch")
        _STEMMER.execute("INSERT INTO scratch VALUES (?)", (word,))
        row = _STEMMER.execute("SELECT term FROM stems").fetchone()
    return str(row[0]) if row else word


def terms(text: str) -> list[str]:
    """The full-text terms of a text or a path: its meaningful words, stemmed, in order."""
    return [stem(w) for w in words(text)]
