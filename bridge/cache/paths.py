"""File paths as the cache sees them: found in text, normalised, and matched by suffix."""

from __future__ import annotations

import functools
import posixpath
import re
from typing import Final

# Path-like tokens: runs of path characters that hold a slash, or end in a short extension
# (``a.py``, ``src/x``). Tokens first, then a cheap test, so long texts scan in one pass.
_TOKEN: Final = re.compile(r"[\w.\-~/\\]+")
_EXTENSION: Final = re.compile(r"[\w\-]\.[A-Za-z]\w{0,9}$")
MAX_COMPONENTS: Final = 16


def normalise_path(path: str) -> str:
    """One spelling per path: forward slashes, no leading ``/`` or ``./``, no doubles."""
    path = path.strip().replace("\\", "/")
    if not path:
        return ""
    normal = posixpath.normpath(path).lstrip("/")
    return "" if normal == "." else normal


def paths_in(text: str) -> set[str]:
    """The normalised file paths a text mentions."""
    found: set[str] = set()
    for word in text.split():
        if "." in word or "/" in word or "\\" in word:  # most words: no path can hide in them
            found.update(_paths_in_word(word))
    return found


@functools.lru_cache(maxsize=1 << 14)
def _paths_in_word(word: str) -> tuple[str, ...]:
    """The paths in one word (contexts name the same paths again and again)."""
    found = []
    for token in _TOKEN.findall(word):
        token = token.rstrip(".")  # the full stop after a path ending a sentence
        if "/" in token or "\\" in token or _EXTENSION.search(token):
            path = normalise_path(token)
            if path:
                found.append(path)
    return tuple(found)


def path_suffixes(path: str) -> list[str]:
    """Every trailing run of components: ``/r/src/a.py`` -> ``a.py, src/a.py, r/src/a.py``.

    A file write of a path invalidates contexts naming any of these, since a query may name
    a file by its base name or by a path relative to some folder.
    """
    parts = [p for p in normalise_path(path).split("/") if p]
    suffixes = ["/".join(parts[i:]) for i in range(len(parts) - 1, -1, -1)]
    return suffixes[:MAX_COMPONENTS]
