"""Automatic workflow structure for cmbagent runs, without changing cmbagent's code.

:class:`CmbagentInstrumentor` (a ``BaseInstrumentor``, entry point ``cmbagent`` in the
``opentelemetry_instrumentor`` group, also enabled by :func:`cmbagent_otel.instrument`)
wraps cmbagent with wrapt (``wrap_function_wrapper``; ``uninstrument()`` takes off its own wrappers only, as the AG2
instrumentor does) so that its runs produce the ``workflow > phase > step [> redo]`` span
tree of :mod:`cmbagent_otel.workflow`:

* workflow entry points (``one_shot``, ``planning_and_control``,
  ``planning_and_control_context_carryover``, ``control``, ``human_in_the_loop``,
  ``get_keywords`` and, in the MARS fork, ``deep_research``, ``idea_generation``,
  ``hitl_*_workflow``, ``copilot``...) open a ``workflow`` span carrying cmbagent's mode
  string, the task, work_dir and the agent/model of the run;
  A re-exported alias (``cmbagent.deep_research``, the carryover workflow under another
  name) gets its own wrapper: its runs carry the name it was called by;
* ``CMBAgent.solve`` opens the phase it runs (``planning`` for the planner, ``one_shot``,
  ``chat``, otherwise ``control``); a chat-mode solve (``human_in_the_loop``) is cmbagent's
  one-step plan: ``step 1`` (goal: the task, agent: the chat agent) inside the ``chat``
  phase, so the chat agent's and the human admin's turns are that step's sub-agents; a
  one_shot solve whose chat ended on cmbagent's attempt limit fails its phase (the
  ``execute`` node) as that limit fails a plan step; a solve for one plan step (``step=n``,
  the context-carryover loop) opens ``step n`` with the goal and agent from the plan and the
  summary cmbagent derives from the step's chat, inside one ``control`` phase shared by
  all steps of the run (the steps of ``planning_and_control``'s single control chat come
  from :mod:`cmbagent_otel.instrumentation._steps`);
* MARS's ``PhaseExecutionManager`` (``start``/``start_step``/``create_redo_branch``/
  ``complete_step``/``fail_step``/``complete``/``fail``) opens phase, step and redo spans;
  MARS's ``WorkflowExecutor.__init__`` tells a joined call its workflow's phases, in order, and its
  ``run`` outside any run is one (its phases' managers and their solves join it); an exception escaping
  a MARS phase's ``execute`` (every subclass of ``cmbagent.phases.base.Phase``, also those defined later)
  without its manager's ``fail()`` fails the phase and a run the manager opened;
* the model calls cmbagent makes outside AG2 (``evaluate_plots``: the plot criteria, the VLM, the
  plot debugger; :data:`EXTERNAL_MODEL_CALLS`) are ``chat <model>`` spans with their usage; so are a
  LangChain chat model's calls (``invoke`` / ``stream``, their async ones, the ``generate`` family) inside a run
  (MARS's LangGraph phases; :mod:`._langchain`).

Spans opened by one call and closed by another (the carryover loop's control phase, a
MARS manager's phase/step/redo) are never attached to the context: they are frames of a
cursor (:mod:`cmbagent_otel._context`) that parents the work started after them by
explicit context, so context attach/detach stays strictly last-in-first-out.

An entry point imported by name before instrumenting (``from cmbagent import
planning_and_control`` executed before ``instrument()``) keeps the unwrapped function; its
solves find the calling entry function on the stack and join one run for that call, which
ends when the function returns (``sys.monitoring``, Python >= 3.12 like cmbagent itself);
without ``sys.monitoring`` one warning names the function and the fix.

Every patch is looked up defensively: an attribute missing from the installed cmbagent is
skipped (logged at debug level) and no telemetry error reaches the application.
``uninstrument()`` restores every original object (same identity) and drops all state;
only wrapt's post-import hooks stay registered (wrapt cannot remove them), and they do
nothing while uninstrumented.
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import importlib.util
import inspect
import json
import logging
import os
import re
import stat
import sys
import threading
import time
import weakref
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from types import CodeType, FrameType, ModuleType
from typing import Any

import wrapt
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.instrumentation.instrumentor import BaseInstrumentor  # type: ignore[attr-defined]

from .. import environment_variables, semconv
from .._context import Cursor, Frame, Scope, current_scope, get_current, raw_scope, with_scope
from .._context import attach as attach_context
from .._context import detach as detach_context
from .._forksafe import closer, open_into, reset_in_child
from .._framestack import call_with_headroom
from .._spans import (
    NodeSpec,
    attach_anchor,
    close_anchored,
    compose,
    detach_anchor,
    effective_parent,
    end_frame,
    error_type,
    fail_frame,
    record_exception,
    workflow_tracers,
)
from ..instrumentation._patching import PROXY, defining_class, unwrap_ours
from ..instrumentation._steps import (
    STATUS_TOOLS,
    context_get,
    emit_event,
    plan_agent,
    plan_steps,
    record_not_started,
    reported_status,
)
from ..redaction import register_secret, safe_text, truncate
from ..workflow import (
    _ENTRIES,
    EXECUTE_NODE,
    ONE_SHOT_PHASE,
    _Block,
    is_clean_exit,
    is_planning_phase,
    phase,
    redo,
    restated_stop,
    step,
    workflow,
)
from . import _langchain

logger = logging.getLogger("cmbagent_otel")

#: Workflow entry points -> cmbagent mode string written to ``workflow_runs.mode``.
ENTRY_POINTS: Mapping[str, str] = {
    "one_shot": "one-shot",
    "get_keywords": "one-shot",
    "planning_and_control": "planning-control",
    "planning_and_control_context_carryover": "planning-control",
    "control": "planning-control",
    "deep_research": "planning-control",
    "human_in_the_loop": "hitl-interactive",
    "preprocess_task": "enhance-input",
    "summarize_document": "one-shot",
    "summarize_documents": "one-shot",
    "hitl_interactive_workflow": "hitl-interactive",
    "hitl_planning_only_workflow": "hitl-interactive",
    "hitl_error_recovery_workflow": "hitl-interactive",
    "idea_generation": "idea-generation",
    "idea_to_execution": "idea-generation",
    "copilot": "copilot",
    "copilot_async": "copilot",
    "swarm_copilot": "copilot",
    "swarm_copilot_async": "copilot",
}

#: Modules whose entry-point attributes are patched (PyPI layout first, then MARS's).
ENTRY_MODULES: tuple[str, ...] = (
    "cmbagent.cmbagent",
    "cmbagent",
    "cmbagent.workflows.planning_control",
    "cmbagent.workflows.one_shot",
    "cmbagent.workflows.control",
    "cmbagent.workflows.idea_workflows",
    "cmbagent.workflows.hitl_workflow",
    "cmbagent.workflows.copilot",
    "cmbagent.workflows.swarm_copilot",
    "cmbagent.workflows",
)
CMBAGENT_CLASS_MODULE = "cmbagent.cmbagent"
PHASE_MANAGER_MODULE = "cmbagent.phases.execution_manager"
#: MARS's workflow executor: its ``__init__`` (``self.phases``) gives a joined call its phases' order
WORKFLOW_EXECUTOR_MODULE = "cmbagent.workflows.composer"
#: MARS's phase base class (``Phase``): each subclass's ``execute`` is watched for an exception escaping it
PHASE_BASE_MODULE = "cmbagent.phases.base"
PHASE_MANAGER_METHODS = ("__enter__", "start", "start_step", "create_redo_branch", "complete_step", "fail_step",
                         "complete", "fail", "__exit__")

#: Model calls cmbagent makes outside AG2 (``one_shot(evaluate_plots=True)``: plot_judge's ``call_vlm_judge``
#: and plot_debugger's ``route_plot_judge_verdict`` tools call OpenAI / Gemini clients directly, so AG2's
#: instrumented ``OpenAIWrapper.create`` never sees them): module -> function -> (agent, model, provider).
#: ``None`` model: ``cmbagent.vlm_utils.vlm_model`` read at call time. ``send_image_to_vlm`` and
#: ``call_external_plot_debugger`` are patched where cmbagent's tools look them up (``cmbagent.functions``
#: imports them by name); the criteria call where ``send_image_to_vlm`` does (``cmbagent.vlm_utils``).
EXTERNAL_MODEL_CALLS: Mapping[str, Mapping[str, tuple[str, str | None, str | None]]] = {
    "cmbagent.vlm_utils": {"generate_llm_scientific_criteria": ("plot_judge", "gpt-4o", "openai")},
    "cmbagent.functions": {"send_image_to_vlm": ("plot_judge", None, None),
                           "call_external_plot_debugger": ("plot_debugger", "gemini-2.5-pro", "gcp.gemini")},
    # MARS: ``cmbagent.functions`` is a package, its plot judge's and debugger's tools in this module
    "cmbagent.functions.execution_control": {
        "send_image_to_vlm": ("plot_judge", None, None),
        "call_external_plot_debugger": ("plot_debugger", "gemini-2.5-pro", "gcp.gemini")},
}
VLM_MODULE = "cmbagent.vlm_utils"
#: USD per 1M tokens in / out of the VLM models cmbagent charges its VLM calls at (the table in
#: ``cmbagent.vlm_utils.account_for_external_api_calls``, local to that function: its cost report's price of a
#: VLM call; its Gemini models are free there)
VLM_PRICES_PER_1M: Mapping[str, tuple[float, float]] = {"gpt-4o": (2.50, 10.00), "o3-2025-04-16": (2.00, 8.00)}

#: get_keywords' ``kw_type`` -> the agent each of its solves starts with (cmbagent's ``initial_agent``)
KEYWORD_FINDERS: Mapping[str, str] = {"unesco": "list_keywords_finder", "aaai": "aaai_keywords_finder",
                                      "aas": "aas_keyword_finder"}
PLANNER_AGENTS = frozenset({"plan_setter", "planner", "hitl_planner"})
PLANNER = "planner"  # the agent that writes cmbagent's plan
CHAT_PHASE = "chat"  # the phase of cmbagent's chat mode (human_in_the_loop)
STICKY = "carryover_phase"  # frame kind of the control phase kept open across the carryover step loop
#: Entry points whose solves are a fixed pipeline of agents (no plan, no control loop): each solve is a
#: one_shot phase (cmbagent's init -> execute -> terminator layout) whatever the solve's mode.
#: ``preprocess_task``'s only solves are those of the ``summarize_documents`` it calls (its run, which
#: that call joins; cmbagent lays enhance-input runs out the same way).
FIXED_PIPELINES = frozenset({"summarize_document", "summarize_documents", "preprocess_task"})
#: Run modes cmbagent's backend lays out as its fixed pipeline (``MODE_TO_TEMPLATE``: init -> execute ->
#: terminator, all created pending with the run)
FIXED_PIPELINE_MODES = frozenset({"one-shot", "enhance-input"})
#: The entry points' parameter holding what the run works on (the run's ``task_description``, which
#: cmbagent's backend sets from the text the user submitted in every mode): ``task``, get_keywords'
#: ``input_text``, preprocess_task's ``text``, the document or folder summarize_document(s) reads.
TASK_PARAMETERS: tuple[str, ...] = ("task", "input_text", "text", "markdown_document_path", "folder_path")
#: A record_status call's arguments longer than this are not parsed for the step's status (cmbagent's
#: are a few hundred characters; the model writes them).
_MAX_STATUS_ARGUMENTS = 65_536


# --- small helpers ---------------------------------------------------------------------
def _enter(block: _Block) -> _Block | None:
    """Enter ``block``; a nesting error (e.g. redo above max_redos) only skips the span."""
    try:
        block.__enter__()
    except Exception:
        logger.debug("cmbagent_otel: could not open %r", block, exc_info=True)
        return None
    return block


def _exit(block: _Block | None, exc: BaseException | None = None) -> None:
    if block is None:
        return
    try:
        block.__exit__(type(exc) if exc is not None else None, exc,
                       exc.__traceback__ if exc is not None else None)
    except Exception:
        logger.debug("cmbagent_otel: could not close %r", block, exc_info=True)


@contextmanager
def _opened(block: _Block | None) -> Iterator[_Block | None]:
    entered = _enter(block) if block is not None else None
    try:
        yield entered
    except BaseException as exc:
        _exit(entered, exc)
        raise
    else:
        _exit(entered)


def _bind(func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    try:
        bound = inspect.signature(func).bind_partial(*args, **kwargs)
        bound.apply_defaults()
        return dict(bound.arguments)
    except Exception:
        return dict(kwargs)


def _text(value: Any) -> str | None:
    if value is None:
        return None
    return value if isinstance(value, str) else str(value)


def _work_dir(value: Any) -> str | None:
    """A run's work dir as cmbagent resolves it (its entry points and ``CMBAgent`` write to
    ``Path(work_dir).expanduser().resolve()``): ``~`` expanded, absolute, links resolved. The files listed are
    then those cmbagent wrote, and the run's ``meta.work_dir`` and its ``files`` paths name them from any
    working directory, as cmbagent's backend writes them (an absolute task work dir). Never raises."""
    text = _text(value)
    if not text:
        return text
    try:
        return os.path.realpath(os.path.expanduser(text))
    except (OSError, ValueError):  # a NUL in the name, an unreadable home: as given
        return text


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _fail_frame(frame: Frame, description: str, kind: str = "error") -> None:
    fail_frame(frame, description, kind)  # its run-level duration metric then carries error.type too


def _detached(block: _Block, scope: Scope | None, parent_span: Any, kind: str, owner: Any = None) -> Frame | None:
    """Open ``block``'s span as a frame under ``parent_span`` (nesting checked at ``scope``); ``None`` if refused."""
    try:
        traced = block._open(scope)
        if traced is None:
            return None
        frame = traced.start_detached(scope, parent_span, kind, owner)
        block._traced = traced  # the block's handle API (fail, set_summary) acts on the frame's span
        return frame
    except Exception:
        logger.debug("cmbagent_otel: could not open %r", block, exc_info=True)
        return None


@contextmanager
def _anchored() -> Iterator[None]:
    """Run the block in its own anchor scope; frames opened on it are closed when the block ends."""
    try:
        anchored = attach_anchor()
    except Exception:  # telemetry must never break the app
        logger.debug("cmbagent_otel: could not anchor the run", exc_info=True)
        anchored = None
    try:
        yield
    except BaseException as exc:
        if anchored is not None:
            detach_anchor(*anchored, None if is_clean_exit(exc) else exc)
        raise
    else:
        if anchored is not None:
            detach_anchor(*anchored)


