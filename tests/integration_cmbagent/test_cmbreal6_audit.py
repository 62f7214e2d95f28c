"""What a user of the real cmbagent package sees, sixth audit (session 33, part 2).

A one-shot-style run that fails before its first solve: ``summarize_document`` of a missing file
(cmbagent's ``open`` raises before ``CMBAgent.solve``) and ``one_shot(agent="camb_context")`` whose
documentation download is refused (``requests`` raises before the solve). cmbagent's backend creates the
run's fixed-pipeline DAG up front (``DAGTracker.create_dag_for_mode``: ``init``, ``execute`` labelled
"Execute (<agent>)", ``terminator``, all pending), so its ``execute`` node exists although no solve ran.
Each run is cmbagent's own (offline, scripted backend), exported by the DAG exporter into SQLite and read
back as cmbagent's backend reads it; with ``CMBAGENT_OTEL_MARS_SRC`` / ``CMBAGENT_OTEL_MARS_PYTHON`` also by
cmbagent's own backend code.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.trace import StatusCode

os.environ.setdefault("CMBAGENT_DISABLE_DISPLAY", "true")
pytest.importorskip("cmbagent", reason="cmbagent is not installed (it needs Python >= 3.12; see docs/cmbagent.md)")

from cmbagent_otel import semconv as sc

from .test_cmbagent_runs import _exported, _kind, _named
from .test_cmbreal5_audit import _mars
from .test_real_audit import (  # noqa: F401 - run_cmbagent: the fixture (getfixturevalue)
    _final_rows,
    _nodes_of,
    _one_root_per_trace,
    run_cmbagent,
)

pytestmark = pytest.mark.cmbagent_autogen


def _missing_document(path: str, **kw: Any) -> Any:
    import cmbagent

    return cmbagent.summarize_document(path + ".missing", **kw)  # the instrumented entry point


def _refused_download(task: str, **kw: Any) -> Any:
    """one_shot (``agent="camb_context"``) with cmbagent's CAMB documentation URL on a loopback port bound
    but not listening (the connection is refused)."""
    import cmbagent

    module = sys.modules["cmbagent.cmbagent"]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        saved = module.camb_context_url
        module.camb_context_url = f"http://127.0.0.1:{sock.getsockname()[1]}/docs.md"
        try:
            return cmbagent.one_shot(task, **kw)
        finally:
            module.camb_context_url = saved


CASES = {
    "summarize_document": ("summarize_document", _missing_document, {}, "FileNotFoundError", "summarizer"),
    "one_shot_camb": ("one_shot_camb", _refused_download, {}, "ConnectionError", "camb_context"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_run_failing_before_its_first_solve_keeps_a_pending_execute(request: pytest.FixtureRequest,
                                                                     tmp_path: Path, case: str) -> None:
    """The entry call raises before ``CMBAgent.solve`` runs: the error leaves it unchanged; the run and
    its terminator are failed with it, and the fixed pipeline's ``execute`` node is there as cmbagent's
    tracker created it, never started: pending, labelled "Execute (<agent>)", no times, no events, no
    children (a ``phase one_shot`` span ended as it starts, not red, ``cmbagent.phase.status`` "not started").
    cmbagent's own backend serves that DAG."""
    kind, function, options, error, agent = CASES[case]
    plain = request.getfixturevalue("run_cmbagent")(kind, instrumented=False, function=function, **options)
    run = request.getfixturevalue("run_cmbagent")(kind, function=function, **options)
    assert type(run.error).__name__ == error and type(run.error) is type(plain.error)
    assert run.sequence == plain.sequence == []  # no model call
    _one_root_per_trace(run)
    (execute,) = _named(run, "phase one_shot")
    assert execute.attributes[sc.PHASE_STATUS] == sc.STEP_NOT_STARTED
    assert execute.status.status_code is StatusCode.UNSET
    assert not [s for s in run.spans if s.parent is not None and s.parent.span_id == execute.context.span_id]
    assert [s for s in run.spans if _kind(s) == sc.KIND_PHASE] == [execute]
    url = _exported(run, tmp_path)
    rows = _final_rows(url)
    (row,) = rows["runs"]
    assert row["status"] == "failed" and row["meta"]["error"].startswith(f"{error}: ")
    nodes = _nodes_of(rows)
    assert {s: n["status"] for s, n in nodes.items()} == {
        "init": "completed", "execute": "pending", "terminator": "failed"}
    node = nodes["execute"]
    assert (node["node_type"], node["order_index"], node["parent_node_id"]) == ("agent", 1, None)
    assert (node["meta"]["label"], node["meta"]["description"]) == (f"Execute ({agent})", "Execute task")
    assert (node["meta"]["started_at"], node["meta"]["completed_at"], node["meta"]["duration_ms"]) == (None,) * 3
    assert "error" not in node["meta"]
    assert nodes["terminator"]["meta"]["error"] == row["meta"]["error"]
    assert not [e for e in rows["events"] if e["node_id"] == node["id"]]
    assert rows["states"][0]["status"] == "suspended"
    answers = _mars(tmp_path, url)
    if answers is not None:  # cmbagent's own backend on these rows
        assert {k: v["EXC"] for k, v in answers.items() if isinstance(v, dict) and "EXC" in v} == {}
        dag = answers[f"{row['id']} dag"]
        assert {n["id"]: n["status"] for n in dag["nodes"]} == {s: n["status"] for s, n in nodes.items()}
        assert {(e["source"], e["target"]) for e in dag["edges"]} == {("init", "execute"), ("execute", "terminator")}
