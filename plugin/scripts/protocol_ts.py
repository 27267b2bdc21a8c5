"""Write plugin/lib/protocol.ts: the wire protocol's messages as TypeScript, from its schema.

bridge/wire/protocol.py is the one source of the protocol: msgspec describes its two tagged
unions (client and server messages) as JSON Schema, and this script turns that schema into
TypeScript interfaces, the unions, the tags and the bounds of each client field, so the
plugin neither restates a message's shape nor a limit. Run it after changing the schema:

    .venv/bin/python plugin/scripts/protocol_ts.py

``--check`` writes nothing and exits 1 when the file is not what the schema gives
(tests/test_protocol_ts.py runs it, so a stale file fails the suite).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

REPO = Path(__file__).resolve().parents[2]
OUTPUT = REPO / "plugin" / "lib" / "protocol.ts"
# The types come from this checkout's bridge, never from a copy installed elsewhere.
sys.path.insert(0, str(REPO))

import msgspec  # noqa: E402

from bridge.wire import protocol  # noqa: E402

WIDTH = 110  # prettier's printWidth (plugin/.prettierrc.json): lines that fit stay whole
TEXT_WIDTH = 92  # comments wrap as the plugin's hand-written ones do
REF = "#/$defs/"
BOUND_KEYS = ("minLength", "maxLength", "minimum", "maximum")

Node = dict[str, Any]

HEADER = """\
/**
 * The wire protocol's messages (docs/protocol.md), generated from the schema in
 * bridge/wire/protocol.py by scripts/protocol_ts.py: do not edit. After a change to the schema,
 * run `.venv/bin/python plugin/scripts/protocol_ts.py` from the repository's root.
 *
 * `ClientMessage` is what the plugin sends, `ServerMessage` what the bridge answers; both
 * are unions tagged by `type`. `BOUNDS` holds each client field's limits (string lengths
 * in characters, numbers inclusive), the ones the bridge enforces.
 */"""


def schema() -> tuple[list[Node], dict[str, Node]]:
    """The JSON Schema of the client and the server union, and of every struct they use."""
    unions, components = msgspec.json.schema_components(
        [protocol.Message, protocol.ServerMessage], ref_template=REF + "{name}"
    )
    return list(unions), dict(components)


def number(value: float) -> str:
    """A bound as TypeScript writes it (an integral float without its `.0`)."""
    return str(int(value)) if float(value).is_integer() else repr(value)


def ts_type(node: Node) -> str:
    """The TypeScript type of a JSON Schema node."""
    if "$ref" in node:
        return str(node["$ref"]).removeprefix(REF)
    if "anyOf" in node:
        return " | ".join(dict.fromkeys(ts_type(member) for member in node["anyOf"]))
    if "enum" in node:
        return " | ".join(json.dumps(value) for value in node["enum"])
    kind = node.get("type")
    if kind == "string":
        return "string"
    if kind in ("integer", "number"):
        return "number"
    if kind == "boolean":
        return "boolean"
    if kind == "null":
        return "null"
    if kind == "array":
        item = ts_type(node.get("items", {}))
        return f"{item}[]" if re.fullmatch(r"\w+", item) else f"Array<{item}>"
    if kind == "object":
        return "Record<string, unknown>"
    if not node:
        return "unknown"
    raise ValueError(f"no TypeScript type for the schema {node}")


def bounds(node: Node) -> dict[str, float]:
    """The limits of a field: of its value, or of the one non-null type it may be."""
    members = [m for m in node.get("anyOf", [node]) if m.get("type") != "null"]
    found: dict[str, float] = {}
    for member in members:
        found.update({key: member[key] for key in BOUND_KEYS if key in member})
    return found


def describe_bounds(node: Node) -> str:
    """A field's limits and default, in words, for its doc comment."""
    limits = bounds(node)
    words = []
    low, high = limits.get("minLength"), limits.get("maxLength")
    if high is not None and low:
        words.append(f"{number(low)} to {number(high)} characters")
    elif high is not None:
        words.append(f"at most {number(high)} characters")
    elif low is not None:
        words.append(f"at least {number(low)} characters")
    low, high = limits.get("minimum"), limits.get("maximum")
    if low is not None and high is not None:
        words.append(f"{number(low)} to {number(high)}")
    elif low is not None:
        words.append(f"at least {number(low)}")
    elif high is not None:
        words.append(f"at most {number(high)}")
    default = node.get("default")
    if isinstance(default, bool):
        words.append(f"default {json.dumps(default)}")
    elif isinstance(default, int | float):
        words.append(f"default {number(default)}")
    return ", ".join(words)


def docstring(text: str) -> str:
    """A Python docstring as plain text: dedented, one paragraph, ``code`` as `code`."""
    return " ".join(text.split()).replace("``", "`")


