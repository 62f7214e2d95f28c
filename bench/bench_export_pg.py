"""DAG export into PostgreSQL: spans/s and the exporting thread's CPU per span.

``DagSpanExporter(url).export(batch)`` end to end (mapping, scrubbing, placeholders,
upserts, derived rows, one transaction per batch) into a fresh schema of a PostgreSQL
server (``--url``, else ``CMBAGENT_OTEL_TEST_PG_URL``; the schema is dropped afterwards).
The corpus is the one of ``bench_export.py`` (the offline demo run cloned under fresh trace
ids, end-time order). Wall-clock spans/s includes the server's work and the loopback round
trips; CPU is the client's (``time.thread_time`` of the exporting thread). Several batch
sizes run interleaved in one process (order rotating per repetition); medians and IQR.

    CMBAGENT_OTEL_TEST_PG_URL=postgresql+psycopg://postgres@127.0.0.1:55432/db python bench/bench_export_pg.py
    python bench/bench_export_pg.py --spans 20000 --batch 512 2048 --repeat 5

Target: >= 8,000 spans/s (batches of 512).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from _stats import median_iqr

HERE = Path(__file__).resolve().parent
TARGET_RATE = 8_000
PG_ENV = "CMBAGENT_OTEL_TEST_PG_URL"


@contextmanager
def fresh_schema(base: str) -> Iterator[str]:
    """A URL whose connections use a new, empty schema (dropped on exit)."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    schema = f"bench_{uuid.uuid4().hex[:12]}"
    admin = create_engine(base)
    with admin.begin() as conn:
        conn.execute(text(f"CREATE SCHEMA {schema}"))
    url = make_url(base).update_query_dict({"options": f"-csearch_path={schema}"})
    try:
        yield url.render_as_string(hide_password=False)
    finally:
        with admin.begin() as conn:
            conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
        admin.dispose()


def run(batches: list[list[Any]], base: str) -> tuple[float, float]:
    """(wall s, thread CPU s) of exporting ``batches`` into a fresh, migrated schema."""
    from bench_export import timed_export
    from cmbagent_otel.exporters.dag import DagSpanExporter

    from cmbagent_otel.dag.database import ensure_schema

    with fresh_schema(base) as url:
        ensure_schema(url)
        exporter = DagSpanExporter(url, spill=False)
        exporter.export(batches[0][:1])  # connect (pool, session settings) outside the timer
        return timed_export(exporter, batches)


def _iqr(values: list[float], fmt: str) -> str:
    return median_iqr(values, fmt)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default=os.environ.get(PG_ENV), help=f"PostgreSQL URL (default ${PG_ENV})")
    parser.add_argument("--spans", type=int, default=10_000)
    parser.add_argument("--batch", type=int, nargs="+", default=[512])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args(argv)
    if not args.url:
        raise SystemExit(f"no PostgreSQL: pass --url or set {PG_ENV}")
    sys.path.insert(0, str(HERE))
    import _corpus
    from bench_export import quiet_corpus

    template = quiet_corpus(False)
    warm = list(_corpus.batches(_corpus.replicate(template, 1000, seed=10_000), 512))
    run(warm, args.url)  # imports, statement caches, the redaction memo: warm for every variant
    rates: dict[int, list[float]] = {size: [] for size in args.batch}
    cpus: dict[int, list[float]] = {size: [] for size in args.batch}
    for rep in range(args.repeat):
        spans = list(_corpus.replicate(template, args.spans, seed=rep + 1))
        shift = rep % len(args.batch)
        for size in args.batch[shift:] + args.batch[:shift]:
            wall, cpu = run(list(_corpus.batches(spans, size)), args.url)
            rates[size].append(args.spans / wall)
            cpus[size].append(cpu / args.spans * 1e6)
            print(f"  rep {rep + 1} batch {size}: {rates[size][-1]:,.0f} spans/s, {cpus[size][-1]:.1f} us CPU/span",
                  file=sys.stderr)
    print(f"PostgreSQL export, {args.spans:,} spans ({len(template)} per demo run), {args.repeat} repetitions")
    print(f"{'batch':>6}{'spans/s (median, IQR)':>32}{'client CPU us/span (median, IQR)':>38}")
    for size in args.batch:
        print(f"{size:>6}{_iqr(rates[size], ',.0f'):>32}{_iqr(cpus[size], '.1f'):>38}")
    rate = statistics.median(rates[args.batch[0]])
    ok = rate >= TARGET_RATE
    print(f"batch {args.batch[0]}: {rate:,.0f} spans/s (target >= {TARGET_RATE:,}): {'PASS' if ok else 'MISS'}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
