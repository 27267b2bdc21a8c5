"""What a chat should remember: past tasks and files ranked for a query, rendered as text.

This module is plain code over plain data, shared by every memory backend. A backend finds
the *candidates*; this module *fuses* them and *renders* the context:

- **candidates** (:class:`Candidates`): past tasks whose text matches the query, each with a
  relevance score (BM25) and its files, errors and outcome; files whose own text (the words
  of their path and of the tasks that touched them) matches the query; and the recent work
  of the project (the files of its last tasks), from which recency, frequency and which
  files change together are read; the recent files the query names by path or name; and
  for recent files whose path words the query names, the share of the path it names.
- **fusion** (:func:`rank`): each file gets evidence from six signals, each normalised to
  at most 1 so none needs a scale of its own: files of similar tasks (weighted by the task's
  relevance and how long ago it was, the files of a big task each a little less), the
  file's own text match, how much of its path the query names, a recency-weighted
  frequency prior, files that changed together with the best files so far, and the files
  of the project's last task (weighted by how often its work goes on where it was). Ages
  are counted in tasks, not seconds, so a project's pace does not matter. Files the query
  names come before all. A query asked before in the same words weighs its earlier
  askings, and the text evidence as a whole, by how much those askings agree on files
  beyond chance (:func:`asked_before`): "continue" is asked about anything, "update the
  changelog" is not.
- **rendering** (:func:`render`): a header that says this is memory of earlier sessions,
  a "files likely involved" line (each path once, numbered), then the most relevant past
  tasks with their outcome, their files (by number) and any error, until the character
  budget is spent; then an end line, so the context can be told apart from text after it.
"""

from __future__ import annotations

import datetime as dt
import functools
import itertools
import math
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from typing import Final

import msgspec
import numpy as np
from numpy.typing import NDArray

CONTEXT_HEADER: Final = "[Memory Context]"
HALF_LIFE_TASKS: Final = 100.0  # a task this many tasks old weighs half as much
WINDOW_TASKS: Final = 400  # recent tasks read for the recency prior and co-change
# Tasks older than this weigh under a millionth of a new one (20 half-lives), so a search
# need not look past them: its cost stays the same however much older memory there is.
HORIZON_TASKS: Final = int(20 * HALF_LIFE_TASKS)
TASK_CANDIDATES: Final = 60  # past tasks matched by text: a file touched by many adds up
FILE_CANDIDATES: Final = 50  # files matched by text
# A similar task's evidence for each of its files: its weight / its files ** this. A file
# of a related task comes back about as often whether the task wrote one file or five, so
# a big task's files each weigh only a little less (the square root took too much).
TASK_SHARE_POWER: Final = 0.2
FILE_TEXT_WEIGHT: Final = 1.0
PATH_WEIGHT: Final = 0.25  # a path the query names in part, next to the text evidence
PRIOR_WEIGHT: Final = 0.25  # recency and co-change are tie-breakers next to text evidence
COCHANGE_WEIGHT: Final = 0.25
# The files of the project's last task: work often goes on where it just was (the next
# turn tests, fixes or documents what the last one wrote), which a prior counted over
# hundreds of tasks hardly sees. How often it does differs from project to project, so
# the signal weighs the project's own continuity (the share of a task's files that the
# next task wrote again, over the recent tasks) times this scale: a project whose next
# task rewrites one file in three gives its last files the weight of the best text match.
LAST_TASK_SCALE: Final = 3.0
FILES_SHOWN: Final = 8
TASKS_SHOWN: Final = 6
TASK_FILES_SHOWN: Final = 6
DEFAULT_BUDGET: Final = 2000
MAX_REMEMBERED_TEXT: Final = 1024  # characters of a task text whose clipped form is kept
PREAMBLE: Final = "From memory of earlier sessions in this project; not the user's words."
# The first and last lines of every context. A context that comes back inside a client's
# text is cut out from the one to the other before anything is stored (bridge/memory/privacy.py
# reads these same constants), so the end line is what tells it from the user's own words.
CONTEXT_FIRST_LINE: Final = f"{CONTEXT_HEADER} {PREAMBLE}"
CONTEXT_LAST_LINE: Final = "[/Memory Context]"

