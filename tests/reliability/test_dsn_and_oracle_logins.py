"""Passwords of letters alone in scheme-less DSNs, and Oracle logins, never reach telemetry.

Left by the eleventh campaign: a scheme-less ``user:password@host`` lost its password only when
the password held a character other than a letter (so that ``Contact:alice@example.org`` stays),
and Oracle's ``user/password@service`` (``sqlplus scott/tiger@orcl``, ``CONNECT
system/manager@pdb1``, ``cx_Oracle.connect("scott/tiger@orcl")``, ``exp userid=…``) matched
nothing: a code execution or a tool printing its connection line sent the password into message
content, exception events, statuses and rows. Now a letters-only password counts when a port or
a path follows the host (a DSN; an address does not go on with one), and an Oracle login's
password when the word before the user takes one (``sqlplus``, ``connect``, ``userid=``, ``rman
target``...). Mail header words (``Re:``, ``To:``, ``From:``...) are never users.
"""

from __future__ import annotations

import secrets
import string

import pytest

from cmbagent_otel import redaction

from .conftest import needs_custom_client
from .test_credential_forms import assert_refused_call_is_clean
from .test_secrets import Sink, sink  # noqa: F401 (sink: fixture)

pytestmark = pytest.mark.usefixtures("isolated_secrets")


def _letters(n: int = 12) -> str:
    return "".join(secrets.choice(string.ascii_letters) for _ in range(n))


def forms() -> dict[str, tuple[str, str]]:
    """name -> (text as code or a tool prints it, the password that must go)."""
    pw = {name: _letters() for name in ("dsn-path", "dsn-port", "sqlplus", "connect", "userid", "cx", "oracledb",
                                        "rman", "digits")}
    pw["digits"] = _letters(6) + "42" + _letters(4)
    found = {
        "dsn-path": f"DATABASE = admin:{pw['dsn-path']}@db.internal/prod",
        "dsn-port": f"using analyst:{pw['dsn-port']}@warehouse.example.org:5432 for the query",
        "sqlplus": f"$ sqlplus -s scott/{pw['sqlplus']}@orcl @report.sql",
        "connect": f"SQL> CONNECT system/{pw['connect']}@//db.example.com:1521/ORCLPDB1;",
        "userid": f"exp userid=scott/{pw['userid']}@orcl file=full.dmp",
        "cx": f'conn = cx_Oracle.connect("hr/{pw["cx"]}@localhost/orclpdb")',
        "oracledb": f"oracledb.connect('hr/{pw['oracledb']}@dbhost:1521/svc')",
        "rman": f"rman target sys/{pw['rman']}@prod",
        "digits": f"sqlplus app/{pw['digits']}@orcl",
    }
    return {name: (text, pw[name]) for name, text in found.items()}


def test_the_passwords_are_redacted() -> None:
    for name, (text, password) in forms().items():
        redacted = redaction.redact(text) or ""
        assert password not in redacted and redaction.REDACTED in redacted, (name, redacted)
        assert redacted == text.replace(password, redaction.REDACTED), (name, redacted)  # nothing else lost


@pytest.mark.parametrize("text", [
    "Contact:alice@example.org",
    "Contact:alicia@example.org for the data",
    "Re:meeting@host/room-4",
    "To:everyone@example.org/list",
    "mailto:someone@example.org/x",
    "docker pull org/name@sha256:0a1b2c",
    "npm i @scope/pkg@1.0.2",
    "see lodash/fp@4 and origin/main@{1}",
    "connect via api/v1@host? no",
    "email me at bob/alice@example.com",
    "https://github.com/org/repo@main",
    "peaks at 220/540@high-ell",
])
def test_addresses_and_paths_stay(text: str) -> None:
    assert redaction.redact(text) == text


@needs_custom_client
def test_the_passwords_never_reach_telemetry(sink: Sink, caplog: pytest.LogCaptureFixture) -> None:  # noqa: F811
    assert_refused_call_is_clean(sink, caplog, forms())
