"""Writes mapped span batches into the tracking tables: one transaction per batch.

Rows with a natural key are upserted (placeholders ``DO NOTHING``, real rows ``DO
UPDATE``), so repeated or reordered batches converge to the same contents. Tables without
one (``dag_edges``, ``cost_records``, ``messages``) are diffed against what is stored.
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
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

from opentelemetry.sdk.trace import ReadableSpan
from sqlalchemy import (
    JSON,
    Boolean,
    Connection,
    DateTime,
    Engine,
    Integer,
    Table,
    bindparam,
    case,
    delete,
    exists,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite

from .. import semconv as sc
from .._jsontext import compact_encoder
from . import schema
from .database import deadline, ensure_schema, make_engine, redacted, resolve_url, sqlite_file
from .errors import Fault, classify
from .mapping import (
    FOREIGN_TYPE,
    LLM_TYPE,
    PLACEHOLDER_SUBTYPE,
    RANK_BY_NAME,
    LlmUsage,
    MappedBatch,
    better_run,
    derive_run_rows,
    event_db_id,
    map_spans,
)

logger = logging.getLogger("cmbagent_otel.dag")

T = {name: schema.metadata.tables[name] for name in schema.TABLE_ORDER}
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
    chosen = mode if mode is not None else os.environ.get(COST_RECORDS_ENV)
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


@dataclass(frozen=True)
class WriteResult:
    """What one :meth:`DagWriter.write` call stored."""

    spans: int
    runs: int


def decode_json(value: Any) -> Any:
    """A JSON column's value as read back: drivers return text (SQLite) or objects (PostgreSQL)."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return None
    return value


def _naive(value: Any) -> datetime | None:
    if isinstance(value, datetime):
        return value.replace(tzinfo=None)
    if isinstance(value, str):
        try:
            return datetime.fromisoformat(value).replace(tzinfo=None)
        except ValueError:
            return None
    return None


