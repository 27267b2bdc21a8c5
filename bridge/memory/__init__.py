"""Memory backends: where episodes are stored and searched.

``base`` defines the interface; each other module is one backend. Backends know nothing of
WebSockets or of the cache.
"""

from bridge.memory.base import MemoryBackend, Recall

__all__ = ["MemoryBackend", "Recall"]
