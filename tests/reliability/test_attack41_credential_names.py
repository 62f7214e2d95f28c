"""Session 41 (39th attack campaign): names that hold a credential, and names that hold a key into data.

* The environment's rule registered the value of a variable naming a key into data (``SORT_KEY=created``) while the
  same name as a key of data kept its value (``_DATA_KEY_NAME`` was asked by ``is_secret_key`` only): the word was
  then redacted in every later text, inside longer words too. One rule now judges both (``_names_data_key``), and a
  name where another secret word comes before the data word (``TOKEN_CACHE_KEY``) is secret in both.
* Lower-case and mixed-case names that hold credentials matched no rule: ``openai_key``, ``anthropicKey``,
  ``db_pass``, ``github_pat``, ``pg_dsn``, ``dsn``, ``jwt``, ``passcode``, ``session_key``; their values were shown
  in data and text. ``KEY``, ``PASS`` or ``PAT`` as a name's last word now make a secret name after a word naming
  what the credential opens (a provider, a service, a store: ``_KEY_HOLDERS``, ``_PASS_HOLDERS``), and ``dsn`` /
  ``jwt`` / ``passcode`` after anything. Names of keys into data stay ordinary (``sort_key``, ``cache_key``,
  ``first_pass``, nginx's ``proxy_pass``, ``key``, ``path``, ``pattern``), their values readable and not learned.

The values are this file's own (``isolated_secrets``: nothing learned or registered here outlives the test).
"""

from __future__ import annotations

import json
import secrets

import pytest

from cmbagent_otel import redaction
from tests.conftest import unlearned_word

pytestmark = pytest.mark.usefixtures("isolated_secrets")


def _credential(name: str) -> str:
    """A value no other test can have taught, shaped as a credential (a digit: learned wherever it stands)."""
    return f"Qv{secrets.token_hex(5)}{len(name)}x"


@pytest.mark.parametrize(("name", "secret"), [
    ("SORT_KEY", False), ("CACHE_KEY", False), ("APP_PRIMARY_KEY", False), ("sort_key", False),
    ("TOKEN_CACHE_KEY", True), ("PASS_SORT_KEY", True), ("OPENAI_KEY", True), ("DB_PASS", True),
    ("SENTRY_DSN", True), ("PG_DSN", True), ("OpenAIKey", True),
])
def test_one_rule_for_a_key_into_data_in_the_environment_and_in_data(
        name: str, secret: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fails on 3c387d5 for SORT_KEY, CACHE_KEY, APP_PRIMARY_KEY, sort_key (the environment registered their
    ordinary word, redacted in a later text inside a longer word), TOKEN_CACHE_KEY (registered from the
    environment, not secret as a key of data) and SENTRY_DSN, PG_DSN, OpenAIKey (secret in neither)."""
    value = unlearned_word("Envatt")
    monkeypatch.setenv(name, value)
    redaction.register_new_environment()
    later = f"rows ordered by {value}_column"
    assert (value not in (redaction.safe_text(later) or "")) is secret
    assert redaction.is_secret_key(name) is secret
    assert (redaction.scrub({name: value}) == {name: redaction.REDACTED}) is secret


HOLDER_NAMES = ("openai_key", "anthropicKey", "OpenAIKey", "mistral-key", "session_key", "db_pass", "DbPass",
                "smtp_pass", "admin_pass", "github_pat", "githubPat", "gitlab_pat", "dsn", "pg_dsn", "SENTRY_DSN",
                "jwt", "auth_jwt", "passcode", "my_service_prod_eu_west_1_backup_openai_key")


@pytest.mark.parametrize("name", HOLDER_NAMES)
def test_a_name_holding_a_credential_hides_its_value_in_data(name: str) -> None:
    """Fails on 3c387d5 for every name: the value stays in the scrubbed data and in a later text."""
    value = _credential(name)
    assert redaction.is_secret_key(name)
    assert redaction.scrub({"settings": {name: value}}) == {"settings": {name: redaction.REDACTED}}
    redaction.learn_secrets_in(json.dumps({"env": {name: value}}))  # a tool call's arguments
    assert value not in (redaction.safe_text(f"connected with {value}") or "")


@pytest.mark.parametrize("template", ["{n}: {v}", "{n}={v}", "export {n}='{v}'", '{{"{n}": "{v}", "retries": 3}}'])
@pytest.mark.parametrize("name", ["openai_key", "db_pass", "github_pat", "GITHUB_PAT", "githubPat", "anthropicKey"])
def test_a_name_holding_a_credential_hides_its_value_in_text(name: str, template: str) -> None:
    """Fails on 3c387d5 (``GITHUB_PAT`` too: the text's scan had no hint for "pat"): the value shown in the text
    and in a later one; the line after it stays readable."""
    value = _credential(name + template)
    shown = redaction.safe_text(template.format(n=name, v=value) + "\nLOG_LEVEL=debug") or ""
    assert value not in shown and "LOG_LEVEL=debug" in shown
    assert value not in (redaction.safe_text(f"later: {value}") or "")


@pytest.mark.parametrize("name", ["sort_key", "cache_key", "primary_key", "public_key", "ssh_key", "license_key",
                                  "first_pass", "proxy_pass", "key", "pass_count", "path", "pattern", "jpg_key",
                                  "openai_cache_key", "user_key", "dict_key", "KEYBOARD", "PATH", "dsn_count"])
def test_names_of_data_keep_their_values(name: str) -> None:
    """What must not change: keys into data, paths and patterns keep their values, which are not learned (an
    ordinary word learned is redacted in every later text, inside longer words too)."""
    value = unlearned_word("Dataatt")
    assert not redaction.is_secret_key(name)
    assert redaction.scrub({name: value}) == {name: value}
    assert value in (redaction.safe_text(f"{name}: {value}\n{name}={value}") or "")
    assert redaction.safe_text(f"later: {value}s") == f"later: {value}s"
