"""The bridge's exception tree.

Every error the bridge reports to a client carries a stable wire ``code``::

    BridgeError                 code "internal"
    ├── BadRequest              code "bad_request"    the client sent something invalid
    ├── MemoryUnavailable       code "memory_unavailable"  the memory backend failed
    ├── CacheUnavailable        code "cache_unavailable"   Valkey is unreachable (retryable)
    └── Overloaded              code "overloaded"     a limit refused the request (retryable)
        └── RateLimited         code "rate_limited"   the connection sent too fast (retryable)

``retryable`` tells a client whether sending the same message again later may succeed.
Errors from libraries are translated into this tree at the edge (``raise ... from e``).
"""

from __future__ import annotations


class BridgeError(Exception):
    """Root of the bridge's errors."""

    code = "internal"
    retryable = False


class BadRequest(BridgeError):
    """The client's message could not be decoded or failed validation.

    ``message_id`` is the ``id`` of the offending message when it could be read, so the
    error reply can echo it.
    """

    code = "bad_request"

    def __init__(self, message: str, *, message_id: int | str | None = None) -> None:
        super().__init__(message)
        self.message_id = message_id


class MemoryUnavailable(BridgeError):
    """The memory backend could not store or search."""

    code = "memory_unavailable"
    retryable = True


class CacheUnavailable(BridgeError):
    """The Valkey context cache could not be reached."""

    code = "cache_unavailable"
    retryable = True


class Overloaded(BridgeError):
    """A limit refused the request; try again later."""

    code = "overloaded"
    retryable = True


class RateLimited(Overloaded):
    """The connection exceeded its message rate; slow down and resend."""

    code = "rate_limited"


def describe(error: BaseException) -> str:
    """An exception as a log line or error message can show it: its type, then its message
    if it has one (``TimeoutError()`` and others have none, which alone says nothing)."""
    text = str(error)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
