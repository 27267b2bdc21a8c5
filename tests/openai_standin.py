"""A stand-in OpenAI-compatible API server on loopback, for tests only.

This machine cannot reach a remote LLM API, so the graphiti backend's LLM mode and the real
OpenCode are tested against this server instead: graphiti-core's real OpenAI clients and
OpenCode's real provider talk real HTTP to it on 127.0.0.1. It is the only stand-in in the
test suite; the graph database, graphiti-core and OpenCode itself always run for real.

It serves the two endpoints Graphiti's OpenAI-compatible clients use:

- ``POST /v1/chat/completions``: Graphiti asks for structured output with a
  ``response_format`` of type ``json_schema`` whose ``name`` is the pydantic model it
  expects (``ExtractedEntities``, ``ExtractedEdges``, ``NodeResolutions``, ...). The server
  answers each with minimal JSON valid for that model, computed by a tiny deterministic
  "extractor": the entities of a text are its identifier-like words (``parser.ts``,
  ``TypeError``, ``snake_case``), and each pair of consecutive entities yields the fact
  ``"{a} is linked to {b}"``. Models it does not know are answered with ``{}``.
- ``POST /v1/embeddings``: a deterministic bag-of-words vector (each word hashed into one of
  ``dim`` buckets, then normalised), so texts sharing words are cosine-similar.

It also stands in for the model of a coding agent (OpenCode's chat requests, which offer
``tools`` and ask for a ``stream``): ``GET /v1/models`` lists one model, and a chat is
answered from a script (``script()``: for a prompt, the steps of the turn, each a text or
tool calls; OpenCode runs the tools and asks again, and the next step answers), streamed as
server-sent events when asked to. A chat no script matches gets a short text.

Every request is recorded. ``pause()`` holds requests until ``resume()`` (bounded, then
503) and ``delay`` slows every answer, so tests can keep an ingest queue busy.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Final

from bridge.memory.graph_settings import LlmSettings

IDENTIFIER = re.compile(r"[A-Za-z_][\w.]*\w")
WORD = re.compile(r"\w+")
SECTION = r"<{tag}>\s*(.*?)\s*</{tag}>"
PAUSE_LIMIT_S = 60.0


def entities_in(text: str) -> list[str]:
    """Identifier-like words of ``text`` (with a dot, an underscore or an inner capital)."""
    found: list[str] = []
    for word in IDENTIFIER.findall(text):
        if ("." in word or "_" in word or any(c.isupper() for c in word[1:])) and (
            word not in found
        ):
            found.append(word)
    return found


def fact(source: str, target: str) -> str:
    """The fact the stand-in extracts for two consecutive entities."""
    return f"{source} is linked to {target}"


def embed(text: str, dim: int) -> list[float]:
    """A deterministic, normalised bag-of-words vector of ``text``."""
    vector = [0.0] * dim
    for word in WORD.findall(text.lower()):
        bucket = int.from_bytes(hashlib.sha256(word.encode()).digest()[:4], "big") % dim
        vector[bucket] += 1.0
    norm = math.sqrt(sum(v * v for v in vector)) or 1.0
    return [v / norm for v in vector]


def _section(text: str, *tags: str) -> str | None:
    for tag in tags:
        match = re.search(SECTION.format(tag=re.escape(tag)), text, re.DOTALL)
        if match:
            return match.group(1)
    return None


def _json_section(text: str, tag: str) -> list[dict[str, Any]]:
    raw = _section(text, tag)
    if raw is None:
        return []
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        return []
    return [item for item in value if isinstance(item, dict)] if isinstance(value, list) else []


def answer(schema: str | None, prompt: str) -> dict[str, Any]:
    """Minimal valid JSON for the response model ``schema``, given the whole prompt text."""
    current = _section(prompt, "CURRENT MESSAGE", "CURRENT_MESSAGE", "TEXT", "JSON") or ""
    if schema == "ExtractedEntities":
        names = entities_in(current)
        return {
            "extracted_entities": [
                {"name": name, "entity_type_id": 0, "episode_indices": [0]} for name in names
            ]
        }
    if schema == "ExtractedEdges":
        known = {str(node.get("name")) for node in _json_section(prompt, "ENTITIES")}
        names = [name for name in entities_in(current) if name in known]
        return {
            "edges": [
                {
                    "source_entity_name": a,
                    "target_entity_name": b,
                    "relation_type": "IS_LINKED_TO",
                    "fact": fact(a, b),
                    "episode_indices": [0],
                }
                for a, b in itertools.pairwise(names)
            ]
        }
    if schema == "NodeResolutions":
        return {
            "entity_resolutions": [
                {
                    "id": node.get("id", i),
                    "name": node.get("name", ""),
                    "duplicate_candidate_id": -1,
                }
                for i, node in enumerate(_json_section(prompt, "ENTITIES"))
            ]
        }
    if schema == "NodeDuplicate":
        return {"id": 0, "name": "", "duplicate_candidate_id": -1}
    if schema == "EdgeDuplicate":
        return {"duplicate_facts": [], "contradicted_facts": []}
    if schema == "SummarizedEntities":
        return {"summaries": []}
    if schema == "BatchEdgeTimestamps":
        return {"timestamps": [{} for _ in _json_section(prompt, "FACTS")]}
    if schema in ("Summary", "SagaSummary"):
        return {"summary": current[:200]}
    if schema == "SummaryDescription":
        return {"description": current[:100]}
    return {}


@dataclass(frozen=True)
class ToolCall:
    """A call of one of the agent's tools, as the model asks for it."""

    name: str
    arguments: dict[str, Any]


