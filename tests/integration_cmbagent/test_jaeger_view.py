"""A real cmbagent planning_and_control run, exported over OTLP to a real Jaeger v2, as a user sees it."""

from __future__ import annotations

import collections
import os
import subprocess
import sys
from pathlib import Path

import pytest

# the app runs in a child of this interpreter: only where cmbagent is installed (the 3.12 suite)
pytest.importorskip("cmbagent", reason="cmbagent is not installed (it needs Python >= 3.12; see docs/cmbagent.md)")

from tests.jaeger.support import JAEGER_CONFIG, http_get, run_jaeger

pytestmark = [pytest.mark.cmbagent_autogen, pytest.mark.jaeger]

ROOT = Path(__file__).resolve().parents[2]

# the app process: instrument, run p&c against the scripted offline server (first code run fails), exit normally
DRIVER = """
import contextlib, io, os, sys, tempfile
from pathlib import Path
os.environ.setdefault("CMBAGENT_DISABLE_DISPLAY", "true")
os.environ.pop("SSL_CERT_FILE", None)
os.environ["SSL_CERT_DIR"] = tempfile.mkdtemp()
import cmbagent_otel
from cmbagent_otel.testing import FakeOpenAIServer
from tests.integration_cmbagent.scripted_cmbagent import call_workflow, script_for
script = script_for("planning_and_control", fail_first_code=True)
with FakeOpenAIServer(request_responder=script) as server:
    os.environ["OPENAI_BASE_URL"] = server.base_url
    cmbagent_otel.instrument()
    with contextlib.redirect_stdout(io.StringIO()):
        call_workflow("planning_and_control", Path(tempfile.mkdtemp()))
assert not script.unexpected, script.unexpected
"""


def test_planning_and_control_in_jaeger(tmp_path: Path) -> None:
    with run_jaeger(JAEGER_CONFIG, tmp_path, "jaeger") as jaeger:
        env = dict(os.environ, OTEL_TRACES_EXPORTER="otlp", OTEL_EXPORTER_OTLP_PROTOCOL="http/protobuf",
                   OTEL_EXPORTER_OTLP_ENDPOINT=jaeger.otlp_http, OTEL_SERVICE_NAME="cmbagent-jaeger-view",
                   PYTHONPATH=os.pathsep.join([str(ROOT / "src"), str(ROOT)]))
        proc = subprocess.run([sys.executable, "-c", DRIVER], env=env, cwd=tmp_path, capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-4000:]
        # the app has exited: everything Jaeger shows was flushed at exit
        _, services = http_get(f"{jaeger.query}/api/services")
        assert "cmbagent-jaeger-view" in services["data"]
        _, found = http_get(f"{jaeger.query}/api/traces?service=cmbagent-jaeger-view&limit=20")
    traces = found["data"]
    assert len(traces) == 1   # one trace per run
    spans = traces[0]["spans"]
    by_id = {s["spanID"]: s for s in spans}
    parent = {s["spanID"]: next((r["spanID"] for r in s["references"] if r["refType"] == "CHILD_OF"), None)
              for s in spans}
    assert all(p is None or p in by_id for p in parent.values())   # nothing orphaned
    roots = [by_id[i] for i, p in parent.items() if p is None]
    assert [r["operationName"] for r in roots] == ["workflow planning_and_control"]
    names = {s["operationName"] for s in spans}
    assert {"phase planning", "phase control", "step 1", "step 2"} <= names
    kinds = collections.Counter(s["operationName"].split(" ")[0] for s in spans)
    for kind in ("invoke_agent", "chat", "execute_tool", "execute_code"):
        assert kinds[kind] > 0, kinds

    def chain(span_id: str) -> list[str]:
        out = []
        while span_id is not None:
            out.append(by_id[span_id]["operationName"].split(" ")[0])
            span_id = parent[span_id]
        return out

    code = [s for s in spans if s["operationName"].startswith("execute_code")]
    assert all({"workflow", "phase", "step", "invoke_agent"} <= set(chain(s["spanID"])) for s in code)
    errors = {s["operationName"] for s in spans
              if any(t["key"] == "error" and t["value"] is True for t in s["tags"])}
    assert "execute_code python" in errors and "step 1 attempt 1 failed" in errors   # red in Jaeger
    for s in spans:
        for t in s["tags"]:
            assert len(str(t["value"])) <= 8192, (s["operationName"], t["key"])
            assert "sk-" not in str(t["value"]), (s["operationName"], t["key"])
    _attributes_as_documented(spans, parent)


WORKFLOW_KINDS = {"workflow", "phase", "step", "attempt", "branch"}
REQUIRED = {  # docs/spans.md "Per kind", what a real run's spans of each kind carry
    "llm": ("gen_ai.operation.name", "gen_ai.provider.name", "gen_ai.request.model", "gen_ai.response.model",
            "gen_ai.response.id", "gen_ai.response.finish_reasons", "gen_ai.usage.input_tokens",
            "gen_ai.usage.output_tokens", "server.address", "server.port", "gen_ai.agent.name"),
    "agent": ("gen_ai.operation.name", "gen_ai.agent.name"),
    "tool": ("gen_ai.operation.name", "gen_ai.tool.name", "gen_ai.tool.call.id", "gen_ai.tool.type",
             "gen_ai.agent.name"),
    "code_execution": ("cmbagent.code.language", "cmbagent.code.exit_code"),
    "step": ("cmbagent.step.number", "cmbagent.step.goal", "cmbagent.step.agent"),
    "phase": ("cmbagent.phase", "cmbagent.phase.index"),
}


def _attributes_as_documented(spans: list[dict], parent: dict[str, str | None]) -> None:
    """What docs/spans.md promises of every span, as Jaeger shows it (session 37): its instrumentation scope,
    OTel kind (model calls CLIENT), the kind's GenAI attributes, the DAG node on every span but the run's,
    the session under both names, the conversation id inside a conversation, one execution order each."""
    by_id = {s["spanID"]: s for s in spans}
    tags = {s["spanID"]: {t["key"]: t["value"] for t in s["tags"]} for s in spans}
    orders = []
    for s in spans:
        a = tags[s["spanID"]]
        kind = a["cmbagent.span.kind"]
        name = s["operationName"]
        scope = "cmbagent_otel.workflow" if kind in WORKFLOW_KINDS else "cmbagent_otel.ag2"
        assert a["otel.scope.name"] == scope, name
        assert a.get("span.kind", "internal") == ("client" if kind == "llm" else "internal"), name
        for key in REQUIRED.get(kind, ()):
            assert key in a, (name, key)
        assert ("cmbagent.dag.node" in a) is (kind != "workflow"), name
        assert a["session.id"] == a["cmbagent.session.id"] == "default_session", name
        up = parent[s["spanID"]]
        while up is not None and tags[up]["cmbagent.span.kind"] != "conversation":
            up = parent[up]
        if up is not None:
            assert "gen_ai.conversation.id" in a, name
        orders.append(a["cmbagent.execution_order"])
        for log in s.get("logs", []):
            fields = {f["key"]: f["value"] for f in log["fields"]}
            if fields.get("event") == "cmbagent.handoff":
                orders.append(fields["cmbagent.execution_order"])
    assert len(orders) == len(set(orders)) > len(by_id)   # spans and handoff events, one order each
