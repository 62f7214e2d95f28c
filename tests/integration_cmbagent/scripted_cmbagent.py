"""A scripted OpenAI-compatible backend that plays every LLM role of the real cmbagent package.

cmbagent (PyPI) builds its OpenAI clients from ``api_keys`` without a base URL, so the
``openai`` client falls back to ``OPENAI_BASE_URL``: pointing that at a loopback
:class:`~cmbagent_otel.testing.FakeOpenAIServer` runs cmbagent's real AG2 group chats
(planner, plan_reviewer, control, engineer, formatters, executor, researcher...) with real
handoffs, real tool calls (``record_plan``, ``record_status``, ``post_execution_transfer``...)
and real code execution, offline.

Each request is answered according to the agent asking, recognised from its system
prompt (the first line of the agent's instructions in cmbagent's own YAML files) and, for
the formatters, from the ``response_format`` schema. The engineer's code really runs in
cmbagent's executor; the executor's formatter reads the real execution result from the
request, so a failing first attempt goes through cmbagent's own retry path
(``post_execution_transfer`` -> ``n_attempts`` + 1 -> engineer).
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

CRITERIA_PROMPT = "You are a scientific expert analyzing plots."
# a 1x1 PNG written without matplotlib (cmbagent's executor runs the code with the system python)
PLOT_CODE = ('import struct, zlib\n'
             'def chunk(kind, data):\n'
             '    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))\n'
             'header = struct.pack(">IIBBBBB", 1, 1, 8, 0, 0, 0, 0)\n'
             'png = b"\\x89PNG\\r\\n\\x1a\\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\\x00\\x00"))'
             ' + chunk(b"IEND", b"")\n'
             'open("data/spectrum.png", "wb").write(png)\nprint("saved data/spectrum.png")\n')
FAILING_CODE = 'import sys\nprint("loading the spectrum")\nraise RuntimeError("deliberate failure: no such file")\n'


@dataclass(frozen=True)
class PlanStep:
    """One step of the scripted plan."""

    task: str
    agent: str  # "engineer" or "researcher"


DEFAULT_PLAN = (
    PlanStep("Generate the mock power spectrum", "engineer"),
    PlanStep("Interpret the spectrum", "researcher"),
    PlanStep("Fit the acoustic peak", "engineer"),
)


KEYWORD_FINDERS = frozenset({"aaai_keywords_finder", "list_keywords_finder"})


def _first_line(text: str) -> str:
    for line in text.splitlines():
        if line.strip():
            return line.strip()
    return ""


def agent_signatures(cmbagent_dir: Path) -> dict[str, str]:
    """First line of each cmbagent agent's instructions -> agent name (from cmbagent's YAML)."""
    signatures: dict[str, str] = {}
    for path in sorted((cmbagent_dir / "agents").glob("*/*.yaml")):
        try:
            info = yaml.safe_load(path.read_text(encoding="utf-8"))
        except Exception:
            continue
        if not isinstance(info, dict) or not isinstance(info.get("instructions"), str):
            continue
        line = _first_line(info["instructions"])
        if line and "{" not in line:
            signatures.setdefault(line, str(info.get("name") or path.stem))
    return signatures


def _tool(name: str, **arguments: Any) -> dict[str, Any]:
    return {"tool_calls": [{"name": name, "arguments": arguments}]}


_PYTHON_BLOCK = re.compile(r"```python\n(.*?)```", re.DOTALL)


@dataclass
class CmbagentScript:
    """Answers cmbagent's LLM calls for a plan of ``plan`` steps.

    ``fail_first_code``: the engineer's first program raises, cmbagent's executor reports the
    failure and the engineer's second program (the retry) succeeds. ``mode``:
    ``"planning_and_control"``, ``"carryover"`` (one chat per step, control only runs its
    step) or ``"one_shot"``.
    """

    signatures: dict[str, str]
    plan: tuple[PlanStep, ...] = DEFAULT_PLAN
    fail_first_code: bool = False
    mode: str = "planning_and_control"
    plots: bool = False  # the engineer's program saves a plot (one_shot(evaluate_plots=True))
    plot_retry: bool = False  # the VLM's first verdict is "retry": plot_debugger asks Gemini for fixes
    # control reports step ``failed_step`` "failed" this many times before it reports it completed
    # (cmbagent then hands the step back to its agent: the researcher's formatter, or the engineer)
    failed_reports: int = 0
    failed_step: int = 2
    # what control does after its last failed report: "completed" (completes the step) or "next" (moves on
    # to the next step without completing it)
    after_failed: str = "completed"
    fail_runs: frozenset[int] = frozenset()  # the engineer's programs (numbered from 1) that raise
    calls: Counter[str] = field(default_factory=Counter)
    sequence: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _engineer_runs: int = 0

    # --- dispatch -----------------------------------------------------------------------
    def __call__(self, body: dict[str, Any]) -> str | dict[str, Any]:
        with self._lock:
            agent = self.agent_of(body)
            self.calls[agent] += 1
            self.sequence.append(agent)
            handler = getattr(self, f"_{agent}", None)
            if handler is None:
                self.unexpected.append(agent)
                return "TERMINATE"
            return handler(body)  # type: ignore[no-any-return]

    def agent_of(self, body: dict[str, Any]) -> str:
        schema = ((body.get("response_format") or {}).get("json_schema") or {}).get("schema") or {}
        props = set((schema.get("properties") or {}).keys())
        if "sub_tasks" in props:  # the planner's, idea_maker's and idea_hater's formatters share it
            text = json.dumps(schema)
            if "idea_description" in text:
                return "idea_hater_response_formatter" if "what you think" in text else "idea_maker_response_formatter"
            return "planner_response_formatter"
        if "recommendations" in props:
            return "reviewer_response_formatter"
        if "file_search_task" in props:  # camb's and classy's formatters share it (and have a python_code)
            system = next((m.get("content") for m in body.get("messages") or [] if m.get("role") == "system"), "")
            found = self.signatures.get(_first_line(system) if isinstance(system, str) else "")
            return found if found == "classy_response_formatter" else "camb_response_formatter"
        if "python_code" in props:
            return "engineer_response_formatter"
        if "markdown_block" in props:
            return "researcher_response_formatter"
        if ((body.get("response_format") or {}).get("json_schema") or {}).get("name") == "vlm_analysis":
            return "plot_judge_vlm"  # evaluate_plots with an OpenAI VLM (cmbagent.vlm_utils.vlm_model "gpt-4o")
        messages = body.get("messages") or []
        if messages and str(messages[0].get("content") or "").startswith(CRITERIA_PROMPT):
            return "plot_criteria"  # evaluate_plots: cmbagent's own OpenAI call, outside AG2 (no system prompt)
        system = next((m.get("content") for m in messages if m.get("role") == "system"), None)
        line = _first_line(system) if isinstance(system, str) else ""
        agent = self.signatures.get(line, f"unknown:{line[:60]}")
        if agent in KEYWORD_FINDERS:  # their instructions begin alike: told apart by the AAAI guide
            agent = "aaai_keywords_finder" if "AAAI" in system else "list_keywords_finder"
        return agent

    @staticmethod
    def _last_content(body: dict[str, Any]) -> str:
        for message in reversed(body.get("messages") or []):
            content = message.get("content")
            if isinstance(content, str) and message.get("role") != "system":
                return content
        return ""

    # --- planning -----------------------------------------------------------------------
    def _plan_setter(self, body: dict[str, Any]) -> dict[str, Any]:
        return _tool("record_plan_constraints", needed_agents=sorted({s.agent for s in self.plan}))

    def _planner(self, body: dict[str, Any]) -> str:
        lines = [f"Step {i}: {s.task} ({s.agent})" for i, s in enumerate(self.plan, 1)]
        return "Proposed plan:\n" + "\n".join(lines)

    def _planner_response_formatter(self, body: dict[str, Any]) -> str:
        return json.dumps({"sub_tasks": [
            {"sub_task": s.task, "sub_task_agent": s.agent, "bullet_points": [f"do: {s.task.lower()}"]}
            for s in self.plan
        ]})

    def _plan_recorder(self, body: dict[str, Any]) -> dict[str, Any]:
        return _tool("record_plan", plan_suggestion=self._last_content(body), number_of_steps_in_plan=len(self.plan))

    def _plan_reviewer(self, body: dict[str, Any]) -> str:
        return "Recommendations: keep the plan short and check the units."

    def _reviewer_response_formatter(self, body: dict[str, Any]) -> str:
        return json.dumps({"recommendations": ["Keep the plan short.", "Check the units."]})

    def _review_recorder(self, body: dict[str, Any]) -> dict[str, Any]:
        return _tool("record_review", plan_review="Keep the plan short. Check the units.")

    def _terminator(self, body: dict[str, Any]) -> dict[str, Any]:
        return _tool("terminate_session")

    # --- control --------------------------------------------------------------------------
    def _status(self, status: str, number: int) -> dict[str, Any]:
        step = self.plan[number - 1]
        return _tool("record_status", current_status=status, current_plan_step_number=number,
                     current_sub_task=step.task, current_instructions=f"Carry out: {step.task}",
                     agent_for_sub_task=step.agent)

    def _control(self, body: dict[str, Any]) -> dict[str, Any]:
        # control reads the workflow state cmbagent puts in its system prompt
        system = next((m.get("content") for m in body.get("messages") or [] if m.get("role") == "system"), "")
        number = re.search(r"\*\*Current step in plan:\*\*\s*(\d+)", system or "")
        status = re.search(r"\*\*Current status:\*\*\s*([^\n]*)", system or "")
        n = int(number.group(1)) if number else 1
        current = status.group(1).strip().lower() if status else ""
        if self.mode == "one_shot":  # one_shot and chat: the single task is done when control speaks
            return self._status("completed", 1)
        chat_started = any(m.get("role") == "tool" for m in body.get("messages") or [])
        if not chat_started:
            return self._status("in progress", n)
        if current in ("in progress", "failed"):
            if n == self.failed_step and self.calls["control_failed"] < self.failed_reports:
                self.calls["control_failed"] += 1
                return self._status("failed", n)
            if current == "failed" and self.after_failed == "next" and n < len(self.plan):
                return self._status("in progress", n + 1)
            return self._status("completed", n)
        return self._status("in progress", min(n + 1, len(self.plan)))

    def _control_starter(self, body: dict[str, Any]) -> dict[str, Any]:
        return _tool("record_status_starter")

    # --- engineer -------------------------------------------------------------------------
    def _engineer(self, body: dict[str, Any]) -> str:
        self._engineer_runs += 1
        if (self.fail_first_code and self._engineer_runs == 1) or self._engineer_runs in self.fail_runs:
            code = FAILING_CODE
        elif self.plots:
            code = PLOT_CODE
        else:
            code = (f'import math\nvalues = [math.sin(0.1 * i) ** 2 for i in range(50)]\n'
                    f'print("run {self._engineer_runs}: peak", round(max(values), 3))\n')
        return f"**Code Explanation:**\n\nComputes the spectrum.\n\n**Python Code:**\n\n```python\n{code}```\n"

    def _engineer_response_formatter(self, body: dict[str, Any]) -> str:
        match = None
        for message in reversed(body.get("messages") or []):
            content = message.get("content")
            if isinstance(content, str) and (match := _PYTHON_BLOCK.search(content)):
                break
        code = match.group(1) if match else 'print("nothing to run")\n'
        return json.dumps({"filename": f"step_code_{self._engineer_runs}", "relative_path": "codebase",
                           "code_explanation": "Computes the spectrum.", "modification_summary": None,
                           "python_code": code})

    def _executor_response_formatter(self, body: dict[str, Any]) -> dict[str, Any]:
        # cmbagent's executor reports "Execution results:" on exit code 0, "execution results:" otherwise
        failed = "Execution results:" not in self._last_content(body)
        return _tool("post_execution_transfer", next_agent_suggestion="engineer" if failed else "control",
                     execution_status="failure" if failed else "success",
                     fix_suggestion="read the right file" if failed else None)

    # --- researcher -----------------------------------------------------------------------
    def _researcher(self, body: dict[str, Any]) -> str:
        return "## Interpretation\n\nThe spectrum peaks where expected."

    def _researcher_response_formatter(self, body: dict[str, Any]) -> str:
        return json.dumps({"markdown_block": "## Interpretation\n\nThe spectrum peaks where expected.",
                           "filename": "interpretation.md"})


    # --- idea_maker / idea_hater (the steps of cmbagent.control's default plan) -------------
    IDEAS = ("Lensing-induced peak smoothing", "Neutrino mass from the damping tail")

    def _idea_maker(self, body: dict[str, Any]) -> str:
        return "Ideas:\n" + "\n".join(f"{i}. {idea}" for i, idea in enumerate(self.IDEAS, 1))

    def _idea_maker_response_formatter(self, body: dict[str, Any]) -> str:
        return json.dumps({"sub_tasks": [{"idea_description": idea, "bullet_points": [f"why: {idea.lower()}"]}
                                         for idea in self.IDEAS]})

    def _idea_saver(self, body: dict[str, Any]) -> dict[str, Any]:
        return _tool("record_ideas", ideas=list(self.IDEAS))

    def _idea_hater(self, body: dict[str, Any]) -> str:
        return "Critique: the first idea is not new; the second needs better data."

    def _idea_hater_response_formatter(self, body: dict[str, Any]) -> str:
        return json.dumps({"sub_tasks": [{"idea_description": idea, "bullet_points": ["needs more data"]}
                                         for idea in self.IDEAS]})


    # --- one_shot(agent="camb_context"): the documentation agent, its formatter, then the engineer -------
    def _camb_context(self, body: dict[str, Any]) -> str:
        system = next((m.get("content") for m in body.get("messages") or [] if m.get("role") == "system"), "")
        seen = CONTEXT_DOCS_MARK in (system or "")  # the downloaded documentation is in its prompt
        return f"Use the documented spectra method. Documentation read: {seen}"

    _classy_context = _camb_context

    def _camb_response_formatter(self, body: dict[str, Any]) -> str:
        return json.dumps({"file_search_task": "find the CMB spectra method", "file_consulted": ["docs.md"],
                           "docstrings": [CONTEXT_DOCS_MARK], "results": "Use the documented spectra method.",
                           "python_code": {"code": "import math"}})

    _classy_response_formatter = _camb_response_formatter

    # --- one_shot(evaluate_plots=True): plot_judge asks the VLM (Gemini, outside AG2), plot_debugger routes --
    VLM_VERDICT = {"verdict": "continue", "problems": [], "scientific_accuracy": "ok", "visual_clarity": "ok",
                   "completeness": "ok"}

    def _plot_judge_vlm(self, body: dict[str, Any]) -> str:
        return json.dumps(self.VLM_VERDICT)

    def _plot_judge(self, body: dict[str, Any]) -> dict[str, Any]:
        return _tool("call_vlm_judge")

    def _plot_debugger(self, body: dict[str, Any]) -> dict[str, Any]:
        return _tool("route_plot_judge_verdict")

    def _plot_criteria(self, body: dict[str, Any]) -> str:
        return "First acoustic peak: expected at l ~ 220."

    VLM_RETRY = {"verdict": "retry", "problems": ["the axes have no labels"], "scientific_accuracy": "ok",
                 "visual_clarity": "poor", "completeness": "ok"}
    PLOT_FIXES = {"fixes": ["Line 4: add plt.xlabel and plt.ylabel"]}

    def gemini(self, body: dict[str, Any]) -> dict[str, Any]:
        """A Gemini ``generateContent`` answer: the VLM call (``plot_judge_vlm`` in the sequence) or, on
        the retry path, plot_debugger's call for fixes (``plot_debugger_fixes``)."""
        debugger = "plot debugging expert" in json.dumps(body.get("contents"))
        with self._lock:
            name = "plot_debugger_fixes" if debugger else "plot_judge_vlm"
            self.calls[name] += 1
            self.sequence.append(name)
            first_vlm = self.calls["plot_judge_vlm"] == 1
        answer = self.PLOT_FIXES if debugger else self.VLM_RETRY if self.plot_retry and first_vlm else self.VLM_VERDICT
        return {"candidates": [{"content": {"role": "model", "parts": [{"text": json.dumps(answer)}]},
                                "finishReason": "STOP"}],
                "usageMetadata": {"promptTokenCount": 300, "candidatesTokenCount": 40, "totalTokenCount": 340}}

    # --- get_keywords(kw_type="aaai"): one structured answer from the keyword finder --------------
    def _aaai_keywords_finder(self, body: dict[str, Any]) -> str:
        return json.dumps({"results": ["Machine Learning", "Cosmology"]})

    # --- summarize_document: the summarizer, then its structured formatter ---------------------------
    SUMMARY = {"title": "Mock CMB spectra", "authors": ["A. Author"], "date": "2026", "abstract": "A mock.",
               "keywords": ["CMB"], "key_findings": ["The first peak is where expected."],
               "scientific_software": ["numpy"], "data_sources": [], "data_sets": [], "data_analysis_methods": ["fit"]}

    def _summarizer(self, body: dict[str, Any]) -> str:
        return "Title: Mock CMB spectra. The first acoustic peak is where expected."

    def _summarizer_response_formatter(self, body: dict[str, Any]) -> str:
        return json.dumps(self.SUMMARY)

    # --- get_keywords(kw_type="aas"): record_aas_keywords with two names of cmbagent's AAS list -----
    def _aas_keyword_finder(self, body: dict[str, Any]) -> dict[str, Any]:
        from cmbagent.utils import AAS_keywords_dict

        return _tool("record_aas_keywords", aas_keywords=sorted(AAS_keywords_dict)[:2])

    # --- get_keywords(kw_type="unesco"): one solve per taxonomy level, each answered with the first
    # name of the list in the finder's system prompt (the fewest solves cmbagent then makes)
    _KEYWORDS_LIST = re.compile(r"<KEYWORDS_LIST>\s*(.*?)\s*</KEYWORDS_LIST>", re.DOTALL)

    def _list_keywords_finder(self, body: dict[str, Any]) -> str:
        system = next((m.get("content") for m in body.get("messages") or [] if m.get("role") == "system"), "")
        match = self._KEYWORDS_LIST.search(system or "")
        names = [n.strip() for n in match.group(1).split(", ")] if match else []
        return json.dumps({"results": names[:1]})  # its response_format; format() makes the "-" lines


