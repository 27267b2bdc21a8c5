"""The cache: memory contexts kept in Valkey, and kept fresh.

``contexts`` stores each rendered context under a key of its project and query, tagged by
the paths it names, so a write invalidates exactly the contexts it makes stale;
``tracking`` and ``following`` keep an in-process copy (L1) honest through Valkey's
client-side tracking on every primary; ``coalesce`` lets invalidations that queue up share
one round trip; ``valkey`` connects to one server, a Sentinel-watched primary or a
cluster; ``store_identity`` namespaces keys by the memory behind them. ``loader`` is the
chat:start path: cache lookup, single flight, the miss budget, memory, and the fill after
the reply. Nothing here knows of WebSockets.
"""
