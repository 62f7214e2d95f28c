"""Session 44 (44th attack campaign): a URL's credentials in an environment variable named as a secret.

``SENTRY_DSN=https://<key>@o1.ingest.sentry.io/42``, ``REDIS_PASSWORD_URL=redis://app:<pw>@cache:6379``: a variable
named as a secret had its whole value registered, and the URL rule (a URL's password, an https user info without
one: what ``DATABASE_URL`` or ``HOMEPAGE_URL`` give) was skipped for it. A text quoting the key or the password alone
(a tool printing the DSN's key, ``redis-cli -a <pw>``) showed it. Both are registered now; an authentication method
under a name ending in AUTH is still no secret (``SMTP_AUTH``).
"""

from __future__ import annotations

import secrets

import pytest

from cmbagent_otel import redaction

pytestmark = pytest.mark.usefixtures("isolated_secrets")


@pytest.mark.parametrize(("name", "template"), [
    ("SENTRY_DSN", "https://{v}@o1.ingest.sentry.io/42"),
    ("REDIS_PASSWORD_URL", "redis://app:{v}@cache:6379/0"),
    ("AUTH_TOKEN_URL", "https://login.example.com/oauth?access_token={v}"),
])
def test_a_urls_credential_under_a_secrets_name_is_registered(monkeypatch: pytest.MonkeyPatch, name: str,
                                                             template: str) -> None:
    """Fails on main (3 of 3): the whole URL registered, the credential alone shown."""
    value = secrets.token_hex(16)
    monkeypatch.setenv(name, template.format(v=value))
    redaction.register_new_environment()
    assert redaction.safe_text(f"the key {value} alone") == "the key [REDACTED] alone"
    assert redaction.safe_text(template.format(v=value)) is not None
    assert value not in (redaction.safe_text(template.format(v=value)) or "")


def test_a_method_under_an_auth_name_stays_readable(monkeypatch: pytest.MonkeyPatch) -> None:
    """Both directions (held up on main): a method's name is no secret, whatever URL-like form it takes."""
    monkeypatch.setenv("SMTP_AUTH", "CRAM-MD5")
    redaction.register_new_environment()
    assert redaction.safe_text("the server asks for CRAM-MD5") == "the server asks for CRAM-MD5"
