"""An offline cmbagent-style run: real AG2 agents, scripted model, no API key.

Used by ``cmbagent-otel demo``, the examples, the tests and the benchmarks. The run is a
``planning-control`` workflow: a planning phase (planner + plan reviewer), then a control
phase of three plan steps driven by a 4-agent group chat (engineer, executor, researcher,
control); step 2's first code execution fails and is redone twice.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

from .testing import activate, offline_agent
from .workflow import phase, redo, step, workflow

PLAN = [
    (1, "Load the CMB power spectrum sample", "engineer"),
    (2, "Fit the acoustic peak positions", "engineer"),
    (3, "Summarise the fitted parameters", "researcher"),
]


def prepare_group(agents: Sequence[Any], work_dir: str) -> None:
    """Give group-chat members a work dir: cmbagent_autogen's run_chat saves each chat
    under ``<context work_dir>/chats``."""
    os.makedirs(os.path.join(work_dir, "chats"), exist_ok=True)
    for agent in agents:
        variables = getattr(agent, "context_variables", None)
        if variables is not None:
            variables["work_dir"] = work_dir


def order_speakers(order: Sequence[str]) -> Callable[[Any, Any], Any]:
    """A deterministic speaker-selection (handoff) function following ``order`` by name."""
    names = list(order)
    state = {"i": 0}

    def scripted_handoff(last_speaker: Any, groupchat: Any) -> Any:
        if state["i"] >= len(names):
            return None
        name = names[state["i"]]
        state["i"] += 1
        return groupchat.agent_by_name(name)

    return scripted_handoff


def group_chat_step(
    work_dir: str,
    engineer_script: Sequence[Any],
    order: Sequence[str],
    researcher_script: Sequence[Any] = ("Step done. TERMINATE",),
    control_script: Sequence[Any] = ("Proceed.",),
) -> Any:
    """Run one 4-agent group chat (engineer/executor/researcher/control) with a tool and code."""
    import autogen
    from autogen import GroupChat, GroupChatManager
    from autogen.coding import LocalCommandLineCodeExecutor

    engineer = offline_agent("engineer", engineer_script)
    researcher = offline_agent("researcher", researcher_script)
    control = offline_agent("control", control_script)
    executor = autogen.ConversableAgent(
        "executor", llm_config=False, human_input_mode="NEVER",
        code_execution_config={"executor": LocalCommandLineCodeExecutor(work_dir=work_dir, timeout=60)},
    )

    def peak_position(multipole: int) -> str:
        """Position of an acoustic peak (toy model)."""
        return f"peak near l={220 * multipole}"

    autogen.register_function(peak_position, caller=engineer, executor=executor, description="acoustic peak")
    # registering a tool rebuilds the caller's model client: activate the script again
    activate(engineer, engineer_script)
    agents = [control, engineer, executor, researcher]
    prepare_group(agents, work_dir)
    chat = GroupChat(
        agents, messages=[], max_round=len(order) + 1,
        speaker_selection_method=order_speakers(order),
    )
    manager = GroupChatManager(
        chat, llm_config=False, is_termination_msg=lambda m: "TERMINATE" in str(m.get("content"))
    )
    return control.initiate_chat(manager, message="Carry out the current step.", max_turns=1, silent=True)


def run_demo(work_dir: str | None = None, *, task: str = "Measure the CMB acoustic peaks") -> str:
    """Run the offline planning/control demo workflow; returns its run id (the trace id as UUID)."""
    import uuid

    from opentelemetry import trace

    work_dir = work_dir or tempfile.mkdtemp(prefix="cmbagent-otel-demo-")
    plan_text = "\n".join(f"{n}. {goal} ({agent})" for n, goal, agent in PLAN)
    with workflow("planning_and_control", mode="planning-control", task=task, agent="engineer",
                     model="scripted", work_dir=work_dir, max_redos=2):
        run_id = str(uuid.UUID(int=trace.get_current_span().get_span_context().trace_id))
        with phase("planning"):
            planner = offline_agent("planner", [plan_text])
            reviewer = offline_agent("plan_reviewer", ["The plan is sound. TERMINATE"])
            reviewer.initiate_chat(planner, message=task, max_turns=1, silent=True)
        with phase("control"):
            with step(1, PLAN[0][1], agent="engineer"):
                group_chat_step(work_dir, ["```python\nprint('loaded 2500 multipoles')\n```"],
                                ["engineer", "executor", "researcher"])
            with step(2, PLAN[1][1], agent="engineer"):
                # the first attempt's code exits non-zero (a failed code_exec event); two redos follow
                group_chat_step(work_dir, ["```python\nimport sys\nsys.exit('fit diverged')\n```"],
                                ["engineer", "executor", "control"])
                with redo(2, 1, "Use a smaller step size") as first_redo:
                    group_chat_step(work_dir, ["```python\nraise SystemExit(3)\n```"],
                                    ["engineer", "executor", "control"])
                    first_redo.fail("fit diverged again")
                with redo(2, 2, "Fit with the peak_position tool first"):
                    group_chat_step(
                        work_dir,
                        [{"tool_calls": [{"name": "peak_position", "arguments": {"multipole": 1}}]},
                         "```python\nprint('peaks at 220, 540, 810')\n```"],
                        ["engineer", "executor", "engineer", "executor", "researcher"],
                    )
            with step(3, PLAN[2][1], agent="researcher") as third:
                group_chat_step(work_dir, ["Nothing to run."], ["researcher"],
                                researcher_script=["theta_s = 1.0411; TERMINATE"])
                third.set_summary("Acoustic scale fitted")
    return run_id


def _cmd_demo(args: Any) -> int:
    """Run the offline demo into the DAG database, then print the run's DAG."""
    import contextlib
    import io
    import logging

    from .bootstrap import instrument, uninstrument
    from .cli import CLIError, main
    from .exporters.dag import DagSpanExporter
    from .provider import exporter_names

    for name in ("autogen", "autogen.oai.client"):
        logging.getLogger(name).setLevel(logging.WARNING)
    exporter = DagSpanExporter(args.db)
    others = [name for name in exporter_names() if name != "cmbagent_dag"]
    instrument(exporters=others, span_exporters=[exporter], service_name="cmbagent-otel-demo",
               instrument_cmbagent=False)
    transcript = io.StringIO()
    try:
        with contextlib.redirect_stdout(transcript):
            run_id = run_demo(args.work_dir)
    finally:
        uninstrument()  # flushes every batch into the database
    stats = exporter.stats()
    if stats["dropped"] or stats["spilled"]:
        raise CLIError(f"{stats['dropped']} spans lost and {stats['spilled']} spilled instead of written "
                       "to the database (see the log above)")
    print(f"demo run {run_id}: {stats['exported']} spans written to the DAG database")
    argv = ["dag", run_id, "--format", args.format]
    if args.db:
        argv = ["--db", args.db, *argv]
    return main(argv)


def add_demo_parser(subparsers: Any) -> None:
    """Register ``cmbagent-otel demo``."""
    parser = subparsers.add_parser(
        "demo", help="run an offline planning/control workflow (no API key) and print its DAG")
    parser.add_argument("--work-dir", default=None, help="where the demo's code runs (default: a temp dir)")
    parser.add_argument("--format", choices=("tree", "json", "dot", "mermaid"), default="tree")
    parser.set_defaults(func=_cmd_demo)
