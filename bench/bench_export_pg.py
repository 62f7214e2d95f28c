"""DAG export into PostgreSQL: spans/s, the exporting thread's CPU and the server's CPU per span.

* **ours**: ``DagSpanExporter(url).export(batch)`` end to end (mapping, scrubbing,
  placeholders, upserts, derived rows, one transaction per batch).
* **floor**: the same batches' final rows written as plainly as PostgreSQL allows, every
  decision taken outside the timer (``bench_export.FloorPlan``: per batch, new rows and rows
  an earlier batch wrote that change, derived rows in the batch that completes their run):
  per batch one transaction, per table one ``COPY ... FROM STDIN`` of the new rows and one
  psycopg 3 ``executemany`` (a single pipeline) of ``UPDATE ... WHERE id = %s`` for the
  changed ones. Foreign keys and every index stay on, ``synchronous_commit`` stays on: what
  the server must do for these rows, and a client that only formats them. The floor's
  ``COPY`` is text (timestamps as text, as the SQLite reference holds them); ours' is binary
  where the column types allow, which spares the server parsing timestamps and integers, so
  ours' server CPU per span can come out below the floor's.
* **mapping**: what no writer of these rows can skip, no database: ``map_spans`` (scrubbing
  included) and the node and event rows encoded as parameters. ``bound`` = spans / (floor
  wall + mapping CPU): what ours could reach if its writing cost no more than the floor's,
  since ``export`` must map a batch before it writes it. The same in CPU, robust to a busy
  machine: client + server CPU per span of the floor plus mapping's, and the rate that
  allows if client and server took turns throughout (they do not quite: during a ``COPY`` the
  server works on rows already sent while the client formats the next, so a measured rate can
  pass it).
* **writes**: ours' transactions alone: every batch mapped before the timer, then written as
  ``export`` writes it. The **overlap ceiling**: the rate of any scheme that maps one batch
  (or chunk of a batch) while the server writes another, if hiding the mapping cost nothing
  (ours' rate times the per-repetition ratio of ours' wall to this one's); in CPU, the
  writer's client + server CPU per span, while they take turns.

Each variant writes into a fresh schema of the PostgreSQL server at ``--url`` (else
``CMBAGENT_OTEL_TEST_PG_URL``; dropped afterwards). The corpus is the one of
``bench_export.py`` (the offline demo run cloned under fresh trace ids, end-time order); the
floor's rows come from an untimed reference export by ours into SQLite, and the first
repetition checks that ours, writes and the floor leave the same rows in PostgreSQL. Reported per
variant, median and IQR: wall-clock spans/s (the client's work, the server's and the loopback
round trips), the exporting thread's CPU per span (``time.thread_time``) and the server
backends' CPU per span (user + system from ``/proc/<pid>/stat`` of the variant's connections;
n/a when the server runs elsewhere). Variants and batch sizes run interleaved in one
process, the order rotating per repetition.

    CMBAGENT_OTEL_TEST_PG_URL=postgresql+psycopg://postgres@127.0.0.1:55432/db python bench/bench_export_pg.py
    python bench/bench_export_pg.py --spans 20000 --batch 512 2048 --repeat 5
    python bench/bench_export_pg.py --no-floor --repeat 1 --server-breakdown

``--server-breakdown`` adds what the server's CPU per span is made of: each table ours filled,
``COPY``-ed back in one go with and without its foreign keys and secondary indexes (cmbagent's
schema), the least any writer of these rows makes the server do.

Target: >= 8,000 spans/s (ours, batches of 512).
"""

from __future__ import annotations

import argparse
import functools
import inspect
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from _stats import median_iqr

HERE = Path(__file__).resolve().parent
TARGET_RATE = 8_000
PG_ENV = "CMBAGENT_OTEL_TEST_PG_URL"
Measure = tuple[float, float, float | None]  # wall s, client thread CPU s, server CPU s (None: unknown)


