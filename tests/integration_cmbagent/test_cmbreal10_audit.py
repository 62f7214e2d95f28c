"""What a user of the real cmbagent package sees, tenth audit (session 37).

Two entry calls made inside one span that is not a run of ours (a web request's, the application's own),
one after the other or in two threads: the run id is the trace id, so each must start a trace of its own;
they shared the request's trace and were stored as ONE run (the second run's nodes over the first's, the
execution orders of both counted twice, the first run's work dir lost). And an unmodified app under
``opentelemetry-instrument`` stopped by SIGTERM mid-run: its run must be stored failed, as under
``instrument()``, not ``executing`` for ever. Each run is cmbagent's own (offline, scripted backend).
"""

from __future__ import annotations

import contextlib
import io
import os
import sqlite3
import sys
import threading
from pathlib import Path

import pytest

os.environ.setdefault("CMBAGENT_DISABLE_DISPLAY", "true")
pytest.importorskip("cmbagent", reason="cmbagent is not installed (it needs Python >= 3.12; see docs/cmbagent.md)")

import cmbagent_otel
from cmbagent_otel.testing import FakeOpenAIServer

from .scripted_cmbagent import call_workflow, script_for
from .test_cmbagent_runs import Run, SpanCapture, _exported
from .test_real_audit import _final_rows, _one_root_per_trace
from .test_stopped_by_signal import app_env, stop_when_waiting


@pytest.mark.parametrize("how", ["one_after_the_other", "two_threads"])
def test_entry_calls_inside_an_application_span_are_runs_of_their_own(tmp_path: Path, how: str,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The first run stays inside the application's span (its trace, as before); the second starts a trace
    of its own, linked to that span. Each run: its own row, work dir, nodes and execution orders. On
    e0732e2 both were in one trace and stored as one run (``assert 1 == 2``)."""
    capture = SpanCapture()
    script = script_for("one_shot")  # its answers depend on the request only
    work = {name: tmp_path / name for name in ("a", "b")}
    errors: list[BaseException] = []

    def call(name: str) -> None:
        try:
            call_workflow("one_shot", work[name])
        except BaseException as exc:  # reported below: a thread's exception is not the test's
            errors.append(exc)

    with FakeOpenAIServer(request_responder=script) as server:
        monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
        cmbagent_otel.instrument(tracer_provider=capture.provider, set_global=False)
        try:
            tracer = capture.provider.get_tracer("the application")
            with tracer.start_as_current_span("POST /analyses") as request, contextlib.redirect_stdout(io.StringIO()):
                if how == "two_threads":  # the threading instrumentation carries the request's context in
                    threads = [threading.Thread(target=call, args=(name,)) for name in work]
                    for thread in threads:
                        thread.start()
                    for thread in threads:
                        thread.join()
                else:
                    for name in work:
                        call(name)
        finally:
            cmbagent_otel.uninstrument()
    assert not errors and not script.unexpected, (errors, script.unexpected)
    run = Run({}, [], [], tmp_path, capture.spans)
    _one_root_per_trace(run)
    roots = [s for s in run.spans if s.name == "workflow one_shot"]
    assert len({s.context.trace_id for s in roots}) == 2
    inside = [s for s in roots if s.parent is not None]
    assert [s.parent.span_id for s in inside] == [request.get_span_context().span_id]  # type: ignore[union-attr]
    (own,) = [s for s in roots if s.parent is None]
    assert [link.context.span_id for link in own.links] == [request.get_span_context().span_id]
    for root in roots:  # no span of one run in the other's trace, each run's execution orders once
        orders = [s.attributes["cmbagent.execution_order"] for s in run.spans
                  if s.context.trace_id == root.context.trace_id and "cmbagent.execution_order" in s.attributes]
        assert len(orders) == len(set(orders)) > 10

    # the application's span is an event of the first run (it began before the run: not our rows to check)
    ours = Run({}, [], [], tmp_path, [s for s in run.spans if s.name != "POST /analyses"])
    rows = _final_rows(_exported(ours, tmp_path))
    runs = {r["id"]: r for r in rows["runs"]}
    assert len(runs) == 2 and {r["status"] for r in runs.values()} == {"completed"}
    assert sorted(r["meta"]["work_dir"] for r in runs.values()) == [str(work["a"]), str(work["b"])]
    nodes = {run_id: sorted(short for (rid, short) in rows["nodes"] if rid == run_id) for run_id in runs}
    first, second = nodes.values()
    assert first == second and {"init", "execute", "terminator", "execute_engineer"} <= set(first)


SIGTERM_APP = """
import sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import cmbagent  # noqa: F401
from scripted_cmbagent import run_until_signalled
run_until_signalled("planning_and_control", Path(sys.argv[2]))
"""


def test_sigterm_under_opentelemetry_instrument_stores_the_run_failed(tmp_path: Path) -> None:
    """An unmodified app (no ``instrument()`` call) under ``opentelemetry-instrument`` with the DAG exporter,
    sent SIGTERM while it waits for its 15th model call: the process still ends by the signal; the run and
    its open nodes are stored failed, "stopped by SIGTERM", as under ``instrument()``
    (``test_stopped_by_signal.py``). On e0732e2 the run stayed ``executing`` and its nodes ``running``."""
    db = tmp_path / "cmbagent.db"
    app = tmp_path / "app.py"
    app.write_text(SIGTERM_APP)
    instrument = Path(sys.executable).parent / "opentelemetry-instrument"
    stop_when_waiting([str(instrument), sys.executable, str(app), str(Path(__file__).parent), str(tmp_path / "work")],
                      app_env(tmp_path, db, OTEL_TRACES_EXPORTER="cmbagent_dag"), tmp_path)
    conn = sqlite3.connect(db)
    try:
        runs = conn.execute("SELECT status, json_extract(meta, '$.error') FROM workflow_runs").fetchall()
        statuses = dict(conn.execute("SELECT json_extract(meta, '$.id'), status FROM dag_nodes"))
    finally:
        conn.close()
    assert runs == [("failed", "stopped by SIGTERM")]
    assert statuses["planning"] == "completed" and statuses["control"] == statuses["step_1"] == "failed"
    assert "running" not in statuses.values(), statuses
