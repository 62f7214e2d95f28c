"""Credentials in forms the sixth campaign left, or hidden by an escape, never reach telemetry.

Found by the seventh campaign: a URL password holding a raw ``@`` or ``/``
(``postgresql://u:p@ss/w0rd@db/x`` kept ``ss/w0rd``; ``u:pa/ss@db`` was kept whole) or a user
name that is an e-mail address; credentials that are query parameters only inside a URL (Azure
Functions' ``?code=``, Google's ``?key=``, a presigned URL's ``X-Amz-Signature=``) and webhook
URLs whose path is the credential (Slack, Discord); the ``x-functions-key`` header; a key written
with JSON ``\\u00XX`` or URL ``%XX`` escapes (``sk\\u002dproj…``, a registered Azure key with
``%2B``/``%2F``); and Stripe's ``sk_live_``/``sk_test_`` keys (the ``sk_`` shape wanted no
second ``_``). Each went whole (or in part) into exception events, statuses, message content and
DB rows.
"""

from __future__ import annotations

import secrets
import urllib.parse

import pytest

from cmbagent_otel import redaction

from .conftest import needs_custom_client
from .test_credential_forms import assert_refused_call_is_clean
from .test_secrets import Sink, sink  # noqa: F401 (sink: fixture)


def _b64(n: int) -> str:
    return secrets.token_urlsafe(n)[:n].replace("-", "A").replace("_", "B")


def _hex(n: int) -> str:
    return secrets.token_hex(n)[:n]


def _unicode_escaped(text: str) -> str:
    return "".join(f"\\u{ord(c):04x}" if c in "-s" else c for c in text)


def forms(registered: str) -> dict[str, tuple[str, str]]:
    """name -> (text as an application, a library or a provider writes it, the part that must go)."""
    at_pw, slash_pw, mail_pw = f"p@{_b64(8)}/w0rd", f"pa/{_b64(10)}", f"M{_b64(14)}"
    azure_code, google_key, amz_sig = _b64(40) + "==", "Gk" + _b64(30), _hex(64)
    slack_path, discord_token = f"T{_b64(8)}/B{_b64(8)}/{_b64(24)}", _b64(60)
    openai_key = "sk-proj-" + _b64(40)
    shaped = {
        "stripe secret": "sk_live_" + _b64(24), "stripe test": "sk_test_" + _b64(24),
    }
    found = {
        "url password with @ and /": (f"postgresql://astro:{at_pw}@db.example.org/runs", at_pw[2:]),
        "url password with /": (f"postgresql://astro:{slash_pw}@db.example.org/runs", slash_pw[3:]),
        "url user is an e-mail": (f"mongodb+srv://me@lab.org:{mail_pw}@cluster0.example.net/db", mail_pw),
        "azure functions code": (f"https://fn.azurewebsites.net/api/render?code={azure_code}&clientId=x",
                                 azure_code[:-2]),
        "google key": (f"https://maps.example.com/api?center=0,0&key={google_key}", google_key),
        "presigned signature": ("https://b.s3.amazonaws.com/o?X-Amz-Algorithm=AWS4-HMAC-SHA256"
                                f"&X-Amz-Signature={amz_sig}", amz_sig),
        "slack webhook": (f"https://hooks.slack.com/services/{slack_path}", slack_path[-24:]),
        "discord webhook": (f"https://discord.com/api/webhooks/123456/{discord_token}", discord_token),
        "functions key header": (f"x-functions-key: {azure_code}", azure_code[:-2]),
        "json unicode-escaped key": ('{"note": "' + _unicode_escaped(openai_key) + '"}', openai_key[8:]),
        "percent-encoded registered key": (f"https://x.example/?q={urllib.parse.quote(registered, safe='')}",
                                           registered[6:20]),
    }
    found.update((name, (f"token {key} rejected", key[6:])) for name, key in shaped.items())
    return found


@pytest.fixture
def registered_key(isolated_secrets: None) -> str:
    key = _b64(20) + "+/" + _b64(20) + "=="  # an Azure-style key: "+" "/" "=" escaped in a URL
    redaction.register_secret(key)
    return key


def test_the_forms_are_redacted(registered_key: str) -> None:
    for name, (text, secret) in forms(registered_key).items():
        redacted = redaction.redact(f"failed with {text} (retry)") or ""
        assert secret not in redacted and redaction.REDACTED in redacted, (name, redacted)


def test_a_secret_holding_an_escape_itself_is_still_redacted(isolated_secrets: None) -> None:
    registered, learned = f"Pw%5f{_b64(10)}%41x", f"Zz%5f{_b64(10)}%2dy"  # generated passwords may
    redaction.register_secret(registered)
    for text in (f"login with {registered} failed", f"password={learned} then {learned} again"):
        redacted = redaction.redact(text) or ""
        assert registered not in redacted and learned not in redacted, redacted
        assert "%5f" not in redacted and "_" + registered[5:15] not in redacted, redacted  # nor decoded


@pytest.mark.parametrize("text", [
    "process exit code=1 after 3 s, key=value pairs, ?key",  # "code" and "key" outside a URL
    "https://host.example:8080/users/@me and http://localhost:5432/db?mail=a@b.org",  # a port, then an "@"
    "https://[::1]:8080/x", "50% done, 100%", "see https://x.example/a?b=1&c=2#code",
])
def test_look_alikes_stay(text: str) -> None:
    assert redaction.redact(text) == text


@needs_custom_client
def test_the_forms_never_reach_telemetry(sink: Sink, caplog: pytest.LogCaptureFixture,  # noqa: F811
                                         registered_key: str) -> None:
    assert_refused_call_is_clean(sink, caplog, forms(registered_key))


def test_escapes_without_a_secret_behind_them_stay_as_written() -> None:
    """Decoding serves the search only: a URL's %41 or a JSON \\u0041 that hides no key is kept."""
    from cmbagent_otel.redaction import redact

    for text in ("see https://x.example/a%41b?q=%2Fpath", 'json "\\u0041bc"', "100%25 of c%2B%2B"):
        assert redact(text) == text