class Server:
    """A fresh schema on the server of ``base`` and the CPU its connections used."""

    def __init__(self, base: str) -> None:
        from sqlalchemy import create_engine
        from sqlalchemy.engine import make_url

        self.name = f"bench_{uuid.uuid4().hex[:12]}"
        self._admin = create_engine(base)
        url = make_url(base).update_query_dict({"options": f"-csearch_path={self.name}",
                                                "application_name": self.name})
        self.url = url.render_as_string(hide_password=False)
        self.conninfo = {"host": url.host, "port": url.port, "user": url.username, "password": url.password,
                         "dbname": url.database, "options": f"-csearch_path={self.name}",
                         "application_name": self.name}

    def create(self) -> None:
        from sqlalchemy import text

        with self._admin.begin() as conn:
            conn.execute(text(f"CREATE SCHEMA {self.name}"))

    def drop(self) -> None:
        from sqlalchemy import text

        with self._admin.begin() as conn:
            conn.execute(text(f"DROP SCHEMA {self.name} CASCADE"))
        self._admin.dispose()

    def cpu(self) -> dict[int, float] | None:
        """CPU seconds (user + system) of each backend serving this schema's connections; None
        when their ``/proc`` entries cannot be read (a server on another machine)."""
        from sqlalchemy import text

        with self._admin.connect() as conn:
            pids = [r[0] for r in conn.execute(
                text("SELECT pid FROM pg_stat_activity WHERE application_name = :n"), {"n": self.name})]
        out = {}
        tick = os.sysconf("SC_CLK_TCK")
        for pid in pids:
            try:
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                return None
            out[pid] = (int(fields[11]) + int(fields[12])) / tick
        return out


def server_cpu(before: dict[int, float] | None, after: dict[int, float] | None) -> float | None:
    if before is None or after is None:
        return None
    return sum(cpu - before.get(pid, 0.0) for pid, cpu in after.items())


@contextmanager
def fresh_schema(base: str) -> Iterator[Server]:
    """A new, empty schema (dropped on exit); its ``url`` makes connections use it."""
    server = Server(base)
    server.create()
    try:
        yield server
    finally:
        server.drop()


class _Measured:
    """An exporter whose ``shutdown`` first reads the server's CPU (the backends exit with it)."""

    def __init__(self, exporter: Any, server: Server) -> None:
        self.exporter = exporter
        self.server = server
        self.before = server.cpu()
        self.after: dict[int, float] | None = None

    def export(self, batch: Any) -> Any:
        return self.exporter.export(batch)

    def shutdown(self) -> None:
        self.after = self.server.cpu()
        self.exporter.shutdown()


def run_ours(batches: list[list[Any]], base: str, keep: Callable[[Server], None] | None = None) -> Measure:
    """Export ``batches`` into a fresh, migrated schema; ``keep`` sees the schema before it is dropped."""
    from bench_export import timed_export
    from cmbagent_otel.exporters.dag import DagSpanExporter

    from cmbagent_otel.dag.database import ensure_schema

    with fresh_schema(base) as server:
        ensure_schema(server.url)
        exporter = DagSpanExporter(server.url, spill=False)
        exporter.export(batches[0][:1])  # connect (pool, session settings) outside the timer
        measured = _Measured(exporter, server)
        wall, cpu = timed_export(measured, batches)
        if keep is not None:
            keep(server)
        return wall, cpu, server_cpu(measured.before, measured.after)


def run_writes(batches: list[list[Any]], base: str, keep: Callable[[Server], None] | None = None) -> Measure:
    """Ours' transactions alone: the batches mapped (``map_spans``) before the timer, then each
    written as ``export`` writes it (one transaction, the export deadline's timeouts). The
    rate any scheme that maps a batch while the server works on another (in one export or
    across exports) could reach at best: the mapping hidden entirely, nothing added for it."""
    from bench_export import timed_writes

    from cmbagent_otel.dag.database import ensure_schema
    from cmbagent_otel.dag.writer import DagWriter

    with fresh_schema(base) as server:
        ensure_schema(server.url)
        writer = DagWriter(server.url)
        writer.write(batches[0][:1])  # connect (pool, session settings) outside the timer
        before = server.cpu()
        wall, cpu = timed_writes(writer, batches)
        after = server.cpu()
        writer.close()
        if keep is not None:
            keep(server)
        return wall, cpu, server_cpu(before, after)


# --- the floor ------------------------------------------------------------------------------

class PgFloorPlan:
    """``bench_export.FloorPlan``'s statements for PostgreSQL: per batch, ``("copy", table,
    columns, rows)`` for the inserts and ``("update", sql, rows)`` for the updates, values as
    ours sends them (JSON as ours' compact text, datetimes as text, booleans as bool)."""

    def __init__(self, batches: list[list[Any]], reference: str) -> None:
        from bench_export import FloorPlan

        from cmbagent_otel.dag.statements import encode_json

        class Plan(FloorPlan):
            _json = staticmethod(encode_json)  # JSON as ours' compact text; the rest as SQLite's

        plan = Plan(batches, reference)
        self.batches: list[list[tuple[Any, ...]]] = []
        for statements in plan.batches:
            out: list[tuple[Any, ...]] = []
            for sql, params in statements:
                table = sql.split()[2 if sql.startswith("INSERT") else 1]
                columns = plan.columns[table][1:] if table in plan.AUTOINCREMENT else plan.columns[table]
                booleans = [i for i, name in enumerate(columns)
                            if type(plan.tables[table].columns[name].type).__name__ == "Boolean"]
                if sql.startswith("UPDATE"):  # parameters: every column but the id, then the id
                    booleans = [i - 1 for i in booleans if i > 0]
                rows = [_with_bools(row, booleans) for row in params] if booleans else params
                if sql.startswith("INSERT"):
                    out.append(("copy", f"COPY {table} ({', '.join(columns)}) FROM STDIN", rows))
                else:
                    out.append(("update", sql.replace("?", "%s"), rows))
            self.batches.append(out)