@contextmanager
def _run(block: workflow) -> Iterator[None]:
    """Open a workflow (or join the active one) for one entry-point call."""
    with contextlib.suppress(Exception):
        _ENTRY_BLOCKS.add(block)
    with _opened(block) as entered, _anchored():
        enclosing = _join_users_run(entered) if entered is not None and entered.joined else None
        own = _JoinedCall(entered.mode in FIXED_PIPELINE_MODES) if entered is not None and entered.joined else None
        token = _attach_joined(own) if own is not None else None
        try:
            yield
            if entered is not None:
                _fail_run_on_failed_step(entered)
                _record_execute_not_started(entered)
        except BaseException as exc:
            if entered is not None:
                _loop_stopped_between_steps()
            if entered is not None and not is_clean_exit(exc):
                _record_execute_not_started(entered)
                if own is not None:
                    _record_joined_call_failed(entered, exc, own)
            raise
        finally:
            if own is not None:
                _detach_joined(token, own)
            if enclosing is not None:
                _record_joined_files(enclosing, block)
            elif entered is not None:
                _record_files(entered._current(), _listed_dir(entered))


class _JoinedCall:
    """What one joined entry call did: the phases it opened (its solves' and phase managers') and the
    exceptions that failed one of them. It rides in the OpenTelemetry context, so the worker threads the
    call starts (``summarize_documents``' documents) count for it as its own thread does; a joined call
    made inside another hands its record on when it ends. Lists: appended to from any thread."""

    __slots__ = ("failed", "fixed", "last_failed", "opened", "planned")

    def __init__(self, fixed: bool) -> None:
        self.fixed = fixed  # a fixed pipeline's call (summarize_document...): its solves are one-shot executions
        self.opened: list[str | None] = []  # each phase's name (None: a solve in a phase someone else opened)
        # what a phase of the call ended with (recorded there); the last few only: an exception holds its
        # frames, and the one a call raises is its last
        self.failed: collections.deque[BaseException] = collections.deque(maxlen=_KEPT_FAILURES)
        # the last phase a phase manager opened for the call failed (its fail()): MARS's executor then raises an
        # error of its own for it ("Phase planning failed: ..."), raised from nothing, which is that failure
        self.last_failed = False
        self.planned: tuple[str, ...] = ()  # its workflow's phases in order, when it says (MARS's WorkflowExecutor)

    def recorded(self, exc: BaseException) -> bool:
        """Whether ``exc``, or an exception it was raised from or while handling, failed a phase of the call."""
        cause: BaseException | None = exc
        for _ in range(_CAUSES):
            if cause is None:
                return False
            if any(cause is failed for failed in self.failed):
                return True
            cause = cause.__cause__ or cause.__context__
        return False

    def hand_on(self, outer: _JoinedCall) -> None:
        """This call ended inside ``outer``: its phases and recorded failures are ``outer``'s too."""
        outer.opened.extend(self.opened)
        outer.failed.extend(self.failed)
        if self.opened:
            outer.last_failed = self.last_failed


_CAUSES = 16  # how far an exception's cause chain is followed
_KEPT_FAILURES = 8
_JOINED_KEY = otel_context.create_key("cmbagent_otel.joined_call")


def _joined_call() -> _JoinedCall | None:
    """The record of the joined entry call running here (or in a thread it started); ``None`` outside one."""
    value = get_current().get(_JOINED_KEY)
    return value if isinstance(value, _JoinedCall) else None


def _attach_joined(own: _JoinedCall) -> object | None:
    try:
        return attach_context(otel_context.set_value(_JOINED_KEY, own))
    except Exception:
        logger.debug("cmbagent_otel: could not attach the joined call's record", exc_info=True)
        return None


def _detach_joined(token: object | None, own: _JoinedCall) -> None:
    """Detach ``own``'s context; the joined call it was made in (if any) takes its record."""
    try:
        if token is not None:
            with contextlib.suppress(ValueError):  # reset in another context (a generator moved on)
                detach_context(token)
        outer = _joined_call()
        if outer is not None and outer is not own:
            own.hand_on(outer)
    except Exception:
        logger.debug("cmbagent_otel: could not hand the joined call's record on", exc_info=True)


#: The first phase of an entry point's run, where it is not a fixed pipeline's ``one_shot`` (cmbagent's
#: ``planning_and_control`` starts with its planning phase, ``control`` with control, ``human_in_the_loop``
#: with its chat; the MARS workflows with their first phase's type); any other: ``planning``.
FIRST_PHASES: Mapping[str, str] = {
    "control": "control",
    "human_in_the_loop": CHAT_PHASE,
    "hitl_interactive_workflow": "hitl_planning",
    "hitl_planning_only_workflow": "hitl_planning",
    "idea_generation": "idea_generation",
    "idea_to_execution": "idea_generation",
}


def _first_phase(block: workflow) -> str:
    """The phase whose node a joined entry call that failed before any phase of its own gets."""
    if block.mode in FIXED_PIPELINE_MODES:
        return ONE_SHOT_PHASE
    return FIRST_PHASES.get(block.name, "planning")


#: The phase that follows a completed one in cmbagent's runs where it is another (``planning_and_control``:
#: planning, then control); any other is followed by one more of its kind (a fixed pipeline's next ``execute``).
NEXT_PHASES: Mapping[str, str] = {"planning": "control"}


def _failed_phase(block: workflow, call: _JoinedCall) -> str:
    """The phase whose node a joined entry call that raised outside its phases gets: its run's first phase
    before any phase of its own, else the phase after the last it opened: its workflow's next one where the
    call was told its phases (:func:`_planned_next`)."""
    last = call.opened[-1] if call.opened else None
    if call.planned:
        following = _planned_next(call.planned, call.opened)
        if following is not None:
            return following
    return _first_phase(block) if last is None else NEXT_PHASES.get(last, last)


def _planned_next(planned: Sequence[str], opened: Sequence[str | None]) -> str | None:
    """The phase of ``planned`` after the phases ``opened`` ran through (matched in order; a skipped phase
    opens nothing), or None when they do not follow ``planned`` or ran through all of it."""
    position = -1
    for name in opened:
        if name is None:
            continue  # a solve inside a phase
        try:
            position = planned.index(name, position + 1)
        except ValueError:
            return None
    return planned[position + 1] if position + 1 < len(planned) else None


def _record_joined_call_failed(block: workflow, exc: BaseException, call: _JoinedCall) -> None:
    """A joined entry call that raised outside its phases — before its first (a worker of
    ``summarize_documents`` whose document cannot be read, a user's ``one_shot`` whose documentation download
    failed or a ``planning_and_control`` whose work dir cannot be made) or between two (``planning_and_control``
    whose control folder cannot be made after planning), inside the user's ``workflow(...)`` or another entry
    call's run — may be caught by its caller (``summarize_documents`` counts it in ``failed_files``; the app goes
    on), so the run it joined never fails with it and nothing recorded the failure. It gets the node of the phase
    it did not reach (:func:`_failed_phase`: ``execute`` for a fixed pipeline), failed with the exception: a
    phase span ended at once with it. Nothing is added when a phase of the call (in any thread) ended with that
    exception or one it was raised from (that phase records it), nor after a phase manager failed the call's
    last phase (MARS's executor raises its own error for it: the same failure), nor inside a phase someone else
    opened (phases do not nest: the exception is that phase's to record)."""
    try:
        if call.recorded(exc) or call.last_failed:
            return
        scope = current_scope()
        if scope is None or not scope.in_workflow or scope.phase is not None:
            return
        _exit(_enter(_phase(_failed_phase(block, call))), exc)
        call.failed.append(exc)  # recorded: a joined call this one was made in re-raising it adds nothing
    except Exception:
        logger.debug("cmbagent_otel: could not record the joined call's failure", exc_info=True)


def _record_joined_files(enclosing: Any, block: workflow) -> None:
    """The files of a joined entry call's work dir, on the enclosing run's span when that is the run's work dir
    (the span holds paths relative to one folder: the call's folder if it gave the run its work dir)."""
    try:
        if (enclosing.span.attributes or {}).get(semconv.WORKFLOW_WORK_DIR) == block.work_dir:
            _record_files(enclosing, _listed_dir(block), block.name)
    except Exception:
        logger.debug("cmbagent_otel: could not record the enclosing run's files", exc_info=True)


# the workflow blocks of entry calls (a cmbagent workflow calling another joins it: that run is described
# by the outer call's own arguments, and keeps them)
_ENTRY_BLOCKS: weakref.WeakSet[workflow] = weakref.WeakSet()
_JOINED_FACTS = (semconv.WORKFLOW_TASK, semconv.WORKFLOW_AGENT, semconv.WORKFLOW_MODEL, semconv.WORKFLOW_WORK_DIR)


def _join_users_run(block: workflow) -> Any:
    """An entry call inside the application's own ``with workflow(...)``: that run's span gets what it left
    unset of the call's task, agent, model and work dir (the first call's: cmbagent's backend describes a run
    by the task it runs), so its row names them and its files are listed (returned: the enclosing
    ``TracedSpan``, whose work-dir files the call lists when it ends). None inside another entry call's run
    or a run that is no workflow block of this context (a MARS phase's). Never raises."""
    try:
        entry = next((e for e in reversed(_ENTRIES.get()) if e.traced is not None and isinstance(e.block, workflow)),
                     None)
        if entry is None or (entry.block._origin or entry.block) in _ENTRY_BLOCKS:
            return None
        traced = entry.traced
        span = traced.span
        if not span.is_recording():
            return None
        attributes = span.attributes or {}
        for key, value in zip(_JOINED_FACTS, (truncate(block.task), block.agent, block.model, block.work_dir),
                              strict=True):
            if value is not None and key not in attributes:
                span.set_attribute(key, value)
        return traced
    except Exception:
        logger.debug("cmbagent_otel: could not describe the enclosing run", exc_info=True)
        return None


# cmbagent's backend registers the files of these folders of a run's work dir (its DAG tracker's
# ``track_files_in_work_dir``: at each step's completion and the run's end), skipping hidden
# entries and __pycache__; bounded here, as the walk runs when the entry call returns
OUTPUT_DIRS = ("data", "codebase", "outputs", "chats", "cost", "time", "planning", "control", "context",
               "docs", "summaries", "runs")
MAX_FILES = 1000
MAX_ENTRIES = 20000
MAX_DEPTH = 32
# summarize_documents writes each document's outputs into <work_dir_base>/doc_<NNN>_<stem>/ and its
# overall summary beside them; cmbagent's backend runs it from preprocess_task with work_dir_base the
# work dir's "summaries" folder, which its scan lists whole
_DOCUMENT_DIR = re.compile(r"doc_[0-9]{3,}_")
DOCUMENTS_SUMMARY = "processing_summary.json"


def work_dir_files(work_dir: str, documents: bool = False) -> list[str]:
    """The files of cmbagent's output folders in ``work_dir`` as :data:`semconv.WORKFLOW_FILES` values:
    ``path<TAB>size<TAB>mtime_ns``, the path relative to ``work_dir`` and redacted (at most
    :data:`MAX_FILES` files, :data:`MAX_ENTRIES` directory entries looked at). Never raises.

    Only regular files and folders inside the work dir: no symbolic link is followed (an output
    folder that is one, ``data -> /proc``, is skipped) and no FIFO, socket or device is listed;
    nothing is opened but folders (``O_NOFOLLOW``: a folder swapped for a link during the walk
    is not entered). A name holding bytes that are not UTF-8 is shown with ``\\xNN`` escapes."""
    out: list[str] = []
    budget = [MAX_ENTRIES]
    try:
        for name in OUTPUT_DIRS:
            if not _walk_files(os.path.join(work_dir, name), name, out, budget):
                return out
        if documents:
            _document_files(work_dir, out, budget)
    except Exception:
        logger.debug("cmbagent_otel: could not list the work dir's files", exc_info=True)
    return out


def _document_files(work_dir: str, out: list[str], budget: list[int]) -> None:
    """summarize_documents' outputs in ``work_dir`` (its ``work_dir_base``): its
    :data:`DOCUMENTS_SUMMARY` and the per-document folders, as cmbagent's scan lists them under
    ``summaries`` when preprocess_task runs it. Nothing else of the folder is looked at."""
    with contextlib.suppress(OSError):  # gone, a link, not a folder
        st = os.stat(os.path.join(work_dir, DOCUMENTS_SUMMARY), follow_symlinks=False)
        if stat.S_ISREG(st.st_mode) and len(out) < MAX_FILES:
            out.append(f"{DOCUMENTS_SUMMARY}\t{st.st_size}\t{st.st_mtime_ns}")
    folders: list[str] = []
    with contextlib.suppress(OSError), os.scandir(work_dir) as entries:
        for entry in entries:
            budget[0] -= 1
            if budget[0] < 0:
                return
            if _DOCUMENT_DIR.match(entry.name):
                folders.append(entry.name)  # _walk_files opens none that is a link or not a folder
    for name in sorted(folders):
        if len(out) >= MAX_FILES or not _walk_files(os.path.join(work_dir, name), name, out, budget):
            return


_DIR_FLAGS = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_NOFOLLOW", 0) \
    | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)


def _walk_files(path: str, rel: str, out: list[str], budget: list[int], dir_fd: int | None = None,
                depth: int = 0) -> bool:
    """Add the files of folder ``path`` (``rel`` to the work dir; opened relative to ``dir_fd``) and of
    its sub-folders, depth first, names sorted, as :func:`os.walk` gave them; False once a bound is hit."""
    if depth > MAX_DEPTH:  # each level holds its folder open: a deep tree must not use up the app's files
        return True
    opened: list[int] = []
    close = closer(opened)
    try:  # a Ctrl-C as os.open returned leaked the descriptor (see open_into)
        try:
            fd = open_into(opened, path, _DIR_FLAGS, dir_fd=dir_fd)
        except OSError:  # not there, a link, not a folder, unreadable
            return True
        files: list[tuple[str, Any]] = []
        dirs: list[str] = []
        with os.scandir(fd) as entries:
            for entry in entries:  # a folder of a million entries is read only up to the bound
                budget[0] -= 1
                if budget[0] < 0:
                    break
                name = entry.name
                if name.startswith(".") or name == "__pycache__":
                    continue
                with contextlib.suppress(OSError):  # gone or changed meanwhile
                    st = entry.stat(follow_symlinks=False)
                    if stat.S_ISDIR(st.st_mode):
                        dirs.append(name)
                    elif stat.S_ISREG(st.st_mode):
                        files.append((name, st))
        for name, st in sorted(files, key=lambda item: item[0]):
            shown = safe_text(_readable(f"{rel}/{name}"))
            if shown and "\t" not in shown:
                out.append(f"{shown}\t{st.st_size}\t{st.st_mtime_ns}")
                if len(out) >= MAX_FILES:
                    return False
        if budget[0] < 0:
            return False
        return all(_walk_files(name, f"{rel}/{name}", out, budget, fd, depth + 1) for name in sorted(dirs))
    finally:
        close()


