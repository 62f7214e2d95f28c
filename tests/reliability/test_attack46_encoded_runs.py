"""Session 46 (46th attack campaign): encoded secrets session 45 left readable.

* Base64 of text glued to other characters of base64's alphabet (``x_<run>``, a path's segment after ``/``,
  ``<run>x_y``, a run whose first 16 characters hold ``+/-_``): its start or end was not known, and it was not
  decoded. Groups of text are looked for inside such a run now, at any offset.
* Base64 or hex of UTF-8 text beyond ASCII (a Spanish, Russian or Chinese note holding ``password=<v>``): the
  classes of ASCII text refused its bytes. A whole run that decodes to printable UTF-8 is searched now.
* A JSON Web Token glued after letters or digits (``tokeneyJ...``, ``x9eyJ...``): the shape is looked for at a run's
  start only (session 45, against a quadratic scan). It is found by its second part now (``.eyJ``), linear.

Both directions: random base64 glued to words, long identifiers, hashes, base64 of text holding no secret and a
token-like text without a token's first part stay as written. The new searches run under a CPU-time alarm on hostile
runs (a liveness bound, not a speed target: linear needs well under a second).
"""

from __future__ import annotations

import base64
import secrets

import pytest

from cmbagent_otel import redaction
from tests.conftest import unlearned_word

from .test_adversarial_text import cpu_alarm

pytestmark = pytest.mark.usefixtures("isolated_secrets")

TOKEN = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U"


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


@pytest.mark.parametrize("glue", [
    "x_{run}", "/srv/data/{run}", "{run}x_y", "ab{run}", "Zm9v+{run}", "{run}/more",
], ids=["underscore-before", "path-segment", "glued-after", "letters-before", "plus-before", "slash-after"])
def test_base64_of_text_glued_to_its_alphabet_is_decoded(glue: str) -> None:
    """Fails on main (6 of 6): the run stood as written (readable by decoding it) and its value was not learned."""
    value = unlearned_word("Gq") + "3"
    run = _b64(f"password={value}")
    out = redaction.safe_text(f"id {glue.format(run=run)} end") or ""
    assert run not in out and "[REDACTED]" in out
    assert redaction.safe_text(f"later {value}") == "later [REDACTED]"


def test_a_run_whose_first_characters_hold_plus_or_slash_is_decoded() -> None:
    """Fails on main: ``?``, ``>`` or ``~`` in the text's first 12 bytes put ``+`` or ``/`` among the run's first 16
    characters, which were looked for as letters and digits only."""
    value = unlearned_word("Pf") + "2"
    run = _b64(f">>?? ~~ api_key={value}")
    assert "+" in run[:16] or "/" in run[:16]
    assert redaction.safe_text(f"note {run} end") == "note [REDACTED] end"
    assert redaction.safe_text(f"later {value}") == "later [REDACTED]"


@pytest.mark.parametrize("encode", [
    lambda raw: base64.b64encode(raw).decode(),
    lambda raw: base64.urlsafe_b64encode(raw).decode().rstrip("="),
    lambda raw: raw.hex(),
    lambda raw: raw.hex().upper(),
], ids=["base64", "url-safe", "hex", "upper-hex"])
@pytest.mark.parametrize("note", [
    "contraseña de la base: password={v}",
    "пароль от базы: password={v}",
    "数据库的密码 api_key: {v}",
], ids=["spanish", "russian", "chinese"])
def test_encoded_utf8_text_holding_a_secret_is_decoded(encode: object, note: str) -> None:
    """Fails on main (12 of 12): bytes beyond ASCII are no text by the classes of ASCII text."""
    value = unlearned_word("Ux") + "8"
    run = encode(note.format(v=value).encode())  # type: ignore[operator]
    assert redaction.safe_text(f"tool wrote {run} and exited") == "tool wrote [REDACTED] and exited"
    assert redaction.safe_text(f"later {value}") == "later [REDACTED]"


@pytest.mark.parametrize("glue", ["token", "x9", "tok_", "Bearer-", "%20x"])
def test_a_token_glued_after_letters_is_replaced(glue: str) -> None:
    """Fails on main (5 of 5): the token's shape is looked for at a run's start only."""
    out = redaction.safe_text(f"auth {glue}{TOKEN} end") or ""
    assert TOKEN.split(".")[1] not in out and out == f"auth {glue}[REDACTED] end"


@pytest.mark.parametrize("text", [
    f"blob x_{base64.b64encode(secrets.token_bytes(90)).decode()} end",
    f"img data:image/png;base64,{base64.b64encode(secrets.token_bytes(3000)).decode()}",
    f"path /srv/{_b64('the quick brown fox jumps over the lazy dog')}/x end",
    f"hex sha256={secrets.token_hex(32)} and {secrets.token_hex(20)}",
    "ident some_ExtraordinarilyLongIdentifierName_and_AnotherVeryLongIdentifierNameHere end",
    f"utf8 {_b64('ни одного секрета здесь нет, только слова')} end",
    "version v1.eyJhbGciOiJub25lIn0.notatoken and the eyJ run.eyJsomethingelse.onlytwo",
])
def test_encoded_runs_holding_no_secret_stay(text: str) -> None:
    """Both directions (held up on main): nothing secret decoded, or no text at all: as written."""
    assert redaction.safe_text(text, 1 << 16) == text


@pytest.mark.parametrize("hostile", [
    ("QUFBQUFBQUFBQUFB////" * 4_000),  # four groups of text, then a break, at every step
    ("x_" + "QUFB" * 20_000),  # one long glued run of text holding nothing
    ("+" * 30_000 + "a" * 16) * 2,  # a long run of "+" before each run of letters
    ("a" * 16 + "/") * 4_000,  # many short runs joined by "/"
    ("x" + "eyJ" * 30_000 + ".eyJ" + "a" * 8 + ".") * 2,  # glued token starts, no signature
    ("ab.eyJ" + "c" * 9) * 8_000,  # second parts without a first
], ids=["groups", "long-run", "plus-run", "slash-runs", "token-starts", "second-parts"])
def test_the_new_searches_are_linear(hostile: str) -> None:
    """Liveness (CPU-time alarm): each hostile text of ~80-120 kB is redacted within the bound."""
    with cpu_alarm(20):
        redaction.redact(hostile)