_PATH_TOKEN = re.compile(r"[\w.\-/]*\.[\w.\-/]*")  # a run of path characters with a dot
_WORD = re.compile(r"[A-Z]?[a-z]+\d*|[A-Z]+\d*(?![a-z])|\d+")
_STOPWORDS = """a an and are as at be but by can do does for from has have how i if in into is
it its me my no not of on or our so than that the their them then there these this to was we
were what when where which who why will with you your"""
STOPWORDS: Final = frozenset(_STOPWORDS.split())


def words(text: str) -> list[str]:
    """The meaningful words of a text or a path, lower-case, in order.

    Identifiers are split where people would split them: ``test_h11_impl.py`` gives
    ``test h11 impl py`` and ``ConnectionPool`` gives ``connection pool``.
    """
    found = (w.lower() for w in _WORD.findall(text))
    return [w for w in found if len(w) > 1 and w not in STOPWORDS]


class TaskHit(msgspec.Struct, frozen=True, kw_only=True):
    """One past task: the work of one user turn, as memory holds it."""

    uuid: str
    seq: int  # the task's ordinal in its project: later tasks have larger numbers
    query: str = ""
    summary: str = ""
    outcome: str = "unfinished"  # completed | failed | unfinished | note
    at: float = 0.0  # when it last changed (seconds since the epoch, UTC)
    files: list[str] = []
    errors: list[str] = []
    relevance: float = 0.0  # text match with the query (higher is better; 0 if unranked)


class RecentTask(msgspec.Struct, frozen=True, array_like=True):
    """A recent task's ordinal and files, for the recency prior and co-change."""

    seq: int
    files: list[str]


class Candidates(msgspec.Struct, frozen=True, kw_only=True):
    """Everything a backend found for one query, before fusion."""

    tasks: list[TaskHit] = []  # best text matches first
    files: dict[str, float] = {}  # path -> text match with the query
    recent: list[RecentTask] = []  # the project's last tasks, oldest first
    latest_seq: int = 0  # the newest task's ordinal
    window: Window | None = None  # what ``recent`` says, when the backend keeps it
    named: list[str] = []  # recent files the query names by path or file name
    paths: dict[str, float] = {}  # recent file -> share of its path's words the query names
    repeats: list[int] = []  # positions in ``tasks`` of those asked in the query's words

    @property
    def empty(self) -> bool:
        """True when memory holds nothing for this project."""
        return not self.tasks and not self.files and not self.recent


class Ranked(msgspec.Struct, frozen=True):
    """The outcome of fusion: files and tasks, most relevant first."""

    files: list[str]
    tasks: list[TaskHit]


@functools.lru_cache(maxsize=1 << 12)
def _decay(age: int) -> float:
    """How much a task ``age`` tasks old weighs next to a new one (ages repeat: cached)."""
    return math.pow(0.5, max(0, age) / HALF_LIFE_TASKS)


def _normalised(scores: dict[str, float]) -> dict[str, float]:
    top = max(scores.values(), default=0.0)
    return {k: v / top for k, v in scores.items()} if top > 0 else {}


def written_again(before: Sequence[str], after: Sequence[str]) -> tuple[int, int]:
    """How many of the files ``before`` wrote ``after`` wrote again, and how many it wrote
    (each file once)."""
    files = set(before)
    return len(files.intersection(after)), len(files)


def continuity_of(recent: Sequence[RecentTask]) -> float:
    """The share of a task's files that the next task to write any wrote again (0 to 1),
    over the ``recent`` tasks (oldest first); a task that wrote nothing (it only asked, or
    only failed) does not break the chain."""
    writers = [task.files for task in recent if task.files]
    return share_again(itertools.starmap(written_again, itertools.pairwise(writers)))


