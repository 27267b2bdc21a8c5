"""Wire protocol v1: the messages, their schema, and the shared codecs.

One message per WebSocket frame. A text frame holds one JSON object, a binary frame one
MessagePack map; a reply uses the encoding of the frame it answers. Client messages form a
tagged union on the field ``type``; validation is the schema itself (msgspec), so a bad
message is refused with an error that names the offending field.

Schema evolution: new fields get defaults; a field's type never changes. Unknown fields are
ignored, so newer clients can talk to older servers.

See docs/protocol.md for the contract with examples.
"""

from __future__ import annotations

from typing import Annotated, Any, Final, Literal, Union, cast

import msgspec

# The sizes, defined in bridge.bounds; the schema's, so named here too.
from bridge.bounds import MAX_FRAME as MAX_FRAME
from bridge.bounds import MAX_NAME as MAX_NAME
from bridge.bounds import MAX_PATH as MAX_PATH
from bridge.bounds import MAX_TEXT as MAX_TEXT
from bridge.episode import Episode
from bridge.errors import BadRequest

PROTOCOL_VERSION: Final = 1


MessageId = int | Annotated[str, msgspec.Meta(max_length=MAX_NAME)] | None
Text = Annotated[str, msgspec.Meta(max_length=MAX_TEXT)]
Path = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_PATH)]
Name = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_NAME)]
# Counts and times are bounded so that every stored value survives any codec: JSON allows
# 10**30 and Infinity-like values that MessagePack and SQLite cannot carry back.
MAX_COUNT: Final = 2**53  # integers exact in every JSON reader
MAX_SECONDS: Final = 1e11  # seconds since the epoch or durations: past year 5000
NonNegativeInt = Annotated[int, msgspec.Meta(ge=0, le=MAX_COUNT)]
NonNegativeFloat = Annotated[float, msgspec.Meta(ge=0, le=MAX_SECONDS * 1000)]
Timestamp = Annotated[float, msgspec.Meta(ge=0, le=MAX_SECONDS)]


# -- client -> server -------------------------------------------------------------------


class ClientMessage(msgspec.Struct, tag_field="type", kw_only=True, frozen=True):
    """Fields every client message may carry."""

    id: MessageId = None
    project: Name | None = None
    session: Name | None = None


class ChatStart(ClientMessage, tag="chat:start", frozen=True):
    """A new chat turn: answer with the memory context to inject."""

    query: Text


class EpisodeMessage(ClientMessage, frozen=True, kw_only=True):
    """A message that becomes an episode. ``episode_id`` makes resending it harmless: the
    same id in the same project is stored once, however often it arrives. ``at`` is when
    the event happened (default: when it arrived; a time in the future counts as now)."""

    episode_id: Name | None = None
    at: Timestamp | None = None  # when it happened (seconds since the epoch, UTC)


class FileWrite(EpisodeMessage, tag="file:write", frozen=True):
    """OpenCode wrote a file: remember it and drop cached contexts that name it."""

    path: Path


class ErrorEvent(EpisodeMessage, tag="error", frozen=True):
    """OpenCode hit an error: remember it and raise a Datadog event."""

    message: Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_TEXT)]


class Completion(EpisodeMessage, tag="completion", frozen=True):
    """A task finished: remember it and count its tokens. ``summary`` is the assistant's
    final answer, if the client can read it; longer than the text limit, it is clipped."""

    task: Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_TEXT)]
    duration_ms: NonNegativeFloat = 0.0
    tokens: NonNegativeInt = 0
    summary: str | None = None


class Query(ClientMessage, tag="query", frozen=True):
    """Search memory directly, bypassing the cache."""

    query: Text
    limit: Annotated[int, msgspec.Meta(ge=1, le=100)] = 10


class Export(ClientMessage, tag="export", frozen=True):
    """Stream every episode of the project back in chunks."""

    chunk_size: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 100


class Ping(ClientMessage, tag="ping", frozen=True):
    """Liveness check; answered with ``pong``."""


