"""The reading commands when the PostgreSQL session ends in the middle of a read (thirty-sixth fault
campaign).

``runs``, ``dag`` and ``events`` read a run in several statements in one snapshot. A session ended between
two of them (the server restarted, an administrator's ``pg_terminate_backend``, a standby cancelling a
query in conflict with recovery) must give the commands' one error line, as a failure at their first
statement does. ``runs`` read its count of hidden branch runs outside the reader's error handling: a
session lost at that statement was a Python traceback (main d1ab575). Forced at every statement of each
command in turn: the session is terminated just before the statement is sent.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import Engine

from cmbagent_otel.cli import main
from cmbagent_otel.dag.writer import DagWriter

from .conftest import plan_run_spans

pytestmark = pytest.mark.postgres

COMMANDS = (("runs",), ("dag", "latest"), ("events", "latest"))


class Terminator:
    """Counts the statements sent (after the reader's first); terminates the session at the ``at``-th."""

    def __init__(self, url: str) -> None:
        self.admin = create_engine(url)
        self.at: int | None = None
        self.sent = 0

    def __call__(self, conn: Any, cursor: Any, statement: str, *_args: Any) -> None:
        self.sent += 1
        if self.sent == self.at:
            with self.admin.connect() as admin:
                admin.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": cursor.connection.info.backend_pid})
                admin.commit()


@pytest.fixture
def terminator(pg_url: str) -> Iterator[Terminator]:
    writer = DagWriter(pg_url)
    try:
        writer.write(plan_run_spans("read"))
    finally:
        writer.close()
    hook = Terminator(pg_url)
    event.listen(Engine, "before_cursor_execute", hook)
    try:
        yield hook
    finally:
        event.remove(Engine, "before_cursor_execute", hook)
        hook.admin.dispose()


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c[0])
def test_a_session_ended_at_any_statement_is_one_error_line(command: tuple[str, ...], pg_url: str,
                                                            terminator: Terminator,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--db", pg_url, *command]) == 0
    statements = terminator.sent
    capsys.readouterr()
    assert statements >= 3
    for at in range(1, statements + 1):
        terminator.sent, terminator.at = 0, at
        code = main(["--db", pg_url, *command])  # a traceback raised here on d1ab575 (runs, its 3rd statement)
        err = capsys.readouterr().err
        assert code == 2 and err.startswith("cmbagent-otel: error: ") and err.count("\n") == 1, (at, code, err)
