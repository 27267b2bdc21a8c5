"""Recall benchmark: ``python -m bench recall``.

What does the memory context the bridge injects at the start of a chat actually recall?
This replays real project histories through a running bridge, one commit as one task, and
checks whether the context injected for a commit's subject names the files that commit
then touched.

A history is a file of JSON lines ``{"sha", "at", "subject", "body", "files"}``, one per
commit, oldest first. For each history and each *mode* (``summary``: the completion
carries the commit body as the assistant's final answer; ``no-summary``: it does not, as
from a client that cannot read the answer) the last ``warmup + scored`` usable commits
(see ``usable``) are replayed in order into a fresh project on the bridge, each as:

1. ``chat:start`` with the subject as the query: the injected context is recorded;
2. one ``file:write`` per file of the commit;
3. ``completion`` with the subject as the task (and the body as the summary).

The last ``scored`` commits are scored (``score``): the files of the commit that were
written before (``seen``) are the target; the paths of ``seen`` that the first 2,000
characters of the context name, first 8 distinct, are the prediction; file recall is the
share of the target predicted. The same commits are scored for two plain references:
the 8 files written most recently (``recent_files``) and BM25 over the earlier tasks
(``bm25_files``). See bench/README.md for the whole method.

The pure parts (commit filter, path extraction, scoring, the references) are plain
functions here; the replay needs a bridge (``replay``), which the command line starts
as its own process (``bridge_server``), one fresh bridge and data dir per backend.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime as dt
import hashlib
import json
import logging
import math
import os
import platform
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Coroutine, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Final, TypeVar

from websockets.asyncio.client import ClientConnection, connect

from bench.process import DECODER, ENCODER, BenchError, Reply, serve

log = logging.getLogger("bench.recall")
_T = TypeVar("_T")

REPO: Final = Path(__file__).resolve().parent.parent
DATA: Final = REPO.parent / "shared" / "data"
DEFAULT_HISTORIES: Final = tuple(
    DATA / f"{name}-history.jsonl" for name in ("uvicorn", "click", "redis-py")
)
DEFAULT_OUT: Final = REPO / "docs"
QUICK_OUT: Final = REPO / "bench" / "results"

MAX_FILES: Final = 12  # a commit touching more files is not a task an agent does in one go
WARMUP: Final = 100  # commits replayed before the scored ones
SCORED: Final = 300  # commits scored (the last ones replayed)
TOP: Final = 8  # distinct paths taken from a context or a reference
CUT: Final = 2_000  # characters of a context read for paths
MODES: Final = ("summary", "no-summary")
BACKENDS: Final = ("sqlite", "graphiti")
METHODS: Final = ("memory", "recent", "bm25")

# A version bump or release commit, by its subject (case-insensitive, from the start, after
# an optional "chore:" or "chore(release):" prefix). One alternative per line:
#   "Bump version …", "Bump dev version", "bumped the version to 2.0"
#   "Bump to …" ("Bump to dev version", "bump to 2.7.2")
#   "… version bump …" anywhere ("version bump!", "pep8, version bump to 2.9.1")
#   "Prepare release …", "Preparation for release 6.2.0", "prepare for the 2.0 release"
#   "Prepare 3.3-dev"
#   "Version 1.2.3", "version 3.3.5, fixed …", "release version 8.4.1", "start version 8.0"
#   "Release 1.2.3", "released v2.0"
#   "Version" alone, or with a pull request number: "Version (#518)"
#   a bare version: "1.2.3", "v4.2.0-rc1 (#2005)", "0.7.0.b2"
#   a version, then the word version: "2.7.0, version bump", "4.0.0 rc2 versioning (#1677)"
# A version has at least one dot. A dependency bump ("Bump pytest from 7 to 8") is not one.
VERSION: Final = r"v?\d+(?:\.\d+)+(?:[.-]?(?:a|b|c|rc|alpha|beta|dev|post|pre)\.?\d*)?"
VERSION_BUMP: Final = re.compile(
    rf"""^\s*(?:[\w-]+(?:\([^)]*\))?!?:\s*)?(?:
        bump(?:s|ed|ing)?\s+(?:the\s+)?(?:dev\s+)?version\b
      | bump(?:s|ed|ing)?\s+to\b
      | .*\bversion\s+bump
      | prepar\w*\s+(?:for\s+)?(?:the\s+)?(?:next\s+)?(?:\S+\s+)?release\b
      | prepar\w*\s+(?:for\s+)?{VERSION}
      | (?:start(?:ing)?\s+|release\s+)?version\s+{VERSION}
      | release[sd]?\s+{VERSION}
      | version\s*(?:\(\#\d+\))?\s*$
      | {VERSION}\s*(?:\(\#\d+\))?\s*$
      | {VERSION}[,:]?\s.*\bversion
    )""",
    re.IGNORECASE | re.VERBOSE,
)

# Prompts that say nothing of the work (``--generic``): what a user types to go on.
GENERIC_PROMPTS: Final = (
    "continue",
    "fix it",
    "keep going",
    "try again",
    "wip",
    "more fixes",
    "address the review comments",
)

# What separates path tokens in a context: whitespace and punctuation that never ends a
# path in practice. A token's trailing '.' and ':' (end of a sentence, "path: …") go too.
PATH_SEPARATORS: Final = re.compile(r"""[\s,;()\[\]{}<>|*"'`]+""")
TRAILING: Final = ".:"

# BM25 words: runs of letters and digits, camelCase and acronyms split, lower-cased.
WORD: Final = re.compile(r"[^\W_]+")
CAMEL: Final = re.compile(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])")


# -- histories ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Commit:
    """One commit of a history: one task for the agent."""

    sha: str
    at: float | None
    subject: str
    body: str
    files: tuple[str, ...]


def parse_commit(line: str) -> Commit:
    """One JSON line of a history as a Commit (files de-duplicated, in listed order)."""
    raw = json.loads(line)
    at = raw.get("at")
    return Commit(
        sha=str(raw["sha"]),
        at=None if at is None else float(at),
        subject=str(raw.get("subject") or ""),
        body=str(raw.get("body") or ""),
        files=tuple(dict.fromkeys(str(f) for f in raw.get("files") or () if f)),
    )


def load_history(path: Path) -> list[Commit]:
    """Every commit of a history file, oldest first, as the file lists them."""
    with path.open(encoding="utf-8") as f:
        return [parse_commit(line) for line in f if line.strip()]


def history_name(path: Path) -> str:
    """A history's short name: its file name without ``.jsonl`` and ``-history``."""
    name = path.name.removesuffix(".jsonl").removesuffix(".json")
    return name.removesuffix("-history") or name


def is_version_bump(subject: str) -> bool:
    """True when the subject is a version bump or release commit (``VERSION_BUMP``)."""
    return VERSION_BUMP.match(subject) is not None


def usable(commit: Commit) -> bool:
    """A commit is a usable task when it has a subject, touches 1 to ``MAX_FILES`` files,
    and is neither a merge (subject starting with ``Merge ``) nor a version bump."""
    return (
        bool(commit.subject.strip())
        and 0 < len(commit.files) <= MAX_FILES
        and not commit.subject.startswith("Merge ")
        and not is_version_bump(commit.subject)
    )


def replay_window(
    commits: Sequence[Commit], scored: int = SCORED, warmup: int = WARMUP, before: int = 0
) -> tuple[list[Commit], int]:
    """The commits to replay (the last ``warmup + scored`` usable ones, in order) and the
    index of the first one to score: the last ``scored`` of them, or all of them when the
    history has fewer. With ``before``, the history ends that many usable commits early:
    an earlier era of the same project."""
    kept = [c for c in commits if usable(c)]
    kept = kept[: max(0, len(kept) - before)]
    window = kept[-(warmup + scored) :] if warmup + scored else []
    return window, max(0, len(window) - scored)


def said_nothing(window: Sequence[Commit], share: float) -> tuple[list[Commit], frozenset[str]]:
    """``window`` with about ``share`` of its commits asked by a prompt that says nothing
    (one of ``GENERIC_PROMPTS``) instead of their subject, and with no body; and the shas
    of those commits. Which commits, and which prompt, follow from each sha alone, so every
    run, mode and backend asks the same."""
    changed: list[Commit] = []
    shas: set[str] = set()
    for commit in window:
        digest = hashlib.sha256(commit.sha.encode()).digest()
        if int.from_bytes(digest[:8]) / 2**64 < share:
            prompt = GENERIC_PROMPTS[int.from_bytes(digest[8:16]) % len(GENERIC_PROMPTS)]
            commit = dataclasses.replace(commit, subject=prompt, body="")
            shas.add(commit.sha)
        changed.append(commit)
    return changed, frozenset(shas)


# -- paths in a context -------------------------------------------------------------------


def path_tokens(text: str) -> list[str]:
    """The whitespace- and punctuation-separated tokens of ``text``, in order, each without
    trailing ``.`` and ``:``; ``uvicorn/app.py`` stays one token (never ``app.py``)."""
    tokens = (raw.rstrip(TRAILING) for raw in PATH_SEPARATORS.split(text))
    return [t for t in tokens if t]


def first_distinct(items: Iterable[str], top: int = TOP) -> list[str]:
    """The first ``top`` distinct items, in order."""
    found: dict[str, None] = {}
    for item in items:
        if len(found) >= top:
            break
        found.setdefault(item, None)
    return list(found)


def predicted_paths(
    context: str | None, seen: Iterable[str], top: int = TOP, cut: int = CUT
) -> list[str]:
    """The paths of ``seen`` the first ``cut`` characters of ``context`` name, in order of
    appearance, first ``top`` distinct. A token counts only if it is exactly such a path."""
    if not context:
        return []
    known = seen if isinstance(seen, set | frozenset) else frozenset(seen)
    return first_distinct((t for t in path_tokens(context[:cut]) if t in known), top)


def score(predicted: Sequence[str], target: Sequence[str]) -> float:
    """File recall: the share of ``target`` found in ``predicted`` (0 for an empty target)."""
    wanted = set(target)
    return len(wanted.intersection(predicted)) / len(wanted) if wanted else 0.0


# -- the two references -------------------------------------------------------------------


def recent_files(commits: Sequence[Commit], top: int = TOP) -> list[str]:
    """The ``top`` most recently written distinct files of ``commits`` (oldest commit
    first; a commit writes its files in listed order), most recent first."""
    return first_distinct((f for c in reversed(commits) for f in reversed(c.files)), top)


def words(text: str) -> list[str]:
    """BM25 words of a subject or a path: letters and digits, split on everything else and
    on camelCase (``HTTPServer`` -> ``http``, ``server``), lower-cased."""
    return [w.lower() for run in WORD.findall(text) for w in CAMEL.split(run) if w]


def task_words(commit: Commit) -> list[str]:
    """A past task as a BM25 document: its subject plus the words of its file paths."""
    return words(commit.subject) + [w for f in commit.files for w in words(f)]


def bm25_files(past: Sequence[Commit], query: str, top: int = TOP) -> list[str]:
    """BM25 (``bm25s``, Lucene variant, k1=1.5, b=0.75) over ``past`` tasks (``task_words``)
    for the words of ``query``: the files of the tasks that score above 0, best task first
    (ties: the more recent task first), each task's files in listed order, first ``top``
    distinct."""
    terms = words(query)
    if not past or not terms:
        return []
    import bm25s  # type: ignore[import-untyped]  # the bench extra; imported when used

    index = bm25s.BM25()
    index.index([task_words(c) for c in past], show_progress=False)
    scores = index.get_scores(terms)
    ranked = sorted(
        (i for i in range(len(past)) if scores[i] > 0), key=lambda i: (-float(scores[i]), -i)
    )
    return first_distinct((f for i in ranked for f in past[i].files), top)


@dataclass(frozen=True)
class Case:
    """A scored commit: its target, what it may name (``seen``) and the references."""

    index: int  # in the replay window
    sha: str
    subject: str
    seen: frozenset[str]
    target: tuple[str, ...]
    recent: tuple[str, ...]
    bm25: tuple[str, ...]
    generic: bool = False  # asked by a prompt that says nothing (``said_nothing``)


def cases(
    window: Sequence[Commit],
    first_scored: int,
    top: int = TOP,
    generic: frozenset[str] = frozenset(),
) -> list[Case]:
    """The commits of ``window`` from ``first_scored`` on whose target (their files written
    in earlier commits of the window) is not empty, with both references' predictions;
    those whose sha is in ``generic`` are marked as asked by a prompt that says nothing."""
    found: list[Case] = []
    seen: set[str] = set()
    for i, commit in enumerate(window):
        target = tuple(f for f in commit.files if f in seen)
        if i >= first_scored and target:
            past = window[:i]
            found.append(
                Case(
                    index=i,
                    sha=commit.sha,
                    subject=commit.subject,
                    seen=frozenset(seen),
                    target=target,
                    recent=tuple(recent_files(past, top)),
                    bm25=tuple(bm25_files(past, commit.subject, top)),
                    generic=commit.sha in generic,
                )
            )
        seen.update(commit.files)
    return found


# -- replay through a bridge --------------------------------------------------------------


@dataclass(frozen=True)
class Turn:
    """What the bridge answered to one commit's chat:start."""

    sha: str
    inject: str | None
    hit: bool
    rtt_us: int  # client-side round trip
    elapsed_us: int  # the bridge's own figure


class Client:
    """One WebSocket to the bridge: one MessagePack message at a time, replies checked."""

    def __init__(self, ws: ClientConnection, timeout: float) -> None:
        self.ws = ws
        self.timeout = timeout
        self.next_id = 0
        self.queued = 0  # acks saying the episode waits in the outbox, not yet in memory

    async def ask(self, message: dict[str, Any], expect: str) -> tuple[Reply, int]:
        """Send ``message``, wait for its reply; the reply and the round trip in ns."""
        self.next_id += 1
        message["id"] = self.next_id
        frame = ENCODER.encode(message)
        began = time.perf_counter_ns()
        await self.ws.send(frame)
        async with asyncio.timeout(self.timeout):
            data = await self.ws.recv(decode=False)
        took = time.perf_counter_ns() - began
        reply = DECODER.decode(data)
        if reply.type != expect or reply.id != self.next_id or not reply.ok:
            raise BenchError(f"{message['type']} {message['id']} was answered with {reply!r}")
        self.queued += reply.queued
        return reply, took


def project_name(history: str, mode: str) -> str:
    """The bridge project of a (history, mode): ``uvicorn-summary`` (at most 256 chars)."""
    return f"{history[: 255 - len(mode)]}-{mode}"


@dataclass(frozen=True)
class Replayed:
    """The answers to a replay's chat:starts, one per commit, and how many episodes the
    bridge acknowledged as queued in its outbox (memory did not take them in time)."""

    turns: list[Turn]
    queued: int


async def replay(
    url: str, project: str, window: Sequence[Commit], mode: str, timeout: float = 60.0
) -> Replayed:
    """Replay ``window`` in order into ``project`` of the bridge at ``url``, one commit as
    one task (session = sha): chat:start (subject), one file:write per file, completion
    (subject; the body as ``summary`` in mode ``summary`` when there is one). Each message
    waits for its reply."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
    turns: list[Turn] = []
    async with connect(
        f"{url.rstrip('/')}/{project}", compression=None, max_size=None, open_timeout=30
    ) as ws:
        client = Client(ws, timeout)
        for commit in window:
            base = {"project": project, "session": commit.sha}
            when = {} if commit.at is None else {"at": max(0.0, commit.at)}
            chat = {"type": "chat:start", "query": commit.subject, **base}
            context, rtt_ns = await client.ask(chat, "context")
            turns.append(
                Turn(commit.sha, context.inject, context.hit, rtt_ns // 1000, context.elapsed_us)
            )
            for n, path in enumerate(commit.files):
                write = {"type": "file:write", "path": path, "episode_id": f"{commit.sha}:{n}"}
                await client.ask({**write, **base, **when}, "ack")
            done: dict[str, Any] = {
                "type": "completion",
                "task": commit.subject,
                "episode_id": f"{commit.sha}:done",
            }
            if mode == "summary" and commit.body.strip():
                done["summary"] = commit.body
            await client.ask({**done, **base, **when}, "ack")
    return Replayed(turns, client.queued)


# -- figures ------------------------------------------------------------------------------


def percentile(values: Sequence[float], p: float) -> float | None:
    """The nearest-rank ``p``-th percentile of ``values`` (None when there are none)."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(p / 100 * len(ordered)) - 1))]


def mean(values: Sequence[float]) -> float | None:
    """The mean, or None when there are no values."""
    return statistics.fmean(values) if values else None


@dataclass
class Outcome:
    """One scored commit: each method's prediction and recall."""

    case: Case
    turn: Turn
    predicted: dict[str, list[str]]
    recall: dict[str, float]


def outcomes(scored: Sequence[Case], turns: Sequence[Turn]) -> list[Outcome]:
    """Score every case against the bridge's context for it and against the references."""
    found: list[Outcome] = []
    for case in scored:
        turn = turns[case.index]
        if turn.sha != case.sha:
            raise BenchError(f"turn {case.index} is {turn.sha}, expected {case.sha}")
        predicted = {
            "memory": predicted_paths(turn.inject, case.seen),
            "recent": list(case.recent),
            "bm25": list(case.bm25),
        }
        recall = {m: score(p, case.target) for m, p in predicted.items()}
        found.append(Outcome(case, turn, predicted, recall))
    return found


def round_or_none(x: float | None, digits: int) -> float | None:
    """``x`` rounded, or None."""
    return None if x is None else round(x, digits)


def summarise(
    history: str, mode: str, backend: str, replayed: int, scored: Sequence[Outcome]
) -> dict[str, Any]:
    """One row of the report: the figures of a (history, mode, backend) over its scored
    commits. Context sizes count a null context as 0 characters; latencies are over the
    chat:starts of scored commits that missed the cache."""
    row: dict[str, Any] = {
        "history": history,
        "mode": mode,
        "backend": backend,
        "replayed": replayed,
        "scored": len(scored),
    }
    for m in METHODS:
        row[f"{m}_recall"] = round_or_none(mean([o.recall[m] for o in scored]), 4)
        row[f"{m}_hit_rate"] = round_or_none(mean([float(o.recall[m] > 0) for o in scored]), 4)
    best = max(row["recent_recall"] or 0.0, row["bm25_recall"] or 0.0)
    row["ratio"] = None if not best or row["memory_recall"] is None else round(
        row["memory_recall"] / best, 3
    )  # fmt: skip
    generic = [o for o in scored if o.case.generic]
    if generic:  # only in a run with --generic: the commits asked by a generic prompt
        row["generic_scored"] = len(generic)
        for m in METHODS:
            row[f"generic_{m}_recall"] = round_or_none(mean([o.recall[m] for o in generic]), 4)
    chars = [len(o.turn.inject or "") for o in scored]
    row["context_chars_median"] = None if not chars else statistics.median(chars)
    row["context_chars_p90"] = percentile(chars, 90)
    row["empty_contexts"] = sum(1 for o in scored if not o.turn.inject)
    row["cache_hits"] = sum(1 for o in scored if o.turn.hit)
    misses = [o.turn for o in scored if not o.turn.hit]
    row["misses"] = len(misses)
    for name, values in (
        ("miss_rtt", [t.rtt_us for t in misses]),
        ("miss_server", [t.elapsed_us for t in misses]),
    ):
        for p in (50, 99):
            us = percentile(values, p)
            row[f"{name}_p{p}_ms"] = None if us is None else round(us / 1000, 2)
    return row


def fmt(x: float | None, spec: str) -> str:
    """A table cell: ``x`` formatted, or ``-``."""
    return "-" if x is None else format(x, spec)


def table(rows: Sequence[dict[str, Any]]) -> str:
    """The rows as the report's Markdown table."""
    lines = [
        "| history | mode | backend | scored | file recall | hit rate | recent recall "
        "| bm25 recall | ratio | median ctx chars | p90 ctx chars | empty ctx "
        "| miss p50 / p99 ms | server p50 / p99 ms | cache hits |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['history']} | {r['mode']} | {r['backend']} | {r['scored']} "
            f"| {fmt(r['memory_recall'], '.3f')} | {fmt(r['memory_hit_rate'], '.3f')} "
            f"| {fmt(r['recent_recall'], '.3f')} | {fmt(r['bm25_recall'], '.3f')} "
            f"| {fmt(r['ratio'], '.2f')} | {fmt(r['context_chars_median'], ',.0f')} "
            f"| {fmt(r['context_chars_p90'], ',.0f')} | {r['empty_contexts']} "
            f"| {fmt(r['miss_rtt_p50_ms'], '.2f')} / {fmt(r['miss_rtt_p99_ms'], '.2f')} "
            f"| {fmt(r['miss_server_p50_ms'], '.2f')} / {fmt(r['miss_server_p99_ms'], '.2f')} "
            f"| {r['cache_hits']} |"
        )
    return "\n".join(lines)


def row_key(row: dict[str, Any]) -> tuple[str, str, str]:
    """What identifies a row across runs."""
    return row["history"], row["mode"], row["backend"]


def comparison(before: dict[str, Any], rows: Sequence[dict[str, Any]]) -> str | None:
    """A Markdown table of the rows also in an earlier run's results, before → after."""
    earlier = {row_key(r): r for r in before.get("rows", [])}
    pairs = [(earlier[row_key(r)], r) for r in rows if row_key(r) in earlier]
    if not pairs:
        return None
    lines = [
        f"Compared with the run of {before.get('started', '?')} "
        f"(its scored commits per row are in parentheses):",
        "",
        "| history | mode | backend | scored | file recall | hit rate | ratio | median ctx chars |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for b, a in pairs:

        def change(key: str, spec: str, b: dict[str, Any] = b, a: dict[str, Any] = a) -> str:
            return f"{fmt(b.get(key), spec)} → {fmt(a.get(key), spec)}"

        lines.append(
            f"| {a['history']} | {a['mode']} | {a['backend']} | {a['scored']} ({b['scored']}) "
            f"| {change('memory_recall', '.3f')} | {change('memory_hit_rate', '.3f')} "
            f"| {change('ratio', '.2f')} | {change('context_chars_median', ',.0f')} |"
        )
    return "\n".join(lines)


# -- the bridge as its own process --------------------------------------------------------


@contextlib.asynccontextmanager
async def bridge_server(
    backend: str, data_dir: Path, statsd_port: int, log_path: Path, source: Path | None = None
) -> AsyncIterator[str]:
    """A bridge (``bench.process.serve``) on ``--memory BACKEND`` with a fresh ``data_dir``
    (its own valkey-server; for graphiti its own FalkorDB and ``--llm off``); yields its
    URL. ``source`` runs the bridge package of another checkout (its folder)."""
    args = ["--memory", backend, *(["--llm", "off"] if backend == "graphiti" else [])]
    async with serve(args, data_dir, statsd_port, log_path, source=source) as bridge:
        yield bridge.url


@contextlib.contextmanager
def statsd_sink() -> Iterator[int]:
    """A bound UDP socket nobody reads, so the bridge's DogStatsD datagrams go somewhere."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sink:
        sink.bind(("127.0.0.1", 0))
        yield sink.getsockname()[1]


def machine() -> dict[str, Any]:
    """What the run ran on."""
    cpu = platform.processor() or "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "websockets": metadata.version("websockets"),
        "platform": platform.platform(),
    }


def run_loop(main: Coroutine[Any, Any, _T], use_uvloop: bool) -> tuple[_T, str | None]:
    """Run ``main`` on uvloop when asked and importable; its result and uvloop's version."""
    if use_uvloop:
        with contextlib.suppress(ImportError):
            import uvloop

            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                return runner.run(main), metadata.version("uvloop")
    return asyncio.run(main), None


# -- a run --------------------------------------------------------------------------------


@dataclass
class History:
    """A loaded history and its replay window."""

    name: str
    path: Path
    commits: int
    usable: int
    window: list[Commit]
    first_scored: int
    cases: list[Case] = field(default_factory=list)

    @property
    def description(self) -> dict[str, Any]:
        """The history's counts for the results."""
        return {
            "path": str(self.path),
            "commits": self.commits,
            "usable": self.usable,
            "replayed": len(self.window),
            "scoring_window": len(self.window) - self.first_scored,
            "scored": len(self.cases),
        }


def prepare(path: Path, scored: int, warmup: int, before: int = 0, generic: float = 0.0) -> History:
    """Load a history, pick its replay window (``before`` usable commits from its end),
    ask about ``generic`` of its commits by a prompt that says nothing (``said_nothing``),
    and work out its cases and references."""
    commits = load_history(path)
    window, first = replay_window(commits, scored, warmup, before)
    window, asked = said_nothing(window, generic)
    history = History(
        history_name(path), path, len(commits), sum(map(usable, commits)), window, first
    )
    history.cases = cases(window, first, generic=asked)
    return history


async def measure(
    url: str, history: History, mode: str, backend: str, save: Path | None = None
) -> dict[str, Any]:
    """Replay a history in one mode through the bridge at ``url`` and score it: the row."""
    began = time.perf_counter()
    replayed = await replay(url, project_name(history.name, mode), history.window, mode)
    turns = replayed.turns
    scored = outcomes(history.cases, turns)
    row = summarise(history.name, mode, backend, len(turns), scored)
    row["queued_acks"] = replayed.queued
    row["duration_s"] = round(time.perf_counter() - began, 1)
    if save is not None:
        save_contexts(save / backend / f"{history.name}-{mode}", history, turns, scored)
    return row


def save_contexts(
    folder: Path, history: History, turns: Sequence[Turn], scored: Sequence[Outcome]
) -> None:
    """Write each commit's context (``NNNN-sha.txt``) and ``commits.jsonl``: per replayed
    commit its subject, whether it was scored, target and each method's prediction."""
    folder.mkdir(parents=True, exist_ok=True)
    by_index = {o.case.index: o for o in scored}
    with (folder / "commits.jsonl").open("w", encoding="utf-8") as index:
        for i, (commit, turn) in enumerate(zip(history.window, turns, strict=True)):
            name = f"{i:04d}-{commit.sha[:12]}.txt"
            (folder / name).write_text(turn.inject or "", encoding="utf-8")
            o = by_index.get(i)
            record: dict[str, Any] = {
                "i": i,
                "sha": commit.sha,
                "subject": commit.subject,
                "context": name,
                "chars": len(turn.inject or ""),
                "hit": turn.hit,
                "rtt_us": turn.rtt_us,
                "elapsed_us": turn.elapsed_us,
                "scored": o is not None,
            }
            if o is not None:
                record.update(target=list(o.case.target), predicted=o.predicted, recall=o.recall)
            index.write(json.dumps(record) + "\n")


def progress(text: str) -> None:
    """A line on stderr, so stdout stays the report."""
    print(text, file=sys.stderr, flush=True)


async def run_backend(
    backend: str,
    histories: Sequence[History],
    modes: Sequence[str],
    save: Path | None,
    source: Path | None = None,
) -> tuple[list[dict[str, Any]], float]:
    """Every (history, mode) on one fresh bridge of ``backend``: the rows and seconds."""
    began = time.perf_counter()
    rows: list[dict[str, Any]] = []
    with statsd_sink() as statsd_port, tempfile.TemporaryDirectory(prefix="bench-recall-") as tmp:
        server_log = Path(tmp) / "server.log"
        data_dir = Path(tmp) / "data"
        async with bridge_server(backend, data_dir, statsd_port, server_log, source) as url:
            for history in histories:
                for mode in modes:
                    progress(f"recall: {backend} {history.name} {mode} ...")
                    row = await measure(url, history, mode, backend, save)
                    progress(
                        f"recall: {backend} {history.name} {mode}: file recall "
                        f"{fmt(row['memory_recall'], '.3f')} in {row['duration_s']} s"
                    )
                    for warning in warnings(row):
                        progress(f"recall: warning: {warning}")
                    rows.append(row)
        report_server_log(backend, server_log, save)
    return rows, round(time.perf_counter() - began, 1)


def warnings(row: dict[str, Any]) -> list[str]:
    """What in a row suggests the memory did not work as it should, in words."""
    found: list[str] = []
    where = f"{row['backend']} {row['history']} {row['mode']}"
    if row["scored"] and row["empty_contexts"] == row["scored"]:
        found.append(f"{where}: the bridge injected no context for any scored commit")
    if row.get("queued_acks"):
        found.append(
            f"{where}: {row['queued_acks']} episodes were acknowledged as queued in the "
            "outbox (memory did not take them within the store timeout)"
        )
    return found


def report_server_log(backend: str, path: Path, save: Path | None) -> None:
    """Show the last lines the bridge logged (at warning and above) on stderr, and keep the
    whole log with the saved contexts."""
    with contextlib.suppress(OSError):
        lines = path.read_text(errors="replace").splitlines()
        if save is not None:
            (save / backend).mkdir(parents=True, exist_ok=True)
            (save / backend / "server.log").write_text("\n".join(lines) + "\n")
        logged = [line for line in lines if line.strip() and "graphiti-bridge stopped" not in line]
        if logged:
            progress(f"recall: the {backend} bridge logged {len(logged)} lines; the last ones:")
            for line in logged[-10:]:
                progress(f"  {line}")


# -- report -------------------------------------------------------------------------------

METHOD_TEXT: Final = """\
# Recall of the injected memory context

Does the context the bridge injects at the start of a chat name the files the task will
touch? Real project histories are replayed through a running bridge, one commit as one
task, and the context injected for each commit's subject is scored against the files that
commit then touched. Produced by `python -m bench recall` (bench/recall.py; method in
bench/README.md).

- **Tasks.** Usable commits touch 1 to {max_files} files and are neither merges nor version
  bumps (`VERSION_BUMP` in bench/recall.py). The last {replay} usable commits of each history
  are replayed in order; the last {scored} of them are scored.
- **Replay.** Per commit, in a fresh project per (history, mode), session = sha, each message
  waiting for its reply: `chat:start` with the subject (the `inject` is recorded), one
  `file:write` per file, then `completion` with the subject as the task. Mode `summary`
  also sends the commit body as the completion's `summary` (when it has one); mode
  `no-summary` never does. One fresh bridge (`python -m bridge serve`, its own Valkey and
  data dir; graphiti: `--memory graphiti --llm off` on its own FalkorDB) per backend.
- **Score.** A commit's target is its files written in earlier replayed commits (`seen`);
  commits with an empty target are not scored. The prediction is the paths of `seen` named
  in the first {cut:,} characters of the context (whole tokens, exactly a seen path), first
  {top} distinct. File recall = share of the target predicted; hit rate = share of commits
  with at least one target file predicted.
- **References**, scored the same way on the same commits: *recent* = the {top} files
  written most recently before the commit; *bm25* = BM25 (`bm25s`) over the earlier tasks
  (subject plus the words of its file paths) for the subject, the files of the matching
  tasks in rank order. *ratio* = file recall / max(recent, bm25).
- Context sizes are over the whole injected text (none counts as 0); miss latencies are
  over the scored commits' chat:starts that missed the cache: client round trip, and the
  bridge's own `elapsed_us` (server).
"""


def generic_table(rows: Sequence[dict[str, Any]]) -> str | None:
    """The rows' commits asked by a prompt that says nothing (``--generic``), scored apart:
    a Markdown table, or None when the run asked none."""
    asked = [r for r in rows if r.get("generic_scored")]
    if not asked:
        return None
    lines = [
        "| history | mode | backend | scored | file recall | recent recall | bm25 recall |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for r in asked:
        lines.append(
            f"| {r['history']} | {r['mode']} | {r['backend']} | {r['generic_scored']} "
            f"| {fmt(r['generic_memory_recall'], '.3f')} "
            f"| {fmt(r['generic_recent_recall'], '.3f')} "
            f"| {fmt(r['generic_bm25_recall'], '.3f')} |"
        )
    return "\n".join(lines)


def markdown(results: dict[str, Any], before: dict[str, Any] | None) -> str:
    """The report: the method, the command, the table, the durations, a comparison."""
    p = results["params"]
    parts = [
        METHOD_TEXT.format(
            max_files=MAX_FILES,
            replay=p["warmup"] + p["scored"],
            scored=p["scored"],
            cut=p["cut"],
            top=p["top"],
        ),
        f"Reproduce: `{results['command']}`",
        "",
        f"Run of {results['started']} on {results['machine']['line']}; bridge at "
        f"{results['bridge']['revision'] or results['bridge']['source']}; "
        + "; ".join(f"{b}: {s} s" for b, s in results["backend_seconds"].items())
        + ".",
        "",
        table(results["rows"]),
        "",
        "Histories: "
        + "; ".join(
            f"{name}: {h['commits']:,} commits, {h['usable']:,} usable, {h['replayed']} "
            f"replayed, {h['scored']} of the last {h['scoring_window']} scored"
            for name, h in results["histories"].items()
        )
        + (
            f"; each history ended {before_end:,} usable commits early (an earlier era)."
            if (before_end := p.get("before", 0))
            else "."
        ),
    ]
    if (asked := generic_table(results["rows"])) is not None:
        share = p.get("generic", 0.0)
        prompts = ", ".join(f'"{g}"' for g in GENERIC_PROMPTS)
        parts += [
            "",
            "## Prompts that say nothing",
            "",
            f"About {share:.0%} of the commits were asked by a prompt that says nothing of the "
            f"work ({prompts}) instead of their "
            "subject, and sent no summary; the table above scores every commit, this one "
            "only those.",
            "",
            asked,
        ]
    found = [w for row in results["rows"] for w in warnings(row)]
    if found:
        parts += ["", "Warnings:", "", *(f"- {w}" for w in found)]
    if before is not None and (text := comparison(before, results["rows"])) is not None:
        parts += ["", "## Before and after", "", text]
    return "\n".join(parts) + "\n"


def plot(path: Path, rows: Sequence[dict[str, Any]]) -> bool:
    """Grouped bars, memory vs recent vs bm25 per (history, mode, backend): file recall
    above, hit rate below. False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no plot")
        return False
    labels = [f"{r['history']}\n{r['mode']}\n{r['backend']}" for r in rows]
    width = 0.27
    fig, axes = plt.subplots(2, 1, figsize=(max(6.0, 1.3 * len(rows) + 2), 7), sharex=True)
    for ax, kind, title in (
        (axes[0], "recall", "file recall"),
        (axes[1], "hit_rate", "hit rate (at least one target file named)"),
    ):
        for k, method in enumerate(METHODS):
            xs = [i + (k - 1) * width for i in range(len(rows))]
            ys = [r[f"{method}_{kind}"] or 0.0 for r in rows]
            bars = ax.bar(xs, ys, width, label=method)
            ax.bar_label(bars, labels=[f"{y:.2f}" for y in ys], fontsize=6, padding=1)
        ax.set_ylim(0, 1.08)
        ax.set_ylabel(title)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(loc="upper right", fontsize=8)
    axes[0].set_title("Injected memory context vs plain references (scored commits)")
    axes[1].set_xticks(range(len(rows)), labels, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(
        prog="python -m bench recall",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--history",
        nargs="+",
        type=Path,
        default=list(DEFAULT_HISTORIES),
        help="history files (JSON lines), or folders of *.jsonl "
        "(default: uvicorn, click and redis-py in ../shared/data/)",
    )
    parser.add_argument("--backend", choices=[*BACKENDS, "all"], default="sqlite")
    parser.add_argument("--mode", choices=[*MODES, "all"], default="all")
    parser.add_argument(
        "--limit", type=int, metavar="N", help=f"score N commits instead of {SCORED}"
    )
    parser.add_argument(
        "--before",
        type=int,
        default=0,
        metavar="N",
        help="end each history N usable commits early: replay an earlier era of the same "
        "projects, to check a change on commits it was not tuned on",
    )
    parser.add_argument(
        "--generic",
        type=float,
        default=0.0,
        metavar="SHARE",
        help="ask about this share (0 to 1) of the commits by a prompt that says nothing "
        '("continue", "fix it", ...) instead of their subject, with no summary, and score '
        "those commits apart too",
    )
    parser.add_argument(
        "--out",
        type=Path,
        help="folder for recall.md/.json/.png (default: docs/; with --limit, --before or "
        f"--generic: {QUICK_OUT.relative_to(REPO)}/)",
    )
    parser.add_argument(
        "--baseline",
        type=Path,
        help="an earlier recall.json to compare with (default: the one in --out, if any)",
    )
    parser.add_argument("--no-baseline", action="store_true", help="compare with nothing")
    parser.add_argument(
        "--save-contexts", type=Path, metavar="DIR", help="write every commit's context here"
    )
    parser.add_argument(
        "--bridge-src",
        type=Path,
        metavar="DIR",
        help="run the bridge package of another checkout (e.g. a git worktree of an older "
        "commit) instead of the installed one",
    )
    parser.add_argument("--no-uvloop", action="store_true", help="use the client on asyncio")
    args = parser.parse_args(argv)
    if args.bridge_src is not None and not (args.bridge_src / "bridge").is_dir():
        parser.error(f"--bridge-src: no bridge package in {args.bridge_src}")
    if args.limit is not None and args.limit < 1:
        parser.error("--limit must be at least 1")
    if args.before < 0:
        parser.error("--before must be at least 0")
    if not 0.0 <= args.generic <= 1.0:
        parser.error("--generic must be a share from 0 to 1")
    return args


def history_files(paths: Sequence[Path]) -> list[Path]:
    """The history files named: files as given, folders as their ``*.jsonl`` files."""
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            found += sorted(path.glob("*.jsonl"))
        elif path.is_file():
            found.append(path)
        else:
            raise BenchError(f"no history file or folder at {path}")
    if not found:
        raise BenchError(f"no history files in {', '.join(map(str, paths))}")
    return found


def revision(folder: Path) -> str | None:
    """The git commit of a checkout, with ``+changes`` when its bridge/ has uncommitted
    changes; None when it is not a git checkout."""
    try:
        head = subprocess.run(
            ["git", "-C", str(folder), "rev-parse", "--short=12", "HEAD"],
            capture_output=True, text=True, check=True, timeout=10,
        ).stdout.strip()  # fmt: skip
        dirty = subprocess.run(
            ["git", "-C", str(folder), "status", "--porcelain", "--", "bridge"],
            capture_output=True, text=True, check=True, timeout=10,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+changes" if dirty else "")


def command_line(argv: Sequence[str]) -> str:
    """How this run was started, for the report."""
    return " ".join([".venv/bin/python -m bench recall", *argv])


async def run(
    histories: Sequence[History],
    backends: Sequence[str],
    modes: Sequence[str],
    save: Path | None,
    source: Path | None,
) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Each backend in turn: the rows of all of them and each one's seconds."""
    rows: list[dict[str, Any]] = []
    seconds: dict[str, float] = {}
    for backend in backends:
        found, seconds[backend] = await run_backend(backend, histories, modes, save, source)
        rows += found
    return rows, seconds


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: replay, score, print the Markdown, write recall.md/.json/.png."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("websockets").setLevel(logging.ERROR)
    logging.getLogger("bm25s").setLevel(logging.WARNING)  # it logs every index it builds
    scored = SCORED if args.limit is None else args.limit
    whole = args.limit is None and not args.before and not args.generic  # what docs/ records
    out: Path = args.out or (DEFAULT_OUT if whole else QUICK_OUT)
    backends = list(BACKENDS) if args.backend == "all" else [args.backend]
    modes = list(MODES) if args.mode == "all" else [args.mode]
    started = dt.datetime.now(dt.UTC)
    try:
        began = time.perf_counter()
        histories = [
            prepare(p, scored, WARMUP, args.before, args.generic)
            for p in history_files(args.history)
        ]
        names = [h.name for h in histories]
        if len(set(names)) != len(names):
            raise BenchError(f"two histories share a name: {names}")
        for h in histories:
            d = h.description
            progress(
                f"recall: {h.name}: {d['commits']} commits, {d['usable']} usable, "
                f"{d['replayed']} replayed, {d['scored']} scored "
                f"(references took {time.perf_counter() - began:.1f} s so far)"
            )
        m = machine()
        (rows, seconds), uvloop_version = run_loop(
            run(histories, backends, modes, args.save_contexts, args.bridge_src),
            not args.no_uvloop,
        )
    except BenchError as e:
        print(f"bench recall: {e}", file=sys.stderr)
        return 1
    m["uvloop"] = uvloop_version
    m["line"] = (
        f"{m['cpu']}, {m['cores']} cores, {m['python']}, "
        f"{'uvloop ' + uvloop_version if uvloop_version else 'asyncio'}, "
        f"websockets {m['websockets']}"
    )
    baseline = None if args.no_baseline else (args.baseline or out / "recall.json")
    before = None
    if baseline is not None and baseline.is_file():
        with contextlib.suppress(ValueError, OSError):
            before = json.loads(baseline.read_text())
    results: dict[str, Any] = {
        "started": f"{started:%Y-%m-%d %H:%M} UTC",
        "command": command_line(argv),
        "machine": m,
        "params": {
            "warmup": WARMUP,
            "scored": scored,
            "before": args.before,
            "generic": args.generic,
            "top": TOP,
            "cut": CUT,
            "max_files": MAX_FILES,
            "version_bump": VERSION_BUMP.pattern,
            "backends": backends,
            "modes": modes,
        },
        "bridge": {
            "source": str(args.bridge_src or REPO),
            "revision": revision((args.bridge_src or REPO).resolve()),
        },
        "histories": {h.name: h.description for h in histories},
        "backend_seconds": seconds,
        "rows": rows,
    }
    text = markdown(results, before)
    out.mkdir(parents=True, exist_ok=True)
    (out / "recall.md").write_text(text, encoding="utf-8")
    (out / "recall.json").write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    plotted = plot(out / "recall.png", rows)
    print(text)
    wrote = ["recall.md", "recall.json"] + (["recall.png"] if plotted else [])
    progress(f"recall: wrote {', '.join(str(out / w) for w in wrote)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
