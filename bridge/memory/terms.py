"""The full-text terms of a text: its meaningful words (see :func:`bridge.memory.recall.words`),
stemmed with the Porter stemmer (PyStemmer's, the algorithm SQLite FTS5's ``porter``
tokenizer implements), so every index of every backend sees the same terms:
``connections`` and ``connected`` are both ``connect``.
"""

from __future__ import annotations

import functools
import threading

import Stemmer

from bridge.memory.recall import words

_LOCAL = threading.local()  # a stemmer is not safe to share between threads


@functools.lru_cache(maxsize=1 << 16)
def stem(word: str) -> str:
    """The Porter stem of one lower-case word: ``connections`` and ``connected`` are
    ``connect``; ``updates`` and ``updated`` are ``updat``."""
    stemmer = getattr(_LOCAL, "stemmer", None)
    if stemmer is None:
        stemmer = _LOCAL.stemmer = Stemmer.Stemmer("porter")
    return str(stemmer.stemWord(word))


def terms(text: str) -> list[str]:
    """The full-text terms of a text or a path: its meaningful words, stemmed, in order."""
    return [stem(w) for w in words(text)]
