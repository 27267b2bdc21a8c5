"""The memory page's routes, served on the bridge's own port (see bridge/wire/server.py).

::

    GET  /memory                  the page (and /memory/memory.js, /memory/memory.css)
    GET  /memory/api/projects     {"projects": [...], "default": "..."}, most recent first
    GET  /memory/api/tasks        ?project=P[&before=SEQ][&limit=N]: {"tasks": [...],
                                  "next": SEQ or null}, newest first, a page at a time
    GET  /memory/api/search       ?project=P&q=TEXT: {"files": [...], "tasks": [...]},
                                  ranked as a chat:start's context ranks them
    POST /memory/api/forget       ?project=P&task=UUID (or episode, path, session; exactly
                                  one, as the forget message): {"forgotten": N}

The page and its two files hold nothing and need nothing. The API:

- with a token configured, answers only calls carrying ``Authorization: Bearer <token>``
  (401 otherwise): the page asks for the token in a form and sends it in that header,
  never in a URL;
- without a token (then the bridge listens on loopback alone), answers only calls whose
  ``Host`` is a loopback address, so a page of another site whose name resolves to
  127.0.0.1 gets nothing, and that carry ``X-Memory-Page: 1``, which a page of another
  origin cannot send without a CORS preflight that this server never grants;
- refuses a forget whose ``Origin``, if sent, is not the page's own.

Nothing here touches a socket: the server hands in the method, target and headers, and
writes the HttpReply.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable
from importlib import resources
from typing import Any, Final
from urllib.parse import parse_qs

import msgspec

from bridge.errors import BadRequest, BridgeError
from bridge.memory.base import Selector
from bridge.wire.handlers import Handlers
from bridge.wire.protocol import Forget, Limits

log = logging.getLogger(__name__)

PAGE_SIZE: Final = 50
MAX_PAGE_SIZE: Final = 200
TASKS_FOUND: Final = 20  # tasks a search shows
PAGE_HEADER: Final = "X-Memory-Page"
LOOPBACK_NAMES: Final = frozenset({"localhost", "localhost."})
STATUS: Final = {"bad_request": 400, "memory_unavailable": 503, "overloaded": 503}
SECURITY_HEADERS: Final = {
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}
PAGE_POLICY: Final = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'"
)
ASSETS: Final = {
    "/memory": ("memory.html", "text/html; charset=utf-8"),
    "/memory/": ("memory.html", "text/html; charset=utf-8"),
    "/memory/memory.js": ("memory.js", "text/javascript; charset=utf-8"),
    "/memory/memory.css": ("memory.css", "text/css; charset=utf-8"),
}
_encode = msgspec.json.Encoder().encode

Headers = Callable[[str], list[str]]  # every value of one header, by name


class HttpReply(msgspec.Struct, frozen=True):
    """What to answer: a status, a body, its type, and headers besides the usual."""

    status: int
    body: bytes
    content_type: str = "application/json"
    headers: dict[str, str] = {}


class Refused(Exception):
    """A call the API does not answer: its status and why."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


def is_page_path(path: str) -> bool:
    """True for the paths this module serves."""
    return path == "/memory" or path.startswith("/memory/")


