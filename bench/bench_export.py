"""DAG export CPU into a file SQLite DB: DagSpanExporter vs the realistic SQLite floor.

* **ours**: ``DagSpanExporter(url).export(batch)`` end to end (span -> row mapping,
  scrubbing, placeholders, upserts, derived rows), one transaction per batch.
* **floor**: the same batches, the same final rows, written by plain ``sqlite3`` with
  every decision taken *outside* the timer: per batch, ``executemany`` of plain
  ``INSERT`` for rows that are new and ``UPDATE ... WHERE id = ?`` for rows an earlier
  batch wrote (a placeholder replaced by its span, a better run row, a session whose time
  range grew), as ours' split path does; then, in the batch that completes a run, the rows
  derived from its whole node set (edges, steps, branches, branch runs, derived nodes,
  usage totals, cost records, code events' agents, session state) inserted once, or
  updated where an earlier batch wrote the row before it was final; a row the completing
  batch writes itself goes in once, with its final values. Same schema (Alembic migrations), same
  pragmas (WAL, ``synchronous=NORMAL``, ``foreign_keys=ON``), one transaction per batch.
  The final rows come from an untimed reference export by ours; both databases are
  compared at the end (``same rows``).

The figure is the CPU time of the exporting thread (``time.thread_time``: mapping, SQL and
SQLite's own work), median and IQR over repetitions; variants alternate in one process
(order rotating per repetition, fresh trace ids per repetition, id caches cleared before
each timed export). Ratio = floor CPU / ours CPU.

    python bench/bench_export.py                          # 10k and 50k spans, batches of 512, 5 reps
    python bench/bench_export.py --spans 10000 --batch 512 2048

A third line, ``mapping``, times what no writer of these rows can skip: mapping the spans
(scrubbing included) and encoding the node and event rows as parameters; floor / (floor +
mapping) is the best ratio ours could reach if all its writing cost no more than the floor's.
A fourth, ``writes``, is ours' transactions alone (the batches mapped before the timer): ours -
writes is the mapping as the export runs it, writes - floor what ours' writing costs beyond
the floor's.

Target: floor / ours >= 0.70 at 10k and 50k spans.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from _stats import median_iqr

HERE = Path(__file__).resolve().parent
TARGET_RATIO = 0.70
DEFAULT_TIMEOUT_S = 10.0  # the exporter's default deadline per batch (CMBAGENT_OTEL_EXPORT_TIMEOUT)
Statement = tuple[str, list[tuple[Any, ...]]]


def quiet_corpus(content: bool) -> list[Any]:
    """One recorded demo run; AG2's chat output goes nowhere."""
    sys.path.insert(0, str(HERE))
    import _corpus

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return _corpus.record_demo(capture_content=content)


def clear_id_caches() -> None:
    """Forget ids memoised by an earlier export of the same trace ids (each timed run starts cold)."""
    from cmbagent_otel.dag import mapping

    for name in ("run_id_of", "node_db_id"):
        cache_clear = getattr(getattr(mapping, name), "cache_clear", None)
        if cache_clear is not None:
            cache_clear()


def run_ours(batches: list[list[Any]], url: str) -> tuple[float, float]:
    """(wall s, thread CPU s) of exporting ``batches`` into a migrated, empty database."""
    from cmbagent_otel.exporters.dag import DagSpanExporter

    from cmbagent_otel.dag.database import ensure_schema

    ensure_schema(url)  # migrations are a one-off, not part of the throughput
    exporter = DagSpanExporter(url, spill=False)
    # its connection opened and configured before the timer, as the floor's is (the pool keeps it)
    exporter._get_writer().engine.connect().close()
    return timed_export(exporter, batches)


def timed_export(exporter: Any, batches: list[list[Any]]) -> tuple[float, float]:
    """(wall s, thread CPU s) of ``exporter`` exporting ``batches`` (id caches cleared first), then shut down."""
    from opentelemetry.sdk.trace.export import SpanExportResult

    clear_id_caches()
    start, cpu = time.perf_counter(), time.thread_time()
    for batch in batches:
        if exporter.export(batch) is not SpanExportResult.SUCCESS:
            raise SystemExit("DagSpanExporter reported FAILURE")
    elapsed, cpu = time.perf_counter() - start, time.thread_time() - cpu
    exporter.shutdown()
    return elapsed, cpu


