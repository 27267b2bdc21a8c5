"""What memory never keeps: private spans, the bridge's own context, well-known secrets.

Plain code, no server: one group of cases per secret shape (several realistic variants
each), and a corpus of ordinary code, paths, hashes, URLs and prose that must come through
unchanged. The secrets are made here from seeded random characters in each shape's real
alphabet and length, so no secret-looking literal sits in the source.
"""

from __future__ import annotations

import random
import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.episode import Episode
from bridge.memory.privacy import cut_contexts, drop_private, scrub, scrub_episode
from bridge.memory.recall import CONTEXT_FIRST_LINE, CONTEXT_LAST_LINE, Ranked, TaskHit, render
from bridge.memory.redact import SHAPES, marker, redact_secrets
from bridge.wire.tasks import MAX_QUERY, TaskTracker

ALNUM = string.ascii_letters + string.digits
URLSAFE = ALNUM + "-_"
UPPER = string.ascii_uppercase + string.digits
BASE64 = ALNUM + "+/"


def rand(length: int, seed: int, alphabet: str = ALNUM) -> str:
    """Seeded random characters that mix digits, lower and upper case (as keys do)."""
    rng = random.Random(seed)
    while True:
        text = "".join(rng.choice(alphabet) for _ in range(length))
        kinds = (str.isdigit, str.islower, str.isupper)
        if all(any(test(c) for c in text) for test in kinds if any(test(a) for a in alphabet)):
            return text


def digits(length: int, seed: int) -> str:
    rng = random.Random(seed)
    return "".join(rng.choice(string.digits) for _ in range(length))


def pem(kind: str, seed: int, lines: int = 4) -> str:
    """A PEM block of ``kind`` (``RSA PRIVATE KEY``, ``PRIVATE KEY``, …)."""
    body = [rand(64, seed + n, BASE64) for n in range(lines)] + [rand(20, seed, BASE64) + "=="]
    return "\n".join([f"-----BEGIN {kind}-----", *body, f"-----END {kind}-----"])


OPENAI_LEGACY = "sk-" + rand(20, 1) + "T3BlbkFJ" + rand(20, 2)
OPENAI_PROJECT = "sk-proj-" + rand(156, 3, URLSAFE)
OPENAI_SERVICE = "sk-svcacct-" + rand(120, 4, URLSAFE)
ANTHROPIC_API = "sk-ant-api03-" + rand(93, 5, URLSAFE) + "AA"
ANTHROPIC_ADMIN = "sk-ant-admin01-" + rand(93, 6, URLSAFE) + "AA"
AWS_ID = "AKIA" + rand(16, 7, UPPER)
AWS_TEMPORARY_ID = "ASIA" + rand(16, 8, UPPER)
AWS_SECRET = rand(40, 9, BASE64)
GITHUB_CLASSIC = "ghp_" + rand(36, 10)
GITHUB_OAUTH = "gho_" + rand(36, 11)
GITHUB_APP = "ghs_" + rand(36, 12)
GITHUB_FINE = "github_pat_" + rand(22, 13) + "_" + rand(59, 14)
SLACK_BOT = f"xoxb-{digits(12, 15)}-{digits(13, 16)}-{rand(24, 17)}"
SLACK_USER = f"xoxp-{digits(12, 18)}-{digits(12, 19)}-{digits(13, 20)}-{rand(32, 21)}"
SLACK_APP = f"xoxa-2-{digits(12, 22)}-{rand(40, 23)}"
JWT = "eyJ" + rand(30, 24, URLSAFE) + ".eyJ" + rand(60, 25, URLSAFE) + "." + rand(43, 26, URLSAFE)
BEARER = rand(40, 27, URLSAFE)
PASSWORD = rand(14, 28, ALNUM + "!#%^*")


