"""Keys in the attributes that fill row columns, and in the ids an application passes (35th attack campaign).

The DAG mapping redacts every span's meta, name, error and message contents, but reads the attributes
that fill row columns and the node and run facts (a workflow's name, task, task id, mode, agent and
model; the session id; node ids and parent node ids; a phase, a step's goal and agent; handoff
agents) as they are, because our instrumentation redacts them when it records them. An ingest
client's spans are not ours: a key in those attributes went into ``workflow_runs``, ``dag_nodes``,
``sessions`` and ``session_states``. And ``workflow(session_id=..., task_id=...)`` kept the ids as
given (not cut like text, as ids key rows): a key there reached every span's ``cmbagent.session.id``
and ``session.id`` attributes and the rows. Now the ingest redacts those attributes of each span
(``mapping.redact_columns``) and ``workflow`` passes the ids through ``redaction.redact_id`` (an
ordinary id is kept as it is).
"""

from __future__ import annotations

import json
import secrets
import urllib.request
from pathlib import Path
from typing import Any

from cmbagent_otel import phase, semconv, step, workflow
from cmbagent_otel.ingest import IngestServer

from ._attack_helpers import otlp_doc, rows_holding

KEY = "sk-proj-" + secrets.token_hex(24)
COLUMN_KEYS = ["cmbagent.workflow.name", "cmbagent.workflow.task_id", "cmbagent.workflow.work_dir",
               "cmbagent.workflow.mode", "cmbagent.workflow.agent", "cmbagent.workflow.model",
               "cmbagent.workflow.task", "cmbagent.session.id", "cmbagent.dag.parent_node", "cmbagent.phase",
               "cmbagent.step.agent", "cmbagent.step.goal", "gen_ai.agent.name", "cmbagent.conversation.initiator",
               "cmbagent.conversation.recipient", "gen_ai.request.model", "cmbagent.branch.name",
               "cmbagent.handoff.from", "cmbagent.handoff.to"]


def _attr(key: str, value: str) -> dict[str, Any]:
    return {"key": key, "value": {"stringValue": value}}


def test_an_ingest_clients_column_attributes_are_redacted(tmp_path: Path) -> None:
    trace_id, root = secrets.token_hex(16), secrets.token_hex(8)
    spans = []
    for index, kind in enumerate(["workflow", "phase", "step", "agent", "conversation", "handoff", None]):
        attributes = [_attr(k, f"{k} {KEY}") for k in COLUMN_KEYS]
        attributes += [_attr("cmbagent.dag.node", f"n{index} {KEY}"), _attr("cmbagent.dag.node_type", "agent")]
        if kind is not None:
            attributes.append(_attr("cmbagent.span.kind", kind))
        spans.append({
            "traceId": trace_id, "spanId": root if index == 0 else secrets.token_hex(8),
            **({"parentSpanId": root} if index else {}), "name": "span", "kind": 1,
            "startTimeUnixNano": "1700000000000000000", "endTimeUnixNano": "1700000001000000000",
            "attributes": attributes,
            "events": [{"timeUnixNano": "1700000000500000000", "name": "cmbagent.handoff", "attributes": [
                _attr("cmbagent.span.kind", "speaker_selection"), _attr("cmbagent.handoff.from", f"a {KEY}"),
                _attr("cmbagent.handoff.to", f"b {KEY}")]}]})
    doc = otlp_doc(spans, "cmbagent_otel")
    db = tmp_path / "ingest.db"
    with IngestServer(f"sqlite:///{db}", host="127.0.0.1", port=0, grpc_port="off") as srv:
        request = urllib.request.Request(srv.endpoint, data=json.dumps(doc).encode(), method="POST",
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as answer:
            assert answer.status == 200
    assert rows_holding(db, "[REDACTED]")  # the rows are there
    assert rows_holding(db, KEY[8:24]) == []  # 35 columns held it before (runs, nodes, sessions)


def test_ids_a_workflow_is_given_are_redacted_when_they_hold_a_key(tmp_path: Path, provider: Any) -> None:
    with workflow("fit", session_id=f"lab {KEY}", task_id=f"task-{KEY}"), phase("control"), step(1, "fit"):
        pass
    ordinary = ("3f2c9a1e-8b7d-4c6e-9f0a-1b2c3d4e5f60", "lab_session_7")
    for session in ordinary:
        with workflow("fit", session_id=session, task_id=session):
            pass
    spans = provider.memory.get_finished_spans()
    texts = [str(v) for s in spans for v in (s.attributes or {}).values()]
    assert not [t for t in texts if KEY[8:24] in t]  # session.id and task_id held it before
    sessions = {(s.attributes or {}).get(semconv.SESSION_ID) for s in spans}
    assert set(ordinary) <= sessions  # ordinary ids are kept as they are
    db = tmp_path / "app.db"
    provider.store(f"sqlite:///{db}")
    assert rows_holding(db, KEY[8:24]) == []


def _decoded(spans: list[dict[str, Any]]) -> list[Any]:
    """``spans`` (OTLP/JSON) as the ingest decodes them."""
    from cmbagent_otel.otlp_decode import decode_json

    doc = otlp_doc(spans, "cmbagent_otel")
    return list(decode_json(json.dumps(doc).encode(), json_safe=True).spans)


def test_spans_with_nothing_to_redact_are_kept_and_the_rest_still_redacted() -> None:
    """redact_columns returns a span with nothing to redact as it is, events or not, and still redacts
    a key in a column attribute, a column tuple's item or an event's column attribute. On d1ab575 every
    span with an event was rebuilt (its events compared by identity with a tuple ``span.events`` makes
    anew at every read)."""
    from cmbagent_otel.dag.mapping import redact_columns

    trace_id = secrets.token_hex(16)

    def span(attributes: list[dict[str, Any]], event: list[dict[str, Any]]) -> dict[str, Any]:
        return {"traceId": trace_id, "spanId": secrets.token_hex(8), "name": "span", "kind": 1,
                "startTimeUnixNano": "1700000000000000000", "endTimeUnixNano": "1700000001000000000",
                "attributes": attributes,
                "events": [{"timeUnixNano": "1700000000500000000", "name": "cmbagent.handoff",
                            "attributes": event}] if event else []}

    def candidates(*names: str) -> dict[str, Any]:
        return {"key": "cmbagent.handoff.candidates",
                "value": {"arrayValue": {"values": [{"stringValue": n} for n in names]}}}

    clean = [_attr("cmbagent.span.kind", "agent"), _attr("gen_ai.agent.name", "engineer"), candidates("a", "b")]
    clean_event = [_attr("cmbagent.span.kind", "speaker_selection"), _attr("cmbagent.handoff.from", "a")]
    decoded = _decoded([
        span(clean, clean_event), span(clean, []), span([_attr("other", "x")], clean_event),
        span([*clean, _attr("gen_ai.request.model", f"m {KEY}")], clean_event),
        span([*clean[:2], candidates("a", f"b {KEY}")], clean_event),
        span(clean, [*clean_event, _attr("cmbagent.handoff.to", f"b {KEY}")]),
    ])
    for _ in range(2):  # the second time every clean text is a memo hit
        out = redact_columns(decoded)
        assert [o is d for o, d in zip(out, decoded, strict=True)] == [True, True, True, False, False, False]
        assert out[3].attributes["gen_ai.request.model"] == "m [REDACTED]"
        assert out[4].attributes["cmbagent.handoff.candidates"] == ("a", "b [REDACTED]")
        assert out[5].events[0].attributes["cmbagent.handoff.to"] == "b [REDACTED]"
        assert out[5].events[0].attributes["cmbagent.handoff.from"] == "a"
