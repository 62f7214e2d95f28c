"""What a user sees of real cmbagent runs in Jaeger and in Arize Phoenix, against the DB rows (session 31).

One application process runs the real package's entry points one after the other (offline, against the
scripted backend) with ``instrument()`` and ``OTEL_TRACES_EXPORTER=otlp,cmbagent_dag``: OTLP/HTTP to a real
Jaeger v2 (the SDK's own exporter, from the environment), the same spans to a real Phoenix (a second
OTLP exporter), the DAG rows to SQLite. The traces are read back through each backend's query API once
the process has exited, and held to what a reader needs: one trace per run under the service's name,
every parent present, durations non-negative and children inside their parents, names that say what a
span is (phases, numbered plan steps, agents, tools, code runs), the failing program and the failed
attempt red, a bounded number of spans, and the same counts as the run's DB rows (steps, model calls,
tool calls, code runs, human turns, tokens). Phoenix classifies our spans from the GenAI attributes
alone (``gen_ai.operation.name``): model calls LLM with the model name and token counts, agent turns
AGENT, tool calls TOOL; the others (workflow, phases, steps, conversations, code runs) have no GenAI kind
and are listed ``UNKNOWN``.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, select

pytest.importorskip("cmbagent", reason="cmbagent is not installed (it needs Python >= 3.12; see docs/cmbagent.md)")

from cmbagent_otel.dag.writer import T
from tests.jaeger.support import (
    ARRIVAL_DEADLINE_S,
    JAEGER_CONFIG,
    POLL_S,
    free_ports,
    http_get,
    run_jaeger,
    service,
)

pytestmark = [pytest.mark.cmbagent_autogen, pytest.mark.jaeger, pytest.mark.phoenix]

ROOT = Path(__file__).resolve().parents[2]
SERVICE = "cmbagent-view"
# (entry point kind, first program fails, options): one run each, in this order
RUNS: tuple[tuple[str, bool, dict[str, Any]], ...] = (
    ("planning_and_control", True, {}),
    ("planning_and_control", True, {"max_n_attempts": 1}),   # step 1 out of attempts: the plan stops, failed
    ("one_shot", True, {}),
    ("control", False, {}),
    ("deep_research", False, {}),
    ("human_in_the_loop", False, {}),
    ("carryover", True, {}),
    ("get_keywords_unesco", False, {}),
    ("summarize_documents", False, {}),
    ("preprocess_task", False, {}),
)
ROOT_NAME = {"carryover": "workflow planning_and_control_context_carryover",
             "get_keywords_unesco": "workflow get_keywords"}

# the app: instrument(), run every entry point of RUNS, write the spans it exported per trace, exit
DRIVER = """
import contextlib, io, json, os, sys, tempfile
from pathlib import Path
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
import cmbagent_otel
from cmbagent_otel.provider import build_tracer_provider
from cmbagent_otel.testing import FakeOpenAIServer
from tests.integration_cmbagent.scripted_cmbagent import API_KEYS, call_workflow, script_for
runs, phoenix, out = json.loads(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
os.environ["OPENAI_API_KEY"] = API_KEYS["OPENAI"]
memory = InMemorySpanExporter()
# OTEL_TRACES_EXPORTER=otlp,cmbagent_dag from the environment, plus Phoenix and a local copy
provider = build_tracer_provider(span_exporters=[OTLPSpanExporter(endpoint=phoenix + "/v1/traces"), memory])
cmbagent_otel.instrument(tracer_provider=provider)
for i, (kind, fail, options) in enumerate(runs):
    script = script_for(kind, fail_first_code=fail)
    work = Path.cwd() / f"{i}-{kind}"
    work.mkdir()
    with FakeOpenAIServer(request_responder=script) as server:
        os.environ["OPENAI_BASE_URL"] = server.base_url
        with contextlib.redirect_stdout(io.StringIO()):
            call_workflow(kind, work, **options)
    assert not script.unexpected, script.unexpected
provider.force_flush()
counts = {}
for s in memory.get_finished_spans():
    key = format(s.context.trace_id, "032x")
    counts[key] = counts.get(key, 0) + 1
out.write_text(json.dumps(counts))
"""


@contextlib.contextmanager
def _phoenix(work: Path) -> Iterator[str]:
    binary = os.environ.get("CMBAGENT_OTEL_PHOENIX_BIN", "")
    if not binary or not Path(binary).is_file():
        pytest.skip("CMBAGENT_OTEL_PHOENIX_BIN is not set to Phoenix's executable (.ci/setup-phoenix.sh)")
    with free_ports(2, every_address=True) as (http_port, grpc_port):
        (work / "phoenix").mkdir()
        env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
        env.update(PHOENIX_WORKING_DIR=str(work / "phoenix"), PHOENIX_HOST="127.0.0.1", PHOENIX_PORT=str(http_port),
                   PHOENIX_GRPC_PORT=str(grpc_port), PHOENIX_TELEMETRY_ENABLED="false")
        base = f"http://127.0.0.1:{http_port}"

        def ready() -> bool:
            try:
                return http_get(f"{base}/healthz")[0] == 200
            except OSError:
                return False

        with service("phoenix", [binary, "serve"], env, work / "phoenix.log", ready):
            yield base


def _jaeger_traces(query: str, expected: dict[str, int]) -> dict[str, list[dict[str, Any]]]:
    """Jaeger's traces of SERVICE once every span the app exported is there."""
    deadline = time.monotonic() + ARRIVAL_DEADLINE_S
    while True:
        _, found = http_get(f"{query}/api/traces?service={SERVICE}&limit=100")
        traces = {t["traceID"].rjust(32, "0"): t for t in (found or {}).get("data") or []}
        if {k: len(t["spans"]) for k, t in traces.items()} == expected or time.monotonic() > deadline:
            return traces
        time.sleep(POLL_S)


def _phoenix_spans(base: str, expected: dict[str, int]) -> dict[str, list[dict[str, Any]]]:
    """Phoenix's spans of the project, by trace, once every span the app exported is there."""
    deadline = time.monotonic() + ARRIVAL_DEADLINE_S
    while True:
        spans: list[dict[str, Any]] = []
        cursor = None
        while True:
            query = {"limit": "1000", **({"cursor": cursor} if cursor else {})}
            status, page = http_get(f"{base}/v1/projects/{SERVICE}/spans?{urllib.parse.urlencode(query)}")
            if status != 200:
                break
            spans += page["data"]
            cursor = page.get("next_cursor")
            if not cursor:
                break
        by_trace: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
        for s in spans:
            by_trace[s["context"]["trace_id"]].append(s)
        if {k: len(v) for k, v in by_trace.items()} == expected or time.monotonic() > deadline:
            return dict(by_trace)
        time.sleep(POLL_S)


def _db_rows(url: str) -> dict[str, dict[str, Any]]:
    """Per run (by trace id): the run row, its nodes and events, its cost tokens."""
    engine = create_engine(url)
    out: dict[str, dict[str, Any]] = {}
    try:
        with engine.connect() as conn:
            for run in conn.execute(select(T["workflow_runs"])).mappings():
                rid = run["id"]
                nodes = [dict(n) for n in conn.execute(select(T["dag_nodes"]).where(T["dag_nodes"].c.run_id == rid))
                         .mappings()]
                events = [dict(e) for e in conn.execute(
                    select(T["execution_events"]).where(T["execution_events"].c.run_id == rid)).mappings()]
                costs = conn.execute(select(T["cost_records"]).where(T["cost_records"].c.run_id == rid)).mappings()
                out[rid.replace("-", "")] = {"run": dict(run), "nodes": nodes,
                                             "events": [e for e in events if e["event_subtype"] != "start"],
                                             "tokens": sum(c["total_tokens"] for c in costs)}
    finally:
        engine.dispose()
    return out


def _meta(row: dict[str, Any]) -> dict[str, Any]:
    meta = row.get("meta")
    return json.loads(meta) if isinstance(meta, str) else (meta or {})


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    work = tmp_path_factory.mktemp("view")
    app = work / "app"
    (app / "chats").mkdir(parents=True)   # cmbagent's fork writes every group chat into chats/ of the cwd
    with run_jaeger(JAEGER_CONFIG, work, "jaeger") as jaeger, _phoenix(work) as phoenix:
        env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_") and k != "SSL_CERT_FILE"}
        (work / "no-ca").mkdir()
        env.update(OTEL_TRACES_EXPORTER="otlp,cmbagent_dag", OTEL_EXPORTER_OTLP_PROTOCOL="http/protobuf",
                   OTEL_EXPORTER_OTLP_ENDPOINT=jaeger.otlp_http, OTEL_SERVICE_NAME=SERVICE,
                   OTEL_RESOURCE_ATTRIBUTES=f"openinference.project.name={SERVICE}",
                   CMBAGENT_OTEL_DATABASE_URL=f"sqlite:///{work / 'cmbagent.db'}", CMBAGENT_DISABLE_DISPLAY="true",
                   SSL_CERT_DIR=str(work / "no-ca"),   # the loopback clients need no CA bundle (conftest)
                   PYTHONPATH=os.pathsep.join([str(ROOT / "src"), str(ROOT)]))
        counts = work / "counts.json"
        proc = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(RUNS), phoenix, str(counts)], env=env,
                              cwd=app, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-4000:]
        expected = json.loads(counts.read_text())
        _, services = http_get(f"{jaeger.query}/api/services")
        yield {"expected": expected, "services": services["data"],
               "jaeger": _jaeger_traces(jaeger.query, expected), "phoenix": _phoenix_spans(phoenix, expected),
               "db": _db_rows(f"sqlite:///{work / 'cmbagent.db'}")}


