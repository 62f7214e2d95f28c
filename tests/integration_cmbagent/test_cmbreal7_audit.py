"""What a user of the real cmbagent package sees, seventh audit (session 34).

``preprocess_task`` (cmbagent's enhance-input mode, whose DAG cmbagent's backend creates from the
fixed-pipeline template: ``init``, ``execute`` labelled "Enhance Input", ``terminator``) when it never
reaches a solve: it raises first (a work dir that is a file: its ``clean_work_dir`` lists it; Ctrl-C while
its OCR runs), or returns the task unchanged (no paper to summarize: the usual case of a task without
arXiv links). Each run is cmbagent's own (offline, scripted backend), exported by the DAG exporter into
SQLite and read back as cmbagent's backend reads it; with ``CMBAGENT_OTEL_MARS_SRC`` /
``CMBAGENT_OTEL_MARS_PYTHON`` also by cmbagent's own backend code.
"""

from __future__ import annotations

import os
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


class Interrupted(Exception):
    """The Ctrl-C the entry call raised, as the test's app reports it (the harness compares Exceptions)."""


def _work_dir_a_file(text: str, work_dir: str, **kw: Any) -> Any:
    """A work dir that is a file: cmbagent's ``clean_work_dir`` lists it and raises NotADirectoryError."""
    import cmbagent

    path = Path(work_dir) / "not-a-folder"
    path.write_text("", encoding="utf-8")
    return cmbagent.preprocess_task(text, **(kw | {"work_dir": str(path), "clear_work_dir": True}))


def _ctrl_c_in_ocr(text: str, work_dir: str, **kw: Any) -> Any:
    """Ctrl-C while cmbagent OCRs the downloaded papers (``process_folder``, Mistral's API: the user
    interrupts the wait)."""
    import cmbagent
    import cmbagent.ocr

    def interrupted(*args: Any, **kwargs: Any) -> Any:
        raise KeyboardInterrupt

    module = sys.modules["cmbagent.ocr"]
    saved = module.process_folder
    module.process_folder = interrupted
    try:
        return cmbagent.preprocess_task(text, **(kw | {"work_dir": work_dir, "skip_ocr": False}))
    except KeyboardInterrupt as exc:
        raise Interrupted("KeyboardInterrupt") from exc
    finally:
        module.process_folder = saved


def _no_papers(text: str, work_dir: str, **kw: Any) -> Any:
    """No paper to summarize (no docs folder: what a task without arXiv links leaves): cmbagent returns
    the task unchanged without a solve."""
    import cmbagent

    empty = Path(work_dir) / "no-papers"
    empty.mkdir()
    return cmbagent.preprocess_task(text, **(kw | {"work_dir": str(empty)}))