# For each kind: (template, secret). The text is the template with the secret at "§"; what
# is stored is the same template with the marker there, every other character kept.
CASES: dict[str, list[tuple[str, str]]] = {
    "openai-key": [
        ("OPENAI_API_KEY=§", OPENAI_LEGACY),
        ('client = OpenAI(api_key="§")', OPENAI_PROJECT),
        ("the key § was revoked", OPENAI_SERVICE),
        ("-H 'Authorization: Bearer §'", OPENAI_PROJECT),
    ],
    "anthropic-key": [
        ("export ANTHROPIC_API_KEY=§", ANTHROPIC_API),
        ('{"x-api-key": "§"}', ANTHROPIC_ADMIN),
        ("401 for key §.", ANTHROPIC_API),
    ],
    "aws-access-key-id": [
        ("aws_access_key_id = §", AWS_ID),
        ('"AccessKeyId": "§",', AWS_TEMPORARY_ID),
        ("AWS_ACCESS_KEY_ID=§", "AKIAIOSFODNN7EXAMPLE"),
        ("InvalidClientTokenId: § is not valid", AWS_ID),
    ],
    "github-token": [
        ("GITHUB_TOKEN=§", GITHUB_CLASSIC),
        ("git clone https://x-access-token:§@github.com/org/repo.git", GITHUB_APP),
        ("Authorization: token §", GITHUB_OAUTH),
        ('gh auth login --with-token <<< "§"', GITHUB_FINE),
    ],
    "slack-token": [
        ("SLACK_BOT_TOKEN=§", SLACK_BOT),
        ('WebClient(token="§")', SLACK_USER),
        ("invalid_auth for §", SLACK_APP),
    ],
    "private-key": [
        ("§\nthen the deploy failed", pem("RSA PRIVATE KEY", 30)),
        ("key:\n§", pem("OPENSSH PRIVATE KEY", 40, 6)),
        ("§", pem("EC PRIVATE KEY", 50, 2)),
        ("§", pem("ENCRYPTED PRIVATE KEY", 60).replace("-----\n", "-----\nProc-Type: 4,X\n", 1)),
        ('"private_key": "§\\n",', pem("PRIVATE KEY", 70).replace("\n", "\\n")),
        # cut short (a clipped message): its header and base64 lines still go
        ("§", pem("PRIVATE KEY", 80).rsplit("\n", 2)[0]),
    ],
    "jwt": [
        ("id_token=§&state=af0ifjsldkj", JWT),
        ("Cookie: session=§", JWT),
    ],
    "bearer-token": [
        ("Authorization: Bearer §", BEARER),
        ('curl -H "authorization: bearer §" https://api.example.com', BEARER),
        ("fetch(url, { headers: { Authorization: `Bearer §` } })", BEARER),
        ("retried with Bearer §", BEARER),
    ],
    "authorization": [
        ("Authorization: Basic §", "dXNlcjpodW50ZXIy"),
        ("Proxy-Authorization: Basic §", "YWxhZGRpbjpvcGVuc2VzYW1l"),
    ],
    "password": [
        ("DB_PASSWORD=§", "hunter2"),
        ("export PGPASSWORD='§'", PASSWORD),
        ("  passwd: §", "s3cr3t-Pa55"),
        ('{"user": "admin", "password": "§"}', "correct horse battery"),
        ("mysql --user=root --password=§ shop", "Tr0ub4dor3"),
        ('    password: str = "§"', "letmein"),
        ("postgres://app:§@db.internal:5432/shop", "Sup3rS3cret"),
        ("redis://:§@127.0.0.1:6379/0", "p4ssw0rd"),
        ("login failed, password: § rejected", "Winter2024"),
    ],
    "token": [
        ("https://example.com/cb?access_token=§&page=2", "ya29a0AfH6SMBx3"),
        ('"refresh_token": "§"', "1//0gLx9mRq7vT"),
        ("NPM_TOKEN=§", "npm_" + rand(36, 90)),
        ("  token: §", "8f14e45fceea167a5a36dedd4bea2543"),
    ],
    "secret": [
        ("client_secret=§", "GOCSPX-" + rand(28, 91, URLSAFE)),
        ('JWT_SECRET="§"', "super secret value"),
        ("webhook secret: §", "whsec_" + rand(32, 92)),
    ],
    "api-key": [
        ("AWS_SECRET_ACCESS_KEY=§", AWS_SECRET),
        ("X-Api-Key: §", "5f2b8c1d9e3a47f6"),
        ("const apiKey = '§';", "AIzaSyD" + rand(32, 93, URLSAFE)),
        ("SECRET_KEY = '§'", "django-insecure-" + rand(40, 94)),
    ],
}


