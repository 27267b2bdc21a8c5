"""The recall index: a project's recent tasks and files in memory, searched top-k.

A chat:start miss needs the past tasks and files that best match its query, and the
project's recent work. Reading those from the store at every miss costs milliseconds
that grow with the store; this index keeps, per project, the last ``HORIZON_TASKS`` tasks
(older ones weigh under a millionth in :func:`bridge.memory.recall.rank`, so leaving them out
changes no answer) and answers in a fraction of a millisecond, whatever the store's size.

- :class:`Bm25Index` scores documents for a query with Okapi BM25 and returns the exact
  top k: rare terms in Python, common ones (``VECTOR_FROM`` postings or more) each in one
  numpy vector operation over all the documents holding it, then a partial sort picks the
  best. Its work is bounded by the horizon, not by the store: a miss costs the same at
  10,000 episodes as at 1,000,000.
- :class:`ProjectIndex` holds one project's tasks (as :class:`~bridge.memory.recall.TaskHit`)
  with a task index and a file index (a file's document: its path and the queries of its
  last tasks), and turns a query into :class:`~bridge.memory.recall.Candidates`. A query's
  terms are joined by the path words it names only in part (``watchgod`` for
  ``watchgodreload``: :class:`~bridge.memory.terms.PathWords`).
- :class:`RecallIndexes` holds the indexes of the most recently used projects. It is
  derived state: a backend loads a project from its store on first use and applies every
  change it commits, so after a restart or a crash the index is rebuilt from what the
  store holds and cannot disagree with it.

The index is plain code: backends call it from their own threads, under its lock.
"""

from __future__ import annotations

import itertools
import math
import threading
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from operator import itemgetter
from typing import Final, cast

import msgspec
import numpy as np
from numpy.typing import NDArray

from bridge.memory.recall import (
    FILE_CANDIDATES,
    HORIZON_TASKS,
    TASK_CANDIDATES,
    WINDOW_TASKS,
    Candidates,
    RecentTask,
    TaskHit,
    Window,
    search_words,
    share_again,
    words,
    written_again,
)
from bridge.memory.terms import PathWords, path_terms, stem, terms

K1: Final = 1.2  # BM25's term-frequency saturation, as SQLite FTS5 and Lucene use
B: Final = 0.75  # BM25's length normalisation
FILE_DOC_TASKS: Final = 32  # a file's document holds the queries of its last tasks
# ... and its path, its own name, written this many times: one path among 32 queries would
# be lost to BM25's length normalisation (a field weight, as BM25F gives a title).
PATH_REPEATS: Final = 2
# A term in this many documents or more is scored with one numpy operation; a rarer one
# in Python, which costs less for a few postings than numpy's fixed cost per operation.
VECTOR_FROM: Final = 32
MAX_QUERY_WORDS: Final = 64  # words of a query read for path words written apart
PROJECTS: Final = 64  # projects whose index stays in memory (least recently used leave)


