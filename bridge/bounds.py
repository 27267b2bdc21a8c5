"""The sizes a message may have, defined once.

The wire schema (``bridge.wire.protocol``) validates with them, the configuration starts
its ``--max-frame``, ``--max-text``, ``--max-path`` and ``--max-name`` from them, and the
plugin's ``lib/protocol.ts`` is generated from the schema that carries them.
"""

from __future__ import annotations

from typing import Final

MAX_FRAME: Final = 1 << 20  # bytes of one frame
# Per-field length limits (characters). Generous for prompts; tight for identifiers.
MAX_TEXT: Final = 65_536
MAX_PATH: Final = 4_096
MAX_NAME: Final = 256