def asked_before(
    tasks: Sequence[TaskHit], repeats: Sequence[int], recent: Sequence[RecentTask]
) -> tuple[float, float]:
    """What a prompt asked before in the same words says about files, and how much of the
    text evidence it is.

    The first is how much its earlier askings agree beyond chance: the share of them that
    wrote a file some other of them wrote too, over the share that as many of the
    project's ``recent`` tasks (spread evenly, oldest first) show anyway, from 0 (no more
    than chance) to 1. ``continue`` or ``fix it`` are asked about anything, ``update the
    changelog`` always about one file. The second is those askings' share of the text
    relevance. (1.0, 0.0) when fewer than two of them wrote files: nothing to compare.
    """
    askings = [tasks[i] for i in repeats if tasks[i].files]
    if len(askings) < 2:
        return 1.0, 0.0
    agreement = _agreeing([task.files for task in askings])
    writers = [task.files for task in recent if task.files]
    step = len(writers) / len(askings)
    chance = _agreeing([writers[int(i * step)] for i in range(len(askings))]) if step >= 1 else 0.0
    if chance < 1:
        beyond = max(0.0, (agreement - chance) / (1 - chance))
    else:
        beyond = 1.0 if agreement >= 1 else 0.0
    relevance = sum(task.relevance for task in tasks)
    share = sum(task.relevance for task in askings) / relevance if relevance > 0 else 0.0
    return beyond, share


def _agreeing(groups: Sequence[Sequence[str]]) -> float:
    """The share of ``groups`` of files that have a file some other group has too."""
    counts = Counter(path for group in groups for path in set(group))
    return sum(1 for group in groups if any(counts[path] > 1 for path in group)) / len(groups)


def share_again(pairs: Iterable[tuple[int, int]]) -> float:
    """The share of files written again over pairs of (:func:`written_again`)."""
    again = written = 0
    for pair_again, pair_written in pairs:
        again += pair_again
        written += pair_written
    return again / written if written else 0.0


