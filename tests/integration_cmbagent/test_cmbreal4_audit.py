"""What a user of the real cmbagent package sees, fourth audit (session 32).

cmbagent's own runs (offline, against the scripted backend), exported by the DAG exporter into
SQLite and read back as cmbagent's backend reads them (the same checks as session 29's audit,
``test_real_audit._final_rows``), and the span tree as a trace UI draws it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
from opentelemetry.trace import StatusCode

os.environ.setdefault("CMBAGENT_DISABLE_DISPLAY", "true")
pytest.importorskip("cmbagent", reason="cmbagent is not installed (it needs Python >= 3.12; see docs/cmbagent.md)")

import cmbagent_otel
from cmbagent_otel import semconv as sc

from .test_cmbagent_runs import Run, _by_id, _exported, _kind, _one, _rows
from .test_real_audit import _final_rows, _nodes_of, _one_root_per_trace, run_cmbagent  # noqa: F401 - the fixture (getfixturevalue)

pytestmark = pytest.mark.cmbagent_autogen


def test_one_shot_retry_shows_the_failed_attempt(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """one_shot whose first program fails: cmbagent hands the failure back to the engineer
    (``n_attempts`` 1) and the retry succeeds. Like a plan step's retry, the trace has a red
    ``attempt 1 failed`` marker under the one_shot phase, between the failed and the successful code
    run, and the DB an ``info/attempt`` failed event on the ``execute`` node; the phase and run stay
    completed."""
    runner: Callable[..., Run] = request.getfixturevalue("run_cmbagent")
    run = runner("one_shot", fail=True)
    assert run.error is None and run.results["final_context"]["n_attempts"] == 1
    _one_root_per_trace(run)
    by_id = _by_id(run)
    phase = _one(run, "phase one_shot")
    attempts = [s for s in run.spans if _kind(s) == sc.KIND_ATTEMPT]
    assert [s.name for s in attempts] == ["attempt 1 failed"]
    (attempt,) = attempts
    assert attempt.status.status_code is StatusCode.ERROR
    assert attempt.attributes[sc.DAG_NODE] == "execute" and attempt.attributes[sc.STEP_ATTEMPTS] == 1
    parent = attempt.parent and by_id.get(attempt.parent.span_id)
    while parent is not None and parent is not phase:
        parent = parent.parent and by_id.get(parent.parent.span_id)
    assert parent is phase
    codes = sorted((s for s in run.spans if _kind(s) == sc.KIND_CODE), key=lambda s: s.start_time)
    assert [c.status.status_code for c in codes] == [StatusCode.ERROR, StatusCode.UNSET]
    assert codes[0].end_time <= attempt.start_time <= codes[1].start_time
    assert phase.status.status_code is StatusCode.UNSET
    rows = _final_rows(_exported(run, tmp_path))
    nodes = _nodes_of(rows)
    assert rows["runs"][0]["status"] == "completed" and nodes["execute"]["status"] == "completed"
    marked = [e for e in rows["events"] if e["event_subtype"] == "attempt"]
    assert [(e["event_type"], e["status"], e["node_id"]) for e in marked] == [
        ("info", "failed", nodes["execute"]["id"])]
    assert "n_attempts=1" in marked[0]["error_message"]


def test_summarize_documents_files_of_each_document(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """summarize_documents writes everything into per-document folders of its ``work_dir_base``
    (``doc_001_<name>/document_summary.json``, its chat, cost and time reports) and a
    ``processing_summary.json`` beside them. cmbagent's backend runs it through ``preprocess_task``,
    whose ``work_dir_base`` is the ``summaries`` folder its file scan lists whole; called directly, the
    same files are the run's: each one a ``files`` row (none before), on a node of the run."""
    runner: Callable[..., Run] = request.getfixturevalue("run_cmbagent")
    run = runner("summarize_documents", threads=True)
    assert run.error is None and run.results["processed_files"] == 2
    rows = _final_rows(_exported(run, tmp_path))
    work = run.work_dir / "0-summarize_documents"
    written = {str(p.relative_to(work)) for p in work.rglob("*") if p.is_file()
               and not any(part.startswith(".") or part == "__pycache__" for part in p.relative_to(work).parts)}
    assert "processing_summary.json" in written
    assert len([p for p in written if p.endswith("/document_summary.json")]) == 2
    stored = _rows(f"sqlite:///{tmp_path / 'cmbagent.db'}", "files")
    assert {str(Path(f["file_path"]).relative_to(work)) for f in stored} == written
    # each document's files on the execute node of its own solve (the two solves run at once, so the
    # time a file was written does not tell); the overall summary, written after both, is the run's
    nodes = _nodes_of(rows)
    by_id = {n["id"]: n for n in nodes.values()}
    on = {str(Path(f["file_path"]).relative_to(work)): by_id.get(f["node_id"]) for f in stored}
    assert on.pop("processing_summary.json") is None
    for rel, node in on.items():
        assert node is not None and node["meta"]["work_dir"] == rel.split("/")[0], rel
    assert {n["meta"]["id"] for n in on.values()} == {"execute", "execute_2"}
    summaries = [f for f in stored if f["file_path"].endswith("document_summary.json")]
    assert {f["file_type"] for f in summaries} == {"data"}