class DagWriter:
    """Writes finished spans into cmbagent's tracking schema.

    ``url`` is resolved argument > ``CMBAGENT_OTEL_DATABASE_URL`` > ``CMBAGENT_DATABASE_URL``
    > the default SQLite file. With ``migrate`` (default) the schema is brought to head
    once per process before the first write. ``cost_records`` (``per_agent``/``off``) is
    resolved by :func:`resolve_cost_records`. Thread-safe.
    """

    def __init__(self, url: str | None = None, *, migrate: bool = True, engine: Engine | None = None,
                 cost_records: str | None = None) -> None:
        self.url = resolve_url(url)
        self.cost_records = resolve_cost_records(cost_records)
        self._migrate = migrate
        self._engine = engine
        self._lock = threading.Lock()
        self._ready = False
        self._repair = False
        self._file = sqlite_file(self.url) if engine is None else None
        self._file_id: tuple[int, int] | None = None
        self._pid = os.getpid()

    @property
    def engine(self) -> Engine:
        """The SQLAlchemy engine (created on first use, and again in a forked child)."""
        with self._lock:
            if self._engine is not None and self._pid != os.getpid():
                # connections inherited from the parent process must not be used (nor closed) here
                self._engine.dispose(close=False)
                self._engine = None
            if self._engine is None:
                self._engine = make_engine(self.url)
                self._pid = os.getpid()
            return self._engine

    def _prepare(self) -> None:
        if self._ready:
            return
        with self._lock:
            repair, self._repair = self._repair, False
        if self._migrate:
            try:
                ensure_schema(self.url, repair=repair)
            except BaseException:
                with self._lock:
                    self._repair = self._repair or repair
                raise
        if self._file is not None and self._file_id is None:
            self._file_id = _identity(self._file)
        self._ready = True

    def _reopen(self, why: str, *, repair: bool) -> None:
        """Drop every connection and migrate again before the next write.

        A SQLite file deleted or replaced under open connections keeps taking writes into
        the old, unlinked inode: those connections must go, and the new file needs the schema.
        """
        with self._lock:
            engine, self._engine = self._engine, None
            self._ready = False
            self._file_id = None
            self._repair = self._repair or repair
        logger.warning("cmbagent_otel: database %s %s; reconnecting%s", redacted(self.url), why,
                       " and migrating again" if repair and self._migrate else "")
        if engine is not None:
            engine.dispose()
        if self._file is not None and _identity(self._file) is None:
            # WAL and shared-memory files of the deleted database must not meet the new one
            for suffix in ("-wal", "-shm"):
                with contextlib.suppress(OSError):
                    Path(f"{self._file}{suffix}").unlink(missing_ok=True)

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
        batch = map_spans(spans)
        with deadline(timeout):
            for attempt in range(_MAX_REPAIRS + 1):
                last = attempt == _MAX_REPAIRS
                try:
                    stored = self._attempt(batch)
                except Exception as exc:
                    fault = classify(exc)
                    if fault is Fault.FATAL:
                        raise
                    if fault is Fault.REOPEN and not last:
                        self._reopen("cannot be opened or was moved", repair=True)
                        continue
                    if fault is Fault.SCHEMA and self._migrate and not last:
                        self._reopen(f"lost its schema ({_first_line(exc)})", repair=True)
                        continue
                    raise DatabaseUnavailable(
                        f"database {redacted(self.url)} unavailable ({fault.value}): {_first_line(exc)}") from exc
                if stored:
                    return WriteResult(len(spans), len(batch.runs))
            raise DatabaseUnavailable(f"database {redacted(self.url)}: its file keeps being replaced")

    def _attempt(self, batch: MappedBatch) -> bool:
        """One transaction; False when the SQLite file turned out to be replaced (nothing counted)."""
        file = self._file
        if file is not None and self._file_id is not None and _identity(file) != self._file_id:
            self._reopen(f"file {file} was deleted or replaced", repair=True)
        self._prepare()
        expected = self._file_id
        with self.engine.begin() as conn:
            _write_batch(conn, batch, costs=self.cost_records != "off")
        if file is not None and expected is not None and _identity(file) != expected:
            # committed into a file that is no longer the database: write it again
            self._reopen(f"file {file} was deleted or replaced during a write", repair=True)
            return False
        return True

    def close(self) -> None:
        """Dispose of the engine's connections (idempotent)."""
        with self._lock:
            engine, self._engine = self._engine, None
        if engine is not None:
            engine.dispose()


