"""Server memory with many idle connections: the bridge as its own process
(``bench.rss``), its VmRSS before and after."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Final

from bench.harness import Run
from bench.registry import section
from bench.rss import IdleMemory, idle_memory
from bench.section import Section, Target

MB: Final = 1024  # kB per MB (VmRSS is in kB)


@dataclass(kw_only=True)
class Rss(Section):
    """No rows: the idle-connection memory figures, and a table of them."""

    memory: IdleMemory

    def figures(self) -> dict[str, Any]:
        """The memory figures, flat."""
        return asdict(self.memory)

    def targets(self) -> list[Target]:
        """Under 150 MB with the idle connections."""
        f = self.memory
        return [
            Target(
                f"server RSS with {f.connections:,} idle connections < 150 MB",
                f"{f.rss_after_kb / MB:.1f} MB",
                f.rss_after_kb < 150 * MB,
            )
        ]

    def tables(self) -> list[str]:
        """The memory figures as a Markdown table."""
        f = self.memory
        lines = [
            "| measure | value |",
            "|---|---:|",
            f"| server RSS, listening, no connection | {f.rss_before_kb / MB:.1f} MB |",
            f"| server RSS, {f.connections:,} idle connections | {f.rss_after_kb / MB:.1f} MB |",
            f"| server peak RSS (VmHWM) | {f.hwm_kb / MB:.1f} MB |",
            f"| per connection | {f.per_connection_kb:.1f} KB |",
            f"| opening them (handshake + one ping each) | {f.open_seconds:.1f} s |",
        ]
        lines += [
            f"| child process {name} | {kb / MB:.1f} MB |" for name, kb in f.children_rss_kb.items()
        ]
        return ["\n".join(lines)]


@section("rss", order=80)
async def rss(run: Run) -> Rss:
    """Server memory with many idle connections."""
    memory = await idle_memory(run.params.idle_connections, run.statsd_port)
    return Rss(
        title=f"Server memory with {memory.connections:,} idle connections",
        intro="The bridge as its own process (`python -m bridge serve --port 0 --data-dir TMP "
        "--max-connections 2000`, embedded valkey-server); the bench process opens the "
        "connections, each answers one ping, then the server's VmRSS is read from "
        "/proc/<pid>/status. Its valkey-server child is listed separately.",
        memory=memory,
    )
