"""Memory: where episodes are stored, how they get there, and how they are recalled.

``base`` defines the backend interface; ``sqlite`` (the embedded default, with
``sqlite_tasks`` and ``sqlite_changes``), ``graphiti`` (graphiti-core on FalkorDB or
Neo4j, with ``graph_tasks``, ``graph_recall``, ``graph_forget``, ``falkor``,
``group_commit`` and ``graph_settings``) and ``script`` are the backends (``lease``: one
graphiti ingester per project among the processes sharing a graph); ``jsonl`` is export
and import. ``index`` and ``terms`` are the in-memory recall index, ``recall`` ranks its
candidates and renders the context. ``privacy`` and ``redact`` take out what is never
stored. ``delivery`` stores episodes, through the ``outbox`` (a ``durable`` queue file
per process, ``queue_files``) whenever memory cannot take them. Nothing here knows of
WebSockets or of the cache.
"""

from bridge.memory.base import MemoryBackend, Recall

__all__ = ["MemoryBackend", "Recall"]
