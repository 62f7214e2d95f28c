"""Writes mapped span batches into the tracking tables: one transaction per batch.

Rows with a natural key are upserted (placeholders ``DO NOTHING``, real rows ``DO
UPDATE``), so repeated or reordered batches converge to the same contents. Tables without
one (``dag_edges``, ``cost_records``, ``messages``) are diffed against what is stored.
Every statement is precompiled SQL text run through the driver (:mod:`.statements`); rows
derived from a run's whole node set are recomputed only for runs whose inputs a batch changed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import threading
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence, Set
from dataclasses import dataclass, field
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

from opentelemetry.sdk.trace import ReadableSpan
from sqlalchemy import JSON, Connection, Engine, Integer, Table, make_url, select

from .. import environment_variables
from .. import semconv as sc
from .._forksafe import reset_in_child
from .._forksqlite import forked_inside_sqlite, sqlite_calls
from . import schema
from .database import (
    creation_lock,
    deadline,
    ensure_schema,
    make_engine,
    pinned_url,
    redacted,
    script_heads,
    sqlite_file,
    untraced,
)
from .errors import Fault, SchemaIncompatible, classify, foreign_key_failed
from .mapping import (
    FOREIGN_TYPE,
    LLM_TYPE,
    PLACEHOLDER_SUBTYPE,
    RANK_BY_NAME,
    RAW_NODE_META,
    RUNNING,
    LlmUsage,
    MappedBatch,
    better_run,
    derive_run_rows,
    event_db_id,
    map_spans,
    session_row,
)
from .statements import Sql, chunks, decode_json, decode_meta, encode_json, naive, sql_for

__all__ = ["DagWriter", "DatabaseUnavailable", "WriteResult", "decode_json", "dump_tables", "parents_first"]

logger = logging.getLogger("cmbagent_otel.dag")

T = {name: schema.metadata.tables[name] for name in schema.TABLE_ORDER}
_NODE_META: tuple[str, ...] = ("meta",)  # usage totals change only meta: the indexes are left alone
# What the writer inserts into, and updates by id (every column, or the names given): Sql.prepare
# builds their statements before the first batch (a table left out is built at its first use).
_INSERTED = tuple(T[name] for name in ("sessions", "session_states", "workflow_runs", "workflow_steps", "dag_nodes",
                                       "dag_edges", "execution_events", "messages", "cost_records", "branches",
                                       "files"))
_UPDATED: tuple[tuple[Table, tuple[str, ...] | None], ...] = (
    *((T[name], None) for name in ("session_states", "workflow_runs", "workflow_steps", "dag_nodes",
                                   "execution_events", "branches", "files")),
    (T["dag_nodes"], _NODE_META))
_MAX_REPAIRS = 2  # reconnects / re-migrations within one write before it counts as unavailable


COST_RECORDS_ENV = "CMBAGENT_OTEL_COST_RECORDS"
COST_RECORDS_MODES = ("per_agent", "off")


def resolve_cost_records(mode: str | None = None) -> str:
    """How ``cost_records`` are written: argument > ``CMBAGENT_OTEL_COST_RECORDS`` > ``per_agent``.

    ``per_agent``: one row per agent, model and phase/step node of a run, derived from its
    LLM events like cmbagent's cost collector writes them; ``off``: none (for a database
    whose costs cmbagent's own backend records). Unknown values fall back to the default
    with a warning.
    """
    chosen = mode if mode is not None else environment_variables.get(COST_RECORDS_ENV)
    if chosen is None or chosen.strip() == "":
        return COST_RECORDS_MODES[0]
    normalized = chosen.strip().lower().replace("-", "_")
    if normalized not in COST_RECORDS_MODES:
        logger.warning("cmbagent_otel: %s=%r is not one of %s; using per_agent", COST_RECORDS_ENV, chosen,
                       "/".join(COST_RECORDS_MODES))
        return COST_RECORDS_MODES[0]
    return normalized


class DatabaseUnavailable(RuntimeError):
    """The database could not be reached, was busy, full, or lost its schema or file; the
    batch may be retried later (classified by driver error codes, see :mod:`.errors`)."""


class ForkedInsideSqlite(DatabaseUnavailable):
    """This process was forked while its parent was inside our SQLite calls: it never calls SQLite (its mutexes
    and the file's lock state may be held for good by a thread it does not have; see :mod:`.._forksqlite`)."""


@dataclass(frozen=True)
class WriteResult:
    """What one :meth:`DagWriter.write` call stored."""

    spans: int
    runs: int


class DagWriter:
    """Writes finished spans into cmbagent's tracking schema.

    ``url`` is resolved argument > ``CMBAGENT_OTEL_DATABASE_URL`` > ``CMBAGENT_DATABASE_URL``
    > the default SQLite file. With ``migrate`` (default) the schema is brought to head
    once per process before the first write. ``cost_records`` (``per_agent``/``off``) is
    resolved by :func:`resolve_cost_records`. Thread-safe.
    """

    def __init__(self, url: str | None = None, *, migrate: bool = True, engine: Engine | None = None,
                 cost_records: str | None = None) -> None:
        self.url = pinned_url(url)
        self.cost_records = resolve_cost_records(cost_records)
        self._migrate = migrate
        self._engine = engine
        self._lock = threading.Lock()
        reset_in_child(self, "_lock")
        self._ready = False
        self._statements_built = False  # Sql.prepare has run for this writer (see _prepare)
        self._repair = False
        self._stale_files = False  # a deleted file's -wal/-shm to remove before connecting again
        # a reconnect already said so since the last stored batch: an outage (a file system
        # made read-only, a file that cannot be opened) reconnects on every attempt
        self._reopen_said = logging.NOTSET  # the level said
        self._file = sqlite_file(self.url) if engine is None else None
        self._file_id: tuple[int, int] | None = None
        self._pid = os.getpid()
        # PostgreSQL takes the rows' times as datetimes: the mapping makes their SQLite text only
        # where a row needs it anyway (never wrong either way, only slower)
        backend = engine.dialect.name if engine is not None else _backend(self.url)
        self._time_texts = backend != "postgresql"
        self._on_sqlite = backend == "sqlite"  # its calls are marked for a fork to wait for (_forksqlite)

    @property
    def engine(self) -> Engine:
        """The SQLAlchemy engine (created on first use, and again in a forked child)."""
        self._may_call_sqlite()
        with self._lock:
            if self._engine is not None and self._pid != os.getpid():
                self._let_go(self._engine)  # connections inherited from the parent: neither used nor closed here
                self._engine = None
            if self._engine is not None:
                return self._engine
        # made outside the lock: a new SQLite file is created under the folder's flock, waited for
        # within this thread's deadline; under the lock another thread's write waited for it with no
        # bound of its own (the ingest's first request, for the start's whole schema check: 10 s)
        made = make_engine(self.url)
        with self._lock:
            if self._engine is None:
                self._engine, self._pid = made, os.getpid()
                return made
            engine = self._engine  # another thread's came first
        made.dispose()
        return engine

    def _may_call_sqlite(self) -> None:
        if self._on_sqlite and forked_inside_sqlite():
            raise ForkedInsideSqlite(f"database {redacted(self.url)} unavailable in this process: it was forked "
                                     "while its parent was inside SQLite (SQLite is not fork-safe)")

    def _calls(self) -> Any:
        """The context of this writer's database calls: on SQLite, marked for a fork to wait for; raises
        :class:`ForkedInsideSqlite` in a process that must not call SQLite."""
        self._may_call_sqlite()
        return self._marked()

    def _marked(self) -> Any:
        return sqlite_calls() if self._on_sqlite else contextlib.nullcontext()

    def _prepare(self) -> None:
        if self._ready:
            return
        if self._stale_files:
            self._remove_stale_files()
        with self._lock:
            repair, self._repair = self._repair, False
        if self._migrate:
            try:
                ensure_schema(self.url, repair=repair, engine=self.engine)
            except BaseException as exc:
                with self._lock:
                    self._repair = self._repair or repair
                if isinstance(exc, Exception) and classify(exc) is Fault.FATAL:
                    # a migration that fails for no driver reason: the database's schema, not the spans
                    raise SchemaIncompatible(f"cannot migrate the schema of {redacted(self.url)} to "
                                             f"{', '.join(sorted(script_heads()))}: {_first_line(exc)}") from exc
                raise
        if self._file is not None and self._file_id is None:
            self._file_id = _identity(self._file)
        if not self._statements_built:
            # the statement texts and row converters (compiled Python) every batch uses: built
            # here, so where the background step prepares the writer the first export does not
            with untraced(), self.engine.connect() as conn:
                sql_for(conn).prepare(conn, _INSERTED, _UPDATED)
            self._statements_built = True
        self._ready = True

    def prepare(self) -> None:
        """Connect and check (or migrate) the schema now rather than at the first write;
        raises what connecting or migrating raises. Thread-safe; a no-op once done."""
        with self._calls():
            self._prepare()

    def _reopen(self, why: str, *, repair: bool, level: int = logging.WARNING) -> None:
        """Drop every connection and migrate again before the next write.

        A SQLite file deleted or replaced under open connections keeps taking writes into
        the old, unlinked inode: those connections must go, and the new file needs the schema.
        """
        with self._lock:
            engine, self._engine = self._engine, None
            self._ready = False
            self._file_id = None
            self._repair = self._repair or repair
            said, self._reopen_said = self._reopen_said, max(self._reopen_said, level)
        # one line (per level) until a batch is stored again; the exporter's own line tells of an outage
        logger.log(level if level > said else logging.DEBUG, "cmbagent_otel: database %s %s; reconnecting%s",
                   redacted(self.url), why, " and migrating again" if repair and self._migrate else "")
        if engine is not None:
            self._let_go(engine)
        if self._file is not None:
            self._stale_files = True  # removed by the next attempt, before it connects

    def _remove_stale_files(self) -> None:
        """Remove the ``-wal``/``-shm`` a deleted database file left, unless the file is there again.

        WAL and shared-memory files of the deleted database must not meet the new one; decided
        again under the lock a writer creating the file takes: the names may be its live files now.
        Run before connecting again (not by :meth:`_reopen`), so a lock held elsewhere past its bound
        fails that attempt as retryable and the removal is tried again by the next one."""
        file = self._file
        if file is None:
            return
        if _gone(file):
            with creation_lock(file):
                if _gone(file):
                    for suffix in ("-wal", "-shm"):
                        with contextlib.suppress(OSError):
                            Path(f"{file}{suffix}").unlink(missing_ok=True)
        self._stale_files = False

    def write(self, spans: Sequence[ReadableSpan] | Iterable[ReadableSpan], *,
              timeout: float | None = None) -> WriteResult:
        """Write ``spans`` in one transaction.

        ``timeout``: seconds this call may wait in total (for a lock, a connection, a
        statement); ``None`` uses the engine's own limits. A SQLite file that was deleted or
        replaced is detected before and after the transaction (its identity on disk), and a
        missing schema is migrated again; both are retried here a couple of times. Raises
        :class:`DatabaseUnavailable` for retryable faults (classified by driver error codes:
        :func:`cmbagent_otel.dag.errors.classify`); other errors propagate.
        """
        spans = list(spans)
        if not spans:
            return WriteResult(0, 0)
        batch = map_spans(spans, texts=self._time_texts)
        restored = False
        with deadline(timeout), untraced(), self._calls():
            for attempt in range(_MAX_REPAIRS + 1):
                last = attempt == _MAX_REPAIRS
                try:
                    stored = self._attempt(batch)
                except Exception as exc:
                    fault = classify(exc)
                    if fault is Fault.FATAL:
                        # looked into only when a foreign key failed: no cost to any other batch
                        if not restored and not last and foreign_key_failed(exc) and \
                                self._restore_sessions(batch):
                            restored = True
                            continue
                        raise
                    if fault is Fault.REOPEN and not last:
                        # a file deleted or replaced is told above (its identity); this is a file that
                        # cannot be opened now (a read-only file system): if that lasts, the
                        # exporter's outage line gives the error, so no warning of its own
                        self._reopen("cannot be opened or was moved", repair=True, level=logging.INFO)
                        continue
                    if fault is Fault.SCHEMA and self._migrate and not last:
                        self._reopen(f"lost its schema ({_first_line(exc)})", repair=True)
                        continue
                    raise DatabaseUnavailable(
                        f"database {redacted(self.url)} unavailable ({fault.value}): {_first_line(exc)}") from exc
                if stored:
                    self._reopen_said = logging.NOTSET
                    return WriteResult(len(spans), len(batch.runs))
            raise DatabaseUnavailable(f"database {redacted(self.url)}: its file keeps being replaced")

    def _restore_sessions(self, batch: MappedBatch) -> bool:
        """Give each run of ``batch`` whose stored row names a session that does not exist a session
        row again (in a transaction of its own); whether there was any.

        A program with SQLite's foreign keys off (their default) may delete a session under its runs,
        or write a run naming none; the rows derived for a run take its stored session id, so every
        later batch of that run would fail the foreign key for good. The row restored says so
        (``status`` ``deleted``, as cmbagent marks a deleted session; its ``meta``)."""
        try:
            with self.engine.connect() as conn:
                sql = sql_for(conn)
                with conn.begin():
                    count = _restore_sessions(conn, sql, sorted(batch.runs))
        except Exception:  # the batch's own error is the one to tell
            logger.debug("cmbagent_otel: restoring missing sessions failed", exc_info=True)
            return False
        if count:
            logger.warning("cmbagent_otel: %d stored run(s) named a session that does not exist (deleted by "
                           "a program with foreign keys off?): session row(s) restored, status 'deleted'", count)
        return count > 0

    def _attempt(self, batch: MappedBatch) -> bool:
        """One transaction; False when the SQLite file turned out to be replaced (nothing counted)."""
        file = self._file
        if file is not None and self._file_id is not None and _identity(file) != self._file_id:
            self._reopen(f"file {file} was deleted or replaced", repair=True)
        self._prepare()
        expected = self._file_id
        with self.engine.connect() as conn:
            sql = sql_for(conn)
            sql.defer_timeouts(conn)
            with conn.begin():
                _write_batch(conn, batch, costs=self.cost_records != "off")
        if file is not None and expected is not None and _identity(file) != expected:
            # committed into a file that is no longer the database: write it again
            self._reopen(f"file {file} was deleted or replaced during a write", repair=True)
            return False
        return True

    def close(self) -> None:
        """Dispose of the engine's connections (idempotent). In a forked child the parent's connections
        are left to the parent."""
        with self._lock:
            engine, self._engine = self._engine, None
        if engine is not None:
            with self._marked():  # closing SQLite connections is a SQLite call (its VFS mutex)
                self._let_go(engine)

    def _let_go(self, engine: Engine) -> None:
        if self._pid == os.getpid():
            engine.dispose()
        else:
            # A forked child shares the parent's connections (sockets, SQLite handles): closing them here
            # ended the parent's PostgreSQL sessions (libpq's Terminate on the shared socket) and waited for
            # ever on a SQLite mutex a parent thread held at the fork. SQLAlchemy's dispose(close=False) drops
            # the pool, and a dropped sqlite3 connection closes itself: the child keeps them, untouched.
            _inherited.append(engine)


_inherited: list[Engine] = []  # a forked child's copies of its parent's engines (see DagWriter._let_go)


def _identity(path: Path) -> tuple[int, int] | None:
    """(device, inode) of the file at ``path``, or None when there is none."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _gone(path: Path) -> bool:
    """True only when there is no file at ``path``: a ``stat`` failing otherwise (an I/O error, a network
    file system's stale handle, a permission) says nothing of the file, and the ``-wal``/``-shm`` next to
    it may be the live ones of a database other connections have open."""
    try:
        os.stat(path)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    return False


def _backend(url: str) -> str:
    """The database backend a URL names (``sqlite``, ``postgresql``), ``""`` when it does not parse."""
    try:
        return make_url(url).get_backend_name()
    except Exception:
        return ""


def _first_line(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None)
    return (str(orig if orig is not None else exc).strip().splitlines() or [type(exc).__name__])[0]


# --- upserts -----------------------------------------------------------------------------------

def _upsert(conn: Connection, sql: Sql, table: Table, rows: Sequence[Mapping[str, Any]],
            new_runs: Set[str] = frozenset(), existing: set[Any] | None = None) -> None:
    """Insert ``rows`` or replace the stored ones (by id).

    Split, not ``INSERT ... ON CONFLICT DO UPDATE``: most rows are new, and an upsert costs
    SQLite ~3x a plain insert when foreign keys are on; PostgreSQL takes the new ones by
    ``COPY``. Safe against other writers: SQLite's ``BEGIN IMMEDIATE`` keeps them out until
    commit, and on PostgreSQL every row written here belongs to a run whose advisory lock
    this transaction holds (row ids derive from the run's trace id). Rows of ``new_runs``
    (runs this transaction created: nothing of them is stored) are new without asking.
    ``existing``: the stored ids among those of :func:`_ask`, when the caller already asked.
    """
    if not rows:
        return
    if existing is None:
        ask = _ask(rows, new_runs)
        existing = sql.existing_ids(conn, table.name, ask) if ask else set()
    if not existing:  # most batches: every row is new (no per-row filtering)
        sql.insert(conn, table, rows)
        return
    # new rows first: an updated row may point at a parent that is new in this batch
    sql.insert(conn, table, [r for r in rows if r["id"] not in existing])
    sql.update(conn, table, [r for r in rows if r["id"] in existing])


def _insert_missing(conn: Connection, sql: Sql, table: Table, rows: Sequence[Mapping[str, Any]],
                    new_runs: Set[str] = frozenset(), existing: set[Any] | None = None) -> None:
    """Insert those of ``rows`` (placeholders) whose id is not stored yet; leave the rest alone.
    ``existing``: as for :func:`_upsert`."""
    if not rows:
        return
    if existing is None:
        ask = _ask(rows, new_runs)
        if not sql.pg and ask:
            sql.insert(conn, table, rows, "nothing")
            return
        existing = sql.existing_ids(conn, table.name, ask) if ask else set()
    sql.insert(conn, table, [r for r in rows if r["id"] not in existing])


def _ask(rows: Sequence[Mapping[str, Any]], new_runs: Set[str] = frozenset()) -> list[Any]:
    """The ids of ``rows`` that may be stored already (rows of ``new_runs`` cannot be)."""
    return [r["id"] for r in rows if r.get("run_id") not in new_runs]


def _write_started(conn: Connection, sql: Sql, table: Table, rows: Sequence[Mapping[str, Any]]) -> None:
    """``running`` rows of spans that have started (the live DAG): inserted when missing,
    replacing only a row that is itself running (a placeholder or an earlier started
    record), never a finished one, so a started record arriving late changes nothing."""
    if not rows:
        return
    status: dict[str, Any] = {}
    for part in sql.in_chunks([r["id"] for r in rows]):
        status.update(sql.rows(conn, f"SELECT id, status FROM {table.name} WHERE {sql.where_in('id', len(part))}",
                               sql.in_params(part)))
    sql.insert(conn, table, [r for r in rows if r["id"] not in status])
    sql.update(conn, table, [r for r in rows if status.get(r["id"]) == RUNNING])


def parents_first(rows: Mapping[str, Mapping[str, Any]], parent_key: str) -> list[Mapping[str, Any]]:
    """``rows`` (by id) ordered so that a row whose parent is also in ``rows`` comes after it.

    The depth attribute cannot be trusted for this (it may be missing or wrong), and a
    child inserted before its parent fails the foreign key. Rows whose parent links form a
    cycle (damaged spans) keep all links but one: the row that closes the cycle loses its parent.
    """
    ordered: list[Mapping[str, Any]] = []
    placed: set[str] = set()
    for row_id, row in rows.items():
        if row_id in placed:
            continue
        parent_id = row.get(parent_key)
        if parent_id is None or parent_id in placed or parent_id not in rows:
            # most rows: a root, or a parent placed already or not in this batch
            placed.add(row_id)
            ordered.append(row)
            continue
        chain: list[Mapping[str, Any]] = []
        in_chain: set[str] = set()
        current: Mapping[str, Any] | None = row
        current_id: str | None = row_id
        while current is not None and current_id not in placed:
            placed.add(current_id)  # type: ignore[arg-type]
            in_chain.add(current_id)  # type: ignore[arg-type]
            chain.append(current)
            current_id = current.get(parent_key)
            current = rows.get(current_id) if current_id is not None else None
        if current_id is not None and current_id in in_chain:
            chain[-1] = {**chain[-1], parent_key: None}
        ordered.extend(reversed(chain))
    return ordered


def _lock_key(run_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"cmbagent-otel run {run_id}".encode(), digest_size=8).digest(),
                          "big", signed=True)


def _lock_runs(conn: Connection, batch: MappedBatch) -> None:
    """PostgreSQL: writers of the same run take turns (transaction-scoped advisory locks,
    taken in one sorted order so two batches never wait on each other in a cycle).

    Rows derived from a run's whole node set (edges, costs, messages are diffed against
    what is stored) would otherwise race between processes or ingest threads writing spans
    of one run at the same time. SQLite's ``BEGIN IMMEDIATE`` already serialises writers.
    """
    if conn.dialect.name != "postgresql" or not batch.runs:
        return
    keys = sorted({_lock_key(run_id) for run_id in batch.runs})
    sql_for(conn).write(conn, "SELECT pg_advisory_xact_lock(k) FROM unnest(%(keys)s::bigint[]) AS k", {"keys": keys})


def _write_batch(conn: Connection, batch: MappedBatch, *, costs: bool = True) -> None:
    sql = sql_for(conn)
    with sql.batch(conn):
        _write_batch_statements(conn, sql, batch, costs=costs)
        sql.flush(conn)


def _write_batch_statements(conn: Connection, sql: Sql, batch: MappedBatch, *, costs: bool) -> None:
    _lock_runs(conn, batch)
    _write_sessions(conn, sql, batch)
    created, changed = _write_runs(conn, sql, batch)
    # A run this batch created has nothing stored but what the batch writes: its derived rows
    # come from the batch itself (no reading back), and its nodes go in once, usage totals included.
    derived = _Derived()
    _derive_fresh(batch, created, derived)
    nodes_t, events_t = T["dag_nodes"], T["execution_events"]
    node_holders, nodes = list(batch.node_placeholders.values()), parents_first(batch.nodes, "parent_node_id")
    event_holders, events = list(batch.event_placeholders.values()), parents_first(batch.events, "parent_event_id")
    known_nodes = known_events = None
    if sql.pipelined:
        # one round trip for all four: placeholders and rows of one table have different ids
        # (map_spans drops a placeholder its span replaces), and writing nodes changes no event
        known_nodes, known_events = sql.existing_ids_many(conn, [
            ("dag_nodes", _ask(node_holders, created) + _ask(nodes, created)),
            ("execution_events", _ask(event_holders, created) + _ask(events, created))])
    _insert_missing(conn, sql, nodes_t, node_holders, created, known_nodes)
    _upsert(conn, sql, nodes_t, nodes, created, known_nodes)
    _write_started(conn, sql, nodes_t, parents_first(batch.started_nodes, "parent_node_id"))
    _insert_missing(conn, sql, events_t, event_holders, created, known_events)
    _upsert(conn, sql, events_t, events, created, known_events)
    # A run this batch created has no events stored but the batch's: only runs with foreign
    # events in the batch, or with events stored before it, can have anything to repair.
    repair = {e["run_id"] for e in batch.events.values() if e["run_id"] not in created}
    repair.update(run_id for _, run_id in batch.foreign_parents.values())
    repair.update(_node_runs(batch) - created)  # a created run has no stored foreign event to repair
    if repair:
        _repair_foreign(conn, sql, repair)
    _write_messages(conn, sql, batch.messages)
    # The layout (edges, derived nodes, branch rows, session state) depends on a run's row
    # and its nodes; usage totals and cost records also on its LLM events. A batch that
    # changed neither for a run (a repeated workflow span, only tool events) leaves them be.
    layout = {n["run_id"] for n in batch.nodes.values()} | {n["run_id"] for n in batch.started_nodes.values()} | (
        batch.dag_runs & changed)
    _derive_stored(conn, sql, layout - created, batch.rollup_runs - created, derived)
    _write_derived(conn, sql, derived, costs=costs)
    if sql.pg:
        _touch_sessions(conn, sql, batch)


def _write_sessions(conn: Connection, sql: Sql, batch: MappedBatch) -> None:
    """Create missing session rows; extend the active range of existing ones.

    On PostgreSQL the range update runs last (``_touch_sessions``): it locks the session
    row until commit, and every writer of the session needs that row, so holding it for
    the whole transaction would make them wait for each other's entire batch.
    """
    if not batch.sessions:
        return
    if sql.pg:
        sql.insert(conn, T["sessions"], [batch.sessions[k] for k in sorted(batch.sessions)], "nothing")
        return
    _touch_sessions(conn, sql, batch)


def _restore_sessions(conn: Connection, sql: Sql, run_ids: Sequence[str]) -> int:
    """Insert a session row for each session the stored rows of ``run_ids`` name and no row is;
    returns how many (see :meth:`DagWriter._restore_sessions`)."""
    spans: dict[str, tuple[datetime, datetime]] = {}
    now = datetime.now(timezone.utc).replace(tzinfo=None)
    for part in sql.in_chunks(run_ids):
        for session_id, started, ended in sql.rows(
                conn, "SELECT session_id, MIN(started_at), MAX(COALESCE(completed_at, started_at)) FROM workflow_runs "
                f"WHERE {sql.where_in('id', len(part))} AND session_id NOT IN (SELECT id FROM sessions) "
                "GROUP BY session_id", sql.in_params(part)):
            start, end = naive(started) or now, naive(ended) or now
            if session_id in spans:
                start, end = min(start, spans[session_id][0]), max(end, spans[session_id][1])
            spans[session_id] = (start, end)
    sql.insert(conn, T["sessions"], [
        session_row(session_id, start, end, status="deleted",
                    meta={"source": "cmbagent-otel", "restored": "a stored run names this session"})
        for session_id, (start, end) in sorted(spans.items())], "nothing")
    return len(spans)


_TOUCH = ("created_at = CASE WHEN (excluded.created_at < sessions.created_at) THEN excluded.created_at "
          "ELSE sessions.created_at END, last_active_at = CASE WHEN (excluded.last_active_at > "
          "sessions.last_active_at) THEN excluded.last_active_at ELSE sessions.last_active_at END")


def _touch_sessions(conn: Connection, sql: Sql, batch: MappedBatch) -> None:
    if not batch.sessions:
        return
    table = T["sessions"]
    sql.write(conn, f"{sql.insert_sql(table)} ON CONFLICT (id) DO UPDATE SET {_TOUCH}",
              sql.params([batch.sessions[k] for k in sorted(batch.sessions)], sql.columns(table)), many=True)


_RETURNING_PAGE = 40  # rows per multi-row INSERT ... RETURNING (SQLite: at most 999 parameters)


def _insert_new(conn: Connection, sql: Sql, table: Table, rows: Sequence[Mapping[str, Any]]) -> set[str]:
    """``INSERT ... ON CONFLICT (id) DO NOTHING RETURNING id``: the ids of ``rows`` this call
    created. Rows another writer created first are left alone, never a unique violation."""
    if sql.pipelined:
        return {r[0] for r in sql.rows_each(conn, f"{sql.insert_sql(table, 'nothing')} RETURNING id",
                                            sql.params(rows, sql.columns(table)))}
    created: set[str] = set()
    for statement, params in _insert_new_statements(sql, table, rows):
        created.update(r[0] for r in sql.rows(conn, statement, params))
    return created


def _insert_new_statements(sql: Sql, table: Table, rows: Sequence[Mapping[str, Any]]) -> list[tuple[str, Any]]:
    cols = sql.columns(table)
    head = sql.insert_sql(table).split(" VALUES ", 1)[0]
    values = "(" + ", ".join(sql.mark + ("::json" if sql.pg and kind == "json" else "") for _, kind in cols) + ")"
    return [(f"{head} VALUES {', '.join([values] * len(part))} ON CONFLICT (id) DO NOTHING RETURNING id",
             tuple(v for row in sql.params(part, cols) for v in row)) for part in chunks(rows, _RETURNING_PAGE)]


def _write_runs(conn: Connection, sql: Sql, batch: MappedBatch) -> tuple[set[str], set[str]]:
    """Insert new run rows, replace stored ones a better candidate beats; returns the runs
    created and the runs changed (created or replaced)."""
    table = T["workflow_runs"]
    ids = sorted(batch.runs)
    created = _insert_new(conn, sql, table, [batch.runs[run_id].row for run_id in ids])
    rest = [run_id for run_id in ids if run_id not in created]
    if not rest:
        return created, created
    lock = " FOR UPDATE" if sql.pg else ""
    existing = {}
    for part in sql.in_chunks(rest):
        for run_id, meta, started in sql.rows(
                conn, f"SELECT id, meta, started_at FROM workflow_runs WHERE {sql.where_in('id', len(part))}{lock}",
                sql.in_params(part)):
            existing[run_id] = (meta, started)
    better = []
    for run_id in rest:
        old, cand = existing.get(run_id), batch.runs[run_id]
        if old is None:
            continue  # deleted by someone else since the insert: nothing to compare with
        # another writer's row: its meta may hold anything (an unknown or unhashable source ranks
        # as another writer's, a span id other than text as none)
        old_meta = decode_meta(old[0])
        source, span_id = old_meta.get("otel_source"), old_meta.get("span_id")
        old_rank = RANK_BY_NAME.get(source, 99) if type(source) is str else 99
        if better_run(cand.rank, cand.row, old_rank,
                      {"started_at": naive(old[1]), "meta": {"span_id": span_id if type(span_id) is str else ""}}):
            better.append(cand.row)
    sql.update(conn, table, better)
    return created, created | {row["id"] for row in better}


def _parent_event_id(meta: Any) -> str | None:
    """The event id of a foreign event's parent span, from the full trace and parent span ids in its meta."""
    if not isinstance(meta, dict):
        return None
    trace_hex, parent_hex = meta.get("trace_id"), meta.get("parent_span_id")
    if not trace_hex or not parent_hex:
        return None
    try:
        return event_db_id(int(trace_hex, 16), int(parent_hex, 16))
    except (TypeError, ValueError):
        return None


def _unindexed(sql: Sql, column: str) -> str:
    """``column`` in a form no index matches.

    Both planners (SQLite without statistics, PostgreSQL before ANALYZE) prefer the
    (event_type, event_subtype) index to the run_id one for ``type = ? AND run_id IN (...)``:
    every event of that type in the whole database is then read, and the cost of a batch grows
    with the database. A unary ``+`` (SQLite) or ``|| ''`` (PostgreSQL) leaves run_id's index.
    """
    return f"({column} || '')" if sql.pg else f"+{column}"


def _repair_foreign(conn: Connection, sql: Sql, run_ids: set[str]) -> None:
    """Attach spans from other instrumentations under their parent event once it is known."""
    m = sql.mark
    foreign = []
    for part in sql.in_chunks(sorted(run_ids)):
        foreign.extend(sql.rows(
            conn, "SELECT id, parent_event_id, depth, execution_order, node_id, meta FROM execution_events "
            f"WHERE {_unindexed(sql, 'event_type')} = {m} AND {_unindexed(sql, 'event_subtype')} = {m} AND "
            f"{sql.where_in('run_id', len(part))}",
            (*FOREIGN_TYPE, *sql.in_params(part))))
    if not foreign:
        return
    candidates: dict[str, str | None] = {}
    parent_spans: dict[str, Any] = {}  # parent event id -> the parent's span id (hex)
    for row in foreign:
        meta = decode_json(row.meta)
        candidates[row.id] = parent = _parent_event_id(meta)
        if parent is not None:
            parent_spans[parent] = meta["parent_span_id"]
    wanted = sorted({c for c in candidates.values() if c})
    known: dict[str, tuple[int, int, str | None]] = {}
    for part in sql.in_chunks(wanted):
        for r in sql.rows(
                conn, "SELECT id, depth, execution_order, node_id, event_subtype, event_type FROM execution_events "
                f"WHERE {sql.where_in('id', len(part))}", sql.in_params(part)):
            if r.event_subtype == PLACEHOLDER_SUBTYPE:
                continue
            if (r.event_type, r.event_subtype) != FOREIGN_TYPE:
                known[r.id] = (r.depth, r.execution_order, r.node_id)
    under_node = _node_span_parents(conn, sql, run_ids, {
        parent: span for parent, span in parent_spans.items() if parent not in known and parent not in candidates})
    # event id -> (parent, depth, order, node, nearest cmbagent ancestor)
    resolved: dict[str, tuple[str | None, int, int, str | None, str | None]] = {}

    def resolve(event_id: str, seen: frozenset[str]) -> tuple[int, int, str | None, str | None] | None:
        if event_id in known:
            return (*known[event_id], event_id)
        if event_id not in candidates or event_id in seen:
            return None
        return want(event_id, seen | {event_id})[1:]

    def want(event_id: str, seen: frozenset[str]) -> tuple[str | None, int, int, str | None, str | None]:
        if event_id in resolved:
            return resolved[event_id]
        parent = candidates.get(event_id)
        if parent in under_node:  # directly under a DAG node's span: an event of that node, at its top
            result: tuple[str | None, int, int, str | None, str | None] = (None, 0, 0, under_node[parent], None)
            resolved[event_id] = result
            return result
        info = resolve(parent, seen) if parent else None
        result = (None, 0, 0, None, None) if info is None else (parent, info[0] + 1, *info[1:])
        resolved[event_id] = result
        return result

    updates = []
    for row in foreign:
        parent, depth, order, node, _ = want(row.id, frozenset({row.id}))
        if (row.parent_event_id, row.depth, row.execution_order, row.node_id) != (parent, depth, order, node):
            updates.append((parent, depth, order, node, row.id))
    if updates:
        sql.write(conn, f"UPDATE execution_events SET parent_event_id = {m}, depth = {m}, execution_order = {m}, "
                  f"node_id = {m} WHERE id = {m}", updates, many=True)
    # A cmbagent event under a foreign span counts its depth without that span (the
    # instrumentation cannot see it): hang it under its nearest cmbagent ancestor instead.
    parents = sorted(candidates)
    moves = []
    for part in sql.in_chunks(parents):
        for child_id, parent_id in sql.rows(
                conn, "SELECT id, parent_event_id FROM execution_events WHERE "
                f"{sql.where_in('parent_event_id', len(part))} AND NOT (event_type = {m} AND event_subtype = {m})",
                (*sql.in_params(part), *FOREIGN_TYPE)):
            target = resolved[parent_id][4]  # never the foreign parent itself
            if target is not None:
                moves.append((target, child_id))
    if moves:
        sql.write(conn, f"UPDATE execution_events SET parent_event_id = {m} WHERE id = {m}", moves, many=True)


def _node_runs(batch: MappedBatch) -> set[str]:
    """Runs given a node by this batch: their foreign events are looked at again, since a span of
    another instrumentation directly under a node's span ends (and may be written) before it."""
    return {node["run_id"] for node in batch.nodes.values()} | {
        node["run_id"] for node in batch.started_nodes.values()}


def _node_span_parents(conn: Connection, sql: Sql, run_ids: set[str], parents: dict[str, Any]) -> dict[str, str]:
    """Node id by parent event id, for the ``parents`` (event id -> span id in hex) that are the spans of
    stored DAG nodes (a step, a phase, an agent turn): a span of another instrumentation directly under
    one belongs to that node (before, it had no node and ``events --node`` left it out)."""
    if not parents:
        return {}
    wanted = set(parents.values())
    by_span: dict[Any, str] = {}
    for part in sql.in_chunks(sorted(run_ids)):
        for row in sql.rows(conn, f"SELECT id, meta FROM dag_nodes WHERE {sql.where_in('run_id', len(part))}",
                            sql.in_params(part)):
            meta = decode_json(row.meta)
            span = meta.get("span_id") if isinstance(meta, dict) else None
            if span in wanted:
                by_span[span] = row.id
    return {parent: by_span[span] for parent, span in parents.items() if span in by_span}


def _write_messages(conn: Connection, sql: Sql, messages: list[dict[str, Any]]) -> None:
    if not messages:
        return
    event_ids = sorted({m["event_id"] for m in messages})
    stored: set[Any] = set()
    for part in sql.in_chunks(event_ids):
        stored.update(r[0] for r in sql.rows(
            conn, f"SELECT event_id FROM messages WHERE {sql.where_in('event_id', len(part))}", sql.in_params(part)))
    seen: set[tuple[Any, ...]] = set()
    rows = []
    for m in messages:
        key = (m["event_id"], m["meta"]["direction"], m["meta"]["index"])
        if m["event_id"] in stored or key in seen:
            continue
        seen.add(key)
        rows.append(m)
    sql.insert(conn, T["messages"], rows)


def _naive(value: Any) -> datetime | None:
    """:func:`naive`, without a copy of a datetime that is naive already (the mapping's)."""
    return value if type(value) is datetime and value.tzinfo is None else naive(value)


def _count(value: Any) -> int:
    return value if type(value) is int else int(value) if isinstance(value, float) and math.isfinite(value) else 0


def _amount(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else 0.0


_USAGE_SQLITE = ("SELECT run_id, node_id, agent_name, json_extract(meta, '$.model'), json_extract(meta, "
                 "'$.prompt_tokens'), json_extract(meta, '$.completion_tokens'), json_extract(meta, '$.cost_usd'), "
                 "completed_at, timestamp FROM execution_events WHERE +event_type = ? AND +event_subtype = ? AND ")
_USAGE_PG = ("SELECT run_id, node_id, agent_name, meta ->> 'model' AS model, CAST((meta ->> 'prompt_tokens') AS "
             "INTEGER) AS prompt, CAST((meta ->> 'completion_tokens') AS INTEGER) AS completion, CAST((meta ->> "
             "'cost_usd') AS FLOAT) AS cost, completed_at, timestamp FROM execution_events "
             "WHERE (event_type || '') = %s AND (event_subtype || '') = %s AND ")


def _usage_statements(sql: Sql, run_ids: Sequence[str]) -> list[tuple[str, Any]]:
    """The LLM events' usage of ``run_ids``: a few scalars per event, read out of ``meta`` by the database."""
    head = _USAGE_PG if sql.pg else _USAGE_SQLITE
    return [(head + sql.where_in("run_id", len(part)), (*LLM_TYPE, *sql.in_params(part)))
            for part in sql.in_chunks(run_ids)]


def _usage_by_run(run_ids: Sequence[str], rows: Iterable[Sequence[Any]]) -> dict[str, list[LlmUsage]]:
    out: dict[str, list[LlmUsage]] = {run_id: [] for run_id in run_ids}
    for run_id, node_id, agent, model, prompt, completion, cost, completed, stamp in rows:
        out[run_id].append(LlmUsage(node_id, agent, None if model is None else str(model), _count(prompt),
                                    _count(completion), _amount(cost), naive(completed) or naive(stamp)))
    return out


def _edges_statements(sql: Sql, run_ids: Sequence[str]) -> list[tuple[str, Any]]:
    return [("SELECT dag_nodes.run_id, dag_edges.id, dag_edges.from_node_id, dag_edges.to_node_id, "
             "dag_edges.dependency_type, dag_edges.condition FROM dag_nodes JOIN dag_edges ON dag_nodes.id = "
             f"dag_edges.from_node_id WHERE {sql.where_in('dag_nodes.run_id', len(part))} ORDER BY dag_edges.id",
             sql.in_params(part)) for part in sql.in_chunks(run_ids)]


def _edges_by_run(run_ids: Sequence[str], rows: Iterable[Any]) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {run_id: [] for run_id in run_ids}
    for e in rows:
        out[e.run_id].append(e)
    return out


@dataclass
class _Derived:
    """The derived rows a batch writes (see :func:`_derive_fresh` and :func:`_derive_stored`)."""

    nodes: list[dict[str, Any]] = field(default_factory=list)  # derived nodes new or changed
    node_metas: list[dict[str, Any]] = field(default_factory=list)  # stored nodes whose usage totals changed
    stale: list[str] = field(default_factory=list)  # derived nodes no longer derived
    drop: list[Any] = field(default_factory=list)  # edges no longer derived
    edges: list[dict[str, Any]] = field(default_factory=list)  # edges to add
    steps: list[dict[str, Any]] = field(default_factory=list)
    child_runs: list[dict[str, Any]] = field(default_factory=list)
    branches: list[dict[str, Any]] = field(default_factory=list)
    costs: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # per run, diffed against the stored
    new_costs: list[dict[str, Any]] = field(default_factory=list)  # of runs with none stored
    states: dict[str, dict[str, Any]] = field(default_factory=dict)  # the newest per session
    files: list[dict[str, Any]] = field(default_factory=list)  # work-dir files of finished runs
    named_runs: list[str] = field(default_factory=list)  # runs whose code events take their node's agent

    def offer_state(self, state: dict[str, Any] | None) -> None:
        if state is not None and (
            state["id"] not in self.states or _state_key(state) >= _state_key(self.states[state["id"]])
        ):
            self.states[state["id"]] = state


def _edge_key(edge: tuple[str, str, str, str | None]) -> tuple[str, str, str, str]:
    return (edge[0], edge[1], edge[2], edge[3] or "")


def _edge_rows(edges: Iterable[tuple[str, str, str, str | None]]) -> list[dict[str, Any]]:
    try:
        # derive_run_rows gives at most one edge per (from, to): the plain tuple order is _edge_key's,
        # without a key per edge; a condition is compared (None with text raises) only for two edges
        # sharing from, to and type
        ordered = sorted(edges)
    except TypeError:
        ordered = sorted(edges, key=_edge_key)
    return [{"from_node_id": f, "to_node_id": t, "dependency_type": d, "condition": c} for f, t, d, c in ordered]


_JSON_SCALARS = frozenset({str, int, float, bool, type(None)})
_TEXT = frozenset({str})


def _as_stored(value: Any) -> Any:
    """A JSON value as the database gives it back (tuples become lists, keys text...)."""
    if value is None:
        return None
    if _flat_json(value):
        return value.copy()  # the JSON round trip would change nothing
    return json.loads(encode_json(value))


def _flat_json(value: Any) -> bool:
    """Whether ``value`` is a dict of text keys and plain JSON values (as the database gives it back)."""
    # map over type: the checks run in C, no Python frame per key
    return type(value) is dict and _TEXT.issuperset(map(type, value)) and _JSON_SCALARS.issuperset(
        map(type, value.values()))


def _plain_node_meta(meta: Any) -> bool:
    """:func:`_flat_json` of a node meta built by the mapping: only its raw attribute values can be other."""
    return type(meta) is dict and _JSON_SCALARS.issuperset(map(type, map(meta.get, RAW_NODE_META)))


def _derive_fresh(batch: MappedBatch, created: set[str], out: _Derived) -> None:
    """Derived rows of the runs this batch created, from the batch alone.

    Nothing of such a run was stored before (every span of a run creates its run row, and
    writers of one run take turns), so after the batch's writes its nodes are the batch's
    placeholders, started and finished node rows (in that order of precedence) and its LLM
    events the batch's: exactly what :func:`_derive_stored` would read back. The usage
    totals go into the batch's node rows before they are written (no second write), and
    code executions take their node's agent as :func:`_name_code_events` would.
    """
    if not created:
        return
    final: dict[str, dict[str, Any]] = {}  # node id -> the batch row stored last for it
    for source in (batch.node_placeholders, batch.started_nodes, batch.nodes):
        for node_id, row in source.items():
            if row["run_id"] in created:
                final[node_id] = row
    nodes_by_run: dict[str, list[dict[str, Any]]] = {run_id: [] for run_id in created}
    for row in final.values():
        # derive_run_rows only reads its nodes: a row whose meta is already as stored goes as it is
        nodes_by_run[row["run_id"]].append(row if _plain_node_meta(row["meta"])
                                           else {**row, "meta": _as_stored(row["meta"]) or {}})
    usage_by_run: dict[str, list[LlmUsage]] = {run_id: [] for run_id in created}
    llm_type, llm_subtype = LLM_TYPE
    unnamed: list[dict[str, Any]] = []  # code executions without an agent name, under a node
    for event in batch.events.values():
        event_type = event["event_type"]
        if event_type == llm_type:
            if event["event_subtype"] == llm_subtype and event["run_id"] in created:
                meta = event["meta"] if isinstance(event["meta"], dict) else {}
                model = meta.get("model")
                usage_by_run[event["run_id"]].append(LlmUsage(
                    event["node_id"], event["agent_name"], None if model is None else str(model),
                    _count(meta.get("prompt_tokens")), _count(meta.get("completion_tokens")),
                    _amount(meta.get("cost_usd")), _naive(event["completed_at"]) or _naive(event["timestamp"])))
        elif event_type == "code_exec" and event["agent_name"] is None and event["node_id"] is not None \
                and event["run_id"] in created:
            unnamed.append(event)
    after = dict(final)
    for run_id in sorted(created):
        candidate = batch.runs[run_id].row
        # derive_run_rows only reads the run row: one whose meta is already as stored goes as it is
        derived = derive_run_rows(candidate if _flat_json(candidate["meta"])
                                  else {**candidate, "meta": _as_stored(candidate["meta"]) or {}},
                                  nodes_by_run[run_id], usage_by_run[run_id])
        derived_ids = {d["id"] for d in derived.nodes}
        out.nodes.extend(derived.nodes)
        after.update((d["id"], d) for d in derived.nodes)
        for node in derived.node_updates:
            if node["id"] not in derived_ids:  # a derived node wins over a real node that took its id
                final[node["id"]]["meta"] = node["meta"]
        out.edges.extend(_edge_rows(derived.edges))
        out.steps.extend(derived.steps)
        out.child_runs.extend(derived.child_runs)
        out.branches.extend(derived.branches)
        out.new_costs.extend(derived.costs)
        out.offer_state(derived.session_state)
        out.files.extend(derived.files)
    for event in unnamed:
        node = after.get(event["node_id"])
        if node is not None and node["node_type"] in _NAMING_NODES and node["agent"] not in (None, "unknown"):
            event["agent_name"] = node["agent"]


_NAMING_NODES = (sc.NODE_SUB_AGENT, sc.NODE_AGENT)


def _derive_stored(conn: Connection, sql: Sql, layout_runs: set[str], rollup_runs: set[str], out: _Derived) -> None:
    """Recompute the rows derived from each run's stored node set and LLM usage.

    ``layout_runs``: runs whose row or nodes changed: everything is rewritten where it
    differs (derived nodes, edges, branch rows, usage totals, cost records, session state).
    ``rollup_runs``: runs with new LLM usage (or code runs without an agent name): usage
    totals, the derived nodes that carry them, cost records and code events' agent names.
    One query per table for all runs of the batch.
    """
    run_ids = sorted(layout_runs | rollup_runs)
    if not run_ids:
        return
    nodes_t, runs_t = T["dag_nodes"], T["workflow_runs"]
    reads = [sql.select_statements(nodes_t, "run_id", run_ids), _edges_statements(sql, sorted(layout_runs)),
             _usage_statements(sql, run_ids), sql.select_statements(runs_t, "id", run_ids)]
    results = iter(sql.rows_many(conn, [statement for group in reads for statement in group]))
    node_rows, edge_rows, usage_rows, run_rows = ([row for _ in group for row in next(results)] for group in reads)
    nodes_by_run: dict[str, list[dict[str, Any]]] = {run_id: [] for run_id in run_ids}
    for node in sql.decoded(nodes_t, node_rows):
        if type(node["meta"]) is not dict:  # none, or another writer's JSON that is no object
            node["meta"] = {}
        nodes_by_run[node["run_id"]].append(node)
    edges_by_run = _edges_by_run(sorted(layout_runs), edge_rows)
    usage_by_run = _usage_by_run(run_ids, usage_rows)
    out.named_runs.extend(run_ids)
    for run in sorted(sql.decoded(runs_t, run_rows), key=lambda r: r["id"]):
        if type(run["meta"]) is not dict:
            run["meta"] = {}
        run_id = run["id"]
        nodes = nodes_by_run[run_id]
        derived = derive_run_rows(run, nodes, usage_by_run[run_id])
        stored_by_id = {n["id"]: n for n in nodes}
        # most batches leave a run's derived nodes as they are: rewrite only the changed ones
        out.nodes.extend(d for d in derived.nodes if not _same_row(d, stored_by_id.get(d["id"])))
        derived_ids = {d["id"] for d in derived.nodes}
        # a derived node wins over a real node whose damaged short id took its id
        out.node_metas.extend({"id": n["id"], "meta": n["meta"]} for n in derived.node_updates
                              if n["id"] not in derived_ids)
        out.costs[run_id] = derived.costs
        if run_id not in layout_runs:
            continue
        out.stale.extend(n["id"] for n in nodes if n["meta"].get("derived") and n["id"] not in derived_ids)
        kept: set[tuple[str, str, str, str | None]] = set()
        for e in edges_by_run[run_id]:
            key = (e.from_node_id, e.to_node_id, e.dependency_type, e.condition)
            if key in derived.edges and key not in kept:
                kept.add(key)
            else:
                out.drop.append(e.id)
        out.edges.extend(_edge_rows(derived.edges - kept))
        out.steps.extend(derived.steps)
        out.child_runs.extend(derived.child_runs)
        out.branches.extend(derived.branches)
        out.offer_state(derived.session_state)
        out.files.extend(derived.files)


def _write_derived(conn: Connection, sql: Sql, rows: _Derived, *, costs: bool = True) -> None:
    nodes_t, steps_t, runs_t, branches_t = T["dag_nodes"], T["workflow_steps"], T["workflow_runs"], T["branches"]
    nodes = parents_first({n["id"]: n for n in rows.nodes}, "parent_node_id")
    known: list[set[Any] | None] = [None] * 5
    stored_costs = None
    if sql.pipelined:
        # One round trip: no write below before these reads changes what they find (deleting
        # derived nodes and edges reaches no step, run, branch or cost row; the cost rows
        # inserted first are those of runs this batch created, never among rows.costs).
        cost_reads = sql.select_statements(T["cost_records"], "run_id", list(rows.costs)) if costs else []
        found, cost_rows = sql.existing_ids_and_rows(conn, [
            ("dag_nodes", _ask(nodes)), ("workflow_steps", _ask(rows.steps)),
            ("workflow_runs", _ask(rows.child_runs)), ("branches", _ask(rows.branches)),
            ("files", _ask(rows.files))], cost_reads)
        known[:] = found
        stored_costs = sql.decoded(T["cost_records"], [r for rows_ in cost_rows for r in rows_])
    _upsert(conn, sql, nodes_t, nodes, existing=known[0])
    sql.update(conn, nodes_t, rows.node_metas, _NODE_META)
    sql.delete_ids(conn, "dag_nodes", rows.stale)
    sql.delete_ids(conn, "dag_edges", rows.drop)
    sql.insert(conn, T["dag_edges"], rows.edges)
    _upsert(conn, sql, steps_t, rows.steps, existing=known[1])
    _upsert(conn, sql, runs_t, rows.child_runs, existing=known[2])
    _upsert(conn, sql, branches_t, rows.branches, existing=known[3])
    _upsert(conn, sql, T["files"], rows.files, existing=known[4])
    if rows.named_runs:
        _name_code_events(conn, sql, rows.named_runs)
    if costs:
        sql.insert(conn, T["cost_records"], rows.new_costs)
        _write_cost_records(conn, sql, rows.costs, stored_costs)
    for _, state in sorted(rows.states.items()):
        _write_session_state(conn, sql, state)


def _name_code_events(conn: Connection, sql: Sql, run_ids: Sequence[str]) -> None:
    """A code execution without an agent name takes its DAG node's agent (the agent turn running it)."""
    m = sql.mark
    owner = (f"dag_nodes.id = execution_events.node_id AND dag_nodes.node_type IN ({m}, {m}) AND dag_nodes.agent "
             f"IS NOT NULL AND dag_nodes.agent != {m}")
    owner_params = (sc.NODE_SUB_AGENT, sc.NODE_AGENT, "unknown")
    for part in sql.in_chunks(run_ids):
        sql.write(
            conn, f"UPDATE execution_events SET agent_name=(SELECT dag_nodes.agent FROM dag_nodes WHERE {owner}) "
            f"WHERE {sql.where_in('execution_events.run_id', len(part))} AND "
            f"{_unindexed(sql, 'execution_events.event_type')} = {m} "
            "AND execution_events.agent_name IS NULL AND execution_events.node_id IS NOT NULL AND "
            f"(EXISTS (SELECT dag_nodes.id FROM dag_nodes WHERE {owner}))",
            (*owner_params, *sql.in_params(part), "code_exec", *owner_params))


def _cost_key(row: Mapping[str, Any]) -> tuple[Any, ...]:
    return (row["run_id"], row["step_id"], row["session_id"], row["model"], row["agent_name"], row["parent_run_id"],
            int(row["prompt_tokens"]), int(row["completion_tokens"]), int(row["total_tokens"]),
            f"{float(row['cost_usd']):.6f}", naive(row["timestamp"]))


def _write_cost_records(conn: Connection, sql: Sql, wanted: Mapping[str, list[dict[str, Any]]],
                        stored: list[dict[str, Any]] | None = None) -> None:
    """Make each run's ``cost_records`` exactly ``wanted`` (autoincrement ids: diff, then delete/insert);
    ``stored``: their rows, when the caller already read them."""
    if not wanted:
        return
    table = T["cost_records"]
    remaining = Counter(_cost_key(row) for rows in wanted.values() for row in rows)
    drop = []
    for row in stored if stored is not None else sql.select(conn, table, "run_id", list(wanted)):
        key = _cost_key(row)
        if remaining[key] > 0:
            remaining[key] -= 1
        else:
            drop.append(row["id"])
    sql.delete_ids(conn, "cost_records", drop)
    inserts = []
    for rows in wanted.values():
        for row in rows:
            key = _cost_key(row)
            if remaining[key] > 0:
                remaining[key] -= 1
                inserts.append(row)
    sql.insert(conn, table, inserts)


def _same_row(row: Mapping[str, Any], stored: Mapping[str, Any] | None) -> bool:
    """Whether ``stored`` (decoded from the DB) already holds ``row``'s values; unsure means no."""
    if stored is None:
        return False
    for key, value in row.items():
        old = stored.get(key)
        if key == "meta":
            old = decode_json(old)
            value = json.loads(encode_json(value)) if value is not None else None
        if old != value:
            return False
    return True


def _state_key(row: Mapping[str, Any]) -> tuple[datetime, str]:
    """Which session state is the latest: by update time, then run id (any order of arrival)."""
    context = row.get("context_variables")
    run_id = context.get("run_id", "") if isinstance(context, dict) else ""
    return (naive(row.get("updated_at")) or datetime.min, str(run_id))


def _write_session_state(conn: Connection, sql: Sql, row: dict[str, Any]) -> None:
    table = T["session_states"]
    lock = " FOR UPDATE" if sql.pg else ""
    read = (f"SELECT updated_at, context_variables FROM session_states WHERE id = {sql.mark}{lock}", (row["id"],))
    if sql.pipelined:  # both in one round trip: the read finds the row whether the insert made it or not
        inserted, found = sql.rows_many(conn, [*_insert_new_statements(sql, table, [row]), read])
        if inserted:
            return
    else:
        if _insert_new(conn, sql, table, [row]):
            return
        found = sql.rows(conn, *read)
    if not found:
        return
    old = found[0]
    old_key = _state_key({"updated_at": old.updated_at, "context_variables": decode_json(old.context_variables)})
    if _state_key(row) >= old_key:
        sql.update(conn, table, [row], [c for c in row if c != "id"])


def dump_tables(conn: Connection) -> dict[str, list[tuple[Any, ...]]]:
    """Every tracking table's rows (autoincrement ids left out), sorted: for comparisons."""
    out: dict[str, list[tuple[Any, ...]]] = {}
    for name in schema.TABLE_ORDER:
        table = T[name]
        cols = [c for c in table.columns if not (c.name == "id" and isinstance(c.type, Integer))]
        rows = [tuple(_dump_value(c, v) for c, v in zip(cols, r, strict=True)) for r in conn.execute(select(*cols))]
        out[name] = sorted(rows, key=lambda t: tuple("" if x is None else x for x in t))

    return out


def _dump_value(column: Any, value: Any) -> Any:
    if value is None:
        return None
    if isinstance(column.type, JSON):
        return json.dumps(decode_json(value), sort_keys=True, default=str)
    if isinstance(value, datetime):
        if value.tzinfo is not None:
            value = value.astimezone(timezone.utc).replace(tzinfo=None)
        return value.isoformat(" ", "microseconds")
    if isinstance(value, (float, Decimal)):
        return f"{float(value):.6f}"
    return str(value)
