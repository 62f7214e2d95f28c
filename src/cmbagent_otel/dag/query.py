"""The read side of the DAG database: runs, a run's DAG and its events, as plain JSON-ready dicts.

Separate from the writer: it only selects, opens SQLite files read-only and never creates
a file, a folder or a table. Where there is nothing to read (no database file, no tracking
tables, no runs) it raises :class:`NothingThere`; an unknown or ambiguous run or node
raises :class:`NotFound`. Rows of older versions (a dict in ``meta.tokens``, no usage
totals on nodes) and of other writers (cmbagent's own) are read too.
"""

from __future__ import annotations

import math
import sqlite3
from collections.abc import Iterable, Iterator, Mapping
from datetime import timedelta
from typing import Any
from urllib.parse import quote

from sqlalchemy import (
    Connection,
    DateTime,
    Engine,
    String,
    Text,
    cast,
    create_engine,
    exists,
    func,
    inspect,
    literal,
    or_,
    select,
    type_coerce,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.pool import NullPool

from .._jsontext import loads
from .database import VERSION_TABLE, redacted, resolve_url, sqlite_file
from .schema import metadata

__all__ = ["DagReader", "NotFound", "NothingThere", "ReadError", "meta_tokens"]

RUNS = metadata.tables["workflow_runs"]
NODES = metadata.tables["dag_nodes"]
EDGES = metadata.tables["dag_edges"]
EVENTS = metadata.tables["execution_events"]
COSTS = metadata.tables["cost_records"]
_INF = float("inf")


# Milliseconds a PostgreSQL read waits for a table lock (lock_timeout) before it fails. Readers only
# conflict with ACCESS EXCLUSIVE locks (a `cmbagent-otel db upgrade`'s ALTER TABLE, TRUNCATE, VACUUM
# FULL), held until that session commits: without a bound `runs`, `dag` and `events` waited for it
# in silence, for as long as an upgrade or a session left idle in its transaction lasted.
READ_LOCK_WAIT_MS = 10_000
_PG_LOCK_TIMEOUT = "55P03"


class ReadError(Exception):
    """Reading the database failed (it cannot be opened, or a query failed)."""


class NothingThere(ReadError):
    """No database, no tracking tables or no runs where the reader looked."""


class NotFound(ReadError):
    """An unknown or ambiguous run or node reference."""


def decode(value: Any) -> Any:
    """A JSON column's value: drivers return text (SQLite) or objects (PostgreSQL); bad text is ``None``."""
    if isinstance(value, (str, bytes)):
        try:
            return loads(value)
        except ValueError:  # RecursionError too: loads() refuses a document nested too deep
            return None
    return value


def meta_tokens(meta: Any) -> int:
    """Total tokens in an event's or node's ``meta`` (an int; rows from older versions held a dict)."""
    tokens = meta.get("tokens") if isinstance(meta, dict) else None
    if isinstance(tokens, dict):
        tokens = tokens.get("total")
    if isinstance(tokens, bool) or not isinstance(tokens, (int, float)):
        return 0
    # another writer's JSON may hold NaN or Infinity: int() of them raised (a traceback in the CLI)
    return int(tokens) if type(tokens) is int or math.isfinite(tokens) else 0


def _meta_cost(meta: Any) -> float:
    cost = meta.get("cost_usd") if isinstance(meta, dict) else None
    return float(cost) if isinstance(cost, (int, float)) and not isinstance(cost, bool) and math.isfinite(cost) \
        else 0.0


def _iso(value: Any) -> str | None:
    return str(value) if value is not None else None


_MICROSECOND = timedelta(microseconds=1)


def _duration_ms(start: Any, end: Any) -> float | None:
    # whole microseconds, then one division: total_seconds() * 1000 printed 1.000001 s as 1000.0009999999999
    try:
        return (end - start) // _MICROSECOND / 1000 if start is not None and end is not None else None
    except TypeError:  # text timestamps of another writer
        return None


def _usd(cost: float) -> float:
    """A sum of costs without its float noise (0.1 + 0.2 is 0.30000000000000004): 12 significant digits,
    where the rounding of a sum of thousands of terms stays below the 14th."""
    return float(f"{cost:.12g}") if math.isfinite(cost) else cost


def _raw(column: Any) -> Any:
    # JSON columns read as stored: a row another writer filled with invalid JSON must not fail the
    # query. A cast in SQL, not only a type for the result: psycopg parses a PostgreSQL json value
    # itself, and one nested past json.loads' depth (PostgreSQL stores 3,000 levels) raised there
    return cast(column, Text).label(column.name)


def _select_runs() -> Any:
    # every column, the JSON one read as stored: another writer's invalid JSON in `meta` made the
    # run unreadable (the driver's json.loads raised while the row was fetched)
    return select(*(_raw(c) if c.name == "meta" else c for c in RUNS.c))


def _run_row(row: Mapping[str, Any]) -> dict[str, Any]:
    run = dict(row)
    run["meta"] = decode(run["meta"])
    return run


def _read_only(uri: str) -> sqlite3.Connection:
    conn = sqlite3.connect(uri, uri=True, timeout=5, check_same_thread=False)
    # SQLite stores whatever bytes another writer gave it: one row that is not UTF-8 must not
    # make every run unreadable ("Could not decode to UTF-8 column"); shown with U+FFFD instead
    conn.text_factory = _text
    return conn


def _why(exc: SQLAlchemyError) -> str:
    """What the driver said, and for a lock waited for past :data:`READ_LOCK_WAIT_MS` whose it may be."""
    error = getattr(exc, "orig", None) or exc
    if getattr(error, "sqlstate", None) == _PG_LOCK_TIMEOUT:
        return (f"a table stayed locked by another session for {READ_LOCK_WAIT_MS / 1000:g} s (a `cmbagent-otel "
                f"db upgrade` or another schema change running?); try again when it is done ({error})")
    return str(error)


def _text(data: bytes) -> str:
    return data.decode("utf-8", "replace")


class DagReader:
    """Read-only access to one DAG database (``url`` resolved like the writer's: argument >
    ``CMBAGENT_OTEL_DATABASE_URL`` > ``CMBAGENT_DATABASE_URL`` > the default SQLite file).

    Use as a context manager; every method runs in one read-only connection and one snapshot (a
    read transaction: PostgreSQL ``REPEATABLE READ``, SQLite ``BEGIN``), so what a block reads is
    the database at one moment, whatever writers commit meanwhile. Raises
    :class:`~cmbagent_otel.dag.database.BadDatabaseURL` for an invalid URL and
    :class:`NothingThere` when the SQLite file does not exist (it is never created).
    """

    def __init__(self, url: str | None = None) -> None:
        self.url = resolve_url(url)
        self.where = redacted(self.url)
        self._engine = self._open_engine()
        self._conn: Connection | None = None
        self._node_columns: set[str] = set()
        #: values another writer stored that the reader shows as stored (a DATETIME that is no date)
        self.odd_values: list[str] = []

    def _open_engine(self) -> Engine:
        path = sqlite_file(self.url)
        if make_url(self.url).get_backend_name() == "sqlite":
            if path is None:  # in-memory: nothing can have been recorded there
                raise NothingThere(f"{self.where} is an in-memory database: nothing is stored there")
            path = path.absolute()
            if not path.is_file():
                raise NothingThere(f"no database at {path} (nothing has been recorded there yet)")
            uri = f"file:{quote(str(path))}?mode=ro"
            return create_engine("sqlite://", poolclass=NullPool, creator=lambda: _read_only(uri))
        return create_engine(self.url, poolclass=NullPool, connect_args={"connect_timeout": 10})

    # --- connection -----------------------------------------------------------------------
    def __enter__(self) -> DagReader:
        try:
            conn = self._conn = self._engine.connect()  # held at once: closed by close() on any failure
            # one snapshot for everything read inside the block: a run is read in several statements,
            # and a batch committed between two of them showed nodes from before it and edges from after
            if conn.dialect.name == "postgresql":
                conn = self._conn = conn.execution_options(isolation_level="REPEATABLE READ",
                                                           postgresql_readonly=True)
                # local to the block's one transaction; the URL's own options stay as given
                conn.exec_driver_sql("SELECT set_config('lock_timeout', %(w)s, true)",
                                     {"w": str(READ_LOCK_WAIT_MS)})
            else:
                conn.exec_driver_sql("BEGIN")  # deferred: a read transaction (WAL: never blocks a writer)
            inspector = inspect(conn)
            has_runs = inspector.has_table("workflow_runs")
            # cmbagent's own databases (before our revision 0002) have no parent_node_id or depth
            self._node_columns = {c["name"] for c in inspector.get_columns("dag_nodes")} \
                if inspector.has_table("dag_nodes") else set()
        except SQLAlchemyError as exc:
            self.close()
            raise ReadError(f"cannot open database {self.where}: {_why(exc)}") from None
        except BaseException:  # a Ctrl-C as a call returned: the block is not entered, its exit never runs
            self.close()  # (kept, the open read transaction held a snapshot and the tables' shared locks)
            raise
        if not has_runs:
            self.close()
            raise NothingThere(f"no tracking tables in {self.where} (nothing has been recorded there yet; "
                               "`cmbagent-otel db upgrade` creates them)")
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection and the engine (idempotent)."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
        self._engine.dispose()

    @property
    def conn(self) -> Connection:
        if self._conn is None:
            raise RuntimeError("DagReader used outside its with block")
        return self._conn

    def _rows(self, statement: Any) -> list[Mapping[str, Any]]:
        try:
            return list(self.conn.execute(statement).mappings())
        except SQLAlchemyError as exc:
            raise ReadError(f"cannot read {self.where}: {_why(exc)}") from None
        except (ValueError, TypeError, OverflowError) as exc:
            # SQLite keeps any value in any column: another writer's `not a date` in a DATETIME
            # column fails the driver's conversion while rows are fetched (it was a traceback,
            # then an error for the whole list): read the timestamps as stored and convert each
            rows = self._rows_with_stored_times(statement)
            if rows is None:
                raise ReadError(f"cannot read {self.where}: a stored value has the wrong type: {exc}") from None
            return rows

    def _rows_with_stored_times(self, statement: Any) -> list[Mapping[str, Any]] | None:
        """``statement``'s rows with its DATETIME columns converted one value at a time: a value
        that is no date stays as stored (text) and is listed in :attr:`odd_values`. ``None``
        when that does not help (not SQLite, no such column, or another value is to blame)."""
        if self.conn.dialect.name != "sqlite" or not hasattr(statement, "selected_columns"):
            return None
        columns = list(statement.selected_columns)
        times = {c.key for c in columns if isinstance(c.type, DateTime)}
        if not times:
            return None
        convert = DateTime().dialect_impl(self.conn.dialect).result_processor(self.conn.dialect, None)
        raw = statement.with_only_columns(
            *(type_coerce(c, String).label(c.key) if c.key in times else c for c in columns),
            maintain_column_froms=True)
        try:
            fetched = list(self.conn.execute(raw).mappings())
        except (SQLAlchemyError, ValueError, TypeError, OverflowError):
            return None
        table = {c.key: getattr(getattr(c, "table", None), "name", None) for c in columns if c.key in times}
        rows: list[Mapping[str, Any]] = []
        for row in fetched:
            values = dict(row)
            for key in times:
                value = values[key]
                if value is None or convert is None:
                    continue
                try:
                    values[key] = convert(value)
                except (ValueError, TypeError, OverflowError):
                    where = f"{table[key]}.{key}" if table[key] else key
                    owner = f" of {values['id']}" if "id" in values else ""
                    self.odd_values.append(f"{where}{owner} is no date: {str(value)[:64]!r} (shown as stored)")
            rows.append(values)
        return rows

    # --- schema revision --------------------------------------------------------------------
    @staticmethod
    def revision(url: str | None = None) -> str | None:
        """The schema revision recorded by ``cmbagent-otel db upgrade`` (``None``: never migrated);
        raises :class:`NothingThere` when the SQLite file does not exist."""
        from alembic.runtime.migration import MigrationContext

        reader = DagReader(url)
        try:
            with reader._engine.connect() as conn:
                return MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE}).get_current_revision()
        except SQLAlchemyError as exc:
            raise ReadError(f"cannot open database {reader.where}: {_why(exc)}") from None
        finally:
            reader.close()

    # --- runs ---------------------------------------------------------------------------------
    def runs(self, limit: int | None = 50, *, include_empty_branches: bool = False) -> tuple[list[dict[str, Any]], int]:
        """Runs, newest first, and how many empty branch runs were left out.

        A redo's branch run (``is_branch``) holds no nodes or events of its own when the
        redo ran inside its parent's trace (the DAG shows it there): such runs are left out
        unless ``include_empty_branches``.
        """
        has_content = or_(exists().where(NODES.c.run_id == RUNS.c.id), exists().where(EVENTS.c.run_id == RUNS.c.id))
        shown = RUNS.c.is_branch.is_(False) | has_content
        query = select(RUNS.c.id, RUNS.c.mode, RUNS.c.status, RUNS.c.is_branch, RUNS.c.started_at,
                       RUNS.c.completed_at)
        if not include_empty_branches:
            query = query.where(shown)
        rows = self._rows(query.order_by(RUNS.c.started_at.desc().nulls_last(), RUNS.c.id).limit(limit))
        # through _rows, as every read: a session lost here was a traceback, not the commands' error line
        hidden = 0 if include_empty_branches else int(self._rows(
            select(func.count().label("n")).select_from(RUNS).where(~shown))[0]["n"] or 0)
        ids = [r["id"] for r in rows]
        n_nodes = self._count(NODES.c.run_id, ids)
        n_events = self._count(EVENTS.c.run_id, ids)
        cost = {r["run_id"]: _usd(float(r["cost"] or 0)) for r in self._rows(
            select(COSTS.c.run_id, func.sum(COSTS.c.cost_usd).label("cost")).where(COSTS.c.run_id.in_(ids))
            .group_by(COSTS.c.run_id))}
        return [{
            "id": r["id"], "mode": r["mode"], "status": r["status"], "is_branch": bool(r["is_branch"]),
            "started": _iso(r["started_at"]), "duration_ms": _duration_ms(r["started_at"], r["completed_at"]),
            "nodes": n_nodes.get(r["id"], 0), "events": n_events.get(r["id"], 0), "cost_usd": cost.get(r["id"], 0.0),
        } for r in rows], hidden

    def _count(self, column: Any, ids: list[str]) -> dict[str, int]:
        if not ids:
            return {}
        return {r["key"]: int(r["n"]) for r in self._rows(
            select(column.label("key"), func.count().label("n")).where(column.in_(ids)).group_by(column))}

    def run(self, ref: str) -> dict[str, Any]:
        """The run row for ``ref``: a full id, a unique id prefix, or ``latest`` (newest non-branch run)."""
        if ref == "latest":
            rows = self._rows(_select_runs().where(RUNS.c.is_branch.is_(False)).order_by(
                RUNS.c.started_at.desc().nulls_last(), RUNS.c.id).limit(1))
            if not rows:
                raise NothingThere(f"no runs in {self.where}")
            return _run_row(rows[0])
        rows = self._rows(_select_runs().where(RUNS.c.id == ref))
        if rows:
            return _run_row(rows[0])
        matches = self._rows(_select_runs().where(RUNS.c.id.startswith(ref, autoescape=True)).limit(3))
        if not matches:
            raise NotFound(f"unknown run {ref!r} in {self.where}")
        if len(matches) > 1:
            raise NotFound(f"run prefix {ref!r} is ambiguous: {', '.join(m['id'] for m in matches)}...")
        return _run_row(matches[0])

    # --- a run's DAG ------------------------------------------------------------------------
    def _nodes(self, run_id: str) -> list[dict[str, Any]]:
        nodes = []
        optional = [NODES.c[name] if name in self._node_columns else literal(None).label(name)
                    for name in ("parent_node_id", "depth")]
        for r in self._rows(select(NODES.c.id, NODES.c.node_type, NODES.c.agent, NODES.c.status,
                                   NODES.c.order_index, _raw(NODES.c.meta), *optional)
                            .where(NODES.c.run_id == run_id).order_by(NODES.c.id)):
            meta = decode(r["meta"])
            meta = meta if isinstance(meta, dict) else {}
            nodes.append({
                "db_id": r["id"], "id": str(meta.get("id") or r["id"]), "parent_db_id": r["parent_node_id"],
                "type": r["node_type"], "agent": r["agent"], "status": r["status"],
                "order_index": r["order_index"], "depth": r["depth"] or 0, "label": meta.get("label"),
                "duration_ms": meta.get("duration_ms"), "execution_order": meta.get("execution_order") or 0,
                "error": meta.get("error") if r["status"] == "failed" else None,
                "tokens": meta_tokens(meta), "cost_usd": _meta_cost(meta), "_meta": meta,
            })
        _unique_ids(run_id, nodes)
        return nodes

    def dag(self, run: Mapping[str, Any]) -> dict[str, Any]:
        """Nodes (their own event count, their subtree's tokens and cost, a failed node's
        ``error``), edges (by short id) and the run's totals, JSON-ready. Nodes come in
        display order: parents before children, siblings in the order they ran."""
        run_id = run["id"]
        nodes = self._nodes(run_id)
        by_db = {n["db_id"]: n for n in nodes}
        counts = {r["node_id"]: int(r["n"]) for r in self._rows(
            select(EVENTS.c.node_id, func.count().label("n")).where(EVENTS.c.run_id == run_id)
            .group_by(EVENTS.c.node_id))}
        legacy = any("tokens" not in n.pop("_meta") for n in nodes)
        # Node meta holds subtree totals; events outside any node (a plain program's calls before
        # its first conversation node, or another writer's rows) count for the run only. Rows of
        # older versions carry no node totals: their nodes show their own events' sums.
        outside = {"events": counts.get(None, 0), "tokens": 0, "cost_usd": 0.0}
        wanted = EVENTS.c.run_id == run_id
        if not legacy:
            wanted = wanted & EVENTS.c.node_id.is_(None)
        for r in self._rows(select(EVENTS.c.node_id, _raw(EVENTS.c.meta)).where(wanted)):
            meta = decode(r["meta"])
            target = by_db.get(r["node_id"]) if legacy else None
            if target is None and r["node_id"] is None:
                target = outside
            if target is not None:
                target["tokens"] += meta_tokens(meta)
                target["cost_usd"] += _meta_cost(meta)
        for n in nodes:
            n["events"] = counts.get(n["db_id"], 0)
            parent = by_db.get(n.pop("parent_db_id"))
            n["parent"] = parent["id"] if parent is not None else None
            n["_parent_db"] = parent["db_id"] if parent is not None else None
        edges = []
        if by_db:
            for r in self._rows(select(EDGES.c.from_node_id, EDGES.c.to_node_id, EDGES.c.dependency_type,
                                       EDGES.c.condition).where(EDGES.c.from_node_id.in_(list(by_db)))):
                target = by_db.get(r["to_node_id"])
                edges.append({"source": by_db[r["from_node_id"]]["id"],
                              "target": target["id"] if target is not None else r["to_node_id"],
                              "type": r["dependency_type"], "condition": r["condition"]})
        edges.sort(key=lambda e: (e["source"], e["target"]))
        self._fill_errors(run_id, nodes)
        nodes = _display_order(nodes, edges)
        roots = [n for n in nodes if n["parent"] is None]
        summed = nodes if legacy else roots
        for n in nodes:
            del n["_parent_db"]
            n["cost_usd"] = _usd(n["cost_usd"])  # a subtree's total: a sum, another writer's or ours
        return {
            "run": {"id": run_id, "mode": run["mode"], "status": run["status"],
                    "started_at": _iso(run["started_at"]), "completed_at": _iso(run["completed_at"]),
                    "duration_ms": _duration_ms(run["started_at"], run["completed_at"]),
                    "task": run["task_description"], "is_branch": bool(run["is_branch"]),
                    "tokens": outside["tokens"] + sum(n["tokens"] for n in summed),
                    "cost_usd": _usd(outside["cost_usd"] + sum(n["cost_usd"] for n in summed)),
                    "events_outside_nodes": outside["events"]},
            "nodes": nodes, "edges": edges,
        }

    def _fill_errors(self, run_id: str, nodes: list[dict[str, Any]]) -> None:
        """A failed node without a reason of its own gets its first failed event's error
        (its own events first, then its subtree's)."""
        missing = [n for n in nodes if n["status"] == "failed" and not n["error"]]
        if not missing:
            return
        first: dict[str | None, str] = {}
        for r in self._rows(select(EVENTS.c.node_id, EVENTS.c.error_message).where(
                EVENTS.c.run_id == run_id, EVENTS.c.error_message.is_not(None))
                .order_by(EVENTS.c.execution_order, EVENTS.c.id)):
            first.setdefault(r["node_id"], r["error_message"])
        children = _children(nodes)
        for n in missing:
            n["error"] = first.get(n["db_id"]) or next(
                (first[d["db_id"]] for d in _descendants(n["db_id"], children) if d["db_id"] in first), None)

    # --- events -------------------------------------------------------------------------------
    def events(self, run: Mapping[str, Any], node: str | None = None, *, recursive: bool = False
               ) -> list[dict[str, Any]]:
        """The run's events in execution order; ``node`` (a short id): only that node's,
        with ``recursive`` its descendants' too."""
        run_id = run["id"]
        nodes = self._nodes(run_id)
        shorts = {n["db_id"]: n["id"] for n in nodes}
        query = select(EVENTS.c.id, EVENTS.c.execution_order, EVENTS.c.depth, EVENTS.c.event_type,
                       EVENTS.c.event_subtype, EVENTS.c.agent_name, EVENTS.c.node_id, EVENTS.c.status,
                       EVENTS.c.duration_ms, EVENTS.c.parent_event_id, EVENTS.c.error_message, EVENTS.c.started_at,
                       _raw(EVENTS.c.meta)).where(EVENTS.c.run_id == run_id)
        if node is not None:
            found = [n for n in nodes if n["id"] == node]
            if not found:
                raise NotFound(f"run {run_id} has no node {node!r}")
            wanted = {found[0]["db_id"]}
            if recursive:
                wanted |= {d["db_id"] for d in _descendants(found[0]["db_id"], _children(nodes))}
            query = query.where(EVENTS.c.node_id.in_(sorted(wanted)))
        records = []
        for r in self._rows(query.order_by(EVENTS.c.execution_order, EVENTS.c.started_at, EVENTS.c.id)):
            meta = decode(r["meta"])
            meta = meta if isinstance(meta, dict) else {}
            records.append({
                "id": r["id"], "order": r["execution_order"], "depth": r["depth"], "type": r["event_type"],
                "subtype": r["event_subtype"], "agent": r["agent_name"], "node": shorts.get(r["node_id"]),
                "status": r["status"], "duration_ms": r["duration_ms"], "name": meta.get("span_name"),
                "tokens": meta_tokens(meta) if "tokens" in meta else None, "cost_usd": meta.get("cost_usd"),
                "parent": r["parent_event_id"], "error": r["error_message"],
            })
        return records