def idea_plan() -> tuple[PlanStep, ...]:
    """cmbagent.control's default plan (``plans/idea_plan.json`` next to the package): idea_maker/idea_hater steps."""
    import importlib.util

    spec = importlib.util.find_spec("cmbagent")
    assert spec is not None and spec.origin is not None
    plan = json.loads((Path(spec.origin).parents[1] / "plans" / "idea_plan.json").read_text(encoding="utf-8"))
    return tuple(PlanStep(s["sub_task"], s["sub_task_agent"]) for s in plan["sub_tasks"])


# --- running cmbagent against the script ------------------------------------------------------
API_KEYS = {"OPENAI": "sk-offline-test", "ANTHROPIC": "offline", "GEMINI": "offline", "MISTRAL": "offline"}
HUMAN_TURNS = ("Now print the peak position too", "exit")  # the admin's answers in human_in_the_loop
TASK = "Compute the mock CMB power spectrum and fit its first acoustic peak"
WORKFLOWS = ("planning_and_control", "carryover", "one_shot", "one_shot_camb", "one_shot_classy", "one_shot_plots",
             "one_shot_plots_retry",
             "control", "control_ideas",
             "deep_research", "one_shot_researcher", "human_in_the_loop", "get_keywords", "get_keywords_aas",
             "get_keywords_unesco")


