"""What a user of the real cmbagent package sees, twentieth audit (session 45).

The real PyPI cmbagent (Python 3.12) and MARS's own phases (``CMBAGENT_OTEL_MARS_SRC``, loaded by conftest's
``mars_phases``) run offline against the scripted backend; spans read back, and the rows the DAG exporter writes
read as cmbagent's backend reads them (``test_real_audit._final_rows``).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.trace import StatusCode

os.environ.setdefault("CMBAGENT_DISABLE_DISPLAY", "true")
pytest.importorskip("cmbagent", reason="cmbagent is not installed (it needs Python >= 3.12; see docs/cmbagent.md)")

from cmbagent_otel import semconv as sc

from .test_cmbagent_runs import _exported, _one
from .test_cmbreal19_audit import (
    IDEA_USAGE,
    METHODS_USAGE,
    RESPONSE_MODEL,
    _langchain_answers,
    api_keys_absent,
    run_paper_phase,
    server_error,
)
from .test_real_audit import _final_rows, _nodes_of, _one_root_per_trace, run_cmbagent  # noqa: F401 - fixture

pytestmark = pytest.mark.cmbagent_autogen

IDEA, METHODS = "Write an idea for a paper on the CMB", "Write the methods"


# --- LangChain's async and batch calls of a chat model ---------------------------------------------------------
def _async_paper_phase(case: str) -> Any:
    """An entry function for ``run_cmbagent``: audit 19's LangGraph paper phase (``run_paper_phase``: MARS's real
    ``PhaseExecutionManager``, a phase awaited by hand, a real ``StateGraph`` and ``ChatOpenAI``) whose nodes call
    the model the other ways LangChain offers. ``case``: ``async`` (``idea`` awaits ``ainvoke``, ``methods`` reads
    ``astream`` to its end); ``ainvoke_fails`` (the server answers ``idea``'s ``ainvoke`` HTTP 500);
    ``astream_closed_early`` (``methods`` stops after the first chunk and closes the stream,
    ``contextlib.aclosing``); ``batches`` (``idea`` calls ``batch`` of two prompts, ``methods`` awaits ``abatch``
    of two)."""
    return functools.partial(_run_async_paper_phase, case)


def _run_async_paper_phase(case: str, task: str, work_dir: str, api_keys: dict[str, str],
                           **_: Any) -> dict[str, Any]:
    def tokens_of(message: Any) -> tuple[int, int]:
        usage = message.usage_metadata or {}
        return usage.get("input_tokens", 0), usage.get("output_tokens", 0)

    async def idea(state: dict[str, Any]) -> dict[str, Any]:
        if case == "batches":
            messages = state["llm"].batch([IDEA, IDEA])
        else:
            messages = [await state["llm"].ainvoke(IDEA)]
        return {"idea": " ".join(m.content for m in messages), "tokens": [tokens_of(m) for m in messages]}

    async def methods(state: dict[str, Any]) -> dict[str, Any]:
        if case == "batches":
            messages = await state["llm"].abatch([METHODS, METHODS])
            return {"methods": " ".join(m.content for m in messages),
                    "tokens": [*state["tokens"], *(tokens_of(m) for m in messages)]}
        text, tokens = "", (0, 0)
        async with contextlib.aclosing(state["llm"].astream(METHODS)) as stream:
            async for chunk in stream:
                text += chunk.content
                if case == "astream_closed_early":
                    break
                if chunk.usage_metadata:
                    tokens = tokens_of(chunk)
        return {"methods": text, "tokens": [*state["tokens"], tokens]}

    def answer(body: dict[str, Any], headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
        if case == "ainvoke_fails" and IDEA in json.dumps(body):
            return 500, {"Content-Type": "application/json"}, b'{"error": {"message": "overloaded"}}'
        return _langchain_answers(body, headers)

    return run_paper_phase((idea, methods), answer, task, work_dir, api_keys)


# (the node calling, its usage) of each chat span the case records, in the order the calls start
ASYNC_CALLS: dict[str, list[tuple[str, tuple[int, int] | None]]] = {
    "async": [("idea", IDEA_USAGE), ("methods", METHODS_USAGE)],
    "ainvoke_fails": [("idea", None)],
    "astream_closed_early": [("idea", IDEA_USAGE), ("methods", None)],
    "batches": [("idea", IDEA_USAGE)] * 2 + [("methods", IDEA_USAGE)] * 2,  # batches answer without streaming
}


@pytest.mark.parametrize("case", list(ASYNC_CALLS))
def test_a_langgraph_phases_async_and_batch_model_calls_are_chat_spans_of_its_step(
        request: pytest.FixtureRequest, mars_phases: Path, tmp_path: Path, case: str) -> None:
    """Audit 19's Left. Its ``chat`` spans covered a chat model's ``invoke`` and ``stream``; a graph whose async
    nodes ``await llm.ainvoke(...)`` or read ``llm.astream(...)`` (LangGraph runs async nodes in the phase's
    ``await graph.ainvoke``), and ``abatch`` (which calls ``ainvoke`` per input), made model calls with no span,
    no LLM event and no cost row on main (``batch`` calls ``invoke`` in a worker thread of LangChain's: covered
    already, held here). Now each is a ``chat <model>`` span of the open step, as audit 19's: the node its agent,
    the usage and response model from the answer (an async stream's summed over the chunks read), priced; a failed
    ``ainvoke`` fails its span with the error the application gets unchanged; an async stream the application
    closes before its end ends unfailed with no usage. The application gets what it got without us."""
    pytest.importorskip("langgraph", reason="langgraph / langchain_openai are not installed")
    pytest.importorskip("langchain_openai", reason="langgraph / langchain_openai are not installed")
    run = request.getfixturevalue("run_cmbagent")("carryover", responder=lambda script: script,
                                                  function=_async_paper_phase(case))
    assert run.error is None, run.error
    assert run.results == {
        "async": {"idea": "An idea.", "methods": "The methods.", "tokens": [IDEA_USAGE, METHODS_USAGE]},
        "ainvoke_fails": {"error": server_error(run.results)},
        "astream_closed_early": {"idea": "An idea.", "methods": "The ", "tokens": [IDEA_USAGE, (0, 0)]},
        "batches": {"idea": "An idea. An idea.", "methods": "An idea. An idea.", "tokens": [IDEA_USAGE] * 4},
    }[case]
    _one_root_per_trace(run)
    step_1 = _one(run, "step 1")
    chats = sorted((s for s in run.spans if s.name.startswith("chat ")),
                   key=lambda s: (s.attributes[sc.GEN_AI_AGENT_NAME] != "idea", s.start_time))
    expected = ASYNC_CALLS[case]
    assert [(s.name, s.attributes[sc.GEN_AI_AGENT_NAME]) for s in chats] == [
        ("chat gpt-4o-mini", agent) for agent, _ in expected]
    for span, (_, tokens) in zip(chats, expected, strict=True):
        assert span.parent is not None and span.parent.span_id == step_1.context.span_id, span.name
        attrs = span.attributes
        assert (attrs[sc.GEN_AI_OPERATION_NAME], attrs[sc.GEN_AI_PROVIDER_NAME], attrs[sc.GEN_AI_REQUEST_MODEL]) == (
            "chat", "openai", "gpt-4o-mini")
        assert (attrs.get(sc.GEN_AI_USAGE_INPUT_TOKENS), attrs.get(sc.GEN_AI_USAGE_OUTPUT_TOKENS)) == (
            tokens or (None, None))
        assert attrs.get(sc.GEN_AI_RESPONSE_MODEL) == (RESPONSE_MODEL if tokens else None)
        assert api_keys_absent(span)
    failed = case == "ainvoke_fails"
    assert [(s.status.status_code, s.attributes.get(sc.ERROR_TYPE)) for s in chats] == [
        (StatusCode.ERROR, server_error(run.results)) if failed else (StatusCode.UNSET, None)] * len(chats)
    rows = _final_rows(_exported(run, tmp_path))
    (row,) = rows["runs"]
    nodes = _nodes_of(rows)
    assert (row["status"], nodes["step_1"]["status"]) == (("failed",) * 2 if failed else ("completed",) * 2)
    llm_events = [e for e in rows["events"] if e["event_subtype"] == "llm"]
    assert [e["node_id"] for e in llm_events] == [nodes["step_1"]["id"]] * len(chats)
    from autogen.oai.client import OAI_PRICE1K

    price_in, price_out = OAI_PRICE1K[RESPONSE_MODEL]
    per_agent: dict[str, list[float]] = {}  # the DAG exporter's per_agent rows: one per agent and model
    for agent, usage in expected:
        if usage is not None:
            total = per_agent.setdefault(agent, [0, 0, 0.0])
            total[0], total[1] = total[0] + usage[0], total[1] + usage[1]
            total[2] += (price_in * usage[0] + price_out * usage[1]) / 1000
    assert sorted((c["agent_name"], c["model"], c["prompt_tokens"], c["completion_tokens"], float(c["cost_usd"]))
                  for c in rows["costs"]) == [
        (agent, RESPONSE_MODEL, p, o, round(cost, 6)) for agent, (p, o, cost) in sorted(per_agent.items())]
    from langchain_core.language_models.chat_models import BaseChatModel

    assert not any(hasattr(vars(BaseChatModel)[m], "__wrapped__") for m in ("invoke", "ainvoke", "stream", "astream"))


# --- Anthropic's and Gemini's LangChain chat models: priced as AG2 prices them ---------------------------------
CLAUDE, GEMINI = "claude-3-5-sonnet-20241022", "gemini-2.5-pro"  # MARS's paper phase: its fallback and its default
PROVIDER_USAGE = {"anthropic": (30, 7), "gemini": (40, 9)}


def _provider_answers(body: dict[str, Any], headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
    """Anthropic's Messages API (a body with ``messages``) or Gemini's ``generateContent`` as their LangChain chat
    models read them: one answer with its usage."""
    if "messages" in body:
        prompt, output = PROVIDER_USAGE["anthropic"]
        answer: dict[str, Any] = {
            "id": "msg_1", "type": "message", "role": "assistant", "model": CLAUDE, "stop_reason": "end_turn",
            "stop_sequence": None, "content": [{"type": "text", "text": "An idea."}],
            "usage": {"input_tokens": prompt, "output_tokens": output}}
    else:
        prompt, output = PROVIDER_USAGE["gemini"]
        answer = {"candidates": [{"content": {"parts": [{"text": "An idea."}], "role": "model"},
                                  "finishReason": "STOP", "index": 0}],
                  "usageMetadata": {"promptTokenCount": prompt, "candidatesTokenCount": output,
                                    "totalTokenCount": prompt + output}, "modelVersion": GEMINI}
    return 200, {"Content-Type": "application/json"}, json.dumps(answer).encode()


def _provider_paper_phase(provider: str) -> Any:
    """An entry function for ``run_cmbagent``: audit 19's paper phase, its model the chat model MARS's
    ``paper_agents.reader`` builds for ``provider`` (``ChatAnthropic``, ``ChatGoogleGenerativeAI``), of a loopback
    server; its one node ``idea`` calls ``invoke``."""
    return functools.partial(_run_provider_paper_phase, provider)


def _run_provider_paper_phase(provider: str, task: str, work_dir: str, api_keys: dict[str, str],
                              **_: Any) -> dict[str, Any]:
    def model(base_url: str) -> Any:
        root = base_url.removesuffix("/v1")
        if provider == "anthropic":
            from langchain_anthropic import ChatAnthropic

            return ChatAnthropic(model=CLAUDE, api_key="sk-ant-scripted", base_url=root, max_retries=0)
        from langchain_google_genai import ChatGoogleGenerativeAI

        return ChatGoogleGenerativeAI(model=GEMINI, google_api_key=api_keys["GEMINI"], transport="rest",
                                      client_options={"api_endpoint": root}, max_retries=0)

    def idea(state: dict[str, Any]) -> dict[str, Any]:
        message = state["llm"].invoke(IDEA)
        usage = message.usage_metadata
        return {"idea": message.content, "methods": "", "tokens": [(usage["input_tokens"], usage["output_tokens"])]}

    return run_paper_phase((idea,), _provider_answers, task, work_dir, api_keys, model)


@pytest.mark.parametrize("provider", ["anthropic", "gemini"])
def test_anthropic_and_gemini_chat_models_calls_are_priced_as_ag2_prices_them(
        request: pytest.FixtureRequest, mars_phases: Path, tmp_path: Path, provider: str) -> None:
    """Audit 19's Left. MARS's paper phases build a ``ChatGoogleGenerativeAI`` (their default model, Gemini), a
    ``ChatAnthropic`` (the fallback) or an OpenAI one; only OpenAI's calls were priced: a Claude or Gemini call had
    its tokens and no cost (cost row ``0``, the run's dollars short of what the calls cost). Now each is priced as
    the application's AG2 prices its own calls of that provider: Anthropic's by ``ANTHROPIC_PRICING_1k``, Gemini's by
    ``calculate_gemini_cost`` (Google AI's prices, ``use_vertexai`` for Vertex AI's)."""
    pytest.importorskip("langgraph", reason="langgraph is not installed")
    pytest.importorskip({"anthropic": "langchain_anthropic", "gemini": "langchain_google_genai"}[provider],
                        reason="the provider's LangChain package is not installed")
    run = request.getfixturevalue("run_cmbagent")("carryover", responder=lambda script: script,
                                                  function=_provider_paper_phase(provider))
    assert run.error is None, run.error
    prompt, output = PROVIDER_USAGE[provider]
    assert run.results == {"idea": "An idea.", "methods": "", "tokens": [(prompt, output)]}
    model = {"anthropic": CLAUDE, "gemini": GEMINI}[provider]
    (chat,) = [s for s in run.spans if s.name.startswith("chat ")]
    assert chat.parent is not None and chat.parent.span_id == _one(run, "step 1").context.span_id
    attrs = chat.attributes
    assert (chat.name, attrs[sc.GEN_AI_PROVIDER_NAME], attrs[sc.GEN_AI_RESPONSE_MODEL],
            attrs[sc.GEN_AI_USAGE_INPUT_TOKENS], attrs[sc.GEN_AI_USAGE_OUTPUT_TOKENS]) == (
        f"chat {model}", {"anthropic": "anthropic", "gemini": "gcp.gemini"}[provider], model, prompt, output)
    assert api_keys_absent(chat)
    if provider == "anthropic":
        from autogen.oai.anthropic import ANTHROPIC_PRICING_1k

        price_in, price_out = ANTHROPIC_PRICING_1k[CLAUDE]
        cost = (price_in * prompt + price_out * output) / 1000
    else:
        from autogen.oai.gemini import calculate_gemini_cost

        cost = calculate_gemini_cost(False, prompt, output, GEMINI)
    assert cost > 0 and attrs[sc.LLM_COST_USD] == pytest.approx(cost)
    rows = _final_rows(_exported(run, tmp_path))
    assert [(c["agent_name"], c["model"], c["prompt_tokens"], c["completion_tokens"], float(c["cost_usd"]))
            for c in rows["costs"]] == [("idea", model, prompt, output, round(cost, 6))]


# --- MARS's plot judge: its VLM calls live in cmbagent.functions.execution_control ------------------------------
def _mars_execution_control(mars: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """MARS's ``cmbagent/functions/execution_control.py`` (its plot judge's and plot debugger's tools), imported as
    the module MARS imports it as, ``cmbagent.functions.execution_control``, next to the PyPI package (whose
    ``cmbagent.functions`` is a plain module: MARS's is a package, so the module and its sibling ``utils`` are
    loaded from their files), before ``instrument()``, as an application's MARS has imported it."""
    import importlib.util
    import sys

    loaded = None
    for name in ("utils", "execution_control"):
        path = mars / "cmbagent" / "functions" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(f"cmbagent.functions.{name}", path)
        assert spec is not None and spec.loader is not None
        loaded = importlib.util.module_from_spec(spec)
        monkeypatch.setitem(sys.modules, spec.name, loaded)
        spec.loader.exec_module(loaded)
    return loaded


@pytest.mark.parametrize("where", ["workflow", "phase_by_hand"])
def test_mars_plot_judges_vlm_call_is_a_chat_span_of_the_run(mars_phases: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    """MARS's plot judge (``call_vlm_judge``, a tool of MARS's ``cmbagent.functions.execution_control``) calls the
    VLM through ``send_image_to_vlm`` bound in that module; the integration patched the name only where the PyPI
    package binds it (``cmbagent.functions``, a module there), so under MARS the VLM call had no ``chat`` span, no
    LLM event and no tokens (the criteria call, looked up in ``cmbagent.vlm_utils``, had one). Now MARS's module is
    patched too. ``where``: in a ``workflow`` block; or in a MARS phase awaited by hand (``PhaseExecutionManager``
    started outside any run, step 1 open: the run it opens is never attached), where the external call looked
    only at the current context (audit 19's Left) and now joins the step, as the phase's solves and LangChain
    calls do."""
    import asyncio

    from autogen import ConversableAgent
    from autogen.agentchat.group import ContextVariables

    import cmbagent_otel
    from cmbagent_otel.testing import FakeOpenAIServer

    from .scripted_cmbagent import API_KEYS, GeminiServer, script_for
    from .test_cmbagent_runs import Run, SpanCapture

    execution_control = _mars_execution_control(mars_phases, monkeypatch)
    plot = tmp_path / "plot.png"
    plot.write_bytes(b"\x89PNG\r\n\x1a\n")  # read and sent as it is: the scripted VLM does not decode it
    agents = {name: ConversableAgent(name, llm_config=False) for name in ("plot_judge", "plot_debugger", "control")}
    script = script_for("one_shot_plots")

    def judge() -> Any:
        context = ContextVariables(data={"latest_plot_path": str(plot), "improved_main_task": "Plot the CMB",
                                         "n_plot_evals": 0, "max_n_plot_evals": 1})
        execution_control.call_vlm_judge(context, None, agents["plot_judge"], agents["plot_debugger"],
                                         agents["control"])
        return context.get("vlm_verdict"), context.get("vlm_plot_analysis")

    async def phase_by_hand() -> Any:
        from cmbagent.phases.base import Phase, PhaseContext
        from cmbagent.phases.execution_manager import PhaseExecutionManager

        class JudgePhase(Phase):
            phase_type, display_name = "plot_review", "Plot review"

            async def execute(self, context: PhaseContext) -> Any:
                manager = PhaseExecutionManager(context, self)
                manager.start()
                manager.start_step(1, "Judging the plot")
                verdict = judge()
                manager.complete_step(1, "Judged")
                manager.complete()
                return verdict

        context = PhaseContext(workflow_id="w", run_id="r", phase_id="review", task="Plot the CMB",
                               work_dir=str(tmp_path), api_keys=API_KEYS)
        return await JudgePhase().execute(context)

    capture = SpanCapture()
    with FakeOpenAIServer(request_responder=script) as server, GeminiServer(script) as gemini:
        monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
        monkeypatch.setenv("OPENAI_API_KEY", API_KEYS["OPENAI"])
        monkeypatch.setenv("GOOGLE_GEMINI_BASE_URL", gemini)
        monkeypatch.setenv("GEMINI_API_KEY", API_KEYS["GEMINI"])
        cmbagent_otel.instrument(tracer_provider=capture.provider, set_global=False, instrument_threading=False)
        try:
            if where == "workflow":
                with cmbagent_otel.workflow("plot review"):
                    verdict, analysis = judge()
            else:
                verdict, analysis = asyncio.run(phase_by_hand())
        finally:
            cmbagent_otel.uninstrument()
    assert (verdict, script.sequence, script.unexpected) == ("continue", ["plot_criteria", "plot_judge_vlm"], []), \
        analysis
    run = Run({}, script.sequence, [], tmp_path, capture.spans)
    _one_root_per_trace(run)
    chats = [s for s in run.spans if s.name.startswith("chat ")]
    assert [(s.name, s.attributes[sc.GEN_AI_AGENT_NAME]) for s in chats] == [
        ("chat gpt-4o", "plot_judge"), ("chat gemini-2.5-pro", "plot_judge")]  # the criteria call, the VLM's
    assert (chats[1].attributes.get(sc.GEN_AI_USAGE_INPUT_TOKENS), chats[1].attributes.get(
        sc.GEN_AI_USAGE_OUTPUT_TOKENS)) == (300, 40)
    parent = (_one(run, "workflow plot review") if where == "workflow" else _one(run, "step 1")).context.span_id
    assert all(s.parent is not None and s.parent.span_id == parent for s in chats)
    rows = _final_rows(_exported(run, tmp_path))
    llm = [(e["agent_name"], e["meta"].get("tokens")) for e in rows["events"] if e["event_subtype"] == "llm"]
    assert ("plot_judge", 340) in llm


# --- cmbagent's own cost report against our cost rows: an OpenAI VLM ---------------------------------------------
def test_an_openai_vlms_cost_agrees_with_cmbagents_cost_report(request: pytest.FixtureRequest, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """``one_shot(evaluate_plots=True)`` with cmbagent's VLM set to an OpenAI model (``cmbagent.vlm_utils.vlm_model
    = "gpt-4o"``, one of the four it offers). cmbagent's cost report charges plot_judge's VLM call at its own VLM
    prices (``account_for_external_api_calls``: $2.50 / $10 per 1M tokens in / out for ``gpt-4o``), but the VLM's
    ``chat`` span had tokens and no cost: plot_judge's cost row, and the run's dollars, fell short of cmbagent's
    report by the VLM's cost. Now the VLM call is priced as cmbagent prices it, and plot_judge's dollars, every
    agent's and the total agree with the report (one_shot's agents call once each: per call and running totals
    are the same)."""
    import json

    import cmbagent.vlm_utils

    monkeypatch.setattr(cmbagent.vlm_utils, "vlm_model", "gpt-4o")
    run = request.getfixturevalue("run_cmbagent")("one_shot_plots", responder=lambda script: script)
    assert run.error is None, run.error
    assert run.results["final_context"]["vlm_verdict"] == "continue"
    assert "plot_judge_vlm" in run.sequence
    rows = _final_rows(_exported(run, tmp_path))
    (report,) = sorted(run.work_dir.rglob("cost_report_*.json"))
    table = json.loads(report.read_text(encoding="utf-8"))
    reported = {r["Agent"].replace(" ", "_"): float(str(r["Cost ($)"]).lstrip("$")) for r in table
                if r["Agent"] != "Total"}
    ours: dict[str, float] = {}
    for c in rows["costs"]:
        ours[c["agent_name"]] = ours.get(c["agent_name"], 0.0) + float(c["cost_usd"])
    assert reported["plot_judge"] > 0
    assert {a: round(v, 6) for a, v in ours.items()} == {a: round(v, 6) for a, v in reported.items()}


# --- LangChain calls: the GenAI client metrics and, with capture on, the content AG2's own calls have ------------
def test_langchain_calls_record_genai_metrics_and_captured_content(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Audit 19's Left. A LangChain chat model's call inside a run was a ``chat`` span with usage and cost, but
    recorded none of the GenAI client metrics AG2's model calls and cmbagent's VLM calls record
    (``gen_ai.client.operation.duration``, ``gen_ai.client.token.usage``, the cost counter: a dashboard of them
    missed every LangGraph phase's calls), and with ``capture_content`` on no prompt and no answer. Now each call
    records them as the VLM calls do (``_outside_call_extras``): an ``invoke`` and a ``stream`` (its answer the
    chunks' text joined) of a ``ChatOpenAI`` in a ``workflow`` block; a system + human message prompt keeps its
    roles; the API key in the model is in no attribute."""
    pytest.importorskip("langchain_openai", reason="langchain_openai is not installed")
    from langchain_core.messages import HumanMessage, SystemMessage
    from langchain_openai import ChatOpenAI
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    import cmbagent_otel
    from cmbagent_otel import metrics as m
    from cmbagent_otel.testing import FakeOpenAIServer

    from .scripted_cmbagent import API_KEYS
    from .test_cmbagent_runs import SpanCapture

    capture, reader = SpanCapture(), InMemoryMetricReader()
    meters = MeterProvider(metric_readers=[reader])
    with FakeOpenAIServer(raw_responder=_langchain_answers) as server:
        llm = ChatOpenAI(model="gpt-4o-mini", api_key=API_KEYS["OPENAI"], base_url=server.base_url,
                         stream_usage=True, max_retries=0)
        cmbagent_otel.instrument(tracer_provider=capture.provider, meter_provider=meters, set_global=False,
                                 instrument_threading=False, capture_content=True)
        try:
            with cmbagent_otel.workflow("paper review"):
                idea = llm.invoke([SystemMessage("You review CMB papers."), HumanMessage(IDEA)])
                methods = "".join(chunk.content for chunk in llm.stream(METHODS))
        finally:
            cmbagent_otel.uninstrument()
    assert (idea.content, methods) == ("An idea.", "The methods.")
    chats = [s for s in capture.spans if s.name.startswith("chat ")]
    assert [json.loads(s.attributes[sc.GEN_AI_INPUT_MESSAGES]) for s in chats] == [
        [{"role": "system", "parts": [{"type": "text", "content": "You review CMB papers."}]},
         {"role": "user", "parts": [{"type": "text", "content": IDEA}]}],
        [{"role": "user", "parts": [{"type": "text", "content": METHODS}]}]]
    assert [[p["content"] for p in json.loads(s.attributes[sc.GEN_AI_OUTPUT_MESSAGES])[0]["parts"]]
            for s in chats] == [["An idea."], ["The methods."]]
    assert all(api_keys_absent(s) for s in chats)
    found = {metric.name: list(metric.data.data_points) for resource in reader.get_metrics_data().resource_metrics
             for scope in resource.scope_metrics for metric in scope.metrics}
    assert [(p.attributes.get(sc.GEN_AI_REQUEST_MODEL), p.count)
            for p in found[m.GEN_AI_CLIENT_OPERATION_DURATION]] == [("gpt-4o-mini", 2)]
    tokens = {p.attributes.get(m.GEN_AI_TOKEN_TYPE): p.sum for p in found[m.GEN_AI_CLIENT_TOKEN_USAGE]}
    assert tokens == {m.TOKEN_INPUT: IDEA_USAGE[0] + METHODS_USAGE[0], m.TOKEN_OUTPUT: IDEA_USAGE[1] + METHODS_USAGE[1]}
    assert sum(p.value for p in found[m.LLM_COST]) == pytest.approx(
        sum(s.attributes[sc.LLM_COST_USD] for s in chats))
    meters.shutdown()