CASES = {
    "work_dir_a_file": (_work_dir_a_file, "NotADirectoryError", "failed"),
    "ctrl_c_in_ocr": (_ctrl_c_in_ocr, "Interrupted", "cancelled"),
    "no_papers": (_no_papers, None, "completed"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_enhance_input_without_a_solve_keeps_a_pending_execute(request: pytest.FixtureRequest, tmp_path: Path,
                                                               case: str) -> None:
    """preprocess_task that never reaches a solve: the entry call's result or exception is unchanged, and
    the enhance-input pipeline's ``execute`` node is there as cmbagent's tracker creates it with the run,
    never started: pending, labelled "Enhance Input", no times, no events (a ``phase one_shot`` span ended
    as it starts, not red, ``cmbagent.phase.status`` "not started"). cmbagent's own backend serves it."""
    function, error, status = CASES[case]
    plain = request.getfixturevalue("run_cmbagent")("preprocess_task", instrumented=False, function=function)
    run = request.getfixturevalue("run_cmbagent")("preprocess_task", function=function)
    assert type(run.error).__name__ == (error or "NoneType") and type(run.error) is type(plain.error)
    assert run.results == plain.results
    assert run.sequence == plain.sequence == []  # no model call
    _one_root_per_trace(run)
    (root,) = [s for s in run.spans if s.parent is None]
    assert root.name == "workflow preprocess_task"
    (execute,) = _named(run, "phase one_shot")
    assert execute.attributes[sc.PHASE_STATUS] == sc.STEP_NOT_STARTED
    assert execute.status.status_code is StatusCode.UNSET
    assert [s for s in run.spans if _kind(s) == sc.KIND_PHASE] == [execute]
    url = _exported(run, tmp_path)
    rows = _final_rows(url)
    (row,) = rows["runs"]
    assert (row["mode"], row["status"]) == ("enhance-input", status)
    nodes = _nodes_of(rows)
    final = "completed" if status == "completed" else "failed"
    assert {s: n["status"] for s, n in nodes.items()} == {
        "init": "completed", "execute": "pending", "terminator": final}
    node = nodes["execute"]
    assert (node["node_type"], node["order_index"], node["parent_node_id"]) == ("agent", 1, None)
    assert (node["meta"]["label"], node["meta"]["description"]) == ("Enhance Input", "Execute task")
    assert (node["meta"]["started_at"], node["meta"]["completed_at"], node["meta"]["duration_ms"]) == (None,) * 3
    assert not [e for e in rows["events"] if e["node_id"] == node["id"]]
    assert rows["states"][0]["status"] == ("completed" if status == "completed" else "suspended")
    answers = _mars(tmp_path, url)
    if answers is not None:  # cmbagent's own backend on these rows
        assert {k: v["EXC"] for k, v in answers.items() if isinstance(v, dict) and "EXC" in v} == {}
        dag = answers[f"{row['id']} dag"]
        assert {n["id"]: n["status"] for n in dag["nodes"]} == {s: n["status"] for s, n in nodes.items()}
        assert {(e["source"], e["target"]) for e in dag["edges"]} == {("init", "execute"), ("execute", "terminator")}


def _per_agent(events: list[dict[str, Any]], running: bool) -> dict[str, tuple[int, int]]:
    """Per agent (named as cmbagent's report names it), the tokens of our LLM events: summed per call, or
    (``running``) the sum of the agent's running totals after each call, as cmbagent's report adds up an
    ``OpenAIWrapper`` that persists across calls (``cost_dict`` gets its ``return_usage_summary`` per call)."""
    totals: dict[str, list[int]] = {}
    summed: dict[str, list[int]] = {}
    for e in sorted(events, key=lambda e: e["execution_order"]):
        total = totals.setdefault(e["agent_name"], [0, 0])
        total[0] += e["meta"]["prompt_tokens"]
        total[1] += e["meta"]["completion_tokens"]
        row = summed.setdefault(e["agent_name"].replace("_", " "), [0, 0])
        row[0] += total[0] if running else e["meta"]["prompt_tokens"]
        row[1] += total[1] if running else e["meta"]["completion_tokens"]
    return {a: (v[0], v[1]) for a, v in summed.items()}


@pytest.mark.parametrize("kind", ["one_shot", "control"])
def test_cost_report_against_our_rows(request: pytest.FixtureRequest, tmp_path: Path, kind: str) -> None:
    """cmbagent's own cost report (``cost/cost_report_*.json``, one per solve) against our rows, agent by agent.
    Each agent's reported tokens are exactly what our LLM events give: their per-call sum where cmbagent
    gives the agent a fresh model client per turn (``control``, the response formatters), the sum of running
    totals where the client persists (the engineer's three calls: cmbagent counts the first again at each
    later one); one_shot's agents each call once, so there both agree. Our cost rows hold the per-call sums
    (what the calls used), whichever way cmbagent counted."""
    import json

    run = request.getfixturevalue("run_cmbagent")(kind)
    assert run.error is None
    rows = _final_rows(_exported(run, tmp_path))
    (report,) = sorted(run.work_dir.rglob("cost_report_*.json"))
    table = json.loads(report.read_text(encoding="utf-8"))
    reported = {r["Agent"]: (r["Prompt Tokens"], r["Completion Tokens"]) for r in table if r["Agent"] != "Total"}
    (total,) = [r for r in table if r["Agent"] == "Total"]
    assert total["Prompt Tokens"] == sum(p for p, _ in reported.values())
    assert total["Completion Tokens"] == sum(c for _, c in reported.values())
    llm = [e for e in rows["events"] if e["event_subtype"] == "llm"]
    per_call, running = _per_agent(llm, running=False), _per_agent(llm, running=True)
    assert set(reported) == set(per_call)
    counted = {a: "per call" if reported[a] == per_call[a] else "running" if reported[a] == running[a] else None
               for a in reported}
    assert None not in counted.values(), (reported, per_call, running)
    if kind == "one_shot":
        assert per_call == running == reported
    else:
        assert counted["control"] == "per call" and counted["engineer"] == "running"
        assert reported["engineer"] != per_call["engineer"]  # inflated by cmbagent, not by us
    costs: dict[str, list[int]] = {}
    for c in rows["costs"]:
        row = costs.setdefault(c["agent_name"].replace("_", " "), [0, 0])
        row[0] += c["prompt_tokens"]
        row[1] += c["completion_tokens"]
    assert {a: (v[0], v[1]) for a, v in costs.items()} == per_call


def _admin_answered_by_the_web_ui(task: str, **kw: Any) -> Any:
    """human_in_the_loop whose admin gets its human's answers as cmbagent's backend gives them (MARS
    ``configure_admin_for_websocket``: a function set on the admin agent itself, ``admin.get_human_input =
    websocket_human_input_sync``), set when cmbagent builds its agents."""
    import cmbagent
    from cmbagent.cmbagent import CMBAgent

    from .scripted_cmbagent import HUMAN_TURNS

    answers = list(HUMAN_TURNS)
    original = CMBAgent.__init__

    def websocket_human_input_sync(prompt: str) -> str:
        return answers.pop(0) if answers else "exit"

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        self.get_agent_from_name("admin").get_human_input = websocket_human_input_sync

    CMBAgent.__init__ = init  # type: ignore[method-assign]
    try:
        return cmbagent.human_in_the_loop(task, **kw)
    finally:
        CMBAgent.__init__ = original  # type: ignore[method-assign]


def test_human_in_the_loop_answered_through_the_admin_itself(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """The web UI's answers (a function set on cmbagent's admin agent, as its backend does it) left no
    ``await_human_input`` span and no ``agent_call/human_input`` event: AG2 finds the function in the
    agent, past the patch on its class. Now each answer is one, on the admin's turn node, as the console's
    answers are."""
    plain = request.getfixturevalue("run_cmbagent")("human_in_the_loop", instrumented=False,
                                                    function=_admin_answered_by_the_web_ui)
    run = request.getfixturevalue("run_cmbagent")("human_in_the_loop", function=_admin_answered_by_the_web_ui)
    assert run.error is None and plain.error is None
    assert run.sequence == plain.sequence
    _one_root_per_trace(run)
    asks = _named(run, "await_human_input admin")
    assert len(asks) == 2
    rows = _final_rows(_exported(run, tmp_path))
    nodes = _nodes_of(rows)
    human = [e for e in rows["events"] if e["event_subtype"] == "human_input"]
    assert sorted(n for n, node in nodes.items() for e in human if e["node_id"] == node["id"]) == [
        "step_1_admin", "step_1_admin_2"]
