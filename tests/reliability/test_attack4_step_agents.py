"""Plan-step agents named by model-written text are redacted like every agent name.

Found by the twenty-fifth campaign. Inside a ``control`` phase, the plan-step tracker opens a
``step n`` span per plan step and records its failed attempts, naming the step's agent from the
group's context variables (``agent_for_sub_task``) or the plan (``final_plan``'s
``sub_task_agent``, or the ``agent in charge:`` line of a text plan). Both are text a model wrote
(the planner's plan, a ``record_status`` tool call's effect), and went as given into
``cmbagent.step.agent`` of the step span and ``gen_ai.agent.name`` of the attempt and
status events, content capture on or off: a key quoted there reached every span exporter (the
DAG rows redact attributes again). They are now redacted and bounded as agent names are.
"""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

import pytest

import cmbagent_otel
from cmbagent_otel import redaction
from cmbagent_otel.demo import order_speakers
from cmbagent_otel.testing import ScriptedModelClient

from .conftest import needs_custom_client, rescript, scripted_agent
from .test_secrets import Sink, assert_clean, sink  # noqa: F401 (sink: fixture)

pytestmark = [pytest.mark.usefixtures("isolated_secrets"), needs_custom_client]

SHAPED = "sk-proj-" + "Ab12Cd34Ef56Gh78Ij90Kl12Mn34Op56Qr78"  # caught by its shape alone


def _plan_chat(work_dir: Path, plan: Any, step_agent: str) -> None:
    """A control phase whose group chat reports plan step 1 in progress, then failed, through a
    ``record_status`` tool that sets the executor's context variables (as cmbagent's does)."""
    import autogen
    from autogen import ConversableAgent, GroupChat, GroupChatManager

    runner = ConversableAgent("executor", llm_config=False, human_input_mode="NEVER")

    def record_status(current_status: str) -> str:
        """Record the status of the current plan step."""
        context = runner.context_variables
        context["final_plan"] = plan
        context["current_plan_step_number"] = 1
        context["current_status"] = current_status
        context["agent_for_sub_task"] = step_agent
        context["n_attempts"] = 1 if current_status == "failed" else 0
        context["max_n_attempts"] = 3
        return "recorded"

    script = [{"tool_calls": [{"id": f"call_status_{n}", "name": "record_status",
                               "arguments": {"current_status": status}}]}
              for n, status in enumerate(("in progress", "failed"))]
    engineer = scripted_agent("engineer", script)
    autogen.register_function(record_status, caller=engineer, executor=runner, name="record_status",
                              description="status")
    rescript(engineer, ScriptedModelClient, script)  # again: tools rebuild the client
    control = scripted_agent("control", ["Proceed."])
    researcher = scripted_agent("researcher", ["Step done. TERMINATE"])
    order = ["engineer", "executor", "engineer", "executor", "researcher"]
    chat = GroupChat([control, engineer, runner, researcher], messages=[], max_round=len(order) + 1,
                     speaker_selection_method=order_speakers(order))
    manager = GroupChatManager(chat, llm_config=False, silent=True,
                               is_termination_msg=lambda m: "TERMINATE" in str(m.get("content")))
    with cmbagent_otel.workflow("plan with a key"), cmbagent_otel.phase("control"):
        control.initiate_chat(manager, message="Carry out the plan.", max_turns=1, silent=True)


def _step_spans(where: Sink) -> list[Any]:
    return [s for s in where.memory.get_finished_spans() if s.name.startswith("step ")]


@pytest.mark.parametrize("capture", [False, True], ids=["content-off", "content-on"])
@pytest.mark.parametrize("where", ["context", "plan-list", "plan-text"])
def test_attack4_step_agent_from_the_plan_is_redacted(sink: Sink, caplog: pytest.LogCaptureFixture,  # noqa: F811
                                                      tmp_path: Path, capture: bool, where: str) -> None:
    registered = "QZ" + secrets.token_hex(16)
    redaction.register_secret(registered)  # e.g. the app's API key, quoted by the planner
    named = f"engineer {SHAPED} {registered}"
    if where == "context":  # agent_for_sub_task wins over the plan's agent
        plan: Any = [{"sub_task": "fit the spectrum", "sub_task_agent": "engineer"},
                     {"sub_task": "plot", "sub_task_agent": "engineer"}]
        step_agent = named
    elif where == "plan-list":
        plan, step_agent = [{"sub_task": "fit the spectrum", "sub_task_agent": named},
                            {"sub_task": "plot", "sub_task_agent": named}], ""
    else:  # PlannerResponse.format() text
        plan = ("- Step 1:\n  * sub-task: fit the spectrum\n  * agent in charge: " + named
                + "\n- Step 2:\n  * sub-task: plot\n  * agent in charge: " + named + "\n")
        step_agent = ""
    cmbagent_otel.instrument(tracer_provider=sink.provider, capture_content=capture, instrument_cmbagent=False)
    _plan_chat(tmp_path / "work", plan, step_agent)
    steps = _step_spans(sink)
    assert {s.name for s in steps} >= {"step 1", "step 1 attempt 1 failed", "step 1 reported failed", "step 2"}
    agents = [s.attributes.get("cmbagent.step.agent") or s.attributes.get("gen_ai.agent.name") for s in steps]
    assert all(a == "engineer" or a == f"engineer {redaction.REDACTED} {redaction.REDACTED}" for a in agents), agents
    assert agents.count("engineer") <= 1, agents  # only the context case's step 2 names the plan's own agent
    assert_clean(sink, caplog, SHAPED, registered, "Ab12Cd34Ef56")


def test_attack4_step_agent_is_bounded(sink: Sink, caplog: pytest.LogCaptureFixture,  # noqa: F811
                                       tmp_path: Path) -> None:
    cmbagent_otel.instrument(tracer_provider=sink.provider, capture_content=False, instrument_cmbagent=False)
    _plan_chat(tmp_path / "work", [{"sub_task": "fit", "sub_task_agent": "a" * 100_000}], "")
    agents = [s.attributes.get("cmbagent.step.agent") or s.attributes.get("gen_ai.agent.name")
              for s in _step_spans(sink)]
    assert agents and all(isinstance(a, str) and len(a) <= 256 for a in agents), [len(str(a)) for a in agents]


def test_attack4_plain_step_agent_kept(sink: Sink, tmp_path: Path) -> None:  # noqa: F811
    cmbagent_otel.instrument(tracer_provider=sink.provider, capture_content=False, instrument_cmbagent=False)
    _plan_chat(tmp_path / "work", [{"sub_task": "fit", "sub_task_agent": "engineer"}], "engineer")
    spans = {s.name: s for s in _step_spans(sink)}
    assert spans["step 1"].attributes.get("cmbagent.step.agent") == "engineer"
    assert spans["step 1 attempt 1 failed"].attributes.get("gen_ai.agent.name") == "engineer"