def _identity(path: Path) -> tuple[int, int] | None:
    """(device, inode) of the file at ``path``, or None when there is none."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _first_line(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None)
    return (str(orig if orig is not None else exc).strip().splitlines() or [type(exc).__name__])[0]


# --- statements -----------------------------------------------------------------------------

def _insert(conn: Connection, table: Table) -> Any:
    return (postgresql.insert(table) if conn.dialect.name == "postgresql" else sqlite.insert(table))


_SQL_CACHE: dict[tuple[str, str], tuple[str, tuple[tuple[str, str], ...]]] = {}


def _sqlite_sql(table: Table, mode: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    """Plain ``INSERT`` text for SQLite plus per-column value kinds (json/datetime/bool/plain)."""
    key = (table.name, mode)
    cached = _SQL_CACHE.get(key)
    if cached is None:
        cols = [c for c in table.columns if not (mode == "insert" and c.name == "id" and isinstance(c.type, Integer))]
        kinds = tuple((c.name, "json" if isinstance(c.type, JSON) else "dt" if isinstance(c.type, DateTime)
                       else "bool" if isinstance(c.type, Boolean) else "") for c in cols)
        sql = f"INSERT INTO {table.name} ({', '.join(c.name for c in cols)}) VALUES ({', '.join('?' * len(cols))})"
        if mode == "update":
            cols = [c for c in cols if c.name != "id"] + [table.c.id]
            kinds = kinds[1:] + kinds[:1]
            sql = f"UPDATE {table.name} SET {', '.join(f'{c.name} = ?' for c in cols[:-1])} WHERE id = ?"
        elif mode == "replace":
            sql += " ON CONFLICT (id) DO UPDATE SET " + ", ".join(
                f"{c.name} = excluded.{c.name}" for c in cols if c.name != "id")
        elif mode == "ignore":
            sql += " ON CONFLICT (id) DO NOTHING"
        cached = _SQL_CACHE[key] = (sql, kinds)
    return cached


_encode_json = compact_encoder(str, ensure_ascii=True)


def _sqlite_dt(value: datetime) -> str:
    # SQLAlchemy's own SQLite storage format, so reads come back naive
    return value.replace(tzinfo=None).isoformat(" ", "microseconds")


_CONVERTERS: dict[str, Any] = {"json": _encode_json, "dt": _sqlite_dt, "bool": int, "": None}


def _sqlite_params(rows: Iterable[Mapping[str, Any]], kinds: tuple[tuple[str, str], ...]) -> list[tuple[Any, ...]]:
    convs = [(name, _CONVERTERS[kind]) for name, kind in kinds]
    out = []
    for row in rows:
        get = row.get
        out.append(tuple([get(name) if conv is None or (v := get(name)) is None else conv(v)
                          for name, conv in convs]))
    return out


def _chunks(values: Sequence[Any], size: int = 500) -> Iterable[Sequence[Any]]:
    """``values`` in slices of ``size`` (SQLite allows at most 999 bound parameters in old builds)."""
    for start in range(0, len(values), size):
        yield values[start:start + size]


def _sqlite_existing_ids(conn: Connection, table: str, ids: Sequence[str]) -> set[str]:
    """Which of ``ids`` are stored, as plain driver SQL (no statement compilation per batch)."""
    existing: set[str] = set()
    for chunk in _chunks(ids):
        sql = f"SELECT id FROM {table} WHERE id IN ({', '.join('?' * len(chunk))})"
        existing.update(r[0] for r in conn.exec_driver_sql(sql, tuple(chunk)))
    return existing


def _sqlite_select(conn: Connection, table: Table, where: str, params: tuple[Any, ...]) -> list[dict[str, Any]]:
    """Rows of ``table`` as dicts decoded like SQLAlchemy would (JSON parsed, datetimes naive)."""
    cols = list(table.columns)
    sql = f"SELECT {', '.join(c.name for c in cols)} FROM {table.name} WHERE {where}"
    kinds = [("json" if isinstance(c.type, JSON) else "dt" if isinstance(c.type, DateTime)
              else "bool" if isinstance(c.type, Boolean) else "") for c in cols]
    names = [c.name for c in cols]
    out = []
    for raw in conn.exec_driver_sql(sql, params):
        row: dict[str, Any] = {}
        for name, kind, v in zip(names, kinds, raw, strict=True):
            if v is not None:
                if kind == "json":
                    v = decode_json(v)
                elif kind == "dt":
                    v = _naive(v)
                elif kind == "bool":
                    v = bool(v)
            row[name] = v
        out.append(row)
    return out


def _execute_rows(conn: Connection, table: Table, rows: Sequence[Mapping[str, Any]], mode: str) -> None:
    """Bulk insert (``mode``: insert/ignore/replace on id). SQLite skips SQLAlchemy's per-row processing."""
    if not rows:
        return
    if conn.dialect.name == "sqlite":
        if mode == "replace":
            # An upsert with DO UPDATE is ~3x slower than a plain insert in SQLite when
            # foreign keys are on, and most rows are new: insert those, update the rest.
            existing = _sqlite_existing_ids(conn, table.name, [r["id"] for r in rows])
            new = [r for r in rows if r["id"] not in existing]
            if new:
                # new rows first: an updated row may point at a parent that is new in this batch
                sql, kinds = _sqlite_sql(table, "ignore")
                conn.exec_driver_sql(sql, _sqlite_params(new, kinds))
            if existing:
                sql, kinds = _sqlite_sql(table, "update")
                conn.exec_driver_sql(sql, _sqlite_params([r for r in rows if r["id"] in existing], kinds))
            return
        sql, kinds = _sqlite_sql(table, mode)
        conn.exec_driver_sql(sql, _sqlite_params(rows, kinds))
        return
    if mode == "insert":
        conn.execute(table.insert(), list(rows))
    else:
        _upsert_core(conn, table, rows, replace=mode == "replace")