def _tags(span: dict[str, Any]) -> dict[str, Any]:
    return {t["key"]: t["value"] for t in span["tags"]}


def _runs_in_order(exported: dict[str, Any]) -> list[tuple[tuple[str, bool, dict[str, Any]], str]]:
    by_start = sorted(exported["db"], key=lambda k: exported["db"][k]["run"]["started_at"])
    assert len(by_start) == len(RUNS)
    return list(zip(RUNS, by_start, strict=True))


def test_one_trace_per_run_whole_and_nested(exported: dict[str, Any]) -> None:
    """Each run is one trace in Jaeger under the service's name, with every span the app exported: one
    root (the workflow), no span whose parent is missing, no Jaeger warning (clock skew, bad references),
    durations non-negative and every child inside its parent's time."""
    assert SERVICE in exported["services"]
    jaeger = exported["jaeger"]
    assert set(jaeger) == set(exported["db"]) == set(exported["expected"])
    for (kind, _, _), trace_id in _runs_in_order(exported):
        spans = jaeger[trace_id]["spans"]
        assert len(spans) == exported["expected"][trace_id], kind
        assert {p["serviceName"] for p in jaeger[trace_id]["processes"].values()} == {SERVICE}
        by_id = {s["spanID"]: s for s in spans}
        parent = {s["spanID"]: next((r["spanID"] for r in s["references"] if r["refType"] == "CHILD_OF"), None)
                  for s in spans}
        assert all(p is None or p in by_id for p in parent.values()), kind
        roots = [by_id[i]["operationName"] for i, p in parent.items() if p is None]
        assert roots == [ROOT_NAME.get(kind, f"workflow {kind}")]
        assert not [s["operationName"] for s in spans if s.get("warnings")], kind
        for s in spans:
            assert s["duration"] >= 0, (kind, s["operationName"])
            p = by_id.get(parent[s["spanID"]])
            if p is not None:
                assert p["startTime"] <= s["startTime"], (kind, s["operationName"], p["operationName"])
                assert s["startTime"] + s["duration"] <= p["startTime"] + p["duration"], (
                    kind, s["operationName"], p["operationName"])


