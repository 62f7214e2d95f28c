"""Session 39 (found carrying the limits over): an exception's type name taken for a secret-named key.

A traceback's last line, or a logged error, prints the exception's type before its message:
``botocore.exceptions.NoCredentialsError: Unable to locate credentials``. The key/value scan took the type's
name (it holds ``credential``, ``password``, ``secret``...) for a secret-named key and learned the message's
first word as a secret: "Unable" was then redacted in every later text of the process. The same learned
"upstream" from ``tests.reliability.test_secrets.UpstreamRejected: upstream rejected ...`` (``test_secrets``
holds ``secret``), which made
``test_attack4_llm_config_credentials.py::test_attack4_plain_header_and_query_values_stay_visible`` fail when
run after ``test_secrets.py``. The word is still redacted where it stands (a message may start with what its
type names); it is no longer learned.
"""

from __future__ import annotations

import traceback

import pytest

from cmbagent_otel import redaction

pytestmark = pytest.mark.usefixtures("isolated_secrets")


class NoCredentialsError(Exception):
    pass


class PasswordSetError(Exception):
    pass


class UpstreamRejected(Exception):
    """Qualified by this module's path, which holds ``secret``, as ``test_secrets.py``'s is."""


def _traceback_of(exc: Exception) -> str:
    try:
        raise exc
    except Exception as raised:
        return "".join(traceback.format_exception(raised))


# the words are this test's own and hold no common word (a learned secret is redacted inside longer words too;
# ``isolated_secrets`` now starts each test with nothing learned, see test_carry40_isolated_secrets.py)
@pytest.mark.parametrize(("exc", "word"), [
    (NoCredentialsError("Unablecarrythirtynine to locate credentials"), "Unablecarrythirtynine"),
    (PasswordSetError("Keyringcarrythirtynine to store the keyring entry"), "Keyringcarrythirtynine"),
    (UpstreamRejected("upstreamcarrythirtynine rejected the request"), "upstreamcarrythirtynine"),
])
def test_the_message_after_an_exception_type_is_not_learned(exc: Exception, word: str) -> None:
    """Fails on d1ab575: the word after the type is redacted in a later text that has nothing secret."""
    shown = redaction.safe_text(_traceback_of(exc)) or ""
    assert f"{type(exc).__qualname__}: " in shown
    later = f"{word} to reach the archive; retrying in 5 s"
    assert redaction.safe_text(later) == later


def test_secret_named_keys_stay_keys() -> None:
    """What must not change: keys written as names, dotted names and capitalised headers still hide their value."""
    for key in ("Password", "app.config.Password", "X-Api-Key", "openai.api.key", "auth.Token", "ApiKey"):
        value = f"Zq{key.replace('.', '').replace('-', '')[:4]}7x91"
        out = redaction.safe_text(f"{key}: {value}") or ""
        assert value not in out and redaction.REDACTED in out
        assert value not in (redaction.safe_text(f"elsewhere {value}") or "")  # learned