class MemoryPage:
    """The page's routes over the handlers' memory calls."""

    def __init__(
        self,
        handlers: Handlers,
        *,
        default_project: str,
        limits: Limits,
        authorized: Callable[[str], bool] | None,
        loopback: bool,
    ) -> None:
        """``authorized`` checks an Authorization header when a token is configured (None
        when there is none); ``loopback`` says the bridge listens on loopback alone."""
        self.handlers = handlers
        self.default_project = default_project
        self.limits = limits
        self._authorized = authorized
        self._loopback = loopback
        self._forget = msgspec.json.Decoder(Forget)
        folder = resources.files("bridge.wire.web")
        self._assets = {
            path: (folder.joinpath(name).read_bytes(), kind)
            for path, (name, kind) in ASSETS.items()
        }

    async def handle(self, method: str, path: str, query: str, headers: Headers) -> HttpReply:
        """Answer one request for a path under /memory."""
        if path in self._assets:
            if method != "GET":
                return _error(405, f"{path} answers GET only", {"Allow": "GET"})
            body, kind = self._assets[path]
            extra = {"Content-Security-Policy": PAGE_POLICY} if kind.startswith("text/html") else {}
            return HttpReply(200, body, kind, SECURITY_HEADERS | extra)
        routes = {
            "/memory/api/projects": ("GET", self._projects),
            "/memory/api/tasks": ("GET", self._tasks),
            "/memory/api/search": ("GET", self._search),
            "/memory/api/forget": ("POST", self._forget_one),
        }
        if path not in routes:
            return _error(404, f"no such page: {path}")
        wanted, route = routes[path]
        if method != wanted:
            return _error(405, f"{path} answers {wanted} only", {"Allow": wanted})
        try:
            self._admit(method, headers)
            params = _params(query)
            answer = await route(params)
        except Refused as e:
            challenge = {"WWW-Authenticate": 'Bearer realm="graphiti-bridge"'}
            return _error(e.status, str(e), challenge if e.status == 401 else {})
        except BridgeError as e:
            status = STATUS.get(e.code, 500)
            if status == 500:
                log.exception("memory page: %s failed", path)
            return _error(status, str(e) if status != 500 else "internal error")
        except Exception:  # a bug: said in the log, not to the page
            log.exception("memory page: %s failed unexpectedly", path)
            return _error(500, "internal error")
        return HttpReply(200, _encode(answer), headers=SECURITY_HEADERS)

    # -- access ---------------------------------------------------------------------------

    def _admit(self, method: str, headers: Headers) -> None:
        """Raise Refused unless this call may be answered (see the module docstring)."""
        if self._authorized is not None:
            given = headers("Authorization")
            if len(given) > 1:
                raise Refused(400, "more than one Authorization header")
            if not given or not self._authorized(given[0]):
                raise Refused(401, "missing or wrong token")
        elif not self._loopback:
            raise Refused(403, "the memory page needs a token when the bridge is not on loopback")
        else:
            if headers(PAGE_HEADER) != ["1"]:
                raise Refused(403, f"a call from the memory page carries {PAGE_HEADER}: 1")
            if not _is_loopback_host(_one(headers, "Host")):
                raise Refused(403, "without a token, the memory page answers loopback hosts only")
        if method == "POST":
            origin = headers("Origin")
            host = _one(headers, "Host")
            if origin and origin != [f"http://{host}"] and origin != [f"https://{host}"]:
                raise Refused(403, "a forget from another origin")

    # -- routes ---------------------------------------------------------------------------

    async def _projects(self, params: dict[str, str]) -> dict[str, Any]:
        projects = await self.handlers.projects()
        return {"projects": projects, "default": self.default_project}

    async def _tasks(self, params: dict[str, str]) -> dict[str, Any]:
        project = self._project(params)
        limit = _integer(params, "limit", PAGE_SIZE, 1, MAX_PAGE_SIZE)
        before = _integer(params, "before", None, 1, 2**62)
        tasks = await self.handlers.list_tasks(project, limit, before)
        more = len(tasks) == limit and tasks[-1].seq > 1
        return {"project": project, "tasks": tasks, "next": tasks[-1].seq if more else None}

    async def _search(self, params: dict[str, str]) -> dict[str, Any]:
        project = self._project(params)
        text = params.get("q", "")
        if len(text) > self.limits.text:
            raise BadRequest(f"`q` is longer than {self.limits.text} characters")
        ranked = await self.handlers.search(project, text)
        return {"project": project, "files": ranked.files, "tasks": ranked.tasks[:TASKS_FOUND]}

    async def _forget_one(self, params: dict[str, str]) -> dict[str, Any]:
        project = self._project(params)
        chosen = {k: v for k, v in params.items() if k in ("episode", "path", "session", "task")}
        unknown = sorted(set(params) - set(chosen) - {"project"})
        if unknown:
            raise BadRequest(f"unknown parameter `{unknown[0]}`")
        try:  # the same checks as the forget message's
            message = self._forget.decode(_encode({"type": "forget", **chosen}))
        except msgspec.ValidationError as e:
            raise BadRequest(str(e)) from e
        kind, value = message.selector
        if len(value) > (self.limits.path if kind == "path" else self.limits.name):
            raise BadRequest(f"`{kind}` is too long")
        forgotten = await self.handlers.forget(project, Selector(kind, value))
        return {"project": project, "forgotten": forgotten}

    def _project(self, params: dict[str, str]) -> str:
        project = params.get("project") or self.default_project
        if len(project) > self.limits.name:
            raise BadRequest(f"`project` is longer than {self.limits.name} characters")
        return project


def _params(query: str) -> dict[str, str]:
    """The query string's parameters; each at most once."""
    try:
        parsed = parse_qs(query, keep_blank_values=True, max_num_fields=16, errors="strict")
    except (ValueError, UnicodeDecodeError) as e:
        raise BadRequest(f"unreadable query string: {e}") from e
    for name, values in parsed.items():
        if len(values) > 1:
            raise BadRequest(f"`{name}` given more than once")
    return {name: values[0] for name, values in parsed.items()}


def _integer(params: dict[str, str], name: str, default: Any, low: int, high: int) -> Any:
    if name not in params:
        return default
    text = params[name]
    if not text.isdigit() or not low <= int(text) <= high:
        raise BadRequest(f"`{name}` must be an integer from {low} to {high}, got {text!r}")
    return int(text)


def _one(headers: Headers, name: str) -> str:
    values = headers(name)
    return values[0] if len(values) == 1 else ""


def _is_loopback_host(host: str) -> bool:
    """True when a Host header names this machine by a loopback name or address."""
    name = host.rsplit(":", 1)[0] if host.count(":") == 1 or host.startswith("[") else host
    name = name.strip("[]").lower()
    if name in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _error(status: int, reason: str, headers: dict[str, str] | None = None) -> HttpReply:
    body = _encode({"error": reason})
    return HttpReply(status, body, headers=SECURITY_HEADERS | (headers or {}))