def _upsert(conn: Connection, table: Table, rows: Sequence[Mapping[str, Any]], *, replace: bool) -> None:
    _execute_rows(conn, table, rows, "replace" if replace else "ignore")


def _upsert_core(conn: Connection, table: Table, rows: Sequence[Mapping[str, Any]], *, replace: bool) -> None:
    ins = _insert(conn, table)
    if replace:
        stmt = ins.on_conflict_do_update(
            index_elements=["id"], set_={c.name: ins.excluded[c.name] for c in table.columns if c.name != "id"}
        )
    else:
        stmt = ins.on_conflict_do_nothing(index_elements=["id"])
    conn.execute(stmt, list(rows))


def parents_first(rows: Mapping[str, Mapping[str, Any]], parent_key: str) -> list[Mapping[str, Any]]:
    """``rows`` (by id) ordered so that a row whose parent is also in ``rows`` comes after it.

    The depth attribute cannot be trusted for this (it may be missing or wrong), and a
    child inserted before its parent fails the foreign key. Rows whose parent links form a
    cycle (damaged spans) keep all links but one: the row that closes the cycle loses its parent.
    """
    ordered: list[Mapping[str, Any]] = []
    placed: set[str] = set()
    for row_id, row in rows.items():
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
    conn.exec_driver_sql("SELECT pg_advisory_xact_lock(k) FROM unnest(%(keys)s::bigint[]) AS k", {"keys": keys})


def _write_batch(conn: Connection, batch: MappedBatch, *, costs: bool = True) -> None:
    _lock_runs(conn, batch)
    _write_sessions(conn, batch)
    _write_runs(conn, batch)
    _upsert(conn, T["dag_nodes"], list(batch.node_placeholders.values()), replace=False)
    _upsert(conn, T["dag_nodes"], parents_first(batch.nodes, "parent_node_id"), replace=True)
    _upsert(conn, T["execution_events"], list(batch.event_placeholders.values()), replace=False)
    _upsert(conn, T["execution_events"], parents_first(batch.events, "parent_event_id"), replace=True)
    runs_with_events = {e["run_id"] for e in batch.events.values()}
    if runs_with_events:
        _repair_foreign(conn, runs_with_events)
    _write_messages(conn, batch.messages)
    if batch.dag_runs or batch.rollup_runs:
        _write_derived(conn, sorted(batch.dag_runs | batch.rollup_runs), costs=costs)
    if conn.dialect.name == "postgresql":
        _touch_sessions(conn, batch)


def _write_sessions(conn: Connection, batch: MappedBatch) -> None:
    """Create missing session rows; extend the active range of existing ones.

    On PostgreSQL the range update runs last (``_touch_sessions``): it locks the session
    row until commit, and every writer of the session needs that row, so holding it for
    the whole transaction would make them wait for each other's entire batch.
    """
    if not batch.sessions:
        return
    if conn.dialect.name == "postgresql":
        stmt = _insert(conn, T["sessions"]).on_conflict_do_nothing(index_elements=["id"])
        conn.execute(stmt, [batch.sessions[k] for k in sorted(batch.sessions)])
        return
    _touch_sessions(conn, batch)


def _touch_sessions(conn: Connection, batch: MappedBatch) -> None:
    if not batch.sessions:
        return
    table = T["sessions"]
    ins = _insert(conn, table)
    stmt = ins.on_conflict_do_update(index_elements=["id"], set_={
        "created_at": case((ins.excluded.created_at < table.c.created_at, ins.excluded.created_at),
                           else_=table.c.created_at),
        "last_active_at": case((ins.excluded.last_active_at > table.c.last_active_at, ins.excluded.last_active_at),
                               else_=table.c.last_active_at),
    })
    conn.execute(stmt, [batch.sessions[k] for k in sorted(batch.sessions)])


def _insert_new(conn: Connection, table: Table, rows: Sequence[Mapping[str, Any]]) -> set[str]:
    """``INSERT ... ON CONFLICT (id) DO NOTHING RETURNING id``: the ids of ``rows`` this call
    created. Rows another writer created first are left alone, never a unique violation."""
    if not rows:
        return set()
    stmt = _insert(conn, table).on_conflict_do_nothing(index_elements=["id"]).returning(table.c.id)
    return set(conn.execute(stmt, list(rows)).scalars())


