"""cmbagent's own backend (MARS fork) on the rows of every cmbagent mode the scripted backend runs (session 31).

``test_backend_rows.py`` holds planning_and_control to the fork's endpoints (a completed and a failed run,
branching). Here the other entry points, each run once by the real package (offline, against the scripted
backend), all exported into ONE SQLite database as a user's runs accumulate there, and the fork's
unmodified endpoint functions called on every run and every node of it (``mars_backend_probe.py``): each
answers, and with our rows (DAG node for node, events, execution summaries' tokens, files, costs, history,
sessions, resumable nodes). Skipped unless ``CMBAGENT_OTEL_MARS_SRC`` and ``CMBAGENT_OTEL_MARS_PYTHON`` are set.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

os.environ.setdefault("CMBAGENT_DISABLE_DISPLAY", "true")
pytest.importorskip("cmbagent", reason="cmbagent is not installed (it needs Python >= 3.12; see docs/cmbagent.md)")

from .test_backend_rows import _mars_answers, _mars_python, _mars_source
from .test_cmbagent_runs import Run, _exported, _rows
from .test_real_audit import _final_rows, run_cmbagent  # noqa: F401 - the fixture (getfixturevalue)

pytestmark = pytest.mark.cmbagent_autogen

# every entry point of scripted_cmbagent but planning_and_control (test_backend_rows) and the plot
# evaluation ones (they need the loopback Gemini server); the first code run fails where there is code
FAILING = ("one_shot", "carryover")
CLEAN = ("control", "control_ideas", "deep_research", "human_in_the_loop", "one_shot_researcher", "one_shot_camb",
         "get_keywords", "get_keywords_aas", "get_keywords_unesco", "summarize_document", "summarize_documents",
         "preprocess_task")
# cmbagent's mode names (workflow_runs.mode / sessions.mode) of those runs, in run order
MODES = {"one_shot": "one-shot", "carryover": "planning-control", "control": "planning-control",
         "control_ideas": "planning-control", "deep_research": "planning-control",
         "human_in_the_loop": "hitl-interactive", "one_shot_researcher": "one-shot", "one_shot_camb": "one-shot",
         "get_keywords": "one-shot", "get_keywords_aas": "one-shot", "get_keywords_unesco": "one-shot",
         "summarize_document": "one-shot", "summarize_documents": "one-shot", "preprocess_task": "enhance-input"}


def test_mars_backend_serves_every_mode(request: pytest.FixtureRequest, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Every endpoint of cmbagent's backend answers on the runs of 14 entry points (one_shot and carryover
    with a failing first program), each with that run's rows: the DAG's nodes and statuses are ours and
    start at order 0, each node's events and files are its rows, its execution summary's tokens its LLM
    events' usage, the run's costs add up to its LLM events, its history holds all its events, and the
    session lists every run."""
    mars = _mars_source(tmp_path)
    python = _mars_python()
    if mars is None or python is None:
        pytest.skip("set CMBAGENT_OTEL_MARS_SRC (a MARS checkout or git dir) and CMBAGENT_OTEL_MARS_PYTHON (with "
                    "fastapi, python-multipart, sqlalchemy, structlog) to run cmbagent's own backend")
    # cmbagent's fork writes every group chat's messages into chats/ of the current directory
    monkeypatch.chdir(tmp_path)
    (tmp_path / "chats").mkdir()
    runner: Callable[..., Run] = request.getfixturevalue("run_cmbagent")
    db = tmp_path / "db"
    db.mkdir()
    for kinds, fail in ((FAILING, True), (CLEAN, False)):
        run = runner(*kinds, fail=fail, threads=True)  # threads: summarize_documents' workers join its run
        assert run.error is None, (kinds, run.error)
        url = _exported(run, db)
    rows = _final_rows(url)  # the contract's checks and what a finished run owes its reader, every run
    runs = sorted(rows["runs"], key=lambda r: r["started_at"])
    assert [r["mode"] for r in runs] == [MODES[k] for k in FAILING + CLEAN]
    assert all(r["status"] == "completed" for r in runs)
    nodes = _rows(url, "dag_nodes")
    events = [e for e in rows["events"] if e["event_subtype"] != "start"]
    files = _rows(url, "files")
    edges = _rows(url, "dag_edges")
    answers = _mars_answers(mars, python, url, tmp_path / "answers.json")

    assert {k: v["EXC"] for k, v in answers.items() if isinstance(v, dict) and "EXC" in v} == {}
    assert answers["runs"] == [r["id"] for r in runs]
    for row in runs:
        run_id = row["id"]
        mine = {n["meta"]["id"]: n for n in nodes if n["run_id"] == run_id}
        dag = answers[f"{run_id} dag"]
        assert {n["id"]: n["status"] for n in dag["nodes"]} == {s: n["status"] for s, n in mine.items()}, row["mode"]
        ids = {n["id"] for n in mine.values()}
        assert len(dag["edges"]) == len([e for e in edges if e["from_node_id"] in ids]), row["mode"]
        assert dag["nodes"][0]["task"] == row["task_description"]
        run_events = [e for e in events if e["run_id"] == run_id]
        for short, node in mine.items():
            on_node = [e for e in run_events if e["node_id"] == node["id"]]
            assert answers[f"{run_id} events {short}"]["total_events"] == len(on_node), (row["mode"], short)
            summary = answers[f"{run_id} summary {short}"]["execution_summary"]
            assert summary["cost_summary"].get("total_tokens", 0) == sum(e["meta"].get("tokens", 0) for e in on_node)
            assert answers[f"{run_id} files {short}"]["total_files"] == len(
                [f for f in files if f["node_id"] == node["id"]]), (row["mode"], short)
        llm_tokens = sum(e["meta"].get("tokens", 0) for e in run_events if e["event_subtype"] == "llm")
        assert answers[f"{run_id} costs"]["total_tokens"] == llm_tokens > 0, row["mode"]
        assert answers[f"{run_id} files"]["total_files"] == len([f for f in files if f["run_id"] == run_id])
        assert len(answers[f"{run_id} history"]["events"]) == len(run_events), row["mode"]
        resumable = answers[f"{run_id} resumable"]["nodes"]
        assert resumable and resumable[0]["can_resume"], row["mode"]
        assert {r["id"] for r in answers[f"{run_id} session runs"]["runs"]} >= {run_id}
    listed = {s["session_id"]: s for s in answers["sessions"]["sessions"]}
    assert set(listed) == {r["session_id"] for r in runs}
    assert sum(len(answers[f"{r['id']} history"]["events"]) for r in runs) == len(events)
    # code runs: one code_exec event per program cmbagent ran, the failing ones failed
    code = [e for e in events if e["event_type"] == "code_exec"]
    assert sum(e["status"] == "failed" for e in code) == len(FAILING)
