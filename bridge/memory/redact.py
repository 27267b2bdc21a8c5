"""Well-known secret shapes, and the text with each one replaced by a marker naming its kind.

Every shape is a row of :data:`SHAPES`: a name, one regular expression compiled once, and,
for the shapes that are not self-evident (``password=…``, ``Bearer …``), a check that
tells a literal secret from code that merely handles one (``password=form.password``,
``token = get_token()``, ``Authorization: Bearer ${TOKEN}``). A secret becomes
``[redacted:<kind>]``; for an assignment or a header only the value does, so the name
stays readable (``DB_PASSWORD=[redacted:password]``).

Scanners such as detect-secrets report a secret per line of a file; this module needs
spans in free text (a PEM block spans lines, a key sits inside prose), so it keeps its own
table, with the shapes those scanners document.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

MARKER_PREFIX: Final = "[redacted:"


def marker(kind: str) -> str:
    """What a secret of this kind is replaced by."""
    return f"{MARKER_PREFIX}{kind}]"


# Random keys mix digits, lower and upper case letters; identifiers in kebab or snake case
# that happen to start like a key (``sk-spinner-double-bounce``) do not.
_TOKEN_CHAR = r"[A-Za-z0-9_-]"
_RANDOM = rf"(?={_TOKEN_CHAR}*[0-9])(?={_TOKEN_CHAR}*[a-z])(?={_TOKEN_CHAR}*[A-Z])"
_NOT_BEFORE_TOKEN = r"(?![A-Za-z0-9_-])"


def _alone(width: int, token: str = "A-Za-z0-9_-") -> str:
    """A check, placed right after a literal of ``width`` characters, that the literal does
    not continue a longer token. Every pattern starts with its literal, so the regex
    engine can look for that literal quickly instead of trying every position."""
    return rf"(?<![{token}][\s\S]{{{width}}})"


def _caseless(word: str) -> str:
    """``word`` in any letter case, as character classes (faster than re.IGNORECASE)."""
    return "".join(f"[{c.upper()}{c.lower()}]" if c.isalpha() else re.escape(c) for c in word)


# A value that stands for a secret without being one: a variable, a template, a mask.
_REFERENCE = re.compile(
    r"""\$\{?[A-Za-z_][A-Za-z0-9_.]*\}?   # $TOKEN, ${TOKEN}
    | \$\{\{.*\}\} | \{\{.*\}\}           # ${{ secrets.TOKEN }}, {{ token }}
    | \{[^{}]*\}                          # {token} in a format string
    | %\([A-Za-z_]\w*\)s | %s             # %(token)s, %s
    | <[^<>]*>                            # <your-token>
    | [*x•.…]+ | \[redacted:[^\]]*\]      # ****, xxxx, …, an earlier marker
    """,
    re.VERBOSE | re.IGNORECASE,
)
# Words that follow ``password=``/``token:`` in code and configuration without being one.
_WORDS = """none null nil true false undefined yes no on off empty required optional str
string bytes int integer number bool boolean any object dict list secretstr secretbytes await
new self this cls lambda function async yield not env os process config settings password
passwd pwd secret secrets token tokens key apikey api_key redacted hidden masked"""
_NOT_SECRETS: Final = frozenset(_WORDS.split())
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_CODE_NAME = re.compile(
    r"""[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+   # form.password.data, os.environ
    | [a-z]+(?:_[a-z]+)+                  # raw_password: a variable in snake case
    | [a-z]+(?:[A-Z][a-z]+)+              # rawPassword: a variable in camel case
    """,
    re.VERBOSE,
)
_TYPE_NAME = re.compile(r"[A-Z][a-z]+(?:[A-Z][a-z]+)*")  # SecretStr, HttpUrl


def _secret_looking(value: str) -> bool:
    """Digits mixed with letters or symbols: a password, not a word of prose."""
    return len(value) >= 6 and any(c.isdigit() for c in value) and not value.isdigit()


def _is_placeholder(value: str) -> bool:
    return not value or bool(_REFERENCE.fullmatch(value))


@dataclass(frozen=True)
class Shape:
    """One kind of secret: its name, its pattern, and what of a match is the secret.

    ``hints`` are lower-case strings one of which every match contains, so a text without
    any is not searched. ``value`` names the groups that hold the secret (the first one
    that matched is replaced, the rest of the match kept); none means the whole match is
    the secret. ``literal`` decides whether a match is a real secret rather than code or a
    template.
    """

    kind: str
    hints: tuple[str, ...]
    pattern: re.Pattern[str]
    value: tuple[str, ...] = ()
    literal: Callable[[re.Match[str], str], bool] | None = None

    def redact(self, text: str) -> str:
        """``text`` with every secret of this shape replaced by its marker."""
        return self.pattern.sub(self._replace, text)

    def _replace(self, match: re.Match[str]) -> str:
        group = next((g for g in self.value if match.group(g) is not None), None)
        secret = match.group(group) if group is not None else match.group(0)
        if self.literal is not None and not self.literal(match, secret):
            return match.group(0)
        if group is None:
            return marker(self.kind)
        start, end = match.span(group)
        whole, offset = match.group(0), match.start()
        return whole[: start - offset] + marker(self.kind) + whole[end - offset :]


def _bearer_literal(match: re.Match[str], token: str) -> bool:
    return not _is_placeholder(token) and (
        any(c.isdigit() for c in token) or (token.lower() != token and token.upper() != token)
    )


def _header_literal(match: re.Match[str], value: str) -> bool:
    return len(value) >= 8 and not _is_placeholder(value) and value.lower() not in _NOT_SECRETS


def _url_literal(match: re.Match[str], password: str) -> bool:
    return not _is_placeholder(password)


def _assigned_literal(
    match: re.Match[str], value: str, names: re.Pattern[str] | None = None
) -> bool:
    """Whether the value assigned to a secret-sounding name is a literal secret; ``names``
    is what the whole name must end with, when its last word says too little (``key``)."""
    text, end = match.string, match.end()
    begins = _identifier_start(text, match.start())
    name = text[begins : match.end("name")].lower().lstrip("-")
    if names is not None and not names.search(name):
        return False
    if _is_placeholder(value) or value.startswith(MARKER_PREFIX):
        return False
    if match.group("bare") is None:
        return True  # a quoted literal
    lowered = value.lower()
    if lowered in _NOT_SECRETS or lowered == name or (value.isdigit() and len(value) < 6):
        return False
    following = text[end : end + 1]
    if following in ("(", "[", "{") or _CODE_NAME.fullmatch(value):
        return False  # a call, an index, a template (${{ … }}), an attribute, a variable
    if _IDENTIFIER.fullmatch(value) and following in (",", ")"):
        return False  # an argument passed on: f(password=pw)
    if "=" not in match.group("sep"):
        # ``name: value`` is configuration when it starts its line, prose otherwise.
        line_start = text.rfind("\n", 0, begins) + 1
        opening = text[line_start:begins].strip(" \t-\"'{")
        if _TYPE_NAME.fullmatch(value):
            return False  # an annotation: password: SecretStr
        return opening == "" or _secret_looking(value)
    return True


def _identifier_start(text: str, end: int, longest: int = 64) -> int:
    """Where the identifier (letters, digits, ``_``, ``-``) that ends at ``end`` starts."""
    start = end
    while start > max(0, end - longest) and (text[start - 1].isalnum() or text[start - 1] in "_-"):
        start -= 1
    return start


def _assignment(
    kind: str, hints: tuple[str, ...], ending: str, names: re.Pattern[str] | None = None
) -> Shape:
    """``name = value`` for names that end in ``ending`` (a pattern; ``DB_PASSWORD``,
    ``apiKey``) and, if given, match ``names``: the value is redacted. The pattern starts
    at the name's last word, which the regex engine finds fast; the check reads the whole
    name."""
    pattern = re.compile(
        rf"""(?P<name>{ending})(?![A-Za-z0-9_])
        (?P<sep>["']?[ \t]*
          (?::[ \t]*[A-Za-z_][A-Za-z0-9_.\[\], |]{{0,60}}?[ \t]*(?==))?  # name: str = …
          (?:=(?![=>~])|:=|:(?![:/]))[ \t]*)
        (?:"(?P<dq>(?:[^"\\\n]|\\.)*)"
          |'(?P<sq>[^'\n]*)'
          |`(?P<bq>[^`\n]*)`
          |(?P<bare>[^\s"'`,;&()\[\]{{}}<>]+))""",
        re.VERBOSE,
    )

    def literal(match: re.Match[str], value: str) -> bool:
        return _assigned_literal(match, value, names)

    return Shape(kind, hints, pattern, ("dq", "sq", "bq", "bare"), literal)


SHAPES: Final[tuple[Shape, ...]] = (
    # PEM private keys, RSA, EC, OpenSSH, PKCS#8, encrypted, PGP: the whole block. A block
    # cut short (a clipped message) is redacted as far as its base64 body goes.
    Shape(
        "private-key",
        ("private key",),
        re.compile(
            r"-----BEGIN[A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?-----"
            # up to its END line, never past another BEGIN or END (so the scan stays linear)
            r"(?:(?:(?!-----(?:BEGIN|END))[\s\S])*-----END[A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?-----"
            # or, cut short, its header and base64 lines
            r"|(?:[ \t]*(?:\r?\n|\\n)[ \t]*(?:[A-Za-z-]+:[^\n\\]*"
            r"|[A-Za-z0-9+/=]{4,}(?=[ \t]*(?:\r?\n|\\n|$|\"))))*)"
        ),
    ),
    Shape("anthropic-key", ("sk-ant-",), re.compile(rf"sk-ant-{_alone(7)}{_TOKEN_CHAR}{{20,}}")),
    Shape("openai-key", ("sk-",), re.compile(rf"sk-{_alone(3)}{_RANDOM}{_TOKEN_CHAR}{{20,}}")),
    Shape(
        "aws-access-key-id",
        ("akia", "asia", "abia", "acca"),
        re.compile(rf"A{_alone(1, 'A-Za-z0-9')}(?:KIA|SIA|BIA|CCA)[A-Z0-9]{{16}}(?![A-Za-z0-9])"),
    ),
    Shape(
        "github-token",
        ("ghp_", "gho_", "ghu_", "ghs_", "ghr_", "github_pat_"),
        re.compile(
            rf"g{_alone(1)}(?:h[pousr]_[A-Za-z0-9]{{30,}}|ithub_pat_[A-Za-z0-9_]{{22,}})"
            rf"{_NOT_BEFORE_TOKEN}"
        ),
    ),
    Shape(
        "slack-token",
        ("xox",),
        re.compile(
            rf"xox{_alone(3, 'A-Za-z0-9')}[abprs]-(?=[A-Za-z0-9-]*[0-9])[A-Za-z0-9-]{{10,}}"
        ),
    ),
    Shape(
        "jwt",
        ("eyj",),
        re.compile(
            rf"eyJ{_alone(3)}[A-Za-z0-9_-]{{8,}}\.eyJ[A-Za-z0-9_-]{{8,}}"
            rf"\.[A-Za-z0-9_-]{{8,}}{_NOT_BEFORE_TOKEN}"
        ),
    ),
    # The password of a URL: postgres://user:[redacted:password]@host/db.
    Shape(
        "password",
        ("://",),
        re.compile(r"://[^\s/:@]*:(?P<password>[^\s/@]+)@"),
        ("password",),
        _url_literal,
    ),
    Shape(
        "bearer-token",
        ("bearer",),
        re.compile(rf"{_caseless('bearer')}{_alone(6)}[ \t]+(?P<token>[A-Za-z0-9._~+/-]{{16,}}=*)"),
        ("token",),
        _bearer_literal,
    ),
    Shape(
        "authorization",
        ("authorization",),
        re.compile(
            rf"""{_caseless("authorization")}{_alone(13, "A-Za-z0-9_")}["']?[ \t]*[:=][ \t]*
            (?:[rbfRBF]{{0,2}}["'`])?
            (?:(?i:bearer|basic|token|bot|digest|negotiate)[ \t]+)?
            (?P<value>[^\s"'`,;]+)""",
            re.VERBOSE,
        ),
        ("value",),
        _header_literal,
    ),
    _assignment(
        "password", ("pass", "pwd"), "|".join(map(_caseless, ("password", "passwd", "pwd")))
    ),
    _assignment(
        "api-key",
        ("key",),
        _caseless("key"),
        re.compile(r"(?:api|access|secret|private)[_-]?key$"),
    ),
    _assignment("secret", ("secret",), _caseless("secret")),
    _assignment("token", ("token",), _caseless("token")),
)


def redact_secrets(text: str) -> str:
    """``text`` with every well-known secret shape replaced by ``[redacted:<kind>]``."""
    lowered = text.lower()
    for shape in SHAPES:
        if any(hint in lowered for hint in shape.hints):
            redacted = shape.redact(text)
            if redacted != text:
                text, lowered = redacted, redacted.lower()
    return text
