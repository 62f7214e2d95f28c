"""A scripted planning/control run used by several DAG tests."""

from __future__ import annotations

from opentelemetry import trace

import cmbagent_otel as c
from cmbagent_otel import semconv as sc
from cmbagent_otel._spans import TracedSpan

TASK = "fit the CMB power spectrum"


def llm(agent: str, prompt: int, completion: int, cost: float, model: str = "gpt-4o") -> TracedSpan:
    return TracedSpan(f"chat {model}", sc.KIND_LLM, {
        sc.GEN_AI_AGENT_NAME: agent, sc.GEN_AI_REQUEST_MODEL: model, sc.GEN_AI_RESPONSE_MODEL: model,
        sc.GEN_AI_USAGE_INPUT_TOKENS: prompt, sc.GEN_AI_USAGE_OUTPUT_TOKENS: completion, sc.LLM_COST_USD: cost,
    })


def code(agent: str, exit_code: int) -> None:
    with TracedSpan("execute code", sc.KIND_CODE, {
        sc.GEN_AI_AGENT_NAME: agent, sc.CODE_LANGUAGE: "python", sc.CODE_SOURCE: "print(1)",
    }) as span:
        span.set(sc.CODE_EXIT_CODE, exit_code)
        if exit_code:
            span.fail(f"exit code {exit_code}")


def run_scenario(*, foreign: trace.TracerProvider | None = None) -> None:
    """workflow > planning > control > 3 steps; step 2 fails and is redone twice (1 fails, 2 succeeds)."""
    with c.workflow("scripted", mode="planning-control", task=TASK, agent="engineer", model="gpt-4o",
                    work_dir="/tmp/work", task_id="task-42", max_redos=2):
        with c.phase("planning"), llm("planner", 100, 50, 0.001):
            pass
        with c.phase("control"):
            with c.step(1, "load the maps", agent="engineer"):
                with llm("engineer", 200, 80, 0.002):
                    if foreign is not None:
                        tracer = foreign.get_tracer("other.instrumentation")
                        attrs = {"http.method": "POST", "api_key": "sk-secret-123456"}
                        with tracer.start_as_current_span("POST /v1/chat/completions", attributes=attrs), \
                                tracer.start_as_current_span("dns lookup"):
                            pass
                code("executor", 0)
            with c.step(2, "fit the model", agent="engineer") as s2:
                code("executor", 1)
                s2.fail("initial attempt failed")
                with c.redo(2, 1, "use a smaller learning rate") as r1:
                    with llm("engineer", 300, 90, 0.003):
                        pass
                    code("executor", 1)
                    r1.fail("still failing")
                with c.redo(2, 2, "switch to MCMC"):
                    with llm("engineer", 310, 95, 0.004):
                        pass
                    code("executor", 0)
            with c.step(3, "plot the result", agent="engineer"), llm("engineer", 50, 20, 0.0005):
                pass

