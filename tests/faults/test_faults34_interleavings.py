"""Thirty-fourth fault campaign: two actors interleaving on shared persistent state, forced.

Each test runs the other actor at one exact point of the first (a SQLAlchemy event hook before a
statement, an audit hook before a file operation), as
``test_faults27_concurrent_migration.py::test_an_upgrade_that_another_finishes_meanwhile_stays_correct``
does: never a race hoped for. What a user would see at that point is asserted.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import Engine

from cmbagent_otel.dag import database

from .test_faults27_concurrent_migration import fresh_database

_audit_action: list[Callable[[str, tuple[Any, ...]], None]] = []


def _audit(event_name: str, args: tuple[Any, ...]) -> None:
    for action in list(_audit_action):
        action(event_name, args)


sys.addaudithook(_audit)  # an audit hook cannot be removed: one for the module, its actions come and go


def once_at(event_name: str, matches: Callable[[tuple[Any, ...]], bool], other: Callable[[], None]) -> list[int]:
    """Run ``other`` the first time this thread raises the audit event ``event_name`` with
    arguments ``matches`` accepts (before the operation itself runs); returns a list that
    holds 1 once it ran. Remove with ``_audit_action.clear()``."""
    me, fired = threading.get_ident(), []

    def action(name: str, args: tuple[Any, ...]) -> None:
        if name == event_name and not fired and threading.get_ident() == me and matches(args):
            fired.append(1)
            other()

    _audit_action.append(action)
    return fired


@pytest.fixture
def audit_actions():
    yield
    _audit_action.clear()


@pytest.mark.postgres
def test_downgrade_never_drops_rows_a_writer_commits_after_the_emptiness_check(tmp_path):
    """A downgrade drops a table only when it is empty: it may be cmbagent's, whose data we never
    destroy. On PostgreSQL it checked (``SELECT 1 ... LIMIT 1``) and then dropped, and a writer
    (cmbagent's backend recording a connection, an exporter) that committed a row in between lost
    it with the table, unseen. Forced: when the downgrade is about to drop ``active_connections``,
    another connection inserts a row and commits, unless it has to wait for a lock the downgrade
    holds. Either the row is kept, or the writer was made to wait and then told (an error)."""
    with fresh_database("postgres", tmp_path, "down") as url:
        database.upgrade(url)
        admin = create_engine(url)
        outcome: dict[str, Any] = {}

        def writer() -> None:
            engine = create_engine(url)
            try:
                with engine.connect() as conn:
                    outcome["pid"] = conn.exec_driver_sql("SELECT pg_backend_pid()").scalar()
                    started.set()
                    conn.exec_driver_sql("INSERT INTO active_connections (id, task_id) VALUES ('c1', 'task-1')")
                    conn.commit()
                    outcome["committed"] = True
            except Exception as exc:  # the table dropped under it: the writer is told
                outcome["error"] = exc
            finally:
                engine.dispose()
                done.set()

        started, done = threading.Event(), threading.Event()
        first = threading.get_ident()

        def before(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
            if threading.get_ident() != first or "thread" in outcome or \
                    not statement.lstrip().upper().startswith("DROP TABLE ACTIVE_CONNECTIONS"):
                return
            outcome["thread"] = thread = threading.Thread(target=writer)
            thread.start()
            started.wait()
            with admin.connect() as watch:
                # the writer ends, or waits for a lock this downgrade holds (then it goes on after it)
                while not done.wait(0.02):
                    waiting = watch.exec_driver_sql(
                        "SELECT wait_event_type FROM pg_stat_activity WHERE pid = %(p)s",
                        {"p": outcome["pid"]}).scalar()
                    watch.rollback()
                    if waiting == "Lock":
                        break

        event.listen(Engine, "before_cursor_execute", before)
        try:
            database.downgrade(url, "-1")
        finally:
            event.remove(Engine, "before_cursor_execute", before)
            if "thread" in outcome:
                outcome["thread"].join(60)
        try:
            assert "thread" in outcome, "the downgrade dropped no active_connections table"
            if outcome.get("committed"):
                with admin.connect() as conn:
                    kept = conn.execute(text("SELECT task_id FROM active_connections")).scalars().all() \
                        if _has_table(conn, "active_connections") else []
                assert kept == ["task-1"], "a committed row was dropped with its table"
            else:
                assert "error" in outcome, outcome
        finally:
            admin.dispose()


def _has_table(conn: Any, name: str) -> bool:
    return conn.execute(text("SELECT to_regclass(:n) IS NOT NULL"), {"n": name}).scalar()