class Bm25Index:
    """Documents (bags of terms) under string keys, searched with BM25 for the top k.

    Each document has a slot (its place in the score vector; a removed document's slot is
    reused). A term's postings are a dict, cheap to update. A query takes its terms rarest
    first: a rare term's few postings are scored in Python; from the first common one
    (``vector_from`` postings or more) on, the scores so far move into a vector, and each
    term adds its share to all its documents in one numpy operation, from its postings
    compiled into arrays (once per change of the term). The k best are then picked with a
    partial sort. Every document's sum is taken term by term in the same order either way,
    so the scores do not depend on which terms were vectorised.
    """

    def __init__(
        self, vector_from: int = VECTOR_FROM, tie_break: Callable[[str], int] | None = None
    ) -> None:
        self.vector_from = vector_from
        self.tie_break = tie_break  # equal scores: the smaller of this first (else of the key)
        self._docs: dict[str, Counter[str]] = {}
        self._slot: dict[str, int] = {}
        self._keys: list[str | None] = []  # by slot; None: free
        self._free: list[int] = []
        self._sizes: list[int] = []  # each document's length in terms, by slot
        self._lengths: NDArray[np.float64] = np.zeros(64)  # the same, as a vector
        self._postings: dict[str, dict[int, int]] = {}  # term -> slot -> count
        self._compiled: dict[str, tuple[NDArray[np.intp], NDArray[np.float64]]] = {}
        self._total_length = 0

    def __len__(self) -> int:
        return len(self._docs)

    def __contains__(self, key: object) -> bool:
        return key in self._docs

    def put(self, key: str, doc_terms: Iterable[str]) -> None:
        """Index ``doc_terms`` under ``key``, replacing what was there."""
        self.remove(key)
        counts = Counter(doc_terms)
        slot = self._take_slot(key)
        self._docs[key] = counts
        length = sum(counts.values())
        self._sizes[slot] = length
        self._lengths[slot] = length
        self._total_length += length
        for term, count in counts.items():
            self._postings.setdefault(term, {})[slot] = count
            self._compiled.pop(term, None)

    def remove(self, key: str) -> None:
        """Forget the document under ``key``, if any."""
        counts = self._docs.pop(key, None)
        if counts is None:
            return
        slot = self._slot.pop(key)
        self._keys[slot] = None
        self._free.append(slot)
        self._total_length -= self._sizes[slot]
        self._sizes[slot] = 0
        self._lengths[slot] = 0.0
        for term in counts:
            posting = self._postings[term]
            del posting[slot]
            self._compiled.pop(term, None)
            if not posting:
                del self._postings[term]

    def top(self, query_terms: Iterable[str], k: int) -> list[tuple[str, float]]:
        """The ``k`` best documents for the query, best first, with their BM25 scores."""
        n = len(self._docs)
        found = [(t, self._postings[t]) for t in dict.fromkeys(query_terms) if t in self._postings]
        if not found or k < 1:
            return []
        found.sort(key=lambda term_posting: len(term_posting[1]))  # rarest first
        base, per_unit = K1 * (1 - B), K1 * B / (self._total_length / n or 1.0)
        partial: dict[int, float] = {}  # slot -> score, while the terms are rare
        sizes = self._sizes
        vector: NDArray[np.float64] | None = None
        for term, posting in found:
            df = len(posting)
            gain = math.log(1 + (n - df + 0.5) / (df + 0.5)) * (K1 + 1)
            if df < self.vector_from:
                for slot, tf in posting.items():
                    share = gain * tf / (tf + base + per_unit * sizes[slot])
                    partial[slot] = partial.get(slot, 0.0) + share
                continue
            if vector is None:  # the first common term: the scores so far go in a vector
                vector = np.zeros(len(self._keys))
                vector[list(partial)] = list(partial.values())
            slots, tf_array = self._arrays(term, posting)
            vector[slots] += gain * tf_array / (tf_array + base + per_unit * self._lengths[slots])
        scored = self._best_of_vector(vector, k) if vector is not None else partial.items()
        keys = self._keys
        best = [(cast(str, keys[slot]), score) for slot, score in scored]
        # Ties go to the smaller tie-break (or key), so the answer depends on what the index
        # holds, not on its history: by that, then (stably) by score.
        tie_break = self.tie_break
        best.sort(key=itemgetter(0) if tie_break is None else lambda hit: tie_break(hit[0]))
        best.sort(key=itemgetter(1), reverse=True)
        return best[:k]

    @staticmethod
    def _best_of_vector(scores: NDArray[np.float64], k: int) -> list[tuple[int, float]]:
        """(slot, score) of the documents at least as good as the k-th best (ties kept)."""
        hits = np.flatnonzero(scores)
        if len(hits) > k:
            values = scores[hits]
            kth = np.partition(values, len(values) - k)[len(values) - k]
            hits = hits[values >= kth]
        return list(zip(hits.tolist(), scores[hits].tolist(), strict=True))

    def _take_slot(self, key: str) -> int:
        if self._free:
            slot = self._free.pop()
            self._keys[slot] = key
        else:
            slot = len(self._keys)
            self._keys.append(key)
            self._sizes.append(0)
            if slot >= len(self._lengths):
                self._lengths = np.concatenate([self._lengths, np.zeros(len(self._lengths))])
        self._slot[key] = slot
        return slot

    def _arrays(
        self, term: str, posting: dict[int, int]
    ) -> tuple[NDArray[np.intp], NDArray[np.float64]]:
        """A term's postings as arrays of slots and counts, compiled once per change."""
        compiled = self._compiled.get(term)
        if compiled is None:
            compiled = (
                np.fromiter(posting.keys(), np.intp, len(posting)),
                np.fromiter(posting.values(), np.float64, len(posting)),
            )
            self._compiled[term] = compiled
        return compiled


