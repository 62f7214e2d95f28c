"""Session 43 (41st attack campaign): a plain word as the password of a URL or a command line.

Session 42 replaced ``scheme://user:<w>@host``, ``user:<w>@host:5432/db``, ``mysql -p<w>``, ``sshpass -p <w>`` and
``curl -u user:<w>`` where they stood but learned no ordinary word there (``postgres://postgres:postgres@db`` would
have taught "postgres", then redacted inside ``postgresql`` everywhere): a later text quoting the password alone
showed it. Now such a word is learned when it is no other part of its login (the user, the scheme, the host, the
database: it would be a name there), no default or example password of an image or a tutorial (``changeme``,
``guest``, ``minioadmin``) and no word of state; the same rule registers a URL's password from the environment.

Both directions: the password gone there and later; a default, a repeated name and the database after ``mysql -p``
kept readable and unlearned. The values are this file's own (``isolated_secrets``, ``unlearned_word``).
"""

from __future__ import annotations

import pytest

from cmbagent_otel import redaction
from tests.conftest import unlearned_word

pytestmark = pytest.mark.usefixtures("isolated_secrets")


@pytest.mark.parametrize(("template", "expected"), [
    ("DSN postgres://bob:{w}@db:5432/app", "DSN postgres://[REDACTED]@db:5432/app"),
    ("broker amqp://ci:{w}@rabbit:5672//", "broker amqp://[REDACTED]@rabbit:5672//"),
    ("connect bob:{w}@db.internal:5432/cmb", "connect bob:[REDACTED]@db.internal:5432/cmb"),
    ("mysql -u root -p{w} cmb_runs", "mysql -u root -p[REDACTED] cmb_runs"),
    ("sshpass -p {w} ssh bob@cluster", "sshpass -p [REDACTED] ssh bob@cluster"),
    ("curl -u bob:{w} https://api.internal/v1", "curl -u bob:[REDACTED] https://api.internal/v1"),
])
def test_a_plain_word_password_of_a_login_is_hidden_there_and_later(template: str, expected: str) -> None:
    """Fails on 5d6278f (6 of 6): replaced in its login, shown in a later text quoting it alone."""
    word = unlearned_word("Lg")
    assert redaction.safe_text(template.format(w=word)) == expected
    assert redaction.safe_text(f"the login used {word} today") == "the login used [REDACTED] today"


def test_a_plain_word_password_of_a_url_in_the_environment_is_registered(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fails on 5d6278f: ``DATABASE_URL``'s plain-word password shown in a tool's output."""
    word = unlearned_word("Env")
    monkeypatch.setenv("CMB_RESULTS_URL", f"postgresql://cmb:{word}@db:5432/results")
    redaction.register_new_environment()
    assert redaction.safe_text(f"printed {word}") == "printed [REDACTED]"


@pytest.mark.parametrize(("text", "later"), [
    ("postgres://postgres:postgres@db:5432/app", "postgresql and postgres"),
    ("postgresql://app:postgres@db/app", "a postgresql server"),
    ("amqp://guest:guest@localhost:5672//", "a guest account"),
    ("mysql://app:database@database/app", "the database is up"),
    ("redis://admin:changeme@cache:6379/0", "changeme before deploying"),
    ("S3_URL=http://minioadmin:minioadmin@minio:9000", "minioadmin is the default"),
    ("mysql -u root -p cmbruns", "the cmbruns table"),
    ("curl -u airflow:airflow http://web:8080/api/v1/dags", "airflow dags"),
    ("user:expired@db.internal:5432/app", "the token expired"),
])
def test_names_defaults_and_databases_in_a_login_are_not_learned(text: str, later: str) -> None:
    """Both directions: the word is a name of the login, a published default or the database (``mysql -p
    <db>``): replaced there at most, never learned."""
    redaction.safe_text(text)
    assert redaction.safe_text(later) == later