def test_names_and_counts_match_the_rows(exported: dict[str, Any]) -> None:
    """Span names say what happened, and in the numbers the DB rows hold: a ``phase`` span per phase
    node, ``step <n>`` per plan step node, a ``chat <model>`` span per model call (LLM event), an
    ``execute_tool <tool>`` per tool call, an ``execute_code <language>`` per code run (failed where the
    code_exec event failed), an ``await_human_input`` per human turn, an ``invoke_agent <agent>`` per
    agent turn (sub-agent node or invoke event, agent by agent); and no more spans than the run's events
    and nodes together."""
    figures = {}
    for (kind, _, options), trace_id in _runs_in_order(exported):
        spans = exported["jaeger"][trace_id]["spans"]
        rows = exported["db"][trace_id]
        names = collections.Counter(s["operationName"] for s in spans)
        first = collections.Counter(s["operationName"].split(" ")[0] for s in spans)
        events = collections.Counter((e["event_type"], e["event_subtype"]) for e in rows["events"])
        failed = collections.Counter((e["event_type"], e["event_subtype"]) for e in rows["events"]
                                     if e["status"] == "failed")
        kinds = collections.Counter(_meta(n).get("span_kind") for n in rows["nodes"])
        assert first["chat"] == events["agent_call", "llm"], kind
        assert first["execute_tool"] == events["tool_call", "execute"], kind
        assert first["execute_code"] == events["code_exec", "complete"] + events["code_exec", "error"], kind
        assert first["await_human_input"] == events["agent_call", "human_input"], kind
        assert first["phase"] == kinds["phase"] and first["step"] - names["step 1 attempt 1 failed"] == kinds["step"]
        steps = sorted(_meta(n)["step_number"] for n in rows["nodes"] if _meta(n).get("span_kind") == "step")
        assert sorted(int(n.split(" ")[1]) for n in names if n.startswith("step ") and "attempt" not in n) == steps
        errors = {s["operationName"] for s in spans if _tags(s).get("error") is True}
        red_code = sum(1 for s in spans if s["operationName"].startswith("execute_code") and _tags(s).get("error"))
        assert red_code == failed["code_exec", "error"], kind
        if failed["info", "attempt"]:  # a plan step's retry, or one_shot's (its execution has no step)
            assert "step 1 attempt 1 failed" in errors or "attempt 1 failed" in errors
        root = next(s for s in spans if not s["references"])
        assert (_tags(root).get("error") is True) == (rows["run"]["status"] == "failed"), kind
        for s in spans:
            tags = _tags(s)
            if s["operationName"].startswith("step ") and " attempt " not in s["operationName"]:
                assert tags.get("cmbagent.step.goal"), (kind, s["operationName"])  # the plan step's goal
            if s["operationName"].startswith("chat "):
                assert s["operationName"] == f"chat {tags['gen_ai.request.model']}" and tags["gen_ai.agent.name"]
        # every agent turn is an invoke_agent span: the sub-agent nodes (the turns inside a phase or step)
        # and the agent_call/invoke events (the other turns: group chat managers, tool runners, nested chats)
        turns = collections.Counter(s["operationName"].removeprefix("invoke_agent ") for s in spans
                                    if s["operationName"].startswith("invoke_agent "))
        assert turns == collections.Counter(n["agent"] for n in rows["nodes"] if n["node_type"] == "sub_agent") \
            + collections.Counter(e["agent_name"] for e in rows["events"] if e["event_subtype"] == "invoke"), kind
        # the steps' sub-agents are named: engineer / researcher / executor turns under the plan's steps
        if kind in ("planning_and_control", "carryover", "control", "deep_research") and not options:
            assert {"invoke_agent engineer", "invoke_agent researcher", "invoke_agent executor"} <= set(names), kind
        assert len(spans) <= len(rows["events"]) + len(rows["nodes"]), kind   # no explosion
        figures[kind + (" (stopped)" if options else "")] = (len(spans), len(rows["events"]), len(rows["nodes"]))
    print("spans / events / nodes per run:", figures)