def _locked_select(conn: Connection, query: Any) -> Any:
    """``query`` taking row locks on PostgreSQL (SQLite's write transaction already excludes others)."""
    return query.with_for_update() if conn.dialect.name == "postgresql" else query


def _write_runs(conn: Connection, batch: MappedBatch) -> None:
    table = T["workflow_runs"]
    ids = sorted(batch.runs)
    created = _insert_new(conn, table, [batch.runs[run_id].row for run_id in ids])
    rest = [run_id for run_id in ids if run_id not in created]
    if not rest:
        return
    existing = {r.id: r for r in conn.execute(_locked_select(conn, select(
        table.c.id, table.c.meta, table.c.started_at).where(table.c.id.in_(rest))))}
    for run_id in rest:
        old, cand = existing.get(run_id), batch.runs[run_id]
        if old is None:
            continue  # deleted by someone else since the insert: nothing to compare with
        old_meta = decode_json(old.meta) or {}
        old_rank = RANK_BY_NAME.get(old_meta.get("otel_source"), 99)
        old_row = {"started_at": _naive(old.started_at), "meta": old_meta}
        if better_run(cand.rank, cand.row, old_rank, old_row):
            values = {k: v for k, v in cand.row.items() if k != "id"}
            conn.execute(update(table).where(table.c.id == run_id).values(**values))


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


def _repair_foreign(conn: Connection, run_ids: set[str]) -> None:
    """Attach spans from other instrumentations under their parent event once it is known."""
    ev = T["execution_events"]
    foreign = conn.execute(
        select(ev.c.id, ev.c.parent_event_id, ev.c.depth, ev.c.execution_order, ev.c.node_id, ev.c.meta).where(
            ev.c.event_type == FOREIGN_TYPE[0], ev.c.event_subtype == FOREIGN_TYPE[1], ev.c.run_id.in_(run_ids))
    ).all()
    if not foreign:
        return
    candidates: dict[str, str | None] = {}
    for row in foreign:
        candidates[row.id] = _parent_event_id(decode_json(row.meta))
    wanted = {c for c in candidates.values() if c}
    known: dict[str, tuple[int, int, str | None]] = {}
    if wanted:
        for r in conn.execute(select(ev.c.id, ev.c.depth, ev.c.execution_order, ev.c.node_id, ev.c.event_subtype,
                                     ev.c.event_type).where(ev.c.id.in_(wanted))):
            if r.event_subtype == PLACEHOLDER_SUBTYPE:
                continue
            if (r.event_type, r.event_subtype) != FOREIGN_TYPE:
                known[r.id] = (r.depth, r.execution_order, r.node_id)
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
        info = resolve(parent, seen) if parent else None
        result = (None, 0, 0, None, None) if info is None else (parent, info[0] + 1, *info[1:])
        resolved[event_id] = result
        return result

    updates = []
    for row in foreign:
        parent, depth, order, node, _ = want(row.id, frozenset({row.id}))
        if (row.parent_event_id, row.depth, row.execution_order, row.node_id) != (parent, depth, order, node):
            updates.append({"b_id": row.id, "p": parent, "d": depth, "o": order, "n": node})
    if updates:
        conn.execute(update(ev).where(ev.c.id == bindparam("b_id")).values(
            parent_event_id=bindparam("p"), depth=bindparam("d"), execution_order=bindparam("o"),
            node_id=bindparam("n")), updates)
    # A cmbagent event under a foreign span counts its depth without that span (the
    # instrumentation cannot see it): hang it under its nearest cmbagent ancestor instead.
    own_children = conn.execute(select(ev.c.id, ev.c.parent_event_id).where(
        ev.c.parent_event_id.in_(list(candidates)),
        ~((ev.c.event_type == FOREIGN_TYPE[0]) & (ev.c.event_subtype == FOREIGN_TYPE[1])))).all()
    moves = []
    for child in own_children:
        target = resolved[child.parent_event_id][4]  # never the foreign parent itself
        if target is not None:
            moves.append({"b_id": child.id, "p": target})
    if moves:
        conn.execute(update(ev).where(ev.c.id == bindparam("b_id")).values(parent_event_id=bindparam("p")), moves)