def test_mars_backend_reads_redo_branches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A user's redo loop around cmbagent (``workflow``/``phase``/``step``/``redo`` blocks, a real
    ``one_shot`` in each attempt; MARS's own HITL redo is a loop inside one step that writes no node or
    branch, and its ``PhaseExecutionManager`` has no ``create_redo_branch`` any more): the derived
    branch rows, read by cmbagent's own backend code. Its branch tree lists both redos under the run
    (name, hypothesis, status), each branch's context builds, each branch run's DAG is served, and the
    run's resumable nodes answer, and the parent's DAG shows the branch point with a conditional edge
    to each redo; branch comparison fails inside cmbagent on any run with a ``workflow_steps`` row (its
    own branches too: it reads the removed ``WorkflowStep.agent``)."""
    from cmbagent_otel.workflow import phase, redo, step, workflow

    from .scripted_cmbagent import API_KEYS, call_workflow, script_for
    from .test_backend_rows import _mars_answers, _mars_python, _mars_source
    from .test_cmbagent_runs import SpanCapture

    mars, python = _mars_source(tmp_path), _mars_python()
    if mars is None or python is None:
        pytest.skip("set CMBAGENT_OTEL_MARS_SRC and CMBAGENT_OTEL_MARS_PYTHON to run cmbagent's own backend")
    from cmbagent_otel.testing import FakeOpenAIServer

    monkeypatch.setenv("OPENAI_API_KEY", API_KEYS["OPENAI"])
    capture = SpanCapture()
    cmbagent_otel.instrument(tracer_provider=capture.provider, set_global=False)
    work = tmp_path / "work"
    try:
        with workflow("fit_with_redos", mode="planning-control", task="fit the acoustic peak", work_dir=str(work)), \
                phase("control"), step(1, "fit the acoustic peak", agent="engineer") as fit:
            with redo(1, 1, "a smaller step size") as first:
                first.fail("the fit did not converge")
            with redo(1, 2, "switch to MCMC"):
                script = script_for("one_shot")
                with FakeOpenAIServer(request_responder=script) as server:
                    monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
                    call_workflow("one_shot", work / "redo_2")
                assert script.unexpected == []
            fit.set_summary("fitted with MCMC")
    finally:
        cmbagent_otel.uninstrument()
    run = Run({}, [], [], work, capture.spans)
    url = _exported(run, tmp_path)
    capture.provider.shutdown()
    runs = _rows(url, "workflow_runs")
    main = next(r for r in runs if not r["is_branch"])
    children = {r["meta"]["branch_name"]: r for r in runs if r["is_branch"]}
    assert sorted(children) == ["step_1_redo_1", "step_1_redo_2"]
    branches = _rows(url, "branches")
    assert len(branches) == 2
    answers = _mars_answers(mars, python, url, tmp_path / "answers.json", branches=True)
    failed = {k: v["EXC"] for k, v in answers.items() if isinstance(v, dict) and "EXC" in v}
    assert set(failed) == {f"{r['id']} compare" for r in children.values()}, failed
    assert all("agent" in v for v in failed.values()), failed
    tree = answers[f"{main['id']} branch tree"]["tree"]
    assert tree["run_id"] == main["id"] and tree["name"] == "main"
    shown = {c["run_id"]: c for c in tree["children"]}
    assert set(shown) == {r["id"] for r in children.values()}
    for name, child in children.items():
        node = shown[child["id"]]
        assert (node["name"], node["is_branch"]) == (name, True)
        assert node["hypothesis"] == {"step_1_redo_1": "a smaller step size", "step_1_redo_2": "switch to MCMC"}[name]
        assert node["status"] == child["status"] == {"step_1_redo_1": "failed", "step_1_redo_2": "completed"}[name]
        context = answers[f"{child['id']} branch context"]
        assert "EXC" not in context
        # served, without nodes: the redo's own nodes are in the parent run, under the step's branch point
        # (cmbagent's BranchManager copies the parent's nodes into the draft run it makes; docs/cmbagent.md)
        assert answers[f"{child['id']} dag"]["nodes"] == [], name
    parent_dag = answers[f"{main['id']} dag"]
    shorts = {n["id"] for n in parent_dag["nodes"]}
    assert {"step_1", "branch_at_step_1", "step_1_redo_1", "step_1_redo_2"} <= shorts
    assert {("branch_at_step_1", f"step_1_redo_{k}") for k in (1, 2)} <= {
        (e["source"], e["target"]) for e in parent_dag["edges"]}
    assert answers[f"{main['id']} resumable"]["nodes"][0]["order_index"] == 0


def test_repeated_solves_tell_apart(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """get_keywords(kw_type="unesco") is one run of six one_shot solves, and a second entry call in the
    same process is a run of its own. In a trace UI each run is its own trace (its id the DB run's id)
    whose root names the entry point, its task and agent; the six ``phase one_shot`` spans of the first
    share their name (the operation) and differ in ``cmbagent.dag.node`` (``execute``, ``execute_2``, ...)
    and ``cmbagent.phase.index``. In cmbagent's UI the six nodes read "Execute (list_keywords_finder)",
    "Execute 2 (list_keywords_finder)", ... (not five boxes labelled "one_shot" after an
    "Execute (unknown)")."""
    runner: Callable[..., Run] = request.getfixturevalue("run_cmbagent")
    run = runner("get_keywords_unesco", "get_keywords_unesco")
    assert run.error is None
    _one_root_per_trace(run)
    roots = [s for s in run.spans if s.parent is None]
    assert [r.name for r in roots] == ["workflow get_keywords"] * 2
    assert {r.attributes[sc.WORKFLOW_AGENT] for r in roots} == {"list_keywords_finder"}
    assert all(r.attributes[sc.WORKFLOW_TASK] for r in roots)
    rows = _final_rows(_exported(run, tmp_path))
    assert sorted(r["id"].replace("-", "") for r in rows["runs"]) == sorted(
        f"{r.context.trace_id:032x}" for r in roots)
    for root in roots:
        phases = [s for s in run.spans if s.name == "phase one_shot" and s.context.trace_id == root.context.trace_id]
        assert sorted(s.attributes[sc.DAG_NODE] for s in phases) == sorted(
            ["execute"] + [f"execute_{k}" for k in range(2, len(phases) + 1)])
        assert len({s.attributes[sc.PHASE_INDEX] for s in phases}) == len(phases) > 1
        run_id = next(r["id"] for r in rows["runs"] if r["id"].replace("-", "") == f"{root.context.trace_id:032x}")
        labels = {short: n["meta"]["label"] for (rid, short), n in rows["nodes"].items()
                  if rid == run_id and short.startswith("execute") and n["parent_node_id"] is None}
        assert labels == {"execute": "Execute (list_keywords_finder)",
                          **{f"execute_{k}": f"Execute {k} (list_keywords_finder)" for k in range(2, len(phases) + 1)}}


def test_preprocess_task_nodes_as_cmbagent_labels_them(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """preprocess_task is cmbagent's enhance-input mode, whose execute node its tracker labels
    "Enhance Input" (MARS ``MODE_TO_TEMPLATE``): our two execute nodes (one per paper) read "Enhance Input"
    and "Enhance Input 2" (not "one_shot"), and each paper's ``summaries/doc_*`` files are on its own."""
    runner: Callable[..., Run] = request.getfixturevalue("run_cmbagent")
    run = runner("preprocess_task", threads=True)
    assert run.error is None
    rows = _final_rows(_exported(run, tmp_path))
    nodes = _nodes_of(rows)
    assert {s: (n["meta"]["label"], n["meta"]["description"]) for s, n in nodes.items() if s.startswith("execute")
            and n["parent_node_id"] is None} == {"execute": ("Enhance Input", "Execute task"),
                                                  "execute_2": ("Enhance Input 2", "Execute task")}
    by_id = {n["id"]: n for n in nodes.values()}
    work = run.work_dir / "0-preprocess_task"
    on = {str(Path(f["file_path"]).relative_to(work)): by_id.get(f["node_id"])
          for f in _rows(f"sqlite:///{tmp_path / 'cmbagent.db'}", "files")}
    documents = {rel: node for rel, node in on.items() if rel.startswith("summaries/doc_")}
    assert len(documents) == 8
    for rel, node in documents.items():
        assert node is not None and node["meta"]["work_dir"] == "/".join(rel.split("/")[:2]), rel
