"""The graphiti backend's settings, readable without graphiti-core (the configuration
takes its defaults from here): the LLM and embedder it extracts with, and how many
episodes may wait for extraction.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

EMBEDDING_MODEL: Final = "text-embedding-3-small"
EMBEDDING_DIM: Final = 1024
INGEST_QUEUE_SIZE: Final = 1000  # episodes waiting for extraction, per group


@dataclass(frozen=True)
class LlmSettings:
    """An OpenAI-compatible LLM and embedder; ``base_url`` None means OpenAI itself."""

    api_key: str
    base_url: str | None = None
    model: str | None = None  # None: graphiti's default
    small_model: str | None = None
    embedding_model: str = EMBEDDING_MODEL
    embedding_dim: int = EMBEDDING_DIM