class Note(EpisodeMessage, tag="note", frozen=True):
    """A memory saved on purpose (by the agent's tool or a person): a task of its own."""

    text: Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_TEXT)]


SelectorName = Literal["episode", "path", "session", "task"]
FORGET_SELECTORS: Final[tuple[SelectorName, ...]] = ("episode", "path", "session", "task")


class Forget(ClientMessage, tag="forget", frozen=True):
    """Forget memory of the project: one episode, every episode and link of a file, every
    task of a session, or one task. Exactly one selector; ``session`` is one of them here,
    not the message's session."""

    episode: Name | None = None
    path: Path | None = None
    task: Name | None = None

    def __post_init__(self) -> None:
        given = [f"`{name}`" for name in FORGET_SELECTORS if getattr(self, name) is not None]
        if len(given) != 1:
            which = " and ".join(given) if given else "none"
            raise ValueError(
                f"forget needs exactly one of `episode`, `path`, `session` or `task`; got {which}"
            )

    @property
    def selector(self) -> tuple[SelectorName, str]:
        """The selector given: its name and value."""
        for name in FORGET_SELECTORS:
            value = getattr(self, name)
            if value is not None:
                return name, value
        raise AssertionError("a Forget always has one selector")  # __post_init__ saw to it


Message = ChatStart | FileWrite | ErrorEvent | Completion | Query | Export | Ping | Note | Forget


# -- server -> client -------------------------------------------------------------------


class Reply(msgspec.Struct, tag_field="type"):
    """Fields every reply carries: the ``id`` of the message it answers (or null)."""

    id: int | str | None


class Context(Reply, tag="context"):
    """Answer to chat:start. ``hit`` is true only when the context came from the cache."""

    hit: bool
    inject: str | None
    elapsed_us: int


class ErrorInfo(msgspec.Struct):
    """Why a request failed: a stable code and a message naming what was wrong."""

    code: str
    message: str
    retryable: bool = False


class Ack(Reply, tag="ack", omit_defaults=True):
    """Outcome of an event. On success ``episode`` is the stored episode's id, and
    ``queued`` is true when it is durable in the outbox, not yet in memory; a forget's
    ``forgotten`` is how many episodes memory let go of."""

    ok: bool
    episode: str | None = None
    queued: bool = False
    forgotten: int | None = None
    error: ErrorInfo | None = None


class QueryResult(Reply, tag="result"):
    """Answer to query: the matching episodes, best first, and ``context``: the memory
    context a chat:start with the same query would get from memory (null: memory has
    nothing for it)."""

    episodes: list[Episode]
    context: str | None = None


class ExportChunk(Reply, tag="export:chunk"):
    """One chunk of an export, numbered from 0."""

    seq: int
    episodes: list[Episode]


class ExportEnd(Reply, tag="export:end"):
    """Last message of an export: how many episodes were sent."""

    count: int


class Pong(Reply, tag="pong"):
    """Answer to ping."""

    version: int = PROTOCOL_VERSION


ServerMessage = Context | Ack | QueryResult | ExportChunk | ExportEnd | Pong


def error_ack(message_id: int | str | None, error: Exception) -> Ack:
    """The ok:false ack for a failed request."""
    code = getattr(error, "code", "internal")
    retryable = bool(getattr(error, "retryable", False))
    text = str(error) if code != "internal" else "internal error"
    return Ack(id=message_id, ok=False, error=ErrorInfo(code, text, retryable))


# -- codecs -----------------------------------------------------------------------------


class _IdProbe(msgspec.Struct):
    id: Any = None


_json_probe: Final = msgspec.json.Decoder(_IdProbe)
_msgpack_probe: Final = msgspec.msgpack.Decoder(_IdProbe)
_json_encoder: Final = msgspec.json.Encoder()
_msgpack_encoder: Final = msgspec.msgpack.Encoder()


def _probe_id(frame: str | bytes) -> int | str | None:
    """Best-effort read of ``id`` from a frame that failed validation, for the error reply."""
    try:
        probe = (
            _json_probe.decode(frame) if isinstance(frame, str) else _msgpack_probe.decode(frame)
        )
    except (msgspec.DecodeError, ValueError, RecursionError):
        return None
    value = probe.id
    if isinstance(value, bool) or not isinstance(value, int | str):
        return None
    if isinstance(value, str) and len(value) > MAX_NAME:
        return None
    return value