def test_every_shape_has_cases() -> None:
    assert {shape.kind for shape in SHAPES} <= set(CASES)


@pytest.mark.parametrize(
    ("kind", "template", "secret"),
    [(kind, *case) for kind, cases in CASES.items() for case in cases],
    ids=[f"{kind}-{n}" for kind, cases in CASES.items() for n in range(len(cases))],
)
def test_a_secret_becomes_a_marker_naming_its_kind(kind: str, template: str, secret: str) -> None:
    text = template.replace("§", secret)
    expected = template.replace("§", marker(kind))
    assert redact_secrets(text) == expected
    assert scrub(text) == expected
    assert scrub(expected) == expected, "a marker is never redacted again"


# Ordinary text that must come through untouched: code that handles secrets without
# holding one, paths, hashes, URLs and prose.
UNCHANGED = [
    # Python
    "def login(user: str, password: str) -> bool:",
    "    password = form.password.data",
    'token = os.environ["GITHUB_TOKEN"]',
    'api_key = os.getenv("OPENAI_API_KEY")',
    "client = OpenAI(api_key=api_key)",
    "    self.secret = secret",
    "response = client.chat.completions.create(model=model, max_tokens=4096, messages=msgs)",
    "if password == confirm_password:",
    "    token: str | None = None",
    "    password: SecretStr",
    "    token: Optional[str] = None",
    "for token in tokens:",
    'headers = {"Authorization": f"Bearer {token}"}',
    'raise ValueError("password must not be empty")',
    "hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt())",
    'tokenizer = AutoTokenizer.from_pretrained("bert-base-uncased")',
    "token_count = len(tokens)",
    "secret = secrets.token_hex(16)",
    "user = authenticate(username=username, password=raw_password)",
    'password = getpass.getpass("Password: ")',
    "return {'token': token, 'expires_in': 3600}",
    # TypeScript, shell, YAML, config
    "const token = await getToken();",
    "export function verify(token: string, secret: Buffer): boolean {",
    "  password: string;",
    "const res = await fetch(url, { headers: { Authorization: `Bearer ${token}` } });",
    'curl -H "Authorization: Bearer $TOKEN" https://api.example.com/v1/me',
    'export PGPASSWORD="$DB_PASSWORD"',
    "docker run -e POSTGRES_PASSWORD -p 5432:5432 postgres:16",
    "          token: ${{ secrets.GITHUB_TOKEN }}",
    "  password: ${DB_PASSWORD}",
    "password_min_length = 12",
    'git commit -m "fix token refresh race"',
    "npm install jsonwebtoken@9.0.2 --save",
    ".spinner { animation: sk-spinner-double-bounce 2s infinite; }",
    "risk-assessment-module-loader failed to start",
    # paths
    "src/auth/token_refresh.py",
    "tests/test_password_reset.py",
    "/home/dev/.ssh/id_ed25519.pub",
    "node_modules/@types/jsonwebtoken/index.d.ts",
    "C:\\Users\\dev\\secrets\\README.md",
    "config/secrets.example.yaml",
    "/repo/src/sk-proj/handlers.py",
    # hashes, ids, base64
    "commit 3f786850e387550fdab836ed7e6dc881de23001b",
    "fixed in a1b2c3d, reverted in 9fceb02",
    "episode 123e4567-e89b-12d3-a456-426614174000 stored",
    "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    '"integrity": "sha512-v2kDEe57lecTulaDIuNTPy3Ry4gLGJ6Z1O3vE1krgXZNrsQ+LFTGHVxVjcXPs17Lhb'
    'ZVGedAJv8XZ1tvj5FvSg=="',
    'img.src = "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR4'
    '2mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg=="',
    'ETag: W/"5e8f-1a2b3c4d5e6f7a8b9c0d"',
    # URLs
    "https://github.com/getzep/graphiti/blob/main/README.md",
    "https://example.com/search?q=token+refresh&page=2",
    "http://127.0.0.1:8765/demo",
    "ssh://git@github.com:22/org/repo.git",
    "git@github.com:org/repo.git",
    "https://user@example.com/path",
    # prose
    "The password reset flow sends a token by email; the token expires after an hour.",
    "Use a bearer token in the Authorization header.",
    "Ask the user for their password: never log it.",
    "Rotate the secret: the old one stays valid for a day.",
    "TypeError: Cannot read properties of undefined (reading 'token')",
    "KeyError: 'api_key'",
    "The private key lives in the vault, not in the repository.",
    "- [x] bump the token bucket to 100 requests",
]


