"""Every package plugin/package-lock.json pins accepts Node 20 (the README asks for Node
20+) and the Node that runs the tests, so ``npm install`` in plugin/ never warns
EBADENGINE.

The ranges are checked with the semver module npm itself uses, by the real ``node``.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

LOCK = Path(__file__).resolve().parent.parent / "plugin" / "package-lock.json"

CHECK = """
const [semverPath, lockPath] = process.argv.slice(1);
const semver = require(semverPath);
const lock = require(lockPath);
const refusing = Object.entries(lock.packages)
  .filter(([, p]) => p.engines && p.engines.node)
  .filter(([, p]) => !semver.satisfies(process.version, p.engines.node) ||
                     !semver.intersects(p.engines.node, "20.x"))
  .map(([name, p]) => `${name} needs node ${p.engines.node}`);
console.log(JSON.stringify({ node: process.version, refusing }));
"""


def test_every_locked_package_accepts_node_20_and_this_node() -> None:
    npm_root = subprocess.run(
        ["npm", "root", "-g"], capture_output=True, text=True, check=True, timeout=60
    ).stdout.strip()
    semver = Path(npm_root) / "npm" / "node_modules" / "semver"
    out = subprocess.run(
        ["node", "-e", CHECK, str(semver), str(LOCK)],
        capture_output=True, text=True, check=True, timeout=60,
    ).stdout  # fmt: skip
    result = json.loads(out)
    assert result["refusing"] == [], f"on node {result['node']}: {result['refusing']}"
