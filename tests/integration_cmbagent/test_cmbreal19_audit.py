"""What a user of the real cmbagent package sees, nineteenth audit (session 44).

MARS's own ``WorkflowExecutor`` and ``ControlPhase`` (``CMBAGENT_OTEL_MARS_SRC``, loaded next to the PyPI cmbagent
by conftest's ``mars_phases``) run offline against the scripted backend; spans read back, and the rows the DAG
exporter writes read as cmbagent's backend reads them (``test_real_audit._final_rows``, MARS's routers).
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.trace import StatusCode

os.environ.setdefault("CMBAGENT_DISABLE_DISPLAY", "true")
pytest.importorskip("cmbagent", reason="cmbagent is not installed (it needs Python >= 3.12; see docs/cmbagent.md)")

from cmbagent_otel import semconv as sc

from .test_cmbagent_runs import _exported, _one
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


# --- MARS's LangGraph phases: their model calls go through LangChain chat models, not AG2 -----------------------
IDEA_USAGE, METHODS_USAGE = (12, 3), (21, 5)  # (prompt, completion) tokens the server reports per call
RESPONSE_MODEL = "gpt-4o-mini-2024-07-18"


def _langchain_answers(body: dict[str, Any], headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
    """OpenAI's chat completions as ``ChatOpenAI`` reads them: one answer, or (``stream``) server-sent chunks ending
    with the usage chunk ``stream_options.include_usage`` asks for."""
    head = {"id": "chatcmpl-lc", "created": 0, "model": RESPONSE_MODEL}
    if not body.get("stream"):
        prompt, completion = IDEA_USAGE
        answer = {**head, "object": "chat.completion", "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "An idea."}, "finish_reason": "stop"}],
                  "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                            "total_tokens": prompt + completion}}
        return 200, {"Content-Type": "application/json"}, json.dumps(answer).encode()
    prompt, completion = METHODS_USAGE
    chunk = {**head, "object": "chat.completion.chunk"}
    chunks = [{**chunk, "choices": [{"index": 0, "delta": {"role": "assistant", "content": text},
                                     "finish_reason": None}]} for text in ("The ", "methods.")]
    chunks.append({**chunk, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    chunks.append({**chunk, "choices": [], "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                                                     "total_tokens": prompt + completion}})
    sse = b"".join(b"data: " + json.dumps(c).encode() + b"\n\n" for c in chunks) + b"data: [DONE]\n\n"
    return 200, {"Content-Type": "text/event-stream"}, sse


def _langgraph_paper_phase(case: str) -> Any:
    """An entry function for ``run_cmbagent``: a phase of the shape of MARS's LangGraph phases
    (``DeepresearchPaperPhase``: a ``Phase`` driving its own ``PhaseExecutionManager``, ``start_step(1, ...)``, then
    ``await graph.ainvoke(...)``, awaited by hand), its graph a real LangGraph ``StateGraph`` of two nodes calling a
    real ``ChatOpenAI`` as MARS's ``paper_agents.tools`` do: ``LLM_call``'s ``state['llm'].invoke(prompt)`` and
    ``LLM_call_stream``'s ``for chunk in state['llm'].stream(prompt)``, reading the tokens from
    ``usage_metadata``. ``case``: ``answered``; ``stream_fails`` (the server answers the stream HTTP 500: the
    ``openai`` error out of the node, the graph and the phase); ``stream_left_early`` (the node stops reading after
    the first chunk). A call of the model before the phase starts is outside any run. Returns the texts and token
    counts the nodes read, or the error's type."""
    return functools.partial(_run_langgraph_paper_phase, case)


