"""The wire: what crosses the WebSocket, and the per-event logic behind it.

``protocol`` is the schema (msgspec Structs, a tagged union on ``type``, codecs built once);
``events`` says what each episode event stores and makes stale, ``tasks`` which task of a
session it belongs to; ``handlers`` turn a decoded message into a reply over the memory and
the cache, callable without a socket; ``limits`` are the admission limits as plain objects.
``server`` only moves frames: it accepts connections, applies the limits, calls the
handlers and sends their replies, and on the same port answers ``/healthz``, ``/readyz``
(``health``) and the memory page (``web``).
"""