def _with_bools(row: tuple[Any, ...], positions: list[int]) -> tuple[Any, ...]:
    values = list(row)
    for i in positions:
        if values[i] is not None:
            values[i] = bool(values[i])
    return tuple(values)


def run_floor(plan: PgFloorPlan, base: str, keep: Callable[[Server], None] | None = None) -> Measure:
    """Write ``plan`` with plain psycopg 3 into a fresh, migrated schema."""
    import psycopg

    from cmbagent_otel.dag.database import ensure_schema

    with fresh_schema(base) as server:
        ensure_schema(server.url)
        with psycopg.connect(**server.conninfo) as conn:
            conn.execute("SELECT 1").fetchall()
            conn.commit()
            before = server.cpu()
            start, cpu = time.perf_counter(), time.thread_time()
            for statements in plan.batches:
                with conn.transaction(), conn.cursor() as cur:
                    for kind, sql, rows in statements:
                        if kind == "copy":
                            with cur.copy(sql) as copy:
                                for row in rows:
                                    copy.write_row(row)
                        else:
                            cur.executemany(sql, rows)
            wall, cpu = time.perf_counter() - start, time.thread_time() - cpu
            after = server.cpu()
        if keep is not None:
            keep(server)
        return wall, cpu, server_cpu(before, after)


def _as_writer(map_spans: Callable[..., Any]) -> dict[str, Any]:
    """map_spans' options as PostgreSQL's writer passes them (no SQLite text of the times), where
    the mapping has them (older code: none)."""
    return {"texts": False} if "texts" in inspect.signature(map_spans).parameters else {}


def run_mapping(batches: list[list[Any]], base: str, keep: Callable[[Server], None] | None = None) -> Measure:
    """What no writer of these rows can skip, without a database: mapping the spans (scrubbing
    included) and encoding the node and event rows as PostgreSQL parameters."""
    from bench_export import clear_id_caches

    from cmbagent_otel.dag.mapping import map_spans
    from cmbagent_otel.dag.schema import metadata
    from cmbagent_otel.dag.statements import Sql

    sql = Sql("postgresql", "psycopg")
    tables = [sql.columns(metadata.tables[name]) for name in ("dag_nodes", "execution_events")]
    clear_id_caches()
    start, cpu = time.perf_counter(), time.thread_time()
    options = _as_writer(map_spans)
    for batch in batches:
        mapped = map_spans(batch, **options)
        for cols, rows in zip(tables, (mapped.nodes, mapped.events), strict=True):
            sql.params(rows.values(), cols)
    return time.perf_counter() - start, time.thread_time() - cpu, None


BREAKDOWN = (  # (label, copy the table's secondary indexes, copy its foreign keys)
    ("all", True, True), ("no FK", True, False), ("PK only", False, True), ("PK only, no FK", False, False))


