"""The offline group-chat workload shared by the benchmarks (no network, no API key).

Four agents in an AG2 ``GroupChat`` driven by a deterministic speaker order: an engineer
that calls a tool, an executor that runs it, a researcher and a critic that answer in
text. Every model answer comes from :class:`cmbagent_otel.testing.ScriptedModelClient`
through the real ``OpenAIWrapper.create`` path. No code execution: a subprocess per
execution would dominate the timings and hide the per-call instrumentation cost.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from cmbagent_otel.testing import ScriptedModelClient, scripted_llm_config

# AG2 logs one INFO line per agent built with a custom model client
logging.getLogger("autogen.oai.client").setLevel(logging.WARNING)

CYCLE = ("engineer", "executor", "researcher", "critic")
LLM_AGENTS_PER_CYCLE = 3  # engineer, researcher, critic (the executor has no model)


class Counter:
    """Counts model calls so the benchmark divides by what really ran."""

    def __init__(self) -> None:
        self.calls = 0


def _responder(counter: Counter, answers: list[Any]) -> Any:
    cycle = itertools.cycle(answers)

    def answer(messages: list[dict[str, Any]]) -> Any:
        counter.calls += 1
        return next(cycle)

    return answer


def build_chat(cycles: int, counter: Counter) -> tuple[Any, Any, list[Any]]:
    """Agents and manager for one chat of ``cycles`` rounds of the 4-agent cycle.

    Returns ``(initiator, manager, agents)``; run it with :func:`run_chat`.
    """
    import autogen
    from autogen import ConversableAgent, GroupChat, GroupChatManager

    def agent(name: str, answers: list[Any]) -> Any:
        a = ConversableAgent(name, llm_config=scripted_llm_config(), human_input_mode="NEVER")
        a.register_model_client(ScriptedModelClient, responder=_responder(counter, answers))
        return a

    engineer_answers: list[Any] = [{"tool_calls": [{"name": "peak_position", "arguments": {"multipole": 2}}]}]
    engineer = agent("engineer", engineer_answers)
    researcher = agent("researcher", ["The peak sits at l=440, consistent with Planck."])
    critic = agent("critic", ["Check the error bars before the next step."])
    executor = ConversableAgent("executor", llm_config=False, human_input_mode="NEVER")

    def peak_position(multipole: int) -> str:
        """Position of an acoustic peak (toy model)."""
        return f"peak near l={220 * multipole}"

    autogen.register_function(peak_position, caller=engineer, executor=executor, description="acoustic peak")
    # registering a tool rebuilds the caller's model client
    engineer.register_model_client(ScriptedModelClient, responder=_responder(counter, engineer_answers))

    order = list(CYCLE) * cycles
    state = {"i": 0}

    def scripted_handoff(last_speaker: Any, groupchat: Any) -> Any:
        if state["i"] >= len(order):
            return None
        name = order[state["i"]]
        state["i"] += 1
        return groupchat.agent_by_name(name)

    agents = [engineer, executor, researcher, critic]
    chat = GroupChat(agents, messages=[], max_round=len(order) + 1, speaker_selection_method=scripted_handoff)
    manager = GroupChatManager(chat, llm_config=False, silent=True)
    return critic, manager, agents


def run_chat(initiator: Any, manager: Any) -> Any:
    """Run one chat; returns AG2's ``ChatResult``."""
    return initiator.initiate_chat(manager, message="Fit the acoustic peaks.", max_turns=1, silent=True)


# --- two-agent workloads (issue 13's peer benchmarks): ``--workload`` of bench_overhead.py ---

def _peak_position(multipole: int) -> str:
    """Position of an acoustic peak (toy model)."""
    return f"peak near l={220 * multipole}"


def build_tools(cycles: int, counter: Counter) -> tuple[Any, Any, list[Any]]:
    """A two-agent chat of ``cycles`` turns: the assistant's every answer is a tool call that the
    user agent executes (one LLM call and one tool call per turn). Returns ``(user, assistant, agents)``."""
    import autogen
    from autogen import ConversableAgent

    answers: list[Any] = [{"tool_calls": [{"name": "peak_position", "arguments": {"multipole": 2}}]}]
    assistant = ConversableAgent("assistant", llm_config=scripted_llm_config(), human_input_mode="NEVER")
    user = ConversableAgent("user", llm_config=False, human_input_mode="NEVER")
    autogen.register_function(_peak_position, caller=assistant, executor=user, name="peak_position",
                              description="acoustic peak")
    # registering a tool rebuilds the caller's model client
    assistant.register_model_client(ScriptedModelClient, responder=_responder(counter, answers))
    return user, assistant, [assistant, user]


