"""A joined entry call of any mode that raises before its first phase (thirty-second fault campaign).

The ninth audit gave a joined ``one_shot`` / ``summarize_document`` that raised before its solve a failed
``execute`` node; a joined call of the other modes (``planning_and_control``, ``control``,
``human_in_the_loop`` ...) inside the application's own ``with workflow(...)`` still left no span and no row
when it raised before its first phase and the app caught it: the run completed and nothing said the call had
failed. Here each such call is cmbagent's own, given a work dir that is a regular file (cmbagent's first
``mkdir`` raises, before any model call), and must leave its run's first phase failed with the exception.
"""

from __future__ import annotations

from collections.abc import Callable
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

# entry point -> the phase its run starts with (the failed node's span name and short id)
CASES = {"planning_and_control": "planning", "control": "control", "human_in_the_loop": "chat"}


def _entry_in_users_run(entry: str) -> Callable[[Path], dict[str, Any]]:
    def body(work: Path) -> dict[str, Any]:
        import cmbagent

        blocked = work / "not-a-folder"
        blocked.write_text("a file where the work dir should be\n", encoding="utf-8")
        with cmbagent_otel.workflow("notebook cell", task=TASK):
            try:
                getattr(cmbagent, entry)(TASK, work_dir=str(blocked), api_keys=API_KEYS)
            except Exception as exc:  # the app's own handling: noted, and the cell goes on
                return {"caught": type(exc).__name__}
        return {"caught": None}

    return body


@pytest.mark.parametrize("entry", sorted(CASES))
def test_joined_call_of_a_planning_mode_failing_before_its_first_phase(instrumented: Callable[..., Run],  # noqa: F811
                                                                       tmp_path: Path, entry: str) -> None:
    """The call raises before any phase (no model call), the app catches it and its run completes: the call's
    first phase is there, failed: a red span with the exception event and, in the DAG, a failed node whose
    ``meta.error`` names the exception, with no events and no children. On 54dc9d7 there was no such span
    (``assert 0 == 1``) and the run's only nodes were init and terminator."""
    phase = CASES[entry]
    plain = instrumented("planning_and_control", _entry_in_users_run(entry), instrumented=False)
    run = instrumented("planning_and_control", _entry_in_users_run(entry))
    assert run.results == plain.results and run.results["caught"] is not None
    error = run.results["caught"]
    assert run.sequence == plain.sequence == []  # no model call
    _one_root_per_trace(run)
    red = [s for s in _named(run, f"phase {phase}") if s.status.status_code is StatusCode.ERROR]
    assert len(red) == 1, [s.name for s in run.spans]
    assert red[0].status.description.startswith(f"{error}: ")
    (exception,) = [e.attributes["exception.type"] for e in red[0].events if e.name == "exception"]
    assert exception.rsplit(".", 1)[-1] == error
    assert not [s for s in run.spans if s.parent is not None and s.parent.span_id == red[0].context.span_id]
    rows = _final_rows(_exported(run, tmp_path))
    (row,) = rows["runs"]
    assert row["status"] == "completed"
    nodes = _nodes_of(rows)
    node = nodes[red[0].attributes[sc.DAG_NODE]]
    assert node["status"] == "failed" and node["parent_node_id"] is None
    assert node["meta"]["error"].startswith(f"{error}: ")
    assert not [e for e in rows["events"] if e["node_id"] == node["id"]]
    print(entry, {s: n["status"] for s, n in nodes.items()})