class Window:
    """What a project's recent work says, computed once for a state of memory: each
    file's recency-weighted frequency (the prior, at most 1), which files changed
    together, the files of the last task and how often work goes on where it was. A
    backend that keeps its recent work in memory keeps one Window per state, so queries
    between two writes share it.

    ``recent`` is oldest first. A backend that keeps the project's continuity
    (:func:`continuity_of`) up to date passes it; else it is counted here.
    """

    def __init__(
        self, recent: list[RecentTask], latest_seq: int, continuity: float | None = None
    ) -> None:
        self.recent = recent
        prior: dict[str, float] = defaultdict(float)
        for task in recent:
            share = _decay(latest_seq - task.seq) / math.sqrt(len(task.files) or 1)
            for path in task.files:
                prior[path] += share
        self.prior = _normalised(prior)
        self._together: dict[str, Counter[str]] = {}
        self._by_name: defaultdict[str, list[str]] | None = None  # file name -> its paths
        # The window's files numbered in the order the prior first saw them, the prior as a
        # vector over those numbers, and each file's co-change counts as arrays (see rank).
        self._numbers: dict[str, int] | None = None
        self._paths: list[str] | None = None
        self._prior_vector: NDArray[np.float64] | None = None
        self._cochange: dict[str, tuple[NDArray[np.intp], NDArray[np.float64], int]] = {}
        # The files of the last task that wrote any.
        last = next((task.files for task in reversed(recent) if task.files), [])
        self.last: list[str] = _unique(last)
        self.continuity = continuity_of(recent) if continuity is None else continuity

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Window) and list(self.recent) == list(other.recent)

    __hash__ = None  # type: ignore[assignment]

    def together(self, paths: Iterable[str]) -> dict[str, Counter[str]]:
        """For each path, how often each other file changed in the same recent task."""
        wanted = {path for path in paths if path not in self._together}
        if wanted:
            found: dict[str, Counter[str]] = {path: Counter() for path in wanted}
            for task in self.recent:
                for path in task.files:
                    if path in found:
                        found[path].update(p for p in task.files if p != path)
            self._together.update(found)
        return {path: self._together[path] for path in paths}

    def named(self, query: str) -> list[str]:
        """The window's files that ``query`` names by path or by file name (``server.py``,
        ``uvicorn/server.py``), in the order it names them."""
        tokens = [t.strip("./") for t in _PATH_TOKEN.findall(query)]
        if not (tokens := [t for t in tokens if "." in t]):
            return []  # most queries: no file name, and no need to list the window's
        if self._by_name is None:
            self._by_name = defaultdict(list)
            for path in self.prior:
                self._by_name[path.rsplit("/", 1)[-1]].append(path)
        found: dict[str, None] = {}
        for token in tokens:
            for path in self._by_name.get(token.rsplit("/", 1)[-1], ()):
                if path == token or path.endswith("/" + token):
                    found.setdefault(path, None)
        return list(found)

    def paths(self) -> list[str]:
        """The window's files by number."""
        if self._paths is None:
            self._paths = list(self.prior)
        return self._paths

    def numbers(self) -> dict[str, int]:
        """Each file of the window's number, the index of its place in ``prior_vector``."""
        if self._numbers is None:
            self._numbers = dict(zip(self.prior, range(len(self.prior)), strict=True))
        return self._numbers

    def prior_vector(self) -> NDArray[np.float64]:
        """The prior of each file, by number."""
        if self._prior_vector is None:
            self._prior_vector = np.fromiter(self.prior.values(), np.float64, len(self.prior))
        return self._prior_vector

    def cochange(self, path: str) -> tuple[NDArray[np.intp], NDArray[np.float64], int]:
        """The numbers of the files that changed with ``path`` in recent tasks, how often
        each did, and how many such changes there were in all (at least 1)."""
        found = self._cochange.get(path)
        if found is None:
            together = self._together.get(path) or self.together([path])[path]
            numbers = self.numbers()
            found = (
                np.fromiter(map(numbers.__getitem__, together), np.intp, len(together)),
                np.fromiter(together.values(), np.float64, len(together)),
                sum(together.values()) or 1,
            )
            self._cochange[path] = found
        return found


