"""Values SQLite stores but PostgreSQL refuses must not cost a span (fourth fault campaign).

Each fault below made the DAG exporter's batch fail on PostgreSQL (the poison span was then
found by writing the batch in halves and dropped with a log line) while SQLite stored it:

* a float attribute that is NaN or +-Infinity (Python writes bare ``NaN``/``Infinity``,
  which PostgreSQL's ``json`` refuses: ``invalid input syntax for type json``);
* an LLM call costing $10,000 or more (``cost_records.cost_usd`` is ``NUMERIC(10, 6)`` in
  cmbagent's schema: ``numeric field overflow``); two costs near the float maximum even failed
  SQLite (``math.fsum``: ``intermediate overflow``);
* a span of 24.8 days or more (``duration_ms`` is an ``INTEGER``: ``integer out of range``), or
  with times past year 9999 (an app passing microseconds where the SDK wants nanoseconds:
  ``OverflowError`` on both databases).

Now each span is stored with the value made storable: non-finite floats as the strings
``"NaN"``/``"Infinity"``/``"-Infinity"``, the cost record clamped to the column (the event
keeps the true cost), ``duration_ms`` clamped to 2^31 - 1, times clamped to the year 9999.
"""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from cmbagent_otel.exporters.dag import DagSpanExporter
from opentelemetry import trace
from sqlalchemy import create_engine, text

import cmbagent_otel as c
from cmbagent_otel import semconv as sc
from cmbagent_otel._spans import TracedSpan
from cmbagent_otel.dag.statements import decode_json

from .conftest import expected_keys, stored_spans


def _export(url: str, spans: list[Any], tmp_path: Any) -> dict[str, int]:
    exporter = DagSpanExporter(url, spill_dir=tmp_path / "spill", timeout=20)
    try:
        assert exporter.export(spans).name == "SUCCESS"
        return exporter.stats()
    finally:
        exporter.shutdown()


def _rows(url: str, sql: str) -> list[Any]:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return list(conn.execute(text(sql)))
    finally:
        engine.dispose()


def _strict(raw: Any) -> Any:
    """JSON text (SQLite) or value (PostgreSQL) read back; text must be standard JSON."""
    if isinstance(raw, str):
        return json.loads(raw, parse_constant=lambda name: pytest.fail(f"non-standard JSON constant {name}"))
    return raw


def test_non_finite_floats_are_stored_as_json_strings(db_url: str, provider: Any, tmp_path: Any) -> None:
    tracer = provider.get_tracer("app")
    with c.workflow("nan", mode="planning-control"), c.phase("control"), c.step(1, "fit", agent="engineer"):
        with tracer.start_as_current_span("fit chi2") as span:
            span.set_attribute("fit.chi2", math.nan)
            span.set_attribute("fit.upper", math.inf)
            span.set_attribute("fit.bounds", [-math.inf, 0.5, math.inf])
        with tracer.start_as_current_span("fine") as span:
            span.set_attribute("fit.ok", 1.5)
    spans = list(provider.memory.get_finished_spans())
    stats = _export(db_url, spans, tmp_path)
    assert stats["dropped"] == 0 and stats["exported"] == len(spans)
    assert stored_spans(db_url) == expected_keys(spans)
    metas = [_strict(m) for m, in _rows(db_url, "SELECT meta FROM execution_events")]
    text_of = json.dumps(metas)
    assert '"NaN"' in text_of and '"Infinity"' in text_of and '"-Infinity"' in text_of


def _llm(cost: float) -> TracedSpan:
    return TracedSpan("chat gpt-4o", sc.KIND_LLM, {
        sc.GEN_AI_AGENT_NAME: "engineer", sc.GEN_AI_REQUEST_MODEL: "gpt-4o", sc.GEN_AI_RESPONSE_MODEL: "gpt-4o",
        sc.GEN_AI_USAGE_INPUT_TOKENS: 1000, sc.GEN_AI_USAGE_OUTPUT_TOKENS: 10, sc.LLM_COST_USD: cost})


@pytest.mark.parametrize("costs", [[12345.678], [-50000.0], [1.7e308, 1.7e308]], ids=["10k", "negative", "overflow"])
def test_costs_past_the_cost_column_are_clamped_not_dropped(db_url: str, provider: Any, tmp_path: Any,
                                                            costs: list[float]) -> None:
    with c.workflow("costly", mode="planning-control"), c.phase("control"), c.step(1, "fit", agent="engineer"):
        for cost in costs:
            with _llm(cost):
                pass
    spans = list(provider.memory.get_finished_spans())
    stats = _export(db_url, spans, tmp_path)
    assert stats["dropped"] == 0 and stats["exported"] == len(spans)
    assert stored_spans(db_url) == expected_keys(spans)
    event_costs = sorted(decode_json(m)["cost_usd"] for m, in _rows(
        db_url, "SELECT meta FROM execution_events WHERE event_type = 'agent_call' AND event_subtype = 'llm'"))
    assert event_costs == sorted(costs)  # the event keeps what the span said
    (stored,), = _rows(db_url, "SELECT cost_usd FROM cost_records")
    assert float(stored) == math.copysign(9999.999999, sum(costs))


def test_times_no_row_can_hold_are_clamped_not_dropped(db_url: str, provider: Any, tmp_path: Any) -> None:
    tracer = provider.get_tracer("app")
    month = 30 * 86400 * 10**9
    with c.workflow("odd times", mode="planning-control"), c.phase("control"), c.step(1, "fit", agent="engineer"):
        now = trace.get_current_span().start_time  # type: ignore[attr-defined]
        tracer.start_span("a month long", start_time=now - month).end(end_time=now)
        micros_as_nanos = now * 1000  # year ~55,000
        tracer.start_span("microseconds as nanoseconds", start_time=micros_as_nanos).end(end_time=micros_as_nanos + 1)
    spans = list(provider.memory.get_finished_spans())
    stats = _export(db_url, spans, tmp_path)
    assert stats["dropped"] == 0 and stats["exported"] == len(spans)
    assert stored_spans(db_url) == expected_keys(spans)
    rows = {decode_json(m)["span_id"]: (d, started) for m, d, started in _rows(
        db_url, "SELECT meta, duration_ms, started_at FROM execution_events")}
    by_name = {s.name: f"{s.context.span_id:016x}" for s in spans}
    assert rows[by_name["a month long"]][0] == 2**31 - 1
    assert str(rows[by_name["microseconds as nanoseconds"]][1]).startswith("9999-12-31")