CONTEXT_DOCS_MARK = "get_cmb_power_spectra(params=None, lmax=None)"
CONTEXT_DOCS = f"# Documentation\n\n## {CONTEXT_DOCS_MARK}\n\nReturns the CMB power spectra.\n"


def _reply(handler: Any, body: bytes, content_type: str) -> None:
    handler.send_response(200)
    handler.send_header("Content-Type", content_type)
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


class _LoopbackServer:
    """A loopback HTTP server running ``handler`` in a thread while entered; entering returns its
    base URL followed by ``suffix``."""

    def __init__(self, handler: Any, suffix: str = "") -> None:
        from http.server import ThreadingHTTPServer

        self._suffix = suffix
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> str:
        self._thread.start()
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}{self._suffix}"

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()


class GeminiServer(_LoopbackServer):
    """A loopback Gemini API answering every ``generateContent`` POST with ``script.gemini(body)``;
    entered, it returns the base URL for ``GOOGLE_GEMINI_BASE_URL``."""

    def __init__(self, script: CmbagentScript) -> None:
        from http.server import BaseHTTPRequestHandler

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                request = json.loads(self.rfile.read(length) or b"{}")
                _reply(self, json.dumps(script.gemini(request)).encode("utf-8"), "application/json")

            def log_message(self, format: str, *args: Any) -> None:
                pass

        super().__init__(Handler)


