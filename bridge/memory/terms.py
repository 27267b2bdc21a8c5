"""The full-text terms of a text: its meaningful words (see :func:`bridge.memory.recall.words`),
stemmed with the Porter stemmer (PyStemmer's, the algorithm SQLite FTS5's ``porter``
tokenizer implements), so every index of every backend sees the same terms:
``connections`` and ``connected`` are both ``connect``.
"""

from __future__ import annotations

import functools
import itertools
import math
import threading
from collections import Counter
from collections.abc import Container, Iterable, Iterator, Sequence

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


@functools.lru_cache(maxsize=1 << 16)
def path_terms(path: str) -> tuple[str, ...]:
    """The terms of a path (paths come back in document after document: cached)."""
    return tuple(terms(path))


SHORTEST_PART = 4  # a query term this long or longer may be part of a longer path word
SHORTEST_REST = 3  # ... that has at least this many more letters


class PathWords:
    """The words of the indexed files' paths: which files hold each, and how to find them
    from a query, whole or by their parts. Kept up to date file by file, as the file index
    is.

    - :meth:`expand`: file names join words without a separator far more often than people
      do when they ask: ``uvicorn/supervisors/watchgodreload.py`` has one path word,
      ``watchgodreload``, that a question about ``watchgod`` (or ``reload``) never names.
      Each path word (stemmed, as the indexes hold it) is kept under each of its prefixes
      and suffixes (at least ``SHORTEST_PART`` letters, leaving at least ``SHORTEST_REST``),
      so a query term finds the longer path words it begins or ends; and two query words
      written apart (``Web Socket``) find the path word they make together (``websocket``).
    - :meth:`match`: a file's path is the one text that describes the file itself (in its
      document it is a few words among the queries of its tasks). A path word weighs as
      rare as it is among the files (idf: ``log(1 + files / files holding it)``); a query
      names the share of a path's weight its terms hold, so a short, specific path named in
      full comes first. Words that more than half of the files hold (``py``, ``src``) name
      none of them.
    """

    def __init__(self) -> None:
        self._holders: dict[str, set[str]] = {}  # stemmed path word -> the files holding it
        self._by_part: dict[str, set[str]] = {}  # prefix or suffix -> stemmed path words
        self._written: Counter[str] = Counter()  # path word as written -> files holding it
        self._weights: dict[str, float] = {}  # path -> its words' idf, until a change
        self._files = 0

    def add(self, path: str) -> None:
        """A file came into the index."""
        self._files += 1
        self._weights.clear()
        self._written.update(set(words(path)))
        for word in _distinct(path):
            holders = self._holders.setdefault(word, set())
            holders.add(path)
            if len(holders) == 1:
                for part in _parts(word):
                    self._by_part.setdefault(part, set()).add(word)

    def remove(self, path: str) -> None:
        """A file left the index."""
        self._files -= 1
        self._weights.clear()
        said = set(words(path))
        self._written.subtract(said)
        for gone in [w for w in said if self._written[w] <= 0]:
            del self._written[gone]
        for word in _distinct(path):
            holders = self._holders[word]
            holders.discard(path)
            if holders:
                continue
            del self._holders[word]
            for part in _parts(word):
                words_of_part = self._by_part[part]
                words_of_part.discard(word)
                if not words_of_part:
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

    def match(self, query_terms: Iterable[str], among: Container[str]) -> dict[str, float]:
        """The files of ``among`` whose path words the query names, with the share of
        their path's weight those words hold (0 to 1), in a fixed order."""
        files = self._files
        named: dict[str, float] = {}
        for term in dict.fromkeys(query_terms):
            held = self._holders.get(term)
            if held is None or 2 * len(held) > files:
                continue
            idf = math.log(1 + files / len(held))
            for path in held:
                if path in among:
                    named[path] = named.get(path, 0.0) + idf
        return {path: named[path] / self._weight(path, files) for path in sorted(named)}

    def _weight(self, path: str, files: int) -> float:
        weight = self._weights.get(path)
        if weight is None:
            holders = self._holders
            weight = sum(math.log(1 + files / len(holders[t])) for t in _distinct(path))
            self._weights[path] = weight
        return weight


def _distinct(path: str) -> Iterable[str]:
    """A path's terms, each once, in order (so sums over them do not depend on hashing)."""
    return dict.fromkeys(path_terms(path))


def _parts(word: str) -> Iterator[str]:
    for length in range(SHORTEST_PART, len(word) - SHORTEST_REST + 1):
        yield word[:length]
        yield word[-length:]
