"""Session 42 (40th attack campaign): code a model writes, read as key/value text, taught ordinary words.

cmbagent's engineer writes code, and the code execution's output, the tool arguments and the messages quote it. The
key/value scan read its variables, types and calls as secrets: ``connect(user, password=password)`` learned
"password", ``OpenAI(api_key=api_key)`` "api_key", ``token: Optional[str]`` "Optional", ``secret: Annotated[...]``
"Annotated", argparse's ``--api-key API_KEY`` "API_KEY", a docstring's ``api_key: OpenAI API key.`` "OpenAI",
TypeScript's ``password: string`` "string"; each was then redacted in every later text of the process, inside longer
words too (``export OPENAI_API_KEY=...`` shown as ``export OPENAI_[REDACTED]=...``, ``substring`` as
``sub[REDACTED]``). Over 900 files of AG2, openai and httpx read paragraph by paragraph, 178 values were learned on
4a0d79e, 31 now. A bare value that is a call, a type or an index, a variable named as a secret, a type's name, a
provider's name or an authentication scheme alone is no secret now; a literal (quoted, or with a digit) still is.
An ordinary word as a call's keyword argument (``f(token=content)``) is a variable of the code: redacted where it
stands, not learned (the lead, at the merge: "content" or "value" learned hid the word in every later text).

The values are this file's own (``isolated_secrets``).
"""

from __future__ import annotations

import secrets

import pytest

from cmbagent_otel import redaction
from tests.conftest import unlearned_word

pytestmark = pytest.mark.usefixtures("isolated_secrets")


@pytest.mark.parametrize(("code", "later"), [
    ("conn = connect(user=user, password=password)", "the password field of the form"),
    ("client = OpenAI(api_key=api_key)\nprint(client.models.list())", "set api_key in the config"),
    ("def f(token: Optional[str] = None) -> None: ...", "Optional fields are skipped"),
    ("def f(secret: Annotated[str, Field()]) -> None: ...", "Annotated types"),
    ("usage: fit [-h] [--api-key API_KEY] [--chains N]", "export OPENAI_API_KEY=... first"),
    ("Args:\n    api_key: OpenAI API key.\n", "the OpenAI client"),
    ("interface Login { password: string; token?: string }", "a substring of the string"),
    ("api_key = os.environ.get('OPENAI_API_KEY')\nkey = os.environ['ANTHROPIC_API_KEY']", "os.environ.get"),
    ("client = Client(token=self.token, api_key=config.api_key)", "self.token and config.api_key"),
    ("Authorization: Bearer\n", "Bearer tokens expire"),
])
def test_code_naming_a_secret_teaches_no_word(code: str, later: str) -> None:
    """Fails on 4a0d79e (10 of 10): the code itself lost its names, and the later text lost the word."""
    assert redaction.safe_text(code) == code
    assert redaction.safe_text(later) == later


@pytest.mark.parametrize("template", [
    "connect(user='bob', password='{v}')",
    "client = OpenAI(api_key=\"{v}\")",
    "connect(user, password={v})",
    "InvalidApiKeyError: {v}",
    "password={v}, user=bob",
])
def test_a_literal_in_code_is_still_learned(template: str) -> None:
    """The other direction: a quoted literal, or a bare value with a digit, is the secret."""
    value = f"Cv{secrets.token_hex(5)}8x"
    shown = redaction.safe_text(template.format(v=value)) or ""
    assert value not in shown and "[REDACTED]" in shown
    assert value not in (redaction.safe_text(f"later {value}") or "")


@pytest.mark.parametrize("template", [
    "resp = post(url, token={w})",
    "conn = connect(host, password={w}, timeout=3)",
    "client = Client(\n    api_key={w},\n)",
])
def test_an_ordinary_word_as_a_calls_argument_is_not_learned(template: str) -> None:
    """Fails on 0e4b0c2 (3 of 3: the word was learned, redacted in a later sentence): a call's keyword argument
    without a digit is a variable; it stays redacted where it stands (it could still be a plain-word password)."""
    word = unlearned_word("callarg")
    shown = redaction.safe_text(template.format(w=word)) or ""
    assert word not in shown and "[REDACTED]" in shown
    later = f"the {word} of the row"
    assert redaction.safe_text(later) == later


@pytest.mark.parametrize("template", [
    "msg=connect user=bob password={w} host=db",
    "login(user=bob) password={w}",
    "(see below) password={w}",
])
def test_a_plain_word_outside_a_calls_arguments_is_still_learned(template: str) -> None:
    """The other direction: a logfmt pair, or a pair after a closed parenthesis, is data: learned."""
    word = unlearned_word("notcallarg")
    assert word not in (redaction.safe_text(template.format(w=word)) or "")
    assert word not in (redaction.safe_text(f"later: {word} again") or "")