def _write_messages(conn: Connection, messages: list[dict[str, Any]]) -> None:
    if not messages:
        return
    table = T["messages"]
    event_ids = {m["event_id"] for m in messages}
    stored = set(conn.execute(select(table.c.event_id).where(table.c.event_id.in_(event_ids))).scalars())
    seen: set[tuple[Any, ...]] = set()
    rows = []
    for m in messages:
        key = (m["event_id"], m["meta"]["direction"], m["meta"]["index"])
        if m["event_id"] in stored or key in seen:
            continue
        seen.add(key)
        rows.append(m)
    if rows:
        conn.execute(table.insert(), rows)


def _rows_of_runs(conn: Connection, table: Table, column: str, run_ids: Sequence[str]) -> list[dict[str, Any]]:
    """Rows of ``table`` whose ``column`` is one of ``run_ids``, as dicts (JSON values decoded)."""
    if conn.dialect.name == "sqlite":
        out: list[dict[str, Any]] = []
        for chunk in _chunks(run_ids):
            out.extend(_sqlite_select(conn, table, f"{column} IN ({', '.join('?' * len(chunk))})", tuple(chunk)))
        return out
    return [dict(r) for chunk in _chunks(run_ids)
            for r in conn.execute(select(table).where(table.c[column].in_(chunk))).mappings()]


def _count(value: Any) -> int:
    return value if type(value) is int else int(value) if isinstance(value, float) and math.isfinite(value) else 0


