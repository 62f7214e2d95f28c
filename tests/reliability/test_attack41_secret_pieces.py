"""Session 41 (39th attack campaign): a piece of a long registered secret.

A registered secret was matched whole only: the head of a 5,000-character key cut at 4,096 characters by a client's
own length limit, the tail of a PEM key quoted in a message or a part of an Azure AD token went into telemetry as
written (session 40 measured 1,024 characters and more of one shown). A secret of 512 characters or more is now
also found by a piece of 32 characters in each block of 32 (from the block's first digit), each widened to all of
the text that
goes on as the secret does: any part of 96 characters or more is redacted, the text around it kept.

The secrets are this file's own (``isolated_secrets``: nothing registered here outlives the test).
"""

from __future__ import annotations

import json
import secrets
import string

import pytest

from cmbagent_otel import redaction

pytestmark = pytest.mark.usefixtures("isolated_secrets")

_ALPHABET = string.ascii_letters + string.digits + "+/"


def _long_secret(size: int) -> str:
    return "".join(secrets.choice(_ALPHABET) for _ in range(size))


def _visible_run(secret: str, shown: str) -> int:
    """The longest part of ``secret`` (checked at every 8th position, up to 40 characters) found in ``shown``."""
    return max((size for size in range(8, 41) for at in range(0, len(secret) - size, 8)
                if secret[at:at + size] in shown), default=0)


@pytest.mark.parametrize(("size", "start", "end"), [
    (5000, 0, 4082),  # the head, cut by a client's length limit
    (5000, 3500, 5000),  # the tail
    (5000, 1234, 1334),  # 100 characters from the middle
    (20000, 7000, 7096),  # 96 characters: the shortest part always found
    (600, 0, 300),  # a secret just past the size that is indexed
])
def test_a_part_of_a_long_registered_secret_is_redacted(size: int, start: int, end: int) -> None:
    """Fails on 3c387d5 for every part: shown whole. The words around it stay."""
    secret = _long_secret(size)
    redaction.register_secret(secret)
    text = f"client said: {secret[start:end]}...[truncated] (retrying)"
    shown = redaction.safe_text(text, limit=len(text)) or ""
    assert shown.startswith("client said: ") and shown.endswith("...[truncated] (retrying)")
    assert _visible_run(secret, shown) < 8, shown
    data = redaction.safe_text({"error": {"detail": secret[start:end]}}) or ""
    assert _visible_run(secret, data) < 8 and json.loads(data)["error"]["detail"] == redaction.REDACTED


def test_a_short_secret_and_words_shared_with_a_long_one_are_not_pieces() -> None:
    """Both directions: a masked API key's head (``sk-proj-abc...``) is no piece (a key under 512 characters is
    matched whole), nor are words a long secret shares with other texts (a service account's JSON keys)."""
    key = "sk-proj-" + _long_secret(120)
    document = json.dumps({"type": "service_account", "project_id": "wm-attack41-project",
                           "private_key": _long_secret(1600), "client_email": "svc@example.org"}, indent=2)
    redaction.register_secret(key)
    redaction.register_secret(document)
    masked = f"using key {key[:12]}... for project"
    assert redaction.safe_text(masked) == masked
    other = json.dumps({"type": "service_account", "project_id": "another-project",
                        "client_email": "other@example.org"}, indent=2)
    assert redaction.safe_text(other) == other