class ProjectIndex:
    """One project's last tasks, their files and their documents, ready to be searched."""

    def __init__(self, horizon: int = HORIZON_TASKS) -> None:
        self.horizon = horizon
        self._tasks: dict[str, TaskHit] = {}  # by uuid, in order of seq
        self._query_terms: dict[str, list[str]] = {}
        # Equally relevant tasks: the newer first (task ids are random, so not by id).
        self._task_index = Bm25Index(tie_break=lambda uuid: -self._tasks[uuid].seq)
        self._file_tasks: dict[str, list[str]] = {}  # path -> uuids of its tasks, by seq
        self._file_index: Bm25Index = Bm25Index()
        self._window: Window | None = None  # the recent work, kept until a change
        self._path_words = PathWords()  # the words of the paths in the file index
        self._changed: dict[str, int] = {}  # uuid -> the store's change that made its state
        # Each task's pair with the one before it in the window: (before, task, what
        # written_again counts of them).
        self._pairs: dict[str, tuple[TaskHit, TaskHit, tuple[int, int]]] = {}

    def __len__(self) -> int:
        return len(self._tasks)

    @property
    def latest_seq(self) -> int:
        """The newest task's ordinal, 0 when there is none."""
        return next(reversed(self._tasks.values())).seq if self._tasks else 0

    def load(self, tasks: Iterable[TaskHit], changed: Sequence[int] | None = None) -> None:
        """Add many tasks, oldest first: as many puts, with each file indexed once."""
        for task, change in _states(tasks, changed):
            self.put(task, index_files=False, changed=change)
        for path in list(self._file_tasks):
            self._index_file(path)

    def put(self, task: TaskHit, *, index_files: bool = True, changed: int | None = None) -> None:
        """Add a task, or replace it with its newer state; the oldest leave past the horizon.

        With ``changed`` (the store's change that produced this state) a state no newer
        than the one held is ignored, so states read and written in any order leave the
        newest.
        """
        if changed is not None:
            if self._changed.get(task.uuid, -1) >= changed:
                return
            self._changed[task.uuid] = changed
        old = self._tasks.get(task.uuid)
        if old is None and self._tasks and task.seq < self.latest_seq:
            if len(self._tasks) >= self.horizon and task.seq < self._oldest_seq():
                self._changed.pop(task.uuid, None)
                return  # older than everything kept: past the horizon already
            self._insert_in_order(task)
        else:
            self._tasks[task.uuid] = task
        before = old.files if old is not None else []
        if old is None or before != task.files:
            self._window = None  # the recent work changed
        query_changed = old is None or old.query != task.query
        if query_changed:
            self._query_terms[task.uuid] = terms(task.query)
        document = [*self._query_terms[task.uuid], *_terms_of(task.summary, *task.errors)]
        document.extend(t for path in task.files for t in path_terms(path))
        self._task_index.put(task.uuid, document)
        added = set(task.files) - set(before)
        removed = set(before) - set(task.files)  # a forget folded the task anew
        for path in removed:
            self._file_tasks[path].remove(task.uuid)
        for path in added:
            tasks = self._file_tasks.setdefault(path, [])
            tasks.append(task.uuid)
            if len(tasks) > 1 and self._tasks[tasks[-2]].seq > task.seq:
                tasks.sort(key=lambda uuid: self._tasks[uuid].seq)
        # A file's document holds its last tasks' queries: it changes when the file gains
        # or loses a task, or when the query of one of its tasks changes.
        if index_files:
            for path in (set(task.files) if query_changed else added) | removed:
                self._index_file(path)
        else:
            for path in removed:
                if not self._file_tasks[path]:
                    del self._file_tasks[path]
                    self._remove_file(path)
        while len(self._tasks) > self.horizon:
            self._evict(next(iter(self._tasks)), index_files=index_files)

    def _oldest_seq(self) -> int:
        return next(iter(self._tasks.values())).seq

    def _insert_in_order(self, task: TaskHit) -> None:
        ordered = sorted([*self._tasks.values(), task], key=lambda t: t.seq)
        self._tasks = {t.uuid: t for t in ordered}

    def _index_file(self, path: str) -> None:
        tasks = self._file_tasks.get(path)
        if not tasks:
            self._file_tasks.pop(path, None)
            self._remove_file(path)
            return
        document = list(path_terms(path)) * PATH_REPEATS
        for uuid in tasks[-FILE_DOC_TASKS:]:
            document.extend(self._query_terms[uuid])
        if path not in self._file_index:
            self._path_words.add(path)
        self._file_index.put(path, document)

    def _remove_file(self, path: str) -> None:
        if path in self._file_index:
            self._path_words.remove(path)
            self._file_index.remove(path)

    def _evict(self, uuid: str, *, index_files: bool = True) -> None:
        task = self._tasks.pop(uuid)
        self._changed.pop(uuid, None)
        self._query_terms.pop(uuid, None)
        self._task_index.remove(uuid)
        self._window = None
        for path in task.files:
            tasks = self._file_tasks.get(path, [])
            shown = uuid in tasks[-FILE_DOC_TASKS:]  # the file's document holds its query
            if uuid in tasks:
                tasks.remove(uuid)
            if index_files and (shown or not tasks):
                self._index_file(path)
            elif not tasks:
                del self._file_tasks[path]
                self._remove_file(path)

    def window(self) -> Window:
        """The recent work: the files of the tasks of the last ``WINDOW_TASKS`` ordinals,
        oldest first, and what they say (kept until the next change)."""
        if self._window is None:
            since = self.latest_seq - WINDOW_TASKS
            newest_first = []
            for task in reversed(self._tasks.values()):
                if task.seq <= since:
                    break
                newest_first.append(task)
            tasks = newest_first[::-1]
            recent = [RecentTask(task.seq, list(task.files)) for task in tasks]
            self._window = Window(recent, self.latest_seq, self._continuity(tasks))
        return self._window

    def _continuity(self, tasks: list[TaskHit]) -> float:
        """:func:`~bridge.memory.recall.continuity_of` the ``tasks`` (oldest first): each
        pair of tasks in a row counted once and kept until either of them changes (a
        change replaces the TaskHit), so a new state of memory counts only its new pairs."""
        kept: dict[str, tuple[TaskHit, TaskHit, tuple[int, int]]] = {}
        for before, task in itertools.pairwise([task for task in tasks if task.files]):
            pair = self._pairs.get(task.uuid)
            if pair is None or pair[0] is not before or pair[1] is not task:
                pair = (before, task, written_again(before.files, task.files))
            kept[task.uuid] = pair
        self._pairs = kept
        return share_again(pair[2] for pair in kept.values())

    def candidates(self, query: str) -> Candidates:
        """The best matching tasks and files for ``query``, and the recent work."""
        if not self._tasks:
            return Candidates()
        said = words(query)
        query_terms = [stem(w) for w in search_words(said)]
        query_terms += self._path_words.expand(query_terms, said[:MAX_QUERY_WORDS])
        tasks = [
            msgspec.structs.replace(self._tasks[uuid], relevance=score)
            for uuid, score in self._task_index.top(query_terms, TASK_CANDIDATES)
        ]
        files = dict(self._file_index.top(query_terms, FILE_CANDIDATES))
        asked = [stem(w) for w in said]
        repeats = [i for i, t in enumerate(tasks) if asked == self._query_terms.get(t.uuid)]
        window = self.window()
        return Candidates(
            tasks=tasks,
            files=files,
            recent=window.recent,
            latest_seq=self.latest_seq,
            window=window,
            named=window.named(query),
            paths=self._path_words.match(query_terms, window.numbers()),
            repeats=repeats if asked else [],  # no words: every wordless task would match
        )


