"""What a user of the real cmbagent package sees, nineteenth audit (session 44).

MARS's own ``WorkflowExecutor`` and ``ControlPhase`` (``CMBAGENT_OTEL_MARS_SRC``, loaded next to the PyPI cmbagent
by conftest's ``mars_phases``) run offline against the scripted backend; spans read back, and the rows the DAG
exporter writes read as cmbagent's backend reads them (``test_real_audit._final_rows``, MARS's routers).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("CMBAGENT_DISABLE_DISPLAY", "true")
pytest.importorskip("cmbagent", reason="cmbagent is not installed (it needs Python >= 3.12; see docs/cmbagent.md)")

from .test_cmbagent_runs import _exported
from .test_cmbreal17_audit import assert_cancel_restated
from .test_cmbreal18_audit import _executor_in_the_apps_run
from .test_real_audit import _final_rows, _nodes_of, _one_root_per_trace, run_cmbagent  # noqa: F401 - fixture

pytestmark = pytest.mark.cmbagent_autogen

CANCELLED_AFTER_STEP_1 = ["completed", "pending", "pending", "failed"]  # step_1, step_2, step_3, control


def test_an_executor_cancel_the_app_catches_inside_its_run_leaves_the_run_cancelled(
        request: pytest.FixtureRequest, mars_phases: Path, tmp_path: Path) -> None:
    """Session 43's Left. The user cancels from the UI after step 1; MARS's executor restates the cancel as its
    ``RuntimeError("Phase control failed: Workflow cancelled by user")``, which the application catches inside its
    own ``workflow`` block and then leaves the block normally. The cancel happened (cmbagent's cancel endpoint
    marks the run ``cancelled`` whatever the application does next): the run ends with the cancel, as when the
    error leaves the block, the ``RuntimeError`` one more exception event. On main the run was ``completed`` over
    a failed ``control`` node and pending steps."""
    run = request.getfixturevalue("run_cmbagent")("carryover", responder=lambda script: script,
                                                  function=_executor_in_the_apps_run(True, caught_inside=True))
    assert run.error is None, run.error
    assert run.results == {"error": "Phase control failed: Workflow cancelled by user", "phases": ["failed"]}
    assert "researcher" not in run.sequence  # step 2 never started
    _one_root_per_trace(run)
    (root,) = [s for s in run.spans if s.parent is None]
    assert root.name == "workflow preloaded control"
    assert_cancel_restated(run, root)
    rows = _final_rows(_exported(run, tmp_path))
    (row,) = rows["runs"]
    assert row["status"] == "cancelled" and "Workflow cancelled by user" in row["meta"]["error"]
    nodes = _nodes_of(rows)
    assert [nodes[s]["status"] for s in ("step_1", "step_2", "step_3", "control")] == CANCELLED_AFTER_STEP_1
    assert all(n["status"] != "running" for n in nodes.values())


def test_cmbagent_backend_reads_the_caught_cancel_as_a_cancelled_run(request: pytest.FixtureRequest,
                                                                    mars_phases: Path, tmp_path: Path) -> None:
    """The same run read by cmbagent's own backend (MARS's routers, unmodified, ``CMBAGENT_OTEL_MARS_PYTHON``) from
    SQLite and PostgreSQL: every route the same from both, ``statuses == ['cancelled']`` (``['completed']`` on
    main), the DAG ours node for node."""
    from .test_cmbreal9_audit import served_run

    *_, row, lite = served_run(request, mars_phases, tmp_path, _executor_in_the_apps_run(True, caught_inside=True),
                               "cancelled")
    dag = {n["id"]: n for n in lite[f"{row['id']} dag"]["nodes"]}
    assert [dag[s]["status"] for s in ("step_1", "step_2", "step_3", "control")] == CANCELLED_AFTER_STEP_1
