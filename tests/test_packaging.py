"""The container's install step, run for real without Docker: a fresh virtualenv installs
the package and its graphiti extra from requirements.lock, hashes required."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent


async def run(*argv: str | Path, cwd: Path = ROOT) -> str:
    process = await asyncio.create_subprocess_exec(
        *map(str, argv),
        cwd=cwd,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(process.communicate(), 600)
    text = out.decode(errors="replace")
    assert process.returncode == 0, f"{argv} failed:\n{text[-3000:]}"
    return text


async def test_the_lock_installs_with_hashes_and_the_server_imports(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    await run(sys.executable, "-m", "venv", venv)
    pip = venv / "bin" / "pip"
    await run(pip, "install", "-q", "--require-hashes", "-r", ROOT / "requirements.lock")
    await run(pip, "install", "-q", "--no-deps", ROOT)
    assert "graphiti-bridge 0.1.0" in await run(venv / "bin" / "graphiti-bridge", "--version")
    await run(venv / "bin" / "python", "-c", "import bridge.runtime.app, bridge.memory.graphiti")
