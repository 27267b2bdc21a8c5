"""graphiti-bridge: a persistent WebSocket memory layer for OpenCode.

Packages, with dependencies pointing down this list (docs/architecture.md has the map)::

    runtime        composition root: Config -> running parts; embedded servers; workers
    wire           protocol schema, per-event handlers, the server that moves frames
    cache          contexts in Valkey and their in-process copy; the chat:start loader
    memory         backends, the recall index and ranking, privacy, the outbox
    (top level)    config, bounds, errors, episode, metrics, retry, deadline, background:
                   shared by all
"""

__version__ = "0.1.0"
