"""Session 42 (40th attack campaign): credentials on command lines and in URLs, and references to them.

* Options: session 41 took the argument of any option whose name looked secret. ``--secret-scanning enabled`` and
  mysql's ``-psecretword database`` (the password attached to ``-p``, then the database) learned "enabled" and
  "database", then redacted them in every later text, inside longer words too; ``--max-token 4096`` hid a count. An
  option's argument is now a credential by the option's last word (``--password``, ``--api-key``, ``--auth-token``);
  ``--key`` (``sort --key 2,2n``, ``openssl -key server.key``) takes one only when it looks like one.
* By position, after the command that reads them so: ``mysql -p<v>``, ``sshpass -p <v>``, ``curl -u user:<v>`` were
  shown. ``mysql -p <db>`` (a database to mysql) is replaced there only.
* A URL's or a login's password (``scheme://user:<v>@host``, ``user:<v>@host:5432/db``) was replaced where it stood
  but never learned: a later text quoting it showed it. Learned now when it is no ordinary word
  (``postgres://postgres:postgres@db`` would teach "postgres"), reference or placeholder.
* ``--token $OPENAI_TOKEN``, ``password=${DB_PASS}``: the reference was learned as a secret (``${...}`` cut in two),
  then redacted wherever the variable is named. A reference is kept as written; the variable's value is registered
  by the environment's rule.

The values are this file's own (``isolated_secrets``, ``unlearned_word``).
"""

from __future__ import annotations

import secrets

import pytest

from cmbagent_otel import redaction
from tests.conftest import unlearned_word

pytestmark = pytest.mark.usefixtures("isolated_secrets")


def _credential() -> str:
    return f"Cl{secrets.token_hex(5)}7q"


@pytest.mark.parametrize(("template", "expected"), [
    ("$ mysql -u root -p{v} analytics", "$ mysql -u root -p[REDACTED] analytics"),
    ("mysqldump -h db -p'{v}' app > app.sql", "mysqldump -h db -p'[REDACTED]' app > app.sql"),
    ("sshpass -p {v} ssh deploy@host", "sshpass -p [REDACTED] ssh deploy@host"),
    ("sshpass -p{v} scp a deploy@host:b", "sshpass -p[REDACTED] scp a deploy@host:b"),
    ("curl -u bob:{v} https://api.example.org/v1", "curl -u bob:[REDACTED] https://api.example.org/v1"),
    ("curl --user 'bob:{v}' -X GET http://x", "curl --user 'bob:[REDACTED]' -X GET http://x"),
    ("tool --key {v} run", "tool --key [REDACTED] run"),
    ("git clone https://bob:{v}@git.example.org/x/y", "git clone https://[REDACTED]@git.example.org/x/y"),
    ("amqp://bob:{v}@rabbit:5672/vhost", "amqp://[REDACTED]@rabbit:5672/vhost"),
    ("connect bob:{v}@db.example.org:5432/app", "connect bob:[REDACTED]@db.example.org:5432/app"),
])
def test_a_credential_given_on_a_command_line_or_in_a_url_is_hidden_there_and_later(template: str,
                                                                                     expected: str) -> None:
    """Fails on 4a0d79e (10 of 10): the first seven shown there, the URLs' and the login's in a later text."""
    value = _credential()
    assert redaction.safe_text(template.format(v=value)) == expected
    assert value not in (redaction.safe_text(f"later: {value} again") or "")


@pytest.mark.parametrize(("template", "expected"), [
    ("tool --secret-scanning {w} --verbose", None),
    ("mysql -psecretword {w}", "mysql -p[REDACTED] {w}"),
    ("tool --max-token 4096 --api-key-file {w}", None),
    ("docker build --secret id={w},src=/home/u/.npmrc .", None),
    ("sort --key {w} data.txt", None),
    ("mysql -u root -p {w} < dump.sql", "mysql -u root -p [REDACTED] < dump.sql"),
    ("postgres://{w}:{w}@db:5432/app", "postgres://[REDACTED]@db:5432/app"),
])
def test_an_ordinary_word_next_to_an_option_is_not_learned(template: str, expected: str | None) -> None:
    """6 of the 8 of then failed on 4a0d79e: the first four learned the word, then hid it inside a longer word of a
    later text; mysql's and sshpass's showed it. An ordinary word after mysql's ``-p`` and blanks is replaced there
    only (it is the database's name to mysql); a URL's whose user is the same word too. (Session 43 learns a plain-word
    password that is no other part of its login: ``sshpass -p <w>`` left this list, see
    ``test_attack43_login_words.py``.)"""
    word = unlearned_word("Ow")
    shown = redaction.safe_text(template.format(w=word))
    assert shown == (expected or template).format(w=word)
    later = f"the {word}s are listed"
    assert redaction.safe_text(later) == later


@pytest.mark.parametrize("text", [
    "tool --max-token 4096 --token-limit 2048",
    "openssl rsa -in server.key -key server.key",
    "gh auth login --with-token < token.txt",
    "tool --no-auth --auth-mode interactive",
])
def test_options_that_take_no_secret_stay_as_written(text: str) -> None:
    """The first fails on 4a0d79e (``--max-token``'s count hidden); the others pin paths, names and modes."""
    assert redaction.safe_text(text) == text


@pytest.mark.parametrize(("template", "name"), [
    ("mytool --token ${name} --verbose", "Mytool_Token"),
    ("mytool --token ${{{name}}} --verbose", "Mytool_Token"),
    ("password=${{{name}}}", "Db_Pass"),
    ("export OPENAI_API_KEY=${name}", "Openai_Api_Key"),
    ("api_key: '{{{{ secrets.{name} }}}}'", "Ci_Key"),
    ("set PASSWORD=%{name}%", "Db_Pass"),
])
def test_a_reference_to_a_secret_is_kept_and_its_value_registered(template: str, name: str,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Fails on 4a0d79e (6 of 6): the reference hidden (and learned: ``$NAME`` redacted in a later text), or
    ``${NAME}`` cut into ``[REDACTED]{NAME}``. The variable's value, set in the environment, is redacted."""
    variable = f"{name.upper()}_{secrets.token_hex(3).upper()}"
    value = _credential()
    monkeypatch.setenv(variable, value)
    redaction.register_new_environment()
    text = template.format(name=variable)
    assert redaction.safe_text(text) == text
    later = f"read ${variable} and %{variable}%"
    assert redaction.safe_text(later) == later
    assert redaction.safe_text(f"it printed {value}") == "it printed [REDACTED]"