def rank(found: Candidates, *, files: int = FILES_SHOWN) -> Ranked:
    """Fuse the candidates into a ranking of files and of tasks (see the module docstring).

    This runs on every miss, so the signals are vectors over file numbers: the window's
    files by their number in the Window, then the files only the text evidence names. Each
    file's sum is taken in the same order as one signal at a time; ties between files go to
    the smaller number.
    """
    latest = found.latest_seq
    window = found.window or Window(found.recent, latest)
    numbers = window.numbers()
    known = len(numbers)
    others: dict[str, int] = {}  # files outside the window, numbered after its own

    def numbered(paths: list[str]) -> list[int]:
        given = [numbers.get(path, -1) for path in paths]
        if -1 in given:
            for i, n in enumerate(given):
                if n < 0:
                    given[i] = others.setdefault(paths[i], known + len(others))
        return given

    best = max((t.relevance for t in found.tasks), default=0.0) or 1.0
    weights = [t.relevance / best * _decay(latest - t.seq) for t in found.tasks]
    # A prompt asked before about unrelated files says little: its earlier askings, and
    # the text evidence as a whole by their share of it, weigh as much as they agree.
    agreement, asked_share = asked_before(found.tasks, found.repeats, window.recent)
    if agreement < 1.0:
        for i in found.repeats:
            weights[i] *= agreement
    # Each task's files, a file once per task that changed it, with the task's share.
    shares = [
        (t, w / len(t.files) ** TASK_SHARE_POWER)
        for t, w in zip(found.tasks, weights, strict=True)
        if t.files
    ]
    task_files = numbered([path for task, _ in shares for path in task.files])
    task_shares = [share for task, share in shares for _ in task.files]
    text_files = numbered(list(found.files))
    size = known + len(others)
    score = _normalised_vector(_sums(task_files, task_shares, size))
    if text_files:
        text = np.zeros(size)
        text[text_files] = np.fromiter(found.files.values(), np.float64, len(text_files))
        score = score + FILE_TEXT_WEIGHT * _normalised_vector(text)
    if found.paths:  # window files: numbered already
        named = np.zeros(size)
        named[[numbers[path] for path in found.paths]] = list(found.paths.values())
        score = score + PATH_WEIGHT * _normalised_vector(named)
    if agreement < 1.0:
        score *= 1.0 - asked_share * (1.0 - agreement)
    score[:known] += PRIOR_WEIGHT * window.prior_vector()
    # Co-change: each of the best files so far passes a share of its score to the files
    # that changed with it in recent tasks, in proportion to how often they did.
    moved, passed = [], []
    leaders = [n for n in _best(score, files) if n < known]
    paths = window.paths()
    window.together([paths[n] for n in leaders])  # one pass over the recent tasks for all
    for n in leaders:
        together, counts, seen = window.cochange(paths[n])
        moved.append(together)
        passed.append(COCHANGE_WEIGHT * score[n] * counts / seen)
    if moved:
        score = score + _sums(np.concatenate(moved), np.concatenate(passed), size)
    if window.last:  # files of the window: numbered already
        weight = min(1.0, LAST_TASK_SCALE * window.continuity)
        score[[numbers[path] for path in window.last]] += weight
    # Files the query names come first: whoever asks about server.py means it.
    unnumbered = list(others)  # the few files outside the window, by number - known
    ranked = found.named[:files]
    for n in _best(score, files):
        path = paths[n] if n < known else unnumbered[n - known]
        if len(ranked) < files and path not in ranked:
            ranked.append(path)
    tasks = found.tasks
    newest = [-t.seq for t in tasks]
    order = sorted(zip([-w for w in weights], newest, range(len(tasks)), strict=True))
    return Ranked(
        files=ranked,
        tasks=[tasks[i] for _, _, i in order],
    )


def _sums(
    numbers: Sequence[int] | NDArray[np.intp],
    values: Sequence[float] | NDArray[np.float64],
    size: int,
) -> NDArray[np.float64]:
    """The sum of ``values`` by number, each taken in order, as a vector of ``size``."""
    numbered = np.asarray(numbers, dtype=np.intp)
    return np.bincount(numbered, np.asarray(values, np.float64), minlength=size).astype(np.float64)


def _normalised_vector(values: NDArray[np.float64]) -> NDArray[np.float64]:
    top = float(values.max(initial=0.0))
    return values / top if top > 0 else np.zeros_like(values)


def _best(score: NDArray[np.float64], count: int) -> list[int]:
    """The numbers of the ``count`` files of highest score above 0, highest first, ties to
    the smaller number."""
    scored = np.flatnonzero(score)
    if len(scored) > count:
        values = score[scored]
        kth = np.partition(values, len(values) - count)[len(values) - count]
        scored = scored[values >= kth]
    ranked = sorted(scored.tolist(), key=lambda n: -score[n])  # stable: by number on ties
    return ranked[:count]


def _clip(text: str, limit: int) -> str:
    # A task's texts come back in query after query: short ones are clipped once.
    if len(text) <= MAX_REMEMBERED_TEXT:
        return _remembered_clip(text, limit)
    return _clipped(text, limit)


