"""Session 43 (41st attack campaign): values under names for what is said of a credential or where it is kept.

Found by the corpus count (``bench/learned_corpus.py``): ``api_key_env_var = config``, ``api_key_ids: Return only
usage for these API keys``, ``api_key_query: APIKeyQuery = security`` (a Python annotation: the type's name read as
the key) and ``_AUTHORIZATION = "authorization"`` taught "config", "Return", "security", "authorization", then
redacted in every later text. Under a name whose last word says where the credential is kept or what is said of it
(``_env_var``, ``_file``, ``_ids``, ``_header``, ``_type``, ``_url``...), a word or an identifier is replaced where it
stands, not learned; so is a value that is the name's own word and a value after a class's name annotating a variable.
A value with a digit still is.

Both directions. The values are this file's own (``isolated_secrets``, ``unlearned_word``).
"""

from __future__ import annotations

import secrets

import pytest

from cmbagent_otel import redaction
from tests.conftest import unlearned_word

pytestmark = pytest.mark.usefixtures("isolated_secrets")


@pytest.mark.parametrize("template", [
    "api_key_env_var = {w}",
    "    api_key_ids: {w} only usage for these API keys.",
    "api_key_query: APIKeyQuery = {w}  # type: ignore[assignment]",
    "password_file: {w}",
    "secret_name = {w}.prod_db",
])
def test_a_word_under_a_name_of_no_secret_is_not_learned(template: str) -> None:
    """Fails on 5d6278f (4 of 5; the fifth was learned whole, ``<w>.prod_db``): the word learned, then redacted in a
    later text."""
    word = unlearned_word("Nw").lower()
    redaction.safe_text(template.format(w=word))
    later = f"the {word} of the run"
    assert redaction.safe_text(later) == later


def test_a_value_that_is_its_names_word_is_not_learned() -> None:
    """Fails on 5d6278f: ``_AUTHORIZATION = "authorization"`` taught "authorization"."""
    redaction.safe_text('_AUTHORIZATION = "authorization"\n_DATE = "x-amz-date"')
    assert redaction.safe_text("the authorization header") == "the authorization header"


@pytest.mark.parametrize("template", ["api_key_id = {v}", "password_header: {v}", "Error: Password = {v}"])
def test_a_random_looking_value_under_such_a_name_is_still_learned(template: str) -> None:
    """Held up on 5d6278f: a value with a digit is learned whatever the name's last word."""
    value = f"Ak{secrets.token_hex(6)}Z"
    redaction.safe_text(template.format(v=value))
    assert redaction.safe_text(f"later {value}") == "later [REDACTED]"