@pytest.mark.parametrize("text", UNCHANGED)
def test_ordinary_text_comes_through_unchanged(text: str) -> None:
    assert scrub(text) == text


def test_the_corpus_as_one_text_comes_through_unchanged() -> None:
    text = "\n".join(UNCHANGED)
    assert scrub(text) == text


# -- <private> ----------------------------------------------------------------------------

PRIVATE = [
    ("fix login <private>my password is hunter2</private> please", "fix login  please"),
    ("a<PRIVATE>b</Private>c<private >d</private>e", "ace"),
    ("keep <private>hide\nacross\nlines</private>\nkept", "keep \nkept"),
    ("outer <private>a <private>b</private> still hidden</private> out", "outer  out"),
    ("open <private>everything to the end\nof the text", "open "),
    ("stray </private> close", "stray  close"),
    ('<private reason="pii">jane@example.com</private>ok', "ok"),
    ("no tags at all < 3", "no tags at all < 3"),
    ("<privateer>is a word</privateer>", "<privateer>is a word</privateer>"),
]


@pytest.mark.parametrize(("text", "expected"), PRIVATE)
def test_private_spans_are_dropped(text: str, expected: str) -> None:
    assert drop_private(text) == expected
    assert scrub(text) == expected


def test_cutting_that_joins_a_new_tag_or_header_cuts_again() -> None:
    assert scrub("<priv<private>x</private>ate>hidden") == ""
    assert scrub(f"[Memory Context]{CONTEXT_FIRST_LINE}\n- a task") == ""


def test_a_secret_in_a_private_span_leaves_no_marker_either() -> None:
    assert scrub(f"deploy <private>{GITHUB_CLASSIC}</private> done") == "deploy  done"


# -- the bridge's own context ---------------------------------------------------------------


def rendered() -> str:
    """A context exactly as the bridge renders it."""
    task = TaskHit(
        uuid="t1",
        seq=1,
        query="make login retry on 503",
        summary="Login now retries 503 responses.",
        outcome="completed",
        at=1_795_000_000.0,
        files=["src/auth/login.py", "tests/test_login.py"],
        errors=["TimeoutError in tests/test_login.py"],
    )
    text = render(Ranked(files=["src/auth/login.py", "tests/test_login.py"], tasks=[task]))
    assert text is not None
    assert text.startswith(CONTEXT_FIRST_LINE) and text.endswith(CONTEXT_LAST_LINE)
    return text


def test_an_injected_context_followed_by_the_prompt_leaves_the_prompt() -> None:
    assert cut_contexts(f"{rendered()}\nwhy does login fail?") == "why does login fail?"


def test_a_prompt_that_starts_with_a_list_after_the_context_keeps_the_list() -> None:
    prompt = "- fix the retry\n- add a test"
    assert scrub(f"{rendered()}\n{prompt}") == prompt


def test_contexts_anywhere_in_a_text_are_cut_and_the_text_around_them_kept() -> None:
    context = rendered()
    text = f"before\n{context}\nbetween\n{context}\r\nafter"
    assert cut_contexts(text) == "before\nbetween\nafter"
    assert cut_contexts(context) == ""
    windows = context.replace("\n", "\r\n") + "\r\nprompt"
    assert cut_contexts(windows) == "prompt"


def test_a_context_that_lost_its_end_line_is_cut_through_its_own_lines() -> None:
    clipped = rendered().rsplit("\n", 1)[0]  # no end line: clipped or from an older bridge
    assert cut_contexts(f"{clipped}\n\nwhy does login fail?") == "\nwhy does login fail?"
    assert cut_contexts(f"intro\n{clipped}") == "intro\n"
    legacy = "[Memory Context]\n- Error: TypeError in parser.ts (2026-11-24 14:02 UTC)"
    assert cut_contexts(f"{legacy}\nthanks") == "thanks"
    # a clipped context before a whole one: each is cut on its own, the text between kept
    assert cut_contexts(f"{clipped}\nmiddle\n{rendered()}\nend") == "middle\nend"


