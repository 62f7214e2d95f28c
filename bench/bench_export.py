"""DAG export throughput into a file SQLite DB: DagSpanExporter vs raw sqlite3.

* **ours**: ``DagSpanExporter(url).export(batch)`` end to end (span -> row mapping,
  scrubbing, placeholders, upserts, derived rows), one transaction per batch.
* **raw**: the same batches mapped once with our mapping *outside* the timer, then only
  ``sqlite3`` ``executemany`` of those rows into an identical schema (same Alembic
  migrations, same pragmas: WAL, synchronous=NORMAL, foreign_keys=ON), one transaction
  per batch. The rows ours derives from a run's node set (edges, steps, branches, branch
  runs, derived nodes, cost records, session state) are taken from an untimed reference export and
  inserted once, in the batch that completes their run, so both writers end with the
  same rows. This is the floor any writer of these rows pays.

    python bench/bench_export.py                       # 50k spans, batches of 512
    python bench/bench_export.py --spans 100000 --batch 512 --repeat 3

Each writer runs in the measuring thread: besides wall-clock spans/s the CPU time of that
thread (time.thread_time: mapping, SQL and SQLite's own work) is reported as median and IQR.

Targets: ours >= 30k spans/s, and ours >= 0.7x raw.
"""

from __future__ import annotations

import argparse
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
TARGET_RATE = 30_000
TARGET_RATIO = 0.7


def run_ours(batches: list[list[Any]], url: str) -> tuple[float, float]:
    from cmbagent_otel.exporters.dag import DagSpanExporter
    from opentelemetry.sdk.trace.export import SpanExportResult

    from cmbagent_otel.dag.database import ensure_schema

    ensure_schema(url)  # migrations are a one-off, not part of the throughput
    exporter = DagSpanExporter(url)
    start, cpu = time.perf_counter(), time.thread_time()
    for batch in batches:
        if exporter.export(batch) is not SpanExportResult.SUCCESS:
            raise SystemExit("DagSpanExporter reported FAILURE")
    elapsed, cpu = time.perf_counter() - start, time.thread_time() - cpu
    exporter.shutdown()
    return elapsed, cpu


# Rows ours derives from a run's whole node set, by table in foreign-key order, with the
# query that gives each row's owning run (the run whose last span completes them).
DERIVED_TABLES: tuple[tuple[str, str], ...] = (
    ("workflow_runs", "SELECT b.parent_run_id, r.* FROM workflow_runs r JOIN branches b ON b.child_run_id = r.id"),
    ("workflow_steps", "SELECT s.run_id, s.* FROM workflow_steps s"),
    ("dag_nodes", "SELECT n.run_id, n.* FROM dag_nodes n WHERE json_extract(n.meta, '$.derived')"),
    ("dag_edges", "SELECT n.run_id, e.* FROM dag_edges e JOIN dag_nodes n ON n.id = e.from_node_id"),
    ("branches", "SELECT b.parent_run_id, b.* FROM branches b"),
    ("cost_records", "SELECT c.run_id, c.* FROM cost_records c"),
    ("session_states", "SELECT NULL, s.* FROM session_states s"),
)


def derived_rows(batches: list[list[Any]], tmp: str) -> list[list[tuple[str, list[tuple[Any, ...]]]]]:
    """Per batch, plain INSERTs of the derived rows whose run that batch completes.

    They come from an untimed export of the same batches by ours (the rows as stored), so
    raw writes exactly what ours ends up storing, each row once.
    """
    from cmbagent_otel.dag.mapping import run_id_of

    run_ours(batches, f"sqlite:///{tmp}/reference.db")  # untimed: only its stored rows are used
    last_batch: dict[str, int] = {}
    for index, batch in enumerate(batches):
        for span in batch:
            last_batch[run_id_of(span.context.trace_id)] = index
    out: list[list[tuple[str, list[tuple[Any, ...]]]]] = [[] for _ in batches]
    conn = sqlite3.connect(f"{tmp}/reference.db")
    try:
        for table, query in DERIVED_TABLES:
            cursor = conn.execute(query)
            columns = [d[0] for d in cursor.description][1:]
            autoincrement = table in ("dag_edges", "cost_records")
            if autoincrement:
                columns = columns[1:]  # autoincrement id: raw lets SQLite assign it, as ours does
            sql = f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})"
            per_batch: dict[int, list[tuple[Any, ...]]] = {}
            for owner, *values in cursor:
                if autoincrement:
                    values = values[1:]
                index = last_batch.get(owner, len(batches) - 1) if owner is not None else len(batches) - 1
                per_batch.setdefault(index, []).append(tuple(values))
            for index, rows in per_batch.items():
                out[index].append((sql, rows))
    finally:
        conn.close()
    Path(f"{tmp}/reference.db").unlink()
    return out