def run_writes(batches: list[list[Any]], url: str) -> tuple[float, float]:
    """(wall s, thread CPU s) of ours' transactions alone: the batches mapped before the timer,
    then each written as ``export`` writes it. ``writes - floor`` is what ours' writing costs
    beyond the floor's (derived rows, the writer's Python, SQLAlchemy), ``ours - writes`` the
    mapping as the export runs it."""
    from cmbagent_otel.dag.database import ensure_schema
    from cmbagent_otel.dag.writer import DagWriter

    ensure_schema(url)
    writer = DagWriter(url)
    writer.engine.connect().close()  # opened and configured before the timer, as ours' and the floor's
    try:
        return timed_writes(writer, batches)
    finally:
        writer.close()


def timed_writes(writer: Any, batches: list[list[Any]]) -> tuple[float, float]:
    """(wall s, thread CPU s) of ``writer`` writing ``batches``, mapped (id caches cleared first)
    before the timer with the options its own ``write`` passes, each in its transaction under
    the export deadline's timeouts."""
    import inspect

    from cmbagent_otel.dag.database import deadline
    from cmbagent_otel.dag.mapping import map_spans

    clear_id_caches()
    # older code maps without the texts option (bench_ab and --server-src compare revisions)
    texts = getattr(writer, "_time_texts", None)
    options = {"texts": texts} if texts is not None and "texts" in inspect.signature(map_spans).parameters else {}
    mapped = [map_spans(batch, **options) for batch in batches]
    start, cpu = time.perf_counter(), time.thread_time()
    for batch in mapped:
        with deadline(DEFAULT_TIMEOUT_S):
            writer._attempt(batch)  # what DagWriter.write does after map_spans
    return time.perf_counter() - start, time.thread_time() - cpu


# --- the floor's plan, built outside the timer ------------------------------------------------

def _columns(conn: sqlite3.Connection, table: str) -> list[str]:
    return [row[1] for row in conn.execute(f"PRAGMA table_info({table})")]


def _decoded(value: Any) -> Any:
    if isinstance(value, str) and value[:1] in ("{", "["):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def _same(a: Sequence[Any], b: Sequence[Any]) -> bool:
    return len(a) == len(b) and all(x == y or _decoded(x) == _decoded(y) for x, y in zip(a, b, strict=True))