def comment(text: str, indent: str) -> list[str]:
    """A JSDoc comment of `text`, wrapped to the print width."""
    one = f"{indent}/** {text} */"
    if len(one) <= TEXT_WIDTH:
        return [one]
    lines, line = [f"{indent}/**"], ""
    for word in text.split():
        if line and len(indent) + 3 + len(line) + 1 + len(word) > TEXT_WIDTH:
            lines.append(f"{indent} * {line}")
            line = word
        else:
            line = f"{line} {word}" if line else word
    lines += [f"{indent} * {line}", f"{indent} */"]
    return lines


class Declaration(NamedTuple):
    """One interface to write: what it is, the interface it extends and its own fields."""

    name: str
    doc: str
    parent: str | None
    fields: dict[str, Node]  # its own, in schema order
    required: frozenset[str]

    @property
    def bounds_name(self) -> str:
        """The constant holding the bounds of these fields (`ClientMessageFields`:
        `CLIENT_MESSAGE_BOUNDS`)."""
        words = re.sub(r"(?<=[a-z])(?=[A-Z])", "_", self.name.removesuffix("Fields"))
        return f"{words.upper()}_BOUNDS"


def parent_of(struct: type) -> type | None:
    """The protocol struct that `struct` takes its shared fields from, if any."""
    parent = struct.__bases__[0]
    return None if parent is msgspec.Struct else parent


def field_names(struct: type | None) -> set[str]:
    """The names of a struct's fields, its inherited ones included."""
    return {field.name for field in msgspec.structs.fields(struct)} if struct else set()


def declarations(components: dict[str, Node]) -> list[Declaration]:
    """The interfaces to write: each message of both unions, preceded by the first use of
    the shared fields it extends (one interface per protocol base struct), then the other
    structs the messages hold."""
    out: dict[str, Declaration] = {}

    def declare(struct: type, node: Node, base: bool) -> str:
        """Declare `struct` once, after what it extends (`base`: only the fields it gives
        the messages of `node`'s kind); the name of its interface."""
        name = f"{struct.__name__}Fields" if base else struct.__name__
        if name not in out:
            parent = parent_of(struct)
            extends = declare(parent, node, base=True) if parent is not None else None
            own = (field_names(struct) if base else set(node["properties"])) - field_names(parent)
            out[name] = Declaration(
                name=name,
                doc=docstring(struct.__doc__ or name),
                parent=extends,
                fields={f: spec for f, spec in node["properties"].items() if f in own},
                required=frozenset(node.get("required", [])),
            )
        return name

    for struct in (*protocol.Message.__args__, *protocol.ServerMessage.__args__):
        declare(struct, components[struct.__name__], base=False)
    for name, node in components.items():
        if name not in out:
            out[name] = Declaration(
                name=name,
                doc=docstring(node.get("description", name)),
                parent=None,
                fields=dict(node["properties"]),
                required=frozenset(node.get("required", [])),
            )
    return list(out.values())


def interface(declared: Declaration) -> list[str]:
    """The interface of one struct: its own fields in schema order, optional when defaulted."""
    lines = comment(declared.doc, "")
    extends = f" extends {declared.parent}" if declared.parent else ""
    lines.append(f"export interface {declared.name}{extends} {{")
    for field, spec in declared.fields.items():
        said = describe_bounds(spec)
        if said:
            lines += comment(said, "  ")
        optional = "" if field in declared.required else "?"
        lines.append(f"  {field}{optional}: {ts_type(spec)}")
    lines.append("}")
    return lines


def joined(
    head: str, items: Sequence[str], separator: str, tail: str = "", indent: str = ""
) -> list[str]:
    """`head item, item tail` on one line if it fits, else one item a line, as prettier does."""
    one = f"{indent}{head}{separator.join(items)}{tail}"
    if len(one) <= WIDTH:
        return [one]
    if separator == " | ":
        indented = f"{indent}  {separator.join(items)}"
        if len(indented) <= WIDTH:
            return [f"{indent}{head.rstrip()}", indented]
        return [f"{indent}{head.rstrip()}", *(f"{indent}  | {item}" for item in items)]
    return [
        f"{indent}{head.rstrip()}",
        *(f"{indent}  {item}," for item in items),
        indent + tail.strip(),
    ]


def key(name: str) -> str:
    """An object key as prettier writes it: quoted only when it must be."""
    return name if re.fullmatch(r"[A-Za-z_$][\w$]*", name) else json.dumps(name)


def members(union: Node) -> list[tuple[str, str]]:
    """(tag, struct name) of each member of a tagged union, in declaration order."""
    mapping: dict[str, str] = union["discriminator"]["mapping"]
    return [(tag, ref.removeprefix(REF)) for tag, ref in mapping.items()]


def constants(name: str, tags: Iterable[str], doc: str) -> list[str]:
    """A `const` tuple of tags and its doc comment."""
    quoted = [json.dumps(tag) for tag in tags]
    return [*comment(doc, ""), *joined(f"export const {name} = [", quoted, ", ", "] as const")]


