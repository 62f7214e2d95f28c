"""Session 45 (45th attack campaign): base64 or hex of plain text holding a secret.

A tool that base64-encodes or hex-dumps a configuration line (``password=<v>``, ``api_key: sk-...``) put the secret
into telemetry readable by decoding the run: only blobs with a magic (gzip, zlib, bzip2, xz, PEM, a JSON object) were
decoded, and a registered secret's own encoded forms known. A run of base64 (standard or URL-safe, padded or not) or
hex (either case) whose bytes are text is decoded now and searched as any text; where that finds a secret the run is
replaced whole, and a value under a secret's name is learned (a later text quoting it alone is redacted).

Both directions: such runs holding no secret, random base64 keys that are no text, hashes and long words stay as
written. The values are this file's own (``isolated_secrets``, ``unlearned_word``).
"""

from __future__ import annotations

import base64
import secrets

import pytest

from cmbagent_otel import redaction
from tests.conftest import unlearned_word

pytestmark = pytest.mark.usefixtures("isolated_secrets")

ENCODINGS = {
    "base64": lambda raw: base64.b64encode(raw).decode(),
    "base64, unpadded": lambda raw: base64.b64encode(raw).decode().rstrip("="),
    "url-safe base64": lambda raw: base64.urlsafe_b64encode(raw).decode(),
    "hex": lambda raw: raw.hex(),
    "upper-case hex": lambda raw: raw.hex().upper(),
}


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("template", [
    "password={v}",
    "DB_PASSWORD={v}\nDB_HOST=db.internal\n",
    "[client]\nuser = app\npassword = {v}\n",
    '{{"host": "db", "token": "{v}"}}',
])
def test_an_encoded_text_with_a_secret_is_replaced_and_its_value_learned(encoding: str, template: str) -> None:
    """Fails on main (17 of 20; base64 of the JSON object was decoded by its magic): the run stood as written (the
    value readable by decoding it), and the value was not learned: a later text quoting it showed it."""
    value = unlearned_word("Ez") + "7"
    run = ENCODINGS[encoding](template.format(v=value).encode())
    assert redaction.safe_text(f"the tool printed {run} and exited") == "the tool printed [REDACTED] and exited"
    assert redaction.safe_text(f"later {value} again") == "later [REDACTED] again"


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_an_encoded_key_of_a_known_shape_is_replaced(encoding: str) -> None:
    """Fails on main (5 of 5): an API key known by its shape only (never registered), encoded alone or after its
    name, stood as written."""
    key = "sk-proj-" + secrets.token_hex(20)
    for text in (key, f"OPENAI_API_KEY: {key}"):
        run = ENCODINGS[encoding](text.encode())
        assert redaction.safe_text(f"config {run} end") == "config [REDACTED] end"


@pytest.mark.parametrize("text", [
    f"blob {base64.b64encode(b'Never gonna give you up, never gonna let you down').decode()} end",
    f"hex {b'the quick brown fox jumps over the lazy dog'.hex()} end",
    f"key {base64.b64encode(bytes(range(200, 232))).decode()} end",  # bytes that are no text
    "sha256 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08 end",
    "internationalisation and ExtraordinarilyLongIdentifierName stay",
    f"uuid {secrets.token_hex(16)} and {base64.b64encode(b'the password is hashed with bcrypt').decode()}",
])
def test_encoded_text_holding_no_secret_stays(text: str) -> None:
    """Both directions (held up on main): nothing secret in the decoded text, or no text at all: as written."""
    assert redaction.safe_text(text) == text


def test_a_run_inside_longer_words_or_paths_is_taken_apart() -> None:
    """A base64 run glued to other characters of base64's alphabet (``x_<run>``, a path's segment after ``/``) was
    not decoded here (its start was not known); session 46 decodes it from its first groups of text (see
    ``test_attack46_encoded_runs.py``). A whole run beside it is decoded as before."""
    value = unlearned_word("Gl") + "9"
    run = base64.b64encode(f"password={value}".encode()).decode()
    assert redaction.safe_text(f"id x_{run}") == "id x_[REDACTED]"
    assert redaction.safe_text(f"id x_{run} then {run}") == "id x_[REDACTED] then [REDACTED]"


@pytest.mark.parametrize("encoding", ["base64", "hex"])
def test_tool_arguments_teach_an_encoded_texts_value(encoding: str) -> None:
    """Fails on main (2 of 2). With content capture off a tool's arguments are only learned from (never recorded):
    their encoded text was not decoded, and the tool's error quoting the value alone showed it."""
    value = unlearned_word("Ta") + "3"
    run = ENCODINGS[encoding](f"password={value}".encode())
    redaction.learn_secrets_in({"note": f"creds {run}"})
    assert redaction.safe_text(f"login refused for {value}") == "login refused for [REDACTED]"