def _clipped(text: str, limit: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


_remembered_clip: Final = functools.lru_cache(maxsize=1 << 13)(_clipped)


# Formatting a date is most of a line's cost, and the same few thousand tasks (an index
# keeps a project's last HORIZON_TASKS) come back in query after query.
@functools.lru_cache(maxsize=1 << 14)
def _day(at: float) -> str:
    return f"{dt.datetime.fromtimestamp(at, dt.UTC):%Y-%m-%d}" if at > 0 else "earlier"


def _task_head(task: TaskHit) -> str:
    """The start of a task's line, which does not depend on what came before it: the
    whole line of a fact or a note."""
    if task.outcome == "fact":
        return f"- Fact: {_clip(task.summary, 300)}"
    if task.outcome == "note":  # saved on purpose: its text is all there is
        return f"- {_day(task.at)}, note: {_clip(task.summary or task.query, 300)}"
    parts = [f"- {_day(task.at)}, {task.outcome}:"]
    if task.query:
        parts.append(f'"{_clip(task.query, 160)}"')
    if task.summary:
        parts.append(f"→ {_clip(task.summary, 200)}")
    return " ".join(parts)


def _task_line(task: TaskHit, numbers: dict[str, int], head: str) -> str:
    """One past task: when, outcome, what was asked, what came of it (``head``), then
    its files, numbered in ``numbers`` at their first mention, and its errors."""
    if task.outcome in ("fact", "note"):
        return head
    parts = [head]
    files = _unique(task.files)
    shown = []
    for path in files[:TASK_FILES_SHOWN]:
        if path not in numbers:  # first mention: the path, numbered for later lines
            numbers[path] = len(numbers) + 1
            shown.append(f"[{numbers[path]}] {path}")
        else:
            shown.append(f"[{numbers[path]}]")
    if shown:
        more = len(files) - len(shown)
        parts.append(f"Files: {', '.join(shown)}{f' (+{more} more)' if more else ''}.")
    for error in _unique(task.errors)[:2]:
        parts.append(f"Error: {_clip(error, 200)}")
    return " ".join(parts)


def _unique(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))


def render(ranked: Ranked, budget: int = DEFAULT_BUDGET, *, tasks: int = TASKS_SHOWN) -> str | None:
    """The text to inject, at most ``budget`` characters, or None when there is nothing.

    Lines are added most useful first and a line that would pass the budget is left out,
    so the files and the best tasks survive a small budget. A path is written once, with
    a number; later mentions are the number alone.
    """
    if not ranked.files and not ranked.tasks:
        return None
    lines = [CONTEXT_FIRST_LINE]
    used = len(CONTEXT_FIRST_LINE) + 1 + len(CONTEXT_LAST_LINE)
    numbers: dict[str, int] = {}
    if ranked.files:
        entries = [f"[{n}] {path}" for n, path in enumerate(ranked.files, start=1)]
        line = "Files likely involved: " + ", ".join(entries)
        while used + 1 + len(line) > budget and entries:
            entries.pop()
            line = "Files likely involved: " + ", ".join(entries)
        if entries:
            numbers = {path: n for n, path in enumerate(ranked.files[: len(entries)], start=1)}
            lines.append(line)
            used += 1 + len(line)
    title = "Related past tasks, most relevant first:"
    shown_lines: list[str] = []
    seen_lines: set[str] = set()
    for task in ranked.tasks:
        if len(shown_lines) >= tasks:
            break
        head = _task_head(task)
        extra = 1 + (0 if shown_lines else 1 + len(title))
        if used + extra + len(head) > budget:
            continue  # a line is at least its head: this one cannot fit
        numbered = dict(numbers)  # kept only if the line is
        line = _task_line(task, numbered, head)
        cost = extra + len(line)
        if line in seen_lines or used + cost > budget:
            continue
        numbers = numbered
        seen_lines.add(line)
        shown_lines.append(line)
        used += cost
    if shown_lines:
        lines.append(title)
        lines.extend(shown_lines)
    return "\n".join([*lines, CONTEXT_LAST_LINE]) if len(lines) > 1 else None


def context(
    found: Candidates, budget: int = DEFAULT_BUDGET, *, tasks: int = TASKS_SHOWN
) -> str | None:
    """Rank and render in one step: the context for a chat, or None."""
    if found.empty:
        return None
    return render(rank(found), budget, tasks=tasks)


def search_words(text: str | list[str], limit: int = 32) -> Sequence[str]:
    """The distinct meaningful words of a query (or of its :func:`words`), at most
    ``limit``, for a full-text search."""
    return _unique(words(text) if isinstance(text, str) else text)[:limit]