class _DocumentServer(_LoopbackServer):
    """A loopback HTTP server answering every GET with ``text`` (the documentation cmbagent downloads)."""

    def __init__(self, text: str) -> None:
        from http.server import BaseHTTPRequestHandler

        body = text.encode("utf-8")

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                _reply(self, body, "text/markdown; charset=utf-8")

            def log_message(self, format: str, *args: Any) -> None:
                pass

        super().__init__(Handler, "/docs.md")


# the documentation URLs of cmbagent's module pointed at loopback, by attribute: [calls inside, cmbagent's own URL,
# the server]. Calls may overlap (two threads): the first one in starts the server and points the URL at it, the
# last one out puts cmbagent's URL back (each call putting back what it found left a stopped server's URL behind,
# and a call still inside read cmbagent's real URL once the other had left)
_CONTEXT_LOCK = threading.Lock()
_context_served: dict[str, list[Any]] = {}


@contextlib.contextmanager
def _context_docs_served(package: str) -> Iterator[None]:
    """While inside, cmbagent's ``<package>_context_url`` names a loopback server of :data:`CONTEXT_DOCS`."""
    module = sys.modules["cmbagent.cmbagent"]
    name = f"{package}_context_url"
    with _CONTEXT_LOCK:
        held = _context_served.get(name)
        if held is None:
            server = _DocumentServer(CONTEXT_DOCS)
            held = _context_served[name] = [0, getattr(module, name), server]
            setattr(module, name, server.__enter__())
        held[0] += 1
    try:
        yield
    finally:
        with _CONTEXT_LOCK:
            held[0] -= 1
            if not held[0]:
                del _context_served[name]
                setattr(module, name, held[1])
                held[2].__exit__(None, None, None)