def test_talking_about_the_header_is_not_a_context() -> None:
    text = "The bridge prefixes [Memory Context] to what it injects."
    assert scrub(text) == text


# -- episodes -------------------------------------------------------------------------------


def test_scrub_episode_scrubs_every_text_and_keeps_the_rest() -> None:
    episode = Episode(
        uuid="e1",
        group_id="shop",
        name="file:write secrets/" + AWS_ID + ".json",
        body="Error: <private>mine</private>DB_PASSWORD=hunter2",
        source_description="import",
        reference_time=1.5,
        metadata={
            "type": "error",
            "task_query": f"{rendered()}\nuse {GITHUB_CLASSIC}",
            "nested": {"list": [f"Bearer {BEARER}", 3]},
            "tokens": 12,
        },
    )
    clean = scrub_episode(episode)
    assert (clean.uuid, clean.group_id, clean.reference_time) == ("e1", "shop", 1.5)
    assert clean.name == "file:write secrets/[redacted:aws-access-key-id].json"
    assert clean.body == "Error: DB_PASSWORD=[redacted:password]"
    assert clean.metadata == {
        "type": "error",
        "task_query": "use [redacted:github-token]",
        "nested": {"list": ["Bearer [redacted:bearer-token]", 3]},
        "tokens": 12,
    }


# -- properties ------------------------------------------------------------------------------

SINGLE_LINE_SECRETS = [
    OPENAI_LEGACY, OPENAI_PROJECT, ANTHROPIC_API, AWS_ID, GITHUB_CLASSIC, GITHUB_FINE,
    SLACK_BOT, JWT, f"Bearer {BEARER}", f"password={PASSWORD}",
]  # fmt: skip
FRAGMENTS = [
    "<private>", "</private>", "<PRIVATE>", CONTEXT_FIRST_LINE, CONTEXT_LAST_LINE,
    "[Memory Context]", "\n", "- ", "password=", "token: ", "Bearer ", "sk-", "-----BEGIN",
    "PRIVATE KEY-----", "-----END RSA PRIVATE KEY-----", "://u:", "@", "[redacted:token]",
    *SINGLE_LINE_SECRETS,
]  # fmt: skip
PROSE = st.text(alphabet=string.ascii_letters + string.digits + " .,:;()'\"=-_/\n", max_size=60)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(st.sampled_from(FRAGMENTS), PROSE, st.text(max_size=20)), max_size=12))
def test_scrubbing_twice_changes_nothing_more(parts: list[str]) -> None:
    once = scrub("".join(parts))
    assert scrub(once) == once


@settings(max_examples=300, deadline=None)
@given(PROSE, st.sampled_from(SINGLE_LINE_SECRETS), PROSE)
def test_a_secret_anywhere_in_prose_is_never_kept(before: str, secret: str, after: str) -> None:
    value = secret.split("=", 1)[-1].removeprefix("Bearer ")
    assert value not in scrub(f"{before} {secret} {after}")


def test_inputs_built_to_be_slow_are_scrubbed_in_one_pass() -> None:
    # Each would take quadratic time with a naive pattern; here they must simply finish
    # (pytest-timeout stops the run otherwise) with the right answer.
    begins = "-----BEGIN RSA PRIVATE KEY-----\n" * 2000
    assert scrub(begins) == "[redacted:private-key]\n" * 2000
    headers = (CONTEXT_FIRST_LINE + "\nprompt\n") * 700
    assert scrub(headers) == "prompt\n" * 700
    identifier = "a" * 65_000 + "=x"
    assert scrub(identifier) == identifier
    opened = "<private>" * 10_000 + "x"
    assert scrub(opened) == ""


def test_a_task_query_is_scrubbed_before_it_is_clipped() -> None:
    tracker = TaskTracker()
    tracker.open("shop", "s", f"{rendered()}\n" + "x" * (MAX_QUERY - 10) + f" {OPENAI_PROJECT}")
    query = tracker.current("shop", "s").query
    assert query.startswith("x" * 10) and "sk-" not in query and len(query) == MAX_QUERY