def _unique_ids(run_id: str, nodes: list[dict[str, Any]]) -> None:
    """Make the nodes' short ids (as shown) unique in their run: our writer derives a node's row id
    from its short id (one row per short id), but another writer may give two nodes the same one
    (or one another node's row id), and the views, edges and ``--node`` find nodes by it (the tree
    printed a node under itself for ever). A node whose row id is derived from its short id keeps
    it; another whose short id is taken is shown as its row id (then ``#2``, ``#3``...), in row id
    order."""
    if len({n["id"] for n in nodes}) == len(nodes):
        return
    from .mapping import node_db_id  # only here: the reader never needs the mapping otherwise

    taken: set[str] = set()
    own = [n["db_id"] == node_db_id(run_id, n["id"]) for n in nodes]
    for n, mine in zip(nodes, own, strict=True):
        if mine:
            taken.add(n["id"])
    for n, mine in zip(nodes, own, strict=True):
        if mine:
            continue
        if n["id"] in taken:
            shown, k = str(n["db_id"]), 1
            while shown in taken:
                k += 1
                shown = f"{n['db_id']}#{k}"
            n["id"] = shown
        taken.add(n["id"])


def _children(nodes: Iterable[dict[str, Any]]) -> dict[str | None, list[dict[str, Any]]]:
    out: dict[str | None, list[dict[str, Any]]] = {}
    for n in nodes:
        out.setdefault(n.get("_parent_db", n.get("parent_db_id")), []).append(n)
    return out