def write_plan(path: Path, plan: tuple[PlanStep, ...] = DEFAULT_PLAN) -> Path:
    """A plan file in cmbagent's ``final_plan.json`` layout, for :func:`cmbagent.control`."""
    path.write_text(json.dumps({"sub_tasks": [
        {"sub_task": s.task, "sub_task_agent": s.agent, "bullet_points": [f"do: {s.task.lower()}"]} for s in plan
    ]}), encoding="utf-8")
    return path


def call_workflow(kind: str, work_dir: Path, function: Any = None, **options: Any) -> dict[str, Any]:
    """Call one of cmbagent's workflow entry points (``function`` overrides the entry point used;
    ``options``: more keyword arguments of the entry point, e.g. ``max_n_attempts``)."""
    import cmbagent

    kw: dict[str, Any] = {"work_dir": str(work_dir), "api_keys": API_KEYS, **options}
    if kind in ("one_shot_camb", "one_shot_classy"):
        # cmbagent downloads the CAMB / classy documentation (utils.camb_context_url / classy_context_url) into
        # the agent's context first: served here from loopback, the URL cmbagent reads pointed at it for the call
        fn = function or cmbagent.one_shot
        package = kind.removeprefix("one_shot_")
        with _context_docs_served(package):
            return fn(TASK, agent=f"{package}_context", **kw)  # type: ignore[no-any-return]
    if kind in ("one_shot_plots", "one_shot_plots_retry"):
        # the VLM call goes to Gemini: the runner points GOOGLE_GEMINI_BASE_URL at a GeminiServer
        fn = function or cmbagent.one_shot
        return fn(TASK, agent="engineer", evaluate_plots=True, **kw)  # type: ignore[no-any-return]
    if kind in ("one_shot", "one_shot_researcher"):
        fn = function or cmbagent.one_shot
        agent = "researcher" if kind == "one_shot_researcher" else "engineer"
        return fn(TASK, agent=agent, **kw)  # type: ignore[no-any-return]
    if kind in ("get_keywords", "get_keywords_aas", "get_keywords_unesco"):
        # aaai: one one-shot solve; aas: one solve with a record_aas_keywords tool call; unesco: a solve
        # per level of cmbagent's UNESCO taxonomy
        fn = function or cmbagent.get_keywords
        kw_type = kind.removeprefix("get_keywords").removeprefix("_") or "aaai"
        return {"keywords": fn(TASK, n_keywords=2, kw_type=kw_type, **(kw | {"work_dir": work_dir}))}
    if kind == "summarize_document":  # reads its API key from the environment, no api_keys argument
        fn = function or cmbagent.summarize_document
        document = work_dir.parent / f"{work_dir.name}-paper.md"
        document.write_text(f"# Mock CMB spectra\n\nA. Author, 2026.\n\n{TASK}.\n", encoding="utf-8")
        return {"summary": fn(str(document), work_dir=str(work_dir))}
    if kind == "summarize_documents":  # two documents, summarized by cmbagent in two worker threads
        fn = function or cmbagent.summarize_documents
        folder = work_dir.parent / f"{work_dir.name}-papers"
        folder.mkdir(exist_ok=True)
        for k in (1, 2):
            (folder / f"paper_{k}.md").write_text(f"# Mock CMB spectra {k}\n\n{TASK}.\n", encoding="utf-8")
        return fn(str(folder), work_dir_base=str(work_dir), max_workers=2)  # type: ignore[no-any-return]
    if kind == "preprocess_task":
        # its arXiv download and OCR skipped (network, Mistral): the OCR output it would have made is
        # seeded in work_dir (docs/, docs_processed/*.md); cmbagent summarizes it with summarize_documents
        fn = function or cmbagent.preprocess_task
        (work_dir / "docs").mkdir(exist_ok=True)
        processed = work_dir / "docs_processed"
        processed.mkdir(exist_ok=True)
        for k in (1, 2):
            (processed / f"2401.0000{k}.md").write_text(f"# Mock CMB spectra {k}\n\n{TASK}.\n", encoding="utf-8")
        return {"text": fn(TASK, work_dir=str(work_dir), clear_work_dir=False, skip_arxiv_download=True,
                           skip_ocr=True, max_workers=2)}
    if kind == "control_ideas":  # cmbagent.control with its default plan
        fn = function or cmbagent.control
        return fn(TASK, **kw)  # type: ignore[no-any-return]
    if kind == "control":
        fn = function or cmbagent.control
        plan = write_plan(work_dir.parent / f"{work_dir.name}-plan.json")
        return fn(TASK, plan=str(plan), **kw)  # type: ignore[no-any-return]
    if kind == "deep_research":
        fn = function or cmbagent.deep_research
        return fn(TASK, **kw)  # type: ignore[no-any-return]
    if kind == "human_in_the_loop":
        fn = function or cmbagent.human_in_the_loop
        # the admin is a human at the console: AG2 reads its turns with input(), here from a scripted stdin
        saved, sys.stdin = sys.stdin, io.StringIO("".join(f"{line}\n" for line in HUMAN_TURNS))
        try:
            return fn(TASK, agent="engineer", **(kw | {"work_dir": work_dir}))  # type: ignore[no-any-return]
        finally:
            sys.stdin = saved
    if kind == "carryover":
        fn = function or cmbagent.planning_and_control_context_carryover
        return fn(TASK, **kw)  # type: ignore[no-any-return]
    fn = function or cmbagent.planning_and_control
    return fn(TASK, **kw)  # type: ignore[no-any-return]