class FloorPlan:
    """Per batch, the statements a writer that knew everything in advance would run."""

    OWNER_SQL = {
        "sessions": None,
        "session_states": None,
        "workflow_runs": "SELECT COALESCE(b.parent_run_id, r.id), r.* FROM workflow_runs r "
                         "LEFT JOIN branches b ON b.child_run_id = r.id",
        "workflow_steps": "SELECT s.run_id, s.* FROM workflow_steps s",
        "dag_nodes": "SELECT n.run_id, n.* FROM dag_nodes n",
        "dag_edges": "SELECT n.run_id, e.* FROM dag_edges e JOIN dag_nodes n ON n.id = e.from_node_id",
        "execution_events": "SELECT e.run_id, e.* FROM execution_events e",
        "messages": "SELECT m.run_id, m.* FROM messages m",
        "cost_records": "SELECT c.run_id, c.* FROM cost_records c",
        "branches": "SELECT b.parent_run_id, b.* FROM branches b",
    }
    AUTOINCREMENT = ("dag_edges", "messages", "cost_records")

    def __init__(self, batches: list[list[Any]], reference: str) -> None:
        from cmbagent_otel.dag import schema
        from cmbagent_otel.dag.mapping import better_run, map_spans, run_id_of
        from cmbagent_otel.dag.writer import parents_first

        self.tables = schema.metadata.tables
        conn = sqlite3.connect(reference)
        try:
            self.columns = {name: _columns(conn, name) for name in schema.TRACKING_TABLES}
            final = self._final_rows(conn)
        finally:
            conn.close()
        last_batch: dict[str, int] = {}
        for index, batch in enumerate(batches):
            for span in batch:
                last_batch[run_id_of(span.context.trace_id)] = index
        written: dict[tuple[str, Any], tuple[Any, ...]] = {}
        runs: dict[str, tuple[int, dict[str, Any]]] = {}
        self.batches: list[list[Statement]] = []
        for index, batch in enumerate(batches):
            mapped = map_spans(batch)
            out: dict[tuple[str, str], list[tuple[Any, ...]]] = {}
            # where this batch's statements put each row: a row the batch writes and whose run it
            # completes is written once, with its final values (not inserted, then updated)
            slots: dict[tuple[str, Any], tuple[tuple[str, str], int]] = {}

            def put(table: str, rows: Iterable[dict[str, Any]], mode: str,
                    out: dict[tuple[str, str], list[tuple[Any, ...]]] = out,
                    slots: dict[tuple[str, Any], tuple[tuple[str, str], int]] = slots) -> None:
                for row in rows:
                    params = self._params(table, row)
                    key = (table, row["id"])
                    if key not in written:
                        target, value = (table, "insert"), params
                    elif mode == "replace" and not _same(written[key], params):
                        target, value = (table, "update"), params[1:] + params[:1]
                    else:
                        continue
                    statement = out.setdefault(target, [])
                    slots[key] = (target, len(statement))
                    statement.append(value)
                    written[key] = params

            for session in mapped.sessions.values():
                key = ("sessions", session["id"])
                row = dict(session)
                if key in written:
                    old = dict(zip(self.columns["sessions"], written[key], strict=True))
                    row["created_at"] = min(session["created_at"], _dt(old["created_at"]))
                    row["last_active_at"] = max(session["last_active_at"], _dt(old["last_active_at"]))
                put("sessions", [row], "replace")
            best = []
            for run_id, cand in mapped.runs.items():
                old_run = runs.get(run_id)
                if old_run is None or better_run(cand.rank, cand.row, *old_run):
                    runs[run_id] = (cand.rank, cand.row)
                    best.append(cand.row)
            put("workflow_runs", best, "replace")
            put("dag_nodes", mapped.node_placeholders.values(), "ignore")
            put("dag_nodes", parents_first(mapped.nodes, "parent_node_id"), "replace")
            put("execution_events", mapped.event_placeholders.values(), "ignore")
            put("execution_events", parents_first(mapped.events, "parent_event_id"), "replace")
            # the rows each run completed in this batch ends with (derived rows, usage totals...)
            completed = {run for run, last in last_batch.items() if last == index}
            last = index == len(batches) - 1
            for table in schema.TRACKING_TABLES:
                for owner, row_id, values in final[table]:
                    if not (owner in completed or (owner is None and last) or (owner not in last_batch and last)):
                        continue
                    key = (table, row_id)
                    if table in self.AUTOINCREMENT:
                        out.setdefault((table, "insert"), []).append(values)
                    elif key not in written:
                        out.setdefault((table, "insert"), []).append(values)
                        written[key] = values
                    elif not _same(written[key], values):
                        slot = slots.get(key)
                        if slot is not None:  # written by this batch: its statement takes the final values
                            target, at = slot
                            out[target][at] = values if target[1] == "insert" else values[1:] + values[:1]
                        else:
                            out.setdefault((table, "update"), []).append(values[1:] + values[:1])
                        written[key] = values
            statements: list[Statement] = []
            for table in schema.TRACKING_TABLES:
                for mode in ("insert", "update"):
                    params = out.get((table, mode))
                    if params:
                        statements.append((self._sql(table, mode), params))
            self.batches.append(statements)

    @staticmethod
    def _json(value: Any) -> str:
        from cmbagent_otel.dag.statements import encode_json

        return encode_json(value)  # ours' text, so both databases hold the same bytes

    def _params(self, table: str, row: dict[str, Any]) -> tuple[Any, ...]:
        """A mapped row as SQLite parameters (JSON text, SQLAlchemy's datetime text, 0/1)."""
        from sqlalchemy import JSON, Boolean, DateTime

        out = []
        for column in self.tables[table].columns:
            if column.name == "id" and table in self.AUTOINCREMENT:
                continue
            value = row.get(column.name)
            if value is not None:
                if isinstance(column.type, JSON):
                    value = self._json(value)
                elif isinstance(column.type, DateTime):
                    value = value.replace(tzinfo=None).isoformat(" ", "microseconds")
                elif isinstance(column.type, Boolean):
                    value = int(value)
            out.append(value)
        return tuple(out)

    def _final_rows(self, conn: sqlite3.Connection) -> dict[str, list[tuple[str | None, Any, tuple[Any, ...]]]]:
        """Every row of the reference export, as stored, with the run that owns it."""
        out: dict[str, list[tuple[str | None, Any, tuple[Any, ...]]]] = {}
        for table, query in self.OWNER_SQL.items():
            sql = query or f"SELECT NULL, t.* FROM {table} t"
            rows = []
            for owner, *values in conn.execute(sql):
                if table in self.AUTOINCREMENT:
                    rows.append((owner, None, tuple(values[1:])))
                else:
                    rows.append((owner, values[0], tuple(values)))
            out[table] = rows
        return out

    def _sql(self, table: str, mode: str) -> str:
        cols = self.columns[table]
        if table in self.AUTOINCREMENT:
            cols = cols[1:]
        if mode == "insert":
            return f"INSERT INTO {table} ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})"
        return f"UPDATE {table} SET {', '.join(f'{c} = ?' for c in cols[1:])} WHERE {cols[0]} = ?"


