"""What a user of the real cmbagent package sees, seventeenth audit (session 42).

MARS's own phases and ``WorkflowExecutor`` (``CMBAGENT_OTEL_MARS_SRC``, loaded next to the PyPI cmbagent by
conftest's ``mars_phases``) run offline against the scripted backend; spans read back, and the rows the DAG
exporter writes into SQLite read as cmbagent's backend reads them (``test_real_audit._final_rows``).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.trace import StatusCode

os.environ.setdefault("CMBAGENT_DISABLE_DISPLAY", "true")
pytest.importorskip("cmbagent", reason="cmbagent is not installed (it needs Python >= 3.12; see docs/cmbagent.md)")


import cmbagent_otel
from cmbagent_otel import semconv as sc

from .conftest import MARS_CONTROL_CONFIG, pypi_cmbagent_for_mars
from .test_cmbagent_runs import _exported, _one
from .test_cmbreal9_audit import served_run
from .test_real_audit import _final_rows, _nodes_of, _one_root_per_trace, run_cmbagent  # noqa: F401 - fixture

pytestmark = pytest.mark.cmbagent_autogen


def _control_phase_raising(how: str) -> Any:
    """An entry function for ``run_cmbagent``: MARS's ``ControlPhase`` on the preloaded plan whose work dir holds
    a file named ``control``, so its ``os.makedirs(control_dir, exist_ok=True)`` between ``manager.start()`` and
    its step loop's ``try`` raises ``FileExistsError``, which escapes ``execute`` without ``manager.fail()``.
    ``how``: ``bare`` awaited by hand outside any run (MARS's orchestrator and routers), ``executor`` under MARS's
    ``WorkflowExecutor.run_sync`` (its backend's task executor), ``joined`` by hand inside the application's own
    ``workflow`` block. Returns what escaped."""

    def run(task: str, work_dir: str, api_keys: dict[str, str], **_: Any) -> dict[str, Any]:
        from cmbagent.phases.base import PhaseContext
        from cmbagent.phases.control import ControlPhase, ControlPhaseConfig
        from cmbagent.phases.registry import PhaseRegistry
        from cmbagent.workflows.composer import WorkflowDefinition, WorkflowExecutor

        (Path(work_dir) / "control").write_text("not a folder\n", encoding="utf-8")
        with pypi_cmbagent_for_mars(), pytest.raises(FileExistsError) as raised:
            if how == "executor":
                PhaseRegistry.register_class("control", ControlPhase)  # as MARS's cmbagent.phases package does
                definition = WorkflowDefinition(id="preloaded_control", name="Preloaded control", description="",
                                                phases=[{"type": "control", "config": MARS_CONTROL_CONFIG}])
                WorkflowExecutor(definition, task, str(work_dir), api_keys).run_sync()
            else:
                phase = ControlPhase(ControlPhaseConfig(**MARS_CONTROL_CONFIG))
                context = PhaseContext(workflow_id="w", run_id="r", phase_id="control", task=task,
                                       work_dir=str(work_dir), api_keys=api_keys)
                with (cmbagent_otel.workflow("mars control", mode="planning-control", task=task)
                      if how == "joined" else contextlib.nullcontext()):
                    asyncio.run(phase.execute(context))
        return {"error": str(raised.value)}

    return run


@pytest.mark.parametrize("how", ["bare", "executor", "joined"])
def test_a_mars_phase_whose_exception_escapes_without_fail_is_a_failed_run(
        request: pytest.FixtureRequest, mars_phases: Path, tmp_path: Path, how: str) -> None:
    """Session 41's Left. MARS's ``ControlPhase.execute`` makes its folders after ``manager.start()`` and before
    the ``try`` whose ``except`` calls ``manager.fail()``: an error there escapes the phase with nothing told to
    the manager. Its phase span stayed open (never exported: cmbagent's DAG had no ``control`` node, bare the run
    row stayed ``running`` and the context went on naming that open run). Now the phase ends failed with the
    exception that escaped, and so does its run; no step started, the plan's 3 steps pending."""
    run = request.getfixturevalue("run_cmbagent")("carryover", responder=lambda script: script,
                                                  function=_control_phase_raising(how))
    assert run.error is None, run.error
    assert run.sequence == []  # no model call: the phase stopped before its first step
    error = run.results["error"]
    assert error.startswith("[Errno 17] File exists") and error.endswith("control'")
    _one_root_per_trace(run)
    assert len({s.context.trace_id for s in run.spans}) == 1
    (root,) = [s for s in run.spans if s.parent is None]
    assert root.name == {"bare": "workflow control", "executor": "workflow preloaded_control",
                         "joined": "workflow mars control"}[how]
    phase = _one(run, "phase control")
    for span in (root, phase):
        assert (span.status.status_code, span.status.description, span.attributes.get(sc.ERROR_TYPE)) == (
            StatusCode.ERROR, f"FileExistsError: {error}", "FileExistsError"), span.name
    rows = _final_rows(_exported(run, tmp_path))
    (row,) = rows["runs"]
    assert (row["status"], row["meta"]["error"]) == ("failed", f"FileExistsError: {error}")
    nodes = _nodes_of(rows)
    assert {s: n["status"] for s, n in nodes.items() if s.startswith(("step_", "control"))} == {
        "control": "failed", "step_1": "pending", "step_2": "pending", "step_3": "pending"}


def _report_phase_defined_after_instrument(task: str, work_dir: str, api_keys: dict[str, str],
                                           **_: Any) -> dict[str, Any]:
    """An entry function for ``run_cmbagent``: a phase class of MARS's shape (``Phase`` subclass driving its own
    ``PhaseExecutionManager``, as MARS's paper and report phases do) defined now, after ``instrument()`` (as the
    phase modules an application imports later are), awaited by hand; its work raises after ``start_step(1)``
    with no ``fail()``. Returns what escaped."""
    from cmbagent.phases.base import Phase, PhaseContext
    from cmbagent.phases.execution_manager import PhaseExecutionManager

    class ReportPhase(Phase):
        phase_type = "report"
        display_name = "Report"

        async def execute(self, context: PhaseContext) -> Any:
            manager = PhaseExecutionManager(context, self)
            manager.start()
            manager.start_step(1, "Write the report")
            raise OSError(28, "No space left on device")

    context = PhaseContext(workflow_id="w", run_id="r", phase_id="report", task=task, work_dir=str(work_dir),
                           api_keys=api_keys)
    with pytest.raises(OSError) as raised:
        asyncio.run(ReportPhase().execute(context))
    return {"error": str(raised.value), "watched": hasattr(vars(ReportPhase)["execute"], "__wrapped__"),
            "coroutine_function": (inspect.iscoroutinefunction(ReportPhase.execute),
                                   asyncio.iscoroutinefunction(ReportPhase().execute))}


def test_a_phase_class_defined_after_instrumenting_is_watched_too(request: pytest.FixtureRequest,
                                                                  mars_phases: Path, tmp_path: Path) -> None:
    """The phase classes defined after ``instrument()`` (``Phase.__init_subclass__``: the post-import hook of
    ``cmbagent.phases.base`` fires before its subclasses' modules run) get the same: the run, the phase and its
    started step fail with the exception that escaped. ``uninstrument()`` puts MARS's classes back as they were."""
    run = request.getfixturevalue("run_cmbagent")("carryover", responder=lambda script: script,
                                                  function=_report_phase_defined_after_instrument)
    assert run.error is None, run.error
    assert run.results["error"] == "[Errno 28] No space left on device"
    # patched at its definition, and still a coroutine function to whoever asks (MARS's callers await it)
    assert run.results["watched"] and run.results["coroutine_function"] == (True, True)
    _one_root_per_trace(run)
    (root,) = [s for s in run.spans if s.parent is None]
    assert root.name == "workflow report"
    for span in (root, _one(run, "phase report"), _one(run, "step 1")):
        assert (span.status.status_code, span.attributes.get(sc.ERROR_TYPE)) == (StatusCode.ERROR, "OSError"), span.name
    rows = _final_rows(_exported(run, tmp_path))
    assert [r["status"] for r in rows["runs"]] == ["failed"]
    nodes = _nodes_of(rows)
    assert (nodes["report"]["status"], nodes["step_1"]["status"]) == ("failed", "failed")
    from cmbagent.phases.base import Phase
    from cmbagent.phases.control import ControlPhase

    assert "__init_subclass__" not in vars(Phase)
    assert not hasattr(vars(ControlPhase)["execute"], "__wrapped__")


def assert_cancel_restated(run: Any, root: Any) -> None:
    """The run ``root`` of a MARS control phase cancelled under the WorkflowExecutor, which restated the cancel as
    its own ``RuntimeError``: ended by the cancel (``error.type`` ``WorkflowCancelledException``), the executor's
    error one more exception event; the phase failed with the cancel."""
    assert (root.status.status_code, root.attributes[sc.ERROR_TYPE]) == (StatusCode.ERROR, "WorkflowCancelledException")
    assert "Workflow cancelled by user" in root.status.description
    assert [e.attributes["exception.type"].rpartition(".")[2] for e in root.events if e.name == "exception"] == [
        "RuntimeError", "WorkflowCancelledException"]
    phase = _one(run, "phase control")
    assert (phase.status.description, phase.attributes[sc.ERROR_TYPE]) == (
        "Workflow cancelled by user", "WorkflowCancelledException")


def _executor_cancelled_after_step_1(task: str, work_dir: str, api_keys: dict[str, str], **_: Any) -> dict[str, Any]:
    """An entry function for ``run_cmbagent``: MARS's ``WorkflowExecutor`` running a one-phase workflow
    (``control`` on the preloaded plan) bare, as MARS's backend's task executor does, with the callbacks of a
    user who cancels from the UI when step 1 completes (``test_cmbreal16_audit._cancelled_after_step_1``).
    Returns what the executor raised."""
    from cmbagent.phases.control import ControlPhase
    from cmbagent.phases.registry import PhaseRegistry
    from cmbagent.workflows.composer import WorkflowDefinition, WorkflowExecutor

    from .test_cmbreal16_audit import _cancelled_after_step_1

    PhaseRegistry.register_class("control", ControlPhase)  # as MARS's cmbagent.phases package does
    definition = WorkflowDefinition(id="preloaded_control", name="Preloaded control", description="",
                                    phases=[{"type": "control", "config": MARS_CONTROL_CONFIG}])
    executor = WorkflowExecutor(definition, task, str(work_dir), api_keys, callbacks=_cancelled_after_step_1())
    with pypi_cmbagent_for_mars(), pytest.raises(RuntimeError) as raised:
        executor.run_sync()
    return {"error": str(raised.value)}


def test_a_mars_phase_cancelled_under_the_workflow_executor_is_a_cancelled_run(
        request: pytest.FixtureRequest, mars_phases: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Session 41's Left. The user cancels a MARS phase the executor runs: the phase's ``raise_if_cancelled()``
    raises ``WorkflowCancelledException``, its step loop hands it to ``manager.fail()``, and the executor then
    raises its own ``RuntimeError("Phase control failed: Workflow cancelled by user")``, which ended the run:
    ``failed`` (on 4a0d79e), where the same phase awaited by hand is ``cancelled`` and cmbagent's cancel endpoint
    marks the run ``cancelled``. The executor's error restates the phase's cancel: the run now ends with that
    cancel (``error.type`` ``WorkflowCancelledException``; the executor's error is an exception event of the run
    too) and its row is ``cancelled``; the application still gets the executor's ``RuntimeError``."""
    run = request.getfixturevalue("run_cmbagent")("carryover", responder=lambda script: script,
                                                  function=_executor_cancelled_after_step_1)
    assert run.error is None, run.error
    assert run.results["error"] == "Phase control failed: Workflow cancelled by user"
    assert "researcher" not in run.sequence  # step 2 never started
    _one_root_per_trace(run)
    (root,) = [s for s in run.spans if s.parent is None]
    assert root.name == "workflow preloaded_control"
    assert_cancel_restated(run, root)
    url = _exported(run, tmp_path)
    rows = _final_rows(url)
    (row,) = rows["runs"]
    assert row["status"] == "cancelled" and "Workflow cancelled by user" in row["meta"]["error"]
    nodes = _nodes_of(rows)
    assert [nodes[s]["status"] for s in ("step_1", "step_2", "step_3", "control")] == [
        "completed", "pending", "pending", "failed"]
    # `cmbagent-otel dag latest`, as a user reads the run in a terminal
    from cmbagent_otel.cli import main as cli

    capsys.readouterr()
    assert cli(["--db", url, "dag", "latest"]) == 0
    dag = capsys.readouterr().out.splitlines()
    assert dag[0].startswith("run ") and " planning-control cancelled " in dag[0]
    assert [line.split(" (")[0] for line in dag[1:] if line[:4] in ("├── ", "└── ")] == [
        "├── init", "├── control", "└── terminator"]
    assert [" ".join(line.split()[2:4]) for line in dag if line.startswith(("│   ├── ", "│   └── "))] == [
        "step_1 (agent)", "step_2 (agent)", "step_3 (agent)"]
    assert [line.split(") ")[1].split()[0] for line in dag if line.startswith(("│   ├── ", "│   └── "))] == [
        "completed", "pending", "pending"]


@pytest.mark.parametrize("case", ["escaped_bare", "cancelled_under_the_executor"])
def test_cmbagent_backend_reads_the_new_mars_runs_from_sqlite_and_postgresql(
        request: pytest.FixtureRequest, mars_phases: Path, tmp_path: Path, case: str) -> None:
    """cmbagent's own backend (MARS's routers, unmodified, ``CMBAGENT_OTEL_MARS_PYTHON``) on the rows of the two
    runs above, written into SQLite and into PostgreSQL from the same spans: every endpoint answers, the same from
    both; the run's status is ours (``failed`` / ``cancelled``); its DAG is ours node for node; the run history
    holds every event."""
    function = (_control_phase_raising("bare") if case == "escaped_bare" else _executor_cancelled_after_step_1)
    *_, row, lite = served_run(request, mars_phases, tmp_path, function,
                               "failed" if case == "escaped_bare" else "cancelled")
    assert {n["id"]: n for n in lite[f"{row['id']} dag"]["nodes"]}["control"]["status"] == "failed"


def rate_limited_until_the_phase_waits(monkeypatch: pytest.MonkeyPatch) -> Any:
    """The responder to run the scripted backend with: the researcher's calls (step 2's) fail as a rate limit,
    HTTP 500 with "rate_limit_exceeded" in the message (which MARS's ControlPhase reads as one: ``'rate_limit' in
    str(err).lower()``), until the phase waits before its retry (its ``time.sleep``, which still waits): the
    limit lifts meanwhile, as a provider's does."""
    import types

    import cmbagent.phases.control as control

    limited = [True]
    real = control.time

    def sleep(seconds: float) -> None:
        limited[0] = False
        real.sleep(seconds)

    monkeypatch.setattr(control, "time", types.SimpleNamespace(**{**vars(real), "sleep": sleep}))

    def responder(script: Any) -> Any:
        def answer(body: dict[str, Any]) -> Any:
            if limited[0] and script.agent_of(body) == "researcher":
                raise RuntimeError("rate_limit_exceeded: try again in 5s")
            return script(body)

        return answer

    return responder


@pytest.mark.parametrize("joined", [False, True], ids=["bare", "joined"])
def test_a_mars_step_retried_after_a_rate_limit_is_one_completed_step(
        request: pytest.FixtureRequest, mars_phases: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
        joined: bool) -> None:
    """MARS's ControlPhase retries a step whose solve raised a rate-limit error (after its own 5 s wait) with a
    second ``CMBAgent.solve`` for the same step; no earlier audit ran it. The run shows it as cmbagent does: one
    ``step_2`` node, completed, holding both solves' work (the first one's failed model calls too), the run
    completed."""
    from .test_cmbreal16_audit import _bare_control_phases

    responder = rate_limited_until_the_phase_waits(monkeypatch)
    run = request.getfixturevalue("run_cmbagent")("carryover", responder=responder,
                                                  function=_bare_control_phases(1, joined=joined))
    assert run.error is None, run.error
    assert run.results["phases"] == [("completed", None)]
    _one_root_per_trace(run)
    assert len({s.context.trace_id for s in run.spans}) == 1
    step2 = _one(run, "step 2")
    assert step2.status.status_code is StatusCode.UNSET, step2.status.description
    by_id = {s.context.span_id: s for s in run.spans}
    failed_calls = [s for s in run.spans if s.name.startswith("chat") and s.status.status_code is StatusCode.ERROR]
    assert failed_calls, "the rate-limited call is recorded"
    for span in failed_calls:
        parent = span
        while parent.parent is not None and parent is not step2:
            parent = by_id[parent.parent.span_id]
        assert parent is step2, span.name
    rows = _final_rows(_exported(run, tmp_path))
    (row,) = rows["runs"]
    assert row["status"] == "completed"
    nodes = _nodes_of(rows)
    assert [nodes[s]["status"] for s in ("step_1", "step_2", "step_3", "control")] == ["completed"] * 4


# the app process for Jaeger: MARS's modules loaded as conftest's ``mars_phases`` loads them (from the source tree
# it extracted, argv[1]), instrument(), then the executor run cancelled after step 1 above; exits normally
JAEGER_DRIVER = """
import contextlib, io, logging, os, sys, tempfile, types
from pathlib import Path
os.environ.setdefault("CMBAGENT_DISABLE_DISPLAY", "true")
os.environ.pop("SSL_CERT_FILE", None)
os.environ["SSL_CERT_DIR"] = tempfile.mkdtemp()
import cmbagent
mars = Path(sys.argv[1])
cmbagent.__path__.append(str(mars / "cmbagent"))
for name in ("cmbagent.phases", "cmbagent.workflows"):
    package = types.ModuleType(name)
    package.__path__ = [str(mars / "cmbagent" / name.rpartition(".")[2])]
    sys.modules[name] = package
try:
    import structlog
except ImportError:
    sys.modules["structlog"] = types.SimpleNamespace(get_logger=logging.getLogger)
import cmbagent_otel
from cmbagent_otel.testing import FakeOpenAIServer
from tests.integration_cmbagent.scripted_cmbagent import API_KEYS, script_for
from tests.integration_cmbagent.test_cmbreal17_audit import _executor_cancelled_after_step_1
script = script_for("carryover")
cmbagent_otel.instrument()
with FakeOpenAIServer(request_responder=script) as server:
    os.environ["OPENAI_BASE_URL"] = server.base_url
    os.environ["OPENAI_API_KEY"] = API_KEYS["OPENAI"]
    with contextlib.redirect_stdout(io.StringIO()):
        result = _executor_cancelled_after_step_1("fit the spectrum", tempfile.mkdtemp(), dict(API_KEYS))
assert result["error"] == "Phase control failed: Workflow cancelled by user", result
assert not script.unexpected, script.unexpected
"""


@pytest.mark.jaeger
def test_the_executor_cancelled_mars_run_in_jaeger(mars_phases: Path, tmp_path: Path) -> None:
    """The executor run cancelled after step 1, exported over OTLP to a real Jaeger v2 from an app process that
    exits normally: one trace, ``workflow preloaded_control`` its only root and red (``error``), ``phase
    control`` red under it, steps 1-3 under the phase (step 1 holding the agents' turns and code runs, steps 2-3
    the plan's pending steps), the root's tags ``error.type`` ``WorkflowCancelledException``, nothing orphaned."""
    import subprocess
    import sys

    from tests.jaeger.support import JAEGER_CONFIG, http_get, run_jaeger

    root_dir = Path(__file__).resolve().parents[2]
    with run_jaeger(JAEGER_CONFIG, tmp_path, "jaeger") as jaeger:
        env = dict(os.environ, OTEL_TRACES_EXPORTER="otlp", OTEL_EXPORTER_OTLP_PROTOCOL="http/protobuf",
                   OTEL_EXPORTER_OTLP_ENDPOINT=jaeger.otlp_http, OTEL_SERVICE_NAME="cmbagent-mars-jaeger",
                   PYTHONPATH=os.pathsep.join([str(Path(cmbagent_otel.__file__).parents[1]), str(root_dir)]))
        proc = subprocess.run([sys.executable, "-c", JAEGER_DRIVER, str(mars_phases)], env=env, cwd=tmp_path,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-4000:]
        _, found = http_get(f"{jaeger.query}/api/traces?service=cmbagent-mars-jaeger&limit=20")
    (trace_,) = found["data"]
    spans = trace_["spans"]
    by_id = {s["spanID"]: s for s in spans}
    parent = {s["spanID"]: next((r["spanID"] for r in s["references"] if r["refType"] == "CHILD_OF"), None)
              for s in spans}
    assert all(p is None or p in by_id for p in parent.values())
    tags = {s["spanID"]: {t["key"]: t["value"] for t in s["tags"]} for s in spans}
    (root,) = [by_id[i] for i, p in parent.items() if p is None]
    assert root["operationName"] == "workflow preloaded_control"
    assert tags[root["spanID"]]["error"] is True
    assert tags[root["spanID"]]["error.type"] == "WorkflowCancelledException"
    (phase,) = [s for s in spans if s["operationName"] == "phase control"]
    assert parent[phase["spanID"]] == root["spanID"] and tags[phase["spanID"]]["error"] is True
    steps = sorted((s for s in spans if s["operationName"].startswith("step ")), key=lambda s: s["operationName"])
    assert [s["operationName"] for s in steps] == ["step 1", "step 2", "step 3"]
    assert all(parent[s["spanID"]] == phase["spanID"] for s in steps)
    assert [tags[s["spanID"]].get("cmbagent.step.status") for s in steps[1:]] == [sc.STEP_NOT_STARTED] * 2

    def under(span_id: str, ancestor: str) -> bool:
        while span_id is not None and span_id != ancestor:
            span_id = parent[span_id]
        return span_id == ancestor

    work = [s for s in spans if s["operationName"].startswith(("invoke_agent", "execute_code"))]
    assert work and all(under(s["spanID"], steps[0]["spanID"]) for s in work)