def run_until_signalled(kind: str, work_dir: Path, waiting_call: int = 15) -> None:
    """Run ``kind`` against the scripted backend in this process, its ``waiting_call``-th model call left
    unanswered after printing ``WAITING`` (a process for a test to signal mid-run); ``FINISHED`` if it ends."""
    import os

    from cmbagent_otel.testing import FakeOpenAIServer

    script = script_for(kind)
    stop = threading.Event()
    count = [0]

    def responder(body: bytes) -> Any:
        count[0] += 1
        if count[0] == waiting_call:
            print("WAITING", flush=True)
            stop.wait()  # the app's main thread waits for this answer until the signal
        return script(body)

    with FakeOpenAIServer(request_responder=responder) as server:
        os.environ["OPENAI_BASE_URL"] = server.base_url
        call_workflow(kind, work_dir)
    print("FINISHED", flush=True)


def script_for(kind: str, fail_first_code: bool = False) -> CmbagentScript:
    import importlib.util

    spec = importlib.util.find_spec("cmbagent")
    assert spec is not None and spec.origin is not None, "cmbagent is not installed"
    mode = {"carryover": "carryover", "deep_research": "carryover", "one_shot": "one_shot", "one_shot_camb": "one_shot",
            "one_shot_classy": "one_shot", "one_shot_plots": "one_shot", "one_shot_plots_retry": "one_shot",
            "one_shot_researcher": "one_shot", "human_in_the_loop": "one_shot",
            "get_keywords_aas": "one_shot"}.get(kind, "planning_and_control")
    plan = idea_plan() if kind == "control_ideas" else DEFAULT_PLAN
    return CmbagentScript(agent_signatures(Path(spec.origin).parent), plan=plan, fail_first_code=fail_first_code,
                          mode=mode, plots=kind.startswith("one_shot_plots"),
                          plot_retry=kind == "one_shot_plots_retry")
