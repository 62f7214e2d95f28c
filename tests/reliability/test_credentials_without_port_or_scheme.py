"""Credentials the URL pattern read as something else never reach telemetry.

Found by the eleventh campaign (the ninth left "a DSN without a port" open): a password that starts
with digits and holds one ``/`` (``postgresql://app:2024/Summer@db/lab``) was read as a port and a
path and kept whole, a ``redis://:2024/x@cache`` password too; a ``user:password@host`` written
without a scheme (a DSN in a config line, ``mysql`` / ``psql`` connection text) matched nothing;
and a token that is a URL's whole user name (``https://TOKEN@github.com/org/repo.git``, how
GitHub, Azure DevOps and Bitbucket clone with a token) had no ``:`` for the pattern to start from.
Each went whole into exception events, statuses, message content and rows.
"""

from __future__ import annotations

import pytest

from cmbagent_otel import redaction

from .conftest import needs_custom_client
from .test_credential_forms import _b64, assert_refused_call_is_clean
from .test_secrets import Sink, sink  # noqa: F401 (sink: fixture)

pytestmark = pytest.mark.usefixtures("isolated_secrets")


def forms() -> dict[str, tuple[str, str]]:
    """name -> (text as an application writes it, the part that must go)."""
    digits_pw, redis_pw, bare_pw, token = f"2024/{_b64(12)}", f"77/{_b64(12)}", f"S3{_b64(12)}!", f"{_b64(30)}9"
    return {
        "password of digits and a slash": (f"postgresql://app:{digits_pw}@db.internal/lab", digits_pw[5:]),
        "redis password of digits and a slash": (f"redis://:{redis_pw}@cache:6379/0", redis_pw[3:]),
        "dsn without a scheme": (f"dsn app:{bare_pw}@db.internal/lab", bare_pw),
        "dsn without a scheme, with a port": (f"connecting to 'app:{bare_pw}@db.internal:3306'", bare_pw),
        "token as the user name": (f"git clone https://{token}@github.com/org/repo.git", token),
    }


def test_the_forms_are_redacted() -> None:
    for name, (text, secret) in forms().items():
        redacted = redaction.redact(f"failed with {text} (retry)") or ""
        assert secret not in redacted and redaction.REDACTED in redacted, (name, redacted)
    assert redaction.redact("dsn app:S3cret99@db.internal/lab") == f"dsn app:{redaction.REDACTED}@db.internal/lab"


@pytest.mark.parametrize("text", [
    "https://host.example:443/users/me@example.org and http://localhost:4873/@scope/pkg",
    "http://localhost:5432/db?mail=a@b.org",
    "mailto:john.smith99@example.org, sip:alice2024@example.org, write to bob@example.org at 10:30",
    "ssh://git@github.com/org/repo.git, git@github.com:org/repo.git, https://user@example.org/",
    "Contact:alice@example.org",  # letters only: an address, not a password
])
def test_look_alikes_stay(text: str) -> None:
    assert redaction.redact(text) == text


@needs_custom_client
def test_the_forms_never_reach_telemetry(sink: Sink, caplog: pytest.LogCaptureFixture) -> None:  # noqa: F811
    assert_refused_call_is_clean(sink, caplog, forms())