def _readable(path: str) -> str:
    """``path`` with the bytes of a name that are not UTF-8 (kept by the OS as lone surrogates, which
    no exporter can encode) shown as ``\\xNN``."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return path


def _listed_dir(block: workflow) -> Any:
    """The folder whose files a run's span lists: its work dir as the entry call gave it (resolved by
    :func:`_work_dir`), not the span's text of it, where bytes that are not UTF-8 are ``\\xNN`` escapes and
    a key-like part is redacted (a folder of that name does not exist: no files were listed)."""
    given = block._args.get("work_dir")
    return given if isinstance(given, str) else block.work_dir


def _record_files(traced: Any, work_dir: Any, name: str | None = None) -> None:
    """Put the run's work-dir files on its workflow span (:data:`semconv.WORKFLOW_FILES`), while it is open
    (``name``: the entry point that wrote them, by default the span's workflow name)."""
    try:
        span = getattr(traced, "span", traced)
        if isinstance(work_dir, str) and work_dir and span is not None and span.is_recording():
            if name is None:
                name = (getattr(span, "attributes", None) or {}).get(semconv.WORKFLOW_NAME)
            files = work_dir_files(work_dir, name == "summarize_documents")
            if files:
                span.set_attribute(semconv.WORKFLOW_FILES, files)
    except Exception:
        logger.debug("cmbagent_otel: could not record the run's files", exc_info=True)


def _record_execute_not_started(block: workflow) -> None:
    """A run of a fixed-pipeline mode whose entry call ended without a solve — it raised first
    (``summarize_document`` of a missing file, one_shot's documentation download refused, ``preprocess_task``
    interrupted during its OCR) or returned (``preprocess_task`` with no paper to summarize) — keeps the
    ``execute`` node cmbagent's tracker creates with the run (``create_dag_for_mode``: init, execute,
    terminator): a zero-length ``phase one_shot`` span, ``cmbagent.phase.status`` "not started", stored as a
    pending node. A run that opened a phase, or joined another run, gets none."""
    try:
        scope, span = effective_parent()
        if block.joined or block.mode not in FIXED_PIPELINE_MODES or scope is None or scope.phase is not None:
            return
        run = scope.run
        if run.has_phases():
            return
        emit_event(workflow_tracers.current(), f"phase {ONE_SHOT_PHASE}", semconv.KIND_PHASE,
                   {semconv.PHASE: ONE_SHOT_PHASE, semconv.PHASE_INDEX: run.next_phase_index(),
                    semconv.PHASE_STATUS: semconv.STEP_NOT_STARTED},
                   scope, span, node=NodeSpec(run.unique_node_id(EXECUTE_NODE), semconv.NODE_AGENT, order_index=1,
                                           unique=False),
                   scope_changes={"phase": ONE_SHOT_PHASE})
    except Exception:
        logger.debug("cmbagent_otel: could not record the execute node not started", exc_info=True)


def _fail_run_on_failed_step(block: _Block) -> None:
    """A run whose plan step (or one_shot's execution) ran out of attempts ends failed although the
    entry function returned: cmbagent's own tracking fails it (its control phase fails the step, then the phase, and the
    workflow raises; the backend then marks the run failed). Telemetry only: the call's result stands."""
    try:
        scope = current_scope()
        failed = scope.run.failed_step if scope is not None else None
        if failed is not None:
            block.fail(failed)
    except Exception:
        logger.debug("cmbagent_otel: could not read the run's step outcome", exc_info=True)


def _register_api_keys(api_keys: Any) -> None:
    """cmbagent's ``api_keys`` (``{"OPENAI": key, "MISTRAL": key, ...}``): every value is a credential,
    also one no agent's ``llm_config`` carries (those alone were found), and its provider-named keys are
    not secret-named, so the generic walk would miss them."""
    if isinstance(api_keys, Mapping):
        with contextlib.suppress(Exception):  # telemetry must never break the app
            for key in list(api_keys.values()):
                register_secret(key)


def _agent_and_model(bound: Mapping[str, Any]) -> tuple[str | None, str | None]:
    """A run's agent and model from an entry call's arguments (or a MARS phase's config fields): the ``agent``
    argument, else ``engineer`` when there is an ``engineer_model``, ``summarizer`` for a ``summarizer_model``,
    get_keywords' finder; the model ``<agent>_model``, else ``engineer_model``."""
    agent = _text(bound.get("agent"))
    if agent is None and "engineer_model" in bound:
        agent = "engineer"
    if agent is None and "summarizer_model" in bound:  # summarize_document(s)
        agent = "summarizer"
    if agent is None and "kw_type" in bound:  # get_keywords: the finder its solves start with
        agent = KEYWORD_FINDERS.get(str(bound.get("kw_type")))
    model = _text(bound.get(f"{agent}_model")) if agent else None
    if model is None:
        model = _text(bound.get("engineer_model"))
    return agent, model


def _workflow_for_entry(name: str, mode: str, bound: Mapping[str, Any]) -> workflow:
    _register_api_keys(bound.get("api_keys"))
    agent, model = _agent_and_model(bound)
    return workflow(
        name,
        mode=mode,
        task=_text(next((bound[k] for k in TASK_PARAMETERS if bound.get(k) is not None), None)),
        agent=agent,
        model=model,
        # summarize_documents names its output folder work_dir_base (the run's meta.work_dir, which
        # cmbagent's branching and run comparison read)
        work_dir=_work_dir(bound.get("work_dir") or bound.get("work_dir_base")),
        max_redos=_int(bound.get("max_redos")),
    )


# --- CMBAgent.solve --------------------------------------------------------------------
def _phase(name: str) -> phase:
    """A phase block; a planning phase names cmbagent's planner (``gen_ai.agent.name`` of the ``plan`` span)."""
    return phase(name, agent=PLANNER if is_planning_phase(name) else None)


def _phase_name(initial_agent: str | None, solve_mode: str | None, agent_mode: str | None) -> str:
    if initial_agent in PLANNER_AGENTS:
        return "planning"
    if solve_mode == "one_shot" or agent_mode == "one_shot":
        return ONE_SHOT_PHASE
    if solve_mode == "chat" or agent_mode == "chat":
        return CHAT_PHASE
    return "control"


def _in_fixed_pipeline(scope: Scope | None) -> bool:
    """Whether the solve runs in a run of a :data:`FIXED_PIPELINES` entry point (``summarize_document``:
    summarizer, its formatter, terminator; its solve has no ``mode``, so it would be a ``control`` phase)."""
    try:
        return scope is not None and scope.run.name in FIXED_PIPELINES
    except Exception:
        return False


def _step_from_plan(number: int, context: Any) -> tuple[str, str | None]:
    goal, agent = "", None
    steps = plan_steps(context_get(context, "final_plan"))
    if 0 < number <= len(steps):
        goal = _text(steps[number - 1].get("sub_task")) or ""
        agent = _text(steps[number - 1].get("sub_task_agent"))
    if agent is None and _int(context_get(context, "current_plan_step_number")) == number:
        agent = _text(context_get(context, "agent_for_sub_task"))
    return goal, agent


def _step_summary(instance: Any, agent: str | None) -> str | None:
    """The summary cmbagent's step loop builds: the last message of the step's agent."""
    if not agent:
        return None
    history = getattr(getattr(instance, "chat_result", None), "chat_history", None)
    if not isinstance(history, list):
        return None
    base = agent.removesuffix("_context").removesuffix("_agent")
    names = {name for a in (agent, base) for name in (a, f"{a}_nest", f"{a}_response_formatter")}
    for msg in reversed(history):
        if isinstance(msg, Mapping) and msg.get("name") in names:
            content = msg.get("content")
            return content.strip() if isinstance(content, str) else _text(content)
    return None


def _step_status(instance: Any, number: int, history: Any = None) -> str | None:
    """The status cmbagent's ``record_status`` last reported for step ``number`` in the solve's chat, as a
    plan step of one group chat carries it; ``None`` when none was. Read from the chat history's tool
    calls (``history``, else the solve's result's), not the final context: in the carryover loop control
    announces the next step ("in progress") once ``number`` completed, and a step's context starts with
    the previous step's status."""
    if history is None:
        history = getattr(getattr(instance, "chat_result", None), "chat_history", None)
    for msg in reversed(history if isinstance(history, list) else []):
        calls = msg.get("tool_calls") if isinstance(msg, Mapping) else None
        for call in reversed(calls if isinstance(calls, list) else []):
            function = call.get("function") if isinstance(call, Mapping) else None
            if not isinstance(function, Mapping) or function.get("name") not in STATUS_TOOLS:
                continue
            arguments = function.get("arguments")
            if isinstance(arguments, str) and len(arguments) <= _MAX_STATUS_ARGUMENTS:
                with contextlib.suppress(ValueError, RecursionError):
                    arguments = json.loads(arguments)
            if isinstance(arguments, Mapping) and _int(arguments.get("current_plan_step_number")) == number:
                status = reported_status(arguments.get("current_status"))
                if status is not None:
                    return status
    return None


def _solve_with_step(wrapped: Callable[..., Any], instance: Any, args: tuple[Any, ...],
                     kwargs: dict[str, Any], number: int, context: Any,
                     planned: tuple[str, str | None] | None = None) -> Any:
    goal, agent = planned if planned is not None else _step_from_plan(number, context)
    block = step(number, goal, agent=agent)
    final: Any = None
    entered: _Block | None = None
    raised = True
    try:
        with _opened(block) as entered:
            earlier = _group_contexts(instance) if entered is not None else ()
            try:
                result = wrapped(*args, **kwargs)
            except BaseException:
                if entered is not None:  # read before the block ends the step with the exception
                    _raised_step_outcome(block, instance, number, context, earlier)
                raise
            if entered is not None:
                try:
                    final = getattr(instance, "final_context", None)
                    if agent is None:
                        agent = _text(context_get(final, "agent_for_sub_task"))
                    summary = _step_summary(instance, agent)
                    if summary:
                        block.set_summary(summary)
                    attempts, limit = _attempts(final)
                    block.set_attribute(semconv.STEP_ATTEMPTS, attempts)
                    block.set_attribute(semconv.STEP_MAX_ATTEMPTS, limit)
                    _fail_out_of_attempts(block, attempts, limit)
                    block.set_attribute(semconv.STEP_STATUS, _step_status(instance, number))
                except Exception:
                    logger.debug("cmbagent_otel: could not read step outcome", exc_info=True)
        raised = False
    finally:
        # the carryover loop: a step that raised stops it too (the exception leaves the entry call)
        if entered is not None and planned is None:
            _plan_stopped_after(number, final, context, raised)
    return result


def _group_contexts(instance: Any) -> tuple[Any, ...]:
    """The ``context_variables`` each agent of a CMBAgent holds now (see :func:`_raised_step_outcome`)."""
    try:
        return tuple(getattr(getattr(m, "agent", None), "context_variables", None)
                     for m in getattr(instance, "agents", None) or ())
    except Exception:
        return ()


def _raised_step_outcome(block: step, instance: Any, number: int, context: Any, earlier: tuple[Any, ...]) -> None:
    """What a step whose solve raised had reached, as a step that returned carries it (attempts, limit,
    the status last reported): cmbagent sets no final context then, so they are read from the group chat
    the solve left. AG2 gives every agent of a group chat, and its manager, the chat's ``ContextVariables``,
    and each agent keeps the messages it was sent per partner; an agent still holding the context it held
    before the solve (``earlier``: an earlier chat's, the solve raised before its own began), or one naming
    another step, never took part."""
    try:
        live: Any = None
        history: list[Any] = []
        for member in getattr(instance, "agents", None) or ():
            agent = getattr(member, "agent", None)
            variables = getattr(agent, "context_variables", None)
            if any(variables is old for old in earlier) \
                    or _int(context_get(variables, "current_plan_step_number")) != number:
                continue
            live = variables
            chats = getattr(agent, "chat_messages", None)
            for partner, messages in (chats.items() if isinstance(chats, Mapping) else ()):
                # the chat's manager holds the same context: messages with another partner are another chat's
                if getattr(partner, "context_variables", None) is variables and isinstance(messages, list) \
                        and len(messages) > len(history):
                    history = messages
        attempts, limit = _attempts(live) if live is not None else (None, None)
        if limit is None:
            limit = _int(context_get(context, "max_n_attempts"))
        if attempts is not None:
            block.set_attribute(semconv.STEP_ATTEMPTS, attempts)
        if limit is not None:
            block.set_attribute(semconv.STEP_MAX_ATTEMPTS, limit)
        block.set_attribute(semconv.STEP_STATUS, _step_status(instance, number, history))
    except Exception:
        logger.debug("cmbagent_otel: could not read the outcome of a step that raised", exc_info=True)


def _plan_stopped_after(number: int, final: Any, context: Any, raised: bool = False) -> None:
    """The carryover loop stops after a step that ran out of attempts or raised: the plan's later
    steps never start; they are pending nodes under the phase (as in the single-chat plan, whose
    chat ending or raising leaves the same, see ``_steps``). A step after which the loop goes on is
    remembered (``RunState.loop_next``) for :func:`_loop_stopped_between_steps`."""
    try:
        scope, span = effective_parent()
        plan = context_get(final, "final_plan") or context_get(context, "final_plan")
        going_on = not raised and not _ran_out(*_attempts(final))
        if scope is not None:
            scope.run.loop_next = (number, plan) if going_on else None
        if not going_on and scope is not None and scope.phase is not None:
            record_not_started(workflow_tracers.current(), scope, span, plan, (), after=number)
    except Exception:
        logger.debug("cmbagent_otel: could not record the plan's steps not started", exc_info=True)


def _loop_stopped_between_steps() -> None:
    """The entry call raised while the carryover loop was between two steps (its last step returned and
    the next had not started: Ctrl-C while cmbagent writes the step's reports or builds the next step's
    agents): the plan's later steps never start, pending nodes under the phase as after a step that raised."""
    try:
        scope, span = effective_parent()
        resume = scope.run.loop_next if scope is not None else None
        if scope is None or resume is None:
            return
        scope.run.loop_next = None
        if scope.phase is not None:
            record_not_started(workflow_tracers.current(), scope, span, resume[1], (), after=resume[0])
    except Exception:
        logger.debug("cmbagent_otel: could not record the plan's steps not started", exc_info=True)


def _attempts(final: Any) -> tuple[int | None, int | None]:
    """(``n_attempts``, ``max_n_attempts``) of cmbagent's final context."""
    return _int(context_get(final, "n_attempts")), _int(context_get(final, "max_n_attempts"))


def _ran_out(attempts: int | None, limit: int | None) -> bool:
    """Whether cmbagent's chat ended on its attempt limit (``post_execution_transfer`` hands over to
    the terminator once ``n_attempts >= max_n_attempts``)."""
    return attempts is not None and limit is not None and attempts >= limit


def _fail_out_of_attempts(block: _Block, attempts: int | None, limit: int | None) -> None:
    """Fail ``block`` when cmbagent's chat ended on its attempt limit (:func:`_ran_out`)."""
    if _ran_out(attempts, limit):
        block.fail(f"number of failures {attempts} >= max_n_attempts {limit}")
        scope = current_scope()
        if scope is not None and scope.run.failed_step is None:
            what = f"plan stopped: step {block.number}" if isinstance(block, step) else \
                "one_shot stopped: its execution"
            scope.run.failed_step = f"{what} ran out of attempts (n_attempts {attempts} >= max_n_attempts {limit})"


def _solve_one_shot(wrapped: Callable[..., Any], instance: Any, args: tuple[Any, ...],
                    kwargs: dict[str, Any]) -> Any:
    """one_shot's phase (its ``execute`` node), failed like a plan step when the attempts ran out."""
    own = _own_work_dir(instance)
    block = _phase(ONE_SHOT_PHASE) if own is None else phase(ONE_SHOT_PHASE, attributes={semconv.PHASE_WORK_DIR: own})
    with _opened(block) as entered:
        result = wrapped(*args, **kwargs)
        if entered is not None:
            try:
                _fail_out_of_attempts(entered, *_attempts(getattr(instance, "final_context", None)))
            except Exception:
                logger.debug("cmbagent_otel: could not read one_shot outcome", exc_info=True)
        return result


def _own_work_dir(instance: Any) -> str | None:
    """The solve's work dir relative to its run's when it is a folder below it (summarize_documents gives
    each document's solve ``doc_<NNN>_<name>/``; ``summaries/doc_...`` under preprocess_task), else None."""
    try:
        own = getattr(instance, "work_dir", None)
        run_dir = (getattr(effective_parent()[1], "attributes", None) or {}).get(semconv.WORKFLOW_WORK_DIR)
        if not isinstance(own, str) or not isinstance(run_dir, str) or not own or not run_dir:
            return None
        # compared as the run's attribute holds its work dir: resolved by _work_dir (a NUL in a name: as
        # given, for both), then made span text (bytes that are not UTF-8 as \xNN, as the run's)
        own = safe_text(_work_dir(own))
        if not own:
            return None
        rel = os.path.relpath(own, os.path.realpath(run_dir))
        if rel == os.curdir or rel == os.pardir or rel.startswith(os.pardir + os.sep) or os.path.isabs(rel):
            return None
        return safe_text(_readable(rel.replace(os.sep, "/"))) or None
    except Exception:
        logger.debug("cmbagent_otel: could not read the solve's work dir", exc_info=True)
        return None


def _switch_sticky(cursor: Cursor, sticky: Frame | None, name: str | None) -> None:
    """Close the phase kept open across the carryover step loop; open ``name`` instead (closed with the entry)."""
    try:
        if sticky is not None:
            cursor.close(sticky)
        if name is not None:
            scope, span = effective_parent()
            frame = _detached(_phase(name), scope, span, STICKY, owner=name)
            if frame is not None:
                cursor.push(frame)
    except Exception:  # telemetry must never break the app
        logger.debug("cmbagent_otel: could not switch the carryover phase", exc_info=True)


def _solve_in_workflow(wrapped: Callable[..., Any], instance: Any, args: tuple[Any, ...],
                       kwargs: dict[str, Any], call: dict[str, Any]) -> Any:
    joined = _joined_call()
    if joined is None:
        return _solve_in_phase(wrapped, instance, args, kwargs, call, None)
    try:  # a joined entry call's own solve: what it raises, its phase records (the call adds nothing for it)
        return _solve_in_phase(wrapped, instance, args, kwargs, call, joined)
    except BaseException as exc:
        joined.failed.append(exc)
        raise


def _solve_in_phase(wrapped: Callable[..., Any], instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
                    call: dict[str, Any], joined: _JoinedCall | None) -> Any:
    raw = raw_scope()
    scope = current_scope()
    cursor = raw.cursor if raw is not None else None
    top = cursor.resolve() if cursor is not None else None
    sticky = top if top is not None and top.kind == STICKY else None
    number = _int(call.get("step"))
    context = call.get("shared_context")
    if scope is not None and scope.phase is not None and sticky is None:
        if joined is not None:
            joined.opened.append(None)
        # inside a phase someone else opened (a nested CMBAgent, a MARS phase, a user's phase): join it
        if number is not None and number > 0 and scope.step is None:
            return _solve_with_step(wrapped, instance, args, kwargs, number, context)
        return wrapped(*args, **kwargs)
    name = _phase_name(_text(call.get("initial_agent")), _text(call.get("mode")),
                       _text(getattr(instance, "mode", None)))
    if name == "control" and (_in_fixed_pipeline(scope) or (joined is not None and joined.fixed)):
        name = ONE_SHOT_PHASE
    if joined is not None:
        joined.opened.append(name)
    if number is not None and number > 0:
        if cursor is None:
            with _opened(_phase(name)) as entered:
                stopped = _plan_stopped()
                result = _solve_with_step(wrapped, instance, args, kwargs, number, context)
                _fail_phase_if_plan_stopped(entered, stopped)
                return result
        if sticky is None or sticky.owner != name:
            _switch_sticky(cursor, sticky, name)
        stopped = _plan_stopped()
        result = _solve_with_step(wrapped, instance, args, kwargs, number, context)
        _fail_sticky_if_plan_stopped(cursor, stopped)
        return result
    if sticky is not None and cursor is not None:
        _switch_sticky(cursor, sticky, None)
    if name == ONE_SHOT_PHASE:
        return _solve_one_shot(wrapped, instance, args, kwargs)
    with _opened(_phase(name)) as entered:
        stopped = _plan_stopped()
        if name == CHAT_PHASE:
            # cmbagent's chat mode is a one-step plan ("Step 1: solve the main task.") that the chat
            # agent and the human admin work on: its turns become that step's sub-agent nodes
            result = _solve_with_step(wrapped, instance, args, kwargs, 1, context,
                                      planned=(_text(call.get("task")) or "", _text(call.get("initial_agent"))))
        else:
            result = wrapped(*args, **kwargs)
        _fail_phase_if_plan_stopped(entered, stopped)
        return result


def _plan_stopped() -> str | None:
    """Why the current run's plan stopped (a step ran out of attempts), ``None`` while it has not."""
    try:
        scope = current_scope()
        return scope.run.failed_step if scope is not None else None
    except Exception:
        logger.debug("cmbagent_otel: could not read the run's step outcome", exc_info=True)
        return None


def _fail_phase_if_plan_stopped(block: _Block | None, before: str | None) -> None:
    """The phase whose plan stopped during its solve (a step ran out of attempts: ``before`` was
    ``None``) ends failed too: cmbagent's control phase fails its step, then itself."""
    if block is None or before is not None:
        return
    stopped = _plan_stopped()
    if stopped is not None:
        block.fail(stopped)


def _fail_sticky_if_plan_stopped(cursor: Cursor | None, before: str | None) -> None:
    """The carryover loop's control phase (a frame kept open across its steps) when a step stopped the plan."""
    if cursor is None or before is not None:
        return
    stopped = _plan_stopped()
    try:
        top = cursor.top
        if stopped is not None and top is not None and top.kind == STICKY:
            _fail_frame(top, stopped)
    except Exception:
        logger.debug("cmbagent_otel: could not fail the carryover phase", exc_info=True)


def _solve_run(instance: Any, call: Mapping[str, Any]) -> workflow:
    """A CMBAgent used directly: the solve is the whole run."""
    solve_mode = _text(call.get("mode"))
    agent = _text(call.get("initial_agent"))
    model = None
    try:
        configs = getattr(instance, "agent_llm_configs", None)
        if isinstance(configs, Mapping) and isinstance(configs.get(agent), Mapping):
            model = _text(configs[agent].get("model"))
    except Exception:
        model = None
    mode = {"one_shot": "one-shot", "chat": "hitl-interactive"}.get(solve_mode or "", "planning-control")
    return workflow("solve", mode=mode, task=_text(call.get("task")), agent=agent, model=model,
                    work_dir=_work_dir(getattr(instance, "work_dir", None)))


# --- entry functions called through names bound before instrument() --------------------
class _CallerRun:
    """The run of one call of an unwrapped entry function, opened by its first solve."""

    __slots__ = ("anchor", "frame", "work_dir")

    def __init__(self, frame: Frame, anchor: Scope, work_dir: Any = None) -> None:
        self.frame = frame
        self.anchor = anchor
        self.work_dir = work_dir  # the folder listed at the end (see _listed_dir)

    @contextmanager
    def attached(self) -> Iterator[None]:
        token = otel_context.attach(with_scope(self.anchor, trace.set_span_in_context(self.frame.span)))
        try:
            yield
        finally:
            otel_context.detach(token)

    def end(self, exc: BaseException | None) -> None:
        if exc is not None:
            with contextlib.suppress(Exception), self.attached():
                _loop_stopped_between_steps()
        if is_clean_exit(exc):
            exc = None  # sys.exit(0) ends the run like a return
        close_anchored(self.anchor, exc)  # the phase still open (the carryover loop's) fails with the run
        failed = self.anchor.run.failed_step if exc is None else None
        if failed is not None:
            _fail_frame(self.frame, failed)
        try:
            _record_files(self.frame.span, self.work_dir)
        except Exception:
            logger.debug("cmbagent_otel: could not read the run's work dir", exc_info=True)
        end_frame(self.frame, exc)


class _CallerRuns:
    """Runs of entry functions whose wrapper was bypassed (name bound before instrumenting).

    The first solve of such a call finds the entry function's frame on the stack and opens
    its run; later solves of the same call join it; ``sys.monitoring`` (local PY_RETURN on
    the function's code, global PY_UNWIND while a run is open) ends it when the call returns.
    """

    TOOL_IDS = (4, 3)

    def __init__(self, codes: Mapping[CodeType, tuple[str, str]]) -> None:
        self._codes = codes
        self._runs: dict[FrameType, _CallerRun] = {}
        self._lock = threading.RLock()
        reset_in_child(self, "_lock")
        self._tool: int | None = None
        self._watched: set[CodeType] = set()
        self._warned: set[str] = set()

    def find(self) -> _CallerRun | None:
        if not self._codes:
            return None
        frame: FrameType | None = sys._getframe(2)
        for _ in range(64):
            if frame is None:
                return None
            info = self._codes.get(frame.f_code)
            if info is not None:
                return self._run_of(frame, *info)
            frame = frame.f_back
        return None

    def _run_of(self, frame: FrameType, name: str, mode: str) -> _CallerRun | None:
        with self._lock:
            run = self._runs.get(frame)
            if run is not None:
                return run
            if not self._watch(frame.f_code):
                if name not in self._warned:
                    self._warned.add(name)
                    logger.warning(
                        "cmbagent_otel: cmbagent's %s was called through a name bound before instrument(), so each "
                        "of its solves is traced as a separate run. Call cmbagent_otel.instrument() before "
                        "`from cmbagent import %s`, or call cmbagent.%s(...).", name, name, name)
                return None
            try:
                bound = {k: frame.f_locals.get(k) for k in inspect.getargs(frame.f_code).args}
            except Exception:
                bound = {}
            block = _workflow_for_entry(name, mode, bound)
            wf = _detached(block, None, None, "workflow")
            if wf is None:
                return None
            anchor = wf.scope.evolve()
            anchor.ensure_cursor()
            run = self._runs[frame] = _CallerRun(wf, anchor, _listed_dir(block))
            return run

    def _watch(self, code: CodeType) -> bool:
        monitoring = getattr(sys, "monitoring", None)
        if monitoring is None:
            return False
        try:
            if self._tool is None:
                tool = next((t for t in self.TOOL_IDS if monitoring.get_tool(t) is None), None)
                if tool is None:
                    return False
                monitoring.use_tool_id(tool, "cmbagent_otel")
                monitoring.register_callback(tool, monitoring.events.PY_RETURN, self._on_return)
                monitoring.register_callback(tool, monitoring.events.PY_UNWIND, self._on_unwind)
                monitoring.set_events(tool, monitoring.events.PY_UNWIND)
                self._tool = tool
            if code not in self._watched:
                monitoring.set_local_events(self._tool, code, monitoring.events.PY_RETURN)
                self._watched.add(code)
            return True
        except Exception:
            logger.debug("cmbagent_otel: sys.monitoring unavailable", exc_info=True)
            return False

    def _on_return(self, code: CodeType, offset: int, value: Any) -> Any:
        self._ended(sys._getframe(1), None)

    def _on_unwind(self, code: CodeType, offset: int, exc: BaseException) -> Any:
        if code in self._watched:
            self._ended(sys._getframe(1), exc)

    def _ended(self, frame: FrameType, exc: BaseException | None) -> None:
        try:
            with self._lock:
                run = self._runs.pop(frame, None)
                if run is not None and not self._runs:
                    self.release()
            if run is not None:
                run.end(exc)
        except Exception:
            logger.debug("cmbagent_otel: could not end a run", exc_info=True)

    def release(self) -> None:
        """Stop monitoring (the runs still open are left to end with their calls, untraced)."""
        with self._lock:
            tool, self._tool = self._tool, None
            watched, self._watched = self._watched, set()
            if tool is None:
                return
            monitoring = sys.monitoring  # type: ignore[attr-defined]
            try:
                monitoring.set_events(tool, 0)
                for code in watched:
                    monitoring.set_local_events(tool, code, 0)
                monitoring.register_callback(tool, monitoring.events.PY_RETURN, None)
                monitoring.register_callback(tool, monitoring.events.PY_UNWIND, None)
                monitoring.free_tool_id(tool)
            except Exception:
                logger.debug("cmbagent_otel: could not release sys.monitoring", exc_info=True)

    def close_all(self) -> None:
        with self._lock:
            runs, self._runs = list(self._runs.values()), {}
            self.release()
        for run in runs:
            run.end(None)


# --- MARS PhaseExecutionManager --------------------------------------------------------
class _ManagerSpans:
    """The frames one PhaseExecutionManager opened (phase, step, redo; a fallback workflow)."""

    __slots__ = ("anchor", "block", "cursor", "frames", "joined", "started")

    def __init__(self) -> None:
        self.cursor: Cursor | None = None
        # started outside any run and not through ``with``: the anchor scope of the run it opened, whose
        # cursor holds its phase and steps (the solves the phase makes join it: see _bare_manager_run)
        self.anchor: Scope | None = None
        self.frames: list[tuple[str, Frame]] = []
        self.started: set[int] = set()  # the step numbers start_step opened
        self.block: _Block | None = None  # the fallback workflow entered by __enter__ (closed by __exit__)
        self.joined: tuple[Scope, Any] | None = None  # started inside a phase someone else opened: join it

    def find(self, kind: str) -> Frame | None:
        return next((f for k, f in reversed(self.frames) if k == kind), None)

    def step_parent(self) -> tuple[Scope, Any] | None:
        frame = self.find("phase")
        return (frame.scope, frame.span) if frame is not None else self.joined

    def close(self, kinds: set[str], exc: BaseException | None = None, error: str | None = None,
              error_kind: str = "error") -> None:
        """End this manager's frames of ``kinds`` (innermost first); ``error``: each fails with it, ``error_kind``
        its ``error.type`` (MARS's ``fail()`` while a step is open names that step as the failed one:
        ``invoke_workflow_failed(error, current_step)``; its step loop fails the phase from there when the
        step's solve raised or a human aborted it)."""
        targets = [f for k, f in self.frames if k in kinds]
        self.frames = [(k, f) for k, f in self.frames if k not in kinds]
        for frame in reversed(targets):
            if error:
                _fail_frame(frame, error, error_kind)
            if exc is not None:
                try:
                    record_exception(frame.span, exc)
                except Exception:
                    logger.debug("cmbagent_otel: could not record exception", exc_info=True)
            if self.cursor is not None and frame in self.cursor.frames:
                self.cursor.close_all([frame])
            else:
                end_frame(frame)

    def push(self, kind: str, frame: Frame | None) -> None:
        if frame is None:
            return
        frame.finish = end_frame
        self.frames.append((kind, frame))
        if self.cursor is not None and kind != "workflow":
            self.cursor.push(frame)


#: The phase manager started outside any run (and not through ``with``) in this context, the latest: its
#: phase's solves join its run. Set by ``start()`` in the context the phase runs in (an asyncio task's own
#: copy, a thread's); its manager's ``complete()`` / ``fail()`` / ``__exit__`` end that run.
_BARE_MANAGER: contextvars.ContextVar[tuple[_State, _ManagerSpans] | None] = contextvars.ContextVar(
    "cmbagent_otel_bare_manager", default=None)


def _bare_manager_run(state: _State) -> _ManagerSpans | None:
    """The bare phase manager of ``state`` (this instrument() cycle: not one an earlier cycle left open) whose
    run is still open in this context (``None``: none)."""
    named = _BARE_MANAGER.get()
    if named is None or named[0] is not state:
        return None
    spans = named[1]
    if spans.anchor is None or spans.find("workflow") is None:
        return None
    return spans


@contextmanager
def _in_bare_manager_run(spans: _ManagerSpans) -> Iterator[None]:
    """Work (a solve) in the bare manager's run: its anchor scope attached, parented under its open frames."""
    frame, anchor = spans.find("workflow"), spans.anchor
    token = None
    if frame is not None and anchor is not None:
        token = otel_context.attach(with_scope(anchor, trace.set_span_in_context(frame.span)))
    try:
        yield
    finally:
        if token is not None:
            otel_context.detach(token)


def _forget_bare_manager(spans: _ManagerSpans) -> None:
    """Its run ended: the context no longer names it (a later phase's solves must not join it)."""
    spans.anchor = None
    named = _BARE_MANAGER.get()
    if named is not None and named[1] is spans:
        _BARE_MANAGER.set(None)


# --- the instrumentor --------------------------------------------------------------------
try:
    from opentelemetry.instrumentation.utils import is_instrumentation_enabled as _otel_enabled
except ImportError:  # older opentelemetry-instrumentation
    from opentelemetry.instrumentation.utils import _SUPPRESS_INSTRUMENTATION_KEY

    def _otel_enabled() -> bool:
        return not otel_context.get_value(_SUPPRESS_INSTRUMENTATION_KEY)


def _instrumentation_enabled() -> bool:
    try:
        return bool(_otel_enabled())
    except Exception:
        return False


def _ours(state: _State, wrapper: Callable[..., Any]) -> Callable[..., Any]:
    """Mark ``wrapper`` as ours; it calls through untouched once uninstrumented or when suppressed."""

    def guarded(wrapped: Callable[..., Any], instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if not state.active or not _instrumentation_enabled():
            return wrapped(*args, **kwargs)
        return wrapper(wrapped, instance, args, kwargs)

    # its cycle: uninstrument() removes this cycle's wrapper wherever it is in a chain (_patching.unwrap_ours)
    guarded._cmbagent_otel = state  # type: ignore[attr-defined]
    return guarded


def _is_ours(value: Any) -> bool:
    return isinstance(value, PROXY) and getattr(getattr(value, "_self_wrapper", None), "_cmbagent_otel", False)


class _State:
    """Everything one instrument() ... uninstrument() cycle holds."""

    def __init__(self) -> None:
        self.active = True
        self.lock = threading.RLock()
        reset_in_child(self, "lock")
        self.patched: list[tuple[Any, str]] = []
        self.codes: dict[CodeType, tuple[str, str]] = {}
        self.callers = _CallerRuns(self.codes)
        self.managers: weakref.WeakKeyDictionary[Any, _ManagerSpans] = weakref.WeakKeyDictionary()
        self.binding: object | None = None  # the provider routing of the workflow API it holds
        self.restores: list[Callable[[], None]] = []  # what uninstrument() undoes besides ``patched``

    def manager(self, instance: Any, create: bool = False) -> _ManagerSpans | None:
        try:
            spans = self.managers.get(instance)
            if spans is None and create:
                spans = self.managers[instance] = _ManagerSpans()
            return spans
        except TypeError:  # not weak-referenceable
            return None


class CmbagentInstrumentor(BaseInstrumentor):  # type: ignore[misc]
    """Workflow, phase and step spans for cmbagent (PyPI and the MARS fork).

    ``instrument(tracer_provider=None, meter_provider=None, metrics=None)``: modules already
    imported are wrapped at once, the others right after their import (instrumenting never
    imports cmbagent). The run and step durations go to ``meter_provider`` (default: the global
    one); ``metrics=False`` (or ``CMBAGENT_OTEL_METRICS=false``) records none.
    Idempotent; ``uninstrument()`` restores every wrapped attribute.
    """

    _state: _State | None = None
    _hooked: set[str]

    def instrumentation_dependencies(self) -> Collection[str]:
        return ("cmbagent",)

    def _instrument(self, **kwargs: Any) -> None:
        provider = kwargs.get("tracer_provider")
        meter_provider = kwargs.get("meter_provider")
        metrics_on = bool(environment_variables.get(environment_variables.METRICS, kwargs.get("metrics")))
        self._state = _State()
        if provider is not None or meter_provider is not None or not metrics_on:
            # its workflow/phase/step spans and run metrics go to those providers; released at uninstrument
            self._state.binding = workflow_tracers.bind_providers(provider, meter_provider, metrics_on)
        if not hasattr(self, "_hooked"):
            self._hooked = set()
        try:
            if importlib.util.find_spec("cmbagent") is None:
                return
        except (ImportError, ValueError):
            return
        for name in (*ENTRY_MODULES, PHASE_MANAGER_MODULE, WORKFLOW_EXECUTOR_MODULE, PHASE_BASE_MODULE,
                     *EXTERNAL_MODEL_CALLS, _langchain.CHAT_MODELS_MODULE):
            if name in self._hooked:
                module = sys.modules.get(name)
                if module is not None:
                    self._patch_module(module)
            else:
                self._hooked.add(name)
                # fires now for a module already imported, otherwise right after its import
                wrapt.register_post_import_hook(self._patch_module, name)

    def _uninstrument(self, **kwargs: Any) -> None:
        state, self._state = self._state, None
        if state is None:
            return
        state.active = False
        if state.binding is not None:
            workflow_tracers.release(state.binding)
        with state.lock:
            for owner, attr in reversed(state.patched):
                try:
                    # this cycle's wrapper only, wherever it is: the generic unwrap took off the outermost, a
                    # wrapper the application (another instrumentation) put on after ours, and left ours
                    unwrap_ours(owner, attr, state)
                except Exception:
                    logger.debug("cmbagent_otel: could not restore %s", attr, exc_info=True)
            state.patched.clear()
            for restore in reversed(state.restores):
                try:
                    restore()
                except Exception:
                    logger.debug("cmbagent_otel: could not restore a patch", exc_info=True)
            state.restores.clear()
        state.callers.close_all()

    # --- patching -------------------------------------------------------------------------
    def _patch_module(self, module: ModuleType) -> None:
        state = self._state
        if state is None:
            return  # a post-import hook firing after uninstrument()
        name = module.__name__
        try:
            with state.lock:
                if name in ENTRY_MODULES:
                    for func_name, mode in ENTRY_POINTS.items():
                        if func_name in vars(module):
                            self._wrap(state, module, func_name, _entry_wrapper(state, func_name, mode))
                if name == CMBAGENT_CLASS_MODULE:
                    owner = defining_class(getattr(module, "CMBAgent", None), "solve")
                    if owner is not None:
                        self._wrap(state, owner, "solve", _solve_wrapper(state))
                    else:
                        logger.debug("cmbagent_otel: cmbagent.cmbagent.CMBAgent.solve not found; skipped")
                if name == PHASE_MANAGER_MODULE:
                    cls = getattr(module, "PhaseExecutionManager", None)
                    if isinstance(cls, type):
                        self._patch_phase_manager(state, cls)
                if name == WORKFLOW_EXECUTOR_MODULE:
                    cls = getattr(module, "WorkflowExecutor", None)
                    owner = defining_class(cls, "__init__")
                    if owner is not None and owner is not object:
                        self._wrap(state, owner, "__init__", _executor_init(state))
                    owner = defining_class(cls, "run")
                    if owner is not None and inspect.iscoroutinefunction(vars(owner)["run"]):
                        self._wrap(state, owner, "run", _executor_run(state))
                if name == PHASE_BASE_MODULE:
                    cls = getattr(module, "Phase", None)
                    if isinstance(cls, type):
                        self._patch_phases(state, cls)
                for func_name, call in EXTERNAL_MODEL_CALLS.get(name, {}).items():
                    if func_name in vars(module):
                        self._wrap(state, module, func_name, _external_call_wrapper(state, *call))
                if name == _langchain.CHAT_MODELS_MODULE:
                    cls = getattr(module, _langchain.CHAT_MODEL_CLASS, None)
                    for method in _langchain.CHAT_MODEL_METHODS:
                        if isinstance(cls, type) and callable(vars(cls).get(method)):
                            self._wrap(state, cls, method, _chat_model_wrapper(state, method))
                    if isinstance(cls, type) and callable(vars(cls).get(_langchain.ASKING_METHOD)):
                        self._wrap(state, cls, _langchain.ASKING_METHOD, _asking_wrapper(state))
        except Exception:
            logger.debug("cmbagent_otel: patching %s failed", name, exc_info=True)

    def _wrap(self, state: _State, owner: Any, name: str, wrapper: Callable[..., Any]) -> None:
        # under state.lock (every caller): a cycle uninstrument() has put back patches nothing more. A patch
        # that read ``active`` before waiting for the lock (a phase class defined, a module imported, in
        # another thread) came after the restore: the dead cycle's wrapper stayed, outside ``patched``
        if not state.active or any(o is owner and a == name for o, a in state.patched):
            return
        current = vars(owner).get(name)
        if current is None or not callable(current):
            logger.debug("cmbagent_otel: %s.%s not found in this cmbagent; skipped",
                         getattr(owner, "__name__", owner), name)
            return
        if _is_ours(current):
            original = current.__wrapped__
            if name in ENTRY_POINTS and getattr(original, "__name__", name) != name:
                # an alias (cmbagent's ``deep_research = planning_and_control_context_carryover``):
                # its runs are named as the user called them
                self._wrap_alias(state, owner, name, original, wrapper)
                return
            # a re-export bound to the wrapper installed on its defining module: restore it too
            state.patched.append((owner, name))
            return
        code = getattr(current, "__code__", None)
        if isinstance(code, CodeType) and name in ENTRY_POINTS:
            state.codes[code] = (name, ENTRY_POINTS[name])
        try:
            wrapt.wrap_function_wrapper(owner, name, wrapper)
        except Exception:
            logger.debug("cmbagent_otel: could not patch %s", name, exc_info=True)
            return
        state.patched.append((owner, name))

    @staticmethod
    def _wrap_alias(state: _State, owner: Any, name: str, original: Any, wrapper: Callable[..., Any]) -> None:
        """Bind ``owner.name`` to its own wrapper of ``original`` (restored to ``original`` by unwrap)."""
        try:
            setattr(owner, name, wrapt.FunctionWrapper(original, wrapper))
        except Exception:
            logger.debug("cmbagent_otel: could not patch %s", name, exc_info=True)
            return
        state.patched.append((owner, name))

    def _patch_phases(self, state: _State, base: type) -> None:
        """Watch ``execute`` of every subclass of MARS's ``Phase`` (``base``): those defined already, and those
        defined later (a hook on ``base.__init_subclass__``, removed by uninstrument()): the post-import hook of
        ``cmbagent.phases.base`` fires before its subclasses' modules run."""
        if not state.active:  # uninstrument() ran while this waited for the lock: its hook would stay
            return
        found, todo = [], list(type.__subclasses__(base))
        while todo and len(found) < _PHASE_CLASSES_MAX:
            cls = todo.pop()
            found.append(cls)
            todo.extend(type.__subclasses__(cls))
        for cls in found:
            self._patch_phase_execute(state, cls)
        original = vars(base).get("__init_subclass__")
        if getattr(original, "_cmbagent_otel", False):  # an earlier cycle's hook its uninstrument() left: replaced
            original = original._cmbagent_otel_original
        instrumentor = self

        def __init_subclass__(cls: type, **kwargs: Any) -> None:
            if original is not None:
                original.__get__(None, cls)(**kwargs)
            else:
                super(base, cls).__init_subclass__(**kwargs)  # type: ignore[misc]
            if state.active:
                try:
                    with state.lock:
                        instrumentor._patch_phase_execute(state, cls)
                except Exception:
                    logger.debug("cmbagent_otel: could not patch a phase class", exc_info=True)

        def restore() -> None:
            if vars(base).get("__init_subclass__") is not hook:
                return
            if original is None:
                delattr(base, "__init_subclass__")
            else:
                base.__init_subclass__ = original  # type: ignore[method-assign]

        hook = classmethod(__init_subclass__)
        hook._cmbagent_otel = True  # type: ignore[attr-defined]
        hook._cmbagent_otel_original = original  # type: ignore[attr-defined]
        try:
            base.__init_subclass__ = hook  # type: ignore[assignment]
        except Exception:
            logger.debug("cmbagent_otel: could not watch MARS's phase classes", exc_info=True)
            return
        state.restores.append(restore)

    def _patch_phase_execute(self, state: _State, cls: type) -> None:
        if inspect.iscoroutinefunction(vars(cls).get("execute")):
            self._wrap(state, cls, "execute", _phase_execute(state))

    def _patch_phase_manager(self, state: _State, cls: type) -> None:
        for name, build in _PM_WRAPPERS.items():
            owner = defining_class(cls, name)
            if owner is not None and owner is not object:
                self._wrap(state, owner, name, build(state))

    def instrument_phase_manager(self, cls: type) -> None:
        """Patch a ``PhaseExecutionManager`` class (MARS, or one with the same method names)."""
        if not self.is_instrumented_by_opentelemetry:
            self.instrument(skip_dep_check=True)
        state = self._state
        if state is not None:
            with state.lock:
                self._patch_phase_manager(state, cls)

    @property
    def patched(self) -> list[tuple[Any, str]]:
        """The (owner, attribute) pairs currently wrapped."""
        state = self._state
        return list(state.patched) if state is not None else []


# --- wrappers ---------------------------------------------------------------------------
def _entry_wrapper(state: _State, name: str, mode: str) -> Callable[..., Any]:
    def wrapper(wrapped: Callable[..., Any], instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        try:
            block = _workflow_for_entry(name, mode, _bind(wrapped, args, kwargs))
        except Exception:
            logger.debug("cmbagent_otel: could not describe %s", name, exc_info=True)
            return wrapped(*args, **kwargs)
        if inspect.iscoroutinefunction(wrapped):
            work = wrapped(*args, **kwargs)
            return _closes_unstarted(_run_async(block, work), work)
        with _run(block):
            return call_with_headroom(wrapped, args, kwargs)  # one frame-stack chunk for the workflow

    return _ours(state, wrapper)


async def _run_async(block: workflow, coro: Any) -> Any:
    with _run(block):
        return await coro


def _solve_wrapper(state: _State) -> Callable[..., Any]:
    def wrapper(wrapped: Callable[..., Any], instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        try:
            _register_api_keys(getattr(instance, "api_keys", None))
            call = _bind(wrapped, args, kwargs)
            scope = current_scope()
            in_run = scope is not None and scope.in_workflow
            # a solve of a phase awaited by hand outside any run: the phase's run
            bare = None if in_run else _bare_manager_run(state)
            caller = None if in_run or bare is not None else state.callers.find()
        except Exception:
            logger.debug("cmbagent_otel: could not inspect CMBAgent.solve", exc_info=True)
            return wrapped(*args, **kwargs)
        if in_run:
            return _solve_in_workflow(wrapped, instance, args, kwargs, call)
        if bare is not None:
            with _in_bare_manager_run(bare):
                return _solve_in_workflow(wrapped, instance, args, kwargs, call)
        if caller is not None:
            with caller.attached():
                return _solve_in_workflow(wrapped, instance, args, kwargs, call)
        with _run(_solve_run(instance, call)):
            return _solve_in_workflow(wrapped, instance, args, kwargs, call)

    return _ours(state, wrapper)


def _external_call_wrapper(state: _State, agent: str, model: str | None, provider: str | None) -> Callable[..., Any]:
    """A model call cmbagent makes outside AG2 (:data:`EXTERNAL_MODEL_CALLS`): a ``chat <model>`` span
    (kind ``llm``) of ``agent`` with the usage the call returns, recorded when the call has returned
    (a model call nested in it, the VLM's criteria call, is then its sibling, not its child), in the run it is
    in: a MARS phase awaited by hand's too (:func:`_model_call_place`)."""

    def wrapper(wrapped: Callable[..., Any], instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        try:
            place = _model_call_place(state)
            if place is None:
                return wrapped(*args, **kwargs)
            started, began = time.time_ns(), time.perf_counter()
            local = _external_calls
            local.ended, local.ended_at = 0, 0.0
        except Exception:
            logger.debug("cmbagent_otel: could not time an external model call", exc_info=True)
            return wrapped(*args, **kwargs)
        result: Any = None
        error: BaseException | None = None
        try:
            result = wrapped(*args, **kwargs)
            return result
        except BaseException as exc:
            error = exc
            raise
        finally:
            _record_external_call(place, agent, model, provider, max(started, getattr(local, "ended", 0)),
                                  result, error, (wrapped, args, kwargs), max(began, getattr(local, "ended_at", 0.0)))

    return _ours(state, wrapper)


# when this thread's last external model call span ended: ``ended`` by the wall clock (a span's time),
# ``ended_at`` by ``time.perf_counter()`` (a duration's: the wall clock may step while a call runs)
_external_calls = threading.local()


def _record_external_call(place: tuple[Scope, _ManagerSpans | None], agent: str, model: str | None,
                          provider: str | None, started: int,
                          result: Any, error: BaseException | None, call: tuple[Any, ...] | None = None,
                          began: float | None = None) -> None:
    try:
        vlm = model is None
        if model is None:  # the VLM: cmbagent's module-level choice
            model = _text(getattr(sys.modules.get(VLM_MODULE), "vlm_model", None)) or "unknown"
            provider = "gcp.gemini" if model.startswith("gemini") else "openai"
        completion = result[0] if isinstance(result, tuple) and result else result
        attrs: dict[str, Any] = {semconv.GEN_AI_OPERATION_NAME: semconv.OP_CHAT, semconv.GEN_AI_REQUEST_MODEL: model,
                                 semconv.GEN_AI_AGENT_NAME: agent}
        if provider:
            attrs[semconv.GEN_AI_PROVIDER_NAME] = provider
        usage = getattr(completion, "usage", None)
        prompt, output = _int(getattr(usage, "prompt_tokens", None)), _int(getattr(usage, "completion_tokens", None))
        if prompt is not None and output is not None:
            attrs[semconv.GEN_AI_USAGE_INPUT_TOKENS] = prompt
            attrs[semconv.GEN_AI_USAGE_OUTPUT_TOKENS] = output
        response_model = _text(getattr(completion, "model", None)) if usage is not None else None
        if response_model and response_model != "unknown":
            attrs[semconv.GEN_AI_RESPONSE_MODEL] = response_model
        cost = getattr(completion, "total_cost", None)
        if vlm and prompt is not None and output is not None and model in VLM_PRICES_PER_1M:
            # an OpenAI completion has no total_cost: priced as cmbagent's cost report prices the VLM's call
            price_in, price_out = VLM_PRICES_PER_1M[model]
            cost = (price_in * prompt + price_out * output) / 1_000_000
        if isinstance(cost, (int, float)) and not isinstance(cost, bool) and cost > 0:
            attrs[semconv.LLM_COST_USD] = float(cost)

        def extras(span: Any, attrs: Mapping[str, Any]) -> None:
            if call is not None:
                _external_call_extras(span, attrs, time.perf_counter() if began is None else began, call,
                                      completion, result, error)

        _record_placed_chat(place, model, attrs, started, error, extras)
    except Exception:
        logger.debug("cmbagent_otel: could not record an external model call", exc_info=True)


def _record_chat(scope: Scope, model: str, attrs: dict[str, Any], started: int, error: BaseException | None,
                 extras: Callable[[Any, Mapping[str, Any]], None] | None = None,
                 parent: otel_context.Context | None = None) -> None:
    """A model call made outside AG2, which has returned: a ``chat <model>`` span (kind ``llm``) at ``scope``
    from ``started`` to now with ``attrs``, failed with ``error``, under ``parent`` (default: the current
    context's span); ``extras(span, attrs)`` before it ends."""
    attrs, _ = compose(scope, semconv.KIND_LLM, attrs, None, False, None, None)
    span = workflow_tracers.current().start_span(f"chat {model}", context=parent, kind=trace.SpanKind.CLIENT,
                                                 attributes=attrs, start_time=started)
    try:
        if error is not None:
            record_exception(span, error)
        if extras is not None:
            extras(span, attrs)
    finally:
        span.end()
        _external_calls.ended, _external_calls.ended_at = time.time_ns(), time.perf_counter()


def _chat_model_wrapper(state: _State, method: str) -> Callable[..., Any]:
    """A LangChain chat model's ``invoke`` / ``ainvoke`` / ``stream`` / ``astream`` (MARS's LangGraph phases'
    model calls; ``batch`` / ``abatch`` call ``invoke`` / ``ainvoke`` per input), or the model call of its
    ``generate`` family (``_generate_with_cache`` / ``_agenerate_with_cache``: ``generate``, ``predict``,
    ``__call__``, ... bypass ``invoke``) inside a run: a ``chat <model>`` span of the node open where it was called,
    recorded when the call returned (a stream: when it ended, was closed or raised) with the usage its answer gave
    (:mod:`._langchain`). Outside a run, and a call a chat model makes inside one of these (``invoke``'s own
    ``_generate_with_cache``, ``stream`` falling back on ``invoke``: one model call), it calls through untouched."""
    argument = _langchain.CHAT_MODEL_METHODS.get(method, "input")

    def wrapper(wrapped: Callable[..., Any], instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        try:
            place = None if _langchain.in_call() else _model_call_place(state)
            if place is None:
                return wrapped(*args, **kwargs)
            started: _Start = (time.time_ns(), time.perf_counter(), args[0] if args else kwargs.get(argument))
        except Exception:
            logger.debug("cmbagent_otel: could not time a chat model's call", exc_info=True)
            return wrapped(*args, **kwargs)
        if method == "stream":
            return _streamed_chat(place, instance, started, wrapped(*args, **kwargs))
        if method == "astream":
            return _astreamed_chat(place, instance, started, wrapped(*args, **kwargs))
        if method in ("ainvoke", "_agenerate_with_cache"):
            work = wrapped(*args, **kwargs)
            return _closes_unstarted(_awaited_chat(place, instance, started, work), work)
        with _chat_model_call(place, instance, started) as answer:
            result = wrapped(*args, **kwargs)
            answer.read(result)
            return result

    return _ours(state, wrapper)


# a LangChain chat model's call's start: the wall clock's ns (its span's start), time.perf_counter() (its
# duration's: the wall clock may step while it runs) and the input it was called with (its prompt)
_Start = tuple[int, float, Any]


@contextmanager
def _chat_model_call(place: tuple[Scope, _ManagerSpans | None], model: Any, started: _Start,
                     mark: bool = True) -> Iterator[_langchain.Answer]:
    """One chat model call running in the block (``invoke``, an ``ainvoke``'s await, a stream read to its end),
    recorded when the block is left: failed with what left it, unless that is the application closing the stream
    or coroutine (``GeneratorExit``: it stopped reading, no error of the call). ``mark``: marked a chat model's call
    in this context all along (a stream marks its pulls only: the application runs between its chunks)."""
    answer = _langchain.Answer()
    error: BaseException | None = None
    token = _langchain.enter_call() if mark else None
    watch, asked = _langchain.watch_asking() if mark else (None, [True])
    try:
        yield answer
    except GeneratorExit:
        raise
    except BaseException as exc:
        error = exc
        raise
    finally:
        if token is not None:
            _langchain.leave_call(token)
        if watch is not None:
            _langchain.leave_asking(watch)
            if error is None and not asked[0] and _asks_through_us(model):
                answer.cached = True  # LangChain's cache answered (a langchain-core without its own mark too)
        _record_chat_model_call(place, model, started, answer, error)


def _asking_wrapper(state: _State) -> Callable[..., Any]:
    """LangChain's ``BaseChatModel._should_stream``, which ``_generate_with_cache`` calls before asking the model
    once its cache had no answer: noted for the call running (:func:`_langchain.model_asked`), also while
    instrumentation is suppressed (a note of ours only); it calls through untouched."""
    def wrapper(wrapped: Callable[..., Any], instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if state.active:
            _langchain.model_asked()
        return wrapped(*args, **kwargs)

    wrapper._cmbagent_otel = state  # type: ignore[attr-defined]
    return wrapper


def _asks_through_us(model: Any) -> bool:
    """Whether ``model`` asks its model as LangChain's ``BaseChatModel`` does: its ``_should_stream`` (with our
    note, :func:`_asking_wrapper`) and its cache's ``_generate_with_cache`` / ``_agenerate_with_cache`` are
    LangChain's. A model class with its own (or a langchain-core without them) says nothing by not calling it."""
    try:
        owners = [defining_class(type(model), method) for method in _langchain.ASKING_PATH]
        return all(o is not None and o.__name__ == _langchain.CHAT_MODEL_CLASS for o in owners) and \
            _is_ours(vars(owners[0])[_langchain.ASKING_METHOD])
    except Exception:
        return False


async def _awaited_chat(place: tuple[Scope, _ManagerSpans | None], model: Any, started: _Start, work: Any) -> Any:
    with _chat_model_call(place, model, started) as answer:
        result = await work
        answer.read(result)
        return result


def _model_call_place(state: _State) -> tuple[Scope, _ManagerSpans | None] | None:
    """Where a model call made now outside AG2 belongs: the scope of the run it is in and the bare phase manager
    whose run that is (a MARS phase awaited by hand outside any run, whose frames are never attached: see
    :func:`_bare_manager_run`), or ``None`` outside any run."""
    scope = current_scope()
    if scope is not None and scope.in_workflow:
        return scope, None
    bare = _bare_manager_run(state)
    if bare is None:
        return None
    with _in_bare_manager_run(bare):
        scope = current_scope()
    return (scope, bare) if scope is not None and scope.in_workflow else None


_END = object()  # a stream's end, for next() / anext()


def _pull(answer: _langchain.Answer, stream: Iterator[Any]) -> Any:
    """The next chunk of ``stream`` (``_END`` at its end), pulled marked a chat model's call (``stream`` falling
    back on ``invoke`` is this one call), read into ``answer``."""
    token = _langchain.enter_call()
    try:
        chunk = next(stream, _END)
    finally:
        _langchain.leave_call(token)
    if chunk is not _END:
        answer.read(chunk)
    return chunk


async def _apull(answer: _langchain.Answer, stream: Any) -> Any:
    """:func:`_pull` of an async stream."""
    token = _langchain.enter_call()
    try:
        chunk = await anext(stream, _END)
    finally:
        _langchain.leave_call(token)
    if chunk is not _END:
        answer.read(chunk)
    return chunk


def _streamed_chat(place: tuple[Scope, _ManagerSpans | None], model: Any, started: _Start,
                   stream: Iterator[Any]) -> Iterator[Any]:
    """``stream``'s chunks as they come, its usage summed, its call recorded when it ends: exhausted, raising,
    or closed by the application (which stopped reading: not an error of the call); the stream is closed then."""
    with _chat_model_call(place, model, started, mark=False) as answer:
        try:
            while (chunk := _pull(answer, stream)) is not _END:
                yield chunk
        finally:
            close = getattr(stream, "close", None)
            if close is not None:
                close()


async def _astreamed_chat(place: tuple[Scope, _ManagerSpans | None], model: Any, started: _Start,
                         stream: Any) -> Any:
    """``astream``'s chunks as :func:`_streamed_chat` passes ``stream``'s: an async generator, the application's
    stream closed (``aclose``) when it ends."""
    with _chat_model_call(place, model, started, mark=False) as answer:
        try:
            while (chunk := await _apull(answer, stream)) is not _END:
                yield chunk
        finally:
            close = getattr(stream, "aclose", None)
            if close is not None:
                await close()


def _record_chat_model_call(place: tuple[Scope, _ManagerSpans | None], model: Any, started: _Start,
                            answer: _langchain.Answer, error: BaseException | None) -> None:
    try:
        name, attrs = _langchain.request_attributes(model)
        attrs.update(answer.attributes())
        cost = _langchain.cost_of(attrs)
        if cost:
            attrs[semconv.LLM_COST_USD] = cost
        at, began, prompt = started

        def extras(span: Any, attrs: Mapping[str, Any]) -> None:
            _outside_call_extras(span, attrs, began, error, lambda: _langchain.prompt_messages(model, prompt),
                                 answer.output)

        _record_placed_chat(place, name, attrs, at, error, extras, in_frame=True)
    except Exception:
        logger.debug("cmbagent_otel: could not record a chat model's call", exc_info=True)


def _record_placed_chat(place: tuple[Scope, _ManagerSpans | None], model: str, attrs: dict[str, Any], started: int,
                        error: BaseException | None, extras: Callable[[Any, Mapping[str, Any]], None] | None = None,
                        in_frame: bool = False) -> None:
    """:func:`_record_chat` of a call :func:`_model_call_place` placed: under the node its scope is (a frame of a
    manager's phase, step or redo: never attached) in the run of a bare phase manager, or with ``in_frame``;
    otherwise under the current context's span (a tool's, when a tool made the call)."""
    scope, bare = place
    with _in_bare_manager_run(bare) if bare is not None else contextlib.nullcontext():
        parent = trace.set_span_in_context(effective_parent()[1]) if in_frame or bare is not None else None
        _record_chat(scope, model, attrs, started, error, extras, parent=parent)


#: the arguments of an external model call that are its prompt (``send_image_to_vlm``'s image is not)
_EXTERNAL_PROMPT_ARGUMENTS = ("plot_description", "plot_type", "vlm_prompt", "task_context", "vlm_analysis",
                              "problems", "executed_code")


def _external_call_extras(span: Any, attrs: Mapping[str, Any], began: float, call: tuple[Any, ...],
                          completion: Any, result: Any, error: BaseException | None) -> None:
    """:func:`_outside_call_extras` of cmbagent's external model call ``call`` (function, args, kwargs): its
    prompt the call's prompt arguments, its answer the completion's text (the plot debugger's fixes, one per
    line)."""

    def prompt() -> list[dict[str, Any]] | None:
        func, args, kwargs = call
        bound = _bind(func, args, kwargs)
        parts = [f"{name}: {bound[name]}" for name in _EXTERNAL_PROMPT_ARGUMENTS if bound.get(name) is not None]
        return [{"role": "user", "content": [{"type": "text", "text": p} for p in parts]}] if parts else None

    def answer() -> str | None:
        choices = getattr(completion, "choices", None)
        text = getattr(getattr(choices[0], "message", None), "content", None) if choices else None
        if text is None and isinstance(result, list):  # the plot debugger's fixes
            text = "\n".join(str(item) for item in result)
        return text if isinstance(text, str) else None

    _outside_call_extras(span, attrs, began, error, prompt, answer)


def _outside_call_extras(span: Any, attrs: Mapping[str, Any], began: float, error: BaseException | None,
                         prompt: Callable[[], list[dict[str, Any]] | None],
                         answer: Callable[[], str | Mapping[str, Any] | None]) -> None:
    """What AG2's own model calls have and a call outside AG2 lacked: the GenAI client metrics (duration,
    token usage, cost) when the instrumentor records metrics, and with content capture on its prompt
    (``prompt()``: its messages) and answer (``answer()``: its text, or an assistant message with its tool
    calls), redacted and bounded like every message.
    ``began``: the call's start by ``time.perf_counter()``."""
    try:
        from ..instrumentation._messages import message, output_message, render
        from ..instrumentation.ag2 import AG2Instrumentor
        from ..metrics import CallAttributes

        state = AG2Instrumentor()._state
        if state is None:
            return
        metrics = state.metrics
        if metrics is not None and metrics.live():
            usage_in = attrs.get(semconv.GEN_AI_USAGE_INPUT_TOKENS)
            metrics.model_call(
                CallAttributes(str(attrs.get(semconv.GEN_AI_PROVIDER_NAME) or "unknown"),
                               attrs.get(semconv.GEN_AI_REQUEST_MODEL), attrs.get(semconv.GEN_AI_RESPONSE_MODEL), None),
                max(time.perf_counter() - began, 0.0), error_type(error) if error is not None else None,
                usage_in, attrs.get(semconv.GEN_AI_USAGE_OUTPUT_TOKENS) if usage_in is not None else None,
                attrs.get(semconv.LLM_COST_USD))
        if not state.capture or not span.is_recording():
            return
        messages = prompt()
        if messages:
            span.set_attribute(semconv.GEN_AI_INPUT_MESSAGES, render(messages, convert=message)[0])
        said = answer() if error is None else None
        if isinstance(said, (str, Mapping)):
            span.set_attribute(semconv.GEN_AI_OUTPUT_MESSAGES, render([said], convert=output_message)[0])
    except Exception:
        logger.debug("cmbagent_otel: could not record a model call's metrics or content", exc_info=True)


def _pm_enter(state: _State) -> Callable[..., Any]:
    def wrapper(wrapped: Callable[..., Any], instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        # used as a context manager outside any run: the fallback workflow is a with-block (attached here,
        # detached by __exit__), so the phase's work nests under it
        try:
            scope = current_scope()
            spans = state.manager(instance, create=True)
            if spans is not None and spans.block is None and not spans.frames and (
                    scope is None or not scope.in_workflow):
                spans.block = _enter(_fallback_workflow(instance))
        except Exception:
            logger.debug("cmbagent_otel: PhaseExecutionManager.__enter__", exc_info=True)
        return wrapped(*args, **kwargs)

    return _ours(state, wrapper)


def _fallback_workflow(instance: Any) -> workflow:
    phase = getattr(instance, "phase", None)
    phase_type = _text(getattr(phase, "phase_type", None)) or "phase"
    config = getattr(phase, "config", None)
    return _mars_workflow(phase_type, getattr(instance, "context", None), _int(getattr(config, "max_redos", None)),
                          config)


def _mars_workflow(name: str, ctx: Any, max_redos: int | None = None, config: Any = None) -> workflow:
    """The run of a MARS phase or workflow started outside any run; ``ctx``: its phase or workflow context,
    ``config``: its (first) phase's config, whose model fields name the run's agent and model as an entry
    call's arguments do (MARS's ``ControlPhaseConfig.engineer_model``: ``engineer`` and that model)."""
    shared = getattr(ctx, "shared_state", None)
    mode = _text(shared.get("mode")) if isinstance(shared, Mapping) else None
    try:
        fields = vars(config) if config is not None else {}
    except TypeError:  # no __dict__ (slots): no fields read
        fields = {}
    agent, model = _agent_and_model(fields) if isinstance(fields, Mapping) else (None, None)
    return workflow(name, mode=mode or "planning-control", task=_text(getattr(ctx, "task", None)),
                    work_dir=_work_dir(getattr(ctx, "work_dir", None)), max_redos=max_redos, agent=agent,
                    model=model)


def _pm_start(state: _State) -> Callable[..., Any]:
    def wrapper(wrapped: Callable[..., Any], instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        try:
            joined = _joined_call()
            if joined is not None:  # a joined entry call's own phase (it records its failure)
                joined.opened.append(_text(getattr(getattr(instance, "phase", None), "phase_type", None)) or "phase")
                joined.last_failed = False
            spans = state.manager(instance, create=True)
            if spans is not None and not spans.frames and spans.joined is None:
                _manager_start(state, spans, instance)
        except Exception:
            logger.debug("cmbagent_otel: PhaseExecutionManager.start", exc_info=True)
        return wrapped(*args, **kwargs)

    return _ours(state, wrapper)


def _manager_start(state: _State, spans: _ManagerSpans, instance: Any) -> None:
    phase_type = _text(getattr(getattr(instance, "phase", None), "phase_type", None)) or "phase"
    raw = raw_scope()
    if raw is not None and raw.in_workflow:
        scope, span = effective_parent()
        spans.cursor = raw.ensure_cursor()
        if scope is not None and scope.phase is not None:
            spans.joined = (scope, span)  # a phase is open already (phases do not nest): its steps go there
            return
        spans.push("phase", _detached(_phase(phase_type), scope, span, "phase", instance))
        return
    # no run, and not entered as a context manager (a phase awaited by hand: ``await phase.execute(context)``
    # in MARS's orchestrator and routers): the phase's run, a frame, its phase and steps frames of an anchor
    # scope of its own; nothing is attached, but the solves the phase makes in this context join it
    wf = _detached(_fallback_workflow(instance), None, None, "workflow", instance)
    if wf is None:
        return
    anchor = wf.scope.evolve()
    spans.cursor = anchor.ensure_cursor()
    spans.anchor = anchor
    spans.push("workflow", wf)
    spans.push("phase", _detached(_phase(phase_type), wf.scope, wf.span, "phase", instance))
    _BARE_MANAGER.set((state, spans))


def _pm_start_step(state: _State) -> Callable[..., Any]:
    def wrapper(wrapped: Callable[..., Any], instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        try:
            spans = state.manager(instance)
            call = _bind(wrapped, args, kwargs)
            number = _int(call.get("step_number", args[0] if args else None))
            if spans is not None and number is not None and number > 0:
                spans.close({"redo", "step"})
                parent = spans.step_parent()
                if parent is not None:
                    description = _text(call.get("description", args[1] if len(args) > 1 else None)) or ""
                    spans.push("step", _detached(step(number, description, agent=_manager_step_agent(instance, number)),
                                                 parent[0], parent[1], "step", instance))
                    if len(spans.started) < _STARTED_MAX:
                        spans.started.add(number)
        except Exception:
            logger.debug("cmbagent_otel: PhaseExecutionManager.start_step", exc_info=True)
        return wrapped(*args, **kwargs)

    return _ours(state, wrapper)


def _pm_redo(state: _State) -> Callable[..., Any]:
    def wrapper(wrapped: Callable[..., Any], instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        try:
            spans = state.manager(instance)
            call = _bind(wrapped, args, kwargs)
            number = _int(call.get("step_number"))
            attempt = _int(call.get("redo_number"))
            if spans is not None and number and attempt:
                spans.close({"redo"})
                parent = spans.find("step")
                if parent is not None:
                    # above the run's max_redos the redo is refused: no span, no error
                    spans.push("redo", _detached(redo(number, attempt, _text(call.get("hypothesis"))), parent.scope,
                                                 parent.span, "redo", instance))
        except Exception:
            logger.debug("cmbagent_otel: PhaseExecutionManager.create_redo_branch", exc_info=True)
        return wrapped(*args, **kwargs)

    return _ours(state, wrapper)


def _close_step(spans: _ManagerSpans | None, summary: str | None, error: str | None) -> None:
    if spans is None:
        return
    frame = spans.find("step")
    if frame is None:
        return
    if summary:
        try:
            frame.span.set_attribute(semconv.STEP_SUMMARY, truncate(summary) or "")
        except Exception:
            logger.debug("cmbagent_otel: could not set the step summary", exc_info=True)
    if error:
        _fail_frame(frame, error)
    spans.close({"redo", "step"})


def _pm_complete_step(state: _State) -> Callable[..., Any]:
    def wrapper(wrapped: Callable[..., Any], instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        result = wrapped(*args, **kwargs)
        try:
            call = _bind(wrapped, args, kwargs)
            _close_step(state.manager(instance), _text(call.get("summary")), None)
        except Exception:
            logger.debug("cmbagent_otel: PhaseExecutionManager.complete_step", exc_info=True)
        return result

    return _ours(state, wrapper)


def _pm_fail_step(state: _State) -> Callable[..., Any]:
    def wrapper(wrapped: Callable[..., Any], instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        result = wrapped(*args, **kwargs)
        try:
            call = _bind(wrapped, args, kwargs)
            _close_step(state.manager(instance), None, _text(call.get("error")) or "step failed")
        except Exception:
            logger.debug("cmbagent_otel: PhaseExecutionManager.fail_step", exc_info=True)
        return result

    return _ours(state, wrapper)


_FRAME_KINDS = {"redo", "step", "phase", "workflow"}


def _joined_phase_failed(exc: BaseException | None) -> None:
    """A phase manager's phase failed (with ``exc`` when it was failed handling an exception): inside a joined
    entry call, that phase records it, and what the call raises before another phase of its own is that
    failure too (see :meth:`_JoinedCall.last_failed`)."""
    joined = _joined_call()
    if joined is not None:
        joined.last_failed = True
        if exc is not None:
            joined.failed.append(exc)


def _pm_complete(state: _State) -> Callable[..., Any]:
    def wrapper(wrapped: Callable[..., Any], instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        result = wrapped(*args, **kwargs)
        try:
            spans = state.manager(instance)
            if spans is not None:
                spans.close(_FRAME_KINDS)
                spans.joined = None
                _forget_bare_manager(spans)
        except Exception:
            logger.debug("cmbagent_otel: PhaseExecutionManager.complete", exc_info=True)
        return result

    return _ours(state, wrapper)


# MARS's plan-executing phases (ControlPhase, HITLControlPhase) and where they read their plan, in their order
_PLAN_PHASES = frozenset({"control", "hitl_control"})
_PLAN_KEYS = (("input_data", "final_plan"), ("input_data", "plan_steps"), ("shared_state", "plan_steps"),
              ("shared_state", "final_plan"))
_STARTED_MAX = 1000  # step numbers a manager remembers (MARS's plans have a handful of steps)


def _manager_plan(instance: Any) -> Any:
    """The plan a phase manager's phase executes, read where MARS's control phases read it (a preloaded plan
    in the phase's config, the phase context's input and shared state, the planning context)."""
    params = getattr(getattr(getattr(instance, "phase", None), "config", None), "params", None)
    if isinstance(params, Mapping) and plan_steps(params.get("preloaded_plan")):
        return params.get("preloaded_plan")
    ctx = getattr(instance, "context", None)
    for where, key in _PLAN_KEYS:
        found = getattr(ctx, where, None)
        if isinstance(found, Mapping) and plan_steps(found.get(key)):
            return found.get(key)
    planning = getattr(ctx, "input_data", None)
    planning = planning.get("planning_context") if isinstance(planning, Mapping) else None
    return planning.get("final_plan") if isinstance(planning, Mapping) else None


def _manager_step_agent(instance: Any, number: int) -> str | None:
    """The agent a plan phase's step ``number`` runs with: MARS's control phases give each step the plan's
    ``sub_task_agent`` (as cmbagent's DAG names the step's agent, ``add_step_nodes``); ``None`` for another
    phase (a one-step report phase) or a step the plan does not hold."""
    try:
        if _text(getattr(getattr(instance, "phase", None), "phase_type", None)) not in _PLAN_PHASES:
            return None
        planned = plan_steps(_manager_plan(instance))
        return plan_agent(planned[number - 1]) if number <= len(planned) else None
    except Exception:
        logger.debug("cmbagent_otel: could not read a step's agent from the plan", exc_info=True)
        return None


def _manager_plan_stopped(spans: _ManagerSpans, instance: Any) -> None:
    """A phase manager's plan phase fails (its ``fail()``, or ``__exit__`` with an exception) after its last
    step ended or before its next one started (MARS's ControlPhase catching an exception while it writes a
    step's reports or builds the next step's agents, a human aborting or rejecting a step in HITL control, a
    step out of attempts): the plan's later steps never start. cmbagent's DAG has a node for each (pending);
    they are pending nodes under the phase, as the carryover loop's (:func:`_plan_stopped_after`)."""
    try:
        frame = spans.find("phase")
        phase_type = _text(getattr(getattr(instance, "phase", None), "phase_type", None))
        if frame is None or not (spans.started or phase_type in _PLAN_PHASES):
            return
        record_not_started(workflow_tracers.current(), frame.scope, frame.span, _manager_plan(instance),
                           spans.started, after=max(spans.started, default=0))
    except Exception:
        logger.debug("cmbagent_otel: could not record the plan's steps not started", exc_info=True)


def _pm_fail(state: _State) -> Callable[..., Any]:
    def wrapper(wrapped: Callable[..., Any], instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        handling = sys.exc_info()[1]  # the phase's failure, when cmbagent fails it from its except clause
        try:
            return wrapped(*args, **kwargs)
        finally:
            try:
                _joined_phase_failed(handling)
                spans = state.manager(instance)
                if spans is not None:
                    _manager_plan_stopped(spans, instance)
                    call = _bind(wrapped, args, kwargs)
                    # failed handling an exception (MARS's step loop catching it, its cancel check's
                    # WorkflowCancelledException): the spans' error.type is its type, as for a raised one
                    spans.close(_FRAME_KINDS, error=_text(call.get("error")) or "phase failed",
                                error_kind=error_type(handling) if handling is not None else "error")
                    spans.joined = None
                    _forget_bare_manager(spans)
                stops = _EXECUTOR_STOPS.get()
                if stops is not None and handling is not None and error_type(handling) in semconv.STOPPED_ERROR_TYPES:
                    stops[id(getattr(instance, "phase", None))] = handling
            except Exception:
                logger.debug("cmbagent_otel: PhaseExecutionManager.fail", exc_info=True)

    return _ours(state, wrapper)


def _pm_exit(state: _State) -> Callable[..., Any]:
    def wrapper(wrapped: Callable[..., Any], instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        exc = args[1] if len(args) > 1 and isinstance(args[1], BaseException) else None
        try:
            return wrapped(*args, **kwargs)
        finally:
            try:
                if exc is not None:
                    _joined_phase_failed(exc)
                spans = state.manager(instance)
                if spans is not None:
                    _manager_ended(spans, instance, exc)
            except Exception:
                logger.debug("cmbagent_otel: PhaseExecutionManager.__exit__", exc_info=True)

    return _ours(state, wrapper)


def _manager_ended(spans: _ManagerSpans, instance: Any, exc: BaseException | None) -> None:
    """Close what a phase manager opened, failed with ``exc`` when it ended by one (its ``__exit__``, or an
    exception escaping its phase's ``execute``): its frames, its pending plan steps, its run."""
    if exc is not None:  # (MARS's __exit__ calls fail(), which recorded them and closed the phase)
        _manager_plan_stopped(spans, instance)
    spans.close(_FRAME_KINDS, exc=exc)
    spans.joined = None
    _forget_bare_manager(spans)
    block, spans.block = spans.block, None
    _exit(block, exc)


_PHASE_CLASSES_MAX = 1000  # MARS's phase classes patched at most (it has a few dozen)


def _phase_execute(state: _State) -> Callable[..., Any]:
    """A MARS phase's ``execute`` (a coroutine function): what its manager opened is closed when an exception
    escapes it without the manager's ``fail()`` (``ControlPhase`` making its folders or reading its models'
    configs between ``manager.start()`` and its step loop's ``try``): the phase failed with that exception, and
    the run its manager opened outside any run (else that run stayed open, and the context named it for later
    solves)."""

    def wrapper(wrapped: Callable[..., Any], instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        work = wrapped(*args, **kwargs)  # called now, as the application's call does: a wrong argument raises here
        return _closes_unstarted(_phase_executing(state, instance, work), work)

    return _ours(state, wrapper)


async def _phase_executing(state: _State, phase: Any, work: Any) -> Any:
    try:
        return await work
    except BaseException as exc:
        _phase_escaped(state, phase, exc)
        raise


def _phase_escaped(state: _State, phase: Any, exc: BaseException) -> None:
    try:
        if is_clean_exit(exc):
            return
        for manager, spans in list(state.managers.items()):
            if getattr(manager, "phase", None) is phase and (spans.frames or spans.joined is not None):
                _joined_phase_failed(exc)
                _manager_ended(spans, manager, exc)
    except Exception:
        logger.debug("cmbagent_otel: could not close a phase an exception left", exc_info=True)


def _executor_init(state: _State) -> Callable[..., Any]:
    def wrapper(wrapped: Callable[..., Any], instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        result = wrapped(*args, **kwargs)
        try:
            joined = _joined_call()
            phases = getattr(instance, "phases", None)
            if joined is not None and isinstance(phases, (list, tuple)):
                joined.planned = tuple(_text(getattr(p, "phase_type", None)) or "phase" for p in phases[:_PLANNED_MAX])
        except Exception:
            logger.debug("cmbagent_otel: WorkflowExecutor.__init__", exc_info=True)
        return result

    return _ours(state, wrapper)


_PLANNED_MAX = 64  # a workflow's phases read (MARS's longest has 6)


def _executor_run(state: _State) -> Callable[..., Any]:
    """MARS's ``WorkflowExecutor.run`` (a coroutine function; ``run_sync`` runs it): outside any run it is one,
    named by its workflow's id, so its phases (whose managers' ``start()`` attaches nothing) and the solves
    they make are one run, not a detached run per phase and one per solve."""

    def wrapper(wrapped: Callable[..., Any], instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        work = wrapped(*args, **kwargs)  # called now, as the application's call does: a wrong argument raises here
        return _closes_unstarted(_executor_running(instance, work), work)

    return _ours(state, wrapper)


def _closes_unstarted(running: Any, work: Any) -> Any:
    """``running`` (our coroutine, which awaits the application's coroutine ``work``), set to close ``work`` if
    it is collected without having started it. A task cancelled before its first step never starts ours, and
    ``work`` was collected unstarted: "RuntimeWarning: coroutine ... was never awaited", which the application's
    own coroutine, closed by the cancel, does not give (an error under ``-W error``). Not at exit."""
    try:
        weakref.finalize(running, _close_unstarted, work).atexit = False
    except Exception:
        logger.debug("cmbagent_otel: could not watch a coroutine's start", exc_info=True)
    return running


def _close_unstarted(work: Any) -> None:
    """Close ``work`` if it never started."""
    try:
        if inspect.getcoroutinestate(work) == inspect.CORO_CREATED:
            work.close()
    except Exception:  # not a coroutine (a function that returns something else): nothing to close
        logger.debug("cmbagent_otel: could not close an unstarted coroutine", exc_info=True)


#: The stops (the user's cancel) the phases of the MARS executor run in this context failed handling, by the
#: phase's id (the executor holds its phases while it runs): set by the executor's run for its phases' managers,
#: dropped when it ends (an exception's traceback holds its phase: kept no longer than the run)
_EXECUTOR_STOPS: contextvars.ContextVar[dict[int, BaseException] | None] = contextvars.ContextVar(
    "cmbagent_otel_executor_stops", default=None)


async def _executor_running(instance: Any, work: Any) -> Any:
    block: _Block | None = None
    try:
        scope = current_scope()  # in the task running the executor (asyncio.run copies the caller's context)
        if scope is None or not scope.in_workflow:
            name = _text(getattr(getattr(instance, "workflow", None), "id", None)) or "workflow"
            phases = getattr(instance, "phases", None)
            first = phases[0] if isinstance(phases, (list, tuple)) and phases else None
            block = _mars_workflow(name, getattr(instance, "context", None), config=getattr(first, "config", None))
    except Exception:
        logger.debug("cmbagent_otel: WorkflowExecutor.run", exc_info=True)
    entered = _enter(block) if block is not None else None
    stops: dict[int, BaseException] = {}
    # inside a run not its own too (the application's block, an entry call's): the error leaves its blocks
    token = _EXECUTOR_STOPS.set(stops) if entered is not None or block is None else None
    try:
        result = await work
    except BaseException as exc:
        stop = _phase_stop_restated(stops, instance, exc) if token is not None else None
        if stop is not None:  # the runs it leaves end with the stop; the executor's error is one of their events
            restated_stop(exc, stop)
        _exit(entered, exc)
        raise
    finally:
        if token is not None:
            with contextlib.suppress(Exception):  # (a coroutine driven from another context: nothing to undo)
                _EXECUTOR_STOPS.reset(token)
        stops.clear()
    _exit(entered)
    return result


def _phase_stop_restated(stops: dict[int, BaseException], executor: Any, exc: BaseException) -> BaseException | None:
    """The stop (the user's cancel: ``WorkflowCancelledException``) that the executor's current phase's manager
    failed handling, when ``exc`` is the executor's own error for that failure, raised from nothing (MARS's
    ``RuntimeError(f"Phase {type} failed: {result.error}")``): the run it ends was cancelled, as cmbagent's
    cancel endpoint marks it, not failed. ``None`` for any other exception."""
    try:
        if type(exc) is not RuntimeError or exc.__cause__ is not None or exc.__context__ is not None:
            return None
        phases = getattr(executor, "phases", None)
        index = getattr(executor, "current_phase_index", None)
        if not isinstance(phases, (list, tuple)) or not isinstance(index, int) or not 0 <= index < len(phases):
            return None
        stop = stops.get(id(phases[index]))
        return stop if stop is not None and str(exc).endswith(str(stop)) else None
    except Exception:
        logger.debug("cmbagent_otel: could not read the executor's failed phase", exc_info=True)
        return None


_PM_WRAPPERS: Mapping[str, Callable[[_State], Callable[..., Any]]] = {
    "__enter__": _pm_enter,
    "start": _pm_start,
    "start_step": _pm_start_step,
    "create_redo_branch": _pm_redo,
    "complete_step": _pm_complete_step,
    "fail_step": _pm_fail_step,
    "complete": _pm_complete,
    "fail": _pm_fail,
    "__exit__": _pm_exit,
}


# --- module-level API (kept for existing callers) ----------------------------------------
def instrument_cmbagent(tracer_provider: Any = None, meter_provider: Any = None, metrics: bool | None = None) -> bool:
    """Instrument cmbagent when it is installed; return whether it is. Idempotent."""
    try:
        if importlib.util.find_spec("cmbagent") is None:
            return False
    except (ImportError, ValueError):
        return False
    instrumentor = CmbagentInstrumentor()
    if not instrumentor.is_instrumented_by_opentelemetry:
        instrumentor.instrument(tracer_provider=tracer_provider, meter_provider=meter_provider, metrics=metrics,
                                skip_dep_check=True)
    return True


def uninstrument_cmbagent() -> None:
    """Restore every attribute wrapped for cmbagent to its original object."""
    CmbagentInstrumentor().uninstrument()


def instrument_phase_manager(cls: type) -> None:
    """Patch a ``PhaseExecutionManager`` class (MARS's, or one with the same method names)."""
    CmbagentInstrumentor().instrument_phase_manager(cls)


def is_instrumented() -> bool:
    """Whether the cmbagent integration is in effect."""
    return bool(CmbagentInstrumentor().is_instrumented_by_opentelemetry)


__all__ = [
    "ENTRY_POINTS",
    "CmbagentInstrumentor",
    "instrument_cmbagent",
    "instrument_phase_manager",
    "is_instrumented",
    "uninstrument_cmbagent",
]
