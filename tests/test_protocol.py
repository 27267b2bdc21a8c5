"""The wire schema, fed frames directly: no socket involved."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from bridge.errors import BadRequest
from bridge.wire.protocol import (
    Ack,
    ChatStart,
    Codec,
    Completion,
    Context,
    ErrorEvent,
    Export,
    FileWrite,
    Limits,
    Message,
    Ping,
    encode,
    error_ack,
)

LIMIT = 1 << 20


def frame(obj: Any, binary: bool) -> str | bytes:
    """Encode a client message the way a client would: MessagePack or JSON text."""
    return msgspec.msgpack.encode(obj) if binary else msgspec.json.encode(obj).decode()


@pytest.fixture(params=[False, True], ids=["json", "msgpack"])
def binary(request: pytest.FixtureRequest) -> bool:
    return bool(request.param)


def test_every_message_type_decodes(binary: bool) -> None:
    cases: list[tuple[dict[str, Any], type[Message]]] = [
        ({"type": "chat:start", "id": 1, "query": "q", "project": "p"}, ChatStart),
        ({"type": "file:write", "id": "a", "path": "src/a.py"}, FileWrite),
        ({"type": "completion", "task": "t", "duration_ms": 12.5, "tokens": 40}, Completion),
        ({"type": "export", "chunk_size": 5}, Export),
        ({"type": "ping"}, Ping),
    ]
    for obj, cls in cases:
        message = Codec(LIMIT).decode(frame(obj, binary))
        assert isinstance(message, cls)
        assert message.id == obj.get("id")


def test_unknown_fields_are_ignored(binary: bool) -> None:
    message = Codec(LIMIT).decode(frame({"type": "ping", "id": 7, "future": [1, 2]}, binary))
    assert message == Ping(id=7)


@pytest.mark.parametrize(
    ("obj", "needle", "echo"),
    [
        ({"type": "chat:start", "id": 1}, "`query`", 1),
        ({"type": "chat:start", "id": 2, "query": 5}, "$.query", 2),
        ({"type": "file:write", "id": "x", "path": ""}, "$.path", "x"),
        ({"type": "completion", "id": 3, "task": "t", "tokens": -1}, "$.tokens", 3),
        ({"type": "completion", "id": 4, "task": "t", "tokens": "many"}, "$.tokens", 4),
        ({"type": "teleport", "id": 5}, "`type` must be one of", 5),
        ({"id": 6, "query": "q"}, "`type`", 6),
        ({"type": "ping", "id": [1]}, "$.id", None),
        ({"type": "chat:start", "id": 7, "query": "x" * 70_000}, "$.query", 7),
        ({"type": "query", "id": 8, "query": "q", "limit": 0}, "$.limit", 8),
    ],
)
def test_invalid_messages_name_the_field(obj: Any, needle: str, echo: Any, binary: bool) -> None:
    with pytest.raises(BadRequest) as raised:
        Codec(LIMIT).decode(frame(obj, binary))
    assert needle in str(raised.value)
    assert raised.value.message_id == echo
    assert raised.value.code == "bad_request"


@pytest.mark.parametrize("bad", ["{not json", "[1, 2]", '"just a string"', ""])
def test_malformed_json(bad: str) -> None:
    with pytest.raises(BadRequest, match=r"JSON|object"):
        Codec(LIMIT).decode(bad)


@pytest.mark.parametrize("bad", [b"\xc1", b"\x93\x01\x02\x03", b"\x81\xa4type", b""])
def test_malformed_msgpack(bad: bytes) -> None:
    with pytest.raises(BadRequest, match=r"MessagePack|object"):
        Codec(LIMIT).decode(bad)


def test_oversize_frame_is_refused_before_parsing(binary: bool) -> None:
    big = frame({"type": "chat:start", "id": 1, "query": "x" * 2000}, binary)
    with pytest.raises(BadRequest, match="exceeds the limit of 1000 bytes"):
        Codec(1000).decode(big)


def test_replies_round_trip_in_both_encodings(binary: bool) -> None:
    reply = Context(id=1, hit=False, inject=None, elapsed_us=12)
    data = encode(reply, binary)
    decoded = (msgspec.msgpack.decode if binary else msgspec.json.decode)(data)
    assert decoded == {"type": "context", "id": 1, "hit": False, "inject": None, "elapsed_us": 12}


def test_acks_echo_null_id_and_omit_empty_error() -> None:
    ok = msgspec.json.decode(encode(Ack(id=None, ok=True, episode="e1"), False))
    assert ok == {"type": "ack", "id": None, "ok": True, "episode": "e1"}
    failed = msgspec.json.decode(encode(error_ack(9, BadRequest("field `x` is wrong")), False))
    assert failed["ok"] is False
    assert failed["id"] == 9
    assert failed["error"] == {
        "code": "bad_request",
        "message": "field `x` is wrong",
        "retryable": False,
    }


def test_internal_errors_do_not_leak_their_text() -> None:
    failed = error_ack(1, RuntimeError("secret path /etc/x"))
    assert failed.error is not None
    assert failed.error.code == "internal"
    assert "secret" not in failed.error.message


def test_configured_limits_are_part_of_the_schema(binary: bool) -> None:
    codec = Codec(limits=Limits(text=10, path=5, name=4))
    ok = codec.decode(frame({"type": "chat:start", "id": "abcd", "query": "0123456789"}, binary))
    assert isinstance(ok, ChatStart)  # still the protocol's class, for dispatch
    for obj, field in [
        ({"type": "chat:start", "query": "x" * 11}, "$.query"),
        ({"type": "file:write", "path": "abcdef"}, "$.path"),
        ({"type": "error", "message": "m", "project": "abcde"}, "$.project"),
        ({"type": "completion", "task": "t", "episode_id": "toolong"}, "$.episode_id"),
        ({"type": "ping", "id": "abcde"}, "$.id"),
    ]:
        with pytest.raises(BadRequest, match="length <= ") as raised:
            codec.decode(frame(obj, binary))
        assert field in str(raised.value)


def test_episode_messages_accept_an_episode_id(binary: bool) -> None:
    message = Codec(LIMIT).decode(
        frame({"type": "error", "message": "m", "episode_id": "e-1"}, binary)
    )
    assert isinstance(message, ErrorEvent) and message.episode_id == "e-1"


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        ({"tokens": 2**53 + 1}, "$.tokens"),
        ({"tokens": 2**64 - 1}, "$.tokens"),
        ({"tokens": float("inf")}, "$.tokens"),
        ({"duration_ms": float("inf")}, "$.duration_ms"),
        ({"duration_ms": float("-inf")}, "$.duration_ms"),
        ({"duration_ms": float("nan")}, "$.duration_ms"),
        ({"duration_ms": 1e30}, "$.duration_ms"),
        ({"at": float("inf")}, "$.at"),
        ({"at": float("nan")}, "$.at"),
        ({"at": 1e30}, "$.at"),
        ({"at": -1.0}, "$.at"),
    ],
)
def test_counts_and_times_are_bounded_and_finite(
    fields: dict[str, Any], needle: str, binary: bool
) -> None:
    obj = {"type": "completion", "id": 1, "task": "t", **fields}
    if binary:
        data: str | bytes = msgspec.msgpack.encode(obj)
    else:  # JSON has no Infinity or NaN; a number too large for a double stands for them
        text = msgspec.json.encode({k: 0 if k in fields else v for k, v in obj.items()}).decode()
        for key, value in fields.items():
            number = {"inf": "1e400", "-inf": "-1e400", "nan": "1e400"}.get(str(value))
            text = text.replace(f'"{key}":0', f'"{key}":{number or repr(value)}')
        data = text
    with pytest.raises(BadRequest) as raised:
        Codec(LIMIT).decode(data)
    assert needle in str(raised.value)
    assert raised.value.message_id == 1


def test_json_counts_far_past_any_float_are_refused() -> None:
    for field in ("tokens", "duration_ms"):
        with pytest.raises(BadRequest, match=rf"\$\.{field}"):
            Codec(LIMIT).decode(f'{{"type":"completion","task":"t","{field}":{10**30}}}')


def test_counts_and_times_at_their_bounds_are_accepted(binary: bool) -> None:
    obj = {"type": "completion", "task": "t", "tokens": 2**53, "duration_ms": 1e14, "at": 1e11}
    message = Codec(LIMIT).decode(frame(obj, binary))
    assert isinstance(message, Completion)
    assert (message.tokens, message.duration_ms, message.at) == (2**53, 1e14, 1e11)
