"""Session 42 (40th attack campaign): environment variables that hold a credential and one that holds a path.

* ``PWD=/work/project`` (``env`` or ``os.environ`` printed by code a model runs, ``pwd: /work/project``) was read as a
  password (``pwd`` alone: ODBC's ``UID=sa;PWD=<it>``): the working directory was learned and then redacted in every
  later text naming a file under it. ``PWD`` / ``pwd`` holding an absolute path is no secret now, in text and data.
* ``BORG_PASSPHRASE``, ``GPG_PASSPHRASE``, ``SSHPASS``, ``MYSQL_PWD`` set in the environment were not registered, and
  ``SSHPASS=<v>``, ``MYSQL_PWD=<v>``, ``REDISCLI_AUTH=<v>`` in a text kept their values.
* ``DATABASE_URL=postgres://app:<v>@db/app`` (any variable holding a URL with a password) was not registered: the
  password was shown wherever a text quoted it without the URL. Registered now, unless an ordinary word.

The values are this file's own (``isolated_secrets``).
"""

from __future__ import annotations

import secrets

import pytest

from cmbagent_otel import redaction
from tests.conftest import unlearned_word

pytestmark = pytest.mark.usefixtures("isolated_secrets")


def _credential() -> str:
    return f"Ev{secrets.token_hex(5)}3k"


@pytest.mark.parametrize("shown", [
    "HOME=/home/bob\nPWD={path}\nSHELL=/bin/bash",
    "pwd: {path}",
    {"PWD": "{path}", "USER": "bob"},
    "environ({{'PWD': '{path}', 'LANG': 'C.UTF-8'}})",
])
def test_the_working_directory_is_no_secret(shown: object) -> None:
    """Fails on 4a0d79e (4 of 4): the path hidden there, and in a later text naming a file under it."""
    path = f"/work/{unlearned_word('proj')}/run7"
    value = {k: v.format(path=path) for k, v in shown.items()} if isinstance(shown, dict) else \
        str(shown).format(path=path)
    assert path in (redaction.safe_text(value) or "")
    later = f"wrote {path}/chains.npy"
    assert redaction.safe_text(later) == later


def test_an_odbc_password_under_pwd_is_still_learned() -> None:
    value = _credential()
    assert redaction.safe_text(f"Server=db;UID=sa;PWD={value};Database=cmb") == \
        "Server=db;UID=sa;PWD=[REDACTED];Database=cmb"
    assert value not in (redaction.safe_text(f"later {value}") or "")


@pytest.mark.parametrize("name", ["BORG_PASSPHRASE", "GPG_PASSPHRASE", "SSHPASS", "MYSQL_PWD", "APP_PASSCODE"])
def test_credential_variables_of_the_environment_are_registered(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """4 of 5 fail on 4a0d79e: the value, set after instrument(), shown in a tool's output (APP_PASSCODE was
    registered already: ``passcode`` is a credential whatever comes before it)."""
    value = _credential()
    monkeypatch.setenv(name, value)
    redaction.register_new_environment()
    assert redaction.safe_text(f"the tool printed {value}") == "the tool printed [REDACTED]"


@pytest.mark.parametrize("template", [
    "SSHPASS={v} sshpass -e ssh deploy@host",
    "MYSQL_PWD={v} mysql -u root analytics",
    "REDISCLI_AUTH={v} redis-cli -h cache",
    "db_pwd: {v}",
])
def test_credential_variables_in_a_text_are_hidden_there_and_later(template: str) -> None:
    """Fails on 4a0d79e (4 of 4): shown there and later."""
    value = _credential()
    shown = redaction.safe_text(template.format(v=value)) or ""
    assert value not in shown and "[REDACTED]" in shown
    assert value not in (redaction.safe_text(f"later {value}") or "")


def test_a_urls_password_in_any_variable_is_registered(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fails on 4a0d79e: the password of ``DATABASE_URL`` shown when a text quotes it alone. An ordinary word as the
    password (a development database's) is not registered: it would be redacted in every text."""
    value, word = _credential(), unlearned_word("Db")
    monkeypatch.setenv("DATABASE_URL", f"postgresql://app:{value}@db.example.org:5432/cmb")
    monkeypatch.setenv("CELERY_BROKER_URL", f"redis://{word}:{word}@cache:6379/0")
    redaction.register_new_environment()
    assert redaction.safe_text(f"auth failed for {value}") == "auth failed for [REDACTED]"
    later = f"the {word}s table"
    assert redaction.safe_text(later) == later
