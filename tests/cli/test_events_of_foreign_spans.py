"""``cmbagent-otel events --node`` lists the spans of other instrumentations inside the node.

A span of another instrumentation (an HTTP client, the application's own tracer) directly
under a plan step had no node: its parent span is the step's, which is a DAG node and no
event, so ``events --node step_1 -r`` left it out (found by the second fault campaign).
It now belongs to the node whose span is its parent, at the node's top level, and its own
descendants follow it; written in one batch or one span per batch (the foreign span ends,
and may be written, before the step it is under).
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
from sqlalchemy import create_engine, text

import cmbagent_otel as c
from cmbagent_otel.cli import main
from cmbagent_otel.dag.mapping import node_db_id
from cmbagent_otel.dag.writer import DagWriter


def scenario(provider: Any) -> None:
    tracer = provider.get_tracer("other.instrumentation")
    with c.workflow("foreign under a step", mode="planning-control"), c.phase("control"):
        with c.step(1, "load the maps", agent="engineer"), tracer.start_as_current_span("GET /maps"), \
                tracer.start_as_current_span("dns lookup"):
            pass
        with c.step(2, "fit", agent="engineer"), tracer.start_as_current_span("POST /fit"):
            pass


@pytest.mark.parametrize("batches", ["one", "each"])
def test_a_foreign_span_under_a_step_is_an_event_of_the_step(db_url: str, provider: Any, batches: str,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    scenario(provider)
    spans = list(provider.memory.get_finished_spans())  # in end order: the foreign ones first
    writer = DagWriter(db_url)
    for part in ([spans] if batches == "one" else [[s] for s in spans]):
        writer.write(part)
    writer.close()
    run_id = str(uuid.UUID(int=spans[0].context.trace_id))
    assert main(["--db", db_url, "events", run_id, "--node", "step_1", "-r", "--format", "json"]) == 0
    step_1 = [(e["name"], e["node"], e["depth"]) for e in json.loads(capsys.readouterr().out)]
    assert step_1 == [("GET /maps", "step_1", 0), ("dns lookup", "step_1", 1)]
    assert main(["--db", db_url, "events", run_id, "--node", "step_2", "--format", "json"]) == 0
    assert [(e["name"], e["node"]) for e in json.loads(capsys.readouterr().out)] == [("POST /fit", "step_2")]
    engine = create_engine(db_url)
    with engine.connect() as conn:
        rows = {json.loads(r.meta)["span_name"] if isinstance(r.meta, str) else r.meta["span_name"]: r
                for r in conn.execute(text("SELECT id, node_id, parent_event_id, meta FROM execution_events"))}
    engine.dispose()
    assert rows["GET /maps"].node_id == node_db_id(run_id, "step_1") and rows["GET /maps"].parent_event_id is None
    assert rows["dns lookup"].parent_event_id == rows["GET /maps"].id
