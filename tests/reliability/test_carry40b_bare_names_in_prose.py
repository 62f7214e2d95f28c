"""Session 40, second round: a bare secret name in prose taken for a secret-named key.

A log line or an error's message writes a secret's name among other words and then a message: ``error reading
token: connection refused``, ``failed to refresh access token: connection reset by peer``, ``could not decrypt
secret: permission denied``. The key/value scan read ``token: `` as a secret-named key and learned the
message's first word ("connection", "permission") as a secret, then redacted it in every later text of the
process, inside longer words too (the over-redaction that made session 39's CI red). As after an exception's
type, a key written as words or a quoted label: a bare name after a word on its line, before ``:``, followed
by a message (more words on its line) is redacted where it stands and not learned; its value alone on its line
is learned. The second half pins the keys that stay keys (redacted and learned): a name starting its line
(YAML indented or not, a header), ``=`` pairs (logfmt, environment files, code) and quoted keys of data.
"""

from __future__ import annotations

import secrets
import string

import pytest

from cmbagent_otel import redaction
from tests.conftest import unlearned_word

pytestmark = pytest.mark.usefixtures("isolated_secrets")


def _word() -> str:
    return unlearned_word("Zb")


@pytest.mark.parametrize("template", [
    "error reading token: {w} refused",
    "failed to refresh access token: {w} reset by peer",
    "could not decrypt secret: {w} denied",
    "2026-12-03 17:00:01 WARNING vault client password: {w} to reach the server",
    "dial tcp 127.0.0.1:8200: read credentials: {w}, retrying in 5s",
    'level=error msg="fetching auth_token: {w} refused" attempt=2',
    "upstream said Authorization: {w} header is malformed",
])
def test_a_bare_name_in_prose_teaches_no_secret(template: str) -> None:
    """Fails on ad3b5cf: the message's first word is redacted in a later text that holds nothing secret."""
    word = _word()
    first = redaction.safe_text(template.format(w=word))
    assert word not in first  # still redacted where it stands: a message may start with what its name names
    later = f"the archive said {word}; retrying"
    assert redaction.safe_text(later) == later


@pytest.mark.parametrize("template", [
    "password: {w}",
    "the password: {w}",
    "here is your new api token: {w}",
    "Authorization: Bearer {w}",
    "Authorization: Bearer {w} sent",
    "  password: {w}",
    "  - password: {w}  # the admin's",
    "> X-Api-Key: {w}",
    '{{"token": "{w}"}}',
    '{{"token": "{w}", "note": "rotate it soon"}}',
    "api_key='{w}'",
    "OPENAI_API_KEY={w}",
    "export DB_PASS={w}",
    "export DB_PASS={w} && ./run.sh",
    "msg=connect user=bob password={w} host=db",
    "ts=2026-12-03 level=info msg=login token={w} took=3ms",
    "connecting with password = {w} as admin",
])
def test_a_key_of_data_is_learned(template: str) -> None:
    """Keys that stay keys, the value redacted and learned (redacted in a later text too)."""
    word = _word()
    assert word not in (redaction.safe_text(template.format(w=word)) or "")
    assert word not in (redaction.safe_text(f"later: {word} again") or "")


@pytest.mark.parametrize("word", ["ECONNRESETCARRYFORTY", "timed-outcarryforty", "can'tcarryforty"])
def test_an_error_code_or_a_joined_word_at_a_messages_start_is_not_learned(word: str) -> None:
    """Words of capitals, or joined by a hyphen or an apostrophe, are ordinary words too (an errno's name, "timed-out",
    "can't"): learned, each was redacted in every later text."""
    redaction.safe_text(f"error reading token: {word} by peer")
    later = f"the socket said {word}; retrying"
    assert redaction.safe_text(later) == later


@pytest.mark.parametrize("template", [
    "my vault token: {v} as before, keep it",  # a bare name in prose
    "Your OpenAI API key: {v} is active",  # a key written as words
    "span 'password': {v} was sent in clear",  # a quoted label
    "InvalidApiKeyError: {v} was refused by the provider",  # an exception's type
])
def test_a_credential_shaped_value_at_a_messages_start_is_learned(template: str) -> None:
    """Only an ordinary word (letters, capitalised at most) at a message's start goes unlearned: a value with a
    digit, an inner capital or a symbol is a credential written in a sentence. Shown in a later text on this
    branch before the lead's review (all four rules learned nothing followed by more words)."""
    value = "hK" + "".join(secrets.choice(string.ascii_lowercase) for _ in range(8)) + "7x!"
    assert value not in (redaction.safe_text(template.format(v=value)) or "")
    assert value not in (redaction.safe_text(f"later: {value}") or "")