class Limits(msgspec.Struct, frozen=True, kw_only=True):
    """Per-field length limits, in characters."""

    text: int = MAX_TEXT  # query, message, task
    path: int = MAX_PATH  # path
    name: int = MAX_NAME  # id, project, session, episode_id


def _limited(base: type[ClientMessage], limits: Limits) -> type[ClientMessage]:
    """``base`` with its string fields re-declared under ``limits`` (same tag, same class
    for ``isinstance``), so the limits stay part of the schema."""

    def bounded(limit: int, min_length: int = 0) -> Any:
        return Annotated[str, msgspec.Meta(min_length=min_length, max_length=limit)]

    name = bounded(limits.name, 1)
    redefined: dict[str, Any] = {
        "id": int | bounded(limits.name),
        "project": name,
        "session": name,
        "episode_id": name,
        "episode": name,
        "query": bounded(limits.text),
        "message": bounded(limits.text, 1),
        "text": bounded(limits.text, 1),
        # a completion's task is its text; a forget's names a task
        "task": name if base is Forget else bounded(limits.text, 1),
        "path": bounded(limits.path, 1),
    }
    fields = []
    for field in msgspec.structs.fields(base):
        if field.name in redefined:  # an optional field stays optional
            kind = redefined[field.name]
            optional = field.required is False
            fields.append((field.name, kind | None if optional else kind, field.default))
    limited = msgspec.defstruct(
        base.__name__,
        fields,
        bases=(base,),
        tag=base.__struct_config__.tag,
        frozen=True,
        kw_only=True,
    )
    return cast(type[ClientMessage], limited)


class Codec:
    """Decoders for one frame-size limit and one set of field limits, built once."""

    def __init__(self, max_frame: int = MAX_FRAME, limits: Limits | None = None) -> None:
        self.max_frame = max_frame
        schema: Any = Message
        if limits is not None and limits != Limits():
            schema = Union[tuple(_limited(m, limits) for m in Message.__args__)]  # noqa: UP007
        self._json = msgspec.json.Decoder(schema)
        self._msgpack = msgspec.msgpack.Decoder(schema)

    def decode(self, frame: str | bytes) -> Message:
        """Decode one frame (text: JSON, binary: MessagePack) into a client message.

        Raises BadRequest, carrying the message id when it could be read, if the frame is
        larger than ``max_frame``, is not valid JSON/MessagePack, or fails the schema.
        """
        if len(frame) > self.max_frame:
            raise BadRequest(
                f"frame of {len(frame)} bytes exceeds the limit of {self.max_frame} bytes"
            )
        try:
            if isinstance(frame, str):
                message: Message = self._json.decode(frame)
            else:
                message = self._msgpack.decode(frame)
            return message
        except msgspec.ValidationError as e:
            raise BadRequest(_explain(str(e)), message_id=_probe_id(frame)) from e
        except (msgspec.DecodeError, UnicodeDecodeError) as e:
            kind = "JSON" if isinstance(frame, str) else "MessagePack"
            raise BadRequest(f"invalid {kind}: {e}") from e
        except RecursionError as e:
            raise BadRequest("message nested too deeply") from e


def _explain(msgspec_error: str) -> str:
    """Make msgspec's message about the ``type`` tag say what the valid types are."""
    if "`$.type`" in msgspec_error or "missing required field `type`" in msgspec_error:
        names = ", ".join(repr(m.__struct_config__.tag) for m in Message.__args__)
        return f"{msgspec_error}; `type` must be one of {names}"
    return msgspec_error


def encode(reply: Reply, binary: bool) -> bytes:
    """Encode a reply: MessagePack for a binary frame, JSON (UTF-8 bytes) for a text frame."""
    return _msgpack_encoder.encode(reply) if binary else _json_encoder.encode(reply)