# The limits that come in pairs are written as a call of a helper the file declares
# (`chars(1, 256)`), the way a person would write the table, so that it reads at a glance.
PAIRS: dict[tuple[str, ...], str] = {
    ("minLength", "maxLength"): "chars",
    ("minimum", "maximum"): "span",
}
HELPERS = [
    "/** A string of `minLength` to `maxLength` characters. */",
    "const chars = (minLength: number, maxLength: number) => ({ minLength, maxLength })",
    "",
    "/** A number from `minimum` to `maximum`, both included. */",
    "const span = (minimum: number, maximum: number) => ({ minimum, maximum })",
    "",
]


def limits_of(limits: dict[str, float]) -> str:
    """A field's limits as TypeScript: a helper's call for a pair, else an object."""
    helper = PAIRS.get(tuple(limits))
    if helper is not None:
        return f"{helper}({', '.join(number(v) for v in limits.values())})"
    inner = ", ".join(f"{k}: {number(v)}" for k, v in limits.items())
    return f"{{ {inner} }}"


def bounded(declared: Declaration) -> list[str]:
    """`field: limits` of each of a declaration's own fields that has limits."""
    return [
        f"{key(field)}: {limits_of(limits)}"
        for field, spec in declared.fields.items()
        if (limits := bounds(spec))
    ]


def bounds_table(client: Sequence[tuple[str, Declaration]], shared: list[Declaration]) -> list[str]:
    """`BOUNDS`, each client message's field limits by type and field, after one constant
    per set of shared fields, which the messages that extend it spread."""
    out = list(HELPERS)
    spread = {d.name: f"...{d.bounds_name}" for d in shared}
    for declared in shared:
        items = bounded(declared)
        if declared.parent in spread:
            items.insert(0, spread[declared.parent])
        out += comment(f"The bounds of the fields of `{declared.name}`.", "")
        out += [*joined(f"const {declared.bounds_name} = {{ ", items, ", ", " } as const"), ""]
    out += comment("The bounds of each client message's fields, by message type and field.", "")
    out.append("export const BOUNDS = {")
    for tag, declared in client:
        items = bounded(declared)
        if declared.parent in spread:
            items.append(spread[declared.parent])
        out += joined(f"{key(tag)}: {{ ", items, ", ", " },", indent="  ")
    return [*out, "} as const"]


def render() -> str:
    """The text of plugin/lib/protocol.ts for the current schema."""
    (client, server), components = schema()
    client_members, server_members = members(client), members(server)
    declared = declarations(components)
    by_name = {d.name: d for d in declared}
    client_declarations = [(tag, by_name[name]) for tag, name in client_members]
    extended: set[str] = set()  # the shared fields that client messages extend
    for _, message in client_declarations:
        parent = message.parent
        while parent is not None:
            extended.add(parent)
            parent = by_name[parent].parent
    shared = [d for d in declared if d.name in extended]
    episode_tags = [
        message.__struct_config__.tag
        for message in protocol.Message.__args__
        if issubclass(message, protocol.EpisodeMessage)
    ]
    episode_names = [name for tag, name in client_members if tag in episode_tags]
    out = [HEADER, ""]
    out += comment("The protocol's version, as `pong` reports it.", "")
    out += [f"export const PROTOCOL_VERSION = {protocol.PROTOCOL_VERSION}", ""]
    out += comment("A message to the bridge.", "")
    out += joined("export type ClientMessage = ", [n for _, n in client_members], " | ")
    out.append("")
    out += comment("A message from the bridge: the reply to a client message, matched by `id`.", "")
    out += joined("export type ServerMessage = ", [n for _, n in server_members], " | ")
    out.append("")
    out += comment(
        "The client messages that become episodes: they take `episode_id` and `at`, and are "
        "answered with an `ack`.",
        "",
    )
    out += joined("export type EpisodeMessage = ", episode_names, " | ")
    out.append("")
    out += constants(
        "CLIENT_TYPES", [t for t, _ in client_members], "Each client message's `type`."
    )
    out += constants(
        "SERVER_TYPES", [t for t, _ in server_members], "Each server message's `type`."
    )
    out += constants("EPISODE_TYPES", episode_tags, "The `type` of each episode message.")
    out.append("")
    out += [*bounds_table(client_declarations, shared), ""]
    for declaration in declared:
        out += [*interface(declaration), ""]
    return "\n".join(out).rstrip("\n") + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """Write (or with --check, compare) the generated file; the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=OUTPUT, help="default: %(default)s")
    parser.add_argument(
        "--check", action="store_true", help="write nothing; exit 1 if the file is out of date"
    )
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = args.output.read_text(encoding="utf-8") if args.output.exists() else None
        if current != text:
            print(
                f"{args.output} is out of date with bridge/wire/protocol.py: run "
                f"`.venv/bin/python plugin/scripts/protocol_ts.py`",
                file=sys.stderr,
            )
            return 1
        return 0
    args.output.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
