"""Session 43 (41st attack campaign): names ending in AUTH, and logins under a secret name.

* ``NPM_AUTH``, ``GH_AUTH``, ``PROXY_AUTH``, ``HTTP_AUTH``: registered when set in the environment (``*AUTH*``), but
  in a text (a printed ``.env`` file, ``export GH_AUTH=...``, a dict of settings, a tool's arguments) no rule took the
  name (only ``REDISCLI_AUTH`` was listed): the value shown there and in every later text. An upper-case name whose
  last word is ``AUTH`` is a secret's now, and ``npm_auth``, ``ghAuth`` after a word naming a service (as ``*_key``).
* The same names hold a method as often (``SMTP_AUTH=CRAM-MD5``, ``HTTP_AUTH=basic``, ``db_auth: scram-sha-256``):
  set in the environment, "CRAM-MD5" was registered and redacted in every later text; such a value is no secret now,
  in the environment, in text and in data.
* ``PROXY_AUTH=bob:<v>``: a ``user:password`` value under a secret name was learned whole; a later text quoting the
  password alone showed it. The password is learned (or registered) too.

The values are this file's own (``isolated_secrets``).
"""

from __future__ import annotations

import secrets

import pytest

from cmbagent_otel import redaction

pytestmark = pytest.mark.usefixtures("isolated_secrets")


def _credential() -> str:
    return f"Au{secrets.token_hex(6)}9q"


@pytest.mark.parametrize(("template", "expected"), [
    ("NPM_AUTH={v}\nNPM_REGISTRY=https://registry.npmjs.org/", "NPM_AUTH=[REDACTED]\nNPM_REGISTRY=https://registry.npmjs.org/"),
    ("export GH_AUTH='{v}'", "export GH_AUTH='[REDACTED]'"),
    ("PROXY_AUTH: {v}", "PROXY_AUTH: [REDACTED]"),
    ('{{"HTTP_AUTH": "{v}", "timeout": 30}}', '{"HTTP_AUTH": "[REDACTED]", "timeout": 30}'),
    ("npm_auth = {v}", "npm_auth = [REDACTED]"),
    ("ghAuth: {v}", "ghAuth: [REDACTED]"),
])
def test_a_value_under_a_name_ending_in_auth_is_hidden_there_and_later(template: str, expected: str) -> None:
    """Fails on 5d6278f (6 of 6): the value shown there and in a later text."""
    value = _credential()
    assert redaction.safe_text(template.format(v=value)) == expected
    assert value not in (redaction.safe_text(f"the tool printed {value}") or "")


def test_a_value_under_a_name_ending_in_auth_in_data_is_hidden_there_and_later() -> None:
    """Fails on 5d6278f: the dict's value kept, and shown later."""
    value = _credential()
    assert redaction.scrub({"GH_AUTH": value, "user": "bob"}) == {"GH_AUTH": "[REDACTED]", "user": "bob"}
    assert value not in (redaction.safe_text(f"echo {value}") or "")


@pytest.mark.parametrize("text", ["PROXY_AUTH=bob:{v}", "auth: alice:{v}", '{{"NPM_AUTH": "ci-bot:{v}"}}'])
def test_the_password_of_a_login_under_a_secret_name_is_learned(text: str) -> None:
    """Fails on 5d6278f (3 of 3): ``user:<v>`` learned whole, ``<v>`` alone shown in a later text."""
    value = _credential()
    assert value not in (redaction.safe_text(text.format(v=value)) or "")
    assert redaction.safe_text(f"login failed for {value} today") == "login failed for [REDACTED] today"


@pytest.mark.parametrize(("name", "method"), [
    ("SMTP_AUTH", "CRAM-MD5"), ("MONGO_AUTH", "SCRAM-SHA-256"), ("PROXY_AUTH", "ntlm"), ("HTTP_AUTH", "basic"),
    ("KAFKA_SASL_AUTH", "OAUTHBEARER"),
])
def test_a_method_under_a_name_ending_in_auth_is_no_secret(name: str, method: str,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Fails on 5d6278f (3 of 5; ``ntlm`` and ``basic`` were no secrets: under 6 characters): set in the environment,
    the method's name was registered and redacted in every later text."""
    monkeypatch.setenv(name, method)
    redaction.register_new_environment()
    later = f"the server asks for {method} first"
    assert redaction.safe_text(later) == later


@pytest.mark.parametrize("text", [
    "SMTP_AUTH=CRAM-MD5", "db_auth: scram-sha-256", "POSTGRES_HOST_AUTH_METHOD=scram-sha-256", "HTTP_AUTH=basic",
    '{"SMTP_AUTH": "DIGEST-MD5"}', "GIT_AUTHOR_NAME=Jane Doe", "SSH_AUTH_SOCK=/tmp/ssh-XXXX/agent.17",
])
def test_methods_names_and_paths_stay_as_written(text: str) -> None:
    """Both directions: a method's name, a person's name and a socket's path are neither hidden nor learned."""
    assert redaction.safe_text(text) == text
    later = "CRAM-MD5 scram-sha-256 DIGEST-MD5 Jane Doe /tmp/ssh-XXXX/agent.17"
    assert redaction.safe_text(later) == later


@pytest.mark.parametrize("name", ["NPM_AUTH", "GH_AUTH", "PROXY_AUTH"])
def test_a_credential_under_a_name_ending_in_auth_in_the_environment_is_registered(
        name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Held up on 5d6278f (the environment's rule takes ``*AUTH*``): pinned beside the text rule."""
    value = _credential()
    monkeypatch.setenv(name, value)
    redaction.register_new_environment()
    assert redaction.safe_text(f"the tool printed {value}") == "the tool printed [REDACTED]"
