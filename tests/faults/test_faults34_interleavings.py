"""Thirty-fourth fault campaign: two actors interleaving on shared persistent state, forced.

Each test runs the other actor at one exact point of the first (a SQLAlchemy event hook before a
statement, an audit hook before a file operation), as
``test_faults27_concurrent_migration.py::test_an_upgrade_that_another_finishes_meanwhile_stays_correct``
does: never a race hoped for. What a user would see at that point is asserted.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import Engine

from cmbagent_otel.dag import database
from cmbagent_otel.dag.database import target_of
from cmbagent_otel.replay import replay
from cmbagent_otel.spill import SpillStore

from .conftest import expected_keys, plan_run_spans, stored_spans
from .test_faults26_spill_unreadable_now import _dead_pid
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


def test_a_replay_finding_its_files_replayed_meanwhile_reports_nothing_left(tmp_path, audit_actions):
    """Two ``cmbagent-otel replay`` runs (or one and an exporter's own replay) over one spill folder:
    the first lists the folder, the other replays and deletes a file before the first reads its
    header. The first took the vanished file for one "that does not record its database" and
    failed (exit status 1, "1 spill files left") though nothing was left. Forced: the other
    replay runs to its end when the first opens the file to read its recorded database."""
    url = f"sqlite:///{tmp_path}/cmbagent.db"
    spill = tmp_path / "spill"
    spans = plan_run_spans("replayed meanwhile")
    (path,) = SpillStore(spill, target_of(url)).append(spans)
    said: dict[str, list[str]] = {"first": [], "other": []}
    others: list[list[str]] = []
    fired = once_at("open", lambda args: str(args[0]) == str(path),
                    lambda: others.append(replay(spill, say=said["other"].append)))
    problems = replay(spill, say=said["first"].append)
    assert fired and others == [[]], (others, said)
    assert problems == [], said
    assert said["first"][-1] == "0 spill files left", said
    assert not list(spill.iterdir())
    assert stored_spans(url) == expected_keys(spans)


def test_a_spill_file_recovered_meanwhile_is_not_called_incomplete(tmp_path, audit_actions, caplog):
    """Two processes recovering one spill folder (a ``.tmp`` whole but left by a writer that died
    before renaming it): the second opened the ``.tmp`` while the first held it, the first renamed it
    into place and let go, and the second then took the lock on what is now the complete file,
    read the ``.tmp`` name, found nothing and warned "removing incomplete spill file ... (its writer
    died mid-write)", counting it handled. Forced: the first recovery runs to its end when the
    second is about to lock the file it opened."""
    url = f"sqlite:///{tmp_path}/cmbagent.db"
    spill = tmp_path / "spill"
    (path,) = SpillStore(spill, target_of(url)).append(plan_run_spans("recovered meanwhile"))
    pid = path.name.split("-")[2]
    path.rename(path.with_name(path.name.replace(f"-{pid}-", f"-{_dead_pid()}-") + ".tmp"))
    others: list[int] = []
    fired = once_at("fcntl.flock", lambda _args: True,
                    lambda: others.append(SpillStore(spill, target_of(url)).recover()))
    with caplog.at_level(logging.INFO, logger="cmbagent_otel"):
        handled = SpillStore(spill, target_of(url)).recover()
    assert fired and others == [1]
    assert handled == 0, "the file another recovery took was counted here too"
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    (recovered,) = SpillStore(spill, target_of(url)).pending()
    assert SpillStore.read(recovered)


@pytest.mark.parametrize("kind", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_a_dag_read_while_a_batch_commits_shows_one_state(tmp_path, kind):
    """``cmbagent-otel dag`` reads a run in several statements (the run, its nodes, event counts,
    token sums, edges, errors); an exporter committed the run's next batch between two of them.
    Each statement saw its own moment (SQLite autocommit reads, PostgreSQL READ COMMITTED): nodes
    from before the batch, edges from after it, an edge to a node the listing did not have (shown
    by its database id). Forced: the batch commits when the reader is about to read the edges.
    What the reader shows must be the DAG before the batch or the DAG after it."""
    from cmbagent_otel.dag.query import DagReader
    from cmbagent_otel.dag.writer import DagWriter

    with fresh_database(kind, tmp_path, "read") as url:
        spans = plan_run_spans("read while a batch commits", steps=4)
        writer = DagWriter(url)
        try:
            writer.write(spans[:1])

            def read() -> dict[str, Any]:
                with DagReader(url) as reader:
                    return reader.dag(reader.run("latest"))

            before = read()
            first, batches = threading.get_ident(), []

            def on_edges(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
                if threading.get_ident() == first and not batches and "FROM dag_edges" in statement:
                    batches.append(writer.write(spans[1:]))

            event.listen(Engine, "before_cursor_execute", on_edges)
            try:
                during = read()
            finally:
                event.remove(Engine, "before_cursor_execute", on_edges)
            after = read()
        finally:
            writer.close()
        assert batches, "the reader read no edges"
        assert before != after
        assert during in (before, after), during


def flock_tried_by(thread: threading.Thread) -> threading.Event:
    """Set once ``thread`` calls ``flock`` (the audit event ``fcntl.flock``, raised before the call):
    while another holds the folder's lock, the thread is then waiting for it (``creation_lock`` tries
    again until its bound, so no waiter shows in ``/proc/locks``). Remove with ``_audit_action.clear()``."""
    tried = threading.Event()

    def action(name: str, args: tuple[Any, ...]) -> None:
        if name == "fcntl.flock" and threading.get_ident() == thread.ident:
            tried.set()

    _audit_action.append(action)
    return tried


def test_a_writer_cleaning_up_after_a_deleted_file_leaves_the_new_files_wal_alone(tmp_path, audit_actions):
    """The SQLite file was deleted under two running writers (say, two exporters). The first to find it
    gone removes its stale ``-wal``/``-shm`` (they must not meet the new file) and creates it again. The
    other's clean-up checked that the file was gone, then removed the ``-wal`` and ``-shm``: when the first
    had created the file and written in between, those were the new database's live files, and every
    connection but the first writer's then failed with "disk I/O error". Forced: the second writer runs
    its whole write when the first is about to remove the ``-wal`` (unless it must wait for the first)."""
    from cmbagent_otel.dag.writer import DagWriter

    db = tmp_path / "cmbagent.db"
    url = f"sqlite:///{db}"
    first, second = DagWriter(url), DagWriter(url)
    before, mine, theirs = plan_run_spans("before"), plan_run_spans("mine"), plan_run_spans("theirs")
    outcome: dict[str, Any] = {}
    try:
        first.write(before)
        second.write(before)
        db.unlink()  # the user removes the database; its -wal and -shm stay

        def other() -> None:
            try:
                second.write(theirs)
                outcome["wrote"] = True
            except Exception as exc:
                outcome["error"] = exc
            finally:
                done.set()

        done = threading.Event()
        thread = threading.Thread(target=other)

        def run_other() -> None:
            waiting = flock_tried_by(thread)
            thread.start()
            for _ in range(6000):  # a guard against hanging for ever, never what the test waits for
                if done.wait(0.02) or waiting.is_set():
                    return
            raise AssertionError("the second writer neither ended nor waited for a lock")

        fired = once_at("os.remove", lambda args: str(args[0]).endswith("-wal"), run_other)
        first.write(mine)
        thread.join(60)
        assert fired and outcome == {"wrote": True}, outcome
    finally:
        first.close()
        second.close()
    stored = stored_spans(url)
    assert all(stored[key] for key in expected_keys([*mine, *theirs])), "a batch is missing"
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA integrity_check").scalar() == "ok"
    finally:
        engine.dispose()