def server_breakdown(batches: list[list[Any]], base: str, repeat: int = 3) -> dict[str, dict[str, float]]:
    """What the server's CPU per span for these rows is made of: ours exports ``batches`` into
    a fresh schema, then every table it filled is copied out and ``COPY``-ed back (one
    transaction, all rows at once: less than any batched writer sends) into a new table like
    it with (a) its indexes and foreign keys, (b) its indexes only, (c) its primary key and
    foreign keys, (d) its primary key only. The backend's CPU (``/proc``, clock ticks: 1 us per
    span at 10k spans) per span, median of ``repeat``; per table and variant."""
    import psycopg

    spans = sum(len(batch) for batch in batches)
    out: dict[str, dict[str, float]] = {}

    def measure(server: Server) -> None:
        with psycopg.connect(**server.conninfo) as conn:
            pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]  # type: ignore[index]
            tick = os.sysconf("SC_CLK_TCK")

            def cpu() -> float:
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                return (int(fields[11]) + int(fields[12])) / tick

            tables = [r[0] for r in conn.execute(
                "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE n.nspname = %s AND c.relkind = 'r' AND c.reltuples <> 0 ORDER BY 1", (server.name,))]
            conn.commit()
            for table in tables:
                count = conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]  # type: ignore[index]
                if not count:
                    continue
                data = bytearray()
                with conn.cursor().copy(f"COPY {table} TO STDOUT") as copy:
                    for chunk in copy:
                        data += chunk
                keys = conn.execute("SELECT contype, pg_get_constraintdef(oid) FROM pg_constraint "
                                    "WHERE conrelid = %s::regclass AND contype IN ('f', 'p')", (table,)).fetchall()
                fks = [d for kind, d in keys if kind == "f"]
                pks = [d for kind, d in keys if kind == "p"]
                conn.commit()
                for label, indexes, foreign in BREAKDOWN:
                    cpus = []
                    for _ in range(repeat):
                        like = "INCLUDING ALL" if indexes else "INCLUDING DEFAULTS INCLUDING CONSTRAINTS"
                        conn.execute(f"CREATE TABLE bench_copy (LIKE {table} {like})")
                        for pk in () if indexes else pks:
                            conn.execute(f"ALTER TABLE bench_copy ADD {pk}")
                        for fk in fks if foreign else ():
                            conn.execute(f"ALTER TABLE bench_copy ADD {fk}")
                        conn.commit()
                        before = cpu()
                        with conn.cursor().copy("COPY bench_copy FROM STDIN") as copy:
                            copy.write(bytes(data))
                        conn.commit()
                        cpus.append((cpu() - before) / spans * 1e6)
                        conn.execute("DROP TABLE bench_copy")
                        conn.commit()
                    out.setdefault(f"{table} ({count:,} rows)", {})[label] = statistics.median(cpus)

    run_ours(batches, base, keep=measure)
    return out