def _amount(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else 0.0


def _usage_of_runs(conn: Connection, run_ids: Sequence[str]) -> dict[str, list[LlmUsage]]:
    """The LLM events' usage of ``run_ids``: a few scalars per event, read out of ``meta`` by the database."""
    ev = T["execution_events"]
    meta = ev.c.meta
    query_cols = (ev.c.run_id, ev.c.node_id, ev.c.agent_name, meta["model"].as_string(),
                  meta["prompt_tokens"].as_integer(), meta["completion_tokens"].as_integer(),
                  meta["cost_usd"].as_float(), ev.c.completed_at, ev.c.timestamp)
    out: dict[str, list[LlmUsage]] = {run_id: [] for run_id in run_ids}
    sqlite_ = conn.dialect.name == "sqlite"
    for chunk in _chunks(run_ids):
        if sqlite_:  # plain driver SQL: no statement compilation per batch
            rows = conn.exec_driver_sql(
                "SELECT run_id, node_id, agent_name, json_extract(meta, '$.model'), "
                "json_extract(meta, '$.prompt_tokens'), json_extract(meta, '$.completion_tokens'), "
                "json_extract(meta, '$.cost_usd'), completed_at, timestamp FROM execution_events "
                f"WHERE event_type = ? AND event_subtype = ? AND run_id IN ({', '.join('?' * len(chunk))})",
                (*LLM_TYPE, *chunk))
        else:
            rows = conn.execute(select(*query_cols).where(
                ev.c.run_id.in_(chunk), ev.c.event_type == LLM_TYPE[0], ev.c.event_subtype == LLM_TYPE[1]))
        for run_id, node_id, agent, model, prompt, completion, cost, completed, stamp in rows:
            out[run_id].append(LlmUsage(node_id, agent, None if model is None else str(model), _count(prompt),
                                        _count(completion), _amount(cost), _naive(completed) or _naive(stamp)))
    return out


def _write_derived(conn: Connection, run_ids: Sequence[str], *, costs: bool = True) -> None:
    """Recompute and store the rows derived from each run's node set and LLM usage.

    One query per table for all runs of the batch.
    """
    runs, nodes_t, edges_t = T["workflow_runs"], T["dag_nodes"], T["dag_edges"]
    nodes_by_run: dict[str, list[dict[str, Any]]] = {run_id: [] for run_id in run_ids}
    for node in _rows_of_runs(conn, nodes_t, "run_id", run_ids):
        node["meta"] = decode_json(node["meta"]) or {}
        nodes_by_run[node["run_id"]].append(node)
    edges_by_run: dict[str, list[Any]] = {run_id: [] for run_id in run_ids}
    for chunk in _chunks(run_ids):
        query = (select(nodes_t.c.run_id, edges_t.c.id, edges_t.c.from_node_id, edges_t.c.to_node_id,
                        edges_t.c.dependency_type, edges_t.c.condition)
                 .join(nodes_t, nodes_t.c.id == edges_t.c.from_node_id).where(nodes_t.c.run_id.in_(chunk)))
        for e in conn.execute(query):
            edges_by_run[e.run_id].append(e)
    usage_by_run = _usage_of_runs(conn, run_ids)

    changed_nodes: list[dict[str, Any]] = []
    node_metas: list[tuple[dict[str, Any], str]] = []
    stale: list[str] = []
    drop: list[Any] = []
    missing: list[tuple[str, str, str, str | None]] = []
    steps: list[dict[str, Any]] = []
    child_runs: list[dict[str, Any]] = []
    branches: list[dict[str, Any]] = []
    wanted_costs: dict[str, list[dict[str, Any]]] = {}
    states: dict[str, dict[str, Any]] = {}
    for run_row in sorted(_rows_of_runs(conn, runs, "id", run_ids), key=lambda r: r["id"]):
        run = dict(run_row)
        run["meta"] = decode_json(run["meta"]) or {}
        run["started_at"], run["completed_at"] = _naive(run["started_at"]), _naive(run["completed_at"])
        nodes = nodes_by_run[run["id"]]
        derived = derive_run_rows(run, nodes, usage_by_run[run["id"]])
        stored_by_id = {n["id"]: n for n in nodes}
        # most batches leave a run's derived nodes as they are: rewrite only the changed ones
        changed_nodes.extend(d for d in derived.nodes if not _same_row(d, stored_by_id.get(d["id"])))
        derived_ids = {d["id"] for d in derived.nodes}
        # a derived node wins over a real node whose damaged short id took its id
        node_metas.extend((n["meta"], n["id"]) for n in derived.node_updates if n["id"] not in derived_ids)
        stale.extend(n["id"] for n in nodes if n["meta"].get("derived") and n["id"] not in derived_ids)
        kept: set[tuple[str, str, str, str | None]] = set()
        for e in edges_by_run[run["id"]]:
            key = (e.from_node_id, e.to_node_id, e.dependency_type, e.condition)
            if key in derived.edges and key not in kept:
                kept.add(key)
            else:
                drop.append(e.id)
        missing.extend(sorted(derived.edges - kept, key=lambda k: (k[0], k[1], k[2], k[3] or "")))
        steps.extend(derived.steps)
        child_runs.extend(derived.child_runs)
        branches.extend(derived.branches)
        wanted_costs[run["id"]] = derived.costs
        state = derived.session_state
        if state is not None and (
            state["id"] not in states or _state_key(state) >= _state_key(states[state["id"]])
        ):
            states[state["id"]] = state

    _upsert(conn, nodes_t, parents_first({n["id"]: n for n in changed_nodes}, "parent_node_id"), replace=True)
    if node_metas:
        # usage totals change only meta: an UPDATE of that column alone leaves the indexes alone
        if conn.dialect.name == "sqlite":
            conn.exec_driver_sql("UPDATE dag_nodes SET meta = ? WHERE id = ?",
                                 [(_encode_json(meta), node_id) for meta, node_id in node_metas])
        else:
            conn.execute(update(nodes_t).where(nodes_t.c.id == bindparam("b_id")).values(meta=bindparam("b_meta")),
                         [{"b_id": node_id, "b_meta": meta} for meta, node_id in node_metas])
    for chunk in _chunks(stale):
        conn.execute(delete(nodes_t).where(nodes_t.c.id.in_(chunk)))
    for chunk in _chunks(drop):
        conn.execute(delete(edges_t).where(edges_t.c.id.in_(chunk)))
    if missing:
        conn.execute(edges_t.insert(), [
            {"from_node_id": f, "to_node_id": t, "dependency_type": d, "condition": c} for f, t, d, c in missing])
    _upsert(conn, T["workflow_steps"], steps, replace=True)
    _upsert(conn, runs, child_runs, replace=True)
    _upsert(conn, T["branches"], branches, replace=True)
    _name_code_events(conn, run_ids)
    if costs:
        _write_cost_records(conn, wanted_costs)
    for _, state in sorted(states.items()):
        _write_session_state(conn, state)


def _name_code_events(conn: Connection, run_ids: Sequence[str]) -> None:
    """A code execution without an agent name takes its DAG node's agent (the agent turn running it)."""
    ev, nodes_t = T["execution_events"], T["dag_nodes"]
    owner = (nodes_t.c.id == ev.c.node_id) & nodes_t.c.node_type.in_((sc.NODE_SUB_AGENT, sc.NODE_AGENT)) & \
        nodes_t.c.agent.is_not(None) & (nodes_t.c.agent != "unknown")
    for chunk in _chunks(run_ids):
        conn.execute(update(ev).where(
            ev.c.run_id.in_(chunk), ev.c.event_type == "code_exec", ev.c.agent_name.is_(None),
            ev.c.node_id.is_not(None), exists(select(nodes_t.c.id).where(owner)),
        ).values(agent_name=select(nodes_t.c.agent).where(owner).scalar_subquery()))


def _cost_key(row: Mapping[str, Any]) -> tuple[Any, ...]:
    return (row["run_id"], row["step_id"], row["session_id"], row["model"], row["agent_name"], row["parent_run_id"],
            int(row["prompt_tokens"]), int(row["completion_tokens"]), int(row["total_tokens"]),
            f"{float(row['cost_usd']):.6f}", _naive(row["timestamp"]))


def _write_cost_records(conn: Connection, wanted: Mapping[str, list[dict[str, Any]]]) -> None:
    """Make each run's ``cost_records`` exactly ``wanted`` (autoincrement ids: diff, then delete/insert)."""
    if not wanted:
        return
    table = T["cost_records"]
    remaining = Counter(_cost_key(row) for rows in wanted.values() for row in rows)
    drop = []
    for row in _rows_of_runs(conn, table, "run_id", list(wanted)):
        key = _cost_key(row)
        if remaining[key] > 0:
            remaining[key] -= 1
        else:
            drop.append(row["id"])
    for chunk in _chunks(drop):
        conn.execute(delete(table).where(table.c.id.in_(chunk)))
    inserts = []
    for rows in wanted.values():
        for row in rows:
            key = _cost_key(row)
            if remaining[key] > 0:
                remaining[key] -= 1
                inserts.append(row)
    _execute_rows(conn, table, inserts, "insert")


def _same_row(row: Mapping[str, Any], stored: Mapping[str, Any] | None) -> bool:
    """Whether ``stored`` (decoded from the DB) already holds ``row``'s values; unsure means no."""
    if stored is None:
        return False
    for key, value in row.items():
        old = stored.get(key)
        if key == "meta":
            old = decode_json(old)
            value = json.loads(_encode_json(value)) if value is not None else None
        if old != value:
            return False
    return True


def _state_key(row: Mapping[str, Any]) -> tuple[datetime, str]:
    """Which session state is the latest: by update time, then run id (any order of arrival)."""
    context = row.get("context_variables")
    run_id = context.get("run_id", "") if isinstance(context, dict) else ""
    return (_naive(row.get("updated_at")) or datetime.min, str(run_id))


def _write_session_state(conn: Connection, row: dict[str, Any]) -> None:
    table = T["session_states"]
    if _insert_new(conn, table, [row]):
        return
    old = conn.execute(_locked_select(conn, select(table.c.updated_at, table.c.context_variables).where(
        table.c.id == row["id"]))).first()
    if old is None:
        return
    old_key = _state_key({"updated_at": old.updated_at, "context_variables": decode_json(old.context_variables)})
    if _state_key(row) >= old_key:
        values = {k: v for k, v in row.items() if k != "id"}
        conn.execute(update(table).where(table.c.id == row["id"]).values(**values))


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
