"""graphiti-bridge: a persistent WebSocket memory layer for OpenCode.

The package is layered so that dependencies point one way::

    episode, errors            plain data and the exception tree
    protocol                   the wire schema (msgspec Structs)
    memory, cache, metrics     the parts behind the handlers; no WebSockets here
    handlers                   one function per event, callable without a socket
    server                     frames in, handler calls, frames out
    app                        composition root: Config -> parts -> Server
"""

__version__ = "0.1.0"