_CODE_DIR: Any = None


def build_code(cycles: int, counter: Counter) -> tuple[Any, Any, list[Any]]:
    """A two-agent chat of ``cycles`` turns: the assistant's every answer is a Python code block that
    the user agent runs with AG2's ``LocalCommandLineCodeExecutor`` (a subprocess per turn, in one
    temporary directory for the whole process). Returns ``(user, assistant, agents)``."""
    import tempfile

    from autogen import ConversableAgent
    from autogen.coding import LocalCommandLineCodeExecutor

    global _CODE_DIR
    if _CODE_DIR is None:
        _CODE_DIR = tempfile.TemporaryDirectory(prefix="bench-code-")  # removed at exit
    answers = ["Compute the peak:\n```python\nprint(220 * 2)\n```"]
    assistant = ConversableAgent("assistant", llm_config=scripted_llm_config(), human_input_mode="NEVER")
    assistant.register_model_client(ScriptedModelClient, responder=_responder(counter, answers))
    executor = LocalCommandLineCodeExecutor(work_dir=_CODE_DIR.name, timeout=60)
    user = ConversableAgent("user", llm_config=False, human_input_mode="NEVER",
                            code_execution_config={"executor": executor})
    return user, assistant, [assistant, user]


class _KeptExecutor(ThreadPoolExecutor):
    """An executor that survives ``loop.close()`` (which shuts down the loop's default executor)."""

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        pass


class Workload:
    """One workload of ``bench_overhead.py --workload``: how to build and run a chat, and the CPU clock
    of the threads that run it."""

    def __init__(self, name: str, description: str, build: Any, is_async: bool = False) -> None:
        self.name = name
        self.description = description
        self.build = build
        self.is_async = is_async
        self._executor: _KeptExecutor | None = None

    def executor(self) -> _KeptExecutor:
        """The async workload's event-loop executor: one thread, kept for the whole process, so its
        CPU clock can be read before and after each chat (AG2's ``a_generate_oai_reply`` runs the
        model call there, through ``run_in_executor``)."""
        if self._executor is None:
            self._executor = _KeptExecutor(max_workers=1, thread_name_prefix="bench-loop")
            self._executor.submit(lambda: None).result()  # start its thread
        return self._executor

    def threads(self) -> list[Any]:
        """The threads besides the caller's that run part of the chat (the async loop's executor)."""
        return list(self._executor._threads) if self._executor is not None else []  # type: ignore[attr-defined]

    def cpu(self) -> float:
        """CPU seconds of the chat's threads: the calling thread, plus the async loop's executor thread."""
        total = time.thread_time()
        for thread in self.threads():
            total += time.clock_gettime(time.pthread_getcpuclockid(thread.ident))
        return total

    def run(self, initiator: Any, recipient: Any, cycles: int) -> Any:
        """Run one chat of ``cycles`` turns (the group chat: built with them); returns AG2's ``ChatResult``."""
        if self.name == "group":
            return run_chat(initiator, recipient)
        message = "Fit the acoustic peaks."
        if not self.is_async:
            return initiator.initiate_chat(recipient, message=message, max_turns=cycles, silent=True)
        loop = asyncio.new_event_loop()
        loop.set_default_executor(self.executor())
        try:
            return loop.run_until_complete(
                initiator.a_initiate_chat(recipient, message=message, max_turns=cycles, silent=True))
        finally:
            loop.close()


WORKLOADS = {
    "group": Workload("group", "4-agent group chat (per cycle: tool call, tool run, 2 text answers)", build_chat),
    "tools": Workload("tools", "two-agent initiate_chat, a tool call every turn", build_tools),
    "tools_async": Workload("tools_async", "the same chat through a_initiate_chat (async)", build_tools, True),
    "code": Workload("code", "two-agent initiate_chat, a code block run by LocalCommandLineCodeExecutor every turn",
                     build_code),
}