def test_phoenix_classifies_and_counts_like_the_rows(exported: dict[str, Any]) -> None:
    """Phoenix holds the same spans, one trace per run, its kinds from the GenAI attributes: LLM per model
    call with the model name and the call's token counts (their sum the run's cost rows), AGENT per
    ``invoke_agent``, TOOL per tool call, ERROR status on the failing program; nothing else classified."""
    for (kind, _, _), trace_id in _runs_in_order(exported):
        spans = exported["phoenix"][trace_id]
        jaeger = exported["jaeger"][trace_id]["spans"]
        assert len(spans) == len(jaeger), kind
        ids = {s["context"]["span_id"] for s in spans}
        assert all(s["parent_id"] is None or s["parent_id"] in ids for s in spans), kind
        by_kind = collections.Counter(s["span_kind"] for s in spans)
        first = collections.Counter(s["operationName"].split(" ")[0] for s in jaeger)
        assert by_kind["LLM"] == first["chat"] and by_kind["TOOL"] == first["execute_tool"], kind
        assert by_kind["AGENT"] == first["invoke_agent"], kind
        assert set(by_kind) <= {"LLM", "TOOL", "AGENT", "UNKNOWN"}, kind
        llm = [s for s in spans if s["span_kind"] == "LLM"]
        assert all(s["attributes"].get("llm.model_name") for s in llm), kind
        assert all(s["attributes"].get("llm.token_count.total") == s["attributes"]["llm.token_count.prompt"]
                   + s["attributes"]["llm.token_count.completion"] for s in llm), kind
        assert sum(s["attributes"]["llm.token_count.total"] for s in llm) == exported["db"][trace_id]["tokens"] > 0
        # only model calls carry token counts: Phoenix's cumulative totals are not counted twice
        assert not [s["name"] for s in spans if s["span_kind"] != "LLM" and "llm.token_count.total" in s["attributes"]]
        red = {s["name"] for s in spans if s["status_code"] == "ERROR"}
        assert red == {s["operationName"] for s in jaeger if _tags(s).get("error") is True}, kind
