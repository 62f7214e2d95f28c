"""The live DAG: workflow and DAG-node rows show ``running`` while their spans run.

The durable batch processor queues a started record when a workflow or DAG-node span
starts; the writer inserts a ``running`` row (a run row ``executing``), which the finished
span later replaces, and a started record never replaces a finished row: any order of
arrival, any repetition, gives the rows of the finished spans alone.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cmbagent_otel.exporters.dag import DagSpanExporter
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SpanExportResult
from sqlalchemy import create_engine, inspect, select

from cmbagent_otel import phase, step, workflow
from cmbagent_otel._spans import workflow_tracers
from cmbagent_otel.dag.writer import DagWriter, T, dump_tables
from cmbagent_otel.processor import DurableBatchSpanProcessor, as_started

from .scenario import run_scenario


class NotifyingExporter(DagSpanExporter):
    """The real DAG exporter; it also tells the test when an export has finished (so the test
    waits for exports, never sleeps)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.exports = 0
        self.exported = threading.Condition()

    def export(self, spans: Any) -> SpanExportResult:
        result = super().export(spans)
        with self.exported:
            self.exports += 1
            self.exported.notify_all()
        return result


def _state(url: str) -> tuple[dict[str, str], list[tuple[str, str]]]:
    """Node status by short id, and (status, otel_source) of every run row."""
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            if not inspect(conn).has_table("dag_nodes"):
                return {}, []  # not migrated yet: nothing to show
            nodes = {(r.meta or {}).get("id"): r.status for r in conn.execute(select(T["dag_nodes"]))}
            runs = [(r.status, (r.meta or {}).get("otel_source")) for r in conn.execute(select(T["workflow_runs"]))]
    finally:
        engine.dispose()
    return nodes, runs


@pytest.fixture
def live(db_url: str, tmp_path: Path) -> Iterator[tuple[NotifyingExporter, TracerProvider]]:
    exporter = NotifyingExporter(db_url, spill_dir=tmp_path / "spill")
    provider = TracerProvider()
    provider.add_span_processor(DurableBatchSpanProcessor(exporter))
    try:
        with workflow_tracers.routed_to(provider):
            yield exporter, provider
    finally:
        provider.shutdown()


def test_a_long_step_is_running_in_the_database_while_it_runs(db_url: str, live: Any) -> None:
    exporter, provider = live
    inside, release = threading.Event(), threading.Event()
    failures: list[BaseException] = []

    def app() -> None:
        try:
            with workflow("live", mode="planning-control", task="watch me"), phase("control"), \
                    step(1, "wait for the test"):
                inside.set()
                assert release.wait(60)
        except BaseException as exc:  # reported by the test thread
            failures.append(exc)

    thread = threading.Thread(target=app)
    thread.start()
    try:
        assert inside.wait(30)
        deadline = time.monotonic() + 30
        while True:
            with exporter.exported:
                seen = exporter.exports
            nodes, runs = _state(db_url)
            if nodes.get("step_1") == "running":
                break
            with exporter.exported:
                assert exporter.exported.wait_for(lambda s=seen: exporter.exports > s,
                                                  max(0.0, deadline - time.monotonic())), (nodes, runs)
        assert nodes["control"] == "running"
        assert runs == [("executing", "workflow_started")]
        assert nodes.get("terminator") == "pending"
    finally:
        release.set()
        thread.join(30)
    assert not failures
    assert provider.force_flush()
    nodes, runs = _state(db_url)
    assert nodes["step_1"] == nodes["control"] == "completed"
    assert nodes["terminator"] == "completed"
    assert runs == [("completed", "workflow")]
    assert exporter.stats()["spilled"] == exporter.stats()["dropped"] == 0


def _started(span: ReadableSpan) -> ReadableSpan:
    """What the processor sends when ``span`` starts: a started record, no end time, status unset."""
    return as_started(span)


def _dump(url: str, batches: list[list[ReadableSpan]]) -> dict[str, Any]:
    writer = DagWriter(url)
    for batch in batches:
        writer.write(batch)
    writer.close()
    engine = create_engine(url)
    with engine.connect() as conn:
        rows = dump_tables(conn)
    engine.dispose()
    return rows


@pytest.mark.parametrize("order", ["finished_then_started", "started_then_finished", "one_batch",
                                   "started_twice_between"])