def _raw_statements(batch: list[Any]) -> list[tuple[str, list[tuple[Any, ...]]]]:
    """SQL + parameter tuples for one batch, from our mapping (prepared outside the timer)."""
    from cmbagent_otel.dag import schema
    from cmbagent_otel.dag.mapping import map_spans
    from cmbagent_otel.dag.writer import _sqlite_params, _sqlite_sql

    tables = schema.metadata.tables
    mapped = map_spans(batch)
    plan: list[tuple[str, list[dict[str, Any]], str]] = [
        ("sessions", list(mapped.sessions.values()), "ignore"),
        ("workflow_runs", [c.row for c in mapped.runs.values()], "ignore"),
        ("dag_nodes", list(mapped.node_placeholders.values()), "ignore"),
        ("dag_nodes", sorted(mapped.nodes.values(), key=lambda r: r["depth"]), "replace"),
        ("execution_events", list(mapped.event_placeholders.values()), "ignore"),
        ("execution_events", sorted(mapped.events.values(), key=lambda r: r["depth"]), "replace"),
        ("messages", mapped.messages, "insert"),
    ]
    out = []
    for name, rows, mode in plan:
        if rows:
            sql, kinds = _sqlite_sql(tables[name], mode)
            out.append((sql, _sqlite_params(rows, kinds)))
    return out


def run_raw(batches: list[list[Any]], path: str,
            derived: list[list[tuple[str, list[tuple[Any, ...]]]]]) -> tuple[float, float]:
    from cmbagent_otel.dag.database import ensure_schema

    ensure_schema(f"sqlite:///{path}")
    prepared = [_raw_statements(b) + extra for b, extra in zip(batches, derived, strict=True)]
    conn = sqlite3.connect(path, isolation_level=None)
    for pragma in ("journal_mode=WAL", "synchronous=NORMAL", "cache_size=-16384", "foreign_keys=ON"):
        conn.execute(f"PRAGMA {pragma}")
    start, cpu = time.perf_counter(), time.thread_time()
    for statements in prepared:
        conn.execute("BEGIN IMMEDIATE")
        for sql, params in statements:
            conn.executemany(sql, params)
        conn.execute("COMMIT")
    elapsed, cpu = time.perf_counter() - start, time.thread_time() - cpu
    conn.close()
    return elapsed, cpu


def _median_iqr(seconds: list[float]) -> str:
    """Median and interquartile range in milliseconds (the exporting thread's CPU time)."""
    ms = sorted(s * 1000 for s in seconds)
    if len(ms) < 2:
        return f"{ms[0]:,.0f}"
    q1, _, q3 = statistics.quantiles(ms, n=4, method="inclusive")
    return f"{statistics.median(ms):,.0f} ({q1:,.0f}-{q3:,.0f})"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spans", type=int, default=50_000)
    parser.add_argument("--batch", type=int, default=512, help="spans per export (BatchSpanProcessor default)")
    parser.add_argument("--repeat", type=int, default=3, help="alternating repetitions; medians reported")
    parser.add_argument("--content", action="store_true", help="record the corpus with content capture on")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(HERE))
    import _corpus

    template = _corpus.record_demo(capture_content=args.content)
    ours_s: list[float] = []
    raw_s: list[float] = []
    ours_cpu: list[float] = []
    raw_cpu: list[float] = []
    for rep in range(args.repeat):
        # fresh trace ids per repetition: every run writes new rows into an empty DB
        spans = list(_corpus.replicate(template, args.spans, seed=rep))
        batches = list(_corpus.batches(spans, args.batch))
        with tempfile.TemporaryDirectory(prefix="cmbagent-otel-bench-") as tmp:
            derived = derived_rows(batches, tmp)
            order = (("ours", "raw") if rep % 2 == 0 else ("raw", "ours"))
            for which in order:
                if which == "ours":
                    wall, cpu = run_ours(batches, f"sqlite:///{tmp}/ours.db")
                    ours_s.append(wall)
                    ours_cpu.append(cpu)
                else:
                    wall, cpu = run_raw(batches, f"{tmp}/raw.db", derived)
                    raw_s.append(wall)
                    raw_cpu.append(cpu)
        print(f"rep {rep + 1}: ours {args.spans / ours_s[-1]:,.0f} spans/s "
              f"({args.spans / ours_cpu[-1]:,.0f} per CPU s), "
              f"raw {args.spans / raw_s[-1]:,.0f} spans/s ({args.spans / raw_cpu[-1]:,.0f} per CPU s)", file=sys.stderr)
    ours_rate = args.spans / statistics.median(ours_s)
    raw_rate = args.spans / statistics.median(raw_s)
    ratio = ours_rate / raw_rate
    print(f"corpus: {len(template)} spans per demo run, replicated to {args.spans} spans, batches of {args.batch}, "
          f"content capture {'on' if args.content else 'off'}, median of {args.repeat}")
    print(f"{'writer':<34}{'spans/s':>12}{'CPU ms (median, IQR)':>28}")
    for label, wall_rate, cpu in (("ours (DagSpanExporter, end to end)", ours_rate, ours_cpu),
                                  ("raw sqlite3 executemany", raw_rate, raw_cpu)):
        print(f"{label:<34}{wall_rate:>12,.0f}{_median_iqr(cpu):>28}")
    rate_ok, ratio_ok = ours_rate >= TARGET_RATE, ratio >= TARGET_RATIO
    print(f"ours >= {TARGET_RATE:,} spans/s: {'PASS' if rate_ok else 'MISS'}; "
          f"ours/raw = {ratio:.2f} (target >= {TARGET_RATIO}): {'PASS' if ratio_ok else 'MISS'}")
    return 0 if rate_ok and ratio_ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
