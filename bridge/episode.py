"""The episode: the unit of memory shared by the protocol and every memory backend.

Its fields follow graphiti-core's episodic nodes: ``name``, ``body`` (episode_body),
``source_description``, ``reference_time`` (seconds since the epoch, UTC) and
``group_id`` (here: the OpenCode project), plus free-form ``metadata``.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import msgspec

JsonScalar = str | int | float | bool | None


class Episode(msgspec.Struct, kw_only=True, frozen=True):
    """One remembered event, as stored and as returned by search and export."""

    uuid: str
    group_id: str
    name: str
    body: str
    source_description: str
    reference_time: float
    metadata: dict[str, Any] = {}


def new_episode(
    group_id: str,
    name: str,
    body: str,
    source_description: str,
    metadata: dict[str, Any],
    *,
    episode_id: str | None = None,
    reference_time: float | None = None,
) -> Episode:
    """Build an episode with a fresh id (unless one is given) stamped now (unless given)."""
    return Episode(
        uuid=episode_id or uuid.uuid4().hex,
        group_id=group_id,
        name=name,
        body=body,
        source_description=source_description,
        reference_time=time.time() if reference_time is None else reference_time,
        metadata=metadata,
    )


def episode_uuid(group_id: str, client_id: str) -> str:
    """The stable uuid of a client-named episode: the same name in a group is one episode."""
    return uuid.uuid5(uuid.NAMESPACE_URL, f"graphiti-bridge:{group_id}:{client_id}").hex