@dataclass(frozen=True)
class Step:
    """One answer of the scripted model: a text, or tool calls (the agent runs them and asks
    again, with their results)."""

    text: str = ""
    calls: tuple[ToolCall, ...] = ()
    usage: dict[str, int] = field(
        default_factory=lambda: {"prompt_tokens": 30, "completion_tokens": 4, "total_tokens": 34}
    )


DEFAULT_STEP: Final = Step(text="Noted.")


def user_texts(message: dict[str, Any]) -> list[str]:
    """The text parts of one chat message."""
    content = message.get("content")
    if isinstance(content, str):
        return [content]
    return [str(p.get("text", "")) for p in content or [] if p.get("type") == "text"]


def is_memory(message: dict[str, Any]) -> bool:
    """A memory context the agent added as a message of its own (not the user's turn)."""
    texts = user_texts(message)
    return bool(texts) and all(text.startswith("[Memory Context]") for text in texts)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        return None  # a client that gave up on a held request: nothing to report


@dataclass(frozen=True)
class Recorded:
    """One request the stand-in received."""

    path: str
    schema: str | None
    body: dict[str, Any]


class OpenAIStandin:
    """The stand-in server, run on a daemon thread; ``base_url`` is what clients use."""

    def __init__(self, *, host: str = "127.0.0.1", dim: int = 64) -> None:
        self.dim = dim
        self.delay = 0.0
        self.requests: list[Recorded] = []
        self._open = threading.Event()
        self._open.set()
        self._lock = threading.Lock()
        self._server = _Server((host, 0), self._handler_class())
        self._thread: threading.Thread | None = None
        self._scripts: dict[str, tuple[Step, ...]] = {}

    @property
    def base_url(self) -> str:
        """The OpenAI ``base_url`` of this server (with the ``/v1`` prefix)."""
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}/v1"

    def settings(self) -> LlmSettings:
        """The graphiti backend's LLM and embedder settings that point at this server."""
        return LlmSettings(
            api_key="standin-key",
            base_url=self.base_url,
            model="standin-model",
            small_model="standin-small",
            embedding_model="standin-embedding",
            embedding_dim=self.dim,
        )

    def start(self) -> None:
        """Serve on a background thread."""
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), name="openai-standin", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """Release held requests, stop serving and close the socket."""
        self._open.set()
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def pause(self) -> None:
        """Hold every request until ``resume`` (at most PAUSE_LIMIT_S, then answer 503)."""
        self._open.clear()

    def resume(self) -> None:
        """Let held and new requests through."""
        self._open.set()

    def script(self, prompt: str, *steps: Step) -> None:
        """Answer the agent's chat turn for ``prompt`` with ``steps``: the first answers the
        request that ends with the user's message, each next one the request after the
        previous step's tool calls. A user text part matches when it is ``prompt`` (OpenCode's
        ``run`` may put it in quotes); other parts of the message (an injected context that
        quotes an earlier prompt, say) do not."""
        with self._lock:
            self._scripts[prompt.strip()] = steps

    def chats(self) -> list[dict[str, Any]]:
        """The agent's chat requests so far (those that offered tools), in order."""
        with self._lock:
            return [r.body for r in self.requests if r.body.get("tools")]

    def schemas(self) -> list[str | None]:
        """The response models asked for by chat completions so far, in order."""
        with self._lock:
            return [r.schema for r in self.requests if r.path.endswith("/chat/completions")]

    def count(self, suffix: str) -> int:
        """How many requests went to a path ending with ``suffix``."""
        with self._lock:
            return sum(1 for r in self.requests if r.path.endswith(suffix))

    def _record(self, recorded: Recorded) -> None:
        with self._lock:
            self.requests.append(recorded)

    def _step(self, body: dict[str, Any]) -> Step:
        """The scripted answer to an agent's chat request."""
        messages = body.get("messages") or []
        users = [i for i, m in enumerate(messages) if m.get("role") == "user" and not is_memory(m)]
        if not body.get("tools") or not users:
            return DEFAULT_STEP
        last = users[-1]
        done = sum(1 for m in messages[last:] if m.get("role") == "assistant")
        with self._lock:
            for text in user_texts(messages[last]):
                steps = self._scripts.get(text.strip().strip('"').strip())
                if steps is not None:
                    return steps[done] if done < len(steps) else DEFAULT_STEP
        return DEFAULT_STEP

    def _agent_chat(self, body: dict[str, Any]) -> dict[str, Any] | list[dict[str, Any]]:
        """An agent's chat request: the scripted step, one JSON answer or stream chunks."""
        step = self._step(body)
        calls = [
            {
                "index": i,
                "id": f"call_{uuid.uuid4().hex[:16]}",
                "type": "function",
                "function": {"name": call.name, "arguments": json.dumps(call.arguments)},
            }
            for i, call in enumerate(step.calls)
        ]
        delta: dict[str, Any] = {"tool_calls": calls} if calls else {"content": step.text}
        finish = "tool_calls" if calls else "stop"
        head = {"id": "chatcmpl-standin", "created": int(time.time()), "model": "standin"}
        if not body.get("stream"):
            message = {"role": "assistant", **delta}
            choice = {"index": 0, "message": message, "finish_reason": finish}
            return {**head, "object": "chat.completion", "choices": [choice], "usage": step.usage}
        chunk = {**head, "object": "chat.completion.chunk"}
        return [
            {**chunk, "choices": [{"index": 0, "delta": {"role": "assistant", **delta}}]},
            {
                **chunk,
                "choices": [{"index": 0, "delta": {}, "finish_reason": finish}],
                "usage": step.usage,
            },
        ]

    def _respond(
        self, path: str, body: dict[str, Any]
    ) -> tuple[int, dict[str, Any] | list[dict[str, Any]]]:
        if not self._open.wait(PAUSE_LIMIT_S):
            return 503, {"error": {"message": "paused", "type": "server_error"}}
        if self.delay:
            time.sleep(self.delay)
        if path.endswith("/embeddings"):
            self._record(Recorded(path, None, body))
            inputs = body.get("input", [])
            texts = [inputs] if isinstance(inputs, str) else [str(i) for i in inputs]
            data = [
                {"object": "embedding", "index": i, "embedding": embed(text, self.dim)}
                for i, text in enumerate(texts)
            ]
            usage = {"prompt_tokens": 1, "total_tokens": 1}
            return 200, {"object": "list", "data": data, "model": body.get("model"), "usage": usage}
        if path.endswith("/chat/completions"):
            fmt = body.get("response_format") or {}
            schema = (fmt.get("json_schema") or {}).get("name")
            self._record(Recorded(path, schema, body))
            if body.get("tools") or body.get("stream"):
                return 200, self._agent_chat(body)
            prompt = "\n".join(str(m.get("content", "")) for m in body.get("messages", []))
            content = json.dumps(answer(schema, prompt))
            return 200, {
                "id": "chatcmpl-standin",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": body.get("model", "standin"),
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": content},
                        "finish_reason": "stop",
                    }
                ],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
            }
        self._record(Recorded(path, None, body))
        return 404, {"error": {"message": f"no route {path}", "type": "invalid_request_error"}}

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        standin = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                if self.path.rstrip("/").endswith("/models"):
                    models = [{"id": "standin", "object": "model", "owned_by": "standin"}]
                    self._json(200, {"object": "list", "data": models})
                else:
                    error = {"message": f"no route {self.path}", "type": "invalid_request_error"}
                    self._json(404, {"error": error})

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                try:
                    body = json.loads(self.rfile.read(length) or b"{}")
                except json.JSONDecodeError:
                    body = {}
                status, reply = standin._respond(self.path, body)
                if isinstance(reply, list):
                    self._stream(reply)
                else:
                    self._json(status, reply)

            def _stream(self, chunks: list[dict[str, Any]]) -> None:
                """Server-sent events: one ``data:`` line per chunk, then ``[DONE]``."""
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Cache-Control", "no-cache")
                self.send_header("Connection", "close")
                self.end_headers()
                for chunk in chunks:
                    self.wfile.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
                self.wfile.write(b"data: [DONE]\n\n")
                self.wfile.flush()
                self.close_connection = True

            def _json(self, status: int, reply: dict[str, Any]) -> None:
                data = json.dumps(reply).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                return None

        return Handler
