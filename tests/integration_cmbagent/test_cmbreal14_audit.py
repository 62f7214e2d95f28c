"""What a user of the real cmbagent package sees, fourteenth audit (session 40).

Real cmbagent runs, offline against the scripted backend, exported by the DAG exporter into SQLite and read
back as cmbagent's backend reads them (``test_real_audit._final_rows``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.trace import StatusCode

os.environ.setdefault("CMBAGENT_DISABLE_DISPLAY", "true")
pytest.importorskip("cmbagent", reason="cmbagent is not installed (it needs Python >= 3.12; see docs/cmbagent.md)")

from cmbagent_otel import semconv as sc

from .scripted_cmbagent import CmbagentScript, PlanStep
from .test_cmbagent_runs import _exported, _kind, _one
from .test_real_audit import (  # noqa: F401 - run_cmbagent: the fixture (getfixturevalue)
    _final_rows,
    _nodes_of,
    _one_root_per_trace,
    run_cmbagent,
)

pytestmark = pytest.mark.cmbagent_autogen

ENGINEER_TWICE = (PlanStep("Generate the mock power spectrum", "engineer"),
                  PlanStep("Fit the acoustic peak", "engineer"),
                  PlanStep("Interpret the fit", "researcher"))


class GiveUpOnStep1ThenEngineer:
    """The scripted backend on a plan engineer / engineer / researcher, except that step 1's two programs
    fail, the executor's formatter hands the second failure to control (cmbagent counts it: ``n_attempts`` 2,
    = ``max_n_attempts``) and control announces step 2 without reporting step 1: cmbagent keeps the count."""

    def __init__(self, script: CmbagentScript) -> None:
        script.fail_runs = frozenset({1, 2})
        script.plan = ENGINEER_TWICE
        self.script, self.moved_on = script, False

    def __call__(self, body: dict[str, Any]) -> Any:
        agent = self.script.agent_of(body)
        answer = self.script(body)
        if self.script._engineer_runs == 2 and agent == "executor_response_formatter":
            answer["tool_calls"][0]["arguments"]["next_agent_suggestion"] = "control"
        elif self.script._engineer_runs == 2 and agent == "control" and not self.moved_on:
            self.moved_on = True
            return self.script._status("in progress", 2)
        return answer


def test_a_step_stopped_by_the_attempts_carried_over_from_the_step_before_says_so(
        request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """Control moves past step 1 out of attempts (the session 39 case) to step 2, an engineer's: cmbagent
    resets ``n_attempts`` only when a step is reported completed or failed, so step 2 starts at 2, and its
    first ``post_execution_transfer`` (after a program that ran fine) goes to the terminator: the plan stops
    there. cmbagent's rule, kept (step 2, control and the run failed). The record said "step 2 ran out of
    attempts (n_attempts 2 >= max_n_attempts 2)", over a step with no failed attempt and a successful
    program; it now says the count is step 1's."""
    run = request.getfixturevalue("run_cmbagent")("planning_and_control", responder=GiveUpOnStep1ThenEngineer,
                                                  max_n_attempts=2)
    assert run.error is None
    assert run.results["final_context"]["current_plan_step_number"] == 2
    assert run.sequence.count("engineer") == 3 and run.sequence[-1] == "terminator"
    _one_root_per_trace(run)
    codes = [s.status.status_code for s in run.spans if s.name.startswith("execute_code")]
    assert codes == [StatusCode.ERROR, StatusCode.ERROR, StatusCode.UNSET]  # step 2's program ran fine
    step2 = _one(run, "step 2")
    why = ("step 2 reached cmbagent's attempt limit with the attempts of step 1 carried over "
           "(n_attempts 2 >= max_n_attempts 2; 0 failed in step 2)")
    assert (step2.status.status_code, step2.status.description) == (StatusCode.ERROR, why)
    assert step2.attributes[sc.STEP_ATTEMPTS] == 0
    assert [s.name for s in run.spans if _kind(s) == sc.KIND_ATTEMPT] == [
        "step 1 attempt 1 failed", "step 1 attempt 2 failed"]
    for name in ("workflow planning_and_control", "phase control"):
        assert _one(run, name).status.description == f"plan stopped: {why}", name
    rows = _final_rows(_exported(run, tmp_path))
    (row,) = rows["runs"]
    nodes = _nodes_of(rows)
    assert (row["status"], row["meta"]["error"]) == ("failed", f"plan stopped: {why}")
    assert [nodes[s]["status"] for s in ("step_1", "step_2", "step_3", "control")] == [
        "completed", "failed", "pending", "failed"]
    assert nodes["step_2"]["meta"]["error"] == why