def _dump(server: Server) -> dict[str, list[tuple[Any, ...]]]:
    from sqlalchemy import create_engine

    from cmbagent_otel.dag.writer import dump_tables

    engine = create_engine(server.url)
    try:
        with engine.connect() as conn:
            return dump_tables(conn)
    finally:
        engine.dispose()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default=os.environ.get(PG_ENV), help=f"PostgreSQL URL (default ${PG_ENV})")
    parser.add_argument("--spans", type=int, default=10_000)
    parser.add_argument("--batch", type=int, nargs="+", default=[512])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--no-floor", action="store_true", help="time ours only")
    parser.add_argument("--server-breakdown", action="store_true",
                        help="also: the server's CPU per span for one COPY of each table's rows, with and without "
                             "its foreign keys and secondary indexes")
    args = parser.parse_args(argv)
    if not args.url:
        raise SystemExit(f"no PostgreSQL: pass --url or set {PG_ENV}")
    sys.path.insert(0, str(HERE))
    import _corpus
    from bench_export import quiet_corpus
    from bench_export import run_ours as run_ours_sqlite

    template = quiet_corpus(False)
    warm = list(_corpus.batches(_corpus.replicate(template, 1000, seed=10_000), 512))
    run_ours(warm, args.url)  # imports, statement caches, the redaction memo: warm for every variant
    results: dict[str, list[Measure]] = {}
    differing: set[str] = set()
    with tempfile.TemporaryDirectory(prefix="cmbagent-otel-bench-pg-") as tmp:
        for rep in range(args.repeat):
            spans = list(_corpus.replicate(template, args.spans, seed=rep + 1))
            variants: list[tuple[str, Callable[..., Measure]]] = []
            dumps: dict[str, dict[str, list[tuple[Any, ...]]]] = {}
            for size in args.batch:
                batches = list(_corpus.batches(spans, size))
                variants.append((f"ours {size}", functools.partial(run_ours, batches, args.url)))
                if not args.no_floor:
                    ref = f"{tmp}/ref-{size}-{rep}.db"
                    run_ours_sqlite(batches, f"sqlite:///{ref}")  # untimed: the rows the floor writes
                    plan = PgFloorPlan(batches, ref)
                    variants.append((f"floor {size}", functools.partial(run_floor, plan, args.url)))
                    variants.append((f"mapping {size}", functools.partial(run_mapping, batches, args.url)))
                    variants.append((f"writes {size}", functools.partial(run_writes, batches, args.url)))
            shift = rep % len(variants)
            for name, fn in variants[shift:] + variants[:shift]:
                # the first repetition keeps every variant's rows to compare
                keep = (lambda server, n=name, d=dumps: d.__setitem__(n, _dump(server))) if rep == 0 else None
                results.setdefault(name, []).append(fn(keep=keep))
                wall, cpu, srv = results[name][-1]
                print(f"  rep {rep + 1} {name}: {args.spans / wall:,.0f} spans/s, {cpu / args.spans * 1e6:.1f} us "
                      f"client CPU/span, server {'n/a' if srv is None else f'{srv / args.spans * 1e6:.1f} us'}/span",
                      file=sys.stderr)
            for size in args.batch:
                if f"floor {size}" in dumps:
                    floor = dumps[f"floor {size}"]
                    for other in (dumps[f"ours {size}"], dumps[f"writes {size}"]):
                        differing.update(t for t in other if other[t] != floor[t])
    print(f"PostgreSQL export, {args.spans:,} spans ({len(template)} per demo run), {args.repeat} repetitions"
          + ("" if args.no_floor else "; ours, writes and the floor store the same rows: "
             + ("yes" if not differing else "NO, differing tables: " + ", ".join(sorted(differing)))))
    print(f"{'variant':<12}{'spans/s (median, IQR)':>30}{'client CPU us/span':>30}{'server CPU us/span':>30}")
    for name, measures in results.items():
        rates = [args.spans / w for w, _, _ in measures]
        cpus = [c / args.spans * 1e6 for _, c, _ in measures]
        servers = [s / args.spans * 1e6 for _, _, s in measures if s is not None]
        print(f"{name:<12}{median_iqr(rates, ',.0f'):>30}{median_iqr(cpus, '.1f'):>30}"
              f"{median_iqr(servers, '.1f') if servers else 'n/a':>30}")
    rate = statistics.median(args.spans / w for w, _, _ in results[f"ours {args.batch[0]}"])
    floor = results.get(f"floor {args.batch[0]}")
    if floor:
        floor_wall = statistics.median(w for w, _, _ in floor)
        mapping = statistics.median(c for _, c, _ in results[f"mapping {args.batch[0]}"])
        print(f"ours / floor (spans/s, batch {args.batch[0]}): {rate * floor_wall / args.spans:.2f}")
        print(f"bound: floor wall + mapping CPU = {args.spans / (floor_wall + mapping):,.0f} spans/s (ours if its "
              "writes cost no more than the floor's; export maps a batch before writing it)")
        ours = results[f"ours {args.batch[0]}"]
        def total(measures: list[Measure]) -> float:  # client + server CPU per span, microseconds
            return statistics.median((c + (s or 0.0)) / args.spans * 1e6 for _, c, s in measures)

        if all(s is not None for _, _, s in ours + floor):
            bound_cpu = total(floor) + mapping / args.spans * 1e6
            print(f"CPU per span, client + server: ours {total(ours):.1f} us, floor {total(floor):.1f} us, floor + "
                  f"mapping {bound_cpu:.1f} us: {1e6 / bound_cpu:,.0f} spans/s if client and server took turns "
                  "throughout (a COPY overlaps them in part, so a measured rate can pass it)")
        writes = results[f"writes {args.batch[0]}"]
        # paired per repetition (both see about the same load), then scaled to ours' median
        gain = statistics.median(o[0] / w[0] for o, w in zip(ours, writes, strict=True))
        print(f"overlap ceiling: ours' transactions alone (batches mapped before the timer) run {gain:.2f}x ours' "
              f"rate (median of per-repetition pairs): {rate * gain:,.0f} spans/s, the most that mapping one batch "
              "(or chunk) while the server writes another could reach, with nothing added for the overlap")
        if all(s is not None for _, _, s in writes):
            print(f"  in CPU: writes client + server {total(writes):.1f} us/span: {1e6 / total(writes):,.0f} "
                  "spans/s if the writer and the server took turns throughout")
    if args.server_breakdown:
        spans = list(_corpus.replicate(template, args.spans, seed=1))
        breakdown = server_breakdown(list(_corpus.batches(spans, args.batch[0])), args.url)
        labels = [label for label, _, _ in BREAKDOWN]
        print("server CPU us/span of one COPY of all the rows ours stored, per table (median of 3):")
        print(f"{'table':<36}" + "".join(f"{label:>16}" for label in labels))
        for table, cpus in breakdown.items():
            print(f"{table:<36}" + "".join(f"{cpus[label]:>16.1f}" for label in labels))
        print(f"{'total':<36}" + "".join(f"{sum(c[label] for c in breakdown.values()):>16.1f}" for label in labels))
    ok = rate >= TARGET_RATE
    print(f"batch {args.batch[0]}: {rate:,.0f} spans/s (target >= {TARGET_RATE:,}): {'PASS' if ok else 'MISS'}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