def test_started_records_never_change_the_finished_rows(tmp_path: Path, provider: Any, order: str) -> None:
    run_scenario()
    finished = list(provider.memory.get_finished_spans())
    started = [_started(s) for s in finished if (s.attributes or {}).get("cmbagent.dag.node_type")
               or (s.attributes or {}).get("cmbagent.span.kind") == "workflow"]
    assert len(started) >= 8
    reference = _dump(f"sqlite:///{tmp_path}/reference.db", [finished])
    batches = {
        "finished_then_started": [finished, started],
        "started_then_finished": [started, finished],
        "one_batch": [started + finished + started],
        "started_twice_between": [started, started, finished[:5], started, finished[5:], started],
    }[order]
    assert _dump(f"sqlite:///{tmp_path}/{order}.db", batches) == reference


def test_started_records_alone_give_running_rows_and_repeat_idempotently(db_url: str, provider: Any) -> None:
    run_scenario()
    started = [_started(s) for s in provider.memory.get_finished_spans()
               if (s.attributes or {}).get("cmbagent.dag.node_type")
               or (s.attributes or {}).get("cmbagent.span.kind") == "workflow"]
    first = _dump(db_url, [started])
    assert _dump(db_url, [started]) == first
    nodes, runs = _state(db_url)
    # the run, and the branch runs of its two redo attempts, all still going
    assert sorted(runs) == [("executing", "branch"), ("executing", "branch"), ("executing", "workflow_started")]
    assert {status for short, status in nodes.items() if short != "terminator"} == {"running", "completed"}
    assert {short for short, status in nodes.items() if status == "completed"} == {"branch_at_step_2"}
    engine = create_engine(db_url)
    with engine.connect() as conn:
        assert [r.status for r in conn.execute(select(T["branches"]))] == ["active", "active"]  # cmbagent's word
    engine.dispose()


def test_started_records_are_never_spilled_nor_counted(tmp_path: Path, provider: Any) -> None:
    run_scenario()
    finished = list(provider.memory.get_finished_spans())
    exporter = DagSpanExporter(f"sqlite:///{tmp_path}/no/such/dir/\0bad.db", timeout=0.2, spill_dir=tmp_path / "spill")
    exporter.export([_started(finished[-1]), *finished])
    stats = exporter.stats()
    assert stats["spilled"] + stats["dropped"] == len(finished)
    exporter.shutdown()


def test_only_workflow_and_node_spans_are_sent_started_and_only_to_exporters_that_take_them(tmp_path: Path) -> None:
    class Keep(DagSpanExporter):
        def __init__(self) -> None:
            super().__init__(f"sqlite:///{tmp_path}/k.db", spill=False)
            self.got: list[ReadableSpan] = []

        def export(self, spans: Any) -> SpanExportResult:
            self.got.extend(spans)
            return SpanExportResult.SUCCESS

    class Plain(Keep):
        accepts_started_spans = False

    for exporter, expect in ((Keep(), True), (Plain(), False)):
        provider = TracerProvider()
        processor = DurableBatchSpanProcessor(exporter)
        provider.add_span_processor(processor)
        try:
            with workflow_tracers.routed_to(provider), workflow("w", mode="one-shot", task="t"), phase("control"):
                assert processor.force_flush()
                running = [s.name for s in exporter.got if s.end_time is None]
        finally:
            provider.shutdown()
        assert running == (["workflow w", "phase control"] if expect else [])
        assert all(s.end_time is not None for s in exporter.got[len(running):])


def test_a_span_without_end_time_that_is_no_started_record_is_written(db_url: str, provider: Any) -> None:
    # an OTLP span with end_time_unix_nano 0 decodes to end_time None: a span all the same
    run_scenario()
    finished = list(provider.memory.get_finished_spans())
    open_ended = [ReadableSpan(name=s.name, context=s.context, parent=s.parent, resource=s.resource,
                               attributes=s.attributes, events=s.events, kind=s.kind, status=s.status,
                               instrumentation_scope=s.instrumentation_scope, start_time=s.start_time, end_time=None)
                  for s in finished]
    exporter = DagSpanExporter(db_url, spill=False)
    assert exporter.export(open_ended) is SpanExportResult.SUCCESS
    assert exporter.stats()["exported"] == len(finished)
    exporter.shutdown()
    nodes, runs = _state(db_url)
    assert runs and all(status != "executing" for status, _ in runs)
    assert "running" not in nodes.values() and "step_1" in nodes
    engine = create_engine(db_url)
    with engine.connect() as conn:
        events = conn.execute(select(T["execution_events"].c.event_type, T["execution_events"].c.completed_at)).all()
    engine.dispose()
    assert {e.event_type for e in events} >= {"agent_call", "code_exec"}
    assert all(e.completed_at is None for e in events if e.event_type != "handoff")
