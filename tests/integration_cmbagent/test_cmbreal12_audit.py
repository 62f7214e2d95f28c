"""What a user of the real cmbagent package sees, twelfth audit (session 39).

A plan step whose program fails all its attempts while the plan goes on: cmbagent's executor formatter
hands the last failure to control (``post_execution_transfer(next_agent_suggestion="control")`` counts it in
``n_attempts`` and transfers to control, not to the terminator), and control announces the next step. The
plan runs to its end and ``planning_and_control`` returns normally. The run, offline against the scripted
backend, is exported by the DAG exporter into SQLite, read back as cmbagent's backend reads it
(``test_real_audit._final_rows``) and, with ``CMBAGENT_OTEL_MARS_SRC`` / ``CMBAGENT_OTEL_MARS_PYTHON``, by
cmbagent's own backend code.
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

from .scripted_cmbagent import DEFAULT_PLAN, CmbagentScript
from .test_cmbagent_runs import _exported, _kind, _one
from .test_cmbreal5_audit import _mars
from .test_real_audit import (  # noqa: F401 - run_cmbagent: the fixture (getfixturevalue)
    _final_rows,
    _nodes_of,
    _one_root_per_trace,
    run_cmbagent,
)

pytestmark = pytest.mark.cmbagent_autogen


class GiveUpOnStep1:
    """The scripted backend, except that step 1's two programs fail, the executor's formatter hands the
    second failure to control (cmbagent counts it: ``n_attempts`` 2, = ``max_n_attempts``) and control,
    instead of reporting step 1, announces step 2: the plan goes on."""

    def __init__(self, script: CmbagentScript) -> None:
        script.fail_runs = frozenset({1, 2})
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


def test_a_step_out_of_attempts_that_control_moves_past_does_not_stop_the_plan(
        request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """Step 1 fails all its attempts (n_attempts 2 >= max_n_attempts 2), control starts step 2 and the plan
    runs to its end: steps 2 and 3 run and complete, cmbagent returns normally. The run was stored failed,
    "plan stopped: step 1 ran out of attempts", its control phase and terminator failed with it, over two
    completed steps that ran after the "stop". The step now ends as one control moved past while it was
    reported failed: completed, its summary saying it ran out of attempts, its two failed attempts visible
    (markers, ``cmbagent.step.attempts``); control, the run and terminator completed; cmbagent's backend
    serves the same DAG."""
    run = request.getfixturevalue("run_cmbagent")("planning_and_control", responder=GiveUpOnStep1,
                                                  max_n_attempts=2)
    assert run.error is None
    assert run.results["final_context"]["current_plan_step_number"] == 3
    assert run.sequence.count("researcher") == 1 and run.sequence.count("engineer") == 3  # steps 2 and 3 ran
    _one_root_per_trace(run)
    step1 = _one(run, "step 1")
    assert step1.status.status_code is StatusCode.UNSET, step1.status.description
    assert step1.attributes[sc.STEP_SUMMARY] == (
        "the next step started after step 1 ran out of attempts (n_attempts 2 >= max_n_attempts 2)")
    assert (step1.attributes[sc.STEP_ATTEMPTS], step1.attributes[sc.STEP_MAX_ATTEMPTS]) == (2, 2)
    markers = [s for s in run.spans if _kind(s) == sc.KIND_ATTEMPT]
    assert [s.name for s in markers] == ["step 1 attempt 1 failed", "step 1 attempt 2 failed"]
    for name in ("workflow planning_and_control", "phase control"):
        assert _one(run, name).status.status_code is StatusCode.UNSET, name
    url = _exported(run, tmp_path)
    rows = _final_rows(url)
    (row,) = rows["runs"]
    assert row["status"] == "completed" and row["meta"].get("error") is None
    nodes = _nodes_of(rows)
    assert [nodes[s]["status"] for s in ("planning", "control", "step_1", "step_2", "step_3", "terminator")] == [
        "completed"] * 6
    assert nodes["step_1"]["meta"]["summary"] == step1.attributes[sc.STEP_SUMMARY]
    failed_codes = [e for e in rows["events"] if e["event_type"] == "code_exec" and e["status"] == "failed"]
    assert len(failed_codes) == 2
    assert rows["states"][0]["status"] == "completed"
    answers = _mars(tmp_path, url)
    if answers is not None:  # cmbagent's own backend on these rows
        assert {k: v["EXC"] for k, v in answers.items() if isinstance(v, dict) and "EXC" in v} == {}
        dag = {n["id"]: n["status"] for n in answers[f"{row['id']} dag"]["nodes"]}
        assert dag == {s: n["status"] for s, n in nodes.items()}


@pytest.mark.parametrize("bound", [False, True], ids=["entry_point", "bound_before_instrument"])
def test_carryover_loop_stopped_between_two_steps_leaves_the_later_steps_pending(
        request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, bound: bool) -> None:
    """The carryover loop (``planning_and_control_context_carryover``) raising between two steps: step 1's solve
    has returned and cmbagent writes its reports (``display_cost(name_append="step_1")``, here failing as on a
    full disk; Ctrl-C while it builds step 2's agents takes the same path) before step 2 starts. The
    exception leaves the entry call; the plan's steps 2 and 3 never start. cmbagent's DAG has a node per plan
    step once planning is done (pending) and never starts those two; ours had no node for them at all (the
    control phase failed over step 1 alone), where a step that raises or runs out of attempts leaves them
    pending. Now they are pending nodes, goal and agent from the plan, as there; also for the function bound
    before ``instrument()`` (its run opened by its first solve, ended through ``sys.monitoring``)."""
    import cmbagent.cmbagent as module

    # the unwrapped function, as `from cmbagent import ...` before instrument() binds it
    function = module.planning_and_control_context_carryover if bound else None

    original = module.CMBAgent.display_cost

    def display_cost(self: Any, *args: Any, **kwargs: Any) -> Any:
        if kwargs.get("name_append") == "step_1":
            raise OSError(28, "No space left on device")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(module.CMBAgent, "display_cost", display_cost)
    run = request.getfixturevalue("run_cmbagent")("carryover", responder=lambda script: script, function=function)
    assert isinstance(run.error, OSError) and run.error.errno == 28
    assert "researcher" not in run.sequence  # step 2 never started
    _one_root_per_trace(run)
    steps = {s.name: s for s in run.spans if _kind(s) == sc.KIND_STEP}
    assert sorted(steps) == ["step 1", "step 2", "step 3"]
    assert [steps[n].attributes[sc.STEP_STATUS] for n in ("step 2", "step 3")] == [sc.STEP_NOT_STARTED] * 2
    url = _exported(run, tmp_path)
    rows = _final_rows(url)
    (row,) = rows["runs"]
    assert row["status"] == "failed" and row["meta"]["error"].startswith("OSError: [Errno 28]")
    nodes = _nodes_of(rows)
    assert [nodes[s]["status"] for s in ("planning", "step_1", "step_2", "step_3", "control", "terminator")] == [
        "completed", "completed", "pending", "pending", "failed", "failed"]
    later = [nodes[s] for s in ("step_2", "step_3")]
    assert [(n["agent"], n["meta"]["goal"], n["parent_node_id"]) for n in later] == [
        (p.agent, p.task, nodes["control"]["id"]) for p in DEFAULT_PLAN[1:]]
    assert (rows["states"][0]["current_phase"], rows["states"][0]["current_step"]) == ("control", 1)
    answers = _mars(tmp_path, url)
    if answers is not None:  # cmbagent's own backend on these rows
        assert {k: v["EXC"] for k, v in answers.items() if isinstance(v, dict) and "EXC" in v} == {}
        dag = {n["id"]: n["status"] for n in answers[f"{row['id']} dag"]["nodes"]}
        assert dag == {s: n["status"] for s, n in nodes.items()}
