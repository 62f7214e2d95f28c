"""Executed code gets its execute_code span's trace context (TRACEPARENT/TRACESTATE) in its environment."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from cmbagent_otel.exporters.dag import DagSpanExporter
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from sqlalchemy import create_engine, text

import cmbagent_otel
from cmbagent_otel.dag.mapping import event_db_id, run_id_of
from cmbagent_otel.demo import group_chat_step

SCIENTIST = """
import os
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from cmbagent_otel.exporters.dag import DagSpanExporter

carrier = {"traceparent": os.environ["TRACEPARENT"]}
if "TRACESTATE" in os.environ:
    carrier["tracestate"] = os.environ["TRACESTATE"]
context = TraceContextTextMapPropagator().extract(carrier)
provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(DagSpanExporter(%r)))
with provider.get_tracer("scientist.analysis").start_as_current_span("fit the peaks", context=context):
    pass
provider.shutdown()
print("scientist span done")
"""


def test_executed_code_joins_the_trace_and_the_db_run(tmp_path: Path, monkeypatch: Any) -> None:
    # AG2's executor runs `python` from PATH: the one of this venv, which has the OTel SDK
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("TRACEPARENT", raising=False)
    url = f"sqlite:///{tmp_path}/runs.db"
    memory = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    provider.add_span_processor(SimpleSpanProcessor(DagSpanExporter(url)))
    environ_before = dict(os.environ)
    cmbagent_otel.instrument(tracer_provider=provider, instrument_cmbagent=False)
    try:
        with cmbagent_otel.workflow("context"), cmbagent_otel.phase("control"), cmbagent_otel.step(1, "fit"):
            result = group_chat_step(str(tmp_path), [f"```python\n{SCIENTIST % url}\n```"],
                                     ["engineer", "executor", "researcher"])
    finally:
        cmbagent_otel.uninstrument()
        provider.shutdown()
    assert "scientist span done" in json.dumps(result.chat_history)
    assert dict(os.environ) == environ_before  # the app's environment was never changed

    code = next(s for s in memory.get_finished_spans() if s.name == "execute_code python")
    run_id = run_id_of(code.context.trace_id)
    engine = create_engine(url)
    with engine.connect() as conn:
        row = conn.execute(text("SELECT run_id, parent_event_id, node_id FROM execution_events "
                                "WHERE meta LIKE '%fit the peaks%'")).one()
        code_row = conn.execute(text("SELECT node_id FROM execution_events WHERE id = :id"),
                                {"id": event_db_id(code.context.trace_id, code.context.span_id)}).one()
    engine.dispose()
    # same trace, same DB run, under the execute_code event (and its DAG node)
    assert row.run_id == run_id
    assert row.parent_event_id == event_db_id(code.context.trace_id, code.context.span_id)
    assert row.node_id == code_row.node_id is not None


def test_only_processes_started_by_a_code_execution_get_it(tmp_path: Path, capture: Any) -> None:
    """Outside an execute_code span (another thread, the app itself) subprocesses start untouched."""
    probe = [sys.executable, "-c", "import os; print(os.environ.get('TRACEPARENT', 'none'))"]
    cmbagent_otel.instrument(tracer_provider=capture.provider, instrument_cmbagent=False)
    seen: list[str] = []
    started = threading.Event()
    release = threading.Event()

    try:
        from cmbagent_otel.instrumentation import _subprocess_context

        def other_thread() -> None:
            started.wait(10)
            seen.append(subprocess.run(probe, capture_output=True, text=True, check=True).stdout.strip())
            release.set()

        worker = threading.Thread(target=other_thread)
        worker.start()
        with cmbagent_otel.workflow("w"):
            from opentelemetry import trace

            token = _subprocess_context.enter(trace.get_current_span())
            try:
                started.set()
                release.wait(10)
                inside = subprocess.run(probe, capture_output=True, text=True, check=True).stdout.strip()
            finally:
                _subprocess_context.leave(token)
            root = trace.get_current_span().get_span_context()
        worker.join(10)
        outside = subprocess.run(probe, capture_output=True, text=True, check=True).stdout.strip()
    finally:
        cmbagent_otel.uninstrument()
    assert seen == ["none"] and outside == "none"
    assert inside == f"00-{root.trace_id:032x}-{root.span_id:016x}-{int(root.trace_flags):02x}"


def test_the_child_environment_keeps_the_callers_key_type(capture: Any, monkeypatch: Any) -> None:
    """An env of str keys, of bytes keys, or none (os.environ): the child gets the caller's variables,
    this span's TRACEPARENT, and no stale TRACESTATE (the key-type check settles all-str envs in C)."""
    probe = [sys.executable, "-c", "import os; print(os.environ.get('TRACEPARENT', 'none'), "
             "os.environ.get('TRACESTATE', 'none'), os.environ.get('KEPT', 'none'))"]
    monkeypatch.setenv("TRACESTATE", "stale=1")
    monkeypatch.setenv("KEPT", "from-os-environ")
    base = {key: value for key, value in os.environ.items() if key not in ("TRACESTATE", "KEPT")}
    envs: dict[str, Any] = {
        "none": None,
        "str": {**base, "TRACESTATE": "stale=2", "KEPT": "str"},
        "bytes": {**{k.encode(): v.encode() for k, v in base.items()}, b"TRACESTATE": b"stale=3", b"KEPT": b"bytes"},
    }
    cmbagent_otel.instrument(tracer_provider=capture.provider, instrument_cmbagent=False)
    try:
        from cmbagent_otel.instrumentation import _subprocess_context

        with cmbagent_otel.workflow("w"):
            from opentelemetry import trace

            root = trace.get_current_span().get_span_context()
            token = _subprocess_context.enter(trace.get_current_span())
            try:
                seen = {name: subprocess.run(probe, env=env, capture_output=True, text=True, check=True).stdout.split()
                        for name, env in envs.items()}
            finally:
                _subprocess_context.leave(token)
    finally:
        cmbagent_otel.uninstrument()
    parent = f"00-{root.trace_id:032x}-{root.span_id:016x}-{int(root.trace_flags):02x}"
    assert seen == {"none": [parent, "none", "from-os-environ"], "str": [parent, "none", "str"],
                    "bytes": [parent, "none", "bytes"]}
    assert os.environ["TRACESTATE"] == "stale=1"  # os.environ itself never changed
