"""An offline cmbagent-style run: real AG2 agents, scripted model, no API key.

Used by ``cmbagent-otel demo``, the examples, the tests and the benchmarks. The run is a
``planning-control`` workflow: a planning phase (planner + plan reviewer), then a control
phase of three plan steps driven by a 4-agent group chat (engineer, executor, researcher,
control); step 2's first code execution fails and is redone twice.
"""

from __future__ import annotations

import os
import shlex
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from types import SimpleNamespace
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


def interpreter_context(work_dir: str) -> SimpleNamespace:
    """A virtual-env context that makes AG2's LocalCommandLineCodeExecutor run code with this
    interpreter: it runs ``python`` found on PATH, with the context's ``bin_path`` put first.

    That is this interpreter's own directory when its ``python`` is this interpreter (a
    virtual env); otherwise a ``python`` shim that execs it, in a new folder under ``work_dir``
    (``.interpreter-*``, readable by its owner alone), so a machine without ``python`` on PATH (only
    ``python3``) runs the demo all the same.
    """
    exe = Path(sys.executable)
    own = exe.with_name("python.exe" if os.name == "nt" else "python")
    try:
        same = own.exists() and os.path.samefile(own, exe)
    except OSError:
        same = False
    if same or os.name == "nt":
        return SimpleNamespace(bin_path=str(exe.parent), env_exe=str(exe))
    made = _shims.get(work_dir)
    if made is not None and os.path.isfile(Path(made) / "python"):
        return SimpleNamespace(bin_path=made, env_exe=str(exe))
    # a new folder of our own, never a name already there: in a shared work dir another user could
    # have planted `.interpreter/python` as a link (the shim written over its target) or as a file or
    # folder they can write (the code the demo runs swapped for theirs)
    Path(work_dir).mkdir(parents=True, exist_ok=True)
    shim_dir = Path(tempfile.mkdtemp(prefix=".interpreter-", dir=work_dir))
    shim = shim_dir / "python"
    with os.fdopen(os.open(shim, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o700),
                   "w") as handle:
        handle.write(f'#!/bin/sh\nexec {shlex.quote(str(exe))} "$@"\n')
    _shims[work_dir] = str(shim_dir)
    return SimpleNamespace(bin_path=str(shim_dir), env_exe=str(exe))


_shims: dict[str, str] = {}  # work dir -> the shim folder made for it (one per work dir, not per chat)


def local_executor(work_dir: str) -> Any:
    """AG2's LocalCommandLineCodeExecutor in ``work_dir``, running code with this interpreter."""
    import inspect

    from autogen.coding import LocalCommandLineCodeExecutor

    kwargs: dict[str, Any] = {"work_dir": work_dir, "timeout": 60}
    if "virtual_env_context" in inspect.signature(LocalCommandLineCodeExecutor).parameters:
        kwargs["virtual_env_context"] = interpreter_context(work_dir)
    return LocalCommandLineCodeExecutor(**kwargs)


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

    engineer = offline_agent("engineer", engineer_script)
    researcher = offline_agent("researcher", researcher_script)
    control = offline_agent("control", control_script)
    executor = autogen.ConversableAgent(
        "executor", llm_config=False, human_input_mode="NEVER",
        code_execution_config={"executor": local_executor(work_dir)},
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
                        # a fixed call id: a run's token counts do not depend on earlier runs in the process
                        [{"tool_calls": [{"id": "call_1", "name": "peak_position", "arguments": {"multipole": 1}}]},
                         "```python\nprint('peaks at 220, 540, 810')\n```"],
                        ["engineer", "executor", "engineer", "executor", "researcher"],
                    )
            with step(3, PLAN[2][1], agent="researcher") as third:
                group_chat_step(work_dir, ["Nothing to run."], ["researcher"],
                                researcher_script=["theta_s = 1.0411; TERMINATE"])
                third.set_summary("Acoustic scale fitted")
    return run_id