def _dt(value: Any) -> Any:
    from datetime import datetime

    return datetime.fromisoformat(value) if isinstance(value, str) else value


def run_floor(plan: FloorPlan, path: str) -> tuple[float, float]:
    from cmbagent_otel.dag.database import ensure_schema

    ensure_schema(f"sqlite:///{path}")
    conn = sqlite3.connect(path, isolation_level=None)
    for pragma in ("journal_mode=WAL", "synchronous=NORMAL", "cache_size=-8192", "foreign_keys=ON"):
        conn.execute(f"PRAGMA {pragma}")
    start, cpu = time.perf_counter(), time.thread_time()
    for statements in plan.batches:
        conn.execute("BEGIN IMMEDIATE")
        for sql, params in statements:
            conn.executemany(sql, params)
        conn.execute("COMMIT")
    elapsed, cpu = time.perf_counter() - start, time.thread_time() - cpu
    conn.close()
    return elapsed, cpu


def run_mapping(batches: list[list[Any]]) -> tuple[float, float]:
    """(wall s, thread CPU s) of ours' part that no writer of these rows can skip: mapping the
    spans (scrubbing included) and turning the node and event rows into SQL parameters
    (their JSON text above all), without touching a database."""
    from cmbagent_otel.dag.mapping import map_spans
    from cmbagent_otel.dag.schema import metadata

    try:
        from cmbagent_otel.dag.statements import Sql
    except ImportError:  # the writer before precompiled statements: no such layer to time
        return 0.0, 0.0
    sql = Sql("sqlite")
    tables = [(metadata.tables[name], sql.columns(metadata.tables[name])) for name in ("dag_nodes", "execution_events")]
    clear_id_caches()
    start, cpu = time.perf_counter(), time.thread_time()
    for batch in batches:
        mapped = map_spans(batch)
        for (_, cols), rows in zip(tables, (mapped.nodes, mapped.events), strict=True):
            sql.params(rows.values(), cols)
    return time.perf_counter() - start, time.thread_time() - cpu


def same_rows(a: str, b: str) -> list[str]:
    """Tables whose rows differ between two SQLite files (values compared, autoincrement ids left out)."""
    from sqlalchemy import create_engine

    from cmbagent_otel.dag.writer import dump_tables

    dumps = []
    for path in (a, b):
        engine = create_engine(f"sqlite:///{path}")
        with engine.connect() as conn:
            dumps.append(dump_tables(conn))
        engine.dispose()
    return [table for table in dumps[0] if dumps[0][table] != dumps[1][table]]