def _states(
    tasks: Iterable[TaskHit], changed: Sequence[int] | None
) -> Iterator[tuple[TaskHit, int | None]]:
    """Each task with the change that made it (None when the caller numbers none)."""
    if changed is None:
        return ((task, None) for task in tasks)
    return zip(tasks, changed, strict=True)


def _terms_of(*texts: str) -> list[str]:
    return [t for text in texts for t in terms(text)]


class RecallIndexes:
    """The indexes of the most recently used projects, shared by a backend's threads.

    A backend asks :meth:`candidates`; on None it reads the project's last tasks from its
    store between :meth:`begin_load` and :meth:`finish_load`. After each commit it hands
    the new state of every changed task to :meth:`apply`: changes committed while a
    project loads are kept and replayed onto the loaded index, so none is missed. A
    backend whose store numbers its changes passes each state's number (``changed``), and
    an older state never replaces a newer one.
    """

    def __init__(self, projects: int = PROJECTS, horizon: int = HORIZON_TASKS) -> None:
        self.projects = projects
        self.horizon = horizon
        self._lock = threading.Lock()
        self._indexes: OrderedDict[str, ProjectIndex] = OrderedDict()
        self._loading: dict[str, tuple[list[int], list[tuple[TaskHit, int | None]]]] = {}
        self._stale: set[str] = set()  # discarded while loading: the load is not installed

    def candidates(self, group_id: str, query: str) -> Candidates | None:
        """The candidates for ``query``, or None when the project is not loaded."""
        with self._lock:
            index = self._indexes.get(group_id)
            if index is None:
                return None
            self._indexes.move_to_end(group_id)
            return index.candidates(query)

    def wants(self, group_id: str) -> bool:
        """True when changes to ``group_id`` must be applied (it is loaded or loading)."""
        with self._lock:
            return group_id in self._indexes or group_id in self._loading

    def apply(
        self, group_id: str, tasks: Sequence[TaskHit], changed: Sequence[int] | None = None
    ) -> None:
        """Apply the committed state of changed tasks of ``group_id`` (with the change that
        produced each, when the store numbers them)."""
        states = list(_states(tasks, changed))
        with self._lock:
            if (loading := self._loading.get(group_id)) is not None:
                loading[1].extend(states)
            if (index := self._indexes.get(group_id)) is not None:
                for task, change in states:
                    index.put(task, changed=change)

    def discard_all(self) -> None:
        """Drop every project's index (another process forgot something)."""
        with self._lock:
            self._indexes.clear()
            self._stale.update(self._loading)

    def discard(self, group_id: str) -> None:
        """Drop a project's index: the next query loads it again from the store."""
        with self._lock:
            self._indexes.pop(group_id, None)
            if group_id in self._loading:
                self._stale.add(group_id)

    def begin_load(self, group_id: str) -> None:
        """Start collecting the changes to ``group_id``: call before reading the store."""
        with self._lock:
            loaders, _ = self._loading.setdefault(group_id, ([0], []))
            loaders[0] += 1

    def finish_load(
        self, group_id: str, tasks: Iterable[TaskHit], changed: Sequence[int] | None = None
    ) -> None:
        """Install the index built from ``tasks`` (read after :meth:`begin_load`, oldest
        first) with the changes committed since; an index loaded meanwhile is kept."""
        index = ProjectIndex(self.horizon)
        index.load(tasks, changed)
        with self._lock:
            _, changes = self._loading[group_id]
            stale = group_id in self._stale
            self._end_load(group_id)
            if stale or group_id in self._indexes:
                return
            for task, change in changes:
                index.put(task, changed=change)
            self._indexes[group_id] = index
            while len(self._indexes) > self.projects:
                self._indexes.popitem(last=False)

    def abandon_load(self, group_id: str) -> None:
        """End a load that failed."""
        with self._lock:
            self._end_load(group_id)

    def _end_load(self, group_id: str) -> None:
        loaders, _ = self._loading[group_id]
        loaders[0] -= 1
        if not loaders[0]:
            del self._loading[group_id]
            self._stale.discard(group_id)
