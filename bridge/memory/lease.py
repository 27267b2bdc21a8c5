"""Leases in Valkey: one holder at a time among processes, lapsing when the holder is gone.

A lease is a key holding its holder's random token. ``SET key token NX PX ttl`` takes it
when nobody holds it; the holder renews it (``PEXPIRE``) every third of the TTL and lets
it go (``DEL``) when done, both through a script that acts only while the key still holds
the holder's own token, so a holder whose lease lapsed never renews or deletes another's.
A holder that dies, or cannot reach Valkey, stops renewing: its lease lapses after the
TTL and the next process that asks takes it over.

:meth:`Lease.held` is the usual way in: it waits until the lease is this process's, keeps
it renewed, and sets ``lost`` if a renewal finds it gone (or cannot reach Valkey before
the TTL runs out), so the work under it can stop at its next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Final, TypeAlias

import redis.asyncio as redis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisError

from bridge.background import cancel_and_wait

log = logging.getLogger(__name__)

Client: TypeAlias = redis.Redis | RedisCluster  # one Valkey server, or a cluster

DEFAULT_TTL: Final = 10.0  # seconds a lease outlives its holder's last renewal
RENEW: Final = """if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0"""
RELEASE: Final = """if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0"""


@dataclass
class Held:
    """A lease while this process holds it: ``lost`` is set once it may not anymore."""

    lost: asyncio.Event = field(default_factory=asyncio.Event)


class Lease:
    """One named lease, as seen by one holder (a process, or a part of one)."""

    def __init__(self, client: Callable[[], Client], key: str, ttl: float = DEFAULT_TTL) -> None:
        self._client = client
        self.key = key
        self.ttl = ttl
        self.token = secrets.token_hex(16)

    @property
    def _ttl_ms(self) -> int:
        return max(1, int(self.ttl * 1000))

    async def acquire(self) -> bool:
        """Take the lease if nobody holds it (or this holder does: it is renewed)."""
        async with asyncio.timeout(self.ttl / 3):
            if await self._client().set(self.key, self.token, nx=True, px=self._ttl_ms):
                return True
            return await self.renew()

    async def renew(self) -> bool:
        """Extend the lease by the TTL; False when it is not this holder's anymore."""
        async with asyncio.timeout(self.ttl / 3):
            renewed = await self._client().eval(RENEW, 1, self.key, self.token, self._ttl_ms)
        return bool(renewed)

    async def release(self) -> None:
        """Let the lease go, if it is still this holder's."""
        async with asyncio.timeout(self.ttl / 3):
            await self._client().eval(RELEASE, 1, self.key, self.token)

    @contextlib.asynccontextmanager
    async def held(self) -> AsyncIterator[Held]:
        """Wait until the lease is this holder's, keep it renewed while the block runs, and
        let it go at the end. Waiting asks again every third of the TTL; Valkey errors
        meanwhile are logged once and waited out."""
        await self._wait_for()
        held = Held()
        keeper = asyncio.create_task(self._keep(held), name=f"lease {self.key}")
        try:
            yield held
        finally:
            await cancel_and_wait(keeper)
            if not held.lost.is_set():
                with contextlib.suppress(RedisError, OSError, TimeoutError):
                    await self.release()

    async def _wait_for(self) -> None:
        failing = False
        while True:
            try:
                if await self.acquire():
                    if failing:
                        log.info("lease %s: Valkey answers again", self.key)
                    return
                failing = False
            except (RedisError, OSError, TimeoutError) as e:
                if not failing:
                    log.warning("lease %s: cannot ask Valkey, waiting: %s", self.key, e)
                failing = True
            await asyncio.sleep(self.ttl / 3)

    async def _keep(self, held: Held) -> None:
        """Renew every third of the TTL until cancelled; set ``lost`` when the lease is
        gone or no renewal succeeded for a whole TTL."""
        renewed = time.monotonic()
        while True:
            await asyncio.sleep(self.ttl / 3)
            try:
                if not await self.renew():
                    log.warning("lease %s was lost (it lapsed and was taken)", self.key)
                    held.lost.set()
                    return
                renewed = time.monotonic()
            except (RedisError, OSError, TimeoutError) as e:
                if time.monotonic() - renewed >= self.ttl:
                    log.warning("lease %s lapsed: Valkey did not answer: %s", self.key, e)
                    held.lost.set()
                    return


class Leases:
    """The leases under one key prefix in one Valkey (``client`` returns its client)."""

    def __init__(
        self, client: Callable[[], Client], prefix: str, *, ttl: float = DEFAULT_TTL
    ) -> None:
        self._client = client
        self.prefix = prefix
        self.ttl = ttl

    def lease(self, name: str) -> Lease:
        """The lease called ``name``, for a new holder."""
        return Lease(self._client, self.prefix + name, self.ttl)