def summary(values: list[float], per: int) -> str:
    """Median and IQR in microseconds per span."""
    return median_iqr((v / per * 1e6 for v in values), width=7)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spans", type=int, nargs="+", default=[10_000, 50_000])
    parser.add_argument("--batch", type=int, nargs="+", default=[512],
                        help="spans per export (BatchSpanProcessor default 512); several sizes run interleaved")
    parser.add_argument("--repeat", type=int, default=5, help="interleaved repetitions; medians reported")
    parser.add_argument("--content", action="store_true", help="record the corpus with content capture on")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(HERE))
    import _corpus

    template = quiet_corpus(args.content)
    ok = True
    print(f"corpus: {len(template)} spans per demo run (cloned under fresh trace ids), content capture "
          f"{'on' if args.content else 'off'}; {args.repeat} interleaved repetitions; CPU of the exporting thread")
    with tempfile.TemporaryDirectory(prefix="cmbagent-otel-bench-") as tmp:
        # one untimed export first: imports, statement caches and the redaction memo are warm for every variant
        warm = list(_corpus.batches(_corpus.replicate(template, 2000, seed=10_000), 512))
        run_ours(warm, f"sqlite:///{tmp}/warm.db")
        for count in args.spans:
            cpu: dict[str, list[float]] = {}
            wall: dict[str, list[float]] = {}
            differing: set[str] = set()
            for rep in range(args.repeat):
                spans = list(_corpus.replicate(template, count, seed=rep + 1))
                variants: list[tuple[str, Any]] = []
                for size in args.batch:
                    batches = list(_corpus.batches(spans, size))
                    ref = f"{tmp}/ref-{count}-{size}-{rep}.db"
                    run_ours(batches, f"sqlite:///{ref}")  # untimed: the rows both writers must end with
                    plan = FloorPlan(batches, ref)
                    suffix = f" batch {size}" if len(args.batch) > 1 else ""
                    ours_db = f"{tmp}/ours-{count}-{size}-{rep}.db"
                    floor_db = f"{tmp}/floor-{count}-{size}-{rep}.db"
                    writes_db = f"{tmp}/writes-{count}-{size}-{rep}.db"
                    variants.append((f"ours{suffix}", lambda b=batches, db=ours_db: run_ours(b, f"sqlite:///{db}")))
                    variants.append((f"floor{suffix}", lambda p=plan, db=floor_db: run_floor(p, db)))
                    variants.append((f"mapping{suffix}", lambda b=batches: run_mapping(b)))
                    variants.append((f"writes{suffix}", lambda b=batches, db=writes_db: run_writes(b, f"sqlite:///{db}")))
                    variants.append((f"check{suffix}", (ours_db, floor_db, writes_db, ref)))
                timed = [v for v in variants if not v[0].startswith("check")]
                shift = rep % len(timed)
                for name, fn in timed[shift:] + timed[:shift]:
                    w, c = fn()
                    cpu.setdefault(name, []).append(c)
                    wall.setdefault(name, []).append(w)
                for name, paths in variants:
                    if name.startswith("check") and rep == 0:
                        differing.update(same_rows(paths[0], paths[1]))
                        differing.update(same_rows(paths[0], paths[2]))
                    if name.startswith("check"):
                        for path in paths:
                            for suffix in ("", "-wal", "-shm"):
                                Path(path + suffix).unlink(missing_ok=True)
                print(f"  {count} spans rep {rep + 1}: " + ", ".join(
                    f"{name} {cpu[name][-1] / count * 1e6:.1f} us/span" for name in cpu), file=sys.stderr)
            print(f"\n{count:,} spans; same rows in ours', the writes' and the floor's databases: "
                  f"{'yes' if not differing else 'NO, differing tables: ' + ', '.join(sorted(differing))}")
            print(f"{'variant':<22}{'CPU us/span (median, IQR)':>32}{'spans/s (wall)':>18}")
            for name in cpu:
                rate = count / statistics.median(wall[name])
                print(f"{name:<22}{summary(cpu[name], count):>32}{rate:>18,.0f}")
            for size in args.batch:
                suffix = f" batch {size}" if len(args.batch) > 1 else ""
                ratio = statistics.median(cpu[f"floor{suffix}"]) / statistics.median(cpu[f"ours{suffix}"])
                passed = ratio >= TARGET_RATIO and not differing
                ok = ok and passed
                print(f"floor / ours{suffix} = {ratio:.2f} (target >= {TARGET_RATIO}): {'PASS' if passed else 'MISS'}")
                mapping = statistics.median(cpu[f"mapping{suffix}"])
                if mapping:
                    floor = statistics.median(cpu[f"floor{suffix}"])
                    bound = floor / (floor + mapping)
                    print(f"  bound{suffix}: floor / (floor + mapping and row encoding) = {bound:.2f}"
                          " (the ratio if ours' writes cost nothing beyond the floor's)")
                # differences paired within a repetition (the variants ran minutes apart at most)
                runs = list(zip(cpu[f"ours{suffix}"], cpu[f"writes{suffix}"], cpu[f"floor{suffix}"], strict=True))
                in_export = statistics.median(o - w for o, w, _ in runs) / count * 1e6
                beyond = statistics.median(w - f for _, w, f in runs) / count * 1e6
                print(f"  split{suffix} (CPU us/span, medians of differences paired per repetition): mapping in the "
                      f"export (ours - writes) {in_export:.1f}, writing beyond the floor (writes - floor: row "
                      f"parameters, derived rows, the writer's Python, SQLAlchemy, its reads) {beyond:.1f}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
