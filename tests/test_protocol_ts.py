"""plugin/lib/protocol.ts, the plugin's types of the wire messages, against the schema it is
generated from (plugin/scripts/protocol_ts.py over bridge/wire/protocol.py)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from types import ModuleType

import msgspec
import pytest

from bridge.wire import protocol

SCRIPT = Path(__file__).resolve().parent.parent / "plugin" / "scripts" / "protocol_ts.py"


def load_generator() -> ModuleType:
    """The generator script as a module (it lives with the plugin, outside any package)."""
    spec = importlib.util.spec_from_file_location("protocol_ts", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def generator() -> ModuleType:
    return load_generator()


def interface_body(text: str, name: str) -> str:
    """The lines between `export interface <name> {` and its closing brace, followed by
    those of the interface it extends, if any (and so on up)."""
    pattern = rf"^export interface {name}(?: extends (\w+))? \{{\n(.*?)^\}}"
    match = re.search(pattern, text, re.M | re.S)
    assert match, f"no interface {name} in the generated file"
    parent, body = match.groups()
    return body + (interface_body(text, parent) if parent else "")


def test_the_committed_file_is_what_the_schema_gives(
    generator: ModuleType, capsys: pytest.CaptureFixture[str]
) -> None:
    status = generator.main(["--check"])
    assert status == 0, capsys.readouterr().err


def test_a_stale_file_fails_the_check_and_says_how_to_regenerate(
    generator: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    stale = tmp_path / "protocol.ts"
    stale.write_text(generator.render().replace("maxLength: 65536", "maxLength: 1000"))
    assert generator.main(["--check", "--output", str(stale)]) == 1
    err = capsys.readouterr().err
    assert "out of date" in err and "plugin/scripts/protocol_ts.py" in err
    assert "maxLength: 1000" in stale.read_text()  # --check writes nothing
    assert generator.main(["--output", str(stale)]) == 0
    assert generator.main(["--check", "--output", str(stale)]) == 0


def test_every_message_is_an_interface_with_its_tag_and_fields(generator: ModuleType) -> None:
    text = generator.render()
    for union in (protocol.Message, protocol.ServerMessage):
        for struct in union.__args__:
            body = interface_body(text, struct.__name__)
            assert f'  type: "{struct.__struct_config__.tag}"\n' in body
            for field in msgspec.structs.fields(struct):
                optional = "" if field.required else "?"
                assert re.search(rf"^  {field.name}{re.escape(optional)}: ", body, re.M), (
                    struct.__name__,
                    field.name,
                )
    episodes = [
        m.__name__ for m in protocol.Message.__args__ if issubclass(m, protocol.EpisodeMessage)
    ]
    assert f"export type EpisodeMessage = {' | '.join(episodes)}\n" in text


def test_bounds_are_the_schema_limits(generator: ModuleType) -> None:
    text = generator.render()
    shared = text[text.index("const CLIENT_MESSAGE_BOUNDS") : text.index("export const BOUNDS")]
    assert f"  session: chars(1, {protocol.MAX_NAME}),\n" in shared
    assert "const EPISODE_MESSAGE_BOUNDS = {\n  ...CLIENT_MESSAGE_BOUNDS,\n" in shared
    bounds = text[text.index("export const BOUNDS") :]
    assert (
        f'"chat:start": {{ query: {{ maxLength: {protocol.MAX_TEXT} }}, '
        "...CLIENT_MESSAGE_BOUNDS }," in bounds
    )
    assert (
        f'"file:write": {{ path: chars(1, {protocol.MAX_PATH}), '
        "...EPISODE_MESSAGE_BOUNDS }," in bounds
    )
    assert f"note: {{ text: chars(1, {protocol.MAX_TEXT}), ..." in bounds
    assert "limit: span(1, 100)" in bounds
    assert (
        "const chars = (minLength: number, maxLength: number) => ({ minLength, maxLength })" in text
    )
    assert "const span = (minimum: number, maximum: number) => ({ minimum, maximum })" in text
    assert f"export const PROTOCOL_VERSION = {protocol.PROTOCOL_VERSION}\n" in text
