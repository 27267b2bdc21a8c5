"""Paths as the cache sees them: found in text, normalised, matched by suffix."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from bridge.cache.paths import normalise_path, path_suffixes, paths_in


def test_paths_are_found_in_prose() -> None:
    text = (
        "Fix the bug in src/auth/login.py and a.py; see ./docs/x.md. "
        "Version 3.14 and v1.2 are not paths, nor is 2026-11-24."
    )
    assert paths_in(text) == {"src/auth/login.py", "a.py", "docs/x.md"}


def test_paths_in_a_memory_context_are_found() -> None:
    context = (
        "[Memory Context]\n- Modified: src/a.py (2026-11-24 13:54 UTC)\n- Error: x in lib/b.ts"
    )
    assert paths_in(context) == {"src/a.py", "lib/b.ts"}


def test_one_spelling_per_path() -> None:
    for spelling in ["src/a.py", "./src/a.py", "/src/a.py", "src//a.py", "src\\a.py", "src/./a.py"]:
        assert normalise_path(spelling) == "src/a.py"
    assert normalise_path(" ") == ""
    assert normalise_path("./") == ""


def test_suffixes_run_from_the_base_name_up() -> None:
    assert path_suffixes("/repo/src/a.py") == ["a.py", "src/a.py", "repo/src/a.py"]
    assert len(path_suffixes("/".join(["d"] * 40) + "/f.py")) == 16  # bounded


@given(st.lists(st.from_regex(r"[a-z]{1,8}", fullmatch=True), min_size=1, max_size=5),
       st.sampled_from(["py", "ts", "md", "json"]))  # fmt: skip
def test_a_path_named_in_text_is_found_and_matches_its_own_write(
    parts: list[str], extension: str
) -> None:
    path = "/".join(parts) + "." + extension
    found = paths_in(f"please look at {path}, then fix it.")
    assert path in found
    assert path in path_suffixes("/home/me/project/" + path)