def _descendants(db_id: str, children: Mapping[str | None, list[dict[str, Any]]]) -> Iterator[dict[str, Any]]:
    seen = {db_id}
    stack = list(children.get(db_id, ()))
    while stack:
        n = stack.pop()
        if n["db_id"] in seen:  # a damaged parent cycle must not loop forever
            continue
        seen.add(n["db_id"])
        yield n
        stack.extend(children.get(n["db_id"], ()))


def _display_order(nodes: list[dict[str, Any]], edges: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Parents before children (depth first), siblings in the order they ran.

    A node's position is its span's execution order; a node the exporter derived (a
    branch point, cmbagent's ``init`` and ``terminator``) has none and stands just before
    the first node its edges lead to, or last. Rows without execution orders (other
    writers) keep order_index order.
    """
    by_id = {n["id"]: n for n in nodes}
    targets: dict[str, list[str]] = {}
    for e in edges:
        targets.setdefault(e["source"], []).append(e["target"])
    keys: dict[str, float] = {}

    def key(n: dict[str, Any], visiting: frozenset[str] = frozenset()) -> float:
        if n["id"] in keys:
            return keys[n["id"]]
        if n["execution_order"]:
            value = float(n["execution_order"])
        else:
            after = [key(by_id[t], visiting | {n["id"]}) for t in targets.get(n["id"], ())
                     if t in by_id and t not in visiting and t != n["id"]]
            value = min(after) - 0.5 if after and min(after) != _INF else _INF
        keys[n["id"]] = value
        return value

    timed = any(n["execution_order"] for n in nodes)
    children = _children(nodes)
    for siblings in children.values():
        try:
            siblings.sort(key=lambda n: ((key(n), n["order_index"]) if timed else (n["order_index"], 0), n["id"]))
        except RecursionError:  # a chain of derived nodes deeper than the recursion limit
            siblings.sort(key=lambda n: (n["order_index"], n["id"]))
    ordered: list[dict[str, Any]] = []
    seen: set[str] = set()
    stack = list(reversed(children.get(None, [])))
    while stack:  # depth first, without recursion: a deep tree must not hit the recursion limit
        n = stack.pop()
        if n["db_id"] in seen:
            continue
        seen.add(n["db_id"])
        ordered.append(n)
        stack.extend(reversed(children.get(n["db_id"], [])))
    ordered.extend(n for n in nodes if n["db_id"] not in seen)  # nodes whose parent chain is a cycle
    return ordered
