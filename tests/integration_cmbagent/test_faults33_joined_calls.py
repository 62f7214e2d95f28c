"""A joined entry call that raises outside its phases (thirty-third fault campaign).

The ninth audit and the thirty-second campaign gave a joined entry call (one made inside the application's own
``with workflow(...)``) that raised before its first phase a failed node of that phase. One that completed a phase
and then raised between phases still left only its completed phase: ``planning_and_control`` (or its context
carryover form) whose ``control`` folder cannot be made once planning is done (a regular file of that name in its
work dir: cmbagent's ``mkdir`` raises), the app catching it, left a completed planning node, a completed run and
nothing saying that the call failed. And a joined call whose solves ran in worker threads (``summarize_documents``)
and that then raised itself: its solves were counted in its own thread only. Each run here is cmbagent's own,
offline against the scripted backend, exported by the DAG exporter and read back as cmbagent's backend reads it.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.trace import StatusCode

pytest.importorskip("cmbagent", reason="cmbagent is not installed (it needs Python >= 3.12; see docs/cmbagent.md)")

import cmbagent_otel
from cmbagent_otel import semconv as sc

from .scripted_cmbagent import API_KEYS, TASK
from .test_cmbagent_runs import Run, _exported, _named
from .test_cmbreal9_audit import instrumented  # noqa: F401  (the fixture)
from .test_real_audit import _final_rows, _nodes_of, _one_root_per_trace

pytestmark = pytest.mark.cmbagent_autogen


def _control_folder_refused(entry: str) -> Callable[[Path], dict[str, Any]]:
    def body(work: Path) -> dict[str, Any]:
        import cmbagent

        (work / "control").write_text("a file where cmbagent's control folder goes\n", encoding="utf-8")
        with cmbagent_otel.workflow("notebook cell", task=TASK):
            try:
                getattr(cmbagent, entry)(TASK, work_dir=str(work), api_keys=API_KEYS)
            except Exception as exc:  # the app's own handling: noted, and the cell goes on
                return {"caught": type(exc).__name__}
        return {"caught": None}

    return body


def _red(run: Run, name: str) -> Any:
    """The one red span named ``name``, its status and exception event those of the call's exception."""
    red = [s for s in _named(run, name) if s.status.status_code is StatusCode.ERROR]
    assert len(red) == 1, [(s.name, s.status.status_code) for s in run.spans if s.name.startswith("phase")]
    error = run.results["caught"]
    assert red[0].status.description.startswith(f"{error}: ")
    (exception,) = [e.attributes["exception.type"] for e in red[0].events if e.name == "exception"]
    assert exception.rsplit(".", 1)[-1] == error
    assert not [s for s in run.spans if s.parent is not None and s.parent.span_id == red[0].context.span_id]
    return red[0]


@pytest.mark.parametrize("entry", ["planning_and_control", "planning_and_control_context_carryover"])
def test_joined_planning_call_raising_between_its_phases_fails_the_next_phase(
        instrumented: Callable[..., Run], tmp_path: Path, entry: str) -> None:  # noqa: F811
    """Planning ran and completed; cmbagent then raised making the control folder and the app caught it: the
    run completes (cmbagent's caller returned normally), planning stays completed, and the phase the call did
    not reach, control, is there failed: a red ``phase control`` span with the exception event and no
    children, a failed ``control`` node whose ``meta.error`` names the exception, with no events. On e0732e2
    planning was the call's only node (``assert 0 == 1``: no red control phase)."""
    kind = "carryover" if entry.endswith("carryover") else "planning_and_control"
    plain = instrumented(kind, _control_folder_refused(entry), instrumented=False)
    run = instrumented(kind, _control_folder_refused(entry))
    assert run.results == plain.results == {"caught": "FileExistsError"}
    assert run.sequence == plain.sequence and run.sequence  # planning's model calls, nothing of control
    _one_root_per_trace(run)
    (planning,) = _named(run, "phase planning")
    assert planning.status.status_code is not StatusCode.ERROR
    red = _red(run, "phase control")
    rows = _final_rows(_exported(run, tmp_path))
    (row,) = rows["runs"]
    assert row["status"] == "completed"
    nodes = _nodes_of(rows)
    top = {s: n["status"] for s, n in nodes.items() if n["parent_node_id"] is None and s != "init"}
    assert top == {"planning": "completed", "control": "failed", "terminator": "completed"}
    node = nodes[red.attributes[sc.DAG_NODE]]
    assert node["meta"]["error"].startswith("FileExistsError: ")
    assert not [e for e in rows["events"] if e["node_id"] == node["id"]]


class _OutputGone(io.StringIO):
    """The application's standard output, whose reader goes away when cmbagent prints its closing summary
    (a pipe into ``head`` that has read enough): from that line on, every write raises BrokenPipeError."""

    def __init__(self) -> None:
        super().__init__()
        self.gone = False

    def write(self, text: str) -> int:
        self.gone = self.gone or "Processing complete" in text
        if self.gone:
            raise BrokenPipeError(32, "Broken pipe")
        return super().write(text)


