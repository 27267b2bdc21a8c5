"""The full-text terms of a text: its meaningful words (see :func:`bridge.memory.recall.words`),
stemmed with the Porter stemmer (PyStemmer's, the algorithm SQLite FTS5's ``porter``
tokenizer implements), so every index of every backend sees the same terms:
``connections`` and ``connected`` are both ``connect``.
"""

from __future__ import annotations

import functools
import itertools
import threading
from collections import Counter
from collections.abc import Iterator, Sequence

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


SHORTEST_PART = 4  # a query term this long or longer may be part of a longer path word
SHORTEST_REST = 3  # ... that has at least this many more letters


class Compounds:
    """The words of a project's file paths, found by their parts.

    File names join words without a separator far more often than people do when they ask:
    ``uvicorn/supervisors/watchgodreload.py`` has one path word, ``watchgodreload``, that a
    question about ``watchgod`` (or about ``reload``) never names. This keeps each path word
    (stemmed, as the indexes hold it) under each of its prefixes and suffixes (at least
    ``SHORTEST_PART`` letters, leaving at least ``SHORTEST_REST``), so a query term finds the
    longer path words it begins or ends; and two query words written apart (``Web Socket``)
    find the path word they make together (``websocket``). A word is counted by the files
    that hold it, and leaves with the last of them.
    """

    def __init__(self) -> None:
        self._files: Counter[str] = Counter()  # stemmed path word -> files holding it
        self._by_part: dict[str, set[str]] = {}  # prefix or suffix -> stemmed path words
        self._written: Counter[str] = Counter()  # path word as written -> files holding it

    def add(self, path: str) -> None:
        """A file came into the index."""
        said = set(words(path))
        self._written.update(said)
        for word in {stem(w) for w in said}:
            self._files[word] += 1
            if self._files[word] == 1:
                for part in _parts(word):
                    self._by_part.setdefault(part, set()).add(word)

    def remove(self, path: str) -> None:
        """A file left the index."""
        said = set(words(path))
        self._written.subtract(said)
        for gone in [w for w in said if self._written[w] <= 0]:
            del self._written[gone]
        for word in {stem(w) for w in said}:
            self._files[word] -= 1
            if self._files[word] > 0:
                continue
            del self._files[word]
            for part in _parts(word):
                holders = self._by_part[part]
                holders.discard(word)
                if not holders:
                    del self._by_part[part]

    def expand(self, query_terms: Sequence[str], query_words: Sequence[str]) -> list[str]:
        """The path words the query names only in part: those a query term begins or ends,
        and those two adjacent query words (``query_words``, in order, as :func:`words`
        gives them) make together; none of ``query_terms`` itself, each once, in a fixed
        order."""
        asked = set(query_terms)
        found: dict[str, None] = {}
        for term in query_terms:
            for word in sorted(self._by_part.get(term, ())):
                found.setdefault(word, None)
        for first, second in itertools.pairwise(query_words):
            if (joined := first + second) in self._written:
                found.setdefault(stem(joined), None)
        return [word for word in found if word not in asked]


def _parts(word: str) -> Iterator[str]:
    for length in range(SHORTEST_PART, len(word) - SHORTEST_REST + 1):
        yield word[:length]
        yield word[-length:]
