"""Fixed span batches and the exact rows the DAG writer stored for them, as a reference.

``tests/fixtures/reference_rows.json`` holds, per case, the batches (spans as
:func:`cmbagent_otel.spill.span_to_record` records: fixed ids and times) and every row of the
tracking tables as the database returned it (SQLite: the stored values; PostgreSQL: each
column as text), written by the writer of commit 90398a5 (SQLAlchemy Core statements
compiled per batch, derived rows recomputed for every run a batch touches). The test
writes the same batches with today's writer and compares byte for byte.

Regenerate (only after an intended change of the stored rows, with the writer that is the
new reference; PostgreSQL rows need ``CMBAGENT_OTEL_TEST_PG_URL``)::

    .venv/bin/python -m tests.dag.reference_rows --write tests/fixtures/reference_rows.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanContext, Status, StatusCode, TraceFlags

from cmbagent_otel import semconv as sc
from cmbagent_otel.spill import record_to_span, span_to_record

FIXTURE = Path(__file__).parent.parent / "fixtures" / "reference_rows.json"
PG_ENV = "CMBAGENT_OTEL_TEST_PG_URL"
T0 = 1_750_000_000_000_000_000
AUTOINCREMENT = ("dag_edges", "messages", "cost_records")
RESOURCE = Resource({"service.name": "reference"})


def _normalised(spans: list[ReadableSpan], trace_id: int, extra: Callable[[ReadableSpan], dict[str, Any]] | None
                ) -> list[ReadableSpan]:
    """The spans under one fixed trace id, span ids 1.. in start order, times from their ranks."""
    by_start = sorted(spans, key=lambda s: (s.start_time or 0, s.context.span_id))
    ids = {s.context.span_id: i + 1 for i, s in enumerate(by_start)}
    by_end = {s.context.span_id: i for i, s in enumerate(sorted(spans, key=lambda s: (s.end_time or 0,
                                                                                         s.context.span_id)))}
    out = []
    for rank, span in enumerate(by_start):
        parent = span.parent
        attrs = dict(span.attributes or {})
        if extra is not None:
            attrs.update(extra(span))
        out.append(ReadableSpan(
            name=span.name,
            context=SpanContext(trace_id, ids[span.context.span_id], False, TraceFlags(TraceFlags.SAMPLED)),
            parent=SpanContext(trace_id, ids.get(parent.span_id, 10_000 + parent.span_id % 1000), False,
                               TraceFlags(TraceFlags.SAMPLED)) if parent is not None else None,
            resource=RESOURCE, attributes=attrs, kind=span.kind, status=span.status,
            start_time=T0 + rank * 10_000_000, end_time=T0 + by_end[span.context.span_id] * 10_000_000 + 5_000_000,
            instrumentation_scope=span.instrumentation_scope,
        ))
    return sorted(out, key=lambda s: s.end_time or 0)  # the order a batch processor delivers


def _recorded(run: Callable[[Any], None]) -> list[ReadableSpan]:
    from cmbagent_otel._spans import workflow_tracers

    memory = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    try:
        with workflow_tracers.routed_to(provider):
            run(provider)
    finally:
        provider.shutdown()
    return list(memory.get_finished_spans())


def _messages(span: ReadableSpan) -> dict[str, Any]:
    if (span.attributes or {}).get(sc.SPAN_KIND) != sc.KIND_LLM:
        return {}
    return {sc.GEN_AI_INPUT_MESSAGES: json.dumps([{"role": "user", "content": f"question of {span.name}"}]),
            sc.GEN_AI_OUTPUT_MESSAGES: json.dumps([{"role": "assistant", "content": "an answer"}])}


def _batches(spans: list[ReadableSpan], size: int) -> list[list[ReadableSpan]]:
    return [spans[i:i + size] for i in range(0, len(spans), size)]


def _odd_spans() -> list[ReadableSpan]:
    """Damaged and hostile spans: a node cycle, a missing parent, odd text, a wrong-typed depth."""
    trace_id = 0xABCDEF
    ctx = lambda i: SpanContext(trace_id, i, False, TraceFlags(TraceFlags.SAMPLED))  # noqa: E731

    def span(i: int, parent: int | None, name: str, attrs: dict[str, Any], failed: bool = False) -> ReadableSpan:
        return ReadableSpan(name=name, context=ctx(i), parent=ctx(parent) if parent else None, attributes=attrs,
                            resource=RESOURCE,
                            status=Status(StatusCode.ERROR, "broke \x00 here") if failed else Status(StatusCode.OK),
                            start_time=T0 + i * 1000, end_time=T0 + i * 1000 + 500)

    node = {sc.SPAN_KIND: sc.KIND_AGENT, sc.DAG_NODE_TYPE: sc.NODE_SUB_AGENT}
    return [
        span(1, None, "root \ud800", {sc.SPAN_KIND: sc.KIND_WORKFLOW, sc.WORKFLOW_MODE: "planning-control",
                                      sc.WORKFLOW_TASK: "odd 'task'; --"}),
        span(2, 1, "a", {**node, sc.DAG_NODE: "a", sc.DAG_PARENT_NODE: "b", sc.DAG_DEPTH: "x"}),
        span(3, 2, "b", {**node, sc.DAG_NODE: "b", sc.DAG_PARENT_NODE: "a", sc.DAG_DEPTH: 1}),
        span(4, 3, "chat m", {sc.SPAN_KIND: sc.KIND_LLM, sc.DAG_NODE: "b", sc.EVENT_DEPTH: 1,
                              sc.GEN_AI_AGENT_NAME: "é🙂", sc.GEN_AI_USAGE_INPUT_TOKENS: 2**40,
                              sc.GEN_AI_USAGE_OUTPUT_TOKENS: "3", sc.LLM_COST_USD: -0.5}),
        span(5, 99, "orphan tool", {sc.SPAN_KIND: sc.KIND_TOOL, sc.DAG_NODE: "missing", sc.EVENT_DEPTH: 3,
                                    sc.GEN_AI_TOOL_NAME: "t", "password": "hunter2"}, failed=True),
        span(6, 4, "GET /x", {"http.method": "GET"}),
        span(7, 6, "code", {sc.SPAN_KIND: sc.KIND_CODE, sc.DAG_NODE: "a", sc.EVENT_DEPTH: 2,
                            sc.CODE_EXIT_CODE: 1}),
    ]


def cases() -> dict[str, list[list[ReadableSpan]]]:
    """Every case: the batches, in the order they are written (then all of them once more)."""
    from . import cmbagent_runs, scenario

    def shaped(run: Callable[[cmbagent_runs.Shaper], None]) -> Callable[[Any], None]:
        return lambda provider: run(cmbagent_runs.Shaper(provider.get_tracer("reference")))

    def scripted(provider: Any) -> None:
        scenario.run_scenario(foreign=provider)

    base = _recorded(scripted)
    control = _normalised(base, 0x1111, None)
    content = _normalised(base, 0x2222, _messages)
    pc = _normalised(_recorded(shaped(cmbagent_runs.planning_and_control)), 0x3333, None)
    one_shot = _normalised(_recorded(shaped(cmbagent_runs.one_shot)), 0x4444, None)
    plain = _normalised(_recorded(shaped(cmbagent_runs.plain_ag2)), 0x5555, None)
    user_span = _normalised(_recorded(shaped(cmbagent_runs.plain_ag2_in_user_span)), 0x6666, None)
    return {
        "scenario_one_batch": [control],
        "scenario_reversed_batches_of_4": _batches(control[::-1], 4),
        "scenario_content_batches_of_5": _batches(content, 5),
        "planning_and_control_batches_of_7": _batches(pc, 7),
        "one_shot_and_plain_ag2_one_batch": [one_shot + plain + user_span],
        "three_runs_interleaved_batches_of_3": _batches(sorted(pc + one_shot + plain, key=lambda s: s.end_time or 0),
                                                        3),
        "odd_spans_one_by_one": _batches(_odd_spans(), 1),
    }


def pg_schema(base: str) -> AbstractContextManager[str]:
    """A fresh schema on the PostgreSQL server ``base`` (the tests' helper; importable outside pytest)."""
    from tests.conftest import schema_in

    return schema_in(base, prefix="r")


def stored_rows(url: str) -> dict[str, list[list[Any]]]:
    """Every tracked table's rows exactly as stored (autoincrement ids left out), sorted."""
    from sqlalchemy import create_engine, inspect

    from cmbagent_otel.dag.schema import TRACKING_TABLES

    engine = create_engine(url)
    out: dict[str, list[list[Any]]] = {}
    try:
        with engine.connect() as conn:
            pg = conn.dialect.name == "postgresql"
            for table in TRACKING_TABLES:
                cols = [c["name"] for c in inspect(conn).get_columns(table)
                        if not (table in AUTOINCREMENT and c["name"] == "id")]
                select = ", ".join(f"{c}::text" if pg else c for c in cols)
                rows = [list(r) for r in conn.exec_driver_sql(f"SELECT {select} FROM {table}")]
                out[table] = sorted(rows, key=lambda r: json.dumps(r, default=str))
    finally:
        engine.dispose()
    return out


def write_case(url: str, batches: list[list[ReadableSpan]]) -> dict[str, list[list[Any]]]:
    from cmbagent_otel.dag.writer import DagWriter

    writer = DagWriter(url)
    try:
        for _ in range(2):  # a second delivery of everything must change nothing
            for batch in batches:
                writer.write(batch)
    finally:
        writer.close()
    return stored_rows(url)


def as_json(rows: dict[str, list[list[Any]]]) -> dict[str, list[list[Any]]]:
    """Rows with every value JSON can hold exactly (floats kept as their repr)."""
    return {t: [[repr(v) if isinstance(v, float) else v for v in r] for r in rows_] for t, rows_ in rows.items()}


def generate(tmp: Path) -> dict[str, Any]:
    out: dict[str, Any] = {"cases": {}}
    pg_base = os.environ.get(PG_ENV)
    for name, made in cases().items():
        # exactly what the test reads back from the file (attribute keys sorted there)
        records = json.loads(json.dumps([[span_to_record(s) for s in b] for b in made], sort_keys=True))
        entry: dict[str, Any] = {"batches": records, "rows": {}}
        batches = batches_of(entry)
        entry["rows"]["sqlite"] = as_json(write_case(f"sqlite:///{tmp}/{name}.db", batches))
        if pg_base:
            with pg_schema(pg_base) as url:
                entry["rows"]["postgresql"] = as_json(write_case(url, batches))
        out["cases"][name] = entry
    return out


def load() -> dict[str, Any]:
    return json.loads(FIXTURE.read_text(encoding="utf-8"))  # type: ignore[no-any-return]


def batches_of(entry: dict[str, Any]) -> list[list[ReadableSpan]]:
    return [[record_to_span(r) for r in b] for b in entry["batches"]]


def main(argv: list[str] | None = None) -> int:
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", type=Path, required=True)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        data = generate(Path(tmp))
    args.write.write_text(json.dumps(data, indent=None, sort_keys=True, ensure_ascii=True) + "\n", encoding="utf-8")
    print(f"wrote {len(data['cases'])} cases to {args.write}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