def _summaries_then_output_gone(work: Path) -> dict[str, Any]:
    """summarize_documents in a notebook cell's run: its two documents solved in two worker threads, then its
    own closing print raises (printed after its workers have all ended)."""
    import cmbagent

    papers = work.parent / f"{work.name}-papers"
    papers.mkdir()
    for k in (1, 2):
        (papers / f"paper_{k}.md").write_text(f"# Mock CMB spectra {k}\n\n{TASK}.\n", encoding="utf-8")
    output = _OutputGone()
    with cmbagent_otel.workflow("notebook cell", task=TASK):
        try:
            with contextlib.redirect_stdout(output):
                cmbagent.summarize_documents(str(papers), work_dir_base=str(work), max_workers=2)
        except Exception as exc:
            return {"caught": type(exc).__name__, "summaries": sorted(p.name for p in work.glob("doc_*"))}
    return {"caught": None}


def test_joined_call_whose_solves_ran_in_worker_threads_then_raised(instrumented: Callable[..., Run],  # noqa: F811
                                                                    tmp_path: Path) -> None:
    """Both documents' solves ran (in cmbagent's worker threads) and completed; summarize_documents then raised
    itself. Its failure is one node after them, ``execute_3``, failed with the exception; the two solves' nodes
    stay completed and nothing else is added (no second failed node for solves counted in another thread). On
    e0732e2 the call's solves were ``control`` phases (a fixed pipeline's, unseen from the user's run), and its
    failure an ``execute`` node beside them, there because its solves, made in other threads, were not counted."""
    plain = instrumented("summarize_documents", _summaries_then_output_gone, instrumented=False, threads=True)
    run = instrumented("summarize_documents", _summaries_then_output_gone, threads=True)
    assert run.results == plain.results
    assert run.results["caught"] == "BrokenPipeError" and len(run.results["summaries"]) == 2
    assert sorted(run.sequence) == sorted(plain.sequence)
    _one_root_per_trace(run)
    red = _red(run, "phase one_shot")
    rows = _final_rows(_exported(run, tmp_path))
    (row,) = rows["runs"]
    assert row["status"] == "completed"
    nodes = _nodes_of(rows)
    top = {s: n["status"] for s, n in nodes.items() if n["parent_node_id"] is None and s != "init"}
    assert top == {"execute": "completed", "execute_2": "completed", "execute_3": "failed", "terminator": "completed"}
    assert red.attributes[sc.DAG_NODE] == "execute_3"
    assert nodes["execute_3"]["meta"]["error"].startswith("BrokenPipeError: ")


def _two_threads_each_failing(work: Path) -> dict[str, Any]:
    """A notebook cell's run whose two threads each make a joined planning_and_control that raises before its
    first phase (its work dir a regular file), each caught in its thread."""
    import cmbagent

    def call(k: int) -> str:
        blocked = work / f"not-a-folder-{k}"
        blocked.write_text("a file where the work dir should be\n", encoding="utf-8")
        try:
            cmbagent.planning_and_control(TASK, work_dir=str(blocked), api_keys=API_KEYS)
        except Exception as exc:
            return type(exc).__name__
        return "returned"

    with cmbagent_otel.workflow("notebook cell", task=TASK), ThreadPoolExecutor(max_workers=2) as pool:
        return {"caught": sorted(pool.map(call, (1, 2)))}


def test_joined_calls_failing_in_two_threads_each_have_their_node(instrumented: Callable[..., Run],  # noqa: F811
                                                                    tmp_path: Path) -> None:
    """Two joined calls failing in two threads of the application's run, in whatever order they interleave:
    two failed ``planning`` nodes, each with its own call's exception (its own work dir in ``meta.error``), two
    red phase spans, the run completed and its rows within cmbagent's contract. On e0732e2 both planning nodes
    took order_index 0 (``siblings share an order_index: {None: [0]}``); the records held up (one per call)."""
    plain = instrumented("planning_and_control", _two_threads_each_failing, instrumented=False, threads=True)
    run = instrumented("planning_and_control", _two_threads_each_failing, threads=True)
    assert run.results == plain.results
    (error,) = set(run.results["caught"])
    assert run.sequence == plain.sequence == []
    _one_root_per_trace(run)
    red = [s for s in _named(run, "phase planning") if s.status.status_code is StatusCode.ERROR]
    assert len(red) == 2 and all(s.status.description.startswith(f"{error}: ") for s in red)
    rows = _final_rows(_exported(run, tmp_path))
    (row,) = rows["runs"]
    assert row["status"] == "completed"
    nodes = _nodes_of(rows)
    failed = {s: n["meta"]["error"] for s, n in nodes.items() if n["status"] == "failed"}
    assert set(failed) == {"planning", "planning_2"}
    assert sorted(any(f"not-a-folder-{k}" in e for k in (1, 2)) for e in failed.values()) == [True, True]
    assert {("not-a-folder-1" in e) for e in failed.values()} == {True, False}
