"""Session 43 (41st attack campaign): code constants named ``*_KEY`` taught their values.

``TEXT_KEY = "content"``, ``EMBEDDING_KEY = "embedding"``, ``MIME_TYPE_KEY = "mimeType"``,
``CONTEXT_UPDATE_METADATA_KEY = "ag2.context_update"``: the name of a key into data, in upper case, was read as an
environment variable's with ``KEY`` as a word (``AZURE_OPENAI_KEY``), and its value learned: "content" was then
redacted in every later text, inside longer words too. 8 of the 44 values ``bench/learned_corpus.py --prose`` counted
on 5d6278f were such. A value that is a word or an identifier's path under such a name (no word of a credential, no
provider's name before ``KEY``) is replaced where it stands, not learned; a value that looks random still is, and a
credential's name (``PASS_KEY``, ``STRIPE_KEY``) keeps its rule.

Both directions. The values are this file's own (``isolated_secrets``, ``unlearned_word``).
"""

from __future__ import annotations

import secrets

import pytest

from cmbagent_otel import redaction
from tests.conftest import unlearned_word

pytestmark = pytest.mark.usefixtures("isolated_secrets")


@pytest.mark.parametrize(("template", "value"), [
    ('TEXT_KEY = "{v}"', "{w}"),
    ("EMBEDDING_KEY = '{v}'\nBATCH_SIZE = 1000", "{w}"),
    ('MIME_TYPE_KEY = "{v}"', "{w}Type"),
    ('CONTEXT_UPDATE_METADATA_KEY = "{v}"', "ag2.{w}_update"),
    ('TENANT_VARIABLE_KEY = "{v}"', "a2a:{w}"),
])
def test_a_word_under_a_constant_named_key_is_not_learned(template: str, value: str) -> None:
    """Fails on 5d6278f (5 of 5): the value learned, then redacted in a later text, inside a longer word too."""
    value = value.format(w=unlearned_word("Ck").lower())
    redaction.safe_text(template.format(v=value))
    later = f"metadata[{value}] and the {value}s of each message"
    assert redaction.safe_text(later) == later


@pytest.mark.parametrize("template", ["MAPS_KEY={v}", 'LICENSE_KEY = "{v}"', "PASS_KEY='{w}'", "STRIPE_KEY={w}"])
def test_a_credential_under_a_name_with_key_is_still_learned(template: str) -> None:
    """Held up on 5d6278f: a random-looking value, or any value under a credential's name, is learned."""
    value, word = f"Mk{secrets.token_hex(6)}Q", unlearned_word("Cr")
    assert "[REDACTED]" in (redaction.safe_text(template.format(v=value, w=word)) or "")
    secret = value if "{v}" in template else word
    assert redaction.safe_text(f"later {secret}") == "later [REDACTED]"