def _run_langgraph_paper_phase(case: str, task: str, work_dir: str, api_keys: dict[str, str],
                               **_: Any) -> dict[str, Any]:
    def idea(state: dict[str, Any]) -> dict[str, Any]:
        message = state["llm"].invoke("Write an idea for a paper on the CMB")
        usage = message.usage_metadata
        return {"idea": message.content, "tokens": [(usage["input_tokens"], usage["output_tokens"])]}

    def methods(state: dict[str, Any]) -> dict[str, Any]:
        text, tokens = "", (0, 0)
        for chunk in state["llm"].stream("Write the methods"):
            text += chunk.content
            if case == "stream_left_early":
                break
            if chunk.usage_metadata:
                tokens = (chunk.usage_metadata["input_tokens"], chunk.usage_metadata["output_tokens"])
        return {"methods": text, "tokens": [*state["tokens"], tokens]}

    def answer(body: dict[str, Any], headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
        if case == "stream_fails" and body.get("stream"):
            return 500, {"Content-Type": "application/json"}, b'{"error": {"message": "overloaded"}}'
        return _langchain_answers(body, headers)

    return run_paper_phase((idea, methods), answer, task, work_dir, api_keys)


def run_paper_phase(nodes: tuple[Callable[..., Any], ...], answer: Callable[..., Any], task: str, work_dir: str,
                    api_keys: dict[str, str], model: Callable[[str], Any] | None = None) -> dict[str, Any]:
    """A phase of the shape of MARS's LangGraph phases (see :func:`_langgraph_paper_phase`) whose graph runs
    ``nodes`` in order (functions or coroutine functions of the state, named by their ``__name__``; the state's
    ``llm`` ``model(base_url)`` of a loopback server answering with ``answer``, by default a ``ChatOpenAI``),
    awaited by hand after a call of the model outside any run. Returns the final state's ``idea``, ``methods`` and
    ``tokens``, or the error's type."""
    from typing import TypedDict

    from cmbagent.phases.base import Phase, PhaseContext
    from cmbagent.phases.execution_manager import PhaseExecutionManager
    from langchain_openai import ChatOpenAI
    from langgraph.graph import END, START, StateGraph

    from cmbagent_otel.testing import FakeOpenAIServer

    class State(TypedDict, total=False):
        llm: Any
        idea: str
        methods: str
        tokens: list[tuple[int, int]]

    builder = StateGraph(State)
    previous = START
    for node in nodes:
        builder.add_node(node.__name__, node)
        builder.add_edge(previous, node.__name__)
        previous = node.__name__
    builder.add_edge(previous, END)
    graph = builder.compile()

    class PaperPhase(Phase):  # MARS's DeepresearchPaperPhase's calls, in its order
        phase_type, display_name = "deepresearch_paper", "Paper"

        async def execute(self, context: PhaseContext) -> Any:
            manager = PhaseExecutionManager(context, self)
            manager.start()
            with FakeOpenAIServer(raw_responder=answer) as server:
                manager.start_step(1, "Generating research paper")
                llm = (model or chat_openai)(server.base_url)
                state = await graph.ainvoke({"llm": llm})
                manager.complete_step(1, "Research paper generated")
            manager.complete()
            return state

    def chat_openai(base_url: str) -> Any:
        return ChatOpenAI(model="gpt-4o-mini", api_key=api_keys["OPENAI"], base_url=base_url, stream_usage=True,
                          max_retries=0)

    with FakeOpenAIServer(raw_responder=answer) as server:  # outside any run: no span
        (model or chat_openai)(server.base_url).invoke("Warm up")
    context = PhaseContext(workflow_id="w", run_id="r", phase_id="paper", task=task, work_dir=str(work_dir),
                           api_keys=api_keys)
    try:
        state = asyncio.run(PaperPhase().execute(context))
    except Exception as exc:
        return {"error": type(exc).__name__}
    return {"idea": state["idea"], "methods": state["methods"], "tokens": state["tokens"]}


@pytest.mark.parametrize("case", ["answered", "stream_fails", "stream_left_early"])
def test_a_langgraph_phases_model_calls_are_chat_spans_of_its_step_with_usage_and_cost_rows(
        request: pytest.FixtureRequest, mars_phases: Path, tmp_path: Path, case: str) -> None:
    """Session 43's Left (audit 19, item 2). MARS's LangGraph phases (``deepresearch_paper``, ``newspulse_report``)
    call their models through LangChain chat models (``ChatOpenAI``, ``AzureChatOpenAI``, ...), not AG2's
    ``OpenAIWrapper``: on main the phase and its step were nodes, but the graph's model calls had no ``chat`` span,
    no LLM event under the step and no cost row. Now each ``invoke`` and each ``stream`` of a chat model inside a
    run is a ``chat <model>`` span of the step that was open (its agent the LangGraph node, provider and models from
    LangChain's own ``ls_*`` params and the answer, usage from ``usage_metadata``, the cost as AG2 prices the same
    answer); rows: one LLM event each in ``step_1`` and one cost row each with those tokens. A stream the server
    fails: its span failed with the ``openai`` error, which the application gets unchanged (step, phase and run
    failed with it, as before). A stream the application stops reading: its span ends, not failed, with no usage
    (the usage chunk was never read). A call outside any run has no span. The application gets what it got
    without us."""
    pytest.importorskip("langgraph", reason="langgraph / langchain_openai are not installed")
    pytest.importorskip("langchain_openai", reason="langgraph / langchain_openai are not installed")
    run = request.getfixturevalue("run_cmbagent")("carryover", responder=lambda script: script,
                                                  function=_langgraph_paper_phase(case))
    assert run.error is None, run.error
    assert run.results == {
        "answered": {"idea": "An idea.", "methods": "The methods.", "tokens": [IDEA_USAGE, METHODS_USAGE]},
        "stream_fails": {"error": server_error(run.results)},
        "stream_left_early": {"idea": "An idea.", "methods": "The ", "tokens": [IDEA_USAGE, (0, 0)]}}[case]
    _one_root_per_trace(run)
    step_1 = _one(run, "step 1")
    chats = sorted((s for s in run.spans if s.name.startswith("chat ")), key=lambda s: s.start_time)
    assert [s.name for s in chats] == ["chat gpt-4o-mini"] * 2
    usage = {"answered": METHODS_USAGE, "stream_fails": None, "stream_left_early": None}[case]
    for span, agent, tokens in zip(chats, ("idea", "methods"), (IDEA_USAGE, usage), strict=True):
        assert span.parent is not None and span.parent.span_id == step_1.context.span_id, span.name
        attrs = span.attributes
        assert (attrs[sc.GEN_AI_OPERATION_NAME], attrs[sc.GEN_AI_AGENT_NAME], attrs[sc.GEN_AI_PROVIDER_NAME],
                attrs[sc.GEN_AI_REQUEST_MODEL]) == ("chat", agent, "openai", "gpt-4o-mini")
        assert (attrs.get(sc.GEN_AI_USAGE_INPUT_TOKENS), attrs.get(sc.GEN_AI_USAGE_OUTPUT_TOKENS)) == (
            tokens or (None, None))
        assert attrs.get(sc.GEN_AI_RESPONSE_MODEL) == (RESPONSE_MODEL if tokens else None)
        assert api_keys_absent(span)
    failed = case == "stream_fails"
    assert (chats[1].status.status_code, chats[1].attributes.get(sc.ERROR_TYPE)) == (
        (StatusCode.ERROR, server_error(run.results)) if failed else (StatusCode.UNSET, None))
    rows = _final_rows(_exported(run, tmp_path))
    (row,) = rows["runs"]
    nodes = _nodes_of(rows)
    assert (row["status"], nodes["step_1"]["status"]) == (("failed",) * 2 if failed else ("completed",) * 2)
    llm_events = [e for e in rows["events"] if e["event_subtype"] == "llm"]
    assert [e["node_id"] for e in llm_events] == [nodes["step_1"]["id"]] * 2
    # priced as AG2 prices gpt-4o-mini's answers (its OAI_PRICE1K: $0.00015 / $0.0006 per 1K tokens in / out)
    from autogen.oai.client import OAI_PRICE1K

    price_in, price_out = OAI_PRICE1K[RESPONSE_MODEL]
    priced = [("idea", IDEA_USAGE)] + ([("methods", METHODS_USAGE)] if case == "answered" else [])
    assert sorted((c["agent_name"], c["model"], c["prompt_tokens"], c["completion_tokens"], float(c["cost_usd"]))
                  for c in rows["costs"]) == [
        (agent, RESPONSE_MODEL, p, o, round((price_in * p + price_out * o) / 1000, 6)) for agent, (p, o) in priced]
    # uninstrument() (the run's end) put LangChain's methods back
    from langchain_core.language_models.chat_models import BaseChatModel

    assert not any(hasattr(vars(BaseChatModel)[m], "__wrapped__") for m in ("invoke", "stream"))


def server_error(results: Any) -> str:
    """The error type the application got for the HTTP 500 (``results['error']``) if it is the one ``openai`` /
    ``langchain_openai`` raise for it: langchain-openai 1.x raises its own ``InternalServerError`` subclass
    ``OpenAIAPIError``, 0.3 (the one that installs next to cmbagent_autogen's ``openai==1.99.9``) ``openai``'s."""
    error = results.get("error") if isinstance(results, dict) else None
    return error if error in ("OpenAIAPIError", "InternalServerError") else "OpenAIAPIError"


def api_keys_absent(span: Any) -> bool:
    """No API key of the scripted backend's in any attribute of ``span``."""
    from .scripted_cmbagent import API_KEYS

    text = json.dumps({k: str(v) for k, v in span.attributes.items()})
    return not any(key in text for key in API_KEYS.values() if key)
