"""DAG export throughput into a file SQLite DB: DagSpanExporter vs raw sqlite3.

* **ours**: ``DagSpanExporter(url).export(batch)`` end to end (span -> row mapping,
  scrubbing, placeholders, upserts, derived rows), one transaction per batch.
* **raw**: the same batches mapped once with our mapping *outside* the timer, then only
  ``sqlite3`` ``executemany`` of those rows into an identical schema (same Alembic
  migrations, same pragmas: WAL, synchronous=NORMAL, foreign_keys=ON), one transaction
  per batch. This is the floor any writer of these rows pays.

    python bench/bench_export.py                       # 50k spans, batches of 512
    python bench/bench_export.py --spans 100000 --batch 512 --repeat 3

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


def run_ours(batches: list[list[Any]], url: str) -> float:
    from cmbagent_otel.exporters.dag import DagSpanExporter
    from opentelemetry.sdk.trace.export import SpanExportResult

    from cmbagent_otel.dag.database import ensure_schema

    ensure_schema(url)  # migrations are a one-off, not part of the throughput
    exporter = DagSpanExporter(url)
    start = time.perf_counter()
    for batch in batches:
        if exporter.export(batch) is not SpanExportResult.SUCCESS:
            raise SystemExit("DagSpanExporter reported FAILURE")
    elapsed = time.perf_counter() - start
    exporter.shutdown()
    return elapsed


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
        ("cost_records", mapped.costs, "insert"),
        ("messages", mapped.messages, "insert"),
    ]
    out = []
    for name, rows, mode in plan:
        if rows:
            sql, kinds = _sqlite_sql(tables[name], mode)
            out.append((sql, _sqlite_params(rows, kinds)))
    return out


def run_raw(batches: list[list[Any]], path: str) -> float:
    from cmbagent_otel.dag.database import ensure_schema

    ensure_schema(f"sqlite:///{path}")
    prepared = [_raw_statements(b) for b in batches]
    conn = sqlite3.connect(path, isolation_level=None)
    for pragma in ("journal_mode=WAL", "synchronous=NORMAL", "cache_size=-16384", "foreign_keys=ON"):
        conn.execute(f"PRAGMA {pragma}")
    start = time.perf_counter()
    for statements in prepared:
        conn.execute("BEGIN IMMEDIATE")
        for sql, params in statements:
            conn.executemany(sql, params)
        conn.execute("COMMIT")
    elapsed = time.perf_counter() - start
    conn.close()
    return elapsed


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
    for rep in range(args.repeat):
        # fresh trace ids per repetition: every run writes new rows into an empty DB
        spans = list(_corpus.replicate(template, args.spans, seed=rep))
        batches = list(_corpus.batches(spans, args.batch))
        with tempfile.TemporaryDirectory(prefix="cmbagent-otel-bench-") as tmp:
            order = (("ours", "raw") if rep % 2 == 0 else ("raw", "ours"))
            for which in order:
                if which == "ours":
                    ours_s.append(run_ours(batches, f"sqlite:///{tmp}/ours.db"))
                else:
                    raw_s.append(run_raw(batches, f"{tmp}/raw.db"))
        print(f"rep {rep + 1}: ours {args.spans / ours_s[-1]:,.0f} spans/s, raw {args.spans / raw_s[-1]:,.0f} spans/s",
              file=sys.stderr)
    ours_rate = args.spans / statistics.median(ours_s)
    raw_rate = args.spans / statistics.median(raw_s)
    ratio = ours_rate / raw_rate
    print(f"corpus: {len(template)} spans per demo run, replicated to {args.spans} spans, batches of {args.batch}, "
          f"content capture {'on' if args.content else 'off'}, median of {args.repeat}")
    print(f"{'writer':<34}{'spans/s':>12}")
    print(f"{'ours (DagSpanExporter, end to end)':<34}{ours_rate:>12,.0f}")
    print(f"{'raw sqlite3 executemany':<34}{raw_rate:>12,.0f}")
    rate_ok, ratio_ok = ours_rate >= TARGET_RATE, ratio >= TARGET_RATIO
    print(f"ours >= {TARGET_RATE:,} spans/s: {'PASS' if rate_ok else 'MISS'}; "
          f"ours/raw = {ratio:.2f} (target >= {TARGET_RATIO}): {'PASS' if ratio_ok else 'MISS'}")
    return 0 if rate_ok and ratio_ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
