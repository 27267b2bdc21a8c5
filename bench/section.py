"""What a section of ``python -m bench`` returns: a typed result the report reads.

A section's result is a dataclass deriving from ``Section``: the title, introduction, rows
and notes every section has, plus its own figures as named fields. It says which targets
those figures meet (``targets``) and may add Markdown tables of its own (``tables``);
``figures`` is what the JSON keeps of the named fields.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Final

import msgspec

from bench.rows import Row


@dataclass(frozen=True)
class Target:
    """A reference point printed with the results, never asserted (``met`` None: not
    measured)."""

    target: str
    measured: str
    met: bool | None


@dataclass(kw_only=True)
class Section:
    """One section of the report: a title, an introduction, rows and notes."""

    title: str
    intro: str
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def figures(self) -> dict[str, Any]:
        """The figures that are not rows, as JSON: the subclass's own fields (those not
        measured in this run left out)."""
        own = (f.name for f in fields(self) if f.name not in COMMON)
        found = {name: getattr(self, name) for name in own}
        return {
            name: msgspec.to_builtins(value) for name, value in found.items() if value is not None
        }

    def targets(self) -> list[Target]:
        """The targets this section's figures are held against (none by default)."""
        return []

    def tables(self) -> list[str]:
        """Markdown tables to print after the rows' table (none by default)."""
        return []

    def to_json(self, key: str) -> dict[str, Any]:
        """The section as the JSON file holds it."""
        return {
            "key": key,
            "title": self.title,
            "intro": self.intro,
            "rows": [row.to_json() for row in self.rows],
            "notes": self.notes,
            "figures": self.figures(),
        }


COMMON: Final = frozenset(f.name for f in fields(Section))
